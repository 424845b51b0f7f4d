"""`sft` stage kind: supervised fine-tuning on curated chat data, on Megatron-core (issue 11).

A run (``Sft.run``):

1. **Tokenize** the curate stage's ``kept.parquet`` (training) and ``heldout.parquet`` with the
   parent model's tokenizer (``inputs[from].path("tokenizer")``) through
   ``chat_format.conversation_ids``: each conversation is its ids + EOD; its loss mask is the
   assistant mask (every assistant turn's content and closing ``<|end_of_text|>``) + 0 for the
   EOD. They become Megatron indexed datasets ``sft_data/tokens/chat`` and
   ``sft_data/heldout/chat`` with their loss-mask companions (``tokenize.write_documents``, the
   writer the tokenize stage uses), plus ``sft_data/summary.json`` (counts). Each rank writes to
   its own temp dir and renames it into place; the first rename wins (the output is
   deterministic), and a resumed run reuses the complete ``sft_data`` it finds.
2. **Train** one phase with ``loop.train_phase``: ``steps = epochs * train_tokens // (gbs *
   seq_length)`` (at least 1); the conversations are packed into ``seq_length`` sequences
   (Megatron's ``GPTDataset``, shuffled by ``seed``, over as many epochs as the steps need), and
   the loss is the token mean over assistant tokens only (the loss-mask companion, applied by
   ``mixture.MaskedGPTDataset``). With ``document_mask`` (default) each packed sequence gets a
   block-diagonal causal mask: no token attends across a conversation boundary (CPU backend; on
   GPUs this needs THD packing, not built yet, so validation refuses it there, as for
   ``extend_context``). Weights come from the parent; AdamW moments start fresh
   (``carries_optimizer = False``: a merged parent has none). The phase sees a run config that
   is a ``PretrainConfig`` (``SftRunConfig``: the parent's model spec, mixture ``{chat: 1}``) and
   a stand-in tokenize input for ``sft_data``, so checkpoints, bit-exact resume, SIGTERM handling
   and metrics are the pretraining loop's own.
3. **Report**: the artifact's kind is ``sft``; ``metrics.heldout_assistant_loss`` is the
   token-mean loss over the held-out conversations' assistant tokens (packed like the training
   data, at most ``step.HELDOUT_SAMPLES`` sequences); ``extra`` carries the parent, epochs,
   conversation and token counts.

The model an SFT stage makes is its parent's shape, context and tokenizer (``model_source``).
Checks before compute: ``from`` is a model stage, ``data`` a curate stage measured with the same
tokenizer stage as the parent's, whose ``chat_roles`` is on; ``seq_length`` within the parent's
context; batch, layout and precision as for pretraining.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, ClassVar

from stages.base import Artifact, RunContext, StageGraph, StageInput
from stages.cluster import check_stage_parallel, check_training_layout
from stages.schema import ConfigError, configclass, param, setting
from stages.specs import PrecisionSpec, ScheduleSpec
from stages.training.pretrain import PretrainConfig
from stages.training.kind import TrainingKind
from stages.training.precision import check_precision

DATA_DIR = "sft_data"      # the tokenized conversations, inside the stage's output dir
SOURCE = "chat"            # their one "source": tokens/chat, heldout/chat
SUMMARY = "summary.json"   # counts; its presence in DATA_DIR marks the data complete


@configclass
class SftConfig:
    from_: str = param(doc="model stage to fine-tune (its weights; AdamW moments start fresh)")
    data: str = param(doc="the `curate` stage whose kept set is the training data")
    epochs: int = param(1, "passes over the curated data", ge=1)
    seq_length: int = param(doc="tokens per packed sequence (<= the parent's context)", ge=1)
    global_batch_size: int = param(doc="sequences per optimizer step (all data-parallel ranks)",
                                   ge=1)
    schedule: ScheduleSpec = param(doc="LR schedule")
    precision: PrecisionSpec = param(factory=PrecisionSpec, doc="dtype / FP8 recipe")
    weight_decay: float = param(0.1, "AdamW weight decay (0 turns it off)", ge=0)
    adam_beta1: float = param(0.9, "AdamW beta1", ge=0.0, lt=1.0)
    adam_beta2: float = param(0.95, "AdamW beta2", ge=0.0, lt=1.0)
    adam_eps: float = param(1e-8, "AdamW epsilon", gt=0)
    grad_clip: float = param(1.0, "gradient-norm clip (0 turns it off)", ge=0)
    seed: int = param(1234, "data-order seed")
    document_mask: bool = param(True, "attend within each packed conversation only (CPU backend)")
    micro_batch_size: int = setting(0, "sequences per forward pass per rank (0 = the whole local "
                                       "batch)", ge=0)
    parallel: dict[str, int | bool | str] = setting(
        factory=dict, doc="this stage's own layout over the cluster's (as for pretrain)")
    checkpoint_interval: int = setting(50, "save every N steps (and always at the end)", ge=0)
    keep_checkpoints: int = setting(2, "newest checkpoints kept while training", ge=1)
    log_interval: int = setting(10, "print progress every N steps", ge=1)

    def __post_init__(self) -> None:
        check_stage_parallel(self.parallel)


@configclass
class SftRunConfig(PretrainConfig):
    """What ``loop.train_phase`` trains: a phase over the tokenized conversations (built in run)."""
    from_: str = param(doc="the model stage fine-tuned")
    document_mask: bool = param(True, "attend within each packed conversation only")

    carries_optimizer: ClassVar[bool] = False  # weights only: fresh AdamW moments


class Sft(TrainingKind):
    name = "sft"
    Config = SftConfig
    parent_fields = ("from_", "data")
    built = True

    @classmethod
    def check(cls, config: SftConfig, stage: str, graph: StageGraph, cluster: Any) -> None:
        where = f"stages.{stage}"
        graph.require_model(config.from_, f"{where}.from")
        curate = graph.require(config.data, f"{where}.data", "curate")
        tokenizer = graph.tokenizer_of(config.from_)
        measured = getattr(curate, "tokenizer", None)  # the curate config's train_tokenizer stage
        if measured is not None and tokenizer is not None and measured != tokenizer:
            raise ConfigError(f"{where}.data: curate stage {config.data!r} measures with tokenizer "
                              f"stage {measured!r}, but {config.from_!r} was trained with "
                              f"{tokenizer!r}; curate with the model's tokenizer (stages."
                              f"{config.data}.tokenizer={tokenizer})")
        if tokenizer is not None and not getattr(graph[tokenizer], "chat_roles", False):
            raise ConfigError(f"{where}.from: the tokenizer of {config.from_!r} (stage "
                              f"{tokenizer!r}) has no chat role tokens; set "
                              f"stages.{tokenizer}.chat_roles=true to fine-tune on chats")
        model, context = graph.model_of(config.from_), graph.context_length_of(config.from_)
        if config.seq_length > min(context, model.max_position_embeddings):
            raise ConfigError(f"{where}.seq_length: {config.seq_length} is longer than the context "
                              f"of parent {config.from_!r} ({context} tokens, max positions "
                              f"{model.max_position_embeddings}); use at most "
                              f"{min(context, model.max_position_embeddings)}")
        if config.document_mask and cluster.device == "cuda":
            # the GPU path would silently attend across conversations under a key that says not
            raise ConfigError(f"{where}.document_mask: document masking is built for the CPU "
                              "backend only; on GPUs (cluster.device=cuda) it needs THD packing, "
                              "which is not built yet, and packed conversations would attend "
                              f"across their boundaries; set {where}.document_mask=false on GPUs")
        check_training_layout(cls.layout(config, cluster), model, config.seq_length,
                              config.global_batch_size, config.micro_batch_size, where,
                              f"{where}.from ({config.from_!r})")
        check_precision(config.precision, cluster, f"{where}.precision")

    @classmethod
    def tokens(cls, config: SftConfig) -> int:
        """0: the tokens an SFT stage trains on are known only once its curate stage has run."""
        return 0

    @classmethod
    def compute_plan(cls, stage: str, config: SftConfig, cluster: Any) -> Any:
        """None: the token count (and so the cost) is unknown before curation, and the model
        shape is the parent's, which this hook cannot see."""
        return None

    @classmethod
    def model_source(cls, config: SftConfig, graph: StageGraph) -> str | None:
        return config.from_

    @classmethod
    def datasets_read(cls, config: SftConfig, artifact: Artifact,
                      upstream: dict[str, Artifact]) -> list[dict]:
        """The curate stage's kept set (the training data)."""
        data = upstream.get(config.data)
        return [] if data is None else [dict(d, stage=config.data) for d in data.datasets
                                        if d.get("name") == "kept"]

    @classmethod
    def run(cls, config: SftConfig, inputs: dict[str, StageInput], out_dir: Path,
            ctx: RunContext) -> Artifact:
        return fine_tune(config, inputs, Path(out_dir), ctx)


