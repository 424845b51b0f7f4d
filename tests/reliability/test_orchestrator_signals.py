"""`forge run` stopped or broken from outside, as an operator does it (issue 10).

Each test runs the real CLI in a process group of its own, without PREFECT_API_URL (so forge starts
its own local Prefect server), on the SMALL tiny pipeline with ``--only pretrain-1`` (its data
stages are built once for the module and cached after that; each test gives pretrain-1 another
token count, so another key and output dir). Every process forge starts is recorded while it runs
(pid and start time, found through /proc), so "nothing is left behind" is checked by pid:

1. SIGKILL to the torchrun launcher while its rank is still starting up: forge fails within
   ``EXIT_S`` seconds with failure.json (exit -9, the killed rank named), no process of it is left,
   and the same command run again completes.
2. SIGINT to forge's whole process group mid-training (a Ctrl-C typed into its terminal): forge
   exits 130 within ``EXIT_S`` seconds, the run is recorded as cancelled, ``forge resume RUN_ID`` is
   printed, failure.json says 130, nothing is left (the Prefect server included), and that resume
   command continues from the step the worker stopped at.
3. SIGTERM to the forge process alone: the same, exit 143, and a plain rerun resumes.
4. SIGTERM while forge waits on a stage lock another run holds: it ends, cancelled, without a
   failure record for an attempt that never started.
5. SIGTERM while two stages train side by side (``cluster.max_parallel_stages=2``; issue 13): it
   reaches both workers, both checkpoint, the run is cancelled, ``forge resume`` completes both.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.support.helpers import ROOT, SMALL

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not Path("/proc/self/stat").exists(),
                                                   reason="finds processes through /proc (Linux)")]
EXIT_S = 60   # forge must have exited this long after the fault (measured: 3-17 s on 2 busy cores)
STEP_TOKENS = 16 * 128   # one pretrain-1 step of the tiny pipeline
ONLY = ["--only", "pretrain-1"]


def env_for(store: Path) -> dict[str, str]:
    """forge's environment: no Prefect server given, so forge starts (and stops) its own."""
    return dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL="",
                PREFECT_HOME=str(store / "prefect"))


def pretrain(steps: int) -> list[str]:
    return [*SMALL, f"stages.pretrain-1.tokens={steps * STEP_TOKENS}"]


# ------------------------------------------------------------------ processes, from /proc
STARTTIME = 19   # field 22 of /proc/PID/stat, counted from the state (field 3) as 0


