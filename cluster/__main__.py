"""python -m cluster up [--workers N] [--mlflow-server ...] | status | env | down | render [--check]"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from cluster import local, mlflow_server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cluster", description=__doc__)
    parser.add_argument("--state-dir", default=local.DEFAULT_STATE_DIR,
                        help="where the state file, token and logs live (default: %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start a local Ray head (+ workers, + MLflow server)")
    p_up.add_argument("--workers", type=int, default=0, help="extra Ray worker nodes (separate raylets)")
    p_up.add_argument("--mlflow-server", action="store_true",
                      help="also start `mlflow server` on 127.0.0.1 (basic auth on; see cluster/mlflow_server.py)")
    p_up.add_argument("--mlflow-backend-store-uri", default=None,
                      help="postgresql://USER@HOST:PORT/DB (password from PGPASSWORD or ~/.pgpass, never here); "
                           "default: $MLFLOW_BACKEND_STORE_URI, else sqlite:///<data root>/mlflow.db")
    p_up.add_argument("--mlflow-artifacts-destination", default=None,
                      help="where the server keeps artifacts: a directory or s3://... (default: <data root>/mlartifacts)")
    p_up.add_argument("--mlflow-credentials", default=None, metavar="FILE",
                      help="admin credentials in MLflow's client format ([mlflow] mlflow_tracking_username / "
                           "mlflow_tracking_password); default: $MLFLOW_TRACKING_USERNAME/_PASSWORD, else generated")
    p_up.add_argument("--mlflow-auth-db-uri", default=None,
                      help="the auth app's user store (default: the backend store)")
    p_up.add_argument("--no-mlflow-auth", action="store_true",
                      help="serve MLflow without authentication (only for a machine you alone use)")
    p_up.add_argument("--data-root", default=None, help="data root exported to jobs (default: ./data)")
    p_up.add_argument("--cpus-per-node", type=int, default=None, help="logical CPUs each node advertises")
    sub.add_parser("status", help="print the cluster's addresses and liveness")
    sub.add_parser("env", help="print shell exports for clients (ray job submit, MLflow)")
    sub.add_parser("down", help="stop exactly the processes `up` started")
    p_render = sub.add_parser("render", help="write the deployment files under cluster/ from cluster/deploy.yaml")
    p_render.add_argument("--values", default=None, help="the values file (default: cluster/deploy.yaml)")
    p_render.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed file differs")
    args = parser.parse_args(argv)

    if args.command == "up":
        if args.workers < 0:
            parser.error("--workers must be >= 0")
        options = mlflow_server.MlflowServerOptions(
            backend_store_uri=args.mlflow_backend_store_uri, artifacts_destination=args.mlflow_artifacts_destination,
            auth=not args.no_mlflow_auth, credentials_file=args.mlflow_credentials, auth_db_uri=args.mlflow_auth_db_uri)
        try:
            state = local.up(workers=args.workers, mlflow_server=args.mlflow_server, state_dir=args.state_dir,
                             data_root=args.data_root, cpus_per_node=args.cpus_per_node, mlflow_options=options)
        except mlflow_server.MlflowServerError as exc:
            parser.error(str(exc))
        print(f"Ray dashboard + job server: {state.dashboard_url}")
        print(f"GCS address:                {state.gcs_address}")
        if state.mlflow_url:
            print(f"MLflow server:              {state.mlflow_url} (store {state.mlflow_store})")
        if state.mlflow_username:
            print(f"MLflow user / password:     {state.mlflow_username} / in {state.mlflow_password_path}")
        print(f"Token (auth on):            {state.token_path}")
        print(f"State:                      {local.state_file(state.state_dir)}")
        print("Submit jobs with:")
        print(f"  eval \"$(python -m cluster --state-dir {shlex.quote(state.state_dir)} env)\"")
        print("  ray job submit --runtime-env ray_job.yaml -- python -m pipelines.doctor")
        return 0
    if args.command == "render":
        from cluster import deploy

        return deploy.main((["--values", args.values] if args.values else []) + (["--check"] if args.check else []))
    if args.command == "status":
        info = local.status(state_dir=args.state_dir)
        print(json.dumps(info, indent=2))
        return 0 if info["up"] else 1
    if args.command == "env":
        state = local.ClusterState.load(args.state_dir)
        for key, value in state.env.items():
            print(f"export {key}={shlex.quote(value)}")
        if state.mlflow_password_path:
            # Read by the shell that evals this, so the password is printed nowhere.
            print(f"export MLFLOW_TRACKING_PASSWORD=\"$(cat {shlex.quote(state.mlflow_password_path)})\"")
        return 0
    if args.command == "down":
        leftovers = local.down(state_dir=args.state_dir)
        if leftovers:
            print(f"processes still alive: {leftovers}", file=sys.stderr)
            return 1
        print("cluster stopped")
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
