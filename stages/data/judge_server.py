"""A judge the curate stage serves itself: a real OpenAI-compatible server over an exported
Hugging Face folder, started for the shard and stopped after it.

On CPU it is ``transformers serve --host 127.0.0.1 --port P --device cpu HF_DIR`` (the folder given
as the forced model, loaded before the server listens, so ``/health`` means ready; the server lists
the folder's path as its one model id). On CUDA it is vLLM's OpenAI server, which lives in the GPU
worker image (``Dockerfile``), not beside the orchestrator: without vLLM it fails at once saying so.

The server runs in a session of its own (its own process group), logs to a file, and is stopped by
SIGTERM to the whole group, then SIGKILL after a grace period: nothing of it outlives the block.
A server that dies or hangs while starting raises ``JudgeServerError`` with the tail of its log.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from stages.data.judge import JudgeSpec

STOP_GRACE_S = 15.0


class JudgeServerError(RuntimeError):
    """The judge's server could not start; the message holds the tail of its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(hf_dir: Path, port: int, device: str) -> list[str]:
    if device == "cpu":
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--host", "127.0.0.1",
                "--port", str(port), "--device", "cpu", "--log-level", "warning", str(hf_dir)]
    if device == "cuda":
        if importlib.util.find_spec("vllm") is None:
            raise JudgeServerError(
                "serving the judge on cuda needs vLLM, which is not importable here: vLLM lives in the "
                "GPU worker image (Dockerfile), not in the orchestrator's environment. Run the curate "
                "stage on the GPU cluster, or serve on cpu, or point judge.endpoint at a server")
        return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
                "--port", str(port), "--model", str(hf_dir), "--served-model-name", str(hf_dir)]
    raise ValueError(f"device: expected 'cpu' or 'cuda', got {device!r}")


def log_tail(path: Path, chars: int = 3000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def stop_group(proc: subprocess.Popen, grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM the server's process group, SIGKILL whatever of it is left after ``grace_s``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):  # children the leader left behind, or the leader
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + grace_s  # SIGKILL is asynchronous: return once the group is gone
    while time.monotonic() < deadline:
        try:
            os.killpg(proc.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)


@contextlib.contextmanager
def serve_model(hf_dir: Path, log_path: Path, device: str = "cpu",
                startup_timeout_s: float = 180) -> Iterator[str]:
    """Serve the Hugging Face folder ``hf_dir``; yields the base URL (``http://127.0.0.1:PORT``)."""
    hf_dir = Path(hf_dir).resolve()
    if not (hf_dir / "config.json").exists():
        raise JudgeServerError(f"{hf_dir} is not a Hugging Face model folder (no config.json); "
                               "export the judge's model stage first (forge export STAGE --format hf)")
    port = free_port()
    cmd = server_command(hf_dir, port, device)
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with open(log_path, "a") as log:
        log.write(f"--- {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_timeout_s
        while not _healthy(url):
            if proc.poll() is not None:
                raise JudgeServerError(f"the judge server over {hf_dir} exited with code "
                                       f"{proc.returncode} while starting; {log_path} ends:\n"
                                       f"{log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise JudgeServerError(f"the judge server over {hf_dir} did not answer {url}/health "
                                       f"within {startup_timeout_s:g} s; {log_path} ends:\n"
                                       f"{log_tail(log_path)}")
            time.sleep(0.25)
        yield url
    finally:
        stop_group(proc)


@contextlib.contextmanager
def judge_endpoint(spec: JudgeSpec, served_dir: Path | None, work_dir: Path,
                   device: str = "cpu") -> Iterator[str]:
    """The judge's base URL: ``spec.endpoint`` as given, or (``spec.serve``) a server over the
    exported ``served_dir`` for the duration of the block, logging to ``work_dir/judge-server.log``."""
    if spec.endpoint is not None:
        yield spec.endpoint
        return
    if served_dir is None:
        raise JudgeServerError(f"judge.serve is {spec.serve!r} but no exported model folder was given "
                               "to serve; export that stage to Hugging Face format first")
    with serve_model(Path(served_dir), Path(work_dir) / "judge-server.log", device=device,
                     startup_timeout_s=spec.startup_timeout_s) as url:
        yield url
