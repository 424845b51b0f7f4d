"""A stage kind defined outside stages/, as a plugin would: it touches no module of flows/ and
reaches the orchestrator only through ``stages.register`` and the StageKind hooks."""
from __future__ import annotations

import os
import time
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


@configclass
class FanoutConfig:
    parts: int = param(3, "parts before the gather", ge=1)
    fail_if: str = setting("", "a file: a part whose name is written in it fails (a fault switch)")


class Fanout(StageKind):
    """Each part writes its name and pid into ``parts/<part>/out.txt`` and appends its name to
    ``executions.log`` beside the stage (outside it: a forced rerun cannot hide an execution); the
    gather joins the parts' outputs in order."""
    name = "fanout"
    Config = FanoutConfig
    parent_fields = ()

    @classmethod
    def parts(cls, config: FanoutConfig) -> tuple[str, ...]:
        return tuple(f"part-{i}" for i in range(config.parts))

    @classmethod
    def run_part(cls, config: FanoutConfig, inputs: dict[str, StageInput], out_dir: Path,
                 ctx: RunContext, part: str) -> dict:
        with open(out_dir.parent / "executions.log", "a") as fh:
            fh.write(part + "\n")
        if config.fail_if and part in Path(config.fail_if).read_text().split():
            raise RuntimeError(f"{part} was told to fail")
        (out_dir / "parts" / part / "out.txt").write_text(f"{part} pid={os.getpid()}")
        return {"part": part, "pid": os.getpid()}

    @classmethod
    def run(cls, config: FanoutConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        texts = [(out_dir / "parts" / p / "out.txt").read_text().split(" pid=")[0]
                 for p in cls.parts(config)]
        (out_dir / "joined.txt").write_text(",".join(texts))
        return Artifact(kind=cls.name, stage=ctx.stage, key=ctx.key, outputs={"joined": "joined.txt"})


register(Fanout)


class FanoutTogether(Fanout):
    """Independent parts (``parts_together``, as tokenize's shards): each also records when it
    ran, and takes 1.5 s, so that parts run at once overlap."""
    name = "fanout-together"
    parts_together = True

    @classmethod
    def run_part(cls, config: FanoutConfig, inputs: dict[str, StageInput], out_dir: Path,
                 ctx: RunContext, part: str) -> dict:
        started = time.time()
        time.sleep(1.5)
        return {**super().run_part(config, inputs, out_dir, ctx, part), "started": started,
                "ended": time.time()}


register(FanoutTogether)


def mark_rl_unbuilt(monkeypatch) -> None:
    """Register the rl kind as not built (as it was before issue 12), for tests of how a plan, a
    run and the DAG picture treat a kind that validates but cannot run."""
    import stages
    from stages.rl.grpo import Rl

    class Unbuilt(Rl):
        built = False
        not_built_reason = "is not built yet: RL (GRPO with the DAPO loss) is issue 12"
    monkeypatch.setitem(stages.KINDS, "rl", Unbuilt)
