"""Stage 3 (training) on the tiny models: labels reader, batch settings, ZeRO-2 runs, resume, errors."""
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import helpers as testing
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from dist_sense.comm import DistEnv
from dist_sense.config import ConfigError, RunConfig
from dist_sense.formats.dictionary import SenseDictionary
from dist_sense.formats.labels import (
    LabelData,
    LabelsError,
    is_held_out,
    read_labels_manifest,
    read_samples,
    shard_keys,
)
from dist_sense.formats.manifest import ManifestError
from dist_sense.model.losses import sense_kd_loss
from dist_sense.model.student import build_student, load_student
from dist_sense.stages.distill import checkpoints
from dist_sense.stages.distill import stage as distill

sys.path.insert(0, str(Path(__file__).parent / "scripts"))
import distill_fixtures  # noqa: E402

SCRIPT = "launcher/distill.py"
SETTINGS = {"distill.layers": 1, "distill.steps": 20, "distill.global_batch_size": 8, "distill.micro_batch_size": 4,
            "distill.eval_every": 10, "distill.save_every": 5, "distill.eval_fraction": 0.1, "distill.lr": 3e-3,
            "distill.warmup_steps": 2}


def args_for(run_dir, teacher, **extra):
    values = {"run_dir": run_dir, "model.teacher": teacher, **SETTINGS, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def config_for(run_dir, teacher, **extra) -> RunConfig:
    return RunConfig.load(None, args_for(run_dir, teacher, **extra))


def copy_inputs(source: Path, run_dir: Path) -> Path:
    for part in ("dictionary", "labels"):
        shutil.copytree(source / part, run_dir / part)
    return run_dir


def metrics(run_dir, student: str = "student") -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / student / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["loss/kd"] for m in metrics(run_dir) if "loss/kd" in m}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_llama):
    """RUN/dictionary and RUN/labels for the tiny Llama (48 toy documents, 3 senses a token)."""
    return distill_fixtures.make_run(tmp_path_factory.mktemp("inputs"), tiny_llama)


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory, inputs, tiny_llama):
    run_dir = copy_inputs(inputs, tmp_path_factory.mktemp("two_ranks"))
    testing.run_deepspeed(SCRIPT, args_for(run_dir, tiny_llama), nproc=2, timeout=300)
    return run_dir


# ----------------------------------------------------------------------------- in one process


def test_batch_settings_divide_or_name_the_fields():
    cfg = RunConfig()
    cfg.distill.global_batch_size, cfg.distill.micro_batch_size = 16, 4
    assert cfg.distill.batch_split(1) == (4, 4)
    assert cfg.distill.batch_split(2) == (4, 2)
    assert cfg.distill.batch_split(4) == (4, 1)
    with pytest.raises(ConfigError, match=r"distill.global_batch_size=16 .* distill.micro_batch_size=4 x world size 8"):
        cfg.distill.batch_split(8)
    cfg.distill.micro_batch_size = 3
    with pytest.raises(ConfigError, match=r"distill.micro_batch_size=3 x world size 2"):
        cfg.distill.batch_split(2)


def test_lr_schedule_warms_up_then_decays():
    factors = [distill.lr_factor(s, warmup=4, total=20) for s in range(21)]
    assert factors[:4] == [0.25, 0.5, 0.75, 1.0] and factors[4] == 1.0
    assert all(a >= b for a, b in zip(factors[4:], factors[5:]))
    assert factors[20] == pytest.approx(distill.MIN_LR_RATIO)


def test_engine_config_fills_batches_and_resolves_auto(tmp_path):
    cfg = RunConfig()
    ds = distill.engine_config(cfg, micro=4, accum=2)
    assert ds["bf16"]["enabled"] is torch.cuda.is_available() and ds["zero_optimization"]["stage"] == 2
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (4, 2, 16)
    assert ds["optimizer"]["params"]["torch_adam"] is True and ds["optimizer"]["params"]["lr"] == cfg.distill.lr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 2}}))
    cfg.distill.ds_config = str(bad)
    with pytest.raises(ConfigError, match=r"bad.json: 'train_batch_size' is set from distill"):
        distill.engine_config(cfg, 4, 2)


