"""The run-directory lock and disk checks: live, dead, reused-pid and foreign holders, racing
takeovers, and real full and read-only filesystems (tmpfs mounts, as root)."""
import errno
import json
import logging
import multiprocessing
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from dist_sense.runtime import rundir
from dist_sense.runtime.rundir import RunDirError, RunLock, check_writable, describe_os_error, writing


def write_lock(directory: Path, name: str, pid: int, host: str | None = None, process_start="same") -> Path:
    """A lock file as another process would have left it."""
    start = rundir.process_start_time(pid) if process_start == "same" else process_start
    record = {"host": host or socket.gethostname(), "pid": pid, "process_start": start, "stage": name,
              "started": "2030-01-02T03:04:05+00:00", "started_epoch": 1893553445.0, "command": ["x"],
              "token": f"token-of-{pid}"}
    path = directory / f".lock-{name}"
    path.write_text(json.dumps(record))
    return path


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "60"])
    yield proc
    proc.kill()
    proc.wait()


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


@pytest.fixture
def warnings(caplog):
    logger = logging.getLogger("dist_sense.rundir")
    logger.addHandler(caplog.handler)  # in case a parent logger stops propagation
    with caplog.at_level(logging.WARNING, logger="dist_sense.rundir"):
        yield caplog
    logger.removeHandler(caplog.handler)


def test_a_lock_held_by_a_live_process_is_refused_naming_it(tmp_path, sleeper):
    path = write_lock(tmp_path, "distill", sleeper.pid)
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path, "distill").acquire()
    message = str(err.value)
    assert "another distill is running on this run directory" in message
    assert f"pid {sleeper.pid}" in message and str(path) in message and "2030-01-02T03:04:05" in message
    assert json.loads(path.read_text())["pid"] == sleeper.pid  # left alone


def test_a_dead_holders_lock_is_taken_over_with_a_warning(tmp_path, warnings):
    pid = dead_pid()
    path = write_lock(tmp_path, "extract", pid, process_start=12345)
    with RunLock(tmp_path, "extract") as lock:
        held = json.loads(path.read_text())
        assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["stage"] == "extract"
        assert held["process_start"] == rundir.process_start_time(os.getpid()) and held["command"]
        assert lock.holder() == held
    assert not path.exists()
    assert any(f"pid {pid}" in r.getMessage() and "no longer running" in r.getMessage() for r in warnings.records)
    assert not list(tmp_path.iterdir()), "no claim or private file may be left behind"


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path, sleeper, warnings):
    # The pid is alive, but it is a process that started after the lock was written.
    write_lock(tmp_path, "label", sleeper.pid, process_start=rundir.process_start_time(sleeper.pid) - 1)
    with RunLock(tmp_path, "label"):
        pass
    assert any(f"pid {sleeper.pid}" in r.getMessage() for r in warnings.records)


def test_a_lock_from_another_host_is_refused_with_the_way_on(tmp_path):
    path = write_lock(tmp_path, "distill", 4242, host="node-elsewhere-17", process_start=99)
    with pytest.raises(RunDirError) as err:
        RunLock(tmp_path, "distill").acquire()
    message = str(err.value)
    assert "node-elsewhere-17" in message and "pid 4242" in message and f"delete {path}" in message
    assert path.exists()


def test_an_unreadable_lock_is_stale_once_it_is_not_being_written(tmp_path, warnings):
    path = tmp_path / ".lock-extract"
    path.write_bytes(b'{"host": "vm", "pi')  # a crash mid-write
    old = time.time() - 60
    os.utime(path, (old, old))
    with RunLock(tmp_path, "extract"):
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert any("not valid JSON" in r.getMessage() for r in warnings.records)


def test_release_leaves_another_processs_lock_and_stages_have_their_own_files(tmp_path, sleeper):
    lock = RunLock(tmp_path, "distill").acquire()
    with RunLock(tmp_path, "distill-mse"):  # another name: no conflict
        pass
    path = write_lock(tmp_path, "distill", sleeper.pid)  # someone else's lock replaced ours
    lock.release()
    assert json.loads(path.read_text())["pid"] == sleeper.pid
    again = RunLock(tmp_path, "other").acquire()
    again.release()
    again.release()  # twice is harmless
    assert not (tmp_path / ".lock-other").exists()


