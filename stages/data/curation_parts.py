"""The parts of the `curate` stage (its docstring has the design): ``split`` and one ``shard``.

Files of a part live in its ``parts/<part>/`` folder; a part's return value is its done.json.
``split`` writes ``shard-I.jsonl`` (one sample per line: index, id, source, messages, reference),
``rejected.jsonl`` (malformed rows and duplicates) and ``eval_prompts.jsonl``; a shard writes
``kept.jsonl``, ``rejected.jsonl`` and ``verdicts.jsonl``. A rejected line names its rule and a
detail, and carries the sample (or the raw line) so that the report can show examples.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

from stages.base import RunContext, StageInput
from stages.data.chat_format import sample_digest
from stages.layout import FAST_DIGEST, JUDGE_MODEL, fast_file_digest, judge_cache, part_dir



def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _eval_prompts(config) -> list[dict]:
    spec = config.eval_prompts
    if spec.generator is not None:
        from stages.data.chat_corpus import eval_prompts
        return eval_prompts(config.seed, spec.count)
    import datasets
    ds = datasets.load_dataset(spec.builder, data_files=list(spec.data_files) or None,
                               split=spec.split)
    for field in (spec.prompt_field, spec.answer_field):
        if field not in ds.column_names:
            raise ValueError(f"eval_prompts.{'prompt' if field == spec.prompt_field else 'answer'}"
                             f"_field: no column {field!r} in {spec.data_files or spec.builder} "
                             f"(columns: {', '.join(ds.column_names)})")
    return [{"id": f"eval-{i}", "prompt": str(r[spec.prompt_field]),
             "answer": str(r[spec.answer_field])} for i, r in enumerate(ds)]


def split(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> dict:
    """Load, normalise, reject malformed rows and duplicates, deal the rest into shards."""
    from stages.data.chat_sources import load_rows, normalise
    from stages.data.curation_rules import deduplicate
    t0 = time.time()
    folder = part_dir(out_dir, "split")
    raw = folder / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    counts: Counter = Counter()
    samples: list[dict] = []
    rejected: list[dict] = []
    sources = []
    for name, spec in config.sources.items():
        rows = 0
        for row in load_rows(spec, name, raw, config.seed):
            rows += 1
            messages, why = (None, row.problem) if row.problem else normalise(row.record, spec)
            if messages is None:
                rejected.append({"rule": why, "detail": f"{name} row {row.line}", "source": name,
                                 "sample": row.record if row.record is not None else row.text})
                continue
            reference = row.record.get(spec.reference_field) if spec.reference_field else None
            samples.append({"index": len(samples), "id": sample_digest(messages), "source": name,
                            "messages": messages,
                            "reference": None if reference is None else str(reference)})
        counts["rows"] += rows
        sources.append({"name": name, "rows": rows, **_source_file(spec, name, raw)})
        print(f"[{ctx.stage}] {name}: {rows} rows", flush=True)
    unique = _drop_repeated_ids(samples, rejected)   # exact copies: the first one stays
    near = deduplicate([(s["id"], s["messages"]) for s in unique], config.rules)
    survivors = []
    for s in unique:
        if s["id"] in near:
            rule, detail = near[s["id"]]
            rejected.append({"rule": rule, "detail": detail, "source": s["source"], "sample": s})
        else:
            survivors.append(s)
    counts.update(r["rule"] for r in rejected)
    for i, name in enumerate(_shard_files(config.shards)):
        _write_jsonl(folder / name, survivors[i::config.shards])
    _write_jsonl(folder / "rejected.jsonl", rejected)
    prompts = _eval_prompts(config)
    _write_jsonl(folder / "eval_prompts.jsonl", prompts)
    judge_model = None
    if config.judge is not None and config.judge.serve is not None:
        judge_model = _export_judge(config.judge.serve, inputs, out_dir, ctx)
    print(f"[{ctx.stage}] split: {len(survivors)} of {counts['rows']} rows go on to the rules "
          f"({len(rejected)} malformed or duplicate; {time.time() - t0:.1f}s)", flush=True)
    return {"counts": dict(counts), "survivors": len(survivors), "eval_prompts": len(prompts),
            "sources": sources, "judge_model": judge_model}


def _drop_repeated_ids(survivors: list[dict], rejected: list[dict]) -> list[dict]:
    seen: set[str] = set()
    out = []
    for s in survivors:
        if s["id"] in seen:
            rejected.append({"rule": "exact_duplicate", "detail": s["id"], "source": s["source"],
                             "sample": s})
            continue
        seen.add(s["id"])
        out.append(s)
    return out


def _shard_files(n: int) -> list[str]:
    return [f"shard-{i}.jsonl" for i in range(n)]


def _source_file(spec, name: str, raw: Path) -> dict:
    """Where a source's rows came from, with a digest, for lineage (local files only)."""
    files = sorted(raw.glob(f"{name}.jsonl")) if spec.generator else [
        Path(f) for f in spec.data_files if "://" not in f and Path(f).is_file()]
    if len(files) != 1:
        return {"path": ",".join(str(f) for f in files) or str(spec.builder), "digest": ""}
    return {"path": str(files[0].resolve()), "digest": fast_file_digest(files[0]),
            "digest_algo": FAST_DIGEST}


