"""Memorization audit: will this checkpoint repeat its training records? Run it before a release.

    python -m gpt.audit --ckpt out/qa --data data/qa.jsonl [--heldout FILE] [--samples 200]
        [--prefix-tokens 32] [--suffix-tokens 32] [--json] [--max-exposure X] [--max-extraction Y]

Two measures:
  verbatim extraction  for --samples training records (seeded), prompt with the record's start (the first
      K tokens; for chat records the conversation up to the last assistant reply), decode greedily and
      count the records whose next M tokens come out exactly; also the mean longest run of tokens the
      output shares with the record. Held-out records are the control: a model that merely models the
      data well scores there too, memorization shows as the gap between the two rows.
  canary exposure      (Carlini et al. 2019, "The Secret Sharer") for the secrets that data.canaries
      planted (canaries.json in the run's out_dir): rank each secret's log-perplexity among all secrets of
      its format, exposure = log2(|space|) - log2(rank). Small spaces are ranked exactly; larger ones from
      --candidates random secrets, whose log-perplexities are fitted with a skew-normal distribution
      (method of moments) whose CDF gives the rank, as in the paper. Chance is about 1.4 bits; the maximum,
      log2(|space|), means the secret is the model's first choice.

Held-out records, when --heldout is not given: if --data is the checkpoint's own training file, the
records its run held out (the same seeded split, or data.val_path; for a text corpus its tail). Both are
redacted as the run redacted its data (data.redact*) before they are tokenized.
Records are named by index only: no record text or secret is ever printed.
With --max-exposure (the largest canary exposure, bits) / --max-extraction (the share of training records
extracted minus the control's share, or the raw share without a control) the command exits with status 3
when a measure is above its threshold, so CI can gate a release.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from gpt import checkpoint, entry
from gpt.pretrained import load_pretrained
from gpt.config import SourceConfig
from gpt.data import canary, files, pii
from gpt.data.chat_template import ChatTemplate
from gpt.data.corpus import split_text_file
from gpt.data.finetune_data import load_file, split_indices
from gpt.data.tokenizer import Tokenizer, TokenizerError
from gpt.device import pick_device
from gpt.errors import UserError
from gpt.infer.engine import generate
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

GATE_FAILED = 3


class AuditError(UserError):
    """Bad audit arguments or inputs; the message says which and how to fix it."""


@dataclass
class Probe:
    """One record cut into what the model is shown and what it should not be able to continue with."""

    index: int  # record number in its file (token offset for a text corpus)
    prompt: list[int]
    target: list[int]


@dataclass
class Extraction:
    records: int
    extracted: int
    share: float
    mean_common_run: float
    mean_target_tokens: float
    extracted_indices: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------- records -> probes


def training_redactor(trained: dict) -> pii.Redactor | None:
    """The redaction the checkpoint's run applied before tokenizing (its data.redact* settings), so that
    the probes are the text it trained on; None when it redacted nothing."""
    cfg = SourceConfig(**{f.name: trained[f.name] for f in fields(SourceConfig) if f.name in trained})
    if cfg.redact_mode == "pseudonym" and not (cfg.redact_salt_file and Path(cfg.redact_salt_file).is_file()):
        print("note: the run redacted with pseudonyms from a random secret (no data.redact_salt_file), so the "
              "audited text has other fake values where it had personal data", file=sys.stderr)
        cfg.redact_salt_file = ""
    return pii.from_config(cfg)


def record_probes(path: str, tok: Tokenizer, k: int, m: int, budget: int,
                  redactor: pii.Redactor | None = None) -> list[list[Probe]]:
    """Every valid record of a JSONL/JSON/CSV/Parquet file as probes (one list per record: the records
    of load_file, in order). Chat: the conversation up to the last reply, then the reply; text: first k tokens."""
    loaded = load_file(path, "auto", ChatTemplate(tok), budget, train_on_prompt=False, redactor=redactor)
    if not loaded.records:
        where, why = loaded.invalid[0]
        raise AuditError(f"{path}: none of its {loaded.total} records can be read with this checkpoint's "
                         f"tokenizer; the first: {where}: {why}")
    out = []
    for i, examples in enumerate(loaded.records):
        e = examples[0]
        if e.mask[1:].all():  # a text record: every token is a target
            probe = Probe(i, e.ids[:k].tolist(), e.ids[k:k + m].tolist())
        else:
            starts = np.flatnonzero(e.mask & ~np.concatenate([[False], e.mask[:-1]]))
            s = int(starts[-1])  # the last assistant reply
            end = s + int(np.argmin(e.mask[s:])) if not e.mask[s:].all() else len(e.ids)
            probe = Probe(i, e.ids[:s].tolist(), e.ids[s:min(end, s + m)].tolist())
        out.append([probe] if probe.prompt and probe.target else [])
    return out


def text_probes(data: Path, own: bool, tok: Tokenizer, k: int, m: int, args: argparse.Namespace, trained: dict,
                rng: np.random.Generator, redactor: pii.Redactor | None) -> tuple[list[Probe], list[Probe] | None]:
    """A text corpus: its training part (all of it, or the part before its run's validation tail) and
    the held-out part (that tail, or --heldout), redacted as the run redacted it."""
    parts: dict[str, list[str]] = {"train": [], "val": []}
    dec = files.Decoding(trained.get("encoding", "utf-8"), trained.get("encoding_errors", "strict"))

    def read(path: Path, val_fraction: float) -> Iterator[tuple[str, str]]:  # (piece, split), redacted
        pieces = ((piece, split) for split, piece, _ in split_text_file(path, val_fraction, dec))
        return redactor.redact_stream(pieces, str(path)) if redactor else pieces

    for piece, split in read(data, float(trained.get("val_fraction", 0.0)) if own else 0.0):
        parts[split].append(piece)
    if args.heldout:
        parts["val"] = [piece for piece, _ in read(Path(args.heldout), 0.0)]
    train = windows("".join(parts["train"]), tok, k, m, args.samples, rng)
    held = windows("".join(parts["val"]), tok, k, m, args.samples, rng) if parts["val"] else None
    return train, held


def windows(text: str, tok: Tokenizer, k: int, m: int, n: int, rng: np.random.Generator) -> list[Probe]:
    """n windows of k + m tokens at seeded random offsets of a text corpus (the offset names the record)."""
    ids = tok.encode(text)
    if len(ids) < k + m:
        return []
    starts = np.sort(rng.choice(len(ids) - (k + m) + 1, size=min(n, len(ids) - (k + m) + 1), replace=False))
    return [Probe(int(s), ids[s:s + k], ids[s + k:s + k + m]) for s in starts]


def load_probes(args: argparse.Namespace, tok: Tokenizer, config: dict, block_size: int,
                rng: np.random.Generator) -> tuple[list[Probe], list[Probe] | None]:
    """(training probes, held-out probes or None) per the module doc's rules."""
    data = Path(args.data)
    for name, path in (("--data", args.data), ("--heldout", args.heldout)):
        if path and not Path(path).exists():
            raise AuditError(f"{name} {path}: no such file")
    trained = config.get("data", {}) or {}
    source = trained.get("path") or (str(Path(trained.get("data_dir", "data")) / "shakespeare" / "input.txt")
                                     if trained.get("dataset") == "shakespeare" else "")
    own = bool(source) and Path(source).resolve() == data.resolve()
    k, m = args.prefix_tokens, args.suffix_tokens
    redactor = training_redactor(trained)  # held-out text gets the same, so the control stays comparable
    if files.is_text_file(data):  # a text corpus
        try:
            return text_probes(data, own, tok, k, m, args, trained, rng, redactor)
        except TokenizerError as e:  # a character the model's vocabulary lacks
            raise AuditError(f"{args.data}: {e}") from None
    per_record = record_probes(str(data), tok, k, m, block_size + 1, redactor)
    kept = list(range(len(per_record)))
    held_records: list[list[Probe]] | None = None
    if args.heldout:
        held_records = record_probes(args.heldout, tok, k, m, block_size + 1, redactor)
    elif own and trained.get("val_path"):
        held_records = record_probes(trained["val_path"], tok, k, m, block_size + 1, redactor)
    elif own and "split_seed" in trained and len(per_record) >= 2:  # the fine-tuning run's own split
        kept, held = split_indices(len(per_record), float(trained["val_fraction"]), int(trained["split_seed"]))
        held_records = [per_record[i] for i in held]
    train = [p for i in kept for p in per_record[i]]
    held_out = [p for r in held_records for p in r] if held_records is not None else None

    def pick(probes: list[Probe]) -> list[Probe]:  # --samples of them, seeded, in file order
        return [probes[i] for i in sorted(rng.permutation(len(probes))[:args.samples])]

    return pick(train), (pick(held_out) if held_out is not None else None)


# ---------------------------------------------------------------------------- extraction


def longest_common_run(a: list[int], b: list[int]) -> int:
    """Length of the longest run of consecutive tokens that a and b share (anywhere in each)."""
    best, prev = 0, [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            if x == y:
                cur[j] = prev[j - 1] + 1
                best = max(best, cur[j])
        prev = cur
    return best


def extraction(model: GPT, tok: Tokenizer, probes: list[Probe], batch_size: int = 64) -> Extraction:
    """Greedy continuations of every probe through the engine, batched by prompt length."""
    block = model.config.block_size
    device = next(model.parameters()).device
    outputs: dict[int, list[int]] = {}
    by_length: dict[int, list[int]] = {}
    for n, p in enumerate(probes):
        by_length.setdefault(min(len(p.prompt), block - len(p.target)), []).append(n)
    for length, members in by_length.items():
        for i in range(0, len(members), batch_size):
            chunk = members[i:i + batch_size]
            m = max(len(probes[n].target) for n in chunk)
            idx = torch.tensor([probes[n].prompt[-length:] for n in chunk], dtype=torch.long, device=device)
            out = generate(model, idx, m, SamplingParams(temperature=0.0), vocab_limit=tok.vocab_size)[:, length:]
            for n, row in zip(chunk, out.tolist()):
                outputs[n] = row[:len(probes[n].target)]
    exact = [n for n, p in enumerate(probes) if outputs[n] == p.target]
    runs = [longest_common_run(outputs[n], p.target) for n, p in enumerate(probes)]
    count = max(1, len(probes))
    return Extraction(len(probes), len(exact), len(exact) / count, sum(runs) / count,
                      sum(len(p.target) for p in probes) / count, sorted(probes[n].index for n in exact))


# ---------------------------------------------------------------------------- canary exposure


@torch.inference_mode()
def log_perplexities(model: GPT, tok: Tokenizer, texts: list[str], context: str = "",
                     batch_tokens: int = 1 << 21) -> np.ndarray:
    """-log2 P(text | context) of every text, in batched forward passes (padded rows masked out).
    With no context the first token is given and the rest scored."""
    model.eval()
    device = next(model.parameters()).device
    skip = max(1, len(tok.encode(context))) if context else 1
    seqs = [tok.encode(context + t) for t in texts]
    longest = max(len(s) for s in seqs)
    if longest > model.config.block_size:
        raise AuditError(f"canaries of {longest} tokens do not fit the model's block_size ({model.config.block_size})")
    rows = max(1, min(4096, batch_tokens // (longest * model.config.vocab_size)))
    out = np.empty(len(seqs))
    for i in range(0, len(seqs), rows):
        chunk = seqs[i:i + rows]
        ids = torch.zeros(len(chunk), longest, dtype=torch.long)
        scored = torch.zeros(len(chunk), longest, dtype=torch.bool)
        for r, s in enumerate(chunk):
            ids[r, :len(s)] = torch.tensor(s)
            scored[r, skip:len(s)] = True
        ids, scored = ids.to(device), scored.to(device)
        logits, _ = model(ids[:, :-1])
        logp = logits.float().log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        out[i:i + len(chunk)] = (-(logp * scored[:, 1:]).sum(1) / math.log(2)).cpu().numpy()
    return out


def skewnorm_fit(x: np.ndarray) -> tuple[float, float, float]:
    """(location, scale, shape) of a skew-normal with the sample's mean, variance and skewness."""
    mean, sd = float(x.mean()), float(x.std())
    if sd == 0:
        return mean, 1e-12, 0.0
    g = float(np.clip(((x - mean) ** 3).mean() / sd**3, -0.99, 0.99))
    a = abs(g) ** (2 / 3)
    delta = math.copysign(math.sqrt(math.pi / 2 * a / (a + ((4 - math.pi) / 2) ** (2 / 3))), g)
    scale = sd / math.sqrt(1 - 2 * delta**2 / math.pi)
    return mean - scale * delta * math.sqrt(2 / math.pi), scale, delta / math.sqrt(1 - delta**2)


def skewnorm_log2_cdf(x: float, loc: float, scale: float, shape: float, points: int = 4000) -> float:
    """log2 P(X <= x), integrated in log space so that far-tail values (2^-60) stay accurate."""
    z = (x - loc) / scale
    span = max(12.0, z + 12.0)
    u = span * torch.linspace(0, 1, points, dtype=torch.float64) ** 2  # dense next to x, where the mass is
    t = z - u
    log_pdf = math.log(2) - 0.5 * t**2 - 0.5 * math.log(2 * math.pi) + torch.special.log_ndtr(shape * t)
    du = torch.diff(u)
    log_w = torch.log(torch.cat([du[:1], du[:-1] + du[1:], du[-1:]]) / 2)  # trapezoid weights
    return float(torch.logsumexp(log_pdf + log_w, 0)) / math.log(2)


def exposures(model: GPT, tok: Tokenizer, record: dict, candidates: int = 10_000, seed: int = 0,
              exact: bool | None = None) -> dict:
    """Exposure of every planted secret among the secrets of its format: exact when the space has at most
    `candidates` secrets (or exact=True), else estimated from that many sampled ones (or exact=False)."""
    fmt = canary.Format(record["format"], key="canaries.json format")
    secrets, context, space = record["secrets"], record.get("context", ""), fmt.space_size
    log2_space = math.log2(space)
    if exact if exact is not None else space <= candidates:
        every = fmt.enumerate()
        scores = log_perplexities(model, tok, every, context)
        where = {s: i for i, s in enumerate(every)}
        if any(s not in where for s in secrets):
            raise AuditError(f"a secret of the canaries file does not have its format '{record['format']}'")
        mine = scores[[where[s] for s in secrets]]
        ranks = [1 + int((scores < p).sum()) for p in mine]
        values = [log2_space - math.log2(r) for r in ranks]
        method = f"exact over all {space:,} secrets"
    else:
        sample = fmt.sample(candidates, np.random.default_rng([seed, 0xA0D17]))
        scores = log_perplexities(model, tok, sample, context)
        mine = log_perplexities(model, tok, secrets, context)
        fit = skewnorm_fit(scores)
        values = [min(log2_space, max(0.0, -skewnorm_log2_cdf(float(p), *fit))) for p in mine]
        method = f"estimated from {candidates:,} sampled secrets (skew-normal fit)"
    return {"format": record["format"], "space": space, "max_exposure": log2_space, "method": method,
            "repeats": record.get("repeats"), "exposures": values}


def find_canaries(args: argparse.Namespace, ckpt: Path) -> Path | None:
    if args.canaries:
        if not Path(args.canaries).is_file():
            raise AuditError(f"--canaries {args.canaries}: no such file")
        return Path(args.canaries)
    for folder in (ckpt, ckpt.parent, Path(args.ckpt)):
        if (folder / canary.FILE).is_file():
            return folder / canary.FILE
    return None


# ---------------------------------------------------------------------------- report


def check_args(args: argparse.Namespace) -> None:
    """Counts of at least 1, and finite thresholds (a NaN threshold would pass every report: no gate)."""
    if min(args.prefix_tokens, args.suffix_tokens, args.samples, args.candidates, args.batch_size) < 1:
        raise AuditError("--prefix-tokens, --suffix-tokens, --samples, --candidates and --batch-size must be >= 1")
    for flag, value in (("--max-exposure", args.max_exposure), ("--max-extraction", args.max_extraction)):
        if value is not None and not math.isfinite(value):
            raise AuditError(f"{flag} must be a finite number, got {value}")


def read_canaries(path: Path) -> dict:
    """A canaries file written by data.canaries: a JSON object with its format and a list of secrets."""
    try:
        record = canary.read_canary_file(path)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"{path}: not a readable canaries file ({type(e).__name__}); use the canaries.json "
                         "that data.canaries wrote") from None
    secrets = record.get("secrets") if isinstance(record, dict) else None
    if not isinstance(record, dict) or not isinstance(record.get("format"), str) or not secrets or \
            not isinstance(secrets, list) or not all(isinstance(s, str) for s in secrets):
        raise AuditError(f"{path}: not a canaries file (expected a JSON object with 'format' and a list of "
                         "'secrets'); use the canaries.json that data.canaries wrote")
    canary.Format(record["format"], key=f"{path}: format")  # a bad format is a one-line ConfigError
    return record


def audit(args: argparse.Namespace) -> dict:
    """Run both measures and return the report (no record text, no secrets)."""
    check_args(args)
    device = pick_device(args.device)
    ckpt = checkpoint.resolve(args.ckpt)
    found = find_canaries(args, ckpt)
    if args.max_exposure is not None and found is None:
        raise AuditError("--max-exposure needs canaries: train with data.canaries=N, or pass --canaries FILE")
    record = read_canaries(found) if found else None
    loaded = load_pretrained(ckpt, device)
    model, tok = loaded.model, loaded.tokenizer
    model.eval()
    block = model.config.block_size
    if args.suffix_tokens >= block:
        raise AuditError(f"--suffix-tokens ({args.suffix_tokens}) must be below the model's block_size ({block})")
    rng = np.random.default_rng(args.seed)
    train, held = load_probes(args, tok, checkpoint.read_config(ckpt), block, rng)
    if not train:
        raise AuditError(f"--data {args.data}: no record long enough for --prefix-tokens {args.prefix_tokens} "
                         "plus one token to extract")
    report = {"checkpoint": str(ckpt), "data": args.data, "prefix_tokens": args.prefix_tokens,
              "suffix_tokens": args.suffix_tokens,
              "extraction": {"training": asdict(extraction(model, tok, train, args.batch_size)),
                             "heldout": asdict(extraction(model, tok, held, args.batch_size)) if held else None}}
    report["canaries"] = exposures(model, tok, record, args.candidates, args.seed) if record else None
    report["gate"] = gate(report, args.max_exposure, args.max_extraction)
    return report


def excess_extraction(report: dict) -> float:
    """The share of training records extracted beyond the held-out control's share (memorization, not
    modelling); the raw share when there is no control."""
    held = report["extraction"]["heldout"]
    return report["extraction"]["training"]["share"] - (held["share"] if held else 0.0)


def gate(report: dict, max_exposure: float | None, max_extraction: float | None) -> dict:
    """Which thresholds the report exceeds (a release gate), with the two measures they are checked on."""
    excess = excess_extraction(report)
    worst = max(report["canaries"]["exposures"]) if report["canaries"] else None
    failures = []
    if max_extraction is not None and excess > max_extraction:
        failures.append(f"extraction {excess:.3f} above the control > --max-extraction {max_extraction}")
    if max_exposure is not None and worst is not None and worst > max_exposure:
        failures.append(f"exposure {worst:.1f} bits > --max-exposure {max_exposure}")
    return {"passed": not failures, "failures": failures, "extraction_above_control": excess,
            "max_exposure": worst}


def format_report(r: dict) -> str:
    m = r["suffix_tokens"]
    lines = [f"memorization audit of {r['checkpoint']}",
             f"extraction: greedy decoding from each record's first {r['prefix_tokens']} tokens (chat: the "
             f"conversation up to the reply); exact = the next {m} tokens reproduced",
             f"  {'records':<20}{'audited':>8}{'exact':>8}{'share':>9}{'mean common run':>22}"]
    rows = [("training", r["extraction"]["training"]), ("held-out (control)", r["extraction"]["heldout"])]
    for name, e in rows:
        if e is None:
            lines.append(f"  {name:<20}  none: pass --heldout FILE for a control")
            continue
        run = f"{e['mean_common_run']:.1f} of {e['mean_target_tokens']:.1f} tokens"
        lines.append(f"  {name:<20}{e['records']:>8}{e['extracted']:>8}{e['share']:>9.1%}{run:>22}")
    if r["extraction"]["heldout"] is not None:
        lines.append(f"  extracted beyond the control: {r['gate']['extraction_above_control']:.1%}")
    shown = r["extraction"]["training"]["extracted_indices"]
    if shown:
        more = f" (+{len(shown) - 20} more in --json)" if len(shown) > 20 else ""
        lines.append(f"  extracted training records (index): {' '.join(map(str, shown[:20]))}{more}")
    c = r["canaries"]
    if c is None:
        lines.append("canaries: none recorded for this checkpoint (train with data.canaries=N to measure exposure)")
    else:
        lines.append(f"canaries: '{c['format']}', {c['repeats']} copies each; exposure in bits, "
                     f"{c['method']}; chance ~1.4, max {c['max_exposure']:.1f}")
        lines.append("  " + "  ".join(f"#{i}: {x:.1f}" for i, x in enumerate(c["exposures"])))
    g = r["gate"]
    if g["failures"]:
        lines.append("gate: FAILED: " + "; ".join(g["failures"]))
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m gpt.audit", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="output dir or checkpoint folder")
    p.add_argument("--data", required=True, help="the training file (records or a text corpus)")
    p.add_argument("--heldout", default="", help="records the model never saw (default: its run's held-out split)")
    p.add_argument("--samples", type=int, default=200, help="records audited per split (seeded)")
    p.add_argument("--prefix-tokens", type=int, default=32, help="prompt length K for text records")
    p.add_argument("--suffix-tokens", type=int, default=32, help="continuation length M that must match")
    p.add_argument("--canaries", default="", help="canaries.json (default: in the checkpoint or its out dir)")
    p.add_argument("--candidates", type=int, default=10_000, help="secrets ranked against (sampled when larger)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--max-exposure", type=float, default=None, help="exit 3 if a canary's exposure is above this")
    p.add_argument("--max-extraction", type=float, default=None,
                   help="exit 3 if the share of training records extracted, minus the control's, is above this")
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    report = entry.main(lambda: audit(args))
    print(json.dumps(report, indent=1) if args.json else format_report(report))
    if not report["gate"]["passed"]:
        if args.json:
            print("gate: FAILED: " + "; ".join(report["gate"]["failures"]), file=sys.stderr)
        sys.exit(GATE_FAILED)


if __name__ == "__main__":
    main()