def _stat(pid: int) -> list[str] | None:
    """Fields of /proc/PID/stat after the command (state, ppid, pgrp, session, ...), or None."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def alive(pid: int, started: str) -> bool:
    """The process ``pid`` that started at ``started`` still runs (not a zombie, not a new one)."""
    f = _stat(pid)
    return f is not None and f[0] not in ("Z", "X") and f[STARTTIME] == started


def children_map() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (f := _stat(int(entry.name))) is not None:
            kids.setdefault(int(f[1]), []).append(int(entry.name))
    return kids


class Forge:
    """`forge ARGS` running in a process group (and session) of its own, like a shell job; its
    output read by a thread; every descendant it ever had recorded: pid -> (start time, command)."""

    def __init__(self, store: Path, *args: str):
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", *args], cwd=ROOT,
                                     env=env_for(store), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.seen: dict[int, tuple[str, str]] = {}   # pid -> (start time, command line)
        self.sessions: dict[int, int] = {}            # pid -> its session id, while it ran
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def look(self) -> dict[int, str]:
        """Record forge's descendants now; pid -> command line of those alive. The command line
        and session are the newest seen (a child between fork and exec still has forge's)."""
        kids, now, todo = children_map(), {}, [self.proc.pid]
        while todo:
            for pid in kids.get(todo.pop(), []):
                f = _stat(pid)
                if f is None:
                    continue
                todo.append(pid)
                self.seen[pid] = (f[STARTTIME], _cmdline(pid) or self.seen.get(pid, ("", ""))[1])
                self.sessions[pid] = int(f[3])
                now[pid] = self.seen[pid][1]
        return now

    def wait_until(self, what: str, cond, timeout: float = 300):
        """Poll ``cond()`` (recording descendants meanwhile) until it returns something true."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self.look()
            if (got := cond()):
                return got
            if self.proc.poll() is not None:
                pytest.fail(f"forge exited {self.proc.returncode} before {what}:\n{self.output[-4000:]}")
            time.sleep(0.1)
        self.proc.kill()
        pytest.fail(f"no {what} within {timeout} s:\n{self.output[-4000:]}")

    def exit_within(self, seconds: float, since: float) -> tuple[int, float]:
        """forge's exit code and how long after ``since`` it came; fails (and kills forge's
        group) if it did not come within ``seconds``."""
        deadline = since + seconds
        while self.proc.poll() is None and time.monotonic() < deadline:
            self.look()
            time.sleep(0.1)
        if self.proc.poll() is None:
            stuck = self.look()
            os.killpg(self.proc.pid, signal.SIGKILL)
            pytest.fail(f"forge still running {seconds} s after the fault; its processes: {stuck}"
                        f"\n{self.output[-4000:]}")
        took = time.monotonic() - since
        time.sleep(0.5)   # the reader thread takes the last lines
        return self.proc.returncode, took

    def strays(self) -> list[str]:
        """Processes forge started that still run after it ended, and anything in its group."""
        left = [f"{pid} {cmd}" for pid, (started, cmd) in self.seen.items() if alive(pid, started)]
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit() and (f := _stat(int(entry.name))) is not None \
                    and f[0] not in ("Z", "X") and int(f[2]) == self.proc.pid:
                left.append(f"{entry.name} {_cmdline(int(entry.name))} (in forge's group)")
        return left

    def run_id(self) -> str:
        m = re.search(r"run id (\S+)", self.output)
        assert m, self.output[-3000:]
        return m.group(1)


def out_dir_of(store: Path, output: str) -> Path:
    """pretrain-1's output dir, from the plan forge printed."""
    m = re.search(r"^\s+pretrain-1\s+run\s.*?(pretrain-1-[0-9a-f]+)", output, re.M)
    assert m, output[-3000:]
    return store / m.group(1)


