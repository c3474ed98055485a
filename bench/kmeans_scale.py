"""How the k-means' cost grows: one tile, one process (numpy, all cores), synthetic tokens.

Each token's vectors are a Gaussian mixture of 30 to 60 true senses (standard normal
centres, noise of the same scale per coordinate): more senses than k, so Lloyd has to
settle between them and runs several iterations (6 to 10 per tile here; the real states of
kmeans_vs_faiss take up to 14), not the 3 or 4 that a few well-separated senses need. k = 20,
max_iter 50, tol 1e-4, as the benchmarks on real states. One axis varies at a time around
200 tokens x 200 vectors x d = 384: tokens 100 to 2,000, vectors per token 100 to 1,000,
width 384 / 576 / 1,024. Each point's seconds are the
best of 2 rounds of make_local_tile + cluster_tile. s_per_Mvec = seconds per million
vectors; slope_* is the slope of log(seconds) against log(size) along that axis (1 means
the cost grows linearly; k-means++ and Lloyd are linear in tokens and in vectors, and
the products are linear in d). The plot is docs/kmeans_scale.png.

`BENCH_QUICK=1 python -m bench.kmeans_scale` runs a tiny grid as a smoke check: it prints
its figures and draws its plot under bench/results/, and leaves bench/results.json and
docs/ as they are.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

from bench import common

K, BASE = 20, {"tokens": 200, "vectors_per_token": 200, "width": 384}
GRID = {"tokens": [100, 250, 500, 1000, 2000], "vectors_per_token": [100, 250, 500, 1000], "width": [384, 576, 1024]}
QUICK_GRID = {"tokens": [10, 20], "vectors_per_token": [30, 60], "width": [16, 32]}
QUICK_BASE = {"tokens": 10, "vectors_per_token": 30, "width": 16}
FIGURE = "kmeans_scale.png"
"""The plot, relative to docs/: bench.run.render shows it under this benchmark's table."""
FIGURE_ALT = "k-means cost as it grows"


def mixture(tokens: int, per_token: int, d: int, seed: int = 0):
    """(vectors float32 [tokens * per_token, d], slots, priority) of per-token Gaussian mixtures.

    Many overlapping senses per token, so that Lloyd needs as many iterations as on real
    states. A few well-separated senses (3 to 12 on a unit sphere, spread 0.3) settle in 3 or 4
    tile iterations at 50 x 200 x 384, this mixture in 8, the real states in up to 14.
    """
    rng = np.random.default_rng(seed)
    senses = rng.integers(30, 61, tokens)
    centres = rng.standard_normal((tokens, 60, d), dtype=np.float32)
    slots = np.repeat(np.arange(tokens), per_token)
    which = (rng.random(len(slots)) * senses[slots]).astype(np.int64)
    vectors = centres[slots, which] + 1.0 * rng.standard_normal((len(slots), d), dtype=np.float32)
    return vectors, slots, rng.integers(0, 2**63, len(slots), dtype=np.uint64)


def timed(tokens: int, per_token: int, d: int, rounds: int) -> tuple[float, int]:
    """(best seconds of make_local_tile + cluster_tile, Lloyd iterations)."""
    from dist_sense.config import KMeansConfig
    from dist_sense.kmeans.tile import cluster_tile, make_local_tile

    vectors, slots, priority = mixture(tokens, per_token, d)
    cfg, best = KMeansConfig(k=K, max_iter=50, tol=1e-4), float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        local, _ = make_local_tile(vectors, slots, priority, tokens, np)
        result = cluster_tile(local, cfg, xp=np)
        best = min(best, time.perf_counter() - start)
    return best, len(result.history)


def measure(grid: dict, base: dict, rounds: int = 2) -> tuple[dict, dict]:
    """(flat figures, {axis: [(size, seconds per million vectors)]} for the plot)."""
    figures, curves = {}, {}
    # Untimed warm-up: lazy imports and first-call costs would otherwise land on the first point.
    timed(QUICK_BASE["tokens"], QUICK_BASE["vectors_per_token"], QUICK_BASE["width"], 1)
    for axis, sizes in grid.items():
        seconds, curve = [], []
        for size in sizes:
            shape = {**base, axis: size}
            s, iterations = timed(shape["tokens"], shape["vectors_per_token"], shape["width"], rounds)
            per_mvec = s / (shape["tokens"] * shape["vectors_per_token"] / 1e6)
            figures[f"{axis}_{size}_s"] = s
            figures[f"{axis}_{size}_s_per_Mvec"] = per_mvec
            figures[f"{axis}_{size}_iterations"] = iterations
            seconds.append(s)
            curve.append((size, per_mvec))
        figures[f"slope_{axis}"] = float(np.polyfit(np.log(sizes), np.log(seconds), 1)[0])
        curves[axis] = curve
    return figures, curves


def run(figure: Path, quick: bool = False, rounds: int = 2) -> dict:
    """Measure the grid (the tiny one if `quick`) and draw the plot at `figure`; returns the figures."""
    figures, curves = measure(QUICK_GRID if quick else GRID, QUICK_BASE if quick else BASE, rounds)
    plot(curves, figure)
    return figures


def plot(curves: dict, path: Path) -> None:
    """One panel per axis: seconds per million vectors against its size (log x), saved as PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.4), sharey=True)
    for ax, (axis, curve) in zip(np.atleast_1d(axes), curves.items()):
        sizes, values = zip(*curve)
        ax.plot(sizes, values, "o-")
        ax.set_xscale("log")
        ax.set_xticks(sizes, [str(size) for size in sizes])  # the measured sizes, not powers of 10
        ax.xaxis.set_minor_formatter(plt.NullFormatter())
        ax.set_xlabel(axis.replace("_", " "))
        ax.grid(True, alpha=0.3)
    np.atleast_1d(axes)[0].set_ylabel("seconds per million vectors")
    fig.suptitle(f"k-means cost, k = {K} (one process)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(quick: bool | None = None) -> dict:
    """The full grid, recorded in bench/results.json with its plot in docs/; or, if `quick`
    (default: BENCH_QUICK=1), the tiny grid, printed only, its plot under bench/results/."""
    common.single_process_env()
    from dist_sense.runtime.process import retain_freed_memory

    retain_freed_memory()  # as build_dict does
    if quick is None:
        quick = os.environ.get("BENCH_QUICK") == "1"
    targets = {f"slope_{axis}": "<= 1.2" for axis in GRID}
    if quick:
        figure = common.WORK / "kmeans_scale_quick.png"
        figures = run(figure, quick=True, rounds=1)
        print("kmeans_scale (quick, not recorded): "
              + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in figures.items()))
        print(f"plot: {figure}")
        return {"figures": figures, "targets": targets}
    figures = run(common.ROOT / "docs" / FIGURE)
    return common.record("kmeans_scale", figures, targets)


if __name__ == "__main__":
    main()
