"""Where a worker loop runs: `RaySession` (a Ray Train worker, the `train` phase) or `LocalSession` (one
process with `torch.distributed` and no Ray: `bench/train.py` and `bench/gpu_smoke.py` on a bare GPU machine).

A session gives the loop its rank, world size and device, the latest checkpoint to resume from, a fresh
local directory for the next one, and `report` (publish a checkpoint). Ray is imported only by `RaySession`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
from typing import Iterator, Optional

import torch
import torch.distributed as dist


class Session:
    rank: int
    world: int

    def device(self, use_gpu: bool) -> torch.device:
        raise NotImplementedError

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Optional[str]]:
        """A context yielding the local directory of the checkpoint to resume from (None: start fresh)."""
        raise NotImplementedError

    def new_checkpoint_dir(self) -> str:
        """A fresh local directory for this rank's part of the next checkpoint (handed to `report`)."""
        return tempfile.mkdtemp(prefix="wurst-ckpt-")

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        """Publish the checkpoint in `checkpoint_dir` (collective: every rank calls it at the same step).
        The directory belongs to the session afterwards (it may upload it later and delete it)."""
        raise NotImplementedError


class RaySession(Session):
    """A Ray Train worker. Checkpoints are uploaded to the run's storage asynchronously: `report` returns
    once Ray has the local directory, the upload (to a shared filesystem or object storage) overlaps the
    next steps, and Ray deletes the local copy when it is done."""

    def __init__(self):
        import ray.train

        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        if not use_gpu:
            return torch.device("cpu")
        import ray.train.torch

        return ray.train.torch.get_device()

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        import ray.train

        latest = ray.train.get_checkpoint()
        if latest is None:
            yield None
            return
        with latest.as_directory() as directory:
            yield directory

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        import ray.train

        ray.train.report({"step": step, **metrics}, checkpoint=ray.train.Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.ASYNC)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalSession(Session):
    """One process (rank 0 of 1) without Ray: initialises `torch.distributed` (NCCL on GPU, gloo on CPU,
    on loopback) so DeepSpeed runs exactly as under Ray Train, and keeps checkpoints as
    `<checkpoint_root>/checkpoint_<step>/`, the newest `keep` of them. The process group lives as long
    as the process (DeepSpeed caches its groups), so several runs may follow one another."""

    def __init__(self, checkpoint_root: str, *, keep: int = 2):
        self.rank, self.world = 0, 1
        self.checkpoint_root, self.keep = checkpoint_root, keep
        os.makedirs(checkpoint_root, exist_ok=True)

    def device(self, use_gpu: bool) -> torch.device:
        device = torch.device("cuda", torch.cuda.current_device()) if use_gpu else torch.device("cpu")
        if not dist.is_initialized():
            # What a launcher would set; DeepSpeed reads LOCAL_RANK.
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port()))):
                os.environ.setdefault(key, value)
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                    rank=0, world_size=1, device_id=device if device.type == "cuda" else None)
        return device

    def checkpoints(self) -> list[str]:
        names = sorted(n for n in os.listdir(self.checkpoint_root) if n.startswith("checkpoint_"))
        return [os.path.join(self.checkpoint_root, n) for n in names]

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Optional[str]]:
        found = self.checkpoints()
        yield found[-1] if found else None

    def report(self, metrics: dict, checkpoint_dir: str, step: int) -> None:
        target = os.path.join(self.checkpoint_root, f"checkpoint_{step:09d}")
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(checkpoint_dir, target)
        for old in self.checkpoints()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
