"""`python -m cluster render [--check]`: every deployment file from cluster/deploy.yaml.

One source (image, resources, environment, the jobs' entrypoints) renders:
- cluster/Dockerfile's build-argument defaults (the rest of it is written by hand);
- cluster/k8s/raycluster.yaml: a KubeRay RayCluster (token auth, autoscaling CPU and GPU worker groups);
- cluster/k8s/rayjob-<job>.yaml: one KubeRay RayJob per phase and one for the workflow, each with that same
  cluster spec (the job brings up its cluster, runs, and the cluster goes away);
- cluster/k8s/mlflow.yaml: the shared MLflow server (basic auth, PostgreSQL store, object-store artifacts) as a
  ConfigMap, Deployment and Service;
- cluster/launcher/aws-gpu.yaml: a Ray cluster-launcher config with CPU and GPU worker types.
Because nothing is written by hand twice, the files cannot drift; `--check` (and the tests) fail when a
committed file differs from what the values render. The environment of every node comes from ray_job.yaml's
env_vars plus the values' `env`; secrets are referenced by name only.
"""

from __future__ import annotations

import os
import re
import shlex
import sys

import yaml

from cluster.deploy_values import VALUES, DeployValues, load_values  # noqa: F401  - the values API, re-exported
from pipelines.config import ConfigError

CLUSTER_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(CLUSTER_DIR)
HEADER = "# Rendered by `python -m cluster render` from cluster/deploy.yaml: edit that file, not this one.\n"
GPU_RESOURCE = "nvidia.com/gpu"
MLFLOW_PORT = 5000


def ray_job_env() -> dict[str, str]:
    """ray_job.yaml's env_vars: what every submitted job gets locally, and so every node here."""
    with open(os.path.join(REPO_ROOT, "ray_job.yaml")) as f:
        return {str(k): str(v) for k, v in (yaml.safe_load(f).get("env_vars") or {}).items()}


# --------------------------------------------------------------------------------------------- Kubernetes

def mlflow_service(v: DeployValues) -> str:
    return f"{v.name}-mlflow"


def node_env(v: DeployValues, tracking_uri: str) -> dict[str, str]:
    env = ray_job_env()
    env.update({"WURST_DATA_ROOT": v.data_root, "MLFLOW_TRACKING_URI": tracking_uri})
    env.update(v.env)
    return env


def _k8s_env(v: DeployValues) -> list[dict]:
    tracking = f"http://{mlflow_service(v)}.{v.kubernetes.namespace}.svc:{MLFLOW_PORT}"
    env = [{"name": k, "value": val} for k, val in node_env(v, tracking).items()]
    # optional: a key the Secret lacks (say AWS keys where a service account grants the bucket) is left unset.
    env += [{"name": k, "valueFrom": {"secretKeyRef": {"name": v.kubernetes.secret, "key": k, "optional": True}}}
            for k in v.secret_env]
    return env


def _resources(cpu, memory: str, gpus: int = 0) -> dict:
    requests = {"cpu": str(cpu), "memory": memory}
    limits = dict(requests)
    if gpus:
        limits[GPU_RESOURCE] = str(gpus)
        requests[GPU_RESOURCE] = str(gpus)
    return {"requests": requests, "limits": limits}


def _pod(v: DeployValues, *, head: bool, variant: str, cpu, memory: str, gpus: int = 0) -> dict:
    container = {
        "name": "ray-head" if head else "ray-worker",
        "image": v.image.ref(variant),
        "imagePullPolicy": v.image.pull_policy,
        "env": _k8s_env(v),
        "resources": _resources(cpu, memory, gpus),
        # Ray's object store lives in /dev/shm; a container's default is 64 MB.
        "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}],
    }
    if head:
        container["ports"] = [{"containerPort": 6379, "name": "gcs-server"},
                              {"containerPort": 8265, "name": "dashboard"},
                              {"containerPort": 10001, "name": "client"}]
    spec = {
        "securityContext": {"runAsNonRoot": True, "runAsUser": 1000, "fsGroup": 1000},
        "containers": [container],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
    }
    if gpus:
        spec["tolerations"] = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": {"app.kubernetes.io/name": v.name}}, "spec": spec}


