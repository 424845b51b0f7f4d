"""Model provider: a Granite-shaped Megatron-core ``GPTModel`` built from a ``ModelSpec``.

Granite 4.1 dense = GQA + RoPE + SwiGLU + RMSNorm + tied input/output embeddings, no biases,
dropout 0. The mapping onto Megatron-core 0.16:

- ``TransformerConfig``: ``normalization="RMSNorm"``, ``gated_linear_unit=True`` with SiLU
  (SwiGLU), ``add_bias_linear=False``, ``num_query_groups`` (GQA), dropout 0, init std
  ``init_std``; every CUDA-only fusion stays off on CPU (FACTS.md).
- ``GPTModel``: ``position_embedding_type="rope"``, ``rotary_base=rope_theta``,
  ``share_embeddings_and_output_weights=tied_embeddings``, ``rotary_interleaved=False`` (HF layout).
- Granite's multipliers: ``attention_multiplier`` is ``TransformerConfig.softmax_scale``; the
  embedding, residual and logits multipliers are forward hooks (``add_granite_multipliers``), so
  the model computes what transformers' ``GraniteForCausalLM`` does.
- Layer spec: Megatron's local spec (pure torch modules) on CPU; the Transformer Engine spec on
  GPU (needed for FP8). Asking for TE where it cannot be imported raises ``RuntimeError`` saying
  how to fix it.
- FP8 (GPU only): ``PrecisionSpec.fp8`` sets ``TransformerConfig.fp8_recipe``; the format is
  ``hybrid`` (E4M3 forward, E5M2 gradients) for the per-tensor recipes ("delayed", "tensorwise")
  and ``e4m3`` for the block-scaled ones ("blockwise", "mxfp8"), which only take E4M3. Megatron's
  ``TransformerBlock`` wraps its layers in the FP8 autocast itself.
- bf16: parameters stay fp32 (master weights, what AdamW updates) and the forward runs under
  ``torch.autocast(dtype=bfloat16)`` (see ``autocast``): one optimizer and one checkpoint format on
  CPU and GPU alike.

The vocabulary is padded to a multiple of ``VOCAB_MULTIPLE`` (independent of TP, so a checkpoint
reshards between TP sizes); ``padded_vocab_size`` says by how much.
"""
from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from stages.specs import ModelSpec, PrecisionSpec
from stages.training.cpu_shim import cuda_calls_on_cpu

VOCAB_MULTIPLE = 128  # Megatron's make_vocab_size_divisible_by; TP sizes that divide it all work

# fp8 recipe -> TransformerConfig.fp8 (format)
FP8_FORMAT = {"delayed": "hybrid", "tensorwise": "hybrid", "blockwise": "e4m3", "mxfp8": "e4m3"}


def padded_vocab_size(vocab_size: int, tensor_parallel: int = 1) -> int:
    """``vocab_size`` rounded up to a multiple of VOCAB_MULTIPLE (the same for every TP size)."""
    padded = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    if padded % tensor_parallel:
        raise ValueError(f"tensor_parallel={tensor_parallel} does not divide the padded vocabulary "
                         f"({padded}); use a TP size that divides {VOCAB_MULTIPLE}")
    return padded


def have_transformer_engine() -> bool:
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions import transformer_engine as _te  # noqa: F401
    except Exception:  # ImportError, or OSError when CUDA libraries are missing
        return False
    return True


# The oldest Transformer Engine that Megatron-core builds each recipe with (megatron.core.fp8_utils)
FP8_MIN_TE = {"delayed": "1.0", "tensorwise": "2.2.0.dev0", "blockwise": "2.3.0.dev0",
              "mxfp8": "2.1.0"}
# TE's own per-recipe hardware check (FP8GlobalStateManager): 8.9+ for the per-tensor recipes,
# Hopper and CUDA 12.9+ for blockwise, Blackwell for mxfp8
_FP8_CHECK = {"delayed": "is_fp8_available", "tensorwise": "is_fp8_available",
              "blockwise": "is_fp8_block_scaling_available", "mxfp8": "is_mxfp8_available"}


