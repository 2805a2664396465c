"""Lineage: output versions derived from config + input, and the manifest every phase writes.

`<output root>/<version>/manifest.json` records the phase, the resolved (redacted) config, the
input URI and the hash of the input's manifest, the code version, counts and shapes, and the
MLflow run id. A version is a short hash of (phase, output-affecting config, input identity), so a
rerun with the same config lands in the same directory (no-op or resume) and a changed config never
overwrites an earlier result.
"""

from __future__ import annotations

import datetime as _dt
import functools
import hashlib
import json
import os
import subprocess
from typing import Any

from pipelines import config as config_lib
from pipelines import storage

MANIFEST = "manifest.json"


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """Git commit of the checkout (with -dirty), or the package version when not in git."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "-C", here, "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return f"wurst-{version('wurst')}"
    except Exception:  # noqa: BLE001 - best effort
        return "unknown"


def hash_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def manifest_path(dataset_uri: str) -> str:
    return storage.join(dataset_uri, MANIFEST)


def has_manifest(dataset_uri: str) -> bool:
    return storage.exists(manifest_path(dataset_uri))


def read(dataset_uri: str) -> dict:
    path = manifest_path(dataset_uri)
    if not storage.exists(path):
        raise FileNotFoundError(
            f"{dataset_uri}: no {MANIFEST}; is this a finished output of the previous phase? "
            f"(a phase writes its manifest last, so a missing one means it did not complete)"
        )
    return storage.read_json(path)


def earlier_versions(root: str, version: str, match) -> list[str]:
    """The complete versions under `root` (every one but `version`) whose manifest satisfies `match`, oldest
    first (then by name): the pools that re-filtered versions reuse downloads, latents and hashes from."""
    found = []
    for directory in storage.list_dirs(root):
        if storage.basename(directory) == version or not has_manifest(directory):
            continue
        try:
            manifest = read(directory)
        except (OSError, ValueError):
            continue
        if match(manifest):
            found.append((str(manifest.get("created_at", "")), directory))
    return [d for _, d in sorted(found)]


def manifest_hash(dataset_uri: str) -> str:
    """sha256 of an input dataset's manifest.json (the lineage link)."""
    return hash_bytes(storage.read_bytes(manifest_path(dataset_uri)))


def input_identity(input_uri: str) -> str:
    """Identity of an input: its manifest hash if it is one of our datasets, else a hash of the
    file listing (names + sizes + mtimes), e.g. for raw LAION parquet."""
    if storage.is_dir(input_uri) and has_manifest(input_uri):
        return "manifest:" + manifest_hash(input_uri)
    files = storage.list_files(input_uri, recursive=True)
    listing = []
    for f in files:
        info = storage.file_info(f)
        listing.append([f, info.size, info.mtime_ns or 0])
    return "listing:" + hash_bytes(json.dumps(listing).encode())


def version_id(phase: str, cfg: Any, input_id: str, exclude: tuple[str, ...] = ()) -> str:
    """Short, deterministic version name for a phase's output."""
    digest = config_lib.config_hash(cfg, exclude=exclude)
    return hash_bytes(f"{phase}|{digest}|{input_id}".encode())[:12]


def save_config(dataset_uri: str, resolved: dict) -> None:
    """The resolved config next to the output, secrets redacted."""
    import yaml

    storage.write_text(storage.join(dataset_uri, "config.yaml"),
                       yaml.safe_dump(config_lib.redact(resolved), sort_keys=False))


def write(dataset_uri: str, *, phase: str, cfg: Any, input_uri: str | None, input_id: str | None,
          counts: dict, extra: dict | None = None, mlflow_run_id: str | None = None) -> dict:
    """Write `manifest.json` last, atomically: its presence marks the dataset complete."""
    resolved = config_lib.to_dict(cfg) if not isinstance(cfg, dict) else cfg
    manifest = {
        "phase": phase,
        "version": storage.basename(dataset_uri),
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "code_version": code_version(),
        "input": {"uri": config_lib.redact_text(input_uri) if input_uri else input_uri, "identity": input_id},
        "config": config_lib.redact(resolved),
        "config_hash": config_lib.config_hash(resolved),
        "counts": counts,
        "mlflow_run_id": mlflow_run_id,
    }
    if extra:
        manifest.update(extra)
    storage.write_json(manifest_path(dataset_uri), manifest)
    save_config(dataset_uri, resolved)
    return manifest
