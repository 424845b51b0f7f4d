"""The code reward's sandbox (stages/rl/sandbox.py), as root, against completions that try to
escape: each is stopped and scores 0, the host is untouched, and no process is left behind (no
process of a sandbox uid, no bwrap child of ours). Plus: a good solution passes with the standard
library, a wrong one fails with its assertion, and a mixed batch runs in parallel sandboxes."""
from __future__ import annotations

import os
import shutil
import socket
import threading
import time
import uuid
from pathlib import Path

import psutil
import pytest

from stages.rl.reward_code import code_reward_fn
from stages.rl.rewards import Score, score_batch
from stages.rl.sandbox import UID_POOL, SandboxLimits, python_argv, run_sandboxed, sandbox_available

ROOT = Path(__file__).resolve().parents[2]
LIMITS = SandboxLimits(wall_s=1.5, cpu_s=2, processes=16)
PASS_TESTS = "assert True"


@pytest.fixture(scope="module", autouse=True)
def as_root():
    if os.geteuid() != 0:
        pytest.skip("the sandbox's guarantees under test are those of a root worker (as in CI); "
                    f"this runs as uid {os.geteuid()}")
    assert sandbox_available() == ""


def leftovers() -> list[str]:
    """Processes a sandbox could have left: any of a pool uid, any bwrap child of ours."""
    found = []
    for p in psutil.process_iter(["pid", "name", "uids"]):
        if p.info["uids"] and p.info["uids"].real in UID_POOL:
            found.append(f"{p.info['pid']} {p.info['name']} uid {p.info['uids'].real}")
    found += [f"{c.pid} {c.name()}" for c in psutil.Process().children(recursive=True)
              if c.name() == "bwrap"]
    return found


def score(code: str, tests: str = PASS_TESTS, limits: SandboxLimits = LIMITS) -> tuple[Score, float]:
    t = time.monotonic()
    got = code_reward_fn(limits=limits)(code, {"prompt": "", "answer": "", "tests": tests})
    took = time.monotonic() - t
    assert leftovers() == []
    return got, took


def test_good_solution_passes_with_the_standard_library():
    code = ("```python\nimport json, math, re, collections, itertools, fractions, os\n"
            "def mean(xs):\n    return sum(xs) / len(xs)\nx = json.loads('[1, 2, 3]')\n```\ntrailing prose")
    got, took = score(code, "assert mean(x) == 2\nassert math.isclose(fractions.Fraction(1, 3) * 3, 1)")
    assert got == Score(1.0, "tests passed", True)
    assert took < 2


def test_wrong_solution_fails_with_its_assertion():
    got, _ = score("def add(a, b):\n    return a - b", "assert add(2, 2) == 4, 'add(2, 2) is wrong'")
    assert got == Score(0.0, "exit 1: AssertionError: add(2, 2) is wrong", False)


def test_network_connection_to_the_host_fails():
    server = socket.create_server(("127.0.0.1", 0))
    port, accepted = server.getsockname()[1], []
    threading.Thread(target=lambda: accepted.append(server.accept()), daemon=True).start()
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1).sendall(b'hi')"
    got, _ = score(code)
    dns, _ = score("import socket\nsocket.getaddrinfo('example.com', 80)")
    server.close()
    assert got.value == 0.0 and "ConnectionRefusedError" in got.reason
    assert dns.value == 0.0 and "gaierror" in dns.reason
    assert accepted == []


def test_writes_outside_its_directory_do_not_reach_the_host():
    marker = f"sandbox-escape-{uuid.uuid4().hex}"
    targets = [Path("/tmp") / marker, ROOT / marker, Path("/root") / marker]
    code = "\n".join(f"open({str(p)!r}, 'w').write('x')" for p in targets)
    got, _ = score(code)
    assert got.value == 0.0 and "exit 1" in got.reason  # /tmp is its own tmpfs; /work/main is absent
    assert [p for p in targets if p.exists()] == []


def test_host_files_and_environment_are_not_readable(tmp_path, monkeypatch):
    secret = uuid.uuid4().hex
    files = [tmp_path / "secret.txt", Path("/root") / f"sandbox-secret-{secret}"]
    for f in files:
        f.write_text(secret)
    monkeypatch.setenv("FORGE_SANDBOX_SECRET", secret)
    try:
        code = ("import os\nprint(dict(os.environ))\n"
                + "\n".join(f"print(open({str(f)!r}).read())" for f in files))
        res = run_sandboxed({"main.py": code}, python_argv("main.py"), LIMITS)
        got, _ = score(code)
    finally:
        files[1].unlink()
    assert res.returncode == 1 and "FileNotFoundError" in res.stderr
    assert secret not in res.stdout + res.stderr
    assert got.value == 0.0