def fp8_unsupported(recipe: str) -> str:
    """Why FP8 ``recipe`` cannot run here, or "" when it can: no GPU, no Transformer Engine, a TE
    older than Megatron needs for the recipe, or a GPU that TE says lacks the recipe's kernels."""
    if not torch.cuda.is_available():
        return "needs a GPU"
    if not have_transformer_engine():
        return "Transformer Engine is not importable here (pip install 'granite-forge[gpu]')"
    from megatron.core.utils import get_te_version, is_te_min_version
    if not is_te_min_version(FP8_MIN_TE[recipe]):
        return f"needs Transformer Engine >= {FP8_MIN_TE[recipe]} (this is {get_te_version()})"
    try:  # newer TE keeps it in .quantization, older TE only in .fp8
        from transformer_engine.pytorch.quantization import FP8GlobalStateManager
    except ImportError:
        from transformer_engine.pytorch.fp8 import FP8GlobalStateManager
    check = getattr(FP8GlobalStateManager, _FP8_CHECK[recipe], None)
    if check is None:
        return f"this Transformer Engine has no {_FP8_CHECK[recipe]}() (too old for {recipe})"
    ok, reason = check()
    return "" if ok else f"not on this GPU: {reason or 'Transformer Engine says unsupported'}"


# cluster.recompute -> TransformerConfig: selective reruns the attention core, full every layer
# (one at a time, keeping only its input). Megatron's recompute needs CUDA's RNG: GPU only.
RECOMPUTE = {"none": {}, "selective": dict(recompute_granularity="selective",
                                           recompute_modules=["core_attn"]),
             "full": dict(recompute_granularity="full", recompute_method="uniform",
                          recompute_num_layers=1)}


def transformer_config(spec: ModelSpec, precision: PrecisionSpec, *, device: str,
                       tensor_parallel: int = 1, recompute: str = "none",
                       pipeline_parallel: int = 1, context_parallel: int = 1):
    """The Megatron ``TransformerConfig`` of a Granite-shaped dense decoder."""
    from megatron.core.transformer.transformer_config import TransformerConfig
    fp8 = {}
    if precision.fp8 != "none":
        if device != "cuda":
            raise RuntimeError(f"precision.fp8={precision.fp8!r} needs a GPU with Transformer Engine; "
                               "set precision.fp8=none on CPU")
        fp8 = dict(fp8=FP8_FORMAT[precision.fp8], fp8_recipe=precision.fp8)
        if precision.fp8 == "delayed":
            fp8.update(fp8_amax_history_len=1024, fp8_amax_compute_algo="max")
    return TransformerConfig(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden_size,
        num_attention_heads=spec.num_attention_heads,
        num_query_groups=spec.num_query_groups,
        kv_channels=spec.kv_channels,
        ffn_hidden_size=spec.ffn_hidden_size,
        normalization="RMSNorm",
        layernorm_epsilon=spec.layernorm_epsilon,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=spec.init_std,
        # Granite's attention_multiplier replaces 1/sqrt(kv_channels) outright (not on top of it);
        # None keeps Megatron's own default, which is exactly 1/sqrt(kv_channels).
        softmax_scale=spec.attention_multiplier,
        tensor_model_parallel_size=tensor_parallel,
        # PP: activations cross stages in fp32 (token_losses casts a stage's output to it)
        pipeline_model_parallel_size=pipeline_parallel,
        pipeline_dtype=torch.float32,
        # CP (GPU, Transformer Engine's ring attention): each rank holds 2 of 2 x CP chunks
        context_parallel_size=context_parallel,
        cp_comm_type="p2p" if context_parallel > 1 else None,
        sequence_parallel=False,
        params_dtype=torch.float32,
        use_cpu_initialization=(device == "cpu"),
        perform_initialization=True,
        # CUDA-only fusions stay off (FACTS.md); they are cheap wins on GPU but change numerics.
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        cross_entropy_loss_fusion=False,
        **fp8,
        **RECOMPUTE[recompute],
    )


