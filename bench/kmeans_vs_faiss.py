"""Batched k-means (one tile, numpy) against faiss-cpu's k-means called once per token, two ways.

Data: the same real hidden states as kmeans_vs_sklearn (all-MiniLM-L6-v2, d=384, WordNet
text, up to 1000 vectors per token, tokens with at least 40), k = 20. Both sides run in one
process with all cores; seconds are the best of 5 alternating rounds.

- FAISS's defaults: `faiss.Kmeans(d, 20, seed=0)` (random start, 25 iterations; only the
  warning about few points per centre is silenced) then one search for the final
  assignment, against our whole tile: k-means++ start, Lloyd until each token stops, final
  assignment. speedup_vs_defaults = FAISS seconds / ours.
- Matched: FAISS starts from our k-means++ centres and runs, for each token, as many
  iterations as that token took in our run, then one search; against our Lloyd iterations
  and final assignment from the same start (the start's own cost is left out of both).
  speedup_matched = FAISS seconds / ours.

inertia_ratio_* = our total inertia / FAISS's (below 1: our clusters are tighter).
allreduced_blocks: the sense rows the Lloyd allreduces carried over the whole run, in units of
the tile's [tokens, K, d] block (each iteration sends the senses that changed on some rank);
allreduced_blocks_all_senses: the same if every iteration sent all of its planned tokens' senses.

Where our time goes (line profile of one tile on the 2-core VM, 2026-12-02): the batched
distance products are about 40% of Lloyd and its final assignment, gathering each chunk's
rows about 12%, argmin and the nearest-distance pick about 12%, the sums of the rows that
changed sense about 15%; k-means++ (a step per centre, each reading the whole subsample)
is about a fifth of the whole. Lloyd does 2.8x fewer row passes than FAISS's 25 fixed
iterations (tokens stop on their own), but each pass costs more: FAISS keeps one token's
rows in cache through all its iterations and fuses the argmin into its search. Tried and
dropped, with the numbers: cutting the tile into cache-sized blocks of tokens (1 to 32
blocks: no faster, the products are not bound by memory), chunks on a thread pool with
BLAS at one thread each (about 1.4x slower: the GIL and single-threaded products).
"""
from __future__ import annotations

import time

import numpy as np

from bench import common

K, MIN_VECTORS, ROUNDS = 20, 40, 5


def tile(per_token: dict):
    from dist_sense.kmeans.tile import make_local_tile

    vectors = np.concatenate(list(per_token.values()))
    slots = np.repeat(np.arange(len(per_token)), [len(v) for v in per_token.values()])
    priority = np.random.default_rng(0).integers(0, 2**63, len(slots), dtype=np.uint64)
    return vectors, slots, priority, make_local_tile


def ours_whole(per_token: dict, cfg) -> tuple[float, float, list]:
    from dist_sense.kmeans.tile import cluster_tile

    vectors, slots, priority, make_local_tile = tile(per_token)
    start = time.perf_counter()
    local, _ = make_local_tile(vectors, slots, priority, len(per_token), np)
    result = cluster_tile(local, cfg, xp=np)
    return time.perf_counter() - start, float(result.inertia), result.history


def allreduced_blocks(history: list, k: int) -> tuple[float, float]:
    """Sense rows the Lloyd allreduces carried, in whole [tokens, K, d] blocks: (sending the senses that changed,
    as now; sending every planned token's senses every iteration, as before)."""
    block = history[0]["planned_tokens"] * k
    return (sum(h["changed_senses"] for h in history) / block, sum(h["planned_tokens"] * k for h in history) / block)


