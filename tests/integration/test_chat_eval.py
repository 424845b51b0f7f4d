"""The evaluate kind's chat metrics (``stages/evaluation/chat_eval.py``) on a real tiny model.

A module fixture trains a byte-level BPE tokenizer with the chat role tokens on arithmetic chats,
writes them (rendered with the chat template) as a tokenize stage's Megatron indexed dataset, and
trains a tiny Granite-shaped model on them through the real pretrain worker, so its greedy replies
look like "23 + 45 = 61.<|end_of_text|>" (right or not). A hand-written curate artifact (formats.md:
kept/heldout parquet, eval_prompts.jsonl) is what the evaluate stage reads.

- The stage runs through the worker entry and reports every ``chat/*`` metric.
- ``chat/heldout_loss`` equals a plain forward over each held-out conversation with the test's own
  assistant mask (located in the one-go encoding of the rendered text) within 1e-5.
- Exact match is 1.0 when the references are the final answers of the model's own greedy replies
  (decoded here one prompt at a time, one token per forward), and 0.0 when every one is off by one.
- Refusals at validation: neither data nor chat, heldout_length without data, a chat stage that is
  not a curate stage, a curate stage of another tokenizer; a config without chat keeps its key.
- Lineage: of the curate stage, the evaluation reads the held-out split only.
"""
from __future__ import annotations

import json
import re

import pytest

from stages.base import Artifact, RunContext, StageInput, read_artifact
from stages.data.chat_format import ROLE_TOKENS, render

from tests.support.tiny_models import (MODEL, SEQ, chat, curate_stage, pretrain_config,
                                       run_worker, tokenize_stage, two_turns)

PRETRAIN = pretrain_config(400)


HELDOUT = [chat(12, 34), chat(45, 27), two_turns(21, 13, 8), chat(58, 39), two_turns(33, 30, 5)]
PROMPTS = [{"id": f"p{i}", "prompt": f"What is {a} + {b}?", "answer": str(a + b)}
           for i, (a, b) in enumerate([(14, 22), (31, 17), (52, 36), (9, 8), (40, 11), (27, 25)])]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chat_eval")
    tokenize = tokenize_stage(root)
    model = root / "pretrain"
    run_worker(model, "pretrain", "pretrain", PRETRAIN, {"tokenize": tokenize})
    curate = curate_stage(root, "curate", HELDOUT, PROMPTS)
    return {"root": root, "model": model, "curate": curate}


def evaluate(trained, curate: StageInput, name: str, **fields) -> Artifact:
    """The evaluate stage in this process (the worker path is tested once, below)."""
    from stages.evaluation.evaluate import Evaluate, EvaluateConfig
    config = EvaluateConfig(from_="pretrain", chat=curate.name, **fields)
    out = trained["root"] / name
    out.mkdir()
    model = StageInput("pretrain", trained["model"], read_artifact(trained["model"]))
    return Evaluate.run(config, {"pretrain": model, curate.name: curate}, out,
                        RunContext(stage=name, key="e" * 64, cluster=None))


@pytest.fixture(scope="module")
def loaded(trained):
    """The trained model as ``run_eval`` loads it, and its tokenizer."""
    from tokenizers import Tokenizer
    from stages.evaluation.run_eval import _load_model
    from stages.specs import spec_of_artifact
    from stages.training.cpu_shim import megatron_world
    art = read_artifact(trained["model"])
    spec = spec_of_artifact(StageInput("pretrain", trained["model"], art))
    tok = Tokenizer.from_file(str(trained["model"] / art.outputs["tokenizer"]))
    with megatron_world():
        yield _load_model(spec, trained["model"] / art.outputs["checkpoint"], "cpu"), tok


def logits(model, ids: list[int]):
    import torch
    from stages.training.model import causal_mask
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return model(tokens, torch.arange(len(ids))[None], causal_mask(len(ids), "cpu"))[0].double()


