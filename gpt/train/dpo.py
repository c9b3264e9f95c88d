"""Preference tuning with DPO (Rafailov et al., 2023): the objective, the pair batches and the reference.

After SFT, people's rankings of two replies to one prompt push the model towards the preferred
one, with the training loop we already have: no reward model, no sampling. For a pair the policy
(the model being trained) and the reference (the model it started from) each give the summed
log-probability of the chosen and the rejected reply; the implicit reward of a reply is
beta * (policy - reference), and the loss asks the chosen reward to exceed the rejected one:

    sigmoid  -(1 - eps) * log sigmoid(beta * d) - eps * log sigmoid(-beta * d)   (the paper; eps = label smoothing)
    ipo      (d - 1 / (2 * beta)) ** 2                                          (Azar et al., 2023)
    hinge    max(0, 1 - beta * d)                                               (SLiC, Zhao et al., 2023)

where d = (policy_chosen - reference_chosen) - (policy_rejected - reference_rejected).

A batch holds B pairs as 2B padded rows, the chosen sequences then the rejected ones, so both
sides go through the model in one forward pass. Only reply tokens count (the loss mask of
gpt/data/examples.encode_reply). Pairs are visited epoch by epoch in a seeded order and step s /
micro-step m / rank r takes pairs from ((s * grad_accum + m) * world_size + r) * batch_size, as SFT
does, so resume is exact and N ranks see what one process sees.

The reference: `init` keeps a frozen copy of the starting model (with LoRA no copy: the same
model with its adapters switched off); `precompute` runs the starting model once over every pair
before training and caches the log-probabilities in out_dir/reference_logps.safetensors (reused
when data and starting weights are unchanged, e.g. on resume; computed again, with a log line, when
the file is damaged), so training holds one model.
"""

from __future__ import annotations

import copy
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from gpt.config import DPOConfig, FinetuneConfig
from gpt.data.examples import Example, Pair
from gpt.data.finetune_data import SFTData
from gpt.data.training_order import ShuffledOrder
from gpt.device import autocast, resolve_dtype
from gpt.lora import adapters_disabled
from gpt.model import IGNORE_INDEX
from gpt.train.dist import Dist

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class PairBatch:
    """B pairs as 2B sequences: B chosen ones, then their B rejected ones, each in a row of its own (x, y
    of 2B rows) or, packed, several to a row (sequence and doc_ids then say which is where)."""

    x: torch.Tensor  # (rows, T) inputs
    y: torch.Tensor  # (rows, T) targets, IGNORE_INDEX off the replies and on padding
    index: torch.Tensor  # (B,) pair numbers within their split; -1 for a padding pair (no loss)
    split: str  # "train" or "val": the split the pair numbers refer to
    sequence: torch.Tensor | None = None  # packed: (rows, T) which of the 2B sequences a position is; -1 padding
    doc_ids: torch.Tensor | None = None  # packed: (rows, T) document number within the row (attention stays inside)


Reference = Callable[[PairBatch], torch.Tensor]  # (2B,) reference log-probs of a batch's sequences


