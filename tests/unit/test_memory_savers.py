"""The memory savers the compute plan counts on reach Megatron as the plan assumes.

`cluster.recompute` (or a stage's `parallel.recompute`) becomes ``TransformerConfig``'s
recompute fields; the distributed optimizer's GPU path (``step.make_distributed_optimizer``, DDP
with ``use_distributed_optimizer``, Megatron's own checkpoint format) needs CUDA and is not run
here: the cluster refuses both savers on CPU (tests/unit/test_compute_plan.py).
"""
from __future__ import annotations

import pytest

from stages.specs import ModelSpec, PrecisionSpec

SPEC = ModelSpec(hidden_size=64, num_layers=4, num_attention_heads=4, num_query_groups=2,
                 kv_channels=16, ffn_hidden_size=176, vocab_size=1024)


@pytest.mark.parametrize("recompute, granularity, method, layers", [
    ("none", None, None, None),
    ("selective", "selective", None, None),
    ("full", "full", "uniform", 1),       # every layer, one at a time: only its input is kept
])
def test_recompute_reaches_the_transformer_config(recompute, granularity, method, layers):
    from stages.training.model import transformer_config
    cfg = transformer_config(SPEC, PrecisionSpec(), device="cpu", recompute=recompute)
    assert (cfg.recompute_granularity, cfg.recompute_method, cfg.recompute_num_layers) == (
        granularity, method, layers)
    if recompute == "selective":
        assert cfg.recompute_modules == ["core_attn"]    # the 5as/h term of Korthikanti et al.


def test_every_recompute_setting_has_a_megatron_mapping():
    import typing

    from stages.cluster import LAYOUT_SETTINGS, ParallelSpec
    from stages.training.model import RECOMPUTE
    choices = typing.get_args(typing.get_type_hints(ParallelSpec)["recompute"])
    assert set(choices) == set(RECOMPUTE) == set(LAYOUT_SETTINGS["recompute"])
