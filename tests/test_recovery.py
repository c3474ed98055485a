"""Rebuilding deleted or damaged shards of extract / label: the per-rank progress rolls back
to just before the first shard that is gone, and a rerun rewrites it byte for byte."""
import json
import logging
import shutil
import signal
import subprocess
import time
from collections import Counter

import helpers as testing
import pytest
from test_extract import extract_args

from dist_sense.formats.manifest import ManifestError
from dist_sense.stages.teacher_pass import RankProgress, missing_shards, shard_problem

SETTINGS = {"cap": 10}
# Three closed shards, then a last pool whose windows went into no shard (their counters still count).
COMMITS = [
    ({"file": "hidden-r000-000000.tar", "samples": 2, "keys": ["a", "b"]}, 4,
     {"totals": Counter(windows=4, tokens=40, nonfinite=0), "kept": Counter({"11": 3, "12": 1})}),
    ({"file": "hidden-r000-000001.tar", "samples": 2, "keys": ["c", "d"]}, 3,
     {"totals": Counter(windows=3, tokens=30, nonfinite=1), "kept": Counter({"12": 2, "13": 5})}),
    ({"file": "hidden-r000-000002.tar", "samples": 1, "keys": ["e", "e"]}, 5,
     {"totals": Counter(windows=5, tokens=50, nonfinite=0), "kept": Counter({"11": 1})}),
    (None, 2, {"totals": Counter(windows=2, tokens=20, nonfinite=0)}),
]


def commit_all(out_dir, commits=COMMITS, with_bytes=True) -> list[dict]:
    """Write each commit's shard file (distinct sizes) and commit it; the saved states after each."""
    progress, states = RankProgress(out_dir, 0, 1, SETTINGS), []
    for number, (shard, windows, pending) in enumerate(commits):
        if shard is not None:
            shard = dict(shard)
            (out_dir / shard["file"]).write_bytes(b"x" * (100 + number))
            if with_bytes:
                shard["bytes"] = 100 + number
        progress.commit(shard, windows, {k: Counter(v) for k, v in pending.items()})
        states.append(json.loads(progress.path.read_text()))
    return states


@pytest.fixture
def warnings(caplog):
    logger = logging.getLogger("dist_sense.teacher_pass")
    logger.addHandler(caplog.handler)  # comm.get_logger's loggers do not propagate
    caplog.set_level(logging.WARNING, logger="dist_sense.teacher_pass")
    yield caplog
    logger.removeHandler(caplog.handler)


def shard_files(out_dir):
    return sorted(p.name for p in out_dir.glob("hidden-*.tar"))


def test_intact_shards_load_unchanged(tmp_path, warnings):
    states = commit_all(tmp_path)
    assert RankProgress(tmp_path, 0, 1, SETTINGS).state == states[-1]
    assert states[-1]["windows_done"] == 14 and states[-1]["counters"]["totals"]["nonfinite"] == 1
    assert not warnings.records and len(shard_files(tmp_path)) == 3


@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_a_middle_shard_gone_rolls_back_to_just_before_it(tmp_path, warnings, damage):
    states = commit_all(tmp_path)
    middle = tmp_path / "hidden-r000-000001.tar"
    middle.unlink() if damage == "delete" else middle.write_bytes(b"x" * 7)
    progress = RankProgress(tmp_path, 0, 1, SETTINGS)
    # Exactly the state after the first commit: its windows, its shard, its counters.
    assert progress.state == states[0]
    assert json.loads(progress.path.read_text()) == states[0]
    assert shard_files(tmp_path) == ["hidden-r000-000000.tar"], "later shards are deleted, to be rewritten"
    (message,) = [r.getMessage() for r in warnings.records]
    assert str(middle) in message and "10 windows redone" in message and "2 shard(s)" in message
    # Committing the same work again gives the uninterrupted run's files.
    replayed = commit_all_from(tmp_path, progress, COMMITS[1:])
    assert replayed == states[-1]


