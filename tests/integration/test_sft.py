"""The `sft` stage on CPU: real tokenizer, real Megatron-core, real worker processes.

- Acceptance (in-process): a hand-built multi-turn conversation goes through the stage's own
  tokenization and Megatron's GPTDataset (the masked class the training loop uses); the positions
  whose loss counts are exactly those whose LABEL is an assistant content token or the
  ``<|end_of_text|>`` closing it. The expected positions are found independently: by searching
  the token list for each assistant header followed by that turn's encoded content.
- End to end through ``python -m stages.worker``: a tiny model pretrained on prose (the parent),
  a hand-written curate artifact in the formats.md shape, SFT on it: the loss falls, and the
  held-out assistant-token loss after SFT is below the parent's on the same held-out sequences
  (both measured by the same code in a separate process; the "after" value equals the metric
  the stage reports).
- Resume: a run SIGKILLed after a checkpoint, rerun, ends bit-identical to the uninterrupted one.
- Refusals at validation (the tiny pipeline composed by flows.config): data not a curate stage,
  curate and model on different tokenizers, document_mask on GPUs, a too long seq_length.
"""
from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from stages.base import Artifact, RunContext, StageInput, read_artifact, write_artifact
from tests.support.helpers import kill_at_first_checkpoint, losses, run_worker, worker_env

REPO = Path(__file__).resolve().parents[2]
VOCAB = 400
MODEL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 16, "ffn_hidden_size": 192, "vocab_size": VOCAB,
         "max_position_embeddings": 256}
SEQ, GBS = 64, 8
PARENT = {"data": "tokenize", "model": MODEL, "tokens": 30 * GBS * SEQ, "seq_length": SEQ,
          "global_batch_size": GBS, "mixture": {"web": 1.0},
          "schedule": {"kind": "constant", "lr": 3e-3, "warmup_steps": 3},
          "checkpoint_interval": 0, "log_interval": 10}
SFT = {"from": "parent", "data": "curate", "epochs": 2, "seq_length": SEQ,
       "global_batch_size": GBS, "schedule": {"kind": "constant", "lr": 2e-3, "warmup_steps": 3},
       "checkpoint_interval": 10, "keep_checkpoints": 2, "log_interval": 10}


# ------------------------------------------------------------------ helpers
def ctx(stage: str) -> RunContext:
    return RunContext(stage=stage, key=f"k-{stage}", cluster=None)


def conversation(rng) -> list[dict[str, str]]:
    a, b = (int(x) for x in rng.integers(0, 50, 2))
    return [{"role": "system", "content": "You are a careful calculator."},
            {"role": "user", "content": f"What is {a} plus {b}?"},
            {"role": "assistant", "content": f"{a} plus {b} is {a + b}."},
            {"role": "user", "content": "And twice that?"},
            {"role": "assistant", "content": f"Twice {a + b} is {2 * (a + b)}."}]