def layer_spec(use_te: bool):
    """Megatron's local layer spec (CPU) or the Transformer Engine spec (GPU, FP8)."""
    from megatron.core.models.gpt import gpt_layer_specs
    if not use_te:
        return gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    if not have_transformer_engine():
        raise RuntimeError("the Transformer Engine layer spec was asked for, but transformer_engine "
                           "cannot be imported here; install the GPU extra "
                           "(pip install 'granite-forge[gpu]', or use the worker image) on a CUDA "
                           "machine, set FORGE_LAYER_SPEC=local for bf16 on Megatron's local spec, "
                           "or train on CPU (cluster.device=cpu, precision.fp8=none)")
    return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()


def build_model(spec: ModelSpec, precision: PrecisionSpec, *, device: str,
                tensor_parallel: int = 1, use_te: bool | None = None, recompute: str = "none",
                pipeline_parallel: int = 1, context_parallel: int = 1):
    """A ``GPTModel`` on ``device`` (model-parallel state must be initialised first): with
    ``pipeline_parallel`` > 1, this rank's stage of it (its share of the layers, at Megatron's
    layer offset; the embedding on the first stage, final norm and output layer on the last).

    ``use_te`` defaults to True on cuda (False with ``FORGE_LAYER_SPEC=local``) and False on cpu.
    Initialisation on CPU draws from the default torch generator (seed it first); the full weight
    is drawn and then split, so TP=1 and TP=2 start from the same weights; ``context_parallel`` > 1
    (GPU only: Transformer Engine's ring attention) changes no weight; a later pipeline stage
    first replays the draws of the stages before it (``_skip_earlier_stages``), so every PP size
    starts from the PP=1 weights too. With tied embeddings the last stage's copy of the embedding
    is set equal to the first stage's by Megatron (an all-reduce over the embedding group).
    """
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    if use_te is None:
        # FORGE_LAYER_SPEC=local: bf16 on the local spec where a GPU lacks TE (tests/gpu/run_all.sh)
        use_te = device == "cuda" and os.environ.get("FORGE_LAYER_SPEC") != "local"
    config = transformer_config(spec, precision, device=device, tensor_parallel=tensor_parallel,
                                recompute=recompute, pipeline_parallel=pipeline_parallel,
                                context_parallel=context_parallel)
    first = last = True
    if pipeline_parallel > 1:
        first, last = ps.is_pipeline_first_stage(), ps.is_pipeline_last_stage()
        if device == "cpu" and not first:
            _skip_earlier_stages(spec, config, use_te, tensor_parallel)
    with cuda_calls_on_cpu():  # the tied copy's .cuda() before its all-reduce (CPU shim only)
        model = GPTModel(
            config=config,
            transformer_layer_spec=layer_spec(use_te),
            vocab_size=padded_vocab_size(spec.vocab_size, tensor_parallel),
            max_sequence_length=spec.max_position_embeddings,
            pre_process=first,
            post_process=last,
            parallel_output=True,
            share_embeddings_and_output_weights=spec.tied_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=spec.rope_theta,
            # FACTS.md: Megatron's default is rotary_interleaved=False (the HF layout); say it.
        )
    assert not config.rotary_interleaved
    add_granite_multipliers(model, spec)
    return model.to(device)


def _skip_earlier_stages(spec: ModelSpec, config, use_te: bool, tensor_parallel: int) -> None:
    """Advance the CPU generator past the initial draws of the pipeline stages before this one.

    PP=1 draws the embedding, then the layers in order. A later stage builds (and drops) that
    prefix, the embedding and the layers before its offset, as a one-stage model, so its own
    layers draw what they draw at PP=1. Costs the prefix's memory once, at start-up (CPU only)."""
    import dataclasses

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
    offset = get_transformer_layer_offset(config)
    prefix = dataclasses.replace(config, num_layers=offset, pipeline_model_parallel_size=1)
    with cuda_calls_on_cpu():
        GPTModel(config=prefix, transformer_layer_spec=layer_spec(use_te),
                 vocab_size=padded_vocab_size(spec.vocab_size, tensor_parallel),
                 max_sequence_length=spec.max_position_embeddings, pre_process=True,
                 post_process=False, share_embeddings_and_output_weights=False,
                 position_embedding_type="rope", rotary_base=spec.rope_theta)


