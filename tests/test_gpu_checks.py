"""bench/gpu_checks.py runs (numpy in cupy's place) and never records a figure without a GPU."""
import json
import sys

import helpers as testing
import pytest

from dist_sense.runtime import backend


def test_dry_run_compares_the_two_backends():
    proc = testing.run_command([sys.executable, "-m", "bench.gpu_checks", "--dry-run"], timeout=300)
    results = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert results["device"] == "numpy (dry run)"
    assert results["cupy_equals_numpy"]["same_senses"] and results["cupy_equals_numpy"]["max_centre_abs_diff"] == 0
    assert results["assignment_bandwidth"]["achieved_gb_s"] > 0
    assert results["kmeans_vs_sklearn_d4096"]["inertia_ratio"] < 1.2


@pytest.mark.skipif(backend.gpu_count() > 0, reason="this machine has a GPU: the real checks would run")
def test_without_a_gpu_nothing_is_recorded(tmp_path):
    from bench.gpu_checks import RESULTS_GPU

    before = RESULTS_GPU.read_bytes() if RESULTS_GPU.is_file() else None
    proc = testing.run_command([sys.executable, "-m", "bench.gpu_checks"], timeout=300)
    assert "no usable CUDA GPU" in proc.stdout
    assert (RESULTS_GPU.read_bytes() if RESULTS_GPU.is_file() else None) == before
