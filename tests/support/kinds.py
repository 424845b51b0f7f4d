"""A stage kind defined outside stages/, as a plugin would: it touches no module of flows/ and
reaches the orchestrator only through ``stages.register`` and the StageKind hooks."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stages import register
from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.schema import ConfigError, configclass, param, setting


@configclass
class EchoConfig:
    text: str = param(doc="what the stage writes")
    repeat: int = param(1, "how many times", ge=1)
    after: tuple[str, ...] = param((), "stages that must be complete first")
    note: str = setting("", "not part of the key")


class Echo(StageKind):
    """Writes ``text`` ``repeat`` times into ``echo.txt``, with the worker's pid."""
    name = "echo"
    Config = EchoConfig
    parent_fields = ("after",)

    @classmethod
    def check(cls, config: EchoConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        for i, parent in enumerate(config.after):
            graph.require(parent, f"stages.{stage}.after[{i}]", "echo")

    @classmethod
    def tokens(cls, config: EchoConfig) -> int:
        return len(config.text) * config.repeat

    @classmethod
    def preflight(cls, config: EchoConfig, where: str) -> None:
        if config.text == "needs-a-gpu":
            raise ConfigError(f"{where}.text: this machine cannot echo that; pick other text")

    @classmethod
    def run(cls, config: EchoConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        before = "".join(inp.path("echo").read_text().split(" pid=")[0] for inp in inputs.values())
        text = before + config.text * config.repeat
        (out_dir / "echo.txt").write_text(f"{text} pid={os.getpid()}")
        ctx.metric(out_dir, 1, chars=len(text))
        return Artifact(kind=cls.name, stage=ctx.stage, key=ctx.key, outputs={"echo": "echo.txt"},
                        metrics={"chars": float(len(text))})


register(Echo)
