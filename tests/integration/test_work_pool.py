"""`forge deploy --work-pool` against a real `prefect server` and a real `prefect worker` process:
the deployment lands on a process work pool with the store pinned as an absolute path, a run
triggered through the API is picked up by `prefect worker start --run-once` started from another
directory with another FORGE_STORE, and is an ordinary forge run (artifacts, run record, `forge
runs`, the nested forge-pipeline flow). A run cancelled from Prefect (`prefect flow-run cancel`,
what the UI's Cancel does) while its stage trains: the worker process's SIGTERM reaches the stage,
which checkpoints and stops; the run is recorded cancelled. Plus the refusals: no server, a pool of
another type."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest

from stages.schema import ConfigError
from tests.support.helpers import ROOT, SMALL, forge

pytestmark = pytest.mark.slow
POOL = "ci-forge-pool"
NAME = "ci-pool"


def _cli(*args: str, cwd, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=180)


async def _read_pool_and_deployment():
    from prefect.client.orchestration import get_client
    async with get_client() as client:
        return (await client.read_work_pool(POOL),
                await client.read_deployment_by_name(f"forge-scheduled/{NAME}"))


async def _flow_run_and_nested_pipeline(flow_run_id):
    """The worker's flow run, and the forge-pipeline runs nested under it."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    async with get_client() as client:
        run = await client.read_flow_run(flow_run_id)
        pipelines = await client.read_flow_runs(
            flow_filter=FlowFilter(name=FlowFilterName(any_=["forge-pipeline"])))
        nested = [p for p in pipelines if p.parent_task_run_id is not None and
                  (await client.read_task_run(p.parent_task_run_id)).flow_run_id == flow_run_id]
        return run, nested


def test_deploy_to_a_work_pool_and_a_worker_runs_the_pipeline(prefect_server, tmp_path):
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_server)
    # a relative store, resolved against the deploying shell's cwd: pinned absolute in the deployment
    out = _cli("deploy", *SMALL, "--only", "data", "--interval", "86400", "--paused",
               "--work-pool", POOL, "--name", NAME, cwd=tmp_path, env=dict(env, FORGE_STORE="store"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"prefect worker start --pool {POOL} --type process" in out.stdout
    assert not store.exists()                     # deploying runs nothing

    pool, dep = asyncio.run(_read_pool_and_deployment())
    assert pool.type == "process"
    assert dep.work_pool_name == POOL and dep.paused
    assert dep.parameters == {"overrides": [*SMALL, f"store={store}"], "only": "data"}
    assert [s.schedule.interval.total_seconds() for s in dep.schedules] == [86400]
    assert dep.job_variables["working_dir"] == str(ROOT)
    assert dep.job_variables["env"]["FORGE_STORE"] == str(store)

    from prefect.deployments import run_deployment
    flow_run = run_deployment(f"forge-scheduled/{NAME}", timeout=0)   # created, not waited for
    elsewhere = tmp_path / "worker-cwd"
    elsewhere.mkdir()
    log_path = tmp_path / "worker.log"
    with open(log_path, "w") as log:
        worker = subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--type", "process",
             "--run-once"], cwd=elsewhere, stdout=log, stderr=subprocess.STDOUT,
            env=dict(env, FORGE_STORE="not-this-store", PREFECT_HOME=str(tmp_path / "worker-home")),
            start_new_session=True)
        try:
            worker.wait(timeout=300)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()
    worker_log = log_path.read_text()
    assert worker.returncode == 0, worker_log[-4000:]

    run, nested = asyncio.run(_flow_run_and_nested_pipeline(flow_run.id))
    assert run.state.is_completed(), (run.state, worker_log[-4000:])
    assert len(nested) == 1 and nested[0].state.is_completed()
    assert "data: done" in worker_log and "Finished in state Completed" in worker_log, worker_log
    assert list(store.glob("data-*/artifact.json")) and list(store.glob("runs/*.json"))
    assert not (elsewhere / "not-this-store").exists() and not (tmp_path / "not-this-store").exists()
    listed = forge("runs", store=store).stdout
    assert "completed" in listed and "1/1 complete" in listed, listed
    # the run record holds the pinned overrides: `forge resume` composes the same store and stages
    (record,) = [p for p in store.glob("runs/*.json") if p.name.count(".") == 1]
    assert json.loads(record.read_text())["overrides"][-1] == f"store={store}"
    resumed = forge("resume", record.stem, "--store", str(store), store=tmp_path / "unused").stdout
    assert f"store {store}," in resumed, resumed[-2000:]
    assert "nothing to resume: every stage of that run is complete" in resumed, resumed[-2000:]


def _start_worker(pool: str, cwd, env: dict, log) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", pool, "--type", "process",
         "--run-once"], cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
        start_new_session=True)


