"""The `tokenize` stage: each prepared source becomes a Megatron indexed dataset (``.bin``/``.idx``).

One entry per document, its tokens followed by the EOD id, written with Megatron-core's
``IndexedDatasetBuilder`` (uint16 when the vocabulary fits, else int32) so ``GPTDataset`` and
``BlendedMegatronDatasetBuilder`` read it directly. Train sources go to ``tokens/<name>``, held-out
to ``heldout/<name>`` (output values are path prefixes, relative to the stage dir, without extension).

A source with prompts (a ``prompt`` column) also gets a loss mask beside its tokens,
``<prefix>.loss_mask.bin/.idx`` (``stages.layout.LOSS_MASK_SUFFIX``): the same documents,
one uint8 per token, 1 where the token is the text's (or its EOD) and 0 where it is the prompt's.
Prompt and text are encoded separately, so the text's first token starts at the boundary.
"""
from __future__ import annotations

import shutil
import time
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from stages.base import Artifact, RunContext, StageGraph, StageInput, StageKind, file_digest
from stages.data.tokenizer import EOD, PAD, document_columns, read_columns, source_outputs
from stages.layout import loss_mask_prefix
from stages.schema import configclass, param, setting


def write_documents(prefix: Path, documents: Iterable[tuple[Any, Any]], dtype,
                    masked: bool) -> tuple[int, int]:
    """Write ``(ids, loss_mask)`` pairs (EOD included in ``ids``) as ``<prefix>.bin/.idx`` and, when
    ``masked``, the loss mask companion (``loss_mask_prefix``: one uint8 per token, 1 where the
    token's prediction counts); return (documents, tokens). Shared by tokenize and sft."""
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path, get_idx_path

    prefix.parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    masks = IndexedDatasetBuilder(get_bin_path(loss_mask_prefix(prefix)), dtype=np.uint8) \
        if masked else None
    docs = tokens = 0
    for ids, mask in documents:
        ids = np.asarray(ids, dtype=dtype)
        builder.add_document(ids, [ids.size])
        if masks is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.size != ids.size:
                raise ValueError(f"{prefix}: document {docs} has {ids.size} tokens but a loss mask "
                                 f"of {mask.size}")
            masks.add_document(mask, [mask.size])
        docs, tokens = docs + 1, tokens + ids.size
    builder.finalize(get_idx_path(str(prefix)))
    if masks is not None:
        masks.finalize(get_idx_path(loss_mask_prefix(prefix)))
    return docs, tokens


def write_indexed(tok, parquet: Path, prefix: Path, eod_id: int, dtype) -> tuple[int, int]:
    """Tokenize a Parquet file into ``<prefix>.bin/.idx`` (and its loss mask when it has prompts);
    return (documents, tokens)."""
    import numpy as np

    columns = document_columns(parquet)
    prompted = columns[0] == "prompt"

    def documents() -> Iterator[tuple[Any, Any]]:
        for batch in read_columns(parquet, columns):
            encoded = [tok.encode_batch_fast(col, add_special_tokens=False) for col in batch]
            for parts in zip(*encoded):
                ids = np.fromiter((*(i for enc in parts for i in enc.ids), eod_id), dtype=dtype)
                mask = None
                if prompted:
                    mask = np.ones(ids.size, dtype=np.uint8)
                    mask[:len(parts[0].ids)] = 0  # the prompt's tokens
                yield ids, mask

    return write_documents(prefix, documents(), dtype, masked=prompted)


def tokenize_sources(config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
                     ctx: RunContext) -> Artifact:
    with warnings.catch_warnings():  # import-time noise: TE/Apex absent on CPU, deprecations
        warnings.filterwarnings("ignore", message="Transformer Engine and Apex")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        from megatron.core.datasets.indexed_dataset import DType
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer

    out_dir = Path(out_dir)
    data, tok_stage = inputs[config.data], inputs[config.tokenizer]
    tok_path = tok_stage.path("tokenizer").resolve()
    tok = Tokenizer.from_file(str(tok_path))
    vocab_size, eod_id, pad_id = tok.get_vocab_size(), tok.token_to_id(EOD), tok.token_to_id(PAD)
    if eod_id is None:
        raise ValueError(f"tokenizer {tok_path} has no {EOD!r} token")
    dtype = DType.optimal_dtype(vocab_size)
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tok_path, out_dir / "tokenizer.json")  # the data's tokenizer travels with it
    outputs: dict[str, str] = {"tokenizer": "tokenizer.json"}
    metrics: dict[str, float] = {}
    datasets_: list[dict] = []
    for src in source_outputs(data):
        name = src.removeprefix("sources/")
        splits = (("train", "tokens", src), ("heldout", "heldout", f"heldout/{name}"))
        for split, folder, parent_out in splits:
            if parent_out not in data.artifact.outputs:
                continue  # a prepare_data stage from elsewhere may have no held-out split
            if pq.ParquetFile(data.path(parent_out)).metadata.num_rows == 0:
                print(f"[tokenize] {parent_out}: no documents, skipped", flush=True)
                continue  # Megatron cannot open an empty .bin (mmap of an empty file)
            t0 = time.perf_counter()
            rel = f"{folder}/{name}"
            docs, tokens = write_indexed(tok, data.path(parent_out), out_dir / rel, eod_id, dtype)
            outputs[rel] = rel
            bin_path = out_dir / f"{rel}.bin"
            datasets_.append({"name": name, "split": split, "rows": docs, "tokens": tokens,
                              "path": str(bin_path.resolve()), "digest": file_digest(bin_path)})
            if split == "train":
                metrics[f"tokens/{name}"] = tokens
            print(f"[tokenize] {rel}: {docs} documents, {tokens} tokens "
                  f"({time.perf_counter() - t0:.1f}s)", flush=True)
    return Artifact(kind="tokenize", stage=ctx.stage, key=ctx.key, outputs=outputs, metrics=metrics,
                    datasets=datasets_,
                    extra={"vocab_size": vocab_size, "eod_id": eod_id, "pad_id": pad_id,
                           "tokenizer": str(tok_path), "dtype": dtype.__name__})


@configclass
class TokenizeConfig:
    data: str = param(doc="the prepare_data stage whose sources are tokenized")
    tokenizer: str = param(doc="the train_tokenizer stage")
    workers: int = setting(1, "processes used for tokenization", ge=1)


class Tokenize(StageKind):
    name = "tokenize"
    Config = TokenizeConfig
    parent_fields = ("data", "tokenizer")

    @classmethod
    def check(cls, config: TokenizeConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        graph.require(config.data, f"stages.{stage}.data", "prepare_data")
        graph.require(config.tokenizer, f"stages.{stage}.tokenizer", "train_tokenizer")

    @classmethod
    def tokenizer(cls, config: TokenizeConfig, graph: StageGraph) -> str | None:
        return config.tokenizer

    @classmethod
    def run(cls, config: TokenizeConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return tokenize_sources(config, inputs, out_dir, ctx)
