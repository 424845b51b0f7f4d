"""Draw the plan as a picture: ``forge plan --graph FILE.png``.

Stages go left to right by depth (longest path from a root), so every arrow points right. Within a
column the stage that continues the longest chain keeps its parent's row and the others (the
evaluations) step aside, so the model's lineage reads as one straight line. An edge that skips
columns would cut through boxes, so it is routed as a bus on a lane above or below every box (one
bus per parent and side: the ``tokenize`` stage feeds a dozen stages through two buses, not a
dozen crossing arrows). More than ``MAX_COLS`` columns fold into bands, top to bottom, like lines
of text (the Granite recipe is 20 columns deep); edges and buses leave a band at its right edge and
come back at the next band's left edge. Boxes are coloured by what the plan will do, or "failed"
when the stage's last attempt failed (``failures.last_failure``). Matplotlib only, no graphviz.
"""
from __future__ import annotations

import dataclasses
import itertools
from pathlib import Path
from typing import Any, Iterator

from flows.failures import last_failure
from flows.plan import Step, complete, newest_checkpoint

STATES = ("cached", "run", "resume", "failed", "blocked", "skip")
STATE_COLOURS = {"cached": "#a8dba8", "run": "#9ec5ee", "resume": "#f8d17f",
                 "failed": "#f08377", "blocked": "#d4d4d4", "skip": "#ffffff"}
STATE_NAMES = {"cached": "cached", "run": "to run", "resume": "to resume",
               "failed": "last attempt failed", "blocked": "blocked (not built)",
               "skip": "not selected"}
BUS_COLOURS = ("#4c72b0", "#c44e52", "#55a868", "#8172b2", "#ccb974", "#64b5cd", "#937860")

# Geometry in inches (the axes are drawn 1:1 in inches, so font sizes relate to box sizes).
COL_W, ROW_H = 1.48, 0.92          # grid pitch
BOX_W, BOX_H = 1.24, 0.58
LANE_GAP, LANE_CLEAR = 0.13, 0.2   # between bus lanes; from the outermost boxes to the first lane
BAND_GAP, STUB = 0.3, 0.32         # between folded bands; edge stubs at a fold
MAX_COLS = 11                      # wider DAGs fold into bands (a 20-column strip is unreadable)


@dataclasses.dataclass
class Box:
    name: str
    state: str
    note: str          # e.g. "exit 1 · resumes iter_0000550"
    label: str         # kind (+ tokens)
    col: int           # depth: longest path from a root
    row: int           # 0 = the main line; negative = below
    band: int = 0      # wide DAGs fold into bands, top to bottom
    x: float = 0.0     # centre, inches
    y: float = 0.0


@dataclasses.dataclass(frozen=True)
class Bus:
    source: str
    children: tuple[str, ...]
    side: str          # "above" | "below" | "arc" (no lane route: through the gaps between boxes)
    level: int         # 0 = the lane nearest the boxes


@dataclasses.dataclass
class Layout:
    boxes: dict[str, Box]
    direct: list[tuple[str, str]]      # edges between adjacent columns: straight arrows
    buses: list[Bus]                   # edges that skip columns
    per_band: int = 0                  # columns per band
    band_h: float = 0.0                # inches from one band's main row to the next
    colours: dict[str, str] = dataclasses.field(default_factory=dict)  # face colour as drawn

    @property
    def edges(self) -> set[tuple[str, str]]:
        return set(self.direct) | {(b.source, c) for b in self.buses for c in b.children}

    def lanes(self, side: str) -> int:
        return 1 + max((b.level for b in self.buses if b.side == side), default=-1)


def fmt_tokens(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit} tok"
    return f"{int(n)} tok"


def node_state(step: Step) -> tuple[str, str]:
    """(state, note): the plan's action, or "failed" when the last attempt failed."""
    failure = last_failure(step.node) if step.action != "cached" else None
    ck = newest_checkpoint(step.node)
    if failure is not None:
        then = {"resume": f"resumes {ck}", "run": "reruns from scratch",
                "skip": "not selected", "blocked": "blocked"}.get(step.action, step.action)
        return "failed", f"exit {failure.get('exit_code', '?')} · {then}"
    if step.action == "resume":
        return "resume", f"from {ck}"
    if step.action == "skip" and complete(step.node):
        return "cached", "not selected"   # its output is there, and selected children read it
    if step.action == "blocked":
        return "blocked", "parent blocked" if step.why.startswith("parent ") else "not built yet"
    return step.action, ""


