"""TensorBoard served for real over a run: every stage's scalar tags through its HTTP API."""
import json
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import helpers as testing
import pytest
from run_fixture import distilled_run  # noqa: F401  (the shared tiny run)

from dist_sense.comm import free_port

pytestmark = pytest.mark.slow

EXPECTED = {
    "extract": {"extract/vectors_kept", "extract/distinct_tokens"},
    "kmeans": {"kmeans/inertia"},
    "distill": {"loss/kd", "acc/top1", "lr", "speed/tokens_per_s"},
    "distill_mse": {"loss/mse"},
    "eval": {"agreement/top1", "fidelity/mean_cos"},
}


def get_json(url: str, timeout: float = 60):
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)


def test_tensorboard_serves_every_stage(distilled_run):  # noqa: F811
    logdir = Path(distilled_run["run_dir"]) / "tb"
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "tensorboard"), "--logdir", str(logdir), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=testing.launch_env(),
    )
    try:
        tags = {}
        deadline = time.time() + 90
        while time.time() < deadline:  # the first load of the event files takes a moment
            tags = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/tags")
            if all(run in tags for run in EXPECTED):
                break
            time.sleep(1)
        for run, wanted in EXPECTED.items():
            assert run in tags, f"TensorBoard shows no run {run!r}; runs: {sorted(tags)}"
            missing = wanted - set(tags[run])
            assert not missing, f"run {run} lacks {missing}; has {sorted(tags[run])}"
        points = get_json(f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=distill&tag=loss/kd")
        assert len(points) >= 3 and all(len(p) == 3 for p in points)  # [wall time, step, value]
    finally:
        server.terminate()
        server.wait(timeout=20)
