"""`forge deploy`: a Prefect deployment of a pipeline on a schedule, served by this process.

The deployment's parameters are the Hydra overrides and the ``--only`` selection, checked here
before anything is served; each scheduled (or manually triggered) run composes them again, so a
nightly run picks up today's data files, and is an ordinary `forge run`: its run record, cached
stages, lineage, `forge runs` and `forge resume` all work the same.

Serving needs a Prefect server (the ephemeral one lives only as long as one command):
``prefect server start --host 127.0.0.1`` and ``PREFECT_API_URL=http://127.0.0.1:4200/api``.
"""
from __future__ import annotations

import datetime
import os

from prefect import flow

from stages.schema import ConfigError

FLOW_NAME = "forge-scheduled"


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


def serve(name: str, overrides: list[str], only: str | None, cron: str | None,
          interval: float | None, paused: bool = False) -> None:
    """Register the deployment and serve it until interrupted (blocks)."""
    schedule = ({"cron": cron} if cron is not None
                else {"interval": datetime.timedelta(seconds=interval)})
    scheduled_pipeline.serve(
        name=name, parameters={"overrides": list(overrides), "only": only}, paused=paused,
        description=f"forge run {' '.join(overrides)}" + (f" --only '{only}'" if only else ""),
        tags=["granite-forge"], pause_on_shutdown=False, **schedule)
