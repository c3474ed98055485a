"""Stage 1 on the tiny models: ZeRO-3 teacher, capped sampling, shards, lockstep and resume."""
import json

import helpers as testing
import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dist_sense.formats import corpus, shards
from dist_sense.formats.manifest import read_manifest

SCRIPT = "launcher/extract.py"


def extract_args(run_dir, model, corpus_path, **extra):
    args = {"run_dir": run_dir, "model.teacher": model, "corpus.path": corpus_path, "corpus.max_length": 12,
            "extract.cap": 8, "extract.shard_samples": 8, "extract.batch_size": 4,
            # Every parameter partitioned: the tiny model's would all stay resident under the default threshold.
            "extract.ds_config": testing.PARTITION_ALL_DS_CONFIG, **extra}
    return [f"{k}={v}" for k, v in args.items()]


def read_hidden(run_dir):
    """{(doc, window, pos): (token, vector)} over every shard listed in the manifest."""
    manifest = read_manifest(run_dir / "hidden", shards.HIDDEN_FORMAT, shards.HIDDEN_VERSION)
    paths = [run_dir / "hidden" / s["file"] for s in manifest["shards"]]
    out = {}
    for sample in shards.iter_hidden(paths, manifest["dtype"]):
        for tok, vec, pos in zip(sample["tokens"], sample["hidden"], sample["pos"]):
            key = (sample["doc"]["doc"], sample["doc"]["window"], int(pos))
            assert key not in out, f"occurrence {key} stored twice"
            out[key] = (int(tok), vec)
    return manifest, out


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return testing.write_toy_corpus(tmp_path_factory.mktemp("c") / "docs.jsonl", n_docs=120, seed=1)


@pytest.fixture(scope="module")
def one_rank_run(tmp_path_factory, tiny_llama, corpus_file):
    run_dir = tmp_path_factory.mktemp("one")
    testing.run_command(["python", SCRIPT, *extract_args(run_dir, tiny_llama, corpus_file)], timeout=300)
    return run_dir


@pytest.mark.slow
def test_one_rank_matches_hf_forward_and_follows_cap(one_rank_run, tiny_llama, corpus_file):
    manifest, kept = read_hidden(one_rank_run)
    assert manifest["d"] == 32 and manifest["layer"] == 2 and manifest["dtype"] == "fp16"
    assert manifest["totals"]["vectors_kept"] == len(kept) > 0
    counts = np.load(one_rank_run / "counts" / "counts.npy")
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    # Specials are never kept; rare tokens are all kept; frequent ones land near the cap.
    per_token = {int(t): n for t, n in manifest["kept_per_token"].items()}
    assert not set(per_token) & set(tokenizer.all_special_ids)
    for token, count in enumerate(counts):
        if 0 < count <= 8:
            assert per_token.get(token, 0) == count
    frequent = [per_token[t] for t in np.flatnonzero(counts >= 24)]
    assert frequent and 5 <= np.mean(frequent) <= 11, frequent

    # The ZeRO-3 states equal a plain HF forward (last layer = final-norm output).
    model = AutoModel.from_pretrained(tiny_llama).eval()
    dataset = corpus.load_documents(str(corpus_file))
    windows = list(corpus.iter_windows(corpus.documents_for_rank(dataset, 0, 1), tokenizer, 12, 0))[:10]
    ids, mask = corpus.batch_windows(windows, tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).last_hidden_state.numpy()
    checked = 0
    for b, w in enumerate(windows):
        for pos in range(len(w.input_ids)):
            if (w.doc, w.index, pos) in kept:
                token, vec = kept[(w.doc, w.index, pos)]
                assert token == w.input_ids[pos]
                np.testing.assert_allclose(vec, expected[b, pos], atol=2e-3, rtol=2e-3)  # fp16 storage
                checked += 1
    assert checked > 5


