"""Process-group setup and the few collective helpers the loops need.

Single-process is the default path: every helper degrades to rank 0 / world size 1. Supports torchrun
(``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` in the environment, ``env://``) and the legacy
``torch.distributed.launch --use_env`` / ``--local_rank`` form, as MAE's ``init_distributed_mode`` does.
NCCL on GPUs, gloo on CPU. Nothing else in the code base reads these environment variables.
"""
from __future__ import annotations

import inspect
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the job."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(name: str, local_rank: int) -> torch.device:
    """``auto`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU."""
    if name == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: this machine has no usable CUDA device (torch.cuda.is_available() is "
                         "False); pass --device cpu, or leave --device auto")
    if device.type == "cuda" and device.index is None:
        device = torch.device(f"cuda:{local_rank}")
    return device


def env_rank_and_world() -> tuple[int, int] | None:
    """(RANK, WORLD_SIZE) that torchrun, ``torch.distributed.launch --use_env`` or a SLURM task (``util.launch``)
    put in the environment; None when they are absent (a plain single-process run)."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])


def init_distributed(*, dist_url: str = "env://", local_rank: int = -1, device: str = "auto") -> DistInfo:
    """Join the process group described by the environment, or stay single-process.

    Args:
        dist_url: init method (``env://`` for torchrun, or ``tcp://host:port`` / ``file://...``).
        local_rank: value of ``--local_rank`` from ``torch.distributed.launch`` (-1 when absent).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
    """
    env = env_rank_and_world()
    if env is None:
        return DistInfo(device=resolve_device(device, max(local_rank, 0)))
    rank, world_size = env
    local = int(os.environ.get("LOCAL_RANK", max(local_rank, 0)))
    dev = resolve_device(device, local)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, init_method=dist_url, world_size=world_size, rank=rank)
    return DistInfo(rank=rank, world_size=world_size, local_rank=local, device=dev)


def is_main_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Mean of ``value`` over ranks (identity when single-process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def wrap_ddp(model: nn.Module, info: DistInfo) -> nn.Module:
    """Wrap in DistributedDataParallel when distributed; the module itself otherwise."""
    if not info.distributed or info.device.type == "meta":  # a --dry_run joins no process group
        return model
    device_ids = [info.device.index] if info.device.type == "cuda" else None
    # buffers (fixed sin-cos tables) never change, so there is nothing to sync every step; torch >= 2.10 renames
    # broadcast_buffers (a FutureWarning per rank) to forward_sync_buffers
    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers": False} if "forward_sync_buffers" in params else {"broadcast_buffers": False}
    # LocalMIM's 1x1-conv heads get weight gradients [C_out, C_in, 1, 1] whose size-1 dims carry other strides
    # than the bucket view's: the same layout in memory, so the copy DDP makes anyway is all it costs; the warning
    # (once per rank) says nothing a user can act on
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides", category=UserWarning)
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **no_sync)


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside a DDP and/or ``torch.compile`` wrapper."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the current process group; (0, 1) when single-process."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum of ``value`` over ranks, exact for integer tensors (identity when single-process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.clone()
        dist.all_reduce(value)
    return value


def all_gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks in rank order; their lengths may differ.

    Each rank's tensor is padded to the longest for the collective and trimmed after it, so uneven shards
    (an unpadded split of N samples) gather without duplicates. Identity when single-process.
    """
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return tensor
    world = dist.get_world_size()
    length = torch.tensor([tensor.shape[0]], device=tensor.device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    longest = int(max(n.item() for n in lengths))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]))
    padded[:tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([part[:int(n.item())] for part, n in zip(parts, lengths)])


def broadcast_buffers(module: nn.Module, src: int = 0) -> None:
    """Copy ``module``'s buffers (e.g. BatchNorm running statistics) from rank ``src`` to every rank."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in module.buffers():
            dist.broadcast(buffer, src)


def all_gather_object(obj: object) -> list:
    """``obj`` of every rank in rank order (pickled in memory, never to disk); ``[obj]`` when single-process."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def gather_objects(obj: Any, dst: int = 0) -> list[Any] | None:
    """Picklable ``obj`` of every rank, in rank order, on rank ``dst`` (None elsewhere); ``[obj]`` single-process.

    For results that are lists of Python objects of uneven size (COCO detections with RLE masks)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s picklable ``obj`` on every rank (identity single-process)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