def ray_cluster_spec(v: DeployValues) -> dict:
    k = v.kubernetes
    return {
        "rayVersion": v.image.ray_version,
        # Ray token authentication, the token in a Secret KubeRay creates: no anonymous job submission.
        "authOptions": {"mode": "token"},
        "enableInTreeAutoscaling": True,
        "autoscalerOptions": {"upscalingMode": "Default", "idleTimeoutSeconds": 600},
        "headGroupSpec": {
            # num-cpus 0: drivers run on the head, tasks and training workers on the worker groups.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
            "template": _pod(v, head=True, variant="cpu", cpu=k.head.cpu, memory=k.head.memory),
        },
        "workerGroupSpecs": [{
            "groupName": g.name,
            "replicas": g.min_replicas,
            "minReplicas": g.min_replicas,
            "maxReplicas": g.max_replicas,
            "rayStartParams": {},
            "template": _pod(v, head=False, variant=g.image_variant, cpu=g.cpu, memory=g.memory, gpus=g.gpus),
        } for g in k.worker_groups],
    }


def _metadata(v: DeployValues, name: str, component: str) -> dict:
    return {"name": name, "namespace": v.kubernetes.namespace,
            "labels": {"app.kubernetes.io/name": v.name, "app.kubernetes.io/component": component}}


def ray_cluster(v: DeployValues) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": _metadata(v, v.name, "ray-cluster"),
            "spec": ray_cluster_spec(v)}


def entrypoint(v: DeployValues, job: str) -> str:
    return v.jobs[job].entrypoint.replace("{data_root}", v.data_root).strip()


def ray_job(v: DeployValues, job: str) -> dict:
    return {
        "apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": _metadata(v, f"{v.name}-{job}", f"job-{job}"),
        "spec": {
            "entrypoint": entrypoint(v, job),
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": v.kubernetes.job_ttl_seconds,
            "rayClusterSpec": ray_cluster_spec(v),
        },
    }


def mlflow_objects(v: DeployValues) -> list[dict]:
    k, m = v.kubernetes, v.kubernetes.mlflow
    name = mlflow_service(v)
    labels = {"app.kubernetes.io/name": name}
    hosts = [f"{name}:*", f"{name}.{k.namespace}.svc:*", f"{name}.{k.namespace}.svc.cluster.local:*",
             "localhost:*", "127.0.0.1:*", *m.allowed_hosts]
    auth_ini = "\n".join([
        "[mlflow]",
        "default_permission = READ",
        f"database_uri = {m.backend_store_uri}",
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth",
        "",
    ])

    def secret(var: str, key: str | None = None, optional: bool = False) -> dict:
        ref = {"name": k.secret, "key": key or var}
        if optional:
            ref["optional"] = True
        return {"name": var, "valueFrom": {"secretKeyRef": ref}}

    env = [
        {"name": "MLFLOW_BACKEND_STORE_URI", "value": m.backend_store_uri},
        {"name": "MLFLOW_AUTH_CONFIG_PATH", "value": "/etc/mlflow/basic_auth.ini"},
        # MLflow answers only Host headers it knows (DNS-rebinding guard): its Service names, port-forwards.
        {"name": "MLFLOW_SERVER_ALLOWED_HOSTS", "value": ",".join(hosts)},
        secret("PGPASSWORD"),
        # The admin account the jobs log in with (created on the first start against an empty user store).
        secret("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
        secret("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
        # Shared by every replica, so a UI session survives load balancing.
        secret("MLFLOW_FLASK_SERVER_SECRET_KEY"),
        secret("AWS_ACCESS_KEY_ID", optional=True),
        secret("AWS_SECRET_ACCESS_KEY", optional=True),
    ]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": _metadata(v, name, "mlflow"),
        "spec": {
            "replicas": m.replicas,
            "selector": {"matchLabels": labels},
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "securityContext": {"runAsNonRoot": True, "runAsUser": 1000},
                    "containers": [{
                        "name": "mlflow",
                        "image": v.image.ref("cpu"),
                        "imagePullPolicy": v.image.pull_policy,
                        "command": ["mlflow", "server", "--app-name", "basic-auth", "--host", "0.0.0.0",
                                    "--port", str(MLFLOW_PORT), "--workers", str(m.workers),
                                    "--artifacts-destination", m.artifacts_destination],
                        "env": env,
                        "ports": [{"containerPort": MLFLOW_PORT, "name": "http"}],
                        "readinessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 10},
                        "livenessProbe": {"httpGet": {"path": "/health", "port": "http"}, "periodSeconds": 30,
                                          "initialDelaySeconds": 60},
                        "resources": _resources(m.cpu, m.memory),
                        "volumeMounts": [{"name": "auth-config", "mountPath": "/etc/mlflow", "readOnly": True}],
                    }],
                    "volumes": [{"name": "auth-config", "configMap": {"name": f"{name}-auth"}}],
                },
            },
        },
    }
    return [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": _metadata(v, f"{name}-auth", "mlflow"),
         "data": {"basic_auth.ini": auth_ini}},
        deployment,
        {"apiVersion": "v1", "kind": "Service", "metadata": _metadata(v, name, "mlflow"),
         "spec": {"selector": labels, "ports": [{"name": "http", "port": MLFLOW_PORT, "targetPort": "http"}]}},
    ]


