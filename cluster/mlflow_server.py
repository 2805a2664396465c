"""The shared MLflow server that `python -m cluster up --mlflow-server` starts.

A backend store (PostgreSQL for a team, SQLite under the data root by default), artifacts proxied by the
server to an artifact root (a directory or an object store URI: clients then need no object-store
credentials of their own), and MLflow's basic-auth app on by default, so only holders of the credentials
read or write runs.

Secrets never go on a command line (visible in `ps` to every user), in logs or in the state file:
- the backend store URI goes to the server as $MLFLOW_BACKEND_STORE_URI; one given with `--mlflow-backend-store-uri`
  must hold no password (libpq reads it from $PGPASSWORD or a ~/.pgpass / $PGPASSFILE file instead);
- the admin credentials come from a file in MLflow's own client format (the format of ~/.mlflow/credentials),
  or from $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, or are generated; they are kept in 0600 files
  in the state dir and handed to the server ($MLFLOW_AUTH_ADMIN_PASSWORD) and to the Ray nodes
  ($MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, which every job and Ray worker inherits) by
  environment only.
"""

from __future__ import annotations

import configparser
import dataclasses
import importlib
import io
import os
import secrets
import sys
import urllib.parse
from typing import Optional

ADMIN_USER = "admin"
CREDENTIALS_SECTION = "mlflow"  # MLflow's client credentials file: [mlflow] mlflow_tracking_username = ...
USERNAME_KEY, PASSWORD_KEY = "mlflow_tracking_username", "mlflow_tracking_password"


class MlflowServerError(ValueError):
    """A server option is unusable; the message names the option."""


@dataclasses.dataclass
class MlflowServerOptions:
    # None: $MLFLOW_BACKEND_STORE_URI, else sqlite:///<data_root>/mlflow.db
    backend_store_uri: Optional[str] = None
    # None: <data_root>/mlartifacts; may be s3://... (the server then needs that store's credentials)
    artifacts_destination: Optional[str] = None
    auth: bool = True
    # None: $MLFLOW_TRACKING_USERNAME / $MLFLOW_TRACKING_PASSWORD, else generated
    credentials_file: Optional[str] = None
    # The auth app's user store; None: the backend store (its tables and migration table are its own)
    auth_db_uri: Optional[str] = None


@dataclasses.dataclass
class MlflowServerPlan:
    """What `up` needs to start the server and to hand clients: the command (no secrets in it), the
    server's extra environment (secrets), and what jobs need in theirs."""
    cmd: list[str]
    server_env: dict[str, str]
    client_env: dict[str, str]
    store_display: str
    username: Optional[str] = None
    password_path: Optional[str] = None


def has_password(uri: str) -> bool:
    try:
        return urllib.parse.urlsplit(uri).password is not None
    except ValueError:
        return False


