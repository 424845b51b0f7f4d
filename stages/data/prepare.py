"""The `prepare_data` stage: load every source with HF ``datasets``, split off held-out, write Parquet.

An embedded generator source is first written to ``raw/<name>.jsonl`` and then read by the same
``datasets.load_dataset`` call as a builder source (``json``, ``parquet``, a hub id ...), so the
loading path a real corpus takes is the one the tests exercise.

Outputs per source: ``sources/<name>.parquet`` (train) and ``heldout/<name>.parquet``, each with a
``text`` column, and a ``prompt`` column for sources whose documents have prompts (the tokenize
stage gives prompt tokens no loss). The held-out rows are a seeded permutation's first
``round(rows * validation_fraction)`` rows (at least one when the fraction is positive); the train
rows keep their original order. Reruns write the same bytes.
"""
from __future__ import annotations

import random
import shutil
import time
from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.layout import FAST_DIGEST, fast_file_digest
from stages.schema import ConfigError, configclass, param
from stages.specs import check_source_choice

GENERATORS = ("web", "code", "math", "technical", "chat", "long", "repo", "recall")
PROMPTED_GENERATORS = ("recall",)  # their documents are {"prompt", "text"}: loss on the text only


@configclass
class SourceSpec:
    """One mixture domain: either the embedded generator or a `datasets` builder with files."""
    generator: Literal["web", "code", "math", "technical", "chat", "long", "repo",
                       "recall"] | None = param(
        None, "embedded deterministic corpus for this domain")
    documents: int = param(1000, "generator: number of documents", gt=0)
    builder: str | None = param(None, "datasets builder or hub path (json, parquet, text, org/name)")
    data_files: tuple[str, ...] = param((), "builder: local files / globs / URLs")
    split: str = param("train", "builder: split to read")
    text_field: str = param("text", "column holding the document text")
    prompt_field: str | None = param(
        None, "column holding a prompt that comes before the text and carries no loss "
              "(completion-only loss: instruction data, retrieval drills); generators set it")

    def __post_init__(self) -> None:
        check_source_choice(self, "embedded corpus", "documents", "json, parquet, text")
        if self.generator is not None and self.prompt_field is not None:
            raise ConfigError("prompt_field: is for `builder` sources; a generator knows its "
                              "columns (drop prompt_field)")
        if self.prompt_field is not None and self.prompt_field == self.text_field:
            raise ConfigError(f"prompt_field: {self.prompt_field!r} is also the text_field; the "
                              "prompt and the text must be different columns")


@configclass
class PrepareDataConfig:
    sources: dict[str, SourceSpec] = param(doc="source name -> where its documents come from")
    seed: int = param(0, "seed of the embedded generators")
    validation_fraction: float = param(0.01, "share of each source held out for evaluation",
                                       ge=0.0, lt=0.5)

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: is empty; declare at least one source")


def check_local_files(spec: SourceSpec, where: str) -> None:
    """A local data file that is missing fails at validation, before anything runs."""
    import glob
    for pattern in spec.data_files:
        if "://" in pattern:
            continue  # remote: checked by `datasets` at run time
        if not glob.glob(pattern):
            raise ConfigError(f"{where}.data_files: {pattern!r} matches no file; fix the path "
                              "(relative paths are relative to the directory you run forge from)")


