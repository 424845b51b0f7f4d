"""The curation judge: a rubric in config, one OpenAI-compatible client, strict verdicts, a cache.

A ``JudgeSpec`` names the judge (``endpoint``: a server someone runs, or ``serve``: a model stage
whose export the stage serves itself, ``judge_server.py``) and a rubric of named criteria, each a
question with an integer score range and a threshold (a score below it rejects the sample).

The prompt (version ``PROMPT_VERSION``): a system message lists the criteria (name, question, score
range) and asks for ONE JSON object ``{criterion: integer, ..., "reason": short text}``; the
conversation under review is the user message (``review_text``). Thresholds are not shown to the
judge: they act on the scores afterwards, so changing one re-decides from the cache without asking
again. ``structured_output`` also sends a ``response_format`` JSON schema (vLLM honours it;
``transformers serve`` ignores it), and the reply is parsed strictly either way: the first balanced
JSON object in the text, every criterion present, an integer in its range. Anything else is an
unparsable verdict, kept with its raw text and why, and handled by ``on_unparsable``: ``reject``
(the sample is dropped), ``keep`` (kept unjudged) or ``fail`` (``UnparsableVerdict``).

Verdicts are cached in sqlite (``verdicts.VerdictCache``) under (sample digest, ``rubric_digest``, judge
model), one commit per verdict as it arrives, so a shard killed midway keeps what it got and no
rerun asks the judge the same thing twice. The rubric digest covers what changes a reply: the
criteria's names, questions and ranges, the prompt version, the judge model and the request's
``max_tokens``, ``temperature`` and ``structured_output``.

``judge_all`` asks for every uncached sample through the ``openai`` SDK with at most
``concurrency`` requests in flight; connection errors, time-outs, 429/5xx and non-JSON bodies are
retried with exponential backoff (``backoff_s * 2**attempt``); when a sample's retries run out it
raises ``JudgeUnavailable`` naming the endpoint, once the verdicts already received are cached.
A 4xx other than 429 (say, a model the server does not serve) fails at once with the server's
words, unless the server answers a one-word probe: then it refused that one conversation (longer
than its context) and the conversation gets an unparsable verdict.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any, Literal

from stages.data.verdicts import Verdict, VerdictCache
from stages.schema import configclass, param, setting

PROMPT_VERSION = "granite-forge-judge-v1"
REASON = "reason"

Samples = Sequence[tuple[str, Sequence[dict[str, str]]]]


@configclass
class Criterion:
    question: str = param(doc="what the judge scores, as a question about the conversation")
    min_score: int = param(1, "lowest score")
    max_score: int = param(5, "highest score")
    threshold: int = param(doc="a score below it rejects the sample")

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise ValueError("question: must not be empty; say what the judge should score")
        if self.min_score >= self.max_score:
            raise ValueError(f"max_score: must be > min_score ({self.min_score}), got {self.max_score}")
        if not self.min_score <= self.threshold <= self.max_score:
            raise ValueError(f"threshold: must be in [{self.min_score}, {self.max_score}] (the score "
                             f"range), got {self.threshold}")


@configclass
class JudgeSpec:
    endpoint: str | None = setting(None, "URL of an OpenAI-compatible server someone runs "
                                         "(http://host:port, with or without /v1)")
    serve: str | None = param(None, "model stage whose export the stage serves itself as the judge")
    model: str | None = param(None, "model name sent to the server; None: the first of GET /v1/models")
    rubric: dict[str, Criterion] = param(doc="named criteria: question, score range, threshold")
    structured_output: bool = param(False, "also send a response_format JSON schema (vLLM honours "
                                           "it; transformers serve ignores it)")
    on_unparsable: Literal["reject", "keep", "fail"] = param(
        "reject", "a reply that is not a valid verdict: reject the sample, keep it, or fail the shard")
    max_tokens: int = param(256, "most tokens of a verdict", ge=1)
    temperature: float = param(0.0, "sampling temperature of the judge (0: greedy)", ge=0)
    concurrency: int = setting(4, "most requests in flight at once (per shard)", ge=1)
    timeout_s: float = setting(120.0, "seconds one request may take", gt=0)
    retries: int = setting(3, "retries of a request after a connection error, time-out or 5xx", ge=0)
    backoff_s: float = setting(1.0, "first retry's wait; doubled at each retry", ge=0)
    startup_timeout_s: float = setting(300.0, "seconds a served judge may take to come up", gt=0)

    def __post_init__(self) -> None:
        if (self.endpoint is None) == (self.serve is None):
            raise ValueError("endpoint: set exactly one of endpoint (a server someone runs) and "
                             "serve (a model stage the stage serves itself)")
        if self.endpoint is not None and not re.match(r"https?://[^/\s]+", self.endpoint):
            raise ValueError(f"endpoint: expected a URL such as http://127.0.0.1:8000, got "
                             f"{self.endpoint!r}")
        if not self.rubric:
            raise ValueError("rubric: must name at least one criterion (name: {question, "
                             "threshold, ...})")
        for name in self.rubric:
            if name == REASON or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
                raise ValueError(f"rubric.{name}: a criterion name must be an identifier "
                                 f"(letters, digits, _) other than {REASON!r}")


class JudgeError(RuntimeError):
    """The judge could not give verdicts; the message names the endpoint and what failed."""


class JudgeUnavailable(JudgeError):
    """A request's retries ran out (connection, time-out, 5xx); verdicts received are cached."""


