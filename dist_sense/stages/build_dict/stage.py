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

import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from dist_sense import kmeans
from dist_sense.comm import LocalComm, SharedCounter, get_logger, open_comm
from dist_sense.formats.dictionary import shard_entry, write_index
from dist_sense.formats.identity import file_digest
from dist_sense.formats.shards import ShardError
from dist_sense.runtime import backend
from dist_sense.runtime.faults import crash_point
from dist_sense.stages.build_dict.finish import FinishedTile, TileFinisher, finished_tile
from dist_sense.stages.build_dict.plan import (
    TilePlan,
    plan_tiles,
    read_hidden_manifest,
    remove_stale_shards,
    settings_fingerprint,
    unfinished_tiles,
)
from dist_sense.stages.build_dict.spill import TileSpill, work_units
from dist_sense.stages.guard import on_rank0, open_stage

log = get_logger("dist_sense.build_dict")


def run(cfg, restart: bool = False) -> Path:
    """Build (or finish) RUN/dictionary from RUN/hidden; returns the dictionary directory.

    restart: move a dictionary/ made from other hidden states or settings aside instead of refusing."""
    comm = open_comm()
    xp = backend.get_xp(comm.local_rank)
    hidden_dir, out_dir = cfg.run_path / "hidden", cfg.run_path / "dictionary"
    hidden = read_hidden_manifest(hidden_dir)
    plan = plan_tiles(hidden, cfg.kmeans)
    settings = settings_fingerprint(hidden, cfg.kmeans)
    identity = {"hidden_manifest": file_digest(hidden_dir / "manifest.json"), "kmeans": asdict(cfg.kmeans)}
    with open_stage(cfg, "build_dict", out_dir, identity, restart=restart, rank=comm.rank, share=comm.bcast) as stage:
        todo = on_rank0(lambda: _todo(out_dir, plan, settings, stage), comm.rank, comm.bcast)
        if todo is None:
            log.info("%s is complete for these settings; nothing to do", out_dir)
            return out_dir
        log.info("%d tiles of up to %d tokens, %d to build, %d ranks on %s", len(plan.tiles), cfg.kmeans.tile_tokens,
                 len(todo), comm.world, backend.name(xp))
        written = _build(cfg, comm, xp, hidden, hidden_dir, out_dir, plan, settings, todo) if todo else {}
        comm.barrier()
        if comm.rank == 0:
            entries = [written.get(tile) or shard_entry(out_dir, tile) for tile in range(len(plan.tiles))]
            write_index(out_dir, index_body(hidden, hidden_dir, cfg.kmeans, plan, entries, settings), entries)
            shutil.rmtree(out_dir / ".work", ignore_errors=True)
            log.info("wrote %s", out_dir / "index.json")
        comm.barrier()
    return out_dir


def _todo(out_dir: Path, plan: TilePlan, settings: str, stage) -> list[int] | None:
    """Rank 0: the tiles left to build; None when index.json exists and every tile's shard is final."""
    todo = unfinished_tiles(out_dir, plan, settings)
    if stage.resumed and (out_dir / "index.json").is_file() and not todo:
        return None
    stage.begin()
    remove_stale_shards(out_dir, plan)
    if todo:
        (out_dir / "index.json").unlink(missing_ok=True)  # rebuilding: the dictionary is not complete meanwhile
    return todo


