"""A private local Ray cluster (and optional MLflow server) on this machine.

`up` starts a Ray head with token authentication, dashboard + job server on 127.0.0.1, free ports
and its own temp dir, plus N worker nodes (separate raylets) so multi-node behaviour can be tested
on one machine; optionally `mlflow server` on 127.0.0.1 (SQLite or PostgreSQL store, basic auth on:
see cluster/mlflow_server.py). Every process is
started with `--block` in its own session, so `down` can stop exactly the process groups `up`
started (by pid) and nothing else: never `ray stop`, which kills every Ray on the machine.

The state file (`<state dir>/state.json`) records addresses, pids, the token path and the env vars
a client needs (`python -m cluster env` prints them as shell exports).

Where things listen (Ray 2.60): with no worker nodes the head runs with Ray's multi-node switch off
(`RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`), so every Ray service (GCS, raylet, object manager, workers,
dashboard and runtime-env agents, Ray Client, the Prometheus metrics endpoints) listens on 127.0.0.1 only.
Worker nodes need the switch on, and then Ray replaces a loopback node address by the machine's interface
address and binds the node-to-node services (GCS, raylets, object managers, workers' gRPC, the agents'
and the dashboard's / autoscaler's metrics endpoints) on all interfaces or on that address; no Ray flag
keeps them on loopback. Token authentication still guards Ray's gRPC and HTTP APIs; the Prometheus
endpoints answer without it (read-only metrics). The dashboard / job server and MLflow stay on 127.0.0.1
either way. `up` checks that the job server refuses a request without the token (and the MLflow server one
without credentials, when it has auth on) before it reports the cluster up.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Optional

from cluster import mlflow_server as mlflow_server_lib

DEFAULT_STATE_DIR = os.path.expanduser(os.environ.get("WURST_CLUSTER_DIR", "~/.cache/wurst/cluster"))
LOOPBACK = "127.0.0.1"

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Process:
    role: str
    pid: int
    log: str


@dataclasses.dataclass
class ClusterState:
    state_dir: str
    temp_dir: str
    gcs_address: str
    dashboard_url: str
    token_path: str
    data_root: str
    processes: list[Process]
    mlflow_url: Optional[str] = None
    mlflow_store: Optional[str] = None  # password-free form
    mlflow_username: Optional[str] = None  # set when the server has basic auth on
    mlflow_password_path: Optional[str] = None  # 0600 file: the password is never in the state file

    @property
    def env(self) -> dict[str, str]:
        """Environment a client needs to talk to this cluster (ray job submit, MLflow)."""
        env = {
            "RAY_ADDRESS": self.dashboard_url,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": self.token_path,
            "WURST_DATA_ROOT": self.data_root,
        }
        if self.mlflow_url:
            env["MLFLOW_TRACKING_URI"] = self.mlflow_url
        if self.mlflow_username:
            env["MLFLOW_TRACKING_USERNAME"] = self.mlflow_username
        return env

    def save(self) -> None:
        path = state_file(self.state_dir)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(dataclasses.asdict(self), f, indent=2)
        os.replace(tmp, path)

    @classmethod
    def load(cls, state_dir: str) -> "ClusterState":
        with open(state_file(state_dir)) as f:
            data = json.load(f)
        data["processes"] = [Process(**p) for p in data["processes"]]
        return cls(**data)


def state_file(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (held open together so they differ)."""
    socks, ports = [], []
    try:
        while len(ports) < n:
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((LOOPBACK, 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _ray_binary() -> str:
    candidate = os.path.join(os.path.dirname(sys.executable), "ray")
    return candidate if os.path.exists(candidate) else shutil.which("ray") or "ray"


def _ephemeral_low() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def _node_port_args(head: bool) -> list[str]:
    # Every port explicit and free: two clusters on one machine otherwise collide (6379, 8265, 52365).
    p = free_ports(7)
    args = [
        "--node-manager-port", str(p[0]), "--object-manager-port", str(p[1]),
        "--dashboard-agent-listen-port", str(p[2]), "--dashboard-agent-grpc-port", str(p[3]),
        "--runtime-env-agent-port", str(p[4]), "--metrics-export-port", str(p[5]),
    ]
    # Worker ports: a random 200-port window; Ray probes and skips busy ones. It lies below the kernel's
    # ephemeral range, where free_ports() draws the ports above: Ray refuses to start when the window
    # holds one of them (seen: "worker_ports is trying to use a port number ... used by other components").
    base = 10000 + secrets.randbelow(max(1, _ephemeral_low() - 200 - 10000))
    args += ["--min-worker-port", str(base), "--max-worker-port", str(base + 199)]
    if head:
        args += ["--ray-client-server-port", str(p[6])]
    return args


def _spawn(cmd: list[str], log_path: str, env: dict[str, str]) -> subprocess.Popen:
    log = open(log_path, "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True, close_fds=True)


def _http_ok(url: str, token: str | None = None, timeout: float = 2.0) -> bool:
    req = urllib.request.Request(url)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return 200 <= resp.status < 300
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _alive_nodes(dashboard_url: str, token: str) -> int:
    req = urllib.request.Request(f"{dashboard_url}/nodes?view=summary")
    req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=3) as resp:
            data = json.loads(resp.read())
    except (urllib.error.URLError, OSError, ValueError):
        return -1
    summary = data.get("data", {}).get("summary", [])
    return sum(1 for n in summary if n.get("raylet", {}).get("state") == "ALIVE")


def unauthenticated_answer(url: str) -> Optional[str]:
    """What `url` answered to a request without credentials, or None when it refused it (401 / 403)."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url), timeout=5) as resp:
            return f"GET {url} without credentials answered {resp.status}"
    except urllib.error.HTTPError as exc:
        return None if exc.code in (401, 403) else f"GET {url} without credentials answered {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return f"GET {url} failed ({exc})"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return True


def up(*, attempts: int = 3, **kwargs) -> ClusterState:
    """Start the cluster; retried because Ray's raylet gives up after a fixed 30 s when the machine
    is overloaded (seen on busy 2-core boxes)."""
    for attempt in range(1, attempts + 1):
        try:
            return _up_once(**kwargs)
        except RuntimeError as exc:
            if "exited during start-up" not in str(exc) or attempt == attempts:
                raise
            log.warning("cluster start-up failed (%s); retrying (%d/%d)", exc, attempt, attempts)
    raise AssertionError("unreachable")


def _up_once(*, workers: int = 0, mlflow_server: bool = False, state_dir: str = DEFAULT_STATE_DIR,
       data_root: str | None = None, cpus_per_node: int | None = None, timeout: float = 180.0,
       mlflow_options: "mlflow_server_lib.MlflowServerOptions | None" = None) -> ClusterState:
    state_dir = os.path.abspath(state_dir)
    if os.path.exists(state_file(state_dir)):
        existing = ClusterState.load(state_dir)
        if any(_pid_alive(p.pid) for p in existing.processes):
            raise RuntimeError(f"a cluster from {state_dir} is already up ({existing.dashboard_url}); "
                               f"run `python -m cluster down --state-dir {state_dir}` first")
    os.makedirs(state_dir, exist_ok=True)
    # Ray's unix socket paths must stay short (< 108 chars), so the temp dir lives under /tmp.
    temp_dir = tempfile.mkdtemp(prefix="wurst-ray-", dir="/tmp")
    token_path = os.path.join(state_dir, "auth_token")
    with open(os.open(token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(secrets.token_hex(32))
    with open(token_path) as f:
        token = f.read().strip()
    data_root = os.path.abspath(data_root or os.environ.get("WURST_DATA_ROOT") or "data")
    os.makedirs(data_root, exist_ok=True)

    gcs_port, dash_port, mlflow_port = free_ports(3)
    state = ClusterState(state_dir=state_dir, temp_dir=temp_dir, gcs_address=f"{LOOPBACK}:{gcs_port}",
                         dashboard_url=f"http://{LOOPBACK}:{dash_port}", token_path=token_path,
                         data_root=data_root, processes=[])
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path, "RAY_USAGE_STATS_ENABLED": "0",
                "WURST_DATA_ROOT": data_root})
    # Job entrypoints say `python -m ...`: make that the interpreter that started the cluster.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/wurst/torch_extensions"))

    if mlflow_server:
        try:
            server = mlflow_server_lib.plan(mlflow_options or mlflow_server_lib.MlflowServerOptions(),
                                            state_dir=state_dir, data_root=data_root, host=LOOPBACK, port=mlflow_port)
        except mlflow_server_lib.MlflowServerError:
            shutil.rmtree(temp_dir, ignore_errors=True)  # nothing started yet
            raise
        log = os.path.join(state_dir, "mlflow.log")
        proc = _spawn(server.cmd, log, dict(env, **server.server_env))
        state.processes.append(Process("mlflow", proc.pid, log))
        state.mlflow_url = f"http://{LOOPBACK}:{mlflow_port}"
        state.mlflow_store = server.store_display
        state.mlflow_username, state.mlflow_password_path = server.username, server.password_path
        # Jobs (and every Ray worker, on every node) inherit the nodes' environment: they log to the server
        # with its credentials, which thus appear on no command line and in no job's runtime env.
        env["MLFLOW_TRACKING_URI"] = state.mlflow_url
        env.update(server.client_env)

    cpu_args = ["--num-cpus", str(cpus_per_node)] if cpus_per_node else []
    # A single node: Ray's multi-node switch off keeps every Ray service on 127.0.0.1. Worker nodes need it
    # on, and then Ray moves the node-to-node services off loopback (see the module docstring).
    head_env = dict(env, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="1" if workers else "0")
    # The dashboard's and the autoscaler's metrics endpoints default to fixed ports (44227, 44217), which a
    # second cluster on this machine would collide with.
    dashboard_metrics_port, autoscaler_metrics_port = free_ports(2)
    head_env.update(DASHBOARD_METRIC_PORT=str(dashboard_metrics_port),
                    AUTOSCALER_METRIC_PORT=str(autoscaler_metrics_port))
    worker_env = head_env
    if workers:
        logging.getLogger(__name__).warning(  # (`log` names a log file's path in this function)
            "cluster up --workers %d: Ray binds its node-to-node services (GCS, raylets, object managers, metrics "
            "endpoints) to this machine's network address, not only 127.0.0.1; token authentication guards its "
            "APIs, the metrics endpoints answer without it", workers)
    head_cmd = [_ray_binary(), "start", "--head", "--block", "--node-ip-address", LOOPBACK,
                "--port", str(gcs_port), "--dashboard-host", LOOPBACK, "--dashboard-port", str(dash_port),
                "--include-dashboard", "true", "--temp-dir", temp_dir, "--disable-usage-stats",
                *cpu_args, *_node_port_args(head=True)]
    log = os.path.join(state_dir, "ray-head.log")
    proc = _spawn(head_cmd, log, head_env)
    state.processes.append(Process("ray-head", proc.pid, log))
    state.save()  # so `down` can clean up even if start-up fails below

    def wait(check, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if check():
                return
            dead = [p for p in state.processes if not _pid_alive(p.pid)]
            if dead:
                raise RuntimeError(f"{dead[0].role} exited during start-up; see {dead[0].log}")
            time.sleep(0.5)
        raise TimeoutError(f"{what} not ready after {timeout:.0f}s; see logs in {state_dir}")

    try:
        wait(lambda: _http_ok(f"{state.dashboard_url}/api/version", token), "Ray dashboard/job server")
        for i in range(workers):
            cmd = [_ray_binary(), "start", "--block", "--address", state.gcs_address,
                   "--disable-usage-stats", *cpu_args, *_node_port_args(head=False)]
            log = os.path.join(state_dir, f"ray-worker-{i}.log")
            proc = _spawn(cmd, log, worker_env)
            state.processes.append(Process(f"ray-worker-{i}", proc.pid, log))
        state.save()
        wait(lambda: _alive_nodes(state.dashboard_url, token) >= 1 + workers, f"{1 + workers} Ray nodes")
        if mlflow_server:
            wait(lambda: _http_ok(f"{state.mlflow_url}/health"), "MLflow server")
        # Before reporting it up: a request without the token must be refused (token auth really on).
        checks = [f"{state.dashboard_url}/api/jobs/"]
        if mlflow_server and state.mlflow_username:
            checks.append(f"{state.mlflow_url}/api/2.0/mlflow/experiments/search?max_results=1")
        answered = [a for a in map(unauthenticated_answer, checks) if a is not None]
        if answered:
            raise RuntimeError("refusing to report the cluster up: authentication is not in force: "
                               + "; ".join(answered))
    except BaseException:
        down(state_dir=state_dir)
        raise
    return state


def _session_pids(temp_dir: str) -> list[int]:
    """Processes whose command line mentions our private temp dir: ours by construction."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if temp_dir in cmdline:
            pids.append(int(entry))
    return pids


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _kill_group(pid: int, sig: int) -> None:
    try:
        os.killpg(pid, sig)  # each process was started as its own session leader
    except (ProcessLookupError, PermissionError):
        _signal(pid, sig)


def _group_members(pgid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes in process group `pgid`, its leader excluded."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == pgid:
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            members.append((int(entry), cmdline))
    return members


def _shutdown_waves(state: ClusterState) -> list[list[int]]:
    """The Ray daemons `up` started, in the order they stop gracefully: worker nodes, then the head's raylet,
    agents and dashboard, then its autoscaler monitor, then the GCS. Signalled all at once, the
    GCS and the monitor wait on each other and outlive any grace (measured: > 15 s); in this order each wave
    exits in under a second. The `ray start --block` leaders only watch their daemons; they are killed after."""
    by_role = {p.role: p.pid for p in state.processes}
    waves: list[list[int]] = [[pid for role, leader in by_role.items() if role.startswith("ray-worker")
                               for pid, _ in _group_members(leader)]]
    head = _group_members(by_role["ray-head"]) if "ray-head" in by_role else []
    gcs = [pid for pid, cmd in head if "gcs_server" in cmd]
    monitor = [pid for pid, cmd in head if "autoscaler/_private/monitor.py" in cmd]
    waves += [[pid for pid, _ in head if pid not in gcs + monitor], monitor, gcs]
    return [w for w in waves if w]


def down(*, state_dir: str = DEFAULT_STATE_DIR, grace: float = 15.0) -> list[int]:
    """Stop what `up` started (workers first, then head, then MLflow); returns leftover pids (empty).
    `grace` bounds the whole graceful part; whatever is still running after it is killed."""
    state_dir = os.path.abspath(state_dir)
    if not os.path.exists(state_file(state_dir)):
        return []
    state = ClusterState.load(state_dir)
    order = sorted(state.processes, key=lambda p: {"ray-head": 1, "mlflow": 2}.get(p.role, 0))
    deadline = time.time() + grace
    mlflow = [p.pid for p in state.processes if p.role == "mlflow"]
    for wave, send in [(w, _signal) for w in _shutdown_waves(state)] + [(mlflow, _kill_group)]:
        for pid in wave:  # MLflow's whole group: the server and its gunicorn workers
            send(pid, signal.SIGTERM)
        while time.time() < deadline and any(_pid_alive(pid) for pid in wave):
            time.sleep(0.05)
    for proc in order:
        _kill_group(proc.pid, signal.SIGKILL)
    # Ray daemons that escaped the process groups still name our temp dir on their command line.
    # Swept until none is left (a few seconds at most): on a loaded machine a killed process can take a
    # moment to go, and a dying raylet can still be starting an agent.
    sweep_deadline = time.time() + 5.0
    while True:
        for pid in _session_pids(state.temp_dir):
            _kill_group(pid, signal.SIGKILL)
        time.sleep(0.2)
        leftovers = [p for p in _session_pids(state.temp_dir) if _pid_alive(p)]
        leftovers += [p.pid for p in order if _pid_alive(p.pid)]
        if not leftovers or time.time() > sweep_deadline:
            break
    shutil.rmtree(state.temp_dir, ignore_errors=True)
    if not leftovers:
        os.remove(state_file(state_dir))
    return leftovers


def status(*, state_dir: str = DEFAULT_STATE_DIR) -> dict:
    state_dir = os.path.abspath(state_dir)
    if not os.path.exists(state_file(state_dir)):
        return {"up": False, "state_dir": state_dir}
    state = ClusterState.load(state_dir)
    with open(state.token_path) as f:
        token = f.read().strip()
    procs = {p.role: {"pid": p.pid, "alive": _pid_alive(p.pid)} for p in state.processes}
    return {
        "up": all(p["alive"] for p in procs.values()),
        "state_dir": state_dir,
        "dashboard_url": state.dashboard_url,
        "gcs_address": state.gcs_address,
        "mlflow_url": state.mlflow_url,
        "token_path": state.token_path,
        "data_root": state.data_root,
        "alive_nodes": _alive_nodes(state.dashboard_url, token),
        "processes": procs,
    }
