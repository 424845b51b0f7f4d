"""The CPU rollout engine fed by the one weight-streaming path (issue 12, item 3).

A live tiny Megatron-core ``GPTModel`` (CPU shim, gloo world of one; vocabulary 1000, padded to
1024 inside Megatron, so the dropped padding rows are exercised; init std 0.1 and random norms, so
its next-token log-probs span several nats and a mapping error moves log-probs by O(0.1))
streams ``hf_weights_from_model`` into ``CpuEngine.load_weights``. Then:

- ``score`` equals log_softmax(Megatron logits[:vocab] / T) at the completion tokens, tied and
  untied, within 1e-5 (fp32; measured 2026-12-04: 4.8e-7);
- the log-probs ``generate`` returns (KV cache, left padding, compacted batch) equal ``score`` of
  the same tokens (no cache, no padding) within 1e-5 (measured: 4.8e-7);
- stops: a "stop" row ends with its first stop id, a "length" row has max_new_tokens tokens and
  no stop id; top-p draws stay inside the nucleus;
- a prompt alone and inside a batch of others gets the same completions; the same seeds give the
  same tokens, other seeds others;
- after the Megatron weights change, ``load_weights`` makes the engine's log-probs follow;
- a stream with a missing, unexpected or misshaped name is refused, naming it, and the engine
  refuses to sample until a whole stream has landed.
"""
from __future__ import annotations

import dataclasses
import importlib.util

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(),
                                reason="the CPU shim must not be applied on a GPU machine")

SPEC = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
            kv_channels=16, ffn_hidden_size=176, vocab_size=1000, max_position_embeddings=128,
            rope_theta=300.0, init_std=0.1)
TOLERANCE = 1e-5   # fp32; both sides measured 4.8e-7 apart
IDS = [5, 17, 200, 42, 9, 77, 128, 3, 999, 0, 64, 512, 7, 300]
PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11], [12], [600, 601, 602, 603, 604]]
STOPS = list(range(0, 1000, 25))   # 40 ids: some rows stop, some run to the cap


def megatron_logits(model, ids: list[int]) -> torch.Tensor:
    from stages.training.model import causal_mask
    with torch.no_grad():
        return model(torch.tensor([ids]), torch.arange(len(ids))[None],
                     causal_mask(len(ids), "cpu")).float()[0]


def random_model(spec, seed: int):
    from stages.specs import PrecisionSpec
    from stages.training.model import build_model
    torch.manual_seed(seed)
    model = build_model(spec, PrecisionSpec(), device="cpu").eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layernorm" in name:
                p.uniform_(0.5, 1.5)      # a dropped or swapped norm shows
    return model


@pytest.fixture(scope="module")
def world():
    from stages.models.weights import hf_weights_from_model
    from stages.rl.engine import make_engine
    from stages.specs import ModelSpec
    from stages.training.cpu_shim import megatron_world
    spec = ModelSpec(**SPEC)
    with megatron_world():
        model = random_model(spec, seed=0)
        engine = make_engine("cpu", spec)
        engine.load_weights(hf_weights_from_model(model, spec))
        yield dict(spec=spec, model=model, engine=engine)


def sample(engine, prompts=PROMPTS, seeds=(11, 12, 13, 14), **kw):
    args = dict(n=4, max_new_tokens=24, temperature=0.8, top_p=0.9, stop_ids=STOPS)
    return engine.generate(prompts, seeds=list(seeds), **{**args, **kw})


@pytest.mark.parametrize("tied", [True, False])
def test_score_equals_megatron_log_softmax(world, tied):
    from stages.models.weights import hf_weights_from_model
    from stages.rl.engine import make_engine
    spec = dataclasses.replace(world["spec"], tied_embeddings=tied)
    model = world["model"] if tied else random_model(spec, seed=1)
    engine = world["engine"] if tied else make_engine("cpu", spec)
    if not tied:
        engine.load_weights(hf_weights_from_model(model, spec))
    for temperature in (1.0, 0.6):
        ref = torch.log_softmax(megatron_logits(model, IDS)[:, :spec.vocab_size] / temperature, -1)
        want = [ref[i - 1, IDS[i]].item() for i in range(4, len(IDS))]
        got = engine.score(IDS[:4], IDS[4:], temperature)
        assert max(abs(a - b) for a, b in zip(got, want, strict=True)) < TOLERANCE
    spread = (ref.max(-1).values - ref.min(-1).values).min()
    assert spread > 3, "log-probs must span nats (not a flat distribution) for the test to bite"


def test_generated_logprobs_equal_score_and_stops_hold(world):
    engine, stops = world["engine"], set(STOPS)
    out = sample(engine)
    finishes = set()
    for prompt, group in zip(PROMPTS, out, strict=True):
        assert len(group) == 4
        for c in group:
            finishes.add(c.finish)
            assert len(c.tokens) == len(c.logprobs) >= 1
            got = engine.score(prompt, c.tokens, 0.8)
            assert max(abs(a - b) for a, b in zip(got, c.logprobs)) < TOLERANCE
            assert not stops & set(c.tokens[:-1])           # nothing after the first stop id
            if c.finish == "stop":
                assert c.tokens[-1] in stops
            else:
                assert c.finish == "length" and len(c.tokens) == 24 and c.tokens[-1] not in stops
    assert finishes == {"stop", "length"}, "the seeds must exercise both ends"


