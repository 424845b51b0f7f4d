"""`forge`: run, plan, inspect and trace declarative LLM training pipelines.

    forge run pipeline=granite-4.1-tiny --only 'data|tokenizer|tokenize|pretrain-.*'
    forge plan pipeline=granite-4.1 model=granite-8b
    forge run -m stages.pretrain-4.schedule.lr=5e-4,1e-3     # sweep; shared stages run once
    forge status
    forge deploy pipeline=granite-4.1-tiny --cron '0 2 * * *'   # nightly, served by Prefect
    forge deploy pipeline=granite-4.1-tiny --cron '0 2 * * *' --work-pool forge-cpu   # run by workers
    forge runs                      # runs, newest first, with the state of their stages
    forge resume 20261129-171300-4242
    forge cancel 20261129-171300-4242      # its orchestrator and Slurm jobs; resume continues
    forge lineage pretrain-4
    forge export sft --format hf --out ./granite-sft   # a Hugging Face folder of a model stage
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.cli_args import command_parser
from stages.schema import ConfigError


def cmd_run(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.config import expand_sweeps
    combos = expand_sweeps(args.overrides) if args.multirun else [args.overrides]
    preps = [runner.prepare(c, args.only, tuple(args.rerun)) for c in combos]  # validate all first
    code = 0
    for i, combo in enumerate(combos):
        prep = preps[i]
        if len(combos) > 1:
            print(f"\n=== multirun {i + 1}/{len(combos)}: {' '.join(combo)}")
            prep = runner.prepare(combo, args.only, tuple(args.rerun))  # sees what earlier runs made
        print(runner.plan_text(prep), flush=True)
        code = max(code, _execute(prep))
    return code


def _execute(prep) -> int:
    from flows import runner
    t0 = time.time()
    try:
        result = runner.execute(prep)
    except runner.Stopped as e:   # Ctrl-C or SIGTERM: the worker checkpointed; main() exits 128+sig
        name = signal.Signals(e.signum).name
        if e.run_id:
            print(f"\nforge: stopped by {name} after {time.time() - t0:.0f}s; run {e.run_id} is "
                  "recorded as cancelled. Finished stages are cached and the one in progress "
                  "resumes from its newest checkpoint:\n"
                  f"  forge resume {e.run_id}", file=sys.stderr, flush=True)
        else:
            print(f"\nforge: stopped by {name} before the run started; nothing ran.",
                  file=sys.stderr, flush=True)
        raise
    except runner.PipelineFailed as e:
        print(f"\nforge: pipeline failed after {time.time() - t0:.0f}s: {e}\n"
              "Fix the cause and run the same command again, or `forge resume RUN_ID` (the run id "
              "is above): finished stages are cached and the failed one resumes from its newest "
              "checkpoint.", file=sys.stderr)
        return 1
    print(f"\nfinished in {time.time() - t0:.0f}s\n" + runner.summary(prep, result), flush=True)
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from flows import runner
    prep = runner.prepare(args.overrides, args.only, tuple(args.rerun))
    print(runner.plan_text(prep))
    pipe = prep.dag.pipeline
    total = sum(s.tokens for s in prep.steps)
    print(f"\n{len(prep.steps)} stages valid; {total:.4g} training tokens in all; "
          f"model {pipe.resolved.get('model', {}).get('name', '?')}")
    from flows.compute_view import format_compute, misfits
    c = pipe.cluster
    print(f"\ncompute on {c.accelerator} x{c.world_size} ({c.gpus_per_node} per node):\n"
          + format_compute(prep.compute))
    if args.graph:
        from flows.graph import draw_plan
        print(draw_plan(prep, args.graph))
    bad = misfits(prep.compute)
    if bad:
        print("\nforge: these stages cannot fit their devices; `forge run` refuses them:\n"
              + "\n".join("  " + p.refusal() for p in bad), file=sys.stderr)
        return 2
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.plan import complete, newest_checkpoint, parts_done
    prep = runner.prepare(args.overrides)
    width = max(14, *(len(n) for n in prep.dag.nodes))
    for name, node in prep.dag.nodes.items():
        if complete(node):
            state = "complete"
        elif (ck := newest_checkpoint(node)) is not None:
            state = f"unfinished (checkpoints/{ck})"
        elif done := parts_done(node):
            state = f"unfinished ({len(done)} of {len(node.kind_cls.parts(node.config))} parts done)"
        elif node.out_dir.exists():
            state = "started, no checkpoint yet"
        else:
            state = "not run"
        print(f"  {name:<{width}} {state:<34} {node.out_dir}")
    return 0


def cmd_deploy(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.compute_view import check_fits
    from flows.plan import check_runnable
    from flows.schedule import check_pool_name, check_schedule, require_server
    check_schedule(args.cron, args.interval)
    check_pool_name(args.work_pool)
    prep = runner.prepare(args.overrides, args.only)      # a bad config fails now, not at 02:00
    check_runnable(prep.steps)
    check_fits(prep.compute, prep.steps)
    require_server()
    from flows.schedule import FLOW_NAME, serve
    when = f"cron '{args.cron}'" if args.cron else f"every {args.interval:g} s"
    if args.work_pool is not None:
        return _deploy_to_pool(args, prep, when)
    print(runner.plan_text(prep), flush=True)
    print(f"\nserving deployment {FLOW_NAME}/{args.name} ({when}); Ctrl-C stops serving\n"
          f"  run it now:  prefect deployment run {FLOW_NAME}/{args.name}", flush=True)
    serve(args.name, args.overrides, args.only, args.cron, args.interval, args.paused)
    return 0


def _deploy_to_pool(args: argparse.Namespace, prep, when: str) -> int:
    """`forge deploy --work-pool`: register on the pool with the store pinned; print the worker line."""
    from flows import runner
    from flows.schedule import FLOW_NAME, PROJECT_ROOT, deploy_to_pool, pin_store, worker_command
    store = prep.dag.pipeline.store
    overrides = pin_store(args.overrides, store)
    pinned = runner.prepare(overrides, args.only)            # exactly what a worker composes
    if pinned.dag.pipeline.store != store:
        raise ConfigError(f"store: {str(store)!r} does not survive as an override (it composes "
                          f"to {str(pinned.dag.pipeline.store)!r}); use a path of plain characters")
    print(runner.plan_text(pinned), flush=True)
    deploy_to_pool(args.name, args.work_pool, overrides, args.only, store, args.cron,
                   args.interval, args.paused)
    print(f"\ndeployment {FLOW_NAME}/{args.name} registered on work pool {args.work_pool!r} "
          f"({when}{', paused' if args.paused else ''}); store {store}\n"
          f"  on each worker machine (project at {PROJECT_ROOT}, "
          f"the store at {store}, PREFECT_API_URL set):\n"
          f"    {worker_command(args.work_pool)}\n"
          f"  run it now:  prefect deployment run {FLOW_NAME}/{args.name}", flush=True)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    from flows import runs
    store = Path(args.store).resolve() if args.store else runs.default_store()
    if args.run_id:
        print(runs.format_run(runs.find_run(store, args.run_id)))
    else:
        print(f"runs in {runs.runs_dir(store)} (newest first):\n"
              + runs.format_runs(runs.list_runs(store), args.limit))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    from flows import runs
    from flows.cancel import cancel_run
    store = Path(args.store).resolve() if args.store else runs.default_store()
    return cancel_run(runs.find_run(store, args.run_id), wait_s=args.wait)


def cmd_resume(args: argparse.Namespace) -> int:
    from flows import runner, runs
    store = Path(args.store).resolve() if args.store else runs.default_store()
    prep = runner.prepare_resume(args.run_id, store)
    print(f"resuming run {prep.resumes} with its stored config\n" + runner.plan_text(prep), flush=True)
    if not any(s.executes for s in prep.steps):
        print("\nnothing to resume: every stage of that run is complete")
        return 0
    return _execute(prep)


def cmd_lineage(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.tracking.view import print_lineage
    prep = runner.prepare(args.overrides)
    return print_lineage(prep.dag, args.stage)


def cmd_ui(args: argparse.Namespace) -> int:
    from flows.config import load
    from flows.tracking.ui import serve
    store = [f"store={Path(args.store).resolve()}"] if args.store else []
    pipe = load(list(args.overrides) + store)
    return serve(pipe.tracking_uri, pipe.store, args.port, lambda line: print(line, flush=True))


def cmd_promote(args: argparse.Namespace) -> int:
    from flows.tracking.promote import promote_stage
    return promote_stage(args.overrides, args.stage, args.alias)


def cmd_export(args: argparse.Namespace) -> int:
    from flows.config import load
    from flows.dag import build
    from flows.plan import complete
    dag = build(load(args.overrides))
    stage, node = args.stage, dag.nodes.get(args.stage)
    refusal = None
    if node is None:
        refusal = f"no stage named {stage!r}; stages: {', '.join(dag.nodes)}"
    elif not node.kind_cls.makes_model:
        models = [n for n, x in dag.nodes.items() if x.kind_cls.makes_model]
        refusal = (f"{stage!r} is a {node.kind} stage, which makes no model; export one of the "
                   f"model stages: {', '.join(models)}")
    elif not complete(node):
        again = " ".join(["forge run", *args.overrides, "--only", stage])
        refusal = (f"{stage} is not complete under these overrides (no artifact.json with key "
                   f"{node.key[:12]} in {node.out_dir}); run it first:\n  {again}")
    if refusal:
        print(f"forge export: {refusal}\nNothing was exported.", file=sys.stderr)
        return 2
    # The export runs as a process of its own, like a stage worker: torch, transformers and the
    # stage family modules stay out of the orchestrator (and on a cluster it is the worker's env).
    out = Path(args.out).expanduser().absolute()
    root = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [root, os.environ.get("PYTHONPATH")])))
    cmd = [sys.executable, "-m", "stages.models.export", str(node.out_dir), "--stage", stage,
           "--out", str(out), *(["--overwrite"] if args.overwrite else [])]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    print(done.stdout, end="", flush=True)
    print(done.stderr, end="", file=sys.stderr, flush=True)
    if done.returncode != 0:
        return done.returncode
    print(f"\nload it:\n  from transformers import AutoModelForCausalLM, AutoTokenizer; "
          f"tok = AutoTokenizer.from_pretrained({str(out)!r}); "
          f"model = AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def cmd_launch_command(args: argparse.Namespace) -> int:
    from flows.config import load
    from flows.dag import build
    from flows.launchers import launch_plan
    dag = build(load(args.overrides))
    training = [n for n, node in dag.nodes.items() if node.kind_cls.launcher == "torchrun"]
    name = args.stage or (training or list(dag.nodes))[0]
    if name not in dag.nodes:
        raise ConfigError(f"--stage {name}: no such stage; stages: {', '.join(dag.nodes)}")
    node = dag.nodes[name]  # the layout the stage runs with (its own `parallel`, as the flow does)
    cluster = node.kind_cls.layout(node.config, dag.pipeline.cluster)
    print(f"# stage {name} ({node.kind}), launcher {cluster.launcher}; forge writes "
          f"{node.out_dir / 'spec.json'} when the stage runs")
    print(launch_plan(cluster, node.out_dir / "spec.json", node.kind_cls.launcher))
    return 0


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `forge plan | head` ends quietly
    parser = command_parser(__doc__)
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "export" and not any(x.startswith("-") for x in extra):
        args.overrides += extra   # `export STAGE --out DIR a=b`: overrides after the options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.command in ("run", "resume"):
        # SIGTERM like Ctrl-C: an exception that unwinds (the run is recorded as cancelled, the
        # Prefect server stopped) instead of an instant death; the worker gets it passed on
        from flows.runner import raise_stopped
        for sig in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:   # nohup, `&` in a script: left so
                signal.signal(sig, raise_stopped)
    handlers = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "lineage": cmd_lineage,
                "runs": cmd_runs, "resume": cmd_resume, "deploy": cmd_deploy,
                "launch-command": cmd_launch_command, "ui": cmd_ui, "promote": cmd_promote,
                "export": cmd_export, "cancel": cmd_cancel}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"forge: invalid configuration: {e}\nNothing was run and nothing was changed.",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if args.command not in ("run", "resume"):
            raise
        return 128 + getattr(e, "signum", signal.SIGINT)   # 130 for Ctrl-C, 143 for SIGTERM


if __name__ == "__main__":
    sys.exit(main())
