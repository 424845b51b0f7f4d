"""The `train_tokenizer` stage: a byte-level BPE trained on the prepared sources.

A small stand-in for the recipe's 100,352-token vocabulary, built with HF ``tokenizers``:
digits are split one by one (so arithmetic is learnable at tiny scale), then GPT-2 style byte-level
pre-tokenization; ``<|endoftext|>`` (EOD, id 0) and ``<|pad|>`` (id 1) are special tokens, and with
``chat_roles`` (the default) so are the three role tokens of the chat format
(``stages/data/chat_format.py``: ids 2-4), which SFT and every export's chat template need.
Training reads the first ``max_documents`` documents of every ``sources/<name>`` output of the
``data`` parent, sources in name order, and runs on one thread so the same input gives the same
``tokenizer.json`` bytes.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Iterator

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind
from stages.data.chat_format import ROLE_TOKENS
from stages.layout import FAST_DIGEST, fast_file_digest
from stages.schema import ConfigError, configclass, param

EOD = "<|endoftext|>"
PAD = "<|pad|>"
SPECIAL_TOKENS = (EOD, PAD)


def source_outputs(data: StageInput, prefix: str = "sources/") -> list[str]:
    """The parent's output names that start with ``prefix``, sorted (e.g. ``sources/web``)."""
    return sorted(k for k in data.artifact.outputs if k.startswith(prefix))


def recorded_digest(data: StageInput, output: str) -> str:
    """The xxh3-128 of a parent's output file: the one its artifact recorded, else computed."""
    path = str(data.path(output).resolve())
    for d in data.artifact.datasets:
        if d.get("path") == path and d.get("digest_algo") == FAST_DIGEST:
            return d["digest"]
    return fast_file_digest(data.path(output))


def read_columns(path: Path, columns: list[str], limit: int | None = None,
                 batch_size: int = 1024) -> Iterator[list[list[str]]]:
    """Batches of ``columns`` (one list per column) of a Parquet file, at most ``limit`` rows."""
    import pyarrow.parquet as pq
    left = limit
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size, columns=columns):
        cols = [batch.column(i).to_pylist() for i in range(len(columns))]
        if left is not None:
            cols, left = [c[:left] for c in cols], left - len(cols[0][:left])
        if cols[0]:
            yield cols
        if left is not None and left <= 0:
            return


def document_columns(path: Path) -> list[str]:
    """The columns of a prepared Parquet file that make a document: ["prompt", "text"] when it has
    prompts (completion-only loss), else ["text"]."""
    import pyarrow.parquet as pq
    return ["prompt", "text"] if "prompt" in pq.ParquetFile(path).schema_arrow.names else ["text"]


def read_texts(path: Path, limit: int | None = None, batch_size: int = 1024) -> Iterator[list[str]]:
    """Batches of what the model reads of each document (the prompt, if any, then the text)."""
    for cols in read_columns(path, document_columns(path), limit, batch_size):
        yield ["".join(parts) for parts in zip(*cols)]


def build_tokenizer():
    """An untrained byte-level BPE with individually split digits."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(config: TrainTokenizerConfig, inputs: dict[str, StageInput], out_dir: Path,
                    ctx: RunContext) -> Artifact:
    # Rayon reads this when its pool starts. Two threads gave identical files here; one thread is
    # cheap insurance that merge ties (and so ids) cannot depend on scheduling on bigger machines.
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    from tokenizers import pre_tokenizers, trainers

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = inputs[config.data]
    names = source_outputs(data)
    if not names:
        raise ValueError(f"stage {data.name!r} has no sources/<name> outputs to train a tokenizer on")
    counts: dict[str, int] = {}

    def corpus() -> Iterator[list[str]]:
        for out in names:
            for texts in read_texts(data.path(out), config.max_documents):
                counts[out] = counts.get(out, 0) + len(texts)
                yield texts

    tok = build_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=config.vocab_size, min_frequency=config.min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *(ROLE_TOKENS if config.chat_roles else ())],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    tok.train_from_iterator(corpus(), trainer=trainer)
    path = out_dir / "tokenizer.json"
    tok.save(str(path), pretty=True)
    extra = {"vocab_size": tok.get_vocab_size(), "eod_id": tok.token_to_id(EOD),
             "pad_id": tok.token_to_id(PAD)}
    print(f"[train_tokenizer] vocab {extra['vocab_size']} (asked {config.vocab_size}) from "
          f"{sum(counts.values())} documents of {len(names)} sources "
          f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return Artifact(kind="train_tokenizer", stage=ctx.stage, key=ctx.key,
                    outputs={"tokenizer": "tokenizer.json"},
                    metrics={"vocab_size": extra["vocab_size"]},
                    datasets=[{"name": out.removeprefix("sources/"), "rows": n, "split": "train",
                               "path": str(data.path(out).resolve()),
                               "digest": recorded_digest(data, out), "digest_algo": FAST_DIGEST}
                              for out, n in counts.items()],
                    extra=extra)


@configclass
class TrainTokenizerConfig:
    data: str = param(doc="the prepare_data stage to train on")
    vocab_size: int = param(doc="BPE vocabulary size, special tokens included")
    max_documents: int = param(20000, "documents read per source to train the tokenizer", ge=1)
    min_frequency: int = param(2, "BPE merge minimum frequency", ge=0)
    chat_roles: bool = param(True, "add the chat role tokens (<|start_of_role|>, <|end_of_role|>, "
                                   "<|end_of_text|>) as special tokens: SFT and chat exports need them")

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"vocab_size: {self.vocab_size} is below the 256 bytes + specials of a "
                              "byte-level BPE; use at least 260")


class TrainTokenizer(StageKind):
    name = "train_tokenizer"
    Config = TrainTokenizerConfig
    parent_fields = ("data",)

    @classmethod
    def check(cls, config: TrainTokenizerConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require(config.data, f"stages.{stage}.data", "prepare_data")

    @classmethod
    def run(cls, config: TrainTokenizerConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return train_tokenizer(config, inputs, out_dir, ctx)
