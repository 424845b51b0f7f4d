"""lm-evaluation-harness tasks on a model stage's Hugging Face export, offline.

- The tasks are the project's own task files, ``conf/lm_eval/<task>.yaml`` with their data beside
  them (``conf/lm_eval/data/``; ``FORGE_LM_EVAL_TASKS`` names another folder, e.g. in the GPU
  worker image). Only these are known (lm-eval's built-in tasks download their data from the hub):
  ``check_task_names`` refuses any other name at validation, listing the shipped ones.
- The run: lm-eval's Python API, ``simple_evaluate`` with a ``TaskManager`` over that folder, on
  the export folder: backend ``hf`` on CPU (fp32, ``batch_size`` requests per forward), ``vllm``
  on CUDA (refused before any work where vLLM is not importable: it lives in the GPU worker
  image). ``chat_template``: each task prompt becomes a user turn rendered by the export's chat
  template (lm-eval's ``apply_chat_template``), the answer scored or generated as the assistant's.
- Offline by construction: the harness runs in a child process (``python -m
  stages.evaluation.harness``) whose environment sets ``HF_HUB_OFFLINE``, ``HF_DATASETS_OFFLINE``,
  ``TRANSFORMERS_OFFLINE`` and ``HF_EVALUATE_OFFLINE`` (``huggingface_hub`` and ``datasets`` read
  them once, at import, which in the calling worker may already have happened), its working
  directory is the task folder (so a task's relative ``data_files`` resolve from any caller's
  directory), and its datasets cache lies in ``out_dir`` (removed after). A child of its own also
  gives vLLM a clean CUDA context.
- Results: lm-eval's results JSON in ``out_dir/lm_eval_results.json``, every request with its
  model response (log-likelihoods, generations) in ``out_dir/lm_eval_samples.jsonl``, and flat
  metrics ``lm_eval/<task>/<metric>`` (lm-eval's ``acc,none`` -> ``acc``; a filter other than
  ``none`` is a path part: ``exact_match,last_number`` -> ``exact_match/last_number``; MLflow
  takes no commas), plus ``lm_eval/<task>/samples`` (documents scored). ``task_datasets``: the
  tasks' data files with their digests, the evaluate stage's own datasets in its lineage.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from stages.schema import ConfigError

TASKS_ENV = "FORGE_LM_EVAL_TASKS"
RESULTS_FILE = "lm_eval_results.json"
SAMPLES_FILE = "lm_eval_samples.jsonl"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_EVALUATE_OFFLINE": "1"}
GPU_IMAGE = "the GPU worker image (Dockerfile: granite-forge-worker, which installs vLLM)"


def task_dir() -> Path:
    """The folder of the shipped task files: ``$FORGE_LM_EVAL_TASKS`` or the repository's
    ``conf/lm_eval``."""
    return Path(os.environ.get(TASKS_ENV) or Path(__file__).resolve().parents[2] / "conf" / "lm_eval")


def shipped_tasks() -> list[str]:
    """The task names that can run: one per ``<task>.yaml`` of ``task_dir()``."""
    return sorted(p.stem for p in task_dir().glob("*.yaml"))


def check_task_names(names: tuple[str, ...] | list[str], field: str = "lm_eval_tasks") -> None:
    """ConfigError naming every unknown task and the shipped ones (at validation: no lm-eval import)."""
    known = shipped_tasks()
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(
            f"{field}: unknown lm-eval task(s) {', '.join(map(repr, unknown))}; the shipped tasks "
            f"({task_dir()}) are: {', '.join(known) or 'none'}. Tasks run offline, so only task "
            f"files shipped there (a <task>.yaml with its data) can run; add one to use it.")
    if len(set(names)) != len(names):
        raise ConfigError(f"{field}: a task is named twice in {list(names)}")


def has_chat_template(hf_dir: Path) -> bool:
    config = Path(hf_dir) / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def run_tasks(hf_dir: Path, tasks: list[str], out_dir: Path, *, device: str, limit: int | None,
              batch_size: int, chat_template: bool = True, threads: int | None = None
              ) -> dict[str, float]:
    """Run the shipped ``tasks`` on the Hugging Face folder ``hf_dir`` (module docstring); returns
    the flat ``lm_eval/<task>/<metric>`` metrics and writes the results and samples into ``out_dir``."""
    import importlib.util
    check_task_names(list(tasks))
    hf_dir, out_dir = Path(hf_dir).absolute(), Path(out_dir).absolute()
    backend = "vllm" if device.startswith("cuda") else "hf"
    if backend == "vllm" and importlib.util.find_spec("vllm") is None:
        raise RuntimeError(f"lm_eval_tasks on {device}: the harness runs on vLLM there, which is "
                           f"not installed in this environment; run the stage in {GPU_IMAGE}, or "
                           "on a CPU cluster (the hf backend)")
    if chat_template and not has_chat_template(hf_dir):
        raise ValueError(f"lm_eval_chat_template: the export {hf_dir} has no chat template (its "
                         "tokenizer lacks the chat role tokens: train_tokenizer's chat_roles); set "
                         "lm_eval_chat_template: false to score the plain task prompts")
    (out_dir / RESULTS_FILE).unlink(missing_ok=True)  # an earlier attempt's: never read as this one's
    cache = out_dir / "hf-datasets-cache"
    request = {"hf_dir": str(hf_dir), "tasks": list(tasks), "out_dir": str(out_dir),
               "backend": backend, "device": device, "limit": limit, "batch_size": batch_size,
               "chat_template": chat_template, "task_dir": str(task_dir()), "threads": threads}
    env = dict(os.environ, **OFFLINE, HF_DATASETS_CACHE=str(cache), TOKENIZERS_PARALLELISM="false")
    root = str(Path(__file__).resolve().parents[2])  # so the child imports these stages
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    try:
        proc = subprocess.run([sys.executable, "-m", "stages.evaluation.harness",
                               json.dumps(request)], cwd=task_dir(), env=env)
    finally:
        shutil.rmtree(cache, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"lm-eval on {hf_dir} ({', '.join(tasks)}) exited {proc.returncode}; "
                           "its output is above in this log")
    return flat_metrics(json.loads((out_dir / RESULTS_FILE).read_text()))


def flat_metrics(results: dict) -> dict[str, float]:
    """``lm_eval/<task>/<metric>`` from lm-eval's results dict (module docstring); non-numbers
    (an "N/A" stderr) are left out."""
    out: dict[str, float] = {}
    for task, row in results.get("results", {}).items():
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
    for task, n in results.get("n-samples", {}).items():
        out[f"lm_eval/{task}/samples"] = float(n.get("effective", n.get("original", 0)))
    return out


def task_datasets(out_dir: Path) -> list[dict]:
    """The local data files the tasks of ``out_dir``'s results read, as lineage records
    ``{"name": "lm_eval/<task>", "split", "rows", "path", "digest", "digest_algo"}`` (a task's
    ``data_files``: a path, a list, or split -> path(s), relative to the task folder)."""
    from stages.layout import FAST_DIGEST, fast_file_digest
    results = json.loads((Path(out_dir) / RESULTS_FILE).read_text())
    out = []
    for task, cfg in sorted(results.get("configs", {}).items()):
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        by_split = files if isinstance(files, dict) else {cfg.get("test_split") or "test": files}
        rows = int(results.get("n-samples", {}).get(task, {}).get("original", 0))
        for split, paths in sorted(by_split.items()):
            for path in [paths] if isinstance(paths, str) else list(paths or ()):
                path = (task_dir() / path).resolve()
                if path.is_file():
                    out.append({"name": f"lm_eval/{task}", "split": split, "rows": rows,
                                "path": str(path), "digest": fast_file_digest(path),
                                "digest_algo": FAST_DIGEST})
    return out


# ------------------------------------------------------------------ the child process
def _evaluate(request: dict) -> None:
    import lm_eval
    import torch
    from lm_eval.tasks import TaskManager
    out_dir = Path(request["out_dir"])
    if request["threads"]:
        torch.set_num_threads(request["threads"])  # the worker's share of the CPU cores
    if request["backend"] == "vllm":
        model_args = {"pretrained": request["hf_dir"], "dtype": "auto", "gpu_memory_utilization": 0.8}
        batch_size: int | str = "auto"  # vLLM schedules its own batches
    else:
        model_args = {"pretrained": request["hf_dir"], "dtype": "float32"}
        batch_size = request["batch_size"]
    manager = TaskManager(include_path=request["task_dir"], include_defaults=False)
    results = lm_eval.simple_evaluate(
        model=request["backend"], model_args=model_args, tasks=request["tasks"],
        task_manager=manager, device=request["device"], batch_size=batch_size,
        limit=request["limit"], apply_chat_template=request["chat_template"], log_samples=True)
    samples = results.pop("samples", {})
    with open(out_dir / SAMPLES_FILE, "w") as fh:
        for task, rows in samples.items():
            for row in rows:
                fh.write(json.dumps({"task": task, **row}, default=str) + "\n")
    (out_dir / RESULTS_FILE).write_text(json.dumps(results, indent=1, default=str) + "\n")


if __name__ == "__main__":
    _evaluate(json.loads(sys.argv[1]))
