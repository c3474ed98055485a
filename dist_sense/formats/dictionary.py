"""The sense dictionary: per-token sense centroids, sharded, memory-mapped, vectorised lookups.

On disk (RUN/dictionary/):
  senses-NNNNN.safetensors   CSR over the shard's tokens: token_ids int64 [T] (ascending),
                             offsets int64 [T+1], centroids [S, d] (fp32 or fp16), counts int64 [S];
                             token_ids[i]'s senses are rows offsets[i]:offsets[i+1], most frequent first
  senses-NNNNN.examples.json per sense, a few contexts nearest its centre (window text, occurrence in [[ ]])
  index.json                 format, version, teacher and tokenizer fingerprints, layer, d, dtype,
                             k policy, k-means settings, the shard list with token ranges, totals
Shard files are written to a temporary name and renamed; index.json is written last.
Checksums: a shard's header records the crc32 of each tensor ("crc32") and of its examples file
("examples_crc32"); its index.json entry copies them ("tensor_crc32", "examples_crc32") beside the
file's size and crc32 ("bytes", "crc32"). Every read checks the tensors; load checks the rest.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import numpy as np

from dist_sense.formats import manifest
from dist_sense.runtime.backend import name as backend_name
from dist_sense.runtime.backend import to_device, to_host

DICT_FORMAT = "dist_sense.dictionary"
DICT_VERSION = 1
INDEX_NAME = "index.json"
ARRAYS = ("token_ids", "offsets", "centroids", "counts")
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32}
_CENTROID_DTYPES = {"fp32": np.float32, "fp16": np.float16}


class DictionaryError(RuntimeError):
    """A missing, damaged or mismatched dictionary file; the message names it."""


def shard_name(index: int) -> str:
    return f"senses-{index:05d}.safetensors"


def examples_name(index: int) -> str:
    return f"senses-{index:05d}.examples.json"


def write_shard(directory, index: int, arrays: dict, examples: dict | None = None, info: dict | None = None) -> Path:
    """Write one CSR shard (and its examples first), each atomically; returns the shard path.

    `info` (JSON-able) is kept in the safetensors header, so a shard describes itself
    (resume checks and index.json are built from it).
    """
    from safetensors.numpy import save

    directory = Path(directory)
    meta = {"format": DICT_FORMAT, "shard": str(index), "info": json.dumps(info or {}, sort_keys=True)}
    if examples is not None:
        body = {"format": DICT_FORMAT + ".examples", "tokens": {str(t): ex for t, ex in examples.items()}}
        data = json.dumps(body, ensure_ascii=False).encode()
        manifest.atomic_write_bytes(directory / examples_name(index), data)
        meta["examples_crc32"] = str(zlib.crc32(data))
    tensors = {key: np.ascontiguousarray(arrays[key]) for key in ARRAYS}
    meta["crc32"] = json.dumps({key: zlib.crc32(t.reshape(-1).view(np.uint8)) for key, t in tensors.items()},
                               sort_keys=True)
    return manifest.atomic_write_bytes(directory / shard_name(index), _canonical_header(save(tensors, metadata=meta)))


def _canonical_header(blob: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted.

    safetensors writes metadata in hash-map order, which changes between processes; the
    same tile must give the same bytes (a resumed run is compared byte for byte).
    """
    import struct

    length = struct.unpack("<Q", blob[:8])[0]
    header = json.dumps(json.loads(blob[8 : 8 + length]), separators=(",", ":"), sort_keys=True).encode()
    header += b" " * (-len(header) % 8)  # safetensors keeps the data 8-byte aligned
    return struct.pack("<Q", len(header)) + header + blob[8 + length :]


def read_shard(path, mmap: bool = True, entry: dict | None = None) -> tuple[dict, dict]:
    """(arrays, info) of one shard, every tensor checked against the crc32 its header records, with `entry` (its
    index.json entry) the file's size and crc32 too; arrays are numpy memory maps of the file when `mmap`."""
    arrays, info, _ = _read_checked(Path(path), mmap, entry)
    return arrays, info


