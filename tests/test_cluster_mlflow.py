"""The shared MLflow of `python -m cluster up --mlflow-server`: a PostgreSQL store (a real server this test
starts with initdb / pg_ctl), artifacts on the configured root, MLflow's basic-auth app; a Ray job's driver
and a Ray task on another node log to it with credentials that only the environment carries, and a request
without them is refused."""

from __future__ import annotations

import base64
import configparser
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from cluster import mlflow_server
from conftest import REPO_ROOT, LocalRayCluster
from pipelines.config import ConfigError

PYTHON = sys.executable


def _status(url: str, auth: tuple[str, str] | None = None, host: str | None = None) -> int:
    """The HTTP status of a GET (the server's answer, errors included); `host`: the Host header to send."""
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    if auth:
        req.add_header("Authorization", "Basic " + base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode())
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


def _stop(proc: subprocess.Popen) -> None:
    """A server started in its own process group: SIGTERM, then SIGKILL after 20 s."""
    from cluster import local

    local._kill_group(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        local._kill_group(proc.pid, signal.SIGKILL)
        proc.wait(timeout=20)


# ---------------------------------------------------------------- options, files (no server)

def test_password_in_a_command_line_store_uri_is_refused(tmp_path):
    options = mlflow_server.MlflowServerOptions(backend_store_uri="postgresql://u:hunter2@127.0.0.1:5432/m")
    with pytest.raises(mlflow_server.MlflowServerError, match="--mlflow-backend-store-uri: .*password"):
        mlflow_server.plan(options, state_dir=str(tmp_path), data_root=str(tmp_path), host="127.0.0.1", port=1)


def test_store_uri_must_be_a_database(tmp_path):
    options = mlflow_server.MlflowServerOptions(backend_store_uri="/some/dir")
    with pytest.raises(mlflow_server.MlflowServerError, match="--mlflow-backend-store-uri: expected a database URI"):
        mlflow_server.plan(options, state_dir=str(tmp_path), data_root=str(tmp_path), host="127.0.0.1", port=1)


def test_credentials_file_errors_name_the_key(tmp_path):
    path = tmp_path / "creds"
    path.write_text("[mlflow]\nmlflow_tracking_username = alice\n")
    options = mlflow_server.MlflowServerOptions(credentials_file=str(path))
    with pytest.raises(mlflow_server.MlflowServerError, match="mlflow_tracking_password is missing"):
        mlflow_server.plan(options, state_dir=str(tmp_path), data_root=str(tmp_path), host="127.0.0.1", port=1)


def test_secrets_stay_off_the_command_line_and_in_private_files(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("MLFLOW_BACKEND_STORE_URI", "postgresql://u:dbsecret@127.0.0.1:5432/m")
    state = tmp_path / "state"
    state.mkdir()
    first = mlflow_server.plan(mlflow_server.MlflowServerOptions(), state_dir=str(state), data_root=str(tmp_path),
                               host="127.0.0.1", port=1)
    password = first.client_env["MLFLOW_TRACKING_PASSWORD"]
    assert "--app-name" in first.cmd and "basic-auth" in first.cmd  # auth is the default
    assert not any(password in part or "dbsecret" in part for part in first.cmd)
    assert first.store_display == "postgresql://u:***@127.0.0.1:5432/m"
    for name in ("mlflow_password", "mlflow_credentials", "mlflow_auth.ini"):
        assert (state / name).stat().st_mode & 0o077 == 0, name
    creds = configparser.ConfigParser()
    creds.read(state / "mlflow_credentials")  # MLflow's client format: usable as ~/.mlflow/credentials
    assert creds["mlflow"]["mlflow_tracking_password"] == password
    # A generated password is kept: the user store only ever takes the first one it is given.
    again = mlflow_server.plan(mlflow_server.MlflowServerOptions(), state_dir=str(state), data_root=str(tmp_path),
                               host="127.0.0.1", port=1)
    assert again.client_env["MLFLOW_TRACKING_PASSWORD"] == password
    off = mlflow_server.plan(mlflow_server.MlflowServerOptions(auth=False), state_dir=str(state),
                             data_root=str(tmp_path), host="127.0.0.1", port=1)
    assert "--app-name" not in off.cmd and off.client_env == {}


def test_cluster_up_refuses_a_password_on_its_command_line(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = _cluster(str(tmp_path / "state"), env, "up", "--mlflow-server", "--data-root", str(tmp_path / "data"),
                   "--mlflow-backend-store-uri", "postgresql://wurst:hunter2@127.0.0.1:1/mlflow")
    assert out.returncode == 2 and "--mlflow-backend-store-uri: the URI contains a password" in out.stderr
    assert not os.path.exists(tmp_path / "state" / "state.json")  # nothing was started


def test_a_phase_refuses_a_tracking_uri_with_a_password():
    """Phases log their config as params: a password in mlflow.tracking_uri would land there."""
    from pipelines import tracking

    with pytest.raises(ConfigError, match="mlflow.tracking_uri: holds a password"):
        tracking.tracking_uri_for("/tmp", "https://bob:hunter2@mlflow.example.com")
    assert tracking.tracking_uri_for("/tmp", "http://127.0.0.1:5000") == "http://127.0.0.1:5000"


# ---------------------------------------------------------------- the real thing

@pytest.fixture(scope="module")
def postgres():
    from postgres import server_binaries, start_postgres

    if server_binaries() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; .ci/run installs Debian's postgresql")
    server = start_postgres()
    try:
        server.create_database("mlflow")
        yield server
    finally:
        server.stop()


@pytest.mark.e2e
def test_server_on_postgres_refuses_anonymous_requests_and_takes_runs_with_credentials(postgres, tmp_path, monkeypatch):
    """The server exactly as `up` starts it (mlflow_server.plan), without the Ray cluster around it (that is
    the slow test below): PostgreSQL store, basic auth, a run logged with credentials from the environment."""
    from cluster import local
    from mlflow.tracking import MlflowClient

    postgres.create_database("mlflow_server_only")
    (port,) = local.free_ports(1)
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    monkeypatch.setenv("PGPASSWORD", postgres.password)
    for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_BACKEND_STORE_URI"):
        monkeypatch.delenv(key, raising=False)
    server = mlflow_server.plan(
        mlflow_server.MlflowServerOptions(backend_store_uri=postgres.uri("mlflow_server_only"),
                                          artifacts_destination=str(tmp_path / "artifacts")),
        state_dir=str(state_dir), data_root=str(tmp_path), host=local.LOOPBACK, port=port)
    log = str(state_dir / "mlflow.log")
    proc = local._spawn(server.cmd, log, dict(os.environ, **server.server_env))
    url = f"http://{local.LOOPBACK}:{port}"
    try:
        while not local._http_ok(f"{url}/health"):
            assert proc.poll() is None, open(log).read()[-3000:]
            time.sleep(0.3)
        assert _status(f"{url}/api/2.0/mlflow/experiments/search?max_results=1") == 401
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.username)
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", server.client_env["MLFLOW_TRACKING_PASSWORD"])
        client = MlflowClient(url)
        run = client.create_run(client.create_experiment("wurst-cluster-test"))
        client.log_metric(run.info.run_id, "loss", 0.5)
        assert postgres.query("mlflow_server_only", "SELECT key, value FROM metrics") == [("loss", 0.5)]
    finally:
        _stop(proc)
    assert server.client_env["MLFLOW_TRACKING_PASSWORD"] not in open(log).read()


def _cluster(state_dir: str, env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, "-m", "cluster", "--state-dir", state_dir, *args], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=400)


def _proc_cmdlines() -> str:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as f:
                    out.append(f.read().replace(b"\0", b" ").decode(errors="replace"))
            except OSError:
                pass
    return "\n".join(out)


@pytest.mark.e2e
@pytest.mark.slow_e2e
def test_mlflow_server_on_postgres_with_auth_serves_a_ray_job(postgres, tmp_path):
    state_dir, data_root = str(tmp_path / "state"), str(tmp_path / "data")
    artifacts = str(tmp_path / "artifact-root")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "RAY_ADDRESS", "RAY_AUTH"))}
    env["PGPASSWORD"] = postgres.password  # libpq's own variable: the store URI carries no password
    up = _cluster(state_dir, env, "up", "--workers", "1", "--mlflow-server", "--data-root", data_root,
                  "--mlflow-backend-store-uri", postgres.uri("mlflow"), "--mlflow-artifacts-destination", artifacts)
    try:
        assert up.returncode == 0, f"cluster up failed:\n{up.stdout}\n{up.stderr}"
        with open(os.path.join(state_dir, "state.json")) as f:
            state = json.load(f)
        url = state["mlflow_url"]
        with open(state["mlflow_password_path"]) as f:
            password = f.read().strip()
        user = state["mlflow_username"]
        search = f"{url}/api/2.0/mlflow/experiments/search?max_results=10"
        assert _status(search) == 401
        assert _status(search, (user, "wrong-" + password)) == 401
        assert _status(search, (user, password)) == 200

        # `cluster env` hands a shell the credentials without printing the password.
        printed = _cluster(state_dir, env, "env")
        assert printed.returncode == 0 and password not in printed.stdout
        assert "MLFLOW_TRACKING_PASSWORD=\"$(cat " in printed.stdout

        cluster = LocalRayCluster(state_dir=state_dir, data_root=data_root, dashboard_url=state["dashboard_url"],
                                  env=dict(env, RAY_ADDRESS=state["dashboard_url"], RAY_AUTH_MODE="token",
                                           RAY_AUTH_TOKEN_PATH=state["token_path"]))
        status, logs = cluster.submit(["python", "-m", "tests.jobs.mlflow_from_worker"], timeout=300)
        assert status == "SUCCEEDED", logs
        result = json.loads(logs.split("RESULT ", 1)[1].splitlines()[0])
        assert result["has_credentials"] and result["node_id"] != result["driver_node"], result

        # The run is in PostgreSQL, with the doctor's params and the worker's metric, its artifact on the root.
        from mlflow.tracking import MlflowClient

        saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")}
        os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
        try:
            run = MlflowClient(url).get_run(result["run_id"])
            artifact_names = [a.path for a in MlflowClient(url).list_artifacts(result["run_id"])]
        finally:
            for key, value in saved.items():
                os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)
        assert run.data.metrics["worker.logged"] == 1.0 and "cluster.nodes" in run.data.metrics
        assert "doctor.json" in artifact_names
        assert any("doctor.json" in files for _, _, files in os.walk(artifacts))
        assert postgres.query("mlflow", f"SELECT status FROM runs WHERE run_uuid = '{result['run_id']}'") == [("FINISHED",)]
        assert postgres.query("mlflow", "SELECT username FROM users") == [(user,)]

        # No secret in the params, the state file, the logs, or any process's command line.
        texts = [json.dumps(run.data.params), json.dumps(state), logs, _proc_cmdlines()]
        for name in os.listdir(state_dir):
            if name.endswith(".log"):
                with open(os.path.join(state_dir, name), errors="replace") as f:
                    texts.append(f.read())
        # Ray's own session logs too (raylet, GCS, dashboard, workers, the job driver).
        ray_logs = 0
        for folder, _dirs, files in os.walk(state["temp_dir"]):
            for name in files:
                if name.endswith((".log", ".out", ".err")):
                    with open(os.path.join(folder, name), errors="replace") as f:
                        texts.append(f.read())
                    ray_logs += 1
        assert ray_logs > 10, ray_logs
        for text in texts:
            assert password not in text and postgres.password not in text
    finally:
        down = _cluster(state_dir, env, "down")
        assert down.returncode == 0, f"cluster down left processes behind: {down.stdout}{down.stderr}"


