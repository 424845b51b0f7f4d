"""Download, on a machine with PyPI, the wheels the GPU checks need on a GPU machine without network,
into tests/gpu/wheels/ (git-ignored), which tests/gpu/run_all.sh installs with ``pip --no-index``.

    python tests/gpu/fetch_wheels.py                  # CPython 3.12, manylinux x86-64 (the GPU machine)
    python tests/gpu/fetch_wheels.py --python 3.11    # e.g. this machine's Python, to time the install

The set is the minimum: megatron-core, at the version the worker image pins (Dockerfile,
MEGATRON_CORE_VERSION) and CI tests. Its runtime requirements (torch, numpy, packaging) are on the
GPU machine already, as are transformers, safetensors, tokenizers, pyyaml and psutil, which the
checks import besides it. Not datasets or pyarrow: the GPU tests write their tokens with Megatron's
IndexedDatasetBuilder (tests/gpu/worker_runs.py). Not Transformer Engine (~270 MB, and its torch
extension compiles against the local torch) nor vLLM: tests needing them report "not installed".

Prints the folder's size and exits 1 when it is over LIMIT_MIB (a device call carries 64 MiB in
all, the repository included).
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
WHEELS = ROOT / "tests" / "gpu" / "wheels"
LIMIT_MIB = 60
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64")


def requirements() -> list[str]:
    text = (ROOT / "Dockerfile").read_text()
    found = re.search(r"^ARG MEGATRON_CORE_VERSION=(\S+)", text, re.M)
    if not found:
        raise SystemExit("fetch_wheels: no `ARG MEGATRON_CORE_VERSION=...` in Dockerfile; pin the "
                         "version there (the worker image's) or update requirements() here")
    return [f"megatron-core=={found.group(1)}"]


def size_problem(folder: Path, limit_mib: float = LIMIT_MIB) -> str:
    """Print every file of ``folder`` and the total; the reason it is too big, or ""."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    for p in files:
        print(f"  {p.stat().st_size / 2**20:7.2f} MiB  {p.name}")
    total = sum(p.stat().st_size for p in files) / 2**20
    print(f"{folder}: {len(files)} files, {total:.2f} MiB (limit {limit_mib:g} MiB)")
    if total > limit_mib:
        return (f"{folder} holds {total:.2f} MiB, over the {limit_mib:g} MiB a device call can "
                "carry beside the repository; drop a wheel from requirements()")
    return ""


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--python", default="3.12", help="target CPython version (default 3.12, the "
                                                     "GPU machine's)")
    ap.add_argument("--dest", type=Path, default=WHEELS, help=f"default {WHEELS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    abi = "cp" + args.python.replace(".", "")
    if args.dest.exists():  # no stale wheel of another version beside the new one
        shutil.rmtree(args.dest)
    args.dest.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--python-version", args.python,
           "--implementation", "cp", "--abi", abi, "--abi", "abi3", "--abi", "none",
           *[f"--platform={p}" for p in PLATFORMS], "--dest", str(args.dest), *requirements()]
    print("$ " + " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode:
        print(f"fetch_wheels: pip download failed (above); is PyPI reachable, and is there a "
              f"{abi} manylinux x86-64 wheel of {' '.join(requirements())}?", file=sys.stderr)
        return 1
    why = size_problem(args.dest)
    if why:
        print(f"fetch_wheels: {why}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