def test_label_data_ranks_share_out_whole_steps(inputs):
    manifest = read_labels_manifest(inputs / "labels")
    one = LabelData(inputs / "labels", manifest, 0, 1, 4, global_batch=8, seed=3, eval_fraction=0.1)
    ranks = [LabelData(inputs / "labels", manifest, r, 2, 4, global_batch=8, seed=3, eval_fraction=0.1) for r in (0, 1)]
    assert one.micro_per_epoch == 2 * ranks[0].micro_per_epoch and one.n_train % 8 < 8
    for _ in range(one.micro_per_epoch // 2 * 3):  # three epochs of steps: one rank's two micro-batches = the two ranks'
        for r in range(2):
            torch.testing.assert_close(one.next_batch(), ranks[r].next_batch())
    held = {key for _, key in one.eval_keys}
    train = {key for keys in one.train_keys for key in keys}
    assert held and not held & train and all(is_held_out(k, 0.1) for k in held)
    order0, order1 = one.epoch_order(0), one.epoch_order(1)
    assert order0 != order1 and sorted(order0) != order0 and len(order0) % 8 == 0
    assert order0 == LabelData(inputs / "labels", manifest, 0, 1, 4, global_batch=8, seed=3,
                               eval_fraction=0.1).epoch_order(0)
    batch = one.next_batch()
    assert set(batch) == {"input_ids", "attention_mask", "targets"}
    assert torch.all(batch["targets"][batch["attention_mask"] == 0] == -1)


def test_label_data_length_groups_keep_each_shards_windows_and_pad_less(inputs):
    manifest = read_labels_manifest(inputs / "labels")

    def with_shards(data: LabelData, lengths: list[list[int]]) -> LabelData:
        # Label shards of a real size (the fixture's hold a few windows each): keys and index entries whose
        # input_ids member sizes are those of int32 arrays of the given lengths (a 128-byte npy header).
        data.shards = [f"s{i}" for i in range(len(lengths))]
        data.train_keys = [[f"{i:03d}_{j:04d}" for j in range(len(ls))] for i, ls in enumerate(lengths)]
        data.index = [{k: {"input_ids": (0, 128 + 4 * n, None)} for k, n in zip(keys, ls)}
                      for keys, ls in zip(data.train_keys, lengths)]
        data.micro_per_epoch = sum(map(len, lengths)) // 8 * 2
        return data

    rng = np.random.default_rng(0)
    lengths = [rng.integers(5, 60, 403).tolist(), rng.integers(5, 60, 397).tolist()]
    size = {(s, k): n for s, ls in enumerate(lengths) for k, n in zip([f"{s:03d}_{j:04d}" for j in range(len(ls))], ls)}
    make = lambda groups: with_shards(LabelData(inputs / "labels", manifest, 0, 1, 4, global_batch=8, seed=3,  # noqa: E731
                                                eval_fraction=0.1, group_steps=groups), lengths)
    a, b = make(0).epoch_order(0), make(5).epoch_order(0)
    # The same number of distinct training windows (the epoch is cut to whole steps either way), reordered.
    assert len(a) == len(b) == len(set(b)) == 800 and set(b) <= set(size) and a != b
    # Each shard's windows stay contiguous (one read per shard), in the same shard order.
    assert [s for i, (s, _) in enumerate(b) if i == 0 or b[i - 1][0] != s] == \
        [s for i, (s, _) in enumerate(a) if i == 0 or a[i - 1][0] != s]

    def padding(order):  # padded minus real tokens over the epoch's micro-batches of 4
        return sum(4 * max(size[p] for p in order[i:i + 4]) - sum(size[p] for p in order[i:i + 4])
                   for i in range(0, len(order), 4))
    assert padding(b) < 0.3 * padding(a), (padding(a), padding(b))
    assert b == make(5).epoch_order(0) and b != make(5).epoch_order(1)


def test_label_data_position_restores_the_next_batch(inputs):
    manifest = read_labels_manifest(inputs / "labels")
    data = LabelData(inputs / "labels", manifest, 1, 2, 4, global_batch=8, eval_fraction=0.1)
    for _ in range(data.micro_per_epoch + 1):  # into the second epoch
        data.next_batch()
    position = data.position()
    expected = [data.next_batch() for _ in range(3)]
    again = LabelData(inputs / "labels", manifest, 1, 2, 4, global_batch=8, eval_fraction=0.1)
    again.restore(json.loads(json.dumps(position)))
    for batch in expected:
        torch.testing.assert_close(again.next_batch(), batch)
    with pytest.raises(LabelsError, match="not a whole number"):
        again.restore({"epoch": 0, "samples": 3})


def test_labels_from_another_dictionary_are_refused(inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path)
    index = run_dir / "dictionary" / "index.json"
    original = index.read_text()
    testing.edit_manifest(index, {"kmeans": "rebuilt"})  # another dictionary: another fingerprint
    made_with = read_labels_manifest(run_dir / "labels")["dictionary_fingerprint"]
    with pytest.raises(LabelsError) as err:
        distill.prepare(config_for(run_dir, tiny_llama), world_size=2)
    message = str(err.value)
    assert made_with in message and str(index) in message and str(run_dir / "labels" / "manifest.json") in message

    index.write_text(original)
    labels_manifest = run_dir / "labels" / "manifest.json"
    testing.edit_manifest(labels_manifest, {"tokenizer_fingerprint": "feedface"})
    with pytest.raises(LabelsError, match=r"tokenizer fingerprint feedface, but .*index.json has [0-9a-f]{16}"):
        distill.prepare(config_for(run_dir, tiny_llama), world_size=2)


def test_missing_or_unusable_inputs_are_named(inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path)
    with pytest.raises(ConfigError, match=r"distill.global_batch_size=8 .* distill.micro_batch_size=4 x world size 4"):
        distill.prepare(config_for(run_dir, tiny_llama), world_size=4)
    with pytest.raises(LabelsError, match=r"labels/manifest.json: distill.loss=mse .* label.store_hidden=true"):
        distill.prepare(config_for(run_dir, tiny_llama, **{"distill.loss": "mse"}), world_size=2)
    (run_dir / "labels" / "manifest.json").unlink()
    with pytest.raises(ManifestError, match=r"labels/manifest.json: no manifest \(run label first"):
        distill.prepare(config_for(run_dir, tiny_llama), world_size=2)


def test_sigterm_only_sets_a_flag_while_installed():
    before = signal.getsignal(signal.SIGTERM)
    with distill.StopOnSignal() as stop:
        assert stop.flag() == 0.0
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.05)  # the handler runs between bytecodes of the main thread
        assert stop.received and stop.flag() == 1.0
    assert signal.getsignal(signal.SIGTERM) is before
    try:  # after a stop the handler stays: the ranks are exiting, a launcher's second SIGTERM must not kill them
        with pytest.raises(SystemExit) as exit_info, distill.StopOnSignal():
            raise distill.stopped(7, 1)
        assert exit_info.value.code == distill.STOPPED_EXIT_CODE == 3
        assert signal.getsignal(signal.SIGTERM) is not before
    finally:
        signal.signal(signal.SIGTERM, before)