@pytest.mark.e2e
@pytest.mark.slow_e2e
def test_the_kubernetes_mlflow_manifest_serves_with_auth(postgres, tmp_path):
    """cluster/k8s/mlflow.yaml's container, run here as the Deployment would run it: its command, its env (the
    Secret's keys filled in), its ConfigMap as the auth config; only the address, port, store host and
    artifact root are this machine's. It answers its Service's Host names with the Secret's admin credentials,
    and refuses other hosts and unauthenticated requests."""
    import yaml

    from cluster import deploy, local

    values = deploy.load_values()
    postgres.create_database("mlflow_k8s")
    store = postgres.uri("mlflow_k8s")
    config_map, deployment, service = list(yaml.safe_load_all(open(os.path.join(REPO_ROOT, "cluster", "k8s",
                                                                                  "mlflow.yaml"))))
    ini = tmp_path / "basic_auth.ini"
    ini.write_text(config_map["data"]["basic_auth.ini"].replace(values.kubernetes.mlflow.backend_store_uri, store))
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    (port,) = local.free_ports(1)
    cmd = list(container["command"])
    cmd[0] = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd[cmd.index("--host") + 1] = local.LOOPBACK
    cmd[cmd.index("--port") + 1] = str(port)
    cmd[cmd.index("--workers") + 1] = "1"
    cmd[cmd.index("--artifacts-destination") + 1] = str(tmp_path / "artifacts")
    secret = {"PGPASSWORD": postgres.password, "MLFLOW_TRACKING_USERNAME": "admin",
              "MLFLOW_TRACKING_PASSWORD": "k8s-" + postgres.password, "MLFLOW_FLASK_SERVER_SECRET_KEY": "flask-key"}
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PG", "AWS_"))}
    for var in container["env"]:
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == values.kubernetes.secret
            if ref["key"] in secret:
                env[var["name"]] = secret[ref["key"]]
            else:
                assert ref.get("optional"), ref
    env["MLFLOW_BACKEND_STORE_URI"] = store
    env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
    log = str(tmp_path / "mlflow.log")
    proc = local._spawn(cmd, log, env)
    url = f"http://{local.LOOPBACK}:{port}"
    creds = ("admin", secret["MLFLOW_TRACKING_PASSWORD"])
    search = "/api/2.0/mlflow/experiments/search?max_results=1"

    def status(host: str, auth=None) -> int:
        return _status(url + search, auth, host=host)

    try:
        while not local._http_ok(f"{url}/health"):
            assert proc.poll() is None, open(log).read()[-3000:]
            time.sleep(0.3)
        name = service["metadata"]["name"]
        in_cluster = f"{name}.{values.kubernetes.namespace}.svc:{service['spec']['ports'][0]['port']}"
        assert status(in_cluster) == 401
        assert status(in_cluster, creds) == 200
        assert status(f"{name}:5000", creds) == 200
        assert status("evil.example.com:5000", creds) in (400, 403)  # the DNS-rebinding guard is on
    finally:
        _stop(proc)
    assert postgres.query("mlflow_k8s", "SELECT username FROM users") == [("admin",)]
