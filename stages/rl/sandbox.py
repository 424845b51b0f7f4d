"""Run untrusted code (a completion's program) in a bubblewrap sandbox, with limits that hold as root.

``run_sandboxed(files, argv, limits, stdin)`` runs ``argv`` inside ``bwrap`` and returns a
``SandboxResult`` (exit code, bounded stdout/stderr, why it stopped). What holds (FACTS.md
"Sandboxing untrusted code, as root"; tests/integration/test_sandbox.py tries each escape):

- **Not root.** Run by root, bwrap would map the code to host root. So when we are root, bwrap is
  launched as an unprivileged uid from a pool (``UID_POOL``: 64000..64063), one uid per concurrent
  sandbox, held by an ``flock`` on a per-uid lock file (so threads and processes on one host never
  share a uid: RLIMIT_NPROC counts processes per uid). The child drops to it (setgroups([]),
  setresgid, setresuid: every capability goes) before it execs bwrap.
- **Namespaces.** ``--unshare-all --die-with-parent --new-session``: no network (only a loopback of
  its own), its own pids, IPC, UTS, cgroup and mount namespaces. The root is an empty tmpfs made
  read-only (``--remount-ro /``) holding: read-only ``/usr`` (with the ``/bin``, ``/lib``, ``/lib64``
  symlinks), the interpreter's prefix read-only when it lives outside ``/usr``, a fresh ``/proc``
  and ``/dev``, and two size-capped tmpfs: ``/tmp`` and the work dir ``WORK_DIR`` (``--chdir``
  there). Nothing else of the host (no ``/etc``, ``/root``, ``/home``, ``/work``) is visible.
- **Files in, nothing out.** ``files`` are written into the work dir through memfds (``--file``),
  so the code never touches the host disk: the work dir is a tmpfs of ``limits.disk_mb`` that
  vanishes with the sandbox. (A host temp dir bound writable would let the code fill the host disk
  with many files, each under RLIMIT_FSIZE; a sized tmpfs bounds the total.)
- **Limits** set in the child before exec (inherited by bwrap and the code): RLIMIT_CPU
  (``cpu_s``; SIGXCPU, then SIGKILL a second later), RLIMIT_AS (``memory_mb``, per process),
  RLIMIT_FSIZE (``file_mb``), RLIMIT_NOFILE, RLIMIT_NPROC (``processes``, for the pool uid),
  RLIMIT_CORE 0. The environment is a fresh minimal one (no host variable reaches the code).
- **Wall time-out, nothing left.** The code runs as pid 1 of its pid namespace (``--as-pid-1``),
  so when it exits the kernel kills every process it left, and bwrap reaps it before bwrap exits
  (without ``--as-pid-1`` bwrap exits first and its own pid-1 helper is orphaned to the host's
  init, a zombie that still counts against RLIMIT_NPROC). At ``wall_s`` the sandbox's pid 1 (named
  by ``--info-fd``, held by a pidfd) gets SIGKILL, then bwrap's process group (it runs in a session
  of its own) if bwrap lingers. bwrap has PR_SET_PDEATHSIG SIGKILL and ``--die-with-parent``: a
  worker that dies mid-run takes its sandboxes along. Before a uid goes back to the pool, no
  process of it may remain (``_reap``).
- **Output** is read as it comes, at most ``MAX_OUTPUT`` bytes per stream kept (then a marker
  says how much was dropped; ``sandbox_process.py``), so a program that prints forever cannot
  fill our memory.

``python_argv(script)`` is the command that runs a script with the sandbox's Python: the
interpreter we run on (its prefix bound read-only) when an unprivileged uid can reach it, else the
system's ``/usr/bin/python3`` (a venv under ``/root``, mode 0700, is out of the pool uid's reach),
as ``python -I -S -B``: the standard library only, no site-packages, no environment, no .pyc.

Weaker when not root (a laptop): bwrap runs as the current user in a user namespace; the code
can read what that user can read inside the binds (still only ``/usr`` and the prefix), and
RLIMIT_NPROC counts every process of that user, so the process limit is set to that user's current
count plus ``processes`` (a bound on the code, not an exact one). When root, memory is bounded
per process (RLIMIT_AS): ``processes x memory_mb`` in all; a memory cgroup would bound the total.
"""
from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import os
import resource
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from stages.rl.sandbox_process import RunningSandbox

UID_POOL = range(64000, 64064)
WORK_DIR = "/work/sandbox"
BWRAP = "/usr/bin/bwrap"
SYSTEM_PYTHON = "/usr/bin/python3"
ENV = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": WORK_DIR, "TMPDIR": "/tmp"}
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class SandboxLimits:
    wall_s: float = 5.0      # wall-clock time, then SIGKILL to the whole sandbox
    cpu_s: int = 5           # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 512     # address space per process (RLIMIT_AS)
    file_mb: int = 16        # largest file it may write (RLIMIT_FSIZE)
    open_files: int = 64     # RLIMIT_NOFILE
    processes: int = 32      # RLIMIT_NPROC of the sandbox uid (bwrap and the program included)
    disk_mb: int = 64        # size of each tmpfs it can write: the work dir and /tmp

    def __post_init__(self) -> None:
        for name in ("wall_s", "cpu_s", "memory_mb", "file_mb", "open_files", "processes", "disk_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name}: must be > 0, got {getattr(self, name)!r}")
        if self.processes < 3:
            raise ValueError(f"SandboxLimits.processes: bwrap itself needs 2; got {self.processes}")


