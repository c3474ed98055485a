"""Webdataset shards of the hidden/ and labels/ stages: one sample per sequence.

A hidden/ sample holds the occurrences kept from one window of one document:
  tokens.npy  int32 [n]       token ids of the kept occurrences
  hidden.npy  [n, d]          their hidden states (fp16, fp32, or bf16 stored as uint16 bits)
  pos.npy     int32 [n]       their positions in the window's input ids
  doc.json    {"doc", "window", "start", "text", "spans"}: document id, window number,
              first token's offset in the document, the window text and the
              character span of each kept occurrence in it (for example contexts)
Shard files are named PREFIX-rRRR-NNNNNN.tar; each is written to a temporary name and
renamed when closed, so a shard that exists is complete.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
from pathlib import Path
from typing import Iterator

import numpy as np

HIDDEN_FORMAT = "dist_sense.hidden"
HIDDEN_VERSION = 1


class ShardError(RuntimeError):
    """A truncated or corrupted shard; the message names the file and sample."""


def encode_hidden(array: np.ndarray, dtype: str) -> np.ndarray:
    """Cast float states for storage; bf16 keeps the top 16 bits of fp32 (round to nearest even)."""
    if dtype == "fp32":
        return np.ascontiguousarray(array, dtype=np.float32)
    if dtype == "fp16":
        return np.ascontiguousarray(array, dtype=np.float16)
    if dtype == "bf16":
        bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32)
        rounded = bits + 0x7FFF + ((bits >> 16) & 1)
        return (rounded >> 16).astype(np.uint16)
    raise ValueError(f"unknown hidden dtype {dtype!r}: use fp32, fp16 or bf16")


def decode_hidden(array: np.ndarray, dtype: str) -> np.ndarray:
    """Stored states back to float32."""
    if dtype == "bf16":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def hidden_sample(encoded: np.ndarray, tokens: np.ndarray, pos: np.ndarray, doc: dict) -> dict[str, bytes]:
    """The four members of one hidden/ sample (see the module docstring); `encoded` from encode_hidden."""
    return {"tokens.npy": npy_bytes(tokens.astype(np.int32)), "hidden.npy": npy_bytes(encoded),
            "pos.npy": npy_bytes(pos.astype(np.int32)), "doc.json": json.dumps(doc).encode()}


TAR_BLOCK, TAR_RECORD = 512, 10240
_TAR_OWNER = b"bigdata".ljust(32, b"\0")  # webdataset.TarWriter's default user and group
# Typeflag "0" (regular file), empty link name, ustar magic and version, owner, group, empty
# device numbers and prefix, padding: the same for every member.
_TAR_HEADER_TAIL = b"0" + b"\0" * 100 + b"ustar\x0000" + _TAR_OWNER * 2 + b"\0" * (8 + 8 + 155 + 12)
_TAR_TAIL_SUM = sum(_TAR_HEADER_TAIL) + 8 * ord(" ")  # the checksum field counts as 8 spaces


def ustar_header(name: str, size: int) -> bytes:
    """The 512-byte ustar header of a regular file: mode 0444, uid/gid 0, mtime 0."""
    raw = name.encode()
    if len(raw) > 100:
        raise ValueError(f"tar member name {name!r} is longer than 100 bytes")
    head = raw.ljust(100, b"\0") + b"0000444\0" + b"0000000\0" * 2 + b"%011o\0" % size + b"00000000000\0"
    return head + b"%06o\0 " % (sum(head) + _TAR_TAIL_SUM) + _TAR_HEADER_TAIL


class SampleTar:
    """A tar of webdataset samples (members `key.ext`, a sample's members together, exts sorted).

    Writes the bytes webdataset.TarWriter(mtime=0) writes (tests/test_shards.py compares them),
    building each ustar header directly: tarfile's per-member machinery cost about 140 us a
    four-member sample, more than a third of the extract sink's CPU time in the benchmark.
    """

    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "wb")
        self._size = 0

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(fields):
            data = fields[ext]
            parts += [ustar_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % TAR_BLOCK)]
        blob = b"".join(parts)
        self._file.write(blob)
        self._size += len(blob)

    def close(self) -> None:
        """End-of-archive (two zero blocks), padded to a whole record as tarfile does."""
        end = 2 * TAR_BLOCK
        self._file.write(b"\0" * (end + -(self._size + end) % TAR_RECORD))
        self._file.close()


def shard_name(prefix: str, rank: int, index: int) -> str:
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


class RankShardWriter:
    """Writes one rank's samples into numbered tar shards of `max_samples` each.

    Each shard is a `SampleTar` (webdataset's tar layout) on a temporary name, renamed into
    place when closed (webdataset's ShardWriter writes the final name from the start), and
    numbering starts at `first_index`, which is what resume needs.
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, rank: int, max_samples: int, first_index: int = 0,
                 close_when_full: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.rank, self.max_samples = prefix, rank, max_samples
        # Off: the caller closes at a boundary of its own (a batch), so resume points align with it.
        self.close_when_full = close_when_full
        self.index = first_index
        self.written: list[dict] = []  # {"file", "samples", "keys": [first, last]} per closed shard
        self._tar = None
        self._tmp = None
        self._count = 0
        self._keys: list[str] = []

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        self._tar.write(key, fields)
        self._count += 1
        self._keys.append(key)
        if self.close_when_full and self.full:
            self.close_shard()

    @property
    def full(self) -> bool:
        return self._tar is not None and self._count >= self.max_samples

    def _open(self) -> None:
        final = self.directory / shard_name(self.prefix, self.rank, self.index)
        self._tmp = final.with_name("." + final.name + ".partial")
        self._tar = SampleTar(self._tmp)
        self._count, self._keys = 0, []

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        final = self.directory / shard_name(self.prefix, self.rank, self.index)
        with open(self._tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(self._tmp, final)
        self.written.append({"file": final.name, "samples": self._count, "keys": [self._keys[0], self._keys[-1]]})
        self._tar, self.index = None, self.index + 1

    def close(self) -> None:
        self.close_shard()


def sample_offsets(path: str | os.PathLike) -> list[int]:
    """Byte offset of each sample's first member header in a tar shard, from the headers alone.

    Walks the headers through a memory map (about 1 us a member: no seek or read calls;
    tarfile's member parsing costs ~35 us), so a reader can start mid-shard. Members other
    than regular files (pax or GNU long-name headers, directories), which SampleTar never
    writes, send it to tarfile's own scan.
    """
    offsets, key, at = [], None, 0
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < TAR_BLOCK:
            return offsets  # empty or truncated: the reader reports it
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            end = len(data)
            while at + TAR_BLOCK <= end:
                header = data[at : at + TAR_BLOCK]
                if header[0] == 0:
                    break  # end-of-archive
                if header[156:157] not in (b"0", b"\0") or header[345] != 0:
                    return _tarfile_sample_offsets(Path(path))
                try:
                    size = int(header[124:136].strip(b"\0 ") or b"0", 8)
                except ValueError:
                    raise ShardError(f"{path}: corrupted tar header at byte {at}; delete the shard and rerun the stage") from None
                base = header[:100].split(b"\0", 1)[0].partition(b".")[0]
                if base != key:
                    offsets.append(at)
                    key = base
                at += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK
    return offsets


def _tarfile_sample_offsets(path: Path) -> list[int]:
    offsets, key = [], None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                base = member.name.partition(".")[0]
                if member.isfile() and base != key:
                    offsets.append(member.offset)
                    key = base
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: truncated or corrupted shard ({err}); delete it and rerun the stage") from None
    return offsets


def iter_tar_samples(path: str | os.PathLike, start: int = 0, stop: int | None = None,
                     offsets: list[int] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for samples start..stop-1 of one tar shard, in order; ShardError on damage.

    With `offsets` (sample_offsets of the shard) reading starts at sample `start`'s header;
    without, earlier samples are walked past by tarfile, their data never read.
    """
    path = Path(path)
    key, fields, number, at = None, {}, 0, 0  # number: the sample index of `key`
    if offsets is not None and start > 0:
        if start >= len(offsets):
            return  # past the shard's end: the caller's count check names it
        number, at = start, offsets[start]
    try:
        with open(path, "rb") as raw:
            raw.seek(at)
            with tarfile.open(fileobj=raw, mode="r:") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    base, _, ext = member.name.partition(".")
                    if key is not None and base != key:
                        if number >= start:
                            yield key, fields
                        fields, number = {}, number + 1
                        if stop is not None and number >= stop:
                            return
                    key = base
                    if number >= start:
                        fields[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: truncated or corrupted shard after sample {key!r} ({err}); delete it and rerun the stage") from None
    if key is not None and number >= start:
        yield key, fields


def _load_npy(path: Path, key: str, fields: dict[str, bytes], name: str) -> np.ndarray:
    if name not in fields:
        raise ShardError(f"{path}: sample {key!r} has no {name} (has {', '.join(sorted(fields))})")
    try:
        return np.load(io.BytesIO(fields[name]), allow_pickle=False)
    except Exception as err:
        raise ShardError(f"{path}: sample {key!r}: {name} is not a valid .npy ({err})") from None


def read_hidden_sample(path: Path, key: str, fields: dict[str, bytes], dtype: str) -> dict:
    """Decode one hidden/ sample into float32 arrays, checking shapes agree."""
    tokens = _load_npy(path, key, fields, "tokens.npy")
    hidden = decode_hidden(_load_npy(path, key, fields, "hidden.npy"), dtype)
    pos = _load_npy(path, key, fields, "pos.npy")
    if hidden.ndim != 2 or tokens.shape[0] != hidden.shape[0] or pos.shape[0] != tokens.shape[0]:
        raise ShardError(f"{path}: sample {key!r}: tokens {tokens.shape}, hidden {hidden.shape}, pos {pos.shape} disagree")
    try:
        doc = json.loads(fields.get("doc.json", b"{}"))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: sample {key!r}: doc.json is not valid JSON ({err})") from None
    return {"key": key, "tokens": tokens.astype(np.int64), "hidden": hidden, "pos": pos, "doc": doc}


def iter_hidden(paths, dtype: str) -> Iterator[dict]:
    """Every hidden/ sample of `paths`, decoded (see read_hidden_sample)."""
    for path in paths:
        for key, fields in iter_tar_samples(path):
            yield read_hidden_sample(Path(path), key, fields, dtype)


def iter_hidden_range(path: Path, start: int, stop: int, dtype: str, offsets: list[int] | None = None) -> Iterator[dict]:
    """Samples start..stop-1 of one hidden/ shard, decoded; ShardError if the shard holds fewer.

    `offsets`: the shard's sample_offsets, to start mid-shard without walking the samples before."""
    seen = start
    for key, fields in iter_tar_samples(path, start, stop, offsets):
        yield read_hidden_sample(Path(path), key, fields, dtype)
        seen += 1
    if seen < stop:
        raise ShardError(f"{path}: holds {seen} samples, the manifest says at least {stop}; "
                         "the shard is truncated: delete it and rerun the extract stage")