def write_chats(path: Path, conversations: list[list[dict]]) -> None:
    """A kept/heldout Parquet file in the formats.md shape (id, source, messages as JSON)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stages.data.chat_format import sample_digest
    pq.write_table(pa.table({"id": [sample_digest(m) for m in conversations],
                             "source": ["chat"] * len(conversations),
                             "messages": [json.dumps(m) for m in conversations]}), path)


def make_curate(root: Path, kept: int, heldout: int) -> Path:
    """A stand-in for a finished curate stage: kept.parquet, heldout.parquet, eval_prompts.jsonl."""
    from stages.layout import FAST_DIGEST, fast_file_digest
    out = root / "curate"
    out.mkdir(parents=True)
    rng = np.random.default_rng(1)
    convs = [conversation(rng) for _ in range(kept + heldout)]
    write_chats(out / "kept.parquet", convs[:kept])
    write_chats(out / "heldout.parquet", convs[kept:])
    (out / "eval_prompts.jsonl").write_text(json.dumps(
        {"id": "p0", "prompt": "What is 60 plus 7?", "answer": "67"}) + "\n")
    datasets_ = [{"name": name, "split": split, "rows": n, "path": str(out / f"{name}.parquet"),
                  "digest": fast_file_digest(out / f"{name}.parquet"), "digest_algo": FAST_DIGEST}
                 for name, split, n in (("kept", "train", kept), ("heldout", "heldout", heldout))]
    write_artifact(out, Artifact(
        kind="curate", stage="curate", key="cur0", datasets=datasets_,
        outputs={"kept": "kept.parquet", "heldout": "heldout.parquet",
                 "eval_prompts": "eval_prompts.jsonl"},
        extra={"tokenizer": "tokenizer", "kept": kept, "heldout": heldout}))
    return out


def write_spec(out_dir: Path, kind: str, stage: str, config: dict, inputs: dict[str, Path],
               cluster: dict | None = None) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = {"kind": kind, "stage": stage, "key": f"key-{stage}", "config": config,
            "inputs": {name: {"out_dir": str(d), "artifact": dataclasses.asdict(read_artifact(d))}
                       for name, d in inputs.items()},
            "out_dir": str(out_dir), "cluster": cluster or {}, "seed": 1234}
    path = out_dir / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


# The held-out assistant-token loss of a model stage's final checkpoint on a tokenized held-out
# prefix, measured in a process of its own (a world of one): the same held-out sequences
# (seed 1234, SEQ) for the parent and for the fine-tuned model.
MEASURE = """
import json, sys, types
from pathlib import Path
import torch
from stages.base import StageInput, read_artifact
from stages.specs import PrecisionSpec, spec_of_artifact
from stages.training.checkpoint import load_checkpoint
from stages.training.cpu_shim import megatron_world
from stages.training.model import build_model, causal_mask
from stages.training.step import Env, heldout_losses
model_dir, prefix, eod, seq, cache = sys.argv[1:]
art = read_artifact(Path(model_dir))
spec = spec_of_artifact(StageInput("model", Path(model_dir), art))
shape = types.SimpleNamespace(seq_length=int(seq), seed=1234, micro_batch_size=0,
                              global_batch_size=8, precision=PrecisionSpec())
with megatron_world():
    model = build_model(spec, PrecisionSpec(), device="cpu")
    load_checkpoint(Path(model_dir) / art.outputs["checkpoint"], model, None)
    out = heldout_losses(model, {"chat": prefix}, int(eod), shape,
                         Env("cpu", 0, 1, 1, 1, 0), Path(cache), causal_mask(int(seq), "cpu"))
print(json.dumps(out))
"""


def heldout_assistant_loss(model_dir: Path, prefix: Path, eod: int, cache: Path) -> float:
    proc = subprocess.run([sys.executable, "-c", MEASURE, str(model_dir), str(prefix), str(eod),
                           str(SEQ), str(cache)], cwd=REPO, env=worker_env(), text=True,
                          capture_output=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["heldout_loss/chat"]


# ------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def tokenized(tmp_path_factory) -> Path:
    """prepare_data -> train_tokenizer (chat roles on) -> tokenize, in-process: the parent's data."""
    from stages.data.prepare import PrepareDataConfig, prepare_sources
    from stages.data.tokenize import TokenizeConfig, tokenize_sources
    from stages.data.tokenizer import TrainTokenizerConfig, train_tokenizer
    from stages.schema import from_dict
    root = tmp_path_factory.mktemp("sft-data")
    cfg = from_dict(PrepareDataConfig, {"sources": {"web": {"generator": "web", "documents": 300}},
                                        "validation_fraction": 0.1}, "stages.data")
    data = StageInput("data", root / "data", prepare_sources(cfg, root / "data", ctx("data")))
    tcfg = from_dict(TrainTokenizerConfig, {"data": "data", "vocab_size": VOCAB}, "stages.tokenizer")
    tok = StageInput("tokenizer", root / "tokenizer",
                     train_tokenizer(tcfg, {"data": data}, root / "tokenizer", ctx("tokenizer")))
    kcfg = from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tokenizer"}, "stages.tokenize")
    art = tokenize_sources(kcfg, {"data": data, "tokenizer": tok}, root / "tokenize", ctx("tokenize"))
    write_artifact(root / "tokenize", art)
    return root / "tokenize"


