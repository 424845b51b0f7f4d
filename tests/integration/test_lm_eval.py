"""lm-evaluation-harness tasks in the evaluate kind (``stages/evaluation/harness.py``), offline.

A module fixture trains the tiny chat model (``tests/support/tiny_models.py``: arithmetic chats,
200 steps through the real pretrain worker). An evaluate stage with ``lm_eval_tasks`` (both
shipped tasks) beside ``chat`` (a small hand-written curate stage) runs through the worker entry
with ``HF_HUB_OFFLINE=1`` and a ``sitecustomize`` that refuses and records every socket connection
or name lookup beyond this machine, in the worker and in the harness's child process alike.

- The metrics exist and lie in [0, 1]; the export was removed; the results and samples files are
  outputs; the task data file (path, rows, digest) is among the datasets the stage read (lineage);
  nothing reached for the network (and the guard was loaded in both processes).
- ``lm_eval/tiny_arith_mc/acc`` and ``acc_norm`` equal the accuracies computed here from a plain
  Megatron forward over each (question, choice) pair, rendered by ``chat_format`` as lm-eval's chat
  template does; those log-likelihoods equal the harness's per-sample ones within 2e-4 nats.
- ``lm_eval/tiny_arith_gen/exact_match/last_number`` equals the share of questions whose greedy
  completion from the Megatron model (``chat_eval.greedy_generate``) ends on the right number, and
  those completions are the harness's generations, word for word.
- ``lm_eval_tasks`` alone (the stage in-process) with ``lm_eval_limit: 8`` scores
  the first 8 documents as the full run scored them.
- Validation: an unknown task is refused naming the shipped ones; ``lm_eval_tasks`` alone is a
  valid evaluate stage; without data, chat or lm_eval_tasks the message names all three; the
  fields keep earlier keys (keyed only when set; limit and batch size are settings).
- ``run_tasks`` refuses before any work: the chat template asked for and the export has none; on
  CUDA without vLLM (naming the GPU worker image).
- Each shipped task file is named as its task; the shipped data is what
  ``conf/lm_eval/make_data.py`` writes, and every question is on the evaluation side of the chat
  corpus's split (no training sample asks it).
"""
from __future__ import annotations

import importlib.util
import json
import textwrap
from pathlib import Path

import pytest

from stages.base import StageInput, read_artifact
from stages.data.chat_format import render
from stages.layout import FAST_DIGEST, fast_file_digest
from tests.support.tiny_models import (MODEL, REPO, chat, curate_stage, run_worker,
                                       trained_chat_model)

TASKS_DIR = REPO / "conf" / "lm_eval"
DATA = TASKS_DIR / "data" / "tiny_arith.jsonl"
ROWS = [json.loads(x) for x in DATA.read_text().splitlines()]
# nats, on a sum of ~12 continuation log-probs of ~-5 each: HF (transformers, fp32) and Megatron
# share no reduction order. Measured 2026-12-03 on the 2-core CPU: max |difference| 2.6e-5 over the
# 256 pairs, and the closest two choices of a question 6.9e-3 apart (so no argmax flips on it).
LOGLIK_TOLERANCE = 2e-4

GUARD = '''
import os, socket
_LOG = os.environ["FORGE_TEST_NET_LOG"]
with open(_LOG + ".loaded", "a") as fh:
    fh.write(f"{os.getpid()}\\n")
_LOCAL = {None, "localhost", "127.0.0.1", "::1", "0.0.0.0", socket.gethostname()}

def _refuse(what):
    with open(_LOG, "a") as fh:
        fh.write(f"{os.getpid()} {what}\\n")
    raise OSError(f"network access refused by the test: {what}")

def _guard(method):
    def guarded(self, address):
        if isinstance(address, tuple) and address[0] not in _LOCAL:
            _refuse(f"{method.__name__} {address!r}")
        return method(self, address)
    return guarded

socket.socket.connect = _guard(socket.socket.connect)
socket.socket.connect_ex = _guard(socket.socket.connect_ex)
_getaddrinfo = socket.getaddrinfo

def getaddrinfo(host, *args, **kwargs):
    name = host.decode() if isinstance(host, bytes) else host
    if name not in _LOCAL:
        _refuse(f"getaddrinfo {name!r}")
    return _getaddrinfo(host, *args, **kwargs)
socket.getaddrinfo = getaddrinfo
'''


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    model = trained_chat_model(root, steps=200)
    guard = root / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text(textwrap.dedent(GUARD))
    net_log = root / "network.log"
    out = root / "eval"
    import os
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "FORGE_TEST_NET_LOG": str(net_log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(guard), os.environ.get("PYTHONPATH")]))}
    # beside the chat metrics, which share the stage (and load the Megatron model first)
    curate = curate_stage(root, "curate", [chat(12, 34), chat(45, 27)],
                          [{"id": "p0", "prompt": "What is 14 + 22?", "answer": "36"}])
    log = run_worker(out, "evaluate", "eval-lm",
                     {"from": "pretrain", "chat": "curate",
                      "lm_eval_tasks": ["tiny_arith_mc", "tiny_arith_gen"]},
                     {"pretrain": model, "curate": curate.out_dir}, env=env)
    return {"root": root, "model": model, "curate": curate.out_dir, "out": out, "log": log,
            "net_log": net_log,
            "art": read_artifact(out)}


