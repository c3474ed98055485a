"""The same bounded subsample of every token's vectors on every rank.

Each token's subsample is its lowest-priority vectors over all ranks (gather_rows), so it
does not depend on how the rows are spread over ranks: every rank then derives the same
k (MCL), the same k-means++ start and the same re-seeding. Arrays live on `xp` (cupy or
numpy); the collectives (types.Comm) run on host arrays.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dist_sense.kmeans.groups import rank_in_group
from dist_sense.kmeans.types import Comm, LocalTile
from dist_sense.runtime.backend import array_module, to_device, to_host


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


def gather_rows(local: LocalTile, cap: np.ndarray, comm: Comm, xp) -> SubsampleRows:
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
    keys = comm.allgather(np.stack([local.slots[candidate].astype(np.uint64), local.priority[candidate]], axis=1))
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
    points = comm.allgather(to_host(local.vectors[to_device(mine, xp)]).reshape(-1, d))
    ids = keys[chosen(key_slots, keys[:, 1])]  # the same rows, in the same (rank, local) order
    order = np.lexsort((ids[:, 1], ids[:, 0]))
    return SubsampleRows(points, order, ids[order, 0].astype(np.int64), n_tokens)


def gather_subsample(local: LocalTile, cap: np.ndarray, comm: Comm, xp) -> Subsample:
    """gather_rows, padded: row t of the Subsample is token slot t."""
    return gather_rows(local, cap, comm, xp).padded(None, xp)
