"""Where each token's k-means starts: k-means++ on the shared subsample, and re-seeding.

Every rank holds the same subsample of each token (subsample.py), so every rank takes the
same k-means++ start and re-seeds empty senses the same way. Seeding is per-token work
that would otherwise run identically everywhere, so each rank seeds its share of the
tokens and one allgather assembles them (share_tokens). Arrays live on `xp` (cupy or
numpy); the collectives (types.Comm) run on host arrays.
"""
from __future__ import annotations

import math

import numpy as np

from dist_sense.kmeans.groups import size_classes
from dist_sense.kmeans.subsample import GroupSubsample, Subsample, SubsampleRows
from dist_sense.kmeans.types import Centres, Comm, TileRun
from dist_sense.runtime.backend import to_device, to_host


def _sq_distances(points, sq, centres, xp):
    """[T, s, m] squared distances of points [T, s, d] (norms sq) to centres [T, m, d].

    The product is taken as centres @ points^T: with few centres (k-means++'s candidates)
    BLAS reads the points about twice as fast that way round as points @ centres^T."""
    cross = (centres @ points.transpose(0, 2, 1)).transpose(0, 2, 1)
    return xp.maximum(sq[:, :, None] - 2 * cross + xp.einsum("tmd,tmd->tm", centres, centres)[:, None, :], 0)


def _trial_closest(points, sq, candidates, closest, mask, xp):
    """[T, c, s]: each point's squared distance to its nearest centre if candidate c joined the centres.

    Kept candidate-major, contiguous along the points, and computed in place: one product
    and a few passes over [T, c, s], no transposed temporaries (k-means++ takes one such step
    per centre)."""
    trial = candidates @ points.transpose(0, 2, 1)
    trial *= -2
    trial += sq[:, None, :]
    trial += xp.einsum("tcd,tcd->tc", candidates, candidates)[:, :, None]
    xp.maximum(trial, 0, out=trial)
    xp.minimum(trial, closest[:, None, :], out=trial)
    trial *= mask[:, None, :]
    return trial


SEED_BLOCK_ELEMENTS = 1 << 21
"""Floats of subsample points k-means++ seeds at once on the CPU (8 MB: they stay in cache through its k steps)."""


