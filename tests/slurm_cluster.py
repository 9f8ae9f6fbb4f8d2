"""A real single-node SLURM cluster for tests: munged, slurmctld and slurmd from Debian's packages
(`slurm-wlm`, `munge`; .ci/run installs them), configured in a temporary directory, started as root and
stopped by the PIDs in their pid files. No accounting database: job states come from `squeue` (the
plugin's `slurm-status-command: squeue`), and finished jobs stay visible for `MinJobAge`.

Two partitions on the one node, `cpu` (default) and `gpu` (no GPUs: a job that asked for one would be
refused by sbatch, which is what the test needs to see never happens)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

DAEMONS = ("slurmctld", "slurmd", "munged")


def available() -> str | None:
    """None when a cluster can be started here, else why not."""
    missing = [d for d in DAEMONS if shutil.which(d) is None and not Path(f"/usr/sbin/{d}").exists()]
    if missing:
        return f"SLURM/munge not installed ({', '.join(missing)} missing: apt-get install slurm-wlm munge)"
    if os.geteuid() != 0:
        return "starting SLURM daemons needs root"
    return None


@dataclass
class Cluster:
    root: Path
    env: dict[str, str]
    pids: dict[str, int]

    def run(self, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(list(cmd), env=self.env, capture_output=True, text=True, check=check, timeout=120)

    def jobs(self) -> list[dict[str, str]]:
        """Every job the controller remembers: id, comment (the plugin's `rule_<name>_wildcards_...`),
        partition, CPUs, GPUs asked for (tres-per-node) and state."""
        out = self.run("squeue", "--states=all", "--noheader", "--format=%i|%k|%P|%C|%b|%T").stdout
        keys = ("id", "comment", "partition", "cpus", "gres", "state")
        return [dict(zip(keys, line.split("|"))) for line in out.splitlines() if line.strip()]

    def stop(self) -> None:
        if "_conf" in self.pids:
            Path("/etc/slurm/slurm.conf").unlink(missing_ok=True)
        for name in DAEMONS:
            pid = self.pids.get(name)
            if pid:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        deadline = time.time() + 20
        for name in DAEMONS:
            pid = self.pids.get(name)
            while pid and time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.2)
            else:
                if pid:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass


def _pid(path: Path, timeout: float = 30) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and path.read_text().strip():
            return int(path.read_text().split()[0])
        time.sleep(0.1)
    raise RuntimeError(f"{path} never appeared")


def start(root: Path, cpus: int | None = None, mem_mb: int = 20000) -> Cluster:
    """Configure and start the cluster under `root` (state, spool, logs, pid files all live there)."""
    host = socket.gethostname().split(".")[0]
    cpus = cpus or len(os.sched_getaffinity(0))
    for d in ("state", "spool", "log", "run", "munge"):
        (root / d).mkdir(parents=True, exist_ok=True)
    # munge: its own key, socket and pid file in `root` (root may run it with --force)
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    sock = root / "munge" / "munge.socket"
    subprocess.run(
        [
            "munged",
            "--force",
            f"--key-file={key}",
            f"--socket={sock}",
            f"--pid-file={root / 'run' / 'munged.pid'}",
            f"--log-file={root / 'log' / 'munged.log'}",
            f"--seed-file={root / 'munge' / 'seed'}",
        ],
        check=True,
        timeout=30,
    )
    pids = {"munged": _pid(root / "run" / "munged.pid")}
    conf = root / "slurm.conf"
    conf.write_text(
        "\n".join(
            [
                "ClusterName=dirltest",
                f"SlurmctldHost={host}",
                "SlurmUser=root",
                "SlurmdUser=root",
                "AuthType=auth/munge",
                f"AuthInfo=socket={sock}",
                "CredType=cred/munge",
                "ProctrackType=proctrack/linuxproc",
                "TaskPlugin=task/none",
                "MpiDefault=none",
                "SelectType=select/cons_tres",
                "SelectTypeParameters=CR_Core_Memory",
                "JobAcctGatherType=jobacct_gather/none",
                "AccountingStorageType=accounting_storage/none",
                "MinJobAge=3600",
                "ReturnToService=2",
                "SlurmctldTimeout=30",
                "SlurmdTimeout=30",
                f"StateSaveLocation={root / 'state'}",
                f"SlurmdSpoolDir={root / 'spool'}",
                f"SlurmctldPidFile={root / 'run' / 'slurmctld.pid'}",
                f"SlurmdPidFile={root / 'run' / 'slurmd.pid'}",
                f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
                f"SlurmdLogFile={root / 'log' / 'slurmd.log'}",
                "SlurmctldPort=16817",
                "SlurmdPort=16818",
                f"NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN",
                "PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
                "PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP",
            ]
        )
        + "\n"
    )
    # job steps (srun inside a batch job) look for the configuration at the default path, whatever the
    # submitting environment said: put it there for the cluster's lifetime (a test machine's own file wins)
    default = Path("/etc/slurm/slurm.conf")
    if not default.exists():
        default.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(conf, default)
        pids["_conf"] = 0
    env = {**os.environ, "SLURM_CONF": str(conf)}
    cluster = Cluster(root, env, pids)
    try:
        subprocess.run(["slurmctld", "-f", str(conf)], env=env, check=True, timeout=60)
        pids["slurmctld"] = _pid(root / "run" / "slurmctld.pid")
        subprocess.run(["slurmd", "-f", str(conf)], env=env, check=True, timeout=60)
        pids["slurmd"] = _pid(root / "run" / "slurmd.pid")
        deadline = time.time() + 60
        while time.time() < deadline:
            state = cluster.run("sinfo", "--noheader", "--format=%T", check=False).stdout.split()
            if state and all(s in ("idle", "mixed") for s in state):
                return cluster
            time.sleep(0.5)
        raise RuntimeError("the node never became idle: " + (root / "log" / "slurmd.log").read_text()[-2000:])
    except BaseException:
        cluster.stop()
        raise