def own_greedy(model, tok, prompt: str, max_new: int) -> str:
    """One prompt, one token per full forward, argmax over the tokenizer's ids."""
    ids = tok.encode(render([{"role": "user", "content": prompt}], add_generation_prompt=True),
                     add_special_tokens=False).ids
    stops = {tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|endoftext|>")}
    new = []
    for _ in range(max_new):
        nxt = int(logits(model, ids + new)[-1, :tok.get_vocab_size()].argmax())
        if nxt in stops:
            break
        new.append(nxt)
    return tok.decode(new)


# ------------------------------------------------------------------ tests
def test_the_stage_reports_every_chat_metric_through_the_worker(trained):
    out = trained["root"] / "eval-worker"
    log = run_worker(out, "evaluate", "eval-chat", {"from": "pretrain", "chat": "curate"},
                     {"pretrain": trained["model"], "curate": trained["curate"].out_dir})
    art = read_artifact(out)
    m = art.metrics
    assert {"chat/heldout_loss", "chat/heldout_tokens", "chat/heldout_conversations",
            "chat/heldout_truncated", "chat/exact_match", "chat/exact_match_prompts",
            "chat/exact_match_correct"} <= set(m)
    assert m["chat/heldout_conversations"] == len(HELDOUT)
    assert m["chat/heldout_truncated"] == 2  # the two-turn ones are longer than the context
    assert m["chat/exact_match_prompts"] == len(PROMPTS)
    assert 0.0 < m["chat/heldout_loss"] < 3.0  # it learned the format: far below ln(384) = 5.95
    assert 0.0 <= m["chat/exact_match"] <= 1.0
    assert m["chat/exact_match"] == m["chat/exact_match_correct"] / len(PROMPTS)
    rows = [json.loads(x) for x in (out / art.outputs["chat_samples"]).read_text().splitlines()]
    assert [r["id"] for r in rows] == [p["id"] for p in PROMPTS]
    assert sum(r["correct"] for r in rows) == m["chat/exact_match_correct"]
    assert "held-out assistant-token loss" in log and "greedy exact match" in log
    assert art.extra["chat_stage"] == "curate" and art.extra["chat_context"] == SEQ


def test_heldout_loss_equals_a_plain_forward_with_its_own_mask(trained, loaded):
    import torch
    model, tok = loaded
    start, end_role, end_turn = (tok.token_to_id(t) for t in ROLE_TOKENS)
    header = [start, *tok.encode("assistant", add_special_tokens=False).ids, end_role]
    total, count, cut = 0.0, 0, 0
    for messages in HELDOUT:
        ids = tok.encode(render(messages), add_special_tokens=False).ids  # one go, as HF would
        assistant = [False] * len(ids)  # tokens after an assistant header, through its end_turn
        for i in range(len(ids)):
            if ids[i:i + len(header)] == header:
                j = i + len(header)
                while ids[j] != end_turn:
                    assistant[j] = True
                    j += 1
                assistant[j] = True
        if len(ids) > SEQ + 1:  # the model's context: SEQ inputs, each with its next token
            ids, assistant, cut = ids[:SEQ + 1], assistant[:SEQ + 1], cut + 1
        logp = torch.log_softmax(logits(model, ids[:-1]), dim=-1)
        for t in range(len(ids) - 1):
            if assistant[t + 1]:
                total -= float(logp[t, ids[t + 1]])
                count += 1
    art = evaluate(trained, trained["curate"], "eval-loss", chat_samples=1, max_new_tokens=1)
    assert cut == 2 and art.metrics["chat/heldout_truncated"] == cut
    assert art.metrics["chat/heldout_tokens"] == count
    assert art.metrics["chat/heldout_loss"] == pytest.approx(total / count, abs=1e-5)


def test_exact_match_is_one_on_the_models_own_answers_and_zero_when_off(trained, loaded):
    model, tok = loaded
    replies = [own_greedy(model, tok, p["prompt"], 24) for p in PROMPTS]
    last_numbers = [re.findall(r"\d+", r) for r in replies]
    assert all(last_numbers), f"a reply without a number: {replies}"
    own = [dict(p, answer=n[-1]) for p, n in zip(PROMPTS, last_numbers)]
    right = curate_stage(trained["root"], "curate-own", HELDOUT, own)
    art = evaluate(trained, right, "eval-own", max_new_tokens=24, batch_size=4)
    assert art.metrics["chat/exact_match"] == 1.0 and art.metrics["chat/exact_match_correct"] == len(own)
    rows = [json.loads(x) for x in (trained["root"] / "eval-own" / "chat_samples.jsonl").open()]
    assert [r["completion"] for r in rows] == replies  # batched decoding == one at a time

    off = [dict(p, answer=str(int(p["answer"]) + 1)) for p in own]
    wrong = curate_stage(trained["root"], "curate-off", HELDOUT, off)
    art = evaluate(trained, wrong, "eval-off", max_new_tokens=24)
    assert art.metrics["chat/exact_match"] == 0.0 and art.metrics["chat/exact_match_prompts"] == len(off)

    art = evaluate(trained, right, "eval-two", max_new_tokens=24, chat_samples=2)
    assert art.metrics["chat/exact_match_prompts"] == 2  # the first chat_samples prompts


def test_final_answer_is_the_last_number_else_the_stripped_text():
    from stages.evaluation.chat_eval import final_answer
    assert final_answer("23 + 45 = 68.") == "68"
    assert final_answer("It is -3, not 1,234,567") == "1234567"
    assert final_answer("1,234 apples") == "1234" and final_answer("1, 2, 3") == "3"
    assert final_answer("2.50") == "2.50" and final_answer("68.0") != final_answer("68")
    assert final_answer("  Paris \n") == "Paris" and final_answer("") == ""


# ------------------------------------------------------------------ validation
def pipeline(**evaluate_fields) -> dict:
    base = {"data": {"kind": "prepare_data", "sources": {"web": {"generator": "web", "documents": 10}}},
            "tokenizer": {"kind": "train_tokenizer", "data": "data", "vocab_size": 300},
            "other-tokenizer": {"kind": "train_tokenizer", "data": "data", "vocab_size": 400},
            "tokenize": {"kind": "tokenize", "data": "data", "tokenizer": "tokenizer"},
            "pretrain": {"kind": "pretrain", "data": "tokenize", "model": MODEL, "tokens": 2048,
                         "seq_length": SEQ, "global_batch_size": 8, "mixture": {"web": 1.0},
                         "schedule": {"kind": "constant", "lr": 1e-3}},
            "curate": {"kind": "curate"},
            "eval": {"kind": "evaluate", "from": "pretrain", **evaluate_fields}}
    return base


def check(stages: dict, curate_tokenizer: str | None = "tokenizer"):
    """The eval stage's config built and checked as flows/dag.py does. The curate stage's config
    is a stand-in holding only the ``tokenizer`` field that the check reads (the curate kind's own
    schema is not under test here)."""
    import types
    from stages import KINDS
    from stages.base import StageGraph
    from stages.schema import from_dict
    kinds = {n: KINDS[s["kind"]] for n, s in stages.items()}
    configs = {n: from_dict(kinds[n].Config, {k: v for k, v in s.items() if k != "kind"},
                            f"stages.{n}") for n, s in stages.items() if n != "curate"}
    configs["curate"] = types.SimpleNamespace(tokenizer=curate_tokenizer)
    graph = StageGraph(kinds, configs, KINDS.values())
    kinds["eval"].check(configs["eval"], "eval", graph, None)
    return configs["eval"]


def test_valid_chat_configs_pass_and_keep_the_old_key():
    from stages.schema import identity_dict
    assert check(pipeline(chat="curate")).chat == "curate"
    both = check(pipeline(data="tokenize", heldout_length=SEQ, chat="curate"))
    assert both.data == "tokenize" and both.chat == "curate"
    old = identity_dict(check(pipeline(data="tokenize", heldout_length=SEQ)))
    assert "chat" not in old and "chat_samples" not in old and "max_new_tokens" not in old
    assert identity_dict(check(pipeline(chat="curate", chat_samples=8)))["chat_samples"] == 8


@pytest.mark.parametrize("fields, curate_tokenizer, message", [
    ({}, "tokenizer", r"stages\.eval\.data: set data \(a tokenize stage.* or chat"),
    ({"chat": "curate", "heldout_length": 64}, "tokenizer",
     r"stages\.eval\.heldout_length: only means something with data"),
    ({"data": "tokenize"}, "tokenizer", r"stages\.eval\.heldout_length: required with data"),
    ({"chat": "tokenize"}, "tokenizer",
     r"stages\.eval\.chat: 'tokenize' is not a curate stage \(it is a tokenize stage\)"),
    ({"chat": "curate"}, "other-tokenizer",
     r"stages\.eval\.chat: 'curate' measured its data with tokenizer 'other-tokenizer', but "
     r"'pretrain' was trained with 'tokenizer'"),
    ({"chat": "curate", "chat_samples": 0}, "tokenizer", r"stages\.eval\.chat_samples: must be >= 1"),
])
def test_refusals_at_validation(fields, curate_tokenizer, message):
    from stages.schema import ConfigError
    with pytest.raises(ConfigError, match=message):
        check(pipeline(**fields), curate_tokenizer)


def test_lineage_reads_only_the_curate_stages_heldout_split(tmp_path):
    from stages.evaluation.evaluate import Evaluate, EvaluateConfig
    curate = curate_stage(tmp_path, "curate", HELDOUT, PROMPTS).artifact
    model = Artifact(kind="pretrain", stage="pretrain", key="p", datasets=[
        {"name": "chat", "split": "train", "rows": 1, "path": "x", "digest": "d"}])
    config = EvaluateConfig(from_="pretrain", chat="curate")
    art = Artifact(kind="evaluate", stage="eval", key="e")
    read = Evaluate.datasets_read(config, art, {"pretrain": model, "curate": curate})
    assert [(d["stage"], d["name"]) for d in read] == [("pretrain", "chat"), ("curate", "heldout")]