# ------------------------------------------------------------------ the run
def read_conversations(parquet: Path):
    """Each row's messages (a JSON list of {role, content}), checked; batches of lists."""
    import pyarrow.parquet as pq
    from stages.data.chat_format import ROLES
    row = 0
    for batch in pq.ParquetFile(parquet).iter_batches(batch_size=1024, columns=["messages"]):
        out = []
        for text in batch.column(0).to_pylist():
            try:  # formats.md: a JSON string; a list column is taken as it is
                messages = text if isinstance(text, list) else json.loads(text)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{parquet}: row {row}: messages is not JSON ({e}); rerun the "
                                 "curate stage") from e
            if not isinstance(messages, list) or not all(
                    isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str)
                    for m in messages):
                raise ValueError(f"{parquet}: row {row}: messages must be a list of {{role, content}}"
                                 f" with role in {ROLES}; rerun the curate stage")
            out.append(messages)
            row += 1
        yield out


def tokenize_chats(tok, parquet: Path, prefix: Path, eod_id: int, dtype) -> dict[str, int]:
    """``parquet``'s conversations -> ``<prefix>.bin/.idx`` + loss mask (see the module docstring);
    returns {"conversations", "tokens", "assistant_tokens"}."""
    from stages.data.chat_format import conversation_ids
    from stages.data.tokenize import write_documents
    assistant = 0

    def documents():
        nonlocal assistant
        for batch in read_conversations(parquet):
            for messages in batch:
                ids, mask = conversation_ids(tok, messages)
                assistant += sum(mask)
                yield [*ids, eod_id], [*mask, 0]  # the EOD ends the conversation: no loss on it

    docs, tokens = write_documents(prefix, documents(), dtype, masked=True)
    return {"conversations": docs, "tokens": tokens, "assistant_tokens": assistant}


