"""Megatron ``torch_dist`` checkpoint <-> Hugging Face ``GraniteForCausalLM`` directory.

``megatron_to_hf`` reads only the model tensors of a checkpoint written by ``save_checkpoint``
(never the AdamW moments) and writes ``config.json``, ``model.safetensors`` and, given a
``tokenizer.json``, the tokenizer files. No process group: ``torch.distributed.checkpoint`` reads in
``no_dist`` mode, one layer slice at a time (per-layer tensors are stacked along a leading layer
dim), and ``model.safetensors`` is written by hand, header first (shapes follow from the spec), then
tensor by tensor. Peak memory above the import baseline is about the embedding plus one layer, each
held twice at most, whatever the depth (measured, 100M-parameter fp32 model of 382 MiB: +191 MiB
tied; 475 MiB untied: +353 MiB, allocator slack included).

``hf_to_megatron`` derives the ``ModelSpec`` from ``config.json``, builds the model with
``build_model`` (in a world of one unless a caller set one up), copies the memory-mapped safetensors
into it tensor by tensor, re-pads the vocabulary with zero rows and saves with ``save_checkpoint``
(no optimizer, ``TrainState()``, the ``done`` manifest), so ``load_checkpoint(out_ckpt, model,
None)`` loads it. Peak RSS: about 2.6x the fp32 model (measured +993 MiB for 382 MiB): the model,
the mapped safetensors pages (counted in RSS, but reclaimable page cache) and the save's buffers.

The mapping (FACTS.md, "Megatron <-> Hugging Face conversion"):

- ``linear_qkv`` is grouped per KV group: view as (groups, q_per_group + 2, head_dim, hidden);
- ``linear_fc1`` is [gate; up] along dim 0;
- the norms live in the checkpoint as ``linear_qkv.layer_norm_weight`` (input norm) and
  ``linear_fc1.layer_norm_weight`` (post-attention norm);
- tied embeddings: no ``lm_head.weight`` and ``tie_word_embeddings=True``;
- Granite's ``attention_multiplier`` is 1/sqrt(head_dim), its other multipliers 1.0, and
  ``rms_norm_eps`` is Megatron's ``layernorm_epsilon``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from stages.training.model import padded_vocab_size
from stages.training.specs import ModelSpec

EOD, PAD = "<|endoftext|>", "<|pad|>"
LAYERS = "decoder.layers."  # prefix of the stacked per-layer tensors in a torch_dist checkpoint
_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


# ---------------------------------------------------------------- Megatron checkpoint reading
class _SliceReader:
    """Reads (slices of) full tensors of a torch_dist checkpoint without a process group."""

    def __init__(self, ckpt: Path):
        from torch.distributed.checkpoint import FileSystemReader
        self.ckpt = str(ckpt)
        self.meta = FileSystemReader(self.ckpt).read_metadata().state_dict_metadata

    def read(self, wants: dict[str, int | None]) -> dict[str, torch.Tensor]:
        """{key: layer index (a [1, ...] slice of a stacked tensor) or None (the whole tensor)}."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
        from torch.distributed.checkpoint.planner import LoadPlan
        from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

        out, chunks = {}, {}
        for key, layer in wants.items():
            md = self.meta[key]
            size, offsets = list(md.size), [0] * len(md.size)
            if layer is not None:
                offsets[0], size[0] = layer, 1
            chunks[key] = ChunkStorageMetadata(torch.Size(offsets), torch.Size(size))
            out[key] = torch.empty(size, dtype=md.properties.dtype)

        class Planner(DefaultLoadPlanner):
            # The default planner reads whole tensors; ask only for the chunk we hold a buffer for.
            def create_local_plan(self):
                return LoadPlan([item for key in out for item in create_read_items_for_chunk_list(
                    key, self.metadata.state_dict_metadata[key], [chunks[key]])])

            def lookup_tensor(self, index):  # our buffers are plain tensors at the chunk's offset
                return self.state_dict[index.fqn]

        with warnings.catch_warnings():  # "torch.distributed is disabled": single process, as meant
            warnings.simplefilter("ignore", UserWarning)
            load(out, storage_reader=FileSystemReader(self.ckpt), planner=Planner(), no_dist=True)
        return {k: (v[0] if wants[k] is not None else v) for k, v in out.items()}


