"""Chat sources of the curate stage: where conversations come from, and how a raw row becomes
a conversation in the OpenAI messages format (or a counted, named reason why it cannot).

A source is the embedded ``chat`` generator (``stages/data/chat_corpus.py``) or a HF ``datasets``
builder with files (``json``, ``parquet``, a hub id): the same ``datasets.load_dataset`` call a
user's data takes. The generator's samples are first written to ``raw_dir/<name>.jsonl`` and then
read by that same path, so the tests exercise what a real corpus goes through.

JSON Lines (``builder: json``) are read through the ``text`` builder and parsed here, one line at a
time: a line that is not a JSON object becomes a row with ``problem="malformed_json"`` (counted,
never raised), and rows whose fields differ in type cannot break an Arrow schema. Blank lines are
not rows. Parquet and hub builders give dicts; a ``messages`` column holding a JSON string (the
curate stage's own ``kept.parquet``) is parsed the same way.

``normalise`` turns a record into ``[{"role", "content"}, ...]``: role aliases mapped
(``human``->user, ``gpt``/``bot``/``model``->assistant), ShareGPT's ``{"from", "value"}`` turns
accepted, contents stripped of surrounding whitespace, list-of-text-parts contents joined, the
``system_field`` column (if set and non-empty) prepended as a system turn. Valid order: an optional
system turn first, then user/assistant alternating, starting with user and ending with assistant.
A conversation that already has a system turn and gets another from ``system_field`` fails with
``role_order``. Every failure has a reason from ``MALFORMED``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterator, Literal

from stages.schema import ConfigError, configclass, param
from stages.specs import check_source_choice

# Why a row is not a conversation, in the order normalise() checks them.
MALFORMED_JSON = "malformed_json"          # a JSON Lines line that is not a JSON object
NO_MESSAGES = "no_messages"                # no messages field, or not a non-empty list
BAD_TURN = "bad_turn"                      # a turn that is not a {role, content} mapping of text
BAD_ROLE = "bad_role"                      # a role that is not system/user/assistant (or alias)
EMPTY_TURN = "empty_turn"                  # a turn whose content is empty after stripping
ROLE_ORDER = "role_order"                  # not [system], user, assistant, user, ... alternating
NO_FINAL_ASSISTANT = "no_final_assistant"  # alternates correctly but does not end with assistant
MALFORMED = (MALFORMED_JSON, NO_MESSAGES, BAD_TURN, BAD_ROLE, EMPTY_TURN, ROLE_ORDER,
             NO_FINAL_ASSISTANT)

ROLE_ALIASES = {"system": "system", "user": "user", "human": "user", "assistant": "assistant",
                "gpt": "assistant", "bot": "assistant", "model": "assistant"}


@configclass
class ChatSourceSpec:
    """One chat source: the embedded generator, or a `datasets` builder with files."""
    generator: Literal["chat"] | None = param(
        None, "embedded deterministic chat corpus with planted bad samples (stages/data/chat_corpus.py)")
    samples: int = param(200, "generator: number of good samples (the planted ones come on top)",
                         gt=0)
    builder: str | None = param(None, "datasets builder or hub path (json = JSON Lines, parquet, "
                                      "org/name)")
    data_files: tuple[str, ...] = param((), "builder: local files / globs / URLs")
    split: str = param("train", "builder: split to read")
    messages_field: str = param("messages", "column holding the conversation (a list of "
                                            "{role, content}, or that list as a JSON string)")
    system_field: str | None = param(None, "column holding a system prompt to prepend (None: none)")
    reference_field: str | None = param(
        "reference", "column holding a reference final answer for the math check, when a row "
                     "has one (None: no math check for this source)")

    def __post_init__(self) -> None:
        check_source_choice(self, "embedded chat corpus", "samples")
        if not self.messages_field:
            raise ConfigError("messages_field: is empty; name the column holding the messages")
        if self.system_field is not None and self.system_field == self.messages_field:
            raise ConfigError(f"system_field: {self.system_field!r} is also the messages_field; "
                              "the system prompt and the messages must be different columns")


@dataclasses.dataclass(frozen=True)
class RawRow:
    """One row of a source as loaded: a record, or the reason it is not one."""
    source: str               # the source's name
    line: int                 # 1-based line (JSON Lines) or row number in the source
    record: dict | None       # the parsed row; None when ``problem`` is set
    problem: str = ""         # "" when the row parsed, else a reason from MALFORMED
    detail: str = ""          # what was wrong, for the report's sampled rejects
    text: str = ""            # the raw line of a row that did not parse (for the report)


def load_rows(spec: ChatSourceSpec, name: str, raw_dir: Path, seed: int) -> Iterator[RawRow]:
    """Every row of source ``name``, in order. ``raw_dir`` receives the generator's JSONL and a
    throwaway `datasets` cache (``raw_dir/.hf_cache``)."""
    import datasets

    raw_dir = Path(raw_dir)
    if spec.generator is not None:
        from stages.data.chat_corpus import write_chat_jsonl
        path = raw_dir / f"{name}.jsonl"
        write_chat_jsonl(path, spec.samples, seed)
        builder, data_files, split = "json", [str(path)], "train"
    else:
        builder, data_files, split = spec.builder, list(spec.data_files) or None, spec.split
    datasets.disable_progress_bars()
    cache = str(raw_dir / ".hf_cache")
    if builder == "json":
        ds = datasets.load_dataset("text", data_files=data_files, split=split, cache_dir=cache)
        for i, line in enumerate(ds["text"], start=1):
            if line.strip():
                yield parse_json_line(line, name, i)
        return
    ds = datasets.load_dataset(builder, data_files=data_files, split=split, cache_dir=cache)
    for i, record in enumerate(ds, start=1):
        yield RawRow(name, i, dict(record))


def parse_json_line(text: str, source: str, line: int) -> RawRow:
    """A JSON Lines line as a row; anything but a JSON object is a ``malformed_json`` row."""
    try:
        record = json.loads(text)
    except ValueError as e:
        return RawRow(source, line, None, MALFORMED_JSON, f"not JSON: {e}", text)
    if not isinstance(record, dict):
        return RawRow(source, line, None, MALFORMED_JSON,
                      f"a JSON {type(record).__name__}, not an object", text)
    return RawRow(source, line, record)


def normalise(record: dict, spec: ChatSourceSpec) -> tuple[list[dict] | None, str]:
    """``(messages, "")`` in the OpenAI format, or ``(None, reason)`` with a reason of MALFORMED."""
    raw = record.get(spec.messages_field)
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except ValueError:
            return None, MALFORMED_JSON
    if not isinstance(raw, (list, tuple)) or not raw:
        return None, NO_MESSAGES
    messages = []
    system = record.get(spec.system_field) if spec.system_field else None
    if isinstance(system, str) and system.strip():
        messages.append({"role": "system", "content": system.strip()})
    for turn in raw:
        if not isinstance(turn, dict):
            return None, BAD_TURN
        role = turn.get("role", turn.get("from"))
        content = _text(turn.get("content", turn.get("value")))
        if content is None:
            return None, BAD_TURN
        role = ROLE_ALIASES.get(role.strip().lower()) if isinstance(role, str) else None
        if role is None:
            return None, BAD_ROLE
        if not content.strip():
            return None, EMPTY_TURN
        messages.append({"role": role, "content": content.strip()})
    return (messages, "") if not (reason := order_problem(messages)) else (None, reason)


def _text(content: Any) -> str | None:
    """A turn's content as text: a string, or OpenAI's list of {"type": "text", "text"} parts
    (joined); None for anything else (an image part, a number)."""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and content and all(
            isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
            for p in content):
        return "".join(p["text"] for p in content)
    return None


def order_problem(messages: list[dict]) -> str:
    """"" when the roles are [system], user, assistant, user, ..., assistant; else the reason."""
    roles = [m["role"] for m in messages]
    if roles and roles[0] == "system":
        roles = roles[1:]
    if any(role != ("user", "assistant")[i % 2] for i, role in enumerate(roles)):
        return ROLE_ORDER
    if not roles or roles[-1] != "assistant":
        return NO_FINAL_ASSISTANT
    return ""


def reference_of(record: dict, spec: ChatSourceSpec) -> str:
    """The row's reference final answer as text ("" when it has none)."""
    if spec.reference_field is None:
        return ""
    value = record.get(spec.reference_field)
    if value is None or isinstance(value, bool):
        return ""
    return str(value).strip() if isinstance(value, (str, int, float)) else ""
