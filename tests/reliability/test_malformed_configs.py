"""A corpus of malformed configs and overrides, each rejected before any compute (issue 4, item 6).

Every case goes through the real CLI in-process (`forge plan`, a few `forge run`) against a store
that already holds earlier work, and must end with exit code 2, a message that starts with the
path of the field at fault (``stages.pretrain-2.schedule.lr: ...``) and says what to do, and the
store exactly as it was: no file created, changed or lost. Broken YAML files are written into a
copy of ``conf/`` (``pipeline=broken-*``, ``model=broken-*``, ``cluster=broken-*``).

The cases of ``tests/unit/test_config_dag.py`` and ``test_long_context_config.py`` are not
repeated here; these extend them to every kind of mistake a user makes.
"""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from flows import cli
from flows import config as config_mod

ROOT = Path(__file__).resolve().parents[2]
TOKENIZE = "  tokenize:\n    kind: tokenize\n    data: data\n    tokenizer: tokenizer\n"
MIX_1 = "    mixture: {web: 59.0, code: 20.0, math: 7.0, technical: 12.0, long: 2.0, recall: 200.0}"

# file under conf/ -> (file it is made from, text to replace, replacement); None: whole new text
BROKEN_FILES = {
    "pipeline/broken-nokind": ("pipeline/granite-4.1-tiny", "  tokenize:\n    kind: tokenize\n",
                               "  tokenize:\n"),
    "pipeline/broken-syntax": ("pipeline/granite-4.1-tiny", "    vocab_size: 1024", "    vocab_size: [1024"),
    "pipeline/broken-dupkey": ("pipeline/granite-4.1-tiny", "    vocab_size: 1024",
                               "    vocab_size: 1024\n    vocab_size: 2048"),
    "pipeline/broken-dupstage": ("pipeline/granite-4.1-tiny", "  tokenizer:\n    kind: train_tokenizer",
                                 "  tokenize:\n    kind: train_tokenizer"),
    "pipeline/broken-tab": ("pipeline/granite-4.1-tiny", "    vocab_size: 1024", "\tvocab_size: 1024"),
    "pipeline/broken-alias": ("pipeline/granite-4.1-tiny", "    <<: *phase\n    tokens: 1200000",
                              "    <<: *phse\n    tokens: 1200000"),
    "pipeline/broken-listbody": ("pipeline/granite-4.1-tiny", TOKENIZE,
                                 "  tokenize:\n    - kind: tokenize\n    - data: data\n"),
    "pipeline/broken-nullbody": ("pipeline/granite-4.1-tiny", TOKENIZE, "  tokenize:\n"),
    "pipeline/broken-badname": ("pipeline/granite-4.1-tiny", TOKENIZE,
                                TOKENIZE + TOKENIZE.replace("  tokenize:", "  my stage:")),
    "pipeline/broken-toplevel": ("pipeline/granite-4.1-tiny", "pipeline_name: granite-4.1-tiny",
                                 "pipeline_name: granite-4.1-tiny\nretries: 3"),
    "pipeline/broken-cycle": ("pipeline/granite-4.1-tiny", "    from: pretrain-1\n", "    from: pretrain-4\n"),
    "pipeline/broken-from": ("pipeline/granite-4.1-tiny", "    from: pretrain-1\n", "    from: pretrain-0\n"),
    "pipeline/broken-interp": ("pipeline/granite-4.1-tiny", "  model: ${model}", "  model: ${modle}"),
    "pipeline/broken-scalarmix": ("pipeline/granite-4.1-tiny", MIX_1, "    mixture: web"),
    "pipeline/broken-stageslist": (None, None, "# @package _global_\npipeline_name: x\nstages:\n"
                                               "  - data\n  - tokenize\n"),
    "pipeline/broken-nostages": (None, None, "# @package _global_\npipeline_name: empty\n"),
    "pipeline/broken-empty": (None, None, ""),
    "model/broken-list": (None, None, "- 64\n- 2\n"),
    "model/broken-str": ("model/tiny", "hidden_size: 64", "hidden_size: sixty-four"),
    "cluster/broken-key": ("cluster/cpu", "threads_per_worker: 1", "threads_per_worker: 1\ngpus: 2"),
}


def case(id, overrides, field, hint, command="plan"):
    """``forge COMMAND OVERRIDES`` fails; the message starts with ``field`` and contains ``hint``."""
    return pytest.param(command, overrides, field, hint, id=id)


