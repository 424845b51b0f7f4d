"""`forge deploy`: a Prefect deployment of a pipeline on a schedule, served by this process or
run by workers of a Prefect work pool.

The deployment's parameters are the Hydra overrides and the ``--only`` selection, checked here
before anything is registered; each scheduled (or manually triggered) run composes them again, so a
nightly run picks up today's data files, and is an ordinary `forge run`: its run record, cached
stages, lineage, `forge runs` and `forge resume` all work the same.

Two modes, both needing a Prefect server that outlives the command (``prefect server start --host
127.0.0.1`` and ``PREFECT_API_URL=http://127.0.0.1:4200/api``):

- served (``serve``): this process registers the deployment and runs its flow runs until Ctrl-C.
- work pool (``deploy_to_pool``): the deployment is registered on a Prefect *process* work pool
  (created if missing) and the command returns; ``prefect worker start --pool NAME --type process``
  on any machine that has this project installed at the same path, sees the store at the same path
  and has PREFECT_API_URL runs them. The flow is loaded from this checkout (``from_source`` on the
  project root, a local source: nothing is packaged or pulled), the worker's subprocess starts in
  the project root, and the store is pinned: ``store=<absolute path>`` is added to the overrides
  and FORGE_STORE to the run's environment, since a worker's cwd and environment are not ours.
"""
from __future__ import annotations

import asyncio
import datetime
import os
import re
import shlex
from pathlib import Path

from prefect import flow

from stages.schema import ConfigError

FLOW_NAME = "forge-scheduled"
PROJECT_ROOT = Path(__file__).resolve().parents[1]
ENTRYPOINT = "flows/schedule.py:scheduled_pipeline"      # relative to PROJECT_ROOT
POOL_TYPE = "process"


@flow(name=FLOW_NAME, log_prints=True)
def scheduled_pipeline(overrides: list[str], only: str | None = None) -> dict:
    """One scheduled pipeline run: compose, validate, run (a nested `forge-pipeline` flow)."""
    from flows import runner
    prep = runner.prepare(overrides, only)
    print(runner.plan_text(prep))
    result = runner.execute(prep)
    executed = [n for n, r in result["stages"].items() if r.get("executed")]
    print(runner.summary(prep, result))
    return {"run_file": result["run_file"], "parent_run": result["parent_run"], "executed": executed}


def check_schedule(cron: str | None, interval: float | None) -> None:
    if (cron is None) == (interval is None):
        raise ConfigError("--cron / --interval: give exactly one (e.g. --cron '0 2 * * *' for 02:00 "
                          "daily, or --interval 3600 for hourly)")
    if interval is not None and interval <= 0:
        raise ConfigError(f"--interval: must be > 0 seconds, got {interval:g}")
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule
        try:
            CronSchedule(cron=cron)
        except ValueError as e:
            raise ConfigError(f"--cron {cron!r}: not a valid cron expression (five fields: minute "
                              "hour day-of-month month day-of-week); e.g. '0 2 * * *'") from e


def require_server() -> str:
    url = os.environ.get("PREFECT_API_URL", "")
    if not url:
        raise ConfigError("PREFECT_API_URL: not set; a schedule needs a Prefect server that outlives "
                          "this command. Start one (`prefect server start --host 127.0.0.1`) and "
                          "export PREFECT_API_URL=http://127.0.0.1:4200/api")
    return url


def _schedule(cron: str | None, interval: float | None) -> dict:
    return {"cron": cron} if cron is not None else {"interval": datetime.timedelta(seconds=interval)}


def _description(overrides: list[str], only: str | None) -> str:
    return f"forge run {' '.join(overrides)}" + (f" --only '{only}'" if only else "")


def serve(name: str, overrides: list[str], only: str | None, cron: str | None,
          interval: float | None, paused: bool = False) -> None:
    """Register the deployment and serve it until interrupted (blocks)."""
    scheduled_pipeline.serve(
        name=name, parameters={"overrides": list(overrides), "only": only}, paused=paused,
        description=_description(overrides, only), tags=["granite-forge"],
        pause_on_shutdown=False, **_schedule(cron, interval))


def pin_store(overrides: list[str], store: Path) -> list[str]:
    """The overrides with ``store=`` set to the absolute ``store`` (replacing any given one): a
    worker composes them in a cwd and an environment that are not ours."""
    kept = [o for o in overrides if o.lstrip("+").split("=", 1)[0] != "store"]
    value = str(store)
    if not re.fullmatch(r"[A-Za-z0-9_/.:-]+", value):   # quote what Hydra's grammar would split
        value = "'" + value.replace("'", "\\'").replace("${", "\\${") + "'"
    return [*kept, f"store={value}"]


def check_pool_name(pool: str | None) -> None:
    """A work pool name Prefect accepts (checked before the pipeline is composed)."""
    if pool is not None and (not pool.strip("' \"") or any(c in pool for c in "/%&<>")):
        raise ConfigError(f"--work-pool {pool!r}: a work pool needs a non-empty name without any of "
                          "/ % & < > (e.g. --work-pool forge-cpu)")


def worker_command(pool: str) -> str:
    """What to run on each worker machine."""
    return f"prefect worker start --pool {shlex.quote(pool)} --type {POOL_TYPE}"


async def _ensure_process_pool(pool: str) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
    from prefect.workers.process import ProcessWorker
    async with get_client() as client:
        try:
            found = await client.read_work_pool(pool)
        except ObjectNotFound:
            try:
                await client.create_work_pool(WorkPoolCreate(
                    name=pool, type=POOL_TYPE,
                    base_job_template=ProcessWorker.get_default_base_job_template()))
                return
            except ObjectAlreadyExists:          # another deploy created it meanwhile
                found = await client.read_work_pool(pool)
        if found.type != POOL_TYPE:
            raise ConfigError(
                f"--work-pool {pool}: an existing work pool of type {found.type!r}; forge deploys "
                f"to {POOL_TYPE!r} pools (a worker runs `forge run` as a subprocess). Name another "
                f"pool (it is created), or delete this one: prefect work-pool delete {shlex.quote(pool)}")


def deploy_to_pool(name: str, pool: str, overrides: list[str], only: str | None, store: Path,
                   cron: str | None, interval: float | None, paused: bool = False) -> str:
    """Register the deployment on the process work pool ``pool`` (created if missing) and return
    its id; ``overrides`` must already pin ``store`` (``pin_store``). Nothing is served here."""
    asyncio.run(_ensure_process_pool(pool))
    job_variables = {
        "working_dir": str(PROJECT_ROOT),
        "env": {"FORGE_STORE": str(store),
                # the worker machine has the project installed: never `uv run` a re-install
                "PREFECT_RUNNER_AUTO_INSTALL_DEPENDENCIES": "false"},
    }
    source = scheduled_pipeline.from_source(source=str(PROJECT_ROOT), entrypoint=ENTRYPOINT)
    deployment_id = source.deploy(
        name=name, work_pool_name=pool, parameters={"overrides": list(overrides), "only": only},
        job_variables=job_variables, paused=paused, description=_description(overrides, only),
        tags=["granite-forge"], build=False, push=False, print_next_steps=False, ignore_warnings=True,
        **_schedule(cron, interval))
    return str(deployment_id)