def sequence_logps(model: torch.nn.Module, b: PairBatch) -> torch.Tensor:
    """Summed log-probability of each sequence's reply tokens: (2B,), 0 for padding pairs."""
    _, token_loss = model(b.x, b.y, doc_ids=b.doc_ids, reduction="none")
    if b.sequence is None:
        return -token_loss.sum(-1)
    inside = b.sequence >= 0
    total = torch.zeros(2 * len(b.index), device=token_loss.device, dtype=token_loss.dtype)
    return -total.index_add(0, b.sequence[inside], token_loss[inside])


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, cfg: DPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair loss, chosen reward, rejected reward) by the formulas in the module docstring."""
    d = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected)
    beta, eps = cfg.beta, cfg.label_smoothing
    if cfg.loss == "sigmoid":
        losses = -(1 - eps) * F.logsigmoid(beta * d) - eps * F.logsigmoid(-beta * d)
    elif cfg.loss == "ipo":
        losses = (d - 1 / (2 * beta)) ** 2
    else:
        losses = F.relu(1 - beta * d)
    return losses, beta * (policy_chosen - ref_chosen).detach(), beta * (policy_rejected - ref_rejected).detach()


class DPOLoss:
    """The Objective fit() minimises for preference pairs: mean loss per pair, with the rewards logged.

    accuracy counts a pair 1 when the chosen reward is higher, 0.5 on a tie (so the untrained start,
    where policy = reference, reads as chance: 0.5), 0 otherwise."""

    metrics = ("reward_chosen", "reward_rejected", "margin", "accuracy")
    batch_unit = "pairs"

    def __init__(self, cfg: DPOConfig, reference: Reference):
        self.cfg, self.reference = cfg, reference

    def units(self, b: PairBatch) -> torch.Tensor:
        return (b.index >= 0).sum()

    def __call__(self, model: torch.nn.Module, b: PairBatch) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # first: under fsdp, nothing may run between the forward and its backward
            ref = self.reference(b).float()
        policy = sequence_logps(model, b).float()
        (pc, pr), (rc, rr) = policy.chunk(2), ref.chunk(2)
        losses, chosen, rejected = dpo_loss(pc, pr, rc, rr, self.cfg)
        margin = chosen - rejected
        accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
        valid = (b.index >= 0).float()
        stats = torch.stack([chosen, rejected, margin, accuracy]) * valid
        return (losses * valid).sum(), stats.sum(1)

    @torch.no_grad()
    def validation_sums(self, model: torch.nn.Module, batches: Iterable[PairBatch], device: torch.device,
                        dtype: torch.dtype) -> torch.Tensor:
        """(loss, pairs, *metrics) summed over `batches` in eval mode: fit()'s validation pass."""
        was_training = model.training
        model.eval()
        sums = torch.zeros(2 + len(self.metrics), device=device)
        try:
            for b in batches:
                with autocast(device, dtype):
                    loss_sum, stats = self(model, b)
                sums += torch.cat([loss_sum.float().view(1), self.units(b).float().view(1), stats.float()])
        finally:
            model.train(was_training)
        return sums


def prepare_dpo(cfg: FinetuneConfig, model: torch.nn.Module, data: SFTData, device: torch.device, dist: Dist,
            log: Callable[[str], None] = print) -> tuple[PairBatches, DPOLoss]:
    """The batches and objective of a DPO run (call after LoRA is applied, before fit() trains);
    with sft.packing short sequences of a batch share rows."""
    t = cfg.train
    batches = PairBatches(data.train_pairs, data.val_pairs, batch_size=t.batch_size, device=device, seed=t.seed,
                          rank=dist.rank, world_size=dist.world_size, grad_accum=t.grad_accum,
                          eval_batch_size=t.eval_batch_size, eval_iters=t.eval_iters,
                          packing=cfg.sft.packing)
    if cfg.dpo.reference == "precompute":
        reference = precompute(model, batches, Path(cfg.out_dir), device, resolve_dtype(t.dtype, device), dist, log)
    elif cfg.lora.rank:
        reference = adapters_off(model)
    else:
        reference = frozen_copy(model, device)
    log(f"dpo: {cfg.dpo.loss} loss, beta {cfg.dpo.beta}, reference {cfg.dpo.reference}"
        + (" (LoRA adapters off)" if cfg.lora.rank and cfg.dpo.reference == "init" else ""))
    return batches, DPOLoss(cfg.dpo, reference)


# ---------------------------------------------------------------------------- batches