def _read_checked(path: Path, mmap: bool, entry: dict | None) -> tuple[dict, dict, dict]:
    """read_shard's work, plus the shard's checksums: {"bytes", "crc32", "tensor_crc32"[, "examples_crc32"]}."""
    if not path.is_file():
        raise DictionaryError(f"{path}: dictionary shard is missing (rerun build_dict)")
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            if header_len <= 0 or 8 + header_len > size:
                raise ValueError(f"header length {header_len} does not fit a {size}-byte file")
            header = json.loads(f.read(header_len))
        meta = header.pop("__metadata__", {}) or {}
        if meta.get("format") != DICT_FORMAT:
            raise ValueError(f"format is {meta.get('format')!r}, expected {DICT_FORMAT!r}")
        arrays = {key: _map_tensor(path, header[key], 8 + header_len, size, mmap) for key in ARRAYS}
        info = json.loads(meta.get("info", "{}"))
        recorded = json.loads(meta.get("crc32", "{}"))
        examples = {"examples_crc32": int(meta["examples_crc32"])} if "examples_crc32" in meta else {}
    except (ValueError, KeyError, TypeError, OSError) as err:
        raise DictionaryError(f"{path}: not a readable dictionary shard ({err}); delete it and rerun build_dict") from None
    if sorted(recorded) != sorted(ARRAYS) or not all(type(crc) is int for crc in recorded.values()):
        raise DictionaryError(f"{path}: its header records no tensor checksums (written before shards carried them?); "
                              "delete it and rerun build_dict")
    spans = {key: [8 + header_len + at for at in header[key]["data_offsets"]] for key in ARRAYS}
    whole, found = _stream_crcs(path, spans)
    for key in ARRAYS:
        if found[key] != recorded[key]:
            raise DictionaryError(f"{path}: tensor {key!r} is corrupted (crc32 {found[key]:08x}, its header records "
                                  f"{recorded[key]:08x}); delete it and rerun build_dict")
    if entry is not None and (entry.get("bytes"), entry.get("crc32")) != (size, whole):
        raise DictionaryError(f"{path}: {size} bytes of crc32 {whole}, but its {INDEX_NAME} entry says {entry.get('bytes')}"
                              f" bytes of crc32 {entry.get('crc32')}: the file is truncated, damaged or from another "
                              "build; delete it and rerun build_dict")
    _check_csr(path, arrays)
    return arrays, info, {"bytes": size, "crc32": whole, "tensor_crc32": recorded, **examples}


def _stream_crcs(path: Path, spans: dict[str, list[int]]) -> tuple[int, dict[str, int]]:
    """crc32 of the whole file and of each byte span [start, end), in one pass over it."""
    whole, parts, at = 0, dict.fromkeys(spans, 0), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            whole, view = zlib.crc32(block, whole), memoryview(block)
            for key, (start, end) in spans.items():
                if start < at + len(block) and end > at:
                    parts[key] = zlib.crc32(view[max(start - at, 0) : end - at], parts[key])
            at += len(block)
    return whole, parts


def _map_tensor(path: Path, spec: dict, base: int, size: int, mmap: bool) -> np.ndarray:
    dtype, shape = np.dtype(_ST_DTYPES[spec["dtype"]]), tuple(spec["shape"])
    start, end = spec["data_offsets"]
    if base + end > size or end - start != dtype.itemsize * int(np.prod(shape)):
        raise ValueError(f"tensor data {start}:{end} is truncated or has the wrong size")
    if end == start:
        return np.zeros(shape, dtype)
    if mmap:
        return np.memmap(path, dtype=dtype, mode="r", offset=base + start, shape=shape)
    return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=base + start).reshape(shape)


def _check_csr(path, arrays: dict) -> None:
    tokens, offsets, centroids, counts = (arrays[k] for k in ARRAYS)
    problem = ""
    if offsets.shape != (len(tokens) + 1,) or offsets[0] != 0 or offsets[-1] != len(centroids):
        problem = f"offsets {offsets.shape} do not fit {len(tokens)} tokens and {len(centroids)} senses"
    elif np.any(np.diff(offsets) <= 0) or np.any(np.diff(tokens) <= 0):
        problem = "offsets or token ids are not strictly increasing"
    elif counts.shape != (len(centroids),) or centroids.ndim != 2:
        problem = f"counts {counts.shape} and centroids {centroids.shape} disagree"
    if problem:
        raise DictionaryError(f"{path}: {problem}; delete it and rerun build_dict")


