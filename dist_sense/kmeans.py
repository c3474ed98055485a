"""Batched per-token k-means for one tile of tokens: the pure maths of build_dict.

Every token of a tile is its own clustering problem, and all of them run at once:
a rank's vectors are grouped by token into padded chunks so that assigning them is
one batched GEMM per chunk (||x||^2 - 2 x.c + ||c||^2 with a per-token sense mask),
k-means++ takes one vectorised step per centre index (kmeans_start.py: the shared
subsample, the start and re-seeding), and MCL (mcl.py) runs on a padded stack of
affinity matrices. Arrays live on `xp` (cupy or numpy). Nothing here
knows about MPI: callers pass `allreduce(array) -> array` (sum over ranks) and
`allgather(array) -> array` (every rank's rows, in rank order), both on host numpy
arrays; with the identity for both this is plain single-process k-means.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from .backend import to_device, to_host
from .kmeans_start import (DistinctSenses, GroupSubsample, Subsample, distinct_senses,  # noqa: F401
                           gather_rows, gather_subsample, kmeans_plusplus, plusplus_job, rank_in_group, reseed_empty, senses_of_rows, share_tokens,
                           size_classes)
from .mcl import mcl_cluster_counts, senses_from_mcl

Collective = Callable[[np.ndarray], np.ndarray]
CHUNK_ELEMENTS = 1 << 25
"""Floats in one padded chunk of gathered vectors (bounds the assignment's temporaries)."""
PAD_RATIO = 2 ** 0.5
"""Lloyd's chunks group tokens whose row counts differ by under this factor (padding < 30%)."""


def identity(array):
    """The collective of a world of one process."""
    return array


@dataclass
class LocalTile:
    """One rank's vectors of one tile, rows sorted by (token slot, priority)."""

    vectors: object
    """xp float32 [N, d] (unit rows for spherical k-means)."""
    slots: np.ndarray
    """int64 [N]: the row's token position in the tile, 0..n_tokens-1."""
    priority: np.ndarray
    """uint64 [N]: deterministic draw; each token's subsample is its lowest priorities over all ranks."""
    offsets: np.ndarray
    """int64 [n_tokens + 1]: rows of slot t are offsets[t]:offsets[t+1]."""
    sq_norms: object
    """xp float32 [N]: squared norms of the rows."""

    @property
    def n_tokens(self) -> int:
        return len(self.offsets) - 1


@dataclass
class TileResult:
    """Senses of a tile's tokens in CSR layout (the layout of a dictionary shard), the same on every rank.

    Most tokens of a real vocabulary have fewer vectors than k; a dense [T, K, d] block
    per tile would be mostly padding (5x the senses on the demo corpus), and moving it
    costs every rank alike.
    """

    slots: np.ndarray
    """int64 [U]: slots (positions in the tile) of the tokens that have senses, ascending."""
    offsets: np.ndarray
    """int64 [U + 1]: the senses of slots[i] are rows offsets[i]:offsets[i+1], most frequent first."""
    centroids: np.ndarray
    """float32 [S, d]."""
    sense_counts: np.ndarray
    """int64 [S]: vectors (over all ranks) nearest each sense."""
    vectors_per_token: np.ndarray
    """int64 [T]: vectors of each token over all ranks."""
    kept_as_vectors: np.ndarray
    """bool [T]: tokens with no more vectors than their k, whose senses are their distinct vectors
    (cluster_tile(keep_small=False) leaves their senses out: see with_distinct_senses)."""
    inertia: float
    """Sum over all ranks of squared distances to the nearest final sense."""
    history: list = field(default_factory=list)
    """Per Lloyd iteration: inertia, shift (summed squared centre movement) and reseeded senses."""
    labels: object = None
    """xp int64 [N]: this rank's rows' sense (within their token), in LocalTile row order; -1 where left out."""
    distances: object = None
    """xp float32 [N]: squared distance of each local row to its sense."""
    mcl_clusters: np.ndarray | None = None
    """int64 [T]: MCL clusters found per token (k_policy=mcl only)."""

    @property
    def n_tokens(self) -> int:
        return len(self.vectors_per_token)

    @property
    def senses_per_token(self) -> np.ndarray:
        """int64 [T]."""
        per_token = np.zeros(self.n_tokens, dtype=np.int64)
        per_token[self.slots] = np.diff(self.offsets)
        return per_token

    def dense(self):
        """(centres [T, K, d], valid [T, K], counts [T, K]) with K the most senses of a token: for inspection."""
        per_token = self.senses_per_token
        k_max = max(1, int(per_token.max(initial=0)))
        token = np.repeat(np.arange(self.n_tokens), per_token)
        sense = rank_in_group(token)
        centres = np.zeros((self.n_tokens, k_max, self.centroids.shape[1]), dtype=np.float32)
        valid = np.zeros((self.n_tokens, k_max), dtype=bool)
        counts = np.zeros((self.n_tokens, k_max), dtype=np.int64)
        centres[token, sense], valid[token, sense], counts[token, sense] = self.centroids, True, self.sense_counts
        return centres, valid, counts

    centres = property(lambda self: self.dense()[0])
    valid = property(lambda self: self.dense()[1])
    counts = property(lambda self: self.dense()[2])


def make_local_tile(vectors: np.ndarray, slots, priority, n_tokens: int, xp, spherical: bool = False):
    """Sort a rank's rows by (slot, priority) onto `xp`; returns (LocalTile, the row order applied)."""
    slots = np.asarray(slots, dtype=np.int64)
    priority = np.asarray(priority, dtype=np.uint64)
    order = np.lexsort((priority, slots))
    rows = to_device(np.ascontiguousarray(np.asarray(vectors, dtype=np.float32)[order]), xp)
    if spherical:
        rows = rows / xp.maximum(xp.linalg.norm(rows, axis=1, keepdims=True), 1e-12)
    offsets = np.zeros(n_tokens + 1, dtype=np.int64)
    np.cumsum(np.bincount(slots, minlength=n_tokens), out=offsets[1:])
    tile = LocalTile(rows, slots[order], priority[order], offsets, xp.einsum("ij,ij->i", rows, rows))  # no [N, d] temporary
    return tile, order


# ----------------------------------------------------------------------------- Lloyd iterations


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


def plan_chunks(offsets: np.ndarray, d: int, xp, budget: int | None = None, tokens=None) -> list[Chunk]:
    """Group tokens by row count (power-of-two classes) into chunks of at most `budget` floats.

    Within a class counts differ by under 2x, so padding costs less than half of each
    chunk; the loop runs over classes and chunks, never over single tokens. With `tokens`
    (slots), only those, and centre arrays are indexed by position in `tokens`.
    """
    budget = budget or CHUNK_ELEMENTS
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
        per_chunk = max(1, budget // (width * d))
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

    Rows of tokens no chunk covers get label -1 and distance 0."""
    labels = xp.full(len(local.slots), -1, dtype=xp.int64)
    distances = xp.zeros(len(local.slots), dtype=xp.float32)
    centre_sq = xp.einsum("tkd,tkd->tk", centres, centres)
    for chunk in chunks:
        _, chunk_labels, nearest = _chunk_distances(local, chunk, centres, centre_sq, valid, xp)
        rows = chunk.rows[chunk.valid]
        labels[rows] = chunk_labels[chunk.valid]
        distances[rows] = nearest[chunk.valid]
    return labels, distances


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


def run_lloyd(local, chunks, sub, centres, valid, allreduce: Collective, xp, cfg, on_iteration=None, token_slots=None):
    """Lloyd iterations with one allreduce each, each token stopping on its own.

    A token stops when its centres moved, in total squared distance, by no more than
    cfg.tol times its mean squared distance per dimension (scikit-learn's rule, per token),
    or when the tile's inertia changed by no more than cfg.tol; then it leaves the
    iterations (its rows are no longer read nor reduced). Decisions use allreduced values
    only, so every rank takes the same ones. `chunks` must be planned for the centres' rows
    in order (plan_chunks(..., tokens=...)); `sub` is the Subsample of those tokens, or a
    list of (Subsample or GroupSubsample, first, end) covering consecutive rows of `centres` (one per size
    group), used to re-seed empty senses. `token_slots`: the tile slot of each centre row
    (default: row i is slot i).
    """
    groups = [(sub, 0, centres.shape[0])] if isinstance(sub, Subsample) else sub
    n_tokens, k_max, d = centres.shape
    slot_of = np.arange(n_tokens) if token_slots is None else np.asarray(token_slots)
    # `planned`: the centre rows the chunks cover; `active`: those still moving. Chunks are
    # re-planned (their rows gathered again) only once half the planned tokens have stopped.
    planned = active = np.arange(n_tokens)
    token_inertia = np.zeros(n_tokens)
    history, previous = [], None
    for iteration in range(cfg.max_iter):
        packed = to_device(allreduce(lloyd_stats(local, chunks, centres[to_device(planned, xp)],
                                                 valid[to_device(planned, xp)], xp)), xp)
        sums, counts, inertia = unpack_stats(packed, len(planned), k_max, d)
        token_inertia[planned] = to_host(inertia)
        moving = to_device(np.flatnonzero(np.isin(planned, active)), xp)
        sums, counts, inertia = sums[moving], counts[moving], inertia[moving]
        at = to_device(active, xp)
        current = centres[at]
        updated, empty = update_centres(sums, counts, current, valid[at], cfg.spherical, xp)
        reseeded = 0
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
        current -= updated  # now the move, in place: no further [A, K, d] temporaries
        moved_by = xp.einsum("tkd,tkd->t", current, current, dtype=xp.float64)
        centres[at] = updated
        total = float(token_inertia.sum())
        history.append({"iteration": iteration, "inertia": total, "shift": float(moved_by.sum()), "reseeded": reseeded,
                        "active_tokens": int(len(active))})
        if on_iteration is not None:
            on_iteration(history[-1])
        per_dim = to_host(inertia) / np.maximum(to_host(counts.sum(axis=1)) * d, 1)
        still = (to_host(moved_by) > cfg.tol * per_dim) & (to_host(moved_by) > 0)
        if not still.any() or (previous is not None and abs(previous - total) <= cfg.tol * previous):
            break
        previous = total
        active = active[still]
        if len(active) <= len(planned) // 2:
            planned = active
            chunks = plan_chunks(local.offsets, d, xp, tokens=slot_of[planned])
    return centres, valid, history


def final_assignment(local, chunks, centres, valid, allreduce: Collective, xp, token_slots=None):
    """Labels and distances of the local rows under the final centres; global counts [B, K] and inertia.

    centres/valid are per centre row, row i for tile slot token_slots[i] (default: slot i),
    as `chunks` were planned; rows of other tokens get label -1.
    """
    n_rows, k_max = valid.shape
    slots = np.arange(n_rows) if token_slots is None else np.asarray(token_slots)
    labels, distances = assign_senses(local, chunks, centres, valid, xp)
    position = np.full(local.n_tokens, -1, dtype=np.int64)
    position[slots] = np.arange(n_rows)
    host_labels = to_host(labels)
    labelled = host_labels >= 0
    flat = position[local.slots[labelled]] * k_max + host_labels[labelled]
    local_counts = np.bincount(flat, minlength=n_rows * k_max).astype(np.float64)
    packed = allreduce(np.concatenate([local_counts, [float(distances.sum(dtype=xp.float64))]]))
    counts = np.rint(packed[:-1]).astype(np.int64).reshape(n_rows, k_max)
    return labels, distances, counts, float(packed[-1])


def order_senses(centres, valid, counts: np.ndarray, labels, row_slots: np.ndarray, token_slots: np.ndarray, xp):
    """Most frequent sense first, senses no vector is nearest to dropped; labels follow.

    centres/valid/counts are per centre row, row i for slot token_slots[i]; row_slots is
    the slot of each local row (LocalTile.slots). Returns the
    senses grouped by slot, ascending, as (slot of each sense [S], centroids [S, d] on the
    host, counts [S]) and the local rows' labels renumbered (-1 stays -1). Only the kept
    senses are copied, once.
    """
    token_slots = np.asarray(token_slots, dtype=np.int64)
    valid = to_host(valid) & (counts > 0)
    perm = np.argsort(-np.where(valid, counts, -1), axis=1, kind="stable")
    inverse = np.argsort(perm, axis=1, kind="stable")
    kept = valid.sum(axis=1)
    row = np.repeat(np.arange(len(kept)), kept)
    row = row[np.argsort(token_slots[row], kind="stable")]  # by slot; each row's senses stay together, in order
    source = perm[row, rank_in_group(row)]
    centroids = to_host(centres[to_device(row, xp), to_device(source, xp)])
    position = np.full(int(token_slots.max(initial=-1)) + 1, -1, dtype=np.int64)
    position[token_slots] = np.arange(len(token_slots))
    labelled = xp.flatnonzero(labels >= 0)
    if len(labelled):
        host_rows = to_host(labelled)
        row_of = to_device(position[row_slots[host_rows]], xp)
        labels[labelled] = to_device(inverse, xp)[row_of, labels[labelled]]
    return token_slots[row], centroids, counts[row, source], labels


def csr_senses(sense_slots: np.ndarray, centroids: np.ndarray, counts: np.ndarray):
    """(slots, offsets, centroids, counts) of senses given per sense; a stable sort by slot keeps each token's order."""
    sense_slots = np.asarray(sense_slots, dtype=np.int64)
    if len(sense_slots) > 1 and (np.diff(sense_slots) < 0).any():
        order = np.argsort(sense_slots, kind="stable")
        sense_slots, centroids, counts = sense_slots[order], centroids[order], counts[order]
    slots, per_slot = np.unique(sense_slots, return_counts=True)
    offsets = np.zeros(len(slots) + 1, dtype=np.int64)
    np.cumsum(per_slot, out=offsets[1:])
    return slots, offsets, np.asarray(centroids, dtype=np.float32), np.asarray(counts, dtype=np.int64)


def with_distinct_senses(result: TileResult, senses: DistinctSenses) -> TileResult:
    """`result` plus the senses of its tokens kept as their distinct vectors."""
    slot_of_sense = np.concatenate([np.repeat(result.slots, np.diff(result.offsets)), senses.slots])
    slots, offsets, centroids, counts = csr_senses(slot_of_sense, np.concatenate([result.centroids, senses.points]),
                                                   np.concatenate([result.sense_counts, senses.counts]))
    return replace(result, slots=slots, offsets=offsets, centroids=centroids, sense_counts=counts)


# ----------------------------------------------------------------------------- one tile


def cluster_tile(local: LocalTile, cfg, allreduce: Collective = identity, allgather: Collective = identity, xp=np,
                 seed: int = 0, k=None, on_iteration=None, share: tuple[int, int] = (0, 1),
                 keep_small: bool = True) -> TileResult:
    """Senses of every token of a tile: choose k, seed, iterate, count. Same result on every rank.

    `cfg` is a KMeansConfig; `seed` (the tile number) and cfg.seed seed k-means++;
    `k` (int or [T]) overrides the k policy (for tests and experiments). `share` is
    (rank, world): each rank seeds its share of the tokens (see kmeans_start.share_tokens);
    (0, 1), or the same on every rank, does all of it everywhere. With keep_small=False
    the tokens with no more vectors than their k are only marked (kept_as_vectors): their
    vectors are not gathered, their rows keep label -1, and whoever holds all of them
    adds their senses (build_dict does it on the tile's writer: with_distinct_senses).
    """
    n_tokens, d = local.n_tokens, int(local.vectors.shape[1])
    per_token = allreduce(np.bincount(local.slots, minlength=n_tokens).astype(np.int64))
    cap = np.minimum(per_token, cfg.subsample)
    clusters = None
    if k is None and cfg.k_policy == "fixed":
        k = cfg.k
    if k is None:
        sub = gather_subsample(local, np.minimum(per_token, max(cfg.subsample, 5)), allgather, xp)
        clusters = mcl_cluster_counts(sub, cfg.mcl_expansion, cfg.mcl_inflation, cfg.mcl_iters, xp)
        k = senses_from_mcl(clusters)
        del sub
    k = np.where(per_token > 0, np.broadcast_to(np.asarray(k, dtype=np.int64), (n_tokens,)), 0)
    small = (per_token > 0) & (per_token <= k)
    big = np.flatnonzero(per_token > k)
    keep_here = keep_small and bool(small.any())
    senses = (np.zeros(0, np.int64), np.zeros((0, d), np.float32), np.zeros(0, np.int64))  # (slot, centroid, count)
    labels, distances = xp.full(len(local.slots), -1, dtype=xp.int64), xp.zeros(len(local.slots), dtype=xp.float32)
    inertia, history, small_senses = 0.0, [], None
    if len(big) or keep_here:  # decided from allreduced counts, so every rank skips the collectives alike
        # One subsample gather for the tile: the clustered tokens send max(their subsample, k)
        # vectors, small tokens (if kept here) all of theirs. Every size group is cut from it locally.
        cap = np.where(per_token > k, np.maximum(cap, k), 0)
        rows = gather_rows(local, np.where(small, per_token, cap) if keep_small else cap, allgather, xp)
        if keep_here:
            wanted = small[rows.slots]
            small_senses = distinct_senses(rows.slots[wanted], rows.take(wanted))
        if len(big):
            senses, labels, distances, inertia, history = _cluster_tokens(
                local, rows, big, k, per_token, cfg, allreduce, allgather, xp, seed, on_iteration, share)
    result = TileResult(*csr_senses(*senses), per_token, small, inertia, history, labels, distances, clusters)
    if small_senses is not None:
        result = with_distinct_senses(result, small_senses)
        mine = np.flatnonzero(small[local.slots])
        found = senses_of_rows(small_senses, local.slots[mine], to_host(local.vectors[to_device(mine, xp)]))
        result.labels[to_device(mine, xp)] = to_device(found, xp)
    return result


def _cluster_tokens(local, rows, big, k, per_token, cfg, allreduce, allgather, xp, seed, on_iteration, share):
    """k-means++ then Lloyd for the tokens `big` (slots) of a tile, from the gathered subsample `rows`.

    Returns ((slot, centroid, count) per sense, labels, distances, inertia, history).
    """
    d = int(local.vectors.shape[1])
    groups, jobs, order, first = [], [], [], 0
    rng = np.random.default_rng([cfg.seed, seed])
    gathered = np.bincount(rows.slots, minlength=local.n_tokens)
    for members in size_classes(np.maximum(np.minimum(per_token[big], cfg.subsample), k[big])):
        slots = big[members]
        sub = GroupSubsample(rows, slots, max(1, int(gathered[slots].max())), xp)  # padded as needed
        jobs.append(plusplus_job(sub, k[slots], rng, xp))
        groups.append((sub, first, first + len(slots)))
        order.append(slots)
        first += len(slots)
    # k-means++ for every size group, each rank its share of the tokens, one allgather.
    seeded = share_tokens(jobs, share, allgather, xp)
    k_max = max(c.shape[1] for c, _ in seeded)
    centres = xp.concatenate([xp.pad(c, ((0, 0), (0, k_max - c.shape[1]), (0, 0))) for c, _ in seeded])
    valid = xp.concatenate([xp.pad(v, ((0, 0), (0, k_max - v.shape[1]))) for _, v in seeded])
    order = np.concatenate(order)
    chunks = plan_chunks(local.offsets, d, xp, tokens=order)
    centres, valid, history = run_lloyd(local, chunks, groups, centres, valid, allreduce, xp, cfg, on_iteration, order)
    labels, distances, counts, inertia = final_assignment(local, chunks, centres, valid, allreduce, xp, order)
    sense_slots, centroids, sense_counts, labels = order_senses(centres, valid, counts, labels, local.slots, order, xp)
    return (sense_slots, centroids, sense_counts), labels, distances, inertia, history


def tile_csr(result: TileResult):
    """(slots that have senses, offsets [T'+1], centroids [S, d], counts [S]) of a tile."""
    return result.slots, result.offsets, result.centroids, result.sense_counts


def nearest_rows_per_sense(local: LocalTile, result: TileResult, limit: int) -> np.ndarray:
    """Local rows closest to their sense, at most `limit` per sense (example contexts)."""
    labels, distances = to_host(result.labels), to_host(result.distances)
    labelled = np.flatnonzero(labels >= 0)  # rows left to another rank's finishing (keep_small=False) are not
    keys = (local.priority[labelled], distances[labelled], labels[labelled], local.slots[labelled])
    order = labelled[np.lexsort(keys)]
    group = local.slots[order] * (int(labels.max(initial=0)) + 1) + labels[order]
    return order[rank_in_group(group) < limit]