CASES = [
    # --- wrong types (a YAML bool is a Python int: the schema must still refuse it for a number)
    case("tokens-bool", ["stages.pretrain-1.tokens=true"], "stages.pretrain-1.tokens", "expected an integer"),
    case("tokens-float", ["stages.pretrain-2.tokens=1.5"], "stages.pretrain-2.tokens", "expected an integer"),
    case("batch-quoted-string", ["stages.pretrain-1.global_batch_size='16'"],
         "stages.pretrain-1.global_batch_size", "expected an integer"),
    case("lr-bool", ["stages.pretrain-4.schedule.lr=true"], "stages.pretrain-4.schedule.lr", "expected a number"),
    case("lr-empty-string", ["stages.pretrain-1.schedule.lr=''"], "stages.pretrain-1.schedule.lr",
         "expected a number"),
    case("model-int-for-bool", ["model.tied_embeddings=3"], "model.tied_embeddings", "expected true or false"),
    case("mixture-list-for-mapping", ["stages.pretrain-1.mixture=[web,code]"], "stages.pretrain-1.mixture",
         "expected a mapping"),
    case("schedule-scalar", ["stages.pretrain-1.schedule=0.1"], "stages.pretrain-1.schedule",
         "expected a mapping of fields"),
    case("merge-from-string", ["stages.merge-1.from=extend-1"], "stages.merge-1.from",
         "expected a list such as [a, b]"),
    case("pretrain-from-list", ["stages.pretrain-2.from=[pretrain-1]"], "stages.pretrain-2.from",
         "expected a string"),
    case("lengths-element", ["stages.eval-pretrain.lengths=[128,long]"], "stages.eval-pretrain.lengths[1]",
         "expected an integer"),
    case("data-null", ["stages.pretrain-1.data=null"], "stages.pretrain-1.data", "expected a string"),
    case("tracking-uri-int", ["tracking.uri=5"], "tracking.uri", "expected a string"),
    case("seed-string", ["seed=abc"], "seed", "expected an integer"),
    case("stage-scalar", ["stages.pretrain-4=5"], "stages.pretrain-4", "expected a mapping with a `kind`"),
    case("stages-scalar", ["stages=5"], "stages", "expected a mapping of stage name -> stage config"),
    # --- NaN and infinity pass every `x <= 0` check: the schema refuses them
    case("lr-nan", ["stages.pretrain-1.schedule.lr=nan"], "stages.pretrain-1.schedule.lr",
         "expected a finite number"),
    case("mixture-inf", ["stages.pretrain-2.mixture.math=inf"], "stages.pretrain-2.mixture.math",
         "expected a finite number"),
    case("merge-weight-nan", ["stages.merge-1.weights=[nan,1.0]"], "stages.merge-1.weights[0]",
         "expected a finite number"),
    case("theta-nan", ["model.rope_theta=nan"], "model.rope_theta", "expected a finite number"),
    # --- values out of range
    case("tokens-negative", ["stages.pretrain-3.tokens=-5"], "stages.pretrain-3.tokens", "must be > 0"),
    case("tokens-below-one-step", ["stages.pretrain-4.tokens=1000"], "stages.pretrain-4.tokens",
         "less than one step"),
    case("lr-zero", ["stages.pretrain-2.schedule.lr=0"], "stages.pretrain-2.schedule.lr", "must be > 0"),
    case("decay-fraction-above-one", ["stages.sft.schedule.decay_fraction=1.5"],
         "stages.sft.schedule.decay_fraction", "must be in [0, 1]"),
    case("gamma-zero", ["stages.pretrain-3.schedule.gamma=0"], "stages.pretrain-3.schedule.gamma",
         "must be in (0, 1]"),
    case("warmup-negative", ["stages.pretrain-1.schedule.warmup_steps=-1"],
         "stages.pretrain-1.schedule.warmup_steps", "must be >= 0"),
    case("batch-zero", ["stages.extend-1.global_batch_size=0"], "stages.extend-1.global_batch_size",
         "must be > 0"),
    case("model-negative", ["model.hidden_size=-64"], "model.hidden_size", "must be > 0, got -64"),
    case("loss-weight-zero", ["stages.pretrain-2.loss_weights.recall=0"], "stages.pretrain-2.loss_weights.recall",
         "leave a source out of the mixture"),
    case("theta-zero", ["stages.extend-2.rope_theta=0"], "stages.extend-2.rope_theta", "must be > 0"),
    case("heldout-zero", ["stages.eval-merge-1.heldout_length=0"], "stages.eval-merge-1.heldout_length",
         "must be > 0"),
    case("eval-samples-zero", ["stages.eval-final.samples=0"], "stages.eval-final.samples", "must be >= 1"),
    case("eval-length-short", ["stages.eval-extend-1.lengths=[8,128]"], "stages.eval-extend-1.lengths",
         "each must be >= 16"),
    case("eval-keys-empty", ["stages.eval-pretrain.keys=[]"], "stages.eval-pretrain.keys", "need counts >= 1"),
    case("tokenizer-vocab-small", ["stages.tokenizer.vocab_size=100"], "stages.tokenizer.vocab_size",
         "use at least 260"),
    case("tokenizer-docs-zero", ["stages.tokenizer.max_documents=0"], "stages.tokenizer.max_documents",
         "must be >= 1"),
    case("tokenize-workers-negative", ["stages.tokenize.workers=-1"], "stages.tokenize.workers",
         "must be >= 0"),
    case("tokenize-shards-zero", ["stages.tokenize.shards=0"], "stages.tokenize.shards", "must be >= 1"),
    case("documents-zero", ["stages.data.sources.web.documents=0"], "stages.data.sources.web.documents",
         "must be > 0"),
    case("validation-fraction", ["stages.data.validation_fraction=0.7"], "stages.data.validation_fraction",
         "must be in [0, 0.5)"),
    case("generator-with-files", ["stages.data.sources.web.data_files=[a.jsonl]"],
         "stages.data.sources.web.data_files", "drop data_files"),
    case("dp-zero", ["cluster.data_parallel=0"], "cluster.data_parallel", "must be >= 1"),
    case("rl-group-of-one", ["stages.rl-math.group_size=1"], "stages.rl-math.group_size", "must be >= 2, got 1"),
    case("rl-eps-high", ["stages.rl-code.eps_high=1.5"], "stages.rl-code.eps_high", "must be in (0, 1)"),
    case("rl-steps-zero", ["stages.rl-if.steps=0"], "stages.rl-if.steps", "must be >= 1"),
    case("rl-dual-clip", ["stages.rl-math.dual_clip=0.5"], "stages.rl-math", "dual_clip: 0.5 must be > 1"),
    case("rl-is-cap", ["stages.rl-math.is_cap=0.5"], "stages.rl-math", "is_cap: 0.5 must be >= 1"),
    case("rl-buffer-past-cap", ["stages.rl-math.overlong_buffer=30"], "stages.rl-math",
         "overlong_buffer: 30 must be smaller than max_new_tokens (24)"),
    case("rl-judge-on-math", ["+stages.rl-math.judge={serve: merge-3, rubric: {a: {question: q, threshold: 3}}}"],
         "stages.rl-math", "drop judge or use task: chat"),
    case("rl-missing-prompts-file", ["stages.rl-math.prompts={builder: json, data_files: [/nonexistent/p.jsonl]}"],
         "stages.rl-math.prompts", "/nonexistent/p.jsonl"),
    case("rl-tensor-parallel", ["stages.rl-math.parallel={tensor_parallel: 2}", "cluster=cpu-tp2"],
         "stages.rl-math.parallel", "tensor_parallel=1"),
    case("rl-vllm-on-cpu", ["stages.rl-math.engine=vllm"], "stages.rl-math.engine",
         "vllm serves rollouts on GPUs only"),
    case("rl-no-room", ["stages.rl-math.max_new_tokens=600"], "stages.rl-math.max_new_tokens",
         "leaves no room for a prompt"),
    case("sft-epochs-zero", ["stages.sft.epochs=0"], "stages.sft.epochs", "must be >= 1"),
    case("curate-target-zero", ["stages.curate.target_samples=0"], "stages.curate.target_samples",
         "must be >= 1"),
    case("empty-experiment", ["tracking.experiment=''"], "tracking.experiment", "name the MLflow experiment"),
    case("empty-store", ["store=''"], "store", "FORGE_STORE"),
    # --- unknown fields: typos name the field and list the known ones (YAML names: `from`)
    case("schedule-typo", ["stages.pretrain-1.schedule.lrr=0.1"], "stages.pretrain-1.schedule.lrr",
         "Known fields: decay_fraction"),
    case("model-typo", ["model.hidden_sise=64"], "model.hidden_sise", "Known fields: attention_multiplier"),
    case("cluster-typo", ["cluster.tensor_paralel=2"], "cluster.tensor_paralel", "Known fields: accelerator"),
    case("tracking-typo", ["tracking.experiement=x"], "tracking.experiement", "Known fields: experiment, uri"),
    case("source-typo", ["stages.data.sources.web.document=10"], "stages.data.sources.web.document",
         "Known fields: builder"),
    case("merge-typo", ["stages.merge-1.methd=slerp"], "stages.merge-1.methd", "Known fields: base, density, from,"),
    case("extension-field-on-pretrain", ["stages.pretrain-1.rope_theta=5.0"], "stages.pretrain-1.rope_theta",
         "unknown field"),
    case("top-level-typo", ["stor=/tmp/elsewhere"], "stor", "unknown top-level key"),
    case("group-typo", ["modle.hidden_size=64"], "modle", "unknown top-level key"),
    case("top-level-added", ["+retries=3"], "retries", "unknown top-level field"),
    case("required-removed", ["~stages.pretrain-1.schedule"], "stages.pretrain-1.schedule",
         "required field is missing"),
    # --- unknown kinds, group options and choices
    case("kind-empty", ["stages.pretrain-1.kind=''"], "stages.pretrain-1.kind", "known kinds: prepare_data"),
    case("kind-removed", ["~stages.tokenize.kind"], "stages.tokenize.kind", "missing; one of"),
    case("model-option", ["model=nope"], "model", "granite-8b, tiny"),
    case("cluster-option", ["cluster=tpu-pod"], "cluster", "options: "),
    case("schedule-kind", ["stages.pretrain-1.schedule.kind=cosine"], "stages.pretrain-1.schedule.kind",
         "is not one of 'power'"),
    case("dtype", ["stages.pretrain-1.precision.dtype=fp16"], "stages.pretrain-1.precision.dtype",
         "is not one of 'fp32', 'bf16'"),
    case("merge-method", ["stages.merge-2.method=dare"], "stages.merge-2.method", "is not one of 'linear'"),
    case("device", ["cluster.device=tpu"], "cluster.device", "is not one of 'cpu', 'cuda'"),
    case("generator", ["stages.data.sources.web.generator=poetry"], "stages.data.sources.web.generator",
         "is not one of 'web'"),
    case("rl-task", ["stages.rl-math.task=poetry"], "stages.rl-math.task", "is not one of 'math'"),
    # --- references: missing stages, parents of the wrong kind, cycles
    case("extension-source", ["stages.extend-2.mixture.books=5"], "stages.extend-2.mixture.books",
         "known sources: chat"),
    case("eval-from-data", ["stages.eval-pretrain.from=tokenize"], "stages.eval-pretrain.from",
         "is not a model stage"),
    case("eval-data-wrong-kind", ["stages.eval-pretrain.data=data"], "stages.eval-pretrain.data",
         "is not a tokenize stage"),
    case("phase-from-data", ["stages.pretrain-2.from=tokenize"], "stages.pretrain-2.from",
         "is not a pretrain stage"),
    case("phase-data-wrong-kind", ["stages.pretrain-1.data=tokenizer"], "stages.pretrain-1.data",
         "is not a tokenize stage"),
    case("tokenize-wrong-tokenizer", ["stages.tokenize.tokenizer=data"], "stages.tokenize.tokenizer",
         "is not a train_tokenizer stage"),
    case("sft-from-data", ["stages.sft.from=tokenize"], "stages.sft.from", "is not a model stage"),
    case("sft-data-wrong-kind", ["stages.sft.data=data"], "stages.sft.data", "is not a curate stage"),
    case("curate-judge-data", ["stages.curate.judge.serve=tokenize"], "stages.curate.judge.serve",
         "is not a model stage"),
    case("curate-judge-missing", ["stages.curate.judge.serve=nope"], "stages.curate.judge.serve",
         "unknown stage 'nope'"),
    case("curate-judge-both", ["+stages.curate.judge.endpoint=http://127.0.0.1:8000"],
         "stages.curate.judge", "exactly one of"),
    case("curate-rule-bound", ["stages.curate.rules.min_tokens=0"], "stages.curate.rules.min_tokens",
         ">= 1"),
    case("rl-from-curate", ["stages.rl-code.from=curate"], "stages.rl-code.from", "is not a model stage"),
    case("merge-base-missing", ["stages.merge-2.base=nope"], "stages.merge-2.base", "unknown stage 'nope'"),
    case("merge-base-data", ["stages.merge-1.base=tokenize"], "stages.merge-1.base", "is not a model stage"),
    case("own-parent", ["stages.pretrain-2.from=pretrain-2"], "stages.pretrain-2.from",
         "cannot be its own parent"),
    case("parent-empty-string", ["stages.pretrain-1.data=''"], "stages.pretrain-1.data", "unknown stage ''"),
    case("cycle-through-merges", ["stages.extend-1.from=merge-2"], "stages: cycle extend-1 -> merge-2",
         "must point to an earlier stage"),
    # --- shapes, parallelism and hardware
    case("phase-shape", ["stages.pretrain-2.model.hidden_size=128"], "stages.pretrain-2.model",
         "differs from the model of parent 'pretrain-1' (hidden_size: 128 vs 64)"),
    case("extension-shape", ["stages.extend-2.model.num_layers=3"], "stages.extend-2.model",
         "(num_layers: 3 vs 2)"),
    case("groups-not-dividing-heads", ["model.num_query_groups=3"], "model.num_query_groups", "pick a divisor"),
    case("tp-not-dividing-heads", ["cluster.tensor_parallel=4"], "cluster.tensor_parallel",
         "use one of [1, 2]"),
    case("batch-not-divisible-by-dp", ["cluster.data_parallel=3"], "stages.pretrain-1.global_batch_size",
         "not divisible by"),
    case("fp8-extension-on-cpu", ["stages.extend-1.precision.fp8=mxfp8"], "stages.extend-1.precision.fp8",
         "set stages.extend-1.precision.fp8=none"),
    case("tokenizer-vocab-above-model", ["stages.tokenizer.vocab_size=2048"],
         "stages.pretrain-1.model.vocab_size", "raise it"),
    # --- merges
    case("merge-linear-with-base", ["stages.merge-1.method=linear"], "stages.merge-1.base", "drop base"),
    case("merge-density-without-ties", ["stages.merge-1.density=0.5"], "stages.merge-1.density",
         "set method=ties"),
    case("merge-ties-density-zero", ["stages.merge-1.method=ties", "stages.merge-1.density=0"],
         "stages.merge-1.density", "must be in (0, 1]"),
    case("merge-parent-twice", ["stages.merge-1.from=[extend-1,extend-1]"], "stages.merge-1.from",
         "listed twice"),
    case("merge-zero-weights", ["stages.merge-1.weights=[0.0,0.0]"], "stages.merge-1.weights", "positive sum"),
    # --- override syntax, interpolations, --only / --rerun, sweeps
    case("unclosed-brace", ["stages.pretrain-1.mixture={web: 1.0"], "stages.pretrain-1.mixture",
         "does not parse"),
    case("no-value", ["stages.pretrain-1.tokens"], "stages.pretrain-1.tokens", "key=value"),
    case("no-key", ["=5"], "override", "write key=value"),
    case("sweep-without-m", ["stages.pretrain-1.schedule.lr=1e-3,2e-3"], "stages.pretrain-1.schedule.lr",
         "forge run -m"),
    case("interpolation-missing", ["stages.pretrain-1.tokens=${nope}"], "stages.pretrain-1.tokens",
         "Interpolation key 'nope' not found"),
    case("env-missing", ["store=${oc.env:FORGE_NO_SUCH_VARIABLE}"], "store", "FORGE_NO_SUCH_VARIABLE"),
    case("only-bad-regex", ["--only", "(pretrain"], "--only '(pretrain'", "not a valid regular expression"),
    case("only-matches-nothing", ["--only", "pretrain-9"], "--only 'pretrain-9'", "matches no stage"),
    case("run-rerun-unknown", ["--rerun", "pretrain-9"], "--rerun pretrain-9", "no such stage", "run"),
    case("run-bad-value", ["stages.data.sources.web.documents=0"], "stages.data.sources.web.documents",
         "must be > 0", "run"),
    # a sweep whose second value is bad: every combination is validated before the first one runs
    case("run-sweep-one-bad", ["-m", "stages.pretrain-1.schedule.lr=1e-3,-1"],
         "stages.pretrain-1.schedule.lr", "must be > 0", "run"),
    case("run-unknown-option", ["pipeline=nope"], "pipeline", "options: ", "run"),
    # --- broken YAML files
    case("yaml-missing-kind", ["pipeline=broken-nokind"], "stages.tokenize.kind", "missing; one of"),
    case("yaml-syntax", ["pipeline=broken-syntax"], "{conf}/pipeline/broken-syntax.yaml, line",
         "expected ',' or ']'"),
    case("yaml-duplicate-key", ["pipeline=broken-dupkey"], "{conf}/pipeline/broken-dupkey.yaml, line",
         "found duplicate key vocab_size"),
    case("yaml-duplicate-stage", ["pipeline=broken-dupstage"], "{conf}/pipeline/broken-dupstage.yaml, line",
         "found duplicate key tokenize"),
    case("yaml-tab", ["pipeline=broken-tab"], "{conf}/pipeline/broken-tab.yaml, line", "cannot start any token"),
    case("yaml-undefined-anchor", ["pipeline=broken-alias"], "{conf}/pipeline/broken-alias.yaml, line",
         "undefined alias 'phse'"),
    case("yaml-stage-is-list", ["pipeline=broken-listbody"], "stages.tokenize",
         "expected a mapping with a `kind`"),
    case("yaml-stage-is-null", ["pipeline=broken-nullbody"], "stages.tokenize", "got None"),
    case("yaml-stage-name", ["pipeline=broken-badname"], "stages.my stage", "rename it"),
    case("yaml-stages-is-list", ["pipeline=broken-stageslist"], "stages", "expected a mapping of stage name"),
    case("yaml-no-stages", ["pipeline=broken-nostages"], "stages", "declares no stages"),
    case("yaml-empty-file", ["pipeline=broken-empty"], "pipeline", "# @package _global_"),
    case("yaml-unknown-top-level", ["pipeline=broken-toplevel"], "retries", "unknown top-level field"),
    case("yaml-cycle", ["pipeline=broken-cycle"], "stages: cycle pretrain-2 -> pretrain-4",
         "must point to an earlier stage"),
    case("yaml-from-missing-stage", ["pipeline=broken-from"], "stages.pretrain-2.from", "unknown stage 'pretrain-0'"),
    case("yaml-bad-interpolation", ["pipeline=broken-interp"], "_phase.model", "Interpolation key 'modle'"),
    case("yaml-scalar-mixture", ["pipeline=broken-scalarmix"], "stages.pretrain-1.mixture", "expected a mapping"),
    case("yaml-model-is-list", ["model=broken-list"], "model", "expected a mapping of fields"),
    case("yaml-model-string-int", ["model=broken-str"], "model.hidden_size", "expected an integer"),
    case("yaml-cluster-unknown-key", ["cluster=broken-key"], "cluster.gpus", "Known fields: accelerator"),
    # --- optimizer, model and layout ranges; the compute plan (stages/training/compute.py)
    case("rope-theta-zero", ["model.rope_theta=0"], "model.rope_theta", "must be > 0"),
    case("norm-eps-negative", ["model.layernorm_epsilon=-1"], "model.layernorm_epsilon", "must be > 0"),
    case("init-std-negative", ["model.init_std=-1"], "model.init_std", "must be > 0"),
    case("adam-beta1-above-one", ["stages.pretrain-2.adam_beta1=1.5"], "stages.pretrain-2.adam_beta1",
         "must be in [0, 1)"),
    case("adam-eps-zero", ["stages.pretrain-1.adam_eps=0"], "stages.pretrain-1.adam_eps", "must be > 0"),
    case("weight-decay-negative", ["stages.pretrain-1.weight_decay=-1"], "stages.pretrain-1.weight_decay",
         "must be >= 0"),
    case("grad-clip-negative", ["stages.pretrain-3.grad_clip=-1"], "stages.pretrain-3.grad_clip", "must be >= 0"),
    case("log-interval-zero", ["stages.pretrain-1.log_interval=0"], "stages.pretrain-1.log_interval",
         "must be >= 1"),
    case("sweep-syntax-names-the-override", ["-m", "stages.pretrain-1.tokens=1,["],
         "stages.pretrain-1.tokens", "bad override", command="run"),
    case("stage-layout-unknown-key", ["stages.extend-1.parallel={tensor_paralel: 2}"],
         "stages.extend-1.parallel.tensor_paralel", "unknown; a stage may set tensor_parallel"),
    case("stage-layout-zero", ["stages.extend-1.parallel={data_parallel: 0}"],
         "stages.extend-1.parallel.data_parallel", "must be an integer >= 1"),
    case("micro-batch-does-not-divide", ["stages.pretrain-1.micro_batch_size=5"],
         "stages.pretrain-1.micro_batch_size", "does not divide the batch per data-parallel rank"),
    case("accelerator-unknown", ["cluster.accelerator=tpu"], "cluster.accelerator", "unknown 'tpu'"),
    case("bf16-on-cpu", ["stages.pretrain-2.precision.dtype=bf16"], "stages.pretrain-2.precision.dtype",
         "set stages.pretrain-2.precision.dtype=fp32 here"),
    case("mfu-above-one", ["cluster.mfu=1.5"], "cluster.mfu", "must be in (0, 1]"),
    case("stage-does-not-fit", ["cluster.memory_gib=0.001", "--only", "pretrain-1"], "stages.pretrain-1",
         "does not fit",
         command="run"),
]


