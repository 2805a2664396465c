"""`python -m pipelines.workflow --config FILE [--submit]`: run the phases in order.

A workflow config lists steps; each names a phase module, its YAML config and overrides, and where
its input comes from (an explicit URI, or the output of an earlier step). Before running a step the
driver resolves the step's config exactly as the phase would and asks the phase for its
`output_dir(cfg)`: the output version is derived from config + input, so a step whose output
already has its completion marker (`manifest.json`) is skipped as up to date, and a step that
failed part-way is simply run again and resumes. A changed setting changes that step's version
and therefore the inputs (and versions) of every step downstream of it, which rerun; nothing
upstream does.

Without `--submit`, steps run in this process on one embedded local Ray. With `--submit`, each
step is sent to the configured Ray cluster as a Ray job (`python -m <module> ...` with the runtime env of
ray_job.yaml, through the job-submission API that `ray job submit` uses) and the driver waits for it to
succeed before the next one.

Step kinds: `phase` (a pipelines module defining `PHASE`, a `pipelines.phase.Phase`) and `generate`
(images from the exports of the training steps, see `GenerateStep`).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import json
import logging
import os
import shlex
import time
import urllib.request
from typing import Any, Literal, Optional

import yaml

from pipelines import config as config_lib
from pipelines import export_layout
from pipelines import manifest as manifest_lib
from pipelines import storage
from pipelines.config import ConfigError, param
from pipelines.phase import Phase, module_cli
from pipelines.runtime import RayConfig, default_data_root

log = logging.getLogger(__name__)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class GenerateStep:
    """Sample images from trained exports: which step provides each component."""
    stage_c_from: str = "train_c"
    stage_b_from: str = "train_b"
    stage_a_from: str = "train_a"
    text_from: str = "encoders"
    prompts: list[str] = dataclasses.field(default_factory=lambda: ["a red circle at the centre on a white background"])
    n: int = param(2, ge=1)
    height: int = param(1024, ge=8)
    width: int = param(1024, ge=8)
    seed: int = 0
    steps_c: Optional[str] = None  # default: the paper's 60 (or "fast": the 29-step schedule)
    steps_b: Optional[int] = param(None, ge=1)
    guidance_c: Optional[float] = param(None, ge=0.0)
    guidance_b: Optional[float] = param(None, ge=0.0)


@dataclasses.dataclass
class StepConfig:
    name: str
    kind: Literal["phase", "generate"] = "phase"
    module: Optional[str] = None  # e.g. pipelines.filter (kind: phase)
    config: Optional[str] = None  # the phase's YAML config (path relative to the repo root or absolute)
    set: list[str] = dataclasses.field(default_factory=list)  # KEY=VALUE overrides of the phase config
    input: Optional[str] = None  # explicit input URI
    input_from: Optional[str] = None  # name of an earlier step whose output is this step's input
    # Config keys filled from earlier steps' outputs: {"encoders.text": "encoders/text"} sets the key
    # to <output of step encoders>/text.
    set_from: dict[str, str] = dataclasses.field(default_factory=dict)
    generate: GenerateStep = dataclasses.field(default_factory=GenerateStep)
    enabled: bool = True


@dataclasses.dataclass
class SubmitConfig:
    address: Optional[str] = None  # job server URL; default $RAY_ADDRESS (see `python -m cluster env`)
    runtime_env: str = "ray_job.yaml"
    timeout_s: float = param(24 * 3600.0, gt=0)
    poll_s: float = param(3.0, gt=0)


@dataclasses.dataclass
class WorkflowConfig:
    data_root: str = dataclasses.field(default_factory=default_data_root)
    steps: list[StepConfig] = dataclasses.field(default_factory=list)
    # Serve this directory on its recorded loopback port while the workflow runs (the demo dataset).
    serve_demo: Optional[str] = None
    submit: SubmitConfig = dataclasses.field(default_factory=SubmitConfig)
    ray: RayConfig = dataclasses.field(default_factory=RayConfig)

    def validate(self) -> None:
        seen: set[str] = set()
        for i, step in enumerate(self.steps):
            where = f"steps[{i}]"
            if step.name in seen:
                raise ConfigError(f"{where}.name: duplicate step name {step.name!r}")
            if step.kind == "phase" and not step.module:
                raise ConfigError(f"{where}.module: required for a phase step")
            refs = [step.input_from] + [v.split("/", 1)[0] for v in step.set_from.values()]
            if step.kind == "generate":
                g = step.generate
                refs += [g.stage_c_from, g.stage_b_from, g.stage_a_from, g.text_from]
            for ref in refs:
                if ref and ref not in seen:
                    raise ConfigError(f"{where}: refers to step {ref!r}, which is not an earlier step")
            seen.add(step.name)


# ------------------------------------------------------------------------------------------------


def _abs_config_path(path: str | None) -> str | None:
    if not path or "://" in path or os.path.isabs(path):
        return path
    return os.path.join(REPO_ROOT, path)


def phase_of(step: StepConfig) -> Phase:
    """The `Phase` a step's module defines (its `PHASE`)."""
    try:
        module = importlib.import_module(step.module)
    except ImportError as exc:
        raise ConfigError(f"step {step.name!r}: module {step.module}: {exc}") from None
    phase = getattr(module, "PHASE", None)
    if not isinstance(phase, Phase):
        raise ConfigError(f"step {step.name!r}: {step.module} is not a phase module (it defines no PHASE)")
    return phase