class JudgeRefused(JudgeError):
    """The server answered 4xx: a bad setting (no such model), or this one request (too long)."""

    def __init__(self, message: str, status: int):
        super().__init__(message)
        self.status = status


class UnparsableVerdict(JudgeError):
    """``on_unparsable: fail`` met a reply that is not a verdict."""


def rubric_digest(spec: JudgeSpec, model: str | None = None) -> str:
    """sha256 of what changes a judge's reply (thresholds excluded: they act afterwards).
    ``model``: the judge model actually asked (default ``spec.model``)."""
    doc = {"prompt": PROMPT_VERSION, "model": model or spec.model,
           "criteria": {n: [c.question, c.min_score, c.max_score] for n, c in sorted(spec.rubric.items())},
           "request": [spec.max_tokens, spec.temperature, spec.structured_output]}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()


# ---- the prompt and the strict parser ----

def system_prompt(spec: JudgeSpec) -> str:
    lines = ["You judge conversations between a user and an AI assistant for a training set.",
             "Score the conversation the user sends on each criterion below, with an integer in "
             "the range given.", "", "Criteria:"]
    lines += [f"- {n} (integer {c.min_score} to {c.max_score}): {c.question}" for n, c in spec.rubric.items()]
    form = ", ".join(f'"{n}": <integer>' for n in spec.rubric)
    lines += ["", "Reply with ONE JSON object and nothing else, in this form:",
              "{" + form + f', "{REASON}": "<one short sentence>"' + "}"]
    return "\n".join(lines)


def review_text(messages: Sequence[dict[str, str]]) -> str:
    """The conversation under review as the judge reads it (the user message)."""
    return "\n\n".join(f"[{m['role']}]\n{m['content']}" for m in messages)


def judge_messages(spec: JudgeSpec, messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    return [{"role": "system", "content": system_prompt(spec)},
            {"role": "user", "content": review_text(messages)}]


def verdict_schema(spec: JudgeSpec) -> dict:
    props: dict[str, Any] = {n: {"type": "integer", "minimum": c.min_score, "maximum": c.max_score}
                             for n, c in spec.rubric.items()}
    props[REASON] = {"type": "string"}
    return {"type": "json_schema", "json_schema": {"name": "verdict", "strict": True, "schema": {
        "type": "object", "properties": props, "required": list(props), "additionalProperties": False}}}


def first_json_object(text: str) -> str | None:
    """The first balanced ``{...}`` of ``text`` (braces inside JSON strings do not count)."""
    start = text.find("{")
    if start == -1:
        return None
    depth, in_str, escape = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_str:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == '"':
                in_str = False
        elif ch == '"':
            in_str = True
        elif ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start:i + 1]
    return None  # unbalanced from the first "{" on


