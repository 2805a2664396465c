"""A training checkpoint (one directory, written by every rank, reported to Ray Train): each engine's
DeepSpeed shards under its name, every rank's RNG states and EMA shards, and `train_state.json` (the
step, and the layout the shards only load back into).

Resume is exact: the step fixes the data position ((step - the run's start step) x samples per step), the
RNG files the dropout and objective streams, the DeepSpeed files the weights, optimizer and LR schedule.
"""

from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from pipelines.training.ema import ShardedEma

TRAIN_STATE = "train_state.json"


def _rank_file(directory: str, what: str, rank: int) -> str:
    return os.path.join(directory, what, f"rank-{rank:05d}.safetensors")


def rng_state(generator: torch.Generator) -> dict:
    state = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_tensors(tensors: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, path)


def load_tensors(path: str) -> dict:
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file missing: {path} (was the checkpoint written by the same "
                                "number of workers?)")
    return load_file(path)


def save(directory: str, *, engines: dict, generator: torch.Generator, ema: Optional[ShardedEma], rank: int,
         train_state: Optional[dict]) -> None:
    """This rank's part of a checkpoint in `directory`; rank 0 also writes `train_state` (collective:
    DeepSpeed's save_checkpoint is)."""
    for name, engine in engines.items():
        engine.save_checkpoint(directory, tag=name, save_latest=False)
    save_tensors(rng_state(generator), _rank_file(directory, "rng", rank))
    if ema is not None:
        save_tensors(ema.state_dict(), _rank_file(directory, "ema", rank))
    if train_state is not None:
        with open(os.path.join(directory, TRAIN_STATE), "w") as f:
            json.dump(train_state, f, indent=2)


def restore(directory: str, *, engines: dict, generator: torch.Generator, ema: Optional[ShardedEma], rank: int,
            world: int, zero_stage: int, start_step: int = 0) -> int:
    """Load this rank's part of the checkpoint in `directory` into the engines, RNGs and EMA; returns the step.
    `start_step`: where the run's step count started (model.continue_step_count), which fixes its data position
    and LR schedule: the checkpoint must have been written by a run that started there."""
    with open(os.path.join(directory, TRAIN_STATE)) as f:
        state = json.load(f)
    if int(state.get("start_step", 0)) != start_step:
        raise RuntimeError(
            f"{directory}: written by a run whose step count started at {state.get('start_step', 0)}, this run's "
            f"starts at {start_step} (model.init_from's export step): resuming would shift its data and LR "
            "schedule. Start a new run_name")
    if state["world_size"] != world or state["zero_stage"] != zero_stage:
        raise RuntimeError(
            f"{directory}: written by {state['world_size']} workers with ZeRO-{state['zero_stage']}; this run has "
            f"{world} workers with ZeRO-{zero_stage}. DeepSpeed shards only load into the "
            "same layout: set train.num_workers / train.zero_stage back, or start a new run_name")
    for name, engine in engines.items():
        path, _ = engine.load_checkpoint(directory, tag=name, load_optimizer_states=True,
                                         load_lr_scheduler_states=True)
        if path is None:
            raise RuntimeError(f"{directory}/{name}: DeepSpeed could not load this checkpoint")
    set_rng_state(load_tensors(_rank_file(directory, "rng", rank)), generator)
    if ema is not None:
        ema_file = _rank_file(directory, "ema", rank)
        ema.load_state_dict(load_tensors(ema_file), ema_file)
    return int(state["step"])