def _scale_output(factor: float, *, divide: bool = False):
    """A forward hook that scales a module's output (a tensor, or Megatron's ``(tensor, bias)``)
    as transformers' Granite does: ``x * factor``, or ``x / factor`` for the logits."""
    def scale(x):
        return None if x is None else (x / factor if divide else x * factor)

    def hook(module, args, output):  # noqa: ARG001 - the signature torch calls hooks with
        if isinstance(output, tuple):
            return (scale(output[0]), scale(output[1]), *output[2:])
        return scale(output)
    return hook


def add_granite_multipliers(model, spec: ModelSpec) -> None:
    """Granite's embedding, residual and logits multipliers, as forward hooks on ``model``.

    Megatron-core has no option for them (its only one, ``softmax_scale``, carries
    attention_multiplier). Each hook scales one module's output elementwise, in the operation
    transformers' ``GraniteForCausalLM`` uses, so both compute the same:

    - ``embedding`` (token embeddings): ``* embedding_multiplier``; the tied output layer reads the
      weight itself, unscaled, as in transformers;
    - each layer's ``self_attention`` and ``mlp`` (output of the row-parallel projection, before
      the bias-dropout-add joins it to the residual stream): ``* residual_multiplier``;
    - ``output_layer``: logits ``/ logits_scaling``.

    Under tensor parallelism each of these outputs is either whole on every rank (after the
    all-reduce) or split along the sequence (sequence parallel) or vocabulary (parallel logits),
    and an elementwise scale is right on any split; gradients flow through the hooks. No parameter
    or buffer is added, so checkpoints are unchanged and a model built from the same spec reloads
    them. A multiplier of 1.0 adds no hook: the plain model stays bit-identical. (Megatron's
    ``inference_fuse_tp_communication``, which adds the residual inside fc2, must stay off.)
    """
    hooks = []  # a pipeline stage has the embedding (first) or the output layer (last) or neither
    if spec.embedding_multiplier != 1.0 and model.pre_process:
        hooks.append((model.embedding, _scale_output(spec.embedding_multiplier)))
    if spec.residual_multiplier != 1.0:
        for layer in model.decoder.layers:
            hooks += [(layer.self_attention, _scale_output(spec.residual_multiplier)),
                      (layer.mlp, _scale_output(spec.residual_multiplier))]
    if spec.logits_scaling != 1.0 and model.post_process:
        hooks.append((model.output_layer, _scale_output(spec.logits_scaling, divide=True)))
    for module, hook in hooks:
        module.register_forward_hook(hook)


def causal_mask(seq_length: int, device: str) -> torch.Tensor | None:
    """Explicit causal mask for CPU ([1, 1, s, s], True = masked); None on GPU (kernels build it).

    Megatron's default causal mask is allocated on cuda, so the CPU path must pass its own.
    """
    if device != "cpu":
        return None
    return torch.triu(torch.ones(seq_length, seq_length, dtype=torch.bool), diagonal=1)[None, None]


def autocast(precision: PrecisionSpec, device: str):
    """bf16 autocast around the forward (fp32 master weights), or nothing for fp32."""
    if precision.dtype == "bf16":
        return torch.autocast(device_type=device, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def token_losses(model, tokens: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None,
                 precision: PrecisionSpec, device: str) -> torch.Tensor:
    """Per-token cross-entropy [b, s] of ``labels`` given ``tokens`` (fp32)."""
    b, s = tokens.shape
    position_ids = torch.arange(s, device=tokens.device).unsqueeze(0).expand(b, s)
    with autocast(precision, device):
        losses = model(tokens, position_ids, mask, labels=labels)
    return losses.float()