def step_overrides(step: StepConfig, cfg: WorkflowConfig, outputs: dict[str, str]) -> list[str]:
    overrides = [f"data_root={json.dumps(cfg.data_root)}"]
    if step.input:
        overrides.append(f"input={json.dumps(step.input)}")
    if step.input_from:
        overrides.append(f"input={json.dumps(outputs[step.input_from])}")
    for key, ref in step.set_from.items():
        name, _, sub = ref.partition("/")
        overrides.append(f"{key}={json.dumps(storage.join(outputs[name], sub) if sub else outputs[name])}")
    return overrides + list(step.set)


@dataclasses.dataclass
class PlannedStep:
    step: StepConfig
    output: str
    up_to_date: bool
    argv: list[str]


def plan_phase(step: StepConfig, cfg: WorkflowConfig, outputs: dict[str, str]) -> PlannedStep:
    phase = phase_of(step)
    overrides = step_overrides(step, cfg, outputs)
    config_path = _abs_config_path(step.config)
    try:
        phase_cfg = config_lib.load(phase.config_class, config_path, overrides)
    except ConfigError as exc:
        raise ConfigError(f"step {step.name!r} ({step.module}): {exc}") from None
    out = phase.output_dir(phase_cfg)
    argv = (["--config", config_path] if config_path else []) + [a for o in overrides for a in ("--set", o)]
    return PlannedStep(step, out, phase.is_complete(phase_cfg, out), argv)


def plan_generate(step: StepConfig, cfg: WorkflowConfig, outputs: dict[str, str]) -> PlannedStep:
    g = step.generate
    sources = {
        # A run's export/<kind>: the latest export's weights (pipelines.export_layout).
        **{kind: export_layout.resolve_checkpoint(storage.join(outputs[source], "export", kind))
           for kind, source in (("stage_c", g.stage_c_from), ("stage_b", g.stage_b_from), ("stage_a", g.stage_a_from))},
        "text": storage.join(outputs[g.text_from], "text"),
    }
    identity = {"sources": {k: manifest_lib.hash_bytes(storage.read_bytes(storage.join(v, "model.safetensors")))
                            if storage.exists(storage.join(v, "model.safetensors")) else v
                            for k, v in sources.items()},
                "settings": config_lib.to_dict(g)}
    version = manifest_lib.hash_bytes(json.dumps(identity, sort_keys=True).encode())[:12]
    out = storage.join(cfg.data_root, "generated", version)
    argv = ["--checkpoints", storage.join(out, "checkpoints"), "--out", out, "--n", str(g.n),
            "--height", str(g.height), "--width", str(g.width), "--seed", str(g.seed)]
    for prompt in g.prompts:
        argv += ["--prompt", prompt]
    for flag, value in (("--steps-c", g.steps_c), ("--steps-b", g.steps_b), ("--guidance-c", g.guidance_c),
                        ("--guidance-b", g.guidance_b)):
        if value is not None:
            argv += [flag, str(value)]
    planned = PlannedStep(step, out, storage.exists(storage.join(out, "generation.json")), argv)
    planned.sources = sources  # type: ignore[attr-defined]
    return planned


def link_checkpoints(out: str, sources: dict[str, str]) -> None:
    """generate reads one directory with stage_c/ stage_b/ stage_a/ text/: link the exports there."""
    local = storage.local_path(out)
    if local is None:
        raise ConfigError("data_root: the generate step needs a local or shared filesystem data_root")
    ckpt = os.path.join(local, "checkpoints")
    os.makedirs(ckpt, exist_ok=True)
    for name, src in sources.items():
        src = export_layout.resolve_checkpoint(src)  # planned before the run trained: resolve now
        dst = os.path.join(ckpt, name)
        if os.path.islink(dst) or os.path.exists(dst):
            continue
        if storage.is_remote(src):  # an export on an object store: its local copy (cached, made once)
            src = storage.local_copy(src)
        if not os.path.isdir(src):
            raise FileNotFoundError(f"generate: {name} checkpoint not found at {src}")
        os.symlink(os.path.abspath(src), dst)


# ------------------------------------------------------------------------------------------------
# Running a step


def run_embedded(planned: PlannedStep) -> None:
    step = planned.step
    if step.kind == "generate":
        from pipelines import generate

        link_checkpoints(planned.output, planned.sources)  # type: ignore[attr-defined]
        generate.main(planned.argv)
        return
    phase_of(step).main(planned.argv)


def _auth_headers() -> dict[str, str]:
    """The cluster token, looked up where `ray job submit` looks (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH)."""
    token = os.environ.get("RAY_AUTH_TOKEN")
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    if not token and os.path.exists(token_path):
        token = open(token_path).read().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def _job_api(address: str, path: str, data: dict | None = None) -> dict:
    req = urllib.request.Request(f"{address.rstrip('/')}{path}",
                                 data=json.dumps(data).encode() if data is not None else None,
                                 headers={"Content-Type": "application/json", **_auth_headers()})
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


