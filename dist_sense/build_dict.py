"""Stage 2: RUN/hidden/ shards -> RUN/dictionary/, by MPI k-means over tiles of tokens.

`mpirun -n N python launcher/build_dict.py --config C` (or `srun --mpi=pmi2 ...`); one
process without a launcher works too. The ranks read the hidden shards once, in units
of samples claimed from a shared counter, and bucket their rows by tile (tile_spill.py:
in memory up to a budget, then in scratch files). Then, tile by tile, all ranks cluster
the tile's tokens that have more vectors than k together (kmeans.cluster_tile: an
allgathered subsample fixes k and the k-means++ start, Lloyd iterations cost one
allreduce each). Finished tiles are held in batches; each tile's writer rank then makes
the senses of its tokens kept as their distinct vectors, the examples of the batch are
picked together, and the writers write their shards at once (tile_finish.py). A shard
that exists and matches its tile and the settings is final, so a rerun only builds the
missing ones. index.json is written last, by rank 0.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import shutil
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from . import backend, dist, kmeans, manifest, shards
from .faults import crash_point
from .dictionary import DictionaryError, read_shard, shard_entry, shard_name, write_index
from .tile_finish import FinishedTile, TileFinisher, finished_tile, tile_signature
from .tile_spill import TileSpill, work_units

log = dist.get_logger("dist_sense.build_dict")
RESULT_NEUTRAL_SETTINGS = ("spill_memory_mb", "held_results_mb")
"""k-means settings that change how the stage runs, not its result: changing them rebuilds nothing."""
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
    written: dict[int, dict] = {}  # index entries of the tiles built now (rank 0)
    if todo:
        units = work_units([(s["file"], s["samples"]) for s in hidden["shards"]], FILL_UNIT_SAMPLES,
                           tail_samples=2 * comm.world * FILL_UNIT_SAMPLES, tail_unit=FILL_UNIT_SAMPLES // 4)
        spill = TileSpill(out_dir / ".work" / f"rank-{comm.rank:03d}", hidden["dtype"], int(hidden["d"]),
                          cfg.kmeans.spill_memory_mb << 20)
        with comm.work_counter() as counter:
            spill.fill(_claimed(units, hidden_dir, counter), plan, todo, cfg.kmeans.seed, poll=counter.poll)
        spill.seal()  # after the counter's closing barrier: see TileSpill.seal
        metrics = Metrics(cfg.run_path / "tb" / "kmeans", enabled=comm.rank == 0)
        finisher = TileFinisher(comm, spill, out_dir, settings, cfg.kmeans.examples_per_sense,
                                cfg.kmeans.held_results_mb << 20, metrics.senses)
        for tile in _progress(todo, comm.rank == 0):
            finisher.add(build_tile(tile, plan, spill, comm, cfg.kmeans, xp, metrics))
            crash_point("build_dict.tile")
        finisher.flush()
        written = finisher.entries
        metrics.close()
        spill.remove()
    comm.barrier()
    if comm.rank == 0:
        entries = [written.get(tile) or shard_entry(out_dir, tile) for tile in range(len(plan.tiles))]
        write_index(out_dir, index_body(hidden, hidden_dir, cfg.kmeans, plan, entries, settings), entries)
        shutil.rmtree(out_dir / ".work", ignore_errors=True)
        log.info("wrote %s", out_dir / "index.json")
    comm.barrier()
    return out_dir


FILL_UNIT_SAMPLES = 128
"""Samples per claimed reading unit: small enough that ranks finish reading within a unit of
each other, large enough that a claim (one remote atomic add) and a seek are noise. The
last two units per rank are cut in quarters (work_units' tail): the ranks then finish
within a quarter unit of each other."""


@dataclass
class SharedCounter:
    """0, 1, 2, ... over all ranks together, each number to one rank: an MPI window of one
    int64 on rank 0, incremented by Fetch_and_op under a shared lock.

    The add is passive-target RMA: with MPICH it completes only while rank 0 is inside
    some MPI call, so a rank busy reading calls `poll` (an Iprobe, ~0.1 us) now and then;
    without it a claim waited for rank 0's own next claim (22 ms instead of 0.1 ms, measured).
    """

    claim: Callable[[], int]
    poll: Callable[[], object]


def _claimed(units: list, hidden_dir: Path, counter: SharedCounter):
    """The reading units this rank claims, until the shared counter passes the last one."""
    while (number := counter.claim()) < len(units):
        file, start, stop = units[number]
        yield hidden_dir / file, start, stop


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
        counts = np.zeros(self.world, dtype=np.int64)
        self.comm.Allgather(np.array([array.shape[0]], dtype=np.int64), counts)  # one collective; a pickled int is two
        rows = counts.tolist()
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

    @contextmanager
    def work_counter(self):
        """A SharedCounter over all ranks (an itertools counter for one process). Collective to open and close."""
        if self.comm is None:
            yield SharedCounter(itertools.count().__next__, lambda: None)
            return
        from mpi4py import MPI

        window = MPI.Win.Allocate(8 if self.rank == 0 else 0, 8, comm=self.comm)
        if self.rank == 0:
            window.Lock(0, MPI.LOCK_EXCLUSIVE)
            window.Put([np.zeros(1, np.int64), MPI.INT64_T], 0)
            window.Unlock(0)
        self.comm.Barrier()
        one, got = np.ones(1, np.int64), np.zeros(1, np.int64)

        def claim() -> int:
            window.Lock(0, MPI.LOCK_SHARED)
            window.Fetch_and_op([one, MPI.INT64_T], [got, MPI.INT64_T], 0, 0, MPI.SUM)
            window.Unlock(0)
            return int(got[0])

        # On an error in the body nothing below runs: Free is collective, and the launcher
        # aborts the job rather than have this rank wait there for the others.
        yield SharedCounter(claim, self.comm.Iprobe)
        self.comm.Barrier()  # nobody frees the window while another rank may still claim
        window.Free()

    def gather(self, obj) -> list | None:
        """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
        return [obj] if self.comm is None else self.comm.gather(obj, root=0)

    def alltoall(self, objs: list) -> list:
        """objs[r] goes to rank r; returns what each rank sent this one, in rank order."""
        return list(objs) if self.comm is None else self.comm.alltoall(objs)

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
    """Id of what a tile's result depends on: the hidden states and the k-means settings."""
    source = {k: hidden[k] for k in ("teacher_fingerprint", "tokenizer_fingerprint", "layer", "d", "dtype")}
    source["shards"] = sorted([s["file"], s.get("samples")] for s in hidden["shards"])
    kmeans_settings = {k: v for k, v in asdict(kcfg).items() if k not in RESULT_NEUTRAL_SETTINGS}
    payload = json.dumps({"hidden": source, "kmeans": kmeans_settings}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


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
        if (info.get("settings") != settings or info.get("tile_range") != tile_signature(tokens)
                or not np.isin(arrays["token_ids"], tokens).all()):
            log.info("%s holds another tile or other settings: rebuilding tile %d", path, tile)
            todo.append(tile)
    return todo


# ----------------------------------------------------------------------------- one tile


def build_tile(tile: int, plan: TilePlan, spill: TileSpill, comm: Collectives, kcfg, xp, metrics) -> FinishedTile:
    """Cluster one tile on all ranks; its examples and shard are left to a TileFinisher."""
    started, reduce_before = time.perf_counter(), comm.allreduce_seconds
    tokens = plan.tiles[tile]
    rows, meta = spill.read(tile)
    local, order = kmeans.make_local_tile(rows, np.searchsorted(tokens, meta["token"]), meta["priority"], len(tokens),
                                          xp, kcfg.spherical)
    del rows
    # Tokens with no more vectors than k are left to the tile's writer (tile_finish), not gathered everywhere.
    result = kmeans.cluster_tile(local, kcfg, comm.allreduce, comm.allgather, xp, seed=tile,
                                 on_iteration=metrics.iteration, share=(comm.rank, comm.world), keep_small=False)
    done = finished_tile(tile, tokens, local, result, meta[order], comm.rank, kcfg.examples_per_sense, xp)
    seconds = time.perf_counter() - started
    metrics.tile(tile, result, seconds, (comm.allreduce_seconds - reduce_before) / max(seconds, 1e-9))
    return done


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
        log.debug("tile %d: %d tokens clustered into %d senses, %d kept as vectors, %d iterations, inertia %.4g, "
                  "%.2fs (%.0f%% allreduce)", tile, len(result.slots), len(result.centroids),
                  int(result.kept_as_vectors.sum()), len(result.history), result.inertia, seconds,
                  100 * allreduce_share)
        if self.writer is not None:
            self.writer.add_scalar("kmeans/tile_inertia", result.inertia, tile)
            self.writer.add_scalar("speed/tile_s", seconds, tile)
            self.writer.add_scalar("speed/allreduce_share", allreduce_share, tile)

    def senses(self, tile: int, per_token: np.ndarray) -> None:
        """Senses of each token of a written tile (clustered and kept as vectors alike)."""
        if self.writer is not None and len(per_token):
            self.writer.add_histogram("kmeans/senses_per_token", per_token, tile)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _progress(tiles: list[int], enabled: bool):
    from tqdm import tqdm

    return tqdm(tiles, desc="k-means tiles", unit="tile", disable=not enabled)
