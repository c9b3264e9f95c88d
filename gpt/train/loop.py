"""The training loop, `fit()`, shared by pretraining and fine-tuning.

fit() takes a model and a batch source and owns everything else: optimizer and schedule,
mixed precision, gradient accumulation, clipping, the non-finite guard, evaluation, logging,
checkpoints and exact resume. The loss of a step is the sum of token losses over all its
micro-batches (and ranks) divided by the number of supervised tokens, so accumulation equals
one larger batch and SFT batches with few response tokens are weighted fairly.

What a step minimises is an Objective: token cross-entropy by default (pretraining, SFT), or
another loss summed over its own units (DPO: over preference pairs), with extra metrics that are
averaged the same way and logged beside the loss.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from gpt import checkpoint
from gpt.config import (
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    save_yaml,
    to_dict,
)
from gpt.data.batch import Batch
from gpt.data.tokenizer import Tokenizer
from gpt.device import (
    autocast,
    enable_tf32,
    gpu_peak_flops,
    pick_device,
        resolve_dtype,
    tune_allocator,
)
from gpt.errors import UserError
from gpt.eval import loss_sums
from gpt.model import GPT, IGNORE_INDEX
from gpt.train import dist as distributed
from gpt.train.metrics import MetricsLog
from gpt.train.optim import lr_at, make_optimizer


class TrainingError(UserError):
    """Training cannot go on (a non-finite loss); the last good checkpoint is kept."""


class BatchSource(Protocol):
    def train_batch(self, step: int, micro: int) -> Any: ...

    def val_batches(self) -> Iterable[Any]: ...


class Objective(Protocol):
    """A loss summed over units (tokens, pairs) of a batch; fit() divides by the units of the whole step."""

    metrics: tuple[str, ...]  # names of the extra values, each summed over units like the loss
    batch_unit: str  # what train.batch_size counts ("sequences", "pairs")

    def units(self, batch: Any) -> torch.Tensor: ...

    def __call__(self, model: torch.nn.Module, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss summed over the batch's units, the metrics summed likewise: a (len(metrics),) tensor)."""
        ...


