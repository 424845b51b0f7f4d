"""The math reward: the completion's final answer against the reference, by math-verify.

**Extraction** (``extract_answer``), first rule that finds something:
1. the content of the last ``\\boxed{...}`` (balanced braces);
2. the text after the last "answer is" (case-insensitive) up to the end of its line, without a
   trailing '.', '$' or spaces;
3. the last number: ``-?\\d+(,\\d{3})*(\\.\\d+)?`` or a fraction ``a/b`` of such numbers.
No answer found: 0.0, 'no answer found'.

**Equality**: ``math_verify.verify(parse(reference), parse(extracted))`` (numeric or symbolic: so
``68`` equals ``68.0`` and ``\\frac{1}{2}`` equals ``0.5``; ``68.00001`` does not equal ``68``).
math-verify's own time-outs use SIGALRM, which works only on a main thread, so the comparison runs
in worker processes (``VerifierPool``: ``workers`` plain Python processes speaking JSON lines on
their stdin/stdout, each running the check on its main thread), made once and reused. Each call
has a time-out (``timeout_s``): a worker that does not answer in time is killed and replaced by a
fresh one, and the call scores 0.0 'verifier time-out'; no other call waits on it. (A
``ProcessPoolExecutor`` cannot kill one hung worker without breaking every other call in flight:
hence a pool of our own.) A new worker's start-up (importing sympy, ~1-2 s) does not count against
a call's time-out. The reason always says extracted vs reference.
"""
from __future__ import annotations

import atexit
import json
import queue
import re
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from stages.rl.reward_types import Score, failed, guarded

DEFAULT_TARGET = "stages.rl.reward_math:answers_equal"
ROOT = str(Path(__file__).resolve().parents[2])
MAX_ANSWER_CHARS = 1000
STARTUP_S = 120.0

_NUMBER = r"-?\d+(?:,\d{3})*(?:\.\d+)?"
_LAST_NUMBER = re.compile(rf"{_NUMBER}(?:\s*/\s*{_NUMBER})?")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed{")
    if start == -1:
        return None
    depth, i = 0, start + len("\\boxed")
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i + 1:j].strip()
    return None  # unbalanced


def extract_answer(completion: str) -> str | None:
    """The final answer of ``completion`` by the rules of the module docstring, or None."""
    boxed = _last_boxed(completion)
    if boxed:
        return boxed[:MAX_ANSWER_CHARS]
    m = list(re.finditer(r"answer is", completion, re.IGNORECASE))
    if m:
        after = completion[m[-1].end():].split("\n", 1)[0].strip().rstrip(". $").lstrip(": $")
        if after:
            return after[:MAX_ANSWER_CHARS]
    numbers = _LAST_NUMBER.findall(completion)
    return numbers[-1] if numbers else None


def answers_equal(reference: str, answer: str) -> bool:
    """math-verify equality (runs in a worker process, on its main thread)."""
    from math_verify import parse, verify
    return bool(verify(parse(reference), parse(answer)))


# ---- the worker processes ----

def _serve(target: str) -> None:
    """A worker's main loop: one JSON request per stdin line, one JSON answer per stdout line."""
    module, name = target.split(":")
    fn = getattr(__import__(module, fromlist=[name]), name)
    if target == DEFAULT_TARGET:
        answers_equal("1", "1")  # import sympy and math-verify before saying ready
    print("ready", flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        try:
            out = {"equal": bool(fn(req["reference"], req["answer"]))}
        except Exception as e:
            out = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(out), flush=True)


class _Worker:
    def __init__(self, target: str) -> None:
        code = (f"import sys; sys.path.insert(0, {ROOT!r}); "
                f"from stages.rl.reward_math import _serve; _serve({target!r})")
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     bufsize=1)
        self.ready = False

    def readline(self, timeout: float) -> str | None:
        """A line from the worker; '' if it died; None if none came in ``timeout`` seconds."""
        r, _, _ = select.select([self.proc.stdout], [], [], timeout)
        return self.proc.stdout.readline() if r else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            f.close()


class VerifierPool:
    """``size`` worker processes running ``target`` ("module:function" of (reference, answer) ->
    bool); ``check`` blocks until a worker is free."""

    def __init__(self, size: int, target: str = DEFAULT_TARGET) -> None:
        self.target = target
        self.idle: queue.Queue[_Worker] = queue.Queue()
        self.lock = threading.Lock()
        self.workers: set[_Worker] = set()
        for _ in range(size):
            self.idle.put(self._spawn())

    def _spawn(self) -> _Worker:
        w = _Worker(self.target)
        with self.lock:
            self.workers.add(w)
        return w

    def _retire(self, w: _Worker) -> None:
        w.kill()
        with self.lock:
            self.workers.discard(w)
        self.idle.put(self._spawn())

    def check(self, reference: str, answer: str, timeout_s: float) -> tuple[bool | None, str]:
        """(equal, '') or (None, why it could not say)."""
        w = self.idle.get()
        if not w.ready:
            if w.readline(STARTUP_S) != "ready\n":
                self._retire(w)
                return None, "verifier worker did not start"
            w.ready = True
        try:
            w.proc.stdin.write(json.dumps({"reference": reference, "answer": answer}) + "\n")
            w.proc.stdin.flush()
        except OSError as e:
            self._retire(w)
            return None, f"verifier worker died: {e}"
        line = w.readline(timeout_s)
        if not line:
            self._retire(w)
            return None, "verifier worker died" if line == "" else f"verifier time-out ({timeout_s:g} s)"
        self.idle.put(w)
        out = json.loads(line)
        return (out["equal"], "") if "equal" in out else (None, f"verifier raised {out['error']}")

    def close(self) -> None:
        with self.lock:
            workers, self.workers = list(self.workers), set()
        for w in workers:
            w.kill()


_POOLS: dict[tuple[int, str], VerifierPool] = {}
_POOLS_LOCK = threading.Lock()


def verifier_pool(workers: int, target: str = DEFAULT_TARGET) -> VerifierPool:
    """The process-wide pool of ``workers`` workers for ``target`` (made on first use)."""
    with _POOLS_LOCK:
        key = (workers, target)
        if key not in _POOLS:
            _POOLS[key] = VerifierPool(workers, target)
        return _POOLS[key]


@atexit.register
def close_pools() -> None:
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for p in pools:
        p.close()


def math_score(pool: VerifierPool, completion: str, row: dict, timeout_s: float) -> Score:
    reference = str(row.get("answer", "")).strip()
    if not reference:
        return failed("row.answer: no reference answer to compare with")
    answer = extract_answer(completion)
    if answer is None:
        return failed(f"no answer found (reference {reference!r})")
    equal, why = pool.check(reference, answer, timeout_s)
    if equal is None:
        return failed(f"{why}: extracted {answer!r} vs reference {reference!r}")
    if equal:
        return Score(1.0, f"extracted {answer!r} equals reference {reference!r}", True)
    return Score(0.0, f"extracted {answer!r} != reference {reference!r}", False)


def score_math(completions: list[str], rows: list[dict], *, timeout_s: float = 5.0,
               workers: int = 2, target: str = DEFAULT_TARGET) -> list[Score]:
    pool = verifier_pool(workers, target)
    fn = lambda c, r: math_score(pool, c, r, timeout_s)  # noqa: E731
    with ThreadPoolExecutor(workers, thread_name_prefix="math-reward") as threads:
        return list(threads.map(lambda cr: guarded(fn, *cr), zip(completions, rows)))
