"""`forge lineage STAGE`: walk MLflow from a stage's run back through its parents to the data."""
from __future__ import annotations

import json

from flows.dag import Dag
from flows.tracking.lineage import TAG_KEY, lineage_for


def print_lineage(dag: Dag, stage: str) -> int:
    if stage not in dag.nodes:
        print(f"forge: no stage {stage!r}; stages: {', '.join(dag.nodes)}")
        return 2
    lineage = lineage_for(dag.pipeline.tracking_uri, dag.pipeline.tracking.experiment)
    seen: set[str] = set()

    def walk(key: str, depth: int) -> bool:
        pad = "  " * depth
        runs = lineage.client.search_runs([lineage.experiment_id], f"tags.`{TAG_KEY}` = '{key}'",
                                          max_results=1, order_by=["attributes.start_time ASC"])
        if not runs:
            print(f"{pad}? key {key[:12]}: no MLflow run records it (run the stage first)")
            return False
        run = lineage.client.get_run(runs[0].info.run_id)  # search results omit model inputs/outputs
        tags = run.data.tags
        if key in seen:
            print(f"{pad}{tags.get('forge.stage')} (see above)")
            return True
        print(f"{pad}{tags.get('forge.stage')} [{tags.get('forge.kind')}] key {key[:12]} "
              f"run {run.info.run_id} commit {tags.get('mlflow.source.git.commit', '?')[:10]}")
        seen.add(key)
        for out in (run.outputs.model_outputs if run.outputs else []):
            model = lineage.client.get_logged_model(out.model_id)
            print(f"{pad}  model {model.model_id} -> {model.tags.get('forge.uri')}")
        for d in (run.inputs.dataset_inputs if run.inputs else []):
            src = json.loads(d.dataset.source).get("uri", d.dataset.source)
            print(f"{pad}  data  {d.dataset.name} digest {d.dataset.digest[:16]} {src}")
        for parent, pkey in json.loads(tags.get("forge.parent_keys", "{}")).items():
            walk(pkey, depth + 1)
        return True

    return 0 if walk(dag.nodes[stage].key, 0) else 1