def redact_uri(uri: str) -> str:
    """The URI with any password replaced, for the state file and messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))


def _write_private(path: str, text: str) -> None:
    with open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
        f.write(text)
    os.chmod(path, 0o600)  # an existing file keeps its old mode under os.open


def _ini_text(parser: configparser.ConfigParser) -> str:
    out = io.StringIO()
    parser.write(out)
    return out.getvalue()


def read_credentials_file(path: str, option: str = "--mlflow-credentials") -> tuple[str, str]:
    if not os.path.isfile(path):
        raise MlflowServerError(f"{option}: no such file: {path}")
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(path)
    except configparser.Error as exc:
        raise MlflowServerError(f"{option}: {path} is not an INI file: {exc}") from None
    section = parser[CREDENTIALS_SECTION] if parser.has_section(CREDENTIALS_SECTION) else {}
    user, password = section.get(USERNAME_KEY, "").strip(), section.get(PASSWORD_KEY, "").strip()
    for key, value in ((USERNAME_KEY, user), (PASSWORD_KEY, password)):
        if not value:
            raise MlflowServerError(f"{option}: {path}: [{CREDENTIALS_SECTION}] {key} is missing or empty")
    return user, password


def resolve_credentials(options: MlflowServerOptions, state_dir: str) -> tuple[str, str, str]:
    """(username, password, where they came from)."""
    if options.credentials_file:
        user, password = read_credentials_file(options.credentials_file)
        return user, password, options.credentials_file
    env_user, env_password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if env_user and env_password:
        return env_user, env_password, "environment"
    if env_user or env_password:
        missing = "MLFLOW_TRACKING_PASSWORD" if env_user else "MLFLOW_TRACKING_USERNAME"
        raise MlflowServerError(f"{missing}: set both MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or neither")
    # Generated once per state dir and reused: the user store keeps the first admin password it saw.
    saved = os.path.join(state_dir, "mlflow_credentials")
    if os.path.isfile(saved):
        user, password = read_credentials_file(saved, option=saved)
        return user, password, saved
    return ADMIN_USER, secrets.token_urlsafe(24), "generated"


def _check_store_uri(uri: str, option: str) -> None:
    scheme, _, driver = urllib.parse.urlsplit(uri).scheme.partition("+")
    if scheme not in ("sqlite", "postgresql", "postgres", "mysql", "mssql"):
        raise MlflowServerError(f"{option}: expected a database URI (postgresql://..., sqlite:///...), got {redact_uri(uri)!r}")
    if scheme in ("postgresql", "postgres"):
        module = driver or "psycopg"  # SQLAlchemy 2.1's default PostgreSQL driver is psycopg 3
        try:
            importlib.import_module(module)
        except ImportError:
            raise MlflowServerError(f"{option}: a PostgreSQL store needs the {module} driver: "
                                    "pip install -e '.[cluster]' (psycopg 3)") from None


def plan(options: MlflowServerOptions, *, state_dir: str, data_root: str, host: str, port: int,
         workers: int = 1) -> MlflowServerPlan:
    """Validate the options, write the auth config and credentials files, and return how to start."""
    cli_uri = options.backend_store_uri
    if cli_uri and has_password(cli_uri):
        raise MlflowServerError(
            "--mlflow-backend-store-uri: the URI contains a password, which would be visible on the command line; "
            "leave it out and set PGPASSWORD (or a ~/.pgpass file), or pass the whole URI as MLFLOW_BACKEND_STORE_URI")
    store = cli_uri or os.environ.get("MLFLOW_BACKEND_STORE_URI") or f"sqlite:///{os.path.join(data_root, 'mlflow.db')}"
    _check_store_uri(store, "--mlflow-backend-store-uri" if cli_uri else "MLFLOW_BACKEND_STORE_URI")
    artifacts = options.artifacts_destination or os.path.join(data_root, "mlartifacts")
    if "://" not in artifacts:
        artifacts = os.path.abspath(artifacts)
        os.makedirs(artifacts, exist_ok=True)

    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    cmd = [mlflow_bin, "server", "--artifacts-destination", artifacts,
           "--host", host, "--port", str(port), "--workers", str(workers)]
    server_env = {"MLFLOW_BACKEND_STORE_URI": store}
    result = MlflowServerPlan(cmd=cmd, server_env=server_env, client_env={}, store_display=redact_uri(store))
    if not options.auth:
        return result

    try:
        import flask_wtf  # noqa: F401  - what mlflow[auth] adds
    except ImportError:
        raise MlflowServerError("--mlflow-server: the basic-auth app needs mlflow[auth]: pip install -e '.[cluster]' "
                                "(or pass --no-mlflow-auth for a server without authentication)") from None
    user, password, _source = resolve_credentials(options, state_dir)
    auth_db = options.auth_db_uri or store
    if options.auth_db_uri:
        _check_store_uri(auth_db, "--mlflow-auth-db-uri")
    ini = configparser.ConfigParser(interpolation=None)
    ini[CREDENTIALS_SECTION] = {
        # Signed-in users read every experiment; writing needs the experiment's owner or the admin.
        "default_permission": "READ",
        "database_uri": auth_db,
        "admin_username": user,
        "authorization_function": "mlflow.server.auth:authenticate_request_basic_auth",
    }
    ini_path = os.path.join(state_dir, "mlflow_auth.ini")
    _write_private(ini_path, _ini_text(ini))  # private: database_uri may carry a password (MLFLOW_BACKEND_STORE_URI)
    password_path = os.path.join(state_dir, "mlflow_password")
    _write_private(password_path, password + "\n")
    # A client credentials file in MLflow's format: copy it to ~/.mlflow/credentials on a client machine.
    creds = configparser.ConfigParser(interpolation=None)
    creds[CREDENTIALS_SECTION] = {USERNAME_KEY: user, PASSWORD_KEY: password}
    _write_private(os.path.join(state_dir, "mlflow_credentials"), _ini_text(creds))

    cmd[2:2] = ["--app-name", "basic-auth"]
    server_env.update({
        "MLFLOW_AUTH_CONFIG_PATH": ini_path,
        "MLFLOW_AUTH_ADMIN_USERNAME": user,
        # Used only when the user store has no admin yet (MLflow ignores it afterwards).
        "MLFLOW_AUTH_ADMIN_PASSWORD": password,
        # Signs the UI's session cookies and CSRF tokens; a fresh one per start signs users out, nothing more.
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(32),
    })
    result.client_env = {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": password}
    result.username, result.password_path = user, password_path
    return result
