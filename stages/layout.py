"""What lies where in a stage's output dir: one definition, read by the worker and the orchestrator.

``<store>/<stage>-<key[:12]>/`` holds

- ``artifact.json``  the only proof that the stage is complete (written last, atomically);
- ``stage.json``     kind, key, identity and resolved config, written when an attempt starts;
- ``spec.json``      the resolved spec the worker reads; ``worker.log`` its output;
- ``metrics.jsonl``  one line per logged step (on disk before it reaches MLflow);
- ``failure.json``   the last attempt failed (exit code, log tail);
- ``slurm-jobs.json`` on Slurm, the stage's batch jobs, oldest first (id, state, exit code,
  reason); ``slurm-job.sh`` the batch script and ``slurm-<id>.out`` each job's output;
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
import os
import re
from pathlib import Path

ARTIFACT_FILE = "artifact.json"
STAGE_RECORD = "stage.json"
SPEC_FILE = "spec.json"
WORKER_LOG = "worker.log"
METRICS_FILE = "metrics.jsonl"
FAILURE_FILE = "failure.json"
SLURM_JOBS = "slurm-jobs.json"  # cluster.launcher=slurm: every batch job of the stage (flows/slurm.py)
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


# A tokenized source of more documents than this is written as several prefixes (``<name>.00000``,
# ``<name>.00001``, ...: rows in order, this many each but the last), blended in proportion to
# their tokens: Megatron's builder holds ~87 bytes of Python list per document while it writes or
# merges one prefix (2**27 documents: ~12 GB). A format constant: a source under it is one prefix.
MAX_DOCUMENTS_PER_PREFIX = 1 << 27


def split_prefix_names(name: str, rows: int, most: int | None = None) -> list[tuple[str, int, int]]:
    """``(prefix name, first row, rows)`` for a tokenized output of ``rows`` documents: itself,
    or consecutive ``most``-row prefixes ``<name>.00000``, ``<name>.00001``, ... when larger."""
    most = most or MAX_DOCUMENTS_PER_PREFIX
    if rows <= most:
        return [(name, 0, rows)]
    return [(f"{name}.{i:05d}", first, min(most, rows - first))
            for i, first in enumerate(range(0, rows, most))]


def output_prefixes(outputs: dict, name: str) -> list[str]:
    """The output keys that hold tokenized output ``name`` (``tokens/web``), in row order: itself,
    or its split prefixes (``split_prefix_names``); [] when there is none."""
    if name in outputs:
        return [name]
    return sorted(k for k in outputs if re.fullmatch(re.escape(name) + r"\.\d{5}", k))


FAST_DIGEST = "xxh3_128"   # checkpoint manifests and dataset digests: non-cryptographic, GB/s
# The digests a checkpoint manifest may name, per file: xxh3_128 (written since issue 13) and
# sha256 (older checkpoints, still in stores: read and verified, never written).
MANIFEST_DIGESTS = (FAST_DIGEST, "sha256")


def fast_hasher():
    """A streaming xxh3-128 hasher (``update``/``hexdigest``); xxhash releases the GIL on large
    blocks, so threads hash files in parallel."""
    import xxhash
    return xxhash.xxh3_128()


def _hasher(algorithm: str):
    if algorithm == FAST_DIGEST:
        return fast_hasher()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown digest {algorithm!r}: a manifest names one of {MANIFEST_DIGESTS}")


def digest_and_size(path: Path, algorithm: str = FAST_DIGEST,
                    chunk: int = 8 << 20) -> tuple[str, int]:
    """(hex digest, bytes read) of one file in one pass: the size and digest of the same bytes."""
    h, size = _hasher(algorithm), 0
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


def fast_file_digest(path: Path, chunk: int = 8 << 20) -> str:
    """xxh3-128 of a file, hex."""
    return digest_and_size(path, FAST_DIGEST, chunk)[0]


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    return digest_and_size(path, "sha256", chunk)[0]


def hash_threads(files: int, sharing: int = 1) -> int:
    """Threads to hash ``files`` files with: this process's cores, shared with ``sharing`` processes
    that hash at the same time (a node's ranks), at least 1, at most 16 (and one per file)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(files, cores // max(1, sharing), 16))


def digest_files(root: Path, rels: list[str], algorithm: str = FAST_DIGEST,
                 threads: int | None = None) -> dict[str, dict]:
    """``{rel: {"size": bytes, algorithm: hex}}`` of the files ``root/rel``, hashed by a pool of
    ``threads`` threads (default ``hash_threads``): one file per thread at a time."""
    from concurrent.futures import ThreadPoolExecutor
    root = Path(root)
    if not rels:
        return {}
    with ThreadPoolExecutor(threads or hash_threads(len(rels))) as pool:
        done = pool.map(lambda rel: digest_and_size(root / rel, algorithm), rels)
        return {rel: {"size": size, algorithm: digest} for rel, (digest, size) in zip(rels, done)}


def checkpoint_files(ckpt: Path) -> list[Path]:
    return sorted(p for p in ckpt.rglob("*") if p.is_file() and p.name != DONE)


# torch_dist names each rank's shards ``[<group>]__<rank>_<n>.distcp``; we name its RNG state
_RANK_FILES = (re.compile(r"__(\d+)_\d+\.distcp$"), re.compile(r"^rng/rank_(\d+)\.pt$"))


def writer_rank(rel: str) -> int | None:
    """The rank that writes the checkpoint file at relative path ``rel``; None for the files no
    one rank's name claims (``.metadata``, ``common.pt``, ``metadata.json``, ``state.json``, ...:
    rank 0 writes or hashes those)."""
    for pattern in _RANK_FILES:
        if m := pattern.search(rel):
            return int(m.group(1))
    return None


def hash_own_files(folder: Path, rank: int) -> dict[str, dict]:
    """``{rel: {"size", "xxh3_128", "rank"}}`` of the files of ``folder`` that ``rank`` wrote
    (``writer_rank``), hashed by a few threads: the node's cores, shared with its other ranks."""
    folder = Path(folder)
    rels = []
    for sub in ("", "rng"):  # one readdir each, no stat per file: every rank lists these at once
        try:
            with os.scandir(folder / sub) as entries:
                rels += [f"{sub}/{e.name}" if sub else e.name for e in entries if e.is_file()]
        except FileNotFoundError:
            continue
    rels = sorted(rel for rel in rels if writer_rank(rel) == rank)
    sharing = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun: this node's ranks hash too
    entries = digest_files(folder, rels, threads=hash_threads(len(rels), sharing))
    return {rel: {**meta, "rank": rank} for rel, meta in entries.items()}


def manifest_digest(meta: dict) -> tuple[str, str]:
    """(algorithm, hex) of one file's entry in a ``done`` manifest (xxh3_128, or an old sha256)."""
    for algorithm in MANIFEST_DIGESTS:
        if algorithm in meta:
            return algorithm, str(meta[algorithm])
    raise ValueError(f"an entry names no digest ({' or '.join(MANIFEST_DIGESTS)}): {meta}")


def problem(ckpt: Path, verify: bool = True) -> str:
    """Why ``ckpt`` is not a complete checkpoint ("" when it is): ``done`` missing or unreadable, a
    file it lists missing or of another size or (``verify``) of another digest (the algorithm each
    entry names: xxh3_128, or sha256 in older checkpoints), or a file it does not list.

    Sizes are checked first (no reading); digests are then computed by a pool of threads, and the
    first failing file in the manifest's order is named."""
    ckpt = Path(ckpt)
    if not (ckpt / DONE).is_file():
        return f"no {DONE} manifest (a save that did not finish)"
    try:
        files = json.loads((ckpt / DONE).read_text())["files"]
        listed = {rel: (int(meta["size"]), *manifest_digest(meta)) for rel, meta in files.items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return f"{DONE} manifest is unreadable ({type(e).__name__}: {e})"
    for rel, (size, _, _) in listed.items():
        p = ckpt / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, {DONE} says {size}"
    if not verify:
        return ""
    if why := _digest_problem(ckpt, listed):
        return why
    extra = [rel for rel in (str(p.relative_to(ckpt)) for p in checkpoint_files(ckpt))
             if rel not in listed]
    return f"{extra[0]} is not listed in {DONE}" if extra else ""


def _digest_problem(ckpt: Path, listed: dict[str, tuple[int, str, str]]) -> str:
    """The first listed file whose digest (or size, re-read) differs, hashing in parallel."""
    from concurrent.futures import ThreadPoolExecutor

    def check(item) -> str:
        rel, (size, algorithm, want) = item
        try:
            got, read = digest_and_size(ckpt / rel, algorithm)
        except OSError as e:  # removed or unreadable since the size check
            return f"{rel} cannot be read ({type(e).__name__}: {e})"
        if read != size:
            return f"{rel} has {read} bytes, {DONE} says {size}"
        return "" if got == want else f"{rel} fails its {algorithm} check"

    pool = ThreadPoolExecutor(hash_threads(len(listed)))
    try:
        return next((why for why in pool.map(check, listed.items()) if why), "")
    finally:  # a damaged file found: the files not yet started need not be read
        pool.shutdown(cancel_futures=True)