def shard_entry(directory, index: int) -> dict:
    """The index.json entry of a written shard, read from its header (and checked), with its checksums."""
    arrays, info, checks = _read_checked(Path(directory) / shard_name(index), mmap=True, entry=None)
    tokens = arrays["token_ids"]
    entry = {
        "file": shard_name(index), "tokens": int(len(tokens)), "senses": int(len(arrays["centroids"])),
        "first_token": int(tokens[0]) if len(tokens) else None, "last_token": int(tokens[-1]) if len(tokens) else None,
        **checks,
    }
    if (Path(directory) / examples_name(index)).is_file():
        entry["examples"] = examples_name(index)
    return {**info, **entry}


def write_index(directory, body: dict, shards: list[dict]) -> Path:
    """index.json (last): `body` (fingerprints, layer, d, settings...) plus the shard list."""
    return manifest.write_manifest(directory, DICT_FORMAT, DICT_VERSION, {**body, "shards": shards}, name=INDEX_NAME)


class _Part:
    """One shard's CSR arrays (memory-mapped) and, loaded on demand, its examples."""

    def __init__(self, arrays: dict, examples=None, examples_path: Path | None = None, examples_crc: int | None = None,
                 shard: Path | None = None):
        self.token_ids = np.asarray(arrays["token_ids"], dtype=np.int64)
        self.offsets = np.asarray(arrays["offsets"], dtype=np.int64)
        self.centroids, self.counts = arrays["centroids"], arrays["counts"]
        self._examples, self.examples_path = examples, examples_path
        self.examples_crc, self.shard = examples_crc, shard  # the crc32 its shard's header records

    def examples(self) -> dict:
        if self._examples is None:
            if self.examples_path is None or not self.examples_path.is_file():
                self._examples = {}
            else:
                raw = self.examples_path.read_bytes()
                if zlib.crc32(raw) != self.examples_crc:
                    recorded = "no checksum" if self.examples_crc is None else f"{self.examples_crc:08x}"
                    raise DictionaryError(
                        f"{self.examples_path}: crc32 {zlib.crc32(raw):08x}, but {self.shard} records {recorded}: "
                        f"the examples file is damaged or from another build; delete {self.shard.name} and rerun build_dict")
                data = json.loads(raw)
                self._examples = {int(t): ex for t, ex in data.get("tokens", {}).items()}
        return self._examples