class PairBatches:
    """The BatchSource of a DPO run: deterministic pairs of padded rows."""

    def __init__(self, train: list[Pair], val: list[Pair], *, batch_size: int, device: torch.device,
                 seed: int = 0, rank: int = 0, world_size: int = 1, grad_accum: int = 1, eval_batch_size: int = 0,
                 eval_iters: int = 20, packing: bool = False):
        """Rows as long as the batch's longest sequence: one sequence each, padded, or with packing as
        many as fit (first fit, longest first), so short sequences share rows instead of padding."""
        self.packing = packing
        self.pairs = {"train": train, "val": val}
        self.batch_size, self.device, self.rank, self.world_size = batch_size, device, rank, world_size
        self.grad_accum, self.eval_batch_size, self.eval_iters = grad_accum, eval_batch_size or batch_size, eval_iters
        self.order = ShuffledOrder(len(train), seed)

    def train_batch(self, step: int, micro: int) -> PairBatch:
        return self.collate(self.train_pairs(step, micro), "train")

    def train_pairs(self, step: int, micro: int) -> list[int]:
        first = ((step * self.grad_accum + micro) * self.world_size + self.rank) * self.batch_size
        return [self.order[first + b] for b in range(self.batch_size)]

    def val_batches(self) -> Iterator[PairBatch]:
        """The first eval_iters batches of validation pairs (the same every time), padded so every rank
        runs the same number of batches."""
        B, W = self.eval_batch_size, self.world_size
        yield from self.split_batches("val", B, self.eval_iters * B * W)

    def split_batches(self, split: str, batch_size: int, limit: int | None = None) -> Iterator[PairBatch]:
        """This rank's batches over the pairs of a split in order (padding pairs have index -1)."""
        n = min(len(self.pairs[split]), limit if limit is not None else len(self.pairs[split]))
        B, W = batch_size, self.world_size
        for i in range(0, n, B * W):
            index = list(range(i + self.rank * B, min(i + (self.rank + 1) * B, n)))
            yield self.collate(index + [-1] * (B - len(index)), split)

    def steps_per_epoch(self) -> float:
        return len(self.pairs["train"]) / (self.batch_size * self.grad_accum * self.world_size)

    def collate(self, index: list[int], split: str) -> PairBatch:
        pairs = self.pairs[split]
        seqs = ([pairs[i].chosen if i >= 0 else None for i in index]
                + [pairs[i].rejected if i >= 0 else None for i in index])
        to = lambda a: torch.from_numpy(a).to(self.device)  # noqa: E731
        index_t = to(np.asarray(index, dtype=np.int64))
        T = max([len(e.ids) - 1 for e in seqs if e is not None] + [1])
        if self.packing:
            x, y, sequence, docs = pack(seqs, T)
            return PairBatch(to(x), to(y), index_t, split, to(sequence), to(docs))
        x = np.zeros((len(seqs), T), dtype=np.int64)
        y = np.full((len(seqs), T), IGNORE_INDEX, dtype=np.int64)
        for r, e in enumerate(seqs):
            if e is not None:
                _place(e, x[r], y[r], 0)
        return PairBatch(to(x), to(y), index_t, split)


def pack(seqs: list[Example | None], T: int) -> tuple[np.ndarray, ...]:
    """x, y, sequence and doc_ids of the sequences packed first-fit, longest first, into rows of T tokens."""
    rows: list[list[int]] = []  # sequence numbers per row
    free: list[int] = []
    for k in sorted((k for k, e in enumerate(seqs) if e is not None), key=lambda k: -len(seqs[k].ids)):
        n = len(seqs[k].ids) - 1
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            r = len(rows)
            rows.append([])
            free.append(T)
        rows[r].append(k)
        free[r] -= n
    rows = rows or [[]]
    x = np.zeros((len(rows), T), dtype=np.int64)
    y = np.full((len(rows), T), IGNORE_INDEX, dtype=np.int64)
    sequence = np.full((len(rows), T), -1, dtype=np.int64)
    docs = np.zeros((len(rows), T), dtype=np.int64)
    for r, ks in enumerate(rows):
        at = 0
        for d, k in enumerate(ks):
            n = _place(seqs[k], x[r], y[r], at)
            sequence[r, at:at + n], docs[r, at:at + n] = k, d
            at += n
        docs[r, at:] = len(ks)  # padding is a document of its own
    return x, y, sequence, docs


