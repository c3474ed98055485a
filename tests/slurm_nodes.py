"""A private multi-node Slurm on this one machine: each node a set of Linux namespaces.

Each node is a network namespace (its own interface and address on a private bridge), a
UTS namespace (its own host name) and a mount namespace with a private /dev/shm, a hosts
file naming every node, and a private run folder mounted over one common path, so the
munge socket and the daemons' pid and spool files are node-local while slurm.conf names
one path for all. The checkout and every run directory stay on the common filesystem, as
a cluster's shared filesystem would be.

    switch namespace: bridge br0
        |-- veth -- node 1 namespace: eth0 198.18.<net>.1, host dsn1: munged, slurmctld, slurmd
        |-- veth -- node 2 namespace: eth0 198.18.<net>.2, host dsn2: munged, slurmd

Addresses come from the benchmarking range 198.18.0.0/15 and exist only on these links:
nothing is routed anywhere else. A node "holder" process (sleep) keeps each node's UTS and
mount namespaces alive; everything on a node is started with nsenter into the holder's
namespaces. `lose(node)` is a power cut: the link goes down first, so peers hear nothing
(no reset), then every process of the node is killed. `bring_back(node)` boots it again.
Leaving the `with` block (a failing test included) kills every process of every node and
deletes the namespaces; `why_unavailable()` says why a cluster cannot be had here.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from slurm_cluster import memory_mb, slurm_conf
from slurm_cluster import why_unavailable as slurm_missing

PREFIX = "dsn"
"""Namespace names start with this (and the test run's pid): stale ones from a killed run are found by it."""


def why_unavailable() -> str | None:
    missing = slurm_missing()
    if missing:
        return missing
    for tool in ("ip", "nsenter", "unshare"):
        if not shutil.which(tool):
            return f"{tool} is not installed (iproute2, util-linux): the multi-node tests need network namespaces"
    probe = f"{PREFIX}probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot make a network namespace here ({made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _run(*cmd: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()}")


def _netns_pids(netns: str) -> list[int]:
    out = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def remove_stale() -> None:
    """Kill and delete the namespaces a killed test run left (their pid is no longer running)."""
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split("\n")
    for line in listed:
        name = line.split(" ")[0]
        if not name.startswith(PREFIX) or name.startswith(f"{PREFIX}probe"):
            continue
        owner = name[len(PREFIX):].split("-")[0]
        if owner.isdigit() and Path(f"/proc/{owner}").exists():
            continue
        for pid in _netns_pids(name):
            _kill(pid, signal.SIGKILL)
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _slurm_conf(root: Path, nodes: list["Node"], cpus: int) -> str:
    run = root / "node-run"  # each node's own folder is mounted here
    settings = {
        "ClusterName": "distsense2", "SlurmctldHost": f"{nodes[0].name}({nodes[0].address})",
        "AuthInfo": f"socket={run / 'munge.sock'}", "StateSaveLocation": root / "state", "SlurmdSpoolDir": run / "spool",
        "SlurmctldPidFile": run / "slurmctld.pid", "SlurmdPidFile": run / "slurmd.pid",
        # A lost node is declared DOWN after SlurmdTimeout (300 s by default): 20 s keeps the node-loss tests short.
        "SlurmdTimeout": 20, "KillWait": 5,
        # Nodes share this machine's cores: slurmd takes the CPU count below rather than refuse to oversubscribe.
        "SlurmdParameters": "config_overrides",
        "SlurmctldLogFile": root / "slurmctld.log", "SlurmdLogFile": root / "slurmd-%n.log",
    }
    memory = memory_mb(0.8 / len(nodes))
    return slurm_conf(settings, [f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus} RealMemory={memory} State=UNKNOWN"
                                 for n in nodes])


class Job:
    """A submitted batch job: `wait()` gives the batch script's exit code (sbatch --wait's)."""

    def __init__(self, cluster: "SlurmNodes", job_id: int, proc: subprocess.Popen, submitted: float):
        self.cluster, self.id, self.proc, self.submitted = cluster, job_id, proc, submitted
        self.returncode: int | None = None
        self.ended: float | None = None

    def wait(self, timeout: float = 600) -> int:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.cluster.run(self.cluster.nodes[0], ["scancel", str(self.id)])
            self.proc.wait(timeout=30)
            raise RuntimeError(f"job {self.id} still running after {timeout:.0f} s (cancelled):\n{self.output()[-4000:]}")
        self.ended = time.time()
        self.returncode = self.proc.returncode
        self.proc.stdout.close()
        return self.returncode

    def output(self) -> str:
        path = self.cluster.root / f"job-{self.id}.out"
        return path.read_text(errors="replace") if path.exists() else ""


