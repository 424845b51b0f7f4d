"""One weight-streaming path: Megatron parameters -> Hugging Face Granite names -> an engine.

Everything that turns Megatron tensors into Hugging Face ``GraniteForCausalLM`` tensors goes
through ``hf_stream``: ``convert.megatron_to_hf`` (a ``torch_dist`` checkpoint, read one layer
slice at a time, written to ``model.safetensors``), and ``hf_weights_from_model`` (a live
``GPTModel``, streamed into a rollout engine's ``load_weights``: the CPU engine of CI and vLLM on
GPUs). So the name table and the q/k/v split that CI exercises are the ones the GPU path runs.

The mapping (FACTS.md, "Megatron <-> Hugging Face conversion"), per layer ``i``:

    Megatron (checkpoint / TE-spec name)            Hugging Face ``model.layers.{i}.``
    self_attention.linear_qkv.layer_norm_weight     input_layernorm.weight
    self_attention.linear_qkv.weight                self_attn.{q,k,v}_proj.weight
    self_attention.linear_proj.weight               self_attn.o_proj.weight
    mlp.linear_fc1.layer_norm_weight                post_attention_layernorm.weight
    mlp.linear_fc1.weight                           mlp.{gate,up}_proj.weight
    mlp.linear_fc2.weight                           mlp.down_proj.weight

- ``linear_qkv`` is grouped per KV group: viewed as (groups, q_per_group + 2, head_dim, hidden),
  each group holds its q heads, then its k head, then its v head (a plain [q|k|v] split is wrong);
- ``linear_fc1`` is [gate; up] along dim 0 (Megatron computes silu(first half) * second half);
- Megatron's local layer spec (CPU) keeps the two norms as modules of their own,
  ``input_layernorm`` and ``pre_mlp_layernorm``; the Transformer Engine spec fuses them into
  ``linear_qkv`` / ``linear_fc1`` under the checkpoint's names. Both are read;
- ``embedding.word_embeddings.weight`` -> ``model.embed_tokens.weight``,
  ``decoder.final_layernorm.weight`` -> ``model.norm.weight``, ``output_layer.weight`` ->
  ``lm_head.weight`` (untied only: tied models have neither an output layer nor an ``lm_head``);
  rows past ``spec.vocab_size`` are tensor-parallel padding that no token reaches: dropped.

Order (what ``megatron_to_hf`` writes and ``hf_shapes`` lists): embeddings, layer 0 .. n-1 (each
in the order of ``HF_LAYER``), final norm, then ``lm_head`` when untied.
"""
from __future__ import annotations

from typing import Callable, Iterator, Mapping

import torch

from stages.specs import ModelSpec

