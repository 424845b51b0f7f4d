"""Stage worker entry point: ``python -m stages.worker SPEC.json`` (or under ``torchrun -m``).

The orchestrator writes one resolved spec file per stage run; the worker rebuilds the typed
config, runs the stage kind, and (rank 0 only) writes ``artifact.json`` last. A spec with a
``part`` runs that part of a fanned-out stage (``StageKind.parts``) and writes its ``done.json``.
It never imports the orchestrator (Prefect, Hydra, MLflow). A training run stopped by SIGTERM or SIGINT writes a checkpoint
and exits ``128 + signal`` (``stages/training/preemption.py``).
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

from stages import KINDS
from stages.base import Artifact, RunContext, StageInput, write_artifact, write_part_record
from stages.schema import from_dict
from stages.training.preemption import Preempted
from stages.cluster import ParallelSpec


def load_spec(path: Path) -> tuple:
    spec = json.loads(Path(path).read_text())
    if spec["kind"] not in KINDS and spec.get("kind_module"):
        importlib.import_module(spec["kind_module"])  # a kind registered outside stages/
    kind = KINDS[spec["kind"]]
    config = from_dict(kind.Config, spec["config"], f"stages.{spec['stage']}")
    inputs = {name: StageInput(name, Path(v["out_dir"]), Artifact(**v["artifact"]))
              for name, v in spec["inputs"].items()}
    cluster = from_dict(ParallelSpec, spec.get("cluster", {}), "cluster")
    ctx = RunContext(stage=spec["stage"], key=spec["key"], cluster=cluster, seed=spec.get("seed", 1234),
                     kind=spec["kind"], part=spec.get("part", ""))
    return kind, config, inputs, Path(spec["out_dir"]), ctx


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m stages.worker SPEC.json", file=sys.stderr)
        return 2
    kind, config, inputs, out_dir, ctx = load_spec(Path(argv[0]))
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        (out_dir / "worker.pid").write_text(str(os.getpid()))
    try:
        if ctx.part:   # one part of a fanned-out stage: its record marks it done
            record = kind.run_part(config, inputs, out_dir, ctx, ctx.part)
            if rank == 0:
                path = write_part_record(out_dir, ctx.part, record)
                print(f"[{ctx.stage}] {ctx.part} done: {path}", flush=True)
            return 0
        artifact = kind.run(config, inputs, out_dir, ctx)
    except Preempted as stopped:  # SIGTERM/SIGINT: checkpoint written, a rerun resumes from it
        if rank == 0:
            print(f"[{ctx.stage}] {stopped}", flush=True)
        return stopped.exit_code
    if rank == 0:
        write_artifact(out_dir, artifact)
        print(f"[{ctx.stage}] done: {out_dir / 'artifact.json'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
