"""The `tokenize` stage: each prepared source becomes a Megatron indexed dataset (``.bin``/``.idx``).

One entry per document, its tokens followed by the EOD id, written with Megatron-core's
``IndexedDatasetBuilder`` (uint16 when the vocabulary fits, else int32) so ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` read it directly. Train sources go to ``tokens/<name>``, held-out
to ``heldout/<name>`` (output values are path prefixes, relative to the stage dir, without extension).

A source with prompts (a ``prompt`` column) also gets a loss mask beside its tokens,
``<prefix>.loss_mask.bin/.idx`` (``stages.layout.LOSS_MASK_SUFFIX``): the same documents,
one uint8 per token, 1 where the token is the text's (or its EOD) and 0 where it is the prompt's.
Prompt and text are encoded separately, so the text's first token starts at the boundary.

At scale (``stages/data/tokenize_shards.py``): every source's rows are cut into contiguous pieces,
tokenized in parallel and merged in row order with the builder's ``add_index``, which gives the
bytes one process writes, so ``workers`` and ``shards`` are settings, never identity.

- ``workers``: processes on the machine the stage runs on (0: one per core the launcher gives a
  single-process stage, ``cluster.threads_per_worker``: 1 on the CPU cluster). Pieces live in
  ``.tokenize-tmp/`` in the stage dir and are removed once merged.
- ``shards``: on a cluster, the stage fans out (``StageKind.parts``): part ``shard-i-of-N`` is a
  worker run of its own (a Slurm job or a Kubernetes Job under those launchers, each with its
  ``workers``) that tokenizes the i-th row range of every source into ``parts/<part>/pieces/``
  and lists them in its ``done.json``; the stage's own run merges them. A rerun after a kill redoes
  only the parts with no ``done.json``. ``parts(config)`` sees the config, not the cluster, so the
  fan-out is this setting rather than the launcher's choice; it changes no byte of the output.

A source of more than ``stages.layout.MAX_DOCUMENTS_PER_PREFIX`` documents (2**27) becomes several
prefixes, ``tokens/<name>.00000``, ``.00001``, ... (consecutive row ranges; ``output_prefixes``
finds them), which the training mixture blends in proportion to their tokens: Megatron's builder
keeps ~87 bytes per document in memory while it writes or merges one prefix. A held-out set that
large is refused (it is a fraction of the source: lower it).

Digests: xxh3-128 (``stages.layout.FAST_DIGEST``) of each ``.bin``, computed while the bytes are
written or merged, recorded with ``digest_algo`` in the artifact's dataset entries.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.data.tokenizer import EOD, PAD, source_outputs
from stages.layout import FAST_DIGEST, PART_DONE, part_dir, part_record, split_prefix_names
from stages.schema import configclass, param, setting

TMP_DIR = ".tokenize-tmp"   # this run's pieces and merges; cleared when a run starts and ends


def write_documents(prefix: Path, documents: Iterable[tuple[Any, Any]], dtype,
                    masked: bool) -> tuple[int, int]:
    """Write ``(ids, loss_mask)`` pairs (EOD included in ``ids``) as ``<prefix>.bin/.idx`` and, when
    ``masked``, the loss mask companion (``loss_mask_prefix``: one uint8 per token, 1 where the
    token's prediction counts); return (documents, tokens). Shared by tokenize and sft."""
    from stages.data.indexed_files import write_hashed
    written = write_hashed(Path(prefix), documents, dtype, masked)
    return written.docs, written.tokens


def shard_names(n: int) -> list[str]:
    return [f"shard-{i}-of-{n}" for i in range(n)]


def workers_for(config: "TokenizeConfig", ctx: RunContext) -> int:
    """``workers``, or with 0 the cores the launcher gives a single-process stage."""
    return config.workers or getattr(ctx.cluster, "threads_per_worker", 1)


def _setup(config: "TokenizeConfig", inputs: dict[str, StageInput]) -> tuple[Any, dict, list]:
    """The tokenizer's facts (path, vocabulary, ids, dtype) and the outputs to make, in order."""
    with warnings.catch_warnings():  # import-time noise: TE/Apex absent on CPU, deprecations
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from megatron.core.datasets.indexed_dataset import DType
    import pyarrow.parquet as pq
    from stages.data.tokenize_shards import Output, load_tokenizer

    data, tok_stage = inputs[config.data], inputs[config.tokenizer]
    tok_path = tok_stage.path("tokenizer").resolve()
    tok = load_tokenizer(tok_path)
    vocab_size, eod_id, pad_id = tok.get_vocab_size(), tok.token_to_id(EOD), tok.token_to_id(PAD)
    if eod_id is None:
        raise ValueError(f"tokenizer {tok_path} has no {EOD!r} token")
    facts = {"vocab_size": vocab_size, "eod_id": eod_id, "pad_id": pad_id,
             "tokenizer": str(tok_path), "dtype": DType.optimal_dtype(vocab_size)}
    outputs = []   # (split, source name, Output)
    for src in source_outputs(data):
        name = src.removeprefix("sources/")
        for split, folder, parent_out in (("train", "tokens", src),
                                          ("heldout", "heldout", f"heldout/{name}")):
            if parent_out not in data.artifact.outputs:
                continue  # a prepare_data stage from elsewhere may have no held-out split
            parquet = data.path(parent_out)
            rows = pq.ParquetFile(parquet).metadata.num_rows
            if rows == 0:
                print(f"[tokenize] {parent_out}: no documents, skipped", flush=True)
                continue  # Megatron cannot open an empty .bin (mmap of an empty file)
            prefixes = split_prefix_names(f"{folder}/{name}", rows)
            if split == "heldout" and len(prefixes) > 1:
                raise ValueError(
                    f"{parent_out}: {rows} held-out documents, more than one prefix holds "
                    f"({prefixes[0][2]}); lower the prepare stage's validation_fraction")
            outputs += [(split, name, Output(prefix, str(parquet), n, first))
                        for prefix, first, n in prefixes]
    return tok_path, facts, outputs


def tokenize_sources(config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
                     ctx: RunContext) -> Artifact:
    """The stage's run: tokenize every source here with ``workers`` processes, or (``shards`` > 1)
    merge what the parts tokenized."""
    from stages.data import tokenize_shards as ts

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok_path, facts, outputs = _setup(config, inputs)
    shutil.copyfile(tok_path, out_dir / "tokenizer.json")  # the data's tokenizer travels with it
    outs = [o for _, _, o in outputs]
    tmp = out_dir / TMP_DIR
    ts.clear(tmp)   # a killed run's pieces: nothing in there is trusted
    try:
        if config.shards == 1:
            workers = workers_for(config, ctx)
            pieces = ts.plan_pieces(outs, tmp, pieces=workers)
            written = ts.tokenize_outputs(outs, out_dir, tmp, pieces, tok_path, facts["eod_id"],
                                          facts["dtype"], workers,
                                          log=lambda m: print(m, flush=True))
        else:
            written = gather_parts(config, outs, out_dir, tmp, facts["dtype"])
    finally:
        ts.clear(tmp)   # pieces are never reused by a later run of the stage's own run
    outputs_ = {"tokenizer": "tokenizer.json"}
    metrics: dict[str, float] = {}
    datasets_: list[dict] = []
    for split, name, o in outputs:
        w = written[o.name]
        outputs_[o.name] = o.name
        datasets_.append({"name": name, "split": split, "rows": w.docs, "tokens": w.tokens,
                          "path": str((out_dir / f"{o.name}.bin").resolve()), "digest": w.digest,
                          "digest_algo": FAST_DIGEST})
        if split == "train":   # a source split into several prefixes: their sum
            metrics[f"tokens/{name}"] = metrics.get(f"tokens/{name}", 0) + w.tokens
        print(f"[tokenize] {o.name}: {w.docs} documents, {w.tokens} tokens", flush=True)
    print(f"[tokenize] {len(outputs)} outputs, {sum(w.tokens for w in written.values())} tokens "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return Artifact(kind="tokenize", stage=ctx.stage, key=ctx.key, outputs=outputs_, metrics=metrics,
                    datasets=datasets_,
                    extra={**facts, "dtype": facts["dtype"].__name__,
                           # how it ran (not what it made): CPU seconds of the tokenizing processes
                           "tokenize_cpu_s": round(sum(w.cpu_s for w in written.values()), 3)})


def tokenize_part(config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
                  ctx: RunContext, part: str) -> dict:
    """Part ``shard-i-of-N``: the i-th row range of every output, in ``workers`` pieces under
    ``parts/<part>/pieces/``; its record lists them (``tokenize_shards.piece_record``)."""
    from stages.data import tokenize_shards as ts

    out_dir = Path(out_dir)
    index = shard_names(config.shards).index(part)
    folder = part_dir(out_dir, part)
    ts.clear(folder / ts.PIECES)   # a killed attempt's pieces
    tok_path, facts, outputs = _setup(config, inputs)
    workers = workers_for(config, ctx)
    pieces = ts.plan_pieces([o for _, _, o in outputs], folder, index, config.shards, workers)
    logged = ts.progress(pieces, lambda m: print(m, flush=True))
    written = ts.run_pieces(pieces, tok_path, facts["eod_id"], facts["dtype"], workers, logged)
    return {"part": part, "pieces": [ts.piece_record(p, w, out_dir) for p, w in zip(pieces, written)]}


def gather_parts(config: TokenizeConfig, outputs: list, out_dir: Path, tmp: Path,
                 dtype: Any) -> dict:
    """Merge the parts' pieces into place, then drop each part's record and its pieces. A part
    whose pieces are gone (a gather cut short after it moved them) loses its record, so the
    stage's next run tokenizes that part again."""
    from stages.data import tokenize_shards as ts

    names = shard_names(config.shards)
    records = {p: part_record(out_dir, p) for p in names}
    if missing := [p for p, r in records.items() if r is None]:
        raise RuntimeError(f"tokenize: parts {missing} have no {PART_DONE}; run the stage's "
                           "parts first (forge run does)")
    gone = [p for p, r in records.items()
            if any(not (out_dir / f"{piece['prefix']}.bin").exists() for piece in r["pieces"])]
    for p in gone:
        (part_dir(out_dir, p) / PART_DONE).unlink(missing_ok=True)
    if gone:
        raise RuntimeError(f"tokenize: the pieces of parts {gone} are gone (an earlier gather "
                           "moved them before it was cut short); their records are removed, so "
                           "the stage's next run tokenizes those parts again")
    written = ts.gather(outputs, list(records.values()), out_dir, tmp, dtype)
    for p in names:
        (part_dir(out_dir, p) / PART_DONE).unlink(missing_ok=True)
        ts.clear(part_dir(out_dir, p) / ts.PIECES)
    return written


@configclass
class TokenizeConfig:
    data: str = param(doc="the prepare_data stage whose sources are tokenized")
    tokenizer: str = param(doc="the train_tokenizer stage")
    workers: int = setting(0, "processes that tokenize on the stage's machine (each of its parts' "
                              "machines with shards); 0: one per core the launcher gives the "
                              "stage (cluster.threads_per_worker, 1 on the CPU cluster)", ge=0)
    shards: int = setting(1, "parts the stage fans out into, a worker run each (a job each on a "
                             "Slurm or Kubernetes cluster); 1: one run", ge=1)


class Tokenize(StageKind):
    name = "tokenize"
    Config = TokenizeConfig
    parent_fields = ("data", "tokenizer")
    parts_together = True   # row ranges of the sources: independent until the gather

    @classmethod
    def check(cls, config: TokenizeConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require(config.data, f"stages.{stage}.data", "prepare_data")
        graph.require(config.tokenizer, f"stages.{stage}.tokenizer", "train_tokenizer")

    @classmethod
    def tokenizer(cls, config: TokenizeConfig, graph: StageGraph) -> str | None:
        return config.tokenizer

    @classmethod
    def parts(cls, config: TokenizeConfig) -> tuple[str, ...]:
        return () if config.shards == 1 else tuple(shard_names(config.shards))

    @classmethod
    def run_part(cls, config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
                 ctx: RunContext, part: str) -> dict:
        return tokenize_part(config, inputs, out_dir, ctx, part)

    @classmethod
    def run(cls, config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return tokenize_sources(config, inputs, out_dir, ctx)