def test_a_run_cancelled_from_prefect_checkpoints_its_stage_and_is_recorded_cancelled(
        prefect_server, tmp_path):
    import time

    from prefect.deployments import run_deployment
    store = tmp_path / "store"
    env = dict(os.environ, OMP_NUM_THREADS="1", PREFECT_API_URL=prefect_server)
    forge("run", *SMALL, "--only", "tokenize", store=store, env=env)
    long = [*SMALL, "stages.pretrain-1.tokens=4096000", "stages.pretrain-1.checkpoint_interval=20"]
    out = _cli("deploy", *long, "--only", "pretrain-1", "--interval", "86400", "--paused",
               "--work-pool", "ci-cancel-pool", "--name", "cancelled", cwd=ROOT,
               env=dict(env, FORGE_STORE=str(store)))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    flow_run = run_deployment("forge-scheduled/cancelled", timeout=0)
    with open(tmp_path / "worker.log", "w") as log:
        worker = _start_worker("ci-cancel-pool", tmp_path, dict(
            env, PREFECT_HOME=str(tmp_path / "worker-home")), log)
        try:
            deadline = time.monotonic() + 240
            while not list(store.glob("pretrain-1-*/checkpoints/iter_*/done")):
                assert worker.poll() is None and time.monotonic() < deadline, \
                    (tmp_path / "worker.log").read_text()[-4000:]
                time.sleep(0.5)
            cancel = subprocess.run([sys.executable, "-m", "prefect", "flow-run", "cancel",
                                     str(flow_run.id)], env=env, capture_output=True, text=True)
            assert cancel.returncode == 0, cancel.stdout + cancel.stderr
            worker.wait(timeout=180)
        finally:
            if worker.poll() is None:
                os.killpg(worker.pid, signal.SIGKILL)
                worker.wait()

    async def state() -> str:
        from prefect.client.orchestration import get_client
        async with get_client() as client:
            return (await client.read_flow_run(flow_run.id)).state.name
    assert asyncio.run(state()) == "Cancelled"
    (out_dir,) = store.glob("pretrain-1-*")
    assert not (out_dir / "artifact.json").exists()     # 2,000 steps: stopped long before the end
    text = (out_dir / "worker.log").read_text()
    assert "stopped by SIGTERM after step" in text, text[-3000:]
    stopped = int(text.split("stopped by SIGTERM after step ")[1].split(":")[0])
    assert (out_dir / "checkpoints" / f"iter_{stopped:07d}" / "done").exists()
    assert json.loads((out_dir / "failure.json").read_text())["exit_code"] == 143
    (status,) = [p for p in store.glob("runs/*.status.json")
                 if json.loads(p.read_text()).get("status") != "completed"]   # not tokenize's run
    assert json.loads(status.read_text())["status"] == "cancelled"
    live = subprocess.run(["pgrep", "-f", str(out_dir / "spec.json")], capture_output=True, text=True)
    assert live.stdout == "", live.stdout                # no worker left training


def test_deploy_to_a_pool_refuses_no_server_and_a_pool_of_another_type(prefect_server, tmp_path):
    store = tmp_path / "s"
    no_server = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    out = _cli("deploy", "--only", "data", "--interval", "60", "--work-pool", POOL, cwd=ROOT,
               env=dict(no_server, FORGE_STORE=str(store)))
    assert out.returncode == 2 and "PREFECT_API_URL: not set" in out.stderr, out.stderr

    async def make_docker_pool():
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.actions import WorkPoolCreate
        async with get_client() as client:
            await client.create_work_pool(WorkPoolCreate(name="ci-docker-pool", type="docker"))
    asyncio.run(make_docker_pool())
    out = _cli("deploy", "--only", "data", "--interval", "60", "--work-pool", "ci-docker-pool",
               "--name", "never", cwd=ROOT,
               env=dict(os.environ, FORGE_STORE=str(store), PREFECT_API_URL=prefect_server))
    assert out.returncode == 2, out.stdout[-2000:] + out.stderr[-2000:]
    assert "--work-pool ci-docker-pool: an existing work pool of type 'docker'" in out.stderr
    assert "prefect work-pool delete ci-docker-pool" in out.stderr

    async def deployment_exists() -> bool:
        from prefect.client.orchestration import get_client
        from prefect.exceptions import ObjectNotFound
        async with get_client() as client:
            try:
                await client.read_deployment_by_name("forge-scheduled/never")
                return True
            except ObjectNotFound:
                return False
    assert not asyncio.run(deployment_exists())
    assert not store.exists()


@pytest.mark.parametrize("path", ["/data/forge_1.2-x:y", "/tmp/a b,c=d", "/tmp/it's ~+@", "/tmp/${x}ü"])
def test_the_pinned_store_composes_back_to_the_same_absolute_path(path, tmp_path):
    from pathlib import Path

    from flows import config
    from flows.schedule import pin_store
    pinned = pin_store(["model=tiny", "store=relative", "+store=other"], Path(path))
    assert pinned[:-1] == ["model=tiny"]
    assert config.load(pinned).store == Path(path)


@pytest.mark.parametrize("name", ["", "''", "a/b", "50%"])
def test_a_pool_name_prefect_refuses_is_refused_first(name):
    from flows.schedule import check_pool_name
    with pytest.raises(ConfigError, match="--work-pool .*: a work pool needs a non-empty name"):
        check_pool_name(name)
