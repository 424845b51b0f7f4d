"""Rule-filter throughput (samples/s): the curate shard's loop against a plain
``datasets.Dataset.filter`` with the same predicates on the same data, side by side in one process.

1. Writes the tiny chat corpus (``--samples`` good ones plus the planted set) as JSON Lines, loads
   it through ``chat_sources.load_rows`` (HF ``datasets``), normalises it and writes the valid
   conversations as a Parquet shard (id, source, messages as JSON, reference): what a shard reads.
2. Trains a ~1k-token byte-level BPE with the chat role tokens on the corpus text and builds one
   ``RuleContext`` (tokenizer, eval-prompt n-grams, language model and secret plugins loaded by a
   warm-up pass before any timing).
3. Times, alternating and repeated: (a) the shard loop: the Parquet columns read with pyarrow,
   ``json.loads`` + ``check_sample`` per row; (b) ``Dataset.from_parquet(shard).filter(pred)``
   with ``pred`` the same ``json.loads`` + ``check_sample``. Both must keep the same rows.
Prints a small table and the ratio shard / datasets.filter (goal >= 0.9).

    python benchmarks/curation_rules.py [--samples 3000] [--repeats 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_shard(samples: int, seed: int, work: Path) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from stages.data.chat_format import sample_digest
    from stages.data.chat_sources import ChatSourceSpec, load_rows, normalise, reference_of

    source = ChatSourceSpec(generator="chat", samples=samples)
    cols: dict[str, list] = {"id": [], "source": [], "messages": [], "reference": []}
    for row in load_rows(source, "chat", work / "raw", seed):
        messages = normalise(row.record, source)[0] if not row.problem else None
        if messages is not None:
            cols["id"].append(sample_digest(messages))
            cols["source"].append("chat")
            cols["messages"].append(json.dumps(messages, ensure_ascii=False))
            cols["reference"].append(reference_of(row.record, source))
    path = work / "shard.parquet"
    pq.write_table(pa.table(cols), path)
    return path


def build_context(shard: Path, seed: int):
    import pyarrow.parquet as pq
    from tokenizers import pre_tokenizers, trainers

    from stages.data.chat_corpus import eval_prompts
    from stages.data.chat_format import ROLE_TOKENS
    from stages.data.curation_rules import RuleContext, RulesSpec
    from stages.data.tokenizer import SPECIAL_TOKENS, build_tokenizer

    texts = [m["content"] for s in pq.read_table(shard).column("messages").to_pylist()
             for m in json.loads(s)]
    tok = build_tokenizer()
    tok.train_from_iterator([texts], trainer=trainers.BpeTrainer(
        vocab_size=1000, min_frequency=2, special_tokens=[*SPECIAL_TOKENS, *ROLE_TOKENS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    return RuleContext(RulesSpec(), tok, eval_prompts(seed, 50))


def shard_loop(shard: Path, ctx) -> list[str]:
    """What a curate shard does: read its Parquet, run the rules, keep the passing ids."""
    import pyarrow.parquet as pq

    from stages.data.curation_rules import check_sample
    table = pq.read_table(shard, columns=["id", "messages", "reference"])
    kept = []
    for sid, messages, ref in zip(*(table.column(c).to_pylist() for c in table.column_names)):
        if not check_sample(json.loads(messages), ref, ctx)[0]:
            kept.append(sid)
    return kept


def datasets_filter(shard: Path, ctx, cache: Path) -> list[str]:
    """The same predicates through a plain ``datasets.Dataset.filter``."""
    import datasets

    from stages.data.curation_rules import check_sample
    ds = datasets.Dataset.from_parquet(str(shard), cache_dir=str(cache))
    kept = ds.filter(lambda row: not check_sample(json.loads(row["messages"]), row["reference"],
                                                  ctx)[0])
    return kept["id"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=3000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import datasets
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()   # the lambda is not hashable: a random fingerprint

    with tempfile.TemporaryDirectory(prefix="curation-bench-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        shard = build_shard(args.samples, args.seed, work)
        ctx = build_context(shard, args.seed)
        shard_loop(shard, ctx)                         # warm-up: loads every detector once
        print(f"setup {time.perf_counter() - t0:.1f}s", flush=True)
        times: dict[str, list[float]] = {"shard loop": [], "datasets.filter": []}
        kept: dict[str, list[str]] = {}
        for rep in range(args.repeats):
            for name in (("shard loop", "datasets.filter") if rep % 2 == 0
                         else ("datasets.filter", "shard loop")):
                t = time.perf_counter()
                if name == "shard loop":
                    kept[name] = shard_loop(shard, ctx)
                else:
                    kept[name] = datasets_filter(shard, ctx, work / f"hf-{rep}")
                times[name].append(time.perf_counter() - t)
        import pyarrow.parquet as pq
        rows = pq.read_metadata(shard).num_rows
    assert kept["shard loop"] == kept["datasets.filter"], "the two paths kept different rows"
    rate = {name: rows / statistics.median(ts) for name, ts in times.items()}
    print(f"\n{'path':<18}{'rows':>7}{'kept':>7}{'median s':>10}{'samples/s':>11}")
    for name, ts in times.items():
        print(f"{name:<18}{rows:>7}{len(kept[name]):>7}{statistics.median(ts):>10.2f}"
              f"{rate[name]:>11.0f}")
    ratio = rate["shard loop"] / rate["datasets.filter"]
    print(f"\nratio shard loop / datasets.filter: {ratio:.2f}x (goal >= 0.9)")


if __name__ == "__main__":
    main()
