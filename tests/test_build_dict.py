"""build_dict end to end on a fabricated RUN/hidden/: output, resume, bad input, 1/2/4 MPI ranks, byte-identical
builds on any rank count, a failing MPI job (its report, its /dev/shm), the Slurm script."""
import json
import os
import shutil
import sys
from pathlib import Path

import helpers as testing
import numpy as np
import pytest

from dist_sense.config import RunConfig
from dist_sense.formats import manifest, shards
from dist_sense.formats.dictionary import SenseDictionary, shard_name
from dist_sense.stages.build_dict import stage as build_dict
from dist_sense.stages.build_dict.plan import plan_tiles, read_hidden_manifest
from dist_sense.stages.guard import IdentityError

N_TOKENS, FIRST_TOKEN, VOCAB, D = 20, 5, 40, 8
RARE_TOKEN, FEW_TOKEN = 30, 31  # under min_count; fewer vectors than k
SHM_RECORDER = testing.REPO_ROOT / "tests" / "scripts" / "build_dict_shm_record.py"
"""launcher/build_dict.py behind a note of each rank's /dev/shm files (see recorded_shm)."""


@pytest.fixture(autouse=True)
def one_blas_thread():
    """2 shared cores: spinning BLAS threads only slow the small GEMMs down."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        yield


def token_senses(seed=0):
    """Two or three well-separated true senses for each clustered token."""
    rng = np.random.default_rng(seed)
    return {t: rng.normal(0, 5, (2 + t % 2, D)) for t in range(FIRST_TOKEN, FIRST_TOKEN + N_TOKENS)}


def make_hidden_dir(run_dir: Path, dtype="fp16", samples=24, per_sample=20, extract_ranks=2, seed=0) -> Path:
    """RUN/hidden/ as extract writes it: shards from `extract_ranks` writers plus manifest.json."""
    rng = np.random.default_rng(seed)
    senses = token_senses(seed)
    hidden_dir = run_dir / "hidden"
    writers = [shards.RankShardWriter(hidden_dir, "hidden", r, max_samples=5) for r in range(extract_ranks)]
    kept: dict = {}
    for i in range(samples):
        tokens = rng.integers(FIRST_TOKEN, FIRST_TOKEN + N_TOKENS, per_sample)
        if i == 0:
            tokens[:3] = [RARE_TOKEN, FEW_TOKEN, FEW_TOKEN]
        words = [f"w{t}" for t in tokens]
        starts = np.cumsum([0] + [len(w) + 1 for w in words[:-1]])
        hidden = np.stack([senses[t][rng.integers(len(senses[t]))] if t in senses else np.full(D, float(t)) for t in tokens])
        hidden = hidden + rng.normal(0, 0.05, hidden.shape) * np.isin(tokens, list(senses))[:, None]
        doc = {"doc": i, "window": 0, "start": 0, "text": " ".join(words),
               "spans": [[int(s), int(s) + len(w)] for s, w in zip(starts, words)]}
        writers[i % extract_ranks].write(f"d{i:05d}", shards.hidden_sample(
            shards.encode_hidden(hidden, dtype), tokens, np.arange(1, per_sample + 1), doc))
        for t in tokens.tolist():
            kept[str(t)] = kept.get(str(t), 0) + 1
    for w in writers:
        w.close()
    body = {
        "teacher": "/models/fake", "teacher_fingerprint": "teacher123", "tokenizer_fingerprint": "tok456", "layer": -1,
        "d": D, "dtype": dtype, "vocab_size": VOCAB, "shards": [s for w in writers for s in w.written],
        "kept_per_token": kept, "totals": {"kept": int(sum(kept.values()))},
    }
    manifest.write_manifest(hidden_dir, shards.HIDDEN_FORMAT, shards.HIDDEN_VERSION, body)
    return hidden_dir


def make_config(run_dir: Path, **kmeans) -> RunConfig:
    settings = dict(k=3, tile_tokens=8, subsample=64, min_count=2, max_iter=30, examples_per_sense=2)
    settings.update(kmeans)
    return RunConfig.from_dict({"run_dir": str(run_dir), "kmeans": settings})


def load_arrays(directory: Path) -> dict:
    d = SenseDictionary.load(directory)
    centres, mask, _ = d.padded()
    return {"token_ids": d.token_ids, "num_senses": d.num_senses, "centres": centres, "mask": mask,
            "counts": np.concatenate([d.sense_counts(t) for t in d.token_ids])}


def test_end_to_end_one_rank(tmp_path):
    make_hidden_dir(tmp_path)
    out = build_dict.run(make_config(tmp_path))
    assert out == tmp_path / "dictionary"
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == "dist_sense.dictionary" and index["version"] == 1
    assert index["teacher_fingerprint"] == "teacher123" and index["tokenizer_fingerprint"] == "tok456"
    assert (index["d"], index["layer"], index["hidden_dtype"], index["k_policy"], index["k"]) == (D, -1, "fp16", "fixed", 3)
    assert [s["file"] for s in index["shards"]] == [shard_name(i) for i in range(3)]  # 20 tokens / 8 per tile
    assert index["shards"][0]["first_token"] == FIRST_TOKEN
    totals = index["totals"]
    assert totals["tokens_below_min_count"] == 1 and totals["vectors_below_min_count"] == 1
    assert totals["tokens_kept_as_vectors"] == 1 and totals["tokens"] == N_TOKENS + 1
    assert not (out / ".work").exists()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "tb" / "kmeans"))
    events.Reload()
    assert {"kmeans/inertia", "kmeans/centre_shift", "kmeans/reseeded", "speed/tile_s",
            "speed/allreduce_share"} <= set(events.Tags()["scalars"])
    assert events.Tags()["histograms"] == ["kmeans/senses_per_token"]

    d = SenseDictionary.load(out)
    assert RARE_TOKEN not in d and FEW_TOKEN in d
    assert len(d.senses(FEW_TOKEN)) == 1 and d.sense_counts(FEW_TOKEN).tolist() == [2]  # two equal vectors
    senses = token_senses()
    for t, true in senses.items():  # k=3: each true sense (2 or 3 per token) has a centre next to it
        found = d.senses(t)
        assert len(found) == 3 and d.sense_counts(t).sum() == index_count(tmp_path, t)
        assert np.abs(found[:, None] - true[None]).max(-1).min(0).max() < 0.1
    t = FIRST_TOKEN  # three true senses (2 + t % 2)
    picked = d.nearest(np.full(len(senses[t]), t), senses[t].astype(np.float32), similarity="l2")
    assert sorted(picked.tolist()) == list(range(len(senses[t])))
    examples = d.examples(t)
    assert len(examples) == len(senses[t]) and all(1 <= len(e) <= 2 for e in examples)
    assert all(f"[[w{t}]]" in text for e in examples for text in e)


def index_count(run_dir: Path, token: int) -> int:
    return json.loads((run_dir / "hidden" / "manifest.json").read_text())["kept_per_token"][str(token)]


def test_resume_rebuilds_only_missing_tile(tmp_path):
    make_hidden_dir(tmp_path)
    cfg = make_config(tmp_path)
    out = build_dict.run(cfg)
    before = load_arrays(out)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("senses-*")}
    (out / shard_name(1)).unlink()
    build_dict.run(cfg)
    after = {p.name: p.stat().st_mtime_ns for p in out.glob("senses-*")}
    changed = sorted(name for name in after if after[name] != stamps.get(name))
    assert changed == ["senses-00001.examples.json", shard_name(1)]
    for key, value in load_arrays(out).items():
        np.testing.assert_array_equal(value, before[key], err_msg=key)
    # other settings are refused, naming the difference; --restart-stage moves the old dictionary aside
    with pytest.raises(IdentityError, match=r"kmeans.k: was 3, now 2"):
        build_dict.run(make_config(tmp_path, k=2))
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("senses-*")} == after
    build_dict.run(make_config(tmp_path, k=2), restart=True)
    assert json.loads((out / "index.json").read_text())["k"] == 2
    assert [p.name for p in out.parent.glob("dictionary.replaced-*")]


def test_memory_budgets_rebuild_nothing(tmp_path):
    """The memory section changes how the stage runs, not the settings fingerprint: every shard stays."""
    make_hidden_dir(tmp_path)
    out = build_dict.run(make_config(tmp_path))
    stamps = {p.name: p.stat().st_mtime_ns for p in out.glob("senses-*")}
    settings = json.loads((out / "index.json").read_text())["settings"]
    lean = RunConfig.from_dict({**make_config(tmp_path).to_dict(), "memory": {"spill_mb": 0, "held_results_mb": 0}})
    build_dict.run(lean)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("senses-*")} == stamps
    assert json.loads((out / "index.json").read_text())["settings"] == settings


def test_missing_manifest(tmp_path):
    with pytest.raises(manifest.ManifestError, match=r"hidden/manifest.json: no manifest .*extract"):
        build_dict.run(make_config(tmp_path))


def test_foreign_manifest_version(tmp_path):
    hidden_dir = make_hidden_dir(tmp_path)
    testing.edit_manifest(hidden_dir / "manifest.json", {"version": 99})
    with pytest.raises(manifest.ManifestError, match=r"manifest.json: dist_sense.hidden version 99"):
        build_dict.run(make_config(tmp_path))
    testing.edit_manifest(hidden_dir / "manifest.json", {"version": 1, "format": "dist_sense.labels"})
    with pytest.raises(manifest.ManifestError, match=r"manifest.json: format is 'dist_sense.labels'"):
        build_dict.run(make_config(tmp_path))


def test_corrupted_shard(tmp_path):
    hidden_dir = make_hidden_dir(tmp_path)
    victim = sorted(hidden_dir.glob("hidden-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 3])
    with pytest.raises(shards.ShardError, match=victim.name):
        build_dict.run(make_config(tmp_path))


def test_missing_shard_file(tmp_path):
    hidden_dir = make_hidden_dir(tmp_path)
    victim = sorted(hidden_dir.glob("hidden-*.tar"))[0]
    victim.unlink()
    with pytest.raises(manifest.ManifestError, match=victim.name):
        build_dict.run(make_config(tmp_path))


def test_mcl_and_spherical_run(tmp_path):
    make_hidden_dir(tmp_path, dtype="bf16")
    out = build_dict.run(make_config(tmp_path, k_policy="mcl", spherical=True))
    d = SenseDictionary.load(out)
    index = json.loads((out / "index.json").read_text())
    assert index["k_policy"] == "mcl" and index["k"] is None and index["hidden_dtype"] == "bf16"
    multi = [t for t in d.token_ids if d.num_senses[d.token_to_row[t]] > 1]
    assert multi and all(np.allclose(np.linalg.norm(d.senses(t), axis=1), 1, atol=1e-5) for t in multi)
    # The index has the senses-per-token distribution of what it holds, and the tokens MCL left out.
    histogram = {int(n): t for n, t in index["senses_per_token"].items()}
    per_token = np.bincount(d.num_senses[[d.token_to_row[t] for t in d.token_ids]])
    assert histogram == {n: int(t) for n, t in enumerate(per_token) if t}
    vectors = [int(d.sense_counts(t).sum()) for t in d.token_ids]
    few = sum(0 < v < 5 for v in vectors)
    assert few >= 1 and index["totals"]["tokens_left_out_of_mcl"] == few


@pytest.mark.slow
def test_mpi_ranks_agree(tmp_path):
    """1, 2 and 4 MPI ranks build the same dictionary from the same hidden/ and seed."""
    hidden_dir = make_hidden_dir(tmp_path / "source", samples=30)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(tmp_path).to_dict()))
    results = {}
    for nproc in (1, 2, 4):
        run_dir = tmp_path / f"run{nproc}"
        run_dir.mkdir()
        (run_dir / "hidden").symlink_to(hidden_dir)
        if nproc == 1:  # `mpirun -n 1` takes the same no-MPI path as a plain process: save a launch
            build_dict.run(RunConfig.load(config, [f"run_dir={run_dir}"]))
        else:
            proc = testing.run_mpirun(testing.REPO_ROOT / "launcher" / "build_dict.py",
                                      ["--config", config, f"run_dir={run_dir}"], nproc=nproc, timeout=120)
            assert proc.stdout.strip() == str(run_dir / "dictionary")  # printed once, by rank 0
            assert f"{nproc} ranks on numpy" in proc.stderr
        results[nproc] = load_arrays(run_dir / "dictionary")
    for nproc in (2, 4):
        for key in ("token_ids", "num_senses", "mask", "counts"):
            np.testing.assert_array_equal(results[nproc][key], results[1][key], err_msg=f"{nproc} ranks: {key}")
        np.testing.assert_allclose(results[nproc]["centres"], results[1]["centres"], atol=1e-5, err_msg=f"{nproc} ranks")


@pytest.mark.slow
def test_mpi_bad_input_fails_fast(tmp_path):
    """A corrupted shard read by one rank ends the whole MPI job with the file named, no hang."""
    hidden_dir = make_hidden_dir(tmp_path)
    victim = sorted(hidden_dir.glob("hidden-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    proc = testing.run_mpirun(testing.REPO_ROOT / "launcher" / "build_dict.py", [f"run_dir={tmp_path}"], nproc=2,
                              timeout=60, check=False)
    assert proc.returncode != 0 and victim.name in proc.stdout + proc.stderr


@pytest.mark.slow
def test_slurm_script_local(tmp_path, tiny_bert, toy_corpus):
    """`bash slurm/build_dict.sh` outside Slurm: deepspeed extraction, then mpirun k-means."""
    if not (testing.REPO_ROOT / "launcher" / "extract.py").is_file():
        pytest.skip("launcher/extract.py not built yet")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({
        "run_dir": str(tmp_path / "run"), "model": {"teacher": str(tiny_bert)}, "corpus": {"path": str(toy_corpus)},
        "extract": {"cap": 20}, "kmeans": {"k": 3, "tile_tokens": 16},
    }))
    bin_dir = str(Path(sys.executable).parent)
    env = {"CONFIG": str(config), "NPROC": "2", "PYTHON": sys.executable, "PATH": bin_dir + os.pathsep + os.environ["PATH"]}
    proc = testing.run_command(["bash", "slurm/build_dict.sh", "kmeans.max_iter=20"], timeout=600, env=env, check=False)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    d = SenseDictionary.load(tmp_path / "run" / "dictionary")
    assert len(d) > 10 and d.k_max <= 3
    from transformers import AutoTokenizer

    d.check_tokenizer(AutoTokenizer.from_pretrained(tiny_bert))
    shutil.rmtree(tmp_path / "run")


@pytest.mark.slow
def test_killed_rank_then_rerun_gives_byte_identical_dictionary(tmp_path):
    """Rank 1 dies like kill -9 after its second tile (the first it writes itself); the rerun's files equal an uninterrupted run's."""
    hidden_dir = make_hidden_dir(tmp_path / "source", samples=30)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(tmp_path).to_dict()))
    script = testing.REPO_ROOT / "launcher" / "build_dict.py"
    runs = {}
    for name in ("whole", "crashed"):
        run_dir = tmp_path / name
        run_dir.mkdir()
        (run_dir / "hidden").symlink_to(hidden_dir)
        args = ["--config", config, f"run_dir={run_dir}"]
        if name == "crashed":
            # Tiles written as they finish (no held batch), so some are on disk at the kill; the
            # rerun and the whole run hold them in one batch: the files must not differ.
            record = run_dir / "shm-record"
            record.mkdir()
            env = {"DIST_SENSE_CRASH": "build_dict.tile:2:1", "SHM_RECORD": str(record)}
            proc = testing.run_mpirun(SHM_RECORDER, [*args, "memory.held_results_mb=0"], nproc=2, timeout=120,
                                      check=False, env=env)
            for leftover in recorded_shm(record):  # no rank of a killed job lives to remove its MPICH segment
                leftover.unlink(missing_ok=True)
            assert proc.returncode != 0 and not (run_dir / "dictionary" / "index.json").exists()
            assert list((run_dir / "dictionary").glob("senses-*.safetensors")), "no tile finished before the kill"
        testing.run_mpirun(script, args, nproc=2, timeout=120)
        runs[name] = run_dir / "dictionary"
    files = sorted(p.name for p in runs["whole"].iterdir() if p.is_file() and p.name != "index.json")
    assert files == sorted(p.name for p in runs["crashed"].iterdir() if p.is_file() and p.name != "index.json")
    for name in files:
        assert (runs["whole"] / name).read_bytes() == (runs["crashed"] / name).read_bytes(), name


def test_reading_is_cut_into_units_in_shard_name_order():
    from dist_sense.stages.build_dict.spill import work_units

    counts = [("hidden-r001-000000.tar", 5), ("hidden-r000-000000.tar", 300), ("hidden-r000-000001.tar", 0)]
    assert work_units(counts, 128) == [("hidden-r000-000000.tar", 0, 128), ("hidden-r000-000000.tar", 128, 256),
                                       ("hidden-r000-000000.tar", 256, 300), ("hidden-r001-000000.tar", 0, 5)]
    # Units that start in the last 100 samples (sample 205 on, counting both files) hold at most 32.
    assert work_units(counts, 128, tail_samples=100, tail_unit=32) == [
        ("hidden-r000-000000.tar", 0, 128), ("hidden-r000-000000.tar", 128, 256), ("hidden-r000-000000.tar", 256, 288),
        ("hidden-r000-000000.tar", 288, 300), ("hidden-r001-000000.tar", 0, 5)]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 3])
def test_shared_counter_gives_each_number_to_one_rank(tmp_path, nproc):
    """Ranks claim 0..N-1 exactly once between them; the fast ranks claim more than the slow rank 0."""
    out = tmp_path / "claims.json"
    testing.run_mpirun("tests/scripts/mpi_work_counter.py", [out, 120], nproc=nproc, timeout=120)
    claims = json.loads(out.read_text())
    assert sorted(n for mine in claims for n in mine) == list(range(120))
    if nproc > 1:
        assert len(claims[0]) < min(len(mine) for mine in claims[1:])


def test_sample_offsets_match_tarfile_and_reading_can_start_mid_shard(tmp_path):
    writer = shards.RankShardWriter(tmp_path, "hidden", 0, max_samples=10)
    for i in range(6):
        writer.write(f"{i:05d}", shards.hidden_sample(np.full((i + 1, 4), i, np.float32), np.arange(i + 1),
                                                      np.arange(i + 1), {"text": "x" * 700 * i}))
    writer.close()
    path = tmp_path / writer.written[0]["file"]
    offsets = shards.sample_offsets(path)
    assert offsets == shards._tarfile_sample_offsets(path) and len(offsets) == 6
    middle = list(shards.iter_hidden_range(path, 2, 5, "fp32", offsets))
    assert [s["key"] for s in middle] == ["00002", "00003", "00004"] and middle[1]["hidden"][0, 0] == 3


def test_a_shard_shorter_than_its_manifest_count_is_named(tmp_path):
    writer = shards.RankShardWriter(tmp_path, "hidden", 0, max_samples=10)
    for i in range(3):
        writer.write(f"{i:05d}", shards.hidden_sample(np.zeros((2, 4), np.float32), np.arange(2), np.arange(2), {}))
    writer.close()
    path = tmp_path / writer.written[0]["file"]
    assert [s["key"] for s in shards.iter_hidden_range(path, 1, 3, "fp32")] == ["00001", "00002"]
    with pytest.raises(shards.ShardError, match=f"{path.name}: holds 3 samples, the manifest says at least 5"):
        list(shards.iter_hidden_range(path, 2, 5, "fp32"))

@pytest.mark.parametrize("memory_bytes", [0, 20_000])
def test_tile_rows_are_the_same_spilled_or_held_in_memory(tmp_path, monkeypatch, memory_bytes):
    """Spilling everything, or part (a budget crossed mid-read), reads back the rows kept in memory alone."""
    from dist_sense.stages.build_dict import spill as tile_spill
    from dist_sense.stages.build_dict.spill import TileSpill, work_units

    monkeypatch.setattr(tile_spill, "SPILL_BATCH_BYTES", 10_000)  # batches far smaller than the test's data
    hidden_dir = make_hidden_dir(tmp_path / "run")
    cfg = make_config(tmp_path / "run")
    hidden = read_hidden_manifest(hidden_dir)
    plan = plan_tiles(hidden, cfg.kmeans)
    units = [(hidden_dir / f, a, b) for f, a, b in work_units([(s["file"], s["samples"]) for s in hidden["shards"]], 4)]
    todo = list(range(len(plan.tiles)))

    def tiles(budget, name):
        spill = TileSpill(tmp_path / name, hidden["dtype"], int(hidden["d"]), budget)
        spill.fill(units, plan, todo, seed=0)
        files = len(list((tmp_path / name).glob("tile-*.vec")))
        out = []
        for tile in todo:
            rows, meta = spill.read(tile)
            order = np.argsort(meta["priority"])
            out.append((rows[order], meta[order]))
        return out, files

    held, held_files = tiles(1 << 30, "held")
    spilled, spilled_files = tiles(memory_bytes, "spilled")
    assert held_files == 0 and spilled_files > 0 and len(held) > 1
    for (rows_a, meta_a), (rows_b, meta_b) in zip(held, spilled):
        np.testing.assert_array_equal(rows_a, rows_b)
        np.testing.assert_array_equal(meta_a, meta_b)


# ----------------------------------------------------------------------------- determinism


def test_examples_do_not_depend_on_the_order_candidates_arrive_in():
    """Equal distances (and equal priorities) are ranked by priority, then identity: never by rank or arrival."""
    from dist_sense.stages.build_dict.finish import CANDIDATE, EXAMPLE_ORDER, pick_examples

    rng = np.random.default_rng(0)
    offered = np.zeros(60, CANDIDATE)
    offered["tile"], offered["slot"], offered["label"] = 3, np.arange(60) % 2, np.arange(60) // 2 % 3
    offered["distance"] = np.float32(0.25)  # every candidate ties on distance
    offered["priority"] = rng.integers(0, 3, 60)  # and many on priority too
    offered["origin"] = (rng.integers(0, 2, 60) << 32) | rng.integers(0, 4, 60)
    offered["occurrence"] = np.arange(60)  # identities differ
    offered["rank"], offered["sample"] = rng.integers(0, 4, 60), np.arange(60)  # where it came from: not a key
    key = [tuple(record[name].item() for name in EXAMPLE_ORDER) for record in offered]
    expected = []
    for group in sorted({k[:3] for k in key}):
        expected += sorted((k for k in key if k[:3] == group))[:2]
    for _ in range(5):
        arrived = offered[rng.permutation(60)]
        picked = pick_examples(arrived, 2)
        assert [tuple(record[name].item() for name in EXAMPLE_ORDER) for record in picked] == expected
        assert picked.tobytes() == pick_examples(offered, 2).tobytes()  # the same records, rank fields and all


def test_each_rank_offers_its_nearest_rows_by_the_same_ranking():
    """A rank's own preselection breaks ties like the final pick: distance, priority, then the given identities."""
    from types import SimpleNamespace

    from dist_sense import kmeans

    slots = np.zeros(6, np.int64)
    local = SimpleNamespace(slots=slots, priority=np.array([5, 5, 5, 5, 1, 9], np.uint64))
    result = SimpleNamespace(labels=np.zeros(6, np.int64), distances=np.array([1, 1, 1, 1, 2, 1], np.float32))
    origin, occurrence = np.array([7, 3, 3, 2, 0, 0]), np.array([0, 4, 1, 9, 0, 0])
    picked = kmeans.nearest_rows_per_sense(local, result, 3, ties=(origin, occurrence))
    assert picked.tolist() == [3, 2, 1]  # distance 1 and priority 5, by (origin, occurrence)


