"""Torch datasets whose modules do not import torch.

`pipelines.latent_shards` and `pipelines.image_shards` are both a shard *format* (imported by the
phases' Ray CPU tasks that decode and write shards) and a *reader* for training, a
`torch.utils.data.IterableDataset`. Importing torch costs such a worker about 3 s and 700 MB, so a
reader's methods live in a plain class and its public IterableDataset subclass is made on first use,
from the module's `__getattr__` (PEP 562). Instances pickle by that public name as any class's do.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()


def iterable_dataset(module_globals: dict, name: str, reader: type) -> type:
    """`class <name>(reader, torch.utils.data.IterableDataset)`, made once and stored in the module."""
    with _lock:  # one class per process: pickle checks the instance's class is the module's
        cls = module_globals.get(name)
        if cls is None:
            from torch.utils.data import IterableDataset

            cls = type(name, (reader, IterableDataset), {"__module__": module_globals["__name__"],
                                                         "__qualname__": name, "__doc__": reader.__doc__})
            module_globals[name] = cls
        return cls
