"""Validation of extend_context, merge and evaluate stages before any compute (issue 3)."""
from __future__ import annotations

import pytest

from flows import config as config_mod
from flows.dag import build
from stages.training.extend_context import ExtendContextConfig
from stages.models.merge import MergeConfig
from stages.models.merge import mergekit_config
from stages.schema import ConfigError, identity_field_paths


def dag_for(*overrides):
    return build(config_mod.load(list(overrides)))


@pytest.mark.parametrize("overrides, message", [
    # a merge whose parents have different shapes
    (["++stages.odd.kind=pretrain", "++stages.odd.data=tokenize",
      "++stages.odd.model={hidden_size: 128, num_layers: 2, num_attention_heads: 4, "
      "num_query_groups: 2, kv_channels: 16, ffn_hidden_size: 176, vocab_size: 1024, "
      "max_position_embeddings: 512}", "++stages.odd.tokens=100000", "++stages.odd.seq_length=128",
      "++stages.odd.global_batch_size=8", "++stages.odd.mixture={web: 1.0}",
      "++stages.odd.schedule={kind: constant, lr: 0.001}", "stages.merge-1.from=[extend-1,odd]"],
     "stages.merge-1.from: 'extend-1' and 'odd' have different shapes (hidden_size: 64 vs 128)"),
    # a merge whose parents have different vocabularies (another tokenizer)
    (["++stages.tok2.kind=train_tokenizer", "++stages.tok2.data=data", "++stages.tok2.vocab_size=512",
      "++stages.tokenize2.kind=tokenize", "++stages.tokenize2.data=data",
      "++stages.tokenize2.tokenizer=tok2", "stages.extend-1.data=tokenize2",
      "stages.eval-extend-1.data=tokenize2"],
     "'extend-1' and 'pretrain-4' use different tokenizers ('tok2' vs 'tokenizer')"),
    (["stages.extend-2.seq_length=256"],
     "stages.extend-2.seq_length: 256 is not longer than the context of parent 'merge-1' (256)"),
    (["stages.extend-1.seq_length=128"],
     "stages.extend-1.seq_length: 128 is not longer than the context of parent 'pretrain-4' (128)"),
    (["cluster.context_parallel=3"],
     "cluster.context_parallel: stages.pretrain-1.seq_length=128 is not divisible by 2 x "
     "context_parallel = 6"),
    (["cluster.context_parallel=2"],
     "cluster.context_parallel: context parallelism needs Transformer Engine's ring attention"),
    (["stages.merge-1.from=[extend-1,no-such-stage]"],
     "stages.merge-1.from: unknown stage 'no-such-stage'"),
    (["stages.extend-1.from=nowhere"], "stages.extend-1.from: unknown stage 'nowhere'"),
    (["stages.eval-merge-1.from=nowhere"], "stages.eval-merge-1.from: unknown stage 'nowhere'"),
    (["stages.merge-1.from=[extend-1,tokenize]"], "stages.merge-1.from[1]: 'tokenize' is not a model stage"),
    (["stages.extend-1.rope_theta=200.0"], "stages.extend-1.rope_theta: 200 is below the theta of parent 'pretrain-4' (300)"),
    (["stages.merge-1.base=null"], "stages.merge-1.base: method 'task_arithmetic' needs a base"),
    (["stages.merge-1.from=[extend-1]"], "stages.merge-1.from: a merge needs two or more parents"),
    (["stages.merge-1.weights=[1.0]"], "stages.merge-1.weights: 1 weights for 2 parents"),
    (["stages.merge-1.method=slerp", "stages.merge-1.base=merge-2"],
     "stages.merge-1.from: slerp merges exactly two parents, one of which is `base`"),
    (["stages.extend-1.model={hidden_size: 64, num_layers: 3, num_attention_heads: 4, "
      "num_query_groups: 2, kv_channels: 16, ffn_hidden_size: 176, vocab_size: 1024}"],
     "stages.extend-1.model: differs from the model of parent 'pretrain-4' (num_layers: 3 vs 2)"),
    (["stages.eval-pretrain.depths=[0.5,1.5]"], "stages.eval-pretrain.depths: need values in [0, 1]"),
])
def test_bad_long_context_input_is_rejected_before_compute(overrides, message):
    with pytest.raises(ConfigError) as e:
        dag_for(*overrides)
    assert message in str(e.value)


