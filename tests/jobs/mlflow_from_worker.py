"""A Ray job for tests/test_cluster_mlflow.py: the doctor phase logs its run to the cluster's MLflow server,
then a Ray task pinned to another node (a worker the way a training worker runs) logs a metric into the
same run. Both use only what the nodes' environment gives them (MLFLOW_TRACKING_URI / _USERNAME / _PASSWORD).
Prints one JSON line: the run id and the node the task ran on."""

import json

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from pipelines import doctor


@ray.remote(num_cpus=0)
def log_from_worker(run_id: str) -> dict:
    import os

    from mlflow.tracking import MlflowClient

    MlflowClient().log_metric(run_id, "worker.logged", 1.0)
    return {"node_id": ray.get_runtime_context().get_node_id(),
            "has_credentials": bool(os.environ.get("MLFLOW_TRACKING_USERNAME") and os.environ.get("MLFLOW_TRACKING_PASSWORD"))}


def main() -> None:
    report = doctor.main([])
    run_id = report["mlflow_run_id"]
    here = ray.get_runtime_context().get_node_id()
    others = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["NodeID"] != here]
    target = others[0] if others else here
    result = ray.get(log_from_worker.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=target, soft=False)).remote(run_id))
    print("RESULT " + json.dumps({"run_id": run_id, "driver_node": here, **result}), flush=True)


if __name__ == "__main__":
    main()
