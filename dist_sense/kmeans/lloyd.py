"""Lloyd iterations for one tile of tokens, every token at once (tile.cluster_tile's inner loop).

A rank's rows are grouped by token into padded chunks of tokens with similar row counts,
so assigning them is one batched GEMM per chunk (x.(-2c) + ||c||^2 with a per-token sense
mask). The per-sense sums and counts of all ranks' rows are kept, the same on every rank,
from one iteration to the next; an iteration adds what the rows that changed sense moved
(local_changes), so after the first iterations the sums cost in proportion to the few rows
that move. Two allreduces an iteration (reduce_changes): a small one (count changes, which
senses changed anywhere, per-token inertia), then one row of sum changes for each sense
that changed on some rank, not the whole [tokens, K, d] block. Every rank then updates the
centres identically. Arrays live on `xp` (cupy or numpy); the collectives (types.Comm) run
on host numpy arrays.

A product's result for one row can differ in the last bit with the batch it is computed in
(BLAS and cuBLAS pick kernels by shape), and the batches follow how the rows are spread
over ranks. So the distances the final assignment returns (example contexts are ranked
by them) are recomputed directly, ||x - c||^2 summed in one fixed order (ordered_row_sums),
and their total, the inertia, is summed exactly (exact_sum_parts): given the centres and
the labels, both depend on the rows alone. The labels themselves, the iterations' sums and
their stopping tests still come from float32 products and per-rank sums.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_sense.kmeans.exact import exact_sum_parts, exact_total, ordered_row_sums
from dist_sense.kmeans.groups import size_classes
from dist_sense.kmeans.types import Centres, LocalTile, TileRun
from dist_sense.kmeans.update import add_changes, update_active
from dist_sense.runtime.backend import to_device, to_host

CHUNK_ELEMENTS = 1 << 21
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


def _nearest_senses(local: LocalTile, chunk: Chunk, centres, centre_sq, valid, xp):
    """Rows of a chunk, their nearest valid sense of their own token, and its squared distance (0 on padding).

    Two passes over the [t, n, K] block: one product with the centres scaled by -2, then
    the senses' squared norms added in place (+inf for senses that are not valid). The
    rows' own norms do not change which sense is nearest, so they are added to the
    minimum only."""
    if chunk.x is None:
        chunk.x, chunk.sq = local.vectors[chunk.rows], local.sq_norms[chunk.rows]
    x = chunk.x
    scores = x @ (centres[chunk.index] * -2).transpose(0, 2, 1)
    scores += xp.where(valid[chunk.index], centre_sq[chunk.index], xp.inf)[:, None, :]
    labels = xp.argmin(scores, axis=2)
    nearest = xp.take_along_axis(scores, labels[:, :, None], axis=2)[:, :, 0]
    nearest += chunk.sq
    return x, labels, xp.where(chunk.valid & xp.isfinite(nearest), xp.maximum(nearest, 0), 0)


DENSE_SHARE = 0.2
"""A chunk whose rows changed sense in more than this share goes through the one-hot product, else row by row."""


@dataclass
class Changes:
    """What this rank's rows changed in an iteration, in keys position * K + sense (position: in the chunks' centres)."""

    keys: object
    """xp int64 [m]: the senses whose sum changed here, each once."""
    sums: object
    """xp float64 [m, d]: the change of each one's sum of rows."""
    counts: object
    """xp float64 [P * K]: the change of every sense's row count."""
    inertia: object
    """xp float64 [P]: each token's squared distances, summed (not a change: the iteration's own)."""


def local_changes(local: LocalTile, chunks: list[Chunk], centres, valid, row_labels, xp) -> Changes:
    """Assign the chunks' rows to their nearest senses; what that changed in the per-sense sums and counts.

    centres/valid [P, K(, d)] are indexed by Chunk.index; `row_labels` (xp int64 [N], -1 for
    a row never assigned) holds every local row's sense, and is updated in place. Only
    rows whose sense changed contribute: after the first iterations they are a few per
    cent, so Lloyd's sums cost in proportion to what moves. A chunk where many rows
    changed takes one batched product of (new one-hot - old one-hot) with its rows instead.
    Changes of two halves of the rows add up to those of all rows, which is what lets
    ranks split the data."""
    n_pos, k_max, d = centres.shape
    centre_sq = xp.einsum("tkd,tkd->tk", centres, centres)  # no [T, K, d] temporary
    inertia = xp.zeros(n_pos, dtype=xp.float64)
    parts = (_chunk_changes(local, chunk, centres, centre_sq, valid, row_labels, inertia, xp) for chunk in chunks)
    found = [part for part in parts if part is not None]
    keys, sums, joined, left = ([part[i] for part in found] for i in range(4))
    # One count of the senses rows joined and left, for all chunks: not a [P * K] count per chunk.
    counts = xp.zeros(n_pos * k_max, dtype=xp.float64)
    if joined:
        counts += xp.bincount(xp.concatenate(joined), minlength=n_pos * k_max)
        counts -= xp.bincount(xp.concatenate(left), minlength=n_pos * k_max)
    keys = xp.concatenate(keys) if keys else xp.zeros(0, dtype=xp.int64)
    sums = xp.concatenate(sums) if sums else xp.zeros((0, d), dtype=xp.float64)
    return Changes(keys, sums, counts, inertia)