def test_tiny_and_full_recipes_chain_extensions_merges_and_evals():
    for pipeline in ("granite-4.1-tiny", "granite-4.1"):
        dag = dag_for(f"pipeline={pipeline}")
        configs = dag.graph
        lengths = [configs.context_length_of(f"merge-{i}") for i in (1, 2, 3)]
        thetas = [configs.model_of(f"merge-{i}").rope_theta for i in (1, 2, 3)]
        assert lengths == sorted(lengths) and len(set(lengths)) == 3, pipeline
        assert thetas == sorted(thetas) and len(set(thetas)) == 3, pipeline
        for i in (1, 2, 3):  # evaluated before and after each extension and each merge
            assert dag.nodes[f"eval-extend-{i}"].parents[0] == f"extend-{i}"
            assert dag.nodes[f"eval-merge-{i}"].parents[0] == f"merge-{i}"
            assert set(dag.nodes[f"merge-{i}"].parents) == {f"extend-{i}", configs[f"extend-{i}"].from_}


def test_extension_model_takes_theta_and_length_but_keeps_its_shape():
    dag = dag_for()
    ext = dag.nodes["extend-2"].config
    assert isinstance(ext, ExtendContextConfig)
    assert (ext.run_model.rope_theta, ext.run_model.max_position_embeddings) == (ext.rope_theta, 384)
    assert ext.run_model.hidden_size == ext.model.hidden_size
    # extension-only identity fields, on top of the pretrain ones
    assert {"rope_theta", "document_mask"} <= set(identity_field_paths(ExtendContextConfig))
    # theta change -> new key for the extension and everything downstream only
    before, after = dag_for(), dag_for("stages.extend-2.rope_theta=1200.0")
    changed = {n for n in before.nodes if before.nodes[n].key != after.nodes[n].key}
    assert {"extend-2", "merge-2", "extend-3", "eval-merge-3"} <= changed
    assert not changed & {"pretrain-4", "extend-1", "merge-1", "eval-merge-1"}


def test_mergekit_documents_follow_the_config():
    paths = {"a": "/m/a", "b": "/m/b", "base": "/m/base"}
    lin = mergekit_config(MergeConfig(from_=("a", "b"), weights=(3.0, 1.0)), paths)
    assert lin["merge_method"] == "linear"
    assert [m["parameters"]["weight"] for m in lin["models"]] == [0.75, 0.25]
    ta = mergekit_config(MergeConfig(from_=("a", "base"), method="task_arithmetic", base="base",
                                     weights=(0.6, 0.4)), paths)
    assert ta["base_model"] == "/m/base"
    assert ta["models"] == [{"model": "/m/a", "parameters": {"weight": 0.6}}]  # base: no task vector
    sl = mergekit_config(MergeConfig(from_=("a", "base"), method="slerp", base="base",
                                     weights=(1.0, 3.0)), paths)
    assert sl["parameters"] == {"t": 0.25}


def test_a_dict_override_replaces_the_yaml_dict():
    """`mixture={...}` on the command line is the whole mixture (Hydra alone would merge it)."""
    dag = dag_for("stages.extend-1.mixture={long: 50.0, web: 50.0}")
    assert dag.nodes["extend-1"].config.mixture == {"long": 50.0, "web": 50.0}
    assert dag.nodes["extend-2"].config.mixture["technical"] == 10.0  # others keep the YAML's


def test_document_mask_on_gpus_is_refused_before_compute(capsys, tmp_path, monkeypatch):
    """On GPUs the mask would silently become cross-document attention (no THD packing yet) under
    a key that says document_mask: true: `forge plan` refuses it, and its fix plans."""
    from flows import cli
    monkeypatch.setenv("FORGE_STORE", str(tmp_path / "store"))
    assert cli.main(["plan", "cluster=gpu-node"]) == 2
    err = capsys.readouterr().err
    assert ("stages.extend-1.document_mask: document masking is built for the CPU backend only; "
            "on GPUs (cluster.device=cuda) it needs THD packing") in err
    assert "set stages.extend-1.document_mask=false on GPUs" in err
    fix = [*(f"stages.extend-{i}.document_mask=false" for i in (1, 2, 3)),
           "stages.sft.document_mask=false"]
    assert cli.main(["plan", "cluster=gpu-node", *fix]) == 0, capsys.readouterr().err
    assert dag_for().nodes["extend-1"].config.document_mask  # the CPU backend keeps it
    assert not (tmp_path / "store").exists()
