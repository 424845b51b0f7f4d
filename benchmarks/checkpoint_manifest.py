"""Checkpoint manifest time as a share of checkpoint write time: per-rank parallel xxh3 (now)
against rank 0's serial sha256 (before issue 13), on a synthetic multi-GB checkpoint.

--ranks processes (torchrun, gloo; default 2) each hold --gb-per-rank GB of fp32 tensors (default
1.5; random values, --tensors tensors per rank), sharded by rank like the TP/PP shards or a fully
parallel save: every rank writes its own ``__<rank>_<n>.distcp`` files. Each step is timed between
two barriers, on the same files:

- write: ``megatron.core.dist_checkpointing.save`` (torch_dist; Megatron's writer fsyncs every
  file, so this is the storage's rate), after a tiny warm-up save (its worker start-up excluded);
- manifest, new: ``checkpoint.gather_manifest`` (each rank xxh3-128s its own files, with
  ``hash_threads`` threads: the node's cores shared by its ranks) + rank 0's ``write_done``:
  exactly what ``save_checkpoint`` runs;
- manifest, old: rank 0 sha256s every file, one after another, while the other ranks wait (the
  ``write_done`` before issue 13);
- verify: ``layout.problem(verify=True)`` on rank 0 (threads), what a resume runs.

"hot": right after the write, the files are in the page cache (what a save sees: the hash reads
memory, not storage); "cold": every file first fsynced and dropped from this machine's page cache
(``posix_fadvise(DONTNEED)``), so the hash reads the disk (this VM's host may still cache it).
Then one core's xxh3-128 and sha256 rates (hot, one file, best of 3) feed a paper projection to a
--project-params checkpoint (default 30e9 x --bytes-per-param 16: bf16 weights, fp32 master
weights and two Adam moments = 14, rounded up) written by --project-ranks ranks at several
aggregate storage write rates: new = (bytes / ranks) / (threads x xxh3 rate), old = bytes /
sha256 rate (a lower bound: rank 0 also reads every other node's files from storage), and
the xxh3 rate a core would need for the goal at each storage rate.

    python benchmarks/checkpoint_manifest.py [--ranks 2] [--gb-per-rank 1.5] [--json FILE]

The figures go to --json (default: checkpoint_manifest.json in the temporary folder).

Disk: ranks x gb-per-rank GB under --workdir (default: a temporary folder), deleted at the end;
memory: about the same again while the ranks hold their tensors.
Goal: the new manifest <= 10% of the write time (hot). Exits 1 when it is not met.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 0.10
GB = 1e9


# ---------------------------------------------------------------- worker side (each rank)
def _evict(paths) -> None:
    """fsync each file and drop it from the page cache: the next read goes to the disk."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _core_rates(path: Path, tries: int = 3) -> dict[str, float]:
    """GB/s of one thread hashing ``path`` from the page cache (read once first), the best of
    ``tries``: on a shared machine the slower tries measure the neighbours."""
    from stages.layout import digest_and_size
    digest_and_size(path)
    out = {}
    for algorithm in ("xxh3_128", "sha256"):
        best = float("inf")
        for _ in range(tries):
            t0 = time.perf_counter()
            _, size = digest_and_size(path, algorithm)
            best = min(best, time.perf_counter() - t0)
        out[algorithm] = size / best / GB
    return out


