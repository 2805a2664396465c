"""Where a phase runs: connect to the Ray cluster a job was submitted to, or start an embedded one.

Inside `ray job submit`, Ray sets RAY_ADDRESS for the entrypoint, so `ray.init()` joins that
cluster. Run by hand with no address, a phase starts a private local Ray (the embedded default).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from typing import Optional

from pipelines.config import param

DATA_ROOT_ENV = "WURST_DATA_ROOT"


def default_data_root() -> str:
    """$WURST_DATA_ROOT (exported by `python -m cluster up` to every job) or ./data."""
    return os.environ.get(DATA_ROOT_ENV) or os.path.abspath("data")


@dataclasses.dataclass
class RayConfig:
    # None: $RAY_ADDRESS when set (ray job submit sets it), else an embedded local Ray.
    address: Optional[str] = None
    # CPUs of the embedded local Ray (None: all); ignored when joining a cluster.
    num_cpus: Optional[int] = param(None, ge=1)
    # Bound on object store memory of the embedded Ray, bytes (None: Ray's default).
    object_store_memory: Optional[int] = param(None, ge=78643200)


# The driver's directory when it connected to a cluster (a job's working_dir): where ensure_cwd() steps back in.
_driver_start_dir: str | None = None


def ensure_cwd() -> None:
    """recover_cwd() into the directory the driver connected from (re-extracted at the same path)."""
    recover_cwd(_driver_start_dir)


def recover_cwd(*fallbacks: str | None) -> None:
    """Step out of a deleted working directory into the first fallback that exists (else the temp dir).

    On a multi-node cluster sharing one machine, a job's working_dir can be deleted and re-extracted
    at the same path under a running driver; MLflow and pathlib call getcwd and would fail."""
    try:
        os.getcwd()
        return
    except FileNotFoundError:
        pass
    import tempfile

    for path in (*fallbacks, tempfile.gettempdir()):
        if path and os.path.isdir(path):
            os.chdir(path)
            return


# Ray Train starts a detached PlacementGroupCleaner whose thread asks the State API every second whether
# the controller is alive. The embedded Ray has no dashboard, so no State API: each check logs a warning
# (~150 lines in a 2-minute training job), and where another Ray runs on the machine the thread dies with
# a 30-line "Found multiple active Ray instances" traceback. What it guards against, a placement group
# left by a crashed controller, cannot outlive a private Ray that ends with its driver.
_PG_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
_PG_CLEANER_THREAD = "PlacementGroupCleanerMonitor"


def quiet_embedded_worker_logs() -> None:
    """worker_process_setup_hook of the embedded Ray: silences the PlacementGroupCleaner (see above)."""
    logging.getLogger(_PG_CLEANER_LOGGER).setLevel(logging.ERROR)
    default_hook = threading.excepthook

    def hook(args) -> None:
        if args.thread is None or args.thread.name != _PG_CLEANER_THREAD:
            default_hook(args)

    threading.excepthook = hook


def init_ray(cfg: RayConfig | None = None):
    """Idempotent ray.init for a phase driver; returns the ray module."""
    import ray

    cfg = cfg or RayConfig()
    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        global _driver_start_dir
        start_dir = _driver_start_dir = os.getcwd()
        ray.init(address=address, log_to_driver=True)
        recover_cwd(start_dir)  # the working_dir may have been re-extracted at the same path
    else:
        # Ray gives its raylet a fixed 30 s to register; an overloaded machine can miss that, so retry.
        for attempt in range(3):
            try:
                # address="local": a bare ray.init() would join the newest `ray start` cluster on the machine.
                ray.init(address="local", num_cpus=cfg.num_cpus, object_store_memory=cfg.object_store_memory,
                         include_dashboard=False, log_to_driver=True, _node_ip_address="127.0.0.1",
                         runtime_env={"worker_process_setup_hook": f"{__name__}.{quiet_embedded_worker_logs.__name__}"})
                break
            except Exception as exc:  # noqa: BLE001 - Ray raises a bare Exception here
                if "timed out during startup" not in str(exc) or attempt == 2:
                    raise
                ray.shutdown()
    return ray
