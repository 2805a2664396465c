"""One lock per phase and version: a second run of the same output fails fast naming the first, before it
prepares or cleans anything; a lock whose holder is gone is taken over.

The concurrent run is a real second process running the shared lifecycle (`pipelines.phase.Phase.run`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import filter as filter_phase
from pipelines import locks, manifest, phase, tracking
from pipelines.config import from_dict

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS)


@dataclasses.dataclass
class GatedConfig:
    input: Optional[str] = None
    output: Optional[str] = None
    data_root: str = ""
    gate: str = ""  # execute() waits for this file to exist
    mlflow: tracking.MlflowConfig = dataclasses.field(default_factory=lambda: tracking.MlflowConfig(enabled=False))


def _event(cfg: GatedConfig, what: str) -> None:
    with open(os.path.join(cfg.data_root, "events.log"), "a") as f:
        f.write(f"{what} {os.getpid()}\n")


class GatedPhase(phase.Phase):
    """A phase whose work waits for a gate file, so that a test can hold it in the middle of its run."""

    name = "locktest"
    config_class = GatedConfig
    output_subdir = "locktest"
    uses_ray = False

    def input_identity(self, cfg) -> str:
        return "none"

    def prepare(self, ctx: phase.Context) -> None:
        _event(ctx.cfg, "prepare")

    def discard(self, ctx: phase.Context) -> None:
        _event(ctx.cfg, "discard")

    def execute(self, ctx: phase.Context) -> phase.Outcome:
        _event(ctx.cfg, "execute")
        for _ in range(1200):
            if os.path.exists(ctx.cfg.gate):
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("the test never opened the gate")
        return phase.Outcome(counts={"done": 1})


GATED = GatedPhase()


def gated_config(tmp_path) -> GatedConfig:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    return from_dict(GatedConfig, {"data_root": str(root), "gate": str(tmp_path / "gate")})


def events(cfg: GatedConfig) -> list[str]:
    path = os.path.join(cfg.data_root, "events.log")
    return open(path).read().split("\n")[:-1] if os.path.exists(path) else []


def start_holder(cfg: GatedConfig) -> subprocess.Popen:
    """A second process running the gated phase through the shared lifecycle."""
    code = ("import sys, json; sys.path.insert(0, sys.argv[1]); import test_phase_lock as t; "
            "from pipelines.config import from_dict; "
            "t.GATED.run(from_dict(t.GatedConfig, json.loads(sys.argv[2])))")
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    return subprocess.Popen([sys.executable, "-c", code, TESTS, json.dumps(dataclasses.asdict(cfg))], env=env,
                            cwd=REPO_ROOT)


def wait_for(predicate, what: str, tries: int = 1200) -> None:
    for _ in range(tries):
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.timeout(120)
def test_a_second_run_of_the_same_phase_and_version_fails_fast_naming_the_holder(tmp_path):
    cfg = gated_config(tmp_path)
    version = GATED.version(cfg)
    lock_uri = GATED.lock_uri(cfg, version)
    holder = start_holder(cfg)
    try:
        wait_for(lambda: any(e.startswith("execute") for e in events(cfg)), "the first run to start working")
        assert os.path.exists(lock_uri)
        with pytest.raises(locks.PhaseLockedError) as err:
            GATED.run(cfg)
        message = str(err.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and lock_uri in message
        assert "locktest" in message and version in message
        # The second run neither prepared nor cleaned anything.
        assert events(cfg) == [f"prepare {holder.pid}", f"execute {holder.pid}"]
        # On the command line it is one line and exit status 1.
        with pytest.raises(SystemExit) as exit_info:
            phase.run_cli("locktest", lambda argv: GATED.run(cfg), argv=[])
        assert exit_info.value.code == 1
    finally:
        open(cfg.gate, "w").close()
        assert holder.wait(timeout=60) == 0
    assert not os.path.exists(lock_uri)  # released by the run that held it
    assert manifest.has_manifest(GATED.output_dir(cfg))
    assert GATED.run(cfg).skipped


@pytest.mark.timeout(120)
def test_a_stale_lock_is_taken_over(tmp_path, caplog):
    cfg = gated_config(tmp_path)
    open(cfg.gate, "w").close()
    version = GATED.version(cfg)
    lock_uri = GATED.lock_uri(cfg, version)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    stale = {**locks.holder_record("locktest", version), "pid": gone.pid, "pid_started": 1.0}
    os.makedirs(os.path.dirname(lock_uri), exist_ok=True)
    with open(lock_uri, "w") as f:
        json.dump(stale, f)
    with caplog.at_level(logging.WARNING, logger="pipelines.locks"):
        result = GATED.run(cfg)
    assert not result.skipped and result.counts == {"done": 1}
    assert any("taking over the stale lock" in r.getMessage() and str(gone.pid) in r.getMessage()
               for r in caplog.records)
    assert not os.path.exists(lock_uri) and not [n for n in os.listdir(os.path.dirname(lock_uri)) if ".break-" in n]


def test_which_holders_are_stale():
    me = locks.holder_record("p", "v")
    assert locks.stale_reason(me) is None  # this very process
    elsewhere = {**me, "host": me["host"] + "-elsewhere", "pid": 999_999_999}
    assert locks.stale_reason(elsewhere) is None  # another host's live heartbeat: held
    assert "no heartbeat from" in locks.stale_reason({**elsewhere, "heartbeat_at": me["heartbeat_at"] - 3600})
    assert locks.stale_reason({k: v for k, v in elsewhere.items() if k != "heartbeat_at"}) is None
    assert "is a later process" in locks.stale_reason({**me, "pid_started": me["pid_started"] - 3600})
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    assert "is not running" in locks.stale_reason({**me, "pid": gone.pid})


def test_object_store_locks_use_a_conditional_create():
    fsspec_memory = pytest.importorskip("fsspec.implementations.memory")
    fs = fsspec_memory.MemoryFileSystem()
    backend = locks._FsspecBackend(fs, "/wurst-lock-test/images/v1.lock")
    try:
        first = locks.acquire("memory://wurst-lock-test/images/v1.lock", "download", "v1", backend=backend)
        with pytest.raises(locks.PhaseLockedError, match=f"pid {os.getpid()}"):
            locks.acquire("memory://wurst-lock-test/images/v1.lock", "download", "v1", backend=backend)
        first.release()
        locks.acquire("memory://wurst-lock-test/images/v1.lock", "download", "v1", backend=backend).release()
        assert not fs.exists("/wurst-lock-test/images/v1.lock")
    finally:
        for path in fs.find("/wurst-lock-test"):  # the memory filesystem is shared by the process
            fs.rm_file(path)


def test_the_filter_phase_takes_the_lock_before_it_cleans(tmp_path):
    raw = tmp_path / "laion"
    raw.mkdir()
    pq.write_table(pa.table({"URL": ["http://127.0.0.1/a.jpg"], "TEXT": ["a"]}), raw / "part-0.parquet")
    cfg = filter_phase.PHASE.load_config(["--input", str(raw), "--set", f"data_root={tmp_path / 'data'}"])
    version = filter_phase.PHASE.version(cfg)
    out = filter_phase.PHASE.output_dir(cfg)
    os.makedirs(os.path.join(out, "_work.tmp"))
    sentinel = os.path.join(out, "_work.tmp", "first-run-state")
    open(sentinel, "w").close()
    # The first run: a live process on this host holds the lock.
    first = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {**locks.holder_record("filter", version), "pid": first.pid,
                  "pid_started": locks._process_started(first.pid)}
        with open(filter_phase.PHASE.lock_uri(cfg, version), "w") as f:
            json.dump(record, f)
        with pytest.raises(locks.PhaseLockedError, match=f"pid {first.pid}"):
            filter_phase.PHASE.run(cfg)
        assert os.path.exists(sentinel)  # the first run's state is untouched
    finally:
        first.kill()
        first.wait()


def test_a_holder_keeps_its_lock_alive_with_a_heartbeat():
    fsspec_memory = pytest.importorskip("fsspec.implementations.memory")
    fs = fsspec_memory.MemoryFileSystem()
    backend = locks._FsspecBackend(fs, "/wurst-heartbeat-test/v1.lock")
    lock = locks.acquire("memory://wurst-heartbeat-test/v1.lock", "download", "v1", backend=backend, heartbeat_s=0.02)
    try:
        first = json.loads(backend.read())["heartbeat_at"]
        wait_for(lambda: json.loads(backend.read())["heartbeat_at"] != first, "a heartbeat")
        assert json.loads(backend.read())["token"] == lock.record["token"]
    finally:
        lock.release()
    assert backend.read() is None and not lock._thread.is_alive()