@dataclass(frozen=True)
class SandboxResult:
    returncode: int | None   # None: killed at the wall time-out
    stdout: str
    stderr: str
    timed_out: bool
    killed: bool             # ended by a signal (our wall time-out, or a limit's SIGKILL/SIGXCPU/...)
    reason: str              # '' on a clean exit; else e.g. 'wall time-out 5.0 s', 'memory limit (exit 1)'
    wall_s: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


# ---- the interpreter and availability ----

def _reachable_by_others(path: str) -> bool:
    """Can a uid that is neither owner nor group traverse every directory down to ``path``?"""
    parts = os.path.realpath(path).split("/")
    dirs = ["/".join(parts[:i]) for i in range(2, len(parts) + 1)]
    return all(os.stat(d).st_mode & 0o001 for d in dirs if os.path.isdir(d))


@functools.lru_cache(maxsize=1)
def _python() -> tuple[str, tuple[str, ...]]:
    """(interpreter path inside the sandbox, extra bwrap args binding it); ('', ()) if none."""
    exe, prefix = os.path.realpath(sys.executable), os.path.realpath(sys.base_prefix)
    if exe.startswith("/usr/"):
        return exe, ()
    if os.geteuid() != 0 or _reachable_by_others(prefix):
        return exe, ("--ro-bind", prefix, prefix)
    if os.path.exists(SYSTEM_PYTHON):
        return os.path.realpath(SYSTEM_PYTHON), ()
    return "", ()


def python_argv(script: str, *args: str) -> list[str]:
    """Run ``script`` (a path in the work dir) with the sandbox's Python, standard library only."""
    exe, _ = _python()
    return [exe, "-I", "-S", "-B", script, *args]


@functools.lru_cache(maxsize=1)
def sandbox_available() -> str:
    """'' when sandboxes run here; else what is missing and the fix."""
    if not os.path.exists(BWRAP):
        return f"{BWRAP} not found: apt-get install bubblewrap"
    exe, _ = _python()
    if not exe:
        return (f"no Python the sandbox uid can run: {sys.executable} lives under a directory "
                f"other users cannot enter and {SYSTEM_PYTHON} does not exist: apt-get install "
                "python3-minimal (or install the venv's Python under /usr or /opt)")
    res = run_sandboxed({"probe.py": "print('ok')"}, python_argv("probe.py"),
                        SandboxLimits(wall_s=30, cpu_s=10))
    if res.stdout.strip() != "ok":
        return (f"a trial sandbox failed ({res.reason}): {res.stderr.strip()[-500:]}; bwrap needs "
                "unprivileged user namespaces (sysctl kernel.unprivileged_userns_clone=1, "
                "user.max_user_namespaces > 0; in Docker, a seccomp profile that allows clone "
                "with CLONE_NEWUSER)")
    return ""


# ---- the uid pool ----

