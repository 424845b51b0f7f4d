"""Fault injection against the real training worker, shared by tests/reliability/test_faults.py (a
few trials, in CI) and benchmarks/faults.py (many trials, one table).

A ``Lab`` holds a synthetic tokenized corpus and an uninterrupted reference run of a tiny phase
(``STEPS`` steps of 8x64 tokens on the 2x64 model of test_pretrain_worker.py, a checkpoint every
``EVERY`` steps, two kept). Each trial starts the real worker (``python -m stages.worker SPEC.json``
in a session of its own, as flows/launch.py starts it; torchrun where it says so), injects one
fault at a moment drawn from a seeded RNG, runs the stage again unchanged, and judges it:

- recovered: the rerun exits 0 and its final checkpoint and curve equal the reference's bit for
  bit (``tests/support/final_state.py``): every weight and AdamW moment, the train state (steps,
  consumed samples, tokens, AdamW's step counter), every rank's RNG state, and every line of
  metrics.jsonl (each step once; all values but the wall-clock ones);
- lost: work or data is gone or damage was used: the rerun resumed from an older checkpoint than
  the newest complete one the fault left, that one fails its checksums, or a checkpoint the
  fault damaged was loaded;
- as specified: the fault-specific promise holds (SIGTERM: exit 143 right after a checkpoint of
  the step it stopped at; damage: a REJECTED line naming the checkpoint and the reason; a full
  disk: a "NOT saved" error and nothing half-written left; afterwards only complete checkpoints;
  no process of the worker outlives it holding its output open).
``redone`` counts the steps trained twice (the work a fault cost: up to ``EVERY`` for a kill, 0 for
SIGTERM).

Nothing of our own code is mocked: faults are signals, bytes changed on disk, a tmpfs that fills
up (or RLIMIT_FSIZE where mounting is not allowed), concurrent launches.
"""
from __future__ import annotations

import dataclasses
import json
import os
import queue
import re
import resource
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

from tests.integration.test_pretrain_worker import CONFIG_A, GBS, SEQ, make_tokenized, write_spec
from tests.support.final_state import FinalState, differences, final_state

ROOT = Path(__file__).resolve().parents[2]
STAGE = "pretrain-a"
STEPS, EVERY = 40, 5
CONFIG = dict(CONFIG_A, tokens=STEPS * GBS * SEQ, checkpoint_interval=EVERY, keep_checkpoints=2,
              log_interval=1)
FULL = dict(CONFIG, keep_checkpoints=STEPS)  # the reference keeps every checkpoint (to copy from)
DISK_MB, SLACK = 8, 256 * 1024  # the tmpfs, and what the ballast leaves free on it
FILE_LIMIT = 256 * 1024  # RLIMIT_FSIZE: above every file but the tensor files (~830 KB each)
ORCHESTRATOR = """
import json, sys
from pathlib import Path
from flows.launch import StageFailed, run_worker
from stages.cluster import ParallelSpec
spec = json.loads(Path(sys.argv[1]).read_text())
try:
    run_worker(spec["stage"], "torchrun", ParallelSpec(), spec, Path(spec["out_dir"]), print)
except StageFailed as e:
    sys.exit(f"stage failed: exit {e.code}")
"""


@dataclasses.dataclass
class Trial:
    fault: str
    detail: str = ""          # where the fault landed, what was done
    recovered: bool = False   # the rerun equals the reference bit for bit
    differs: str = ""         # how it does not ("" = it does, or it was not compared)
    lost: str = ""            # what was lost or wrongly used ("" = nothing)
    unmet: str = ""           # which fault-specific promise failed ("" = all held)
    redone: int = 0           # steps trained twice
    seconds: float = 0.0

    def miss(self, why: str) -> None:
        self.unmet = f"{self.unmet}; {why}" if self.unmet else why

    def lose(self, what: str) -> None:
        self.lost = f"{self.lost}; {what}" if self.lost else what

    def compare(self, out: Path, reference: FinalState) -> None:
        """``recovered``: the final state of ``out`` equals ``reference``'s bit for bit."""
        diffs = differences(final_state(out), reference)
        self.recovered, self.differs = not diffs, "; ".join(diffs)

    @property
    def ok(self) -> bool:
        return self.recovered and not self.lost and not self.unmet

    def line(self) -> str:
        verdict = "ok" if self.ok else "FAILED: " + "; ".join(
            x for x in (self.lost, self.unmet, "" if self.recovered else
                        f"not recovered ({self.differs})" if self.differs else "not recovered") if x)
        return f"{self.fault}: {self.detail}; redone {self.redone}; {self.seconds:.0f}s; {verdict}"


