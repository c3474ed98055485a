"""Where each token's k-means starts: the shared subsample, k-means++ and re-seeding.

Every rank derives the same subsample of each token's vectors (gather_subsample), so
every rank takes the same k-means++ start and re-seeds empty senses the same way; tokens
with no more vectors than their k keep their distinct vectors (distinct_senses). Used
by kmeans.cluster_tile; arrays live on `xp` (cupy or numpy), collectives on host arrays.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import numpy as np

from dist_sense.runtime.backend import array_module, to_device, to_host

if TYPE_CHECKING:
    from dist_sense.kmeans.tile import LocalTile


@dataclass
class Subsample:
    """The same bounded subsample of every token on every rank, padded: valid points first."""

    points: object
    """xp float32 [T, s, d]."""
    mask: object
    """xp bool [T, s]."""
    counts: np.ndarray
    """int64 [T]: valid points per token."""

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, tokens) -> "Subsample":
        """The Subsample of some of the tokens (host indices), at the same width."""
        at = tokens if isinstance(tokens, slice) else to_device(np.asarray(tokens), array_module(self.points))
        return Subsample(self.points[at], self.mask[at], self.counts[tokens])


def rank_in_group(sorted_groups: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal values (input grouped)."""
    n = len(sorted_groups)
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    starts = np.r_[True, sorted_groups[1:] != sorted_groups[:-1]]
    return np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))


# ----------------------------------------------------------------------------- subsample


@dataclass
class SubsampleRows:
    """The gathered subsample rows, compact, in (slot, priority) order through `order`.

    The points stay as the allgather delivered them (rank by rank); users take the rows
    they need through `order`, so the whole set is never copied just to be sorted.
    """

    points: np.ndarray
    """float32 [M, d], as gathered."""
    order: np.ndarray
    """int64 [M]: row i in (slot, priority) order is points[order[i]]."""
    slots: np.ndarray
    """int64 [M]: slot of each row, in that order (ascending)."""
    n_tokens: int

    def take(self, keep: np.ndarray) -> np.ndarray:
        """Points of the sorted rows selected by the mask `keep`, in order."""
        return self.points[self.order[keep]]

    def padded(self, tokens, xp, width: int | None = None) -> Subsample:
        """The Subsample of `tokens` (slots; None: all), row i for tokens[i], padded to the widest (or `width`)."""
        slots, n_tokens = self.slots, self.n_tokens
        if tokens is not None:
            where = np.full(self.n_tokens, -1, dtype=np.int64)
            where[tokens] = np.arange(len(tokens))
            slots, n_tokens = where[slots], len(tokens)
        keep = slots >= 0
        slots, points = slots[keep], self.take(keep)
        counts = np.bincount(slots, minlength=n_tokens).astype(np.int64)
        width = max(1, int(counts.max(initial=0)) if width is None else width)
        padded = np.zeros((n_tokens, width, self.points.shape[1]), dtype=np.float32)
        mask = np.zeros((n_tokens, width), dtype=bool)
        position = rank_in_group(slots)
        padded[slots, position] = points
        mask[slots, position] = True
        return Subsample(to_device(padded, xp), to_device(mask, xp), counts)


@dataclass
class GroupSubsample:
    """The subsample of a group of tokens, padded only for the tokens asked for.

    A rank seeds only its share of a group's tokens (share_tokens), and re-seeding needs
    only the tokens with an empty sense, so padding the whole group on every rank is
    wasted. Every part is padded to the group's width, so its arithmetic is that of the
    whole group's block, row for row.
    """

    rows: SubsampleRows
    slots: np.ndarray
    """The group's token slots; index i means slots[i]."""
    width: int
    xp: object

    def __len__(self) -> int:
        return len(self.slots)

    def __getitem__(self, tokens) -> Subsample:
        return self.rows.padded(self.slots[tokens], self.xp, self.width)


