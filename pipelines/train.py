"""`python -m pipelines.train --config configs/train-c.yaml`: train Stage C, B or A with DeepSpeed under Ray Train.

One trainer for all stages; what differs per stage (model, objective, input, sample grid, runner) is a
`StageSpec` in ``pipelines.training.specs``. The components live in ``pipelines.training``; this module is
the phase: where the run lives, when it is done, its MLflow run, and the order of things.

How a run works
---------------
* The driver resolves the run: ``<output root>/<run name>`` (default ``<data_root>/runs/<stage>-<version>``,
  the version hashing every setting that changes the weights plus the input's manifest), checks the
  dataset's shapes against the model, opens (or re-opens) the MLflow run and stores its id in
  ``run.json``, then starts a Ray Train ``TorchTrainer`` with ``train.num_workers`` workers.
* Each worker builds the model, an AdamW built in Python with linear warm-up then a constant rate, and
  one DeepSpeed engine (ZeRO 1/2/3, bf16 on GPU, fp32 on CPU with gloo, micro-batch, accumulation,
  explicit clipping). Data come from ``LatentDataset`` (Stage A: ``ImageShardDataset``): each rank its
  own part of a seeded order.
* Every ``checkpoint_every`` steps all ranks save their DeepSpeed shards, RNG states, EMA shards and the
  step into a checkpoint reported through ``ray.train.report``; Ray keeps the last ``keep_checkpoints``.
  Rerunning the same run name resumes from the latest one (same MLflow run, same data order: the data
  position is step x samples per step, counted from the run's start step, and the reader resumes at that
  sample exactly); a crashed worker group is restarted from it by ``FailureConfig(max_failures)``.
* ``model.continue_step_count`` with ``model.init_from`` naming a run's export starts the count at that export's
  step (the paper's resolution schedule: configs/train-b-1024.yaml, train-c-24x24.yaml): LR warm-up, EMA and
  ``max_steps`` go on from there; the step it started at is pinned in ``run.json`` and in the checkpoints.
* Every ``export_every`` steps and at the end, the EMA weights (or the weights, without EMA) are
  gathered from the ZeRO partitions and written as a ``stages`` checkpoint to
  ``<run dir>/export/<step>/<stage>/``; the text encoder / Stage A / Stage B checkpoints the run was trained
  against are copied once to ``export/companions/``, and ``export/latest.json`` names the newest export, so
  ``python -m pipelines.generate --checkpoints <run dir>/export`` (latest) or ``.../export/<step>`` works.
* Rank 0 logs to MLflow: loss (p2-weighted, the objective), unweighted MSE, lr, grad norm, samples/s,
  TFLOP/s and MFU, GPU memory, system metrics, a sample grid every ``sampling.every`` steps, the eval/*
  metrics of the periodic evaluation every ``evaluation.every`` steps (``pipelines.training.periodic_eval``),
  and each export as artifacts ``export/<step>/`` (a new version of ``mlflow.register_model`` when set).
* The MLflow run is named ``<stage>-<preset>-data<input version>-<UTC date>`` (``run_name`` or
  ``mlflow.run_name`` when set); the run directory keeps its version-hash name (tag ``wurst.run_name``).
* The run is complete (and a rerun skips it) once its manifest records ``train.max_steps`` steps; raising
  max_steps resumes the same run and rewrites the manifest.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Optional

from pipelines import manifest as manifest_lib
from pipelines import storage, tracking
from pipelines.config import ConfigError
from pipelines.phase import Context, Outcome, Phase, module_cli
from pipelines.runtime import recover_cwd
from pipelines.training import driver
from pipelines.training.config import EXPORT_DIR, RUNS_DIR, VERSION_EXCLUDES, TrainConfig

log = logging.getLogger(__name__)


class TrainPhase(Phase):
    name = driver.PHASE
    config_class = TrainConfig
    output_subdir = RUNS_DIR
    description = __doc__.splitlines()[0]
    version_exclude = VERSION_EXCLUDES

    # ------------------------------------------------------------------ where the run lives
    def input_uri(self, cfg: TrainConfig) -> str:
        return driver.require_input(cfg)

    def version(self, cfg: TrainConfig, input_id: Optional[str] = None) -> str:
        """The run name: `run_name`, or `<stage>-<version hash>`."""
        return driver.run_name(cfg, input_id)

    def output_root(self, cfg: TrainConfig) -> str:
        return driver.runs_root(cfg)

    def is_complete(self, cfg: TrainConfig, output: str) -> bool:
        """A finished run: its manifest exists and records at least the configured max_steps."""
        if not manifest_lib.has_manifest(output):
            return False
        steps = (manifest_lib.read(output).get("counts") or {}).get("steps") or 0
        return steps >= cfg.train.max_steps

    def existing_details(self, output: str, manifest: dict) -> dict:
        return {"run_dir": output, "run_name": manifest.get("run_name"), "step": (manifest.get("counts") or {}).get("steps"),
                "export": manifest.get("export"), "mlflow_run_id": manifest.get("mlflow_run_id"), "checkpoint": None}

    # ------------------------------------------------------------------ MLflow
    def mlflow_config(self, cfg: TrainConfig) -> tracking.MlflowConfig:
        return dataclasses.replace(cfg.mlflow, system_metrics=False)  # rank 0 records the training node's

    def mlflow_run_name(self, ctx: Context) -> str:
        """Readable in the UI (stage, preset, input version, date); the run dir's name is tag wurst.run_name.
        Used only when the MLflow run is created: a resumed run keeps its name."""
        return driver.mlflow_run_name(ctx.cfg, ctx.input_uri)

    def output_dataset(self, ctx: Context, manifest: dict):
        return None  # a run directory (checkpoints, exports): the input latents are the run's dataset

    def mlflow_tags(self, ctx: Context) -> dict:
        return {"wurst.run_name": ctx.version, "wurst.run_dir": ctx.output, "wurst.stage": ctx.cfg.stage}

    def check_registry(self, cfg: TrainConfig) -> None:
        """`mlflow.register_model`: the registry is reachable and the model exists (created if needed) before
        any training, so an unusable registry stops the run at start-up rather than at its first export."""
        name = cfg.mlflow.register_model
        if not name:
            return
        uri = tracking.tracking_uri_for(cfg.data_root, cfg.mlflow.tracking_uri)
        try:
            tracking.ensure_registered_model(uri, name)
        except Exception as exc:  # noqa: BLE001 - any failure: the registry cannot be used
            raise ConfigError(f"mlflow.register_model: the model registry of {uri} cannot be used to register "
                              f"{name!r}: {type(exc).__name__}: {exc}") from None

    def resume_run_id(self, ctx: Context) -> Optional[str]:
        return (ctx.state["info"] or {}).get("mlflow_run_id")

    # ------------------------------------------------------------------ the work
    def prepare(self, ctx: Context) -> None:
        """Plan the run (ConfigError for a bad config or input) and check a rerun against its run.json.
        (torch was imported before Ray started: `pipelines.training.driver` says why.)"""
        cfg = ctx.cfg
        recover_cwd()  # init_ray re-entered the start directory after connecting; this only guards getcwd
        start_dir = os.getcwd()
        plan = ctx.state["plan"] = driver.plan_run(cfg, driver.resolve_use_gpu(cfg, ctx.ray))
        # On a local multi-node Ray cluster (several raylets sharing one temp dir) a job's working_dir can be
        # re-extracted at the same path after the driver connects, which leaves the driver in a deleted
        # directory: os.getcwd() (MLflow calls it) then fails.
        recover_cwd(start_dir)
        info = ctx.state["info"] = driver.read_run_info(plan.run_dir)
        if info is not None:
            driver.check_resume(cfg, info, plan.run_dir)
            log.info("train: resuming run %s", plan.run_dir)
        self.check_registry(cfg)

    def fit(self, cfg: TrainConfig, plan) -> tuple[Optional[int], Optional[str]]:
        """Train to max_steps under Ray Train; (the last reported step, its checkpoint's path)."""
        result = driver.fit(cfg, plan)
        return (result.metrics or {}).get("step"), result.checkpoint.path if result.checkpoint else None

    def execute(self, ctx: Context) -> Outcome:
        cfg, plan, info = ctx.cfg, ctx.state["plan"], ctx.state["info"]
        if ctx.mlflow_run is not None:
            import mlflow  # already imported: the phase's MLflow run is open

            plan.tracking_uri = mlflow.get_tracking_uri()
            plan.mlflow_run_id = ctx.run_id
            if info is not None and info.get("mlflow_run_id") == plan.mlflow_run_id:
                ctx.set_tags({"wurst.resumed": "true"})
        driver.record_run(cfg, plan, info)
        step, checkpoint = self.fit(cfg, plan)
        summary = {"run_dir": plan.run_dir, "run_name": plan.run_name, "step": step,
                   "export": storage.join(plan.run_dir, EXPORT_DIR), "mlflow_run_id": plan.mlflow_run_id,
                   "checkpoint": checkpoint}
        return Outcome(counts={"steps": summary["step"], "max_steps": cfg.train.max_steps},
                       extra={"stage": cfg.stage, "run_name": plan.run_name, "export": summary["export"]},
                       details=summary)


PHASE = TrainPhase()
# The module-level entry points callers use: run(cfg) -> PhaseResult (`details`: run dir, step, export,
# MLflow run id), main(argv), output_dir(cfg) (the run dir), is_complete(cfg, run_dir).
run, main, output_dir, is_complete = PHASE.run, PHASE.main, PHASE.output_dir, PHASE.is_complete


if __name__ == "__main__":
    module_cli(__spec__.name)