@contextlib.contextmanager
def _sandbox_uid() -> Iterator[int | None]:
    """A uid from the pool, held (flock) until the sandbox is gone; None when we are not root."""
    if os.geteuid() != 0:
        yield None
        return
    lock_dir = os.path.join(tempfile.gettempdir(), "granite-forge-sandbox-uids")
    os.makedirs(lock_dir, mode=0o700, exist_ok=True)
    while True:
        for uid in UID_POOL:
            fd = os.open(os.path.join(lock_dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            try:
                yield uid
            finally:
                os.close(fd)  # releases the lock
            return
        time.sleep(0.01)  # every uid busy: more concurrent sandboxes than the pool; wait


def _pids_of_uid(uid: int) -> list[int]:
    """Processes whose real uid is ``uid``."""
    pids = []
    for entry in os.scandir("/proc"):
        with contextlib.suppress(OSError, StopIteration):
            if entry.name.isdigit():
                with open(f"/proc/{entry.name}/status") as f:
                    if next(int(ln.split()[1]) for ln in f if ln.startswith("Uid:")) == uid:
                        pids.append(int(entry.name))
    return pids


def _reap(uid: int, timeout_s: float = 5.0) -> None:
    """Before ``uid`` goes back to the pool: SIGKILL any process of it left and wait until none
    remains (a safety net: with ``--as-pid-1`` bwrap has reaped the namespace when it exits)."""
    deadline = time.monotonic() + timeout_s
    while pids := _pids_of_uid(uid):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if time.monotonic() > deadline:
            raise RuntimeError(f"sandbox uid {uid}: processes {pids} survive SIGKILL")
        time.sleep(0.002)


# ---- running ----

def _bwrap_args(files: dict[str, int], argv: list[str], limits: SandboxLimits, info_fd: int) -> list[str]:
    _, python_binds = _python()
    size = str(limits.disk_mb << 20)
    args = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1",
            "--info-fd", str(info_fd),
            "--ro-bind", "/usr", "/usr", "--symlink", "usr/bin", "/bin",
            "--symlink", "usr/lib", "/lib", "--symlink", "usr/lib64", "/lib64",
            *python_binds, "--proc", "/proc", "--dev", "/dev",
            "--size", size, "--tmpfs", "/tmp", "--size", size, "--perms", "0700", "--tmpfs", WORK_DIR]
    for name, fd in files.items():
        args += ["--file", str(fd), f"{WORK_DIR}/{name}"]
    return args + ["--remount-ro", "/", "--chdir", WORK_DIR, "--", *argv]


def _memfd(name: str, text: str) -> int:
    fd = os.memfd_create(name.replace("/", "_"), os.MFD_CLOEXEC)
    data = text.encode()
    while data:
        data = data[os.write(fd, data):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _check_name(name: str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise ValueError(f"files: {name!r} must be a plain file name (no '/', no '..')")


def _child_setup(uid: int | None, limits: SandboxLimits, nproc: int) -> Callable[[], None]:
    libc = ctypes.CDLL(None, use_errno=True)
    rl = [(resource.RLIMIT_CPU, (limits.cpu_s, limits.cpu_s + 1)),
          (resource.RLIMIT_AS, (limits.memory_mb << 20,) * 2),
          (resource.RLIMIT_FSIZE, (limits.file_mb << 20,) * 2),
          (resource.RLIMIT_NOFILE, (limits.open_files,) * 2),
          (resource.RLIMIT_CORE, (0, 0))]

    def setup() -> None:  # runs in the forked child, before exec: no locks, no imports
        if uid is not None:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)   # root's capabilities go with it
        for which, value in rl:
            resource.setrlimit(which, value)
        resource.setrlimit(resource.RLIMIT_NPROC, (nproc, nproc))
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return setup


def _classify(rc: int, stderr: str) -> tuple[str, bool]:
    """(reason, killed) for a non-zero exit of bwrap (which exits 128 + n when the code died of
    signal n)."""
    if rc > 128 and rc - 128 in signal.valid_signals():
        sig = signal.Signals(rc - 128)
        label = {signal.SIGXCPU: "cpu limit", signal.SIGXFSZ: "file-size limit",
                 signal.SIGKILL: "cpu limit or out of memory"}.get(sig, "killed")
        return f"{label} ({sig.name})", True
    tail = stderr[-4000:]
    if stderr.startswith("bwrap: "):
        return f"sandbox failed: {stderr.strip().splitlines()[0]}", False
    for marker, label in (("MemoryError", "memory limit"), ("File too large", "file-size limit"),
                          ("Resource temporarily unavailable", "process limit"),
                          ("Too many open files", "open-file limit")):
        if marker in tail:
            return f"{label} (exit {rc})", False
    return f"exit {rc}", False


def run_sandboxed(files: dict[str, str], argv: list[str], limits: SandboxLimits = SandboxLimits(),
                  stdin: str = "") -> SandboxResult:
    """Run ``argv`` in a fresh sandbox whose work dir holds ``files`` (name -> text)."""
    if not argv:
        raise ValueError("argv: empty; give the command, e.g. python_argv('main.py')")
    for name in files:
        _check_name(name)
    fds = {name: _memfd(name, text) for name, text in files.items()}
    stdin_fd = _memfd("stdin", stdin)
    info_r, info_w = os.pipe2(os.O_CLOEXEC)
    start = time.monotonic()
    try:
        with _sandbox_uid() as uid:
            nproc = limits.processes if uid is not None else (len(_pids_of_uid(os.getuid()))
                                                              + limits.processes)
            args = _bwrap_args(fds, argv, limits, info_w)
            proc = subprocess.Popen(
                args, stdin=stdin_fd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=ENV,
                cwd="/", pass_fds=(*fds.values(), info_w), start_new_session=True,
                preexec_fn=_child_setup(uid, limits, nproc))
            os.close(info_w)
            info_w = -1
            box = RunningSandbox(proc, info_r)
            try:
                out, err, timed_out = box.collect(start + limits.wall_s)
                rc = proc.wait()
            finally:
                box.close()
            if uid is not None:
                _reap(uid)
    finally:
        for fd in (*fds.values(), stdin_fd, info_r, info_w):
            if fd >= 0:
                os.close(fd)
    wall = time.monotonic() - start
    if timed_out:
        return SandboxResult(None, out, err, True, True, f"wall time-out {limits.wall_s:.1f} s", wall)
    reason, killed = ("", False) if rc == 0 else _classify(rc, err)
    return SandboxResult(rc, out, err, False, killed, reason, wall)
