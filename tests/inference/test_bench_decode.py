"""benchmarks/bench_decode.py runs end to end at a tiny size on the CPU (no timing is checked), and
its paths agree on the greedy tokens of the same weights (transformers' included)."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_bench_decode_runs_tiny(tmp_path, capsys):
    pytest.importorskip("transformers")
    spec = importlib.util.spec_from_file_location("bench_decode", os.path.join(ROOT, "benchmarks", "bench_decode.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    result = bench.main(["--tiny", "--json", str(tmp_path / "out.json")])
    out = capsys.readouterr().out
    names = set(result["rows"])
    assert {"bandwidth limit", "old generate", "transformers generate", "engine, 1 request"} <= names
    assert all(rate > 0 for rate in result["rows"].values())
    assert result["engine_tokens"] > 0 and (tmp_path / "out.json").is_file()
    assert result["engine_prefill_forwards"] < result["engine_prefill_forwards_alone"]   # prompts were packed
    # fp32 on the CPU: every path continues the prompt with the same greedy tokens
    assert "graphed vs old: first 6 of 6 equal" in out and "graphed vs transformers: first 12 of 12 equal" in out
