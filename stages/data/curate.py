"""`curate` stage kind: chat data for SFT, kept by named rule filters and an LLM judge.

A fan-out (``StageKind.parts``): each part is a worker run and a task run of its own, done once
its ``parts/<part>/done.json`` exists, so a failure redoes only the parts not done.

1. ``split``: every source is loaded through HF ``datasets`` (``chat_sources.load_rows``: a line
   that is not JSON is counted, never fatal) and normalised to the OpenAI messages format;
   malformed conversations are rejected by name (role order, empty turns, no final assistant
   turn); exact and near duplicates are rejected across all sources (MinHash, so this needs every
   sample at once); the survivors are dealt round-robin into ``shards`` files. With
   ``judge.serve`` the judge's model stage is exported here once (``models/export.py``).
2. ``shard-I-of-N``: the per-sample rules (``curation_rules.check_sample``: length in tokens,
   language, PII, secrets, math answer vs reference, decontamination against the evaluation
   prompts), then the judge over what passed (``judge.judge_all``: concurrent, retried, every
   verdict cached per (sample, rubric, judge model) in the store's ``.cache/``, so no rerun asks
   twice). A judge that stays unreachable fails the shard with a message naming the endpoint.
3. gather (``run``): kept samples in their original order; a seeded held-out split; at most
   ``target_samples`` kept for training; ``kept.parquet``, ``heldout.parquet``,
   ``eval_prompts.jsonl`` and the report (``curation_report.py``: counts per rule and criterion,
   score histograms, sampled rejects per reason), logged on the stage's MLflow run.

``shards`` is a setting, not identity: how the samples are split changes no verdict and no result.
"""
from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.data.chat_sources import ChatSourceSpec
from stages.data.curation_rules import RulesSpec
from stages.data.judge import JudgeSpec
from stages.layout import FAST_DIGEST, JUDGE_MODEL, fast_file_digest, part_dir
from stages.schema import ConfigError, configclass, param, setting

SPLIT = "split"


@configclass
class EvalPromptsSpec:
    """The pipeline's verifiable evaluation prompts: the training data is decontaminated against
    them, and evaluate stages score greedy exact match on them before and after SFT."""
    generator: Literal["arithmetic"] | None = param(None, "embedded arithmetic prompts")
    count: int = param(64, "generator: number of prompts", ge=1)
    builder: str | None = param(None, "datasets builder (json, parquet) or hub id")
    data_files: tuple[str, ...] = param((), "builder: local files / globs")
    split: str = param("train", "builder: split to read")
    prompt_field: str = param("prompt", "column with the prompt")
    answer_field: str = param("answer", "column with the reference answer")

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.builder is None):
            raise ConfigError("give exactly one of `generator` (embedded prompts) or `builder` "
                              "(a datasets builder with data_files)")


@configclass
class CurateConfig:
    sources: dict[str, ChatSourceSpec] = param(doc="source name -> chat conversations to curate")
    tokenizer: str = param(doc="the train_tokenizer stage of the model the data is for (token "
                               "lengths; SFT checks it is its model's)")
    eval_prompts: EvalPromptsSpec = param(doc="verifiable evaluation prompts (decontamination, "
                                              "exact match after SFT)")
    rules: RulesSpec = param(factory=RulesSpec, doc="rule filters' bounds and switches")
    judge: JudgeSpec | None = param(None, "the LLM judge: a rubric and an OpenAI-compatible "
                                          "endpoint (none: rules only)")
    heldout_fraction: float = param(0.05, "share of the kept conversations held out of SFT (its "
                                          "held-out assistant-token loss)", ge=0.0, lt=0.5)
    target_samples: int | None = param(None, "at most this many kept for training (None: all)",
                                       ge=1)
    seed: int = param(0, "seed of the embedded generators and of the held-out split")
    shards: int = setting(4, "parts the rules and the judge run in (a task run each)", ge=1)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: is empty; declare at least one chat source")