def commit_all_from(out_dir, progress, commits) -> dict:
    for number, (shard, windows, pending) in enumerate(commits, start=len(progress.state["shards"])):
        if shard is not None:
            shard = {**shard, "bytes": 100 + number}
            (out_dir / shard["file"]).write_bytes(b"x" * (100 + number))
        progress.commit(shard, windows, {k: Counter(v) for k, v in pending.items()})
    return json.loads(progress.path.read_text())


def test_the_first_shard_gone_rolls_back_to_nothing_and_the_journal_is_cut(tmp_path, warnings):
    commit_all(tmp_path)
    (tmp_path / "hidden-r000-000000.tar").unlink()
    progress = RankProgress(tmp_path, 0, 1, SETTINGS)
    assert progress.state["windows_done"] == 0 and progress.state["shards"] == [] and progress.state["counters"] == {}
    assert progress.journal.read_bytes() == b"" and shard_files(tmp_path) == []
    assert "14 windows redone" in warnings.records[0].getMessage()


def test_a_line_left_by_a_crash_after_the_journal_write_is_overwritten(tmp_path):
    states = commit_all(tmp_path, COMMITS[:2])
    progress = RankProgress(tmp_path, 0, 1, SETTINGS)
    with open(progress.journal, "ab") as f:
        f.write(b'{"shard": "hidden-r000-000002.tar", "windows_end": 99, "counters": {}}\n{"torn')
    commit_all_from(tmp_path, progress, COMMITS[2:])
    (tmp_path / "hidden-r000-000002.tar").unlink()
    assert RankProgress(tmp_path, 0, 1, SETTINGS).state == states[1]


def test_without_commit_records_the_rank_starts_over(tmp_path, warnings):
    commit_all(tmp_path)
    old = json.loads((tmp_path / "progress-r000.json").read_text())
    del old["journal_bytes"]  # as dist_sense wrote it before per-commit records
    (tmp_path / "progress-r000.json").write_text(json.dumps(old))
    (tmp_path / "progress-r000.commits.jsonl").unlink()
    (tmp_path / "hidden-r000-000002.tar").unlink()
    progress = RankProgress(tmp_path, 0, 1, SETTINGS)
    assert progress.state["windows_done"] == 0 and progress.state["shards"] == []
    assert shard_files(tmp_path) == [] and not progress.path.exists()
    message = warnings.records[0].getMessage()
    assert "hidden-r000-000002.tar is missing" in message and "starts over from its first window" in message
    assert "3 shards deleted" in message


def test_a_progress_file_that_is_not_json_is_refused_naming_it(tmp_path):
    (tmp_path / "progress-r000.json").write_text("{")
    with pytest.raises(ManifestError, match=f"progress-r000.json: not valid JSON.*delete {tmp_path}"):
        RankProgress(tmp_path, 0, 1, SETTINGS)


def test_missing_shards_of_a_manifest(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"12345")
    (tmp_path / "b.tar").write_bytes(b"123")
    manifest = {"shards": [{"file": "a.tar", "bytes": 5}, {"file": "b.tar", "bytes": 5}, {"file": "c.tar"},
                           {"file": "b.tar"}]}  # no "bytes" (older manifests): existence only
    assert missing_shards(tmp_path, manifest) == ["b.tar", "c.tar"]
    assert shard_problem(tmp_path, {"file": "b.tar", "bytes": 5}) == f"{tmp_path / 'b.tar'} has 3 bytes, 5 were written"
    assert missing_shards(tmp_path, {"shards": []}) == []


