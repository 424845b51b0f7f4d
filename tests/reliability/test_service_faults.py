"""Faults of the services around a run: the Prefect server restarts while a stage trains."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import ROOT, SMALL, executed, last_result, start_prefect_server

pytestmark = pytest.mark.slow
UP_TO_P1 = "data|tokenizer|tokenize|pretrain-1"


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


async def flow_run_states(url: str) -> dict[str, str]:
    from prefect.client.orchestration import PrefectClient
    async with PrefectClient(url) as client:
        return {r.name: r.state.type.value for r in await client.read_flow_runs()}


def test_prefect_server_restart_mid_stage_loses_nothing(tmp_path):
    home, store = tmp_path / "prefect-home", tmp_path / "store"
    home.mkdir()
    server, url = start_prefect_server(home)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL=url)
    run = subprocess.Popen([sys.executable, "-m", "flows.cli", "run", *SMALL,
                            "stages.pretrain-1.tokens=81920", "--only", UP_TO_P1], cwd=ROOT, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # restart the server (same database, same port) while pretrain-1 trains
        wait_for(lambda: list(store.glob("pretrain-1-*/checkpoints/*/done")) or run.poll() is not None,
                 300, "pretrain-1's first checkpoint")
        assert run.poll() is None, "the run ended before the restart"
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=30)
        assert not list(store.glob("pretrain-1-*/artifact.json")), "restart came too late to matter"
        server, url2 = start_prefect_server(home, port=port)
        output, _ = run.communicate(timeout=600)
    finally:
        if run.poll() is None:
            run.kill()
        server.terminate()
        server.wait(timeout=30)
    assert run.returncode == 0, output[-3000:]
    assert executed(last_result(store)) == {"data", "tokenizer", "tokenize", "pretrain-1"}
    for stage in ("data", "tokenizer", "tokenize", "pretrain-1"):
        (out_dir,) = store.glob(f"{stage}-*")
        assert (out_dir / "artifact.json").exists()
        assert (out_dir / "worker.log").read_text().count("--- ") == 1, stage   # launched once
    # the restarted server knows the run finished
    server, url = start_prefect_server(home, port=port)
    try:
        states = asyncio.run(flow_run_states(url))
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert states.get("granite-4.1-tiny") == "COMPLETED", states