class Curate(StageKind):
    name = "curate"
    Config = CurateConfig
    parent_fields = ("tokenizer", "judge.serve")

    @classmethod
    def check(cls, config: CurateConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        tok = graph.require(config.tokenizer, f"stages.{stage}.tokenizer", "train_tokenizer")
        if not getattr(tok, "chat_roles", False):
            raise ConfigError(f"stages.{stage}.tokenizer: stage {config.tokenizer!r} has no chat "
                              "role tokens; set its chat_roles: true")
        if config.judge is not None and config.judge.serve is not None:
            graph.require_model(config.judge.serve, f"stages.{stage}.judge.serve")

    @classmethod
    def tokenizer(cls, config: CurateConfig, graph: StageGraph) -> str | None:
        return config.tokenizer

    @classmethod
    def parts(cls, config: CurateConfig) -> tuple[str, ...]:
        return (SPLIT, *shard_names(config.shards))

    @classmethod
    def run_part(cls, config: CurateConfig, inputs: dict[str, StageInput], out_dir: Path,
                 ctx: RunContext, part: str) -> dict:
        from stages.data import curation_parts  # heavy: datasets, tokenizers, openai
        if part == SPLIT:
            return curation_parts.split(config, inputs, Path(out_dir), ctx)
        return curation_parts.shard(config, inputs, Path(out_dir), ctx, part)

    @classmethod
    def run(cls, config: CurateConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return gather(config, Path(out_dir), ctx)

    @classmethod
    def datasets_read(cls, config: CurateConfig, artifact: Artifact,
                      upstream: dict[str, Artifact]) -> list[dict]:
        return [dict(d, stage=artifact.stage) for d in artifact.extra.get("sources", [])]


def shard_names(n: int) -> list[str]:
    return [f"shard-{i}-of-{n}" for i in range(n)]


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def gather(config: CurateConfig, out_dir: Path, ctx: RunContext) -> Artifact:
    """Join the shards: kept in original order, held-out split, files, report, artifact."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data.curation_report import write_report
    t0 = time.time()
    split = json.loads((part_dir(out_dir, SPLIT) / "done.json").read_text())
    shards = [part_dir(out_dir, name) for name in shard_names(config.shards)]
    kept = sorted((s for d in shards for s in read_jsonl(d / "kept.jsonl")), key=lambda s: s["index"])
    rejected = read_jsonl(part_dir(out_dir, SPLIT) / "rejected.jsonl") + [
        r for d in shards for r in read_jsonl(d / "rejected.jsonl")]
    verdicts = [v for d in shards for v in read_jsonl(d / "verdicts.jsonl")]

    order = list(range(len(kept)))
    random.Random(config.seed).shuffle(order)
    n_held = round(len(kept) * config.heldout_fraction) if len(kept) > 1 else 0
    if config.heldout_fraction > 0 and len(kept) > 1:
        n_held = max(1, n_held)
    held_idx = set(order[:n_held])
    heldout = [s for i, s in enumerate(kept) if i in held_idx]
    train = [s for i, s in enumerate(kept) if i not in held_idx]
    capped = len(train) - (config.target_samples or len(train))
    train = train[:config.target_samples] if config.target_samples else train

    def table(rows: list[dict]):
        return pa.table({"id": [r["id"] for r in rows], "source": [r["source"] for r in rows],
                         "messages": [json.dumps(r["messages"], ensure_ascii=False) for r in rows]})
    pq.write_table(table(train), out_dir / "kept.parquet")
    pq.write_table(table(heldout), out_dir / "heldout.parquet")
    prompts = read_jsonl(part_dir(out_dir, SPLIT) / "eval_prompts.jsonl")
    (out_dir / "eval_prompts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))

    import shutil   # the judge's export served its shards; a 30B export is not worth keeping
    shutil.rmtree(out_dir / JUDGE_MODEL, ignore_errors=True)
    rubric = dict(config.judge.rubric) if config.judge is not None else {}
    report, files = write_report(out_dir, split["counts"], rejected, verdicts, rubric,
                                 kept=len(train), heldout=len(heldout), capped=max(0, capped))
    print(f"[{ctx.stage}] kept {len(train)} for training, {len(heldout)} held out, "
          f"{len(rejected)} rejected of {split['counts']['rows']} rows "
          f"({time.time() - t0:.1f}s)", flush=True)
    metrics = {"kept": float(len(train)), "heldout": float(len(heldout)),
               "rejected": float(len(rejected)), "rows": float(split["counts"]["rows"]),
               **{f"rejected/{k}": float(v) for k, v in report["rejected_by_rule"].items()},
               **{f"judge/{k}": float(v) for k, v in report["judge"].items()
                  if isinstance(v, (int, float))}}
    datasets_ = [{"name": name, "split": split_name, "rows": len(rows),
                  "path": str((out_dir / f"{name}.parquet").resolve()),
                  "digest": fast_file_digest(out_dir / f"{name}.parquet"),
                  "digest_algo": FAST_DIGEST}
                 for name, split_name, rows in (("kept", "train", train),
                                                ("heldout", "heldout", heldout))]
    outputs = {"kept": "kept.parquet", "heldout": "heldout.parquet",
               "eval_prompts": "eval_prompts.jsonl", **files}
    extra = {"tokenizer": config.tokenizer, "kept": len(train), "heldout": len(heldout),
             "sources": split.get("sources", []),
             "judge_model": split.get("judge_model"), "report": report}
    return Artifact(kind="curate", stage=ctx.stage, key=ctx.key, outputs=outputs, metrics=metrics,
                    datasets=datasets_, extra=extra)

