"""The Granite 4.1 recipe's numbers say where they come from, and its LR curve has no jumps.

Every line of the recipe's YAML that holds a number carries `# published` (IBM's release note
gives it) or `# assumed` (it does not) in its comment. Not numbers, so exempt: digits inside a
name (stage names such as `pretrain-1`, `${layout.extend-1}`, `granite-8b`, `bf16`), in a path or
URL, and in comments. The tiny pipeline and tiny model are not the recipe and are not read.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from stages.training.schedules import lr_at

CONF = Path(__file__).resolve().parents[2] / "conf"
RECIPE = [CONF / "pipeline" / "granite-4.1.yaml",
          *(CONF / "model" / f"granite-{s}.yaml" for s in ("3b", "8b", "30b")),
          *(CONF / "layout" / f"granite-{s}.yaml" for s in ("3b", "8b", "30b"))]
# A YAML number standing on its own: after a space, `:`, `[`, `{` or `,` (so not the `1` of
# `pretrain-1` or the `16` of `bf16`), optionally signed, ending before a separator.
NUMBER = re.compile(r"(?:(?<=[\s:\[{,])|^)-?\d[\d_]*(?:\.\d+)?(?:[eE][+-]?\d+)?(?=[\s,\]}]|$)")
MARK = re.compile(r"\b(published|assumed)\b")


def unmarked(text: str) -> list[str]:
    """Lines holding a number (outside the comment) whose comment has neither mark."""
    out = []
    for line in text.splitlines():
        body, _, comment = line.partition("#")   # no `#` inside the recipe's values
        if NUMBER.search(body) and not MARK.search(comment):
            out.append(line.strip())
    return out


def test_the_detector_finds_numbers_and_skips_names():
    assert unmarked("  lr: 0.01\n  power_b: -0.51\n  tokens: 1.0e-5\n  x: [4096, 8]") == [
        "lr: 0.01", "power_b: -0.51", "tokens: 1.0e-5", "x: [4096, 8]"]
    assert unmarked("  pretrain-1:   # 10T tokens\n  from: merge-2\n  p: ${layout.extend-3}\n"
                    "  precision: {dtype: bf16, fp8: none}\n  - override /model: granite-30b\n"
                    "  web: {data_files: [\"s3://b/granite/web/*.parquet\"]}") == []
    assert unmarked("  lr: 0.01   # assumed: why\n  hidden: 4096  # published") == []


@pytest.mark.parametrize("path", RECIPE, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_number_of_the_recipe_is_marked(path):
    bad = unmarked(path.read_text())
    assert not bad, (f"{path}: mark each line `# published` (IBM gave it) or `# assumed: why`:\n  "
                     + "\n  ".join(bad))


def phase_lrs() -> dict[str, tuple[float, float]]:
    """(first, last) LR of each pretraining phase of the composed recipe, with the tokens the
    training loop counts: every phase's steps x batch x length, parents included."""
    from flows import config
    stages = config.load(["pipeline=granite-4.1"]).stages
    seen, out = 0, {}
    for i in range(1, 5):
        c = stages[f"pretrain-{i}"].config
        per_step = c.global_batch_size * c.seq_length
        out[c.schedule.kind + str(i)] = (
            lr_at(c.schedule, 0, c.steps, seen),
            lr_at(c.schedule, c.steps - 1, c.steps, seen + (c.steps - 1) * per_step))
        seen += c.steps * per_step
    return out


def test_each_phase_starts_where_the_previous_one_ended():
    """Phase 3's exponential decay once started at 2e-3, twice the 1.0e-3 at which phase 2's power
    curve ends; phase 4 starts where phase 3 ends (the checkpoints carry AdamW's moments across,
    so a jump in LR is a jump in update size)."""
    lrs = list(phase_lrs().values())
    for (_, end), (start, _) in zip(lrs, lrs[1:]):
        assert start == pytest.approx(end, rel=0.01), lrs
    assert lrs[-1][1] == 0.0                                  # phase 4 decays to zero (published)
