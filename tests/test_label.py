"""Stage 3a: teacher sense labels over the distillation corpus (ZeRO-3, lockstep, resume)."""
import io

import helpers as testing
import numpy as np
import pytest
import torch
from transformers import AutoModel

from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.labels import LABELS_FORMAT, LABELS_VERSION
from dist_sense.formats.manifest import read_manifest
from dist_sense.formats.shards import iter_tar_samples
from dist_sense.stages.label import soft_targets

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dict_run(tmp_path_factory, tiny_llama):
    """A run directory with hidden/ and dictionary/ built from the tiny Llama (k=3)."""
    run_dir = tmp_path_factory.mktemp("label_run")
    docs = testing.write_toy_corpus(run_dir / "docs.jsonl", n_docs=80, seed=3)
    args = [f"run_dir={run_dir}", f"model.teacher={tiny_llama}", f"corpus.path={docs}", "corpus.max_length=12",
            "extract.cap=30", "kmeans.k=3", "label.shard_samples=10", "label.soft_topk=2", "label.batch_size=4"]
    testing.run_command(["python", "launcher/extract.py", *args], timeout=300)
    testing.run_command(["python", "launcher/build_dict.py", *args], timeout=300)
    return run_dir, args


def read_labels(labels_dir):
    manifest = read_manifest(labels_dir, LABELS_FORMAT, LABELS_VERSION)
    samples = {}
    for shard in manifest["shards"]:
        for key, fields in iter_tar_samples(labels_dir / shard["file"]):
            samples[key] = {name.removesuffix(".npy"): np.load(io.BytesIO(data)) for name, data in fields.items()}
    return manifest, samples


def test_one_rank_labels_are_the_teachers_nearest_senses(dict_run, tiny_llama):
    run_dir, args = dict_run
    testing.run_command(["python", "launcher/label.py", *args], timeout=300)
    manifest, samples = read_labels(run_dir / "labels")
    assert manifest["totals"]["windows"] == len(samples) > 0
    assert manifest["totals"]["labelled"] > 0.9 * manifest["totals"]["tokens"]
    assert manifest["similarity"] == "l2"  # the default

    dictionary = SenseDictionary.load(run_dir / "dictionary")
    model = AutoModel.from_pretrained(tiny_llama).eval()
    checked = 0
    for key, sample in list(samples.items())[:20]:
        ids = torch.from_numpy(sample["input_ids"].astype(np.int64))[None]
        with torch.no_grad():
            states = model(input_ids=ids).last_hidden_state[0].numpy()
        expected = dictionary.nearest(ids[0].numpy(), states, manifest["similarity"])
        expected[0] = -1  # <s> is special: never labelled
        np.testing.assert_array_equal(sample["senses"], expected)
        # The soft targets' best sense is the hard label; probabilities are a part of a distribution.
        has = sample["senses"] >= 0
        np.testing.assert_array_equal(sample["soft_ids"][has, 0], sample["senses"][has])
        assert np.all(sample["soft_probs"].astype(np.float32).sum(1) <= 1.001)
        checked += int(has.sum())
    assert checked > 50


def test_two_ranks_and_a_crash_give_the_same_labels(dict_run, tmp_path):
    run_dir, args = dict_run
    _, one = read_labels(run_dir / "labels") if (run_dir / "labels" / "manifest.json").exists() else (None, None)
    if one is None:
        testing.run_command(["python", "launcher/label.py", *args], timeout=300)
        _, one = read_labels(run_dir / "labels")
    second = tmp_path / "labels2"
    second.mkdir()
    for name in ("config.json", "dictionary", "docs.jsonl"):
        (second / name).symlink_to(run_dir / name)
    args2 = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={second}"]
    crashed = testing.run_deepspeed("launcher/label.py", args2, nproc=2, timeout=300, check=False,
                                    env={"DIST_SENSE_CRASH": "labels.commit:1:1"})
    assert crashed.returncode != 0 and not (second / "labels" / "manifest.json").exists()
    testing.run_deepspeed("launcher/label.py", args2, nproc=2, timeout=300)
    manifest, two = read_labels(second / "labels")
    assert manifest["world_size"] == 2 and set(one) == set(two)
    for key in one:
        np.testing.assert_array_equal(one[key]["senses"], two[key]["senses"])


def test_label_with_another_teacher_is_refused(dict_run, tiny_bert, tmp_path):
    run_dir, args = dict_run
    other = tmp_path / "other"
    other.mkdir()
    (other / "dictionary").symlink_to(run_dir / "dictionary")
    args = [a for a in args if not a.startswith(("run_dir=", "model.teacher="))]
    proc = testing.run_command(["python", "launcher/label.py", *args, f"run_dir={other}", f"model.teacher={tiny_bert}"],
                               check=False, timeout=120)
    assert proc.returncode == 2
    assert "tokenizer fingerprint" in proc.stderr and str(other / "dictionary" / "index.json") in proc.stderr


def test_soft_targets_are_a_tempered_softmax():
    scores = np.array([[2.0, 1.0, -np.inf], [0.5, -np.inf, -np.inf]])
    ids, probs = soft_targets(scores, k=2, temperature=2.0)
    e = np.exp(np.array([1.0, 0.5]))
    np.testing.assert_array_equal(ids, [[0, 1], [0, -1]])
    np.testing.assert_allclose(probs.astype(np.float32), [e / e.sum(), [1.0, 0.0]], atol=1e-3)
