"""Megatron ``torch_dist`` checkpoint <-> Hugging Face ``GraniteForCausalLM`` directory.

No process group and no model is built either way; the file formats live in ``convert_io``.

``megatron_to_hf`` reads only the model tensors of a checkpoint written by ``save_checkpoint``
(never the AdamW moments) and writes ``config.json``, ``model.safetensors`` and, given a
``tokenizer.json``, the tokenizer files (with the chat template when the tokenizer has the role
tokens) and ``generation_config.json``. ``torch.distributed.checkpoint`` reads in ``no_dist`` mode,
one layer slice at a time (per-layer tensors are stacked along a leading layer dim), and
``model.safetensors`` is written by hand, header first (shapes follow from the spec), then tensor
by tensor. Peak: the embedding (and output layer) read twice over (the reader's staging copy).

``hf_to_megatron`` derives the ``ModelSpec`` from ``config.json`` and writes the torch_dist files
itself: a save plan that lists every chunk Megatron's ``dist_checkpointing.save`` would store (same
keys, global shapes, per-layer chunks, SwiGLU's fc1 as two chunks, the linear layers' empty extra
states), each chunk read from the safetensors (plain reads, not mmap), converted to fp32 and
re-padded (zero vocabulary rows) only when the writer asks for it; then ``metadata.json``,
``common.pt``, ``state.json`` (``TrainState()``) and the ``done`` manifest, all in a temporary
directory moved into place, so ``load_checkpoint(out_ckpt, model, None)`` loads it at any TP size.
Peak: the embedding (and output layer) plus one layer, which the writer keeps until the file closes.

Measured (``benchmarks/convert_memory.py``: hidden 768, 12 layers, 12 heads / 4 KV groups, SwiGLU
2048, vocab 32000, fp32; peak RSS above the post-import RSS, mapped file pages included;
about +-10 MiB from run to run):

    model              weights   Megatron -> HF     HF -> Megatron (before: +1010 MiB, 2.65x)
    100.1M tied        382 MiB   +190 MiB 0.50x     +133 MiB 0.35x
    124.7M untied      476 MiB   +246 MiB 0.52x     +228 MiB 0.48x  (before: +1209 MiB, 2.54x)

The name mapping, the q/k/v split and the tensor order live in ``stages/models/weights.py``
(``hf_stream``), the one weight-streaming path the rollout engines use as well. Here:

- Granite's four multipliers are the spec's (``embedding_multiplier``, ``residual_multiplier``,
  ``logits_scaling``; ``attention_multiplier``, written as 1/sqrt(head_dim) when the spec has
  none), and ``rms_norm_eps`` is Megatron's ``layernorm_epsilon``.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import shutil
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from stages.models.convert_io import (Part, SafetensorsReader, SliceReader, write_safetensors, write_torch_dist)
from stages.models.weights import LAYER_CHUNKS, MEGATRON_LAYER, hf_shapes, hf_stream, join_qkv
from stages.training.model import padded_vocab_size
from stages.specs import ModelSpec

EOD, PAD = "<|endoftext|>", "<|pad|>"
LAYERS = "decoder.layers."  # prefix of the stacked per-layer tensors in a torch_dist checkpoint


# ---------------------------------------------------------------- config
def granite_config(spec: ModelSpec, **token_ids):
    """The ``GraniteConfig`` that computes what the Megatron model of ``spec`` computes."""
    from transformers import GraniteConfig
    return GraniteConfig(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size,
        intermediate_size=spec.ffn_hidden_size, num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_query_groups,
        head_dim=spec.kv_channels,  # read with getattr by Granite's attention and RoPE
        hidden_act="silu", max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.init_std, rms_norm_eps=spec.layernorm_epsilon,
        tie_word_embeddings=spec.tied_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": float(spec.rope_theta)},
        attention_bias=False, mlp_bias=False, attention_dropout=0.0,
        # Granite scales scores by attention_multiplier instead of 1/sqrt(head_dim); a spec without
        # one is a plain model, whose scale is 1/sqrt(head_dim) (Megatron's default).
        attention_multiplier=(1.0 / math.sqrt(spec.kv_channels) if spec.attention_multiplier is None
                              else spec.attention_multiplier),
        embedding_multiplier=spec.embedding_multiplier, residual_multiplier=spec.residual_multiplier,
        logits_scaling=spec.logits_scaling, architectures=["GraniteForCausalLM"], **token_ids)


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """The ``ModelSpec`` of a Granite (or Llama-shaped) ``config.json``, Granite's multipliers
    included; refuses what the Megatron model cannot compute."""
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    rope = cfg.get("rope_parameters") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    problems = []
    if rope.get("rope_type", "default") != "default":
        problems.append(f"rope_type={rope['rope_type']!r} (only 'default')")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={cfg['hidden_act']!r} (only 'silu')")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        problems.append("biases")
    if problems:
        raise ValueError("hf_to_megatron: the Megatron model cannot represent " + ", ".join(problems))
    return ModelSpec(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=head_dim, ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], rope_theta=float(theta),
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02), **_multipliers(cfg, head_dim))


GRANITE_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "logits_scaling",
                       "attention_multiplier")


def _multipliers(cfg: dict, head_dim: int) -> dict:
    """The spec's multipliers for what transformers computes from ``cfg``. GraniteConfig defaults
    each to 1.0 (attention_multiplier too: a Granite config without it scales scores by 1.0, not
    by 1/sqrt(head_dim)); other model types (Llama) have none, i.e. a plain decoder."""
    if cfg.get("model_type", "granite") != "granite":
        return {}
    out = {k: float(cfg.get(k, 1.0)) for k in GRANITE_MULTIPLIERS}
    # Exactly 1/sqrt(head_dim) (what megatron_to_hf writes for a plain spec) is the plain model's
    # scale: no attention_multiplier, so a plain spec converts back to itself and keeps its key.
    if out["attention_multiplier"] == 1.0 / math.sqrt(head_dim):
        out["attention_multiplier"] = None
    return out


def _save_tokenizer(tokenizer_json: Path, out_dir: Path) -> dict:
    """The tokenizer files and ``generation_config.json``; returns the ids ``config.json`` records.

    eos stays ``<|endoftext|>`` (a document's end, what pretraining and a base model emit). A
    tokenizer with the chat role tokens also gets them as special tokens and the chat template
    (in ``tokenizer_config.json``, where every transformers version and vLLM read it), and
    generation stops at ``<|end_of_text|>`` (a turn's end) as well as at ``<|endoftext|>``."""
    from tokenizers import Tokenizer
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    from stages.data import chat_format
    chat = not chat_format.missing_role_tokens(Tokenizer.from_file(str(tokenizer_json)))
    roles = {"additional_special_tokens": list(chat_format.ROLE_TOKENS)} if chat else {}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOD, pad_token=PAD,
                                  **roles)
    if chat:
        tok.chat_template = chat_format.CHAT_TEMPLATE
    tok.save_pretrained(str(out_dir), save_jinja_files=False)
    eos = tok.eos_token_id  # no BOS in our data: a text starts after an EOD, as in pretraining
    stops = [tok.convert_tokens_to_ids(chat_format.END_TURN), eos] if chat else eos
    GenerationConfig(bos_token_id=eos, eos_token_id=stops,
                     pad_token_id=tok.pad_token_id).save_pretrained(str(out_dir))
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}