class SenseDictionary:
    """Senses of each token: lookups by token, a padded GPU-friendly view, nearest-sense snapping.

    Built from CSR arrays (one part) or loaded from a sharded directory (one memory-mapped
    part per shard; centroids are only copied when a padded view is built).
    """

    def __init__(self, token_ids, offsets, centroids, counts=None, meta: dict | None = None, examples: dict | None = None):
        counts = np.ones(len(centroids), dtype=np.int64) if counts is None else counts
        arrays = dict(token_ids=np.asarray(token_ids, np.int64), offsets=np.asarray(offsets, np.int64),
                      centroids=np.asarray(centroids), counts=np.asarray(counts, np.int64))
        _check_csr("SenseDictionary", arrays)
        self._init_parts([_Part(arrays, examples=examples or {})], meta or {}, source="<memory>")

    def _init_parts(self, parts: list[_Part], meta: dict, source: str) -> None:
        self.parts, self.meta, self.source = parts, meta, source
        self.token_ids = np.concatenate([p.token_ids for p in parts]) if parts else np.zeros(0, np.int64)
        if np.any(np.diff(self.token_ids) <= 0):
            raise DictionaryError(f"{source}: shards overlap or are out of token order")
        self.num_senses = np.concatenate([np.diff(p.offsets) for p in parts]) if parts else np.zeros(0, np.int64)
        self._part_of_row = np.repeat(np.arange(len(parts)), [len(p.token_ids) for p in parts])
        self._first_row = np.cumsum([0] + [len(p.token_ids) for p in parts])
        widths = {int(p.centroids.shape[1]) for p in parts if len(p.centroids)}
        if len(widths) > 1:
            raise DictionaryError(f"{source}: shards have different widths {sorted(widths)}")
        self.d = widths.pop() if widths else int(meta.get("d", 0))
        last = int(self.token_ids[-1]) + 1 if len(self.token_ids) else 0
        self.vocab_size = max(int(meta.get("vocab_size") or 0), last)
        self.token_to_row = np.full(self.vocab_size, -1, dtype=np.int64)
        self.token_to_row[self.token_ids] = np.arange(len(self.token_ids))
        self._padded: dict = {}

    @classmethod
    def load(cls, directory, mmap: bool = True) -> "SenseDictionary":
        """Open RUN/dictionary (index.json checked first, then each shard against its entry: size, crc32
        of the file and of each tensor); centroids stay memory-mapped."""
        directory = Path(directory)
        index = manifest.read_manifest(directory, DICT_FORMAT, DICT_VERSION, name=INDEX_NAME, stage_hint="build_dict")
        parts = []
        for entry in index.get("shards", []):
            shard = directory / entry["file"]
            arrays, _, checks = _read_checked(shard, mmap, entry)
            examples = directory / entry["examples"] if entry.get("examples") else None
            parts.append(_Part(arrays, examples_path=examples, examples_crc=checks.get("examples_crc32"), shard=shard))
        self = cls.__new__(cls)
        self._init_parts(parts, index, source=str(directory / INDEX_NAME))
        if index.get("d") and len(self.token_ids) and int(index["d"]) != self.d:
            raise DictionaryError(f"{self.source}: says d={index['d']} but the shards hold d={self.d}")
        return self

    def __len__(self) -> int:
        return len(self.token_ids)

    def __contains__(self, token_id) -> bool:
        return 0 <= int(token_id) < self.vocab_size and self.token_to_row[int(token_id)] >= 0

    def _locate(self, token_id: int):
        if token_id not in self:
            raise KeyError(f"token {token_id} has no senses in {self.source}")
        row = int(self.token_to_row[int(token_id)])
        part = self.parts[self._part_of_row[row]]
        local = row - int(self._first_row[self._part_of_row[row]])
        return part, slice(int(part.offsets[local]), int(part.offsets[local + 1]))

    def senses(self, token_id: int) -> np.ndarray:
        """[k, d] float32 centroids of one token, most frequent sense first."""
        part, rows = self._locate(token_id)
        return np.asarray(part.centroids[rows], dtype=np.float32)

    def sense_counts(self, token_id: int) -> np.ndarray:
        """[k] vectors that built each sense."""
        part, rows = self._locate(token_id)
        return np.asarray(part.counts[rows], dtype=np.int64)

    def examples(self, token_id: int) -> list[list[str]]:
        """Per sense, the stored example contexts (occurrence marked [[like this]])."""
        part, _ = self._locate(token_id)
        return part.examples().get(int(token_id), [])

    @property
    def k_max(self) -> int:
        return int(self.num_senses.max(initial=0))

    def padded(self, xp=np):
        """(centres [tokens, K_max, d] float32, mask [tokens, K_max] bool, token_to_row [vocab] int64) on `xp`.

        Row r holds token token_ids[r]; token_to_row maps a token id to its row (-1: no
        entry), so a batch of ids indexes the padded senses directly. Cached per backend.
        """
        key = backend_name(xp)
        if key not in self._padded:
            centres = np.zeros((len(self), max(self.k_max, 1), self.d), dtype=np.float32)
            mask = np.zeros(centres.shape[:2], dtype=bool)
            for number, part in enumerate(self.parts):
                local = np.repeat(np.arange(len(part.token_ids)), np.diff(part.offsets))
                position = np.arange(len(local)) - part.offsets[local]
                rows = local + self._first_row[number]
                centres[rows, position] = part.centroids
                mask[rows, position] = True
            self._padded[key] = (to_device(centres, xp), to_device(mask, xp), to_device(self.token_to_row, xp))
        return self._padded[key]

    def scores(self, token_ids, vectors, similarity: str = "dot", xp=np, chunk_pairs: int = 4096):
        """[n, K_max] float32 score of each pair's vector against each sense of its token, on `xp`.

        dot: <c, h>; cos: cosine; l2: -||h - c||^2. -inf where the token has fewer senses
        or no entry. Vectorised over pairs, in chunks of `chunk_pairs` to bound the
        gathered [chunk, K_max, d] senses.
        """
        if similarity not in ("dot", "cos", "l2"):
            raise ValueError(f"similarity={similarity!r}: use dot, cos or l2")
        centres, mask, row_map = self.padded(xp)
        tokens = to_device(np.asarray(to_host(token_ids), dtype=np.int64).ravel(), xp)
        vectors = to_device(vectors, xp).astype(xp.float32)
        if vectors.shape != (len(tokens), self.d):
            raise ValueError(f"{self.source}: expected vectors [{len(tokens)}, {self.d}], got {list(vectors.shape)}")
        known = (tokens >= 0) & (tokens < self.vocab_size)
        rows = xp.where(known, row_map[xp.clip(tokens, 0, max(self.vocab_size - 1, 0))], -1)
        out = xp.full((len(tokens), centres.shape[1]), -xp.inf, dtype=xp.float32)
        for start in range(0, len(tokens), chunk_pairs):
            r, h = rows[start : start + chunk_pairs], vectors[start : start + chunk_pairs]
            senses = centres[xp.maximum(r, 0)]
            if similarity == "cos":
                senses = senses / xp.maximum(xp.linalg.norm(senses, axis=-1, keepdims=True), 1e-12)
                h = h / xp.maximum(xp.linalg.norm(h, axis=-1, keepdims=True), 1e-12)
            score = (senses @ h[:, :, None])[:, :, 0]
            if similarity == "l2":
                score = 2 * score - (senses * senses).sum(-1) - (h * h).sum(-1)[:, None]
            usable = mask[xp.maximum(r, 0)] & (r >= 0)[:, None]
            out[start : start + chunk_pairs] = xp.where(usable, score, -xp.inf)
        return out

    def nearest(self, token_ids, vectors, similarity: str = "dot", xp=np, chunk_pairs: int = 4096):
        """Sense index (within its token) best scoring for each (token, vector) pair; -1: no entry.

        similarity: dot (argmax <c, h>), cos (argmax of cosine) or l2 (argmin ||h - c||).
        """
        score = self.scores(token_ids, vectors, similarity, xp, chunk_pairs)
        return xp.where(xp.isfinite(score).any(axis=1), xp.argmax(score, axis=1), -1)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise DictionaryError unless `tokenizer` is the one the dictionary was built with."""
        expected = self.meta.get("tokenizer_fingerprint")
        found = manifest.tokenizer_fingerprint(tokenizer)
        if expected and found != expected:
            raise DictionaryError(
                f"{self.source}: built for tokenizer fingerprint {expected}, but this tokenizer has {found}: "
                "token ids would point at another token's senses (use the teacher's tokenizer or rebuild)"
            )

    def save(self, directory, tokens_per_shard: int = 0, dtype: str = "fp32") -> Path:
        """Write shards of `tokens_per_shard` tokens (0: one shard) and index.json; returns the directory."""
        directory = Path(directory)
        step = tokens_per_shard or max(len(self), 1)
        shards = []
        for index, start in enumerate(range(0, max(len(self), 1), step)):
            self.save_shard(directory, index, rows=(start, min(start + step, len(self))), dtype=dtype)
            shards.append(shard_entry(directory, index))
        body = {k: v for k, v in self.meta.items() if k not in ("format", "version", "shards")}
        body.update(d=self.d, dtype=dtype, vocab_size=self.vocab_size)
        write_index(directory, body, shards)
        return directory

    def save_shard(self, directory, index: int, info: dict | None = None, rows: tuple | None = None,
                   dtype: str = "fp32") -> Path:
        """Write rows lo:hi (default all) as shard `index` with its examples; build_dict writes each tile so."""
        if dtype not in _CENTROID_DTYPES:
            raise ValueError(f"dtype={dtype!r}: use {', '.join(_CENTROID_DTYPES)}")
        arrays, examples = self._row_range(*(rows or (0, len(self))))
        arrays["centroids"] = arrays["centroids"].astype(_CENTROID_DTYPES[dtype])
        return write_shard(directory, index, arrays, examples, info)

    def _row_range(self, lo: int, hi: int) -> tuple[dict, dict]:
        """CSR arrays and examples of rows lo:hi, one slice per overlapping part."""
        centroids, counts, examples = [np.zeros((0, self.d), np.float32)], [np.zeros(0, np.int64)], {}
        for number, part in enumerate(self.parts):
            first = int(self._first_row[number])
            a, b = max(lo - first, 0), min(hi - first, len(part.token_ids))
            if a >= b:
                continue
            senses = slice(int(part.offsets[a]), int(part.offsets[b]))
            centroids.append(np.asarray(part.centroids[senses], np.float32))
            counts.append(np.asarray(part.counts[senses], np.int64))
            wanted = set(part.token_ids[a:b].tolist())
            examples.update({t: ex for t, ex in part.examples().items() if t in wanted})
        per_token = self.num_senses[lo:hi]
        offsets = np.concatenate([[0], np.cumsum(per_token)]).astype(np.int64)
        arrays = dict(token_ids=self.token_ids[lo:hi], offsets=offsets, centroids=np.concatenate(centroids),
                      counts=np.concatenate(counts))
        return arrays, examples