class Node:
    def __init__(self, cluster: "SlurmNodes", index: int):
        self.index = index
        self.name = f"dsn{index}"
        self.address = f"198.18.{cluster.net}.{index}"
        self.netns = f"{cluster.prefix}-{index}"
        self.dir = cluster.root / self.name
        self.holder: subprocess.Popen | None = None

    def __repr__(self) -> str:
        return f"Node({self.name}, {self.address})"


class SlurmNodes:
    """`with SlurmNodes(tmp, n=2) as cluster:`; `cluster.sbatch(...)` submits from the first node."""

    def __init__(self, root: Path, n: int = 2, cpus: int = 4, net: int = 0):
        self.root = Path(root)
        self.prefix = f"{PREFIX}{os.getpid()}-{net}"
        self.net = net
        self.cpus = cpus
        self.nodes = [Node(self, i + 1) for i in range(n)]
        self.switch = f"{self.prefix}-sw"
        self.env = dict(os.environ, SLURM_CONF=str(self.root / "slurm.conf"))
        self._daemons: list[subprocess.Popen] = []

    # ------------------------------------------------------------------ building the nodes

    def __enter__(self) -> "SlurmNodes":
        remove_stale()
        try:
            self._make_network()
            (self.root / "node-run").mkdir(parents=True, exist_ok=True)
            shutil.rmtree(self.root / "state", ignore_errors=True)
            (self.root / "state").mkdir()
            (self.root / "slurm.conf").write_text(_slurm_conf(self.root, self.nodes, self.cpus))
            _run("mungekey", "--create", "--force", "--keyfile", str(self.root / "munge.key"))
            for node in self.nodes:
                self.boot(node)
            self.wait_for(lambda: self.states() == {n.name: "idle" for n in self.nodes}, "every node to be idle", 60)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _make_network(self) -> None:
        _run("ip", "netns", "add", self.switch)
        _run("ip", "-n", self.switch, "link", "add", "br0", "type", "bridge")
        _run("ip", "-n", self.switch, "link", "set", "br0", "up")
        hosts = "127.0.0.1 localhost\n" + "".join(f"{n.address} {n.name}\n" for n in self.nodes)
        for node in self.nodes:
            _run("ip", "netns", "add", node.netns)
            _run("ip", "link", "add", f"{self.prefix}-{node.index}e", "netns", node.netns, "type", "veth",
                 "peer", "name", f"p{node.index}", "netns", self.switch)
            _run("ip", "-n", self.switch, "link", "set", f"p{node.index}", "master", "br0", "up")
            _run("ip", "-n", node.netns, "link", "set", f"{self.prefix}-{node.index}e", "name", "eth0")
            _run("ip", "-n", node.netns, "addr", "add", f"{node.address}/24", "dev", "eth0")
            _run("ip", "-n", node.netns, "link", "set", "lo", "up")
            node.dir.mkdir(parents=True, exist_ok=True)
            (node.dir / "hosts").write_text(hosts)

    def boot(self, node: Node) -> None:
        """Start the node: its holder (host name, /dev/shm, hosts file, run folder), munged, slurmd (and slurmctld on node 1)."""
        run = node.dir / "run"
        shutil.rmtree(run, ignore_errors=True)
        (run / "spool").mkdir(parents=True)
        ready = node.dir / "ready"
        ready.unlink(missing_ok=True)
        script = (f"set -e; hostname {node.name}; mount --make-rprivate /; mount -t tmpfs -o size=8g shm /dev/shm; "
                  f"mount --bind {node.dir / 'hosts'} /etc/hosts; mount --bind {run} {self.root / 'node-run'}; "
                  f"touch {ready}; exec sleep infinity")
        # nsenter --net (not `ip netns exec`, which mounts a new /sys and hides the cgroup tree slurmd needs).
        node.holder = subprocess.Popen(["nsenter", f"--net=/var/run/netns/{node.netns}", "unshare", "--uts", "--mount",
                                        "bash", "-c", script], start_new_session=True,
                                       stdout=subprocess.DEVNULL, stderr=open(node.dir / "holder.err", "w"))
        self.wait_for(ready.exists, f"{node.name} to start", 15)
        _run("ip", "-n", node.netns, "link", "set", "eth0", "up")
        key = self.root / "munge.key"
        sock = self.root / "node-run" / "munge.sock"
        self.start(node, ["munged", "--foreground", "--force", "--key-file", str(key), "--socket", str(sock),
                          "--pid-file", str(sock.parent / "munged.pid"), "--log-file", str(node.dir / "munged.log"),
                          "--seed-file", str(sock.parent / "munged.seed")], "munged")
        self.wait_for((run / "munge.sock").exists, f"munged on {node.name}", 15)
        if node.index == 1:
            self.start(node, ["slurmctld", "-D", "-i", "-f", str(self.root / "slurm.conf")], "slurmctld")
        self.start(node, ["slurmd", "-D", "-f", str(self.root / "slurm.conf")], "slurmd")

    def on(self, node: Node, cmd: list[str], cwd: Path | str = "/") -> list[str]:
        """`cmd` as run on `node` (in its namespaces, in `cwd`)."""
        return ["nsenter", "-t", str(node.holder.pid), "-n", "-u", "-m", f"--wd={cwd}", *cmd]

    def start(self, node: Node, cmd: list[str], name: str, env: dict | None = None, cwd: Path | str = "/"):
        log = open(node.dir / f"{name}.out", "a")
        proc = subprocess.Popen(self.on(node, cmd, cwd), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env=env or self.env)
        self._daemons.append(proc)
        return proc

    # ------------------------------------------------------------------ using the cluster

    def run(self, node: Node, cmd: list[str], env: dict | None = None, cwd: Path | str = "/", timeout: float = 60,
            check: bool = False) -> subprocess.CompletedProcess:
        done = subprocess.run(self.on(node, cmd, cwd), env={**self.env, **(env or {})}, capture_output=True,
                              text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise RuntimeError(f"{cmd} on {node.name} exited {done.returncode}: {done.stderr[-2000:]}")
        return done

    def states(self) -> dict[str, str]:
        out = self.run(self.nodes[0], ["sinfo", "-h", "-N", "-o", "%N %T"], timeout=20)
        return dict(line.split()[:2] for line in out.stdout.splitlines() if line.strip())

    def submit(self, script: str, sbatch_args: list[str], env: dict, cwd: Path, args: list[str] = ()) -> "Job":
        """`sbatch --wait` of `script` from the first node, in the background; output in ROOT/job-<id>.out."""
        cmd = self.on(self.nodes[0], ["sbatch", "--wait", "--gpus-per-node=0", "--cpus-per-task=1",
                                      f"--output={self.root}/job-%j.out", *sbatch_args, script, *args], cwd)
        proc = subprocess.Popen(cmd, env={**self.env, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        first = proc.stdout.readline()
        if not first.startswith("Submitted batch job "):
            proc.wait()
            raise RuntimeError(f"sbatch {script} refused: {first}{proc.stdout.read()}")
        return Job(self, int(first.split()[-1]), proc, time.time())

    def sbatch(self, script: str, sbatch_args: list[str], env: dict, cwd: Path, args: list[str] = (),
               timeout: float = 600) -> "Job":
        """Submit and wait for the end; the returned job has its `returncode`."""
        job = self.submit(script, sbatch_args, env, cwd, args)
        job.wait(timeout)
        return job

    def wait_for(self, condition, what: str, timeout: float = 30, poll: float = 0.25) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if condition():
                    return
            except (subprocess.TimeoutExpired, OSError):
                pass
            time.sleep(poll)
        logs = "".join(f"== {p}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(self.root.rglob("*.log")))
        raise RuntimeError(f"multi-node Slurm: timed out after {timeout:.0f} s waiting for {what}\n{logs}")

    # ------------------------------------------------------------------ losing a node

    def processes(self, node: Node) -> list[int]:
        return _netns_pids(node.netns)

    def lose(self, node: Node) -> float:
        """Power cut: the link goes down (peers hear nothing more), then every process of the node dies. Returns when."""
        _run("ip", "-n", node.netns, "link", "set", "eth0", "down")
        at = time.time()
        for _ in range(20):
            pids = self.processes(node)
            if not pids:
                break
            for pid in pids:
                _kill(pid, signal.SIGKILL)
            time.sleep(0.1)
        if node.holder is not None:
            node.holder.wait(timeout=10)
        return at

    def bring_back(self, node: Node, timeout: float = 90) -> None:
        """Boot a lost node again and wait until Slurm takes it back (idle)."""
        self.boot(node)
        self.wait_for(lambda: self.states().get(node.name) == "idle", f"{node.name} to be idle again", timeout, poll=1.0)

    def __exit__(self, *exc) -> None:
        for node in self.nodes:
            for pid in self.processes(node):  # none once the namespace is gone
                _kill(pid, signal.SIGKILL)
        for proc in self._daemons:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for node in self.nodes:
            if node.holder is not None and node.holder.poll() is None:
                node.holder.kill()
            subprocess.run(["ip", "netns", "del", node.netns], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.switch], capture_output=True)