def gather_rows(local: LocalTile, cap: np.ndarray, allgather: Callable[[np.ndarray], np.ndarray], xp) -> SubsampleRows:
    """Every token's `cap[t]` lowest-priority vectors over all ranks, identical on every rank.

    Two allgathers keep traffic bounded: first the (slot, priority) keys of each rank's
    own lowest `cap` rows, from which every rank derives the same per-token priority
    threshold; then only the rows under it. Both arrive in rank order, each rank's rows in
    its own order, so the second needs no keys of its own: they are the first's, filtered
    by the same rule. The result does not depend on how the rows are spread over ranks, so
    1 and N ranks derive the same k and start.
    """
    n_tokens, d = local.n_tokens, int(local.vectors.shape[1])
    cap = np.asarray(cap)
    candidate = rank_in_group(local.slots) < cap[local.slots]
    keys = allgather(np.stack([local.slots[candidate].astype(np.uint64), local.priority[candidate]], axis=1))
    key_slots = keys[:, 0].astype(np.int64)
    order = np.lexsort((keys[:, 1], key_slots))
    sorted_slots = key_slots[order]
    taken = order[rank_in_group(sorted_slots) < cap[sorted_slots]]
    # Per token, the highest priority among its cap lowest (the last taken): rows at or under it are in.
    taken_slots = key_slots[taken]
    last = np.r_[taken_slots[1:] != taken_slots[:-1], True] if len(taken) else np.zeros(0, dtype=bool)
    threshold = np.zeros(n_tokens, dtype=np.uint64)
    threshold[taken_slots[last]] = keys[taken[last], 1]
    has_any = np.bincount(taken_slots, minlength=n_tokens) > 0

    def chosen(slots, priority):
        return has_any[slots] & (priority <= threshold[slots])

    mine = np.flatnonzero(candidate)[chosen(local.slots[candidate], local.priority[candidate])]
    points = allgather(to_host(local.vectors[to_device(mine, xp)]).reshape(-1, d))
    ids = keys[chosen(key_slots, keys[:, 1])]  # the same rows, in the same (rank, local) order
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    return SubsampleRows(points, order, ids[order, 0].astype(np.int64), n_tokens)


def gather_subsample(local: LocalTile, cap: np.ndarray, allgather: Callable[[np.ndarray], np.ndarray], xp, tokens=None) -> Subsample:
    """gather_rows, padded: with `tokens` (sorted slots), only those tokens, row i for tokens[i]."""
    if tokens is not None:
        chosen_cap = np.zeros(local.n_tokens, dtype=np.int64)
        chosen_cap[tokens] = np.asarray(cap)[tokens]
        cap = chosen_cap
    return gather_rows(local, cap, allgather, xp).padded(tokens, xp)


# ----------------------------------------------------------------------------- seeding


def _sq_distances(points, sq, centres, xp):
    """[T, s, m] squared distances of points [T, s, d] (norms sq) to centres [T, m, d]."""
    cross = points @ centres.transpose(0, 2, 1)
    return xp.maximum(sq[:, :, None] - 2 * cross + xp.einsum("tmd,tmd->tm", centres, centres)[:, None, :], 0)


def kmeans_plusplus(sub: Subsample, k: np.ndarray, rng: np.random.Generator, xp, share: tuple[int, int] = (0, 1),
                    allgather: Callable[[np.ndarray], np.ndarray] = lambda a: a):
    """Greedy k-means++ on each token's subsample, one vectorised step per centre index.

    As in scikit-learn, each step draws 2 + log(k) candidates with probability
    proportional to D^2 and keeps the one that lowers the potential most. Draws come
    from `rng` on the host, so every rank and backend makes the same choices. A token
    runs out of centres early when its points are all taken (potential 0). With `share`
    (rank, world), each rank seeds every world-th token and `allgather` assembles them:
    every rank draws the whole group's numbers first, so the result is that of one rank.
    """
    (result,) = share_tokens([plusplus_job(sub, k, rng, xp)], share, allgather, xp)
    return result


def plusplus_job(sub, k: np.ndarray, rng: np.random.Generator, xp):
    """kmeans_plusplus as a share_tokens job (n_tokens, compute); draws its numbers now, in call order.

    `sub`: a Subsample or a GroupSubsample (sub[tokens] is the Subsample of those tokens)."""
    n_tokens = len(sub)
    k_max = max(1, int(k.max(initial=1)))
    # One stream for the whole group, in the order a single sequential run consumes it.
    first = rng.random(n_tokens)
    steps = rng.random((k_max - 1, n_tokens, 2 + int(math.log(k_max))))

    def seed(mine):
        part = sub[mine]
        return _plusplus(part.points, part.mask, part.counts, k[mine], first[mine], steps[:, mine], k_max, xp)

    return n_tokens, seed


