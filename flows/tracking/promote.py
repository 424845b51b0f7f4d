"""`forge promote STAGE --alias A OVERRIDES`: point a registry alias at a stage's current model."""
from __future__ import annotations

import sys

from flows.config import load
from flows.dag import build
from flows.tracking.lineage import lineage_for
from flows.tracking.registry import NotRegistered, promote


def promote_stage(overrides: list[str], stage: str, alias: str) -> int:
    """`forge promote STAGE --alias A OVERRIDES`: the stage's key comes from the same config as
    the run's, so the alias lands on the version that config produced."""
    from mlflow.exceptions import MlflowException

    dag = build(load(overrides))
    node = dag.nodes.get(stage)
    models = [n for n, nd in dag.nodes.items() if nd.kind_cls.makes_model]
    if node is None or not node.kind_cls.makes_model:
        why = "no such stage" if node is None else f"a {node.kind} stage makes no model"
        print(f"forge: promote {stage}: {why}; model stages: {', '.join(models)}", file=sys.stderr)
        return 2
    client = lineage_for(dag.pipeline.tracking_uri, dag.pipeline.tracking.experiment).client
    try:
        v = promote(client, dag.pipeline.name, stage, node.key, alias)
    except NotRegistered as e:
        print(f"forge: {e}", file=sys.stderr)
        return 1
    except MlflowException as e:  # e.g. an alias MLflow reserves (latest, v3)
        print(f"forge: promote {stage} --alias {alias}: {e.message}", file=sys.stderr)
        return 1
    print(f"{v.name} version {v.version} (stage {stage}, key {node.key[:12]}, run {v.run_id}) "
          f"is now @{alias}\n  load it as models:/{v.name}@{alias}")
    return 0
