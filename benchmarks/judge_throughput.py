"""Judge requests/s with N requests in flight (N = 1, 4, 8) against the same server.

One scripted OpenAI-compatible server process (``tests/support/openai_script_server.py``) answers
every request after a fixed delay (a stand-in for a judge model's latency); ``judge_all`` asks it
for the verdicts of the same samples with ``concurrency`` N, each run on a fresh verdict cache, side
by side in this one run. Prints requests/s per N and its ratio to N = 1 (ideal: N, while the server
keeps up).

    python benchmarks/judge_throughput.py [--samples 96] [--delay-ms 50] [--repeats 3]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from stages.data.judge import JudgeSpec, VerdictCache, judge_all  # noqa: E402
from stages.schema import from_dict  # noqa: E402
from tests.support.openai_script_server import scripted_server  # noqa: E402

REPLY = '{"helpful": 4, "correct": 5, "reason": "fine"}'


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=96)
    ap.add_argument("--delay-ms", type=float, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--inflight", type=int, nargs="+", default=[1, 4, 8])
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="judge-bench-"))
    samples = [(f"s{i}", [{"role": "user", "content": f"What is {i} + {i}?"},
                          {"role": "assistant", "content": str(2 * i)}]) for i in range(args.samples)]
    script = {"models": ["bench-judge"], "default": REPLY, "delay_s": args.delay_ms / 1000}
    rates: dict[int, list[float]] = {n: [] for n in args.inflight}
    with scripted_server(script, work) as server:
        for rep in range(args.repeats):
            for n in args.inflight:  # interleaved, so drift in the machine's load hits every N alike
                spec = from_dict(JudgeSpec, {"endpoint": server.url, "concurrency": n, "rubric": {
                    "helpful": {"question": "Does the assistant help?", "threshold": 3},
                    "correct": {"question": "Is the answer right?", "threshold": 3}}}, "judge")
                with VerdictCache(work / f"cache-{n}-{rep}.sqlite") as cache:
                    t0 = time.perf_counter()
                    got = judge_all(samples, spec, server.url, cache)
                    rates[n].append(len(got) / (time.perf_counter() - t0))
        stats = server.stats()
    base = statistics.median(rates[args.inflight[0]])
    print(f"judge throughput: {args.samples} samples, server delay {args.delay_ms:g} ms/request, "
          f"median of {args.repeats}; server saw {stats['requests']} requests, "
          f"at most {stats['max_in_flight']} in flight")
    print(f"{'in flight':>9} {'requests/s':>11} {'vs N=' + str(args.inflight[0]):>8} {'ideal':>6}")
    for n in args.inflight:
        rate = statistics.median(rates[n])
        print(f"{n:>9} {rate:>11.1f} {rate / base:>7.2f}x {n / args.inflight[0]:>5.0f}x")


if __name__ == "__main__":
    main()