def _plusplus(points, mask, counts: np.ndarray, k: np.ndarray, first_draw, step_draws, k_max: int, xp):
    n_tokens, width, d = points.shape
    tokens = xp.arange(n_tokens)
    sq = (points * points).sum(-1)
    k_dev, n_valid = to_device(k, xp), to_device(counts, xp)
    centres = xp.zeros((n_tokens, k_max, d), dtype=xp.float32)
    valid = xp.zeros((n_tokens, k_max), dtype=bool)
    first = to_device(np.minimum(first_draw * counts, np.maximum(counts - 1, 0)).astype(np.int64), xp)
    centres[:, 0] = points[tokens, first]
    valid[:, 0] = (n_valid > 0) & (k_dev > 0)
    closest = _sq_distances(points, sq, centres[:, :1], xp)[:, :, 0] * mask
    for j in range(1, k_max):
        potential = closest.sum(axis=1)
        draws = to_device(step_draws[j - 1], xp) * potential[:, None]
        cumulative = xp.cumsum(closest, axis=1)
        pick = (cumulative[:, None, :] < draws[:, :, None]).sum(axis=-1)
        pick = xp.minimum(pick, xp.maximum(n_valid - 1, 0)[:, None])
        candidates = points[tokens[:, None], pick]
        trial = xp.minimum(closest[:, :, None], _sq_distances(points, sq, candidates, xp)) * mask[:, :, None]
        best = xp.argmin(trial.sum(axis=1), axis=1)
        active = (j < k_dev) & (potential > 0)
        centres[:, j] = xp.where(active[:, None], candidates[tokens, best], 0)
        closest = xp.where(active[:, None], trial[tokens, :, best], closest)
        valid[:, j] = active
    return centres, valid


def share_tokens(jobs: list, share: tuple[int, int], allgather, xp) -> list[tuple]:
    """Run each job (n_tokens, compute) on this rank's share of its tokens; every rank gets every row.

    `compute(index)` returns a tuple of arrays with one row per indexed token. This rank
    takes every world-th token of each job, and one allgather, for all jobs together, brings
    the other ranks' rows: per-token work that would otherwise run identically on every
    rank (seeding) shrinks with the number of ranks, at one synchronisation per call.
    """
    rank, world = share
    if not jobs:
        return []  # every rank has the same jobs, so every rank skips the allgather alike
    if world == 1:
        return [tuple(compute(slice(None))) for _, compute in jobs]
    parts = [tuple(to_host(a) for a in compute(np.arange(rank, n, world))) for n, compute in jobs]
    # Byte segments, each padded to 8 bytes so every array's view of the buffer stays aligned.
    def segment(array):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return np.concatenate([raw, np.zeros(-len(raw) % 8, np.uint8)])

    gathered = allgather(np.concatenate([segment(a) for part in parts for a in part] or [np.zeros(0, np.uint8)]))
    wholes = [[np.empty((n,) + a.shape[1:], a.dtype) for a in part] for (n, _), part in zip(jobs, parts)]
    at = 0
    for source in range(world):  # every rank's segments, laid out as that rank packed them
        for (n, _), part, whole in zip(jobs, parts, wholes):
            rows = np.arange(source, n, world)
            for a, out in zip(part, whole):
                size = len(rows) * a.dtype.itemsize * int(np.prod(a.shape[1:], dtype=np.int64))
                out[rows] = gathered[at : at + size].view(a.dtype).reshape((len(rows),) + a.shape[1:])
                at += size + (-size % 8)
    return [tuple(to_device(out, xp) for out in whole) for whole in wholes]


@dataclass
class DistinctSenses:
    """Senses of tokens with no more vectors than their k: their distinct vectors, most frequent first.

    k-means on so few vectors would only rediscover them, so they are the senses. Built
    from all of a token's vectors, wherever they were gathered (kmeans.cluster_tile, or the
    tile's writer in build_dict), with the same result on any number of ranks.
    """

    slots: np.ndarray
    """int64 [m]: token slot of each sense, ascending; within a slot, most frequent first."""
    points: np.ndarray
    """float32 [m, d]."""
    counts: np.ndarray
    """int64 [m]: how many of the vectors equal each sense."""
    keys: np.ndarray
    """uint64 [m]: row hash of each sense (to find other copies of its vector, senses_of_rows)."""
    row_sense: np.ndarray
    """int64 [n]: sense of each input row, as its index among its token's senses."""


def row_hash(points: np.ndarray) -> np.ndarray:
    """uint64 hash of each float32 row's bits (a weighted sum that wraps)."""
    points = np.ascontiguousarray(points, dtype=np.float32)
    return (points.view(np.uint32).astype(np.uint64) * _row_hash_weights(points.shape[1])).sum(axis=1)


