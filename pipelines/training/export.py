"""The run's export, `<run dir>/export/`: the trained stage as a `stages` checkpoint (`<kind>/`), copies of
the companion checkpoints it was trained against (text encoder, Stage A / B), and `export.json`. The
directory is a complete set for `python -m pipelines.generate --checkpoints <run dir>/export`.
"""

from __future__ import annotations

import os
import tempfile

import stages
from pipelines import storage
from pipelines.training.config import RunPlan


def _copy_tree(source: str, target: str) -> None:
    for path in storage.list_files(source):
        storage.write_bytes(storage.join(target, storage.basename(path)), storage.read_bytes(path))


def write_export(kind: str, module, export_uri: str, step: int, *, ema: bool, plan: RunPlan) -> None:
    """<export>/<kind>/ (stages checkpoint) + copies of the companion checkpoints + export.json."""
    with tempfile.TemporaryDirectory(prefix="wurst-export-") as tmp:
        stages.save(module, os.path.join(tmp, kind))
        _copy_tree(os.path.join(tmp, kind), storage.join(export_uri, kind))
    copied = {}
    for name, source in plan.companions.items():
        target = storage.join(export_uri, name)
        marker = storage.join(target, ".source.json")
        # Copy once per source: a 1-2 GB text encoder is not rewritten at every export.
        if not (storage.exists(marker) and storage.read_json(marker).get("source") == source):
            _copy_tree(source, target)
            storage.write_json(marker, {"source": source})
        copied[name] = source
    storage.write_json(storage.join(export_uri, "export.json"), {
        "run_name": plan.run_name, "stage": plan.stage, "step": step, "weights": "ema" if ema else "model",
        "kind": kind, "companions": copied, "mlflow_run_id": plan.mlflow_run_id, "input": plan.input_uri,
    })