def layout(steps: list[Step], max_cols: int = MAX_COLS) -> Layout:
    """Columns by depth, rows by chain length, long edges onto buses. Pure: no drawing."""
    order = [s.name for s in steps]                       # topological (DAG order)
    parents = {s.name: [p for p in s.node.parents if p in order] for s in steps}
    depth: dict[str, int] = {}
    for n in order:
        depth[n] = 1 + max((depth[p] for p in parents[n]), default=-1)
    chain: dict[str, int] = {}                             # longest path to a sink
    for n in reversed(order):
        kids = [c for c in order if n in parents[c]]
        chain[n] = 1 + max((chain[c] for c in kids), default=-1)

    row: dict[str, int] = {}
    for col in range(max(depth.values(), default=-1) + 1):
        taken: set[int] = set()
        members = sorted((n for n in order if depth[n] == col), key=lambda n: (-chain[n], order.index(n)))
        for n in members:
            # follow the nearest parent (deepest): a chain stays on one row
            near = max(parents[n], key=lambda p: depth[p], default=None)
            want = row[near] if near is not None else 0
            for r in _nearest(want):
                if r not in taken:
                    row[n] = r
                    taken.add(r)
                    break

    states = {s.name: node_state(s) for s in steps}
    boxes = {s.name: Box(s.name, states[s.name][0], states[s.name][1], _label(s),
                         depth[s.name], row[s.name]) for s in steps}
    direct: list[tuple[str, str]] = []
    wanted: dict[tuple[str, str], list[str]] = {}
    for c in order:
        for p in parents[c]:
            if depth[c] - depth[p] == 1:
                direct.append((p, c))
            else:
                wanted.setdefault((p, _side(boxes, p, c)), []).append(c)
    lay = Layout(boxes, direct, _assign_lanes(boxes, wanted))
    _place(lay, max_cols)
    return lay


