"""Manifests: the last file a stage writes, and the first one a reader checks.

Each manifest names its format and version, and holds the sha256 of its own content
("manifest_sha256", over the canonical JSON of every other key), so an edit or a damaged
byte after the stage wrote it is refused rather than believed. Writes go to a temporary
name and are renamed into place, so a crash never leaves a file that looks complete.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path


class ManifestError(RuntimeError):
    """A missing, foreign or outdated manifest; the message names the file."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


CHECKSUM_KEY = "manifest_sha256"


def content_checksum(data: dict) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no spaces), the checksum key left out."""
    canonical = json.dumps({k: v for k, v in data.items() if k != CHECKSUM_KEY}, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


def with_checksum(data: dict) -> dict:
    """`data` as it reads back from JSON, with its content checksum (any old one replaced)."""
    plain = json.loads(json.dumps({k: v for k, v in data.items() if k != CHECKSUM_KEY}))
    return {**plain, CHECKSUM_KEY: content_checksum(plain)}


def write_manifest(directory: str | os.PathLike, fmt: str, version: int, body: dict, name: str = "manifest.json") -> Path:
    """Write DIR/manifest.json holding `format`, `version`, `body`'s keys and their checksum, atomically."""
    return atomic_write_json(Path(directory) / name, with_checksum({"format": fmt, "version": version, **body}))


def read_manifest(directory: str | os.PathLike, fmt: str, version: int, name: str = "manifest.json", stage_hint: str = "") -> dict:
    """Read and check DIR/manifest.json; raise ManifestError naming the file if it is not usable."""
    path = Path(directory) / name
    hint = f" (run {stage_hint} first, or finish it: a stage writes its manifest last)" if stage_hint else ""
    if not path.is_file():
        raise ManifestError(f"{path}: no manifest{hint}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ManifestError(f"{path}: manifest is not valid JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != fmt:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ManifestError(f"{path}: format is {found!r}, expected {fmt!r}: this directory holds something else")
    if data.get("version") != version:
        raise ManifestError(
            f"{path}: {fmt} version {data.get('version')!r}, this code reads version {version}: rebuild it with this version"
        )
    # After format and version: another version may sum its content otherwise. A manifest without
    # the key (written by hand, or by a test) is taken as it is.
    if CHECKSUM_KEY in data and data[CHECKSUM_KEY] != content_checksum(data):
        stage = stage_hint or "the stage that wrote it"
        raise ManifestError(f"{path}: edited or damaged after it was written (its content no longer matches its "
                            f"{CHECKSUM_KEY}); delete it and rerun {stage}")
    return data


def file_fingerprint(paths, extra: str = "") -> str:
    """sha256 over the bytes of `paths` (in order) and `extra`: identifies a tokenizer or a model."""
    digest = hashlib.sha256(extra.encode())
    for p in paths:
        p = Path(p)
        digest.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def tokenizer_fingerprint(tokenizer) -> str:
    """Stable id of a tokenizer's vocabulary and special tokens (not of its file layout)."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    payload = json.dumps({"vocab": vocab, "special": sorted(map(str, tokenizer.all_special_ids))})
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Id of a model checkpoint: its config plus the sizes and names of its weight files."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    config = model_dir / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for weights in sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin")):
        digest.update(f"{weights.name}:{weights.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def is_finished(directory: str | os.PathLike, fmt: str, version: int, settings: dict) -> bool:
    """Whether a stage's output is complete for `settings`: False with no manifest yet.

    A foreign or outdated manifest, or one made with other settings, is an error rather
    than "not finished", so a rerun never silently overwrites someone else's output.
    """
    path = Path(directory) / "manifest.json"
    if not path.is_file():
        return False
    manifest = read_manifest(directory, fmt, version)
    if manifest.get("settings") != settings:
        changed = sorted(k for k in set(settings) | set(manifest.get("settings", {}))
                         if settings.get(k) != manifest.get("settings", {}).get(k))
        raise ManifestError(f"{path}: made with other settings ({', '.join(changed)} differ); "
                            f"use another run_dir or delete {directory}")
    return True
