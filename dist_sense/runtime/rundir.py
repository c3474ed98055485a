"""The run directory as a shared resource: one process per stage at a time, and disk
trouble reported at once, naming the path and what to do.

A `RunLock` is a small JSON file (RUN/.lock-NAME) naming its holder: host, pid, the
process's own start time (so a pid the kernel has since given to another process is not
taken for the holder), command line and stage. It is created atomically (written under a
private name, then hard-linked into place, so it is never seen half-written). A lock whose
holder died on this host is taken over with a warning; one held by a live process, or by
any process on another host (whose liveness this host cannot see), is refused with a
RunDirError saying who holds it and how to go on.

`check_writable` writes and fsyncs a probe before a stage starts, so a read-only
filesystem, a missing permission or a full disk fails at once rather than hours in;
`describe_os_error` and `writing` turn such OSErrors met later into a RunDirError naming
the file (a failed write() carries no file name of its own).
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import socket
import sys
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path

log = logging.getLogger("dist_sense.rundir")

PROBE_BYTES = 64 << 10
CLAIM_WAIT_S = 5.0  # how long to wait for another process's takeover of the same stale lock
UNREADABLE_GRACE_S = 2.0  # an unreadable lock younger than this may be one being written
_WAY_ON = {
    errno.ENOSPC: "free space on that filesystem (df -h shows it) or use a directory on another one",
    errno.EDQUOT: "free space within your quota (quota -s) or use a directory on another filesystem",
    errno.EROFS: "the filesystem is mounted read-only: remount it read-write or use another directory",
    errno.EACCES: "give this user (uid {uid}) write permission there or use another directory",
    errno.EPERM: "give this user (uid {uid}) write permission there or use another directory",
    errno.EIO: "the device reported an I/O error: check the disk (dmesg) or use another directory",
    errno.EEXIST: "a file is in the way of that directory: move it or use another directory",
    errno.ENOTDIR: "a file is in the way of that directory: move it or use another directory",
}


class RunDirError(RuntimeError):
    """The run directory cannot be used (locked by another job, full, read-only, not ours);
    the message names the path and the way on."""


def process_start_time(pid: int) -> int | None:
    """When process `pid` started, in clock ticks since boot (/proc/PID/stat field 22);
    None where it does not exist, is a zombie, or there is no /proc."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2 :].split()  # the command name may hold spaces and ')'
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])  # fields[0] is field 3 (state)


def process_alive(pid: int, start_time: int | None) -> bool:
    """Whether `pid` is running and is the process that started at `start_time` (None: any)."""
    if Path("/proc/self/stat").exists():
        found = process_start_time(pid)
        return found is not None and (start_time is None or found == start_time)
    try:  # no /proc: the pid alone, which cannot tell a reused pid
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _errno_name(err: OSError) -> str:
    return errno.errorcode.get(err.errno, f"errno {err.errno}") if err.errno is not None else "OSError"


def _way_on(code: int | None) -> str:
    return _WAY_ON.get(code, "fix the cause or use another directory").format(uid=os.getuid())