def test_top_p_draws_stay_in_the_nucleus(world):
    engine, top_p, temperature = world["engine"], 0.3, 1.3
    out = sample(engine, top_p=top_p, temperature=temperature, stop_ids=[])
    for prompt, group in zip(PROMPTS, out):
        for c in group:
            with torch.inference_mode():
                logits = engine.model(input_ids=torch.tensor([prompt + c.tokens])).logits[0]
            probs = torch.softmax(logits[len(prompt) - 1:-1] / temperature, -1)
            for step, token in enumerate(c.tokens):
                p = probs[step]
                mass_above = p[p > p[token]].sum().item()   # mass of the tokens ranked higher
                assert mass_above < top_p, (step, token, mass_above)


def test_a_prompt_samples_the_same_alone_and_in_any_batch(world):
    engine = world["engine"]
    batch = sample(engine)
    alone = sample(engine, prompts=[PROMPTS[1]], seeds=[12])
    reordered = sample(engine, prompts=[PROMPTS[3], PROMPTS[1], PROMPTS[0]], seeds=[14, 12, 11])
    for other in (alone[0], reordered[1]):
        assert [c.tokens for c in other] == [c.tokens for c in batch[1]]
        for a, b in zip(other, batch[1]):
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < TOLERANCE


def test_seeds_decide_the_samples(world):
    engine = world["engine"]
    first, again = sample(engine), sample(engine)
    other = sample(engine, seeds=(21, 22, 23, 24))
    tokens = lambda out: [[c.tokens for c in g] for g in out]   # noqa: E731
    assert tokens(first) == tokens(again)
    assert all(a != b for a, b in zip(tokens(first), tokens(other)))
    assert len({tuple(c.tokens) for c in first[0]}) > 1, "the n rows of a prompt differ"


def test_loading_changed_weights_moves_the_logprobs(world):
    from stages.models.weights import hf_weights_from_model
    spec, model, engine = world["spec"], world["model"], world["engine"]
    before = engine.score(IDS[:4], IDS[4:], 1.0)
    fc2 = model.decoder.layers[1].mlp.linear_fc2.weight
    saved = fc2.detach().clone()
    try:
        with torch.no_grad():
            fc2.mul_(3.0)
        assert engine.score(IDS[:4], IDS[4:], 1.0) == before    # nothing moves until a load
        engine.load_weights(hf_weights_from_model(model, spec))
        ref = torch.log_softmax(megatron_logits(model, IDS)[:, :spec.vocab_size], -1)
        want = [ref[i - 1, IDS[i]].item() for i in range(4, len(IDS))]
        after = engine.score(IDS[:4], IDS[4:], 1.0)
        assert max(abs(a - b) for a, b in zip(after, want)) < TOLERANCE
        assert max(abs(a - b) for a, b in zip(after, before)) > 1e-2
    finally:
        with torch.no_grad():
            fc2.copy_(saved)
        engine.load_weights(hf_weights_from_model(model, spec))


def test_bad_streams_are_refused_by_name(world):
    from stages.models.weights import hf_weights_from_model
    spec, model, engine = world["spec"], world["model"], world["engine"]
    pairs = list(hf_weights_from_model(model, spec))
    name, tensor = pairs[3]
    with pytest.raises(ValueError, match=f"missing: {name}"):
        engine.load_weights(pairs[:3] + pairs[4:])
    with pytest.raises(RuntimeError, match="call load_weights first"):
        engine.score(IDS[:4], IDS[4:], 1.0)                             # half-loaded: refused
    with pytest.raises(ValueError, match="unexpected: lm_head.weight"):
        engine.load_weights(pairs + [("lm_head.weight", pairs[0][1])])   # tied: no lm_head
    with pytest.raises(ValueError, match=f"misshaped: {name}"):
        engine.load_weights(pairs[:3] + [(name, tensor[:-1])] + pairs[4:])
    engine.load_weights(pairs)                                          # whole again


def test_bad_sampling_arguments_are_refused(world):
    engine = world["engine"]
    with pytest.raises(ValueError, match="temperature=0"):
        sample(engine, temperature=0)
    with pytest.raises(ValueError, match="3 seeds for 4 prompts"):
        sample(engine, seeds=(1, 2, 3))
    with pytest.raises(ValueError, match=r"prompts\[0\] has ids outside"):
        sample(engine, prompts=[[1000]], seeds=[1])


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None,
                    reason="vLLM is installed here: tests/gpu/test_vllm_rollout.py runs it")
def test_the_vllm_engine_says_where_it_runs():
    from stages.rl.engine import make_engine
    from stages.specs import ModelSpec
    with pytest.raises(RuntimeError, match=r"Dockerfile.*pip install \.\[vllm\]"):
        make_engine("vllm", ModelSpec(**SPEC))
    with pytest.raises(ValueError, match="kind='tpu'; choose one of cpu, vllm"):
        make_engine("tpu", ModelSpec(**SPEC))
