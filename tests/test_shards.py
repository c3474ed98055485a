"""The shard tar writer against webdataset's, byte for byte, and read back by tarfile and webdataset."""
import io
import tarfile

import numpy as np
import pytest
import webdataset as wds

from dist_sense.formats import shards


def samples():
    rng = np.random.default_rng(0)
    for i in range(7):
        n = int(rng.integers(0, 5))
        yield f"{i:010d}_{i % 3:05d}", shards.hidden_sample(
            rng.normal(size=(n, 3)).astype(np.float16), rng.integers(0, 99, n), np.arange(n), {"doc": i, "text": "é" * i})


def test_sample_tar_writes_the_bytes_webdataset_writes(tmp_path):
    ours = tmp_path / "ours.tar"
    tar = shards.SampleTar(ours)
    reference = io.BytesIO()
    theirs = wds.TarWriter(reference, encoder=False, mtime=0)
    for key, fields in samples():
        tar.write(key, fields)
        theirs.write({"__key__": key, **fields})
    tar.close()
    theirs.close()
    assert ours.read_bytes() == reference.getvalue()


def test_sample_tar_reads_back_with_tarfile_and_webdataset(tmp_path):
    path = tmp_path / "s.tar"
    tar = shards.SampleTar(path)
    written = dict(samples())
    for key, fields in written.items():
        tar.write(key, fields)
    tar.close()
    with tarfile.open(path) as archive:
        names = archive.getnames()
    assert names == [f"{key}.{ext}" for key, fields in written.items() for ext in sorted(fields)]
    read = {s["__key__"]: s for s in wds.WebDataset(str(path), shardshuffle=False, empty_check=False)}
    assert set(read) == set(written)
    for key, fields in written.items():
        assert all(read[key][ext] == data for ext, data in fields.items())


def test_member_names_longer_than_ustar_allows_are_refused():
    with pytest.raises(ValueError, match="longer than 100 bytes"):
        shards.ustar_header("x" * 101, 3)
