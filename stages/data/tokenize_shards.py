"""Tokenizing in parallel pieces: row ranges of a source, each an indexed dataset, merged in order.

A *piece* is a contiguous row range of one prepared Parquet file (``Piece``), tokenized by one
process into an indexed dataset of its own (``write_hashed``: Megatron's ``IndexedDatasetBuilder``,
with the loss-mask companion when the source has prompts). A document's tokens depend on its text
alone, so the pieces of an output merged in row order with ``IndexedDatasetBuilder.add_index`` are
byte for byte what one process writes: how many pieces there are is a setting, never identity.

- Processes: a pool of ``workers`` from a ``forkserver`` context (``spawn`` where there is none):
  the worker may hold torch's threads, which a plain fork would copy mid-flight. The server imports
  Megatron and tokenizers once, so every pool's processes start ready; each loads the tokenizer once
  (the pool's initializer) and runs one Rayon thread (the processes are the parallelism). One worker
  tokenizes in this process, with no pool.
- Digests: xxh3-128 (``stages.layout.fast_hasher``) of every ``.bin``, computed on the bytes as the
  builder writes them (a piece) or copies them (a merge), never by reading a file again
  (``stages/data/indexed_files.py``). An output
  made of one piece is renamed into place with its piece's digest: no copy at all.
- Nothing half-written at a final name: pieces and merges are written under a temporary folder,
  then renamed into place, the ``.idx`` last (a reader opens it first). A merge that fails deletes
  what it wrote; a run killed mid-merge leaves only the temporary folder, which the next run clears.
- Sources in parallel: all pieces of all outputs share the pool; an output is merged (in a thread:
  the copy and xxhash release the GIL) as soon as its last piece is in, while the others tokenize.
"""
from __future__ import annotations

import dataclasses
import multiprocessing as mp
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import Any

from stages.data.indexed_files import Written, frozen_heap, merge, publish, remove, write_hashed
from stages.data.tokenizer import document_columns

PIECES = "pieces"      # a folder's pieces: pieces/<output>/<first row, 12 digits>.bin/.idx
MERGED = "merged"      # merges in progress: merged/<output>.bin/.idx, renamed into place last
# What the forkserver imports once, so a pool's processes start ready (Megatron's import is ~3 s)
PRELOAD = ["numpy", "pyarrow.parquet", "tokenizers", "megatron.core.datasets.indexed_dataset",
           __name__]


@dataclasses.dataclass(frozen=True)
class Output:
    """One tokenized output of the stage: ``name`` (``tokens/web``) is its prefix under the stage
    dir; it holds rows ``[first, first + rows)`` of ``parquet``, the prepared source (all of it,
    unless the source is split into several prefixes: ``stages.layout.split_prefix_names``)."""
    name: str
    parquet: str
    rows: int
    first: int = 0


@dataclasses.dataclass(frozen=True)
class Piece:
    """Rows ``[start, stop)`` of an output's Parquet, tokenized to ``prefix``.bin/.idx."""
    output: str
    parquet: str
    start: int
    stop: int
    prefix: str