def prepare_chat_data(config: SftConfig, inputs: dict[str, StageInput], out_dir: Path,
                      stage: str) -> dict:
    """``out_dir/sft_data`` (tokens, held-out, tokenizer, summary), made once; its summary."""
    from megatron.core.datasets.indexed_dataset import DType
    import pyarrow.parquet as pq
    from tokenizers import Tokenizer
    from stages.data.tokenizer import EOD

    final = out_dir / DATA_DIR
    if (final / SUMMARY).is_file():
        return json.loads((final / SUMMARY).read_text())
    curate, model = inputs[config.data], inputs[config.from_]
    tok_path = model.path("tokenizer")
    tok = Tokenizer.from_file(str(tok_path))
    eod_id, vocab = tok.token_to_id(EOD), tok.get_vocab_size()
    if eod_id is None:
        raise ValueError(f"the tokenizer of {config.from_} ({tok_path}) has no {EOD!r} token")
    dtype = DType.optimal_dtype(vocab)
    tmp = out_dir / f".tmp-{DATA_DIR}-rank{os.environ.get('RANK', '0')}"
    shutil.rmtree(tmp, ignore_errors=True)  # a killed attempt's leftovers (one attempt at a time)
    tmp.mkdir(parents=True)
    shutil.copyfile(tok_path, tmp / "tokenizer.json")
    summary: dict[str, Any] = {"eod_id": eod_id, "vocab_size": vocab}
    kept = curate.path("kept")
    summary["train"] = tokenize_chats(tok, kept, tmp / "tokens" / SOURCE, eod_id, dtype)
    if summary["train"]["tokens"] <= config.seq_length:
        raise ValueError(f"[{stage}] the kept set of {config.data} ({kept}) has "
                         f"{summary['train']['tokens']} tokens, not one sequence of "
                         f"{config.seq_length + 1}; curate more data or lower seq_length")
    if "heldout" in curate.artifact.outputs and \
            pq.ParquetFile(curate.path("heldout")).metadata.num_rows > 0:  # Megatron cannot open an empty .bin
        summary["heldout"] = tokenize_chats(tok, curate.path("heldout"),
                                            tmp / "heldout" / SOURCE, eod_id, dtype)
    (tmp / SUMMARY).write_text(json.dumps(summary, indent=1, sort_keys=True))
    try:
        tmp.rename(final)
    except OSError:  # another rank renamed its (identical) copy first
        if not (final / SUMMARY).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return summary
    train = summary["train"]
    print(f"[{stage}] tokenized {train['conversations']} conversations: {train['tokens']} tokens, "
          f"{train['assistant_tokens']} of them assistant tokens", flush=True)
    return summary