# ----------------------------------------------------------------------------- real DeepSpeed runs


def training_agreement(run_dir, student) -> float:
    """Top-1 sense agreement of `student` on every training window."""
    dictionary = SenseDictionary.load(run_dir / "dictionary")
    centres, mask, rows = (torch.from_numpy(np.asarray(a)) for a in dictionary.padded(np))
    hits = total = 0
    labels = run_dir / "labels"
    for entry in read_labels_manifest(labels)["shards"]:
        keys = [k for k in shard_keys(labels / entry["file"]) if not is_held_out(k, SETTINGS["distill.eval_fraction"])]
        for sample in read_samples(labels / entry["file"], set(keys)).values():
            ids = torch.from_numpy(sample["input_ids"].astype(np.int64))[None]
            with torch.no_grad():
                states = student.eval()(ids, torch.ones_like(ids))
            _, stats = sense_kd_loss(states, ids, torch.from_numpy(sample["senses"].astype(np.int64))[None],
                                     centres, mask, rows)
            hits, total = hits + int(stats["correct_top1"]), total + int(stats["n"])
    return hits / total


@pytest.mark.slow
def test_twenty_steps_on_two_ranks_learn_the_senses(two_rank_run, tiny_llama):
    losses = train_losses(two_rank_run)
    assert sorted(losses) == list(range(1, 21))
    first, last = np.mean([losses[s] for s in (1, 2, 3)]), np.mean([losses[s] for s in (18, 19, 20)])
    assert last < 0.6 * first, losses
    chance = distill_fixtures.chance_agreement(two_rank_run)
    cfg = config_for(two_rank_run, tiny_llama)
    torch.manual_seed(0)
    before = training_agreement(two_rank_run, build_student(cfg, 32))
    after = training_agreement(two_rank_run, load_student(two_rank_run / "student" / "final"))
    print(f"loss {first:.3f} -> {last:.3f}; training agreement {before:.3f} -> {after:.3f}; chance {chance:.3f}")
    assert after > before + 0.05 and after > chance + 0.3
    evals = [m for m in metrics(two_rank_run) if "eval/top1" in m]
    assert [m["step"] for m in evals] == [0, 10, 20]
    info = json.loads((two_rank_run / "student" / "final" / "student.json").read_text())
    assert info["steps"] == 20 and info["identity"]["layers"] == 1
    assert sorted(p.name for p in (two_rank_run / "student" / "checkpoints").glob("step*")) == ["step15", "step20"]
    assert list((two_rank_run / "tb" / "distill").glob("events.out.tfevents.*"))
    assert all("grad_norm" in m and "speed/tokens_per_s" in m for m in metrics(two_rank_run) if "loss/kd" in m)


