"""The host-array collectives of build_dict over MPI (mpi4py), behind the `Comm` interface.

`LocalComm` is a world of one process: every collective is the identity, so the
k-means maths runs unchanged in a test or a single process. `MpiComm` is the same
interface over MPI_COMM_WORLD. `open_comm()` picks one from the launcher's variables.
Arrays are numpy (host) arrays; the k-means copies device statistics to the host once
per collective. `abort_world` ends a failing job, first removing the MPICH shared-memory
file that an aborted job would leave in /dev/shm.
"""
from __future__ import annotations

import itertools
import os
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from dist_sense.comm.env import announce, detect


@dataclass
class SharedCounter:
    """0, 1, 2, ... over all ranks together, each number to one rank.

    Over MPI: a window of one int64 on rank 0, incremented by Fetch_and_op under a shared
    lock. The add is passive-target RMA: with MPICH it completes only while rank 0 is
    inside some MPI call, so a rank busy reading calls `poll` (an Iprobe) now and then;
    without it a claim waits for rank 0's own next claim (docs/benchmarks.md).
    """

    claim: Callable[[], int]
    poll: Callable[[], object]


class LocalComm:
    """A world of one process: the identity for every collective."""

    def __init__(self, local_rank: int = 0, rank: int = 0, world: int = 1):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.allreduce_seconds = 0.0
        """Time spent in allreduce (the k-means' only per-iteration collective), for its metrics."""

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks."""
        return array

    def allgather(self, array: np.ndarray) -> np.ndarray:
        """Every rank's rows (any count per rank), concatenated in rank order."""
        return array

    def alltoall(self, objs: list) -> list:
        """objs[r] goes to rank r; returns what each rank sent this one, in rank order."""
        return list(objs)

    def gather(self, obj) -> list | None:
        """Every rank's object, in rank order, on rank 0 (None elsewhere)."""
        return [obj]

    def bcast(self, obj):
        """Rank 0's object on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    @contextmanager
    def work_counter(self):
        """A SharedCounter over all ranks. Collective to open and close."""
        yield SharedCounter(itertools.count().__next__, lambda: None)


class MpiComm(LocalComm):
    """The Comm interface over an mpi4py communicator."""

    def __init__(self, comm, local_rank: int = 0):
        super().__init__(local_rank, comm.Get_rank(), comm.Get_size())
        self.comm = comm

    def allreduce(self, array: np.ndarray) -> np.ndarray:
        started = time.perf_counter()
        array = np.ascontiguousarray(array)
        out = np.empty_like(array)
        self.comm.Allreduce(array, out)
        self.allreduce_seconds += time.perf_counter() - started
        return out

    def allgather(self, array: np.ndarray) -> np.ndarray:
        # Allgatherv of whole rows as one derived type, so counts stay under 2^31 elements.
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

    def alltoall(self, objs: list) -> list:
        return self.comm.alltoall(objs)

    def gather(self, obj) -> list | None:
        return self.comm.gather(obj, root=0)

    def bcast(self, obj):
        return self.comm.bcast(obj, root=0)

    def barrier(self) -> None:
        self.comm.Barrier()

    @contextmanager
    def work_counter(self):
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

        # On an error in the body nothing below runs: Free is collective, and the entry
        # point aborts the job rather than have this rank wait there for the others.
        yield SharedCounter(claim, self.comm.Iprobe)
        self.comm.Barrier()  # nobody frees the window while another rank may still claim
        window.Free()


def mpi_world():
    """The MPI world communicator (imports mpi4py only when asked)."""
    try:
        from mpi4py import MPI
    except ImportError as err:  # pragma: no cover - depends on the install
        raise RuntimeError("mpi4py is not importable: install mpi4py and an MPI (pip install mpich)") from err
    return MPI.COMM_WORLD


def open_comm() -> LocalComm:
    """LocalComm for a process started without a launcher, else MpiComm over MPI_COMM_WORLD."""
    env = detect()
    if env.world_size == 1:
        return LocalComm(env.local_rank)
    world = mpi_world()
    if world.Get_size() != env.world_size:
        raise RuntimeError(f"the {env.launcher} launcher says {env.world_size} ranks but MPI sees {world.Get_size()}: "
                           "start with mpirun -n N, or srun --mpi=pmi2 (or pmix) under Slurm")
    comm = MpiComm(world, env.local_rank)
    from mpi4py import MPI

    from dist_sense.comm import liveness

    announce(env, "MPI", MPI.Get_library_version().strip().splitlines()[0].strip())
    liveness.join(comm.rank, comm.world, comm.bcast, tidy=remove_own_mpich_shm)
    return comm


def abort_world(code: int) -> None:
    """End every rank of an MPI job (peers may be waiting in a collective for this one).

    An aborted (or killed) MPICH job never unlinks its shared-memory segment, one per node
    (/dev/shm/mpich_shm_<job>_<node>, 2 MB; MPI_Finalize does it on a clean exit), and
    nothing else ever does: this rank first removes its node's (the job's other nodes, if
    any, keep theirs). MPI_Abort returns under MPICH's Hydra, which kills the ranks a moment
    later: the rank then exits at once with `code`, rather than unwind and report again."""
    remove_own_mpich_shm()
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    mpi_world().Abort(code)
    os._exit(code)


SHM_DIR = Path("/dev/shm")
MPICH_SHM_PREFIX = "mpich_"
"""MPICH's names in SHM_DIR: mpich_shm_<world id>_<node id> (ch4 POSIX, the one an abort leaves), and the
mpich_shar_tmp... of shared windows (unlinked as soon as mapped)."""


def own_mpich_shm() -> list[Path]:
    """The MPICH files in SHM_DIR that this process has mapped and that are still linked: its job's, on its node.

    Read from /proc/self/maps and matched by device and inode, so a file of another job,
    whatever its name or owner, is never among them."""
    found = set()
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.read().splitlines()
    except OSError:  # not Linux
        return []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) < 6 or fields[5].endswith(" (deleted)"):
            continue
        path = Path(fields[5])
        if path.parent != SHM_DIR or not path.name.startswith(MPICH_SHM_PREFIX):
            continue
        major, minor = (int(part, 16) for part in fields[3].split(":"))
        try:
            info = path.stat()
        except OSError:
            continue
        if (info.st_ino, os.major(info.st_dev), os.minor(info.st_dev)) == (int(fields[4]), major, minor):
            found.add(path)
    return sorted(found)


def remove_own_mpich_shm() -> list[Path]:
    """Unlink own_mpich_shm() (the job's ranks keep their mappings); returns what was removed."""
    removed = []
    for path in own_mpich_shm():
        try:
            path.unlink()
        except OSError:
            continue
        removed.append(path)
    return removed
