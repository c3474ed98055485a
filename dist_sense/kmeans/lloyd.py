"""Lloyd iterations for one tile of tokens, every token at once (tile.cluster_tile's inner loop).

A rank's rows are grouped by token into padded chunks of tokens with similar row counts,
so assigning them is one batched GEMM per chunk (||x||^2 - 2 x.c + ||c||^2 with a
per-token sense mask); the per-sense sums, counts and inertia of an iteration go out in
one allreduce, and every rank then updates the centres identically. Arrays live on `xp`
(cupy or numpy); the collectives (types.Comm) run on host numpy arrays.

A product's result for one row can differ in the last bit with the batch it is computed in
(BLAS and cuBLAS pick kernels by shape), and the batches follow how the rows are spread
over ranks. So the distances the final assignment returns (example contexts are ranked
by them) are recomputed directly, ||x - c||^2 summed in one fixed order (ordered_row_sums),
and their total, the inertia, is summed exactly (exact_sum_parts): given the centres and
the labels, both depend on the rows alone. The labels themselves, the iterations' sums and
their stopping tests still come from float32 products and per-rank sums.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from dist_sense.kmeans.groups import size_classes
from dist_sense.kmeans.start import reseed_empty
from dist_sense.kmeans.types import Centres, LocalTile, TileRun
from dist_sense.runtime.backend import to_device, to_host

CHUNK_ELEMENTS = 1 << 25
"""Floats in one padded chunk of gathered vectors (bounds the assignment's temporaries)."""
PAD_RATIO = 2 ** 0.5
"""Lloyd's chunks group tokens whose row counts differ by under this factor (padding < 30%)."""


@dataclass
class Chunk:
    """Tokens of similar local row count, padded to one [t, n] block of row indices."""

    slots: object
    """xp int64 [t]: token slots in the tile."""
    index: object
    """xp int64 [t]: the tokens' rows in the centre arrays (the slots, or positions in plan_chunks' `tokens`)."""
    rows: object
    """xp int64 [t, n]: row of LocalTile.vectors (0 where padding)."""
    valid: object
    """xp bool [t, n]."""
    x: object = None
    """xp float32 [t, n, d]: the rows themselves, gathered at first use and kept (Lloyd reads them every iteration)."""
    sq: object = None
    """xp float32 [t, n]: their squared norms."""


def plan_chunks(offsets: np.ndarray, d: int, xp, tokens=None) -> list[Chunk]:
    """Group tokens by row count (size classes) into chunks of at most CHUNK_ELEMENTS floats.

    Within a class counts differ by under PAD_RATIO, so padding costs under 30% of each
    chunk; the loop runs over classes and chunks, never over single tokens. With `tokens`
    (slots), only those, and centre arrays are indexed by position in `tokens`.
    """
    counts = np.diff(offsets)
    index_of = np.arange(len(counts))
    if tokens is not None:
        index_of = np.full(len(counts), -1, dtype=np.int64)
        index_of[tokens] = np.arange(len(tokens))
    present = np.flatnonzero((counts > 0) & (index_of >= 0))
    chunks = []
    for group in size_classes(counts[present], PAD_RATIO):
        members = present[group]
        width = int(counts[members].max())
        per_chunk = max(1, CHUNK_ELEMENTS // (width * d))
        column = np.arange(width)
        for start in range(0, len(members), per_chunk):
            slots = members[start : start + per_chunk]
            valid = column < counts[slots][:, None]
            rows = np.where(valid, offsets[slots][:, None] + column, 0)
            chunks.append(Chunk(to_device(slots, xp), to_device(index_of[slots], xp), to_device(rows, xp),
                                to_device(valid, xp)))
    return chunks


def _chunk_distances(local: LocalTile, chunk: Chunk, centres, centre_sq, valid, xp):
    """Rows of a chunk, their nearest valid sense of their own token, and its squared distance."""
    if chunk.x is None:
        chunk.x, chunk.sq = local.vectors[chunk.rows], local.sq_norms[chunk.rows]
    x = chunk.x
    cross = x @ centres[chunk.index].transpose(0, 2, 1)
    dist = chunk.sq[:, :, None] - 2 * cross + centre_sq[chunk.index][:, None, :]
    dist = xp.where(valid[chunk.index][:, None, :], xp.maximum(dist, 0), xp.inf)
    labels = xp.argmin(dist, axis=2)
    nearest = xp.take_along_axis(dist, labels[:, :, None], axis=2)[:, :, 0]
    return x, labels, xp.where(chunk.valid & xp.isfinite(nearest), nearest, 0)


def lloyd_stats(local: LocalTile, chunks: list[Chunk], centres, valid, xp) -> np.ndarray:
    """This rank's per-sense sums, counts and inertia, packed into one float64 host buffer.

    centres/valid are indexed by Chunk.index (the tokens the chunks were planned for).

    Packing makes an iteration cost one allreduce; sums of two halves of the rows
    equal the sums of all rows, which is what lets ranks split the data.
    """
    n_tokens, k_max, d = centres.shape
    sums = xp.zeros((n_tokens, k_max, d), dtype=xp.float64)
    counts = xp.zeros((n_tokens, k_max), dtype=xp.float64)
    inertia = xp.zeros(n_tokens, dtype=xp.float64)
    centre_sq = xp.einsum("tkd,tkd->tk", centres, centres)  # no [T, K, d] temporary
    senses = xp.arange(k_max)
    for chunk in chunks:
        x, labels, nearest = _chunk_distances(local, chunk, centres, centre_sq, valid, xp)
        members = ((labels[:, :, None] == senses) & chunk.valid[:, :, None]).astype(xp.float32)
        sums[chunk.index] = members.transpose(0, 2, 1) @ x
        counts[chunk.index] = members.sum(axis=1)
        inertia[chunk.index] = nearest.sum(axis=1, dtype=xp.float64)
    return to_host(xp.concatenate([sums.ravel(), counts.ravel(), inertia]))


def unpack_stats(packed, n_tokens: int, k_max: int, d: int):
    """(sums [T, K, d], counts [T, K], inertia per token [T]) from a (summed) lloyd_stats buffer."""
    split = n_tokens * k_max * d
    sums = packed[:split].reshape(n_tokens, k_max, d)
    counts = packed[split : split + n_tokens * k_max].reshape(n_tokens, k_max)
    return sums, counts, packed[split + n_tokens * k_max :]


def assign_senses(local: LocalTile, chunks: list[Chunk], centres, valid, xp):
    """(labels int64 [N], squared distances float32 [N]) of the local rows in `chunks`, in row order.

    Rows of tokens no chunk covers get label -1 and distance 0. A distance is ||x - c||^2 of
    the row and its sense summed in one fixed order: the same whatever chunk the row is in."""
    labels = xp.full(len(local.slots), -1, dtype=xp.int64)
    distances = xp.zeros(len(local.slots), dtype=xp.float32)
    centre_sq = xp.einsum("tkd,tkd->tk", centres, centres)
    for chunk in chunks:
        x, chunk_labels, _ = _chunk_distances(local, chunk, centres, centre_sq, valid, xp)
        diff = centres[chunk.index[:, None], chunk_labels]  # [t, n, d]: each row's sense
        diff -= x
        diff *= diff
        has_sense = valid[chunk.index].any(axis=1)
        direct = xp.where(has_sense[:, None], ordered_row_sums(diff, xp), 0)
        rows = chunk.rows[chunk.valid]
        labels[rows] = chunk_labels[chunk.valid]
        distances[rows] = direct[chunk.valid]
    return labels, distances


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


def update_centres(sums, counts, centres, valid, spherical: bool, xp):
    """New centres (means, or unit mean directions) and the mask of valid senses left empty."""
    filled = valid & (counts > 0)
    if spherical:
        mean = sums / xp.maximum(xp.linalg.norm(sums, axis=2, keepdims=True), 1e-12)
    else:
        mean = sums / xp.maximum(counts, 1)[:, :, None]
    mean = mean.astype(xp.float32)
    xp.copyto(mean, centres, where=~filled[:, :, None])  # senses nothing was nearest keep their place
    return mean, valid & (counts == 0)


def run_lloyd(run: TileRun, chunks: list[Chunk], centres: Centres, groups: list) -> list[dict]:
    """Lloyd iterations with one allreduce each, each token stopping on its own; returns the history.

    A token stops when its centres moved, in total squared distance, by no more than
    cfg.tol times its mean squared distance per dimension (scikit-learn's rule, per token),
    or when the tile's inertia changed by no more than cfg.tol; then it leaves the
    iterations (its rows are no longer read nor reduced). Decisions use allreduced values
    only, so every rank takes the same ones. `chunks` must be planned for the centres' rows
    in order (plan_chunks(..., tokens=centres.slots)); `groups` are (Subsample or
    GroupSubsample, first, end), covering consecutive rows of `centres` (one per size
    group), to re-seed empty senses from. `centres` is updated in place.
    """
    local, cfg, xp = run.local, run.cfg, run.xp
    points, valid = centres.points, centres.valid
    n_tokens, k_max, d = points.shape
    # `planned`: the centre rows the chunks cover; `active`: those still moving. Chunks are
    # re-planned (their rows gathered again) only once half the planned tokens have stopped.
    planned = active = np.arange(n_tokens)
    token_inertia = np.zeros(n_tokens)
    history, previous = [], None
    for iteration in range(cfg.max_iter):
        packed = to_device(run.comm.allreduce(lloyd_stats(local, chunks, points[to_device(planned, xp)],
                                                          valid[to_device(planned, xp)], xp)), xp)
        sums, counts, inertia = unpack_stats(packed, len(planned), k_max, d)
        token_inertia[planned] = to_host(inertia)
        moving = to_device(np.flatnonzero(np.isin(planned, active)), xp)
        sums, counts, inertia = sums[moving], counts[moving], inertia[moving]
        at = to_device(active, xp)
        current = points[at]
        updated, empty = update_centres(sums, counts, current, valid[at], cfg.spherical, xp)
        reseeded = _reseed(groups, active, updated, valid, empty, xp)
        current -= updated  # now the move, in place: no further [A, K, d] temporaries
        moved_by = xp.einsum("tkd,tkd->t", current, current, dtype=xp.float64)
        points[at] = updated
        total = float(token_inertia.sum())
        history.append({"iteration": iteration, "inertia": total, "shift": float(moved_by.sum()), "reseeded": reseeded,
                        "active_tokens": int(len(active))})
        if run.on_iteration is not None:
            run.on_iteration(history[-1])
        per_dim = to_host(inertia) / np.maximum(to_host(counts.sum(axis=1)) * d, 1)
        still = (to_host(moved_by) > cfg.tol * per_dim) & (to_host(moved_by) > 0)
        if not still.any() or (previous is not None and abs(previous - total) <= cfg.tol * previous):
            break
        previous = total
        active = active[still]
        if len(active) <= len(planned) // 2:
            planned = active
            chunks = plan_chunks(local.offsets, d, xp, tokens=centres.slots[planned])
    return history


def _reseed(groups: list, active: np.ndarray, updated, valid, empty, xp) -> int:
    """Re-seed the empty senses of the `active` centre rows (updated, empty: one row each) group by group.

    Moves `updated` rows and drops senses from `valid` (all centre rows) in place; returns
    how many senses moved."""
    at, reseeded = to_device(active, xp), 0
    for group, first, end in groups:
        rows = np.flatnonzero((active >= first) & (active < end))
        if len(rows) == 0 or not bool(empty[to_device(rows, xp)].any()):
            continue  # nothing to re-seed: spare the copy of the group's subsample
        part = group[active[rows] - first]
        rows_dev = to_device(rows, xp)
        moved, still_valid, count = reseed_empty(part, updated[rows_dev], valid[at][rows_dev], empty[rows_dev], xp)
        updated[rows_dev] = moved
        valid[at[rows_dev]] = still_valid
        reseeded += count
    return reseeded


def final_assignment(run: TileRun, chunks: list[Chunk], centres: Centres):
    """Labels and distances of the local rows under the final centres; global counts [B, K] and inertia.

    `chunks` are planned for the centres' rows, as run_lloyd's; rows of other tokens get label -1.
    """
    local, xp = run.local, run.xp
    n_rows, k_max = centres.valid.shape
    labels, distances = assign_senses(local, chunks, centres.points, centres.valid, xp)
    position = np.full(local.n_tokens, -1, dtype=np.int64)
    position[centres.slots] = np.arange(n_rows)
    host_labels = to_host(labels)
    labelled = host_labels >= 0
    flat = position[local.slots[labelled]] * k_max + host_labels[labelled]
    local_counts = np.bincount(flat, minlength=n_rows * k_max).astype(np.float64)
    packed = run.comm.allreduce(np.concatenate([local_counts, exact_sum_parts(to_host(distances))]))
    counts = np.rint(packed[: n_rows * k_max]).astype(np.int64).reshape(n_rows, k_max)
    return labels, distances, counts, exact_total(packed[n_rows * k_max :])
