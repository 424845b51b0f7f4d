"""Tokenizing in parallel pieces (stages/data/tokenize_shards.py): any number of worker processes
or of parts (shards) writes the bytes one process writes, loss masks included; digests are xxh3-128
of the merged files, computed on the way; a merge that fails leaves nothing at the final name."""
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from stages.base import Artifact, RunContext, StageInput, write_part_record
from stages.data import corpus
from stages.data import indexed_files, tokenize_shards as ts
from stages.data.prepare import write_parquet
from stages.data.tokenize import TMP_DIR, Tokenize, TokenizeConfig, tokenize_sources
from stages.data.tokenizer import TrainTokenizerConfig, train_tokenizer
from stages.layout import FAST_DIGEST, fast_file_digest, part_dir
from stages.schema import from_dict


def ctx(stage, cluster=None):
    return RunContext(stage=stage, key=f"k-{stage}", cluster=cluster)


def config(**settings):
    return from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tok", **settings}, "stages.tokenize")


def dataset_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for folder in ("tokens", "heldout")
            if (root / folder).is_dir() for p in sorted((root / folder).iterdir())}


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """Prepared sources written as prepare_data writes them: a plain one, a prompted one (loss
    masks) and one of 2 train rows (fewer rows than shards), with a BPE trained on them; and the
    one-process output to compare against."""
    root = tmp_path_factory.mktemp("shards")
    docs = {"web": list(corpus.generate("web", 70, 0)), "recall": list(corpus.generate("recall", 50, 0)),
            "tiny": list(corpus.generate("math", 3, 0))}
    outputs, held = {}, {"web": 7, "recall": 5, "tiny": 1}
    for name, rows in docs.items():
        cols = {"text": [d["text"] if isinstance(d, dict) else d for d in rows]}
        if isinstance(rows[0], dict):
            cols["prompt"] = [d["prompt"] for d in rows]
        table = pa.table(cols)
        for folder, part in (("sources", table.slice(held[name])), ("heldout", table.slice(0, held[name]))):
            write_parquet(part, root / "data" / folder / f"{name}.parquet")
            outputs[f"{folder}/{name}"] = f"{folder}/{name}.parquet"
    data = StageInput("data", root / "data", Artifact(kind="prepare_data", stage="data", key="k-data",
                                                      outputs=outputs))
    tcfg = from_dict(TrainTokenizerConfig, {"data": "data", "vocab_size": 400}, "stages.tok")
    tok = StageInput("tok", root / "tok", train_tokenizer(tcfg, {"data": data}, root / "tok", ctx("tok")))
    inputs = {"data": data, "tok": tok}
    one = tokenize_sources(config(workers=1), inputs, root / "one", ctx("tokenize"))
    return inputs, root, one


def test_any_number_of_processes_writes_the_same_bytes(stages, tmp_path):
    inputs, root, one = stages
    expected = dataset_files(root / "one")
    assert {"tokens/recall.loss_mask.bin", "heldout/recall.loss_mask.idx", "tokens/tiny.bin"} \
        <= set(expected)
    for entry in one.datasets:   # the digest recorded is the merged file's, with its algorithm
        assert entry["digest_algo"] == FAST_DIGEST == "xxh3_128"
        assert entry["digest"] == fast_file_digest(Path(entry["path"]))
    for n in (2, 3):
        art = tokenize_sources(config(workers=n), inputs, tmp_path / f"n{n}", ctx("tokenize"))
        assert dataset_files(tmp_path / f"n{n}") == expected, n
        assert [{k: v for k, v in d.items() if k != "path"} for d in art.datasets] == \
            [{k: v for k, v in d.items() if k != "path"} for d in one.datasets]
        assert art.outputs == one.outputs and art.metrics == one.metrics
        assert not (tmp_path / f"n{n}" / TMP_DIR).exists()   # the pieces are gone


