"""The one place that reads launcher variables: rank, local rank, world size, rendezvous address.

Launchers name ranks differently: `deepspeed`/torchrun set RANK, LOCAL_RANK,
WORLD_SIZE; Open MPI sets OMPI_COMM_WORLD_*; MPICH's hydra sets PMI_RANK/PMI_SIZE
and MPI_LOCALRANKID; Slurm's srun sets SLURM_PROCID/SLURM_LOCALID/SLURM_NTASKS.
`detect()` reads them in that order of precedence. A process started with no
launcher is rank 0 of 1 and everything here still works.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass

# (launcher, rank var, local rank var, world size var), first match wins.
_LAUNCHER_VARS = (
    ("torch", "RANK", "LOCAL_RANK", "WORLD_SIZE"),
    ("openmpi", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_SIZE"),
    ("mpich", "PMI_RANK", "MPI_LOCALRANKID", "PMI_SIZE"),
    ("pmix", "PMIX_RANK", "PMIX_LOCAL_RANK", "PMIX_SIZE"),
    ("slurm", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS"),
)


@dataclass(frozen=True)
class DistEnv:
    rank: int
    """Global rank of this process."""
    local_rank: int
    """Rank on this node (picks the GPU)."""
    world_size: int
    """Number of processes in the job."""
    launcher: str
    """Which launcher's variables were found: torch, openmpi, mpich, pmix, slurm or none."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def detect(environ: dict | None = None) -> DistEnv:
    """Rank, local rank and world size from whichever launcher started us."""
    env = os.environ if environ is None else environ
    for name, rank_var, local_var, size_var in _LAUNCHER_VARS:
        if rank_var in env and size_var in env:
            rank, size = int(env[rank_var]), int(env[size_var])
            local = int(env.get(local_var, rank))
            if not 0 <= rank < size:
                raise RuntimeError(f"{rank_var}={rank} is outside {size_var}={size}")
            return DistEnv(rank, local, size, name)
    return DistEnv(0, 0, 1, "none")


def local_world_size(environ: dict | None = None) -> int:
    """Processes of this job on this node (1 when no launcher says).

    Under srun the count comes from the step's per-node task list at this node's index
    (SLURM_STEP_TASKS_PER_NODE at SLURM_NODEID), since SLURM_NTASKS_PER_NODE is only what
    was asked for and is wrong on a node of a 2 + 1 layout."""
    env = os.environ if environ is None else environ
    for var in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS"):
        value = env.get(var, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    counts = slurm_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
    node = env.get("SLURM_NODEID", "")
    if counts and node.isdigit() and int(node) < len(counts):
        return counts[int(node)]
    value = env.get("SLURM_NTASKS_PER_NODE", "")
    return int(value) if value.isdigit() and int(value) > 0 else 1


def slurm_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed per-node counts, "2(x3),1" -> [2, 2, 2, 1]; [] for an empty or unreadable one."""
    counts: list[int] = []
    for part in filter(None, spec.split(",")):
        value, _, repeat = part.partition("(x")
        if not value.isdigit() or (repeat and not repeat.rstrip(")").isdigit()):
            return []
        counts += [int(value)] * (int(repeat.rstrip(")")) if repeat else 1)
    return counts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_torch_env(env: DistEnv) -> None:
    """Make the torch-style variables agree with `env`, so DeepSpeed and torch find them.

    Without RANK/WORLD_SIZE/MASTER_* DeepSpeed goes looking for MPI; under mpirun or
    srun we translate, and a lone process becomes rank 0 of 1 on a free local port.
    """
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", "1" if env.world_size == 1 else ""))
    if not os.environ["LOCAL_SIZE"]:
        os.environ.pop("LOCAL_SIZE")
    if "MASTER_ADDR" not in os.environ:
        if env.world_size > 1 and env.launcher == "slurm":
            os.environ["MASTER_ADDR"] = _slurm_first_host()
        elif env.world_size == 1:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        else:
            raise RuntimeError(f"MASTER_ADDR is not set for a {env.world_size}-process {env.launcher} job")
    if "MASTER_PORT" not in os.environ:
        if env.world_size > 1:
            job = int(os.environ.get("SLURM_JOB_ID", "0"))
            os.environ["MASTER_PORT"] = str(20000 + job % 20000)
        else:
            os.environ["MASTER_PORT"] = str(free_port())


def _slurm_first_host() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST", "")
    if not nodelist:
        return "127.0.0.1"
    import subprocess

    out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=False)
    hosts = out.stdout.split()
    return hosts[0] if hosts else "127.0.0.1"


def announce(env: DistEnv, transport: str, detail: str) -> None:
    """One line per rank naming its host, so a job's log shows where every rank ran."""
    if env.world_size > 1:
        get_logger().info("rank %d of %d on host %s (local rank %d, %s launcher, %s, %s)", env.rank, env.world_size,
                          socket.gethostname(), env.local_rank, env.launcher, transport, detail)


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.rank = detect().rank
        return True


def get_logger(name: str = "dist_sense") -> logging.Logger:
    """A logger whose lines start with the rank: `[rank 1] extract: ...`."""
    logger = logging.getLogger(name)
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.addFilter(_RankFilter())
        handler.setFormatter(logging.Formatter("[rank %(rank)s] %(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(os.environ.get("DIST_SENSE_LOG", "INFO"))
        logger.propagate = False
    return logger
