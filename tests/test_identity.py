"""Run identity: a rerun with other inputs or settings is refused (naming what differs), never
silently mixed with the old result; --restart-stage moves the old result aside; config.json is
not rewritten by a stage that refuses or has nothing to do; consumers check their producers."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import helpers as testing
import pytest
from run_fixture import distilled_run  # noqa: F401  (the session's shared run)

from dist_sense.config import RunConfig
from dist_sense.formats import identity
from dist_sense.stages import guard


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DIST_SENSE_CACHE", str(tmp_path / "cache"))
    identity._MEMORY.clear()
    yield
    identity._MEMORY.clear()


# ----------------------------------------------------------------------------- fingerprints


def test_a_file_rewritten_with_the_same_size_and_mtime_gets_a_new_digest(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"a" * 1000)
    first = identity.file_digest(path)
    assert identity.file_digest(path) == first  # from the cache
    assert json.loads((tmp_path / "cache" / "fingerprints.json").read_text())[str(path.resolve())]["sha256"] == first
    stat = path.stat()
    path.write_bytes(b"a" * 999 + b"b")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime as before; ctime moves on
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    assert identity.file_digest(path) != first


def test_the_cache_is_used_when_nothing_changed(tmp_path, monkeypatch):
    path = tmp_path / "corpus.txt"
    path.write_text("one document\n")
    identity.file_digest(path)
    calls = []
    real = identity.hashlib.sha256
    monkeypatch.setattr(identity.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    identity.file_digest(path)
    assert calls == []


def test_a_model_fingerprint_follows_content_not_names_or_sizes(tmp_path):
    a = testing.save_tiny_model(tmp_path / "a", kind="llama")
    b = tmp_path / "b"
    shutil.copytree(a, b)
    assert identity.model_fingerprint(a) == identity.model_fingerprint(b)
    flip_weight_byte(b / "model.safetensors")
    assert identity.model_fingerprint(a) != identity.model_fingerprint(b)


def flip_weight_byte(path: Path) -> None:
    """Change one byte of a safetensors file's tensor data (same size, still loads)."""
    data = bytearray(path.read_bytes())
    header = struct.unpack("<Q", data[:8])[0]
    data[8 + header + 5] ^= 0x10
    path.write_bytes(bytes(data))


def test_differences_name_each_changed_key_with_both_values():
    found = identity.differences({"kmeans": {"k": 3, "seed": 0}, "cap": 30}, {"kmeans": {"k": 4, "seed": 0}, "cap": 30})
    assert found == ["kmeans.k: was 3, now 4"]


# ----------------------------------------------------------------------------- the guard, in one process


def test_guard_resumes_the_same_identity_refuses_another_and_restart_moves_it_aside(tmp_path):
    cfg = RunConfig.load(None, [f"run_dir={tmp_path / 'run'}"])
    out = cfg.run_path / "hidden"
    with guard.open_stage(cfg, "extract", out, {"cap": 30}) as stage:
        assert not stage.resumed
        stage.begin()
        (out / "shard.tar").write_bytes(b"x")
    assert (out / "identity.json").is_file() and (cfg.run_path / "config.json").is_file()
    assert not (cfg.run_path / ".lock-hidden").exists()  # released
    with guard.open_stage(cfg, "extract", out, {"cap": 30}) as stage:
        assert stage.resumed
    saved = (cfg.run_path / "config.json").read_bytes()
    other = RunConfig.load(None, [f"run_dir={cfg.run_path}", "kmeans.k=9"])
    with pytest.raises(guard.IdentityError) as err:
        with guard.open_stage(other, "extract", out, {"cap": 40}):
            pass
    message = str(err.value)
    assert "cap: was 30, now 40" in message and "--restart-stage" in message and str(out) in message
    assert (cfg.run_path / "config.json").read_bytes() == saved and (out / "shard.tar").is_file()
    assert not (cfg.run_path / ".lock-hidden").exists()
    with guard.open_stage(other, "extract", out, {"cap": 40}, restart=True) as stage:
        assert not stage.resumed and not out.exists()
    aside = [p for p in cfg.run_path.iterdir() if p.name.startswith("hidden.replaced-")]
    assert len(aside) == 1 and (aside[0] / "shard.tar").is_file()


def test_an_output_without_an_identity_record_is_refused(tmp_path):
    cfg = RunConfig.load(None, [f"run_dir={tmp_path / 'run'}"])
    out = cfg.run_path / "dictionary"
    out.mkdir(parents=True)
    (out / "index.json").write_text("{}")
    with pytest.raises(guard.IdentityError, match=r"holds files but no identity.json .* --restart-stage"):
        with guard.open_stage(cfg, "build_dict", out, {"k": 3}):
            pass


# ----------------------------------------------------------------------------- the real stages


def copied_run(distilled, tmp_path: Path) -> tuple[Path, list[str]]:
    """A copy of the shared run (and its corpus) to change, with launcher args pointing at the copy."""
    run_dir = tmp_path / "run"
    shutil.copytree(distilled["run_dir"], run_dir)
    docs = tmp_path / "docs.jsonl"
    shutil.copy(distilled["docs"], docs)
    args = [a for a in distilled["args"] if not a.startswith(("run_dir=", "corpus.path="))]
    # The shared run's two distills (kd and mse) ran side by side, so its config.json may hold either loss.
    return run_dir, [f"run_dir={run_dir}", f"corpus.path={docs}", *args, "distill.loss=kd"]


