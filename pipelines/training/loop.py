"""The training loop of one Ray Train worker (`train_worker`, Ray Train's train_loop_per_worker).

The loop is the same for every stage; the stage's runner (from its `StageSpec`) builds the engines and
the data stream and runs a step. Around the steps the loop keeps the EMA, logs the interval metrics
(rank 0 to MLflow), logs the validation loss every `validation.every` steps and at the end (off, with
one log line saying why, when the input has no validation split), saves a checkpoint every
`checkpoint_every` steps (and at the end) through its session (`RaySession`: Ray Train, uploaded
asynchronously; `LocalSession`: one process, no Ray), resumes from the latest one, writes the (EMA)
export every `export_every` steps and at the end (rank 0 logs it to MLflow as artifacts, and registers it
with `mlflow.register_model`), draws sample grids, runs the periodic evaluation (`evaluation.every`), records
the data trace and runs the fault drill. A step whose loss or gradients are not finite is skipped (DeepSpeed
discards its update), counted and left out of the EMA and the metrics; past `train.max_nonfinite_steps` the run
stops, and weights are checked finite before every checkpoint and export (`pipelines.training.nonfinite`).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from typing import Optional

import torch
import torch.distributed as dist

from pipelines import config as config_lib
from pipelines import export_layout, storage, tracking
from pipelines.config import ConfigError
from pipelines.phase import setup_logging
from pipelines.training import checkpoint, collectives, nonfinite
from pipelines.training.config import (COLLECTIVES_DIR, EXPORT_DIR, METRICS_FILE, SAMPLES_DIR, TRACE_DIR, RunPlan,
                                       TrainConfig)
from pipelines.training.ema import ShardedEma
from pipelines.training.engine import ensure_extensions_dir, full_fp32_state_dict
from pipelines.training.metrics import IntervalMetrics, peak_tflops_for
from pipelines.training.runner import Runner
from pipelines.training.session import RaySession, Session
from pipelines.training.specs import spec_for

log = logging.getLogger(__name__)


def make_runner(cfg: TrainConfig, plan: RunPlan, rank: int, world: int, device: torch.device) -> Runner:
    return spec_for(cfg).runner(cfg, plan, rank, world, device)


class WorkerLoop:
    """The training loop of one Ray Train worker; the stage-specific parts come from a runner."""

    def __init__(self, cfg: TrainConfig, plan: RunPlan, session: Session, *, device: Optional[torch.device] = None):
        self.cfg, self.plan, self.session = cfg, plan, session
        self.rank, self.world = session.rank, session.world
        ensure_extensions_dir()
        self.device = device or session.device(plan.use_gpu)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.runner = make_runner(cfg, plan, self.rank, self.world, self.device)
        self.engine = self.runner.engines["model"]
        self.ema = None
        if cfg.ema.enabled:
            self.ema = ShardedEma(self.engine, decay=cfg.ema.decay, start_step=cfg.ema.start_step,
                                  every=cfg.ema.every)
        self.samples_per_step = cfg.train.micro_batch_size * cfg.train.grad_accum_steps  # per rank
        # model.continue_step_count: the count goes on from the init export's step; this run's data position is
        # (step - start_step) x samples per step.
        self.start_step = self.step = plan.start_step
        self.trace: list[str] = []
        self.metric_lines: list[str] = []
        self.mlflow = None
        self.owns_mlflow_run = False  # rank 0 opened the MLflow run (and ends it)
        self.interval = IntervalMetrics(world=self.world, samples_per_step=self.samples_per_step,
                                        num_samples=plan.num_samples, device=self.device, start_step=self.start_step)
        self.validation_off = "validation.every is 0" if not cfg.validation.every else \
            self.runner.validation_unavailable()
        self.nonfinite = nonfinite.NonFiniteSteps(cfg.train.max_nonfinite_steps)

    # ---------------------------------------------------------------- checkpoints
    def save_checkpoint(self, metrics: dict) -> None:
        nonfinite.require_finite_weights(self.engine, self.device, "checkpoint", self.step)
        directory = self.session.new_checkpoint_dir()
        state = None
        if self.rank == 0:
            state = {"step": self.step, "start_step": self.start_step,
                     "samples_per_rank": (self.step - self.start_step) * self.samples_per_step,
                     "world_size": self.world, "zero_stage": self.cfg.train.zero_stage,
                     "engines": sorted(self.runner.engines), "ema": self.ema is not None,
                     "mlflow_run_id": self.plan.mlflow_run_id}
        checkpoint.save(directory, engines=self.runner.engines, generator=self.runner.generator, ema=self.ema,
                        rank=self.rank, train_state=state)
        self._flush_trace()
        self.session.report(metrics, directory, self.step)

    def restore(self) -> None:
        with self.session.latest_checkpoint() as directory:
            if directory is None:
                return
            self.step = checkpoint.restore(directory, engines=self.runner.engines, generator=self.runner.generator,
                                           ema=self.ema, rank=self.rank, world=self.world,
                                           zero_stage=self.cfg.train.zero_stage, start_step=self.start_step)
        log.info("rank %d: resumed at step %d", self.rank, self.step)

    # ---------------------------------------------------------------- consolidated weights
    def full_weights(self) -> Optional[dict]:
        """Full fp32 (EMA if enabled) weights on rank 0, checked finite on every rank; collective."""
        state = self.ema.full_state_dict() if self.ema is not None else full_fp32_state_dict(self.engine)
        nonfinite.require_finite_weights(self.engine, self.device, "export / sample grid / evaluation", self.step,
                                         state)
        return state

    def export(self, state: Optional[dict]) -> None:
        """`export/<step>/`, then `export/latest.json` names it; to MLflow as artifacts `export/<step>/`."""
        if self.rank == 0:
            with torch.random.fork_rng(devices=[]):  # building modules must not move the training RNG
                step_dir = self.runner.write_export(state, storage.join(self.plan.run_dir, EXPORT_DIR), self.step,
                                                    ema=self.ema is not None)
            if self.mlflow is not None:
                self._log_export(step_dir)

    def _log_export(self, step_dir: str) -> None:
        """The step's export directory (the stage checkpoint and export.json) as the run's artifacts
        `export/<step>/`, and with `mlflow.register_model` a registered model version of them. The companions
        (text encoder, Stage A / B: up to GBs, the same at every export) are not logged: export.json names
        their sources and the run dir holds them. A failure here stops the run, as a failed metric log does:
        the export itself is on disk already, and a resume logs the step again (the version is not repeated)."""
        artifact_path = f"{EXPORT_DIR}/{export_layout.step_name(self.step)}"
        # An object-store run dir goes through a local copy.
        self.mlflow.log_artifacts(storage.local_copy(step_dir), artifact_path)
        name = self.cfg.mlflow.register_model
        if name:
            version = tracking.register_artifacts(
                self.plan.tracking_uri, name, self.plan.mlflow_run_id, artifact_path,
                tags={"wurst.run_name": self.plan.run_name, "wurst.stage": self.plan.stage,
                      "wurst.step": str(self.step), "wurst.weights": "ema" if self.ema is not None else "model"})
            log.info("export step %d: registered model %s version %s", self.step, name, version.version)

    def evaluate(self, state: Optional[dict]) -> None:
        """Rank 0: the periodic evaluation's eval/* metrics of the weights `state` (those the export writes:
        the EMA weights when the run has an EMA), logged at this step."""
        if self.rank != 0:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            metrics = self.runner.evaluate(state, self.step)
        self._write_metrics(metrics)

    def sample_grid(self, state: Optional[dict]) -> None:
        """Rank 0: a sample grid to MLflow, or (a run without MLflow) to <run dir>/samples/<step>.png."""
        if self.rank != 0:
            return
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            grid = self.runner.sample_grid(state, self.step)
        if grid is None:
            return
        if self.mlflow is not None:
            self.mlflow.log_image(grid, key="samples", step=self.step)
        else:
            import io

            buffer = io.BytesIO()
            grid.save(buffer, format="PNG")
            storage.write_bytes(storage.join(self.plan.run_dir, SAMPLES_DIR, f"{self.step:09d}.png"), buffer.getvalue())

    # ---------------------------------------------------------------- logging
    def _start_mlflow(self) -> None:
        if self.rank == 0 and self.cfg.mlflow.register_model and not self.plan.mlflow_run_id:
            raise ConfigError("mlflow.register_model: set, but this run has no MLflow run to log its exports to")
        if self.rank != 0 or not self.plan.mlflow_run_id:
            path = storage.join(self.plan.run_dir, METRICS_FILE)
            if self.rank == 0 and storage.exists(path):  # resumed: keep the lines of the steps before
                self.metric_lines = [line for line in storage.read_text(path).splitlines()
                                     if line and json.loads(line)["step"] <= self.step]
            return
        import mlflow  # here: rank 0 alone logs, the other ranks do not pay for importing MLflow

        active = mlflow.active_run()
        # `fit_local` in the process that opened the run (the phase, a test): log to it and leave it open.
        self.owns_mlflow_run = active is None or active.info.run_id != self.plan.mlflow_run_id
        if self.owns_mlflow_run:
            mlflow.set_tracking_uri(self.plan.tracking_uri)
            mlflow.start_run(run_id=self.plan.mlflow_run_id, log_system_metrics=self.cfg.mlflow.system_metrics)
        self.mlflow = mlflow

    def _log_params(self) -> None:
        """Rank 0: what the throughput metrics are computed from (logged once, at the run's first start)."""
        flops = self.interval.flops_per_sample = self.runner.flops_per_sample()
        self.interval.peak_tflops = peak_tflops_for(self.device, self.cfg.metrics.peak_tflops)
        if self.mlflow is not None and self.step == 0:
            self.mlflow.log_params({"derived.flops_per_sample": f"{flops:.4g}",
                                    "derived.world_size": self.world,
                                    "derived.device": str(self.device),
                                    "derived.precision": self.plan.precision,  # auto resolved
                                    "derived.num_samples": self.plan.num_samples})

    def _log(self, extra: Optional[dict[str, float]] = None) -> dict[str, float]:
        """Average the interval's metrics over steps and ranks; rank 0 writes them (and `extra`) to MLflow."""
        out = {**self.interval.reduce(self.step), "nonfinite_steps": float(self.nonfinite.skipped), **(extra or {})}
        self._write_metrics(out)
        return out

    def _write_metrics(self, out: dict[str, float]) -> None:
        if self.rank != 0:
            return
        log.info("step %d: %s", self.step, ", ".join(f"{k}={v:.4g}" for k, v in sorted(out.items())))
        if self.mlflow is not None:
            self.mlflow.log_metrics(out, step=self.step)
        else:  # a run without MLflow (bench/, the GPU smoke test): <run dir>/metrics.jsonl
            self.metric_lines.append(json.dumps({"step": self.step, **out}))
            storage.write_text(storage.join(self.plan.run_dir, METRICS_FILE), "\n".join(self.metric_lines) + "\n")

    # ---------------------------------------------------------------- validation
    def _log_validation_plan(self) -> None:
        if self.rank != 0:
            return
        if self.validation_off:
            log.info("validation off: %s", self.validation_off)
            return
        v = self.cfg.validation
        log.info("validation: val/* every %d steps on %d held-out samples at t=%s (the trained weights%s)",
                 v.every, min(v.max_samples, self.runner.validation_samples), v.timesteps,
                 "; val_ema/*: the EMA weights" if v.ema else "")

    def validate(self) -> dict[str, float]:
        """val/* of the trained weights, and with `validation.ema` val_ema/* of the EMA weights; collective."""
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # neither evaluation nor module building moves the training RNG
            out = self.runner.validation_loss(prefix="val")
            if self.cfg.validation.ema and self.ema is not None:
                with self.ema.swapped_in():
                    state = full_fp32_state_dict(self.engine, on_rank0_only=False)
                module = self.runner.module_from(state, device=self.device)
                del state
                out.update(self.runner.validation_loss(module, prefix="val_ema"))
                del module
        return out

    def _flush_trace(self) -> None:
        if not self.trace:
            return
        first, last = json.loads(self.trace[0])["step"], json.loads(self.trace[-1])["step"]
        path = storage.join(self.plan.run_dir, TRACE_DIR, f"rank-{self.rank:05d}-steps-{first:09d}-{last:09d}.jsonl")
        storage.write_text(path, "\n".join(self.trace) + "\n")
        self.trace = []

    def _maybe_inject_fault(self) -> None:
        fault = self.cfg.fault
        if fault.kill_at_step is None or self.step + 1 != fault.kill_at_step or self.rank != (fault.kill_rank or 0):
            return
        marker = storage.join(self.plan.run_dir, f".fault-injected-step-{fault.kill_at_step}")
        if storage.exists(marker):
            return
        storage.write_text(marker, f"rank {self.rank} killed itself before step {fault.kill_at_step}\n")
        log.warning("fault drill: SIGKILL rank %d before step %d in %.0f s", self.rank, fault.kill_at_step,
                    fault.settle_s)
        sys.stdout.flush()
        time.sleep(fault.settle_s)
        os.kill(os.getpid(), signal.SIGKILL)

    # ---------------------------------------------------------------- main loop
    def write_collective_counts(self, audit: collectives.Audit) -> None:
        path = storage.join(self.plan.run_dir, COLLECTIVES_DIR, f"rank-{self.rank:05d}.json")
        storage.write_json(path, {"device": str(audit.device), "calls": dict(sorted(audit.calls.items()))})

    def run(self) -> None:
        cfg = self.cfg
        self.restore()
        self._start_mlflow()
        try:
            if self.rank == 0:
                self._log_params()
            self._log_validation_plan()
            batches = self.runner.batches(start_sample=(self.step - self.start_step) * self.samples_per_step)
            last_metrics: dict[str, float] = {}
            while self.step < cfg.train.max_steps:
                self._maybe_inject_fault()
                started = time.perf_counter()
                micro = [next(batches) for _ in range(cfg.train.grad_accum_steps)]
                metrics = self.runner.train_step(self.step + 1, micro)
                self.step += 1
                # The same on every rank (DeepSpeed's all-reduced overflow check): all skip, count and stop alike.
                skipped = not self.engine.was_step_applied()
                if skipped:
                    self.nonfinite.skip(self.step, metrics, [i for m in micro for i in self.runner.sample_ids(m)])
                elif self.ema is not None:
                    self.ema.update(self.step)
                if cfg.data.trace:
                    ids = [i for m in micro for i in self.runner.sample_ids(m)]
                    self.trace.append(json.dumps({"step": self.step, "ids": ids}))
                log_due = self.step % cfg.train.log_every == 0 or self.step == cfg.train.max_steps
                if log_due and self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)  # the interval's time includes its queued GPU work
                if not skipped:  # a skipped step's NaN would poison the interval's means
                    self.interval.add(metrics, time.perf_counter() - started)
                # After the interval's clock: evaluation time is not step time. Logged with the step's metrics.
                validation_due = not self.validation_off and (
                    self.step % cfg.validation.every == 0 or self.step == cfg.train.max_steps)
                validation = self.validate() if validation_due else {}
                if log_due:
                    last_metrics = self._log(validation)
                elif validation:
                    self._write_metrics(validation)
                sample_due = cfg.sampling.every and self.step % cfg.sampling.every == 0
                export_due = cfg.train.export_every and self.step % cfg.train.export_every == 0
                evaluation_due = cfg.evaluation.every and self.step % cfg.evaluation.every == 0
                if (sample_due or export_due or evaluation_due) and self.step != cfg.train.max_steps:
                    state = self.full_weights()
                    if export_due:
                        self.export(state)
                    if sample_due:
                        self.sample_grid(state)
                    if evaluation_due:
                        self.evaluate(state)
                    del state
                if self.step % cfg.train.checkpoint_every == 0 or self.step == cfg.train.max_steps:
                    self.save_checkpoint(last_metrics)
            state = self.full_weights()
            self.export(state)
            if cfg.sampling.every:
                self.sample_grid(state)
            if cfg.evaluation.every:
                self.evaluate(state)
            if dist.is_initialized():
                dist.barrier()
        finally:
            if self.mlflow is not None and self.owns_mlflow_run:
                self.mlflow.end_run()


def run_worker(cfg: TrainConfig, plan: RunPlan, session: Session) -> None:
    """Build the worker's loop and run it to max_steps; with `train.audit_collectives`, inside a
    collective device audit from before the first collective (DeepSpeed's set-up) to the end."""
    if not cfg.train.audit_collectives:
        WorkerLoop(cfg, plan, session).run()
        return
    device = session.device(plan.use_gpu)
    with collectives.device_audit(device) as audit:
        loop = WorkerLoop(cfg, plan, session, device=device)
        loop.run()
    loop.write_collective_counts(audit)


def train_worker(loop_config: dict) -> None:
    """Ray Train's train_loop_per_worker: {"config": TrainConfig as a dict, "plan": RunPlan as a dict}."""
    setup_logging()
    cfg = config_lib.from_dict(TrainConfig, loop_config["config"])
    plan = RunPlan(**loop_config["plan"])
    run_worker(cfg, plan, RaySession())