class TokenLoss:
    """Cross-entropy summed over supervised tokens: pretraining and SFT."""

    metrics: tuple[str, ...] = ()
    batch_unit = "sequences"

    def units(self, b: Batch) -> torch.Tensor:
        return (b.y != IGNORE_INDEX).sum()

    def __call__(self, model, b: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        _, loss_sum = model(b.x, b.y, doc_ids=b.doc_ids, reduction="sum")
        return loss_sum, loss_sum.new_zeros(0)


@dataclass(frozen=True)
class FitConfig:
    """The part of a run config that fit() reads, as its own copy: fit() never writes to the caller's config."""

    out_dir: Path
    train: TrainConfig
    optim: OptimConfig
    logging: LoggingConfig
    record: dict[str, Any]  # the resolved run config: out_dir/config.yaml and every checkpoint's config.yaml

    @classmethod
    def of(cls, cfg: Any, model: ModelConfig) -> FitConfig:
        """From a PretrainConfig or FinetuneConfig and the architecture actually trained (sized to the
        tokenizer, taken from init_from, grown by chat tokens): checkpoints record that one."""
        record = to_dict(cfg) | {"model": to_dict(model)}
        return cls(Path(cfg.out_dir), copy.deepcopy(cfg.train), copy.deepcopy(cfg.optim),
                   copy.deepcopy(cfg.logging), record)


@dataclass
class FitResult:
    step: int  # optimizer steps completed
    best_val_loss: float
    last_val_loss: float
    interrupted: bool = False
    stopped_early: bool = False


def fit(
    model: GPT,
    batches: BatchSource,
    cfg: FitConfig,
    tokenizer: Tokenizer,
    device: torch.device,
    dist: distributed.Dist | None = None,
    export: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None = None,
    objective: Objective | None = None,
) -> FitResult:
    """Train `model` on `batches` for cfg.train.max_iters optimizer steps, checkpointing to cfg.out_dir.

    `export` maps the model to the weights a checkpoint stores (default: its state dict); LoRA passes
    the merged weights so every checkpoint is a plain GPT. `latest` then also keeps the trainable
    parameters as they train (the frozen rest is rebuilt from init_from), so resume stays exact.
    `objective` is what a step minimises (default: TokenLoss).
    """
    dist = dist or distributed.Dist()
    objective = objective or TokenLoss()
    t, o = cfg.train, cfg.optim
    out = cfg.out_dir
    if dist.is_main:
        checkpoint.prepare_out_dir(out)
        save_yaml(cfg.record, out / "config.yaml")
    dtype = resolve_dtype(t.dtype, device)
    enable_tf32()
    model.to(device)
    start, best, last_val = 0, math.inf, math.inf
    state = _resume_weights(model, out, export) if t.resume else None
    train_model = distributed.wrap(model, dist, device, dtype)  # fsdp shards `model` in place
    optimizer = make_optimizer(model, o, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if state is not None:
        start, best = _resume_state(optimizer, scaler, state, dist)
        if dist.is_main:
            print(f"resuming from {out / 'latest'} at iter {start} (best val loss {best:.4f})", flush=True)
    dist.barrier()
    train_model.train()
    if t.compile:
        train_model = torch.compile(train_model)

    log = MetricsLog(out, dist.is_main, t.max_iters, start, cfg.logging.progress, cfg.logging, cfg.record)
    if dist.is_main:
        global_batch = t.batch_size * t.grad_accum * dist.world_size
        log.print(f"global batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} ranks = "
                  f"{global_batch} {objective.batch_unit}; {model.num_params() / 1e6:.2f}M parameters; {dtype} on {device}")
        log.record(iter=start, global_batch=global_batch, world_size=dist.world_size)
    peak = gpu_peak_flops(device)
    flops_per_step = None
    stale_evals, result = 0, None
    step = start

    pending: list[torch.Tensor] = []  # (loss, *metrics) per step not yet checked: one device sync per log line

    def check_finite() -> list[float]:
        """Raise on the first non-finite loss since the last check; return the latest (loss, *metrics)."""
        if not pending:
            return [math.nan]
        rows = torch.stack(pending).tolist()
        first = step - len(rows)
        pending.clear()
        for i, (value, *_) in enumerate(rows):
            if not math.isfinite(value):
                raise TrainingError(
                    f"iter {first + i}: loss is {value}; stopping. The last good checkpoint in {out} is kept: "
                    "lower optim.lr, raise optim.warmup_iters or use dtype=float32"
                )
        return rows[-1]

    def save(kind: str, val_loss: float) -> None:
        check_finite()  # never write weights from a diverged step
        meta = {"iter": step, "val_loss": val_loss, "best_val_loss": best}
        state = _train_state(optimizer, scaler, step, best) if kind == "latest" else None
        if dist.is_main or dist.sharded:  # fsdp: every rank sends its shards to rank 0
            weights = checkpoint.model_state_dict(model) if export is None else export(model)
            if state is not None and export is not None:
                state["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
            weights, state = distributed.full_state(weights, dist), distributed.full_state(state, dist)
        if dist.is_main:
            checkpoint.save_checkpoint(out / kind, weights, cfg.record, tokenizer, meta, state)
        dist.barrier()

    try:
        t_last, tokens_since = time.perf_counter(), 0
        while True:
            due = step % t.eval_interval == 0 and step != start or step == t.max_iters or (step == 0 and start == 0)
            if due and t.eval_iters > 0:
                last_val, val_metrics = evaluate(train_model, batches, device, dtype, dist, objective)
                improved = last_val < best
                best = min(best, last_val)
                shown = val_metrics if objective.metrics else {"ppl": math.exp(min(last_val, 50.0))}
                log.print(f"iter {step}: val loss {last_val:.4f}" + _shown(shown) + (" (best)" if improved else ""))
                log.record(iter=step, val_loss=last_val, **{f"val_{k}": v for k, v in shown.items()})
                if step > 0 and (not t.checkpoint_interval or step % t.checkpoint_interval == 0 or step == t.max_iters):
                    save("latest", last_val)
                    if improved:
                        save("best", last_val)
                stale_evals = 0 if improved else stale_evals + 1
                if t.early_stop_patience and stale_evals >= t.early_stop_patience:
                    log.print(f"early stop: no improvement in {stale_evals} evaluations")
                    result = FitResult(step, best, last_val, stopped_early=True)
                    break
                t_last = time.perf_counter()
            elif t.checkpoint_interval and step % t.checkpoint_interval == 0 and step != start:
                save("latest", last_val)
            if step >= t.max_iters:
                break

            lr = lr_at(step, o, t.max_iters)
            for group in optimizer.param_groups:
                group["lr"] = lr
            loss_t, n_tokens = _train_step(train_model, batches, step, t.grad_accum, optimizer, scaler,
                                           device, dtype, dist, o.grad_clip, objective)
            pending.append(loss_t)
            step += 1
            tokens_since += n_tokens
            log.advance()
            if step % t.log_interval == 0 or step == t.max_iters:
                loss, *stats = check_finite()  # also waits for the device, so the timing below is real
                now = time.perf_counter()
                n_steps = t.log_interval if step % t.log_interval == 0 else step % t.log_interval
                ms = (now - t_last) * 1000 / max(1, n_steps)
                tok_s = tokens_since / max(now - t_last, 1e-9)
                step_metrics = dict(zip(objective.metrics, stats))
                line = (f"iter {step}: loss {loss:.4f}{_shown(step_metrics)}, lr {lr:.2e}, {ms:.1f} ms/iter, "
                        f"{tok_s:,.0f} tok/s")
                values = dict(iter=step, loss=loss, **step_metrics, lr=lr, ms_per_iter=ms, tokens_per_s=tok_s)
                if peak:
                    flops_per_step = flops_per_step or model.flops_per_token(training=True)
                    mfu = tok_s * flops_per_step / peak / dist.world_size
                    line += f", mfu {mfu:.1%}"
                    values["mfu"] = mfu
                log.print(line)
                log.record(**values)
                t_last, tokens_since = now, 0
        check_finite()
        if result is None:
            result = FitResult(step, best, last_val)
    except KeyboardInterrupt:
        if dist.enabled:
            # Ranks may be stopped inside different collectives; a save (gather + barrier) could hang.
            log.print(f"interrupted at iter {step}; the last checkpoint in {out / 'latest'} is kept")
            raise
        log.print(f"interrupted at iter {step}: saving {out / 'latest'}")
        optimizer.zero_grad(set_to_none=True)
        save("latest", last_val)
        result = FitResult(step, best, last_val, interrupted=True)
    finally:
        log.close()
    return result


def _shown(metrics: dict[str, float]) -> str:
    return "".join(f", {k} {v:.2f}" if k == "ppl" else f", {k} {v:.4f}" for k, v in metrics.items())


def _train_step(model, batches: BatchSource, step: int, accum: int, optimizer, scaler, device, dtype, dist,
                grad_clip: float, objective: Objective | None = None) -> tuple[torch.Tensor, int]:
    """One optimizer step over `accum` micro-batches; returns ((mean loss, *mean metrics) as a tensor, left on
    the device so the step does not wait for it, and the tokens seen on this rank)."""
    objective = objective or TokenLoss()
    micro = [batches.train_batch(step, m) for m in range(accum)]
    counts = torch.stack([objective.units(b) for b in micro]).sum().to(device, torch.float32)
    n_supervised = dist.all_reduce_sum(counts.clone()).clamp(min=1)
    # DDP averages gradients over ranks; multiply back so the result is sum(loss)/n_supervised.
    scale = dist.world_size / n_supervised
    total = torch.zeros(1 + len(objective.metrics), device=device)
    for m, b in enumerate(micro):
        with dist.no_sync(model, skip=m < accum - 1), autocast(device, dtype):
            loss_sum, stats = objective(model, b)
        scaler.scale(loss_sum * scale).backward()
        total += torch.cat([loss_sum.detach().float().view(1), stats.detach().float()])
    if grad_clip > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    loss = dist.all_reduce_sum(total) / n_supervised
    return loss, sum(b.x.numel() for b in micro)


def evaluate(model, batches: BatchSource, device, dtype, dist: distributed.Dist,
             objective: Objective | None = None) -> tuple[float, dict[str, float]]:
    """Mean validation loss and the objective's metrics, averaged over all ranks. Token loss is gpt.eval's
    scoring pass; another objective (DPO) is scored by itself, per its units."""
    if objective is None or isinstance(objective, TokenLoss):
        sums = dist.all_reduce_sum(loss_sums(model, batches.val_batches(), device, dtype))
        return (sums[0] / sums[1].clamp(min=1)).item(), {}
    sums = dist.all_reduce_sum(_objective_sums(model, batches, objective, device, dtype))
    loss, _, *stats = (sums / sums[1].clamp(min=1)).tolist()
    return loss, dict(zip(objective.metrics, stats))


@torch.no_grad()
def _objective_sums(model, batches: BatchSource, objective: Objective, device, dtype) -> torch.Tensor:
    """(loss, units, *metrics) summed over this rank's validation batches, in eval mode."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2 + len(objective.metrics), device=device)
    try:
        for b in batches.val_batches():
            with autocast(device, dtype):
                loss_sum, stats = objective(model, b)
            sums += torch.cat([loss_sum.float().view(1), objective.units(b).float().view(1), stats.float()])
    finally:
        model.train(was_training)
    return sums


def _train_state(optimizer, scaler, step: int, best: float) -> dict:
    state = {
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict(),
        "iter": step,
        "best_val_loss": best,
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _resume_weights(model, out: Path, export=None) -> dict:
    """Load the weights of out_dir/latest into the unwrapped model; returns its training state."""
    try:
        ckpt = checkpoint.resolve(out, prefer="latest")
    except checkpoint.CheckpointError:
        ckpt = out
    if ckpt.name not in ("latest", ".latest.old"):
        raise checkpoint.CheckpointError(
            f"train.resume=true but {out} has no 'latest' checkpoint to resume from; "
            "check out_dir, or drop train.resume to start a new run")
    state = checkpoint.load_train_state(ckpt)
    if "trainable" in state:  # saved weights are an export (merged LoRA): restore the training form
        _load_trainable(model, state["trainable"], ckpt)
        _check_export(model, export, ckpt)
    else:
        checkpoint.load_weights(model, ckpt / checkpoint.MODEL_FILE)
    return state


def _resume_state(optimizer, scaler, state: dict, dist: distributed.Dist) -> tuple[int, float]:
    """Optimizer, scaler and RNG from a training state saved by any number of ranks."""
    distributed.load_optimizer_state(optimizer, state["optimizer"], dist)
    scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if dist.rank > 0:  # the saved streams are rank 0's: derive distinct ones per rank (dropout masks)
        torch.manual_seed(int(torch.randint(0, 2**62, ())) + dist.rank)
    return int(state["iter"]), float(state["best_val_loss"])


def _load_trainable(model, saved: dict[str, torch.Tensor], ckpt: Path) -> None:
    params = dict(model.named_parameters())
    expected = {n for n, p in params.items() if p.requires_grad}
    if set(saved) != expected:
        raise checkpoint.CheckpointError(
            f"{ckpt}: its trainable parameters do not match this run's (was it saved with other lora.* settings?)")
    with torch.no_grad():
        for name, tensor in saved.items():
            if tensor.shape != params[name].shape:
                raise checkpoint.CheckpointError(f"{ckpt}: {name} has shape {tuple(tensor.shape)}, "
                                                 f"expected {tuple(params[name].shape)}")
            params[name].copy_(tensor)


def _check_export(model, export, ckpt: Path) -> None:
    """The frozen weights come from init_from again: the export must reproduce the saved weights."""
    saved = checkpoint.read_weights(ckpt / checkpoint.MODEL_FILE)
    now = export(model) if export is not None else {}
    for name, tensor in saved.items():
        if name not in now or not torch.allclose(now[name].float().cpu(), tensor.float(), rtol=1e-5, atol=1e-6):
            raise checkpoint.CheckpointError(
                f"{ckpt}: {name} differs from the run that saved it; resume with the same init_from and lora.*")


def start_run(cfg: Any) -> tuple[distributed.Dist, torch.device]:
    """Check out_dir is writable (before any work; this also clears temp folders of dead saves), join
    torchrun's process group (if any), pick this rank's device, set threads and seed."""
    if int(os.environ.get("RANK", 0)) == 0:
        checkpoint.prepare_out_dir(Path(cfg.out_dir))
    tune_allocator()  # library callers too, not only the entry scripts (GPT_MALLOC_TUNE=0: off)
    dist = distributed.setup(cfg.distributed, cfg.train.device)
    if cfg.train.threads:  # 0 keeps torch's default: a thread count that followed the load would make
        torch.set_num_threads(cfg.train.threads)  # runs (and resume) differ in the last bits
    device = distributed.device_for(dist, pick_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed + dist.rank)
    return dist, device