@pytest.mark.slow
def test_one_step_on_two_ranks_equals_one_step_on_one_rank(tiny_llama, tmp_path):
    # Soft targets here (KL to the teacher's top 2), so the KL path runs under ZeRO-2 on 1 and 2 ranks.
    inputs = distill_fixtures.make_run(tmp_path / "inputs", tiny_llama, soft_topk=2, temperature=2.0)
    one_step = {"distill.steps": 1, "distill.eval_every": 0}
    one = copy_inputs(inputs, tmp_path / "one")
    two = copy_inputs(inputs, tmp_path / "two")
    testing.run_command(["python", SCRIPT, *args_for(one, tiny_llama, **one_step)], timeout=300)  # micro 4 x 2 accum
    testing.run_deepspeed(SCRIPT, args_for(two, tiny_llama, **one_step), nproc=2, timeout=300)  # micro 4 x 2 ranks
    a = load_file(one / "student" / "final" / "model.safetensors")
    b = load_file(two / "student" / "final" / "model.safetensors")
    start = load_file(tiny_llama / "model.safetensors")
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], start[k]) for k in a), "the step changed nothing"
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)
    assert train_losses(one)[1] == pytest.approx(train_losses(two)[1], rel=1e-6)


@pytest.mark.slow
def test_killed_run_resumes_where_it_stopped(two_rank_run, inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path)
    args = args_for(run_dir, tiny_llama)
    crashed = testing.run_deepspeed(SCRIPT, args, nproc=2, timeout=300, check=False,
                                    env={"DIST_SENSE_CRASH": "distill.step:7"})
    assert crashed.returncode != 0
    ckpt = run_dir / "student" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step5" and not (run_dir / "student" / "final").exists()
    resumed = testing.run_deepspeed(SCRIPT, args, nproc=2, timeout=300)
    assert "resumed from" in resumed.stderr and "at step 5" in resumed.stderr
    assert_finished_like(run_dir, two_rank_run)  # each step logged once, the uncommitted ones replaced


def copy_finished_run(source: Path, inputs: Path, run_dir: Path) -> Path:
    """A copy of a finished run's inputs, checkpoints and metrics (not its final student)."""
    copy_inputs(inputs, run_dir)
    shutil.copytree(source / "student" / "checkpoints", run_dir / "student" / "checkpoints")
    shutil.copy(source / "student" / "metrics.jsonl", run_dir / "student" / "metrics.jsonl")
    shutil.copy(source / "student" / "identity.json", run_dir / "student" / "identity.json")
    return run_dir


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


def corrupt_inside(path: Path) -> None:
    """Overwrite the start of the pickle in a torch.save archive: same size, readable index, fails to load."""
    with zipfile.ZipFile(path) as archive:
        entry = next(info for info in archive.infolist() if info.filename.endswith("data.pkl"))
    with open(path, "r+b") as f:
        f.seek(entry.header_offset + 26)  # the local header's name and extra-field lengths
        name_length, extra_length = struct.unpack("<HH", f.read(4))
        f.seek(entry.header_offset + 30 + name_length + extra_length)
        f.write(b"\xff" * 16)


