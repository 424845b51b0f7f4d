"""A real single-node Slurm on this machine, for tests: munged, slurmctld and slurmd on localhost.

Needs root (slurmd runs jobs as their owner) and Debian's ``slurm-wlm`` and ``munge`` packages
(``apt-get install -y slurm-wlm munge``; the Makefile's CI target installs them). There is no
systemd here, so the daemons run in the foreground as children of the test process:

- ``munged -F`` as user munge, with a socket, pid, log and seed file of its own in a temp dir
  (``/etc/munge/munge.key``, which the package creates, is the key);
- ``slurmctld -D -i`` and ``slurmd -D``, from a ``slurm.conf`` in the same temp dir: free ports,
  one node with the machine's CPUs (2 here), ``proctrack/linuxproc`` and ``task/none`` (no cgroups
  needed), no accounting database (``jobcomp/filetxt`` keeps finished jobs for ``sacct -c``),
  ``MinJobAge`` so ``scontrol show job`` still knows a finished job, a short ``KillWait``.

``SLURM_CONF`` points every client (sbatch, squeue, scontrol, scancel, sacct) at it; the fixture
sets it in ``os.environ`` for the test and its subprocesses and puts it back afterwards. Every
process started here is stopped (SIGTERM, then SIGKILL) by its pid, and no job is left running.
"""
from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Iterator

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sacct")


def why_not() -> str:
    """Why this machine cannot run the test Slurm ("" when it can)."""
    missing = [t for t in DAEMONS + CLIENTS if shutil.which(t) is None
               and not Path("/usr/sbin", t).exists()]
    if missing:
        return (f"Slurm tests need {', '.join(missing)}: apt-get install -y slurm-wlm munge "
                "(Debian's slurm-wlm 22.05)")
    if os.geteuid() != 0:
        return "Slurm tests start slurmd, which runs jobs as their owner: they need root"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no user munge (the munge package creates it)"
    if not Path("/etc/munge/munge.key").is_file():
        return "no /etc/munge/munge.key (the munge package creates it)"
    return ""


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _sbin(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


class SlurmCluster:
    """The running test cluster: its ``conf`` file, ``node`` name and ``env`` for clients."""

    def __init__(self, root: Path, cpus: int = 2, min_job_age: int = 600, kill_wait: int = 5):
        self.root, self.cpus = root, cpus
        self.node = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.jobcomp = root / "jobcomp.txt"
        self.procs: dict[str, subprocess.Popen] = {}
        ctld_port, slurmd_port = _free_ports(2)
        munge_dir = root / "munge"
        munge_dir.mkdir()
        self.munge_socket = munge_dir / "munge.socket"
        for sub in ("state", "spool", "log"):
            (root / sub).mkdir()
        self.conf.write_text(f"""\
ClusterName=forgetest
SlurmctldHost={self.node}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={self.munge_socket}
CredType=cred/munge
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/builtin
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp}
MinJobAge={min_job_age}
KillWait={kill_wait}
MailProg=/bin/true
ReturnToService=2
MpiDefault=none
NodeName={self.node} NodeAddr=127.0.0.1 CPUs={cpus} State=UNKNOWN
PartitionName=debug Nodes={self.node} Default=YES MaxTime=INFINITE State=UP
""")
        self.env = {"SLURM_CONF": str(self.conf)}

    def start(self, timeout: float = 60) -> None:
        munge = pwd.getpwnam("munge")
        munge_dir = self.munge_socket.parent
        os.chown(munge_dir, munge.pw_uid, munge.pw_gid)
        munge_dir.chmod(0o755)
        self._spawn("munged", [_sbin("munged"), "-F", "--socket", str(self.munge_socket),
                               "--pid-file", str(munge_dir / "munged.pid"),
                               "--log-file", str(munge_dir / "munged.log"),
                               "--seed-file", str(munge_dir / "munged.seed")],
                    user=(munge.pw_uid, munge.pw_gid))
        self._wait(lambda: self.munge_socket.exists(), timeout, "munged's socket")
        env = dict(os.environ, **self.env)
        self._spawn("slurmctld", [_sbin("slurmctld"), "-D", "-i", "-f", str(self.conf)], env=env)
        self._spawn("slurmd", [_sbin("slurmd"), "-D", "-f", str(self.conf)], env=env)
        self._wait(self._node_idle, timeout, "the node to be idle")

    def _spawn(self, name: str, cmd: list[str], env: dict | None = None,
               user: tuple[int, int] | None = None) -> None:
        log = open(self.root / "log" / f"{name}.out", "ab")

        def as_user() -> None:
            if user:
                os.setgid(user[1])
                os.setgroups([])
                os.setuid(user[0])
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                            preexec_fn=as_user, start_new_session=True)
        log.close()

    def _node_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%T"], capture_output=True, text=True,
                             env=dict(os.environ, **self.env), timeout=30)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    def _wait(self, ready, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"test Slurm: no {what} within {timeout:g} s:\n{self.logs()}")
            time.sleep(0.2)

    def logs(self, chars: int = 3000) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")) + [self.munge_socket.parent / "munged.log"]:
            with contextlib.suppress(OSError):
                parts.append(f"--- {path.name}\n{path.read_text(errors='replace')[-chars:]}")
        return "\n".join(parts)

    def run(self, *cmd: str, check: bool = True) -> str:
        """A Slurm client command against this cluster; its stdout."""
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=60,
                             env=dict(os.environ, **self.env))
        if check and out.returncode != 0:
            raise AssertionError(f"{' '.join(cmd)} exited {out.returncode}: {out.stderr}")
        return out.stdout

    def queue(self) -> str:
        """``squeue``: job ids and states still queued or running, '' when none."""
        return self.run("squeue", "-h", "-o", "%i %T").strip()

    def stop(self) -> None:
        """Cancel what is left, then SIGTERM each daemon started here (SIGKILL after 10 s)."""
        if self.procs.get("slurmctld") and self.procs["slurmctld"].poll() is None:
            with contextlib.suppress(Exception):
                self.run("scancel", "--user=root", check=False)
                deadline = time.monotonic() + 15
                while self.queue() and time.monotonic() < deadline:
                    time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def slurm_cluster(cpus: int = 2) -> Iterator[SlurmCluster]:
    """Start the test Slurm, set SLURM_CONF for this process, stop everything afterwards."""
    root = Path(tempfile.mkdtemp(prefix="forge-slurm-"))
    root.chmod(0o755)
    cluster = SlurmCluster(root, cpus=cpus)
    old = os.environ.get("SLURM_CONF")
    try:
        cluster.start()
        os.environ["SLURM_CONF"] = str(cluster.conf)
        yield cluster
    finally:
        cluster.stop()
        if old is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = old
        shutil.rmtree(root, ignore_errors=True)