def parse_verdict(raw: str, spec: JudgeSpec) -> Verdict:
    """A verdict from a reply, strictly; an unparsable one says why in ``reason``."""
    def bad(why: str) -> Verdict:
        return Verdict(scores=None, passed=None, unparsable=True, reason=why, raw=raw)

    found = first_json_object(raw)
    if found is None:
        return bad("no balanced JSON object in the reply")
    try:
        obj = json.loads(found)
    except json.JSONDecodeError as e:
        return bad(f"the first {{...}} of the reply is not JSON: {e}")
    scores = {}
    for name, c in spec.rubric.items():
        if name not in obj:
            return bad(f"criterion {name!r} is missing")
        v = obj[name]
        if isinstance(v, bool) or not isinstance(v, int):
            return bad(f"criterion {name!r}: expected an integer, got {v!r}")
        if not c.min_score <= v <= c.max_score:
            return bad(f"criterion {name!r}: {v} is outside [{c.min_score}, {c.max_score}]")
        scores[name] = v
    reason = obj.get(REASON, "")
    return Verdict(scores=scores, passed=passes(scores, spec), unparsable=False,
                   reason=reason if isinstance(reason, str) else json.dumps(reason), raw=raw)


def passes(scores: dict[str, int], spec: JudgeSpec) -> bool:
    return all(scores[n] >= c.threshold for n, c in spec.rubric.items())


def decide(verdict: Verdict, spec: JudgeSpec, digest: str) -> Verdict:
    """The verdict under this spec's thresholds and ``on_unparsable`` policy."""
    if not verdict.unparsable:
        return dataclasses.replace(verdict, passed=passes(verdict.scores, spec))
    if spec.on_unparsable == "fail":
        raise UnparsableVerdict(f"the judge's verdict on sample {digest} is unparsable "
                                f"({verdict.reason}); raw reply: {verdict.raw[:500]!r}. Set "
                                "judge.on_unparsable to reject or keep, or use a stronger judge")
    return dataclasses.replace(verdict, passed=spec.on_unparsable == "keep")


# ---- the client ----

def api_base(url: str) -> str:
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class _Asker:
    """One judge endpoint: requests with retries and backoff; ``stop`` ends every retry loop."""

    def __init__(self, spec: JudgeSpec, url: str) -> None:
        from openai import OpenAI
        self.spec, self.url = spec, url
        self.client = OpenAI(base_url=api_base(url), api_key="none", timeout=spec.timeout_s,
                             max_retries=0)
        self.stop = threading.Event()
        self.answered = threading.Event()   # the server has answered a verdict request

    def call(self, what: str, fn: Callable[[], Any]) -> Any:
        import openai
        spec, last = self.spec, ""
        for attempt in range(spec.retries + 1):
            if attempt and self.stop.wait(spec.backoff_s * 2 ** (attempt - 1)):
                raise JudgeUnavailable(f"judge at {self.url}: {what}: stopped after another "
                                       f"request failed (last error: {last})")
            try:
                return fn()
            except openai.APIStatusError as e:
                if e.status_code != 429 and e.status_code < 500:
                    raise JudgeRefused(f"the judge at {self.url} refused {what}: HTTP "
                                       f"{e.status_code}: {e.message}", e.status_code) from e
                last = f"HTTP {e.status_code}: {e.message}"
            except openai.APITimeoutError:
                last = f"no answer within timeout_s={spec.timeout_s:g}"
            except openai.APIConnectionError as e:
                last = f"connection failed: {e.__cause__ or e}"
            except ValueError as e:  # a body that is not JSON: a broken server or proxy
                last = f"the answer is not an OpenAI response: {e}"
        raise JudgeUnavailable(
            f"the judge at {self.url} is unavailable: {what} failed {spec.retries + 1} times "
            f"(retries={spec.retries}, backoff_s={spec.backoff_s:g}); last error: {last}")

    def model(self) -> str:
        if self.spec.model:
            return self.spec.model
        ids = self.call("GET /v1/models", lambda: [m.id for m in self.client.models.list()])
        if not ids:
            raise JudgeError(f"the judge at {self.url} lists no model at /v1/models; set judge.model")
        return ids[0]

    def probe(self, model: str) -> bool:
        """Does the server answer a one-word request under this model name and these settings?"""
        try:
            self.call("a probe", lambda: self.client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "ping"}], max_tokens=1,
                temperature=self.spec.temperature))
        except JudgeError:
            return False
        self.answered.set()
        return True

    def ask(self, model: str, digest: str, messages: Sequence[dict[str, str]]) -> "str | Verdict":
        """The judge's reply; or, when a server that answers other requests refuses this one
        (400/413/422: a conversation too long for the judge's context), an unparsable verdict
        that says so. A server that refuses a one-word probe too has a setting wrong (no such
        model): that raises."""
        spec = self.spec
        extra = {"response_format": verdict_schema(spec)} if spec.structured_output else {}
        try:
            reply = self.call(f"the verdict on sample {digest[:12]}",
                              lambda: self.client.chat.completions.create(
                                  model=model, messages=judge_messages(spec, messages),
                                  max_tokens=spec.max_tokens, temperature=spec.temperature, **extra))
        except JudgeRefused as e:
            if e.status not in (400, 413, 422) or not (self.answered.is_set() or self.probe(model)):
                raise
            return Verdict(scores=None, passed=None, unparsable=True, raw="",
                           reason=f"refused by the judge (too long for its context?): {e}")
        self.answered.set()
        return (reply.choices[0].message.content or "") if reply.choices else ""