class RunLock:
    """RUN/.lock-NAME: at most one live process of one stage on one run directory.

    `name` becomes the file name (two stages that may share a directory take different
    names); `stage` is how messages call the holder. Use `with RunLock(...):` or
    acquire()/release().
    """

    def __init__(self, directory: str | os.PathLike, name: str, stage: str | None = None):
        self.path = Path(directory) / f".lock-{name}"
        self.stage = stage or name
        self.host = socket.gethostname()
        self.record: dict | None = None  # ours while held

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> RunLock:
        """Take the lock; RunDirError if a live process holds it; a dead holder's is taken over."""
        with writing(self.path.parent):
            self.path.parent.mkdir(parents=True, exist_ok=True)
        record = self._own_record()
        deadline = time.monotonic() + CLAIM_WAIT_S
        while True:
            if _create_exclusive(self.path, _encode(record)):
                self.record = record
                return self
            raw = _read_bytes(self.path)
            if raw is None:
                continue  # released or taken over meanwhile: try again
            reason = self._stale_reason(raw)
            if reason is None or not self._take_over(raw, reason):
                if time.monotonic() > deadline:
                    raise RunDirError(self._stuck_message(raw))
                time.sleep(0.05)

    def release(self) -> None:
        """Remove the lock file if it is still ours (a takeover may have replaced it)."""
        if self.record is None:
            return
        raw = _read_bytes(self.path)
        if raw is not None and _decode(raw).get("token") == self.record["token"]:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        elif raw is not None:
            log.warning("%s is no longer this process's lock; left as it is", self.path)
        self.record = None

    def holder(self) -> dict | None:
        """The lock file's record as it is now, or None if there is none or it is unreadable."""
        raw = _read_bytes(self.path)
        return _decode(raw) or None if raw is not None else None

    def _own_record(self) -> dict:
        now = time.time()
        return {
            "host": self.host, "pid": os.getpid(), "process_start": process_start_time(os.getpid()),
            "started": datetime.fromtimestamp(now, timezone.utc).isoformat(timespec="seconds"),
            "started_epoch": now, "command": sys.argv, "stage": self.stage, "token": uuid.uuid4().hex,
        }

    def _stale_reason(self, raw: bytes) -> str | None:
        """Why the lock in `raw` may be taken over, or None (RunDirError when it never may)."""
        held = _decode(raw)
        if not held:
            age = _age_s(self.path)
            if age is not None and age < UNREADABLE_GRACE_S:
                return None  # perhaps being written by the fallback path; look again
            return "it is empty or not valid JSON (a process died while writing it)"
        pid, host = held.get("pid"), held.get("host")
        if host != self.host:
            raise RunDirError(
                f"{self.path}: another {held.get('stage', self.stage)} holds this run directory on host {host} "
                f"(pid {pid}, started {held.get('started')}); this host cannot tell whether it is still running. "
                f"Wait for it, or if that job is gone, delete {self.path} and rerun"
            )
        if process_alive(pid, held.get("process_start")):
            raise RunDirError(
                f"another {held.get('stage', self.stage)} is running on this run directory: pid {pid} on {host}, "
                f"started {held.get('started')} (lock file {self.path}); wait for it to finish or stop it, "
                f"or use another run_dir"
            )
        return f"its holder, pid {pid} on {host} (started {held.get('started')}), is no longer running"

    def _take_over(self, raw: bytes, reason: str) -> bool:
        """Remove the stale lock `raw` unless another process is already doing so; True if the
        caller should try to create its own now.

        Only the process that creates the claim file (named by the stale content's hash) may
        remove that content, and it checks the content is still the same first, so two
        processes taking over one stale lock never remove each other's new one."""
        claim = self.path.with_name(f"{self.path.name}.takeover-{hashlib.sha256(raw).hexdigest()[:16]}")
        if not _create_exclusive(claim, _encode(self._own_record())):
            return False  # someone else is taking it over: wait, then look again
        try:
            if _read_bytes(self.path) == raw:
                log.warning("%s: taking over the lock: %s", self.path, reason)
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
        finally:
            claim.unlink()
        return True

    def _stuck_message(self, raw: bytes) -> str:
        claims = sorted(p.name for p in self.path.parent.glob(f"{self.path.name}.takeover-*"))
        return (f"{self.path}: stale lock ({_decode(raw) or 'unreadable'}) still not taken over after "
                f"{CLAIM_WAIT_S:.0f} s (a takeover was interrupted: {', '.join(claims) or 'no claim file'}); "
                f"if no {self.stage} is running, delete {self.path} and those files in {self.path.parent} and rerun")


def _encode(record: dict) -> bytes:
    return (json.dumps(record, indent=1, sort_keys=True) + "\n").encode()


def _decode(raw: bytes) -> dict:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("host"), str) or not isinstance(data.get("pid"), int):
        return {}  # not a lock record: treated as unreadable
    return data


def _read_bytes(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def _age_s(path: Path) -> float | None:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return None


def _create_exclusive(path: Path, data: bytes) -> bool:
    """Create `path` holding `data` unless it exists; False if it does. Never leaves it half-written
    where the filesystem has hard links (written privately, then linked into place)."""
    private = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        with writing(private):
            _write_synced(private, data)
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError as err:
        if err.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise describe_os_error(err, path) or err
        return _create_exclusive_without_links(path, data)
    finally:
        with contextlib.suppress(OSError):
            private.unlink()


def _create_exclusive_without_links(path: Path, data: bytes) -> bool:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with writing(path), os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return True


def _write_synced(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def check_writable(directory: str | os.PathLike, what: str) -> Path:
    """Create `directory` if needed and write, fsync and remove a 64 KiB probe in it; RunDirError
    naming `what`, the directory and the reason if that fails. Returns the directory."""
    directory = Path(directory)
    probe = directory / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        directory.mkdir(parents=True, exist_ok=True)
        try:
            _write_synced(probe, b"\0" * PROBE_BYTES)
        finally:
            with contextlib.suppress(OSError):
                probe.unlink()
    except OSError as err:
        raise RunDirError(f"{what} {directory} is not writable: {_errno_name(err)} ({err.strerror}); "
                          f"{_way_on(err.errno)}") from None
    return directory


DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def describe_os_error(err: OSError, context_path: str | os.PathLike | None = None) -> RunDirError | None:
    """A RunDirError naming the path for a disk or permission OSError (full, quota, read-only,
    denied, I/O error), else None. `context_path` names the file when the error carries none
    (a failed write() or fsync())."""
    if err.errno not in DISK_ERRNOS:
        return None
    path = err.filename if err.filename is not None else context_path
    where = f"{os.fspath(path)}" if path is not None else "(file not known)"
    if err.filename2 is not None:
        where += f" -> {os.fspath(err.filename2)}"
    return RunDirError(f"{where}: {_errno_name(err)} ({err.strerror}); {_way_on(err.errno)}")


@contextlib.contextmanager
def writing(path: str | os.PathLike):
    """Re-raise a disk or permission OSError from the block as a RunDirError naming `path`."""
    try:
        yield
    except OSError as err:
        described = describe_os_error(err, path)
        if described is None:
            raise
        raise described from err
