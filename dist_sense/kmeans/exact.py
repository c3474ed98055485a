"""Sums that depend on the values alone, not on how they are batched or split over ranks.

The k-means' final distances and inertia must not change with the rank layout (example
contexts are ranked by the distances, and the dictionary's bytes must not depend on the
number of ranks). BLAS and reduction kernels pick their summation order by shape, so these
sum in an order of their own: a fixed halving tree per row, and exact per-exponent integer
sums for totals over ranks.
"""
from __future__ import annotations

import math

import numpy as np


def ordered_row_sums(values, xp):
    """Sums over the last axis in one fixed order, a halving tree of element-wise adds, in place (`values` is
    overwritten).

    Each result depends on its own row's values alone, not on the array's shape or layout
    nor on the backend's reduction kernels."""
    width = values.shape[-1]
    while width > 1:
        half = width // 2
        values[..., :half] += values[..., half : 2 * half]
        if width % 2:
            values[..., half] = values[..., width - 1]
        width = half + width % 2
    return values[..., 0].copy()


FLOAT32_MIN_EXPONENT, EXPONENTS = -148, 277
"""np.frexp exponents of float32 values: -148 (the smallest subnormal) to 128."""


def exact_sum_parts(values: np.ndarray) -> np.ndarray:
    """float64 [2 * EXPONENTS]: finite float32 `values` as integer sums per binary exponent, exactly.

    Each value is m * 2^(e - 24) with m an integer under 2^24, split in two 12-bit halves so
    the per-exponent sums stay exact (under 2^53) up to 2^41 values. Parts of several ranks
    add up (an allreduce) exactly, so exact_total gives the correctly rounded sum of all
    the values, whatever their order or their split over ranks."""
    mantissa, exponent = np.frexp(np.asarray(values, dtype=np.float32))
    whole = (mantissa.astype(np.float64) * 2.0**24).astype(np.int64)
    at = exponent.astype(np.int64) - FLOAT32_MIN_EXPONENT
    high = np.bincount(at, weights=whole >> 12, minlength=EXPONENTS)
    low = np.bincount(at, weights=whole & 0xFFF, minlength=EXPONENTS)
    return np.concatenate([high, low])


def exact_total(parts: np.ndarray) -> float:
    """The correctly rounded float64 total of values given as (summed) exact_sum_parts."""
    scale = np.ldexp(1.0, np.arange(EXPONENTS) + FLOAT32_MIN_EXPONENT - 24)
    return math.fsum(np.concatenate([parts[:EXPONENTS] * scale * 4096.0, parts[EXPONENTS:] * scale]).tolist())
