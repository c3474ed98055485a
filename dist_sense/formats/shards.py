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

Checksums: each sample (hidden/ or labels/) also holds `crc32.json`, the zlib.crc32 of each other
member ({ext: crc}); readers check every member they read against it, so a flipped byte is an error
naming the sample, not a wrong number. A shard's manifest entry records its size ("bytes") and
whole-file crc32 ("crc32"), summed while writing; verify_shard_file checks both.
"""
from __future__ import annotations

import io
import json
import mmap
import os
import tarfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np

HIDDEN_FORMAT = "dist_sense.hidden"
HIDDEN_VERSION = 1
STORED_DTYPES = {"fp16": np.float16, "bf16": np.uint16, "fp32": np.float32}  # encode_hidden's hidden.npy dtypes
CHECKSUM_EXT = "crc32.json"
"""The member holding {ext: zlib.crc32} of the other members of its sample; it sorts before them."""
CHECKSUMS = True
"""Whether writers add checksums and readers check them: off only in bench/checksum_cost.py, to measure them."""


class ShardError(RuntimeError):
    """A truncated or corrupted shard; the message names the file and sample."""


def rerun_hint(path: str | os.PathLike) -> str:
    """The way on after a damaged shard: delete it and rerun the stage its name prefix says wrote it."""
    name = Path(path).name
    return f"delete {name} and rerun " + {"hidden": "extract", "labels": "label"}.get(name.split("-")[0], "its stage")


def member_checksums(fields: dict[str, bytes]) -> bytes:
    """The checksum member of a sample with `fields`: {ext: zlib.crc32 of its bytes}, as sorted JSON."""
    return json.dumps({ext: zlib.crc32(data) for ext, data in fields.items()}, sort_keys=True).encode()


def parse_checksums(path, key: str, raw: bytes | None) -> dict[str, int]:
    """{ext: crc32} of sample `key` from its checksum member's bytes; ShardError if absent or damaged."""
    if raw is None:
        raise ShardError(f"{path}: sample {key!r} has no {key}.{CHECKSUM_EXT} (its members' checksums): the shard "
                         f"was written before shards carried checksums, or is damaged; {rerun_hint(path)}")
    try:
        sums = json.loads(raw)
    except ValueError:  # UnicodeDecodeError and JSONDecodeError both are
        sums = None
    if not isinstance(sums, dict):  # a value that is no int fails its member's check
        raise ShardError(f"{path}: sample {key!r}: {key}.{CHECKSUM_EXT} is damaged (not a {{member: crc32}} JSON "
                         f"object); {rerun_hint(path)}")
    return sums


def check_member(path, key: str, ext: str, data: bytes, expected: int | None) -> None:
    """ShardError naming the file, sample and member unless crc32(data) is `expected`."""
    if expected is None:
        raise ShardError(f"{path}: sample {key!r}: member {key}.{ext} has no checksum in {key}.{CHECKSUM_EXT}; "
                         f"{rerun_hint(path)}")
    found = zlib.crc32(data)
    if found != expected:
        written = f"{expected:08x}" if type(expected) is int else repr(expected)
        raise ShardError(f"{path}: sample {key!r}: member {key}.{ext} is corrupted (crc32 {found:08x}, written as "
                         f"{written}); {rerun_hint(path)}")


def verified_fields(path, key: str, fields: dict[str, bytes]) -> dict[str, bytes]:
    """`fields` less the checksum member, every member checked against it (and none it lists missing)."""
    raw = fields.pop(CHECKSUM_EXT, None)
    if not CHECKSUMS:
        return fields
    sums = parse_checksums(path, key, raw)
    for ext, data in fields.items():
        if zlib.crc32(data) != sums.get(ext):  # inline: the function call is a third of a small member's check
            check_member(path, key, ext, data, sums.get(ext))
    missing = sorted(set(sums) - set(fields)) if len(sums) != len(fields) else []
    if missing:
        raise ShardError(f"{path}: sample {key!r} lacks {key}.{missing[0]}, which {key}.{CHECKSUM_EXT} lists; "
                         f"{rerun_hint(path)}")
    return fields


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
        self.size, self.crc = 0, 0 if CHECKSUMS else None  # crc32 of the bytes so far: the file's, once closed

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        parts = []
        for ext in sorted(fields):
            data = fields[ext]
            parts += [ustar_header(f"{key}.{ext}", len(data)), data, b"\0" * (-len(data) % TAR_BLOCK)]
        self._write(b"".join(parts))

    def _write(self, blob: bytes) -> None:
        self._file.write(blob)
        self.size += len(blob)
        if self.crc is not None:
            self.crc = zlib.crc32(blob, self.crc)

    def close(self) -> None:
        """End-of-archive (two zero blocks), padded to a whole record as tarfile does."""
        end = 2 * TAR_BLOCK
        self._write(b"\0" * (end + -(self.size + end) % TAR_RECORD))
        self._file.close()


