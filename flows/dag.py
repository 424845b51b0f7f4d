"""Typed pipeline -> validated DAG of stage nodes with identity keys and output dirs (pure Python).

A stage's key is ``sha256(kind, identity fields of its config, parents' keys)``; references to
parents are replaced by the parents' keys, so renaming a stage does not retrain anything and a
changed parent changes every descendant. Its output dir is ``<store>/<stage>-<key[:12]>/``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

from flows.config import PipelineConfig
from stages import KINDS
from stages.base import StageGraph, StageKind, field_value
from stages.schema import ConfigError, identity_dict

KEY_VERSION = 1  # bump only if the key recipe itself changes


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    kind: str
    config: Any
    parents: tuple[str, ...]
    key: str
    out_dir: Path

    @property
    def kind_cls(self) -> type[StageKind]:
        return KINDS[self.kind]

    def identity(self, keys: dict[str, str]) -> dict:
        return stage_identity(self.kind_cls, self.config, keys)


@dataclasses.dataclass(frozen=True)
class Dag:
    pipeline: PipelineConfig
    nodes: dict[str, Node]   # in topological order
    graph: StageGraph        # what the kinds validated against (model_of, tokenizer_of, ...)

    def ancestors(self, name: str) -> list[str]:
        seen: list[str] = []
        stack = list(self.nodes[name].parents)
        while stack:
            p = stack.pop()
            if p not in seen:
                seen.append(p)
                stack += self.nodes[p].parents
        return [n for n in self.nodes if n in seen]

    def children(self, name: str) -> list[str]:
        return [n for n, node in self.nodes.items() if name in node.parents]


def stage_identity(kind: type[StageKind], config: Any, keys: dict[str, str]) -> dict:
    """Identity fields with parent references replaced by the parents' keys."""
    ident = identity_dict(config)
    for f in kind.parent_fields:
        ref = field_value(config, f)
        if ref is None:
            continue
        *outer, last = f.split(".")   # a dotted field: a reference inside a nested config
        holder = ident
        for part in outer:
            holder = holder[part]
        holder[last] = keys[ref] if isinstance(ref, str) else [keys[r] for r in ref]
    return ident


def stage_key(kind: str, identity: dict) -> str:
    blob = json.dumps({"v": KEY_VERSION, "kind": kind, "identity": identity},
                      sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def build(pipeline: PipelineConfig) -> Dag:
    """Check references, cycles and kind-specific rules; compute keys in topological order."""
    specs = pipeline.stages
    parents: dict[str, tuple[str, ...]] = {}
    for name, spec in specs.items():
        kind = KINDS[spec.kind]
        refs = tuple(kind.parents(spec.config))
        for f in kind.parent_fields:
            ref = field_value(spec.config, f)
            field = "from" if f == "from_" else f
            for r in ([ref] if isinstance(ref, str) else list(ref or ())):
                if r not in specs:
                    raise ConfigError(f"stages.{name}.{field}: unknown stage {r!r}; "
                                      f"declared stages: {', '.join(specs)}")
                if r == name:
                    raise ConfigError(f"stages.{name}.{field}: a stage cannot be its own parent; "
                                      "name an earlier stage")
        parents[name] = tuple(dict.fromkeys(refs))
    order = _topological(parents)
    graph = StageGraph({n: KINDS[s.kind] for n, s in specs.items()},
                       {n: s.config for n, s in specs.items()}, KINDS.values())
    for name in order:
        KINDS[specs[name].kind].check(specs[name].config, name, graph, pipeline.cluster)
    keys: dict[str, str] = {}
    nodes: dict[str, Node] = {}
    for name in order:
        spec = specs[name]
        key = stage_key(spec.kind, stage_identity(KINDS[spec.kind], spec.config, keys))
        keys[name] = key
        nodes[name] = Node(name, spec.kind, spec.config, parents[name], key,
                           pipeline.store / f"{name}-{key[:12]}")
    return Dag(pipeline, nodes, graph)


def _topological(parents: dict[str, tuple[str, ...]]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            cycle = path[path.index(n):] + [n]
            raise ConfigError(f"stages: cycle {' -> '.join(cycle)}; a stage's `from`/`data` must "
                              "point to an earlier stage")
        state[n] = 1
        for p in parents[n]:
            visit(p, path + [n])
        state[n] = 2
        order.append(n)

    for n in parents:
        visit(n, [])
    return order
