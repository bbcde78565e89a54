"""A real single-node SLURM (Debian's slurmctld + slurmd + munge) on localhost, for the `slurm` tests.

Everything lives under one temporary folder; `LocalSlurm.start()` writes the configuration, starts
munged, slurmctld and slurmd, and waits for the node to be idle; `stop()` shuts them down (only the
processes it started). Needs root and the Debian packages `slurmctld slurmd slurm-client munge`
(`ensure_installed()` installs them with apt when it can, or says why not).
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")


def why_unavailable() -> str | None:
    """None when a local SLURM can be started here, else the reason (for pytest.skip)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "a local SLURM needs root (it starts munged and slurmd as their users)"
    if all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        return None
    if not shutil.which("apt-get"):
        return "slurmctld/slurmd/munge are not installed and there is no apt-get to install them"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    try:
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=300, check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *PACKAGES], env=env,
                       capture_output=True, timeout=600, check=True)
    except (subprocess.SubprocessError, OSError) as err:
        return f"could not install {' '.join(PACKAGES)} with apt-get ({err})"
    if not all(shutil.which(t) for t in ("slurmctld", "slurmd", "sbatch", "munged")):
        return "apt-get ran but slurmctld/slurmd/munged are still missing"
    return None


class LocalSlurm:
    def __init__(self, cpus: int | None = None, memory_mb: int = 20000):
        self.host = socket.gethostname()
        self.cpus = cpus or os.cpu_count() or 2
        self.memory_mb = memory_mb
        self.base = Path(tempfile.mkdtemp(prefix="vlm-slurm-", dir="/tmp"))
        os.chmod(self.base, 0o755)  # the slurm and munge users must reach their folders
        self.conf = self.base / "etc" / "slurm.conf"
        self.socket = self.base / "munge-run" / "munge.socket.2"
        self._daemons: list[subprocess.Popen] = []

    @property
    def env(self) -> dict[str, str]:
        return dict(os.environ, SLURM_CONF=str(self.conf))

    def _write_config(self) -> None:
        b = self.base
        for sub in ("etc", "state", "spool", "log", "run"):
            (b / sub).mkdir(parents=True, exist_ok=True)
        for sub in ("state", "log", "run"):
            shutil.chown(b / sub, "slurm", "slurm")
        self.conf.write_text(f"""\
ClusterName=local
SlurmctldHost={self.host}(127.0.0.1)
SlurmUser=slurm
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.socket}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/slurmd-%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1024
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
NodeName={self.host} NodeAddr=127.0.0.1 CPUs={self.cpus} Boards=1 SocketsPerBoard=1 CoresPerSocket={self.cpus} ThreadsPerCore=1 RealMemory={self.memory_mb} State=UNKNOWN
PartitionName=debug Nodes={self.host} Default=YES MaxTime=INFINITE State=UP
""")

    def _start_munge(self) -> None:
        keydir = self.base / "munge-etc"
        rundir = self.socket.parent
        for d in (keydir, rundir, self.base / "munge-log"):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, "munge", "munge")
        os.chmod(keydir, 0o700)
        key = keydir / "munge.key"
        if not Path("/etc/munge/munge.key").is_file():
            subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True, capture_output=True)
        else:
            shutil.copy("/etc/munge/munge.key", key)
        shutil.chown(key, "munge", "munge")
        os.chmod(key, 0o400)
        subprocess.run(["runuser", "-u", "munge", "--", "munged", f"--socket={self.socket}", f"--key-file={key}",
                        f"--log-file={self.base}/munge-log/munged.log", f"--pid-file={rundir}/munged.pid",
                        f"--seed-file={rundir}/munged.seed"], check=True, capture_output=True, timeout=30)
        probe = subprocess.run(f"munge -n -S {self.socket} | unmunge -S {self.socket}", shell=True,
                               capture_output=True, text=True, timeout=30)
        if probe.returncode != 0:
            raise RuntimeError(f"munge does not work: {probe.stderr}")

    def _spawn(self, args: list[str], log_name: str) -> None:
        log = open(self.base / "log" / log_name, "ab")
        self._daemons.append(subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              env=self.env))

    def start(self, timeout: float = 60) -> LocalSlurm:
        self._write_config()
        self._start_munge()
        self._spawn(["slurmctld", "-D", "-i", "-f", str(self.conf)], "slurmctld.out")
        self._spawn(["slurmd", "-D", "-f", str(self.conf)], "slurmd.out")
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = subprocess.run(["sinfo", "-h", "-o", "%t"], env=self.env, capture_output=True, text=True)
            if state.stdout.strip() == "idle":
                return self
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"the local SLURM node did not become idle in {timeout:.0f} s; logs in {self.base}/log")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def sbatch(self, *args: str, cwd: str | Path | None = None, env: dict | None = None) -> str:
        """Submit; returns the job id."""
        result = subprocess.run(["sbatch", "--parsable", *args], env={**self.env, **(env or {})}, cwd=cwd,
                                capture_output=True, text=True, timeout=60)
        if result.returncode != 0:
            raise RuntimeError(f"sbatch failed: {result.stderr}")
        return result.stdout.strip().split(";")[0]

    def job_states(self, job_id: str) -> dict[str, str]:
        """{job or array task id: state} from squeue (pending/running) and scontrol (finished)."""
        out = self.run("scontrol", "-o", "show", "job", job_id, check=False).stdout
        states = {}
        for line in out.splitlines():
            fields = dict(f.split("=", 1) for f in line.split() if "=" in f)
            task = fields.get("ArrayTaskId")
            key = f"{fields.get('ArrayJobId')}_{task}" if task else fields.get("JobId", "?")
            states[key] = fields.get("JobState", "?")
        return states

    def wait(self, job_id: str, timeout: float, poll: float = 2.0, on_poll=None) -> dict[str, str]:
        """Wait until every task of the job has ended; returns their final states."""
        deadline = time.time() + timeout
        finished = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
                    "DEADLINE", "PREEMPTED")
        states: dict[str, str] = {}
        while time.time() < deadline:
            states = self.job_states(job_id)
            if on_poll is not None:
                on_poll(states)
            if states and all(s in finished for s in states.values()):
                return states
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout:.0f} s: {states}")

    def stop(self) -> None:
        # jobs first: with proctrack/linuxproc a job's processes outlive a daemon shutdown
        jobs = subprocess.run(["squeue", "-h", "-o", "%A"], env=self.env, capture_output=True, text=True, timeout=30)
        ids = sorted(set(jobs.stdout.split()))
        if ids:
            subprocess.run(["scancel", *ids], env=self.env, capture_output=True, timeout=30)
            deadline = time.time() + 30
            while time.time() < deadline and subprocess.run(["squeue", "-h"], env=self.env, capture_output=True,
                                                             text=True, timeout=30).stdout.strip():
                time.sleep(1)
        subprocess.run(["scontrol", "shutdown"], env=self.env, capture_output=True, timeout=30)
        for proc in self._daemons:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._daemons = []
        subprocess.run(["munged", "--stop", f"--socket={self.socket}"], capture_output=True, timeout=30)
