"""Completion-only loss: prompted documents -> Parquet `prompt` column -> a loss-mask companion of
the indexed dataset -> `loss_mask` of Megatron's samples, and per-source loss weights."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from stages.base import RunContext, StageInput
from stages.data import corpus
from stages.data.prepare import prepare_sources
from stages.data.tokenize import tokenize_sources
from stages.data.tokenizer import train_tokenizer
from stages.data.prepare import PrepareDataConfig, SourceSpec
from stages.data.tokenize import TokenizeConfig
from stages.data.tokenizer import TrainTokenizerConfig
from stages.training.pretrain import PretrainConfig
from stages.schema import ConfigError, from_dict
from stages.layout import loss_mask_prefix
from stages.training.mixture import (batch, build_blended_dataset, build_heldout_dataset, write_indexed_dataset)


def ctx(stage):
    return RunContext(stage=stage, key=f"k-{stage}", cluster=None)


def test_recall_drills_end_with_a_day_and_answer_with_its_person():
    for doc in corpus.generate("recall", 50, 0):
        assert set(doc) == {"prompt", "text"}
        day = doc["prompt"].split()[-1]
        person = doc["text"].strip()
        assert doc["text"] == " " + person and day in corpus.DAYS and person in corpus.NAMES
        # the fact "<day> <person>" is in the prompt, and the day is asked about once more
        assert f"{day} {person}" in doc["prompt"] and doc["prompt"].count(day) == 2


@pytest.fixture(scope="module")
def tokenized(tmp_path_factory):
    root = tmp_path_factory.mktemp("masked")
    mine = root / "qa.jsonl"
    rows = [{"question": f"Question {i}: what comes after {i}?", "answer": f" {i + 1}"}
            for i in range(30)]
    mine.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = from_dict(PrepareDataConfig, {"sources": {
        "web": {"generator": "web", "documents": 40},
        "recall": {"generator": "recall", "documents": 40},
        "qa": {"builder": "json", "data_files": [str(mine)], "text_field": "answer",
               "prompt_field": "question"}}, "validation_fraction": 0.1}, "stages.data")
    data = StageInput("data", root / "data", prepare_sources(cfg, root / "data", ctx("data")))
    tcfg = from_dict(TrainTokenizerConfig, {"data": "data", "vocab_size": 400}, "stages.tok")
    tok = StageInput("tok", root / "tok", train_tokenizer(tcfg, {"data": data}, root / "tok", ctx("tok")))
    kcfg = from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tok"}, "stages.tokenize")
    art = tokenize_sources(kcfg, {"data": data, "tok": tok}, root / "tokens", ctx("tokenize"))
    return data, StageInput("tokenize", root / "tokens", art), rows


def test_prepare_keeps_prompts_in_their_own_column(tokenized):
    data, _, rows = tokenized
    assert pq.read_schema(data.path("sources/web")).names == ["text"]
    for name in ("recall", "qa"):
        assert pq.read_schema(data.path(f"sources/{name}")).names == ["text", "prompt"]
    qa = pq.read_table(data.path("sources/qa")).to_pylist() + \
        pq.read_table(data.path("heldout/qa")).to_pylist()
    assert sorted((r["prompt"], r["text"]) for r in qa) == \
        sorted((r["question"], r["answer"]) for r in rows)


def test_tokenize_writes_a_loss_mask_aligned_with_the_tokens(tokenized):
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer
    data, tokens, _ = tokenized
    tok = Tokenizer.from_file(str(tokens.path("tokenizer")))
    assert not os.path.exists(loss_mask_prefix(tokens.path("tokens/web")) + ".idx")
    for name in ("recall", "qa"):
        ids = IndexedDataset(str(tokens.path(f"tokens/{name}")))
        masks = IndexedDataset(loss_mask_prefix(tokens.path(f"tokens/{name}")))
        table = pq.read_table(data.path(f"sources/{name}")).to_pylist()
        assert len(ids) == len(masks) == len(table)
        for i, row in enumerate(table):
            doc, mask = ids[i].copy(), masks[i].copy()
            n_prompt = len(tok.encode(row["prompt"], add_special_tokens=False).ids)
            assert len(doc) == len(mask) and mask.dtype == np.uint8
            assert mask[:n_prompt].sum() == 0 and mask[n_prompt:].all()  # text + EOD count
            assert tok.decode(doc[n_prompt:-1].tolist()) == row["text"]


def test_samples_take_the_loss_mask_and_the_source_weight(tmp_path):
    """Packed samples cross document boundaries; loss_mask must follow each label's document."""
    eod = 0
    rng = np.random.default_rng(0)
    docs, masks = [], []
    for i in range(60):
        n_prompt, n_text = int(rng.integers(3, 30)), int(rng.integers(1, 4))
        doc = list(rng.integers(2, 50, n_prompt)) + list(range(100, 100 + n_text)) + [eod]
        docs.append(doc)
        masks.append([0] * n_prompt + [1] * (n_text + 1))
    write_indexed_dataset(tmp_path / "qa", docs)
    write_indexed_dataset(loss_mask_prefix(tmp_path / "qa"), masks, dtype=np.uint8)
    write_indexed_dataset(tmp_path / "plain", [list(rng.integers(2, 50, 20)) + [eod] for _ in range(60)])
    prefixes = {"qa": str(tmp_path / "qa"), "plain": str(tmp_path / "plain")}
    ds = build_blended_dataset(prefixes, {"qa": 1.0, "plain": 1.0}, 16, 40, 7, eod, tmp_path / "c",
                               loss_weights={"qa": 5.0})
    seen = {0: 0, 1: 0}
    for i in range(40):
        tokens, labels, loss_mask, _ = batch(ds, [i])
        source = int(ds[i]["dataset_id"])  # sources in name order: plain, qa
        seen[source] += 1
        if source == 1:  # completion tokens (100+) and the EOD after them: weight 5, else 0
            text = (labels >= 100) | ((labels == eod) & (tokens >= 100))
            assert loss_mask.tolist() == (text.float() * 5.0).tolist(), i
        else:
            assert loss_mask.tolist() == [[1.0] * 16]
    assert min(seen.values()) > 5
    held = build_heldout_dataset(prefixes["qa"], 16, 7, eod, tmp_path / "h")
    assert set(held[0]["loss_mask"].tolist()) <= {0.0, 1.0}  # held-out: mask, no weight