def launch(stage: str, args: list[str], *extra: str):
    return testing.run_command(["python", f"launcher/{stage}.py", *args, *extra], check=False, timeout=300)


def refused(proc, *named: str) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error [rank 0]: ") and "--restart-stage" in last, last
    for name in named:
        assert name in last, (name, last)
    return last


@pytest.mark.slow
def test_extract_refuses_a_changed_corpus_and_a_changed_teacher(distilled_run, tmp_path):  # noqa: F811
    run_dir, args = copied_run(distilled_run, tmp_path)
    config, manifest = (run_dir / "config.json").read_bytes(), (run_dir / "hidden" / "manifest.json").read_bytes()
    assert launch("extract", args).returncode == 0  # the same content elsewhere: nothing to do
    docs = tmp_path / "docs.jsonl"
    lines = docs.read_text().splitlines()
    docs.write_text("\n".join(lines[1:] + lines[:1]) + "\n")  # the same documents, another order
    refused(launch("extract", args), "corpus_fingerprint", str(run_dir / "hidden"))
    shutil.copy(distilled_run["docs"], docs)
    teacher = tmp_path / "teacher"
    shutil.copytree(distilled_run["teacher"], teacher)
    flip_weight_byte(teacher / "model.safetensors")  # the same file names and sizes
    with_teacher = [a for a in args if not a.startswith("model.teacher=")] + [f"model.teacher={teacher}"]
    refused(launch("extract", with_teacher), "teacher_fingerprint")
    assert (run_dir / "config.json").read_bytes() == config
    assert (run_dir / "hidden" / "manifest.json").read_bytes() == manifest


@pytest.mark.slow
def test_build_dict_refuses_another_k_and_restart_rebuilds_for_the_consumers_to_see(distilled_run, tmp_path):  # noqa: F811
    from dist_sense.model.encoder import SenseEncoder
    from dist_sense.model.student import StudentError

    run_dir, args = copied_run(distilled_run, tmp_path)
    config, index = (run_dir / "config.json").read_bytes(), (run_dir / "dictionary" / "index.json").read_bytes()
    refused(launch("build_dict", args, "kmeans.k=4"), "kmeans.k: was 3, now 4")
    assert (run_dir / "config.json").read_bytes() == config
    assert (run_dir / "dictionary" / "index.json").read_bytes() == index
    done = launch("build_dict", args, "kmeans.k=4", "--restart-stage")
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((run_dir / "dictionary" / "index.json").read_text())["k"] == 4
    assert json.loads((run_dir / "config.json").read_text())["kmeans"]["k"] == 4
    aside = [p for p in run_dir.iterdir() if p.name.startswith("dictionary.replaced-")]
    assert len(aside) == 1 and (aside[0] / "index.json").read_bytes() == index
    # The labels and the student were made against the old dictionary: both are refused now.
    refused(launch("label", args, "kmeans.k=4"), "dictionary_fingerprint", str(run_dir / "labels"))
    with pytest.raises(StudentError, match=r"trained against dictionary fingerprint .* but .*index.json has"):
        SenseEncoder.load(run_dir, device="cpu")


@pytest.mark.slow
def test_distill_refuses_another_lr_and_leaves_config_json_alone(distilled_run, tmp_path):  # noqa: F811
    run_dir, args = copied_run(distilled_run, tmp_path)
    config = run_dir / "config.json"
    before = (config.read_bytes(), config.stat().st_mtime_ns)
    same = launch("distill", args)
    assert same.returncode == 0 and "nothing to do" in same.stderr, same.stderr[-3000:]
    refused(launch("distill", args, "distill.lr=0.001"), "distill.lr: was 0.0003, now 0.001", str(run_dir / "student"))
    assert (config.read_bytes(), config.stat().st_mtime_ns) == before


@pytest.mark.slow
def test_a_second_distill_on_the_same_run_directory_is_refused(distilled_run, tmp_path):  # noqa: F811
    import subprocess
    import time

    run_dir, args = copied_run(distilled_run, tmp_path)
    shutil.rmtree(run_dir / "student")
    args = [*args, "distill.steps=20"]
    env = testing.launch_env({"DIST_SENSE_SLOW": "distill.step:1.0"})
    first = subprocess.Popen(["python", "launcher/distill.py", *args], cwd=testing.REPO_ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lock = run_dir / ".lock-student"
        for _ in range(600):
            if lock.is_file() or first.poll() is not None:
                break
            time.sleep(0.1)
        assert lock.is_file(), first.communicate()[1][-3000:] if first.poll() is not None else "no lock"
        second = launch("distill", args)
        assert second.returncode == 2, second.stderr[-3000:]
        last = second.stderr.strip().splitlines()[-1]
        assert str(lock) in last and str(first.pid) in last, last
        assert first.wait(timeout=300) == 0, first.stderr.read()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert not lock.exists()
    steps = [json.loads(line)["step"] for line in (run_dir / "student" / "metrics.jsonl").read_text().splitlines()
             if "lr" in json.loads(line)]
    assert steps == sorted(set(steps))  # one writer: no step twice, none out of order
