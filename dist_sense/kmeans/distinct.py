"""The senses of tokens with no more vectors than their k: their distinct vectors, on the host.

Rows are told apart by a hash of their bits, then compared exactly, so the senses depend
on the rows alone: not on their order, nor on which rank held them.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from dist_sense.kmeans.groups import rank_in_group


@dataclass
class DistinctSenses:
    """Senses of tokens with no more vectors than their k: their distinct vectors, most frequent first.

    k-means on so few vectors would only rediscover them, so they are the senses. Built
    from all of a token's vectors, wherever they were gathered (tile.cluster_tile, or the
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

