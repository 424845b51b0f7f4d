"""Checkpoint manifests (``done``) at scale: every rank hashes its own files with xxh3-128, rank 0
gathers (stages/training/checkpoint.py ``gather_manifest``); ``problem`` verifies in parallel,
names a damaged file, and still reads the sha256 manifests of older checkpoints.

One real save by 2 ranks (torchrun, gloo, a tiny Megatron model with AdamW moments, data-parallel
so that Megatron's fully parallel save spreads the shards over both ranks) is made once per module;
this file is also the script those ranks run (``__main__``). Each damage test works on a copy.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODEL = dict(hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
             kv_channels=16, ffn_hidden_size=176, vocab_size=300, max_position_embeddings=64)


# ---------------------------------------------------------------- the 2 ranks (torchrun)
def _save_and_reload(out: Path) -> None:
    """Each rank: a tiny model after one AdamW step, saved; a fresh model and optimizer loaded
    from it must equal it (weights and both moments). Rank 0 writes ``result.json``."""
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from stages.specs import ModelSpec, PrecisionSpec
    from stages.training.checkpoint import TrainState, load_checkpoint, save_checkpoint
    from stages.training.cpu_shim import apply_cpu_shim, init_cpu_rng_tracker
    from stages.training.model import build_model
    apply_cpu_shim()
    dist.init_process_group("gloo")
    ps.initialize_model_parallel(tensor_model_parallel_size=1)
    init_cpu_rng_tracker()
    spec = ModelSpec(**MODEL)

    def model_and_optimizer(seed: int):
        torch.manual_seed(seed)
        model = build_model(spec, PrecisionSpec(), device="cpu")
        return model, torch.optim.AdamW(model.parameters())

    model, opt = model_and_optimizer(0)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    world = dist.get_world_size()
    ckpt = save_checkpoint(out, model, opt, TrainState(step=1, optimizer_steps=1, world_size=world,
                                                       data_parallel=world))
    fresh, fresh_opt = model_and_optimizer(1)
    load_checkpoint(ckpt, fresh, fresh_opt)
    same = all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))
    same_moments = all(torch.equal(opt.state[a][m], fresh_opt.state[b][m])
                       for a, b in zip(model.parameters(), fresh.parameters())
                       for m in ("exp_avg", "exp_avg_sq"))
    flags = [None] * world
    dist.all_gather_object(flags, (same, same_moments))
    if dist.get_rank() == 0:
        (out / "result.json").write_text(json.dumps({"checkpoint": str(ckpt), "reloaded": flags}))
    ps.destroy_model_parallel()
    dist.destroy_process_group()


# ---------------------------------------------------------------- helpers
def xxh3(path: Path) -> str:
    """An xxh3-128 computed here, apart from stages/layout.py."""
    import xxhash
    return xxhash.xxh3_128(path.read_bytes()).hexdigest()


def manifest(ckpt: Path) -> dict:
    return json.loads((ckpt / "done").read_text())


def on_disk(ckpt: Path) -> set[str]:
    return {str(p.relative_to(ckpt)) for p in ckpt.rglob("*") if p.is_file() and p.name != "done"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("manifest")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                          "--nproc_per_node=2", "--max_restarts=0", __file__, str(out)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "result.json").read_text())
    assert result["reloaded"] == [[True, True], [True, True]]  # weights, moments: on both ranks
    return Path(result["checkpoint"])


@pytest.fixture
def ckpt(saved, tmp_path) -> Path:
    """A copy of the 2-rank checkpoint, free to damage."""
    return Path(shutil.copytree(saved, tmp_path / "checkpoints" / saved.name))


# ---------------------------------------------------------------- the manifest
def test_every_file_is_listed_with_its_size_and_xxh3_by_the_rank_that_wrote_it(saved):
    from stages.layout import problem
    files = manifest(saved)["files"]
    assert set(files) == on_disk(saved)
    for rel, meta in files.items():
        assert set(meta) == {"size", "xxh3_128", "rank"}, rel
        assert meta["size"] == (saved / rel).stat().st_size, rel
        assert meta["xxh3_128"] == xxh3(saved / rel), rel
    shards = {rel: meta["rank"] for rel, meta in files.items() if rel.endswith(".distcp")}
    assert {int(rel.split("_")[2]) for rel in shards} == {0, 1}   # __<rank>_<n>.distcp: both wrote
    assert all(rank == int(rel.split("_")[2]) for rel, rank in shards.items())
    assert files["rng/rank_00001.pt"]["rank"] == 1 and files["rng/rank_00000.pt"]["rank"] == 0
    assert {rel for rel, meta in files.items() if rel in (".metadata", "common.pt", "state.json")
            and meta["rank"] == 0} == {".metadata", "common.pt", "state.json"}
    assert manifest(saved)["state"]["step"] == 1
    assert problem(saved) == ""


def test_writer_rank_reads_torch_dist_and_rng_names():
    from stages.layout import writer_rank
    assert [writer_rank(n) for n in ("__0_0.distcp", "__13_2.distcp", "optim__7_0.distcp",
                                     "rng/rank_00012.pt", ".metadata", "common.pt",
                                     "state.json", "loop_state.json")] == \
        [0, 13, 7, 12, None, None, None, None]


def test_hash_threads_share_the_node_and_never_exceed_the_files():
    from stages.layout import hash_threads
    cores = len(os.sched_getaffinity(0))
    assert hash_threads(1) == 1 and hash_threads(0) == 1
    assert hash_threads(1000) == min(cores, 16)
    assert hash_threads(1000, sharing=cores) == 1 and hash_threads(1000, sharing=4 * cores) == 1


# ---------------------------------------------------------------- damage is named
def shard(ckpt: Path, rank: int = 1) -> Path:
    return sorted(ckpt.glob(f"__{rank}_*.distcp"))[0]


def test_a_flipped_byte_is_found_only_by_the_digest(ckpt):
    from stages.layout import problem
    f = shard(ckpt)
    blob = bytearray(f.read_bytes())
    blob[len(blob) // 2] ^= 0x04
    f.write_bytes(bytes(blob))
    assert problem(ckpt, verify=False) == ""   # same size: only the digest can tell
    assert problem(ckpt) == f"{f.name} fails its xxh3_128 check"


def test_a_truncated_file_is_named(ckpt):
    from stages.layout import problem
    f = shard(ckpt, 0)
    size = f.stat().st_size
    os.truncate(f, size - 1)
    assert problem(ckpt) == f"{f.name} has {size - 1} bytes, done says {size}"


def test_a_missing_file_is_named(ckpt):
    from stages.layout import problem
    (ckpt / "rng" / "rank_00001.pt").unlink()
    assert problem(ckpt, verify=False) == "rng/rank_00001.pt is missing"


def test_an_unlisted_file_is_named(ckpt):
    from stages.layout import problem
    (ckpt / "rng" / "rank_00002.pt").write_bytes(b"stray")
    assert problem(ckpt) == "rng/rank_00002.pt is not listed in done"


def test_a_changed_digest_in_done_is_found(ckpt):
    from stages.layout import problem
    doc = manifest(ckpt)
    meta = doc["files"][".metadata"]
    meta["xxh3_128"] = ("0" if meta["xxh3_128"][0] != "0" else "1") + meta["xxh3_128"][1:]
    (ckpt / "done").write_text(json.dumps(doc))
    assert problem(ckpt) == ".metadata fails its xxh3_128 check"
    del meta["xxh3_128"]
    (ckpt / "done").write_text(json.dumps(doc))
    assert problem(ckpt).startswith("done manifest is unreadable (ValueError: an entry names no "
                                    "digest (xxh3_128 or sha256)")


def test_of_two_damaged_files_the_first_in_the_manifest_is_named(ckpt):
    from stages.layout import problem
    for f in (shard(ckpt, 1), ckpt / "common.pt"):   # hashed by parallel threads, named in order
        blob = bytearray(f.read_bytes())
        blob[-1] ^= 0x80
        f.write_bytes(bytes(blob))
    assert problem(ckpt) == f"{shard(ckpt, 1).name} fails its xxh3_128 check"


# ---------------------------------------------------------------- older checkpoints
def test_an_old_sha256_manifest_still_verifies_and_still_detects_damage(ckpt):
    from stages.layout import problem
    from stages.training.checkpoint import latest_complete
    doc = manifest(ckpt)
    doc["files"] = {rel: {"sha256": hashlib.sha256((ckpt / rel).read_bytes()).hexdigest(),
                          "size": meta["size"]} for rel, meta in doc["files"].items()}
    (ckpt / "done").write_text(json.dumps(doc, indent=1, sort_keys=True))   # as before issue 13
    assert problem(ckpt) == ""
    assert latest_complete(ckpt.parent.parent) == ckpt
    f = shard(ckpt, 0)
    blob = bytearray(f.read_bytes())
    blob[7] ^= 0x01
    f.write_bytes(bytes(blob))
    assert problem(ckpt) == f"{f.name} fails its sha256 check"


def test_write_done_hashes_what_no_rank_did_and_refuses_a_vanished_entry(tmp_path):
    from stages.layout import problem
    from stages.training.checkpoint import TrainState, write_done
    (tmp_path / "__0_0.distcp").write_bytes(b"a" * 100)
    (tmp_path / "state.json").write_text("{}")
    write_done(tmp_path, TrainState())
    files = manifest(tmp_path)["files"]
    assert files["__0_0.distcp"] == {"size": 100, "rank": 0,
                                     "xxh3_128": xxh3(tmp_path / "__0_0.distcp")}
    assert problem(tmp_path) == ""
    with pytest.raises(RuntimeError, match="__1_0.distcp was hashed by rank 1 but is no longer"):
        write_done(tmp_path, TrainState(),
                   {"__1_0.distcp": {"size": 1, "xxh3_128": "0", "rank": 1}})


if __name__ == "__main__":   # run by torchrun from the ``saved`` fixture
    sys.path.insert(0, str(ROOT))
    _save_and_reload(Path(sys.argv[1]))