# ------------------------------------------------------------------ processes
def env() -> dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    out["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), out.get("PYTHONPATH")]))
    return out


class Proc:
    """A process in a session of its own, its output read line by line (by a thread, so that a
    stray descendant holding the output open cannot hang the reader); killed after ``timeout``."""

    def __init__(self, cmd: list[str], timeout: float = 300):
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: list[str] = []
        self.stray: list[str] = []  # descendants that kept the output open after it ended
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.watchdog = threading.Timer(timeout, self.signal_group, (signal.SIGKILL,))
        self.watchdog.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def wait_for(self, pattern: str) -> bool:
        """Read output until a line matches ``pattern``; False if the output ended first."""
        rx = re.compile(pattern)
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
            if rx.search(line):
                return True
        self._queue.put(None)
        return False

    def finish(self, grace: float = 10) -> int:
        """Wait for the process; its output must end within ``grace`` s of it (else ``stray``)."""
        code = self.proc.wait()
        self.watchdog.cancel()
        self._reader.join(grace)
        if self._reader.is_alive():
            self.stray = _session(self.proc.pid) or ["(none of its session)"]
            self.signal_group(signal.SIGKILL)
            self._reader.join()
        while (line := self._queue.get()) is not None:
            self.lines.append(line)
        self._queue.put(None)
        return code


def _session(sid: int) -> list[str]:
    """The live processes of session ``sid``: pid, parent, state and command line."""
    import psutil
    out = []
    for p in psutil.process_iter(["pid", "ppid", "status", "cmdline"]):
        try:
            if os.getsid(p.pid) == sid and p.info["status"] != psutil.STATUS_ZOMBIE:
                out.append(f"{p.pid} (parent {p.info['ppid']}) {p.info['status']} "
                           f"{' '.join(p.info['cmdline'] or [])[:90]}")
        except (ProcessLookupError, PermissionError):
            pass
    return out


def worker(spec: Path, nproc: int = 1) -> Proc:
    if nproc == 1:
        return Proc([sys.executable, "-m", "stages.worker", str(spec)])
    return Proc([sys.executable, "-m", "torch.distributed.run", "--standalone",
                 f"--nproc_per_node={nproc}", "--max_restarts=0", "-m", "stages.worker", str(spec)])


def trigger(step: int) -> str:
    """The log line after which a fault is injected: the start-up line (0) or step ``step``."""
    return rf"\[{STAGE}\] start-up" if step == 0 else rf"\[{STAGE}\] step {step}/"


# ------------------------------------------------------------------ judging
def verify(ckpt: Path) -> str:
    """Why ``ckpt`` is not complete ("" if it is), checked here independently of checkpoint.py
    (each entry's digest: xxh3_128, or sha256 in checkpoints older than issue 13)."""
    import hashlib

    import xxhash
    try:
        files = json.loads((ckpt / "done").read_text())["files"]
    except (OSError, ValueError, KeyError) as e:
        return f"done: {e}"
    present = {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "done"}
    if present != set(files):
        return f"files differ from done: {sorted(present ^ set(files))}"
    for rel, meta in files.items():
        algorithm = "xxh3_128" if "xxh3_128" in meta else "sha256"
        hasher = xxhash.xxh3_128 if algorithm == "xxh3_128" else hashlib.sha256
        if hasher((ckpt / rel).read_bytes()).hexdigest() != meta.get(algorithm):
            return f"{rel}: {algorithm}"
    return ""


def step_of(path: Path) -> int:
    return int(path.name.split("_")[1].split("-")[0])


def newest_done(out: Path) -> Path | None:
    found = sorted((out / "checkpoints").glob("iter_*/done"))
    return found[-1].parent if found else None


def resumed_from(log: str) -> int:
    m = re.search(r"resuming from \S+ \(step (\d+)\)", log)
    return int(m.group(1)) if m else 0


def last_step(log: str) -> int:
    steps = [int(s) for s in re.findall(rf"\[{STAGE}\] step (\d+)/", log)]
    return max(steps, default=0)


def leftovers(out: Path) -> list[str]:
    """Entries of checkpoints/ other than complete, verified checkpoints (and rejected ones)."""
    root = out / "checkpoints"
    return [p.name for p in sorted(root.iterdir())
            if not p.name.startswith("rejected-") and (not p.name.startswith("iter_") or verify(p))]


# ------------------------------------------------------------------ the lab
class Lab:
    """The corpus, the reference run, and the trials; every run lives under ``root``."""

    def __init__(self, root: Path, seed: int = 0, log=print):
        self.root, self.log = Path(root), log
        self.rng = np.random.default_rng(seed)
        self.data = make_tokenized(self.root)
        self.count = 0
        t0 = time.time()
        self.reference, self.reference_config = self.root / "reference", FULL
        ref = worker(write_spec(self.reference, STAGE, FULL, {"tokenize": self.data}))
        stamps = {}
        while ref.wait_for(rf"\[{STAGE}\] (step \d+/|saved)"):
            stamps[ref.lines[-1].split()[2]] = time.time()
        assert ref.finish() == 0, ref.log[-3000:]
        self.save_s = np.median([stamps[f"iter_{s:07d}"] - stamps[f"{s}/{STEPS}"]
                                 for s in range(EVERY, STEPS + 1, EVERY)])
        self.step_s = np.median([stamps[f"{s + 1}/{STEPS}"] - stamps[f"{s}/{STEPS}"]
                                 for s in range(1, STEPS) if s % EVERY])
        self.ref = final_state(self.reference)
        self.log(f"reference: {STEPS} steps in {time.time() - t0:.0f}s; a step "
                 f"{1000 * self.step_s:.0f} ms (saves excluded), a save {1000 * self.save_s:.0f} ms")
        self._dp2: FinalState | None = None

    def fresh(self, name: str, config: dict | None = None, cluster: dict | None = None,
              under: Path | None = None) -> Path:
        self.count += 1
        out = (under or self.root) / f"{self.count:03d}-{name}"
        write_spec(out, STAGE, config or CONFIG, {"tokenize": self.data}, cluster)
        return out

    def moment(self, in_save: bool, steps_left: int = 1) -> tuple[int, float]:
        """(step, delay): after the log line of ``step`` (0: the start-up line), wait ``delay`` s.
        ``in_save``: a step a save follows, within that save's measured duration.
        ``steps_left``: at least this many steps follow ``step`` (a stop signal must land while
        the stage trains: one after the last step finds the stage complete, and it exits 0)."""
        if in_save:
            return EVERY * int(self.rng.integers(1, STEPS // EVERY + 1)), float(
                self.rng.uniform(0, self.save_s))
        return (int(self.rng.integers(0, STEPS + 1 - steps_left)),
                float(self.rng.uniform(0, 2 * self.step_s)))

    def rerun(self, out: Path, trial: Trial, expect_from: int | None, nproc: int = 1,
              reference: FinalState | None = None) -> str:
        """Run the stage again; judge recovery against the reference and the resume point."""
        again = worker(out / "spec.json", nproc)
        code = self.finish(again, trial)
        if code != 0:
            trial.miss(f"rerun exited {code}: {again.log[-1500:]}")
            return again.log
        start = resumed_from(again.log)
        if expect_from is not None and start != expect_from:
            trial.lose(f"resumed from step {start}, the newest complete checkpoint was step {expect_from}")
        trial.compare(out, reference or self.ref)
        if extra := leftovers(out):
            trial.miss(f"left in checkpoints/: {extra}")
        return again.log

    @staticmethod
    def finish(proc: Proc, trial: Trial) -> int:
        """``proc.finish()``; a descendant that outlives it holding its output open fails the trial
        (a reader such as the orchestrator would wait on it for ever)."""
        code = proc.finish()
        if proc.stray:
            trial.miss(f"a process outlived the worker, holding its output open: {proc.stray}")
        return code

    def after_fault(self, out: Path, trial: Trial) -> int:
        """Check what a fault left: the newest checkpoint with ``done`` must verify; its step."""
        newest = newest_done(out)
        if newest is not None and (why := verify(newest)):
            trial.lose(f"{newest.name} has done but fails: {why}")
        return step_of(newest) if newest else 0

    # -------------------------------------------------------------- faults
    def kill(self, in_save: bool = False) -> Trial:
        """SIGKILL the worker (only it, as the OOM killer would) at a random moment."""
        t0, trial = time.time(), Trial("SIGKILL")
        out = self.fresh("kill")
        step, delay = self.moment(in_save)
        proc = worker(out / "spec.json")
        if proc.wait_for(trigger(step)):
            time.sleep(delay)
            os.kill(proc.pid, signal.SIGKILL)
        code = self.finish(proc, trial)
        root = out / "checkpoints"
        torn = sorted(p.name for p in root.glob("*")
                      if p.name.startswith(".tmp-") or not (p / "done").exists()) if root.is_dir() else []
        where = f"inside a save ({', '.join(torn)} unfinished)" if torn else "between saves"
        trial.detail = (f"after step {step} + {1000 * delay:.0f} ms -> {where}, last step "
                        f"{last_step(proc.log)}" + ("" if code == -signal.SIGKILL else f", exit {code}"))
        complete = self.after_fault(out, trial)
        log = self.rerun(out, trial, complete)
        trial.redone = max(0, last_step(proc.log) - resumed_from(log))
        trial.seconds = time.time() - t0
        return trial

    def term(self) -> Trial:
        """SIGTERM to the worker's process group (what the orchestrator forwards) at a random moment:
        it must finish the step, save it, exit 143; the rerun starts at that very step."""
        t0, trial = time.time(), Trial("SIGTERM")
        out = self.fresh("term")
        step, delay = self.moment(False, steps_left=4)
        proc = worker(out / "spec.json")
        if proc.wait_for(trigger(step)):
            time.sleep(delay)
            proc.signal_group(signal.SIGTERM)
        code = self.finish(proc, trial)
        trial.detail = f"after step {step} + {1000 * delay:.0f} ms -> exit {code}"
        stopped = self._check_stop(proc.log, code, 143, out, trial)
        self.rerun(out, trial, stopped)
        trial.redone = max(0, last_step(proc.log) - stopped)
        trial.seconds = time.time() - t0
        return trial

    def _check_stop(self, log: str, code: int, want_code: int, out: Path, trial: Trial) -> int:
        m = re.search(rf"\[{STAGE}\] stopped by SIGTERM after step (\d+): saved checkpoints/iter_\d+", log)
        complete = self.after_fault(out, trial)
        if m is None or code != want_code:
            trial.miss(f"exit {code}, no 'stopped by SIGTERM' line" if m is None else f"exit {code}")
            return complete
        stopped = int(m.group(1))
        trial.detail += f", stopped after step {stopped} (last logged {last_step(log)})"
        if complete != stopped or last_step(log) != stopped:
            trial.miss(f"stopped after step {stopped}, newest checkpoint {complete}")
        return stopped

    def term_orchestrator(self) -> Trial:
        """SIGTERM to an orchestrator running flows.launch.run_worker (torchrun launcher): it must
        pass the signal on, the worker stop cleanly, the orchestrator end, nothing keep running."""
        import psutil
        t0, trial = time.time(), Trial("SIGTERM to the orchestrator")
        out = self.fresh("orchestrator")
        step, delay = self.moment(False, steps_left=4)
        orch = Proc([sys.executable, "-c", ORCHESTRATOR, str(out / "spec.json")])
        if orch.wait_for(trigger(step)):
            time.sleep(delay)
            os.kill(orch.pid, signal.SIGTERM)  # the orchestrator only, as `kill PID` or a scheduler
        code = self.finish(orch, trial)
        pid = int((out / "worker.pid").read_text()) if (out / "worker.pid").exists() else None
        time.sleep(0.5)
        alive = pid is not None and psutil.pid_exists(pid) and \
            psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        trial.detail = f"after step {step} + {1000 * delay:.0f} ms -> orchestrator exit {code}"
        log = (out / "worker.log").read_text()
        stopped = self._check_stop(log, code, -signal.SIGTERM, out, trial)
        if alive:
            trial.miss(f"worker {pid} still running after the orchestrator ended")
        again = Proc([sys.executable, "-c", ORCHESTRATOR, str(out / "spec.json")])
        if self.finish(again, trial) != 0:
            trial.miss(f"rerun failed: {again.log[-1500:]}")
        else:
            trial.compare(out, self.ref)
            if resumed_from((out / "worker.log").read_text().split("\n--- ")[-1]) != stopped:
                trial.lose("the rerun did not resume at the step it stopped at")
        trial.redone = max(0, last_step(log) - stopped)
        trial.seconds = time.time() - t0
        return trial

    def term_one_rank(self) -> Trial:
        """SIGTERM to rank 1 of a DP=2 torchrun world only: both ranks must stop after the same step
        (the all-reduced stop flag), save it and exit; the rerun equals a DP=2 reference."""
        import psutil
        t0, trial = time.time(), Trial("SIGTERM to one rank of two")
        cluster = {"data_parallel": 2}
        if self._dp2 is None:
            ref = self.fresh("reference-dp2", cluster=cluster)
            run = worker(ref / "spec.json", nproc=2)
            assert run.finish() == 0, run.log[-3000:]
            self._dp2 = final_state(ref)
        out = self.fresh("one-rank", cluster=cluster)
        step, delay = self.moment(False, steps_left=4)
        step = max(step, 1)
        proc = worker(out / "spec.json", nproc=2)
        if proc.wait_for(trigger(step)):
            time.sleep(delay)
            ranks = {p.environ().get("RANK"): p for p in psutil.Process(proc.pid).children()}
            ranks["1"].send_signal(signal.SIGTERM)
        code = self.finish(proc, trial)
        trial.detail = f"rank 1 after step {step} + {1000 * delay:.0f} ms -> torchrun exit {code}"
        stopped = self._check_stop(proc.log, code, 1, out, trial)
        ranks_exit = re.findall(r"exitcode\s*:\s*(-?\d+)", proc.log)
        if set(ranks_exit) != {"143"}:
            trial.miss(f"rank exit codes {ranks_exit}")
        newest = newest_done(out)
        if newest is None or len(list((newest / "rng").glob("rank_*.pt"))) != 2:
            trial.miss("the stop checkpoint lacks a rank's state")
        self.rerun(out, trial, stopped, nproc=2, reference=self._dp2)
        trial.redone = max(0, last_step(proc.log) - stopped)
        trial.seconds = time.time() - t0
        return trial

    def damage(self, kinds: tuple[str, ...]) -> Trial:
        """A run 'killed' after step 27: the reference's iter_15..iter_25 and the metrics up to 27.
        The newest ``len(kinds)`` checkpoints get one kind of damage each (newest first)."""
        t0, trial = time.time(), Trial("damaged checkpoint")
        out = self.fresh("damage")
        (out / "checkpoints").mkdir()
        for s in (15, 20, 25):
            shutil.copytree(self.reference / "checkpoints" / f"iter_{s:07d}",
                            out / "checkpoints" / f"iter_{s:07d}")
        rows = (self.reference / "metrics.jsonl").read_text().splitlines()
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows[:27]))
        done = []
        for s, kind in zip((25, 20, 15), kinds):
            done.append(f"iter_{s:07d}: {self._damage(out / 'checkpoints' / f'iter_{s:07d}', kind)}")
        trial.detail = "; ".join(done)
        expect = (25, 20, 15, 0)[len(kinds)]
        log = self.rerun(out, trial, expect)
        for s in (25, 20, 15)[:len(kinds)]:
            if not re.search(rf"\[{STAGE}\] REJECTED checkpoint \S+iter_{s:07d}: \S", log):
                trial.miss(f"no REJECTED line for iter_{s:07d}")
            if not list((out / "checkpoints").glob(f"rejected-iter_{s:07d}-*")):
                trial.miss(f"iter_{s:07d} was not moved aside")
        if resumed_from(log) > expect:
            trial.lose(f"loaded a damaged checkpoint (step {resumed_from(log)})")
        trial.redone = 27 - resumed_from(log)
        trial.seconds = time.time() - t0
        return trial

    def _damage(self, ckpt: Path, kind: str) -> str:
        rng = self.rng
        tensors = sorted(ckpt.glob("*.distcp"))
        if kind == "flip":
            f = tensors[int(rng.integers(len(tensors)))]
            blob = bytearray(f.read_bytes())
            at = int(rng.integers(len(blob)))
            blob[at] ^= 1 << int(rng.integers(8))
            f.write_bytes(bytes(blob))
            return f"one bit flipped in {f.name} at byte {at}"
        if kind == "truncate":
            f = tensors[int(rng.integers(len(tensors)))]
            size = int(rng.integers(f.stat().st_size))
            os.truncate(f, size)
            return f"{f.name} truncated to {size} bytes"
        if kind == "delete":
            files = sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != "done")
            f = files[int(rng.integers(len(files)))]
            f.unlink()
            return f"{f.relative_to(ckpt)} deleted"
        if kind == "done":
            f = ckpt / "done"
            text = f.read_text()
            if rng.random() < 0.5:
                size = int(rng.integers(len(text)))
                f.write_text(text[:size])
                return f"done torn at byte {size}"
            digests = [m.span(1) for m in re.finditer(r'"(?:xxh3_128|sha256)": "([0-9a-f]+)"', text)]
            start, end = digests[int(rng.integers(len(digests)))]
            at = start + int(rng.integers(end - start))
            f.write_text(text[:at] + ("0" if text[at] != "0" else "1") + text[at + 1:])
            return f"a digest in done changed at char {at}"
        raise ValueError(kind)

    def disk_full(self, method: str) -> Trial:
        """The disk fills at a random step (a tmpfs filled with a ballast file, or RLIMIT_FSIZE set
        on the running worker): the next save must fail loudly and leave nothing half-written; with
        space back, the rerun resumes from the newest complete checkpoint and ends bit-exact."""
        t0, trial = time.time(), Trial(f"disk full ({method})")
        mount = self.root / f"disk-{self.count + 1:03d}"
        if method == "tmpfs":
            mount.mkdir()
            subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_MB}m", "tmpfs", str(mount)],
                           check=True, capture_output=True)
        try:
            out = self.fresh("disk", under=mount if method == "tmpfs" else None)
            step = int(self.rng.integers(1, STEPS - 2 * EVERY))
            proc = worker(out / "spec.json")
            if proc.wait_for(trigger(step)):
                if method == "tmpfs":
                    fill(mount, SLACK)
                else:
                    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT))
            code = self.finish(proc, trial)
            m = re.search(rf"\[{STAGE}\] checkpoint (iter_\d+) was NOT saved \(.*?\); (.*?free on)", proc.log)
            trial.detail = (f"full after step {step} -> exit {code}, "
                            + (f"{m.group(1)} not saved" if m else "no 'NOT saved' error"))
            if code == 0 or m is None:
                trial.miss("the save did not fail loudly")
            if extra := leftovers(out):
                trial.miss(f"half-written left behind: {extra}")
            complete = self.after_fault(out, trial)
            (mount / "ballast").unlink(missing_ok=True)  # space is back
            log = self.rerun(out, trial, complete)
            trial.redone = max(0, last_step(proc.log) - resumed_from(log))
        finally:
            if method == "tmpfs":
                subprocess.run(["umount", str(mount)], capture_output=True)
        trial.seconds = time.time() - t0
        return trial


def fill(mount: Path, leave: int) -> None:
    """Write a ballast file that leaves ``leave`` bytes free on ``mount``."""
    st = os.statvfs(mount)
    size = st.f_bavail * st.f_frsize - leave
    try:
        with open(mount / "ballast", "wb") as fh:
            fh.write(b"\0" * max(0, size))
    except OSError:
        pass  # the worker took some of it meanwhile: full is full


def can_mount_tmpfs(where: Path) -> bool:
    """Whether this process may mount a tmpfs (root with CAP_SYS_ADMIN: yes here, not in most CI)."""
    where.mkdir(parents=True, exist_ok=True)
    ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                        capture_output=True).returncode == 0
    if ok:
        subprocess.run(["umount", str(where)], capture_output=True)
    return ok
