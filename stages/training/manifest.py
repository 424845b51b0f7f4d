"""A checkpoint's ``done`` manifest: the size and xxh3-128 of every file, hashed by the ranks that
wrote them, gathered and written last by rank 0 (``stages/training/checkpoint.py`` saves).

The manifest is built by every rank at once (``gather_manifest``): right after the save, each rank
hashes the files it wrote itself (its ``__<rank>_<n>.distcp`` shards and ``rng/rank_<rank>.pt``:
``layout.writer_rank``), with a few threads (xxhash releases the GIL), while they are still in its
page cache; rank 0 gathers the entries (``gather_object``, which is also the barrier), hashes
what no rank's name claims (``.metadata``, ``common.pt``, ``metadata.json``, ``state.json``:
small) and writes ``done``. Before issue 13 rank 0 alone read and sha256-hashed every file
while the other ranks waited (benchmarks/checkpoint_manifest.py measures both). Hashing inside the writer as it
writes would save the re-read from cache, but needs a copy of dist_checkpointing's writer: not done.
With data parallelism the writes are spread over the replicas (Megatron's fully parallel save,
``_save_strategy``), so every rank writes, and hashes, its share of the bytes, not rank 0 alone.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch.distributed as dist

from stages.layout import DONE, checkpoint_files, digest_files, hash_own_files


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def gather_manifest(folder: Path) -> dict[str, dict] | None:
    """Collective: every rank hashes its own files of ``folder`` (``hash_own_files``); rank 0 gets
    all the entries, the other ranks None. Once it returns on rank 0 every rank's files are written.
    """
    me = rank()
    mine = hash_own_files(folder, me)
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return mine
    everyone = [None] * dist.get_world_size() if me == 0 else None
    dist.gather_object(mine, everyone, dst=0)
    if me != 0:
        return None
    return {rel: meta for entries in everyone for rel, meta in entries.items()}


def write_done(ckpt: Path, state, hashed: dict[str, dict] | None = None) -> None:
    """Write the ``done`` manifest (size and xxh3-128 of every other file, and ``state``, a
    ``TrainState``), last.

    ``hashed``: entries the ranks computed already (``gather_manifest``); the files it lacks are
    hashed here, by a pool of threads, as rank 0's."""
    hashed = dict(hashed or {})
    rels = [str(p.relative_to(ckpt)) for p in checkpoint_files(ckpt)]
    gone = sorted(set(hashed) - set(rels))
    if gone:
        raise RuntimeError(f"{ckpt}: {gone[0]} was hashed by rank {hashed[gone[0]].get('rank')} "
                           f"but is no longer there ({len(gone)} such file(s))")
    todo = [rel for rel in rels if rel not in hashed]
    hashed.update({rel: {**meta, "rank": 0} for rel, meta in digest_files(ckpt, todo).items()})
    write_atomic(ckpt / DONE, json.dumps({"files": hashed, "state": dataclasses.asdict(state)},
                                         indent=1, sort_keys=True))