@pytest.mark.slow
def test_clean_builds_on_one_and_two_ranks_are_byte_identical(tmp_path):
    """Two clean 2-rank builds (which share the reading as their claims fall) and a 1-rank build of one hidden/
    write the same bytes in every file of dictionary/: shards, example contexts, index.json."""
    hidden_dir = make_hidden_dir(tmp_path / "source", samples=30)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(tmp_path).to_dict()))
    run_dir = tmp_path / "run"  # every build in the same place: index.json names the hidden manifest's path
    builds = []
    for nproc in (2, 1, 2):
        run_dir.mkdir()
        (run_dir / "hidden").symlink_to(hidden_dir)
        if nproc == 1:
            build_dict.run(RunConfig.load(config, [f"run_dir={run_dir}"]))
        else:
            testing.run_mpirun(testing.REPO_ROOT / "launcher" / "build_dict.py",
                               ["--config", config, f"run_dir={run_dir}"], nproc=nproc, timeout=120)
        builds.append(run_dir.rename(tmp_path / f"build-{len(builds)}") / "dictionary")
    files = sorted(p.name for p in builds[0].iterdir())
    assert "index.json" in files and len([name for name in files if name.endswith(".examples.json")]) == 3
    for other in builds[1:]:
        assert sorted(p.name for p in other.iterdir()) == files
        for name in files:
            assert (other / name).read_bytes() == (builds[0] / name).read_bytes(), f"{other.parent.name}: {name}"