def shard_name(prefix: str, rank: int, index: int) -> str:
    return f"{prefix}-r{rank:03d}-{index:06d}.tar"


class RankShardWriter:
    """Writes one rank's samples into numbered tar shards of `max_samples` each.

    Each shard is a `SampleTar` (webdataset's tar layout) on a temporary name, renamed into
    place when closed (webdataset's ShardWriter writes the final name from the start), and
    numbering starts at `first_index`, which is what resume needs. Each sample gets its
    checksum member here (SampleTar writes the members it is given, as webdataset does).
    """

    def __init__(self, directory: str | os.PathLike, prefix: str, rank: int, max_samples: int, first_index: int = 0,
                 close_when_full: bool = True):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix, self.rank, self.max_samples = prefix, rank, max_samples
        # Off: the caller closes at a boundary of its own (a batch), so resume points align with it.
        self.close_when_full = close_when_full
        self.index = first_index
        self.written: list[dict] = []  # manifest entry per closed shard: file, samples, keys, bytes, crc32
        self._tar = None
        self._tmp = None
        self._count = 0
        self._keys: list[str] = []

    def write(self, key: str, fields: dict[str, bytes]) -> None:
        if self._tar is None:
            self._open()
        if CHECKSUMS:
            fields = {**fields, CHECKSUM_EXT: member_checksums(fields)}
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
        self.written.append({"file": final.name, "samples": self._count, "keys": [self._keys[0], self._keys[-1]],
                             "bytes": self._tar.size, "crc32": self._tar.crc})
        self._tar, self.index = None, self.index + 1

    def close(self) -> None:
        self.close_shard()


def verify_shard_file(path: str | os.PathLike, entry: dict) -> None:
    """Stream the whole shard and check its size and crc32 against its manifest entry; ShardError naming it."""
    path = Path(path)
    if type(entry.get("bytes")) is not int or type(entry.get("crc32")) is not int:
        raise ShardError(f"{path}: its manifest entry has no \"bytes\" and \"crc32\" (written before shards "
                         f"carried checksums); {rerun_hint(path)}")
    crc = 0
    try:
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ShardError(f"{path}: {size} bytes, its manifest entry says {entry['bytes']}: the shard is truncated "
                             f"or was replaced; {rerun_hint(path)}")
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                crc = zlib.crc32(block, crc)
    except OSError as err:
        raise ShardError(f"{path}: cannot be read ({err}); {rerun_hint(path)}") from None
    if crc != entry["crc32"]:
        raise ShardError(f"{path}: crc32 of the file is {crc:08x}, its manifest entry says {entry['crc32']:08x}: "
                         f"the shard is corrupted; {rerun_hint(path)}")


def walk_members(path, data, at: int = 0) -> Iterator[tuple[int, str, int]]:
    """(header offset, name, size) of each member of a memory-mapped shard from byte `at` to its end:
    ~0.4 us a member (tarfile: ~20 us). Header checksums are not summed (1.8 us each): the member
    crc32s cover what a damaged name or size changes, the file's crc32 the rest."""
    while True:
        header = data[at : at + TAR_BLOCK]
        if len(header) < TAR_BLOCK:
            raise ShardError(f"{path}: truncated at byte {at} (no end-of-archive); {rerun_hint(path)}")
        if header[0] == 0:
            return  # end-of-archive
        if header[156:157] not in (b"0", b"\0") or header[345] != 0 or header[257:262] != b"ustar":
            raise ShardError(f"{path}: the member at byte {at} is not a plain ustar file (pax or GNU header, "
                             f"directory), which SampleTar never writes; {rerun_hint(path)}")
        try:
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
        except ValueError:
            raise ShardError(f"{path}: corrupted tar header at byte {at}; {rerun_hint(path)}") from None
        yield at, header[:100].split(b"\0", 1)[0].decode(errors="replace"), size
        at += TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_offsets(path: str | os.PathLike) -> list[int]:
    """Byte offset of each sample's first member header in a tar shard, from the headers alone
    (walk_members), so a reader can start mid-shard."""
    offsets, key = [], None
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size < TAR_BLOCK:
            return offsets  # empty or truncated: the reader reports it
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for at, name, _ in walk_members(path, data):
                if name.partition(".")[0] != key:
                    offsets.append(at)
                    key = name.partition(".")[0]
    return offsets