# ---------------------------------------------------------------- Megatron -> HF
def megatron_to_hf(ckpt: Path, spec: ModelSpec, out_dir: Path,
                   tokenizer_json: Path | None = None) -> Path:
    """Write ``out_dir`` as a ``GraniteForCausalLM`` directory from the model tensors of ``ckpt``."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    reader = SliceReader(ckpt)
    emb_md = reader.meta[emb_key := "embedding.word_embeddings.weight"]
    if tuple(emb_md.size) != (padded_vocab_size(spec.vocab_size), spec.hidden_size):
        raise ValueError(f"{ckpt}: embedding {tuple(emb_md.size)} does not fit the spec "
                         f"(vocab {spec.vocab_size} padded to {padded_vocab_size(spec.vocab_size)}, "
                         f"hidden {spec.hidden_size})")
    if (n := reader.meta[LAYERS + MEGATRON_LAYER[1]].size[0]) != spec.num_layers:
        raise ValueError(f"{ckpt}: {n} layers, the spec says {spec.num_layers}")
    if ("output_layer.weight" in reader.meta) == spec.tied_embeddings:
        raise ValueError(f"{ckpt}: {'an' if spec.tied_embeddings else 'no'} output_layer.weight, "
                         f"which does not fit spec.tied_embeddings={spec.tied_embeddings}")
    dtype = emb_md.properties.dtype

    def layer(i: int) -> dict[str, torch.Tensor]:
        return dict(zip(MEGATRON_LAYER, reader.read({LAYERS + n: i for n in MEGATRON_LAYER}).values()))

    # The one Megatron -> HF mapping (stages/models/weights.py), read one layer slice at a time.
    tensors = hf_stream(
        spec, embedding=lambda: reader.read({emb_key: None})[emb_key], layer=layer,
        final_norm=lambda: reader.read({(k := "decoder.final_layernorm.weight"): None})[k],
        output=None if spec.tied_embeddings else (
            lambda: reader.read({(k := "output_layer.weight"): None})[k]))

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _save_tokenizer(Path(tokenizer_json), out_dir) if tokenizer_json is not None else {
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    config = granite_config(spec, **ids)
    config.dtype = dtype
    write_safetensors(out_dir / "model.safetensors", hf_shapes(spec), dtype, tensors)
    config.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------- HF -> Megatron
# What Megatron's dist_checkpointing.save writes beside the tensors (metadata.json, common.pt).
_MCORE_CONFIG = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
                 "common_backend": "torch", "common_backend_version": 1}
# Linear layers whose (empty, local-spec) extra state Megatron saves per layer; a load asks for it.
_EXTRA_STATE = ("self_attention.linear_proj", "self_attention.linear_qkv", "mlp.linear_fc1",
                "mlp.linear_fc2")


def _megatron_parts(spec: ModelSpec, src: SafetensorsReader) -> list[Part]:
    """The chunks of the Megatron checkpoint, each read and converted only when written."""
    h, v, n = spec.hidden_size, spec.vocab_size, spec.num_layers
    vp, shapes = padded_vocab_size(v), dict(hf_shapes(spec))

    def fp32(name: str) -> torch.Tensor:  # Megatron keeps fp32 master weights
        return src.read(name).float()

    def padded(name: str) -> torch.Tensor:  # TP padding rows past vocab_size: zeros
        out = torch.zeros(vp, h)
        src.read(name, out=out[:v])
        return out

    def whole(key: str, name: str, rows: int) -> Part:
        shape = (rows, *shapes[name][1:])
        return Part(key, shape, (0,) * len(shape), shape,
                    (lambda: padded(name)) if rows != shapes[name][0] else (lambda: fp32(name)))

    def chunk(names: tuple[str, ...]) -> torch.Tensor:  # three names: q, k, v
        return join_qkv(*map(fp32, names), spec) if len(names) == 3 else fp32(names[0])

    def layer_parts(key: str, chunks: tuple[tuple[str, ...], ...]) -> Iterator[Part]:
        names = [[f"model.layers.{{i}}.{x}.weight" for x in c] for c in chunks]
        rows = [sum(shapes[x.format(i=0)][0] for x in c) for c in names]
        rest = shapes[names[0][0].format(i=0)][1:]  # () for a norm, (columns,) for a matrix
        for i in range(n):
            for c, r, at in zip(names, rows, itertools.accumulate([0, *rows])):
                got = tuple(x.format(i=i) for x in c)
                yield Part(LAYERS + key, (n, sum(rows), *rest), (i, at, *[0] * len(rest)),
                           (1, r, *rest), lambda got=got: chunk(got)[None])

    parts = [whole("embedding.word_embeddings.weight", "model.embed_tokens.weight", vp)]
    for key, chunks in LAYER_CHUNKS:
        parts += layer_parts(key, chunks)
    parts.append(whole("decoder.final_layernorm.weight", "model.norm.weight", h))
    if not spec.tied_embeddings:
        parts.append(whole("output_layer.weight", "lm_head.weight", vp))
    return parts


def _finish_checkpoint(ckpt: Path, state) -> None:
    """The files ``save_checkpoint`` adds around the tensors, ``done`` last (no ``rng/``: a
    conversion has no RNG state to resume)."""
    from stages.training.checkpoint import STATE, write_done
    (ckpt / "metadata.json").write_text(json.dumps(_MCORE_CONFIG))
    torch.save({}, ckpt / "common.pt")  # a bare model has no common (non-sharded) state
    (ckpt / STATE).write_text(json.dumps(dataclasses.asdict(state), indent=1))
    write_done(ckpt, state)


def hf_to_megatron(hf_dir: Path, out_ckpt: Path, state=None) -> ModelSpec:
    """Write ``out_ckpt`` (a complete checkpoint directory) from a HF Granite/Llama directory.

    ``state`` (a ``TrainState``, default empty) is recorded as the checkpoint's train state, e.g.
    the tokens its parents were trained on. Returns the ``ModelSpec`` derived from ``config.json``. Inside a worker, rank 0 writes and the
    others wait for it (collective).
    """
    hf_dir, out_ckpt = Path(hf_dir), Path(out_ckpt)
    spec = spec_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    files = sorted(hf_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{hf_dir}: no *.safetensors file")
    src = SafetensorsReader(files)
    src.check(dict(hf_shapes(spec)))  # fail before writing anything
    if not dist.is_initialized() or dist.get_rank() == 0:
        # Built beside the target and moved into place whole, ``done`` included.
        tmp = out_ckpt.parent / f".tmp-convert-{out_ckpt.name}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        # Megatron stores a local-spec linear's extra state (None) as [None], per layer.
        objects = {f"{LAYERS}{m}._extra_state/shard_{i}_{spec.num_layers}": [None]
                   for m in _EXTRA_STATE for i in range(spec.num_layers)}
        write_torch_dist(tmp, _megatron_parts(spec, src), objects)
        from stages.training.checkpoint import TrainState
        _finish_checkpoint(tmp, state or TrainState())
        if out_ckpt.exists():
            shutil.rmtree(out_ckpt)
        os.replace(tmp, out_ckpt)
    if dist.is_initialized():
        dist.barrier()
    return spec
