"""Shared test set-up: deterministic single-thread torch, offline HF, and (for integration tests)
one real Prefect server on 127.0.0.1 for the whole session."""
from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.helpers import start_prefect_server

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A real `prefect server start` on loopback; its URL goes into PREFECT_API_URL."""
    proc, url = start_prefect_server(tmp_path_factory.mktemp("prefect-home"))
    old = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    yield url
    if old is None:
        os.environ.pop("PREFECT_API_URL", None)
    else:
        os.environ["PREFECT_API_URL"] = old
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
