"""What `forge`'s commands accept, and the --help that explains them (the commands themselves
are in ``flows/cli.py``)."""
from __future__ import annotations

import argparse

OVERRIDES_HELP = ("Hydra overrides: group=option (pipeline=granite-4.1, model=granite-8b, "
                  "cluster=cpu-tp2, tracking=server) or key=value (stages.pretrain-3.schedule.lr=1e-3, "
                  "store=/data/forge)")


def _choices() -> str:
    """The config groups and their options, read from conf/ (shown by --help)."""
    from flows.config import CONF_DIR
    lines = ["config groups (group=option):"]
    for group in ("pipeline", "model", "cluster", "tracking"):
        names = sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))
        lines.append(f"  {group:<9} {', '.join(names)}")
    return "\n".join(lines)


def command_parser(description: str) -> argparse.ArgumentParser:
    """forge's commands, their arguments and their --help."""
    p = argparse.ArgumentParser(prog="forge", description=description, epilog=_choices(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a pipeline (cached stages are skipped, unfinished ones resume)",
                         epilog=_choices(), formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    run.add_argument("--only", metavar="REGEX",
                     help="run only stages whose name matches (full match), plus unfinished ancestors")
    run.add_argument("--rerun", metavar="STAGE", action="append", default=[],
                     help="force STAGE to run again even if cached (repeatable); old output kept aside")
    run.add_argument("-m", "--multirun", action="store_true",
                     help="sweep comma-separated override values (a=1,2 b=x,y: 4 runs); stages "
                          "whose keys do not change are shared, not recomputed")

    plan = sub.add_parser("plan", help="validate and show what a run would do, per stage, and why",
                          epilog=_choices(), formatter_class=argparse.RawDescriptionHelpFormatter)
    plan.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    plan.add_argument("--only", metavar="REGEX", help="as for run")
    plan.add_argument("--rerun", metavar="STAGE", action="append", default=[], help="as for run")
    plan.add_argument("--graph", metavar="FILE.png",
                      help="also draw the DAG, each stage coloured by its state, into FILE.png")

    status = sub.add_parser("status", help="which stages are complete, unfinished or never run")
    status.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    dep = sub.add_parser(
        "deploy", help="run a pipeline on a schedule (a Prefect deployment, served here or by "
        "the workers of a work pool)",
        description="Validate the pipeline and register a Prefect deployment forge-scheduled/NAME\n"
        "that runs `forge run OVERRIDES --only REGEX` on the schedule. Needs a Prefect server\n"
        "(PREFECT_API_URL). Two modes:\n"
        "  without --work-pool: serve the deployment from this process until Ctrl-C;\n"
        "  --work-pool POOL:    register it on the Prefect process work pool POOL (created if\n"
        "                       missing) and return; on each machine that runs pipelines (this\n"
        "                       project installed at the same path, the store at the same path,\n"
        "                       PREFECT_API_URL set) start a worker, from the project's venv:\n"
        "                         prefect worker start --pool POOL --type process\n"
        "                       The store is pinned as an absolute path (store=...) in the\n"
        "                       deployment's overrides.\n"
        "Trigger a run now with `prefect deployment run forge-scheduled/NAME`.",
        epilog=_choices(), formatter_class=argparse.RawDescriptionHelpFormatter)
    dep.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    dep.add_argument("--only", metavar="REGEX", help="as for run")
    dep.add_argument("--cron", help="cron expression, e.g. '0 2 * * *' (02:00 every day)")
    dep.add_argument("--interval", type=float, metavar="SECONDS", help="run every SECONDS instead")
    dep.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    dep.add_argument("--paused", action="store_true", help="register with the schedule paused")
    dep.add_argument("--work-pool", metavar="POOL",
                     help="register on this Prefect process work pool (created if missing) and "
                          "return, instead of serving here; workers run the flow runs")

    runs = sub.add_parser("runs", help="list pipeline runs and the state of each stage (from the store)")
    runs.add_argument("run_id", nargs="?", metavar="RUN_ID", help="show this run's stages one by one")
    runs.add_argument("--store", help="the store (default: $FORGE_STORE or ./forge-store)")
    runs.add_argument("--limit", type=int, default=20, help="newest runs shown (default 20)")

    resume = sub.add_parser("resume", help="run a failed or cancelled run again with its stored config",
                            description="Re-run RUN_ID with exactly the resolved config stored with "
                            "it (today's conf/ and overrides are not read): completed stages are "
                            "cached, unfinished ones resume from their newest checkpoint.")
    resume.add_argument("run_id", metavar="RUN_ID", help="from `forge runs` (a unique prefix will do)")
    resume.add_argument("--store", help="the store (default: $FORGE_STORE or ./forge-store)")

    cancel = sub.add_parser("cancel", help="cancel a run: its orchestrator and its Slurm jobs",
                            description="Stop RUN_ID: a live orchestrator gets SIGTERM (its workers "
                            "checkpoint and stop, the run is recorded cancelled); without one, the "
                            "run's live Slurm jobs are asked to checkpoint and end CANCELLED, and "
                            "the run is recorded cancelled. `forge resume RUN_ID` continues it.")
    cancel.add_argument("run_id", metavar="RUN_ID", help="from `forge runs` (a unique prefix will do)")
    cancel.add_argument("--store", help="the store (default: $FORGE_STORE or ./forge-store)")
    cancel.add_argument("--wait", type=float, default=600, metavar="SECONDS",
                        help="how long to wait for the jobs to end (default 600)")

    lin = sub.add_parser("lineage", help="print a stage's chain back to its data, from MLflow")
    lin.add_argument("stage", help="stage name, e.g. pretrain-4")
    lin.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    ui = sub.add_parser("ui", help="serve the MLflow UI over the store's runs, models and registry",
                        description="Start `mlflow server` on 127.0.0.1 over the store's tracking "
                        "data (sqlite:///<store>/mlflow.db, artifacts in <store>/mlartifacts, or "
                        "tracking.uri), print its URL and stay in the foreground until Ctrl-C.")
    ui.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    ui.add_argument("--store", help="the store (default: $FORGE_STORE or ./forge-store)")
    ui.add_argument("--port", type=int, help="port on 127.0.0.1 (default: 5000 if free, else any free one)")

    pro = sub.add_parser("promote", help="point a registered-model alias at a stage's current model",
                         description="Set ALIAS on the version of the registered model "
                         "<pipeline>.<STAGE> whose key is the stage's key under OVERRIDES (give "
                         "the overrides of the run that made it).")
    pro.add_argument("stage", help="a model stage, e.g. pretrain-4 or merge-3")
    pro.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    pro.add_argument("--alias", default="champion", help="alias to set (default: champion)")

    exp = sub.add_parser(
        "export", help="write a model stage as a Hugging Face folder (weights, config, tokenizer, "
        "chat template) that transformers loads and generates from",
        description="Export STAGE, a finished model stage of the pipeline the OVERRIDES compose "
        "(give the overrides of the run that made it: they decide its key and output dir), to DIR: "
        "config.json, model.safetensors, the tokenizer with its chat template, and "
        "generation_config.json (generation stops at <|end_of_text|>, the end of a turn). The "
        "checkpoint's checksums are verified first; the folder is written beside DIR and renamed "
        "into place, so a failed export leaves nothing half-written. Refused (exit 2): an unknown "
        "stage, a stage that makes no model, a stage not complete under these overrides, a "
        "non-empty DIR without --overwrite. Options and overrides may come in any order.",
        epilog="example:\n  forge export sft --format hf --out ./granite-sft pipeline=granite-4.1-tiny\n\n"
        + _choices(), formatter_class=argparse.RawDescriptionHelpFormatter)
    exp.add_argument("stage", help="a model stage, e.g. pretrain-4, merge-3 or sft")
    exp.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    exp.add_argument("--format", choices=["hf"], default="hf",
                     help="output format; only 'hf' (a Hugging Face GraniteForCausalLM folder) today")
    exp.add_argument("--out", required=True, metavar="DIR", help="the folder to write")
    exp.add_argument("--overwrite", action="store_true",
                     help="replace DIR if it exists and is not empty (it is replaced only once the "
                          "new export is complete)")

    lc = sub.add_parser("launch-command", help="print the command (Slurm, Kubernetes: and the Job "
                        "manifest) that would start a stage's worker; runs nothing",
                        epilog=_choices(), formatter_class=argparse.RawDescriptionHelpFormatter)
    lc.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    lc.add_argument("--stage", help="stage name (default: the first training stage)")
    return p
