"""bench/kmeans_scale.py on its tiny grid: every point timed, the plot drawn, the plot shown in docs/benchmarks.md.

The full grid runs only under `make bench`; nothing here writes bench/results.json or docs/.
"""
from __future__ import annotations

import numpy as np

from bench import kmeans_scale
from bench import run as bench_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_quick_grid_times_every_point_and_draws_the_plot(tmp_path):
    figure = tmp_path / "scale.png"
    figures = kmeans_scale.run(figure, quick=True, rounds=1)
    expected = {f"slope_{axis}" for axis in kmeans_scale.QUICK_GRID}
    for axis, sizes in kmeans_scale.QUICK_GRID.items():
        for size in sizes:
            expected |= {f"{axis}_{size}_s", f"{axis}_{size}_s_per_Mvec", f"{axis}_{size}_iterations"}
            assert figures[f"{axis}_{size}_s"] > 0 and figures[f"{axis}_{size}_s_per_Mvec"] > 0
            assert figures[f"{axis}_{size}_iterations"] >= 1
        assert np.isfinite(figures[f"slope_{axis}"])
    assert set(figures) == expected
    assert figure.read_bytes()[:8] == PNG_MAGIC


def test_mixture_gives_each_token_its_rows():
    vectors, slots, priority = kmeans_scale.mixture(5, 7, 3)
    assert vectors.shape == (35, 3) and vectors.dtype == np.float32
    assert np.bincount(slots).tolist() == [7] * 5 and len(np.unique(priority)) == 35


def test_rendered_section_shows_the_plot():
    machine = {"cpu": "x86_64", "cores": 2, "torch": "2", "torch_threads": 2, "python": "3", "date": "today"}
    entry = {"figures": {"slope_tokens": 1.0}, "targets": {"slope_tokens": "<= 1.2"}, "machine": machine}
    text = bench_run.render({"kmeans_scale": entry})
    section = text[text.index("## kmeans_scale"):]
    assert "| slope_tokens | 1 | <= 1.2 (met) |" in section
    assert "![k-means cost as it grows](kmeans_scale.png)" in section