# Each per-layer Megatron tensor, as the chunks (along its dim 0) Megatron's own save stores, each
# made of these HF tensors: q, k, v are joined per KV group; SwiGLU's fc1 is [gate; up].
LAYER_CHUNKS = (
    ("self_attention.linear_qkv.layer_norm_weight", (("input_layernorm",),)),
    ("self_attention.linear_qkv.weight",
     (("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),)),
    ("self_attention.linear_proj.weight", (("self_attn.o_proj",),)),
    ("mlp.linear_fc1.layer_norm_weight", (("post_attention_layernorm",),)),
    ("mlp.linear_fc1.weight", (("mlp.gate_proj",), ("mlp.up_proj",))),
    ("mlp.linear_fc2.weight", (("mlp.down_proj",),)),
)
MEGATRON_LAYER = tuple(key for key, _ in LAYER_CHUNKS)
HF_LAYER = tuple(name for _, chunks in LAYER_CHUNKS for chunk in chunks for name in chunk)
# The local spec's norm modules under the checkpoint (TE-spec) names they are saved as.
_LOCAL_SPEC_NAMES = {"self_attention.linear_qkv.layer_norm_weight": "input_layernorm.weight",
                     "mlp.linear_fc1.layer_norm_weight": "pre_mlp_layernorm.weight"}


# ---------------------------------------------------------------- layout
def split_qkv(qkv: torch.Tensor, spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Megatron's grouped ``linear_qkv`` weight -> HF (q, k, v) weights."""
    g, d, h = spec.num_query_groups, spec.kv_channels, spec.hidden_size
    per = spec.num_attention_heads // g
    grouped = qkv.view(g, per + 2, d, h)  # per KV group: its q heads, then k, then v
    return (grouped[:, :per].reshape(g * per * d, h), grouped[:, per].reshape(g * d, h),
            grouped[:, per + 1].reshape(g * d, h))


def join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: ModelSpec) -> torch.Tensor:
    """HF (q, k, v) weights -> Megatron's grouped ``linear_qkv`` weight (``split_qkv``'s inverse)."""
    g, d, h = spec.num_query_groups, spec.kv_channels, spec.hidden_size
    per = spec.num_attention_heads // g
    return torch.cat([q.view(g, per, d, h), k.view(g, 1, d, h), v.view(g, 1, d, h)],
                     dim=1).reshape(-1, h)


def hf_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Every HF tensor name and shape, in the order ``hf_stream`` yields them."""
    h, f, d, v = spec.hidden_size, spec.ffn_hidden_size, spec.kv_channels, spec.vocab_size
    q, kv = spec.num_attention_heads * d, spec.num_query_groups * d
    layer = ((h,), (q, h), (kv, h), (kv, h), (h, q), (h,), (f, h), (f, h), (h, f))
    out = [("model.embed_tokens.weight", (v, h))]
    for i in range(spec.num_layers):
        out += [(f"model.layers.{i}.{n}.weight", s) for n, s in zip(HF_LAYER, layer, strict=True)]
    out.append(("model.norm.weight", (h,)))
    return out + ([] if spec.tied_embeddings else [("lm_head.weight", (v, h))])


def hf_layer(i: int, layer: Mapping[str, torch.Tensor],
             spec: ModelSpec) -> list[tuple[str, torch.Tensor]]:
    """Layer ``i``'s HF tensors, in ``HF_LAYER`` order, from its Megatron tensors (keyed by the
    ``MEGATRON_LAYER`` names)."""
    q, k, v = split_qkv(layer["self_attention.linear_qkv.weight"], spec)
    gate, up = layer["mlp.linear_fc1.weight"].chunk(2, dim=0)
    hf = (layer["self_attention.linear_qkv.layer_norm_weight"], q, k, v,
          layer["self_attention.linear_proj.weight"], layer["mlp.linear_fc1.layer_norm_weight"],
          gate, up, layer["mlp.linear_fc2.weight"])
    return [(f"model.layers.{i}.{name}.weight", x) for name, x in zip(HF_LAYER, hf, strict=True)]


def hf_stream(spec: ModelSpec, *, embedding: Callable[[], torch.Tensor],
              layer: Callable[[int], Mapping[str, torch.Tensor]],
              final_norm: Callable[[], torch.Tensor],
              output: Callable[[], torch.Tensor] | None) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, read lazily: each callable is called when its tensors are next,
    and a layer's tensors are dropped before the next layer is read (so a reader that stages one
    layer at a time holds one layer). ``embedding`` / ``output`` may carry TP padding rows;
    ``output`` is None for tied embeddings."""
    v = spec.vocab_size
    yield "model.embed_tokens.weight", embedding()[:v]
    for i in range(spec.num_layers):
        pairs = hf_layer(i, layer(i), spec)
        yield from pairs
        del pairs  # this layer's buffers go before the next is read
    yield "model.norm.weight", final_norm()
    if output is not None:
        yield "lm_head.weight", output()[:v]


# ---------------------------------------------------------------- a live model
def _unwrap(model):
    """The GPTModel inside DDP / Float16Module wrappers (each keeps it as ``.module``)."""
    while not hasattr(model, "decoder") and hasattr(model, "module"):
        model = model.module
    return model


def hf_weights_from_model(model, spec: ModelSpec) -> Iterator[tuple[str, torch.Tensor]]:
    """A live Megatron-core ``GPTModel`` (TP=1, one pipeline stage) -> (HF name, tensor) pairs in
    the order ``megatron_to_hf`` writes them, vocabulary padding dropped.

    The tensors are detached and share memory with the parameters wherever the layout allows
    (embeddings, norms, o_proj, gate/up, down_proj, lm_head are views; q/k/v are copies when there
    is more than one KV group): read-only, and valid only until the next optimizer step, so an
    engine copies them (``load_weights`` does). Nothing is gathered: TP > 1 is refused.
    """
    from stages.training.model import padded_vocab_size
    gpt = _unwrap(model)
    tp = getattr(gpt.config, "tensor_model_parallel_size", 1)
    if tp != 1:
        raise NotImplementedError(
            f"hf_weights_from_model: tensor_model_parallel_size={tp}; streaming a TP-sharded model "
            "(gathering q/k/v per group, fc1 as [gate; up] per rank, row-parallel columns, the "
            "vocabulary) is issue 13. Use TP=1 for RL until then.")
    if not (getattr(gpt, "pre_process", True) and getattr(gpt, "post_process", True)):
        raise NotImplementedError("hf_weights_from_model: pipeline-parallel stages (a model without "
                                  "its embedding or output layer) are issue 13; use PP=1")
    params = {n: p.detach() for n, p in gpt.named_parameters()}

    def get(name: str, *aliases: str) -> torch.Tensor:
        for n in (name, *aliases):
            if n in params:
                return params[n]
        raise KeyError(f"hf_weights_from_model: the model has no parameter {name!r}"
                       + (f" (nor {', '.join(map(repr, aliases))})" if aliases else "")
                       + "; is it a GPTModel built by stages.training.model.build_model?")

    emb = get("embedding.word_embeddings.weight")
    want = (padded_vocab_size(spec.vocab_size), spec.hidden_size)
    if tuple(emb.shape) != want:
        raise ValueError(f"hf_weights_from_model: embedding {tuple(emb.shape)} does not fit the spec "
                         f"(vocab {spec.vocab_size} padded to {want[0]}, hidden {spec.hidden_size})")
    layers = len(gpt.decoder.layers)
    if layers != spec.num_layers:
        raise ValueError(f"hf_weights_from_model: the model has {layers} layers, the spec says "
                         f"{spec.num_layers}")
    if ("output_layer.weight" in params) == spec.tied_embeddings:
        raise ValueError(f"hf_weights_from_model: {'an' if spec.tied_embeddings else 'no'} "
                         f"output_layer.weight, which does not fit "
                         f"spec.tied_embeddings={spec.tied_embeddings}")

    def layer(i: int) -> dict[str, torch.Tensor]:
        pre = f"decoder.layers.{i}."
        return {k: get(pre + k, *([pre + _LOCAL_SPEC_NAMES[k]] if k in _LOCAL_SPEC_NAMES else []))
                for k in MEGATRON_LAYER}

    return hf_stream(spec, embedding=lambda: emb, layer=layer,
                     final_norm=lambda: get("decoder.final_layernorm.weight"),
                     output=None if spec.tied_embeddings else (lambda: get("output_layer.weight")))
