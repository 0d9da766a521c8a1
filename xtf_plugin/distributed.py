"""Several processes scoring one dataset together (torchrun, `accelerate launch`, DeepSpeed).

The ranks split the forward passes and gather the scores (see `pipeline.score_dataset`), so every rank ends
with the same scores; these are the few torch.distributed calls that needs. Without an initialised process
group everything here is the one-process identity.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch


def world_size() -> int:
    """Processes in the initialised torch.distributed group, else 1."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def rank() -> int:
    """This process's rank: from the initialised group, else from the launcher's `RANK` (a launched process
    that has not joined its group yet is still not the main one), else 0."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_main_process() -> bool:
    """Whether this process writes files and prints the run's status lines (rank 0)."""
    return rank() == 0


def local_device() -> str:
    """This process's device: its local GPU (`cuda:<LOCAL_RANK>`) when there are GPUs, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return "cpu"


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order; `[value]` without a process group."""
    size = world_size()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def join_launcher_group() -> str | None:
    """Join the process group a launcher describes in the environment (WORLD_SIZE > 1); returns this rank's
    device (`local_device()` on GPUs, else None for the default). A no-op for one process or a group that
    already exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world_size() > 1:
        return None
    if torch.cuda.is_available():
        device = local_device()
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl")
        return device
    torch.distributed.init_process_group("gloo")
    return None


def leave_group(exit_code: int | None = None) -> None:
    """Wait for every rank (an exiting rank must not abort the others), then leave; a no-op for one process.

    With `exit_code` (the work is done and saved) a launched process (WORLD_SIZE > 1) ends here at once, with
    that code, and the group is not torn down: gloo's teardown can deadlock. A gloo worker thread that releases
    a finished collective's tensors needs the GIL, while the main thread, holding it, waits in the group's
    destructor for that thread (seen in CI after `xtf sft --num_processes 2` had saved its model); the same
    destructor runs when a DDP reducer is freed after the group was destroyed (TRL's script ends with
    `trainer.end()` on newer transformers), so the process ends before anything is freed. Without `exit_code`
    (an error on its way up) the group is destroyed the ordinary way.
    """
    if world_size() > 1:
        torch.distributed.barrier()
        if exit_code is None:
            torch.distributed.destroy_process_group()
            return
    if exit_code is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(exit_code)