@pytest.fixture(scope="module")
def tokenizer(tokenized):
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tokenized / "tokenizer.json"))


@pytest.fixture(scope="module")
def runs(tokenized, tmp_path_factory) -> dict[str, Path]:
    """The parent (pretrained on prose), the curate stand-in, and an uninterrupted SFT run."""
    root = tmp_path_factory.mktemp("sft-runs")
    parent = root / "parent"
    run_worker(write_spec(parent, "pretrain", "parent", PARENT, {"tokenize": tokenized}))
    curate = make_curate(root, kept=160, heldout=24)
    sft = root / "sft"
    log = run_worker(write_spec(sft, "sft", "sft", SFT, {"parent": parent, "curate": curate}))
    print("\n" + "\n".join(line for line in log.splitlines() if line.startswith("[sft]")))
    return {"parent": parent, "curate": curate, "sft": sft, "root": root, "log": log}


# ------------------------------------------------------------------ acceptance: the loss mask
def assistant_positions(ids: list[int], messages: list[dict], tok) -> list[int]:
    """1 where ``ids`` holds an assistant turn's content or its closing <|end_of_text|>, found by
    searching for each assistant header followed by that turn's encoded content."""
    from stages.data.chat_format import END_ROLE, END_TURN, START_ROLE
    enc = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    header = [tok.token_to_id(START_ROLE), *enc("assistant"), tok.token_to_id(END_ROLE)]
    flags, pos = [0] * len(ids), 0
    for content in (m["content"] for m in messages if m["role"] == "assistant"):
        body = [*enc(content), tok.token_to_id(END_TURN)]
        at = next(i + len(header) for i in range(pos, len(ids))
                  if ids[i:i + len(header)] == header
                  and ids[i + len(header):i + len(header) + len(body)] == body)
        flags[at:at + len(body)] = [1] * len(body)
        pos = at + len(body)
    return flags