def _tarfile_sample_offsets(path: Path) -> list[int]:
    """sample_offsets as tarfile sees the shard: the reference the fast walk is tested against."""
    offsets, key = [], None
    try:
        with tarfile.open(path, "r") as tar:
            for member in tar:
                base = member.name.partition(".")[0]
                if member.isfile() and base != key:
                    offsets.append(member.offset)
                    key = base
    except (tarfile.TarError, EOFError, OSError) as err:
        raise ShardError(f"{path}: truncated or corrupted shard ({err}); {rerun_hint(path)}") from None
    return offsets


def iter_tar_samples(path: str | os.PathLike, start: int = 0, stop: int | None = None,
                     offsets: list[int] | None = None) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for samples start..stop-1 of one tar shard, in order; ShardError on damage.

    Each sample's members are checked against its checksum member, which is not yielded.
    With `offsets` (sample_offsets of the shard) reading starts at sample `start`'s header;
    without, the headers of earlier samples are walked past, their data never read.
    """
    path = Path(path)
    key, fields, number, at = None, {}, 0, 0  # number: the sample index of `key`
    if offsets is not None and start > 0:
        if start >= len(offsets):
            return  # past the shard's end: the caller's count check names it
        number, at = start, offsets[start]
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            for header, name, size in walk_members(path, data, at):
                base, _, ext = name.partition(".")
                if key is not None and base != key:
                    if number >= start:
                        yield key, verified_fields(path, key, fields)
                    fields, number = {}, number + 1
                    if stop is not None and number >= stop:
                        return
                key = base
                if number >= start:
                    fields[ext] = data[header + TAR_BLOCK : header + TAR_BLOCK + size]  # cut short: no next header
    except (OSError, ValueError) as err:  # ValueError: an empty file cannot be mapped
        raise ShardError(f"{path}: truncated or corrupted shard after sample {key!r} ({err}); {rerun_hint(path)}") from None
    if key is not None and number >= start:
        yield key, verified_fields(path, key, fields)


def _load_npy(path: Path, key: str, fields: dict[str, bytes], name: str) -> np.ndarray:
    if name not in fields:
        raise ShardError(f"{path}: sample {key!r} has no {name} (has {', '.join(sorted(fields))})")
    try:
        return np.load(io.BytesIO(fields[name]), allow_pickle=False)
    except Exception as err:
        raise ShardError(f"{path}: sample {key!r}: {name} is not a valid .npy ({err})") from None


def read_hidden_sample(path: Path, key: str, fields: dict[str, bytes], dtype: str) -> dict:
    """Decode one hidden/ sample into float32 arrays, checking shapes agree and hidden.npy is stored as `dtype`."""
    tokens = _load_npy(path, key, fields, "tokens.npy")
    stored = _load_npy(path, key, fields, "hidden.npy")
    if dtype not in STORED_DTYPES:
        raise ShardError(f"{path}: the manifest's dtype {dtype!r} is not one of {', '.join(STORED_DTYPES)}")
    if stored.dtype != np.dtype(STORED_DTYPES[dtype]):
        raise ShardError(f"{path}: sample {key!r}: hidden.npy holds {stored.dtype}, but the manifest's dtype {dtype} is "
                         f"stored as {np.dtype(STORED_DTYPES[dtype])}: the manifest does not describe this shard; "
                         f"rerun extract")
    hidden = decode_hidden(stored, dtype)
    pos = _load_npy(path, key, fields, "pos.npy")
    if hidden.ndim != 2 or tokens.shape[0] != hidden.shape[0] or pos.shape[0] != tokens.shape[0]:
        raise ShardError(f"{path}: sample {key!r}: tokens {tokens.shape}, hidden {hidden.shape}, pos {pos.shape} disagree")
    try:
        doc = json.loads(fields.get("doc.json", b"{}"))
    except json.JSONDecodeError as err:
        raise ShardError(f"{path}: sample {key!r}: doc.json is not valid JSON ({err})") from None
    return {"key": key, "tokens": tokens.astype(np.int64), "hidden": hidden, "pos": pos, "doc": doc}


def iter_hidden(paths, dtype: str, entries: list[dict] | None = None) -> Iterator[dict]:
    """Every hidden/ sample of `paths`, decoded (see read_hidden_sample); with `entries` (their manifest
    entries, in order) each whole file's size and crc32 is checked first, one more read of it."""
    for number, path in enumerate(paths):
        if entries is not None and CHECKSUMS:
            verify_shard_file(path, entries[number])  # first: no sample of a damaged file is handed out
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
