"""What lies where in a stage's output dir: one definition, read by the worker and the orchestrator.

``<store>/<stage>-<key[:12]>/`` holds

- ``artifact.json``  the only proof that the stage is complete (written last, atomically);
- ``stage.json``     kind, key, identity and resolved config, written when an attempt starts;
- ``spec.json``      the resolved spec the worker reads; ``worker.log`` its output;
- ``metrics.jsonl``  one line per logged step (on disk before it reaches MLflow);
- ``failure.json``   the last attempt failed (exit code, log tail);
- ``lineage.json``   MLflow holds the stage's lineage (which store, which run): a rerun that runs
  nothing need not open MLflow to find out;
- ``parts/<part>/`` one part of a fanned-out stage (curation's split and shards): its ``spec.json``,
  ``worker.log``, its files, and ``done.json`` last (the part's only proof of completion);
- ``checkpoints/iter_XXXXXXX/`` complete checkpoints once their ``done`` manifest is written;
  ``checkpoints/.tmp-iter_XXXXXXX`` a save in progress; ``checkpoints/rejected-iter_XXXXXXX-<time>``
  a checkpoint that failed its checksums, kept aside for a person to look at (never resumed from).

No torch here: ``forge plan``/``status``/``runs`` read it without importing a training stack.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

ARTIFACT_FILE = "artifact.json"
STAGE_RECORD = "stage.json"
SPEC_FILE = "spec.json"
WORKER_LOG = "worker.log"
METRICS_FILE = "metrics.jsonl"
FAILURE_FILE = "failure.json"
LINEAGE_FILE = "lineage.json"  # MLflow holds this stage: tracking URI, key, run id
CHECKPOINTS = "checkpoints"
PARTS = "parts"
PART_DONE = "done.json"
JUDGE_MODEL = "judge-model"   # curation: the export of judge.serve's stage, served by its shards
DONE = "done"            # JSON manifest; its presence (and validity) marks a complete checkpoint
STATE = "state.json"     # a checkpoint's train state
ITER = "iter_"
TMP = ".tmp-"
REJECTED = "rejected-"
# A tokenized source with prompts: <prefix>.loss_mask.bin/.idx beside <prefix>.bin/.idx, one uint8
# per token, 1 where the token's prediction counts (written by tokenize, read by training).
LOSS_MASK_SUFFIX = ".loss_mask"


def iter_name(step: int) -> str:
    return f"{ITER}{step:07d}"


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """The ``iter_*`` directories of a stage, oldest first: saves in progress and rejected
    checkpoints are not among them."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith(ITER))


def newest_checkpoint(out_dir: Path) -> Path | None:
    """The newest checkpoint with a ``done`` manifest (no checksums: the worker verifies them
    before it resumes, and moves a damaged one aside)."""
    done = [p for p in checkpoint_dirs(out_dir) if (p / DONE).is_file()]
    return done[-1] if done else None


def rejected_name(checkpoint: Path, when: int) -> str:
    return f"{REJECTED}{Path(checkpoint).name}-{when}"


def part_dir(out_dir: Path, part: str) -> Path:
    """Where part ``part`` of a fanned-out stage keeps its files."""
    return Path(out_dir) / PARTS / part


def part_record(out_dir: Path, part: str) -> dict | None:
    """The record a finished part left (``done.json``), or None while it is not done."""
    path = part_dir(out_dir, part) / PART_DONE
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None   # missing, or cut short: not done


def judge_cache(out_dir: Path) -> Path:
    """The store's cache of judge verdicts, beside the stage dirs: a rerun under another key (a
    changed length bound, a forced rerun) asks the judge nothing it has answered before."""
    return Path(out_dir).parent / ".cache" / "judge-verdicts.sqlite"


def loss_mask_prefix(prefix) -> str:
    """Where the loss mask of the indexed dataset at ``prefix`` lives (it may not exist)."""
    return str(prefix) + LOSS_MASK_SUFFIX


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != DONE)


def problem(ckpt: Path, verify: bool = True) -> str:
    """Why ``ckpt`` is not a complete checkpoint ("" when it is): ``done`` missing or unreadable, a
    file it lists missing or of another size or (``verify``) sha256, or a file it does not list."""
    ckpt = Path(ckpt)
    if not (ckpt / DONE).is_file():
        return f"no {DONE} manifest (a save that did not finish)"
    try:
        files = json.loads((ckpt / DONE).read_text())["files"]
        listed = {rel: (int(meta["size"]), str(meta["sha256"])) for rel, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{DONE} manifest is unreadable ({type(e).__name__}: {e})"
    for rel, (size, sha) in listed.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {DONE} says {size}"
        if verify and file_digest(p) != sha:
            return f"{rel} fails its sha256 check"
    extra = sorted(str(p.relative_to(ckpt)) for p in checkpoint_files(ckpt)) if verify else []
    extra = [rel for rel in extra if rel not in listed]
    if extra:
        return f"{extra[0]} is not listed in {DONE}"
    return ""
