"""`forge deploy` against a real `prefect server`: the deployment is registered with its schedule
and overrides, a run triggered through the API completes, and `forge runs` lists it."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.support.helpers import ROOT, SMALL, forge

pytestmark = pytest.mark.slow
NAME = "ci-nightly"


async def _deployment(name: str, deadline: float):
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound
    async with get_client() as client:
        while True:
            try:
                return await client.read_deployment_by_name(f"forge-scheduled/{name}")
            except ObjectNotFound:
                if time.time() > deadline:
                    raise
                await asyncio.sleep(1)


def test_deploy_serves_a_scheduled_pipeline_and_a_triggered_run_completes(prefect_server, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, FORGE_STORE=str(store), OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_server)
    log = open(tmp_path / "serve.log", "w")
    serve = subprocess.Popen([sys.executable, "-m", "flows.cli", "deploy", *SMALL, "--only", "data",
                              "--cron", "0 2 * * *", "--name", NAME], cwd=ROOT, env=env,
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        dep = asyncio.run(_deployment(NAME, time.time() + 120))
        assert dep.parameters == {"overrides": SMALL, "only": "data"}
        assert [s.schedule.cron for s in dep.schedules] == ["0 2 * * *"]

        from prefect.deployments import run_deployment
        run = run_deployment(f"forge-scheduled/{NAME}", timeout=300, poll_interval=1)
        assert run.state.is_completed(), (run.state, (tmp_path / "serve.log").read_text()[-3000:])
    finally:
        os.killpg(serve.pid, signal.SIGINT)
        try:
            serve.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(serve.pid, signal.SIGKILL)
    assert list(store.glob("data-*/artifact.json"))
    listed = forge("runs", store=store).stdout
    assert "completed" in listed and "1/1 complete" in listed, listed


def test_deploy_rejects_a_bad_schedule_and_a_missing_server(tmp_path):
    bad = forge("deploy", "--only", "data", "--cron", "every night", store=tmp_path / "s", check=False)
    assert bad.returncode == 2 and "--cron 'every night': not a valid cron expression" in bad.stderr
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = subprocess.run([sys.executable, "-m", "flows.cli", "deploy", "--only", "data", "--interval",
                          "60"], cwd=ROOT, env=dict(env, FORGE_STORE=str(tmp_path / "s")),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "PREFECT_API_URL: not set" in out.stderr
    assert not (tmp_path / "s").exists()
