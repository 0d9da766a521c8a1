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


def world() -> tuple[int, int]:
    """(world size, rank) of the initialised torch.distributed group, else (1, 0)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


def all_gather(value: Any) -> list[Any]:
    """Every rank's `value` (any picklable object), in rank order; `[value]` without a process group."""
    size, _ = world()
    if size == 1:
        return [value]
    gathered: list[Any] = [None] * size
    torch.distributed.all_gather_object(gathered, value)
    return gathered


def join_launcher_group() -> str | None:
    """Join the process group a launcher describes in the environment (WORLD_SIZE > 1); returns this rank's
    device (`cuda:<LOCAL_RANK>` on GPUs, else None for the default). A no-op for one process or a group that
    already exists."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or world()[0] > 1:
        return None
    if torch.cuda.is_available():
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl")
        return device
    torch.distributed.init_process_group("gloo")
    return None


def leave_group(exit_code: int | None = None) -> None:
    """Wait for every rank (an exiting rank must not abort the others), then leave; a no-op for one process.

    With `exit_code` (the work is done and saved) the process ends here at once, with that code, and the group
    is not torn down: gloo's teardown can deadlock. A gloo worker thread that releases a finished collective's
    tensors needs the GIL, while the main thread, holding it, waits in the group's destructor for that thread
    (seen in CI after `xtf sft --num_processes 2` had saved its model). Without `exit_code` (an error on its way
    up) the group is destroyed the ordinary way.
    """
    if world()[0] <= 1:
        return
    torch.distributed.barrier()
    if exit_code is None:
        torch.distributed.destroy_process_group()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)
