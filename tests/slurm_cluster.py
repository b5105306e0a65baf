"""A real Slurm cluster (Debian's slurm-wlm) in a temporary folder, loopback only.

slurmctld and one slurmd per node run as the current (root) user with every state and log
file in the folder; commands reach it through SLURM_CONF. Several nodes on one host use
Slurm's multiple-slurmd mode (one slurmd per NodeName, each on its own port). Used by
tests/test_slurm.py.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "sbatch", "scontrol", "srun", "squeue")


def available() -> str | None:
    """None if a cluster can be started here, else the reason it cannot."""
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        return f"Slurm is not installed ({', '.join(missing)} missing; apt-get install slurmctld slurmd slurm-client)"
    if os.geteuid() != 0:
        return "starting slurmd needs root"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    def __init__(self, folder: Path, nodes: int = 1, cpus: int | None = None) -> None:
        self.folder = folder
        self.host = socket.gethostname()
        self.nodes = [f"node{i + 1}" for i in range(nodes)]
        self.cpus = cpus or os.cpu_count() or 2
        self.conf = folder / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}

    def write_conf(self) -> None:
        f = self.folder
        (f / "state").mkdir(parents=True, exist_ok=True)
        for node in self.nodes:
            (f / "spool" / node).mkdir(parents=True, exist_ok=True)
        nodes = "\n".join(f"NodeName={n} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={_free_port()} "
                          f"CPUs={self.cpus} RealMemory=8000 State=UNKNOWN" for n in self.nodes)
        self.conf.write_text(f"""ClusterName=webmcse-test
SlurmctldHost={self.host}(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/none
CredType=cred/none
StateSaveLocation={f / 'state'}
SlurmdSpoolDir={f / 'spool' / '%n'}
SlurmctldPidFile={f / 'slurmctld.pid'}
SlurmdPidFile={f / 'slurmd.%n.pid'}
SlurmctldLogFile={f / 'slurmctld.log'}
SlurmdLogFile={f / 'slurmd.%n.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
JobRequeue=1
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
KillWait=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")

    def start(self) -> None:
        self.write_conf()
        subprocess.run(["slurmctld", "-c", "-f", str(self.conf)], env=self.env, check=True)
        for node in self.nodes:
            subprocess.run(["slurmd", "-c", "-N", node, "-f", str(self.conf)], env=self.env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], env=self.env, capture_output=True, text=True)
            if state.stdout.split() == ["idle"] * len(self.nodes):
                return
            time.sleep(0.5)
        raise RuntimeError(f"Slurm node did not become idle: {state.stdout} {state.stderr}\n"
                           f"{(self.folder / 'slurmctld.log').read_text()[-2000:]}")

    def run(self, *args: str, check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env={**self.env, **kw.pop("env", {})}, capture_output=True, text=True,
                              check=check, **kw)

    def job(self, job_id: str) -> dict[str, str]:
        out = self.run("scontrol", "show", "job", "-o", job_id, check=False).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def diagnose(self, job_id: str, batch_log: Path, node_logs: Path | None = None, lines: int = 25) -> str:
        """Everything needed to tell why a job ended as it did, as one string: pytest prints a
        string assertion message in full, while a dict or tuple would be cut to one line. A file
        not written yet is named, not raised: the message must not hide the failure."""
        def tail(path: Path, keep: int | None = lines) -> str:
            try:
                text = path.read_text(errors="replace").splitlines()
            except OSError as err:
                return f"({err})"
            return "\n".join(text[-keep:] if keep else text)

        job = self.run("scontrol", "show", "job", job_id, check=False).stdout
        parts = [f"--- scontrol show job {job_id}\n{job}", f"--- {batch_log.name}\n{tail(batch_log, None)}",
                 f"--- slurmctld.log (last {lines} lines)\n{tail(self.folder / 'slurmctld.log')}"]
        parts += [f"--- slurmd.{n}.log\n{tail(self.folder / f'slurmd.{n}.log')}" for n in self.nodes]
        if node_logs is not None:
            parts += [f"--- {p.relative_to(node_logs)}\n{tail(p)}" for p in sorted(node_logs.glob("*/node*.log"))]
        return "\n".join(parts)

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False)
        for pidfile in [*(f"slurmd.{n}.pid" for n in self.nodes), "slurmctld.pid"]:
            p = self.folder / pidfile
            if p.exists():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(p.read_text().strip()), 15)
        time.sleep(1)


def wait_until_idle(cluster: Cluster, timeout: float) -> list[str]:
    """Wait until the cluster has no job left (pending, running or completing); returns the
    last `squeue` lines seen if the timeout passes first, else an empty list."""
    deadline = time.time() + timeout
    lines: list[str] = []
    while time.time() < deadline:
        lines = cluster.run("squeue", "-h", "-o", "%i %j %T %r", check=False).stdout.split("\n")
        lines = [ln for ln in lines if ln.strip()]
        if not lines:
            return []
        time.sleep(0.5)
    return lines
