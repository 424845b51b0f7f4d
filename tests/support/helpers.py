"""Helpers shared by integration tests and benchmarks: run the real CLI, read run results."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def start_prefect_server(home: Path, timeout: float = 120,
                         port: int | None = None) -> tuple[subprocess.Popen, str]:
    """A real `prefect server start` on loopback (a free port unless given); (process, API URL)."""
    if port is None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    env = dict(os.environ, PREFECT_HOME=str(home), PREFECT_SERVER_ANALYTICS_ENABLED="false",
               PREFECT_UI_ENABLED="false", PREFECT_SERVER_LOGGING_LEVEL="WARNING")
    env.pop("PREFECT_API_URL", None)
    log = open(Path(home) / "server.log", "a")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.time() + timeout
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise RuntimeError("prefect server did not start:\n" +
                               (Path(home) / "server.log").read_text()[-3000:])
        time.sleep(0.5)


def forge(*args: str, store: Path, env: dict | None = None, timeout: int = 600,
          check: bool = True) -> subprocess.CompletedProcess:
    """Run the real CLI in a subprocess against ``store``."""
    full_env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1")
    full_env.update(env or {})
    out = subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                         env=full_env, cwd=ROOT, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"forge {' '.join(args)} exited {out.returncode}\n--- stdout\n"
                             f"{out.stdout[-4000:]}\n--- stderr\n{out.stderr[-4000:]}")
    return out


def last_result(store: Path) -> dict:
    results = sorted((store / "runs").glob("*.result.json"), key=lambda p: p.stat().st_mtime)
    return json.loads(results[-1].read_text())


def executed(result: dict) -> set[str]:
    return {n for n, r in result["stages"].items() if r.get("executed")}


ONLY_BUILT = "data|tokenizer|tokenize|pretrain-.*"
# Every evaluation of the extension chain: with their unfinished ancestors, all built stages.
LONG_CONTEXT = "eval-pretrain|eval-extend-.*|eval-merge-.*"
# The tiny pipeline made smaller still, so integration tests take seconds per stage.
SMALL = [
    "stages.data.sources.web.documents=300", "stages.data.sources.code.documents=200",
    "stages.data.sources.math.documents=200", "stages.data.sources.technical.documents=200",
    "stages.data.sources.chat.documents=200", "stages.data.sources.long.documents=10",
    "stages.data.sources.repos.documents=20", "stages.data.sources.recall.documents=200",
    "stages.pretrain-1.tokens=61440", "stages.pretrain-2.tokens=40960",
    "stages.pretrain-3.tokens=40960", "stages.pretrain-4.tokens=40960",
    "stages.pretrain-1.schedule.warmup_steps=4",
    "stages.pretrain-1.checkpoint_interval=5", "stages.pretrain-2.checkpoint_interval=5",
    "stages.pretrain-3.checkpoint_interval=5", "stages.pretrain-4.checkpoint_interval=5",
    # Drill answers at weight 100 turn a 20-step loss curve into noise (a handful of answers per
    # batch that a model this short never learns); at weight 1 the tests see the language loss fall.
    *[f"stages.pretrain-{i}.loss_weights={{recall:1.0}}" for i in (1, 2, 3, 4)],
]
# The extension chain made small: a few steps per extension, few probes per evaluation cell.
# Curation, SFT and the chat evaluations after the chain, small: a judge served over merge-3 for a
# few dozen conversations, one epoch of SFT.
POST_TRAINING = "eval-chat-.*"
RL = "rl-chat"   # with its ancestors: rl-math, rl-code, rl-if
SMALL_RL = [override for stage in ("rl-math", "rl-code", "rl-if", "rl-chat") for override in (
    f"stages.{stage}.steps=2", f"stages.{stage}.prompts_per_step=4", f"stages.{stage}.group_size=4",
    f"stages.{stage}.prompts.prompts=60", f"stages.{stage}.prompts.heldout=8",
    f"stages.{stage}.max_new_tokens=12", f"stages.{stage}.overlong_buffer=3",
    f"stages.{stage}.max_extra_rounds=1")] + ["stages.rl-chat.judge.max_tokens=4"]
SMALL_POST_TRAINING = [
    "stages.curate.sources.chat.samples=60", "stages.curate.eval_prompts.count=8",
    "stages.curate.shards=1", "stages.curate.judge.max_tokens=4", "stages.sft.epochs=1",
    "stages.curate.heldout_fraction=0.25",   # a held-out set longer than one packed sequence
    "stages.eval-chat-before.chat_samples=4", "stages.eval-chat-after.chat_samples=4",
    "stages.eval-chat-before.max_new_tokens=8", "stages.eval-chat-after.max_new_tokens=8",
]
SMALL_LONG_CONTEXT = [
    "stages.extend-1.tokens=8192", "stages.extend-2.tokens=6144", "stages.extend-3.tokens=8192",
    # few probes, few keys: seconds per evaluation
    *[f"stages.{e}.{f}" for e in ("eval-pretrain", "eval-extend-1", "eval-merge-1", "eval-extend-2",
                                  "eval-merge-2", "eval-extend-3", "eval-merge-3")
      for f in ("samples=4", "keys=[1,3]")],
    "stages.eval-merge-2.depths=[0.0,0.5,1.0]",
]


def kill_at_first_checkpoint(cmd: list[str], out: Path, env: dict, timeout: float = 120) -> int:
    """Start a stage worker, SIGKILL it (by its worker.pid) once its first checkpoint is complete;
    return the launcher's exit code."""
    import signal
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + timeout
    try:
        while not list((out / "checkpoints").glob("iter_*/done")):
            assert proc.poll() is None, "the worker ended before its first checkpoint"
            assert time.time() < deadline, "no checkpoint in time"
            time.sleep(0.01)
        os.kill(int((out / "worker.pid").read_text()), signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode


def worker_cmd(spec: Path, nproc: int = 1) -> list[str]:
    """The command that runs a stage worker on ``spec`` (under torchrun when ``nproc`` > 1)."""
    if nproc == 1:
        return [sys.executable, "-m", "stages.worker", str(spec)]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", "-m", "stages.worker", str(spec)]


def worker_env() -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_worker(spec: Path, nproc: int = 1) -> str:
    """Run a stage worker on ``spec`` to the end; its output, or an AssertionError with its tail."""
    proc = subprocess.run(worker_cmd(spec, nproc), cwd=ROOT, env=worker_env(), text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"worker failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    return proc.stdout


def losses(out_dir: Path) -> dict[int, float]:
    """Each step's loss in a stage's metrics.jsonl."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows}