def ours_from_start(per_token: dict, cfg):
    """(seconds of Lloyd and the final assignment, inertia, start centres [T, K, d], iterations [T]) in token order."""
    from dist_sense.kmeans.lloyd import final_assignment, plan_chunks, run_lloyd
    from dist_sense.kmeans.start import start_centres
    from dist_sense.kmeans.subsample import gather_rows
    from dist_sense.kmeans.types import ONE_PROCESS, TileRun

    vectors, slots, priority, make_local_tile = tile(per_token)
    local, _ = make_local_tile(vectors, slots, priority, len(per_token), np)
    run = TileRun(local, cfg, ONE_PROCESS, np)
    counts = np.diff(local.offsets)
    k = np.full(len(counts), cfg.k)
    rows = gather_rows(local, np.maximum(np.minimum(counts, cfg.subsample), k), ONE_PROCESS, np)
    centres, groups = start_centres(run, rows, k, counts)
    first = centres.points.copy()
    start = time.perf_counter()
    chunks = plan_chunks(local.offsets, int(vectors.shape[1]), np, tokens=centres.slots)
    run_lloyd(run, chunks, centres, groups)
    inertia = final_assignment(run, chunks, centres)[3]
    seconds = time.perf_counter() - start
    order = np.argsort(centres.slots)
    return seconds, inertia, first[order], centres.iterations[order]


def faiss_loop(per_token: dict, starts=None, iterations=None) -> tuple[float, float]:
    import faiss

    start, inertia = time.perf_counter(), 0.0
    for t, x in enumerate(per_token.values()):
        x = np.ascontiguousarray(x, dtype=np.float32)
        if starts is None:
            model = faiss.Kmeans(x.shape[1], K, seed=0, min_points_per_centroid=1)
            model.train(x)
        else:
            model = faiss.Kmeans(x.shape[1], K, niter=int(iterations[t]), seed=0, min_points_per_centroid=1)
            model.train(x, init_centroids=np.ascontiguousarray(starts[t]))
        distances, _ = model.index.search(x, 1)
        inertia += float(distances.sum())
    return time.perf_counter() - start, inertia


def main() -> dict:
    common.single_process_env()
    from dist_sense.config import KMeansConfig
    from dist_sense.runtime.process import retain_freed_memory

    retain_freed_memory()  # as build_dict does; the process's allocator, so for both alike
    per_token = common.per_token_vectors(common.teacher_run(), MIN_VECTORS)
    cfg = KMeansConfig(k=K, max_iter=50, tol=1e-4)
    rounds = {"ours": [], "faiss_defaults": [], "ours_from_start": [], "faiss_matched": []}
    for _ in range(ROUNDS):
        rounds["ours"].append(ours_whole(per_token, cfg))
        rounds["faiss_defaults"].append(faiss_loop(per_token))
        seconds, inertia, starts, iterations = ours_from_start(per_token, cfg)
        rounds["ours_from_start"].append((seconds, inertia))
        rounds["faiss_matched"].append(faiss_loop(per_token, starts, iterations))
    history = rounds["ours"][-1][2]
    rounds["ours"] = [r[:2] for r in rounds["ours"]]
    (ours_s, ours_i), (fd_s, fd_i), (os_s, os_i), (fm_s, fm_i) = (min(r) for r in rounds.values())
    changed_blocks, full_blocks = allreduced_blocks(history, K)
    figures = {
        "speedup_vs_defaults": fd_s / ours_s, "inertia_ratio_vs_defaults": ours_i / fd_i,
        "speedup_matched": fm_s / os_s, "inertia_ratio_matched": os_i / fm_i,
        "ours_s": ours_s, "faiss_defaults_s": fd_s, "ours_from_start_s": os_s, "faiss_matched_s": fm_s,
        "iterations_mean": float(iterations.mean()), "iterations_max": int(iterations.max()),
        "allreduced_blocks": changed_blocks, "allreduced_blocks_all_senses": full_blocks,
        **{f"rounds_{name}_s": [round(t, 3) for t, _ in r] for name, r in rounds.items()},
        "tokens": len(per_token), "vectors": int(sum(len(v) for v in per_token.values())), "k": K, "d": 384,
    }
    return common.record("kmeans_vs_faiss", figures, {"speedup_vs_defaults": ">= 1", "speedup_matched": ">= 1",
                                                      "inertia_ratio_vs_defaults": "<= 1", "inertia_ratio_matched": "<= 1"})


if __name__ == "__main__":
    main()