def judge_all(samples: Samples, spec: JudgeSpec, url: str, cache: VerdictCache,
              progress: Callable[[int, int], None] | None = None,
              cache_as: str | None = None) -> dict[str, Verdict]:
    """Verdicts for ``samples`` ((digest, messages) pairs), decided under ``spec``'s thresholds and
    ``on_unparsable`` policy. Cached verdicts are not asked again; the rest run with at most
    ``spec.concurrency`` requests in flight, each cached as it arrives. ``progress(done, total)``
    is called at the start and after every verdict. ``cache_as``: the judge model's name in the
    cache when the server's own name for it says less (a served stage: its key, not its path)."""
    unique = dict(samples)
    if not unique:
        return {}
    asker = _Asker(spec, url)
    model = asker.model()
    cached = cache_as or model
    rubric = rubric_digest(spec, cached)
    got = cache.get_many(list(unique), rubric, cached)
    for digest, v in got.items():
        decide(v, spec, digest)  # on_unparsable: fail stops at a cached unparsable verdict too
    todo = [d for d in unique if d not in got]
    total = len(unique)
    if progress:
        progress(len(got), total)
    error: JudgeError | None = None
    with ThreadPoolExecutor(spec.concurrency, thread_name_prefix="judge") as pool:
        pending: dict[Future, str] = {}
        queue = iter(todo)

        def refill() -> None:  # at most `concurrency` submitted: nothing queued to cancel later
            while error is None and len(pending) < spec.concurrency:
                digest = next(queue, None)
                if digest is None:
                    return
                pending[pool.submit(asker.ask, model, digest, unique[digest])] = digest

        refill()
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                digest = pending.pop(fut)
                try:
                    reply = fut.result()
                    verdict = reply if isinstance(reply, Verdict) else parse_verdict(reply, spec)
                except JudgeError as e:
                    error = error or e
                    asker.stop.set()
                    continue
                cache.put(digest, rubric, cached, verdict)
                got[digest] = verdict
                if progress:
                    progress(len(got), total)
                if verdict.unparsable and spec.on_unparsable == "fail" and error is None:
                    try:
                        decide(verdict, spec, digest)
                    except UnparsableVerdict as e:
                        error = e
            refill()
    if error is not None:
        if isinstance(error, JudgeUnavailable):
            raise JudgeUnavailable(f"{error} ({len(got)} of {total} verdicts are cached; a rerun asks "
                                   f"only the other {total - len(got)})") from error
        raise error
    return {d: decide(got[d], spec, d) for d in unique}

