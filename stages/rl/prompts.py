"""Where an RL stage's prompts come from: an embedded generator of verifiable tiny tasks
(``stages/rl/tiny_tasks.py``) or a HF ``datasets`` builder with files (``json`` = JSON Lines,
``parquet``, a hub id), read offline into a cache directory of the caller's.

JSON Lines (``builder: json``) are read through the ``text`` builder and parsed here, one line at
a time (as ``stages/data/chat_sources.py`` does): a reward's column such as ``constraints``, whose
``value`` is an int for one kind and a string for another, need not fit one Arrow schema. A line
that is not a JSON object is an error naming the line; blank lines are skipped.

Every row is a dict ``{"id", "prompt", "answer", ...extra}``: ``prompt`` a non-empty string (one
user turn), ``answer`` the reference as a string ("" when the source has no ``answer_field``),
then each ``extra_fields`` column under its own name (what the reward reads: ``tests`` for code,
``constraints`` for instruction following). Builder rows get ``id`` ``"<split>-<row index>"`` (a
column named ``id`` is kept when the source has one); generator rows carry their own.

Held-out split (deterministic in ``seed``, never in the data's order of arrival): the distinct
prompt texts are shuffled by ``random.Random(f"rl-heldout/{seed}")`` and the first ``heldout`` of
them are held out; the held-out rows are the first row of each such text, and EVERY row with a
held-out text leaves the train rows, so no held-out prompt is ever trained on, even when a source
repeats a prompt (the other copies are used nowhere). Train rows keep the source's order (the RL
loop shuffles per epoch). So the source needs at least ``heldout + 1`` distinct prompts
(``heldout`` may be 0).

Errors (``ConfigError``, each naming ``where`` and the field or file, before any compute): a
local data file that does not exist or is empty (``check_files``, also callable at validation),
a file ``datasets`` cannot read, a missing prompt/answer/extra column (naming the first row that
lacks it), an empty or non-text prompt, fewer distinct prompts than ``heldout + 1``.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Literal, Sequence

from stages.rl.tiny_tasks import ARITHMETIC_OPERANDS
from stages.schema import ConfigError, configclass, param
from stages.specs import check_source_choice

@configclass
class PromptSource:
    """RL prompts: the embedded generator of tiny verifiable tasks, or a `datasets` builder."""
    generator: Literal["arithmetic", "code", "format", "chat"] | None = param(
        None, "embedded tiny verifiable tasks (stages/rl/tiny_tasks.py): arithmetic (math), code "
              "(unit tests), format (checkable constraints), chat (open questions for the judge)")
    prompts: int = param(2000, "generator: number of prompts", gt=0)
    operands: tuple[int, ...] = param(
        ARITHMETIC_OPERANDS, "arithmetic generator: [smallest, largest] operand (each uniform in "
                             "it); the chat corpus's SFT questions use [10, 99]")
    builder: str | None = param(None, "datasets builder or hub path (json = JSON Lines, parquet)")
    data_files: tuple[str, ...] = param((), "builder: local files / globs")
    split: str = param("train", "builder: split to read")
    prompt_field: str = param("prompt", "column holding the prompt (one user turn)")
    answer_field: str | None = param(
        "answer", "column holding the reference answer (None: the source has none, e.g. chat)")
    extra_fields: tuple[str, ...] = param((), "columns the reward reads (tests, constraints, "
                                              "format)")
    heldout: int = param(200, "prompts held out (never trained on) for the held-out reward", ge=0)

    def __post_init__(self) -> None:
        check_source_choice(self, "embedded tiny tasks", "prompts")
        if not self.prompt_field:
            raise ConfigError("prompt_field: is empty; name the column holding the prompt")
        if self.answer_field is not None and self.answer_field == self.prompt_field:
            raise ConfigError(f"answer_field: {self.answer_field!r} is also the prompt_field; the "
                              "prompt and the answer must be different columns")
        reserved = {"id", "prompt", "answer", self.prompt_field, self.answer_field}
        clash = [f for f in self.extra_fields if f in reserved]
        if clash:
            raise ConfigError(f"extra_fields: {clash[0]!r} is already a row's id/prompt/answer; "
                              "list only the other columns the reward reads")
        if len(set(self.extra_fields)) != len(self.extra_fields):
            raise ConfigError("extra_fields: names a column twice")
        if self.generator is not None and self.prompts < self.heldout + 1:
            raise ConfigError(f"heldout: {self.heldout} held-out prompts leave none of the "
                              f"{self.prompts} generated prompts to train on; raise prompts to "
                              f"at least {self.heldout + 1} or lower heldout")
        if len(self.operands) != 2 or not 0 <= self.operands[0] <= self.operands[1]:
            raise ConfigError(f"operands: {list(self.operands)} must be [smallest, largest] with "
                              "0 <= smallest <= largest")
        if self.generator != "arithmetic" and self.operands != ARITHMETIC_OPERANDS:
            raise ConfigError("operands: is read by the arithmetic generator only; drop it")
        pool = (self.operands[1] - self.operands[0] + 1) ** 2
        if self.generator == "arithmetic" and pool < self.heldout + 1:
            raise ConfigError(f"operands: {list(self.operands)} give at most {pool} distinct "
                              f"questions, fewer than heldout + 1 = {self.heldout + 1}; widen "
                              "operands or lower heldout")


def describe(spec: PromptSource) -> str:
    """Where a source's prompts come from, for lineage (e.g. ``generator:arithmetic``)."""
    if spec.generator == "arithmetic":
        lo, hi = spec.operands
        return f"generator:arithmetic[{spec.prompts}, operands {lo}..{hi}]"
    if spec.generator is not None:
        return f"generator:{spec.generator}[{spec.prompts}]"
    files = ",".join(spec.data_files)
    return f"{spec.builder}:{files}[{spec.split}]" if files else f"{spec.builder}[{spec.split}]"


