"""Shared fixtures: a real local Ray cluster started the way users start it (`python -m cluster up`)."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid

import pytest

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
RAY = os.path.join(os.path.dirname(PYTHON), "ray")

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")  # no PyPI call from albumentations
# Two cores shared by the test process and Ray/DeepSpeed workers: one intra-op thread each avoids
# spinning threads fighting over them (measured: a 60+12-step tiny generation took 44 s with 2
# threads and 1.4 s with 1 on a busy machine). Set before anything imports torch.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/wurst/torch_extensions"))
# Embedded Ray in tests binds to 127.0.0.1 instead of the machine's routable address (tests talk to
# loopback only); `python -m cluster up` sets this per node itself.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# An embedded Ray started by a test must not pick up a token meant for a submitted job.
for _var in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
    os.environ.pop(_var, None)
# Each test names its own MLflow store; a tracking URI from the caller's shell must not leak in.
os.environ.pop("MLFLOW_TRACKING_URI", None)


TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclasses.dataclass
class LocalRayCluster:
    state_dir: str
    data_root: str
    dashboard_url: str
    env: dict

    def _ray(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run([RAY, *args], env=self.env, cwd=REPO_ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def _api(self, path: str) -> dict:
        """The job server's REST API, authenticated with the cluster token."""
        with open(self.env["RAY_AUTH_TOKEN_PATH"]) as f:
            token = f.read().strip()
        req = urllib.request.Request(f"{self.dashboard_url}{path}", headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return json.loads(resp.read())

    def status(self, job_id: str) -> str:
        return self._api(f"/api/jobs/{job_id}")["status"]

    def logs(self, job_id: str) -> str:
        return self._api(f"/api/jobs/{job_id}/logs")["logs"]

    def submit_nowait(self, args: list[str], job_id: str | None = None) -> str:
        job_id = job_id or f"test-{uuid.uuid4().hex[:10]}"
        out = self._ray("job", "submit", "--address", self.dashboard_url, "--submission-id", job_id,
                        "--runtime-env", "ray_job.yaml", "--no-wait", "--", *args)
        if out.returncode != 0:
            raise RuntimeError(f"ray job submit failed: {out.stdout}\n{out.stderr}")
        return job_id

    def wait(self, job_id: str, timeout: float = 600) -> tuple[str, str]:
        deadline = time.time() + timeout
        status = "UNKNOWN"
        while time.time() < deadline:
            status = self.status(job_id)
            if status in TERMINAL:
                break
            time.sleep(0.5)  # a REST call; a 2 s poll cost ~1 s per job, ~20 jobs a suite
        else:
            self._ray("job", "stop", "--address", self.dashboard_url, job_id)
        return status, self.logs(job_id)

    def submit(self, args: list[str], timeout: float = 600) -> tuple[str, str]:
        """`ray job submit --runtime-env ray_job.yaml -- ARGS...`; returns (final status, logs)."""
        return self.wait(self.submit_nowait(args), timeout)


def _cluster_cmd(state_dir: str, *args: str) -> subprocess.CompletedProcess:
    # `cluster up` hands MLFLOW_TRACKING_URI to every job; the session cluster's jobs log to its data root.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return subprocess.run([PYTHON, "-m", "cluster", "--state-dir", state_dir, *args], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=400, env=env)


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory):
    """A Ray head + 1 worker node with token auth, on free loopback ports, own temp dir."""
    base = tmp_path_factory.mktemp("ray-cluster")
    state_dir, data_root = str(base / "state"), str(base / "data")
    up = _cluster_cmd(state_dir, "up", "--workers", "1", "--data-root", data_root)
    if up.returncode != 0:
        _cluster_cmd(state_dir, "down")
        pytest.fail(f"python -m cluster up failed:\n{up.stdout}\n{up.stderr}")
    with open(os.path.join(state_dir, "state.json")) as f:
        state = json.load(f)
    env = dict(os.environ)
    env.update({"RAY_ADDRESS": state["dashboard_url"], "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN_PATH": state["token_path"], "WURST_DATA_ROOT": data_root})
    try:
        yield LocalRayCluster(state_dir=state_dir, data_root=data_root, dashboard_url=state["dashboard_url"],
                              env=env)
    finally:
        down = _cluster_cmd(state_dir, "down")
        assert down.returncode == 0, f"cluster down left processes behind: {down.stdout}{down.stderr}"


@pytest.fixture(scope="session")
def demo_workflow_run(ray_cluster, tmp_path_factory):
    """The small demo workflow (120 images, a few optimizer steps), submitted phase by phase with
    `python -m pipelines.workflow --submit` to the session's cluster, once (workflow + MLflow UI tests)."""
    from demo_workflow import submit_small_demo

    return submit_small_demo(ray_cluster, tmp_path_factory.mktemp("workflow"))


@pytest.fixture(scope="module")
def embedded_ray():
    """One private local Ray (2 CPUs) for a module's in-process phase runs (a phase's init_ray then reuses
    it); yields its GCS address, so a phase started in a subprocess can join it (`ray.address=...`)
    instead of starting a second local Ray, which would collide on the dashboard agent's fixed port.
    Shut down, and the RAY_* variables ray.init exports removed, only if this fixture started it."""
    import ray

    from pipelines.runtime import RayConfig, init_ray

    saved_env = dict(os.environ)
    started = not ray.is_initialized()
    # On a loaded 2-core box the raylet and its agents can take longer than Ray's defaults.
    os.environ.setdefault("RAY_raylet_start_wait_time_s", "120")
    os.environ.setdefault("RAY_agent_register_timeout_ms", "120000")
    init_ray(RayConfig(num_cpus=2))  # address="local": never joins another test's `ray start` cluster
    yield ray.get_runtime_context().gcs_address
    if started:
        ray.shutdown()
        os.environ.clear()  # later `ray start` / `cluster up` calls must not inherit this Ray's variables
        os.environ.update(saved_env)