def distinct_senses(slots: np.ndarray, points: np.ndarray) -> DistinctSenses:
    """The distinct rows of each slot and how often each occurs (see DistinctSenses).

    Rows are compared through their hash, sorted by (slot, hash); a row equal to the one
    before it is a repeat. Two different vectors of one token with the same hash (odds
    about 2^-64 a pair) are both kept, as the check compares the rows themselves. Ties in
    frequency keep hash order, so the order depends on the rows alone, not on their order.
    """
    slots = np.asarray(slots, dtype=np.int64)
    points = np.asarray(points, dtype=np.float32)
    digest = row_hash(points)
    order = np.lexsort((digest, slots))
    sorted_slots, sorted_digest = slots[order], digest[order]
    repeat = (sorted_slots[1:] == sorted_slots[:-1]) & (sorted_digest[1:] == sorted_digest[:-1])
    same = np.flatnonzero(repeat)
    repeat[same] = (points[order[same + 1]] == points[order[same]]).all(axis=1)
    first = np.r_[True, ~repeat] if len(slots) else np.zeros(0, dtype=bool)
    group = np.cumsum(first) - 1  # distinct row of each sorted row
    counts = np.bincount(group, minlength=int(first.sum())).astype(np.int64)
    distinct_slots = sorted_slots[first]
    by_frequency = np.lexsort((np.arange(len(counts)), -counts, distinct_slots))
    sense_of_distinct = np.empty(len(counts), dtype=np.int64)
    sense_of_distinct[by_frequency] = rank_in_group(distinct_slots[by_frequency])
    row_sense = np.empty(len(slots), dtype=np.int64)
    row_sense[order] = sense_of_distinct[group]
    at = np.flatnonzero(first)[by_frequency]
    return DistinctSenses(distinct_slots[by_frequency], points[order[at]], counts[by_frequency], sorted_digest[at],
                          row_sense)


def senses_of_rows(senses: DistinctSenses, slots: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Index among its token's senses of each row, for rows whose vectors are among `senses`.

    A search on (slot, hash) then an exact comparison; rows the search misses (a hash
    shared by two vectors) are matched one by one.
    """
    slots = np.asarray(slots, dtype=np.int64)
    within = rank_in_group(senses.slots)
    table = (senses.slots.astype(np.uint64) << np.uint64(44)) ^ senses.keys  # a search key; matches are checked
    by_key = np.argsort(table, kind="stable")
    query = (slots.astype(np.uint64) << np.uint64(44)) ^ row_hash(points)
    found = np.zeros(len(slots), dtype=np.int64)
    matched = np.zeros(len(slots), dtype=bool)
    if len(table):
        found = by_key[np.minimum(np.searchsorted(table[by_key], query), len(table) - 1)]
        matched = (senses.slots[found] == slots) & (senses.points[found] == points).all(axis=1)
    for row in np.flatnonzero(~matched):
        equal = np.flatnonzero((senses.slots == slots[row]) & (senses.points == points[row]).all(axis=1))
        if len(equal) == 0:
            raise ValueError(f"row {row} of slot {slots[row]} is not among the token's distinct vectors")
        found[row] = equal[0]
    return within[found]


@functools.lru_cache(maxsize=4)
def _row_hash_weights(d: int) -> np.ndarray:
    """Fixed odd 64-bit multipliers, one per column, for row_hash."""
    return np.random.default_rng(0x5E75E).integers(0, 2**63, size=d, dtype=np.uint64) * np.uint64(2) + np.uint64(1)


def size_classes(sizes: np.ndarray, ratio: float = 2.0) -> list[np.ndarray]:
    """Indices of `sizes` grouped by classes [ratio^c, ratio^(c+1)), smallest class first.

    Padding a group to its largest member then wastes under 1 - 1/ratio of it, where one
    padded block for a whole tile would pad every token to the tile's largest.
    """
    classes = np.floor(np.log(np.maximum(sizes, 1)) / math.log(ratio) + 1e-9).astype(np.int64)
    return [np.flatnonzero(classes == c) for c in np.unique(classes)]


def reseed_empty(sub: Subsample, centres, valid, empty, xp):
    """Move each empty sense to the subsample point farthest from its nearest centre.

    The subsample is the same on every rank, so every rank re-seeds identically. A
    token's j-th empty sense takes its j-th farthest point; a sense with no point at
    a positive distance left (all points are centres) is dropped.
    """
    if not bool(empty.any()):
        return centres, valid, 0
    sq = (sub.points * sub.points).sum(-1)
    far = xp.where(valid[:, None, :], _sq_distances(sub.points, sq, centres, xp), xp.inf).min(axis=2)
    far = xp.where(sub.mask, far, -1)
    wanted = xp.clip(xp.cumsum(empty, axis=1) - 1, 0, far.shape[1] - 1)
    pick = xp.take_along_axis(xp.argsort(-far, axis=1), wanted, axis=1)
    moved = empty & (xp.take_along_axis(far, pick, axis=1) > 0)
    tokens = xp.arange(centres.shape[0])[:, None]
    centres = xp.where(moved[:, :, None], sub.points[tokens, pick], centres)
    return centres, valid & ~(empty & ~moved), int(moved.sum())