# ----------------------------------------------------------------------------- a failing MPI job


def test_only_the_mpich_files_this_process_maps_are_removed(tmp_path, monkeypatch):
    import mmap

    from dist_sense.comm import mpi

    monkeypatch.setattr(mpi, "SHM_DIR", tmp_path)  # never /dev/shm itself: other jobs' files live there
    mine, unmapped, foreign = tmp_path / "mpich_shm_1a2b_0", tmp_path / "mpich_shm_3c4d_0", tmp_path / "other_0"
    for path in (mine, unmapped, foreign):
        path.write_bytes(bytes(4096))
    with open(mine, "r+b") as f, mmap.mmap(f.fileno(), 4096) as _, open(foreign, "r+b") as g, \
            mmap.mmap(g.fileno(), 4096) as _:
        assert mpi.own_mpich_shm() == [mine]
        assert mpi.remove_own_mpich_shm() == [mine]
        assert mpi.own_mpich_shm() == []  # the mapping stays, its name is gone
    assert not mine.exists() and unmapped.exists() and foreign.exists()


def recorded_shm(record: Path) -> set[Path]:
    """The /dev/shm files the ranks of a SHM_RECORDER job had mapped (their own job's, whatever else runs)."""
    return {Path(line) for f in record.glob("rank-*.txt") for line in f.read_text().split()}


