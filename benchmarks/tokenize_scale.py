"""Tokenization at scale: tokens/s of the tokenize stage with 1 process against N, side by side in
one run, the merge's MB/s, the digest's GB/s, and a paper projection to 64 workers and 10T tokens.

1. Corpus: real text found on every machine (FACTS.md): Python's standard library (``code``) and
   the docs shipped in site-packages (``docs``), plus the embedded ``web`` generator, as Parquet
   sources the way prepare_data writes them (zstd, 4096-row groups), repeated up to ``--mb`` MB.
2. A byte-level BPE (the stage's own ``build_tokenizer``, ``--vocab``) trained on a 4 MB sample.
3. Times ``tokenize_sources`` (the stage's run) with ``workers`` = 1 (this process), 2 and
   os.cpu_count() if larger, in alternation, ``--repeats`` times; every run's output must be
   byte-identical to the 1-process one. The pool's forkserver is started (Megatron imported once)
   before any timing and its start-up reported apart: once per stage run, not per token.
4. Merge: the pieces of the largest source, cut as N workers would, merged with ``add_index`` and
   hashed on the way (MB/s); xxh3-128 and sha256 of the merged file read from the page cache.
5. Projection (printed with its model): W workers tokenize at rate_1 x W x efficiency, with
   rate_1 the 1-process run's tokens per CPU-second (a core of its own) and the efficiency
   measured here at the largest N; the merge is one sequential copy of every
   output at the merge's MB/s (or the disk's, whichever is lower), the digest rides on it (xxh3 on
   the bytes copied); the 10T-token time is tokens / rate + bytes / merge rate.

    python benchmarks/tokenize_scale.py [--mb 80] [--repeats 2] [--json /tmp/tokenize_scale.json]

Timings on a shared machine are noisy: the load average at start and end is printed and stored.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAYON_NUM_THREADS", "1")          # one process = one core, as a worker runs
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONWARNINGS", "ignore")          # the forkserver's Megatron import

TOKENS_10T = 10e12
BYTES_PER_TOKEN = 4   # int32 ids at a 100,352-token vocabulary (uint16 only below 65,500)


def text_files(root: Path, suffixes: tuple[str, ...], limit: int) -> list[str]:
    """Up to ``limit`` bytes of text files under ``root``, in sorted order (deterministic)."""
    out, size = [], 0
    for p in sorted(root.rglob("*")):
        if p.suffix in suffixes and p.is_file():
            try:
                t = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if len(t) > 200:
                out.append(t)
                size += len(t)
                if size >= limit:
                    break
    return out


def build_corpus(work: Path, mb: float) -> dict[str, Path]:
    """Three Parquet sources of about ``mb`` MB in all (code 60%, docs 30%, web 10%)."""
    import pyarrow as pa

    from stages.data import corpus
    from stages.data.prepare import write_parquet

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    site = Path(sysconfig.get_paths()["purelib"])
    base = {"code": text_files(stdlib, (".py",), 24 << 20),
            "docs": text_files(site, (".md", ".rst", ".txt"), 12 << 20),
            "web": list(corpus.generate("web", 4000, 0))}
    shares = {"code": 0.6, "docs": 0.3, "web": 0.1}
    paths = {}
    for name, docs in base.items():
        want, rows, size, i = shares[name] * mb * 1e6, [], 0, 0
        while size < want:
            rows.append(docs[i % len(docs)])
            size, i = size + len(rows[-1]), i + 1
        paths[name] = work / "data" / f"sources/{name}.parquet"
        write_parquet(pa.table({"text": rows}), paths[name])
    return paths


def train(paths: dict[str, Path], work: Path, vocab: int) -> Path:
    import pyarrow.parquet as pq
    from tokenizers import pre_tokenizers, trainers

    from stages.data.tokenizer import SPECIAL_TOKENS, build_tokenizer
    sample, size = [], 0
    for p in paths.values():   # about 4 MB, a share of each source
        for t in pq.read_table(p).column("text").to_pylist():
            if size > 4e6 * (len(sample) and 1) * (list(paths).index(p.stem) + 1) / len(paths):
                break
            sample.append(t)
            size += len(t)
    tok = build_tokenizer()
    tok.train_from_iterator(sample, trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    path = work / "tok" / "tokenizer.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tok.save(str(path))
    return path


def inputs_for(paths: dict[str, Path], tok_path: Path, work: Path) -> dict:
    from stages.base import Artifact, StageInput
    data = Artifact(kind="prepare_data", stage="data", key="bench",
                    outputs={f"sources/{n}": f"sources/{n}.parquet" for n in paths})
    tok = Artifact(kind="train_tokenizer", stage="tok", key="bench",
                   outputs={"tokenizer": "tokenizer.json"})
    return {"data": StageInput("data", work / "data", data),
            "tok": StageInput("tok", tok_path.parent, tok)}


def outputs_bytes(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in sorted((out / "tokens").iterdir())}


def run_stage(inputs: dict, out: Path, workers: int) -> tuple[float, float, int]:
    """Wall seconds of the stage's run, CPU seconds its tokenizing processes spent on the pieces,
    and the tokens written."""
    import contextlib
    import io
    import shutil

    from stages.base import RunContext
    from stages.data.tokenize import TokenizeConfig, tokenize_sources
    from stages.schema import from_dict
    shutil.rmtree(out, ignore_errors=True)
    cfg = from_dict(TokenizeConfig, {"data": "data", "tokenizer": "tok", "workers": workers},
                    "stages.tokenize")
    with contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        art = tokenize_sources(cfg, inputs, out, RunContext(stage="tokenize", key="b", cluster=None))
        seconds = time.perf_counter() - t0
    return seconds, art.extra["tokenize_cpu_s"], int(sum(d["tokens"] for d in art.datasets))


def warm_forkserver() -> float:
    """Start the pool's forkserver (it imports Megatron once); seconds it took."""
    from concurrent.futures import ProcessPoolExecutor

    from stages.data import tokenize_shards as ts
    t0 = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=ts.process_context()) as pool:
        pool.submit(os.getpid).result()
    return time.perf_counter() - t0


