"""The `curate` stage through the real flow (Prefect, worker processes, MLflow), with a judge that
is a real HTTP server answering from a script (tests/support/openai_script_server.py):

- every planted bad sample of the embedded chat corpus is rejected by the rule meant for it, the
  judge-only ones by the judge, and no good sample by anything;
- the split and each shard are task runs of their own; the report reaches MLflow;
- the judge server killed mid-run: the shard fails naming the endpoint, the shard done before
  stays done, and the rerun (another server) judges only what the first did not answer.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import threading
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from flows import runner
from flows.config import typed
from flows.dag import build
from stages.data.chat_corpus import chat_samples
from stages.data.chat_format import sample_digest
from stages.data.chat_sources import ChatSourceSpec, normalise
from stages.data.judge import review_text
from stages.layout import part_dir, part_record
from tests.support.openai_script_server import scripted_server

pytestmark = pytest.mark.slow

SAMPLES = 120
WRONG = ("Nairobi is the capital of Peru", "Paris became the capital of Japan",
         "12 times 11 is 142", "Because the sun is cold")
GOOD_VERDICT = '{"accuracy": 5, "format": 4, "reason": "fine"}'
SCRIPT = {"models": ["script-judge"], "default": GOOD_VERDICT,
          "rules": [{"match": w, "reply": '{"accuracy": 1, "format": 4, "reason": "wrong"}'}
                    for w in WRONG]}


def pipeline(store, endpoint: str, question: str = "Is every fact and computation correct?",
             retries: int = 1):
    stages = {
        "data": {"kind": "prepare_data", "sources": {
            "web": {"generator": "web", "documents": 400}, "chat": {"generator": "chat", "documents": 300},
            "math": {"generator": "math", "documents": 300}}},
        "tokenizer": {"kind": "train_tokenizer", "data": "data", "vocab_size": 1024},
        "curate": {"kind": "curate", "tokenizer": "tokenizer", "shards": 2,
                   "sources": {"chat": {"generator": "chat", "samples": SAMPLES}},
                   "eval_prompts": {"generator": "arithmetic", "count": 16},
                   "judge": {"endpoint": endpoint, "concurrency": 2, "retries": retries,
                             "backoff_s": 0.1, "timeout_s": 10,
                             "rubric": {"accuracy": {"question": question, "threshold": 3},
                                        "format": {"question": "Is it well formed?",
                                                   "threshold": 2}}}}}
    return build(typed({"pipeline_name": "curation", "store": str(store), "stages": stages}))


def planted_by_id() -> dict[str, str]:
    """The planted reason of each sample that normalises (malformed ones have no id)."""
    spec = ChatSourceSpec(generator="chat", samples=SAMPLES)
    out = {}
    for rec in chat_samples(0, SAMPLES):
        messages, why = normalise(rec, spec) if "raw" not in rec else (None, "")
        if messages is not None:
            out.setdefault(sample_digest(messages), rec["planted"])
    return out


async def _task_runs(url: str) -> set[str]:
    from prefect.client.orchestration import PrefectClient
    async with PrefectClient(url) as client:
        return {r.name for r in await client.read_task_runs()}


def test_planted_samples_are_rejected_by_their_rules_and_the_judge(tmp_path, prefect_server):
    with scripted_server(SCRIPT, tmp_path / "judge") as judge:
        prep = runner.prepare_dag(pipeline(tmp_path / "store", judge.url))
        runner.execute(prep, say=lambda line: None)
        stats = judge.stats()
    out = prep.dag.nodes["curate"].out_dir
    records = chat_samples(0, SAMPLES)
    planted = Counter(r["planted"] for r in records if r["planted"] not in ("", "judge"))
    report = json.loads((out / "report" / "report.json").read_text())
    by_rule = report["rejected_by_rule"]
    judged_out = by_rule.pop("judge:accuracy")
    assert by_rule == dict(planted)                       # each planted kind, by its own rule
    assert judged_out == sum(r["planted"] == "judge" for r in records) == len(WRONG)

    rejected = [json.loads(line) for p in ("split", "shard-0-of-2", "shard-1-of-2")
                for line in (part_dir(out, p) / "rejected.jsonl").read_text().splitlines()]
    by_id = planted_by_id()
    for r in rejected:
        sample = r["sample"]
        if isinstance(sample, dict) and "id" in sample and r["rule"] != "exact_duplicate":
            assert by_id[sample["id"]] == (
                "judge" if r["rule"].startswith("judge:") else r["rule"]), r
    kept = pq.read_table(out / "kept.parquet").to_pylist()
    heldout = pq.read_table(out / "heldout.parquet").to_pylist()
    assert all(by_id[row["id"]] == "" for row in kept + heldout)           # only good ones kept
    good = {i for i, p in by_id.items() if p == ""}
    assert {row["id"] for row in kept + heldout} == good                   # and every good one
    assert len(heldout) == round(len(good) * 0.05)

    # each sample that passed the rules was asked once, and only those
    asked = {hashlib.sha256(review_text(json.loads(row["messages"])).encode()).hexdigest()
             for row in kept + heldout}
    assert set(stats["received"]) >= asked and max(stats["received"].values()) == 1
    assert sum(stats["received"].values()) == len(good) + len(WRONG)

    for name in ("report/rejected_by_rule.png", "report/judge_scores.png",
                 "report/rejects/pii.jsonl", "eval_prompts.jsonl"):
        assert (out / name).is_file(), name
    assert {"curate/split", "curate/shard-0-of-2", "curate/shard-1-of-2"} <= asyncio.run(
        _task_runs(prefect_server))
    from mlflow.tracking import MlflowClient
    client = MlflowClient(prep.dag.pipeline.tracking_uri)
    run = client.get_run(json.loads((out / "lineage.json").read_text())["run_id"])
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "report")}
    assert {"report/report.json", "report/judge_scores.png"} <= logged
    assert run.data.metrics["kept"] == len(kept)


def test_a_judge_killed_mid_run_fails_the_shard_and_the_rerun_asks_only_the_rest(tmp_path,
                                                                               prefect_server):
    store = tmp_path / "store"
    slow = dict(SCRIPT, delay_s=0.05)
    with scripted_server(slow, tmp_path / "first", name="first") as first:
        prep = runner.prepare_dag(pipeline(store, first.url, question="Correct?"))
        out = prep.dag.nodes["curate"].out_dir

        def kill_in_the_second_shard() -> None:
            deadline = time.time() + 600
            while time.time() < deadline:
                done = part_record(out, "shard-0-of-2")
                if done is not None and sum(first.stats()["answered"].values()) >= done["judged"] + 5:
                    first.kill()
                    return
                time.sleep(0.05)
        killer = threading.Thread(target=kill_in_the_second_shard, daemon=True)
        killer.start()
        with pytest.raises(runner.PipelineFailed, match=first.url.split("//")[1]):
            runner.execute(prep, say=lambda line: None)
        killer.join(5)
        before = first.stats()
    assert part_record(out, "shard-0-of-2") is not None and part_record(out, "shard-1-of-2") is None
    failure = json.loads((out / "failure.json").read_text())
    assert any(first.url.split("//")[1] in line for line in failure["tail"])

    with scripted_server(SCRIPT, tmp_path / "second", name="second") as second:
        result = runner.execute(runner.prepare_dag(pipeline(store, second.url, question="Correct?")),
                                say=lambda line: None)
        after = second.stats()
    assert result["stages"]["curate"]["executed"]
    # shard 0 ran once: its worker log has one launch; the second server never saw its samples
    assert (part_dir(out, "shard-0-of-2") / "worker.log").read_text().count("\n--- ") == 0
    answered_first = set(before["answered"])
    assert not answered_first & set(after["received"])          # nothing judged twice
    assert max(after["received"].values()) == 1
    shard1 = part_record(out, "shard-1-of-2")
    assert len(answered_first) + len(after["received"]) == part_record(out, "shard-0-of-2")["judged"] \
        + shard1["judged"]