def _split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g, d, h = spec.num_query_groups, spec.kv_channels, spec.hidden_size
    per = spec.num_attention_heads // g
    grouped = qkv.view(g, per + 2, d, h)  # per KV group: its q heads, then k, then v
    return (grouped[:, :per].reshape(g * per * d, h), grouped[:, per].reshape(g * d, h),
            grouped[:, per + 1].reshape(g * d, h))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    g, d, h = spec.num_query_groups, spec.kv_channels, spec.hidden_size
    per = spec.num_attention_heads // g
    return torch.cat([q.view(g, per, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)],
                     dim=1).reshape(-1, h)


_MEGATRON_LAYER = ("self_attention.linear_qkv.layer_norm_weight", "self_attention.linear_qkv.weight",
                   "self_attention.linear_proj.weight", "mlp.linear_fc1.layer_norm_weight",
                   "mlp.linear_fc1.weight", "mlp.linear_fc2.weight")
_HF_LAYER = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
             "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
             "mlp.down_proj")


def _hf_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name and shape, in the order megatron_to_hf writes them."""
    h, f, d, v = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels, spec.vocab_size
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    layer = ((h,), (q, h), (kv, h), (kv, h), (h, q), (h,), (f, h), (f, h), (h, f))
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(spec.num_layers):
        out += [(f"model.layers.{i}.{n}.weight", s) for n, s in zip(_HF_LAYER, layer, strict=True)]
    out.append(("model.norm.weight", (h,)))
    return out + ([] if spec.tied_embeddings else [("lm_head.weight", (v, h))])


def _write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                       tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Stream ``tensors`` (in ``shapes`` order) into one safetensors file: header, then raw bytes."""
    width = torch.tensor([], dtype=dtype).element_size()
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = math.prod(shape) * width
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape), (got, t) in zip(shapes, tensors, strict=True):
            if got != name or tuple(t.shape) != shape or t.dtype != dtype:
                raise RuntimeError(f"conversion bug: {got} {tuple(t.shape)} {t.dtype} where "
                                   f"{name} {shape} {dtype} was announced")
            fh.write(memoryview(t.contiguous().view(torch.uint8).numpy()))  # no bytes copy
    os.replace(tmp, path)


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
        # Granite scales scores by attention_multiplier instead of 1/sqrt(head_dim).
        attention_multiplier=1.0 / math.sqrt(spec.kv_channels),
        embedding_multiplier=spec.embedding_multiplier, residual_multiplier=spec.residual_multiplier,
        logits_scaling=spec.logits_scaling, architectures=["GraniteForCausalLM"], **token_ids)


def spec_from_hf_config(cfg: dict) -> ModelSpec:
    """The ``ModelSpec`` of a Granite (or Llama-shaped) ``config.json``; refuses what Megatron's
    plain decoder cannot compute."""
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
    attn = cfg.get("attention_multiplier", 1.0 / math.sqrt(head_dim))
    if not math.isclose(attn, 1.0 / math.sqrt(head_dim), rel_tol=1e-6):
        problems.append(f"attention_multiplier={attn} (only 1/sqrt(head_dim))")
    if problems:
        raise ValueError("hf_to_megatron: the Megatron model cannot represent " + ", ".join(problems))
    return ModelSpec(
        hidden_size=cfg["hidden_size"], num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads, num_query_groups=cfg.get("num_key_value_heads") or heads,
        kv_channels=head_dim, ffn_hidden_size=cfg["intermediate_size"], vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg["max_position_embeddings"], rope_theta=float(theta),
        layernorm_epsilon=cfg.get("rms_norm_eps", 1e-6),
        tied_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        init_std=cfg.get("initializer_range", 0.02),
        # ModelSpec refuses anything but 1.0 for these, saying why.
        **{k: cfg.get(k, 1.0) for k in ("embedding_multiplier", "residual_multiplier", "logits_scaling")})


