"""Test-side layouts: local shards of a full GPTModel for TP x PP x (virtual PP) x DP, built the way
megacore's parallelize does (meta-device stages with global layer names, ``ParamMeta.global_shape``
and ``ParamMeta.shard_fn`` on every TP shard), plus a flat-sharded (ZeRO-1 style) optimizer state.

They let the checkpoint tests check resharding against the full single-device reference whether or
not megacore.parallel / megacore.distributed are importable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from megacore.checkpoint import FlatStateEntry
from megacore.config import TransformerConfig
from megacore.models.gpt import GPTModel
from megacore.sharding import param_meta, peek_meta


def tiny_config(**kw) -> TransformerConfig:
    base = dict(num_layers=4, hidden_size=32, num_attention_heads=8, num_query_groups=2, ffn_hidden_size=48,
                vocab_size=100, seq_length=16, vocab_padding_multiple=16, tie_embeddings=True)
    base.update(kw)
    return TransformerConfig(**base).validate()


def reference_state(cfg: TransformerConfig, seed: int = 0, steps: int = 2):
    """Full model + AdamW after ``steps`` steps: ({name: param}, {name: {state: tensor}})."""
    torch.manual_seed(seed)
    model = GPTModel(cfg, seed=seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length), generator=gen)
        opt.zero_grad()
        model(ids, labels=ids).backward()
        opt.step()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    states = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}
    return params, states


def tp_shard_fn(name: str, cfg: TransformerConfig, rank: int, tp: int) -> Optional[Callable]:
    """How TP rank ``rank`` of ``tp`` slices the full tensor ``name`` (None: replicated)."""
    if tp == 1:
        return None
    G, hd = cfg.num_kv_heads, cfg.head_dim
    qpg = cfg.num_attention_heads // G
    if name.endswith("word_embeddings.weight") or name == "output_layer.weight":
        return lambda f: f.chunk(tp, 0)[rank]
    if ".linear_qkv." in name:
        if G % tp == 0:
            return lambda f: f.reshape(G, -1, *f.shape[1:]).chunk(tp, 0)[rank].reshape(-1, *f.shape[1:])
        rep = tp // G  # KV heads replicated: each rank gets part of one group's q heads plus its k and v
        g, j, qn = rank // rep, rank % rep, qpg // rep

        def qkv_replicated(f):
            v = f.reshape(G, qpg + 2, hd, *f.shape[1:])[g]
            return torch.cat([v[j * qn:(j + 1) * qn], v[qpg:]]).reshape(-1, *f.shape[1:])
        return qkv_replicated
    if ".linear_fc1." in name:
        if cfg.gated_mlp:
            return lambda f: f.reshape(2, -1, *f.shape[1:]).chunk(tp, 1)[rank].reshape(-1, *f.shape[1:])
        return lambda f: f.chunk(tp, 0)[rank]
    if name.endswith("linear_proj.weight") or name.endswith("linear_fc2.weight"):
        return lambda f: f.chunk(tp, 1)[rank]
    return None


@dataclass
class Layout:
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    flat_optimizer: bool = False  # ZeRO-1 style flat shards over the data-parallel ranks

    def coords(self, rank: int, world: int) -> tuple[int, int, int, int]:
        """(tp_rank, dp_rank, pp_rank, dp_size) with TP fastest, then DP, then PP."""
        dp = world // (self.tp * self.pp)
        return rank % self.tp, (rank // self.tp) % dp, rank // (self.tp * dp), dp


def stage_layers(cfg: TransformerConfig, layout: Layout, pp_rank: int) -> list[list[int]]:
    """Global layer indices of each virtual chunk of stage ``pp_rank`` (chunk c of stage s holds
    model chunk c*pp + s, as in interleaved schedules)."""
    n_chunks = layout.pp * layout.vpp
    per = cfg.num_layers // n_chunks
    return [list(range((c * layout.pp + pp_rank) * per, (c * layout.pp + pp_rank + 1) * per)) for c in range(layout.vpp)]


def local_model(cfg: TransformerConfig, full: dict, layout: Layout, rank: int, world: int,
                fill: Optional[float] = None) -> list[nn.Module]:
    """This rank's model chunks holding its shards of ``full`` (or the constant ``fill``)."""
    tp_rank, _, pp_rank, _ = layout.coords(rank, world)
    chunks = []
    layer_sets = stage_layers(cfg, layout, pp_rank)
    for c, layers in enumerate(layer_sets):
        first = c == 0 and pp_rank == 0
        last = c == layout.vpp - 1 and pp_rank == layout.pp - 1
        with torch.device("meta"):
            m = GPTModel(cfg, pre_process=first, post_process=last, layer_numbers=layers)
        for mod_name, mod in list(m.named_modules()):
            for pname, p in list(mod._parameters.items()):
                if p is None:
                    continue
                name = f"{mod_name}.{pname}" if mod_name else pname
                gname = (peek_meta(p).global_name or name)
                fn = tp_shard_fn(gname, cfg, tp_rank, layout.tp)
                value = full[gname] if fn is None else fn(full[gname])
                if fill is not None:
                    value = torch.full_like(value, fill)
                new = nn.Parameter(value.clone())
                for k, v in vars(p).items():
                    if k.startswith("_megacore"):
                        setattr(new, k, v)
                if fn is not None:
                    param_meta(new).global_shape = tuple(full[gname].shape)
                    param_meta(new).shard_fn = fn
                mod._parameters[pname] = new
        chunks.append(m)
    return chunks


