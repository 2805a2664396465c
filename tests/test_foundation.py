"""Config system, secret redaction, storage paths, manifests, and a doctor job on a real Ray head."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from typing import Literal, Optional

import pytest

from pipelines import config as config_lib
from pipelines import manifest, storage, tracking
from pipelines.config import ConfigError, param

from conftest import REPO_ROOT


@dataclasses.dataclass
class Inner:
    threshold: float = param(5.0, ge=0.0, le=10.0)
    mode: Literal["fast", "exact"] = "exact"
    names: list[str] = dataclasses.field(default_factory=lambda: ["a"])


@dataclasses.dataclass
class Outer:
    input: Optional[str] = None
    steps: int = param(10, ge=1)
    inner: Inner = dataclasses.field(default_factory=Inner)
    access_key: Optional[str] = None
    db_password: str = ""


def test_defaults_yaml_and_overrides(tmp_path):
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("steps: 20\ninner:\n  threshold: 6\n  names: [x, y]\n")
    cfg = config_lib.load(Outer, str(cfg_file), ["inner.mode=fast", "input=/data/in"])
    assert cfg.steps == 20 and cfg.inner.threshold == 6.0 and isinstance(cfg.inner.threshold, float)
    assert cfg.inner.names == ["x", "y"] and cfg.inner.mode == "fast" and cfg.input == "/data/in"
    assert config_lib.load(Outer).steps == 10  # no file: the defaults


@pytest.mark.parametrize("overrides, message", [
    (["inner.treshold=3"], "inner.treshold: unknown config key"),
    (["bogus=1"], "bogus: unknown config key"),
    (["steps=abc"], "steps: expected int, got 'abc'"),
    (["steps=0"], "steps: expected a value >= 1, got 0"),
    (["inner.threshold=11"], "inner.threshold: expected a value <= 10.0, got 11.0"),
    (["inner.mode=slow"], "inner.mode: expected one of ['fast', 'exact'], got 'slow'"),
    (["inner.names=3"], "inner.names: expected a list, got 3"),
    (["inner=3"], "inner: expected a mapping for section Inner, got 3"),
    (["inner.threshold=.nan"], "inner.threshold: expected a number, got NaN"),
])
def test_bad_values_name_the_key_path(overrides, message):
    with pytest.raises(ConfigError) as err:
        config_lib.load(Outer, None, overrides)
    assert message in str(err.value)


# Every phase's command line: a bad value ends with one line naming the key path and exit status 2,
# not a traceback (the phases' own modules, as `ray job submit -- python -m pipelines.X` runs them).
PHASE_CLI_ERRORS = {
    "doctor": ("bogus=1", "doctor: error: bogus: unknown config key"),
    "filter": ("filters.aesthetic.min=11", "filter: error: filters.aesthetic.min: expected a value <= 10.0"),
    "download": ("shard_size=abc", "download: error: shard_size: expected int, got 'abc'"),
    "encoders": ("text_preset=clip-l", "encoders: error: text_preset: expected one of"),
    "precompute": ("batch_size=0", "precompute: error: batch_size: expected a value >= 1, got 0"),
    "train": ("stage=d", "train: error: stage: expected one of"),
    "workflow": ("steps=3", "workflow: error: steps: expected a list, got 3"),
}


def test_every_phase_cli_reports_config_errors_with_the_key_path():
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    procs = {phase: subprocess.Popen([sys.executable, "-m", f"pipelines.{phase}", "--set", override], cwd=REPO_ROOT,
                                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for phase, (override, _) in PHASE_CLI_ERRORS.items()}
    for phase, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        expected = PHASE_CLI_ERRORS[phase][1]
        assert proc.returncode == 2 and expected in err and "Traceback" not in err, (phase, proc.returncode, out, err)


def test_bad_yaml_file_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("steps: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        config_lib.load(Outer, str(bad))
    with pytest.raises(ConfigError, match="config file not found"):
        config_lib.load(Outer, str(tmp_path / "missing.yaml"))


def test_secret_redaction_in_params_and_saved_config(tmp_path):
    cfg = config_lib.load(Outer, None, ["access_key=AKIA123", "db_password=hunter2"])
    flat = config_lib.flatten(config_lib.redact(config_lib.to_dict(cfg)))
    assert flat["access_key"] == config_lib.REDACTED and flat["db_password"] == config_lib.REDACTED
    assert flat["steps"] == 10
    out = str(tmp_path / "ds")
    manifest.write(out, phase="unit", cfg=cfg, input_uri=None, input_id=None, counts={"rows": 0})
    for name in ("manifest.json", "config.yaml"):
        text = (tmp_path / "ds" / name).read_text()
        assert "AKIA123" not in text and "hunter2" not in text


def test_secret_never_reaches_mlflow(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the embedded default store

    cfg = config_lib.load(Outer, None, ["access_key=AKIA123"])
    with tracking.start_run("unit", cfg, data_root=str(tmp_path),
                            mlflow_cfg=tracking.MlflowConfig(system_metrics=False)) as run:
        run_id = run.info.run_id
    params = mlflow.get_run(run_id).data.params
    assert params["access_key"] == config_lib.REDACTED and params["inner.threshold"] == "5.0"
    assert mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name == "wurst-unit"
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"
    # ...but the run does not leave its store in the environment for later runs or child processes.
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert tracking.tracking_uri_for(str(tmp_path / "other")) == f"sqlite:///{tmp_path}/other/mlflow.db"


@pytest.mark.parametrize("scheme", ["", "file://"])
def test_storage_local_and_file_uri(tmp_path, scheme):
    root = scheme + str(tmp_path / "root")
    storage.write_json(storage.join(root, "a", "x.json"), {"k": 1})
    storage.write_text(storage.join(root, "a", "y.txt"), "hi")
    assert storage.exists(storage.join(root, "a", "x.json"))
    assert storage.read_json(storage.join(root, "a", "x.json")) == {"k": 1}
    assert [os.path.basename(p) for p in storage.list_files(storage.join(root, "a"))] == ["x.json", "y.txt"]
    assert storage.list_files(storage.join(root, "a"), suffix=".txt")[0].endswith("y.txt")
    assert storage.list_dirs(root) == [str(tmp_path / "root" / "a")]
    assert storage.local_path(root) == str(tmp_path / "root")
    # atomic writes leave no temp files behind
    assert sorted(os.listdir(tmp_path / "root" / "a")) == ["x.json", "y.txt"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(root, "nope"))


def test_storage_rejects_unknown_scheme():
    with pytest.raises(ValueError, match="unsupported storage URI scheme"):
        storage.normalize("ftp://host/x")
    assert storage.is_remote("s3://bucket/key") and storage.local_path("gs://b/k") is None


def test_version_changes_with_config_and_input(tmp_path):
    a = config_lib.load(Outer)
    b = config_lib.load(Outer, None, ["inner.threshold=6"])
    assert manifest.version_id("p", a, "in1") == manifest.version_id("p", config_lib.load(Outer), "in1")
    assert manifest.version_id("p", a, "in1") != manifest.version_id("p", b, "in1")
    assert manifest.version_id("p", a, "in1") != manifest.version_id("p", a, "in2")
    # settings that do not change the output can be excluded
    c = config_lib.load(Outer, None, ["steps=99"])
    assert manifest.version_id("p", a, "in1", exclude=("steps",)) == manifest.version_id("p", c, "in1", exclude=("steps",))
    # input identity: our datasets are identified by their manifest hash
    ds = str(tmp_path / "ds")
    manifest.write(ds, phase="unit", cfg=a, input_uri=None, input_id=None, counts={})
    assert manifest.input_identity(ds).startswith("manifest:")
    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "f.parquet").write_bytes(b"x")
    assert manifest.input_identity(str(raw)).startswith("listing:")


@pytest.mark.slow_e2e  # the workflow test submits every phase to the same `cluster up` head as Ray jobs
def test_doctor_job_on_local_cluster(ray_cluster):
    """Real Ray head (token auth) started by `python -m cluster up --workers 1`; doctor submitted
    with `ray job submit --runtime-env ray_job.yaml`; its MLflow run is found in the store."""
    import subprocess

    # Without the token the job server refuses us.
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    env["RAY_AUTH_MODE"] = "disabled"
    denied = subprocess.run([os.path.join(os.path.dirname(__import__("sys").executable), "ray"), "job", "list",
                             "--address", ray_cluster.dashboard_url], env=env, capture_output=True, text=True,
                            timeout=120)
    assert denied.returncode != 0

    status, logs = ray_cluster.submit(["python", "-m", "pipelines.doctor"], timeout=300)
    assert status == "SUCCEEDED", logs
    report = json.loads(logs[logs.index("{\n"):logs.rindex("}") + 1])
    assert report["cluster"]["nodes"] == 2  # head + 1 worker node
    runs = tracking.find_runs("doctor", tracking_uri=f"sqlite:///{ray_cluster.data_root}/mlflow.db")
    assert report["mlflow_run_id"] in [r.info.run_id for r in runs]


def test_embedded_ray_worker_hook_silences_only_the_placement_group_cleaner(monkeypatch):
    import logging
    import threading

    from pipelines import runtime

    reported = []
    monkeypatch.setattr(threading, "excepthook", lambda args: reported.append(args.thread.name))
    cleaner_logger = logging.getLogger(runtime._PG_CLEANER_LOGGER)
    monkeypatch.setattr(cleaner_logger, "level", cleaner_logger.level)
    runtime.quiet_embedded_worker_logs()
    assert not cleaner_logger.isEnabledFor(logging.WARNING) and cleaner_logger.isEnabledFor(logging.ERROR)

    def fail():
        raise ConnectionError("Found multiple active Ray instances")

    for name in (runtime._PG_CLEANER_THREAD, "SomeOtherThread"):
        thread = threading.Thread(target=fail, name=name)
        thread.start()
        thread.join()
    assert reported == ["SomeOtherThread"]
