"""An audit of the `torch.distributed` collectives a worker runs: every tensor handed to one must live on
the training device (NCCL serves CUDA tensors only, so a CPU tensor fails there with "No backend type
associated with device type cpu", on the first GPU run and never on CPU with gloo).

`device_audit(device)` wraps the real functions (they still run) for the duration of a block; a tensor on
another device raises `CollectiveDeviceError` naming the collective, the tensor and the caller. Enabled in
a run by `train.audit_collectives: true`; each rank then writes its call counts to
`<run dir>/collectives/rank-<r>.json`.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import traceback
from typing import Iterator

import torch
import torch.distributed as dist

# The collectives that take tensors (DeepSpeed calls these through torch.distributed at call time).
AUDITED = ("all_reduce", "reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
           "reduce_scatter_tensor", "all_to_all", "all_to_all_single", "gather", "scatter", "send", "recv",
           "isend", "irecv", "_all_gather_base", "_reduce_scatter_base", "all_reduce_coalesced",
           "all_gather_coalesced")


class CollectiveDeviceError(RuntimeError):
    """A collective received a tensor that is not on the training device."""


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _caller() -> str:
    for frame in reversed(traceback.extract_stack()[:-3]):
        if "torch/distributed" not in frame.filename and "collectives.py" not in frame.filename:
            return f"{frame.filename}:{frame.lineno} ({frame.name})"
    return "?"


class Audit:
    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.calls: collections.Counter[str] = collections.Counter()

    def check(self, name: str, args, kwargs) -> None:
        self.calls[name] += 1
        for tensor in _tensors(list(args) + list(kwargs.values())):
            if tensor.device.type != self.device.type or (
                    self.device.index is not None and tensor.device.index not in (None, self.device.index)):
                raise CollectiveDeviceError(
                    f"torch.distributed.{name} got a {tuple(tensor.shape)} {tensor.dtype} tensor on {tensor.device}; "
                    f"the training device is {self.device} (called from {_caller()})")


@contextlib.contextmanager
def device_audit(device: torch.device) -> Iterator[Audit]:
    """Inside the block every audited torch.distributed collective checks its tensors' device first."""
    audit = Audit(device)
    originals = {name: getattr(dist, name) for name in AUDITED if hasattr(dist, name)}

    def wrap(name, function):
        @functools.wraps(function)
        def checked(*args, **kwargs):
            audit.check(name, args, kwargs)
            return function(*args, **kwargs)
        return checked

    for name, function in originals.items():
        setattr(dist, name, wrap(name, function))
    try:
        yield audit
    finally:
        for name, function in originals.items():
            setattr(dist, name, function)
