"""What the shard checksums cost: hidden/ shards written and read with them, against without.

Data: synthetic batches shaped as extraction makes them: BATCH windows of LENGTH ids (two of
them specials), fp32 states at d=384 (the demo teacher's width), each token kept with
probability 1/2, so about 31 kept states a window and ~62,000 in all, stored fp16 in shards of
1000 samples (extract.shard_samples' default). Writing: the extraction sink (HiddenSink.write_batch:
draw, selection, fp16 cast, samples, RankShardWriter with its fsync and rename), all it does after
the forward. Reading: build_dict's reading pass (TileSpill.fill over work units of 128 samples,
every token in a tile). Ours: with checksums (a crc32.json member a sample, the file's crc32
summed while writing; every member read checked). Baseline: the same code with shards.CHECKSUMS
off, which writes and reads shards as they were before checksums. write_ratio, read_ratio =
seconds with / seconds without (1.0: free). extract_pass_write_ratio adds to both sides the demo
teacher's forward over the same batches (all-MiniLM-L6-v2, measured here on FORWARD_BATCHES
of them), which the sink follows in an extraction pass: the share of the whole pass.
format_write_ratio and format_read_ratio are the shard format alone (hidden_sample and
RankShardWriter; iter_hidden_range decoding every sample). Writing sums two crc32s over each
window's ~24 KB (its members, then the file; ~4.5 us each at ~5 GB/s) beside ~120 us of sink
work, so a ratio near 1.1 is its floor; reading sums one. Shard work is timed in CPU seconds of
this process (it is single-threaded, and CPU time shrugs off other jobs on a shared machine), the
forward in wall seconds; the median of ROUNDS alternating rounds (the best of them picked outliers
of the baseline on a loaded machine), files in the page cache (a read from disk would hide the
checksums more).

The targets are on what a run pays, as the issue asks: the extraction pass (sink plus forward)
and the whole build_dict stage (build_dict_stage_ratio: one process, k=20, over the real hidden/
of the other benchmarks, 12,000 WordNet documents, fp32 states; read with every member checked
against read with checks off, 5 alternating rounds, median wall seconds). The format-level
ratios above have no target: they show what the checksums cost where nothing else runs.
"""
from __future__ import annotations

import shutil
import time
from collections import Counter
from contextlib import contextmanager

import numpy as np

from bench import common

WINDOWS, BATCH, LENGTH, D, VOCAB, SHARD_SAMPLES, UNIT, ROUNDS = 2000, 32, 64, 384, 30000, 1000, 128, 7
FORWARD_BATCHES = 8


def batches(seed: int = 0) -> list[tuple[list, np.ndarray]]:
    """(windows, fp32 states [BATCH, LENGTH, D]) per batch, made once so no round pays for them."""
    from dist_sense.formats.corpus import Window

    rng = np.random.default_rng(seed)
    states = [rng.normal(size=(BATCH, LENGTH, D)).astype(np.float32) for _ in range(4)]  # content changes no timing
    out = []
    for first in range(0, WINDOWS, BATCH):
        windows = []
        for doc in range(first, min(first + BATCH, WINDOWS)):
            words = ["w%d" % t for t in rng.integers(1000, VOCAB, LENGTH - 2)]
            starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]]).tolist()
            windows.append(Window(doc=doc, index=0, start=0, input_ids=[1] + [int(w[1:]) for w in words] + [2],
                                  special=[True] + [False] * (LENGTH - 2) + [True],
                                  owned=[False] + [True] * (LENGTH - 2) + [False],
                                  doc_pos=[-1] + list(range(LENGTH - 2)) + [-1],
                                  spans=[(0, 0)] + [(s, s + len(w)) for s, w in zip(starts, words)] + [(0, 0)],
                                  text=" ".join(words)))
        out.append((windows, states[len(out) % len(states)][: len(windows)]))
    return out


@contextmanager
def checksums(on: bool):
    """dist_sense.formats.shards with its checksums switched on or off, back on afterwards."""
    from dist_sense.formats import shards

    shards.CHECKSUMS = on
    try:
        yield shards
    finally:
        shards.CHECKSUMS = True


def sink_write(directory, data, on: bool) -> tuple[float, list[dict], dict]:
    """Seconds of the extraction sink over `data`, the shards' manifest entries, tokens kept."""
    from dist_sense.stages.extract import HiddenSink

    shutil.rmtree(directory, ignore_errors=True)
    sink, counters = HiddenSink(np.full(VOCAB, 0.5), seed=0, hidden_dtype="fp16"), {}
    with checksums(on) as shards:
        start = time.process_time()
        writer = shards.RankShardWriter(directory, "hidden", 0, SHARD_SAMPLES)
        for windows, states in data:
            sink.write_batch(writer, windows, states, counters)
        writer.close()
        return time.process_time() - start, writer.written, dict(counters.get("kept", Counter()))


def spill_read(directory, entries: list[dict], kept: dict, on: bool) -> float:
    """Seconds of build_dict's reading pass (TileSpill.fill) over the shards, every token in a tile."""
    from dist_sense.config import KMeansConfig
    from dist_sense.stages.build_dict.plan import plan_tiles
    from dist_sense.stages.build_dict.spill import TileSpill, work_units

    plan = plan_tiles({"kept_per_token": kept, "vocab_size": VOCAB}, KMeansConfig())
    units = [(directory / file, a, b) for file, a, b in work_units([(e["file"], e["samples"]) for e in entries], UNIT)]
    spill = TileSpill(directory / "spill", "fp16", D, memory_bytes=1 << 30)
    with checksums(on):
        start = time.process_time()
        spill.fill(units, plan, list(range(len(plan.tiles))), seed=0)
        seconds = time.process_time() - start
    shutil.rmtree(directory / "spill")
    return seconds


