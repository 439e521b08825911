set -x
nvidia-smi --query-gpu=name --format=csv
python3 - <<'PY' 2>&1 | tee $OUT/probe.txt
import torch
for dt in (torch.float32, torch.bfloat16):
    try:
        x=torch.randn(64,256,device='cuda',dtype=dt); w=torch.randn(4,512,256,device='cuda',dtype=dt)
        offs=torch.tensor([10,10,40,64],dtype=torch.int32,device='cuda')
        y=torch._grouped_mm(x,w.transpose(1,2),offs=offs); print(dt,'ok',y.shape)
    except Exception as e: print(dt,'ERR',str(e)[:200])
PY
PYTHONPATH=. python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_gpu.py tests/layers/test_moe_experts.py 2>&1 | tail -5 | tee $OUT/gpu_tests.txt
MOE="--layers 8 --experts 8 --topk 2 --moe-ffn 2816 --accum 4 --mbs 4 --steps 6 --warmup 3 --timeout 150"
PYTHONPATH=. python3 benchmarks/bench_train_step.py $MOE --variants baseline_bf16_compile,megacore_compile --out $OUT/moe_new.json --profile $OUT/prof 2>&1 | tail -45
cd old_tree && PYTHONPATH=. python3 benchmarks/bench_train_step.py $MOE --variants megacore_compile --out $OUT/moe_old.json 2>&1 | tail -4
