"""The work of a `merge` stage (see ``stages/merge.py`` for the method semantics): export the
parents to Hugging Face format, merge with mergekit's Python API, fix the context fields of the
output config, convert back to a Megatron checkpoint."""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

from stages.base import Artifact, RunContext, StageInput
from stages.model_stages import spec_of_artifact
from stages.schema import to_dict
from stages.training.specs import ModelSpec


def mergekit_config(config, paths: dict[str, str]) -> dict:
    """The MergeConfiguration document (as mergekit's YAML would hold it)."""
    weights = config.weight_of()
    doc: dict = {"merge_method": config.method, "dtype": "float32"}
    if config.method == "linear":
        total = sum(weights.values())
        doc["models"] = [{"model": paths[p], "parameters": {"weight": w / total}}
                         for p, w in weights.items()]
        doc["parameters"] = {"normalize": False}  # normalised here, so the record shows the math
        return doc
    doc["base_model"] = paths[config.base]
    others = [p for p in config.from_ if p != config.base]
    if config.method == "slerp":
        (other,) = others
        doc["models"] = [{"model": paths[config.base]}, {"model": paths[other]}]
        doc["parameters"] = {"t": weights[other] / (weights[other] + weights[config.base])}
        return doc
    doc["models"] = [{"model": paths[p], "parameters": {"weight": weights[p]} |
                      ({"density": config.density} if config.method == "ties" else {})}
                     for p in others]
    doc["parameters"] = {"normalize": False}  # weights mean what the config says
    return doc


def set_context(hf_dir: Path, spec: ModelSpec) -> None:
    """Write the longest-context parent's RoPE theta and max positions into ``config.json``."""
    path = hf_dir / "config.json"
    cfg = json.loads(path.read_text())
    cfg["max_position_embeddings"] = spec.max_position_embeddings
    rope = cfg.get("rope_parameters") or {"rope_type": "default"}
    cfg["rope_parameters"] = rope | {"rope_theta": float(spec.rope_theta)}
    cfg.pop("rope_theta", None)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def merge_models(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> Artifact:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    from stages.convert import hf_to_megatron, megatron_to_hf
    from stages.training.checkpoint import CHECKPOINTS, TrainState, iter_name
    t0 = time.time()
    parents = list(dict.fromkeys([*config.from_, *([config.base] if config.base else [])]))
    specs = {p: spec_of_artifact(inputs[p]) for p in parents}
    longest = max(config.from_, key=lambda p: inputs[p].artifact.extra.get("seq_length", 0))
    tokenizer = next((inputs[p].path("tokenizer") for p in parents
                      if "tokenizer" in inputs[p].artifact.outputs), None)

    work, hf_out = out_dir / "inputs", out_dir / "hf"
    shutil.rmtree(work, ignore_errors=True)  # a half-done earlier attempt: redo from scratch
    shutil.rmtree(hf_out, ignore_errors=True)
    paths = {}
    for p in parents:
        paths[p] = str(megatron_to_hf(inputs[p].path("checkpoint"), specs[p], work / p, tokenizer))
        print(f"[{ctx.stage}] exported {p} to Hugging Face format", flush=True)

    doc = mergekit_config(config, paths)
    (out_dir / "mergekit.json").write_text(json.dumps(doc, indent=2) + "\n")
    run_merge(MergeConfiguration.model_validate(doc), str(hf_out),
              MergeOptions(cuda=False, copy_tokenizer=tokenizer is not None, write_model_card=False,
                           quiet=True, random_seed=ctx.seed))
    set_context(hf_out, specs[longest])
    print(f"[{ctx.stage}] {config.method} merge of {', '.join(config.from_)} -> {hf_out}", flush=True)

    ckpt = out_dir / CHECKPOINTS / iter_name(0)
    tokens = max(inputs[p].artifact.extra.get("tokens_total", 0) for p in parents)
    spec = hf_to_megatron(hf_out, ckpt, TrainState(tokens_total=tokens))  # for token-based schedules
    shutil.rmtree(work)
    outputs = {"checkpoint": f"{CHECKPOINTS}/{iter_name(0)}", "hf": "hf", "mergekit_config": "mergekit.json"}
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
        outputs["tokenizer"] = "tokenizer.json"
    extra = {"model": to_dict(spec), "seq_length": inputs[longest].artifact.extra.get("seq_length"),
             "parents": parents, "context_from": longest, "method": config.method,
             "tokens_total": tokens}
    return Artifact(kind="merge", stage=ctx.stage, key=ctx.key, outputs=outputs,
                    metrics={"merge_s": time.time() - t0}, extra=extra)
