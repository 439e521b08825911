"""Context parallelism with ``data.reset_position_ids``: the rotary positions of a packed sample restart
in every document while the CP mask keeps the global order and document starts.

The model-level equality of every mode with one device (CP2 in every mode, CP4 ring and a2a+ring) runs
inside the launches of ``test_cp_modes.py`` (its ``reset_*`` variants). Here: the split of one sample
(one process) and the ring's ``megacore train`` curve against one process.
"""

from __future__ import annotations

import numpy as np

from tests.parallel.test_cp_modes import TINY


def test_split_keeps_per_document_positions_and_global_document_starts():
    from megacore.data.gpt_dataset import make_sample
    from megacore.parallel.context_parallel import cp_token_index, split_sample_for_cp

    window = np.array([5, 1, 2, 0, 3, 4, 0, 6, 7, 8, 0, 9, 1, 2, 3, 4, 5])  # eod id 0
    sample = make_sample(window, eod=0, reset_position_ids=True, reset_attention_mask=True)
    offsets, start = [], 0  # independent reference: each token's offset in its document, and the start
    starts = []
    for t, tok in enumerate(window[:-1]):
        offsets.append(t - start)
        starts.append(start)
        if tok == 0:
            start = t + 1
    for cp, rank in ((2, 0), (2, 1), (4, 3)):
        local = split_sample_for_cp(sample, cp, rank)
        index = cp_token_index(16, cp, rank)
        assert local["position_ids"].tolist() == [offsets[i] for i in index]
        assert local["attention_mask"].tolist() == [starts[i] for i in index]


def test_cli_ring_curve_with_reset_position_ids_equals_one_process(tmp_path):
    """``megacore train`` on packed documents with ``data.reset_position_ids`` and document masks: the
    ring CP2 run's loss and grad-norm curve equals one process's (1e-5 relative)."""
    from tests.training.test_train_cli import grad_norms, losses, train_tiny

    tiny = [*TINY, "data.reset_position_ids=true", "checkpoint.dir=null"]
    want = train_tiny(tmp_path, "one", tiny)
    got = train_tiny(tmp_path, "ring", [*tiny, "parallel.context=2", "parallel.context_mode=ring"], nproc=2)
    for a, b in ((losses(got), losses(want)), (grad_norms(got), grad_norms(want))):
        assert len(a) == len(b) == 3 and max(abs(x - y) / abs(y) for x, y in zip(a, b)) < 1e-5, (a, b)