def expected_local(cfg, full: dict, layout: Layout, rank: int, world: int) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(global name, local param, expected local value) for every parameter of this rank's chunks."""
    tp_rank = layout.coords(rank, world)[0]
    out = []
    for chunk in local_model(cfg, full, layout, rank, world):
        for name, p in chunk.named_parameters():
            gname = (peek_meta(p).global_name or name)
            fn = tp_shard_fn(gname, cfg, tp_rank, layout.tp)
            out.append((gname, p, full[gname] if fn is None else fn(full[gname])))
    return out


def local_shard(cfg, layout, rank, world, gname: str, full_tensor: torch.Tensor) -> torch.Tensor:
    fn = tp_shard_fn(gname, cfg, layout.coords(rank, world)[0], layout.tp)
    return full_tensor if fn is None else fn(full_tensor)


class FlatShardedState:
    """ZeRO-1 style optimizer state: this DP rank owns a contiguous range of the concatenation of its
    local parameters (flattened, in order) and keeps fp32 master / exp_avg / exp_avg_sq for it."""

    STATES = ("master", "exp_avg", "exp_avg_sq")

    def __init__(self, params: list[nn.Parameter], dp_rank: int, dp: int):
        self.params = params
        total = sum(p.numel() for p in params)
        per = -(-total // dp)
        self.lo, self.hi = min(dp_rank * per, total), min((dp_rank + 1) * per, total)
        self.buffers = {s: torch.zeros(self.hi - self.lo) for s in self.STATES}
        self.step = 0

    def ranges(self):
        """(param, param flat start, buffer start, length) of each param overlapping this shard."""
        pos = 0
        for p in self.params:
            a, b = max(self.lo, pos), min(self.hi, pos + p.numel())
            if a < b:
                yield p, a - pos, a - self.lo, b - a
            pos += p.numel()

    def fill_from(self, masters: dict, moments: dict) -> None:
        """masters[id(p)] / moments[id(p)][state]: full local tensors to take this rank's slices from."""
        for p, start, buf, n in self.ranges():
            self.buffers["master"][buf:buf + n] = masters[id(p)].reshape(-1)[start:start + n]
            for s in ("exp_avg", "exp_avg_sq"):
                self.buffers[s][buf:buf + n] = moments[id(p)][s].reshape(-1)[start:start + n]

    def checkpoint_entries(self) -> list[FlatStateEntry]:
        return [FlatStateEntry(p, s, self.buffers[s][buf:buf + n], start)
                for p, start, buf, n in self.ranges() for s in self.STATES]

    def checkpoint_common(self) -> dict:
        return {"step": self.step}

    def load_checkpoint_common(self, state: dict) -> None:
        self.step = state.get("step", self.step)
