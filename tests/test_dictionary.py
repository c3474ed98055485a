"""SenseDictionary: save/load round trip, memory maps, padded view, nearest sense, tokenizer check, bad files."""
import json

import helpers as testing
import numpy as np
import pytest

from dist_sense.formats import manifest
from dist_sense.formats.dictionary import DictionaryError, SenseDictionary, shard_name

D = 6


def small_dictionary(seed=0, meta=None) -> SenseDictionary:
    """Tokens 3, 7, 10, 11 with 2, 1, 4, 3 senses; examples for token 7."""
    rng = np.random.default_rng(seed)
    token_ids = np.array([3, 7, 10, 11])
    offsets = np.array([0, 2, 3, 7, 10])
    centroids = rng.normal(0, 1, (10, D)).astype(np.float32)
    counts = np.arange(10, 0, -1)
    examples = {7: [["the [[bank]] of the river"]]}
    meta = {"vocab_size": 16, "teacher": "t", "layer": -1} if meta is None else meta
    return SenseDictionary(token_ids, offsets, centroids, counts, meta=meta, examples=examples)


def test_save_load_round_trip(tmp_path):
    d = small_dictionary()
    d.save(tmp_path / "dict", tokens_per_shard=3)
    index = json.loads((tmp_path / "dict" / "index.json").read_text())
    assert (index["format"], index["version"], index["d"], index["dtype"]) == ("dist_sense.dictionary", 1, D, "fp32")
    assert [(s["file"], s["first_token"], s["last_token"]) for s in index["shards"]] == [
        (shard_name(0), 3, 10), (shard_name(1), 11, 11)]
    loaded = SenseDictionary.load(tmp_path / "dict")
    assert isinstance(loaded.parts[0].centroids, np.memmap)  # not read into memory
    assert loaded.token_ids.tolist() == [3, 7, 10, 11] and loaded.num_senses.tolist() == [2, 1, 4, 3]
    for t in d.token_ids:
        np.testing.assert_array_equal(loaded.senses(t), d.senses(t))
        np.testing.assert_array_equal(loaded.sense_counts(t), d.sense_counts(t))
    assert loaded.examples(7) == [["the [[bank]] of the river"]] and loaded.examples(3) == []
    assert 5 not in loaded and 99 not in loaded
    with pytest.raises(KeyError, match="token 5 has no senses"):
        loaded.senses(5)
    loaded.save(tmp_path / "again", dtype="fp16")  # a loaded (multi-shard) dictionary saves too
    half = SenseDictionary.load(tmp_path / "again")
    assert half.parts[0].centroids.dtype == np.float16
    np.testing.assert_allclose(half.senses(10), d.senses(10), atol=1e-2)


def test_padded_view_and_row_map():
    d = small_dictionary()
    centres, mask, token_to_row = d.padded()
    assert centres.shape == (4, 4, D) and mask.sum(axis=1).tolist() == [2, 1, 4, 3]
    assert token_to_row.shape == (16,) and token_to_row[[3, 7, 10, 11, 0, 15]].tolist() == [0, 1, 2, 3, -1, -1]
    np.testing.assert_array_equal(centres[2, :4], d.senses(10))
    assert not centres[1, 1:].any()


@pytest.mark.parametrize("similarity", ["dot", "cos", "l2"])
def test_nearest_matches_brute_force(similarity):
    d = small_dictionary()
    rng = np.random.default_rng(1)
    tokens = rng.choice([3, 7, 10, 11, 4, 99, -1], 200)
    vectors = rng.normal(0, 1, (200, D)).astype(np.float32)
    got = d.nearest(tokens, vectors, similarity=similarity, chunk_pairs=7)
    for t, h, g in zip(tokens, vectors, got):
        if t not in d:
            assert g == -1
            continue
        senses = d.senses(t)
        if similarity == "dot":
            want = np.argmax(senses @ h)
        elif similarity == "cos":
            want = np.argmax(senses @ h / np.linalg.norm(senses, axis=1))
        else:
            want = np.argmin(np.linalg.norm(senses - h, axis=1))
        assert g == want
    with pytest.raises(ValueError, match="similarity"):
        d.nearest(tokens, vectors, similarity="manhattan")


def test_scores_are_per_sense_and_masked():
    d = small_dictionary()
    h = np.random.default_rng(2).normal(0, 1, (3, D)).astype(np.float32)
    score = d.scores([10, 7, 5], h, similarity="l2")
    assert score.shape == (3, 4)
    np.testing.assert_allclose(score[0], -((d.senses(10) - h[0]) ** 2).sum(1), rtol=1e-5)
    assert np.isfinite(score[1]).tolist() == [True, False, False, False] and not np.isfinite(score[2]).any()
    cos = d.scores([10], h[:1], similarity="cos")[0]
    senses = d.senses(10)
    np.testing.assert_allclose(cos, senses @ h[0] / np.linalg.norm(senses, axis=1) / np.linalg.norm(h[0]), rtol=1e-5)
    with pytest.raises(ValueError, match=r"expected vectors \[3, 6\]"):
        d.scores([10, 7, 5], h[:, :4])


def test_check_tokenizer(tmp_path):
    bert, llama = testing.build_tokenizer("bert"), testing.build_tokenizer("llama")
    fingerprint = manifest.tokenizer_fingerprint(bert)
    d = small_dictionary(meta={"tokenizer_fingerprint": fingerprint, "vocab_size": 16})
    d.save(tmp_path / "dict")
    loaded = SenseDictionary.load(tmp_path / "dict")
    loaded.check_tokenizer(bert)
    other = manifest.tokenizer_fingerprint(llama)
    with pytest.raises(DictionaryError) as err:
        loaded.check_tokenizer(llama)
    assert str(tmp_path / "dict" / "index.json") in str(err.value)
    assert fingerprint in str(err.value) and other in str(err.value)


def test_load_errors_name_the_file(tmp_path):
    with pytest.raises(manifest.ManifestError, match=r"index.json: no manifest .*build_dict"):
        SenseDictionary.load(tmp_path / "nothing")
    small_dictionary().save(tmp_path / "dict", tokens_per_shard=2)
    index_path = tmp_path / "dict" / "index.json"
    index = json.loads(index_path.read_text())
    testing.edit_manifest(index_path, {"version": 7})
    with pytest.raises(manifest.ManifestError, match="index.json: dist_sense.dictionary version 7"):
        SenseDictionary.load(tmp_path / "dict")
    manifest.atomic_write_json(index_path, index)
    shard = tmp_path / "dict" / shard_name(1)
    shard.write_bytes(shard.read_bytes()[:-16])
    with pytest.raises(DictionaryError, match=shard.name + ".*truncated"):
        SenseDictionary.load(tmp_path / "dict")
    shard.unlink()
    with pytest.raises(DictionaryError, match=shard.name + ": dictionary shard is missing"):
        SenseDictionary.load(tmp_path / "dict")


def test_bad_csr_is_refused():
    with pytest.raises(DictionaryError, match="offsets"):
        SenseDictionary([1, 2], [0, 2], np.zeros((2, D)))
    with pytest.raises(DictionaryError, match="increasing"):
        SenseDictionary([2, 1], [0, 1, 2], np.zeros((2, D)))
