"""Distributed setup for torchrun, and the few collectives the loop needs.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; without them we run as a single process.
NCCL on CUDA, gloo on the CPU. Only rank 0 prints and writes files.

    torchrun --nproc_per_node=8 --no-python effitrain train --config configs/resnet50_imagenet.yaml
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 \\
        --no-python effitrain train --config configs/resnet50_imagenet.yaml
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def print(self, *args: Any, **kwargs: Any) -> None:
        """``print`` on rank 0 only (flushed: logs are often piped to files)."""
        if self.is_main:
            print(*args, **kwargs, flush=True)


_flag_group: dist.ProcessGroup | None = None


def init(device: str = "auto") -> DistEnv:
    """Pick the device and, under torchrun, join the process group."""
    rank = int(os.environ.get("RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda:
        if not torch.cuda.is_available():
            raise RuntimeError("train.device: cuda requested but no CUDA device is available")
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        global _flag_group
        if use_cuda:
            dist.init_process_group("nccl", device_id=dev)
            # Host-side flags (stop requested, checkpoint due) are agreed on every step; a gloo
            # group does that on CPU tensors, without a CUDA sync.
            _flag_group = dist.new_group(backend="gloo")
        else:
            dist.init_process_group("gloo")
            _flag_group = dist.group.WORLD
    return DistEnv(rank, world_size, local_rank, dev)


def cleanup() -> None:
    global _flag_group
    if dist.is_initialized():
        dist.destroy_process_group()
    _flag_group = None


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over ranks in place (a no-op in a single process); returns ``t``."""
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def agree(*flags: bool) -> tuple[bool, ...]:
    """Each flag OR-ed over ranks, so every rank takes the same decision (stop, save).

    One tiny all-reduce over CPU tensors per call; it never waits for the GPU.
    """
    if not dist.is_initialized():
        return flags
    t = torch.tensor(flags, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_flag_group)
    return tuple(bool(x) for x in t.tolist())


def all_gather_objects(obj: Any) -> list[Any]:
    """``obj`` from every rank, in rank order (``[obj]`` in a single process)."""
    if not dist.is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