def test_shards_as_parts_write_the_same_bytes(stages, tmp_path):
    inputs, root, one = stages
    cfg = config(shards=3, workers=2)
    out = tmp_path / "sharded"
    assert Tokenize.parts(cfg) == ("shard-0-of-3", "shard-1-of-3", "shard-2-of-3")
    assert Tokenize.parts(config()) == ()
    records = {}
    for part in Tokenize.parts(cfg):
        records[part] = Tokenize.run_part(cfg, inputs, out, ctx("tokenize"), part)
        write_part_record(out, part, records[part])   # what the worker does after run_part
    # tiny's rows over 3 parts: a part with no piece of it (an empty shard)
    rows = pq.ParquetFile(inputs["data"].path("sources/tiny")).metadata.num_rows
    tiny = [sum(p["output"] == "tokens/tiny" for p in r["pieces"]) for r in records.values()]
    assert rows < 3 and sorted(tiny) == [0] * (3 - rows) + [1] * rows
    art = Tokenize.run(cfg, inputs, out, ctx("tokenize"))
    assert dataset_files(out) == dataset_files(root / "one")
    assert [d["digest"] for d in art.datasets] == [d["digest"] for d in one.datasets]
    for part in records:   # merged: each part's record and pieces are dropped
        assert not (part_dir(out, part) / "done.json").exists()
        assert not (part_dir(out, part) / ts.PIECES).exists()


def test_a_gather_cut_short_redoes_only_the_parts_it_consumed(stages, tmp_path):
    inputs, _, _ = stages
    cfg = config(shards=2, workers=1)
    for part in Tokenize.parts(cfg):
        write_part_record(tmp_path, part, Tokenize.run_part(cfg, inputs, tmp_path, ctx("t"), part))
    # an earlier gather moved shard-1's piece of web into place, then died
    moved = next(p for p in (tmp_path / "parts/shard-1-of-2/pieces/tokens/web").iterdir())
    moved.unlink()
    with pytest.raises(RuntimeError, match=r"shard-1-of-2.*next run tokenizes those parts again"):
        Tokenize.run(cfg, inputs, tmp_path, ctx("t"))
    assert (part_dir(tmp_path, "shard-0-of-2") / "done.json").exists()
    assert not (part_dir(tmp_path, "shard-1-of-2") / "done.json").exists()


def test_a_merge_that_fails_midway_leaves_nothing_at_the_final_prefix(stages, tmp_path):
    inputs, _, one = stages
    data = inputs["data"]
    path = data.path("sources/web")
    web = ts.Output("tokens/web", str(path), pq.ParquetFile(path).metadata.num_rows)
    pieces = ts.plan_pieces([web], tmp_path / "tmp", pieces=3)
    tok = ts.load_tokenizer(inputs["tok"].path("tokenizer"))
    written = [ts.tokenize_piece(tok, p, one.extra["eod_id"], np.uint16) for p in pieces]
    indexed_files.remove(pieces[1].prefix, masked=False)   # the middle piece is gone: add_index fails on it
    with pytest.raises(FileNotFoundError):
        ts.finish_output(web, pieces, written, tmp_path / "out", tmp_path / "tmp", np.uint16)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").rglob("*"))
    assert not any((tmp_path / "tmp" / ts.MERGED).rglob("*.*"))   # the half merge is deleted


def test_row_ranges_and_reading_rows_across_row_groups(tmp_path):
    assert ts.row_ranges(0, 2, 3) == [(0, 1), (1, 2)]      # fewer rows than ranges
    assert ts.row_ranges(10, 20, 3) == [(10, 13), (13, 16), (16, 20)]
    assert ts.row_ranges(5, 5, 2) == []
    path = tmp_path / "t.parquet"
    texts = [f"row {i}" for i in range(50)]
    pq.write_table(pa.table({"text": texts}), path, row_group_size=7)
    for start, stop in ((0, 50), (3, 4), (6, 15), (14, 14), (20, 49), (49, 50)):
        got = [t for b in ts.read_rows(path, ["text"], start, stop, batch_size=4) for t in b[0]]
        assert got == texts[start:stop], (start, stop)