def check_files(spec: PromptSource, where: str) -> None:
    """A local data file that does not exist, or is empty, fails now, before anything runs."""
    import glob
    import os
    for pattern in spec.data_files:
        if "://" in pattern:
            continue  # remote: `datasets` says what is wrong with it
        found = glob.glob(pattern)
        if not found:
            raise ConfigError(f"{where}.data_files: {pattern!r} matches no file; fix the path "
                              "(relative paths are relative to the directory you run forge from)")
        empty = [f for f in found if os.path.isfile(f) and os.path.getsize(f) == 0]
        if empty:
            raise ConfigError(f"{where}.data_files: {empty[0]!r} is empty; a prompt source needs "
                              "rows")


def load_prompts(spec: PromptSource, *, seed: int, cache_dir: Path,
                 where: str) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) of the source (module docstring)."""
    if spec.generator is not None:
        from stages.rl.tiny_tasks import generate
        rows = generate(spec.generator, spec.prompts, seed, operands=spec.operands)
    else:
        check_files(spec, where)
        rows = _builder_rows(spec, Path(cache_dir), where)
    return split_heldout(rows, spec.heldout, seed, where)


def _builder_rows(spec: PromptSource, cache_dir: Path, where: str) -> list[dict]:
    records = _records(spec, cache_dir, where)
    if not records:
        raise ConfigError(f"{where}.data_files: {describe(spec)} holds no rows")
    wanted = [("prompt_field", spec.prompt_field)]
    if spec.answer_field is not None:
        wanted.append(("answer_field", spec.answer_field))
    wanted += [("extra_fields", f) for f in spec.extra_fields]
    for field, column in wanted:
        lacking = next((i for i, rec in enumerate(records) if column not in rec), None)
        if lacking is not None:
            raise ConfigError(f"{where}.{field}: {describe(spec)} has no column {column!r} (row "
                              f"{lacking}); columns found: {', '.join(records[lacking])}")
    rows = []
    for i, rec in enumerate(records):
        prompt = rec[spec.prompt_field]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError(f"{where}.prompt_field: row {i} of {describe(spec)} has no prompt "
                              f"text in column {spec.prompt_field!r} (got {prompt!r})")
        answer = rec[spec.answer_field] if spec.answer_field is not None else ""
        row = {"id": str(rec["id"]) if rec.get("id") is not None else f"{spec.split}-{i}",
               "prompt": prompt, "answer": "" if answer is None else str(answer)}
        row |= {f: rec[f] for f in spec.extra_fields}
        rows.append(row)
    return rows


def _records(spec: PromptSource, cache_dir: Path, where: str) -> list[dict]:
    """The source's rows as dicts. JSON Lines go through the ``text`` builder and are parsed
    here, line by line: a reward's columns (``constraints`` whose values are ints for one kind and
    strings for another) need not fit one Arrow schema."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    datasets.disable_progress_bars()
    files = list(spec.data_files) or None
    builder = "text" if spec.builder == "json" else spec.builder
    try:
        ds = datasets.load_dataset(builder, data_files=files, split=spec.split,
                                   cache_dir=str(cache_dir))
    except FileNotFoundError as e:
        raise ConfigError(f"{where}.data_files: {e}") from e
    except (ValueError, DatasetGenerationError) as e:  # an unknown split, a broken file ...
        cause = e.__cause__ or e
        raise ConfigError(f"{where}.data_files: {describe(spec)} cannot be read: {cause}") from e
    if spec.builder != "json":
        return [dict(rec) for rec in ds]
    records = []
    for line_no, line in enumerate(ds["text"], start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise ConfigError(f"{where}.data_files: line {line_no} of {describe(spec)} is not "
                              f"JSON ({e})") from None
        if not isinstance(rec, dict):
            raise ConfigError(f"{where}.data_files: line {line_no} of {describe(spec)} is a JSON "
                              f"{type(rec).__name__}, not an object")
        records.append(rec)
    return records


def split_heldout(rows: Sequence[dict], heldout: int, seed: int,
                  where: str) -> tuple[list[dict], list[dict]]:
    """(train, held-out): ``heldout`` distinct prompt texts held out by a seeded shuffle; no
    train row shares a held-out row's prompt."""
    texts = list(dict.fromkeys(r["prompt"] for r in rows))  # distinct, first-seen order
    if len(texts) < heldout + 1:
        raise ConfigError(f"{where}.heldout: {heldout} held-out prompts need at least "
                          f"{heldout + 1} distinct prompts; the source has {len(texts)} "
                          f"({len(rows)} rows): lower heldout or add prompts")
    random.Random(f"rl-heldout/{seed}").shuffle(texts)
    held_texts = set(texts[:heldout])
    train, held, taken = [], [], set()
    for r in rows:
        if r["prompt"] not in held_texts:
            train.append(dict(r))
        elif r["prompt"] not in taken:
            taken.add(r["prompt"])
            held.append(dict(r))
    return train, held


def prompt_digest(rows: Sequence[dict]) -> str:
    """sha256 of the rows (order, keys and values), for lineage."""
    h = hashlib.sha256()
    for r in rows:
        h.update(json.dumps(r, sort_keys=True, ensure_ascii=False, default=str).encode())
        h.update(b"\n")
    return h.hexdigest()