@pytest.fixture(scope="module")
def conf_dir(tmp_path_factory) -> Path:
    """A copy of conf/ with the broken files of BROKEN_FILES added."""
    conf = tmp_path_factory.mktemp("forge") / "conf"
    shutil.copytree(ROOT / "conf", conf)
    for name, (source, old, new) in BROKEN_FILES.items():
        text = new
        if source is not None:
            text = (conf / f"{source}.yaml").read_text()
            assert old in text, f"{source}.yaml changed: update BROKEN_FILES[{name!r}]"
            text = text.replace(old, new, 1)
        (conf / f"{name}.yaml").write_text(text)
    return conf


@pytest.fixture
def store(tmp_path, monkeypatch, conf_dir) -> Path:
    """A store holding earlier work (a finished stage and a note), selected through FORGE_STORE."""
    monkeypatch.setattr(config_mod, "CONF_DIR", conf_dir)
    store = tmp_path / "store"
    done = store / "pretrain-1-0123456789ab"
    (done / "checkpoints" / "iter_0000010").mkdir(parents=True)
    (done / "checkpoints" / "iter_0000010" / "done").write_text("")
    (done / "artifact.json").write_text('{"kind": "pretrain", "stage": "pretrain-1"}')
    (store / "keep.txt").write_text("earlier work")
    old = time.time() - 3600  # an hour old: a rewrite, even of the same bytes, shows in the mtime
    for p in [store, *store.rglob("*")]:
        os.utime(p, (old, old))
    monkeypatch.setenv("FORGE_STORE", str(store))
    return store


