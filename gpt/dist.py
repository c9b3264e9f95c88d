"""torchrun integration: process-group setup, rank helpers and model wrapping.

A plain `python train.py` run gets a single-process Dist whose collectives do nothing, so the
training loop is written once for both cases.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as torch_dist

from gpt.config import DistributedConfig


@dataclass
class Dist:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    strategy: str = "ddp"

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch_dist.barrier()

    def all_reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.enabled:
            torch_dist.all_reduce(t, op=torch_dist.ReduceOp.SUM)
        return t

    def no_sync(self, model: torch.nn.Module, skip: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-step of an accumulation."""
        if skip and self.enabled and hasattr(model, "no_sync"):
            return model.no_sync()
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


def setup(cfg: DistributedConfig, device_name: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(strategy=cfg.strategy)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        torch_dist.init_process_group(backend=backend)
    return Dist(rank=rank, local_rank=local_rank, world_size=world, strategy=cfg.strategy)


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Each rank on its own GPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around the model when running on several ranks."""
    if not dist.enabled:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)
