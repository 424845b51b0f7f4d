"""The one summary table of tests/gpu/run_all.sh, and its exit status.

Rows: the steps run_all.sh reports itself (``--row "check|status|figure"``: install, machine),
every GPU test from the JSON lines that tests/gpu/conftest.py writes (``--report``), and every
precision of benchmarks/mfu.py (``--mfu-json``). Statuses:

- passed: a test whose assertions held; ran: a step or benchmark row that completed;
- failed: a test that failed or errored (collection included) or never finished, a benchmark row
  that raised, a step that failed, pytest or mfu.py exiting non-zero with nothing to show why;
- not installed: a test that needs Transformer Engine or vLLM where the package is absent;
- skipped: any other stated reason (an FP8 recipe this GPU lacks).

Exit 1 when anything failed, or when nothing passed or ran at all; else 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

NOT_INSTALLED = "not installed: "  # tests/gpu/conftest.py's skip reason
PYTEST_EXITS = {2: "interrupted", 3: "internal error", 4: "usage error",
                5: "collected no GPU test", 124: "timed out", 137: "killed (timeout)"}


def test_rows(lines: list[str]) -> list[tuple[str, str, str]]:
    """(check, status, figure) per test, from the report's JSON lines in the order they came."""
    phases: dict[str, list[dict]] = {}
    for line in lines:
        if line.strip():
            row = json.loads(line)
            phases.setdefault(row["test"].removeprefix("tests/gpu/"), []).append(row)
    out = []
    for test, rows in phases.items():
        failed = [r for r in rows if r["outcome"] == "failed"]
        skipped = [r for r in rows if r["outcome"] == "skipped"]
        called = [r for r in rows if r["when"] == "call" and r["outcome"] == "passed"]
        # pytest repeats a test's properties in its teardown report
        figures = "; ".join(dict.fromkeys(f for r in rows for f in r.get("figures", [])))
        if failed:
            what = failed[0]
            status, figure = "failed", f"{what['when']}: {what.get('reason', '')}".strip()
        elif skipped:
            reason = skipped[0].get("reason", "")
            if reason.startswith(NOT_INSTALLED):
                status, figure = "not installed", reason.removeprefix(NOT_INSTALLED)
            else:
                status, figure = "skipped", reason
        elif called:
            status, figure = "passed", figures or f"{called[0]['seconds']:.0f}s"
        else:
            status, figure = "failed", "did not finish (cut short by a timeout?)"
        out.append((test, status, figure))
    return out


def mfu_rows(data: dict) -> list[tuple[str, str, str]]:
    out = []
    accel = data.get("accelerator", "?")
    for r in data.get("rows", []):
        check = f"mfu.py {r['recipe']} ({r.get('spec', '?')} layer spec)"
        if r.get("failed"):
            out.append((check, "failed", r["skipped"]))
        elif "skipped" in r:
            out.append((check, "skipped", r["skipped"]))
        else:
            mem = "" if r.get("peak_memory_gib") is None else f", peak {r['peak_memory_gib']:.1f} GiB"
            out.append((check, "ran", f"{r['tokens_per_s']:.0f} tok/s, {r['tflops']:.3g} TFLOP/s = "
                                      f"{r['mfu_bf16_peak']:.1%} MFU of the {accel} bf16 peak{mem}, "
                                      f"loss {r['final_loss']:.2f}"))
    return out


def summarise(steps: list[str], report: Path | None, pytest_rc: int | None, mfu_json: Path | None,
              mfu_rc: int | None) -> list[tuple[str, str, str]]:
    rows = [tuple((s.split("|", 2) + ["", ""])[:3]) for s in steps]
    if report is not None:
        lines = report.read_text().splitlines() if report.exists() else []
        rows += test_rows(lines)
        if pytest_rc not in (None, 0, 1):  # 1 = some test failed, and its row says which
            rows.append(("pytest -m gpu tests/gpu", "failed",
                         f"exit {pytest_rc}: {PYTEST_EXITS.get(pytest_rc, 'see gpu-tests.log')}"))
    if mfu_json is not None and not mfu_json.exists():
        rows.append(("benchmarks/mfu.py", "failed",
                     f"exit {mfu_rc}: {PYTEST_EXITS.get(mfu_rc, 'no ' + mfu_json.name)} (see mfu.log)"))
    elif mfu_json is not None:
        data = json.loads(mfu_json.read_text())
        bench = mfu_rows(data)
        rows += bench
        if mfu_rc and not any(status == "failed" for _, status, _ in bench):
            why = data.get("failure") or PYTEST_EXITS.get(mfu_rc, "see mfu.log")
            rows.append(("benchmarks/mfu.py", "failed", f"exit {mfu_rc}: {why}"))
    return rows


def verdict(rows: list[tuple[str, str, str]]) -> int:
    statuses = [status for _, status, _ in rows]
    return 1 if "failed" in statuses or not {"passed", "ran"} & set(statuses) else 0


def render(rows: list[tuple[str, str, str]]) -> str:
    width = max([len("check")] + [len(c) for c, _, _ in rows])
    lines = [f"{'check':<{width}}  {'status':<13}  figure", "-" * (width + 30)]
    lines += [f"{c:<{width}}  {s:<13}  {f}" for c, s, f in rows]
    counts = {s: sum(1 for _, x, _ in rows if x == s)
              for s in ("passed", "ran", "failed", "not installed", "skipped")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items() if n))
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", default=[], help='"check|status|figure"')
    ap.add_argument("--report", type=Path, help="JSON lines of tests/gpu/conftest.py")
    ap.add_argument("--pytest-rc", type=int)
    ap.add_argument("--mfu-json", type=Path)
    ap.add_argument("--mfu-rc", type=int)
    args = ap.parse_args(argv)
    rows = summarise(args.row, args.report, args.pytest_rc, args.mfu_json, args.mfu_rc)
    code = verdict(rows)
    print(render(rows))
    print(f"exit {code}" + ("" if code else ": nothing that ran failed"))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
