"""The values of cluster/deploy.yaml, typed and validated (errors name the key); `cluster.deploy` renders them."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
from typing import Literal, Optional, Union

import yaml

from pipelines import config as config_lib
from pipelines.config import ConfigError, param

VALUES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy.yaml")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclasses.dataclass
class ImageValues:
    repository: str
    tag: str
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    python_version: str = "3.11"
    ray_version: str = "2.60.0"
    cpu_base: str = "python:3.11-slim-bookworm"
    cuda_base: str = "nvidia/cuda:12.8.1-cudnn-devel-ubuntu22.04"

    def ref(self, variant: str) -> str:
        return f"{self.repository}:{self.tag}-{variant}"


@dataclasses.dataclass
class JobValues:
    # A shell command run on the head; `{data_root}` is replaced by the values' data_root when rendering.
    entrypoint: str

    def validate(self) -> None:
        if not self.entrypoint.strip():
            raise ConfigError("entrypoint: must not be empty")
        try:
            shlex.split(self.entrypoint)
        except ValueError as exc:
            raise ConfigError(f"entrypoint: not a valid shell command ({exc})") from None


@dataclasses.dataclass
class HeadValues:
    cpu: Union[str, int] = "8"
    memory: str = "32Gi"


@dataclasses.dataclass
class WorkerGroupValues:
    name: str
    cpu: Union[str, int]
    memory: str
    min_replicas: int = param(0, ge=0)
    max_replicas: int = param(1, ge=1)
    gpus: int = param(0, ge=0)
    image_variant: Literal["cpu", "cuda"] = "cpu"

    def validate(self) -> None:
        if not DNS_LABEL.match(self.name):
            raise ConfigError(f"name: {self.name!r} is not a DNS label (lower-case letters, digits, '-')")
        if self.min_replicas > self.max_replicas:
            raise ConfigError(f"min_replicas: {self.min_replicas} is above max_replicas {self.max_replicas}")
        if self.gpus and self.image_variant != "cuda":
            raise ConfigError(f"image_variant: a group with gpus needs the cuda image, got {self.image_variant!r}")


@dataclasses.dataclass
class MlflowK8sValues:
    # No password here: the server takes it from the Secret's PGPASSWORD key (libpq reads that variable).
    backend_store_uri: str = "postgresql://mlflow@postgres:5432/mlflow"
    artifacts_destination: str = "s3://my-bucket/mlflow-artifacts"
    replicas: int = param(1, ge=1)
    workers: int = param(2, ge=1)
    cpu: Union[str, int] = "2"
    memory: str = "4Gi"
    # Host headers the server accepts besides its Service names and localhost (e.g. an ingress host).
    allowed_hosts: list[str] = dataclasses.field(default_factory=list)

    def validate(self) -> None:
        from cluster.mlflow_server import has_password

        if has_password(self.backend_store_uri):
            raise ConfigError("backend_store_uri: holds a password; leave it out (the server reads PGPASSWORD "
                              "from the Secret)")


@dataclasses.dataclass
class KubernetesValues:
    namespace: str = "wurst"
    secret: str = "wurst-credentials"
    head: HeadValues = dataclasses.field(default_factory=HeadValues)
    worker_groups: list[WorkerGroupValues] = dataclasses.field(default_factory=list)
    job_ttl_seconds: int = param(3600, ge=0)
    mlflow: MlflowK8sValues = dataclasses.field(default_factory=MlflowK8sValues)

    def validate(self) -> None:
        for key in ("namespace", "secret"):
            if not DNS_LABEL.match(getattr(self, key)):
                raise ConfigError(f"{key}: {getattr(self, key)!r} is not a DNS label")
        names = [g.name for g in self.worker_groups]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ConfigError(f"worker_groups[{i}].name: {name!r} is used twice")


@dataclasses.dataclass
class LauncherValues:
    cluster_name: str = "wurst-gpu"
    region: str = "us-west-2"
    availability_zone: Optional[str] = None
    ssh_user: str = "ubuntu"
    head_instance: str = "m6i.4xlarge"
    cpu_worker_instance: str = "m6i.8xlarge"
    cpu_workers_max: int = param(8, ge=0)
    gpu_worker_instance: str = "p4d.24xlarge"
    gpu_workers_max: int = param(2, ge=0)
    idle_timeout_minutes: int = param(10, ge=1)
    mlflow_tracking_uri: str = "https://mlflow.example.com"
    token_file: str = "~/.wurst/ray_token"
    env_file: str = "~/.wurst/secrets.env"


@dataclasses.dataclass
class DeployValues:
    name: str
    image: ImageValues
    data_root: str
    jobs: dict[str, JobValues]
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    secret_env: list[str] = dataclasses.field(default_factory=list)
    kubernetes: KubernetesValues = dataclasses.field(default_factory=KubernetesValues)
    launcher: LauncherValues = dataclasses.field(default_factory=LauncherValues)

    def validate(self) -> None:
        if not DNS_LABEL.match(self.name):
            raise ConfigError(f"name: {self.name!r} is not a DNS label (lower-case letters, digits, '-')")
        for key, value in self.env.items():
            if not ENV_NAME.match(key):
                raise ConfigError(f"env.{key}: not an environment variable name")
            if config_lib.SECRET_KEY_PATTERN.search(key):
                raise ConfigError(f"env.{key}: looks like a secret; list it in secret_env (its value then comes "
                                  f"from the Secret, never from a manifest)")
        for i, key in enumerate(self.secret_env):
            if not ENV_NAME.match(key):
                raise ConfigError(f"secret_env[{i}]: {key!r} is not an environment variable name")
        for job in self.jobs:
            if not DNS_LABEL.match(f"{self.name}-{job}") or len(f"{self.name}-{job}") > 40:
                # KubeRay derives pod and service names from the RayJob's name: keep it short.
                raise ConfigError(f"jobs.{job}: '{self.name}-{job}' must be a DNS label of at most 40 characters")


def load_values(path: str = VALUES) -> DeployValues:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    try:
        return config_lib.from_dict(DeployValues, data)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