# --------------------------------------------------------------------------------------------- launcher

def _sh_path(path: str) -> str:
    """A path for the node's shell: quoted, with a leading ~/ still expanding (to the node user's home)."""
    if path.startswith("~/"):
        return '"$HOME/' + path[2:].replace('"', '\\"') + '"'
    return shlex.quote(path)


def launcher_config(v: DeployValues) -> dict:
    lv = v.launcher
    env = {k: shlex.quote(val) for k, val in node_env(v, lv.mlflow_tracking_uri).items()}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": _sh_path(lv.token_file)})
    exports = " ".join(f"{k}={val}" for k, val in env.items())
    # Every Ray process inherits this environment, and so every job and worker: the secrets come from the
    # env file (synced from your machine, never in this file), the rest from the values.
    prelude = f"set -a && . {_sh_path(lv.env_file)} && set +a && export {exports} && ulimit -n 65536"
    provider = {"type": "aws", "region": lv.region, "cache_stopped_nodes": False}
    if lv.availability_zone:
        provider["availability_zone"] = lv.availability_zone
    disk = [{"DeviceName": "/dev/sda1", "Ebs": {"VolumeSize": 500, "VolumeType": "gp3"}}]
    return {
        "cluster_name": lv.cluster_name,
        "max_workers": lv.cpu_workers_max + lv.gpu_workers_max,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": lv.idle_timeout_minutes,
        "docker": {
            "image": v.image.ref("cuda"),
            "container_name": v.name,
            "pull_before_run": True,
            "run_options": ["--ulimit nofile=65536:65536"],
        },
        "provider": provider,
        "auth": {"ssh_user": lv.ssh_user},
        "available_node_types": {
            "head": {"resources": {"CPU": 0},  # drivers only, as on Kubernetes
                     "node_config": {"InstanceType": lv.head_instance, "BlockDeviceMappings": disk}},
            "cpu_worker": {"min_workers": 0, "max_workers": lv.cpu_workers_max, "resources": {},
                           "node_config": {"InstanceType": lv.cpu_worker_instance, "BlockDeviceMappings": disk}},
            "gpu_worker": {"min_workers": 0, "max_workers": lv.gpu_workers_max, "resources": {},
                           "node_config": {"InstanceType": lv.gpu_worker_instance, "BlockDeviceMappings": disk}},
        },
        "head_node_type": "head",
        "file_mounts": {lv.token_file: lv.token_file, lv.env_file: lv.env_file},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
        "initialization_commands": [],
        "setup_commands": [],  # the image holds the project (cluster/Dockerfile)
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [
            "ray stop",
            # The dashboard / job server stays on the head's loopback: reach it with `ray dashboard`'s SSH tunnel.
            f"{prelude} && ray start --head --port=6379 --object-manager-port=8076 "
            "--autoscaling-config=~/ray_bootstrap_config.yaml --dashboard-host=127.0.0.1 --disable-usage-stats",
        ],
        "worker_start_ray_commands": [
            "ray stop",
            f"{prelude} && ray start --address=$RAY_HEAD_IP:6379 --object-manager-port=8076 --disable-usage-stats",
        ],
    }


