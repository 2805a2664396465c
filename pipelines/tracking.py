"""The one way every phase opens its MLflow run.

Experiment per phase (`wurst-<phase>`, described by the phase), a readable run name, the input and output
datasets (MLflow's dataset tracking: the UI's Dataset column), lineage tags (phase, config hash, input
manifest hash, git commit), the resolved config as flattened params with secrets redacted, and
system metrics on. The embedded default store is a SQLite file under the data root, so a laptop
needs no server; `MLFLOW_TRACKING_URI` (or the config's `mlflow.tracking_uri`) points at a real one.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import urllib.parse
import warnings
from typing import Any, Iterator, Optional

from pipelines import config as config_lib
from pipelines import manifest as manifest_lib
from pipelines import runtime, storage

MAX_PARAM_VALUE = 6000  # MLflow 3 limit is 6000 chars per param value
PARAM_BATCH = 100


@dataclasses.dataclass
class MlflowConfig:
    tracking_uri: Optional[str] = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<data_root>/mlflow.db
    experiment_prefix: str = "wurst"
    run_name: Optional[str] = None
    system_metrics: bool = True
    enabled: bool = True


def tracking_uri_for(data_root: str, configured: str | None = None) -> str:
    if configured:
        if urllib.parse.urlsplit(configured).password is not None:
            # The config is logged as params and saved in manifests: credentials come from the environment.
            raise config_lib.ConfigError(
                "mlflow.tracking_uri: holds a password (user:password@host); set MLFLOW_TRACKING_USERNAME and "
                "MLFLOW_TRACKING_PASSWORD (or PGPASSWORD for a database URI) in the environment instead")
        return configured
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    root = storage.local_path(data_root)
    if root is None:
        raise config_lib.ConfigError(
            "mlflow.tracking_uri: data_root is an object store, so the embedded SQLite store cannot live "
            "there; set mlflow.tracking_uri (or MLFLOW_TRACKING_URI) to an MLflow server"
        )
    os.makedirs(root, exist_ok=True)
    return f"sqlite:///{os.path.join(root, 'mlflow.db')}"


def experiment_name(phase: str, cfg: MlflowConfig | None = None) -> str:
    prefix = (cfg.experiment_prefix if cfg else "wurst").strip()
    return f"{prefix}-{phase}" if prefix else phase


DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as an experiment's description


def _ensure_experiment(client, name: str, tracking_uri: str, data_root: str, description: str | None = None) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if description and not (exp.tags or {}).get(DESCRIPTION_TAG):
            client.set_experiment_tag(exp.experiment_id, DESCRIPTION_TAG, description)
        return exp.experiment_id
    artifact_location = None
    if tracking_uri.startswith("sqlite:"):
        # Without this MLflow puts artifacts in ./mlruns relative to whatever the cwd is.
        root = storage.local_path(data_root)
        artifact_location = "file://" + os.path.join(root, "mlartifacts", name)
    try:
        return client.create_experiment(name, artifact_location=artifact_location,
                                        tags={DESCRIPTION_TAG: description} if description else None)
    except Exception:  # noqa: BLE001 - a concurrent phase created it first
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def log_config_params(cfg: Any) -> None:
    import mlflow

    tree = config_lib.to_dict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)
    flat = config_lib.flatten(config_lib.redact(tree))
    params = {k: ("None" if v is None else str(v))[:MAX_PARAM_VALUE] for k, v in flat.items()}
    items = sorted(params.items())
    for i in range(0, len(items), PARAM_BATCH):
        mlflow.log_params(dict(items[i:i + PARAM_BATCH]))


def lineage_tags(phase: str, cfg: Any, input_uri: str | None = None) -> dict[str, str]:
    tags = {
        "wurst.phase": phase,
        "wurst.config_hash": config_lib.config_hash(cfg),
        "wurst.code_version": manifest_lib.code_version(),
    }
    if input_uri:
        tags["wurst.input_uri"] = input_uri
        if storage.exists(input_uri) and storage.is_dir(input_uri) and manifest_lib.has_manifest(input_uri):
            tags["wurst.input_manifest_hash"] = manifest_lib.manifest_hash(input_uri)
            upstream = manifest_lib.read(input_uri)
            if upstream.get("mlflow_run_id"):
                tags["wurst.input_run_id"] = upstream["mlflow_run_id"]
            if upstream.get("phase"):
                tags["wurst.input_phase"] = upstream["phase"]
    return tags


@contextlib.contextmanager
def start_run(phase: str, cfg: Any, *, data_root: str, mlflow_cfg: MlflowConfig | None = None,
              input_uri: str | None = None, run_name: str | None = None, run_id: str | None = None,
              tags: dict[str, str] | None = None, log_params: bool = True,
              description: str | None = None) -> Iterator[Any]:
    """Open (or resume, with `run_id`) the phase's MLflow run; yields the ActiveRun, or None when
    tracking is disabled in the config."""
    mlflow_cfg = mlflow_cfg or MlflowConfig()
    if not mlflow_cfg.enabled:
        yield None
        return
    import mlflow
    from mlflow.tracking import MlflowClient

    uri = tracking_uri_for(data_root, mlflow_cfg.tracking_uri)
    runtime.recover_cwd(storage.local_path(data_root))  # MLflow resolves paths against the cwd
    # mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI to os.environ. Left there, it would
    # send every later run of this process (another phase of a workflow, a test) and every process
    # it spawns (a `cluster up`) to this run's store: put the environment back afterwards.
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        client = MlflowClient(uri)
        name = experiment_name(phase, mlflow_cfg)
        exp_id = _ensure_experiment(client, name, uri, data_root, description)
        all_tags = lineage_tags(phase, cfg, input_uri)
        all_tags.update(tags or {})
        # URIs in tags (input, output, run dir) may carry credentials: the same redaction as the params.
        all_tags = {k: config_lib.redact_text(v) if isinstance(v, str) else v for k, v in all_tags.items()}
        with mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                              run_name=None if run_id else (run_name or mlflow_cfg.run_name),
                              tags=all_tags, log_system_metrics=mlflow_cfg.system_metrics) as run:
            if log_params and run_id is None:
                log_config_params(cfg)
            yield run
    finally:
        if env_before is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


# --------------------------------------------------------------------------------------------
# Datasets: each phase's input and output in MLflow's dataset tracking (the UI's Dataset column)

# Per phase, the count in a manifest's `counts` that is its dataset's row count.
ROW_COUNTS = {"filter": "rows_written", "download": "samples", "precompute": "written"}


def dataset_rows(manifest: dict) -> int | None:
    value = (manifest.get("counts") or {}).get(ROW_COUNTS.get(manifest.get("phase"), ""))
    return int(value) if isinstance(value, (int, float)) else None


def dataset_entry(uri: str, *, name: str | None = None, digest: str | None = None, rows: int | None = None) -> dict:
    """A dataset as MLflow should list it: named `<phase>/<version>` when `uri` holds a phase's output (its
    manifest hash the digest, its row count from the manifest), else by its last path part."""
    if uri and "," not in uri and storage.exists(uri) and storage.is_dir(uri) and manifest_lib.has_manifest(uri):
        manifest = manifest_lib.read(uri)
        name = name or f"{manifest.get('phase', 'dataset')}/{manifest.get('version') or storage.basename(uri)}"
        digest = digest or manifest_lib.manifest_hash(uri)[:16]
        rows = rows if rows is not None else dataset_rows(manifest)
    label = storage.basename(uri.split(",")[0].rstrip("/")) if uri else "input"
    return {"name": name or label, "uri": uri, "digest": (digest or "")[:16] or None, "rows": rows}


def log_datasets(inputs: list[dict], outputs: list[dict]) -> None:
    """`mlflow.log_input` of each entry (`dataset_entry`) with context "input" or "output": name, source URI
    (credentials redacted), digest and a profile with the row count."""
    import mlflow
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset

    class PhaseDataset(MetaDataset):
        def __init__(self, source, name, digest, rows):
            super().__init__(source, name=name, digest=digest)
            self._rows = rows

        @property
        def profile(self):
            return {"num_rows": self._rows} if self._rows is not None else None

        def to_dict(self):
            out = super().to_dict()
            if self._rows is not None:
                out["profile"] = json.dumps({"num_rows": self._rows})
            return out

    for context, entries in (("input", inputs), ("output", outputs)):
        for entry in entries:
            uri = config_lib.redact_text(entry["uri"].split(",")[0])
            with warnings.catch_warnings():  # "can be interpreted in multiple ways": a local path is local
                warnings.simplefilter("ignore")
                source = resolve_dataset_source(uri)
            mlflow.log_input(PhaseDataset(source, entry["name"], entry["digest"], entry["rows"]), context=context)


# --------------------------------------------------------------------------------------------
# The model registry (the train phase's `mlflow.register_model`)

_EXISTS = ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS")


def ensure_registered_model(tracking_uri: str, name: str) -> None:
    """Create registered model `name` unless it exists. Fails (with MLflow's error) when the registry cannot
    be reached or written: the caller checks this before training, not at the first export."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri).create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in _EXISTS:
            raise


def register_artifacts(tracking_uri: str, name: str, run_id: str, artifact_path: str,
                       tags: dict[str, str] | None = None):
    """A version of registered model `name` whose source is the run's artifacts `runs:/<run_id>/<artifact_path>`;
    the existing one when that source is already registered (a resumed run that exports the same step again).
    Created with the client: MLflow 3's `mlflow.register_model` accepts only logged models (an MLmodel file
    or a LoggedModel), and an export is a stages checkpoint."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    source = f"runs:/{run_id}/{artifact_path}"
    for version in client.search_model_versions(f"name='{name}' and run_id='{run_id}'"):
        if version.source == source:
            return version
    return client.create_model_version(name, source=source, run_id=run_id, tags=tags)


def find_runs(phase: str, *, tracking_uri: str, experiment_prefix: str = "wurst") -> list:
    """All runs of a phase's experiment, newest first (tests and the workflow use this)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(f"{experiment_prefix}-{phase}" if experiment_prefix else phase)
    if exp is None:
        return []
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