def _contend(directory: str, barrier, results, done) -> None:
    barrier.wait()
    try:
        lock = RunLock(directory, "distill").acquire()
    except RunDirError as err:
        results.put(("refused", os.getpid(), str(err)))
        return
    results.put(("won", os.getpid(), ""))
    done.wait(30)  # hold it until every contender has answered
    lock.release()


@pytest.mark.parametrize("round_", range(4))
def test_concurrent_takeovers_of_one_stale_lock_have_one_winner(tmp_path, round_):
    write_lock(tmp_path, "distill", dead_pid(), process_start=1)
    ctx = multiprocessing.get_context("fork")
    n = 6
    barrier, results, done = ctx.Barrier(n), ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), barrier, results, done)) for _ in range(n)]
    for proc in procs:
        proc.start()
    try:
        answers = [results.get(timeout=60) for _ in range(n)]
    finally:
        done.set()
        for proc in procs:
            proc.join(30)
    winners = [pid for outcome, pid, _ in answers if outcome == "won"]
    assert len(winners) == 1, answers
    assert all(f"pid {winners[0]}" in msg for outcome, _, msg in answers if outcome == "refused"), answers
    assert not list(tmp_path.iterdir()), "the winner's release must leave nothing behind"


# ----------------------------------------------------------------------------- disk errors


def test_describe_os_error_names_the_path_and_ignores_other_errors(tmp_path):
    full = describe_os_error(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), tmp_path / "a.tar")
    assert isinstance(full, RunDirError) and str(tmp_path / "a.tar") in str(full) and "ENOSPC" in str(full)
    denied = describe_os_error(PermissionError(errno.EACCES, "Permission denied", "/x/y"), "/not/this")
    assert str(denied).startswith("/x/y: EACCES (Permission denied)") and f"uid {os.getuid()}" in str(denied)
    assert "EROFS" in str(describe_os_error(OSError(errno.EROFS, "Read-only file system", "/r")))
    assert describe_os_error(FileNotFoundError(errno.ENOENT, "No such file", "/z")) is None
    with pytest.raises(FileNotFoundError):
        with writing(tmp_path / "w"):
            open(tmp_path / "missing" / "w")


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (as root, chmod does not make a directory unwritable)")
    where.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"mount -t tmpfs -o {options} failed (no CAP_SYS_ADMIN here?): {proc.stderr.strip()}")


@pytest.fixture
def mount_point(tmp_path):
    where = tmp_path / "mnt"
    yield where
    if os.path.ismount(where):
        subprocess.run(["umount", str(where)], check=False)
        if os.path.ismount(where):
            subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_disk_is_reported_at_once_naming_the_directory(mount_point):
    _mount_tmpfs(mount_point, "size=256k")
    with open(mount_point / "filler", "wb", buffering=0) as f, pytest.raises(OSError) as filling:
        while True:
            f.write(b"\0" * 4096)
    assert filling.value.errno == errno.ENOSPC
    with pytest.raises(RunDirError) as err:
        check_writable(mount_point / "run", "run directory (run_dir)")
    message = str(err.value)
    assert f"run directory (run_dir) {mount_point / 'run'} is not writable: ENOSPC" in message
    assert "free space" in message
    assert not list((mount_point / "run").glob(".write-probe-*")), "the probe must not be left behind"
    with pytest.raises(RunDirError, match=f"{mount_point / 'shard.tar'}: ENOSPC"):
        with writing(mount_point / "shard.tar"), open(mount_point / "shard.tar", "wb") as f:
            f.write(b"\1" * (1 << 20))  # write() errors carry no file name: writing() supplies it


def test_a_read_only_filesystem_is_reported_at_once(mount_point):
    _mount_tmpfs(mount_point, "size=1m,ro")
    for target in (mount_point, mount_point / "hidden"):
        with pytest.raises(RunDirError) as err:
            check_writable(target, "stage directory")
        assert str(target) in str(err.value) and "EROFS" in str(err.value) and "read-only" in str(err.value)
    with pytest.raises(RunDirError, match="lock-extract.*EROFS"):
        RunLock(mount_point, "extract").acquire()


def test_a_writable_directory_passes_and_is_created(tmp_path):
    assert check_writable(tmp_path / "a" / "b", "run directory") == tmp_path / "a" / "b"
    assert not list((tmp_path / "a" / "b").iterdir())
