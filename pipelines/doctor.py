"""`python -m pipelines.doctor`: prove the plumbing.

Prints library versions, the accelerator and the Ray cluster's resources, and logs them as an
MLflow run in the `wurst-doctor` experiment. Submit it with `ray job submit` to check a cluster.
"""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata

from pipelines import config as config_lib
from pipelines import tracking
from pipelines.phase import module_cli
from pipelines.runtime import RayConfig, default_data_root, init_ray

PACKAGES = ["torch", "torchvision", "ray", "deepspeed", "mlflow", "img2dataset", "webdataset", "pyarrow",
            "open_clip_torch", "timm", "safetensors", "numpy"]


@dataclasses.dataclass
class DoctorConfig:
    data_root: str = dataclasses.field(default_factory=default_data_root)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=tracking.MlflowConfig)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    return out


def accelerator() -> dict:
    import torch

    info = {"cuda_available": torch.cuda.is_available(), "device_count": torch.cuda.device_count()}
    if info["cuda_available"]:
        info["devices"] = [torch.cuda.get_device_name(i) for i in range(info["device_count"])]
        info["bf16_supported"] = torch.cuda.is_bf16_supported()
    else:
        info["devices"] = [platform.processor() or platform.machine()]
    info["torch_threads"] = torch.get_num_threads()
    return info


def cluster_resources(cfg: RayConfig) -> dict:
    ray = init_ray(cfg)
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return {"nodes": len(nodes), "resources": ray.cluster_resources()}


def main(argv: list[str] | None = None) -> dict:
    parser = config_lib.argument_parser(__doc__.splitlines()[0], prog="python -m pipelines.doctor")
    cfg = config_lib.load_from_args(DoctorConfig, parser.parse_args(argv))
    report = {"versions": versions(), "accelerator": accelerator(), "cluster": cluster_resources(cfg.ray)}
    with tracking.start_run("doctor", cfg, data_root=cfg.data_root, mlflow_cfg=cfg.mlflow,
                            run_name="doctor") as run:
        if run is not None:
            import mlflow

            mlflow.log_params({f"version.{k}": v for k, v in report["versions"].items()})
            mlflow.log_metrics({"cluster.nodes": report["cluster"]["nodes"],
                                "cluster.cpus": report["cluster"]["resources"].get("CPU", 0),
                                "cluster.gpus": report["cluster"]["resources"].get("GPU", 0)})
            mlflow.log_dict(report, "doctor.json")
            report["mlflow_run_id"] = run.info.run_id
            report["mlflow_tracking_uri"] = mlflow.get_tracking_uri()
    print(json.dumps(report, indent=2, default=str))
    return report


if __name__ == "__main__":
    module_cli(__spec__.name)