def merge_rates(inputs: dict, work: Path, pieces: int, tok_path: Path, eod: int, dtype) -> dict:
    """Merge MB/s (add_index + xxh3 on the way) of the largest source cut in ``pieces`` pieces;
    xxh3-128 and sha256 GB/s over the merged file (page cache)."""
    import pyarrow.parquet as pq

    from stages.data import indexed_files, tokenize_shards as ts
    from stages.layout import fast_file_digest
    path = inputs["data"].path("sources/code")
    o = ts.Output("tokens/code", str(path), pq.ParquetFile(path).metadata.num_rows)
    tmp = work / "merge"
    ts.clear(tmp)
    ps = ts.plan_pieces([o], tmp, pieces=pieces)
    ts.run_pieces(ps, tok_path, eod, dtype, pieces, lambda i, w: None)
    target = tmp / "merged"
    with indexed_files.frozen_heap():
        t0 = time.perf_counter()
        indexed_files.merge([p.prefix for p in ps], target, dtype, masked=False)
        merge_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in indexed_files.files(target, False))
    bin_path = Path(str(target) + ".bin")
    t0 = time.perf_counter()
    fast_file_digest(bin_path)
    xxh = time.perf_counter() - t0
    t0 = time.perf_counter()
    h = hashlib.sha256()
    with open(bin_path, "rb") as fh:
        while block := fh.read(1 << 20):
            h.update(block)
    sha = time.perf_counter() - t0
    n = bin_path.stat().st_size
    ts.clear(tmp)
    return {"merge_mb_s": size / merge_s / 1e6, "merged_mb": size / 1e6, "merge_s": merge_s,
            "xxh3_gb_s": n / max(xxh, 1e-9) / 1e9, "sha256_gb_s": n / max(sha, 1e-9) / 1e9}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=80.0, help="corpus size in MB of text")
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, nargs="*", default=None,
                    help="worker counts besides 1 (default: 2 and os.cpu_count() if larger)")
    ap.add_argument("--disk-mb-s", type=float, default=2000.0,
                    help="sequential disk bandwidth assumed for the 64-worker projection")
    ap.add_argument("--json", default=str(Path(tempfile.gettempdir()) / "tokenize_scale.json"))
    args = ap.parse_args(argv)
    ns = args.workers or sorted({2, os.cpu_count() or 2})
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="tokenize-scale-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        paths = build_corpus(work, args.mb)
        tok_path = train(paths, work, args.vocab)
        inputs = inputs_for(paths, tok_path, work)
        print(f"corpus {args.mb:.0f} MB in 3 sources, BPE vocab {args.vocab} "
              f"({time.perf_counter() - t0:.1f}s)", flush=True)
        from megatron.core.datasets.indexed_dataset import DType  # the stage's own import, untimed
        forkserver_s = warm_forkserver()
        times: dict[int, list[float]] = {n: [] for n in [1, *ns]}
        cpus: dict[int, list[float]] = {n: [] for n in times}
        tokens, reference = 0, None
        for r in range(args.repeats):
            for n in (list(times) if r % 2 == 0 else list(times)[::-1]):
                s, cpu, tokens = run_stage(inputs, work / f"out-{n}", n)
                got = outputs_bytes(work / f"out-{n}")
                reference = reference or got
                if got != reference:
                    raise SystemExit(f"workers={n}: output differs from the 1-process output")
                times[n].append(s)
                cpus[n].append(cpu)
                print(f"  workers={n}: {s:.1f}s ({tokens / s / 1e6:.2f} M tokens/s, "
                      f"{cpu:.1f} CPU-s in the tokenizing processes)", flush=True)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tok_path))
        rates = merge_rates(inputs, work, max(ns), tok_path, tok.token_to_id("<|endoftext|>"),
                            DType.optimal_dtype(tok.get_vocab_size()))
    load1 = os.getloadavg()
    result = summarize(args, tokens, times, cpus, rates, forkserver_s, load0, load1)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=2))
    print(f"figures: {args.json}")
    return result


