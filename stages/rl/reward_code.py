"""The code reward: the completion's Python, then the row's tests, run in the sandbox.

The program is the completion's code (its first fenced block opened by ```python, ```py or a
bare ```, else the whole completion) followed by two newlines and the row's ``tests`` (Python
that asserts, e.g. ``assert x == 7``). It runs as ``main.py`` with the sandbox's Python
(``sandbox.python_argv``) under ``SandboxLimits`` whose wall time is the reward's ``timeout_s``
and whose CPU time is that rounded up. Value 1.0 when it exits 0 (every assert held), else 0.0
with the reason: the sandbox's (a time-out, a limit, the exit code) and the last line of stderr
(``AssertionError: ...``, ``NameError: ...``).
"""
from __future__ import annotations

import math
import re

from stages.rl.reward_types import RewardFn, Score, failed
from stages.rl.sandbox import SandboxLimits, python_argv, run_sandboxed

_FENCE = re.compile(r"```(?:python|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion: str) -> str:
    """The first fenced code block's body, else the whole completion."""
    m = _FENCE.search(completion)
    return m.group(1) if m else completion


def program(completion: str, tests: str) -> str:
    return extract_code(completion).rstrip() + "\n\n" + tests.strip() + "\n"


def last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1][:300] if lines else ""


def code_reward_fn(timeout_s: float = 5.0, limits: SandboxLimits | None = None) -> RewardFn:
    limits = limits or SandboxLimits(wall_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)))

    def code_reward(completion: str, row: dict) -> Score:
        tests = row.get("tests")
        if not isinstance(tests, str) or not tests.strip():
            raise ValueError("row.tests: the code reward needs Python test code (asserts) in the "
                             "row's 'tests' field")
        res = run_sandboxed({"main.py": program(completion, tests)}, python_argv("main.py"), limits)
        if res.ok:
            return Score(1.0, "tests passed", True)
        why = last_line(res.stderr)
        return failed(f"{res.reason}: {why}" if why and not res.timed_out else res.reason)
    return code_reward
