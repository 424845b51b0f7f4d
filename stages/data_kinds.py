"""Data stage kinds: `prepare_data` -> `train_tokenizer` -> `tokenize`.

- prepare_data: loads every source through HF ``datasets`` (the embedded corpus is generated into
  local JSONL first and then read by the very same ``load_dataset`` call a hub or object-store
  dataset would use) and writes one Parquet file per source with its digest.
- train_tokenizer: trains a byte-level BPE on the prepared sources (a tiny stand-in for the
  recipe's 100,352-token vocabulary).
- tokenize: turns each source into a Megatron indexed dataset (``.bin``/``.idx``), EOD-terminated.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from stages.base import Artifact, RunContext, StageInput, StageKind
from stages.schema import ConfigError, param, setting

GENERATORS = ("web", "code", "math", "technical", "chat", "long", "repo", "recall")
PROMPTED_GENERATORS = ("recall",)  # their documents are {"prompt", "text"}: loss on the text only


@dataclasses.dataclass(frozen=True, kw_only=True)
class SourceSpec:
    """One mixture domain: either the embedded generator or a `datasets` builder with files."""
    generator: Literal["web", "code", "math", "technical", "chat", "long", "repo",
                       "recall"] | None = param(
        None, "embedded deterministic corpus for this domain")
    documents: int = param(1000, "generator: number of documents")
    builder: str | None = param(None, "datasets builder or hub path (json, parquet, text, org/name)")
    data_files: tuple[str, ...] = param((), "builder: local files / globs / URLs")
    split: str = param("train", "builder: split to read")
    text_field: str = param("text", "column holding the document text")
    prompt_field: str | None = param(
        None, "column holding a prompt that comes before the text and carries no loss "
              "(completion-only loss: instruction data, retrieval drills); generators set it")

    def __post_init__(self) -> None:
        if (self.generator is None) == (self.builder is None):
            raise ConfigError("give exactly one of `generator` (embedded corpus) or `builder` "
                              "(a datasets builder with data_files)")
        if self.generator is not None and self.documents <= 0:
            raise ConfigError(f"documents: must be > 0, got {self.documents}")
        if self.builder is not None and not self.builder.strip():
            raise ConfigError("builder: is empty; name a datasets builder (json, parquet, text) "
                              "or a hub dataset (org/name)")
        if self.generator is not None and self.data_files:
            raise ConfigError("data_files: are read by a `builder`; a generator makes its own "
                              "documents (drop data_files, or use builder: json/parquet)")
        if self.generator is not None and self.prompt_field is not None:
            raise ConfigError("prompt_field: is for `builder` sources; a generator knows its "
                              "columns (drop prompt_field)")
        if self.prompt_field is not None and self.prompt_field == self.text_field:
            raise ConfigError(f"prompt_field: {self.prompt_field!r} is also the text_field; the "
                              "prompt and the text must be different columns")


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrepareDataConfig:
    sources: dict[str, SourceSpec] = param(doc="source name -> where its documents come from")
    seed: int = param(0, "seed of the embedded generators")
    validation_fraction: float = param(0.01, "share of each source held out for evaluation")

    def __post_init__(self) -> None:
        if not self.sources:
            raise ConfigError("sources: is empty; declare at least one source")
        if not 0.0 <= self.validation_fraction < 0.5:
            raise ConfigError(f"validation_fraction: {self.validation_fraction} must be in [0, 0.5)")


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
    def check(cls, config: PrepareDataConfig, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        for name, spec in config.sources.items():
            if spec.builder is not None:
                check_local_files(spec, f"stages.{stage}.sources.{name}")

    @classmethod
    def run(cls, config: PrepareDataConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.data.prepare import prepare_sources
        return prepare_sources(config, out_dir, ctx)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainTokenizerConfig:
    data: str = param(doc="the prepare_data stage to train on")
    vocab_size: int = param(doc="BPE vocabulary size, special tokens included")
    max_documents: int = param(20000, "documents sampled per source for training")
    min_frequency: int = param(2, "BPE merge minimum frequency")

    def __post_init__(self) -> None:
        if self.vocab_size < 260:
            raise ConfigError(f"vocab_size: {self.vocab_size} is below the 256 bytes + specials of a "
                              "byte-level BPE; use at least 260")
        if self.max_documents < 1:
            raise ConfigError(f"max_documents: must be >= 1 (documents read per source to train "
                              f"the tokenizer), got {self.max_documents}")
        if self.min_frequency < 0:
            raise ConfigError(f"min_frequency: must be >= 0, got {self.min_frequency}")


class TrainTokenizer(StageKind):
    name = "train_tokenizer"
    Config = TrainTokenizerConfig
    parent_fields = ("data",)

    @classmethod
    def check(cls, config: TrainTokenizerConfig, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        if not isinstance(configs[config.data], PrepareDataConfig):
            raise ConfigError(f"stages.{stage}.data: {config.data!r} is not a prepare_data stage")

    @classmethod
    def run(cls, config: TrainTokenizerConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.data.tokenizer import train_tokenizer
        return train_tokenizer(config, inputs, out_dir, ctx)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenizeConfig:
    data: str = param(doc="the prepare_data stage whose sources are tokenized")
    tokenizer: str = param(doc="the train_tokenizer stage")
    workers: int = setting(1, "processes used for tokenization")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers: must be >= 1, got {self.workers}")


class Tokenize(StageKind):
    name = "tokenize"
    Config = TokenizeConfig
    parent_fields = ("data", "tokenizer")

    @classmethod
    def check(cls, config: TokenizeConfig, stage: str, configs: dict[str, Any], cluster: Any) -> None:
        if not isinstance(configs[config.data], PrepareDataConfig):
            raise ConfigError(f"stages.{stage}.data: {config.data!r} is not a prepare_data stage")
        if not isinstance(configs[config.tokenizer], TrainTokenizerConfig):
            raise ConfigError(f"stages.{stage}.tokenizer: {config.tokenizer!r} is not a "
                              "train_tokenizer stage")

    @classmethod
    def run(cls, config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        from stages.data.tokenize import tokenize_sources
        return tokenize_sources(config, inputs, out_dir, ctx)
