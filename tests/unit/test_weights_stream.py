"""The one weight-streaming path (``stages/models/weights.py``): a live Megatron model streams
exactly what ``megatron_to_hf`` writes for its checkpoint.

Tiny model, vocabulary 1000 (padded to 1024 inside Megatron: the padding rows must be dropped),
random norms, tied and untied. The stream from the live ``GPTModel`` (local layer spec: separate
norm modules) and ``model.safetensors`` of ``megatron_to_hf`` (from the ``torch_dist`` checkpoint:
norms under the TE-spec names) hold the same names, in the same order, bit for bit.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shim must not be applied on a GPU machine")

MODEL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, ffn_hidden_size=176, vocab_size=1000, max_position_embeddings=64)


@pytest.mark.parametrize("tied", [True, False])
def test_live_stream_equals_the_export(tmp_path, tied):
    from safetensors import safe_open

    from stages.models.convert import megatron_to_hf
    from stages.models.weights import hf_shapes, hf_weights_from_model
    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.checkpoint import TrainState, save_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    spec = dataclasses.replace(ModelSpec(**MODEL), tied_embeddings=tied)
    with megatron_world():
        torch.manual_seed(0)
        model = build_model(spec, PrecisionSpec(), device="cpu")
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "layernorm" in name:
                    p.uniform_(0.5, 1.5)
        stream = [(n, t.clone()) for n, t in hf_weights_from_model(model, spec)]
        ckpt = save_checkpoint(tmp_path / "ckpt", model, None, TrainState())
    hf = megatron_to_hf(ckpt, spec, tmp_path / "hf")
    with safe_open(str(hf / "model.safetensors"), "pt") as f:
        exported = {k: f.get_tensor(k) for k in f.keys()}
    assert [n for n, _ in stream] == [n for n, _ in hf_shapes(spec)]
    assert sorted(exported) == sorted(n for n, _ in stream)
    for name, tensor in stream:
        assert tuple(tensor.shape) == dict(hf_shapes(spec))[name]
        assert torch.equal(tensor, exported[name]), name
    assert stream[0][1].shape[0] == 1000      # the 24 padding rows are gone
    assert ("lm_head.weight" in exported) == (not tied)


def test_tensor_parallel_models_are_refused_naming_the_issue():
    from stages.models.weights import hf_weights_from_model
    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    spec = ModelSpec(**MODEL)
    with megatron_world():
        model = build_model(spec, PrecisionSpec(), device="cpu")
        model.config.tensor_model_parallel_size = 2   # what a TP=2 rank's config says
        with pytest.raises(NotImplementedError, match="issue 13"):
            hf_weights_from_model(model, spec)
        model.config.tensor_model_parallel_size = 1
        with pytest.raises(ValueError, match="2 layers, the spec says 3"):
            hf_weights_from_model(model, dataclasses.replace(spec, num_layers=3))