def _chunk_changes(local: LocalTile, chunk: Chunk, centres, centre_sq, valid, row_labels, inertia, xp):
    """One chunk's part of local_changes: (sense keys, their sum changes, keys joined, keys left), or None when no
    row changed sense. Writes the chunk's tokens' inertia and its rows' labels in place (no other chunk's)."""
    k_max = centres.shape[1]
    x, labels, nearest = _nearest_senses(local, chunk, centres, centre_sq, valid, xp)
    inertia[chunk.index] = nearest.sum(axis=1, dtype=xp.float64)
    old = row_labels[chunk.rows]
    changed = chunk.valid & (labels != old)
    n_changed = int(changed.sum())
    if n_changed == 0:
        return None
    base = chunk.index[:, None] * k_max
    new_keys, old_keys = (base + labels)[changed], (base + old)[changed]
    was = old[changed] >= 0
    row_labels[chunk.rows[changed]] = labels[changed]
    if n_changed > DENSE_SHARE * int(chunk.valid.sum()):
        senses = xp.arange(k_max)
        onehot = ((labels[:, :, None] == senses) & chunk.valid[:, :, None]).astype(xp.float32)
        onehot -= (old[:, :, None] == senses) & chunk.valid[:, :, None]
        touched = (onehot != 0).any(axis=1)
        keys, sums = (base + senses)[touched], (onehot.transpose(0, 2, 1) @ x)[touched].astype(xp.float64)
    else:
        rows = x[changed]
        chunk_keys = xp.concatenate([new_keys, old_keys[was]])
        signed = xp.concatenate([rows, -rows[was]])
        keys, summed = segment_sums(chunk_keys, signed, xp)  # float32, as the one-hot product
        sums = summed.astype(xp.float64)
    return keys, sums, new_keys, old_keys[was]


def segment_sums(keys, values, xp):
    """(the distinct keys ascending, the sum of `values` rows [m, d] of each)."""
    order = xp.argsort(keys, kind="stable")
    keys, values = keys[order], values[order]
    first = xp.flatnonzero(xp.concatenate([xp.ones(1, dtype=bool), keys[1:] != keys[:-1]]))
    if xp is np:
        return keys[first], np.add.reduceat(values, first, axis=0)
    import cupyx

    out = xp.zeros((len(first), values.shape[1]), dtype=values.dtype)
    cupyx.scatter_add(out, xp.cumsum(xp.concatenate([xp.zeros(1, dtype=xp.int64), keys[1:] != keys[:-1]])), values)
    return keys[first], out


def reduce_changes(changes: Changes, comm, n_pos: int, k_max: int, d: int, xp):
    """Sum every rank's Changes: (keys of the senses changed anywhere, ascending; their summed sum changes [u, d];
    count changes [P * K]; inertia per token [P]).

    Two allreduces: the small one (counts, which senses changed, inertia) names the senses
    every rank then sends a row for, in the same order; only those rows travel."""
    touched = np.zeros(n_pos * k_max)
    touched[to_host(changes.keys)] = 1
    small = comm.allreduce(np.concatenate([to_host(changes.counts), touched, to_host(changes.inertia)]))
    counts, touched, inertia = small[: n_pos * k_max], small[n_pos * k_max : 2 * n_pos * k_max], small[2 * n_pos * k_max :]
    union = np.flatnonzero(touched > 0)
    block = np.zeros((len(union), d))
    block[np.searchsorted(union, to_host(changes.keys))] = to_host(changes.sums)
    if comm.world > 1:
        block = comm.allreduce(block)
    return union, block, counts, inertia


