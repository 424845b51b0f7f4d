"""`forge export STAGE --format hf --out DIR`: a model stage as a Hugging Face folder.

The one export of the project: ``forge export``, the judge's server over a model stage and the
merges (through ``convert.megatron_to_hf``, which this calls) all write the same files:

- ``config.json`` + ``model.safetensors``: a ``GraniteForCausalLM`` with the stage's ``ModelSpec``
  (``artifact.extra.model``) and its final checkpoint's tensors, in the checkpoint's dtype (fp32);
- ``tokenizer.json`` + ``tokenizer_config.json``: the stage's tokenizer (``outputs.tokenizer``),
  eos ``<|endoftext|>`` and pad ``<|pad|>``; when it has the chat role tokens, those are special
  tokens and ``tokenizer_config.json`` holds the chat template (``stages/data/chat_format.py``), so
  ``apply_chat_template`` gives the ids SFT trained on;
- ``generation_config.json``: eos = ``<|end_of_text|>`` (the end of a turn) and ``<|endoftext|>``
  (the end of a document), so ``generate()`` stops after an assistant turn;
- ``forge-export.json``: where it came from (stage, kind, key, checkpoint).

Safety: the parent checkpoint's checksums are verified before anything is read
(``StageInput.checkpoint``); the folder is written in a temporary directory beside ``out`` and
renamed into place, so a failed export leaves no half folder; an existing non-empty ``out`` is
refused unless ``overwrite`` (``--overwrite``), and then replaced only once the new one is whole.

``forge export`` (flows/cli.py) finds the stage's output dir and runs this module as a process of
its own, ``python -m stages.models.export OUT_DIR --stage NAME --out DIR [--overwrite]``, like a
stage worker: the orchestrator imports no torch, transformers or stage family module, and on a
cluster the export runs with the worker's environment. Exit codes: 0 done, 2 refused (nothing
written), 1 failed (a damaged checkpoint, an error on the way; no folder left behind).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from stages.base import DamagedInput, StageInput, read_artifact
from stages.specs import spec_of_artifact

RECORD = "forge-export.json"


class ExportRefused(RuntimeError):
    """The export cannot start (its target is taken, its stage lacks what a folder needs);
    nothing was written."""


def export_model(model: StageInput, out: Path, *, overwrite: bool = False) -> Path:
    """Write ``out`` as a Hugging Face folder of the model stage ``model``; returns ``out``."""
    out = Path(out).absolute()
    if out.exists() and not out.is_dir():
        raise ExportRefused(f"--out {out}: a file is there, not a folder; pick another path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ExportRefused(f"--out {out} exists and is not empty; pass --overwrite (overwrite=True) "
                            "to replace it, or pick another folder. Nothing was changed.")
    if "tokenizer" not in model.artifact.outputs:
        raise ExportRefused(f"stage {model.name} recorded no tokenizer (outputs: "
                            f"{sorted(model.artifact.outputs)}); an export without one does not load "
                            "with AutoTokenizer. Its data stage must carry the train_tokenizer output.")
    ckpt = model.checkpoint()                      # checksums verified: damaged -> DamagedInput
    spec = spec_of_artifact(model)
    tokenizer = model.path("tokenizer")

    from stages.models.convert import megatron_to_hf
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-export-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        megatron_to_hf(ckpt, spec, tmp, tokenizer)
        (tmp / RECORD).write_text(json.dumps({
            "stage": model.name, "kind": model.artifact.kind, "key": model.artifact.key,
            "checkpoint": str(ckpt), "seq_length": model.artifact.extra.get("seq_length")},
            indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    print(f"exported {model.name} ({model.artifact.kind}, key {model.artifact.key[:12]}) "
          f"from {ckpt} to {out}:")
    for f in sorted(out.iterdir()):
        print(f"  {f.name:<24} {f.stat().st_size:>12,d} bytes")
    return out


def _replace(new: Path, out: Path) -> None:
    """Move the finished folder ``new`` to ``out``; an old ``out`` goes only after that."""
    if not out.exists():
        os.replace(new, out)
        return
    old = out.parent / f".old-export-{out.name}-{os.getpid()}"
    shutil.rmtree(old, ignore_errors=True)
    os.replace(out, old)
    try:
        os.replace(new, out)
    except BaseException:
        os.replace(old, out)    # the previous export stays as it was
        raise
    shutil.rmtree(old, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m stages.models.export",
                                description="Export a finished model stage as a Hugging Face "
                                "folder (what `forge export` runs).")
    p.add_argument("stage_dir", type=Path, help="the stage's output dir (holds artifact.json)")
    p.add_argument("--stage", required=True, help="the stage's name")
    p.add_argument("--out", required=True, type=Path, help="the folder to write")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
    args = p.parse_args(argv)
    artifact = read_artifact(args.stage_dir)
    try:
        if artifact is None:
            raise ExportRefused(f"stage {args.stage} is not complete: no readable artifact.json "
                                f"in {args.stage_dir}")
        export_model(StageInput(args.stage, args.stage_dir, artifact), args.out,
                     overwrite=args.overwrite)
    except ExportRefused as e:
        print(f"forge export: {e}", file=sys.stderr)
        return 2
    except DamagedInput as e:
        print(f"forge export: {e}\nNothing was exported.", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