def plusplus_job(sub, k: np.ndarray, rng: np.random.Generator, xp):
    """Greedy k-means++ on each token's subsample, as a share_tokens job (n_tokens, compute).

    As in scikit-learn, each step draws 2 + log(k) candidates with probability
    proportional to D^2 and keeps the one that lowers the potential most; one vectorised
    step per centre index covers every token. Draws come from `rng` on the host, and the
    job draws the whole group's numbers now, in call order, so every rank and backend
    makes the same choices whichever share of the tokens it seeds. A token runs out of
    centres early when its points are all taken (potential 0). `sub`: a Subsample or a
    GroupSubsample (sub[tokens] is the Subsample of those tokens); compute returns
    (centres [t, k_max, d], valid [t, k_max]).
    """
    n_tokens = len(sub)
    k_max = max(1, int(k.max(initial=1)))
    # One stream for the whole group, in the order a single sequential run consumes it.
    first = rng.random(n_tokens)
    steps = rng.random((k_max - 1, n_tokens, 2 + int(math.log(k_max))))

    if isinstance(sub, GroupSubsample):
        width, d = sub.width, int(sub.rows.points.shape[1])
    else:
        width, d = (int(n) for n in sub.points.shape[1:])

    def seed(mine):
        index = np.arange(n_tokens)[mine]
        # On the CPU, tokens go in blocks whose points stay in cache through all k steps (each
        # step reads every point once); a GPU takes the whole share at once.
        per_block = max(1, len(index) if xp is not np else SEED_BLOCK_ELEMENTS // (width * d))
        parts = [_plusplus(sub[b], k[b], first[b], steps[:, b], xp)
                 for b in np.array_split(index, max(1, -(-len(index) // per_block)))]
        if len(parts) == 1:
            return parts[0]
        return xp.concatenate([c for c, _ in parts]), xp.concatenate([v for _, v in parts])

    return n_tokens, seed


def _plusplus(sub: Subsample, k: np.ndarray, first_draw: np.ndarray, step_draws: np.ndarray, xp):
    """k-means++ of the tokens of `sub`, from their draws: first_draw [T], step_draws [k_max - 1, T, candidates]."""
    points, mask, counts = sub.points, sub.mask, sub.counts
    n_tokens, width, d = points.shape
    k_max = len(step_draws) + 1
    tokens = xp.arange(n_tokens)
    sq = xp.einsum("tsd,tsd->ts", points, points)  # no [T, s, d] temporary
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
        trial = _trial_closest(points, sq, candidates, closest, mask, xp)
        best = xp.argmin(trial.sum(axis=2), axis=1)
        active = (j < k_dev) & (potential > 0)
        centres[:, j] = xp.where(active[:, None], candidates[tokens, best], 0)
        closest = xp.where(active[:, None], trial[tokens, best], closest)
        valid[:, j] = active
    return centres, valid


def share_tokens(jobs: list, comm: Comm, xp) -> list[tuple]:
    """Run each job (n_tokens, compute) on this rank's share of its tokens; every rank gets every row.

    `compute(index)` returns a tuple of arrays with one row per indexed token. This rank
    takes every world-th token of each job, and one allgather, for all jobs together, brings
    the other ranks' rows: per-token work that would otherwise run identically on every
    rank (seeding) shrinks with the number of ranks, at one synchronisation per call.
    """
    rank, world = comm.rank, comm.world
    if not jobs:
        return []  # every rank has the same jobs, so every rank skips the allgather alike
    if world == 1:
        return [tuple(compute(slice(None))) for _, compute in jobs]
    parts = [tuple(to_host(a) for a in compute(np.arange(rank, n, world))) for n, compute in jobs]
    # Byte segments, each padded to 8 bytes so every array's view of the buffer stays aligned.
    def segment(array):
        raw = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
        return np.concatenate([raw, np.zeros(-len(raw) % 8, np.uint8)])

    gathered = comm.allgather(np.concatenate([segment(a) for part in parts for a in part] or [np.zeros(0, np.uint8)]))
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


def start_centres(run: TileRun, rows: SubsampleRows, k: np.ndarray, per_token: np.ndarray):
    """The k-means++ start of a tile's tokens with more vectors than their k, from the gathered subsample `rows`.

    Tokens are seeded in groups of similar subsample size, each padded to its widest
    (size_classes). Returns (Centres, a row per token, group after group; the groups as
    (GroupSubsample, first row, end row), which run_lloyd re-seeds empty senses from).
    """
    local, cfg, xp = run.local, run.cfg, run.xp
    big = np.flatnonzero(per_token > k)
    groups, jobs, order, first = [], [], [], 0
    rng = np.random.default_rng([cfg.seed, run.seed])
    gathered = np.bincount(rows.slots, minlength=local.n_tokens)
    for members in size_classes(np.maximum(np.minimum(per_token[big], cfg.subsample), k[big])):
        slots = big[members]
        sub = GroupSubsample(rows, slots, max(1, int(gathered[slots].max())), xp)  # padded as needed
        jobs.append(plusplus_job(sub, k[slots], rng, xp))
        groups.append((sub, first, first + len(slots)))
        order.append(slots)
        first += len(slots)
    # k-means++ for every size group, each rank its share of the tokens, one allgather.
    seeded = share_tokens(jobs, run.comm, xp)
    k_max = max(c.shape[1] for c, _ in seeded)
    points = xp.concatenate([xp.pad(c, ((0, 0), (0, k_max - c.shape[1]), (0, 0))) for c, _ in seeded])
    valid = xp.concatenate([xp.pad(v, ((0, 0), (0, k_max - v.shape[1]))) for _, v in seeded])
    return Centres(points, valid, np.concatenate(order)), groups