@pytest.fixture(scope="module")
def megatron(run):
    """The trained model as ``run_eval`` loads it, and its tokenizer."""
    from tokenizers import Tokenizer
    from stages.evaluation.run_eval import _load_model
    from stages.specs import spec_of_artifact
    from stages.training.cpu_shim import megatron_world
    art = read_artifact(run["model"])
    spec = spec_of_artifact(StageInput("pretrain", run["model"], art))
    tok = Tokenizer.from_file(str(run["model"] / art.outputs["tokenizer"]))
    with megatron_world():
        yield _load_model(spec, run["model"] / art.outputs["checkpoint"], "cpu"), tok


def loglikelihood(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context): the pair split as lm-eval's hf backend splits it (the
    continuation's tokens are those of context + continuation past the context's)."""
    import torch
    from stages.training.model import causal_mask
    whole = tok.encode(context + continuation, add_special_tokens=False).ids
    n = len(tok.encode(context, add_special_tokens=False).ids)
    with torch.no_grad():
        logits = model(torch.tensor([whole[:-1]]), torch.arange(len(whole) - 1)[None],
                       causal_mask(len(whole) - 1, "cpu"))[0].double()
    # the HF model's whole vocabulary (ids the tokenizer never made included), not the TP padding
    logp = torch.log_softmax(logits[:, :MODEL["vocab_size"]], dim=-1)
    return float(sum(logp[t - 1, whole[t]] for t in range(n, len(whole))))


def prompt(question: str) -> str:
    return render([{"role": "user", "content": question}], add_generation_prompt=True)


# ------------------------------------------------------------------ the worker run
def test_the_stage_reports_lm_eval_metrics_offline(run):
    from stages.evaluation.evaluate import Evaluate, EvaluateConfig
    m, out = run["art"].metrics, run["out"]
    for name in ("lm_eval/tiny_arith_mc/acc", "lm_eval/tiny_arith_mc/acc_norm",
                 "lm_eval/tiny_arith_gen/exact_match/last_number"):
        assert 0.0 <= m[name] <= 1.0, name
    assert m["lm_eval/tiny_arith_mc/samples"] == m["lm_eval/tiny_arith_gen/samples"] == len(ROWS)
    assert not any("," in k for k in m)  # MLflow refuses commas in metric names
    assert run["art"].outputs == {"lm_eval_results": "lm_eval_results.json",
                                  "lm_eval_samples": "lm_eval_samples.jsonl",
                                  "chat_samples": "chat_samples.jsonl"}
    assert m["chat/exact_match_prompts"] == 1 and m["chat/heldout_conversations"] == 2
    results = json.loads((out / "lm_eval_results.json").read_text())
    assert results["results"]["tiny_arith_mc"]["acc,none"] == m["lm_eval/tiny_arith_mc/acc"]
    assert not (out / "hf-export").exists() and not (out / "hf-datasets-cache").exists()
    assert "lm_eval/tiny_arith_mc/acc:" in run["log"]
    assert run["art"].extra["lm_eval_tasks"] == ["tiny_arith_mc", "tiny_arith_gen"]
    digest = fast_file_digest(DATA)  # lineage: the task data it read, with its digest
    assert [(d["name"], d["split"], d["rows"], d["path"], d["digest"], d["digest_algo"])
            for d in run["art"].datasets] \
        == [(f"lm_eval/{t}", "test", len(ROWS), str(DATA), digest, FAST_DIGEST)
            for t in ("tiny_arith_gen", "tiny_arith_mc")]
    config = EvaluateConfig(from_="pretrain", chat="curate",
                            lm_eval_tasks=("tiny_arith_mc", "tiny_arith_gen"))
    read = Evaluate.datasets_read(config, run["art"], {"pretrain": read_artifact(run["model"]),
                                                       "curate": read_artifact(run["curate"])})
    assert [(d["stage"], d["name"]) for d in read] == [("curate", "heldout"),
                                                        ("eval-lm", "lm_eval/tiny_arith_gen"),
                                                        ("eval-lm", "lm_eval/tiny_arith_mc")]
    loaded = Path(str(run["net_log"]) + ".loaded").read_text().split()
    assert len(set(loaded)) >= 2  # the guard ran in the worker and in the harness's process
    assert not run["net_log"].exists(), run["net_log"].read_text()


def test_multiple_choice_accuracy_equals_a_plain_forward(run, megatron):
    model, tok = megatron
    samples = [json.loads(x) for x in (run["out"] / "lm_eval_samples.jsonl").open()]
    harness = {s["doc"]["id"]: [r[0][0] for r in s["resps"]] for s in samples
               if s["task"] == "tiny_arith_mc"}
    right = right_norm = 0
    for row in ROWS:
        ctx = prompt(row["question"])
        own = [loglikelihood(model, tok, ctx, c) for c in row["choices"]]
        assert own == pytest.approx(harness[row["id"]], abs=LOGLIK_TOLERANCE), row["id"]
        right += max(range(4), key=lambda i: own[i]) == row["label"]
        right_norm += max(range(4), key=lambda i: own[i] / len(row["choices"][i])) == row["label"]
    assert run["art"].metrics["lm_eval/tiny_arith_mc/acc"] == right / len(ROWS)
    assert run["art"].metrics["lm_eval/tiny_arith_mc/acc_norm"] == right_norm / len(ROWS)


def test_generation_exact_match_equals_own_greedy_decoding(run, megatron):
    from stages.evaluation.chat_eval import STOP_TOKENS, final_answer, greedy_generate
    from stages.data.chat_format import conversation_ids
    model, tok = megatron
    ids = [conversation_ids(tok, [{"role": "user", "content": r["question"]}],
                            add_generation_prompt=True)[0] for r in ROWS]
    completions = greedy_generate(model, ids, stop_ids={tok.token_to_id(t) for t in STOP_TOKENS},
                                  max_new_tokens=24, context=64, vocab=MODEL["vocab_size"])
    texts = [tok.decode(c).split("\n")[0] for c in completions]  # the task also stops at a newline
    samples = [json.loads(x) for x in (run["out"] / "lm_eval_samples.jsonl").open()]
    harness = {s["doc"]["id"]: s["resps"][0][0] for s in samples if s["task"] == "tiny_arith_gen"}
    assert texts == [harness[r["id"]] for r in ROWS]  # HF generate == Megatron greedy, word for word
    right = sum(final_answer(t) == r["answer"] for t, r in zip(texts, ROWS))
    assert run["art"].metrics["lm_eval/tiny_arith_gen/exact_match/last_number"] == right / len(ROWS)


def test_lm_eval_alone_with_a_limit(run):
    """No data, no chat: only lm-eval metrics, over the first lm_eval_limit documents."""
    from stages.base import RunContext
    from stages.evaluation.evaluate import Evaluate, EvaluateConfig
    out = run["root"] / "eval-alone"
    out.mkdir()
    config = EvaluateConfig(from_="pretrain", lm_eval_tasks=("tiny_arith_mc",), lm_eval_limit=8)
    art = Evaluate.run(config, {"pretrain": StageInput("pretrain", run["model"],
                                                       read_artifact(run["model"]))},
                       out, RunContext(stage="eval-alone", key="a" * 64, cluster=None))
    full = [json.loads(x) for x in (run["out"] / "lm_eval_samples.jsonl").open()]
    first = [r["acc"] for r in full if r["task"] == "tiny_arith_mc" and r["doc_id"] < 8]
    assert art.metrics["lm_eval/tiny_arith_mc/samples"] == 8 == len(first)
    assert art.metrics["lm_eval/tiny_arith_mc/acc"] == sum(first) / 8
    assert not any(k.startswith(("chat/", "retrieval", "heldout")) for k in art.metrics)
    assert art.extra["lm_eval_limit"] == 8


# ------------------------------------------------------------------ validation and refusals
def config(**fields):
    from stages.evaluation.evaluate import EvaluateConfig
    from stages.schema import from_dict
    return from_dict(EvaluateConfig, {"from": "sft", **fields}, "stages.eval")


def test_unknown_task_is_refused_naming_the_shipped_ones():
    from stages.schema import ConfigError
    with pytest.raises(ConfigError, match=r"stages\.eval\.lm_eval_tasks: unknown lm-eval task\(s\) "
                                          r"'hellaswag'; the shipped tasks .* are: tiny_arith_gen, "
                                          r"tiny_arith_mc\."):
        config(lm_eval_tasks=["tiny_arith_mc", "hellaswag"])
    with pytest.raises(ConfigError, match=r"data: set data .*lm_eval_tasks .* or chat"):
        config()


def test_lm_eval_alone_is_valid_and_earlier_keys_stay():
    from stages.schema import identity_dict
    assert config(lm_eval_tasks=["tiny_arith_mc"]).lm_eval_tasks == ("tiny_arith_mc",)
    old = identity_dict(config(chat="curate"))
    assert not any(k.startswith("lm_eval") for k in old)
    keyed = identity_dict(config(chat="curate", lm_eval_tasks=["tiny_arith_mc"], lm_eval_limit=4,
                                 lm_eval_batch_size=2))
    assert {k for k in keyed if k.startswith("lm_eval")} == {"lm_eval_tasks"}
    assert "lm_eval_chat_template" in identity_dict(config(lm_eval_tasks=["tiny_arith_mc"],
                                                           lm_eval_chat_template=False))


def test_refusals_before_any_work(tmp_path):
    from stages.evaluation.harness import run_tasks
    (tmp_path / "hf").mkdir()  # an export without a chat template
    with pytest.raises(ValueError, match=r"lm_eval_chat_template: the export .* has no chat template"):
        run_tasks(tmp_path / "hf", ["tiny_arith_mc"], tmp_path, device="cpu", limit=None,
                  batch_size=1)
    if importlib.util.find_spec("vllm") is None:  # CUDA without vLLM (outside the GPU image)
        with pytest.raises(RuntimeError, match=r"runs on vLLM there, which is not installed.*"
                                               r"GPU worker image"):
            run_tasks(tmp_path / "hf", ["tiny_arith_mc"], tmp_path, device="cuda", limit=None,
                      batch_size=1)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_flat_metric_names():
    from stages.evaluation.harness import flat_metrics
    results = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": "N/A",
                                 "exact_match,last_number": 1, "sample_len": 3}},
               "n-samples": {"t": {"original": 5, "effective": 3}}}
    assert flat_metrics(results) == {"lm_eval/t/acc": 0.5, "lm_eval/t/exact_match/last_number": 1.0,
                                     "lm_eval/t/samples": 3.0}


def test_each_shipped_task_is_named_as_its_file():
    import yaml

    class Loader(yaml.SafeLoader):  # a task's ``!function`` tags are not this test's business
        pass
    Loader.add_multi_constructor("!", lambda loader, tag, node: None)
    from stages.evaluation.harness import shipped_tasks
    assert shipped_tasks() == ["tiny_arith_gen", "tiny_arith_mc"]
    for name in shipped_tasks():
        assert yaml.load((TASKS_DIR / f"{name}.yaml").read_text(), Loader)["task"] == name


def test_shipped_data_is_regenerated_and_decontaminated():
    import runpy
    import re
    from stages.data.chat_corpus import is_eval_question
    make = runpy.run_path(str(TASKS_DIR / "make_data.py"))
    assert DATA.read_text() == make["render"]()
    ops = {"+": "+", "-": "-", "times": "x"}
    for row in ROWS:
        a, op, b = re.fullmatch(r"What is (\d+) (\+|-|times) (\d+)\?", row["question"]).groups()
        assert is_eval_question(ops[op], int(a), int(b)), row
        assert len(set(row["choices"])) == 4 and row["answer"] in row["choices"][row["label"]]