class PrepareData(StageKind):
    name = "prepare_data"
    Config = PrepareDataConfig
    parent_fields = ()

    @classmethod
    def check(cls, config: PrepareDataConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        for name, spec in config.sources.items():
            if spec.builder is not None:
                check_local_files(spec, f"stages.{stage}.sources.{name}")

    @classmethod
    def run(cls, config: PrepareDataConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return prepare_sources(config, out_dir, ctx)


def heldout_indices(rows: int, fraction: float, seed: int, name: str) -> list[int]:
    """Sorted indices of the held-out rows: seeded by (seed, source name), independent of content."""
    if fraction <= 0 or rows < 2:
        return []
    n = min(rows - 1, max(1, round(rows * fraction)))
    order = list(range(rows))
    random.Random(f"heldout/{seed}/{name}").shuffle(order)
    return sorted(order[:n])


def describe(spec: SourceSpec) -> str:
    """Where a source's documents come from, for lineage (e.g. ``generator:web``)."""
    if spec.generator is not None:
        return f"generator:{spec.generator}"
    files = ",".join(spec.data_files)
    return f"{spec.builder}:{files}[{spec.split}]" if files else f"{spec.builder}[{spec.split}]"


def load_source(name: str, spec: SourceSpec, seed: int, out_dir: Path, cache_dir: Path, stage: str):
    """The source as a pyarrow table: a non-empty string column ``text``, and ``prompt`` (a
    string column, possibly empty strings) for a source with prompts."""
    import datasets
    import pyarrow as pa
    import pyarrow.compute as pc

    if spec.generator is not None:
        from stages.data.corpus import write_jsonl
        raw = out_dir / "raw" / f"{name}.jsonl"
        write_jsonl(spec.generator, spec.documents, seed, raw)
        builder, data_files, split = "json", [str(raw)], "train"
        prompt_field = "prompt" if spec.generator in PROMPTED_GENERATORS else None
    else:
        builder, data_files, split = spec.builder, list(spec.data_files) or None, spec.split
        prompt_field = spec.prompt_field
    datasets.disable_progress_bars()  # worker logs are files: one line per source, not \r bars
    # A cache inside the stage dir keeps the stage hermetic (no shared ~/.cache state between runs).
    ds = datasets.load_dataset(builder, data_files=data_files, split=split, cache_dir=str(cache_dir))
    fields = {"text": ("text_field", spec.text_field)}
    if prompt_field is not None:
        fields["prompt"] = ("prompt_field", prompt_field)
    columns = {}
    for out, (field, column) in fields.items():
        if column not in ds.column_names:
            raise ConfigError(
                f"stages.{stage}.sources.{name}.{field}: source {name!r} has no column "
                f"{column!r}; columns found: {', '.join(ds.column_names)}. "
                f"Set {field} to the column that holds the document's {out}.")
        col = ds.data.table.column(column).combine_chunks()
        if not (pa.types.is_string(col.type) or pa.types.is_large_string(col.type)):
            raise ConfigError(f"stages.{stage}.sources.{name}.{field}: column {column!r} "
                              f"holds {col.type}, not text")
        columns[out] = col.cast(pa.string())
    del ds
    # Drop documents whose text is null or empty; a null prompt is an empty one.
    col = columns["text"]
    keep = pc.fill_null(pc.and_(pc.is_valid(col), pc.greater(pc.utf8_length(col), 0)), False)
    table = pa.table({out: pc.filter(c if out == "text" else pc.fill_null(c, ""), keep)
                      for out, c in columns.items()})
    if table.num_rows == 0:
        raise ConfigError(f"stages.{stage}.sources.{name}: no non-empty {spec.text_field!r} "
                          f"documents in {describe(spec)}")
    return table


def write_parquet(table, path: Path) -> None:
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fixed options so the same rows give the same bytes on rerun.
    pq.write_table(table, path, compression="zstd", row_group_size=4096, use_dictionary=False)


def prepare_sources(config: PrepareDataConfig, out_dir: Path, ctx: RunContext) -> Artifact:
    import pyarrow as pa

    out_dir = Path(out_dir)
    cache_dir = out_dir / ".hf_cache"
    outputs: dict[str, str] = {}
    metrics: dict[str, float] = {}
    datasets_: list[dict] = []
    try:
        for name, spec in config.sources.items():
            t0 = time.perf_counter()
            table = load_source(name, spec, config.seed, out_dir, cache_dir, ctx.stage)
            held = heldout_indices(table.num_rows, config.validation_fraction, config.seed, name)
            held_set = set(held)
            train_idx = [i for i in range(table.num_rows) if i not in held_set]
            parts = {"train": ("sources", table.take(pa.array(train_idx, pa.int64()))),
                     "heldout": ("heldout", table.take(pa.array(held, pa.int64())))}
            for split, (folder, part) in parts.items():
                rel = f"{folder}/{name}.parquet"
                write_parquet(part, out_dir / rel)
                outputs[f"{folder}/{name}"] = rel
                datasets_.append({"name": name, "split": split, "rows": part.num_rows,
                                  "path": str((out_dir / rel).resolve()),
                                  "digest": fast_file_digest(out_dir / rel),
                                  "digest_algo": FAST_DIGEST, "source": describe(spec)})
            metrics[f"documents/{name}"] = len(train_idx)
            print(f"[prepare_data] {name}: {len(train_idx)} train + {len(held)} held-out documents "
                  f"from {describe(spec)} ({time.perf_counter() - t0:.1f}s)", flush=True)
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    return Artifact(kind="prepare_data", stage=ctx.stage, key=ctx.key, outputs=outputs,
                    metrics=metrics, datasets=datasets_)
