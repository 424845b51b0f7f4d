"""Granite's multipliers (embedding, residual, attention, logits scaling) in the Megatron model and
through the conversion both ways, against transformers' own ``GraniteForCausalLM``.

The model is the tiny Granite shape of test_convert (2 layers x 64, 4 heads / 2 KV groups, head dim
16, vocab 300 padded to 384) with multipliers of the kind real Granite configs carry. Random
weights, random norms. Megatron runs in-process in a world of one (CPU shim), and under TP=2 in two
gloo processes.
"""
from __future__ import annotations

import dataclasses
import json
import math
import socket
from pathlib import Path

import pytest
import torch

from stages.schema import ConfigError, from_dict, identity_dict
from stages.specs import ModelSpec

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shim must not be applied on a GPU machine")

MODEL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, ffn_hidden_size=176, vocab_size=300, max_position_embeddings=64)
# Of the kind Granite's Hugging Face configs carry (attention 1/head_dim, not 1/sqrt(head_dim)).
GRANITE = dict(embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=0.015625,
               logits_scaling=8.0)
SEQ = 48
TOLERANCE = 1e-5  # fp32 logits, transformers vs Megatron
# Init std wider than the default 0.02: logits of order 1, a harder comparison at TOLERANCE
INIT_STD = 0.1


