"""Checksums of every shard kind: one flipped byte in a hidden/ or labels/ member, a dictionary tensor,
an examples file or a manifest is an error naming the file and the sample, tensor or member."""
import json
import tarfile

import helpers as testing
import numpy as np
import pytest
from test_build_dict import make_config, make_hidden_dir

from dist_sense.formats import labels, manifest, shards
from dist_sense.formats.dictionary import DictionaryError, SenseDictionary, examples_name, read_shard, shard_name
from dist_sense.stages.build_dict import stage as build_dict


def flip_byte(path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x40
    path.write_bytes(bytes(data))


def flip_member(path, member: str) -> None:
    """Flip a byte near the end of one tar member's data (inside the array, past any .npy header)."""
    with tarfile.open(path) as tar:
        info = tar.getmember(member)
    flip_byte(path, info.offset_data + info.size - 2)


def hidden_shard(directory, dtype="fp16", samples=4):
    """One hidden/ shard of `samples` samples (keys 00000..), written as extract writes it; (path, entry)."""
    rng = np.random.default_rng(0)
    writer = shards.RankShardWriter(directory, "hidden", 0, max_samples=100)
    for i in range(samples):
        states = shards.encode_hidden(rng.normal(size=(3, 8)), dtype)
        writer.write(f"{i:05d}", shards.hidden_sample(states, np.arange(3) + i, np.arange(3), {"doc": i, "text": "x"}))
    writer.close()
    (entry,) = writer.written
    return directory / entry["file"], entry


def test_hidden_samples_carry_checksums_and_the_entry_describes_the_file(tmp_path):
    path, entry = hidden_shard(tmp_path)
    with tarfile.open(path) as tar:
        names = tar.getnames()
    assert names[:5] == ["00000.crc32.json", "00000.doc.json", "00000.hidden.npy", "00000.pos.npy", "00000.tokens.npy"]
    assert entry["bytes"] == path.stat().st_size and entry["samples"] == 4 and isinstance(entry["crc32"], int)
    shards.verify_shard_file(path, entry)
    read = list(shards.iter_hidden([path], "fp16", entries=[entry]))
    assert [s["key"] for s in read] == ["00000", "00001", "00002", "00003"]
    assert all("crc32.json" not in fields for _, fields in shards.iter_tar_samples(path))


def test_a_flipped_byte_in_a_hidden_member_names_file_sample_and_member(tmp_path):
    path, entry = hidden_shard(tmp_path)
    flip_member(path, "00002.hidden.npy")
    message = rf"{path.name}: sample '00002': member 00002.hidden.npy is corrupted .*delete {path.name} and rerun extract"
    with pytest.raises(shards.ShardError, match=message):
        list(shards.iter_hidden([path], "fp16"))
    with pytest.raises(shards.ShardError, match=message):  # build_dict's reader, starting mid-shard
        list(shards.iter_hidden_range(path, 1, 4, "fp16", shards.sample_offsets(path)))
    assert [s["key"] for s in shards.iter_hidden_range(path, 0, 2, "fp16")] == ["00000", "00001"]  # not read: no error
    with pytest.raises(shards.ShardError, match=rf"{path.name}: crc32 of the file is .*manifest entry says"):
        shards.verify_shard_file(path, entry)
    with pytest.raises(shards.ShardError, match="crc32 of the file"):
        next(shards.iter_hidden([path], "fp16", entries=[entry]))  # before any sample is handed out


def test_a_truncated_shard_or_an_entry_without_checksums_is_named(tmp_path):
    path, entry = hidden_shard(tmp_path)
    with pytest.raises(shards.ShardError, match=rf"{path.name}: its manifest entry has no \"bytes\" and \"crc32\""):
        shards.verify_shard_file(path, {"file": path.name, "samples": 4})
    path.write_bytes(path.read_bytes()[:-10240])
    with pytest.raises(shards.ShardError, match=rf"{path.name}: \d+ bytes, its manifest entry says {entry['bytes']}"):
        shards.verify_shard_file(path, entry)


def test_a_sample_without_its_checksum_member_is_refused(tmp_path):
    path = tmp_path / "hidden-r000-000000.tar"
    tar = shards.SampleTar(path)  # the tar alone: no checksum member, as a shard from before checksums
    tar.write("00000", shards.hidden_sample(np.zeros((2, 4), np.float16), np.arange(2), np.arange(2), {}))
    tar.close()
    with pytest.raises(shards.ShardError, match=rf"{path.name}: sample '00000' has no 00000.crc32.json"):
        list(shards.iter_hidden([path], "fp16"))


def test_a_manifest_dtype_that_does_not_fit_the_stored_states_is_named(tmp_path):
    path, _ = hidden_shard(tmp_path, dtype="fp16")
    with pytest.raises(shards.ShardError, match=rf"{path.name}: sample '00000': hidden.npy holds float16, but the "
                                                r"manifest's dtype bf16 is stored as uint16"):
        list(shards.iter_hidden([path], "bf16"))


def labels_shard(directory):
    writer = shards.RankShardWriter(directory, "labels", 0, max_samples=100)
    for i in range(3):
        writer.write(f"{i:010d}_00000", {"input_ids.npy": shards.npy_bytes(np.arange(6, dtype=np.int32)),
                                         "senses.npy": shards.npy_bytes(np.full(6, i, np.int16)),
                                         "teacher.npy": shards.npy_bytes(np.ones((6, 4), np.float16))})
    writer.close()
    return directory / writer.written[0]["file"]


def test_a_flipped_byte_in_a_labels_member_names_file_sample_and_member(tmp_path):
    path = labels_shard(tmp_path)
    keys = labels.shard_keys(path)
    assert labels.read_samples(path, set(keys))[keys[1]]["senses"].tolist() == [1] * 6
    flip_member(path, f"{keys[1]}.teacher.npy")
    index = labels.shard_index(path)
    with pytest.raises(shards.ShardError, match=rf"{path.name}: sample '{keys[1]}': member {keys[1]}.teacher.npy is "
                                                rf"corrupted .*rerun label"):
        labels.read_samples(path, {keys[1]})
    read = labels.read_indexed(path, index, {keys[1]}, skip=("teacher",))  # a field not read is not checked
    assert read[keys[1]]["senses"].tolist() == [1] * 6


def test_a_labels_sample_without_its_checksum_member_is_refused_when_indexed(tmp_path):
    path = tmp_path / "labels-r000-000000.tar"
    tar = shards.SampleTar(path)
    tar.write("0000000001_00000", {"input_ids.npy": shards.npy_bytes(np.arange(3)), "senses.npy": shards.npy_bytes(
        np.zeros(3, np.int16))})
    tar.close()
    with pytest.raises(shards.ShardError, match=rf"{path.name}: sample '0000000001_00000' has no .*crc32.json"):
        labels.shard_index(path)


def saved_dictionary(directory):
    from test_dictionary import small_dictionary

    return small_dictionary().save(directory, tokens_per_shard=3)


def tensor_start(path, name: str) -> int:
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    return 8 + header_len + header[name]["data_offsets"][0]


def test_dictionary_index_entries_carry_checksums_and_builds_are_byte_identical(tmp_path):
    first, second = saved_dictionary(tmp_path / "a"), saved_dictionary(tmp_path / "b")
    for name in sorted(p.name for p in first.iterdir()):
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    entry = json.loads((first / "index.json").read_text())["shards"][0]
    assert entry["bytes"] == (first / entry["file"]).stat().st_size and isinstance(entry["crc32"], int)
    assert sorted(entry["tensor_crc32"]) == ["centroids", "counts", "offsets", "token_ids"]
    assert entry["examples"] == examples_name(0) and isinstance(entry["examples_crc32"], int)
    assert SenseDictionary.load(first).examples(7) == [["the [[bank]] of the river"]]


def test_a_flipped_byte_in_a_dictionary_tensor_names_file_and_tensor(tmp_path):
    directory = saved_dictionary(tmp_path / "dict")
    path = directory / shard_name(0)
    flip_byte(path, tensor_start(path, "centroids") + 5)
    with pytest.raises(DictionaryError, match=rf"{path.name}: tensor 'centroids' is corrupted .*rerun build_dict"):
        read_shard(path)
    with pytest.raises(DictionaryError, match=rf"{path.name}: tensor 'centroids' is corrupted"):
        SenseDictionary.load(directory)


def test_a_dictionary_shard_that_does_not_fit_its_index_entry_is_named(tmp_path):
    directory = saved_dictionary(tmp_path / "dict")
    entries = json.loads((directory / "index.json").read_text())["shards"]
    testing.edit_manifest(directory / "index.json", {"shards": [{**entries[0], "crc32": 1}, entries[1]]})
    with pytest.raises(DictionaryError, match=rf"{shard_name(0)}: \d+ bytes of crc32 \d+, but its index.json entry "
                                              r"says \d+ bytes of crc32 1: .*rerun build_dict"):
        SenseDictionary.load(directory)


def test_a_flipped_byte_in_the_examples_file_names_it_when_examples_are_read(tmp_path):
    directory = saved_dictionary(tmp_path / "dict")
    examples = directory / examples_name(0)
    examples.write_text(examples.read_text().replace("bank", "bonk"))
    loaded = SenseDictionary.load(directory)  # examples are read on demand
    assert loaded.senses(7).shape == (1, 6)
    with pytest.raises(DictionaryError, match=rf"{examples.name}: crc32 .*{shard_name(0)} records .*rerun build_dict"):
        loaded.examples(7)


def test_a_manifest_edited_by_hand_is_refused_and_edit_manifest_keeps_it_valid(tmp_path):
    manifest.write_manifest(tmp_path, "dist_sense.test", 1, {"dtype": "fp16", "shards": [{"file": "a"}, {"file": "b"}]})
    path = tmp_path / "manifest.json"
    data = manifest.read_manifest(tmp_path, "dist_sense.test", 1)
    assert data["dtype"] == "fp16" and data[manifest.CHECKSUM_KEY] == manifest.content_checksum(data)
    path.write_text(path.read_text().replace('"fp16"', '"bf16"'))
    with pytest.raises(manifest.ManifestError, match=r"manifest.json: edited or damaged after it was written .*rerun "
                                                     r"extract"):
        manifest.read_manifest(tmp_path, "dist_sense.test", 1, stage_hint="extract")
    testing.edit_manifest(path, lambda old: {**old, "shards": old["shards"][:1]})
    assert manifest.read_manifest(tmp_path, "dist_sense.test", 1)["shards"] == [{"file": "a"}]
    manifest.atomic_write_json(path, {**json.loads(path.read_text()), "shards": []})  # the list cut by hand
    with pytest.raises(manifest.ManifestError, match="edited or damaged"):
        manifest.read_manifest(tmp_path, "dist_sense.test", 1)


def test_build_dict_names_the_sample_of_a_flipped_byte(tmp_path):
    hidden_dir = make_hidden_dir(tmp_path)
    victim = sorted(hidden_dir.glob("hidden-*.tar"))[1]
    with tarfile.open(victim) as tar:
        key = tar.getnames()[-1].partition(".")[0]
    flip_member(victim, f"{key}.hidden.npy")
    with pytest.raises(shards.ShardError, match=rf"{victim.name}: sample '{key}': member {key}.hidden.npy is corrupted"):
        build_dict.run(make_config(tmp_path))
