"""Decide, per stage, what a run will do and why: run / resume / cached / skip.

Pure Python over the DAG and the store on disk: ``artifact.json`` (with the node's key) is the only
proof of completion, so the plan is right even when Prefect's database is gone.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

from flows.dag import Dag, Node
from stages.base import read_artifact
from stages.layout import STAGE_RECORD, part_record
from stages.schema import ConfigError



@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    action: str      # "run" | "resume" | "cached" | "skip" | "blocked" (kind not built yet)
    why: str
    node: Node
    tokens: int

    @property
    def executes(self) -> bool:
        return self.action in ("run", "resume")


def complete(node: Node) -> bool:
    art = read_artifact(node.out_dir)
    return art is not None and art.key == node.key


def newest_checkpoint(node: Node) -> str | None:
    """The checkpoint (``checkpoints/<name>``) an unfinished attempt of the node resumes from."""
    found = node.kind_cls.resume_point(node.out_dir)
    return found.name if found is not None else None


def parts_done(node: Node) -> list[str]:
    """The parts of a fanned-out stage (``StageKind.parts``) whose done.json is there."""
    return [p for p in node.kind_cls.parts(node.config) if part_record(node.out_dir, p) is not None]


def make_plan(dag: Dag, only: str | None = None, rerun: tuple[str, ...] = ()) -> list[Step]:
    for r in rerun:
        if r not in dag.nodes:
            raise ConfigError(f"--rerun {r}: no such stage; stages: {', '.join(dag.nodes)}")
    if only is not None:
        try:
            pattern = re.compile(only)
        except re.error as e:
            raise ConfigError(f"--only {only!r}: not a valid regular expression ({e})") from e
        picked = [n for n in dag.nodes if pattern.fullmatch(n)]
        if not picked:
            raise ConfigError(f"--only {only!r} matches no stage; stages: {', '.join(dag.nodes)}")
    else:
        picked = list(dag.nodes)
    selected = set(picked)
    for n in picked:  # unfinished ancestors come along
        selected |= {a for a in dag.ancestors(n) if not complete(dag.nodes[a]) or a in rerun}

    steps: list[Step] = []
    runs: set[str] = set()
    blocked: set[str] = set()
    cluster = dag.pipeline.cluster
    for name, node in dag.nodes.items():
        tokens = node.kind_cls.tokens(node.config)
        not_built = node.kind_cls.blocked(node.config, cluster)
        if name not in selected:
            why = ("left out by --only" if only is not None else "not selected")
            if not_built:
                why += f"; {not_built}"
            steps.append(Step(name, "skip", why, node, tokens))
            continue
        if name in rerun:
            action, why = "run", "forced by --rerun (the previous output is kept aside)"
        elif complete(node):
            action, why = "cached", f"artifact.json holds key {node.key[:12]}"
        elif (ck := newest_checkpoint(node)) is not None:
            action, why = "resume", f"unfinished; resumes from checkpoints/{ck}"
        elif done := parts_done(node):
            total = len(node.kind_cls.parts(node.config))
            action, why = "resume", (f"unfinished; {len(done)} of {total} parts done "
                                     f"({', '.join(done)}): the rest run")
        else:
            upstream = [p for p in node.parents if p in runs]
            action = "run"
            why = (f"parent {', '.join(upstream)} runs first" if upstream else explain_new(dag, node))
        if action != "cached":
            runs.add(name)
            stuck = [p for p in node.parents if p in blocked]
            if not_built:
                action, why = "blocked", not_built
            elif stuck:
                action, why = "blocked", f"parent {', '.join(stuck)} cannot run yet"
            if action == "blocked":
                blocked.add(name)
        steps.append(Step(name, action, why, node, tokens))
    return steps


def check_runnable(steps: list[Step]) -> None:
    """Stages of kinds that later issues build stop the run here, before any compute."""
    blocked = [s for s in steps if s.action == "blocked"]
    if blocked:
        lines = [f"  {s.name} ({s.node.kind}): {s.why}" for s in blocked]
        built = [s.name for s in steps if s.action != "blocked"]
        raise ConfigError("these stages cannot run yet:\n" + "\n".join(lines) +
                          f"\n  Run the built part with --only '{'|'.join(built)}'")


def explain_new(dag: Dag, node: Node) -> str:
    """Why there is no output for this key: what changed since the newest other run of the stage."""
    previous = []
    for d in node.out_dir.parent.glob(f"{node.name}-*"):
        rec = d / STAGE_RECORD
        if d != node.out_dir and rec.exists():
            try:
                previous.append(json.loads(rec.read_text()))
            except ValueError:
                continue
    if not previous:
        return "never ran"
    prev = max(previous, key=lambda r: r.get("started", 0))
    now = node.identity({n: dag.nodes[n].key for n in dag.nodes})
    changed = []
    for path in diff_paths(prev.get("identity", {}), now):
        field = path.split(".")[0]
        if field in node.kind_cls.parent_fields:
            ref = getattr(node.config, field)
            changed.append(f"parent {ref if isinstance(ref, str) else '/'.join(ref)} changed")
        else:
            changed.append(path)
    changed = list(dict.fromkeys(changed))
    return f"changed since {prev.get('key', '?')[:12]}: " + ", ".join(changed[:6] or ["key recipe"])


def diff_paths(a: object, b: object, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += diff_paths(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix[:-1] or "<root>"]


def write_stage_record(node: Node, parent_keys: dict[str, str], config: dict, started: float) -> None:
    ident = node.identity(parent_keys)
    node.out_dir.mkdir(parents=True, exist_ok=True)
    rec = {"stage": node.name, "kind": node.kind, "key": node.key, "identity": ident,
           "parent_keys": parent_keys, "config": config, "started": started}
    tmp = node.out_dir / f".{STAGE_RECORD}.tmp"
    tmp.write_text(json.dumps(rec, indent=2, default=str))
    tmp.replace(node.out_dir / STAGE_RECORD)


def format_plan(steps: list[Step], store: Path) -> str:
    width = max(len(s.name) for s in steps)
    lines = []
    for s in steps:
        tok = f"{s.tokens:>9.3g} tok" if s.tokens else " " * 13
        where = str(s.node.out_dir.relative_to(store)) if s.action != "skip" else ""
        lines.append(f"  {s.name:<{width}}  {s.action:<7}  {tok}  {where:<28}  {s.why}")
    return "\n".join(lines)
