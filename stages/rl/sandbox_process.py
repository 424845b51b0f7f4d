"""One running bwrap sandbox, seen from outside: its output read as it comes (at most
``MAX_OUTPUT`` bytes per stream kept), the sandbox's pid 1 (named by bwrap's ``--info-fd``, held
by a pidfd) and the kill at the wall time-out. The sandbox itself, and why it holds, is
``stages/rl/sandbox.py``."""
from __future__ import annotations

import contextlib
import os
import re
import selectors
import signal
import subprocess
import time

MAX_OUTPUT = 64 * 1024  # bytes kept per stream


def _bounded(chunks: list[bytes], dropped: int) -> str:
    text = b"".join(chunks).decode("utf-8", errors="replace")
    return text + (f"\n[... {dropped} more bytes dropped]" if dropped else "")



class RunningSandbox:
    """One running bwrap: its output (bounded), the sandbox's pid 1 (``--info-fd``), the kill."""

    def __init__(self, proc: subprocess.Popen, info_r: int) -> None:
        self.proc, self.info_r = proc, info_r
        self.info, self.pidfd = b"", -1

    def _saw_info(self, chunk: bytes) -> None:
        self.info += chunk
        m = re.search(rb'"child-pid"\s*:\s*(\d+)', self.info)
        if m and self.pidfd < 0:
            pid = int(m.group(1))
            with contextlib.suppress(OSError):
                fd = os.pidfd_open(pid)
                if _ppid(pid) == self.proc.pid:  # still bwrap's child, not a reused pid
                    self.pidfd = fd
                else:
                    os.close(fd)

    def kill(self) -> None:
        """SIGKILL the sandbox's pid 1 (its namespace dies with it and bwrap reaps it: nothing is
        orphaned); bwrap's whole group if that is not known yet or bwrap lingers."""
        with contextlib.suppress(OSError):  # bwrap wrote it before the code started
            while self.pidfd < 0 and (chunk := os.read(self.info_r, 4096)):
                self._saw_info(chunk)
        if self.pidfd >= 0:
            with contextlib.suppress(ProcessLookupError):
                signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(timeout=2.0)
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # not reaped yet: the pgid is still ours

    def collect(self, deadline: float) -> tuple[str, str, bool]:
        """Read stdout/stderr (bounded) until both close and bwrap exits; kill at ``deadline``."""
        proc = self.proc
        kept: dict[int, list[bytes]] = {proc.stdout.fileno(): [], proc.stderr.fileno(): []}
        size = dict.fromkeys(kept, 0)
        dropped = dict.fromkeys(kept, 0)
        timed_out = False
        with selectors.DefaultSelector() as sel:
            for fd in (*kept, self.info_r):
                os.set_blocking(fd, False)
                sel.register(fd, selectors.EVENT_READ)
            while True:
                if not any(fd in sel.get_map() for fd in kept):
                    # the pipes are closed (the code may close them and still run): wait on bwrap
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                    if proc.poll() is not None:
                        break
                wait = deadline - time.monotonic()
                if wait <= 0:
                    if timed_out:
                        break  # killed, yet the pipes stayed open: stop reading
                    timed_out = True
                    self.kill()
                    deadline = time.monotonic() + 5.0  # the pipes close as the namespace dies
                    continue
                for key, _ in sel.select(timeout=wait):
                    fd = key.fd
                    try:
                        chunk = os.read(fd, 65536)
                    except BlockingIOError:
                        continue
                    if not chunk:
                        sel.unregister(fd)
                    elif fd == self.info_r:
                        self._saw_info(chunk)
                    else:
                        room = MAX_OUTPUT - size[fd]
                        if room > 0:
                            kept[fd].append(chunk[:room])
                            size[fd] += min(room, len(chunk))
                        dropped[fd] += max(0, len(chunk) - max(room, 0))
        if proc.poll() is None:
            self.kill()
        out, err = proc.stdout.fileno(), proc.stderr.fileno()
        return (_bounded(kept[out], dropped[out]), _bounded(kept[err], dropped[err]), timed_out)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.kill()
            self.proc.wait()
        for f in (self.proc.stdout, self.proc.stderr):
            f.close()
        if self.pidfd >= 0:
            os.close(self.pidfd)


def _ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(ln.split()[1]) for ln in f if ln.startswith("PPid:"))