# --------------------------------------------------------------------------------------------- Dockerfile

DOCKERFILE = os.path.join(CLUSTER_DIR, "Dockerfile")


def dockerfile_args(v: DeployValues) -> dict[str, str]:
    return {"CPU_BASE": v.image.cpu_base, "CUDA_BASE": v.image.cuda_base,
            "PYTHON_VERSION": v.image.python_version, "RAY_VERSION": v.image.ray_version}


def render_dockerfile(v: DeployValues, text: str) -> str:
    """The hand-written Dockerfile with its top-level `ARG NAME=default` lines set from the values."""
    args = dockerfile_args(v)
    seen = set()

    def sub(match: re.Match) -> str:
        seen.add(match.group(1))
        return f"ARG {match.group(1)}={args[match.group(1)]}"

    out = re.sub(r"^ARG (" + "|".join(args) + r")=.*$", sub, text, flags=re.M)
    missing = sorted(set(args) - seen)
    if missing:
        raise ConfigError(f"cluster/Dockerfile: no `ARG {missing[0]}=...` line to render")
    return out


# --------------------------------------------------------------------------------------------- render

class _Dumper(yaml.SafeDumper):
    """Plain, readable YAML: no &anchors for repeated values, multi-line strings as | blocks."""

    def ignore_aliases(self, data) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, text: str):
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="|" if "\n" in text else None)


_Dumper.add_representer(str, _str)


def _dump(*docs: dict) -> str:
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=120)
                         for d in docs)
    return HEADER + body


def render(v: DeployValues) -> dict[str, str]:
    """Relative path (from the repo root) -> content, for every rendered file."""
    with open(DOCKERFILE) as f:
        dockerfile = f.read()
    files = {
        "cluster/Dockerfile": render_dockerfile(v, dockerfile),
        "cluster/k8s/raycluster.yaml": _dump(ray_cluster(v)),
        "cluster/k8s/mlflow.yaml": _dump(*mlflow_objects(v)),
        "cluster/launcher/aws-gpu.yaml": _dump(launcher_config(v)),
    }
    for job in v.jobs:
        files[f"cluster/k8s/rayjob-{job}.yaml"] = _dump(ray_job(v, job))
    return files


def rendered_paths_on_disk() -> list[str]:
    """Files in the rendered folders now (a job removed from the values leaves a stale one behind)."""
    out = []
    for folder in ("cluster/k8s", "cluster/launcher"):
        full = os.path.join(REPO_ROOT, folder)
        if os.path.isdir(full):
            out += [f"{folder}/{name}" for name in sorted(os.listdir(full)) if name.endswith(".yaml")]
    return out


def drift(files: dict[str, str]) -> list[str]:
    """Paths whose committed content differs from `files`, plus stale rendered files."""
    out = []
    for rel, text in files.items():
        path = os.path.join(REPO_ROOT, rel)
        if not os.path.exists(path):
            out.append(f"{rel} (missing)")
            continue
        with open(path) as f:
            if f.read() != text:
                out.append(f"{rel} (differs)")
    out += [f"{rel} (not rendered from the values: remove it)" for rel in rendered_paths_on_disk() if rel not in files]
    return out


def main(argv: list[str]) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m cluster render", description=__doc__.splitlines()[0])
    parser.add_argument("--values", default=VALUES, help="the values file (default: cluster/deploy.yaml)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    args = parser.parse_args(argv)
    try:
        files = render(load_values(args.values))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        stale = drift(files)
        for line in stale:
            print(f"out of date: {line}", file=sys.stderr)
        if stale:
            print("run `python -m cluster render` and commit the result", file=sys.stderr)
        return 1 if stale else 0
    for rel, text in files.items():
        path = os.path.join(REPO_ROOT, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
        print(rel)
    for rel in rendered_paths_on_disk():
        if rel not in files:
            os.remove(os.path.join(REPO_ROOT, rel))
            print(f"removed {rel}")
    return 0
