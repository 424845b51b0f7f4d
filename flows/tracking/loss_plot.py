"""One picture of the training loss across every phase of a pipeline, for the parent MLflow run.

Each training stage's worker appends a line per step to its own ``metrics.jsonl`` (``step``,
``loss``, ``tokens`` = tokens trained over all phases, parents included). Read in DAG order, those
files join into one curve: pretrain-1..4, then each context extension. The x axis is that token
count, which carries on across phases (a merge passes on the larger of its parents' counts), so
the phases line up end to end; without token counts it falls back to steps, laid end to end.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable

LOSS_PLOT = "loss_across_phases.png"
PHASE_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b2", "#937860", "#da8bc3",
                 "#8c8c8c", "#ccb974", "#64b5cd")


@dataclasses.dataclass(frozen=True)
class PhaseCurve:
    stage: str
    steps: list[int]
    tokens: list[float] | None     # None when a line lacks the count
    loss: list[float]


def read_phase(stage: str, path: Path) -> PhaseCurve | None:
    """One stage's loss per step; the last line wins for a step (a resumed worker rewrites some)."""
    if not path.exists():
        return None
    rows: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue   # a line being written right now
        if isinstance(rec, dict) and isinstance(rec.get("loss"), (int, float)) and "step" in rec:
            rows[int(rec["step"])] = rec
    if not rows:
        return None
    steps = sorted(rows)
    has_tokens = all(isinstance(rows[s].get("tokens"), (int, float)) for s in steps)
    return PhaseCurve(stage, steps, [float(rows[s]["tokens"]) for s in steps] if has_tokens else None,
                      [float(rows[s]["loss"]) for s in steps])


def read_curves(nodes: Iterable[Any]) -> list[PhaseCurve]:
    """The training stages' curves, in the order given (the DAG's); stages without lines left out."""
    curves = []
    for node in nodes:
        if node.kind_cls.tokens(node.config) <= 0:
            continue   # not a training stage (an evaluation's numbers are not a training loss)
        curve = read_phase(node.name, node.out_dir / "metrics.jsonl")
        if curve is not None:
            curves.append(curve)
    return curves


def x_values(curves: list[PhaseCurve]) -> tuple[str, list[list[float]]]:
    """("tokens", xs) when every phase has token counts, else ("steps", phases end to end)."""
    if all(c.tokens is not None for c in curves):
        return "tokens", [list(c.tokens or []) for c in curves]
    out, offset = [], 0
    for c in curves:
        out.append([float(offset + s) for s in c.steps])
        offset += c.steps[-1]
    return "steps", out


def running_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``window`` values at each point (fewer at the start)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def draw_loss(curves: list[PhaseCurve], path: str | Path, title: str = "") -> Any:
    """Loss against tokens, one line per phase, a dashed line and a name where each phase starts.

    Returns the matplotlib Figure (its lines carry ``gid = stage``)."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FormatStrFormatter

    axis, xs = x_values(curves)
    fig = Figure(figsize=(10, 4.2), dpi=110)
    ax = fig.add_subplot()
    for i, (c, x) in enumerate(zip(curves, xs)):
        colour = PHASE_COLOURS[i % len(PHASE_COLOURS)]
        ax.plot(x, c.loss, color=colour, lw=0.6, alpha=0.35, gid=c.stage)
        # small batches make a noisy curve: the trend is a running mean over ~1/30 of the phase
        ax.plot(x, running_mean(c.loss, max(1, len(c.loss) // 30)), color=colour, lw=1.4,
                label=c.stage, gid=f"{c.stage} (mean)")
        if i:
            ax.axvline(x[0], color="#999999", ls="--", lw=0.7, zorder=0)
    ax.set_yscale("log")   # the first steps of phase 1 sit an order of magnitude above the rest
    lo, hi = ax.get_ylim()
    for i, (c, x) in enumerate(zip(curves, xs)):
        # names along the bottom, where each phase starts (its loss starts high, at the top)
        ax.text(x[0], lo, f" {c.stage} ", rotation=90, va="bottom", ha="left", fontsize=7,
                color=PHASE_COLOURS[i % len(PHASE_COLOURS)],
                bbox=dict(facecolor="white", alpha=0.75, edgecolor="none", pad=0.5))
    ax.set_ylim(lo, hi)
    ax.set_xlabel("tokens trained (all phases)" if axis == "tokens" else "steps (phases end to end)")
    ax.set_ylabel("training loss")
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%.1f"))
    ax.yaxis.set_minor_formatter(FormatStrFormatter("%.1f"))
    ax.tick_params(axis="y", which="both", labelsize=7)
    ax.grid(alpha=0.25, which="both")
    ax.set_title(title or "training loss across phases", fontsize=10, loc="left")
    fig.tight_layout()
    fig.savefig(path, dpi=110, facecolor="white")
    return fig
