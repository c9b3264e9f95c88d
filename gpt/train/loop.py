"""The training loop, `fit()`, shared by pretraining and fine-tuning.

fit() takes a model and a batch source and owns everything else: optimizer and schedule,
mixed precision, gradient accumulation, clipping, the non-finite guard, evaluation, logging,
checkpoints and exact resume. The loss of a step is the sum of token losses over all its
micro-batches (and ranks) divided by the number of supervised tokens, so accumulation equals
one larger batch and SFT batches with few response tokens are weighted fairly.

What a step minimises is an Objective: token cross-entropy by default (pretraining, SFT), or
another loss summed over its own units (DPO: over preference pairs), with extra metrics that are
averaged the same way and logged beside the loss. The objective also sums its validation loss, so
every objective validates through the same code.

How it reads: fit() sets up a FitSetup (what stays fixed: the model as trained in a StepContext, the
Optimization, the log) and a LoopState (what changes: step, best and last validation loss, ...),
then loops: validate_and_checkpoint() when due (validation_due, latest_due), _train_step(), and
log_step() every log_interval steps.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch

from gpt import checkpoint, outputs
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
    pick_threads,
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

    def validation_sums(self, model: torch.nn.Module, batches: Iterable[Any], device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
        """(loss, units, *metrics) summed over `batches` (this rank's validation batches), in eval mode
        and without gradients: fit()'s validation pass."""
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

    def validation_sums(self, model, batches: Iterable[Batch], device, dtype) -> torch.Tensor:
        """gpt.eval's scoring pass, so fit()'s validation loss is the one `python -m gpt.eval` reports."""
        return loss_sums(model, batches, device, dtype)


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


@dataclass(frozen=True)
class StepContext:
    """What every pass of batches through the model runs with, training step or validation."""

    model: torch.nn.Module  # as trained: wrapped for DDP/FSDP, compiled
    objective: Objective
    device: torch.device
    dtype: torch.dtype  # autocast's
    dist: distributed.Dist


@dataclass(frozen=True)
class Optimization:
    """How a training step turns its micro-batches into one update."""

    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    grad_accum: int  # micro-batches per step
    grad_clip: float  # max gradient norm; 0: no clipping


@dataclass(frozen=True)
class FitSetup:
    """What fit() sets up once; the loop's functions read it and never change it."""

    cfg: FitConfig
    model: GPT  # unwrapped (FSDP shards it in place): what checkpoints store
    tokenizer: Tokenizer
    export: Callable[[torch.nn.Module], dict[str, torch.Tensor]] | None
    batches: BatchSource
    ctx: StepContext
    opt: Optimization
    log: MetricsLog
    peak_flops: float | None  # of this device, when known: then steps report MFU
    flops_per_token: float | None  # training FLOPs of one token, when peak_flops is known


@dataclass
class LoopState:
    """What the loop changes as it goes, passed explicitly to the functions that read or change it."""

    start: int  # the step this run started (or resumed) from
    step: int  # optimizer steps completed
    best_val: float = math.inf
    last_val: float = math.inf
    stale_evals: int = 0  # evaluations in a row without a new best: early stopping counts these
    pending: list[torch.Tensor] = field(default_factory=list)  # (loss, *metrics) per step not yet checked
    tokens_since: int = 0  # tokens this rank trained on since the last log line
    t_last: float = 0.0  # time of the last log line or evaluation: the next line's ms/iter counts from here


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
    if dist.is_main:
        checkpoint.prepare_out_dir(cfg.out_dir)
        save_yaml(cfg.record, cfg.out_dir / "config.yaml")
    run, state = _start(model, batches, cfg, tokenizer, device, dist, export, objective or TokenLoss())
    try:
        return _loop(run, state)
    except KeyboardInterrupt:
        if dist.enabled:
            # Ranks may be stopped inside different collectives; a save (gather + barrier) could hang.
            run.log.print(f"interrupted at iter {state.step}; the last checkpoint in {cfg.out_dir / 'latest'} is kept")
            raise
        run.log.print(f"interrupted at iter {state.step}: saving {cfg.out_dir / 'latest'}")
        run.opt.optimizer.zero_grad(set_to_none=True)
        write_checkpoint(run, state, "latest")
        return FitResult(state.step, state.best_val, state.last_val, interrupted=True)
    finally:
        run.log.close()


def _start(model: GPT, batches: BatchSource, cfg: FitConfig, tokenizer: Tokenizer, device: torch.device,
           dist: distributed.Dist, export, objective: Objective) -> tuple[FitSetup, LoopState]:
    """Place and wrap the model, build the optimizer, restore `latest` when resuming, open the log."""
    t = cfg.train
    dtype = resolve_dtype(t.dtype, device)
    enable_tf32()
    model.to(device)
    model.activation_checkpointing = t.activation_checkpointing  # before DDP/FSDP/compile wrap it
    state = LoopState(start=0, step=0)
    saved = _resume_weights(model, cfg.out_dir, export) if t.resume else None
    train_model = distributed.wrap(model, dist, device, dtype)  # fsdp shards `model` in place
    optimizer = make_optimizer(model, cfg.optim, device.type)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    if saved is not None:
        state.step, state.best_val = _resume_state(optimizer, scaler, saved, dist)
        state.start = state.step
        if dist.is_main:
            print(f"resuming from {cfg.out_dir / 'latest'} at iter {state.start} "
                  f"(best val loss {state.best_val:.4f})", flush=True)
    dist.barrier()
    train_model.train()
    if t.compile:
        train_model = torch.compile(train_model)

    log = MetricsLog(out_dir=cfg.out_dir, enabled=dist.is_main, progress_total=t.max_iters, start=state.start,
                     show_progress=cfg.logging.progress, wandb_cfg=cfg.logging, run_config=cfg.record)
    if dist.is_main:
        global_batch = t.batch_size * t.grad_accum * dist.world_size
        log.print(f"global batch: {t.batch_size} x {t.grad_accum} accum x {dist.world_size} ranks = "
                  f"{global_batch} {objective.batch_unit}; {model.num_params() / 1e6:.2f}M parameters; "
                  f"{dtype} on {device}")
        log.record(iter=state.start, global_batch=global_batch, world_size=dist.world_size)
    peak = gpu_peak_flops(device)
    run = FitSetup(cfg, model, tokenizer, export, batches,
                   ctx=StepContext(train_model, objective, device, dtype, dist),
                   opt=Optimization(optimizer, scaler, grad_accum=t.grad_accum, grad_clip=cfg.optim.grad_clip),
                   log=log, peak_flops=peak,
                   flops_per_token=model.flops_per_token(training=True) if peak else None)
    return run, state


def _loop(run: FitSetup, state: LoopState) -> FitResult:
    """The loop: validate and checkpoint when due, stop at max_iters (or early), else take a step."""
    t = run.cfg.train
    state.t_last, state.tokens_since = time.perf_counter(), 0
    while True:
        stopped_early = validate_and_checkpoint(run, state)
        if stopped_early or state.step >= t.max_iters:
            break
        lr = lr_at(state.step, run.cfg.optim, t.max_iters)
        for group in run.opt.optimizer.param_groups:
            group["lr"] = lr
        loss, n_tokens = _train_step(run.ctx, run.opt, run.batches, state.step)
        state.pending.append(loss)
        state.step += 1
        state.tokens_since += n_tokens
        run.log.advance()
        if log_due(t, state.step):
            log_step(run, state, lr)
    check_finite(state, run.cfg.out_dir)
    return FitResult(state.step, state.best_val, state.last_val, stopped_early=stopped_early)


def validation_due(t: TrainConfig, step: int, start: int) -> bool:
    """Validate before the first step of a new run, every eval_interval steps after the step the run
    started (or resumed) from, and after the last step."""
    on_interval = step % t.eval_interval == 0 and step != start
    first_of_new_run = step == start == 0
    return t.eval_iters > 0 and (on_interval or step == t.max_iters or first_of_new_run)


def latest_due(t: TrainConfig, step: int, start: int, validated: bool) -> bool:
    """Whether to write `latest` now: with train.checkpoint_interval 0, at every validation past step 0;
    else every checkpoint_interval steps after the step the run started from, and at the last step
    once it is validated."""
    if not t.checkpoint_interval:
        return validated and step > 0
    on_interval = step % t.checkpoint_interval == 0 and step != start
    return on_interval or (validated and step == t.max_iters > 0)


def log_due(t: TrainConfig, step: int) -> bool:
    """A training line every log_interval steps, and one after the last step."""
    return step % t.log_interval == 0 or step == t.max_iters


def validate_and_checkpoint(run: FitSetup, state: LoopState) -> bool:
    """Validate and write the checkpoints that are due at this step; True when early stopping ends the run."""
    t = run.cfg.train
    validated = validation_due(t, state.step, state.start)
    improved = validated and validate(run, state)
    if latest_due(t, state.step, state.start, validated):
        write_checkpoint(run, state, "latest")
        if improved:
            write_checkpoint(run, state, "best")
    if not validated:
        return False
    if t.early_stop_patience and state.stale_evals >= t.early_stop_patience:
        run.log.print(f"early stop: no improvement in {state.stale_evals} evaluations")
        return True
    state.t_last = time.perf_counter()  # time spent validating is not counted as training time
    return False


def validate(run: FitSetup, state: LoopState) -> bool:
    """Validation loss (and metrics) at this step, logged; updates the best and stale counts. True on a new best."""
    state.last_val, metrics = validation_loss(run.ctx, run.batches)
    improved = state.last_val < state.best_val
    state.best_val = min(state.best_val, state.last_val)
    state.stale_evals = 0 if improved else state.stale_evals + 1
    shown = metrics if run.ctx.objective.metrics else {"ppl": math.exp(min(state.last_val, 50.0))}
    run.log.print(f"iter {state.step}: val loss {state.last_val:.4f}" + _shown(shown) + (" (best)" if improved else ""))
    run.log.record(iter=state.step, val_loss=state.last_val, **{f"val_{k}": v for k, v in shown.items()})
    return improved


def validation_loss(ctx: StepContext, batches: BatchSource) -> tuple[float, dict[str, float]]:
    """Mean validation loss and the objective's metrics over the validation batches of all ranks, per the
    objective's units (token loss: gpt.eval's scoring pass)."""
    sums = ctx.objective.validation_sums(ctx.model, batches.val_batches(), ctx.device, ctx.dtype)
    sums = ctx.dist.all_reduce_sum(sums)
    loss, _, *stats = (sums / sums[1].clamp(min=1)).tolist()
    return loss, dict(zip(ctx.objective.metrics, stats))


def log_step(run: FitSetup, state: LoopState, lr: float) -> None:
    """The console line and metrics row of the latest step, timed over the steps since the last line."""
    t = run.cfg.train
    loss, *stats = check_finite(state, run.cfg.out_dir)  # also waits for the device, so the timing below is real
    now = time.perf_counter()
    n_steps = state.step % t.log_interval or t.log_interval  # the last line may follow fewer steps
    ms = (now - state.t_last) * 1000 / max(1, n_steps)
    tok_s = state.tokens_since / max(now - state.t_last, 1e-9)
    step_metrics = dict(zip(run.ctx.objective.metrics, stats))
    line = (f"iter {state.step}: loss {loss:.4f}{_shown(step_metrics)}, lr {lr:.2e}, {ms:.1f} ms/iter, "
            f"{tok_s:,.0f} tok/s")
    values = dict(iter=state.step, loss=loss, **step_metrics, lr=lr, ms_per_iter=ms, tokens_per_s=tok_s)
    if run.peak_flops:
        mfu = tok_s * run.flops_per_token / run.peak_flops / run.ctx.dist.world_size
        line += f", mfu {mfu:.1%}"
        values["mfu"] = mfu
    run.log.print(line)
    run.log.record(**values)
    state.t_last, state.tokens_since = now, 0


def check_finite(state: LoopState, out: Path) -> list[float]:
    """Raise on the first non-finite loss since the last check; return the latest (loss, *metrics).
    One device sync per check, not one per step."""
    if not state.pending:
        return [math.nan]
    rows = torch.stack(state.pending).tolist()
    first = state.step - len(rows)
    state.pending.clear()
    for i, (value, *_) in enumerate(rows):
        if not math.isfinite(value):
            raise TrainingError(
                f"iter {first + i}: loss is {value}; stopping. The last good checkpoint in {out} is kept: "
                "lower optim.lr, raise optim.warmup_iters or use dtype=float32"
            )
    return rows[-1]


def write_checkpoint(run: FitSetup, state: LoopState, kind: str) -> None:
    """out_dir/<kind> ("latest", "best") at this step; `latest` also holds what resuming needs."""
    out, dist, model = run.cfg.out_dir, run.ctx.dist, run.model
    check_finite(state, out)  # never write weights from a diverged step
    meta = {"iter": state.step, "val_loss": state.last_val, "best_val_loss": state.best_val,
            "threads": torch.get_num_threads()}
    saved = _train_state(run.opt, state) if kind == "latest" else None
    if dist.is_main or dist.sharded:  # fsdp: every rank sends its shards to rank 0
        weights = checkpoint.model_state_dict(model) if run.export is None else run.export(model)
        if saved is not None and run.export is not None:
            saved["trainable"] = {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}
        weights, saved = distributed.full_state(weights, dist), distributed.full_state(saved, dist)
    if dist.is_main:
        checkpoint.save_checkpoint(out / kind, weights, run.cfg.record, run.tokenizer, meta, saved)
    dist.barrier()


def _shown(metrics: dict[str, float]) -> str:
    return "".join(f", {k} {v:.2f}" if k == "ppl" else f", {k} {v:.4f}" for k, v in metrics.items())


def _train_step(ctx: StepContext, opt: Optimization, batches: BatchSource, step: int) -> tuple[torch.Tensor, int]:
    """One optimizer step over opt.grad_accum micro-batches; returns ((mean loss, *mean metrics) as a tensor,
    left on the device so the step does not wait for it, and the tokens seen on this rank)."""
    objective, dist, accum = ctx.objective, ctx.dist, opt.grad_accum
    micro = [batches.train_batch(step, m) for m in range(accum)]
    counts = torch.stack([objective.units(b) for b in micro]).sum().to(ctx.device, torch.float32)
    n_supervised = dist.all_reduce_sum(counts.clone()).clamp(min=1)
    # DDP averages gradients over ranks; multiply back so the result is sum(loss)/n_supervised.
    scale = dist.world_size / n_supervised
    total = torch.zeros(1 + len(objective.metrics), device=ctx.device)
    for m, b in enumerate(micro):
        with dist.no_sync(ctx.model, skip=m < accum - 1), autocast(ctx.device, ctx.dtype):
            loss_sum, stats = objective(ctx.model, b)
        opt.scaler.scale(loss_sum * scale).backward()
        total += torch.cat([loss_sum.detach().float().view(1), stats.detach().float()])
    if opt.grad_clip > 0:
        opt.scaler.unscale_(opt.optimizer)
        torch.nn.utils.clip_grad_norm_(ctx.model.parameters(), opt.grad_clip)
    opt.scaler.step(opt.optimizer)
    opt.scaler.update()
    opt.optimizer.zero_grad(set_to_none=True)
    loss = dist.all_reduce_sum(total) / n_supervised
    return loss, sum(b.x.numel() for b in micro)


def _train_state(opt: Optimization, state: LoopState) -> dict:
    """What `latest` keeps for an exact resume: optimizer, scaler, step, best and the RNG streams."""
    saved = {
        "optimizer": opt.optimizer.state_dict(),
        "scaler": opt.scaler.state_dict(),
        "iter": state.step,
        "best_val_loss": state.best_val,
        "torch_rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        saved["cuda_rng"] = torch.cuda.get_rng_state_all()
    return saved


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


def training_threads(t: TrainConfig, out_dir: Path) -> tuple[int, str]:
    """CPU threads for this rank and why. `auto` takes the cores other processes leave idle (split between
    the ranks of a machine), unless OMP_NUM_THREADS says otherwise. A resume takes the count `latest`
    recorded: the thread count changes how CPU kernels split their sums, so a run resumed with another
    count differs from an uninterrupted one in the last bits; an explicit other count is allowed, and said."""
    recorded = checkpoint.read_checkpoint_meta(out_dir / "latest").get("threads") if t.resume else None
    if t.threads == "auto" and recorded:
        return int(recorded), "as the run recorded in latest: the resume stays bit-exact"
    if t.threads == "auto" and "OMP_NUM_THREADS" in os.environ:
        n, why = torch.get_num_threads(), "auto: OMP_NUM_THREADS"
    elif t.threads == "auto":
        cores, ranks = len(os.sched_getaffinity(0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        if ranks == 1:
            n, why = pick_threads(), f"auto: the idle cores of {cores}"
        else:  # sibling ranks start together and would count each other as load: split the cores
            n, why = max(1, cores // ranks), f"auto: {cores} cores / {ranks} ranks"
    else:
        n = t.threads or torch.get_num_threads()
        why = "train.threads" if t.threads else "torch's default"
    if recorded and int(recorded) != n:
        why += f"; the run used {recorded}: resumed results differ from an uninterrupted run's in the last bits"
    return n, why


def start_run(cfg: Any) -> tuple[distributed.Dist, torch.device]:
    """Check out_dir (before any work: new, empty or a run folder, see gpt/outputs.py; writable; this also
    clears temp folders of dead saves) and mark it as a run folder, join torchrun's process group (if
    any), pick this rank's device, set threads and seed."""
    if int(os.environ.get("RANK", 0)) == 0:
        outputs.check_run_folder(cfg.out_dir)
        checkpoint.prepare_out_dir(Path(cfg.out_dir))
        outputs.claim_run_folder(cfg.out_dir)
    tune_allocator()  # library callers too, not only the entry scripts (GPT_MALLOC_TUNE=0: off)
    dist = distributed.setup(cfg.distributed, cfg.train.device)
    threads, why = training_threads(cfg.train, Path(cfg.out_dir))
    torch.set_num_threads(threads)
    if dist.is_main:
        print(f"threads: {threads} ({why})", flush=True)
    device = distributed.device_for(dist, pick_device(cfg.train.device))
    torch.manual_seed(cfg.train.seed + dist.rank)
    return dist, device
