"""The `merge` stage's work on real mergekit and real Megatron checkpoints (tiny Granite shapes).

Two checkpoints of one shape, with different RoPE theta and context length, are merged; the result
is read back from the Megatron checkpoint the next stage would train from.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from stages.base import Artifact, RunContext, StageInput
from stages.models.merge import MergeConfig
from stages.schema import to_dict
from stages.specs import ModelSpec

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shim must not be applied on a GPU machine")

SPEC = ModelSpec(hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2, kv_channels=8,
                 ffn_hidden_size=64, vocab_size=300, max_position_embeddings=128)


def make_parent(root: Path, name: str, seed: int, seq: int, theta: float) -> StageInput:
    """A model stage's output: a Megatron checkpoint (random weights) and its artifact."""
    from transformers import GraniteForCausalLM

    from stages.models.convert import granite_config, hf_to_megatron
    spec = dataclasses.replace(SPEC, max_position_embeddings=seq, rope_theta=theta)
    torch.manual_seed(seed)
    hf = root / f"{name}-hf"
    GraniteForCausalLM(granite_config(spec)).save_pretrained(str(hf))
    out = root / name
    hf_to_megatron(hf, out / "checkpoints" / "iter_0000001")
    art = Artifact(kind="pretrain", stage=name, key=f"k-{name}",
                   outputs={"checkpoint": "checkpoints/iter_0000001"},
                   extra={"model": to_dict(spec), "seq_length": seq, "tokens_total": 1000 * seed})
    return StageInput(name, out, art)


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    return {"short": make_parent(root, "short", 1, 64, 1e4),
            "long": make_parent(root, "long", 2, 128, 4e4)}


def tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from stages.training.checkpoint import load_tensors
    return load_tensors(ckpt)


def merge(config: MergeConfig, parents: dict, out: Path) -> Artifact:
    from stages.models.merge import merge_models
    out.mkdir()
    return merge_models(config, parents, out, RunContext(stage="m", key="k-m", cluster=None))


def test_linear_merge_is_the_weighted_mean_and_takes_the_longer_context(parents, tmp_path):
    art = merge(MergeConfig(from_=("short", "long"), weights=(1.0, 3.0)), parents, tmp_path / "m")
    a, b = (tensors(parents[p].path("checkpoint")) for p in ("short", "long"))
    merged = tensors(tmp_path / "m" / art.outputs["checkpoint"])
    assert set(merged) == set(a)
    for k in a:
        torch.testing.assert_close(merged[k], 0.25 * a[k] + 0.75 * b[k], rtol=0, atol=1e-6)
    cfg = json.loads((tmp_path / "m" / "hf" / "config.json").read_text())
    assert cfg["rope_parameters"]["rope_theta"] == 4e4 and cfg["max_position_embeddings"] == 128
    assert art.extra["model"]["rope_theta"] == 4e4 and art.extra["seq_length"] == 128
    assert art.extra["tokens_total"] == 2000
    from stages.training.checkpoint import is_complete, read_state
    ckpt = tmp_path / "m" / art.outputs["checkpoint"]
    assert is_complete(ckpt) and read_state(ckpt).tokens_total == 2000  # for token-based schedules


def test_tied_embeddings_survive_the_merge(parents, tmp_path):
    from safetensors import safe_open
    art = merge(MergeConfig(from_=("short", "long")), parents, tmp_path / "m")
    hf = tmp_path / "m" / art.outputs["hf"]
    assert json.loads((hf / "config.json").read_text())["tie_word_embeddings"] is True
    names = set()
    for f in hf.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as fh:
            names |= set(fh.keys())
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    assert "output_layer.weight" not in tensors(tmp_path / "m" / art.outputs["checkpoint"])
    assert art.extra["model"]["tied_embeddings"] is True


def test_task_arithmetic_adds_the_weighted_task_vector_to_the_base(parents, tmp_path):
    cfg = MergeConfig(from_=("long", "short"), method="task_arithmetic", base="short", weights=(0.4, 1.0))
    art = merge(cfg, parents, tmp_path / "m")
    base, ext = (tensors(parents[p].path("checkpoint")) for p in ("short", "long"))
    merged = tensors(tmp_path / "m" / art.outputs["checkpoint"])
    for k in base:
        torch.testing.assert_close(merged[k], base[k] + 0.4 * (ext[k] - base[k]), rtol=0, atol=1e-6)
    assert art.extra["model"]["rope_theta"] == 4e4  # the longer context's, whatever the base says


