"""Stage 2: RUN/hidden/ shards -> RUN/dictionary/, by MPI k-means over tiles of tokens.

`mpirun -n N python launcher/build_dict.py --config C` (or `srun --mpi=pmi2 ...`); one
process without a launcher works too. Each rank reads its share of the hidden shards
once (balanced by bytes) and buckets its rows by tile into scratch files (tile_spill.py),
so memory holds one tile at a time. Then, tile by tile, all ranks cluster the
tile's tokens together (kmeans.cluster_tile: an allgathered subsample fixes k and the
k-means++ start, Lloyd iterations cost one allreduce each) and rank `tile % world`
writes the tile's shard. A shard that exists and matches its tile and the settings is
final, so a rerun only builds the missing ones. index.json is written last, by rank 0.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from . import backend, dist, kmeans, manifest, shards
from .faults import crash_point
from .dictionary import DictionaryError, SenseDictionary, read_shard, shard_entry, shard_name, write_index
from .tile_spill import TileSpill, assign_shards

log = dist.get_logger("dist_sense.build_dict")
REQUIRED_FIELDS = ("teacher_fingerprint", "tokenizer_fingerprint", "layer", "d", "dtype", "vocab_size", "shards",
                   "kept_per_token")


def run(cfg) -> Path:
    """Build (or finish) RUN/dictionary from RUN/hidden; returns the dictionary directory."""
    comm = Collectives.from_env()
    xp = backend.get_xp(comm.local_rank)
    backend.retain_freed_memory()  # the tile loop reallocates the same large arrays
    hidden_dir, out_dir = cfg.run_path / "hidden", cfg.run_path / "dictionary"
    hidden = read_hidden_manifest(hidden_dir)
    plan = plan_tiles(hidden, cfg.kmeans)
    settings = settings_fingerprint(hidden, cfg.kmeans)
    out_dir.mkdir(parents=True, exist_ok=True)
    todo = comm.bcast(unfinished_tiles(out_dir, plan, settings) if comm.rank == 0 else None)
    log.info("%d tiles of up to %d tokens, %d to build, %d ranks on %s", len(plan.tiles), cfg.kmeans.tile_tokens,
             len(todo), comm.world, backend.name(xp))
    if todo:
        files = sorted(s["file"] for s in hidden["shards"])
        files = assign_shards(files, [(hidden_dir / f).stat().st_size for f in files], comm.world)[comm.rank]
        spill = TileSpill(out_dir / ".work" / f"rank-{comm.rank:03d}", hidden["dtype"], int(hidden["d"]))
        spill.fill([hidden_dir / f for f in files], plan, todo, cfg.kmeans.seed)
        metrics = Metrics(cfg.run_path / "tb" / "kmeans", enabled=comm.rank == 0)
        for tile in _progress(todo, comm.rank == 0):
            build_tile(tile, plan, spill, comm, cfg.kmeans, xp, metrics, out_dir, settings)
        metrics.close()
        spill.remove()
    comm.barrier()
    if comm.rank == 0:
        entries = [shard_entry(out_dir, tile) for tile in range(len(plan.tiles))]
        write_index(out_dir, index_body(hidden, hidden_dir, cfg.kmeans, plan, entries, settings), entries)
        shutil.rmtree(out_dir / ".work", ignore_errors=True)
        log.info("wrote %s", out_dir / "index.json")
    comm.barrier()
    return out_dir


# ----------------------------------------------------------------------------- collectives


@dataclass
class Collectives:
    """MPI wiring for kmeans' host-array collectives (identities for one process), with timing."""

    comm: object
    rank: int
    world: int
    local_rank: int
    allreduce_seconds: float = 0.0

    @classmethod
    def from_env(cls) -> "Collectives":
        env = dist.detect()
        if env.world_size == 1:
            return cls(None, 0, 1, env.local_rank)
        comm = dist.mpi_comm()
        if comm.Get_size() != env.world_size:
            raise RuntimeError(f"the {env.launcher} launcher says {env.world_size} ranks but MPI sees {comm.Get_size()}: "
                               "start with mpirun -n N, or srun --mpi=pmi2 (or pmix) under Slurm")
        return cls(comm, comm.Get_rank(), comm.Get_size(), env.local_rank)

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        out = dist.mpi_allreduce_sum(self.comm)(array)
        self.allreduce_seconds += time.perf_counter() - started
        return out

    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's rows, in rank order (Allgatherv of whole rows: counts stay under 2^31)."""
        if self.comm is None:
            return array
        from mpi4py import MPI

        array = np.ascontiguousarray(array)
        rows = self.comm.allgather(int(array.shape[0]))
        out = np.empty((sum(rows),) + array.shape[1:], dtype=array.dtype)
        row_bytes = array.dtype.itemsize * int(np.prod(array.shape[1:], dtype=np.int64))
        if sum(rows) == 0 or row_bytes == 0:
            return out
        row_type = MPI.BYTE.Create_contiguous(row_bytes).Commit()
        try:
            displacements = np.concatenate([[0], np.cumsum(rows)[:-1]]).tolist()
            self.comm.Allgatherv([array, array.shape[0], row_type], [out, (rows, displacements), row_type])
        finally:
            row_type.Free()
        return out

    def gather(self, obj, root: int) -> list | None:
        return [obj] if self.comm is None else self.comm.gather(obj, root=root)

    def bcast(self, obj):
        return obj if self.comm is None else self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        if self.comm is not None:
            self.comm.Barrier()


