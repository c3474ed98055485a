"""What build_dict builds: the hidden manifest it reads, the tiles of tokens, their settings id.

A tile's shard is final when it exists, reads back, and records the same tile and
settings fingerprint; `unfinished_tiles` is how a rerun finds what is left.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from dist_sense.comm import get_logger
from dist_sense.formats import manifest, shards
from dist_sense.formats.dictionary import DictionaryError, read_shard, shard_name

log = get_logger("dist_sense.build_dict")
REQUIRED_FIELDS = ("teacher_fingerprint", "tokenizer_fingerprint", "layer", "d", "dtype", "vocab_size", "shards",
                   "kept_per_token")


@dataclass
class TilePlan:
    tiles: list
    """Per tile, its token ids (int64, ascending)."""
    tile_of_token: np.ndarray
    """[vocab] int64: tile of each token, -1 for tokens not clustered."""
    below_min_count: dict = field(default_factory=dict)
    """Tokens (and their vectors) left out because they have fewer than min_count vectors."""


def read_hidden_manifest(hidden_dir: Path) -> dict:
    """RUN/hidden/manifest.json, checked: format, version, the fields used here, the shard files."""
    data = manifest.read_manifest(hidden_dir, shards.HIDDEN_FORMAT, shards.HIDDEN_VERSION, stage_hint="extract")
    path = hidden_dir / "manifest.json"
    missing = [key for key in REQUIRED_FIELDS if key not in data]
    if missing:
        raise manifest.ManifestError(f"{path}: lacks {', '.join(missing)} (written by an older or foreign extract?)")
    if data["dtype"] not in ("fp16", "bf16", "fp32"):
        raise manifest.ManifestError(f"{path}: dtype {data['dtype']!r} is not fp16, bf16 or fp32")
    uncounted = [s.get("file") for s in data["shards"] if not isinstance(s.get("samples"), int) or s["samples"] < 0]
    if uncounted:
        raise manifest.ManifestError(f"{path}: shard {uncounted[0]!r} has no sample count (field 'samples')")
    absent = [s["file"] for s in data["shards"] if not (hidden_dir / s["file"]).is_file()]
    if absent:
        raise manifest.ManifestError(f"{hidden_dir / absent[0]}: listed in {path} but missing ({len(absent)} missing)")
    return data


def plan_tiles(hidden: dict, kcfg) -> TilePlan:
    """Tokens with at least min_count kept vectors, ascending, cut into tiles of tile_tokens."""
    kept = hidden["kept_per_token"]
    ids = np.fromiter((int(t) for t in kept), dtype=np.int64, count=len(kept))
    counts = np.fromiter((int(c) for c in kept.values()), dtype=np.int64, count=len(kept))
    order = np.argsort(ids)
    ids, counts = ids[order], counts[order]
    eligible = counts >= kcfg.min_count
    tokens = ids[eligible]
    size = kcfg.tile_tokens
    vocab = max(int(hidden["vocab_size"]), int(ids.max(initial=-1)) + 1)
    tile_of_token = np.full(vocab, -1, dtype=np.int64)
    tile_of_token[tokens] = np.arange(len(tokens)) // size
    below = {"tokens": int((~eligible & (counts > 0)).sum()), "vectors": int(counts[~eligible].sum())}
    return TilePlan([tokens[i : i + size] for i in range(0, len(tokens), size)], tile_of_token, below)


def settings_fingerprint(hidden: dict, kcfg) -> str:
    """Id of what a tile's result depends on: the hidden states and the whole kmeans section
    (the memory budgets, which change only how the stage runs, are a section of their own)."""
    source = {k: hidden[k] for k in ("teacher_fingerprint", "tokenizer_fingerprint", "layer", "d", "dtype")}
    source["shards"] = sorted([s["file"], s.get("samples")] for s in hidden["shards"])
    payload = json.dumps({"hidden": source, "kmeans": asdict(kcfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def remove_stale_shards(out_dir: Path, plan: TilePlan) -> None:
    """Delete shard files of tiles past the plan's last (from an earlier run with more tiles)."""
    for stale in out_dir.glob("senses-*"):
        number = stale.name.split(".")[0].split("-")[-1]
        if not number.isdigit() or int(number) >= len(plan.tiles):
            stale.unlink()  # not part of this dictionary


def unfinished_tiles(out_dir: Path, plan: TilePlan, settings: str) -> list[int]:
    """Tiles whose shard is missing, unreadable, or from another tiling or settings (rank 0; reads only)."""
    todo = []
    for tile, tokens in enumerate(plan.tiles):
        path = out_dir / shard_name(tile)
        if not path.is_file():
            todo.append(tile)
            continue
        try:
            arrays, info = read_shard(path)
        except DictionaryError as err:
            log.warning("%s; rebuilding tile %d", err, tile)
            todo.append(tile)
            continue
        if (info.get("settings") != settings or info.get("tile_range") != tile_signature(tokens)
                or not np.isin(arrays["token_ids"], tokens).all()):
            log.info("%s holds another tile or other settings: rebuilding tile %d", path, tile)
            todo.append(tile)
    return todo




def tile_signature(tokens: np.ndarray) -> list:
    return [int(tokens[0]), int(tokens[-1]), int(len(tokens))]