def test_merged_model_loads_in_transformers_with_the_megatron_logits(parents, tmp_path):
    """Both formats of the merge hold the same model, at the longer context and raised theta."""
    from transformers import AutoModelForCausalLM

    from stages.models.convert import spec_from_hf_config
    from stages.training.checkpoint import load_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model, causal_mask
    from stages.specs import PrecisionSpec
    art = merge(MergeConfig(from_=("short", "long")), parents, tmp_path / "m")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "m" / "hf"), dtype=torch.float32).eval()
    spec = spec_from_hf_config(hf.config.to_dict())
    assert (spec.rope_theta, spec.max_position_embeddings) == (4e4, 128)
    tokens = torch.randint(0, SPEC.vocab_size, (2, 128), generator=torch.Generator().manual_seed(0))
    with megatron_world(), torch.no_grad():
        model = build_model(spec, PrecisionSpec(), device="cpu")
        load_checkpoint(tmp_path / "m" / art.outputs["checkpoint"], model, None)
        want = model.eval()(tokens, torch.arange(128).expand(2, 128), causal_mask(128, "cpu"))
        got = hf(tokens).logits
    assert (got - want[..., :SPEC.vocab_size]).abs().max() < 1e-4


# ---- validation: a merge that returns one parent unchanged is refused (no mergekit run needed)

IDENTITY_MERGES = [
    # (config, the parent it would return unchanged)
    (dict(from_=("ext", "base"), method="task_arithmetic", base="base"), "ext"),   # weights 1.0 each
    (dict(from_=("ext", "base"), method="task_arithmetic", base="base", weights=(1.0, 0.3)), "ext"),
    (dict(from_=("ext", "base"), method="task_arithmetic", base="base", weights=(0.0, 1.0)), "base"),
    (dict(from_=("a", "b"), method="task_arithmetic", base="c", weights=(0.0, 1.0)), "b"),
    (dict(from_=("ext", "base"), method="ties", base="base"), "ext"),               # density 1
    (dict(from_=("a", "b"), method="linear", weights=(1.0, 0.0)), "a"),
    (dict(from_=("a", "b", "c"), method="linear", weights=(0.0, 2.0, 0.0)), "b"),
    (dict(from_=("ext", "base"), method="slerp", base="base", weights=(0.0, 1.0)), "base"),  # t = 0
    (dict(from_=("ext", "base"), method="slerp", base="base", weights=(1.0, 0.0)), "ext"),   # t = 1
]


@pytest.mark.parametrize("kwargs, same", IDENTITY_MERGES)
def test_a_merge_that_is_one_parent_is_refused_with_the_field(kwargs, same):
    from stages.schema import ConfigError, from_dict
    data = {("from" if k == "from_" else k): list(v) if isinstance(v, tuple) else v
            for k, v in kwargs.items()}
    with pytest.raises(ConfigError) as e:
        from_dict(MergeConfig, data, "stages.merge-1")
    msg = str(e.value)
    assert msg.startswith("stages.merge-1.weights: "), msg
    assert f"returns {same!r} unchanged" in msg and "drop the merge stage" in msg


@pytest.mark.parametrize("kwargs", [
    dict(from_=("ext", "base"), method="task_arithmetic", base="base", weights=(0.75, 0.25)),
    dict(from_=("ext", "base"), method="ties", base="base", density=0.5),     # trimmed: a change
    dict(from_=("a", "b"), method="task_arithmetic", base="c", weights=(1.0, 1.0)),  # two vectors
    dict(from_=("a", "b"), method="task_arithmetic", base="c", weights=(0.0, 0.5)),
    dict(from_=("a", "b")),                                                   # linear, equal
    dict(from_=("ext", "base"), method="slerp", base="base", weights=(1.0, 3.0)),
])
def test_a_real_mix_is_accepted(kwargs):
    assert MergeConfig(**kwargs).identity_of() is None


def test_the_recipe_merges_mix():
    """merge-1..3 of the full recipe once used task_arithmetic's default weight 1.0 on the
    extension's task vector: the extension, unchanged."""
    from flows import config
    cfg = config.load(["pipeline=granite-4.1"])
    for name in ("merge-1", "merge-2", "merge-3"):
        merge = cfg.stages[name].config
        assert merge.identity_of() is None
        ext = merge.from_[0]
        assert 0 < merge.weight_of()[ext] < 1, (name, merge.weights)
