"""The layout of a training run's exports (no torch: the precompute and generate sides read it too).

    <run dir>/export/
        <step>/            one export per export step (9-digit step): <kind>/ (the trained stage, a stages
                           checkpoint) and export.json (which names the companions below)
        companions/<name>/ the checkpoints the run was trained against (text, stage_a, ...), copied once
        latest.json        {"step": N, "dir": "<step>"}: the newest complete export (written last)

`resolve_checkpoint` turns the paths researchers and configs write, `<run>/export/<kind>` ("the latest
export's weights") and `<run>/export/<step>/<companion>`, into the stages checkpoint directory itself;
any other path is returned unchanged.
"""

from __future__ import annotations

from typing import Optional

from pipelines import storage

LATEST = "latest.json"
COMPANIONS = "companions"
EXPORT_RECORD = "export.json"


def step_name(step: int) -> str:
    return f"{step:09d}"


def step_dir(root: str, step: int) -> str:
    return storage.join(root, step_name(step))


def companions_dir(root: str) -> str:
    return storage.join(root, COMPANIONS)


def set_latest(root: str, step: int) -> None:
    storage.write_json(storage.join(root, LATEST), {"step": step, "dir": step_name(step)})


def latest_step(root: str) -> Optional[int]:
    path = storage.join(root, LATEST)
    return int(storage.read_json(path)["step"]) if storage.exists(path) else None


def latest_dir(root: str) -> Optional[str]:
    """The newest complete export under an export root (None: not an export root, or nothing exported yet)."""
    path = storage.join(root, LATEST)
    return storage.join(root, storage.read_json(path)["dir"]) if storage.exists(path) else None


def steps(root: str) -> list[int]:
    """Steps of the exports under `root`, ascending."""
    if not storage.exists(root):
        return []
    return sorted(int(storage.basename(d)) for d in storage.list_dirs(root) if storage.basename(d).isdigit())


def export_set(uri: str) -> str:
    """An export root resolves to its latest export; anything else (an `<step>/` dir) is returned as is."""
    return latest_dir(uri) or uri


def component_dir(export_dir: str, name: str) -> str:
    """Component `name` of one export: its own `<name>/`, else the run's copy under companions/."""
    own = storage.join(export_dir, name)
    if storage.exists(storage.join(own, "config.json")):
        return own
    parent = storage.parent(export_dir)
    shared = storage.join(companions_dir(parent), name)
    return shared if storage.exists(storage.join(shared, "config.json")) else own


def export_record(checkpoint: str) -> Optional[dict]:
    """export.json of the export a stages checkpoint directory `<run>/export/<step>/<kind>` belongs to (the
    step, stage and run it was written at); None for a checkpoint that is not part of a run's export."""
    parent = storage.parent(checkpoint)
    path = storage.join(parent, EXPORT_RECORD) if parent else None
    return storage.read_json(path) if path and storage.exists(path) else None


def resolve_checkpoint(uri: str) -> str:
    """A stages checkpoint directory for `uri` (see the module docstring)."""
    uri = storage.normalize(uri)
    if storage.exists(storage.join(uri, "config.json")):
        return uri
    parent, name = storage.parent(uri), storage.basename(uri)
    if not parent or not name or parent == uri:
        return uri
    latest = latest_dir(parent)
    if latest is not None:  # <root>/<kind>: the latest export's
        return component_dir(latest, name)
    if storage.exists(storage.join(parent, EXPORT_RECORD)):  # <root>/<step>/<companion>
        return component_dir(parent, name)
    return uri
