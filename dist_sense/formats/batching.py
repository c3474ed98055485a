"""Batch orders shared by the training data readers (formats.labels.LabelData, stages/finetune/data.TaskBatches)."""
from __future__ import annotations

import numpy as np


def length_groups(lengths: np.ndarray, group: int, block: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of range(len(lengths)) in length groups: each run of `group` positions is sorted by
    length (stably) and cut into blocks of `block` (the last may be short), whose order is then shuffled
    with `rng`. Batches cut from the result pad little; the order depends only on its inputs."""
    lengths = np.asarray(lengths)
    out = []
    for start in range(0, len(lengths), group):
        pool = start + np.argsort(lengths[start:start + group], kind="stable")
        blocks = [pool[i:i + block] for i in range(0, len(pool), block)]
        out.extend(blocks[b] for b in rng.permutation(len(blocks)))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)