def _worker(workdir: Path, gb_per_rank: float, tensors: int) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor

    from stages.layout import DONE, checkpoint_files, file_digest, hash_threads, problem
    from stages.training.checkpoint import TrainState, gather_manifest, write_done
    from stages.training.cpu_shim import apply_cpu_shim
    apply_cpu_shim()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ckpt, warm = workdir / "ckpt", workdir / "warm"

    def sharded(numel: int, count: int) -> dict:
        gen = torch.Generator().manual_seed(rank)
        return {f"t{i}": ShardedTensor.from_rank_offsets(f"t{i}", torch.rand(numel, generator=gen),
                                                         (0, rank, world)) for i in range(count)}

    def timed(fn) -> float:
        dist.barrier()
        t0 = time.perf_counter()
        fn()
        dist.barrier()
        return time.perf_counter() - t0

    def new_manifest() -> None:
        hashed = gather_manifest(ckpt)
        if rank == 0:
            write_done(ckpt, TrainState(), hashed)

    def old_manifest() -> None:  # write_done before issue 13: rank 0 alone, serial sha256
        if rank == 0:
            files = {str(p.relative_to(ckpt)): {"sha256": file_digest(p), "size": p.stat().st_size}
                     for p in checkpoint_files(ckpt)}
            (ckpt / "done.sha256").write_text(json.dumps({"files": files}))

    def evict() -> None:
        _evict(p for p in checkpoint_files(ckpt) if rank == 0 or f"__{rank}_" in p.name)

    if rank == 0:
        for d in (ckpt, warm):
            d.mkdir(parents=True)
    dist.barrier()
    dist_checkpointing.save(sharded(1024, 1), str(warm))  # the writer's start-up, not timed
    state = [sharded(int(gb_per_rank * GB / 4 / tensors), tensors)]
    r = {"write": timed(lambda: dist_checkpointing.save(state.pop(), str(ckpt)))}  # and free it
    r["new_hot"] = timed(new_manifest)
    (ckpt / "done.sha256").unlink(missing_ok=True)
    r["old_hot"] = timed(old_manifest)
    (ckpt / "done.sha256").unlink(missing_ok=True)
    why = []
    r["verify_hot"] = timed(lambda: why.append(problem(ckpt)) if rank == 0 else None)
    timed(evict)
    r["new_cold"] = timed(new_manifest)
    timed(evict)
    r["old_cold"] = timed(old_manifest)
    if rank == 0:
        files = checkpoint_files(ckpt)
        own = [p for p in files if p.name.startswith("__0_")]
        r.update(bytes=sum(p.stat().st_size for p in files if p.name != "done.sha256"),
                 files=len(files), ranks=world, verify_problem=why[0],
                 hash_threads_per_rank=hash_threads(len(own), int(os.environ["LOCAL_WORLD_SIZE"])),
                 core_gbps=_core_rates(max(own, key=lambda p: p.stat().st_size)),
                 manifest_ranks=sorted({m["rank"] for m in
                                        json.loads((ckpt / DONE).read_text())["files"].values()}))
        (workdir / "result.json").write_text(json.dumps(r))
    dist.barrier()
    dist.destroy_process_group()


