"""File formats of ``stages/models/convert.py``, read and written a tensor at a time, no process group.

- ``SliceReader``: (layer slices of) tensors of a ``torch_dist`` checkpoint, through
  ``torch.distributed.checkpoint`` in ``no_dist`` mode;
- ``write_torch_dist``: a ``torch_dist`` checkpoint from ``Part`` s whose tensors are produced on
  demand, one at a time, while the writer streams them into the file;
- ``SafetensorsReader``: tensors of ``*.safetensors`` files by plain reads into fresh buffers (not
  ``mmap``: mapped pages count in RSS for as long as the file stays mapped);
- ``write_safetensors``: one safetensors file, header first, then tensor by tensor.

The ``torch.distributed.checkpoint`` planner classes and ``planner_helpers`` used here are public
modules but not a stable API (checked with torch 2.13); the unit tests pin the resulting layout
against Megatron's own ``dist_checkpointing.save``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import struct
import warnings
from pathlib import Path
from typing import Callable, Iterator

import torch

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_FROM_ST = {v: k for k, v in _ST_DTYPES.items()}


@contextlib.contextmanager
def _no_dist_quietly():
    """Silence "torch.distributed is disabled": a single process, as meant."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


# ---------------------------------------------------------------- torch_dist reading
def _chunk_load_planner(chunks: dict):
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
    from torch.distributed.checkpoint.planner import LoadPlan
    from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

    class ChunkLoadPlanner(DefaultLoadPlanner):
        """The default planner reads whole tensors; this one reads only the chunk (``chunks``, by
        key) that each buffer of the state dict holds."""

        def create_local_plan(self):
            return LoadPlan([item for key, chunk in chunks.items() for item in
                             create_read_items_for_chunk_list(
                                 key, self.metadata.state_dict_metadata[key], [chunk])])

        def lookup_tensor(self, index):  # our buffers are plain tensors at the chunk's offset
            return self.state_dict[index.fqn]

    return ChunkLoadPlanner()


class SliceReader:
    """Reads (slices of) full tensors of a torch_dist checkpoint without a process group."""

    def __init__(self, ckpt: Path):
        from torch.distributed.checkpoint import FileSystemReader
        self.ckpt = str(ckpt)
        self.meta = FileSystemReader(self.ckpt).read_metadata().state_dict_metadata

    def read(self, wants: dict[str, int | None]) -> dict[str, torch.Tensor]:
        """{key: layer index (a [1, ...] slice of a stacked tensor) or None (the whole tensor)}."""
        from torch.distributed.checkpoint import FileSystemReader, load
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        out, chunks = {}, {}
        for key, layer in wants.items():
            md = self.meta[key]
            size, offsets = list(md.size), [0] * len(md.size)
            if layer is not None:
                offsets[0], size[0] = layer, 1
            chunks[key] = ChunkStorageMetadata(torch.Size(offsets), torch.Size(size))
            out[key] = torch.empty(size, dtype=md.properties.dtype)
        with _no_dist_quietly():
            load(out, storage_reader=FileSystemReader(self.ckpt), planner=_chunk_load_planner(chunks),
                 no_dist=True)
        return {k: (v[0] if wants[k] is not None else v) for k, v in out.items()}


# ---------------------------------------------------------------- torch_dist writing
@dataclasses.dataclass(frozen=True)
class Part:
    """One stored chunk of tensor ``key`` (global ``size``); ``produce()`` makes its data."""
    key: str
    size: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    produce: Callable[[], torch.Tensor]
    dtype: torch.dtype = torch.float32


def _pickled(obj: object) -> io.BytesIO:
    buf = io.BytesIO()
    torch.save(obj, buf)  # what Megatron stores for a ShardedObject
    buf.seek(0)
    return buf


