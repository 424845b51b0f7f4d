"""Shared test set-up: deterministic single-thread torch, offline HF, and (for integration tests)
one real Prefect server on 127.0.0.1 for the whole session."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys

import pytest

from tests.support.helpers import start_prefect_server

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def drain_prefect_clients() -> None:
    """Send what this process's Prefect queued for the API (logs, events) while the server is up."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=10)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback; its URL goes into PREFECT_API_URL."""
    proc, url = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    drain_prefect_clients()   # before the server goes: else they retry a dead API at exit (~80 s)
    if old is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = old
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
