"""The centre update between Lloyd iterations (lloyd.run_lloyd): kept sums in, new centres out.

Every rank holds the same per-sense sums and counts of all ranks' rows and applies the
same allreduced changes to them, so every rank computes the same centres. Only the
senses whose sums or counts changed are divided again: after the first iterations a few
per cent of them. Empty senses are re-seeded from the shared subsample (start.reseed_empty).
"""
from __future__ import annotations

import numpy as np

from dist_sense.kmeans.start import reseed_empty
from dist_sense.kmeans.types import Centres, TileRun
from dist_sense.runtime.backend import to_device, to_host


def add_changes(sums, counts, planned: np.ndarray, union: np.ndarray, block, count_change, xp) -> None:
    """Add reduce_changes' summed changes to the kept sums [T, K, d] and counts [T, K] (centre rows `planned`)."""
    k_max = counts.shape[1]
    sums[to_device(planned[union // k_max], xp), to_device(union % k_max, xp)] += to_device(block, xp)
    counts[to_device(planned, xp)] += to_device(count_change.reshape(len(planned), k_max), xp)


def update_changed_centres(points, valid, sums, counts, rows, senses, spherical: bool, xp):
    """Set the centres of the senses (rows[i], senses[i]) to their means (or unit mean directions), in place;
    returns their squared moves, float64 [u].

    Only senses whose sums or counts changed need this: any other sense's centre is already
    the mean of its unchanged sums (the same division, the same float32 rounding), or was
    re-seeded and has no rows. Senses nothing is nearest to keep their place."""
    sum_rows, count = sums[rows, senses], counts[rows, senses]
    if spherical:
        mean = sum_rows / xp.maximum(xp.linalg.norm(sum_rows, axis=1, keepdims=True), 1e-12)
    else:
        mean = sum_rows / xp.maximum(count, 1)[:, None]
    mean = mean.astype(xp.float32)
    old = points[rows, senses]
    filled = valid[rows, senses] & (count > 0)
    xp.copyto(mean, old, where=~filled[:, None])
    old -= mean
    points[rows, senses] = mean
    return xp.einsum("ud,ud->u", old, old, dtype=xp.float64)


def update_active(run: TileRun, groups: list, centres: Centres, sums, counts, planned, active,
                  union) -> tuple[np.ndarray, int]:
    """New centres for the `active` centre rows after an iteration (senses in `union` changed: keys position in
    `planned` * K + sense), empty senses re-seeded; each active row's squared move, float64 [A] on the host."""
    xp, points, valid = run.xp, centres.points, centres.valid
    k_max = points.shape[1]
    index_in_active = np.full(len(points), -1, dtype=np.int64)
    index_in_active[active] = np.arange(len(active))
    token_rows = planned[union // k_max]
    mine = index_in_active[token_rows] >= 0  # a stopped token's sums may still change; its centres stay
    rows, senses = token_rows[mine], union[mine] % k_max
    moves = update_changed_centres(points, valid, sums, counts, to_device(rows, xp), to_device(senses, xp),
                                   run.cfg.spherical, xp)
    moved_by = np.bincount(index_in_active[rows], weights=to_host(moves), minlength=len(active))
    at = to_device(active, xp)
    empty, reseeded = to_host((valid[at] & (counts[at] == 0)).any(axis=1)), 0
    if empty.any():  # re-seeding reads the group's subsample: only for the tokens with an empty sense
        lacking = active[empty]
        at_lacking = to_device(lacking, xp)
        before = points[at_lacking]
        after = before.copy()
        reseeded = _reseed(groups, lacking, after, valid, valid[at_lacking] & (counts[at_lacking] == 0), xp)
        before -= after
        points[at_lacking] = after
        moved_by[empty] += to_host(xp.einsum("tkd,tkd->t", before, before, dtype=xp.float64))
    return moved_by, reseeded


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