def _place(e: Example, x: np.ndarray, y: np.ndarray, at: int) -> int:
    """Write one sequence's inputs and reply targets into a row from `at`; returns its length."""
    n = len(e.ids) - 1
    x[at:at + n] = e.ids[:-1]
    y[at:at + n] = np.where(e.mask[1:], e.ids[1:], IGNORE_INDEX)
    return n


# ---------------------------------------------------------------------------- the reference


def frozen_copy(model: torch.nn.Module, device: torch.device) -> Reference:
    """`init` for full fine-tuning: a frozen copy of the starting weights, always in eval mode."""
    ref = copy.deepcopy(model).to(device).eval().requires_grad_(False)
    return lambda b: sequence_logps(ref, b)


def adapters_off(model: torch.nn.Module) -> Reference:
    """`init` with LoRA: the trained model itself with its adapters switched off, in eval mode (no dropout)."""

    def reference(b: PairBatch) -> torch.Tensor:
        was_training = model.training
        model.eval()
        try:
            with adapters_disabled(model):
                return sequence_logps(model, b)
        finally:
            model.train(was_training)

    return reference


def precompute(model: torch.nn.Module, batches: PairBatches, out_dir: Path, device: torch.device,
               dtype: torch.dtype, dist: Dist, log: Callable[[str], None] = print) -> Reference:
    """`precompute`: the starting model's log-probs of every pair, cached in out_dir; a lookup at train time.

    Each rank computes its share of the batches and the tables are summed across ranks. The cache is
    reused when its fingerprint (data tokens, starting weights, dtype) matches, so a resumed run reads
    it instead of recomputing, and a changed data file or init_from recomputes it."""
    path = Path(out_dir) / REFERENCE_FILE
    key = _fingerprint(model, batches, dtype)
    tables = _read_cache(path, key, batches, log)
    if tables is not None:
        log(f"dpo: reference log-probs from {path}")
    else:
        model.to(device)
        reference = adapters_off(model)
        tables = {}
        with torch.no_grad():
            for split, pairs in batches.pairs.items():
                table = torch.zeros(len(pairs), 2, device=device)
                for b in batches.split_batches(split, batches.eval_batch_size):
                    with autocast(device, dtype):
                        logps = reference(b).float().view(2, -1).t()  # (B, 2): chosen, rejected
                    keep = b.index >= 0
                    table[b.index[keep]] = logps[keep]
                tables[split] = dist.all_reduce_sum(table).cpu()
        if dist.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            save_file(tables, str(tmp), metadata={"fingerprint": key})
            os.replace(tmp, path)
            log(f"dpo: reference log-probs of {sum(len(t) for t in tables.values())} pairs cached in {path}")
        dist.barrier()
    on_device = {split: t.to(device) for split, t in tables.items()}

    def lookup(b: PairBatch) -> torch.Tensor:
        rows = on_device[b.split][b.index.clamp(min=0)]
        return torch.cat([rows[:, 0], rows[:, 1]])

    return lookup


def _read_cache(path: Path, key: str, batches: PairBatches,
                log: Callable[[str], None]) -> dict[str, torch.Tensor] | None:
    """The cached tables when their fingerprint is `key` and they fit the pairs; None (compute them again)
    when there is no cache, it is stale, or it is damaged (a truncated file: one log line says so)."""
    if not path.is_file():
        return None
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            if (f.metadata() or {}).get("fingerprint") != key:
                return None
        tables = load_file(str(path))
    except (OSError, SafetensorError) as e:
        log(f"dpo: {path} is unreadable ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "computing the reference log-probs again")
        return None
    if any(s not in tables or tuple(tables[s].shape) != (len(batches.pairs[s]), 2) for s in batches.pairs):
        log(f"dpo: {path} does not fit these pairs; computing the reference log-probs again")
        return None
    return tables


def _fingerprint(model: torch.nn.Module, batches: PairBatches, dtype: torch.dtype) -> str:
    h = hashlib.sha256(str(dtype).encode())
    for split in ("train", "val"):
        h.update(split.encode())
        for pair in batches.pairs[split]:
            for e in (pair.chosen, pair.rejected):
                h.update(e.ids.tobytes())
                h.update(e.mask.tobytes())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
