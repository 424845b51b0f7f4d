"""Megatron indexed datasets (``<prefix>.bin/.idx``, and a loss-mask companion) written, merged
and published with the xxh3-128 of their ``.bin`` computed on the bytes on their way to disk.

Used by the tokenize stage (``stages/data/tokenize.py``) and its parallel pieces
(``stages/data/tokenize_shards.py``). Publishing renames the ``.idx`` last: a reader opens it first,
so a dataset at its final name is whole.
"""
from __future__ import annotations

import contextlib
import dataclasses
import gc
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from stages.layout import fast_hasher, loss_mask_prefix


@dataclasses.dataclass(frozen=True)
class Written:
    """What an indexed dataset holds: documents, tokens, and the xxh3-128 of its ``.bin``; for a
    piece, the CPU seconds its process spent on it (per-core throughput, whatever the load)."""
    docs: int
    tokens: int
    digest: str
    cpu_s: float = 0.0



class HashingFile:
    """The builder's ``.bin`` file, hashing every byte on its way to disk (the builder calls
    ``write`` for documents and for ``add_index``'s copy, then ``close``)."""

    def __init__(self, fh: Any):
        self.fh, self.hasher = fh, fast_hasher()

    def write(self, data: Any) -> int:
        self.hasher.update(data)
        return self.fh.write(data)

    def close(self) -> None:
        self.fh.close()


def _builders(prefix: Path, dtype: Any, masked: bool) -> tuple[Any, Any, HashingFile]:
    import numpy as np
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder, get_bin_path

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(get_bin_path(str(prefix)), dtype=dtype)
    builder.data_file = hashed = HashingFile(builder.data_file)
    masks = IndexedDatasetBuilder(get_bin_path(loss_mask_prefix(prefix)), dtype=np.uint8) \
        if masked else None
    return builder, masks, hashed


def _finalize(prefix: Path, builder: Any, masks: Any) -> None:
    from megatron.core.datasets.indexed_dataset import get_idx_path
    builder.finalize(get_idx_path(str(prefix)))
    if masks is not None:
        masks.finalize(get_idx_path(loss_mask_prefix(prefix)))


def write_hashed(prefix: Path, documents: Iterable[tuple[Any, Any]], dtype: Any,
                 masked: bool) -> Written:
    """Write ``(ids, loss_mask)`` pairs as ``<prefix>.bin/.idx`` (and the loss mask companion when
    ``masked``), hashing the ``.bin`` as it is written."""
    import numpy as np
    builder, masks, hashed = _builders(prefix, dtype, masked)
    docs = tokens = 0
    for ids, mask in documents:
        ids = np.asarray(ids, dtype=dtype)
        builder.add_document(ids, [ids.size])
        if masks is not None:
            mask = np.asarray(mask, dtype=np.uint8)
            if mask.size != ids.size:
                raise ValueError(f"{prefix}: document {docs} has {ids.size} tokens but a loss mask "
                                 f"of {mask.size}")
            masks.add_document(mask, [mask.size])
        docs, tokens = docs + 1, tokens + ids.size
    _finalize(prefix, builder, masks)
    return Written(docs, tokens, hashed.hasher.hexdigest())


def files(prefix: str | Path, masked: bool) -> list[Path]:
    """An indexed dataset's files, in the order they are published (the ``.idx`` last)."""
    prefix = str(prefix)
    mask = loss_mask_prefix(prefix)
    return [Path(p) for p in ([prefix + ".bin"] + ([mask + ".bin", mask + ".idx"] if masked else [])
                              + [prefix + ".idx"])]


def remove(prefix: str | Path, masked: bool) -> None:
    for f in files(prefix, masked):
        f.unlink(missing_ok=True)


def publish(src: str | Path, dst: str | Path, masked: bool) -> None:
    """Rename the dataset at ``src`` to ``dst`` (same file system), its ``.idx`` last."""
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    for a, b in zip(files(src, masked), files(dst, masked)):
        os.replace(a, b)


@contextlib.contextmanager
def frozen_heap() -> Iterator[None]:
    """Megatron's ``add_index`` runs ``gc.collect()`` once per merged piece: ~0.3-0.9 s each over
    the heap of a process that imported torch. Frozen (``gc.freeze``), what is already there is
    not traversed again, and only objects made since are collected."""
    if gc.get_freeze_count():   # someone froze it already: leave it to them
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def merge(prefixes: Sequence[str | Path], target: str | Path, dtype: Any, masked: bool) -> str:
    """Concatenate the indexed datasets at ``prefixes``, in order, into ``target`` with Megatron's
    ``add_index``; return the xxh3-128 of the merged ``.bin``, hashed as it is copied. On any error
    the files at ``target`` are removed before the error goes on."""
    builder = masks = None
    try:
        builder, masks, hashed = _builders(Path(target), dtype, masked)
        for p in prefixes:
            builder.add_index(str(p))
            if masks is not None:
                masks.add_index(loss_mask_prefix(p))
        _finalize(Path(target), builder, masks)
    except BaseException:
        for b in (builder, masks):
            if b is not None:
                b.data_file.close()
        remove(target, masked)
        raise
    return hashed.hasher.hexdigest()