# ----------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_a_deleted_middle_shard_is_rebuilt_byte_identical(tiny_llama, tmp_path):
    docs = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=120, seed=1)
    args = ["python", "launcher/extract.py", *extract_args(tmp_path / "run", tiny_llama, docs)]
    testing.run_command(args, timeout=300)
    hidden = tmp_path / "run" / "hidden"
    first = {p.name: p.read_bytes() for p in hidden.glob("hidden-*.tar")}
    manifest = json.loads((hidden / "manifest.json").read_text())
    assert len(first) >= 4 and sorted(first) == [s["file"] for s in manifest["shards"]]
    middle = sorted(first)[len(first) // 2]
    (hidden / middle).unlink()
    assert missing_shards(hidden, manifest) == [middle]
    rerun = testing.run_command(args, timeout=300)  # finds the manifest, sees the shard missing, reopens the stage
    assert "the stage is not complete: rebuilding them" in rerun.stderr and middle in rerun.stderr
    assert f"{middle} is missing" in rerun.stderr and "rolls back" in rerun.stderr
    assert {p.name: p.read_bytes() for p in hidden.glob("hidden-*.tar")} == first
    assert json.loads((hidden / "manifest.json").read_text()) == manifest


def sigterm_midway(cmd: list[str], env: dict, started, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `cmd`, send it SIGTERM once `started()` is true, and return how it ended."""
    proc = subprocess.Popen(cmd, cwd=testing.REPO_ROOT, env=testing.launch_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + timeout
        while not started() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.slow
def test_sigterm_stops_extract_with_code_3_and_the_rerun_finishes_it_alike(tiny_llama, tmp_path):
    docs = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=120, seed=1)
    whole = tmp_path / "whole"
    testing.run_command(["python", "launcher/extract.py", *extract_args(whole, tiny_llama, docs)], timeout=300)
    run = tmp_path / "run"
    args = ["python", "launcher/extract.py", *extract_args(run, tiny_llama, docs)]
    stopped = sigterm_midway(args, {"DIST_SENSE_SLOW": "hidden.window:0.05"},
                             lambda: len(list((run / "hidden").glob("hidden-*.tar"))) >= 2)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert "stopped [rank 0]: SIGTERM; what was finished is kept" in stopped.stderr
    assert not (run / "hidden" / "manifest.json").exists() and not (run / ".lock-hidden").exists()
    testing.run_command(args, timeout=300)
    first = {p.name: p.read_bytes() for p in (whole / "hidden").glob("hidden-*.tar")}
    assert {p.name: p.read_bytes() for p in (run / "hidden").glob("hidden-*.tar")} == first
    assert (json.loads((run / "hidden" / "manifest.json").read_text())["totals"]
            == json.loads((whole / "hidden" / "manifest.json").read_text())["totals"])


@pytest.mark.slow
def test_sigterm_stops_build_dict_with_code_3_and_the_rerun_finishes_it_alike(tiny_llama, tmp_path):
    docs = testing.write_toy_corpus(tmp_path / "docs.jsonl", n_docs=120, seed=1)
    run = tmp_path / "run"
    testing.run_command(["python", "launcher/extract.py", *extract_args(run, tiny_llama, docs)], timeout=300)
    build = ["python", "launcher/build_dict.py", f"run_dir={run}", "kmeans.k=3", "kmeans.tile_tokens=4",
             "memory.held_results_mb=0"]
    testing.run_command(build, timeout=300)
    whole = {p.name: p.read_bytes() for p in (run / "dictionary").iterdir() if p.name.startswith("senses-")}
    index = (run / "dictionary" / "index.json").read_bytes()
    shutil.rmtree(run / "dictionary")
    stopped = sigterm_midway(build, {"DIST_SENSE_SLOW": "build_dict.tile:0.5"},
                             lambda: len(list((run / "dictionary").glob("senses-*.safetensors"))) >= 2)
    assert stopped.returncode == 3, stopped.stderr[-3000:]
    assert not (run / "dictionary" / "index.json").exists() and not (run / ".lock-dictionary").exists()
    testing.run_command(build, timeout=300)
    assert (run / "dictionary" / "index.json").read_bytes() == index
    assert {p.name: p.read_bytes() for p in (run / "dictionary").iterdir() if p.name.startswith("senses-")} == whole