def _save_tokenizer(tokenizer_json: Path, out_dir: Path) -> dict:
    from transformers import PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast(tokenizer_file=str(tokenizer_json), eos_token=EOD, pad_token=PAD)
    tok.save_pretrained(str(out_dir))
    eos = tok.eos_token_id  # no BOS in our data: a text starts after an EOD, as in pretraining
    return {"bos_token_id": eos, "eos_token_id": eos, "pad_token_id": tok.pad_token_id}


# ---------------------------------------------------------------- Megatron -> HF
def megatron_to_hf(ckpt: Path, spec: ModelSpec, out_dir: Path,
                   tokenizer_json: Path | None = None) -> Path:
    """Write ``out_dir`` as a ``GraniteForCausalLM`` directory from the model tensors of ``ckpt``."""
    ckpt, out_dir = Path(ckpt), Path(out_dir)
    reader = _SliceReader(ckpt)
    emb_md = reader.meta[emb_key := "embedding.word_embeddings.weight"]
    if tuple(emb_md.size) != (padded_vocab_size(spec.vocab_size), spec.hidden_size):
        raise ValueError(f"{ckpt}: embedding {tuple(emb_md.size)} does not fit the spec "
                         f"(vocab {spec.vocab_size} padded to {padded_vocab_size(spec.vocab_size)}, "
                         f"hidden {spec.hidden_size})")
    if (n := reader.meta[LAYERS + _MEGATRON_LAYER[1]].size[0]) != spec.num_layers:
        raise ValueError(f"{ckpt}: {n} layers, the spec says {spec.num_layers}")
    if ("output_layer.weight" in reader.meta) == spec.tied_embeddings:
        raise ValueError(f"{ckpt}: {'an' if spec.tied_embeddings else 'no'} output_layer.weight, "
                         f"which does not fit spec.tied_embeddings={spec.tied_embeddings}")
    dtype, v = emb_md.properties.dtype, spec.vocab_size

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        # Rows past vocab_size are TP padding that no token reaches: dropped.
        yield "model.embed_tokens.weight", reader.read({emb_key: None})[emb_key][:v]
        for i in range(spec.num_layers):
            t = {n: x for n, x in zip(_MEGATRON_LAYER, reader.read(
                {LAYERS + n: i for n in _MEGATRON_LAYER}).values())}
            q, k, val = _split_qkv(t["self_attention.linear_qkv.weight"], spec)
            gate, up = t["mlp.linear_fc1.weight"].chunk(2, dim=0)
            hf = (t["self_attention.linear_qkv.layer_norm_weight"], q, k, val,
                  t["self_attention.linear_proj.weight"], t["mlp.linear_fc1.layer_norm_weight"],
                  gate, up, t["mlp.linear_fc2.weight"])
            for name, x in zip(_HF_LAYER, hf, strict=True):
                yield f"model.layers.{i}.{name}.weight", x
            del t, q, k, val, gate, up, hf  # this layer's buffers go before the next is read
        yield "model.norm.weight", reader.read({(k := "decoder.final_layernorm.weight"): None})[k]
        if not spec.tied_embeddings:
            yield "lm_head.weight", reader.read({(k := "output_layer.weight"): None})[k][:v]

    out_dir.mkdir(parents=True, exist_ok=True)
    ids = _save_tokenizer(Path(tokenizer_json), out_dir) if tokenizer_json is not None else {
        "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    config = granite_config(spec, **ids)
    config.dtype = dtype
    _write_safetensors(out_dir / "model.safetensors", _hf_shapes(spec), dtype, tensors())
    config.save_pretrained(str(out_dir))
    return out_dir


# ---------------------------------------------------------------- HF -> Megatron
@contextlib.contextmanager
def _megatron_world():
    """Megatron's model-parallel state (TP=1) in a world of one, unless a caller already set it up."""
    from megatron.core import parallel_state as ps

    from stages.training.cpu_shim import apply_cpu_shim, init_cpu_rng_tracker, local_process_group
    if ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1:
            raise RuntimeError("hf_to_megatron builds a TP=1 model; call it outside a TP>1 worker "
                               "(the checkpoint reshards to any TP size when loaded)")
        yield
        return
    if not torch.cuda.is_available():
        apply_cpu_shim()  # dist_checkpointing's save asks CUDA for the device and synchronizes
    with local_process_group():
        ps.initialize_model_parallel(tensor_model_parallel_size=1)
        try:
            init_cpu_rng_tracker()
            yield
        finally:
            ps.destroy_model_parallel()


def hf_to_megatron(hf_dir: Path, out_ckpt: Path) -> ModelSpec:
    """Write ``out_ckpt`` (a complete checkpoint directory) from a HF Granite/Llama directory.

    Returns the ``ModelSpec`` derived from ``config.json``. Collective when called inside a worker.
    """
    from safetensors import safe_open

    from stages.training.checkpoint import TrainState, iter_name, save_checkpoint
    from stages.training.model import build_model
    from stages.training.specs import PrecisionSpec

    hf_dir, out_ckpt = Path(hf_dir), Path(out_ckpt)
    spec = spec_from_hf_config(json.loads((hf_dir / "config.json").read_text()))
    files = sorted(hf_dir.glob("*.safetensors")) or [hf_dir / "model.safetensors"]
    v = spec.vocab_size
    with contextlib.ExitStack() as stack:
        handles = [stack.enter_context(safe_open(str(f), framework="pt")) for f in files]
        where = {k: h for h in handles for k in h.keys()}

        def get(name: str) -> torch.Tensor:
            if name not in where:
                raise KeyError(f"{hf_dir}: no tensor {name!r}")
            return where[name].get_tensor(name).float()  # Megatron keeps fp32 master weights

        with _megatron_world():
            torch.manual_seed(0)  # every value is overwritten below; seeded for reproducible buffers
            model = build_model(spec, PrecisionSpec(), device="cpu")
            params = dict(model.named_parameters())

            def put(name: str, t: torch.Tensor) -> None:
                p = params.pop(name)
                vocab = name.endswith("word_embeddings.weight") or name == "output_layer.weight"
                if vocab:
                    p.data[v:].zero_()  # the padded rows: zeros, never a stale random init
                (p.data[:v] if vocab else p.data).copy_(t)

            with torch.no_grad():
                put("embedding.word_embeddings.weight", get("model.embed_tokens.weight"))
                for i in range(spec.num_layers):
                    p, m = f"model.layers.{i}.", f"decoder.layers.{i}."
                    put(m + "input_layernorm.weight", get(p + "input_layernorm.weight"))
                    put(m + "self_attention.linear_qkv.weight", _join_qkv(
                        get(p + "self_attn.q_proj.weight"), get(p + "self_attn.k_proj.weight"),
                        get(p + "self_attn.v_proj.weight"), spec))
                    put(m + "self_attention.linear_proj.weight", get(p + "self_attn.o_proj.weight"))
                    put(m + "pre_mlp_layernorm.weight", get(p + "post_attention_layernorm.weight"))
                    put(m + "mlp.linear_fc1.weight", torch.cat(
                        [get(p + "mlp.gate_proj.weight"), get(p + "mlp.up_proj.weight")]))
                    put(m + "mlp.linear_fc2.weight", get(p + "mlp.down_proj.weight"))
                put("decoder.final_layernorm.weight", get("model.norm.weight"))
                if not spec.tied_embeddings:
                    put("output_layer.weight", get("lm_head.weight"))
            if params:
                raise RuntimeError(f"hf_to_megatron: parameters left unset: {sorted(params)[:5]}")

            # save_checkpoint writes <root>/checkpoints/iter_0000000 with its done manifest
            # (relative paths), so the finished directory can be moved into place as it is.
            root = out_ckpt.parent / f".tmp-convert-{out_ckpt.name}"
            rank0 = not dist.is_initialized() or dist.get_rank() == 0
            if rank0 and root.exists():
                shutil.rmtree(root)
            saved = save_checkpoint(root, model, None, TrainState())
            if rank0:
                assert saved == root / "checkpoints" / iter_name(0)
                if out_ckpt.exists():
                    shutil.rmtree(out_ckpt)
                os.replace(saved, out_ckpt)
                shutil.rmtree(root)
            if dist.is_initialized():
                dist.barrier()
    return spec