def hf_granite(root: Path, seed: int, tied: bool = True, **multipliers) -> Path:
    """A ``GraniteForCausalLM`` with random weights (norms too), saved by transformers itself from
    a ``GraniteConfig`` written here, not by our converter."""
    from transformers import GraniteConfig, GraniteForCausalLM
    cfg = GraniteConfig(
        vocab_size=MODEL["vocab_size"], hidden_size=MODEL["hidden_size"],
        intermediate_size=MODEL["ffn_hidden_size"], num_hidden_layers=MODEL["num_layers"],
        num_attention_heads=MODEL["num_attention_heads"],
        num_key_value_heads=MODEL["num_query_groups"], head_dim=MODEL["kv_channels"],
        max_position_embeddings=MODEL["max_position_embeddings"], rms_norm_eps=1e-5,
        tie_word_embeddings=tied, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        initializer_range=INIT_STD,
        **multipliers)
    torch.manual_seed(seed)
    model = GraniteForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.save_pretrained(str(root))
    return root


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def megatron_logits(spec: ModelSpec, ckpt: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of ``spec``'s Megatron model loaded from ``ckpt`` (padding columns dropped)."""
    from stages.training.checkpoint import load_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model, causal_mask
    from stages.specs import PrecisionSpec
    b, s = tokens.shape
    with megatron_world():
        model = build_model(spec, PrecisionSpec(), device="cpu").eval()
        load_checkpoint(ckpt, model, None)
        with torch.no_grad():
            out = model(tokens, torch.arange(s).expand(b, s), causal_mask(s, "cpu")).float()
    return out[..., :spec.vocab_size]


def tokens(seed: int) -> torch.Tensor:
    return torch.randint(0, MODEL["vocab_size"], (2, SEQ), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- HF -> Megatron
@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_hf_granite_with_multipliers_converts_to_the_same_logits(tmp_path, tied):
    from stages.models.convert import hf_to_megatron
    hf = hf_granite(tmp_path / "hf", seed=3, tied=tied, **GRANITE)
    spec = hf_to_megatron(hf, tmp_path / "megatron")
    assert spec == ModelSpec(**MODEL, tied_embeddings=tied, init_std=INIT_STD, **GRANITE)
    from tests.unit.test_convert import model_tensors
    assert ("output_layer.weight" in model_tensors(tmp_path / "megatron")) is not tied
    x = tokens(1)
    ref, got = hf_logits(hf, x), megatron_logits(spec, tmp_path / "megatron", x)
    diff = (got - ref).abs().max().item()
    print(f"HF -> Megatron, {'tied' if tied else 'untied'}, multipliers {GRANITE}: "
          f"max abs logit difference {diff:.3g} (logits up to {ref.abs().max().item():.3g})")
    assert diff < TOLERANCE


@pytest.mark.parametrize("which", sorted(GRANITE))
def test_each_multiplier_alone_is_applied_where_transformers_applies_it(tmp_path, which):
    """One multiplier at a time: a hook in the wrong place (or a missing one) cannot hide behind
    the others. The plain model's logits differ, so each comparison can fail."""
    from stages.models.convert import hf_to_megatron
    # GraniteConfig's own attention_multiplier default is 1.0: say the plain 1/sqrt(head_dim)
    alone = {"attention_multiplier": MODEL["kv_channels"] ** -0.5, which: GRANITE[which]}
    hf = hf_granite(tmp_path / "hf", seed=4, **alone)
    spec = hf_to_megatron(hf, tmp_path / "megatron")
    assert getattr(spec, which) == GRANITE[which]
    assert all(getattr(spec, k) in (1.0, None) for k in GRANITE if k != which)
    x = tokens(2)
    ref = hf_logits(hf, x)
    assert (megatron_logits(spec, tmp_path / "megatron", x) - ref).abs().max().item() < TOLERANCE
    plain = dataclasses.replace(spec, **{which: None if which == "attention_multiplier" else 1.0})
    assert (megatron_logits(plain, tmp_path / "megatron", x) - ref).abs().max().item() > 100 * TOLERANCE


# ---------------------------------------------------------------- Megatron -> HF -> Megatron
@pytest.fixture(scope="module")
def granite_world(tmp_path_factory):
    """A random-init Megatron checkpoint of a spec with Granite's multipliers, and its HF export."""
    from stages.models.convert import megatron_to_hf
    from tests.unit.test_convert import save_random_checkpoint
    root = tmp_path_factory.mktemp("granite")
    spec = ModelSpec(**MODEL, **GRANITE, init_std=INIT_STD)
    ckpt = save_random_checkpoint(root / "megatron", spec)
    return dict(spec=spec, ckpt=ckpt, hf=megatron_to_hf(ckpt, spec, root / "hf"), root=root)


def test_megatron_export_computes_the_megatron_logits_in_transformers(granite_world):
    x = tokens(3)
    ref = megatron_logits(granite_world["spec"], granite_world["ckpt"], x)
    got = hf_logits(granite_world["hf"], x)
    diff = (got - ref).abs().max().item()
    print(f"Megatron -> HF, multipliers {GRANITE}: max abs logit difference {diff:.3g}")
    assert diff < TOLERANCE
    cfg = json.loads((granite_world["hf"] / "config.json").read_text())
    assert {k: cfg[k] for k in GRANITE} == GRANITE
    assert cfg["tie_word_embeddings"] is True


def test_round_trip_with_multipliers_is_bit_identical(granite_world):
    from stages.models.convert import hf_to_megatron
    from tests.unit.test_convert import model_tensors
    back = granite_world["root"] / "back"
    assert hf_to_megatron(granite_world["hf"], back) == granite_world["spec"]
    before, after = model_tensors(granite_world["ckpt"]), model_tensors(back)
    assert sorted(before) == sorted(after) and "output_layer.weight" not in after  # still tied
    v = MODEL["vocab_size"]
    for key, t in before.items():
        rows = slice(0, v) if key == "embedding.word_embeddings.weight" else slice(None)
        assert torch.equal(after[key][rows], t[rows]), key


def test_tied_export_keeps_one_shared_matrix(granite_world):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    with safe_open(str(granite_world["hf"] / "model.safetensors"), framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())
    model = AutoModelForCausalLM.from_pretrained(granite_world["hf"], dtype=torch.float32)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_training_loss_and_gradients_match_transformers(granite_world, tmp_path):
    """What training sees: Megatron's per-token loss (vocab-parallel cross-entropy on the scaled
    logits) and the gradients back through every hook equal transformers'. A converted checkpoint's
    padded vocabulary rows are zero, so their logits are 0 and join the softmax: the HF side
    appends them."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from stages.models.convert import hf_to_megatron
    from stages.training.checkpoint import load_checkpoint
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model, causal_mask, padded_vocab_size
    from stages.specs import PrecisionSpec
    spec, x = granite_world["spec"], tokens(6)
    labels, (b, s) = torch.roll(x, -1, dims=1), x.shape
    hf = AutoModelForCausalLM.from_pretrained(granite_world["hf"], dtype=torch.float32)
    logits = hf(input_ids=x).logits
    pad = torch.zeros(b, s, padded_vocab_size(spec.vocab_size) - spec.vocab_size)
    ref = F.cross_entropy(torch.cat([logits, pad], -1).flatten(0, 1), labels.flatten(),
                          reduction="none").view(b, s)
    ref.mean().backward()
    hf_to_megatron(granite_world["hf"], tmp_path / "m")  # the padding rows zero
    with megatron_world():
        model = build_model(spec, PrecisionSpec(), device="cpu")
        load_checkpoint(tmp_path / "m", model, None)
        losses = model(x, torch.arange(s).expand(b, s), causal_mask(s, "cpu"), labels=labels)
        losses.mean().backward()
    print(f"per-token loss, Megatron vs HF: max abs difference {(losses - ref).abs().max().item():.3g}")
    assert (losses - ref).abs().max().item() < TOLERANCE
    got = dict(model.named_parameters())
    pairs = {"embedding.word_embeddings.weight": hf.model.embed_tokens.weight,  # tied: both uses
             "decoder.layers.0.self_attention.linear_proj.weight": hf.model.layers[0].self_attn.o_proj.weight,
             "decoder.layers.1.mlp.linear_fc2.weight": hf.model.layers[1].mlp.down_proj.weight,
             "decoder.final_layernorm.weight": hf.model.norm.weight}
    for name, p in pairs.items():
        g, r = got[name].grad[:p.shape[0]], p.grad
        print(f"{name}: max abs gradient difference {(g - r).abs().max().item():.3g} "
              f"(gradients up to {r.abs().max().item():.3g})")
        assert (g - r).abs().max().item() < 1e-5 * r.abs().max().item(), name


# ---------------------------------------------------------------- TP=2
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp2_rank(rank: int, port: int, spec: ModelSpec, ckpt: str, x: torch.Tensor, out: str) -> None:
    """One rank of a TP=2 gloo world: load ``ckpt``, gather the vocabulary-split logits."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from stages.training.checkpoint import load_checkpoint
    from stages.training.cpu_shim import apply_cpu_shim, init_cpu_rng_tracker
    from stages.training.model import build_model, causal_mask, padded_vocab_size
    from stages.specs import PrecisionSpec
    torch.set_num_threads(1)
    apply_cpu_shim()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        ps.initialize_model_parallel(tensor_model_parallel_size=2)
        init_cpu_rng_tracker()
        model = build_model(spec, PrecisionSpec(), device="cpu", tensor_parallel=2).eval()
        load_checkpoint(Path(ckpt), model, None)
        b, s = x.shape
        with torch.no_grad():
            part = model(x, torch.arange(s).expand(b, s), causal_mask(s, "cpu")).float().contiguous()
        assert part.shape[-1] == padded_vocab_size(spec.vocab_size) // 2  # this rank's vocab half
        parts = [torch.empty_like(part) for _ in range(2)]
        dist.all_gather(parts, part)
        if rank == 0:
            torch.save(torch.cat(parts, dim=-1)[..., :spec.vocab_size], out)
        ps.destroy_model_parallel()
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_model_computes_the_same_logits(granite_world, tmp_path):
    """Under TP=2 the hooks see vocabulary-split logits and all-reduced branch outputs."""
    import torch.multiprocessing as mp
    x, out = tokens(5), tmp_path / "logits.pt"
    mp.spawn(_tp2_rank, args=(_free_port(), granite_world["spec"], str(granite_world["ckpt"]), x,
                              str(out)), nprocs=2, join=True)
    ref = hf_logits(granite_world["hf"], x)
    diff = (torch.load(out) - ref).abs().max().item()
    print(f"Megatron TP=2 vs HF, multipliers {GRANITE}: max abs logit difference {diff:.3g}")
    assert diff < TOLERANCE


# ---------------------------------------------------------------- spec and config
def test_a_plain_model_gets_no_hooks_and_keeps_its_key():
    from stages.training.cpu_shim import megatron_world
    from stages.training.model import build_model
    from stages.specs import PrecisionSpec
    plain = ModelSpec(**MODEL)
    assert "attention_multiplier" not in identity_dict(plain)  # every earlier stage key stays
    assert identity_dict(ModelSpec(**MODEL, attention_multiplier=0.25))["attention_multiplier"] == 0.25
    with megatron_world():
        torch.manual_seed(0)
        model = build_model(plain, PrecisionSpec(), device="cpu")
        assert not any(m._forward_hooks for m in model.modules())
        torch.manual_seed(0)
        granite = build_model(ModelSpec(**MODEL, **GRANITE), PrecisionSpec(), device="cpu")
        # 1 embedding + 2 per layer + 1 output layer; no new parameter or buffer
        assert sum(len(m._forward_hooks) for m in granite.modules()) == 2 + 2 * MODEL["num_layers"]
        assert granite.state_dict().keys() == model.state_dict().keys()
        assert granite.decoder.layers[0].self_attention.core_attention.softmax_scale == 0.015625


@pytest.mark.parametrize("field", sorted(GRANITE))
@pytest.mark.parametrize("value", [0, -1.0])
def test_non_positive_multipliers_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"model\.{field}: must be > 0, got {value}"):
        from_dict(ModelSpec, {**MODEL, field: value}, "model")


def test_granite_config_without_attention_multiplier_means_transformers_default():
    """transformers' GraniteConfig defaults attention_multiplier to 1.0, not 1/sqrt(head_dim); a
    Llama config has no multipliers at all (a plain decoder)."""
    from stages.models.convert import spec_from_hf_config
    base = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "intermediate_size": 176, "vocab_size": 300,
            "max_position_embeddings": 64}
    granite = spec_from_hf_config({**base, "model_type": "granite", "logits_scaling": 4})
    assert (granite.attention_multiplier, granite.logits_scaling) == (1.0, 4.0)
    sqrt = spec_from_hf_config({**base, "model_type": "granite", "attention_multiplier": 1 / math.sqrt(16)})
    assert sqrt.attention_multiplier is None  # the plain scale: the plain spec and its stage key
    llama = spec_from_hf_config({**base, "model_type": "llama"})
    assert llama == ModelSpec(**MODEL, tied_embeddings=False, layernorm_epsilon=1e-6)


