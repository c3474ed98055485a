"""Grouping on host arrays, shared by the k-means steps: positions within runs, size classes."""
from __future__ import annotations

import math

import numpy as np


def rank_in_group(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (input grouped)."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    return np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))


def size_classes(sizes: np.ndarray, ratio: float = 2.0) -> list[np.ndarray]:
    """Indices of `sizes` grouped by classes [ratio^c, ratio^(c+1)), smallest class first.

    Padding a group to its largest member then wastes under 1 - 1/ratio of it, where one
    padded block for a whole tile would pad every token to the tile's largest.
    """
    classes = np.floor(np.log(np.maximum(sizes, 1)) / math.log(ratio) + 1e-9).astype(np.int64)
    return [np.flatnonzero(classes == c) for c in np.unique(classes)]
