"""The k-means scale benchmark's measurement and plot, on a tiny grid (the real grid runs under `make bench`)."""
from __future__ import annotations

import numpy as np

from bench import kmeans_scale


def test_scale_benchmark_measures_every_point_and_draws_the_plot(tmp_path):
    figures, curves = kmeans_scale.measure(kmeans_scale.QUICK_GRID, kmeans_scale.QUICK_BASE, rounds=1)
    for axis, sizes in kmeans_scale.QUICK_GRID.items():
        assert [size for size, _ in curves[axis]] == sizes
        for size in sizes:
            assert figures[f"{axis}_{size}_s"] > 0 and figures[f"{axis}_{size}_iterations"] >= 1
        assert np.isfinite(figures[f"slope_{axis}"])
    path = tmp_path / "scale.png"
    kmeans_scale.plot(curves, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_mixture_gives_each_token_its_rows():
    vectors, slots, priority = kmeans_scale.mixture(5, 7, 3)
    assert vectors.shape == (35, 3) and vectors.dtype == np.float32
    assert np.bincount(slots).tolist() == [7] * 5 and len(np.unique(priority)) == 35