def test_loss_counts_exactly_on_assistant_labels(tokenizer, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from stages.data.chat_format import render
    from stages.data.tokenizer import EOD
    from stages.training.mixture import batch, build_blended_dataset
    from stages.training.sft import tokenize_chats
    messages = [
        {"role": "system", "content": "You are an assistant who answers in one line."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "2 plus 3 is 5."},
        {"role": "user", "content": "2 plus 3 is 5."},  # the same words as an assistant turn: no loss
        {"role": "assistant", "content": "Yes, and twice that is 10."},
    ]
    eod = tokenizer.token_to_id(EOD)
    write_chats(tmp_path / "kept.parquet", [messages])
    counts = tokenize_chats(tokenizer, tmp_path / "kept.parquet", tmp_path / "chat", eod, np.uint16)
    written = IndexedDataset(str(tmp_path / "chat"))  # held: its arrays are views of its mmap
    doc = written[0].tolist()
    assert doc == tokenizer.encode(render(messages)).ids + [eod]  # the template's tokens + EOD
    want = assistant_positions(doc, messages, tokenizer)  # per document position; the EOD: 0
    n = len(doc)
    assert counts == {"conversations": 1, "tokens": n, "assistant_tokens": sum(want)}
    assert sum(want) == sum(len(tokenizer.encode(m["content"], add_special_tokens=False).ids) + 1
                            for m in messages if m["role"] == "assistant")

    seq = 16  # the conversation repeats through the epochs; windows of 17 tokens start anywhere
    ds = build_blended_dataset({"chat": str(tmp_path / "chat")}, {"chat": 1.0}, seq, 40, 5, eod,
                               tmp_path / "cache", document_mask=True)
    covered = set()
    for i in range(40):
        tokens, labels, loss_mask, _ = batch(ds, [i])
        window = tokens[0].tolist() + [int(labels[0, -1])]
        where = [o for o in range(n) if all(window[k] == doc[(o + k) % n] for k in range(seq + 1))]
        assert len(where) == 1, (i, where)  # the window's place in the conversation
        label_pos = [(where[0] + t + 1) % n for t in range(seq)]
        assert loss_mask[0].tolist() == [float(want[p]) for p in label_pos], i
        covered.update(label_pos)
    assert covered == set(range(n))  # every position of the conversation was checked as a label


def test_a_malformed_conversation_is_refused_naming_file_and_row(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from stages.training.sft import tokenize_chats
    good = json.dumps(conversation(np.random.default_rng(0)))
    bad = json.dumps([{"role": "narrator", "content": "once upon a time"}])
    for rows, why in (([good, bad], "role in"), ([good, "{not json"], "not JSON")):
        pq.write_table(pa.table({"id": ["a", "b"], "source": ["chat"] * 2, "messages": rows}),
                       tmp_path / "kept.parquet")
        with pytest.raises(ValueError, match=rf"kept.parquet: row 1: .*{why}.*rerun the curate"):
            tokenize_chats(tokenizer, tmp_path / "kept.parquet", tmp_path / "chat", 0, np.uint16)


# ------------------------------------------------------------------ worker runs
def test_sft_trains_and_lowers_the_heldout_assistant_loss(runs, tokenizer):
    from stages.data.tokenizer import EOD
    sft, parent = runs["sft"], runs["parent"]
    art, parent_art = read_artifact(sft), read_artifact(parent)
    assert art.kind == "sft" and art.outputs["tokenizer"] == "tokenizer.json"
    assert (sft / "tokenizer.json").read_bytes() == (parent / "tokenizer.json").read_bytes()
    assert art.extra["model"] == parent_art.extra["model"] and art.extra["parent"] == "parent"
    import pyarrow.parquet as pq
    from stages.data.chat_format import render
    kept = pq.read_table(runs["curate"] / "kept.parquet").column("messages").to_pylist()
    tokens = sum(len(tokenizer.encode(render(json.loads(m))).ids) + 1 for m in kept)  # + EOD
    steps = 2 * tokens // (GBS * SEQ)
    assert art.extra["conversations"] == 160 and art.extra["train_tokens"] == tokens
    assert art.extra["heldout_conversations"] == 24 and art.extra["epochs"] == 2
    assert 0 < art.extra["assistant_tokens"] < tokens
    assert art.metrics["steps"] == steps and sorted(losses(sft)) == list(range(1, steps + 1))
    assert art.outputs["checkpoint"] == f"checkpoints/iter_{steps:07d}"
    m = art.metrics
    assert "heldout_loss" not in m and "heldout_loss/chat" not in m
    assert m["loss_last"] < m["loss_first"] - 1.0, m
    assert "continuing from parent" in runs["log"] and "weights only" in runs["log"]

    prefix = sft / "sft_data" / "heldout" / "chat"
    eod = tokenizer.token_to_id(EOD)
    before = heldout_assistant_loss(parent, prefix, eod, runs["root"] / "measure-parent")
    after = heldout_assistant_loss(sft, prefix, eod, runs["root"] / "measure-sft")
    print(f"\nSFT: train loss {m['loss_first']:.3f} -> {m['loss_last']:.3f}; held-out assistant "
          f"loss {before:.3f} (parent) -> {after:.3f} (sft); {steps} steps")
    assert after == pytest.approx(m["heldout_assistant_loss"], abs=1e-4)
    assert after < before - 1.0, (before, after)


def test_killed_sft_resumes_bit_identical(runs):
    from stages.training.checkpoint import load_tensors
    import torch
    ref = runs["sft"]
    out = runs["root"] / "sft-killed"
    spec = write_spec(out, "sft", "sft", SFT, {"parent": runs["parent"], "curate": runs["curate"]})
    code = kill_at_first_checkpoint([sys.executable, "-m", "stages.worker", str(spec)], out,
                                    worker_env())
    assert code == -signal.SIGKILL and not (out / "artifact.json").exists()
    final = read_artifact(ref).outputs["checkpoint"]
    assert not (out / final).exists(), "killed too late to test a resume"

    log = run_worker(spec)
    assert "resuming from" in log and "tokenized" not in log  # the tokenized data is reused
    assert losses(out) == losses(ref)
    got = load_tensors(out / read_artifact(out).outputs["checkpoint"])
    want = load_tensors(ref / final)
    assert got.keys() == want.keys() and any(k.startswith("optimizer.") for k in want)
    for key in want:
        assert torch.equal(got[key], want[key]), key


def test_two_data_parallel_ranks_follow_one_process(runs):
    """Each rank's batch has its own number of assistant tokens: the gradient is still the token
    mean of the global batch (before the fix the two diverged by up to 0.04 in loss)."""
    from stages.training.checkpoint import load_tensors
    import torch
    out = runs["root"] / "sft-dp2"
    spec = write_spec(out, "sft", "sft", dict(SFT, micro_batch_size=2),
                      {"parent": runs["parent"], "curate": runs["curate"]}, {"data_parallel": 2})
    assert "DP=2" in run_worker(spec, nproc=2)
    got, want = losses(out), losses(runs["sft"])
    assert got.keys() == want.keys()
    assert max(abs(got[k] - want[k]) for k in want) < 1e-4, max(abs(got[k] - want[k]) for k in want)
    a = load_tensors(out / read_artifact(out).outputs["checkpoint"])
    b = load_tensors(runs["sft"] / read_artifact(runs["sft"]).outputs["checkpoint"])
    for key in (k for k in b if not k.startswith("optimizer.")):
        assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-4), key


# ------------------------------------------------------------------ validation
def dag_for(*overrides):
    from flows import config as config_mod
    from flows.dag import build
    return build(config_mod.load(list(overrides)))


GPU_FIXES = ["cluster=gpu-node", *[f"stages.extend-{i}.document_mask=false" for i in (1, 2, 3)]]


@pytest.mark.parametrize("overrides, message", [
    (["stages.sft.data=tokenize"], "stages.sft.data: 'tokenize' is not a curate stage"),
    (["++stages.tok2.kind=train_tokenizer", "++stages.tok2.data=data",
      "++stages.tok2.vocab_size=512", "stages.curate.tokenizer=tok2",
      "~stages.eval-chat-before"],  # an evaluate stage, checked first, would refuse it too
     "stages.sft.data: curate stage 'curate' measures with tokenizer stage 'tok2', but 'merge-3' "
     "was trained with 'tokenizer'"),
    (GPU_FIXES, "stages.sft.document_mask: document masking is built for the CPU backend only"),
    (["stages.sft.seq_length=1024"],
     "stages.sft.seq_length: 1024 is longer than the context of parent 'merge-3' (512 tokens"),
])
def test_bad_sft_input_is_refused_before_compute(overrides, message):
    from stages.schema import ConfigError
    with pytest.raises(ConfigError) as e:
        dag_for(*overrides)
    assert message in str(e.value)


def test_sft_carries_its_parents_model_and_plans_without_a_token_count():
    from stages import KINDS
    dag = dag_for(*GPU_FIXES, "stages.sft.document_mask=false")  # the fix of the refusal above
    graph, sft = dag.graph, dag.nodes["sft"].config
    assert graph.model_of("sft") == graph.model_of("merge-3")
    assert graph.context_length_of("sft") == graph.context_length_of("merge-3")
    assert graph.tokenizer_of("sft") == graph.tokenizer_of("merge-3") == "tokenizer"
    assert KINDS["sft"].tokens(sft) == 0 and KINDS["sft"].compute_plan("sft", sft, None) is None
    kept = {"name": "kept", "split": "train", "digest": "d"}
    upstream = {"curate": Artifact(kind="curate", stage="curate", key="k",
                                   datasets=[kept, {"name": "heldout", "split": "heldout"}])}
    assert KINDS["sft"].datasets_read(sft, None, upstream) == [dict(kept, stage="curate")]
