"""One tile's k-means: make_local_tile puts a rank's rows on `xp`, cluster_tile ties the steps together.

Every token of a tile is its own clustering problem, and all of them run at once. The
steps: the shared subsample (subsample.py) fixes k (mcl.py, under k_policy=mcl) and the
k-means++ start (start.py); tokens with no more vectors than their k keep their distinct
vectors (distinct.py); Lloyd iterations (lloyd.py) cost one allreduce each. The result is
in CSR layout, the same on every rank (types.TileResult). Arrays live on `xp` (cupy or
numpy). Nothing here knows about MPI: `comm` is any types.Comm (rank, world, allreduce,
allgather on host numpy arrays); types.ONE_PROCESS, the default, makes this plain
single-process k-means.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from dist_sense.kmeans.distinct import DistinctSenses, distinct_senses, senses_of_rows
from dist_sense.kmeans.groups import rank_in_group, size_classes
from dist_sense.kmeans.lloyd import final_assignment, plan_chunks, run_lloyd
from dist_sense.kmeans.mcl import MCL_MIN_VECTORS, MCL_PAD_RATIO, mcl_job, senses_from_mcl
from dist_sense.kmeans.start import share_tokens, start_centres
from dist_sense.kmeans.subsample import GroupSubsample, SubsampleRows, gather_rows
from dist_sense.kmeans.types import ONE_PROCESS, Centres, Comm, LocalTile, TileResult, TileRun
from dist_sense.runtime.backend import to_device, to_host


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
    sq_norms = xp.einsum("ij,ij->i", rows, rows)  # no [N, d] temporary
    tile = LocalTile(rows, slots[order], priority[order], offsets, sq_norms)
    return tile, order


def order_senses(centres: Centres, counts: np.ndarray, labels, row_slots: np.ndarray, xp):
    """Most frequent sense first, senses no vector is nearest to dropped; labels follow.

    counts [B, K] are per centre row; row_slots is the slot of each local row
    (LocalTile.slots). Returns the senses grouped by slot, ascending, as (slot of each
    sense [S], centroids [S, d] on the host, counts [S]) and the local rows' labels
    renumbered (-1 stays -1). Only the kept senses are copied, once.
    """
    token_slots = np.asarray(centres.slots, dtype=np.int64)
    valid = to_host(centres.valid) & (counts > 0)
    perm = np.argsort(-np.where(valid, counts, -1), axis=1, kind="stable")
    inverse = np.argsort(perm, axis=1, kind="stable")
    kept = valid.sum(axis=1)
    row = np.repeat(np.arange(len(kept)), kept)
    row = row[np.argsort(token_slots[row], kind="stable")]  # by slot; each row's senses stay together, in order
    source = perm[row, rank_in_group(row)]
    centroids = to_host(centres.points[to_device(row, xp), to_device(source, xp)])
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


def cluster_tile(local: LocalTile, cfg, comm: Comm = ONE_PROCESS, xp=np, *, seed: int = 0, k=None,
                 on_iteration=None, keep_small: bool = True) -> TileResult:
    """Senses of every token of a tile: choose k, seed, iterate, count. Same result on every rank.

    `cfg` is a KMeansConfig; `comm` joins the ranks that hold the tile's rows (types.Comm),
    and each seeds its share of the tokens (start.share_tokens). `seed` (the tile number)
    and cfg.seed seed k-means++; `k` (int or [T]) overrides the k policy (for tests and
    experiments); `on_iteration(record)` sees each Lloyd iteration. With keep_small=False
    the tokens with no more vectors than their k are only marked (kept_as_vectors): their
    vectors are not gathered, their rows keep label -1, and whoever holds all of them
    adds their senses (build_dict does it on the tile's writer: with_distinct_senses).
    """
    run = TileRun(local, cfg, comm, xp, seed, on_iteration)
    n_tokens, d = local.n_tokens, int(local.vectors.shape[1])
    per_token = comm.allreduce(np.bincount(local.slots, minlength=n_tokens).astype(np.int64))
    k, clusters = _choose_k(run, per_token, k)
    small = (per_token > 0) & (per_token <= k)
    clustered = bool((per_token > k).any())
    keep_here = keep_small and bool(small.any())
    senses = (np.zeros(0, np.int64), np.zeros((0, d), np.float32), np.zeros(0, np.int64))  # (slot, centroid, count)
    labels, distances = xp.full(len(local.slots), -1, dtype=xp.int64), xp.zeros(len(local.slots), dtype=xp.float32)
    inertia, history, small_senses = 0.0, [], None
    if clustered or keep_here:  # decided from allreduced counts, so every rank skips the collectives alike
        # One subsample gather for the tile: the clustered tokens send max(their subsample, k)
        # vectors, small tokens (if kept here) all of theirs. Every size group is cut from it locally.
        cap = np.where(per_token > k, np.maximum(np.minimum(per_token, cfg.subsample), k), 0)
        rows = gather_rows(local, np.where(small, per_token, cap) if keep_small else cap, comm, xp)
        if keep_here:
            wanted = small[rows.slots]
            small_senses = distinct_senses(rows.slots[wanted], rows.take(wanted))
        if clustered:
            senses, labels, distances, inertia, history = _cluster_tokens(run, rows, k, per_token)
    result = TileResult(*csr_senses(*senses), per_token, small, inertia, history, labels, distances, clusters)
    if small_senses is not None:
        result = with_distinct_senses(result, small_senses)
        mine = np.flatnonzero(small[local.slots])
        found = senses_of_rows(small_senses, local.slots[mine], to_host(local.vectors[to_device(mine, xp)]))
        result.labels[to_device(mine, xp)] = to_device(found, xp)
    return result


def _choose_k(run: TileRun, per_token: np.ndarray, k):
    """(k of each token [T], 0 where it has no vectors; MCL clusters per token, or None): `k`, else cfg's policy."""
    cfg, clusters = run.cfg, None
    if k is None and cfg.k_policy == "fixed":
        k = cfg.k
    if k is None:
        clusters = mcl_clusters(run, per_token)
        k = senses_from_mcl(clusters)
    k = np.where(per_token > 0, np.broadcast_to(np.asarray(k, dtype=np.int64), (len(per_token),)), 0)
    return k, clusters


def mcl_clusters(run: TileRun, per_token: np.ndarray) -> np.ndarray:
    """MCL clusters of every token with at least MCL_MIN_VECTORS vectors over up to cfg.mcl_vectors of them
    (gathered once, lowest priorities first), each rank clustering its share; 0 for the tokens left out."""
    cfg, xp = run.cfg, run.xp
    limit = np.where(per_token >= MCL_MIN_VECTORS, np.minimum(per_token, cfg.mcl_vectors), 0)
    rows = gather_rows(run.local, limit, run.comm, xp)
    present = np.flatnonzero(limit > 0)
    groups = [present[members] for members in size_classes(limit[present], MCL_PAD_RATIO)]
    jobs = [mcl_job(GroupSubsample(rows, slots, int(limit[slots].max()), xp), cfg, xp) for slots in groups]
    clusters = np.zeros(len(per_token), dtype=np.int64)
    for slots, (counts,) in zip(groups, share_tokens(jobs, run.comm, np)):
        clusters[slots] = counts
    return clusters


def _cluster_tokens(run: TileRun, rows: SubsampleRows, k: np.ndarray, per_token: np.ndarray):
    """k-means++ then Lloyd for the tokens with more vectors than their k, from the gathered subsample `rows`.

    Returns ((slot, centroid, count) per sense, labels, distances, inertia, history).
    """
    centres, groups = start_centres(run, rows, k, per_token)
    chunks = plan_chunks(run.local.offsets, int(run.local.vectors.shape[1]), run.xp, tokens=centres.slots)
    history = run_lloyd(run, chunks, centres, groups)
    labels, distances, counts, inertia = final_assignment(run, chunks, centres)
    sense_slots, centroids, sense_counts, labels = order_senses(centres, counts, labels, run.local.slots, run.xp)
    return (sense_slots, centroids, sense_counts), labels, distances, inertia, history


def nearest_rows_per_sense(local: LocalTile, result: TileResult, limit: int, ties: tuple = ()) -> np.ndarray:
    """Local rows closest to their sense, at most `limit` per sense (example contexts).

    Ties in distance go to the lower priority, then by `ties` (arrays over the local rows,
    most significant first), then to the earlier row."""
    labels, distances = to_host(result.labels), to_host(result.distances)
    labelled = np.flatnonzero(labels >= 0)  # rows left to another rank's finishing (keep_small=False) are not
    keys = (*(np.asarray(tie)[labelled] for tie in reversed(ties)), local.priority[labelled], distances[labelled],
            labels[labelled], local.slots[labelled])
    order = labelled[np.lexsort(keys)]
    group = local.slots[order] * (int(labels.max(initial=0)) + 1) + labels[order]
    return order[rank_in_group(group) < limit]
