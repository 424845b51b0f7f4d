"""Every kind that loads a parent's checkpoint verifies its checksums first (``StageInput.checkpoint``):
evaluate and merge refuse a damaged parent before any work, naming the parent and the fix."""
from __future__ import annotations

import json

import pytest

from stages.base import Artifact, DamagedInput, RunContext, StageInput, file_digest
from stages.evaluation.evaluate import Evaluate, EvaluateConfig
from stages.models.merge import Merge, MergeConfig

MODEL = {"hidden_size": 64, "num_layers": 2, "num_attention_heads": 4, "num_query_groups": 2,
         "kv_channels": 16, "ffn_hidden_size": 128, "vocab_size": 512}


def model_stage(tmp_path, name, damage: bool) -> StageInput:
    """A finished model stage whose one checkpoint file has a byte flipped after its manifest."""
    ckpt = tmp_path / name / "checkpoints" / "iter_0000010"
    ckpt.mkdir(parents=True)
    weights = ckpt / "__0_0.distcp"
    weights.write_bytes(b"\x00" * 64)
    (ckpt / "done").write_text(json.dumps(
        {"files": {weights.name: {"size": 64, "sha256": file_digest(weights)}}, "state": {}}))
    if damage:
        weights.write_bytes(b"\x01" + b"\x00" * 63)   # same size: only the checksum can tell
    art = Artifact(kind="pretrain", stage=name, key="k" * 64,
                   outputs={"checkpoint": "checkpoints/iter_0000010"},
                   extra={"model": MODEL, "seq_length": 128})
    return StageInput(name, tmp_path / name, art)


def test_a_sound_checkpoint_passes(tmp_path):
    inp = model_stage(tmp_path, "pretrain-4", damage=False)
    assert inp.checkpoint() == tmp_path / "pretrain-4" / "checkpoints" / "iter_0000010"


def test_evaluate_refuses_a_damaged_parent_before_any_work(tmp_path):
    model = model_stage(tmp_path, "pretrain-4", damage=True)
    data = StageInput("tokenize", tmp_path / "missing", Artifact(kind="tokenize", stage="tokenize",
                                                                 key="t" * 64))
    config = EvaluateConfig(from_="pretrain-4", data="tokenize", heldout_length=128)
    out = tmp_path / "eval"
    out.mkdir()
    with pytest.raises(DamagedInput, match=r"the checkpoint of parent stage pretrain-4 is damaged: .*"
                                           r"__0_0.distcp fails its sha256 check; run pretrain-4 "
                                           r"again \(forge run --rerun pretrain-4\)"):
        Evaluate.run(config, {"pretrain-4": model, "tokenize": data}, out,
                     RunContext(stage="eval", key="e" * 64, cluster=None))
    assert list(out.iterdir()) == []


def test_merge_refuses_a_damaged_parent_before_any_work(tmp_path):
    good, bad = model_stage(tmp_path, "merge-1", False), model_stage(tmp_path, "extend-2", True)
    config = MergeConfig(from_=("extend-2", "merge-1"), weights=(0.5, 0.5))
    out = tmp_path / "merge-2"
    out.mkdir()
    with pytest.raises(DamagedInput, match="parent stage extend-2 is damaged"):
        Merge.run(config, {"merge-1": good, "extend-2": bad}, out,
                  RunContext(stage="merge-2", key="m" * 64, cluster=None))
    assert list(out.iterdir()) == []
