"""`forge ui`: a real `mlflow server` on 127.0.0.1 over a store's tracking data.

The server reads the same backend the pipeline writes (``sqlite:///<store>/mlflow.db`` unless
``tracking.uri`` names another) and serves the runs' artifacts from where lineage put them
(``<store>/mlartifacts``: the experiment's own artifact location, read directly by the server).
Start-up is kept short (one worker, no job runner: ~8 s against 16 s, docs/platform-notes.md).
`start`/`stop` are what the tests use; `serve` adds the foreground wait for the CLI.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Callable

from flows.tracking.lineage import ARTIFACTS, artifact_root

DEFAULT_PORT = 5000  # MLflow's own default


def free_port(preferred: int = 0) -> int:
    """``preferred`` if it is free on 127.0.0.1 (a stable URL to bookmark), else any free port."""
    for port in (preferred, 0) if preferred else (0,):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return s.getsockname()[1]
    raise OSError("no free port on 127.0.0.1")


def server_command(tracking_uri: str, artifacts: Path, port: int) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
            # artifacts proxied through the server (mlflow-artifacts:/) land in the store too
            "--artifacts-destination", str(artifacts),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]


def start(tracking_uri: str, store: Path, port: int | None = None, log: Path | None = None,
          timeout: float = 120) -> tuple[subprocess.Popen, str]:
    """Start the server, wait until /health answers; (process, URL). Raises with the log's tail."""
    port = port or free_port()
    artifacts = artifact_root(tracking_uri) or Path(store) / ARTIFACTS
    artifacts.mkdir(parents=True, exist_ok=True)
    log = log or artifacts.parent / "mlflow-server.log"
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(log, "w") as out:
        # own session: the server's uvicorn child is stopped with it, by process group
        proc = subprocess.Popen(server_command(tracking_uri, artifacts, port), env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url, time.time() + timeout)
    except BaseException as e:  # Ctrl-C during start-up too: leave no server behind
        stop(proc)
        if isinstance(e, TimeoutError):
            raise RuntimeError(f"mlflow server on {url} did not become healthy ({e}; log "
                               f"{log}):\n" + log.read_text()[-3000:]) from None
        raise
    return proc, url


def _wait_healthy(proc: subprocess.Popen, url: str, deadline: float) -> None:
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise TimeoutError(f"it exited with code {proc.returncode}")
        if time.time() > deadline:
            raise TimeoutError("timed out")
        time.sleep(0.3)


def stop(proc: subprocess.Popen, timeout: float = 15) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def serve(tracking_uri: str, store: Path, port: int | None = None,
          say: Callable[[str], None] = print) -> int:
    """Foreground: start, print the URL, wait until Ctrl-C (or the server exits)."""
    if tracking_uri.startswith(("http://", "https://")):
        say(f"tracking.uri is already a server: open {tracking_uri}")
        return 0
    # SIGTERM (timeout, kill, a closed terminal) ends the server too, as Ctrl-C does
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGHUP, _interrupt)
    say(f"starting mlflow server on {tracking_uri} ...")
    try:
        proc, url = start(tracking_uri, store, port or free_port(DEFAULT_PORT))
    except RuntimeError as e:  # port taken, a store MLflow cannot open: the log says which
        say(f"forge: {e}")
        return 1
    except KeyboardInterrupt:
        return 130
    say(f"MLflow UI: {url}   (Ctrl-C stops it)")
    try:
        return proc.wait()
    except KeyboardInterrupt:
        say("stopping mlflow server")
        return 0
    finally:
        stop(proc)