@pytest.mark.slow
def test_two_ranks_keep_the_same_occurrences(one_rank_run, tiny_llama, corpus_file, tmp_path):
    testing.run_deepspeed(SCRIPT, extract_args(tmp_path, tiny_llama, corpus_file), nproc=2, timeout=300)
    m1, one = read_hidden(one_rank_run)
    m2, two = read_hidden(tmp_path)
    assert set(one) == set(two)
    assert m1["kept_per_token"] == m2["kept_per_token"] and m2["world_size"] == 2
    for key, (token, vec) in one.items():
        assert two[key][0] == token
        np.testing.assert_allclose(two[key][1], vec, atol=2e-3)
    assert json.loads((tmp_path / "config.json").read_text())["extract"]["cap"] == 8


@pytest.mark.slow
def test_uneven_ranks_one_document_finishes(tiny_bert, tmp_path):
    one_doc = tmp_path / "one.txt"
    one_doc.write_text("the bank of the river is wet and the fish swim by the bank\n")
    testing.run_deepspeed(SCRIPT, extract_args(tmp_path / "run", tiny_bert, one_doc), nproc=2, timeout=180)
    manifest, kept = read_hidden(tmp_path / "run")
    assert manifest["totals"]["tokens_read"] == 14 and len(kept) > 0


@pytest.mark.slow
def test_crash_then_rerun_equals_uninterrupted(one_rank_run, tiny_llama, corpus_file, tmp_path):
    args = ["python", SCRIPT, *extract_args(tmp_path, tiny_llama, corpus_file)]
    crashed = testing.run_command(args, env={"DIST_SENSE_CRASH": "hidden.window:39"}, check=False, timeout=300)
    assert crashed.returncode == 137
    assert not (tmp_path / "hidden" / "manifest.json").exists()
    assert list((tmp_path / "hidden").glob(".*.partial")), "the crash should have left a half-written shard"
    testing.run_command(args, timeout=300)
    m1, one = read_hidden(one_rank_run)
    m2, two = read_hidden(tmp_path)
    assert set(one) == set(two) and m1["totals"] == m2["totals"]
    assert not list((tmp_path / "hidden").glob(".*.partial"))
    assert all(np.array_equal(one[k][1], two[k][1]) for k in one)


@pytest.mark.parametrize(
    "override, needle",
    [
        ({"corpus.path": "/nonexistent/docs.jsonl"}, "/nonexistent/docs.jsonl"),
        ({"corpus.text_field": "body"}, "body"),
        ({"model.layer": 7}, "model.layer=7"),
        ({"model.teacher": "/nonexistent/model"}, "/nonexistent/model"),
        ({"extract.cap": 0}, "extract.cap=0"),
    ],
)
def test_bad_input_fails_clearly_and_writes_no_manifest(override, needle, tiny_bert, corpus_file, tmp_path):
    args = extract_args(tmp_path, tiny_bert, corpus_file)
    args = [a for a in args if a.split("=")[0] not in override] + [f"{k}={v}" for k, v in override.items()]
    proc = testing.run_command(["python", SCRIPT, *args], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert needle in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
    assert not (tmp_path / "hidden" / "manifest.json").exists()


def test_partition_auto_uses_zero3_only_where_it_helps():
    from dist_sense.config import ConfigError, RunConfig
    from dist_sense.model.teacher import use_zero3

    assert not use_zero3("auto", 1, "none")  # one rank holds everything anyway
    assert use_zero3("auto", 2, "none") and use_zero3("auto", 1, "cpu") and use_zero3("zero3", 1, "none")
    assert not use_zero3("replicate", 4, "none")
    with pytest.raises(ConfigError, match="extract.offload=cpu needs ZeRO-3"):
        RunConfig.load(None, ["extract.partition=replicate", "extract.offload=cpu"])
    with pytest.raises(ConfigError, match="extract.partition"):
        RunConfig.load(None, ["extract.partition=sharded"])