def test_workers_default_to_the_cores_the_launcher_gives():
    from stages.cluster import ParallelSpec
    from stages.data.tokenize import workers_for
    assert workers_for(config(), ctx("t")) == 1
    assert workers_for(config(), ctx("t", ParallelSpec(threads_per_worker=4))) == 4
    assert workers_for(config(workers=3), ctx("t", ParallelSpec(threads_per_worker=4))) == 3


def documents(prefix: Path) -> list[list[int]]:
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def test_a_source_over_the_prefix_limit_is_split_into_consecutive_prefixes(stages, tmp_path,
                                                                          monkeypatch):
    """With the limit at 25 documents: web (63 train rows) becomes 3 prefixes, recall (45) 2, tiny
    (2) stays one; their documents and loss masks, in prefix order, are the unsplit output's, by
    any number of processes or parts; the sources' token counts are unchanged."""
    from stages.layout import loss_mask_prefix, output_prefixes
    inputs, root, one = stages
    monkeypatch.setattr("stages.layout.MAX_DOCUMENTS_PER_PREFIX", 25)
    runs = {"w2": tokenize_sources(config(workers=2), inputs, tmp_path / "w2", ctx("tokenize"))}
    cfg = config(shards=2, workers=2)
    for part in Tokenize.parts(cfg):
        write_part_record(tmp_path / "s2", part, Tokenize.run_part(cfg, inputs, tmp_path / "s2",
                                                                   ctx("tokenize"), part))
    runs["s2"] = Tokenize.run(cfg, inputs, tmp_path / "s2", ctx("tokenize"))
    assert dataset_files(tmp_path / "w2") == dataset_files(tmp_path / "s2")
    art = runs["w2"]
    assert output_prefixes(art.outputs, "tokens/web") == [f"tokens/web.0000{i}" for i in range(3)]
    assert output_prefixes(art.outputs, "tokens/recall") == ["tokens/recall.00000", "tokens/recall.00001"]
    assert output_prefixes(art.outputs, "tokens/tiny") == ["tokens/tiny"]
    assert "tokens/web" not in art.outputs and "heldout/web" in art.outputs
    for source, masked in (("web", False), ("recall", True)):
        split = output_prefixes(art.outputs, f"tokens/{source}")
        assert [len(documents(tmp_path / "w2" / p)) for p in split][:-1] == [25] * (len(split) - 1)
        assert sum((documents(tmp_path / "w2" / p) for p in split), []) == \
            documents(root / "one" / f"tokens/{source}")
        if masked:
            assert sum((documents(loss_mask_prefix(tmp_path / "w2" / p)) for p in split), []) == \
                documents(loss_mask_prefix(root / "one" / f"tokens/{source}"))
        entries = [d for d in art.datasets if d["name"] == source and d["split"] == "train"]
        assert [d["path"] for d in entries] == [str((tmp_path / "w2" / f"{p}.bin").resolve())
                                                for p in split]
        assert sum(d["tokens"] for d in entries) == one.metrics[f"tokens/{source}"]
    assert art.metrics == one.metrics


def test_a_held_out_set_over_the_prefix_limit_is_refused_before_anything_is_written(
        stages, tmp_path, monkeypatch):
    inputs, _, _ = stages
    monkeypatch.setattr("stages.layout.MAX_DOCUMENTS_PER_PREFIX", 6)   # heldout/web has 7 rows
    with pytest.raises(ValueError, match=r"heldout/web: 7 held-out documents, more than one "
                                         r"prefix holds \(6\); lower the prepare stage's "
                                         r"validation_fraction"):
        tokenize_sources(config(workers=1), inputs, tmp_path / "out", ctx("tokenize"))
    assert not (tmp_path / "out" / "tokens").exists()