def format_write(directory, samples, on: bool) -> tuple[float, list[dict]]:
    """Seconds to write already-encoded samples through hidden_sample and RankShardWriter alone."""
    shutil.rmtree(directory, ignore_errors=True)
    with checksums(on) as shards:
        start = time.process_time()
        writer = shards.RankShardWriter(directory, "hidden", 0, SHARD_SAMPLES)
        for key, encoded, tokens, pos, doc in samples:
            writer.write(key, shards.hidden_sample(encoded, tokens, pos, doc))
        writer.close()
        return time.process_time() - start, writer.written


def format_read(directory, entries: list[dict], on: bool) -> float:
    """Seconds to read and decode every sample of the shards (iter_hidden_range over each whole shard)."""
    with checksums(on) as shards:
        start = time.process_time()
        for e in entries:
            for _ in shards.iter_hidden_range(directory / e["file"], 0, e["samples"], "fp16"):
                pass
        return time.process_time() - start


def forward_seconds_per_window(data) -> float:
    """Wall seconds of the demo teacher's forward per window, over FORWARD_BATCHES batches (best of 3)."""
    import torch
    from transformers import AutoModel

    from dist_sense.model.teacher import resolve_model_path

    common.single_process_env()
    model = AutoModel.from_pretrained(resolve_model_path(common.DEMO_MODEL)).eval()
    ids = [torch.tensor([w.input_ids for w in windows]) for windows, _ in data[:FORWARD_BATCHES]]
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            start = time.perf_counter()
            for batch in ids:
                model(input_ids=batch, attention_mask=torch.ones_like(batch)).last_hidden_state.numpy()
            best = min(best, time.perf_counter() - start)
    return best / sum(len(batch) for batch in ids)


def main() -> dict:
    from dist_sense.formats import shards

    data = batches()
    work = common.WORK / "checksum_bench"
    dirs = {True: work / "with", False: work / "without"}
    names = ("write", "read", "format_write", "format_read")
    times = {f"{name}_{side}": [] for name in names for side in ("on", "off")}
    entries: dict[bool, list[dict]] = {}
    sink_write(dirs[True], data, True)  # untimed: page faults, allocator, file system warm-up
    for _ in range(ROUNDS):  # alternating, so drift in machine load hits both alike
        for on, side in ((True, "on"), (False, "off")):
            seconds, entries[on], kept = sink_write(dirs[on], data, on)
            times[f"write_{side}"].append(seconds)
            times[f"read_{side}"].append(spill_read(dirs[on], entries[on], kept, on))
    samples = [(s["key"], shards.encode_hidden(s["hidden"], "fp16"), s["tokens"], s["pos"], s["doc"])
               for s in shards.iter_hidden([dirs[True] / e["file"] for e in entries[True]], "fp16")]
    for _ in range(ROUNDS):
        for on, side in ((True, "on"), (False, "off")):
            seconds, written = format_write(dirs[on] / "format", samples, on)
            times[f"format_write_{side}"].append(seconds)
            times[f"format_read_{side}"].append(format_read(dirs[on] / "format", written, on))
    typical = {name: float(np.median(values)) for name, values in times.items()}  # see the module docstring
    figures = {f"{name}_ratio": typical[f"{name}_on"] / typical[f"{name}_off"] for name in names}
    forward = forward_seconds_per_window(data) * WINDOWS
    figures["extract_pass_write_ratio"] = (forward + typical["write_on"]) / (forward + typical["write_off"])
    figures["forward_us_per_window"] = round(1e6 * forward / WINDOWS, 1)
    figures.update({f"rounds_{name}_s": [round(x, 3) for x in values] for name, values in times.items()})
    figures.update({f"{name}_us_per_window_without": round(1e6 * typical[f"{name}_off"] / WINDOWS, 1) for name in names})
    figures.update(windows=WINDOWS, vectors=sum(len(s[1]) for s in samples), d=D, dtype="fp16", shards=len(entries[True]))
    shutil.rmtree(work, ignore_errors=True)
    stage = build_dict_stage_seconds()
    figures["build_dict_stage_ratio"] = float(np.median(stage[True]) / np.median(stage[False]))
    figures["rounds_build_dict_stage_s"] = {str(on): [round(x, 2) for x in values] for on, values in stage.items()}
    return common.record("checksum_cost", figures, {"extract_pass_write_ratio": "<= 1.05",
                                                    "build_dict_stage_ratio": "<= 1.05"})


def build_dict_stage_seconds(rounds: int = 5) -> dict[bool, list[float]]:
    """Wall seconds of the whole build_dict stage (one process, k=20) over the benchmarks' real
    hidden/ (common.teacher_run: 12,000 WordNet documents), reading with checks and without."""
    from dist_sense.config import RunConfig
    from dist_sense.stages.build_dict import stage as build_dict

    source = common.teacher_run() / "hidden"
    run_dir = common.WORK / "checksum_bench_build"
    times: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(rounds):
        for on in (True, False):
            shutil.rmtree(run_dir, ignore_errors=True)
            run_dir.mkdir(parents=True)
            (run_dir / "hidden").symlink_to(source)
            cfg = RunConfig.load(None, [f"run_dir={run_dir}", "kmeans.k=20"])
            with checksums(on):
                start = time.perf_counter()
                build_dict.run(cfg)
                times[on].append(time.perf_counter() - start)
    shutil.rmtree(run_dir, ignore_errors=True)
    return times


if __name__ == "__main__":
    main()