def row_ranges(start: int, stop: int, n: int) -> list[tuple[int, int]]:
    """``[start, stop)`` cut into ``n`` contiguous ranges, in order, sizes within one row of each
    other; empty ones are dropped (fewer rows than ranges)."""
    cuts = [start + (stop - start) * i // n for i in range(n + 1)]
    return [(a, b) for a, b in zip(cuts, cuts[1:]) if b > a]


def plan_pieces(outputs: Sequence[Output], folder: Path, part: int = 0, parts: int = 1,
                pieces: int = 1) -> list[Piece]:
    """Part ``part`` of ``parts`` of every output's rows, cut into ``pieces`` pieces written under
    ``folder/pieces/``; each piece is named by its first row, so names sort in row order."""
    out = []
    for o in outputs:
        for a, b in row_ranges(o.first + o.rows * part // parts,
                               o.first + o.rows * (part + 1) // parts, 1):
            out += [Piece(o.name, o.parquet, s, e, str(Path(folder) / PIECES / o.name / f"{s:012d}"))
                    for s, e in row_ranges(a, b, pieces)]
    return out


def read_rows(path: str | Path, columns: list[str], start: int, stop: int,
              batch_size: int = 1024) -> Iterator[list[list[str]]]:
    """Rows ``[start, stop)`` of a Parquet file as batches (one list per column); only the row
    groups that hold them are read."""
    import pyarrow.parquet as pq
    pf = pq.ParquetFile(path)
    groups, first, at = [], None, 0
    for g in range(pf.metadata.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if at < stop and at + n > start:
            groups.append(g)
            first = at if first is None else first
        at += n
    if not groups:
        return
    at = first
    for batch in pf.iter_batches(batch_size=batch_size, row_groups=groups, columns=columns):
        lo, hi = max(start - at, 0), min(stop - at, batch.num_rows)
        at += batch.num_rows
        if lo < hi:
            yield [batch.column(i).slice(lo, hi - lo).to_pylist() for i in range(len(columns))]
        if at >= stop:
            return


def encode_rows(tok: Any, parquet: str | Path, start: int, stop: int, eod_id: int,
                dtype: Any) -> Iterator[tuple[Any, Any]]:
    """``(ids, loss_mask)`` of each row in ``[start, stop)``: its tokens then EOD; the mask (None
    without prompts) is 0 on the prompt's tokens. Prompt and text are encoded separately, so the
    text's first token starts at the boundary."""
    import numpy as np
    columns = document_columns(Path(parquet))
    prompted = columns[0] == "prompt"
    for batch in read_rows(parquet, columns, start, stop):
        encoded = [tok.encode_batch_fast(col, add_special_tokens=False) for col in batch]
        for parts in zip(*encoded):
            lists = [enc.ids for enc in parts]
            ids = np.array(sum(lists[1:], lists[0]) + [eod_id], dtype=dtype)
            mask = None
            if prompted:
                mask = np.ones(ids.size, dtype=np.uint8)
                mask[:len(lists[0])] = 0  # the prompt's tokens
            yield ids, mask


def finish_output(output: Output, pieces: Sequence[Piece], written: Sequence[Written],
                  out_dir: Path, tmp: Path, dtype: Any, drop_pieces: bool = True) -> Written:
    """Put an output's pieces (in row order) at ``out_dir/output.name``: one piece is renamed into
    place, several are merged under ``tmp`` first (then deleted, unless not ``drop_pieces``)."""
    masked = document_columns(Path(output.parquet))[0] == "prompt"
    final = Path(out_dir) / output.name
    if len(pieces) == 1:
        publish(pieces[0].prefix, final, masked)
        return written[0]
    target = Path(tmp) / MERGED / output.name
    digest = merge([p.prefix for p in pieces], target, dtype, masked)
    publish(target, final, masked)
    for p in pieces if drop_pieces else ():
        remove(p.prefix, masked)
    return Written(sum(w.docs for w in written), sum(w.tokens for w in written), digest,
                   sum(w.cpu_s for w in written))


# --- the pool ---------------------------------------------------------------------------------
_WORKER: tuple | None = None   # (tokenizer, eod_id, dtype) in a pool process


def _start_worker(tok_path: str, eod_id: int, dtype: Any) -> None:
    global _WORKER
    os.environ["RAYON_NUM_THREADS"] = "1"   # before the first encode builds Rayon's pool
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (load_tokenizer(tok_path), eod_id, dtype)


def _run_piece(piece: Piece) -> Written:
    tok, eod_id, dtype = _WORKER
    return tokenize_piece(tok, piece, eod_id, dtype)


def load_tokenizer(tok_path: str | Path) -> Any:
    from tokenizers import Tokenizer
    return Tokenizer.from_file(str(tok_path))


def tokenize_piece(tok: Any, piece: Piece, eod_id: int, dtype: Any) -> Written:
    cpu = time.process_time()
    masked = document_columns(Path(piece.parquet))[0] == "prompt"
    w = write_hashed(Path(piece.prefix),
                     encode_rows(tok, piece.parquet, piece.start, piece.stop, eod_id, dtype),
                     dtype, masked)
    return dataclasses.replace(w, cpu_s=time.process_time() - cpu)


def process_context() -> Any:
    """forkserver (its server preloads the heavy modules once) where there is one, else spawn."""
    if "forkserver" in mp.get_all_start_methods():
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        return ctx
    return mp.get_context("spawn")


def run_pieces(pieces: Sequence[Piece], tok_path: str | Path, eod_id: int, dtype: Any,
               workers: int, done: Callable[[int, Written], None]) -> list[Written]:
    """Tokenize ``pieces`` with ``workers`` processes (in this process when one is enough);
    ``done(index, written)`` runs here as each piece finishes. The first error cancels the pieces
    not started and is raised."""
    results: list[Written | None] = [None] * len(pieces)
    if workers <= 1 or len(pieces) <= 1:
        tok = load_tokenizer(tok_path)
        for i, p in enumerate(pieces):
            results[i] = tokenize_piece(tok, p, eod_id, dtype)
            done(i, results[i])
        return results
    from concurrent.futures import ProcessPoolExecutor
    pool = ProcessPoolExecutor(min(workers, len(pieces)), mp_context=process_context(),
                               initializer=_start_worker, initargs=(str(tok_path), eod_id, dtype))
    try:
        # the longest pieces first, so the last ones to finish are short (rows stand for work)
        order = sorted(range(len(pieces)), key=lambda i: pieces[i].start - pieces[i].stop)
        futures = {pool.submit(_run_piece, pieces[i]): i for i in order}
        for f in as_completed(futures):
            results[futures[f]] = f.result()
            done(futures[f], results[futures[f]])
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown(wait=True)
    return results


def progress(pieces: Sequence[Piece], log: Callable[[str], None]) -> Callable[[int, Written], None]:
    """A ``done`` callback that logs ``[tokenize] <output>: shard i/N ...`` per finished piece."""
    of = {p.output: [q for q in pieces if q.output == p.output] for p in pieces}
    t0 = time.perf_counter()

    def done(i: int, w: Written) -> None:
        p = pieces[i]
        log(f"[tokenize] {p.output}: shard {of[p.output].index(p) + 1}/{len(of[p.output])} rows "
            f"{p.start}-{p.stop}: {w.docs} documents, {w.tokens} tokens "
            f"({time.perf_counter() - t0:.1f}s, {w.cpu_s:.1f} CPU-s)")
    return done


def tokenize_outputs(outputs: Sequence[Output], out_dir: Path, tmp: Path, pieces: Sequence[Piece],
                     tok_path: str | Path, eod_id: int, dtype: Any, workers: int,
                     log: Callable[[str], None] = print) -> dict[str, Written]:
    """Tokenize ``pieces`` (of ``outputs``, under ``tmp``) and put each output in place as soon as
    its last piece is in (merges in threads, beside the tokenizing); output name -> Written."""
    of = {o.name: [i for i, p in enumerate(pieces) if p.output == o.name] for o in outputs}
    left = {name: len(ix) for name, ix in of.items()}
    results: dict[int, Written] = {}
    merging: dict[str, Future] = {}
    logged = progress(pieces, log)
    with frozen_heap(), ThreadPoolExecutor(max(1, min(4, len(outputs)))) as merges:
        def done(i: int, w: Written) -> None:
            logged(i, w)
            results[i], name = w, pieces[i].output
            left[name] -= 1
            if left[name] == 0:
                o = next(o for o in outputs if o.name == name)
                merging[name] = merges.submit(finish_output, o, [pieces[j] for j in of[name]],
                                              [results[j] for j in of[name]], out_dir, tmp, dtype)
        run_pieces(pieces, tok_path, eod_id, dtype, workers, done)
    return {o.name: merging[o.name].result() for o in outputs}


def piece_record(piece: Piece, w: Written, out_dir: Path) -> dict:
    """A piece as a part's done.json lists it (its prefix relative to the stage dir)."""
    return {"output": piece.output, "start": piece.start, "stop": piece.stop,
            "prefix": str(Path(piece.prefix).relative_to(out_dir)), **dataclasses.asdict(w)}


def gather(outputs: Sequence[Output], records: Sequence[dict], out_dir: Path, tmp: Path,
           dtype: Any) -> dict[str, Written]:
    """Put each output in place from the pieces the parts' ``records`` list (``piece_record``),
    outputs in parallel; the pieces must cover each output's rows exactly, in order. The pieces
    stay (the caller drops each part's record, then its pieces): a gather cut short runs again."""
    listed = [r for rec in records for r in rec["pieces"]]
    todo = []
    for o in outputs:
        mine = sorted((r for r in listed if r["output"] == o.name), key=lambda r: r["start"])
        ends = [o.first] + [r["stop"] for r in mine]
        if [r["start"] for r in mine] != ends[:-1] or ends[-1] != o.first + o.rows:
            raise ValueError(f"{o.name}: the parts' pieces cover rows "
                             f"{[(r['start'], r['stop']) for r in mine]}, not "
                             f"{o.first}-{o.first + o.rows} in order; "
                             "rerun the stage with --rerun to tokenize it again")
        todo.append((o, [Piece(o.name, o.parquet, r["start"], r["stop"], str(out_dir / r["prefix"]))
                         for r in mine],
                     [Written(r["docs"], r["tokens"], r["digest"], r.get("cpu_s", 0.0))
                      for r in mine]))
    with frozen_heap(), ThreadPoolExecutor(max(1, min(4, len(todo)))) as merges:
        futures = {o.name: merges.submit(finish_output, o, ps, ws, out_dir, tmp, dtype, False)
                   for o, ps, ws in todo}
    return {name: f.result() for name, f in futures.items()}


def clear(folder: Path) -> None:
    """Remove a temporary folder (a killed run's leftovers, or this run's once merged)."""
    shutil.rmtree(folder, ignore_errors=True)
