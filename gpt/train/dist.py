"""torchrun integration: process-group setup, rank helpers, model wrapping and full state dicts.

A plain `python train.py` run gets a single-process Dist whose collectives do nothing, so the
training loop is written once for both cases. Under torchrun the model is wrapped by `wrap()`:
  ddp   DistributedDataParallel: every rank holds the whole model and optimizer; gradients are
        averaged with one all-reduce per optimizer step.
  fsdp  FSDP2 (`fully_shard` per transformer block, then the root): every rank holds 1/N of the
        weights, gradients and optimizer state as DTensors and gathers a block's weights just
        before it runs.
Checkpoints are always written in the single-process format (full tensors, the optimizer's own
state-dict layout), so any checkpoint resumes on any number of ranks with either strategy:
`full_state()` gathers sharded tensors on save and `load_optimizer_state()` shards them again.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as torch_dist

from gpt.config import ConfigError, DistributedConfig


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
    def sharded(self) -> bool:
        """True when every rank holds only a shard of the model (fsdp on several ranks)."""
        return self.enabled and self.strategy == "fsdp"

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
        """Skip the gradient all-reduce (ddp) or reduce-scatter (fsdp) on all but the last micro-step."""
        if not (skip and self.enabled):
            return contextlib.nullcontext()
        if hasattr(model, "no_sync"):
            return model.no_sync()
        if hasattr(model, "set_requires_gradient_sync"):
            return _fsdp_no_sync(model)
        return contextlib.nullcontext()

    def close(self) -> None:
        if self.enabled and torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def setup(cfg: DistributedConfig, device_name: str = "auto") -> Dist:
    """Join the torchrun process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist(strategy=cfg.strategy)
    if cfg.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be positive, got {cfg.timeout_s}")
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_name in ("auto", "cuda") or device_name.startswith("cuda")
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    if not torch_dist.is_initialized():
        # The timeout turns a rank stuck waiting for a dead peer into an error (torchrun then ends the run).
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=cfg.timeout_s))
    return Dist(rank=rank, local_rank=local_rank, world_size=world, strategy=cfg.strategy)


def device_for(dist: Dist, device: torch.device) -> torch.device:
    """Each rank on its own GPU."""
    if dist.enabled and device.type == "cuda":
        return torch.device("cuda", dist.local_rank)
    return device


def wrap(model: torch.nn.Module, dist: Dist, device: torch.device, dtype: torch.dtype = torch.float32):
    """DDP around the model, or FSDP2 sharding of it in place, when running on several ranks.

    Under fsdp the returned module is `model` itself (its parameters are now DTensor shards), so an
    optimizer must be built after this call.
    """
    if not dist.enabled:
        return model
    if dist.strategy == "fsdp":
        return _fully_shard(model, dtype, device)
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [device.index] if device.type == "cuda" else None
    return DDP(model, device_ids=ids)


def _fully_shard(model: torch.nn.Module, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """One FSDP unit per transformer block, then the root (embeddings, the lm_head, tied or not, final norm)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if dtype == torch.float16:
        raise ConfigError("distributed.strategy=fsdp supports train.dtype float32 or bfloat16, not float16 "
                          "(its loss scaling is not shard-aware); use bfloat16 or strategy=ddp")
    _broadcast_from_rank0(model)  # ranks seed differently; fully_shard keeps each rank's own slice
    # weights live in fp32; blocks compute in the train dtype and gradients are reduced in fp32
    policy = MixedPrecisionPolicy() if dtype == torch.float32 else \
        MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    # The mesh is on the training device: fully_shard's default picks CUDA whenever a GPU exists and sets
    # device `local_rank`, which fails for CPU ranks on a machine with fewer GPUs than ranks.
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (torch_dist.get_world_size(),))
    tied = model.lm_head.weight is model.transformer.wte.weight
    for block in model.transformer.h:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if tied and model.lm_head.weight is not model.transformer.wte.weight:
        raise RuntimeError("fully_shard untied lm_head.weight from transformer.wte.weight")
    return model


@torch.no_grad()
def _broadcast_from_rank0(model: torch.nn.Module) -> None:
    for t in list(model.parameters()) + list(model.buffers()):
        torch_dist.broadcast(t.data, src=0)


def full_state(tree: Any, dist: Dist) -> Any:
    """`tree` (a state dict, possibly nested) with every DTensor shard gathered into a full CPU tensor.

    A collective under fsdp: every rank must call it with the same tree. Without shards it is free.
    """
    if not dist.sharded:
        return tree
    from torch.distributed.tensor import DTensor

    if isinstance(tree, DTensor):
        return tree.full_tensor().cpu()
    if isinstance(tree, dict):
        return {k: full_state(v, dist) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(full_state(v, dist) for v in tree)
    return tree


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict, dist: Dist) -> None:
    """Load a single-process optimizer state dict; under fsdp each rank keeps its shard of it."""
    if dist.sharded:
        from torch.distributed.tensor import DTensor, distribute_tensor

        params = [p for group in optimizer.param_groups for p in group["params"]]
        sharded = {}
        for index, values in state["state"].items():
            param = params[int(index)] if int(index) < len(params) else None  # else load_state_dict says why
            sharded[index] = {
                k: distribute_tensor(v.to(param.device), param.device_mesh, param.placements)
                if isinstance(param, DTensor) and torch.is_tensor(v) and v.shape == param.shape else v
                for k, v in values.items()
            }
        state = {**state, "state": sharded}
    optimizer.load_state_dict(state)