def run_failing_job(run_dir: Path, env: dict, args=()):
    """launcher/build_dict.py on 2 MPI ranks that fails: (process, seconds, the job's MPICH files in /dev/shm)."""
    import time

    record = run_dir / "shm-record"
    record.mkdir()
    started = time.monotonic()
    proc = testing.run_mpirun(SHM_RECORDER, [*args, f"run_dir={run_dir}"], nproc=2, timeout=90, check=False,
                              env={"SHM_RECORD": str(record), **env})
    job_files = recorded_shm(record)
    assert len(list(record.glob("rank-*.txt"))) == 2 and any(p.name.startswith("mpich_shm_") for p in job_files)
    return proc, time.monotonic() - started, job_files


@pytest.mark.slow
def test_mpi_bug_keeps_its_traceback_and_leaves_no_shared_memory(tmp_path):
    """A bug on rank 1 (planted after its first tile) ends the job at once, with its traceback, and the abort
    removes the job's MPICH segment from /dev/shm (an aborted MPICH job leaves it otherwise)."""
    make_hidden_dir(tmp_path)
    config = tmp_path / "config.json"
    config.write_text(json.dumps(make_config(tmp_path).to_dict()))
    proc, seconds, job_files = run_failing_job(tmp_path, {"DIST_SENSE_BUG": "build_dict.tile:1:1"},
                                               ["--config", config])
    out = proc.stdout + proc.stderr
    assert proc.returncode not in (0, 2) and seconds < 60, out[-3000:]
    assert "error [rank 1]: a bug, not an input error" in out and out.count("Traceback (most recent call last)") == 1
    assert "PlantedBug: planted bug at build_dict.tile" in out
    assert not [p for p in job_files if p.exists()]
    assert not (tmp_path / "dictionary" / "index.json").exists()


@pytest.mark.slow
def test_mpi_input_error_is_one_line_with_exit_code_2_and_leaves_no_shared_memory(tmp_path):
    import re

    hidden_dir = make_hidden_dir(tmp_path)
    victim = sorted(hidden_dir.glob("hidden-*.tar"))[1]
    victim.write_bytes(victim.read_bytes()[:1000])
    proc, seconds, job_files = run_failing_job(tmp_path, {})
    out = proc.stdout + proc.stderr
    errors = re.findall(r"error \[rank \d\]: .*", out)
    assert proc.returncode == 2 and seconds < 60, out[-3000:]
    assert len(errors) == 1 and victim.name in errors[0] and "Traceback" not in out, out[-3000:]
    assert not [p for p in job_files if p.exists()]
