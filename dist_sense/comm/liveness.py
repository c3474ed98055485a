"""Lost peers found in bounded time: heartbeats on the shared run directory, and the collective timeout.

A collective whose peer has died waits for it: gloo and NCCL for their process-group timeout
(30 minutes by default), MPI for ever, and a rank on a powered-off node sends nothing that
would wake them sooner. So every rank of a multi-process stage writes a heartbeat file,
RUN/liveness/<stage>/rank-NNNNN, every few seconds from a background thread, and watches
its two ring neighbours' files (rank - 1 and rank + 1), so each rank has two watchers and a
lost block of ranks always has one on a live node. A neighbour whose heartbeat has not moved
for DIST_SENSE_PEER_TIMEOUT seconds (default 120) is lost: the watcher prints which rank and
host, and leaves with LOST_EXIT_CODE (4); srun --kill-on-bad-exit, mpirun or the deepspeed
launcher then ends the job's other ranks. A neighbour that ended with an error code ends its
watchers too, with the same code, since they would wait for it in the next collective.

The heartbeat is a counter, compared between reads on the watcher's own clock, so clock
skew between nodes does not matter; it is written in place (one inode, a fixed-size record),
which NFS's close-to-open consistency shows to the next open on another node. Each launch
of a stage has a token from rank 0; files left by an earlier launch carry another and do not
count as beats. DIST_SENSE_COLLECTIVE_TIMEOUT (default 600 s) is the torch.distributed
process-group timeout: the backstop for a collective that hangs while every peer is alive.

The stage entry point (dist_sense.cli) calls `configure`; comm.init_torch and comm.open_comm
call `join` once the ranks can talk; `leave` records the exit code.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

PEER_TIMEOUT_VAR = "DIST_SENSE_PEER_TIMEOUT"
COLLECTIVE_TIMEOUT_VAR = "DIST_SENSE_COLLECTIVE_TIMEOUT"
DEFAULT_PEER_TIMEOUT_S = 120.0
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
LOST_EXIT_CODE = 4
"""Exit code of a rank that found a peer lost: resumable once the node is back (resubmit the job)."""
RECORD_BYTES = 160
"""Every heartbeat record is padded to this size, so an in-place rewrite never leaves a longer old tail."""


class TimeoutSettingError(ValueError):
    """A timeout variable that is not a positive number of seconds."""


def seconds_from_env(var: str, default: float) -> float:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):  # NaN fails too
        raise TimeoutSettingError(f"{var}={raw!r} is not a positive number of seconds (unset it for {default:.0f})")
    return value


def peer_timeout() -> float:
    return seconds_from_env(PEER_TIMEOUT_VAR, DEFAULT_PEER_TIMEOUT_S)


def collective_timeout() -> float:
    return seconds_from_env(COLLECTIVE_TIMEOUT_VAR, DEFAULT_COLLECTIVE_TIMEOUT_S)


@dataclass
class Beat:
    token: str
    count: int
    state: str
    """running, or ended:<exit code>."""
    host: str
    pid: int

    def encode(self) -> bytes:
        line = f"{self.token} {self.count} {self.state} {self.host} {self.pid}"
        return line.encode()[:RECORD_BYTES - 1].ljust(RECORD_BYTES - 1) + b"\n"

    @staticmethod
    def decode(data: bytes) -> "Beat | None":
        parts = data.decode(errors="replace").split()
        if len(parts) != 5 or not parts[1].isdigit() or not parts[4].isdigit():
            return None  # absent, or read while being rewritten: no news this round
        return Beat(parts[0], int(parts[1]), parts[2], parts[3], int(parts[4]))


def neighbours(rank: int, world: int) -> list[int]:
    """The ranks `rank` watches: its ring neighbours (one when the world is two)."""
    return sorted({(rank - 1) % world, (rank + 1) % world} - {rank})


class Watch:
    """This rank's heartbeat and its watch over its neighbours, on a daemon thread."""

    def __init__(self, folder: Path, rank: int, world: int, token: str, timeout: float,
                 on_peer_gone: Callable[[str, int], None] | None = None, host: str | None = None):
        self.folder, self.rank, self.world, self.token, self.timeout = Path(folder), rank, world, token, timeout
        self.host = host or socket.gethostname()
        self.interval = min(10.0, max(0.2, timeout / 12))
        self.on_peer_gone = on_peer_gone or _end_process
        self.watched = neighbours(rank, world)
        self._count = 0
        self._seen: dict[int, tuple[int, float]] = {}  # peer -> (last count, when it last changed, our clock)
        self._last_host: dict[int, str] = {}
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dist_sense-liveness", daemon=True)

    def path(self, rank: int) -> Path:
        return self.folder / f"rank-{rank:05d}"

    def start(self) -> "Watch":
        self.folder.mkdir(parents=True, exist_ok=True)
        self._write("running")
        self._thread.start()
        return self

    def _write(self, state: str) -> None:
        self._count += 1
        record = Beat(self.token, self._count, state, self.host, os.getpid()).encode()
        fd = os.open(self.path(self.rank), os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            os.pwrite(fd, record, 0)
        finally:
            os.close(fd)

    def _read(self, rank: int) -> Beat | None:
        try:
            with open(self.path(rank), "rb") as f:
                return Beat.decode(f.read(RECORD_BYTES))
        except OSError:
            return None

    def check(self, now: float | None = None) -> tuple[str, int] | None:
        """(message, exit code) when a watched peer is lost or ended with an error, else None."""
        now = time.monotonic() if now is None else now
        for peer in list(self.watched):
            beat = self._read(peer)
            if beat is not None and beat.token == self.token:
                self._last_host[peer] = beat.host
                if beat.state.startswith("ended:"):
                    self.watched.remove(peer)
                    code = int(beat.state.split(":", 1)[1] or 0)
                    if code != 0:
                        return (f"rank {peer} of {self.world} (host {beat.host}, pid {beat.pid}) ended with exit code "
                                f"{code}; this rank stops too rather than wait for it in a collective", code)
                    continue
                if self._seen.get(peer, (None,))[0] != beat.count:
                    self._seen[peer] = (beat.count, now)
            last = self._seen.get(peer, (None, self._started))[1]
            if now - last > self.timeout:
                return self._lost_message(peer, now - last), LOST_EXIT_CODE
        return None

    def _lost_message(self, peer: int, silent: float) -> str:
        host = self._last_host.get(peer)
        where = f"host {host}" if host else "its host never wrote a heartbeat"
        what = "no heartbeat" if peer in self._seen else "no heartbeat since this stage started"
        return (f"lost rank {peer} of {self.world} ({where}): {what} for {silent:.0f} s "
                f"({PEER_TIMEOUT_VAR}={self.timeout:g}); its node or process is gone. Ending the job with exit code "
                f"{LOST_EXIT_CODE}: once the node is back, resubmit the same job and the stage resumes "
                f"(heartbeats in {self.folder})")

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self._write("running")
            except OSError:
                pass  # a shared filesystem hiccup: the watchers allow a whole timeout of them
            found = self.check()
            if found is not None and not self._stop.is_set():
                self.on_peer_gone(*found)
                return

    def stop(self, code: int) -> None:
        """Stop the thread and record how this rank ended (peers stop watching it, or follow an error)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        try:
            self._write(f"ended:{code}")
        except OSError:
            pass


def _end_process(message: str, code: int) -> None:
    """Print why and leave now: the main thread may be inside a collective that never returns."""
    from dist_sense.comm.env import detect

    print(f"error [rank {detect().rank}]: {message}", file=sys.stderr, flush=True)
    for tidy in _tidy_on_exit:
        try:
            tidy()  # what os._exit would leave in this node's /dev/shm (MPICH's segment, DeepSpeed's buffer)
        except Exception:  # noqa: BLE001 - leaving matters more than tidying
            pass
    sys.stdout.flush()
    os._exit(code)


_folder: Path | None = None
_watch: Watch | None = None
_tidy_on_exit: list[Callable[[], object]] = []


def configure(run_dir: Path, stage: str) -> None:
    """Where this process's stage keeps its heartbeats (RUN/liveness/<stage>); nothing starts yet."""
    global _folder
    _folder = Path(run_dir) / "liveness" / stage


def join(rank: int, world: int, share: Callable, tidy: Callable[[], object] | None = None) -> Watch | None:
    """Start this rank's heartbeat and watch, once the ranks can talk; collective (share is a broadcast
    from rank 0). tidy: what to remove before leaving on a lost peer (node-local buffers). A no-op for
    a world of one or a process whose entry point did not configure one."""
    global _watch
    if tidy is not None:
        _tidy_on_exit.append(tidy)
    if _watch is not None or _folder is None or world <= 1:
        return _watch
    token = share(uuid.uuid4().hex[:16] if rank == 0 else None)
    _watch = Watch(_folder, rank, world, token, peer_timeout()).start()
    return _watch


def leave(code: int) -> None:
    """Record this rank's exit code and stop its watch (idempotent)."""
    global _watch
    if _watch is not None:
        watch, _watch = _watch, None
        watch.stop(code)