def test_infinite_loop_hits_the_wall_time_out():
    # a spin, and a program that closes its stdout and stderr first (no EOF tells us it ended)
    rows = [{"prompt": "", "answer": "", "tests": PASS_TESTS}] * 2
    t = time.monotonic()
    got = score_batch("code", ["while True:\n    pass",
                               "import os\nos.close(1)\nos.close(2)\nwhile True:\n    pass"],
                      rows, timeout_s=1.5, workers=2)
    took = time.monotonic() - t
    assert got == [Score(0.0, "wall time-out 1.5 s", False)] * 2
    assert took < 3
    assert leftovers() == []


def test_fork_bomb_is_bounded_and_leaves_nothing():
    code = ("import os, time\n"
            "for i in range(200):\n"
            "    if os.fork() == 0:\n"
            "        os.setsid()\n"         # a child that leaves the session still dies with the sandbox
            "        time.sleep(60)\n"
            "        os._exit(0)\n")
    got, took = score(code)
    assert got.value == 0.0 and got.reason.startswith("process limit")
    assert took < 3


def test_children_that_outlive_the_program_die_with_it():
    # the program ends cleanly (its tests pass) and leaves 5 sleepers in new sessions: gone
    got, _ = score("import os, time\nfor i in range(5):\n    if os.fork() == 0:\n"
                   "        os.setsid()\n        time.sleep(60)\n        os._exit(0)\n")
    assert got == Score(1.0, "tests passed", True)
    # forks until refused, then spins: killed at the wall time-out with every child
    got, took = score("import os, time\ntry:\n    while True:\n        if os.fork() == 0:\n"
                      "            time.sleep(60)\nexcept OSError:\n    pass\nwhile True:\n    pass\n")
    assert got == Score(0.0, "wall time-out 1.5 s", False)
    assert took < 3


def test_cpu_limit_kills_a_spinning_program_before_the_wall_time():
    res = run_sandboxed({"main.py": "while True:\n    pass"}, python_argv("main.py"),
                        SandboxLimits(wall_s=10, cpu_s=1))
    # pid 1 of its namespace ignores SIGXCPU at 1 s; the hard limit's SIGKILL comes at 2 s
    assert not res.timed_out and res.killed and res.returncode == 128 + 9
    assert res.reason == "cpu limit or out of memory (SIGKILL)"
    assert leftovers() == []


def test_concurrent_sandboxes_get_their_own_uids():
    from concurrent.futures import ThreadPoolExecutor
    code = "import os, time\nprint(os.getuid(), os.getgid(), os.getgroups())\ntime.sleep(0.3)"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: run_sandboxed({"main.py": code}, python_argv("main.py"),
                                                        LIMITS), range(4)))
    ids = [r.stdout.split()[0] for r in results]
    assert len(set(ids)) == 4 and all(int(i) in UID_POOL for i in ids)
    assert all(r.stdout.split()[1] == r.stdout.split()[0] for r in results)  # gid = uid, no groups
    assert all(r.stdout.strip().endswith("[]") for r in results)
    assert leftovers() == []


def test_four_gib_allocation_hits_the_memory_limit():
    got, _ = score("x = bytearray(4 << 30)")
    assert got.value == 0.0 and got.reason == "memory limit (exit 1): MemoryError"


def test_one_gib_file_hits_the_file_size_limit_and_the_disk_is_untouched():
    before = shutil.disk_usage("/tmp").used
    got, _ = score("f = open('big', 'wb')\nfor _ in range(1024):\n    f.write(b'x' * (1 << 20))")
    assert got.value == 0.0 and got.reason.startswith("file-size limit (exit 1): OSError: [Errno 27]")
    assert shutil.disk_usage("/tmp").used - before < 256 << 20  # it never wrote to the host disk


def test_output_is_bounded():
    res = run_sandboxed({"main.py": "while True:\n    print('x' * 1000)"}, python_argv("main.py"),
                        SandboxLimits(wall_s=1.0))
    assert res.timed_out and res.killed and res.returncode is None
    assert len(res.stdout) < 70_000 and "more bytes dropped]" in res.stdout


def test_a_mixed_batch_runs_in_parallel_sandboxes():
    rows = [{"prompt": "", "answer": "", "tests": "assert x == 7"}] * 4
    t = time.monotonic()
    got = score_batch("code", ["x = 7", "x = 8", "while True: pass", "x = 3 + 4"], rows,
                      timeout_s=1.5, workers=4)
    took = time.monotonic() - t
    assert [s.value for s in got] == [1.0, 0.0, 0.0, 1.0]
    assert got[2].reason == "wall time-out 1.5 s"
    assert took < 3.5  # in parallel: the loop's 1.5 s is paid once
    assert leftovers() == []
