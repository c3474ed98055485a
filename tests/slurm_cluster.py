"""A private single-node Slurm for tests: munged, slurmctld and slurmd in a temp directory.

Needs Debian's slurmctld, slurmd, slurm-client and munge (`make test` installs them
when it runs as root with apt). Everything lives under one directory: its own munge
key and socket, a slurm.conf generated for this machine, state and spool dirs made
fresh at each start, and the daemons are stopped by PID. `why_unavailable()` says why
a cluster cannot start here, for the test's skip message.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "sinfo")


def why_unavailable() -> str | None:
    missing = [b for b in BINARIES if not shutil.which(b)]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing): apt-get install slurmctld slurmd slurm-client munge"
    if os.geteuid() != 0:
        return "the private Slurm runs its daemons as root; these tests are not root"
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMON_SETTINGS = {
    "SlurmUser": "root", "SlurmdUser": "root", "AuthType": "auth/munge", "CredType": "cred/munge",
    "ProctrackType": "proctrack/linuxproc", "TaskPlugin": "task/none", "SelectType": "select/cons_tres",
    "SelectTypeParameters": "CR_Core", "SchedulerType": "sched/builtin", "MpiDefault": "none", "ReturnToService": 2,
    # With the default 300 s, `sbatch --wait` polls at 2, 8, 32 s; 4 s keeps tests quick.
    "MinJobAge": 4, "JobAcctGatherType": "jobacct_gather/none", "AccountingStorageType": "accounting_storage/none",
}
"""slurm.conf settings of every private test Slurm, one node or several."""
PARTITION = "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES"


def memory_mb(share: float = 0.8) -> int:
    """`share` of this machine's memory in MB, for a NodeName line's RealMemory."""
    return int(int(Path("/proc/meminfo").read_text().split()[1]) / 1024 * share)


def slurm_conf(settings: dict, node_lines: list[str]) -> str:
    lines = [f"{k}={v}" for k, v in {**COMMON_SETTINGS, **settings}.items()]
    return "\n".join([*lines, *node_lines, PARTITION]) + "\n"


def _slurm_conf(root: Path, host: str) -> str:
    cpus = os.cpu_count() or 1
    settings = {
        "ClusterName": "distsense", "SlurmctldHost": host, "AuthInfo": f"socket={root / 'munge.sock'}",
        "StateSaveLocation": root / "state", "SlurmdSpoolDir": root / "spool",
        "SlurmctldPidFile": root / "slurmctld.pid", "SlurmdPidFile": root / "slurmd.pid",
        "SlurmctldPort": _free_port(), "SlurmdPort": _free_port(),
        "SlurmctldLogFile": root / "slurmctld.log", "SlurmdLogFile": root / "slurmd.log",
    }
    return slurm_conf(settings, [f"NodeName={host} CPUs={cpus} RealMemory={memory_mb()} State=UNKNOWN"])


class SlurmCluster:
    """Start with `with SlurmCluster(tmp) as cluster:`; `cluster.env` holds SLURM_CONF for clients."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.pids: list[int] = []
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))

    def __enter__(self) -> "SlurmCluster":
        for sub in ("state", "spool"):
            shutil.rmtree(self.root / sub, ignore_errors=True)
            (self.root / sub).mkdir(parents=True)
        host = socket.gethostname().split(".")[0]
        (self.root / "slurm.conf").write_text(_slurm_conf(self.root, host))
        key = self.root / "munge.key"
        subprocess.run(["mungekey", "--create", "--force", "--keyfile", str(key)], check=True, capture_output=True)
        self._start(["munged", "--foreground", "--force", "--key-file", str(key), "--socket", str(self.root / "munge.sock"),
                     "--pid-file", str(self.root / "munged.pid"), "--log-file", str(self.root / "munged.log"),
                     "--seed-file", str(self.root / "munged.seed")])
        self._wait_for(lambda: (self.root / "munge.sock").exists(), "munged socket")
        self._start(["slurmctld", "-D", "-i", "-f", str(self.root / "slurm.conf")])
        self._start(["slurmd", "-D", "-f", str(self.root / "slurm.conf")])
        self._wait_for(self._node_idle, "the node to become idle")
        return self

    def _start(self, cmd: list[str]) -> None:
        log = open(self.root / f"{Path(cmd[0]).name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        self.pids.append(proc.pid)

    def _node_idle(self) -> bool:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=self.env)
        return out.returncode == 0 and out.stdout.strip() in ("idle", "mixed")

    def _wait_for(self, condition, what: str, timeout: float = 30) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return
            time.sleep(0.25)
        logs = "".join(p.read_text()[-1500:] for p in self.root.glob("*.log") if p.is_file())
        raise RuntimeError(f"private Slurm: timed out waiting for {what}\n{logs}")

    def sbatch_wait(self, script: str, env: dict, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
        """`sbatch --wait script`; returns the finished process (its exit code is the job's)."""
        return subprocess.run(["sbatch", "--wait", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                               f"--output={self.root}/job-%j.out", script], cwd=cwd, env={**self.env, **env},
                              capture_output=True, text=True, timeout=timeout)

    def job_output(self) -> str:
        return "".join(p.read_text() for p in sorted(self.root.glob("job-*.out")))

    def __exit__(self, *exc) -> None:
        for pid in reversed(self.pids):
            try:
                os.killpg(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        for pid in self.pids:
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
