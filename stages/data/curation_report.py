"""The curation report, what a team reads before it trusts the data (files under ``report/``,
logged on the stage's MLflow run):

- ``report.json``: rows read, kept, held out, rejected per rule (malformed reasons, duplicates,
  each rule filter, ``judge:<criterion>`` for the first criterion under its threshold,
  ``judge_unparsable``), and per judge criterion the mean score and how many fell below the
  threshold (a sample can fall below several);
- ``rejected_by_rule.png``: a bar per reason; ``judge_scores.png``: a score histogram per
  criterion with its threshold;
- ``rejects/<reason>.jsonl``: the first ``SAMPLES_PER_REASON`` rejects of each reason, in input
  order (deterministic), with the rule's detail.
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

SAMPLES_PER_REASON = 5
REPORT = "report"


def write_report(out_dir: Path, counts: dict, rejected: list[dict], verdicts: list[dict],
                 rubric: dict[str, Any], kept: int, heldout: int, capped: int) -> tuple[dict, dict]:
    """Write the report files; return (the report, artifact outputs: name -> relative path)."""
    folder = Path(out_dir) / REPORT
    (folder / "rejects").mkdir(parents=True, exist_ok=True)
    by_rule = Counter(r["rule"] for r in rejected)
    judge: dict[str, Any] = {}
    if verdicts:
        parsed = [v for v in verdicts if not v["unparsable"]]
        judge = {"judged": len(verdicts), "unparsable": len(verdicts) - len(parsed),
                 "passed": sum(1 for v in parsed if v["passed"])}
        for name, crit in rubric.items():
            scores = [v["scores"][name] for v in parsed if name in (v["scores"] or {})]
            if scores:
                judge[f"{name}/mean"] = sum(scores) / len(scores)
                judge[f"{name}/below_threshold"] = sum(1 for s in scores if s < crit.threshold)
    report = {"rows": counts.get("rows", 0), "kept": kept, "heldout": heldout,
              "capped_by_target": capped, "rejected": len(rejected),
              "rejected_by_rule": dict(sorted(by_rule.items())), "judge": judge}
    outputs = {"report": f"{REPORT}/report.json"}
    (folder / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    for rule in sorted(by_rule):
        rows = [r for r in rejected if r["rule"] == rule][:SAMPLES_PER_REASON]
        name = rule.replace(":", "-").replace("/", "-")
        path = folder / "rejects" / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
        outputs[f"rejects/{name}"] = f"{REPORT}/rejects/{name}.jsonl"
    if by_rule:
        _bars(by_rule, folder / "rejected_by_rule.png")
        outputs["rejected_by_rule"] = f"{REPORT}/rejected_by_rule.png"
    if verdicts and rubric:
        _histograms(verdicts, rubric, folder / "judge_scores.png")
        outputs["judge_scores"] = f"{REPORT}/judge_scores.png"
    return report, outputs


def _bars(by_rule: Counter, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rules = sorted(by_rule, key=lambda r: (-by_rule[r], r))
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(rules) + 1.2))
    ax.barh(rules[::-1], [by_rule[r] for r in rules[::-1]], color="#b5543c")
    ax.set_xlabel("samples rejected")
    ax.set_title("curation: rejected by rule")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _histograms(verdicts: list[dict], rubric: dict[str, Any], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(rubric)
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 2.8), squeeze=False)
    parsed = [v for v in verdicts if not v["unparsable"]]
    for ax, name in zip(axes[0], names):
        crit = rubric[name]
        scores = [v["scores"][name] for v in parsed if name in (v["scores"] or {})]
        bins = [b - 0.5 for b in range(crit.min_score, crit.max_score + 2)]
        ax.hist(scores, bins=bins, color="#3c6eb5", rwidth=0.85)
        ax.axvline(crit.threshold - 0.5, color="black", linestyle="--", linewidth=1)
        ax.set_title(f"{name} (n={len(scores)})", fontsize=9)
        ax.set_xlabel("score (dashed: threshold)", fontsize=8)
    unparsable = len(verdicts) - len(parsed)
    fig.suptitle(f"judge scores ({unparsable} of {len(verdicts)} verdicts unparsable)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