def _build(cfg, comm, xp, hidden: dict, hidden_dir: Path, out_dir: Path, plan: TilePlan, settings: str,
           todo: list[int]) -> dict[int, dict]:
    """Read hidden/ into per-tile spills, cluster and write the `todo` tiles; their index entries (rank 0)."""
    units = work_units([(s["file"], s["samples"]) for s in hidden["shards"]], FILL_UNIT_SAMPLES,
                       tail_samples=2 * comm.world * FILL_UNIT_SAMPLES, tail_unit=FILL_UNIT_SAMPLES // 4)
    spill = TileSpill(out_dir / ".work" / f"rank-{comm.rank:03d}", hidden["dtype"], int(hidden["d"]),
                      cfg.memory.spill_mb << 20)
    numbers = {file: i for i, file in enumerate(sorted(s["file"] for s in hidden["shards"]))}  # as on any rank
    with comm.work_counter() as counter:
        spill.fill(_claimed(units, hidden_dir, counter), plan, todo, cfg.kmeans.seed, poll=counter.poll,
                   shard_numbers=numbers)
    spill.seal()  # after the counter's closing barrier: see TileSpill.seal
    check_read_totals(hidden_dir, hidden, comm.allreduce(np.array([spill.counted["samples"], spill.counted["vectors"]])))
    metrics = Metrics(cfg.run_path / "tb" / "kmeans", enabled=comm.rank == 0)
    finisher = TileFinisher(comm, spill, out_dir, settings, cfg.kmeans.examples_per_sense,
                            cfg.memory.held_results_mb << 20, metrics.senses)
    for tile in _progress(todo, comm.rank == 0):
        finisher.add(build_tile(tile, plan, spill, comm, cfg.kmeans, xp, metrics))
        crash_point("build_dict.tile")
    finisher.flush()
    metrics.close()
    spill.remove()
    return finisher.entries


def check_read_totals(hidden_dir: Path, hidden: dict, read: np.ndarray) -> None:
    """What the ranks read together must be what the manifest promises (its shard list and totals)."""
    samples = sum(int(s["samples"]) for s in hidden["shards"])
    vectors = int(hidden.get("totals", {}).get("vectors_kept", sum(int(v) for v in hidden["kept_per_token"].values())))
    if int(read[0]) != samples or int(read[1]) != vectors:
        raise ShardError(f"{hidden_dir / 'manifest.json'}: promises {samples} samples and {vectors} vectors, but its "
                         f"shards hold {int(read[0])} samples and {int(read[1])} vectors: the manifest or a shard was "
                         f"changed after extract wrote them; rerun extract (--restart-stage)")


FILL_UNIT_SAMPLES = 128
"""Samples per claimed reading unit: small enough that ranks finish reading within a unit of
each other, large enough that a claim (one remote atomic add) and a seek are noise. The
last two units per rank are cut in quarters (work_units' tail): the ranks then finish
within a quarter unit of each other."""


def _claimed(units: list, hidden_dir: Path, counter: SharedCounter):
    """The reading units this rank claims, until the shared counter passes the last one."""
    while (number := counter.claim()) < len(units):
        file, start, stop = units[number]
        yield hidden_dir / file, start, stop


# ----------------------------------------------------------------------------- one tile


def build_tile(tile: int, plan: TilePlan, spill: TileSpill, comm: LocalComm, kcfg, xp, metrics) -> FinishedTile:
    """Cluster one tile on all ranks; its examples and shard are left to a TileFinisher."""
    started, reduce_before = time.perf_counter(), comm.allreduce_seconds
    tokens = plan.tiles[tile]
    rows, meta = spill.read(tile)
    local, order = kmeans.make_local_tile(rows, np.searchsorted(tokens, meta["token"]), meta["priority"], len(tokens),
                                          xp, kcfg.spherical)
    del rows
    # Tokens with no more vectors than k are left to the tile's writer (tile_finish), not gathered everywhere.
    result = kmeans.cluster_tile(local, kcfg, comm, xp, seed=tile, on_iteration=metrics.iteration, keep_small=False)
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
            "tokens_left_out_of_mcl": total("left_out_of_mcl"),
        },
        "senses_per_token": merged_histogram(entries),
    }


def merged_histogram(entries: list[dict]) -> dict:
    """The tiles' senses_histogram summed: {str(senses): tokens}, ascending by senses."""
    merged: dict[int, int] = {}
    for entry in entries:
        for senses, tokens in entry.get("senses_histogram", {}).items():
            merged[int(senses)] = merged.get(int(senses), 0) + int(tokens)
    return {str(k): merged[k] for k in sorted(merged)}


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