@functools.lru_cache(maxsize=None)
def _job_client(address: str):
    """One job-submission client per workflow run: what `ray job submit` does, without a ~3 s CLI start per step."""
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=_auth_headers())


def _runtime_env(path: str) -> dict:
    """The runtime-env YAML, its local working_dir resolved as the CLI would from the repo root."""
    with open(path) as f:
        env = yaml.safe_load(f) or {}
    working_dir = env.get("working_dir")
    if working_dir and "://" not in working_dir and not os.path.isabs(working_dir):
        env["working_dir"] = os.path.join(REPO_ROOT, working_dir)
    return env


def _relative_to_repo(arg: str) -> str:
    """Config files inside the repo travel with the job's working dir: refer to them relatively."""
    prefix = REPO_ROOT + os.sep
    return arg[len(prefix):] if arg.startswith(prefix) and os.path.isfile(arg) else arg


def run_submitted(planned: PlannedStep, cfg: WorkflowConfig) -> None:
    """Submit the step as a Ray job, wait for a terminal state; raise unless SUCCEEDED."""
    address = cfg.submit.address or os.environ.get("RAY_ADDRESS")
    if not address or not address.startswith("http"):
        raise ConfigError("submit.address: set it (or RAY_ADDRESS) to the cluster's job server URL, "
                          "e.g. from `eval \"$(python -m cluster env)\"`")
    step = planned.step
    if step.kind == "generate":
        link_checkpoints(planned.output, planned.sources)  # type: ignore[attr-defined]
        module = "pipelines.generate"
    else:
        module = step.module
    job_id = f"wurst-{step.name}-{int(time.time())}-{os.getpid()}"
    entrypoint = shlex.join(["python", "-m", module, *[_relative_to_repo(a) for a in planned.argv]])
    try:
        _job_client(address).submit_job(entrypoint=entrypoint, submission_id=job_id,
                                        runtime_env=_runtime_env(_abs_config_path(cfg.submit.runtime_env)))
    except Exception as exc:  # the SDK raises RuntimeError / ConnectionError / AuthenticationError
        raise RuntimeError(f"submitting step {step.name!r} to {address} failed: {exc}") from exc
    log.info("%s: submitted job %s", step.name, job_id)
    deadline = time.time() + cfg.submit.timeout_s
    status = "PENDING"
    while time.time() < deadline:
        status = _job_api(address, f"/api/jobs/{job_id}")["status"]
        if status in ("SUCCEEDED", "FAILED", "STOPPED"):
            break
        time.sleep(cfg.submit.poll_s)
    if status != "SUCCEEDED":
        logs = _job_api(address, f"/api/jobs/{job_id}/logs").get("logs", "")
        raise RuntimeError(f"step {step.name!r}: job {job_id} ended {status}; last logs:\n{logs[-4000:]}")


def run(cfg: WorkflowConfig, submit: bool = False) -> dict[str, dict[str, Any]]:
    """Run (or skip) every enabled step in order; returns {step: {output, status, seconds}}."""
    server = None
    if cfg.serve_demo:
        from pipelines import demo_data

        info = json.load(open(os.path.join(cfg.serve_demo, demo_data.DEMO_FILE)))
        server = demo_data.serve(cfg.serve_demo, info["port"])
    outputs: dict[str, str] = {}
    summary: dict[str, dict[str, Any]] = {}
    try:
        for step in cfg.steps:
            if not step.enabled:
                continue
            planned = plan_generate(step, cfg, outputs) if step.kind == "generate" else plan_phase(step, cfg, outputs)
            outputs[step.name] = planned.output
            if planned.up_to_date:
                log.info("%s: up to date (%s)", step.name, planned.output)
                summary[step.name] = {"output": planned.output, "status": "skipped", "seconds": 0.0}
                continue
            log.info("%s: running -> %s", step.name, planned.output)
            start = time.time()
            if submit:
                run_submitted(planned, cfg)
            else:
                from pipelines.runtime import init_ray

                if step.kind == "phase":
                    init_ray(cfg.ray)  # one embedded Ray for every step
                run_embedded(planned)
            if step.kind == "phase" and not manifest_lib.has_manifest(planned.output):
                raise RuntimeError(f"step {step.name!r} finished but {planned.output} has no manifest.json")
            summary[step.name] = {"output": planned.output, "status": "ran", "seconds": round(time.time() - start, 1)}
            log.info("%s: done in %s s", step.name, summary[step.name]["seconds"])
    finally:
        if server is not None:
            server.shutdown()
    return summary


def main(argv: list[str] | None = None) -> dict:
    parser = config_lib.argument_parser(__doc__.splitlines()[0], prog="python -m pipelines.workflow")
    parser.add_argument("--submit", action="store_true",
                        help="submit each step to the Ray cluster at $RAY_ADDRESS as a `ray job submit` job")
    args = parser.parse_args(argv)
    cfg = config_lib.load_from_args(WorkflowConfig, args)
    summary = run(cfg, submit=args.submit)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    module_cli(__spec__.name)
