"""The deployment files under cluster/: rendered from cluster/deploy.yaml (no drift), the KubeRay manifests valid
against KubeRay's CRD schemas (cluster/schemas/), the plain Kubernetes objects against Kubernetes' own schemas
(kubernetes-validate, bundled, offline), the cluster-launcher config against the schema inside the ray package,
and the Dockerfile checked statically (it cannot be built here)."""

from __future__ import annotations

import copy
import glob
import importlib.util
import json
import os
import re
import shlex

import jsonschema
import pytest
import yaml

from cluster import deploy
from cluster.mlflow_server import has_password
from conftest import REPO_ROOT
from pipelines.config import ConfigError

K8S_DIR = os.path.join(REPO_ROOT, "cluster", "k8s")
SCHEMAS = {"RayCluster": "rayclusters.ray.io-v1.json", "RayJob": "rayjobs.ray.io-v1.json"}
KUBERNETES_VERSION = "1.30"  # the oldest Kubernetes the manifests are meant for; KubeRay 1.x supports it


def _docs(path: str) -> list[dict]:
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def _strict(schema):
    """A CRD schema as the API server applies it with strict field validation (`kubectl apply`'s default):
    a field that is not in the schema is an error, unless the schema preserves unknown fields."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and "additionalProperties" not in out \
                and not out.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@pytest.fixture(scope="module")
def crd_validators():
    out = {}
    for kind, name in SCHEMAS.items():
        with open(os.path.join(REPO_ROOT, "cluster", "schemas", name)) as f:
            out[kind] = jsonschema.Draft7Validator(_strict(json.load(f)["openAPIV3Schema"]))
    return out


def _errors(validator, doc) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


@pytest.fixture(scope="module")
def values():
    return deploy.load_values()


def _kuberay_files() -> list[str]:
    return sorted(glob.glob(os.path.join(K8S_DIR, "ray*.yaml")))


# ------------------------------------------------------------------ one source

def test_committed_files_are_what_the_values_render(values):
    assert deploy.drift(deploy.render(values)) == [], "run `python -m cluster render` and commit the result"
    assert deploy.main(["--check"]) == 0


def test_every_phase_and_the_workflow_has_a_rayjob(values):
    modules = {}
    for job in values.jobs:
        argv = shlex.split(deploy.entrypoint(values, job))
        assert argv[:2] == ["python", "-m"], job
        modules.setdefault(argv[2], []).append(argv)
        assert importlib.util.find_spec(argv[2]) is not None, f"jobs.{job}: no module {argv[2]}"
        if "--config" in argv:
            config = argv[argv.index("--config") + 1]
            assert os.path.isfile(os.path.join(REPO_ROOT, config)), f"jobs.{job}: no config file {config}"
        assert os.path.isfile(os.path.join(K8S_DIR, f"rayjob-{job}.yaml"))
    for module in ("filter", "download", "encoders", "precompute", "train", "generate", "evaluate", "workflow"):
        assert f"pipelines.{module}" in modules, module
    train_configs = {a[a.index("--config") + 1] for a in modules["pipelines.train"]}
    assert {"configs/train-a.yaml", "configs/train-b.yaml", "configs/train-c.yaml"} <= train_configs


def test_entrypoints_and_the_cluster_workflow_parse_with_the_phases_own_configs(values, monkeypatch, tmp_path):
    """What each RayJob runs parses and validates as the phase would (typed config, the workflow's steps with
    their configs and overrides), so a manifest never fails on a flag or key at submit time."""
    import importlib

    from pipelines import config as config_lib
    from pipelines import workflow

    def load(what: str, fn, *args):
        """A path that exists only on the cluster (the example bucket) is the one error allowed."""
        try:
            return fn(*args)
        except ConfigError as exc:
            if not re.search(r"not found|does not exist", str(exc)):
                raise AssertionError(f"{what}: {exc}") from None

    monkeypatch.setenv("WURST_DATA_ROOT", values.data_root)
    for job in values.jobs:
        argv = shlex.split(deploy.entrypoint(values, job))
        module = importlib.import_module(argv[2])
        if hasattr(module, "PHASE"):
            load(f"jobs.{job}", module.PHASE.load_config, argv[3:])
        elif argv[2] == "pipelines.generate":
            module.build_parser().parse_args(argv[3:])
        else:
            assert argv[2] == "pipelines.workflow" and argv[3:5] == ["--config", "cluster/workflow.yaml"], job
    flow = config_lib.load(workflow.WorkflowConfig, os.path.join(REPO_ROOT, "cluster", "workflow.yaml"))
    assert flow.data_root == values.data_root
    outputs = {}
    for step in flow.steps:
        if step.kind == "phase":
            phase = workflow.phase_of(step)
            overrides = workflow.step_overrides(step, flow, outputs)
            load(f"cluster/workflow.yaml: {step.name}", config_lib.load, phase.config_class,
                 workflow._abs_config_path(step.config), overrides)
        outputs[step.name] = f"{values.data_root}/{step.name}/VERSION"


def test_values_errors_name_the_key(tmp_path):
    with open(deploy.VALUES) as f:
        base = yaml.safe_load(f)
    cases = [
        (lambda d: d["env"].update(MLFLOW_TRACKING_PASSWORD="x"), "env.MLFLOW_TRACKING_PASSWORD: looks like a secret"),
        (lambda d: d["kubernetes"]["mlflow"].update(backend_store_uri="postgresql://u:pw@db/mlflow"),
         "kubernetes.mlflow.backend_store_uri: holds a password"),
        (lambda d: d["kubernetes"]["worker_groups"][0].update(min_replicas=9, max_replicas=2),
         r"kubernetes.worker_groups\[0\].min_replicas"),
        (lambda d: d["kubernetes"]["worker_groups"][1].update(image_variant="cpu"),
         r"kubernetes.worker_groups\[1\].image_variant"),
        (lambda d: d["image"].update(pull_policy="Sometimes"), "image.pull_policy"),
        (lambda d: d["jobs"].update({"Bad_Name": {"entrypoint": "python -m pipelines.doctor"}}), "jobs.Bad_Name"),
        (lambda d: d["launcher"].update(gpu_workers=3), "launcher.gpu_workers: unknown config key"),
    ]
    for change, message in cases:
        data = copy.deepcopy(base)
        change(data)
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(data))
        with pytest.raises(ConfigError, match=message):
            deploy.load_values(str(path))


# ------------------------------------------------------------------ KubeRay

def test_kuberay_manifests_validate_against_the_crd_schemas(crd_validators, values):
    files = _kuberay_files()
    kinds = [doc["kind"] for path in files for doc in _docs(path)]
    assert kinds.count("RayCluster") == 1 and kinds.count("RayJob") == len(values.jobs)
    for path in files:
        for doc in _docs(path):
            assert doc["apiVersion"] == "ray.io/v1"
            assert _errors(crd_validators[doc["kind"]], doc) == [], os.path.basename(path)
            assert re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"])
            spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
            assert spec["authOptions"] == {"mode": "token"}  # Ray token auth on
            assert spec["rayVersion"] == values.image.ray_version


def test_the_strict_crd_schema_catches_typos_and_wrong_types(crd_validators):
    (job,) = _docs(os.path.join(K8S_DIR, "rayjob-train-c.yaml"))
    typo = copy.deepcopy(job)
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    assert any("maxReplica" in e for e in _errors(crd_validators["RayJob"], typo))
    wrong = copy.deepcopy(job)
    wrong["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert _errors(crd_validators["RayJob"], wrong)
    missing = copy.deepcopy(job)
    del missing["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert any("headGroupSpec" in e for e in _errors(crd_validators["RayJob"], missing))


def test_pod_templates_are_valid_kubernetes_pods():
    import kubernetes_validate

    (cluster,) = _docs(os.path.join(K8S_DIR, "raycluster.yaml"))
    templates = [cluster["spec"]["headGroupSpec"]["template"]]
    templates += [g["template"] for g in cluster["spec"]["workerGroupSpecs"]]
    for template in templates:
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", **template["metadata"]},
               "spec": template["spec"]}
        kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)
        for container in template["spec"]["containers"]:
            for var in container["env"]:
                # secrets only by reference: a secret-looking variable never has a literal value
                assert "value" not in var or not re.search(r"PASSWORD|SECRET|TOKEN", var["name"]), var


# ------------------------------------------------------------------ plain Kubernetes objects

def test_mlflow_objects_validate_against_kubernetes_schemas():
    import kubernetes_validate

    docs = _docs(os.path.join(K8S_DIR, "mlflow.yaml"))
    assert [d["kind"] for d in docs] == ["ConfigMap", "Deployment", "Service"]
    for doc in docs:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    deployment = docs[1]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["command"][:4] == ["mlflow", "server", "--app-name", "basic-auth"]
    literal = {v["name"]: v.get("value") for v in container["env"]}
    assert "PGPASSWORD" in literal and literal["PGPASSWORD"] is None  # from the Secret
    assert not has_password(literal["MLFLOW_BACKEND_STORE_URI"])
    typo = copy.deepcopy(deployment)
    typo["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, KUBERNETES_VERSION, strict=True)


# ------------------------------------------------------------------ cluster launcher

def test_launcher_config_validates_against_rays_schema():
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    (config,) = _docs(os.path.join(REPO_ROOT, "cluster", "launcher", "aws-gpu.yaml"))
    with open(os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(config, schema)
    validate_config(prepare_config(copy.deepcopy(config)))  # Ray's own check, after its provider defaults
    gpu = config["available_node_types"]["gpu_worker"]
    assert gpu["max_workers"] >= 1 and config["docker"]["image"].endswith("-cuda")
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"][1:])
    bad = copy.deepcopy(config)
    bad["docker"]["imagee"] = bad["docker"].pop("image")
    with pytest.raises(jsonschema.ValidationError, match="imagee"):
        jsonschema.validate(bad, schema)


def test_launcher_start_commands_give_ray_the_secrets_and_the_environment(tmp_path, values):
    """Run the start commands' shell prelude (everything before `ray start`) in bash on a fake home."""
    import subprocess

    (config,) = _docs(os.path.join(REPO_ROOT, "cluster", "launcher", "aws-gpu.yaml"))
    (tmp_path / ".wurst").mkdir()
    (tmp_path / ".wurst" / "secrets.env").write_text("MLFLOW_TRACKING_PASSWORD=s3cret\nAWS_ACCESS_KEY_ID=AK\n")
    for command in (config["head_start_ray_commands"][1], config["worker_start_ray_commands"][1]):
        prelude, _, rest = command.partition(" && ray start ")
        assert rest, command
        prelude = prelude.replace("ulimit -n 65536", "true")  # the node's limit, not this machine's
        out = subprocess.run(["bash", "-c", f"{prelude} && env"], env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        env = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        assert env["MLFLOW_TRACKING_PASSWORD"] == "s3cret" and env["AWS_ACCESS_KEY_ID"] == "AK"
        assert env["WURST_DATA_ROOT"] == values.data_root
        assert env["MLFLOW_TRACKING_URI"] == values.launcher.mlflow_tracking_uri
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_AUTH_TOKEN_PATH"] == f"{tmp_path}/.wurst/ray_token"
        assert env["RAY_USAGE_STATS_ENABLED"] == "0"  # ray_job.yaml's env_vars


# ------------------------------------------------------------------ Dockerfile

def _instructions(path: str) -> list[tuple[str, str]]:
    with open(path) as f:
        text = re.sub(r"\\\n", " ", f.read())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_project_from_files_that_exist(values):
    path = os.path.join(REPO_ROOT, "cluster", "Dockerfile")
    steps = _instructions(path)
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    assert args["RAY_VERSION"] == values.image.ray_version and args["VARIANT"] == "cpu"
    stages = {re.search(r"\bAS (\S+)", a).group(1) for word, a in steps if word == "FROM"}
    assert {"base-cpu", "base-cuda"} <= stages
    assert ("FROM", "base-${VARIANT} AS image") in steps  # --build-arg VARIANT=cpu|cuda picks the base
    with open(path + ".dockerignore") as f:
        ignored = {line.strip() for line in f if line.strip() and not line.startswith("#")}
    copied = []
    for word, rest in steps:
        if word == "COPY":
            assert not rest.startswith("--from"), rest
            copied += shlex.split(rest)[:-1]
    assert {"pyproject.toml", "pipelines", "stages", "data_filters", "cluster", "configs"} <= set(copied)
    for src in copied:
        assert os.path.exists(os.path.join(REPO_ROOT, src)), f"COPY {src}: not in the repository"
        assert src not in ignored, f"COPY {src}: excluded by the .dockerignore"
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    with open(os.path.join(REPO_ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    installs = " ".join(a for word, a in steps if word == "RUN" and "pip install" in a)
    for extra in re.findall(r'-e "\.\[([^\]]+)\]"', installs):
        for name in extra.split(","):
            assert name in project["optional-dependencies"], f"Dockerfile installs extra {name!r} that pyproject lacks"
    assert '-e ".[cluster]"' in installs
    # KubeRay runs `bash -l -c "... ray start ..."`: a login shell must find the venv's ray.
    assert any("/etc/profile.d/" in a and "/opt/venv/bin" in a for word, a in steps if word == "RUN")
    users = [a for word, a in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
