"""The data stages on real components: corpus -> datasets/Parquet -> BPE -> Megatron indexed data."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")       # before `datasets` is imported anywhere
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import json
import re
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from stages.base import RunContext, StageInput
from stages.layout import FAST_DIGEST, fast_file_digest
from stages.data import corpus
from stages.data.prepare import prepare_sources
from stages.data.tokenize import tokenize_sources
from stages.data.tokenizer import train_tokenizer
from stages.data.prepare import GENERATORS, PrepareDataConfig
from stages.data.tokenize import TokenizeConfig
from stages.data.tokenizer import TrainTokenizerConfig
from stages.schema import ConfigError, from_dict


def prep_config(sources, fraction=0.1, seed=0):
    return from_dict(PrepareDataConfig, {"sources": sources, "validation_fraction": fraction,
                                         "seed": seed}, "stages.data")


def texts(path):
    return pq.read_table(path).column("text").to_pylist()


# ------------------------------------------------------------------------------------- corpus
def test_corpus_is_deterministic_and_seeded(tmp_path):
    for domain in corpus.GENERATORS:
        a, b, c = (tmp_path / f"{domain}-{i}.jsonl" for i in range(3))
        corpus.write_jsonl(domain, 5, 7, a)
        corpus.write_jsonl(domain, 5, 7, b)
        corpus.write_jsonl(domain, 5, 8, c)
        assert a.read_bytes() == b.read_bytes()
        assert a.read_bytes() != c.read_bytes()
        # document i does not depend on how many documents are asked for
        assert list(corpus.generate(domain, 2, 7)) == list(corpus.generate(domain, 5, 7))[:2]


def test_corpus_domains_are_nonempty_and_distinct():
    assert set(corpus.GENERATORS) == set(GENERATORS)
    vocab = {}
    for domain in corpus.GENERATORS:
        docs = [corpus.full_text(d) for d in corpus.generate(domain, 30, 0)]
        words = [len(d.split()) for d in docs]
        low, high = {"long": (1500, 6000), "repo": (400, 2000), "recall": (10, 200)}.get(domain, (50, 600))
        assert low <= min(words) and max(words) <= high, (domain, min(words), max(words))
        assert len(set(docs)) == len(docs), domain
        vocab[domain] = {w for d in docs for w in re.findall(r"[A-Za-z_]+", d)}
    for a in vocab:
        for b in vocab:
            if a < b and (a, b) not in (("code", "repo"), ("long", "recall")):  # by design
                jaccard = len(vocab[a] & vocab[b]) / len(vocab[a] | vocab[b])
                assert jaccard < 0.35, (a, b, jaccard)


def test_corpus_repositories_run(tmp_path):
    """A repository document is its files: written out, its main module runs."""
    for i, doc in enumerate(corpus.generate("repo", 3, 0)):
        root = tmp_path / str(i)
        for part in doc.split("# ===== ")[1:]:
            path, src = part.split(" =====\n", 1)
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_text(src)
        pkg = next(p.parent.name for p in root.glob("*/main.py"))
        out = subprocess.run([sys.executable, "-m", f"{pkg}.main"], cwd=root, capture_output=True,
                             text=True, timeout=60)
        assert out.returncode == 0 and out.stdout.count("\n") >= 4, out.stderr


def test_corpus_math_is_correct_and_code_runs():
    for doc in corpus.generate("math", 50, 0):
        for a, op, b, ans in re.findall(r"What is (\d+) ([-+*]) (\d+)\?\n.*\nAnswer: (\d+)", doc):
            assert eval(f"{a} {op} {b}") == int(ans)
        for a, b, c, x in re.findall(r"Solve for x: (\d+)x \+ (\d+) = (\d+)\.\n.*\nAnswer: x = (\d+)", doc):
            assert int(a) * int(x) + int(b) == int(c)
    for doc in corpus.generate("code", 20, 0):
        exec(compile(doc, "<corpus>", "exec"), {"__name__": "__main__", "print": lambda *a: None})


# ------------------------------------------------------------------------------- prepare_data
@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    cfg = prep_config({"web": {"generator": "web", "documents": 60},
                       "math": {"generator": "math", "documents": 40},
                       "long": {"generator": "long", "documents": 4}})
    art = prepare_sources(cfg, out, RunContext(stage="data", key="k-data", cluster=None))
    return StageInput("data", out, art)


def test_prepare_generated_sources(prepared, tmp_path):
    art, out = prepared.artifact, prepared.out_dir
    assert art.kind == "prepare_data" and art.stage == "data" and art.key == "k-data"
    assert set(art.outputs) == {f"{s}/{n}" for s in ("sources", "heldout") for n in ("web", "math", "long")}
    assert art.metrics == {"documents/web": 54, "documents/math": 36, "documents/long": 3}
    rows = {(d["name"], d["split"]): d["rows"] for d in art.datasets}
    assert rows[("web", "heldout")] == 6 and rows[("long", "heldout")] == 1
    for d in art.datasets:
        assert d["digest"] == fast_file_digest(d["path"]) and d["digest_algo"] == FAST_DIGEST
        assert len(texts(d["path"])) == d["rows"]
        assert d["source"] == f"generator:{d['name']}"
    # train + held-out is exactly the generated corpus, without overlap
    train, held = texts(prepared.path("sources/web")), texts(prepared.path("heldout/web"))
    assert sorted(train + held) == sorted(corpus.generate("web", 60, 0))
    assert pq.read_schema(out / "sources/web.parquet").names == ["text"]
    # a rerun writes the same bytes
    cfg = prep_config({"web": {"generator": "web", "documents": 60}})
    again = prepare_sources(cfg, tmp_path, RunContext(stage="data", key="k", cluster=None))
    assert [d["digest"] for d in again.datasets] == [d["digest"] for d in art.datasets if d["name"] == "web"]


def test_prepare_builder_source_uses_the_same_loader(tmp_path):
    data = tmp_path / "mine.jsonl"
    docs = [f"document number {i} about rivers" for i in range(20)]
    data.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(docs)))
    cfg = prep_config({"mine": {"builder": "json", "data_files": [str(data)], "text_field": "body"},
                       "chat": {"generator": "chat", "documents": 10}}, fraction=0.25)
    art = prepare_sources(cfg, tmp_path / "out", RunContext(stage="data", key="k", cluster=None))
    train, held = (texts(tmp_path / "out" / art.outputs[o]) for o in ("sources/mine", "heldout/mine"))
    assert len(held) == 5 and sorted(train + held) == sorted(docs)
    assert train == [d for d in docs if d not in held]  # train keeps the source order
    mine = [d for d in art.datasets if d["name"] == "mine"]
    assert mine[0]["source"] == f"json:{data}[train]"


def test_prepare_wrong_text_field_names_source_field_and_columns(tmp_path):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"body": "hello", "id": 1}) + "\n")
    cfg = prep_config({"mine": {"builder": "json", "data_files": [str(data)], "text_field": "content"}})
    with pytest.raises(ConfigError, match=r"sources\.mine\.text_field.*'content'.*body"):
        prepare_sources(cfg, tmp_path / "out", RunContext(stage="data", key="k", cluster=None))


# ---------------------------------------------------------------------- tokenizer and tokenize
@pytest.fixture(scope="module")
def tokenizer_stage(prepared, tmp_path_factory):
    cfg = from_dict(TrainTokenizerConfig, {"data": "data", "vocab_size": 400}, "stages.tok")
    out = tmp_path_factory.mktemp("tok")
    art = train_tokenizer(cfg, {"data": prepared}, out, RunContext(stage="tok", key="k-tok", cluster=None))
    return StageInput("tok", out, art)


def test_tokenizer_is_deterministic(prepared, tokenizer_stage, tmp_path):
    art = tokenizer_stage.artifact
    assert art.outputs == {"tokenizer": "tokenizer.json"}
    assert art.extra["eod_id"] == 0 and art.extra["pad_id"] == 1
    assert 260 <= art.extra["vocab_size"] <= 400
    cfg = from_dict(TrainTokenizerConfig, {"data": "data", "vocab_size": 400}, "stages.tok")
    train_tokenizer(cfg, {"data": prepared}, tmp_path, RunContext(stage="tok", key="k", cluster=None))
    assert (tmp_path / "tokenizer.json").read_bytes() == tokenizer_stage.path("tokenizer").read_bytes()


def test_tokenize_round_trip(prepared, tokenizer_stage, tmp_path):
    cfg = from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tok"}, "stages.tokenize")
    inputs = {"data": prepared, "tok": tokenizer_stage}
    art = tokenize_sources(cfg, inputs, tmp_path, RunContext(stage="tokenize", key="k", cluster=None))
    from megatron.core.datasets.indexed_dataset import IndexedDataset  # imported by the stage above
    from tokenizers import Tokenizer

    eod = art.extra["eod_id"]
    assert art.extra["tokenizer"] == str(tokenizer_stage.path("tokenizer").resolve())
    assert set(art.outputs) == {f"{s}/{n}" for s in ("tokens", "heldout") for n in ("web", "math", "long")} | {
        "tokenizer"}  # the tokenizer travels with the data, for the model stages downstream
    tok = Tokenizer.from_file(art.extra["tokenizer"])
    for entry in art.datasets:
        folder = "tokens" if entry["split"] == "train" else "heldout"
        ds = IndexedDataset(str(tmp_path / art.outputs[f"{folder}/{entry['name']}"]))
        parquet = prepared.path(f"{'sources' if folder == 'tokens' else 'heldout'}/{entry['name']}")
        assert len(ds) == entry["rows"] == len(texts(parquet))
        docs = [ds[i].copy() for i in range(len(ds))]  # ds[i] is a view of ds's mmap
        assert all(d[-1] == eod and eod not in d[:-1] for d in docs)
        assert sum(len(d) for d in docs) == entry["tokens"]
        assert entry["digest"] == fast_file_digest(entry["path"]) and entry["digest_algo"] == FAST_DIGEST
        if entry["split"] == "train":
            assert art.metrics[f"tokens/{entry['name']}"] == entry["tokens"]
    first = texts(prepared.path("sources/math"))[0]
    ds = IndexedDataset(str(tmp_path / "tokens/math"))  # keep it alive: items view its mmap
    ids = ds[0]
    assert tok.decode(ids[:-1].tolist()) == first


def test_tokenize_skips_an_empty_heldout_split(tokenizer_stage, tmp_path):
    cfg = prep_config({"code": {"generator": "code", "documents": 5}}, fraction=0.0)
    data = prepare_sources(cfg, tmp_path / "data", RunContext(stage="data", key="k", cluster=None))
    assert [d["rows"] for d in data.datasets] == [5, 0]
    inputs = {"data": StageInput("data", tmp_path / "data", data), "tok": tokenizer_stage}
    cfg = from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tok"}, "stages.tokenize")
    art = tokenize_sources(cfg, inputs, tmp_path / "tok", RunContext(stage="tokenize", key="k", cluster=None))
    assert list(art.outputs) == ["tokenizer", "tokens/code"] and art.datasets[0]["rows"] == 5