# ---------------------------------------------------------------- merge
def test_merge_keeps_the_multipliers(granite_world, tmp_path):
    """A linear merge of two models with the same multipliers keeps them in config.json (mergekit
    copies the base's config; set_context rewrites only theta and max positions) and in the spec
    of the Megatron checkpoint the next stage trains from."""
    from stages.base import Artifact, RunContext, StageInput
    from stages.models.merge import MergeConfig, merge_models
    from stages.schema import to_dict
    from tests.unit.test_convert import save_random_checkpoint
    spec = granite_world["spec"]
    parents = {}
    for name, ckpt in (("a", granite_world["ckpt"]),
                       ("b", save_random_checkpoint(tmp_path / "b" / "checkpoints", spec))):
        out = Path(ckpt).parents[1]
        art = Artifact(kind="pretrain", stage=name, key=f"k-{name}",
                       outputs={"checkpoint": str(Path(ckpt).relative_to(out))},
                       extra={"model": to_dict(spec), "seq_length": 64, "tokens_total": 10})
        parents[name] = StageInput(name, out, art)
    (tmp_path / "m").mkdir()
    art = merge_models(MergeConfig(from_=("a", "b")), parents, tmp_path / "m",
                       RunContext(stage="m", key="k-m", cluster=None))
    cfg = json.loads((tmp_path / "m" / "hf" / "config.json").read_text())
    assert {k: cfg[k] for k in GRANITE} == GRANITE
    assert from_dict(ModelSpec, art.extra["model"], "model") == spec


def test_models_with_different_multipliers_are_not_one_shape():
    """merge and extend_context compare parents with shape_differences: a multiplier set on one
    side only (attention_multiplier is left out of the identity while unset) still counts."""
    from stages.specs import shape_differences
    plain, granite = ModelSpec(**MODEL), ModelSpec(**MODEL, **GRANITE)
    assert shape_differences(plain, granite) == [
        "embedding_multiplier: 1.0 vs 12.0", "residual_multiplier: 1.0 vs 0.22",
        "logits_scaling: 1.0 vs 8.0", "attention_multiplier: None vs 0.015625"]
    assert shape_differences(granite, dataclasses.replace(granite, attention_multiplier=None)) == [
        "attention_multiplier: 0.015625 vs None"]
    assert shape_differences(granite, dataclasses.replace(granite, rope_theta=1e6)) == []
