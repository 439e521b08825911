"""Blending several datasets by weight, and train/valid/test splits by documents.

Blending is deterministic interleaving, not random draws: dataset d's k-th sample is due at time
(k + 1/2) / w_d (w normalized to sum 1), and samples are served in order of due time (ties to the
lower dataset index). Every prefix of n samples then holds within one sample of n·w_d from each
dataset — the weights are hit as closely as integers allow, at every step, with no randomness
to seed (the datasets themselves are shuffled by their own seeds). Megatron-LM's blending (serve
the dataset furthest below its target share) has the same property.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def parse_split(split: str) -> list[float]:
    """``"969,30,1"`` -> normalized fractions ``[0.969, 0.03, 0.001]`` (three entries)."""
    parts = [p for p in str(split).replace("/", ",").split(",") if p.strip() != ""]
    try:
        nums = [float(p) for p in parts]
    except ValueError:
        nums = []
    if len(nums) != 3 or any(n < 0 for n in nums) or sum(nums) <= 0:
        raise ValueError(f"data.split={split!r} must be three non-negative numbers 'train,valid,test'; use e.g. '969,30,1'")
    total = sum(nums)
    return [n / total for n in nums]


def split_document_ranges(num_documents: int, split: str) -> list[tuple[int, int]]:
    """Contiguous [start, end) document ranges for train/valid/test (Megatron's rounding: each
    boundary is round(cumulative fraction · num_documents), so the ranges tile all documents)."""
    fractions = parse_split(split)
    bounds = [0]
    acc = 0.0
    for f in fractions:
        acc += f
        bounds.append(int(round(acc * num_documents)))
    bounds[-1] = num_documents
    return [(bounds[i], bounds[i + 1]) for i in range(3)]


def blend_index(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, sample_index) arrays of length ``size``: sample j comes from dataset
    ``dataset_index[j]``, as that dataset's ``sample_index[j]``-th sample (see module docstring)."""
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.ndim != 1 or len(w) == 0 or np.any(w < 0) or w.sum() <= 0 or not np.all(np.isfinite(w)):
        raise ValueError(f"blend weights {list(weights)} must be non-negative with a positive sum")
    w = w / w.sum()
    if size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    due, owner, rank = [], [], []
    for d, wd in enumerate(w):
        if wd == 0:
            continue
        k = np.arange(int(math.ceil(size * wd)) + 2, dtype=np.int64)  # enough candidates for the first `size`
        due.append((k + 0.5) / wd)
        owner.append(np.full(len(k), d, dtype=np.int64))
        rank.append(k)
    due_all, owner_all, rank_all = np.concatenate(due), np.concatenate(owner), np.concatenate(rank)
    order = np.lexsort((owner_all, due_all))[:size]  # by due time, then dataset index
    return owner_all[order], rank_all[order]


class BlendedDataset:
    """Samples of ``datasets`` interleaved by ``weights``; ``len`` = ``size``, ``ds[i]`` global index."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int):
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights; give one weight per dataset")
        self.datasets = list(datasets)
        self.weights = [float(x) for x in weights]
        self.size = int(size)
        self.dataset_index, self.dataset_sample_index = blend_index(self.weights, self.size)
        counts = np.bincount(self.dataset_index, minlength=len(self.datasets))
        for d, (ds, need) in enumerate(zip(self.datasets, counts)):
            if need and (ds is None or len(ds) < need):
                have = 0 if ds is None else len(ds)
                raise ValueError(f"blended dataset {d} must provide {need} samples but has {have}; "
                                 "build it with blend_counts(weights, size) samples")

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx: int):
        if not 0 <= idx < self.size:
            raise IndexError(f"sample {idx} out of range: the blended dataset has {self.size} samples")
        return self.datasets[int(self.dataset_index[idx])][int(self.dataset_sample_index[idx])]


def blend_counts(weights: Sequence[float], size: int) -> list[int]:
    """How many samples each dataset contributes to a blend of ``size`` samples."""
    owners, _ = blend_index(weights, size)
    return [int(c) for c in np.bincount(owners, minlength=len(weights))]