def summarize(args, tokens: int, times: dict, cpus: dict, rates: dict, forkserver_s: float,
              load0, load1) -> dict:
    """The table, the goal, and the 64-worker / 10T-token projection (printed and returned)."""
    med = {n: statistics.median(v) for n, v in times.items()}
    per_cpu = {n: tokens / statistics.median(v) for n, v in cpus.items()}   # tokens per CPU-s
    rows = [{"workers": n, "seconds": med[n], "tokens_per_s": tokens / med[n],
             "speedup": med[1] / med[n], "efficiency": med[1] / med[n] / n,
             "tokens_per_cpu_s": per_cpu[n], "per_core_vs_1": per_cpu[n] / per_cpu[1],
             # cores the run got: below ~0.9 N, other work held the CPU and the wall speedup
             # says nothing about the code (Linux autogroup shares the CPU per session)
             "cores_used": statistics.median(c / t for c, t in zip(cpus[n], times[n]))}
            for n in med]
    top = rows[-1]
    # projection: a worker on a core of its own tokenizes at the 1-process rate per CPU-second,
    # times the per-core efficiency measured in the pool; serial costs added: the merge (a
    # sequential copy of every output, hashed on the way) and the pool's start-up
    eff = min(top["per_core_vs_1"], 1.0)
    merge_mb_s = min(rates["merge_mb_s"], args.disk_mb_s)
    proj_rate = per_cpu[1] * 64 * eff
    tok_s = TOKENS_10T / proj_rate
    merge_s = TOKENS_10T * BYTES_PER_TOKEN / (merge_mb_s * 1e6)
    projection = {"workers": 64, "per_worker_tokens_per_s": per_cpu[1], "efficiency": eff,
                  "tokens_per_s": proj_rate, "merge_mb_s_used": merge_mb_s,
                  "tokenize_days_10t": tok_s / 86400, "merge_hours_10t": merge_s / 3600,
                  "days_10t": (tok_s + merge_s + forkserver_s) / 86400}
    print(f"\n{tokens / 1e6:.1f} M tokens; median of {args.repeats} runs; load average "
          f"{load0[0]:.1f} -> {load1[0]:.1f} on {os.cpu_count()} cores (wall figures are noisy "
          "when other work shares the cores; CPU-s figures are not)")
    print(f"{'workers':>8} {'seconds':>8} {'M tok/s':>8} {'speedup':>8} {'x N':>6} "
          f"{'M tok/CPU-s':>12} {'per core':>9} {'cores used':>11}")
    for r in rows:
        print(f"{r['workers']:>8} {r['seconds']:>8.1f} {r['tokens_per_s'] / 1e6:>8.2f} "
              f"{r['speedup']:>8.2f} {r['efficiency']:>6.2f} {r['tokens_per_cpu_s'] / 1e6:>12.2f} "
              f"{r['per_core_vs_1']:>9.2f} {r['cores_used']:>11.2f}")
    if any(r["cores_used"] < 0.9 * r["workers"] for r in rows):
        print("note: a run got fewer cores than it had workers (other work on the machine): its "
              "wall speedup is not the code's; rerun on an idle machine")
    print(f"goal speedup >= 0.8 x N: {'met' if top['efficiency'] >= 0.8 else 'NOT met'} at "
          f"N={top['workers']} ({top['efficiency']:.2f} x N wall; per-core throughput in the pool "
          f"{top['per_core_vs_1']:.2f} x the single process's)")
    print(f"pool start-up (forkserver, Megatron imported once; once per stage run): "
          f"{forkserver_s:.1f}s")
    print(f"merge (add_index, xxh3 on the way): {rates['merge_mb_s']:.0f} MB/s over "
          f"{rates['merged_mb']:.0f} MB; from page cache: xxh3-128 {rates['xxh3_gb_s']:.1f} GB/s, "
          f"sha256 {rates['sha256_gb_s']:.2f} GB/s")
    print(f"projection to 64 workers: {per_cpu[1] / 1e6:.2f} M tok/s per worker x 64 x {eff:.2f} "
          f"= {proj_rate / 1e6:.0f} M tok/s; 10T tokens = {projection['tokenize_days_10t']:.1f} "
          f"days tokenizing + {projection['merge_hours_10t']:.1f} h merging ({BYTES_PER_TOKEN} "
          f"B/token at {merge_mb_s:.0f} MB/s, digest included) = {projection['days_10t']:.1f} days")
    return {"tokens": tokens, "corpus_mb": args.mb, "vocab": args.vocab, "repeats": args.repeats,
            "rows": rows, "forkserver_start_s": forkserver_s, **rates, "projection": projection,
            "loadavg_start": load0, "loadavg_end": load1, "cpus": os.cpu_count()}


if __name__ == "__main__":
    main()
