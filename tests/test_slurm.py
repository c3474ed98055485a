"""The sbatch scripts under a real, private, single-node Slurm (munge + slurmctld + slurmd).

Skipped, with the reason printed, where Slurm cannot start here (not installed, not root).
`make test` installs Debian's Slurm packages when it runs as root with apt-get.
"""
import json
import os

import helpers as testing
import pytest
from slurm_cluster import SlurmCluster, why_unavailable

from dist_sense.formats.dictionary import SenseDictionary

pytestmark = [pytest.mark.slow, pytest.mark.skipif(bool(why_unavailable()), reason=str(why_unavailable()))]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with SlurmCluster(tmp_path_factory.mktemp("slurm")) as running:
        yield running


def job_env(config) -> dict:
    env = testing.launch_env({"CONFIG": str(config)})
    env["PYTHON"] = str(testing.Path(os.sys.executable))
    return env


def test_sbatch_build_dict_then_distill(cluster, tiny_llama, tmp_path):
    run_dir = tmp_path / "run"
    docs = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=60, seed=5)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({
        "run_dir": str(run_dir), "model": {"teacher": str(tiny_llama)},
        "corpus": {"path": str(docs), "max_length": 16}, "extract": {"cap": 20}, "kmeans": {"k": 3},
        "label": {"batch_size": 8, "shard_samples": 8},
        "distill": {"layers": 1, "steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "eval_every": 0,
                    "save_every": 0, "eval_fraction": 0.1},
    }))
    job = cluster.sbatch_wait("slurm/build_dict.sh", job_env(config), testing.REPO_ROOT, timeout=400)
    assert job.returncode == 0, job.stderr + cluster.job_output()[-4000:]
    dictionary = SenseDictionary.load(run_dir / "dictionary")
    assert len(dictionary) > 10 and dictionary.k_max == 3
    hidden = json.loads((run_dir / "hidden" / "manifest.json").read_text())
    assert hidden["world_size"] == 2  # srun started two extraction ranks
    assert "2 ranks on numpy" in cluster.job_output()  # and two MPI ranks for the k-means

    job = cluster.sbatch_wait("slurm/distill.sh", job_env(config), testing.REPO_ROOT, timeout=400)
    assert job.returncode == 0, job.stderr + cluster.job_output()[-4000:]
    assert (run_dir / "student" / "final" / "student.json").is_file()
    steps = [json.loads(line)["step"] for line in (run_dir / "student" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 4