def forge_done(store: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, env=env_for(store),
                         capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"forge {' '.join(args)} exited {out.returncode}\n" \
                                f"{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out


def status(store: Path, run_id: str) -> dict:
    return json.loads((store / "runs" / f"{run_id}.status.json").read_text())


def last_attempt(out_dir: Path) -> str:
    return (out_dir / "worker.log").read_text().split("\n--- ")[-1]


def assert_resumed_at(out_dir: Path, step: int) -> None:
    log = last_attempt(out_dir)
    assert re.search(rf"\[pretrain-1\] resuming from \S*checkpoints/iter_{step:07d} \(step {step}\)",
                     log), log[-3000:]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    """A store whose data, tokenizer and tokenize stages are built (cached for every test)."""
    store = tmp_path_factory.mktemp("signals")
    forge_done(store, "run", *SMALL, "--only", "tokenize")
    return store


def test_sigkill_of_torchrun_while_its_rank_starts_fails_the_stage_and_leaves_nothing(store):
    args = ["run", *pretrain(10), *ONLY]
    forge = Forge(store, *args)

    def starting_rank():   # torchrun (ours: the spec is in this store) and its rank, pre-start-up
        procs = forge.look()
        for pid, cmd in procs.items():
            if "torch.distributed.run" in cmd and str(store) in cmd:
                ranks = [p for p, c in procs.items() if "stages.worker" in c and p != pid
                         and "torch.distributed.run" not in c]
                if ranks:
                    return pid, ranks
        return None

    torchrun, ranks = forge.wait_until("a torchrun with a rank", starting_rank)
    out_dir = out_dir_of(store, forge.output)
    os.kill(torchrun, signal.SIGKILL)
    killed_at = time.monotonic()
    assert "start-up" not in last_attempt(out_dir), "the rank had started already: too late"
    code, took = forge.exit_within(EXIT_S, killed_at)
    print(f"SIGKILL of torchrun {torchrun} (ranks {ranks}) during start-up: forge exited {code} "
          f"{took:.1f} s later")
    assert code == 1, forge.output[-3000:]
    assert forge.strays() == []
    failure = json.loads((out_dir / "failure.json").read_text())
    assert failure["exit_code"] == -9, failure
    note = next(line for line in failure["tail"] if line.startswith("[forge] the launcher"))
    assert f"(pid {torchrun}) ended with code -9" in note and str(ranks[0]) in note, note
    assert not (out_dir / "artifact.json").exists()
    assert status(store, forge.run_id())["status"] == "failed"

    forge_done(store, *args)   # the same command again completes the stage
    assert (out_dir / "artifact.json").exists() and not (out_dir / "failure.json").exists()


def _stop_mid_training(store: Path, steps: int, send) -> tuple[Forge, Path, int, float]:
    """Start pretrain-1, call ``send(forge)`` after its first periodic checkpoint; (forge, out dir,
    exit code, seconds from the signal to forge's exit)."""
    forge = Forge(store, "run", *pretrain(steps), *ONLY)
    forge.wait_until("the run id", lambda: "run id " in forge.output)   # the plan came before it
    out_dir = out_dir_of(store, forge.output)
    forge.wait_until("a mid-phase checkpoint", lambda: list(out_dir.glob("checkpoints/*/done")))
    assert not (out_dir / "artifact.json").exists(), "pretrain-1 finished before the signal"
    servers = [p for p, (_, cmd) in forge.seen.items() if "prefect" in cmd and "server" in cmd]
    assert servers, f"no Prefect server among forge's processes: {forge.seen}"
    assert all(forge.sessions[p] != forge.proc.pid for p in servers), \
        "the Prefect server is in forge's session: a terminal's Ctrl-C reaches it"
    send(forge)
    sent_at = time.monotonic()
    code, took = forge.exit_within(EXIT_S, sent_at)
    return forge, out_dir, code, took


def _check_cancelled(store: Path, forge: Forge, out_dir: Path, signame: str, code: int) -> int:
    """The run is cancelled, the stop and resume command said, failure.json written, nothing
    left; the step the worker stopped at."""
    out = forge.output
    run_id = forge.run_id()
    assert code == 128 + signal.Signals[signame], out[-3000:]
    recorded = status(store, run_id)
    assert (recorded["status"], recorded.get("signal")) == ("cancelled", signame), recorded
    assert f"forge: stopped by {signame}" in out and f"forge resume {run_id}" in out, out[-3000:]
    assert "Starting temporary server" not in out   # Prefect's embedded server is not used
    assert "ConnectError" not in out and "Connection refused" not in out, out[-3000:]
    assert forge.strays() == []
    m = re.search(rf"\[pretrain-1\] stopped by {signame} after step (\d+): saved "
                  r"checkpoints/iter_(\d+)", last_attempt(out_dir))
    assert m and int(m.group(1)) == int(m.group(2)), last_attempt(out_dir)[-3000:]
    failure = json.loads((out_dir / "failure.json").read_text())
    assert failure["exit_code"] == code, failure
    assert any(line.startswith(f"[pretrain-1] stopped by {signame}") for line in failure["tail"])
    return int(m.group(1))


def test_ctrl_c_to_forges_process_group_cancels_the_run_and_resume_continues(store):
    forge, out_dir, code, took = _stop_mid_training(
        store, 40, lambda f: os.killpg(f.proc.pid, signal.SIGINT))
    print(f"SIGINT to forge's process group mid-training: forge exited {code} {took:.1f} s later")
    stopped = _check_cancelled(store, forge, out_dir, "SIGINT", code)

    resumed = forge_done(store, "resume", forge.run_id())   # the command forge printed
    assert (out_dir / "artifact.json").exists(), resumed.stdout[-3000:]
    assert_resumed_at(out_dir, stopped)


def test_sigterm_to_forge_alone_cancels_the_run_and_a_rerun_resumes(store):
    forge, out_dir, code, took = _stop_mid_training(
        store, 41, lambda f: os.kill(f.proc.pid, signal.SIGTERM))
    print(f"SIGTERM to forge mid-training: forge exited {code} {took:.1f} s later")
    stopped = _check_cancelled(store, forge, out_dir, "SIGTERM", code)

    forge_done(store, "run", *pretrain(41), *ONLY)
    assert (out_dir / "artifact.json").exists()
    assert_resumed_at(out_dir, stopped)


def test_sigterm_while_waiting_on_a_stage_lock_ends_forge(store):
    """Another run holds pretrain-1's lock (here: this test, as flows/launch.stage_lock takes it)."""
    args = ["run", *pretrain(42), *ONLY]
    plan = forge_done(store, "plan", *args[1:]).stdout
    out_dir = out_dir_of(store, plan)
    (store / ".locks").mkdir(exist_ok=True)
    with open(store / ".locks" / f"{out_dir.name}.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        forge = Forge(store, *args)
        forge.wait_until("the lock wait", lambda: "another forge run is working on" in forge.output)
        os.kill(forge.proc.pid, signal.SIGTERM)
        code, took = forge.exit_within(EXIT_S, time.monotonic())
    print(f"SIGTERM to forge waiting on a stage lock: forge exited {code} {took:.1f} s later")
    assert code == 143, forge.output[-3000:]
    assert status(store, forge.run_id())["status"] == "cancelled"
    assert forge.strays() == []
    assert not (out_dir / "failure.json").exists()   # no attempt started, none failed


def test_sigterm_with_two_stages_running_stops_both_and_resume_completes_both(store):
    """cluster.max_parallel_stages=2: pretrain-1 and a copy of it (pretrain-b, the same key in
    another output dir) train side by side. One SIGTERM to forge reaches both workers (forge's
    main thread passes it to every live worker): each stops after a step with a checkpoint, forge
    exits 143 with the run cancelled and nothing left, and `forge resume` completes both, each
    from the step it stopped at."""
    stages = ("pretrain-1", "pretrain-b")
    # 100 steps (~35 ms each): neither finishes before both have a checkpoint, whatever the skew
    # of their start-ups
    args = ["run", *pretrain(100), "+stages.pretrain-b=${stages.pretrain-1}",
            "cluster.max_parallel_stages=2", "--only", "|".join(stages)]
    forge = Forge(store, *args)
    forge.wait_until("the run id", lambda: "run id " in forge.output)
    out = {}
    for stage in stages:
        m = re.search(rf"^\s+{stage}\s+run\s.*?({stage}-[0-9a-f]+)", forge.output, re.M)
        assert m, forge.output[-3000:]
        out[stage] = store / m.group(1)
    forge.wait_until("a checkpoint of each", lambda: all(list(d.glob("checkpoints/*/done"))
                                                        for d in out.values()))
    assert not any((d / "artifact.json").exists() for d in out.values()), "one finished already"
    os.kill(forge.proc.pid, signal.SIGTERM)
    code, took = forge.exit_within(EXIT_S, time.monotonic())
    print(f"SIGTERM to forge with two stages training: forge exited {code} {took:.1f} s later")
    assert code == 143, forge.output[-3000:]
    assert status(store, forge.run_id())["status"] == "cancelled"
    assert forge.strays() == []
    stopped = {}
    for stage, d in out.items():
        m = re.search(rf"\[{stage}\] stopped by SIGTERM after step (\d+): saved "
                      r"checkpoints/iter_(\d+)", last_attempt(d))
        assert m and m.group(1) == str(int(m.group(2))), last_attempt(d)[-3000:]
        assert json.loads((d / "failure.json").read_text())["exit_code"] == 143
        stopped[stage] = int(m.group(1))

    forge_done(store, "resume", forge.run_id())
    for stage, d in out.items():
        assert (d / "artifact.json").exists(), stage
        assert re.search(rf"\[{stage}\] resuming from \S*checkpoints/iter_{stopped[stage]:07d} "
                         rf"\(step {stopped[stage]}\)", last_attempt(d)), last_attempt(d)[-3000:]