# ---------------------------------------------------------------- parent side
def projection(core: dict, params: float, bytes_per_param: float, ranks: int, threads: int,
               storage_gbps: list[float]) -> list[dict]:
    """Paper figures for a checkpoint of ``params`` x ``bytes_per_param`` bytes over ``ranks``."""
    total = params * bytes_per_param
    new = total / ranks / (threads * core["xxh3_128"] * GB)
    old = total / (core["sha256"] * GB)
    rows = []
    for rate in storage_gbps:
        write = total / (rate * GB)
        rows.append({"storage_GBps": rate, "write_s": write, "new_s": new, "old_s": old,
                     "new_share": new / write, "old_share": old / write,
                     "core_GBps_for_goal": total / ranks / threads / (GOAL * write) / GB})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--gb-per-rank", type=float, default=1.5)
    ap.add_argument("--tensors", type=int, default=8, help="tensors per rank")
    ap.add_argument("--workdir", type=Path, help="where to write (default: a temporary folder)")
    ap.add_argument("--json", type=Path,
                    default=Path(tempfile.gettempdir()) / "checkpoint_manifest.json")
    ap.add_argument("--project-params", type=float, default=30e9)
    ap.add_argument("--bytes-per-param", type=float, default=16)
    ap.add_argument("--project-ranks", type=int, default=64)
    ap.add_argument("--project-threads", type=int, default=2,
                    help="hash threads per rank on the cluster (torch_dist writes 2 files a rank)")
    ap.add_argument("--storage-gbps", default="5,20,100",
                    help="aggregate storage write rates (GB/s) to project for")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args.worker, args.gb_per_rank, args.tensors)
        return 0

    workdir = Path(tempfile.mkdtemp(prefix="ckpt-manifest-", dir=args.workdir))
    try:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc_per_node={args.ranks}", "--max_restarts=0", __file__, "--worker",
               str(workdir), "--gb-per-rank", str(args.gb_per_rank), "--tensors", str(args.tensors)]
        run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
        if run.returncode != 0:
            print(run.stdout[-3000:], run.stderr[-3000:], sep="\n", file=sys.stderr)
            return 1
        r = json.loads((workdir / "result.json").read_text())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    size = r["bytes"] / GB
    print(f"checkpoint: {size:.2f} GB in {r['files']} files, {r['ranks']} ranks "
          f"(torch_dist, fp32, fsynced); write {r['write']:.2f} s = {size / r['write']:.2f} GB/s; "
          f"{r['hash_threads_per_rank']} hash thread(s) per rank; manifest hashed by ranks "
          f"{r['manifest_ranks']}")
    print("\n| manifest | page cache | seconds | GB/s | share of write |")
    print("|---|---|---|---|---|")
    for key, name in (("new_hot", "new: per-rank xxh3-128"), ("old_hot", "old: rank-0 sha256"),
                      ("new_cold", "new: per-rank xxh3-128"), ("old_cold", "old: rank-0 sha256"),
                      ("verify_hot", "verify (resume): rank-0 threads")):
        cache = "hot" if key.endswith("hot") else "cold"
        print(f"| {name} | {cache} | {r[key]:.2f} | {size / r[key]:.1f} | "
              f"{r[key] / r['write']:.1%} |")
    core = r["core_gbps"]
    print(f"\none core, hot (best of 3): xxh3-128 {core['xxh3_128']:.1f} GB/s, "
          f"sha256 {core['sha256']:.2f} GB/s")
    rows = projection(core, args.project_params, args.bytes_per_param, args.project_ranks,
                      args.project_threads, [float(x) for x in args.storage_gbps.split(",")])
    total = args.project_params * args.bytes_per_param / GB
    print(f"\npaper: {args.project_params / 1e9:.0f}B params x {args.bytes_per_param:g} B = "
          f"{total:.0f} GB over {args.project_ranks} ranks x {args.project_threads} hash threads, "
          f"at these core rates, files hashed from the page cache")
    print("| storage write GB/s | write s | new manifest s | share | xxh3 GB/s a core needs for "
          f"{GOAL:.0%} | old (rank-0 sha256) s | share |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['storage_GBps']:g} | {row['write_s']:.0f} | {row['new_s']:.2f} | "
              f"{row['new_share']:.1%} | {row['core_GBps_for_goal']:.1f} | >= {row['old_s']:.0f} | "
              f">= {row['old_share']:.1f}x |")
    share = r["new_hot"] / r["write"]
    met = share <= GOAL and r["verify_problem"] == ""
    print(f"\nnew manifest {share:.1%} of the write (goal <= {GOAL:.0%}): "
          f"{'met' if met else 'NOT met'}; old {r['old_hot'] / r['write']:.0%}; "
          f"verify found {r['verify_problem'] or 'no problem'}")
    out = {"measured": r, "share_new_hot": share, "share_old_hot": r["old_hot"] / r["write"],
           "goal": GOAL, "met": met, "projection": {
               "params": args.project_params, "bytes_per_param": args.bytes_per_param,
               "ranks": args.project_ranks, "threads_per_rank": args.project_threads, "rows": rows}}
    args.json.write_text(json.dumps(out, indent=1))
    print(f"figures: {args.json}")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
