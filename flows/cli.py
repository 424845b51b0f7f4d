"""`forge`: run, plan, inspect and trace declarative LLM training pipelines.

    forge run pipeline=granite-4.1-tiny --only 'data|tokenizer|tokenize|pretrain-.*'
    forge plan pipeline=granite-4.1 model=granite-8b
    forge run -m stages.pretrain-4.schedule.lr=5e-4,1e-3     # sweep; shared stages run once
    forge status
    forge lineage pretrain-4
"""
from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time

from stages.schema import ConfigError

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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="forge", description=__doc__, epilog=_choices(),
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

    status = sub.add_parser("status", help="which stages are complete, unfinished or never run")
    status.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)

    lin = sub.add_parser("lineage", help="print a stage's chain back to its data, from MLflow")
    lin.add_argument("stage", help="stage name, e.g. pretrain-4")
    lin.add_argument("overrides", nargs="*", help=OVERRIDES_HELP)
    return p


def expand_sweeps(overrides: list[str]) -> list[list[str]]:
    """a=1,2 b=3 -> [[a=1, b=3], [a=2, b=3]] (Hydra's override grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except HydraException as e:
        raise ConfigError(f"override: {str(e).splitlines()[0]}") from e
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
        else:
            choices.append([o.input_line])
    return [list(c) for c in itertools.product(*choices)]


def cmd_run(args: argparse.Namespace) -> int:
    from flows import runner
    combos = expand_sweeps(args.overrides) if args.multirun else [args.overrides]
    preps = [runner.prepare(c, args.only, tuple(args.rerun)) for c in combos]  # validate all first
    code = 0
    for i, combo in enumerate(combos):
        prep = preps[i]
        if len(combos) > 1:
            print(f"\n=== multirun {i + 1}/{len(combos)}: {' '.join(combo)}")
            prep = runner.prepare(combo, args.only, tuple(args.rerun))  # sees what earlier runs made
        print(runner.plan_text(prep), flush=True)
        t0 = time.time()
        try:
            result = runner.execute(prep)
        except runner.PipelineFailed as e:
            print(f"\nforge: pipeline failed after {time.time() - t0:.0f}s: {e}\n"
                  "Fix the cause and run the same command again: finished stages are cached and the "
                  "failed one resumes from its newest checkpoint.", file=sys.stderr)
            code = 1
            continue
        print(f"\nfinished in {time.time() - t0:.0f}s\n" + runner.summary(prep, result), flush=True)
    return code


def cmd_plan(args: argparse.Namespace) -> int:
    from flows import runner
    prep = runner.prepare(args.overrides, args.only, tuple(args.rerun))
    print(runner.plan_text(prep))
    pipe = prep.dag.pipeline
    total = sum(s.tokens for s in prep.steps)
    print(f"\n{len(prep.steps)} stages valid; {total:.4g} training tokens in all; "
          f"model {pipe.resolved.get('model', {}).get('name', '?')}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.plan import complete, newest_checkpoint
    prep = runner.prepare(args.overrides)
    for name, node in prep.dag.nodes.items():
        if complete(node):
            state = "complete"
        elif (ck := newest_checkpoint(node)) is not None:
            state = f"unfinished (checkpoints/{ck})"
        elif node.out_dir.exists():
            state = "started, no checkpoint yet"
        else:
            state = "not run"
        print(f"  {name:<14} {state:<34} {node.out_dir}")
    return 0


def cmd_lineage(args: argparse.Namespace) -> int:
    from flows import runner
    from flows.lineage_view import print_lineage
    prep = runner.prepare(args.overrides)
    return print_lineage(prep.dag, args.stage)


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `forge plan | head` ends quietly
    args = _parser().parse_args(argv)
    handlers = {"run": cmd_run, "plan": cmd_plan, "status": cmd_status, "lineage": cmd_lineage}
    try:
        return handlers[args.command](args)
    except ConfigError as e:
        print(f"forge: invalid configuration: {e}\nNothing was run and nothing was changed.",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