def assert_finished_like(run_dir: Path, reference: Path) -> None:
    """Every step logged once, and the final student that of the uninterrupted `reference` run."""
    assert [m["step"] for m in metrics(run_dir) if "loss/kd" in m] == list(range(1, 21))
    expected, got = train_losses(reference), train_losses(run_dir)
    for step in range(1, 21):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    a = load_file(run_dir / "student" / "final" / "model.safetensors")
    b = load_file(reference / "student" / "final" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_checkpoint_choice_needs_every_rank_and_names_what_is_wrong(two_rank_run, tmp_path, monkeypatch):
    ckpt = shutil.copytree(two_rank_run / "student" / "checkpoints", tmp_path / "checkpoints")
    views = [checkpoints.inspect_checkpoints(ckpt, rank, 2) for rank in (0, 1)]
    assert views[0] == views[1] == {"step15": None, "step20": None}
    marker = json.loads((ckpt / "step20" / checkpoints.COMPLETE_MARKER).read_text())
    assert marker["step"] == 20 and marker["world_size"] == 2 and (ckpt / "latest").read_text() == "step20"
    # Rank 1's optimizer partition damaged in place (same size): only rank 1 reads it, and all skip step20.
    partition = next(ckpt.glob("step20/*zero_pp_rank_1_*optim_states.pt"))
    with open(partition, "r+b") as f:
        f.seek(-200, os.SEEK_END)
        f.write(b"\0" * 200)
    views = [checkpoints.inspect_checkpoints(ckpt, rank, 2) for rank in (0, 1)]
    assert views[0]["step20"] is None and "not a readable torch file" in views[1]["step20"]
    usable, problems = checkpoints.usable_tags(views)
    assert usable == ["step15"] and problems["step20"][0].startswith(f"rank 1: {partition.name} is not a readable")
    assert "written by 2 ranks, this run has 4" in checkpoints.inspect_checkpoints(ckpt, 0, 4)["step15"]
    # `latest` naming a deleted directory; a save cut short (no marker) is reported but is no checkpoint.
    shutil.rmtree(ckpt / "step20")
    (ckpt / "step25").mkdir()
    usable, problems = checkpoints.usable_tags([checkpoints.inspect_checkpoints(ckpt, 0, 2)])
    assert usable == ["step15"]
    assert problems == {"step25": [checkpoints.UNFINISHED], "step20": ["named by `latest`, but its directory is missing"]}
    truncate(next(ckpt.glob("step15/*model_states.pt")))
    monkeypatch.setattr(checkpoints.comm, "detect", lambda: DistEnv(0, 0, 2, "test"))  # rank 0 of 2, alone
    with pytest.raises(distill.CheckpointError) as err:
        checkpoints.resume(None, ckpt, {}, None)
    message = str(err.value)
    assert message.startswith(f"{ckpt}: no checkpoint can be resumed") and f"delete {ckpt}" in message
    assert "step20: named by `latest`" in message and re.search(r"step15: mp_rank_00_model_states.pt is \d+ bytes", message)
    shutil.rmtree(ckpt / "step15")
    (ckpt / "latest").write_text("step25")  # a directory without marker that `latest` names is a checkpoint
    with pytest.raises(distill.CheckpointError, match=r"step25: no dist_sense_complete.json, yet `latest` names it"):
        checkpoints.resume(None, ckpt, {}, None)
    (ckpt / "latest").unlink()
    assert checkpoints.resume(None, ckpt, {}, None) == 0  # only an unfinished save: start from scratch
    assert checkpoints.resume(None, tmp_path / "none", {}, None) == 0


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["truncated", "deleted", "rank1_corrupted"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous(two_rank_run, inputs, tiny_llama, tmp_path, damage):
    run_dir = copy_finished_run(two_rank_run, inputs, tmp_path / "run")
    ckpt = run_dir / "student" / "checkpoints"
    if damage == "truncated":
        for path in (ckpt / "step20").glob("*.pt"):
            truncate(path)
    elif damage == "deleted":
        shutil.rmtree(ckpt / "step20")  # `latest` still names it
    else:  # passes the checks before loading; only rank 1 reads this file, and fails
        corrupt_inside(next(ckpt.glob("step20/*zero_pp_rank_1_*optim_states.pt")))
    proc = testing.run_deepspeed(SCRIPT, args_for(run_dir, tiny_llama), nproc=2, timeout=300)
    skipped = [line for line in proc.stderr.splitlines() if "skipping checkpoint" in line]
    assert skipped and all(str(ckpt / "step20") in line for line in skipped), proc.stderr[-3000:]
    why = {"truncated": r"\.pt is \d+ bytes, \d+ when saved", "deleted": "named by `latest`, but its directory is missing",
           "rank1_corrupted": r"step20: rank 1: \w+(Error|Exception): "}[damage]
    assert all(re.search(why, line) for line in skipped), skipped
    assert f"resumed from {ckpt / 'step15'} at step 15" in proc.stderr
    assert_finished_like(run_dir, two_rank_run)
    assert (ckpt / "latest").read_text() == "step20" and (ckpt / "step20" / checkpoints.COMPLETE_MARKER).is_file()


@pytest.mark.slow
def test_crash_while_saving_leaves_no_checkpoint_that_looks_complete(two_rank_run, inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path)
    args = args_for(run_dir, tiny_llama)
    crashed = testing.run_deepspeed(SCRIPT, args, nproc=2, timeout=300, check=False,
                                    env={"DIST_SENSE_CRASH": "distill.save:2"})  # step10's files written, no marker
    assert crashed.returncode != 0
    ckpt = run_dir / "student" / "checkpoints"
    assert (ckpt / "latest").read_text() == "step5" and any((ckpt / "step10").glob("*.pt"))
    assert not (ckpt / "step10" / checkpoints.COMPLETE_MARKER).exists()
    resumed = testing.run_deepspeed(SCRIPT, args, nproc=2, timeout=300)
    assert f"skipping checkpoint {ckpt / 'step10'}: {checkpoints.UNFINISHED}" in resumed.stderr
    assert f"resumed from {ckpt / 'step5'} at step 5" in resumed.stderr
    assert_finished_like(run_dir, two_rank_run)


def rank_process(launcher: subprocess.Popen, rank: int, timeout: float = 120):
    import psutil

    deadline = time.time() + timeout
    while time.time() < deadline:
        for child in psutil.Process(launcher.pid).children(recursive=True):
            try:
                if f"--local_rank={rank}" in child.cmdline():
                    return child
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no rank {rank} under the deepspeed launcher after {timeout} s")


def wait_for_step(run_dir: Path, step: int, launcher: subprocess.Popen, timeout: float = 300) -> None:
    path, deadline = run_dir / "student" / "metrics.jsonl", time.time() + timeout
    while time.time() < deadline and launcher.poll() is None:
        if path.is_file() and any(m.get("step", 0) >= step and "loss/kd" in m for m in map(json.loads, _whole_lines(path))):
            return
        time.sleep(0.01)
    raise TimeoutError(f"step {step} not reached (launcher exit code {launcher.poll()})")


def _whole_lines(path: Path) -> list[str]:
    text = path.read_text()
    return text.splitlines()[: text.count("\n")]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_rerun_finishes(two_rank_run, inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path / "run")
    args = args_for(run_dir, tiny_llama)
    log_path = tmp_path / "stopped.log"
    with open(log_path, "w") as log_file:
        # Each step slowed to over 0.2 s, so the signal surely comes before the last of the 20 steps.
        command = testing.deepspeed_cmd(SCRIPT, args, nproc=2)
        env = testing.launch_env({"DIST_SENSE_SLOW": "distill.step:0.2"})
        launcher = subprocess.Popen(command, cwd=testing.REPO_ROOT, env=env, stdout=log_file,
                                    stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rank1 = rank_process(launcher, 1)
        wait_for_step(run_dir, 2, launcher)
        signalled = time.time()
        rank1.send_signal(signal.SIGTERM)  # one rank only, as when a signal reaches ranks at different times
        code = launcher.wait(timeout=120)
        took = time.time() - signalled
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    output = log_path.read_text()
    assert code == distill.STOPPED_EXIT_CODE == 3, output[-4000:]
    assert took < 60, took
    stops = re.findall(r"\[rank (\d)\].* stopped by SIGTERM at step (\d+) \(received by 1 of 2 ranks\)", output)
    assert sorted(rank for rank, _ in stops) == ["0", "1"] and len({step for _, step in stops}) == 1, output[-4000:]
    step = int(stops[0][1])
    assert 2 <= step < 20 and "rerun to resume" in output
    ckpt = run_dir / "student" / "checkpoints"
    assert (ckpt / "latest").read_text() == f"step{step}" and (ckpt / f"step{step}" / checkpoints.COMPLETE_MARKER).is_file()
    assert not (run_dir / "student" / "final").exists()
    assert max(m["step"] for m in metrics(run_dir)) == step

    resumed = testing.run_deepspeed(SCRIPT, args, nproc=2, timeout=300)
    assert f"resumed from {ckpt / f'step{step}'} at step {step}" in resumed.stderr
    assert_finished_like(run_dir, two_rank_run)


@pytest.mark.slow
def test_checkpoints_of_another_run_are_refused(two_rank_run, inputs, tiny_llama, tmp_path):
    run_dir = copy_inputs(inputs, tmp_path)
    shutil.copytree(two_rank_run / "student" / "checkpoints", run_dir / "student" / "checkpoints")
    with pytest.raises(distill.CheckpointError, match=r"belong to another run \(layers: checkpoint 1, this run 2\)"):
        distill.prepare(config_for(run_dir, tiny_llama, **{"distill.layers": 2}), world_size=2)
    proc = testing.run_command(["python", SCRIPT, *args_for(run_dir, tiny_llama, **{"distill.layers": 2})],
                               check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert "belong to another run" in last and str(run_dir / "student" / "checkpoints") in last


@pytest.mark.slow
def test_separate_student_trained_against_teacher_states(tiny_llama, tmp_path):
    run_dir = distill_fixtures.make_run(tmp_path / "run", tiny_llama, store_hidden=True)
    small = testing.tiny_config("llama", vocab_size=len(testing.vocabulary()), hidden=16, layers=1)
    small.save_pretrained(tmp_path / "small")
    settings = {"distill.steps": 3, "distill.eval_every": 0, "distill.save_every": 0, "distill.init": "model",
                "distill.student_model": tmp_path / "small", "distill.loss": "mse", "distill.freeze_embeddings": True}
    testing.run_command(["python", SCRIPT, *args_for(run_dir, tiny_llama, **settings)], timeout=300)
    lines = metrics(run_dir, "student_mse")  # the MSE baseline lives beside the KD student
    assert [m["step"] for m in lines if "loss/mse" in m] == [1, 2, 3]
    assert all(0 <= m["acc/top1"] <= 1 for m in lines if "loss/mse" in m)  # sense agreement is logged for mse too
    assert "eval/loss" in lines[-1]
    student = load_student(run_dir / "student_mse" / "final")
    assert student.info["head"] == "linear" and student.info["student_d"] == 16 and student.teacher_d == 32
    # distill.freeze_embeddings: the input embeddings are the initial ones, the rest trained.
    torch.manual_seed(0)  # distill.seed: the same random initial student
    initial = build_student(config_for(run_dir, tiny_llama, **settings), 32)
    embeddings = student.backbone.get_input_embeddings().weight
    torch.testing.assert_close(embeddings, initial.backbone.get_input_embeddings().weight)
    assert not torch.equal(student.head.weight, initial.head.weight)


def test_slurm_script_parses():
    testing.run_command(["bash", "-n", "slurm/distill.sh"], timeout=30)


@pytest.mark.slow
def test_slurm_script_runs_label_then_distill_locally(inputs, tiny_llama, tmp_path):
    if not (testing.REPO_ROOT / "launcher" / "label.py").is_file():
        pytest.skip("launcher/label.py (the labelling stage, run first by slurm/distill.sh) does not exist yet")
    run_dir = tmp_path / "run"
    shutil.copytree(inputs / "dictionary", run_dir / "dictionary")  # built from the same 48 toy documents
    corpus = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=48, seed=0)
    config = {"run_dir": str(run_dir), "model": {"teacher": str(tiny_llama)},
              "corpus": {"path": str(corpus), "max_length": 16}, "label": {"batch_size": 8, "shard_samples": 8},
              "distill": {"layers": 1, "steps": 3, "global_batch_size": 8, "micro_batch_size": 4, "eval_every": 0,
                          "save_every": 0, "eval_fraction": 0.1}}
    (tmp_path / "run.json").write_text(json.dumps(config))
    testing.run_command(["bash", "slurm/distill.sh"], env={"CONFIG": str(tmp_path / "run.json"), "NPROC": "1"},
                        timeout=600)
    assert read_labels_manifest(run_dir / "labels")["totals"]["windows"] > 0
    assert train_losses(run_dir).keys() == {1, 2, 3}
    assert (run_dir / "student" / "final" / "student.json").is_file()