def run_config(config: SftConfig, inputs: dict[str, StageInput], steps: int,
               data_name: str) -> SftRunConfig:
    """The phase ``train_phase`` runs: the parent's model, the tokenized conversations."""
    from stages.specs import spec_of_artifact
    keep = ("seq_length", "global_batch_size", "schedule", "precision", "weight_decay", "adam_beta1",
            "adam_beta2", "adam_eps", "grad_clip", "seed", "micro_batch_size", "parallel",
            "checkpoint_interval", "keep_checkpoints", "log_interval", "document_mask")
    return SftRunConfig(from_=config.from_, data=data_name,
                        model=spec_of_artifact(inputs[config.from_]),
                        tokens=steps * config.global_batch_size * config.seq_length,
                        mixture={SOURCE: 1.0}, **{k: getattr(config, k) for k in keep})


def fine_tune(config: SftConfig, inputs: dict[str, StageInput], out_dir: Path,
              ctx: RunContext) -> Artifact:
    import dataclasses
    from stages.training.loop import train_phase  # heavy: torch + megatron
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = prepare_chat_data(config, inputs, out_dir, ctx.stage)
    train = summary["train"]
    steps = max(1, config.epochs * train["tokens"] // (config.global_batch_size * config.seq_length))
    data_name = f"{ctx.stage}/{DATA_DIR}"  # "/" is in no stage name: never a parent's
    outputs = {f"tokens/{SOURCE}": f"tokens/{SOURCE}", "tokenizer": "tokenizer.json"}
    if "heldout" in summary:
        outputs[f"heldout/{SOURCE}"] = f"heldout/{SOURCE}"
    chat = StageInput(data_name, out_dir / DATA_DIR, Artifact(
        kind="tokenize", stage=data_name, key=ctx.key, outputs=outputs,
        extra={"eod_id": summary["eod_id"], "vocab_size": summary["vocab_size"]}))
    phase = run_config(config, inputs, steps, data_name)
    art = train_phase(phase, {config.from_: inputs[config.from_], data_name: chat}, out_dir, ctx)
    metrics = {k: v for k, v in art.metrics.items() if not k.startswith("heldout_loss")}
    held = summary.get("heldout", {})
    if "heldout_loss" in art.metrics:  # the loss over held-out assistant tokens only (the mask)
        metrics["heldout_assistant_loss"] = art.metrics["heldout_loss"]
    elif held:   # packed held-out sequences need seq_length + 1 tokens
        print(f"[{ctx.stage}] no heldout_assistant_loss: the held-out conversations have "
              f"{held.get('tokens', 0)} tokens, fewer than one sequence of {config.seq_length} + 1; "
              "hold out more (the curate stage's heldout_fraction)", flush=True)
    extra = {**art.extra, "parent": config.from_, "data": config.data, "epochs": config.epochs,
             "conversations": train["conversations"], "train_tokens": train["tokens"],
             "assistant_tokens": train["assistant_tokens"],
             "heldout_conversations": held.get("conversations", 0),
             "heldout_assistant_tokens": held.get("assistant_tokens", 0),
             "document_mask": config.document_mask}
    return dataclasses.replace(art, kind=Sft.name, metrics=metrics, extra=extra)
