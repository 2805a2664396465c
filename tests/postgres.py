"""A private PostgreSQL server for a test: initdb + pg_ctl in a temp dir, on a free 127.0.0.1 port and a
unix socket in that dir, password (SCRAM) authentication. PostgreSQL refuses to run as root, so as root
(CI, this sandbox) the server runs as `nobody` through runuser."""

from __future__ import annotations

import dataclasses
import glob
import os
import secrets
import shutil
import subprocess
import tempfile

from cluster.local import LOOPBACK, free_ports


def server_binaries() -> str | None:
    """The directory with initdb and pg_ctl (Debian keeps them out of PATH, in /usr/lib/postgresql/<v>/bin)."""
    found = shutil.which("initdb")
    if found and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(found))
    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if os.path.exists(os.path.join(bindir, "initdb")) and os.path.exists(os.path.join(bindir, "pg_ctl")):
            return bindir
    return None


@dataclasses.dataclass
class Postgres:
    bindir: str
    base: str
    port: int
    user: str
    password: str

    @property
    def datadir(self) -> str:
        return os.path.join(self.base, "data")

    def uri(self, database: str) -> str:
        """Without the password: clients take it from PGPASSWORD."""
        return f"postgresql://{self.user}@{LOOPBACK}:{self.port}/{database}"

    def _run(self, *cmd: str) -> subprocess.CompletedProcess:
        prefix = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
        return subprocess.run([*prefix, *cmd], capture_output=True, text=True, timeout=120)

    def start(self) -> None:
        os.makedirs(self.base, exist_ok=True)
        pwfile = os.path.join(self.base, "pwfile")
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            f.write(self.password + "\n")
        if os.geteuid() == 0:
            shutil.chown(self.base, "nobody")
            shutil.chown(pwfile, "nobody")
        out = self._run(os.path.join(self.bindir, "initdb"), "-D", self.datadir, "-U", self.user,
                        "--auth=scram-sha-256", f"--pwfile={pwfile}", "-E", "UTF8", "--no-sync")
        os.remove(pwfile)
        if out.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{out.stdout}\n{out.stderr}")
        options = f"-c listen_addresses={LOOPBACK} -p {self.port} -k {self.base} -c fsync=off"
        out = self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-o", options,
                        "-l", os.path.join(self.base, "server.log"), "-w", "-t", "60", "start")
        if out.returncode != 0:
            raise RuntimeError(f"pg_ctl start failed:\n{out.stdout}\n{out.stderr}\n{self.log()}")

    def create_database(self, name: str) -> None:
        import psycopg

        # autocommit: CREATE DATABASE cannot run inside a transaction
        conn = psycopg.connect(host=LOOPBACK, port=self.port, user=self.user, password=self.password,
                               dbname="postgres", autocommit=True)
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{name}"')
        finally:
            conn.close()

    def query(self, database: str, sql: str) -> list[tuple]:
        import psycopg

        conn = psycopg.connect(host=LOOPBACK, port=self.port, user=self.user, password=self.password,
                               dbname=database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql)
                return cur.fetchall()
        finally:
            conn.close()

    def log(self) -> str:
        try:
            with open(os.path.join(self.base, "server.log")) as f:
                return f.read()
        except OSError:
            return ""

    def stop(self) -> None:
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.datadir, "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def start_postgres() -> Postgres:
    """Started in its own dir under /tmp: as root the server runs as nobody, who cannot enter pytest's
    0700 temp dirs (and the socket path must stay under 108 characters). `stop()` removes it."""
    bindir = server_binaries()
    if bindir is None:
        raise FileNotFoundError("PostgreSQL server binaries (initdb, pg_ctl)")
    base = tempfile.mkdtemp(prefix="wurst-pg-", dir="/tmp")
    (port,) = free_ports(1)
    server = Postgres(bindir=bindir, base=base, port=port, user="wurst", password=secrets.token_urlsafe(16))
    server.start()
    return server