def test_a_split_source_blends_as_one_in_proportion_to_its_prefixes_tokens(tmp_path):
    """A source tokenized into two prefixes (stages.layout.split_prefix_names) keeps its mixture
    weight, shared between the prefixes by their tokens, and its loss weight on both."""
    from stages.training.mixture import blend_parts
    eod = 0
    rng = np.random.default_rng(1)
    qa = [(list(rng.integers(2, 50, 5)) + [100, 101, eod], [0] * 5 + [1] * 3) for _ in range(90)]
    for prefix, rows in (("qa.00000", qa[:60]), ("qa.00001", qa[60:])):
        write_indexed_dataset(tmp_path / prefix, [d for d, _ in rows])
        write_indexed_dataset(loss_mask_prefix(tmp_path / prefix), [m for _, m in rows], dtype=np.uint8)
    write_indexed_dataset(tmp_path / "plain", [list(rng.integers(2, 50, 20)) + [eod] for _ in range(90)])
    prefixes = {"qa": [str(tmp_path / "qa.00000"), str(tmp_path / "qa.00001")],
                "plain": str(tmp_path / "plain")}
    parts = blend_parts(prefixes, {"qa": 3.0, "plain": 1.0}, ["plain", "qa"])
    assert [(s, p.rsplit("/", 1)[1]) for s, p, _ in parts] == [
        ("plain", "plain"), ("qa", "qa.00000"), ("qa", "qa.00001")]
    assert [w for _, _, w in parts] == pytest.approx([0.25, 0.75 * 60 / 90, 0.75 * 30 / 90])
    ds = build_blended_dataset(prefixes, {"qa": 3.0, "plain": 1.0}, 16, 200, 7, eod, tmp_path / "c",
                               loss_weights={"qa": 2.0})
    seen = [0, 0, 0]
    for i in range(200):
        source = int(ds[i]["dataset_id"])
        seen[source] += 1
        _, labels, loss_mask, _ = batch(ds, [i])
        assert set(loss_mask.flatten().tolist()) <= ({1.0} if source == 0 else {0.0, 2.0}), source
    assert seen[0] == pytest.approx(50, abs=3) and seen[1] == pytest.approx(100, abs=3)
    assert seen[2] == pytest.approx(50, abs=3)


PHASE = {"data": "tokenize", "tokens": 4096, "seq_length": 32, "global_batch_size": 4,
         "schedule": {"kind": "constant", "lr": 1e-3},
         "model": {"name": "t", "hidden_size": 8, "num_layers": 1, "num_attention_heads": 2,
                   "num_query_groups": 1, "kv_channels": 4, "ffn_hidden_size": 16, "vocab_size": 64,
                   "max_position_embeddings": 64}}


def test_bad_loss_weights_are_refused():
    with pytest.raises(ConfigError, match=r"loss_weights\.recall: weight 0.0 must be > 0"):
        from_dict(PretrainConfig, {**PHASE, "mixture": {"web": 1.0, "recall": 1.0},
                                   "loss_weights": {"recall": 0.0}}, "stages.p")


def test_prompt_field_only_for_builder_sources():
    with pytest.raises(ConfigError, match="prompt_field: is for `builder` sources"):
        from_dict(SourceSpec, {"generator": "recall", "prompt_field": "prompt"}, "s")
    with pytest.raises(ConfigError, match="must be different columns"):
        from_dict(SourceSpec, {"builder": "json", "data_files": ["x"], "prompt_field": "text"}, "s")