def assign_senses(local: LocalTile, chunks: list[Chunk], centres, valid, xp):
    """(labels int64 [N], squared distances float32 [N]) of the local rows in `chunks`, in row order.

    Rows of tokens no chunk covers get label -1 and distance 0. A distance is ||x - c||^2 of
    the row and its sense summed in one fixed order: the same whatever chunk the row is in."""
    labels = xp.full(len(local.slots), -1, dtype=xp.int64)
    distances = xp.zeros(len(local.slots), dtype=xp.float32)
    centre_sq = xp.einsum("tkd,tkd->tk", centres, centres)
    for chunk in chunks:
        x, chunk_labels, _ = _nearest_senses(local, chunk, centres, centre_sq, valid, xp)
        diff = centres[chunk.index[:, None], chunk_labels]  # [t, n, d]: each row's sense
        diff -= x
        diff *= diff
        has_sense = valid[chunk.index].any(axis=1)
        direct = xp.where(has_sense[:, None], ordered_row_sums(diff, xp), 0)
        rows = chunk.rows[chunk.valid]
        labels[rows] = chunk_labels[chunk.valid]
        distances[rows] = direct[chunk.valid]
    return labels, distances


def run_lloyd(run: TileRun, chunks: list[Chunk], centres: Centres, groups: list) -> list[dict]:
    """Lloyd iterations, two allreduces each (reduce_changes), each token stopping on its own; returns the history.

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
    # The per-sense sums and counts of all ranks' rows, the same on every rank, kept from one
    # iteration to the next: each iteration adds only what the rows that changed sense moved.
    sums = xp.zeros((n_tokens, k_max, d), dtype=xp.float64)
    counts = xp.zeros((n_tokens, k_max), dtype=xp.float64)
    row_labels = xp.full(len(local.slots), -1, dtype=xp.int64)
    history, previous = [], None
    centres.iterations = np.zeros(n_tokens, dtype=np.int64)
    for iteration in range(cfg.max_iter):
        centres.iterations[active] += 1
        at_planned = to_device(planned, xp)
        changes = local_changes(local, chunks, points[at_planned], valid[at_planned], row_labels, xp)
        union, block, count_change, inertia = reduce_changes(changes, run.comm, len(planned), k_max, d, xp)
        add_changes(sums, counts, planned, union, block, count_change, xp)
        moving = np.isin(planned, active)
        token_inertia[planned[moving]] = inertia[moving]  # a stopped token's inertia stays what it was
        moved_by, reseeded = update_active(run, groups, centres, sums, counts, planned, active, union)
        total = float(token_inertia.sum())
        history.append({"iteration": iteration, "inertia": total, "shift": float(moved_by.sum()), "reseeded": reseeded,
                        "active_tokens": int(len(active)), "planned_tokens": int(len(planned)),
                        "changed_senses": int(len(union))})
        if run.on_iteration is not None:
            run.on_iteration(history[-1])
        per_dim = token_inertia[active] / np.maximum(to_host(counts[to_device(active, xp)].sum(axis=1)) * d, 1)
        still = (moved_by > cfg.tol * per_dim) & (moved_by > 0)
        if not still.any() or (previous is not None and abs(previous - total) <= cfg.tol * previous):
            break
        previous = total
        active = active[still]
        if len(active) <= len(planned) // 2:
            planned = active
            chunks = plan_chunks(local.offsets, d, xp, tokens=centres.slots[planned])
        else:
            chunks = prune_chunks(chunks, to_device(np.isin(planned, active), xp), xp)
    return history


PRUNE_SHARE = 0.75
"""A chunk is cut down to its moving tokens once fewer than this share of its tokens still move."""


def prune_chunks(chunks: list[Chunk], moving, xp) -> list[Chunk]:
    """The chunks without the tokens that stopped (moving: xp bool over Chunk.index), where it pays.

    Between re-plannings stopped tokens would otherwise be assigned again every iteration.
    Cutting a chunk copies its moving tokens' gathered rows, whole blocks, cheaper than
    gathering them again row by row. New Chunk objects: the caller's list is left as it was
    (the final assignment uses it)."""
    kept = []
    for chunk in chunks:
        keep = moving[chunk.index]
        share = float(keep.mean())
        if share == 0:
            continue
        if share >= PRUNE_SHARE or chunk.x is None:
            kept.append(chunk)
            continue
        kept.append(Chunk(chunk.slots[keep], chunk.index[keep], chunk.rows[keep], chunk.valid[keep], chunk.x[keep],
                          chunk.sq[keep]))
    return kept


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