# ----------------------------------------------------------------------------- planning


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
    """Id of what a tile's result depends on: the hidden states and the k-means settings."""
    source = {k: hidden[k] for k in ("teacher_fingerprint", "tokenizer_fingerprint", "layer", "d", "dtype")}
    source["shards"] = sorted([s["file"], s.get("samples")] for s in hidden["shards"])
    payload = json.dumps({"hidden": source, "kmeans": asdict(kcfg)}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _tile_signature(tokens: np.ndarray) -> list:
    return [int(tokens[0]), int(tokens[-1]), int(len(tokens))]


def unfinished_tiles(out_dir: Path, plan: TilePlan, settings: str) -> list[int]:
    """Tiles whose shard is missing, unreadable, or from another tiling or settings (rank 0)."""
    for stale in out_dir.glob("senses-*"):
        number = stale.name.split(".")[0].split("-")[-1]
        if not number.isdigit() or int(number) >= len(plan.tiles):
            stale.unlink()  # from an earlier run with more tiles: not part of this dictionary
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
        if (info.get("settings") != settings or info.get("tile_range") != _tile_signature(tokens)
                or not np.isin(arrays["token_ids"], tokens).all()):
            log.info("%s holds another tile or other settings: rebuilding tile %d", path, tile)
            todo.append(tile)
    return todo


# ----------------------------------------------------------------------------- one tile


def build_tile(tile: int, plan: TilePlan, spill: TileSpill, comm: Collectives, kcfg, xp, metrics, out_dir: Path,
               settings: str) -> kmeans.TileResult:
    """Cluster one tile on all ranks; rank tile % world writes its shard and examples."""
    started, reduce_before = time.perf_counter(), comm.allreduce_seconds
    tokens = plan.tiles[tile]
    rows, meta = spill.read(tile)
    local, order = kmeans.make_local_tile(rows, np.searchsorted(tokens, meta["token"]), meta["priority"], len(tokens),
                                          xp, kcfg.spherical)
    del rows
    meta = meta[order]
    result = kmeans.cluster_tile(local, kcfg, comm.allreduce, comm.allgather, xp, seed=tile,
                                 on_iteration=metrics.iteration, share=(comm.rank, comm.world))
    picked = kmeans.nearest_rows_per_sense(local, result, kcfg.examples_per_sense)
    candidates = (local.slots[picked], backend.to_host(result.labels)[picked],
                  backend.to_host(result.distances)[picked], local.priority[picked],
                  spill.contexts(meta["sample"][picked], meta["occurrence"][picked]))
    writer = tile % comm.world
    gathered = comm.gather(candidates, root=writer)
    if comm.rank == writer:
        examples = _merge_examples(gathered, tokens, result.valid.sum(axis=1), kcfg.examples_per_sense)
        write_tile(out_dir, tile, tokens, result, examples, settings)
    seconds = time.perf_counter() - started
    metrics.tile(tile, result, seconds, (comm.allreduce_seconds - reduce_before) / max(seconds, 1e-9))
    crash_point("build_dict.tile")
    return result


def _merge_examples(gathered: list, tokens: np.ndarray, senses_per_slot: np.ndarray, limit: int) -> dict:
    """The `limit` nearest candidates per sense over all ranks: {token id: [[text, ...] per sense]}."""
    slots, labels, distances, priority = (np.concatenate([g[i] for g in gathered]) for i in range(4))
    texts = [text for g in gathered for text in g[4]]
    order = np.lexsort((priority, distances, labels, slots))
    group = slots[order] * (int(senses_per_slot.max(initial=0)) + 1) + labels[order]
    examples: dict = {}
    for i in order[kmeans.rank_in_group(group) < limit]:  # output formatting: at most `limit` per sense
        senses = examples.setdefault(int(tokens[slots[i]]), [[] for _ in range(senses_per_slot[slots[i]])])
        senses[labels[i]].append(texts[i])
    return examples


def write_tile(out_dir: Path, tile: int, tokens: np.ndarray, result: kmeans.TileResult, examples: dict,
               settings: str) -> Path:
    slots, offsets, centroids, counts = kmeans.tile_csr(result)
    per_token = result.vectors_per_token
    info = {
        "tile": tile, "settings": settings, "tile_range": _tile_signature(tokens), "inertia": result.inertia,
        "iterations": len(result.history), "vectors": int(per_token.sum()),
        "kept_as_vectors": int(result.kept_as_vectors.sum()), "without_vectors": int((per_token == 0).sum()),
    }
    tile_senses = SenseDictionary(tokens[slots], offsets, centroids.astype(np.float32), counts, examples=examples)
    return tile_senses.save_shard(out_dir, tile, info)


def index_body(hidden: dict, hidden_dir: Path, kcfg, plan: TilePlan, entries: list[dict], settings: str) -> dict:
    def total(key):
        return int(sum(e.get(key, 0) for e in entries))

    return {
        "teacher": hidden.get("teacher", ""), "teacher_fingerprint": hidden["teacher_fingerprint"],
        "tokenizer_fingerprint": hidden["tokenizer_fingerprint"], "layer": hidden["layer"], "d": int(hidden["d"]),
        "dtype": "fp32", "hidden_dtype": hidden["dtype"], "vocab_size": int(hidden["vocab_size"]),
        "k_policy": kcfg.k_policy, "k": kcfg.k if kcfg.k_policy == "fixed" else None, "kmeans": asdict(kcfg),
        "settings": settings, "hidden_manifest": str(hidden_dir / "manifest.json"),
        "totals": {
            "tokens": total("tokens"), "senses": total("senses"), "vectors": total("vectors"),
            "tokens_kept_as_vectors": total("kept_as_vectors"), "tokens_without_vectors": total("without_vectors"),
            "tokens_below_min_count": plan.below_min_count["tokens"],
            "vectors_below_min_count": plan.below_min_count["vectors"],
        },
    }


# ----------------------------------------------------------------------------- metrics


class Metrics:
    """TensorBoard scalars under RUN/tb/kmeans (rank 0 only; every rank computes the same numbers)."""

    def __init__(self, directory: Path, enabled: bool):
        self.writer, self.step = None, 0
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:  # pragma: no cover - tensorboard is a requirement
                log.warning("no TensorBoard logging (%s)", err)
            else:
                self.writer = SummaryWriter(str(directory))

    def iteration(self, record: dict) -> None:
        if self.writer is not None:
            self.writer.add_scalar("kmeans/inertia", record["inertia"], self.step)
            self.writer.add_scalar("kmeans/centre_shift", record["shift"], self.step)
            self.writer.add_scalar("kmeans/reseeded", record["reseeded"], self.step)
        self.step += 1

    def tile(self, tile: int, result: kmeans.TileResult, seconds: float, allreduce_share: float) -> None:
        senses = result.valid.sum(axis=1)[result.vectors_per_token > 0]
        log.debug("tile %d: %d tokens, %d senses, %d iterations, inertia %.4g, %.2fs (%.0f%% allreduce)", tile,
                  len(senses), senses.sum(), len(result.history), result.inertia, seconds, 100 * allreduce_share)
        if self.writer is not None:
            if len(senses):
                self.writer.add_histogram("kmeans/senses_per_token", senses, tile)
            self.writer.add_scalar("kmeans/tile_inertia", result.inertia, tile)
            self.writer.add_scalar("speed/tile_s", seconds, tile)
            self.writer.add_scalar("speed/allreduce_share", allreduce_share, tile)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(tiles: list[int], enabled: bool):
    from tqdm import tqdm

    return tqdm(tiles, desc="k-means tiles", unit="tile", disable=not enabled)
