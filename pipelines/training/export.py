"""The run's exports (layout in `pipelines.export_layout`): at every export step the trained stage as a
`stages` checkpoint in `export/<step>/<kind>/` with `export.json`, the companion checkpoints it was trained
against (text encoder, Stage A / B) copied once into `export/companions/`, then `export/latest.json`.
`python -m pipelines.generate --checkpoints <run dir>/export` runs on the latest export, and
`--checkpoints <run dir>/export/<step>` on any earlier one.
"""

from __future__ import annotations

import os
import tempfile
from typing import Optional

import stages
from pipelines import export_layout, storage
from pipelines.training.config import RunPlan


def _copy_tree(source: str, target: str) -> None:
    for path in storage.list_files(source):
        storage.write_bytes(storage.join(target, storage.basename(path)), storage.read_bytes(path))


def write_export(kind: str, module, root: str, step: int, *, ema: bool, plan: RunPlan,
                 trained_with: Optional[dict] = None) -> str:
    """`<root>/<step>/<kind>/` + export.json, the companions (once per source), then latest.json; returns
    the step's directory. `trained_with`: more modules trained in the same run ({kind: module}, e.g. Stage B's
    fine-tuned Semantic Compressor), each written as `<root>/<step>/<its kind>/`."""
    target = export_layout.step_dir(root, step)
    parts = {kind: module, **(trained_with or {})}
    with tempfile.TemporaryDirectory(prefix="wurst-export-") as tmp:
        for name, part in parts.items():
            stages.save(part, os.path.join(tmp, name))
            _copy_tree(os.path.join(tmp, name), storage.join(target, name))
    copied = {}
    for name, source in plan.companions.items():
        shared = storage.join(export_layout.companions_dir(root), name)
        marker = storage.join(shared, ".source.json")
        # Copied once per source: a 1-2 GB text encoder is not rewritten at every export.
        if not (storage.exists(marker) and storage.read_json(marker).get("source") == source):
            _copy_tree(source, shared)
            storage.write_json(marker, {"source": source})
        copied[name] = source
    storage.write_json(storage.join(target, export_layout.EXPORT_RECORD), {
        "run_name": plan.run_name, "stage": plan.stage, "step": step, "weights": "ema" if ema else "model",
        "kind": kind, "trained_with": sorted(trained_with or {}), "companions": copied,
        "companions_dir": f"../{export_layout.COMPANIONS}",
        "mlflow_run_id": plan.mlflow_run_id, "input": plan.input_uri,
    })
    export_layout.set_latest(root, step)
    return target