def _place(lay: Layout, max_cols: int) -> None:
    """Fold columns into bands of equal width; set each box's centre in inches."""
    cols = 1 + max(b.col for b in lay.boxes.values())
    bands = -(-cols // max(1, max_cols))
    lay.per_band = -(-cols // bands)
    rows = [b.row for b in lay.boxes.values()]
    lay.band_h = ((max(rows) - min(rows)) * ROW_H + BOX_H + 2 * LANE_CLEAR + BAND_GAP
                  + (lay.lanes("above") + lay.lanes("below")) * LANE_GAP)
    for b in lay.boxes.values():
        b.band = b.col // lay.per_band
        b.x = (b.col % lay.per_band) * COL_W
        b.y = b.row * ROW_H - b.band * lay.band_h


def _nearest(want: int) -> Iterator[int]:
    """Rows by distance from ``want``; below (negative) before above at equal distance."""
    yield want
    for d in itertools.count(1):
        yield want - d
        yield want + d


def _side(boxes: dict[str, Box], p: str, c: str) -> str:
    """A bus leaves its parent and enters its child vertically: nothing may sit in the way."""
    def clear(name: str, side: str) -> bool:
        b = boxes[name]
        return not any(o.col == b.col and (o.row > b.row if side == "above" else o.row < b.row)
                       for o in boxes.values())
    prefer = ("above", "below") if boxes[c].row >= boxes[p].row else ("below", "above")
    for side in prefer:
        if clear(p, side) and clear(c, side):
            return side
    return "arc"   # no straight route: drawn through the gaps between rows and columns


def _assign_lanes(boxes: dict[str, Box], wanted: dict[tuple[str, str], list[str]]) -> list[Bus]:
    """Interval colouring per side; short buses nearest the boxes so long ones cross less."""
    buses: list[Bus] = []
    for side in ("above", "below", "arc"):
        groups = [(p, kids) for (p, s), kids in wanted.items() if s == side]
        spans = {p: (boxes[p].col, max(boxes[k].col for k in kids)) for p, kids in groups}
        levels: list[list[tuple[int, int]]] = []
        for p, kids in sorted(groups, key=lambda g: (spans[g[0]][1] - spans[g[0]][0], spans[g[0]])):
            lo, hi = spans[p]
            level = next((i for i, used in enumerate(levels)
                          if all(hi < a or lo > b for a, b in used)), len(levels))
            if level == len(levels):
                levels.append([])
            levels[level].append((lo, hi))
            buses.append(Bus(p, tuple(kids), side, level))
    return buses


def _label(step: Step) -> str:
    label = step.node.kind
    return f"{label} · {fmt_tokens(step.tokens)}" if step.tokens else label


def draw_dag(steps: list[Step], path: str | Path, title: str = "",
             max_cols: int = MAX_COLS) -> Layout:
    """Render the plan's DAG to a PNG; return the layout with each box's colour as drawn."""
    from matplotlib.colors import to_hex
    from matplotlib.figure import Figure
    from matplotlib.patches import FancyBboxPatch, Patch

    lay = layout(steps, max_cols)
    boxes = list(lay.boxes.values())
    bands = 1 + max(b.band for b in boxes)
    top = max(b.row for b in boxes) * ROW_H + BOX_H / 2        # of band 0
    bottom = min(b.row for b in boxes) * ROW_H - BOX_H / 2

    def lane_y(side: str, level: int, band: int) -> float:
        if side == "above":
            return top + LANE_CLEAR + level * LANE_GAP - band * lay.band_h
        return bottom - LANE_CLEAR - level * LANE_GAP - band * lay.band_h

    margin = STUB if bands > 1 else 0.15
    x_lo, x_hi = -BOX_W / 2 - margin, (lay.per_band - 1) * COL_W + BOX_W / 2 + margin
    y_hi = lane_y("above", lay.lanes("above"), 0) + 0.6          # room for title and legend
    y_lo = lane_y("below", lay.lanes("below"), bands - 1) - 0.05
    fig = Figure(figsize=(x_hi - x_lo, y_hi - y_lo), dpi=110)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(x_lo, x_hi)
    ax.set_ylim(y_lo, y_hi)
    ax.set_axis_off()

    entries: dict[tuple[str, str], int] = {}

    def entry_x(name: str, side: str) -> float:
        """Lines enter a box left of its centre (spread out) and leave it right of it."""
        k = entries[(name, side)] = entries.get((name, side), -1) + 1
        return lay.boxes[name].x - BOX_W * (0.12 + 0.1 * k)

    arrow = dict(arrowstyle="-|>", mutation_scale=9, shrinkA=0, shrinkB=0, lw=0.9)

    def line(xy_from: tuple[float, float], xy_to: tuple[float, float], colour: str,
             **style: Any) -> None:
        ax.annotate("", xy=xy_to, xytext=xy_from, arrowprops=dict(arrow, color=colour, **style),
                    zorder=2)

    def fade(child: str) -> float:   # edges into stages that will not run stay in the back
        return 0.35 if lay.boxes[child].state == "skip" else 1.0

    grey = "#555555"
    for p, c in lay.direct:
        a, b = lay.boxes[p], lay.boxes[c]
        if a.band == b.band:
            line((a.x + BOX_W / 2, a.y), (b.x - BOX_W / 2, b.y), grey, alpha=fade(c))
        else:   # the fold: out at the right edge, back in at the left edge of the next band
            ax.plot([a.x + BOX_W / 2, x_hi], [a.y, a.y], color=grey, lw=0.9, zorder=2,
                    alpha=fade(c))
            line((x_lo, b.y), (b.x - BOX_W / 2, b.y), grey, alpha=fade(c))
    for i, bus in enumerate(lay.buses):
        colour = BUS_COLOURS[i % len(BUS_COLOURS)]
        src = lay.boxes[bus.source]
        if bus.side == "arc":   # through the gaps: out of the parent's bottom (top), along the
            for c in bus.children:   # gap between rows, down (up) the gap left of the child, in
                b = lay.boxes[c]
                sign = -1 if b.y < src.y else 1
                x0, x1 = src.x + BOX_W * 0.35, b.x - BOX_W / 2 - (COL_W - BOX_W) / 2
                y_gap = src.y + sign * ROW_H / 2
                ax.plot([x0, x0, x1, x1], [src.y + sign * BOX_H / 2, y_gap, y_gap, b.y],
                        color=colour, lw=0.9, zorder=2, alpha=fade(c))
                line((x1, b.y), (b.x - BOX_W / 2, b.y), colour, alpha=fade(c))
            continue
        sign = 1 if bus.side == "above" else -1
        x0 = src.x + BOX_W * 0.22
        drops = [(c, entry_x(c, bus.side)) for c in bus.children]
        last = max(lay.boxes[c].band for c in bus.children)
        for band in range(src.band, last + 1):
            y = lane_y(bus.side, bus.level, band)
            here = [x for c, x in drops if lay.boxes[c].band == band]
            start = x0 if band == src.band else x_lo
            end = max(here) if band == last else x_hi
            ax.plot([start, end], [y, y], color=colour, lw=1.0, zorder=1)
            ax.text(start + 0.04, y + sign * 0.015, bus.source, fontsize=5.5, color=colour,
                    va="bottom" if sign > 0 else "top", ha="left", zorder=3)
        y = lane_y(bus.side, bus.level, src.band)
        ax.plot([x0, x0], [src.y + sign * BOX_H / 2, y], color=colour, lw=1.0, zorder=1)
        for c, x in drops:
            b = lay.boxes[c]
            y = lane_y(bus.side, bus.level, b.band)
            ax.plot([x], [y], "o", ms=2.2, color=colour, zorder=3, alpha=fade(c))
            line((x, y), (x, b.y + sign * BOX_H / 2), colour, alpha=fade(c))

    for b in boxes:
        skip = b.state == "skip"
        patch = FancyBboxPatch((b.x - BOX_W / 2, b.y - BOX_H / 2), BOX_W, BOX_H,
                               boxstyle="round,pad=0,rounding_size=0.07",
                               facecolor=STATE_COLOURS[b.state], lw=0.9, zorder=4,
                               edgecolor="#999999" if skip else "#333333",
                               linestyle="--" if skip else "-", gid=f"node:{b.name}")
        ax.add_patch(patch)
        lay.colours[b.name] = to_hex(patch.get_facecolor())
        ink = "#888888" if skip else "#111111"
        lines = [(b.name, 7.5, "bold", "normal"), (b.label, 6, "normal", "normal")]
        if b.note:
            lines.append((b.note, 5.5, "normal", "italic"))
        offsets = [0.09, -0.1] if len(lines) == 2 else [0.15, -0.03, -0.17]
        for (text, size, weight, style), dy in zip(lines, offsets):
            ax.text(b.x, b.y + dy, text, fontsize=size, fontweight=weight, style=style, color=ink,
                    ha="center", va="center", zorder=5)

    handles = [Patch(facecolor=STATE_COLOURS[s], edgecolor="#999999" if s == "skip" else "#333333",
                     linestyle="--" if s == "skip" else "-", label=STATE_NAMES[s]) for s in STATES]
    ax.text(x_lo + 0.12, y_hi - 0.1, title, fontsize=10, fontweight="bold", va="top", ha="left")
    ax.legend(handles=handles, loc="upper right", ncol=len(STATES), fontsize=7, frameon=False,
              bbox_to_anchor=(1, 1), borderaxespad=0.3, handlelength=1.6)
    fig.savefig(path, dpi=110, facecolor="white")
    return lay


def draw_plan(prep: Any, path: str | Path) -> str:
    """``forge plan --graph``: draw a prepared run's plan; return the line to print."""
    pipe = prep.dag.pipeline
    only = f"  --only '{prep.only}'" if prep.only else ""
    lay = draw_dag(prep.steps, path, f"{pipe.name}: forge plan{only}")
    failed = [b.name for b in lay.boxes.values() if b.state == "failed"]
    return f"\ngraph of {len(lay.boxes)} stages written to {path}" + (
        f" (last attempt failed: {', '.join(failed)})" if failed else "")