def snapshot(store: Path) -> dict:
    """Every path under the store (and the store itself) with its kind, bytes and mtime."""
    return {str(p.relative_to(store)): (p.is_dir(), p.read_bytes() if p.is_file() else b"",
                                        p.stat().st_mtime_ns) for p in [store, *store.rglob("*")]}


@pytest.mark.parametrize("command,overrides,field,hint", CASES)
def test_malformed_input_is_rejected_before_compute(command, overrides, field, hint, store, conf_dir,
                                                    capsys):
    before = snapshot(store)
    code = cli.main([command, *overrides])
    out, err = capsys.readouterr()
    assert code == 2, f"exit {code}\n--- stdout\n{out}\n--- stderr\n{err}"
    assert "Traceback" not in err
    assert err.startswith("forge: invalid configuration: "), err
    message = err.removeprefix("forge: invalid configuration: ")
    assert message.startswith(field.format(conf=conf_dir)), message   # names the field first
    assert hint in message, message                                    # and says what is wrong / to do
    assert "from_" not in message                                      # YAML names, not Python's
    assert err.rstrip().endswith("Nothing was run and nothing was changed.")
    assert snapshot(store) == before                                   # nothing created, changed or lost


def test_the_corpus_is_large_and_uses_every_broken_file():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 140   # docs/faults.md says 140+
    used = {o for c in CASES for o in c.values[1]}
    assert {n.replace("/", "=") for n in BROKEN_FILES} <= used