def _export_judge(stage: str, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext) -> str:
    from stages.models.export import export_model
    target = out_dir / JUDGE_MODEL
    shutil.rmtree(target, ignore_errors=True)   # an attempt cut short: export again
    export_model(inputs[stage], target)
    print(f"[{ctx.stage}] exported judge model {stage} to {target}", flush=True)
    return stage


def shard(config, inputs: dict[str, StageInput], out_dir: Path, ctx: RunContext, part: str) -> dict:
    """The per-sample rules, then the judge, over one shard's samples."""
    from tokenizers import Tokenizer

    from stages.data.curation_rules import RuleContext, check_sample
    t0 = time.time()
    index = int(part.split("-")[1])
    folder = part_dir(out_dir, part)
    folder.mkdir(parents=True, exist_ok=True)
    split_dir = part_dir(out_dir, "split")
    samples = [json.loads(line) for line in (split_dir / f"shard-{index}.jsonl").read_text().splitlines()
               if line.strip()]
    prompts = [json.loads(line)["prompt"] for line in
               (split_dir / "eval_prompts.jsonl").read_text().splitlines() if line.strip()]
    tokenizer = Tokenizer.from_file(str(inputs[config.tokenizer].path("tokenizer")))
    rules = RuleContext(tokenizer=tokenizer, eval_prompts=prompts, spec=config.rules)
    passed, rejected = [], []
    for s in samples:
        rule, detail = check_sample(s["messages"], s["reference"], rules)
        if rule:
            rejected.append({"rule": rule, "detail": detail, "source": s["source"], "sample": s})
        else:
            passed.append(s)
    print(f"[{ctx.stage}] {part}: {len(passed)} of {len(samples)} pass the rules "
          f"({time.time() - t0:.1f}s)", flush=True)
    kept, verdicts = passed, []
    if config.judge is not None and passed:
        kept, verdicts = _judge(config, inputs, passed, rejected, out_dir, ctx, part)
    _write_jsonl(folder / "kept.jsonl", kept)
    _write_jsonl(folder / "rejected.jsonl", rejected)
    _write_jsonl(folder / "verdicts.jsonl", verdicts)
    counts = Counter(r["rule"] for r in rejected)
    print(f"[{ctx.stage}] {part}: kept {len(kept)} of {len(samples)} ({time.time() - t0:.1f}s)",
          flush=True)
    return {"samples": len(samples), "kept": len(kept), "rejected": dict(counts),
            "judged": len(verdicts)}


def _judge(config, inputs: dict[str, StageInput], passed: list[dict], rejected: list[dict],
           out_dir: Path, ctx: RunContext, part: str) -> tuple[list[dict], list[dict]]:
    from stages.data.judge import VerdictCache, judge_all
    from stages.data.judge_server import judge_endpoint
    spec = config.judge
    served = out_dir / JUDGE_MODEL if spec.serve else None
    last = [0.0]

    def progress(done: int, total: int) -> None:
        if time.time() - last[0] > 10 or done == total:   # a line every 10 s at most
            last[0] = time.time()
            print(f"[{ctx.stage}] {part}: judged {done}/{total}", flush=True)

    cache_path = judge_cache(out_dir)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    device = getattr(ctx.cluster, "device", "cpu")
    # a served stage is cached under its key: the server names it by its path in this store
    cache_as = f"stage:{spec.serve}@{inputs[spec.serve].artifact.key}" if spec.serve else None
    with judge_endpoint(spec, served, part_dir(out_dir, part), device=device) as url, \
            VerdictCache(cache_path) as cache:
        print(f"[{ctx.stage}] {part}: judge at {url}", flush=True)
        found = judge_all([(s["id"], s["messages"]) for s in passed], spec, url, cache, progress,
                          cache_as=cache_as)
    kept, verdicts = [], []
    for s in passed:
        v = found[s["id"]]
        verdicts.append({"id": s["id"], "source": s["source"], "scores": v.scores,
                         "passed": v.passed, "unparsable": v.unparsable, "reason": v.reason,
                         "raw": v.raw[:2000]})
        if v.unparsable and spec.on_unparsable == "keep":
            kept.append(s)
        elif v.unparsable:
            rejected.append({"rule": "judge_unparsable", "detail": v.reason, "source": s["source"],
                             "sample": s, "raw": v.raw[:2000]})
        elif v.passed:
            kept.append(s)
        else:
            low = v.failed(spec)
            rejected.append({"rule": f"judge:{low[0] if low else 'rubric'}", "detail": v.reason,
                             "source": s["source"], "sample": s, "scores": v.scores,
                             "criteria_failed": low})
    return kept, verdicts