def write_torch_dist(path: Path, parts: list[Part], objects: dict[str, object]) -> None:
    """Write ``parts`` (tensor chunks) and ``objects`` (pickled, by key) as the ``.metadata`` and
    ``.distcp`` files of a torch_dist checkpoint in ``path`` (an existing directory).

    The single-threaded writer resolves one item at a time, so only the chunk being written (and the
    last chunk of each key, which the writer keeps until the file closes) is in memory.
    """
    from torch.distributed.checkpoint import FileSystemWriter, save
    from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        MetadataIndex,
        TensorProperties,
    )
    from torch.distributed.checkpoint.planner import (
        SavePlan,
        TensorWriteData,
        WriteItem,
        WriteItemType,
    )

    items, sources = [], {}
    for key, obj in objects.items():
        items.append(WriteItem(MetadataIndex(key), WriteItemType.BYTE_IO))
        sources[key, None] = (lambda o=obj: _pickled(o)), None
    for p in parts:
        offsets = torch.Size(p.offsets)
        items.append(WriteItem(MetadataIndex(p.key, offsets), WriteItemType.SHARD, tensor_data=(
            TensorWriteData(ChunkStorageMetadata(offsets, torch.Size(p.sizes)),
                            TensorProperties(dtype=p.dtype), torch.Size(p.size)))))
        sources[p.key, tuple(offsets)] = p.produce, p

    class Planner(DefaultSavePlanner):
        # No state dict: the plan lists our chunks, and each is produced when the writer asks.
        def create_local_plan(self):
            self.plan = SavePlan(items)
            return self.plan

        def resolve_data(self, item):
            offset = None if item.index.offset is None else tuple(item.index.offset)
            produce, part = sources[item.index.fqn, offset]
            data = produce()
            if part is not None and (tuple(data.shape) != part.sizes or data.dtype != part.dtype):
                raise RuntimeError(f"conversion bug: {part.key} at {part.offsets} is "
                                   f"{tuple(data.shape)} {data.dtype}, not {part.sizes} {part.dtype}")
            return data

    with _no_dist_quietly():
        # One thread and no copy-ahead: the serial loader, even where CUDA is available.
        save({}, storage_writer=FileSystemWriter(str(path), thread_count=1, per_thread_copy_ahead=0),
             planner=Planner(flatten_state_dict=False, flatten_sharded_tensors=False), no_dist=True)


# ---------------------------------------------------------------- safetensors
class SafetensorsReader:
    """Tensors of safetensors files by name, each read into its own buffer (no mmap)."""

    def __init__(self, files: list[Path]):
        self.where: dict[str, tuple[Path, int, str, tuple[int, ...]]] = {}
        for f in files:
            with open(f, "rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                header = json.loads(fh.read(n))
            header.pop("__metadata__", None)
            for name, info in header.items():
                self.where[name] = (f, 8 + n + info["data_offsets"][0], info["dtype"],
                                    tuple(info["shape"]))

    def check(self, expected: dict[str, tuple[int, ...]]) -> None:
        """Every tensor of ``expected`` is there, with its shape, in a dtype we read."""
        for name, shape in expected.items():
            if name not in self.where:
                files = sorted({str(w[0]) for w in self.where.values()})
                raise KeyError(f"no tensor {name!r} in {files}")
            _, _, dt, got = self.where[name]
            if got != shape or dt not in _FROM_ST:
                raise ValueError(f"{name}: {dt} {list(got)}, expected {list(shape)} in one of "
                                 f"{sorted(_FROM_ST)}")

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor ``name``; into ``out`` (converted to its dtype) when given."""
        f, start, dt, shape = self.where[name]
        dtype = _FROM_ST[dt]
        direct = out is not None and out.dtype == dtype and out.is_contiguous()
        buf = out if direct else torch.empty(shape, dtype=dtype)
        if tuple(buf.shape) != shape:
            raise ValueError(f"{name}: {list(shape)} does not fit a buffer of {list(buf.shape)}")
        view = memoryview(buf.view(-1).view(torch.uint8).numpy())
        with open(f, "rb", buffering=0) as fh:
            fh.seek(start)
            got = 0
            while got < len(view):
                n = fh.readinto(view[got:])
                if not n:
                    raise EOFError(f"{f}: {name} is cut short")
                got += n
        if out is not None and not direct:
            out.copy_(buf)  # exact: a widening cast (bf16/fp16 -> fp32)
            return out
        return buf


def write_safetensors(path: Path, shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype,
                      tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Stream ``tensors`` (in ``shapes`` order) into one safetensors file: header, then raw bytes."""
    width = torch.tensor([], dtype=dtype).element_size()
    header, pos = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in shapes:
        n = math.prod(shape) * width
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [pos, pos + n]}
        pos += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the format pads the header with spaces to 8-byte alignment
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)) + raw)
        for (name, shape), (got, t) in zip(shapes, tensors, strict=True):
            if got != name or tuple(t.shape) != shape or t.dtype != dtype:
                raise RuntimeError(f"conversion bug: {got} {tuple(t.shape)} {t.dtype} where "
                                   f"{name} {shape} {dtype} was announced")
            fh.write(memoryview(t.contiguous().view(torch.uint8).numpy()))  # no bytes copy
    os.replace(tmp, path)
