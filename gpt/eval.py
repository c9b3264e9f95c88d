"""Held-out loss, perplexity and bits per byte of any checkpoint on any text or record file.

    python -m gpt.eval --ckpt out/shakespeare out/sft_qa --data data/qa/val.jsonl
    python -m gpt.eval lm-eval --ckpt out/sft_qa --tasks my_task --include-path tasks/   (gpt/lm_eval_model.py)

What is scored:
  text (a text file, a folder of .txt, {"text": ...} records): every token of every document but
      its first, with a sliding window. Windows start every `stride` tokens; a window scores only
      the targets the previous one did not, so each token is scored once with at least
      block_size - stride tokens of context (stride = block size: disjoint windows).
  chat and instruction records: the assistant's tokens only, rendered with the checkpoint's chat
      template and truncated exactly as fine-tuning does (examples.encode_chat), so the loss is the
      one SFT reports.
Bits per byte = total loss in bits / UTF-8 bytes of the scored tokens (a chat end marker counts
as one byte, like the plain template's newline): comparable across tokenizers. Windows are scored
one by one (right-padded in batches, causal attention), so the result does not depend on the batch
size. No record text is ever printed.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from gpt import entry
from gpt.config import DataConfig
from gpt.checkpoint import LoadedModel
from gpt.data import files
from gpt.data.batch import Batch
from gpt.data.chat_template import ChatTemplate
from gpt.data.corpus import DataError, iter_documents
from gpt.data.examples import encode_chat
from gpt.data.files import RecordError
from gpt.data.record_formats import parse_record
from gpt.data.tokenizer import Tokenizer, TokenizerError
from gpt.device import autocast, pick_device, pick_threads, resolve_dtype
from gpt.errors import UserError
from gpt.infer.engine import complete
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT, IGNORE_INDEX
from gpt.pretrained import load_pretrained
from gpt.tool_call_eval import evaluate_tool_calls, format_tool_table

FORMATS = ("auto", "text", "chat", "instruction")


@dataclass
class EvalData:
    """What to score: documents (str) and conversations (list of messages), with where each came from."""

    items: list[str | list[dict]]
    where: list[str]

    @classmethod
    def of(cls, items: Sequence[str | list[dict]] | "EvalData") -> "EvalData":
        if isinstance(items, EvalData):
            return items
        return cls(list(items), [f"item {i}" for i in range(1, len(items) + 1)])


@dataclass
class EvalResult:
    loss: float  # mean nats per scored token
    ppl: float
    bpb: float  # bits per UTF-8 byte of the scored text
    tokens: int
    bytes: int
    documents: int = 0
    conversations: int = 0
    truncated: int = 0  # conversations cut to fit the window, as SFT cuts them
    exact_match: float | None = None  # share of greedy replies equal to the reference

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Window:
    ids: np.ndarray  # (L+1,) inputs are ids[:-1], targets ids[1:]
    score: np.ndarray  # (L,) bool: target i counts


# ---------------------------------------------------------------------------- reading


def read_data(path: str | Path, fmt: str = "auto") -> EvalData:
    """Documents and conversations of a corpus or a record file, through the readers training uses."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    p = Path(path)
    if not p.exists():  # never a hub name: evaluation stays offline
        raise DataError(f"{p}: no such file or directory")
    is_corpus = files.is_text_file(p) or (p.is_dir() and any(p.rglob("*.txt")))
    if is_corpus:
        if fmt in ("chat", "instruction"):
            raise DataError(f"{p}: plain text, not {fmt} records; use --format text or auto")
        data = _read_corpus(p)
    else:
        data = _read_records(p, fmt)
    if not data.items:
        raise DataError(f"{p}: no text to evaluate")
    return data


def _read_corpus(p: Path) -> EvalData:
    """Whole documents (pretraining's reader yields pieces; doc_end closes a document)."""
    data, pieces = EvalData([], []), []
    for _, text, doc_end in iter_documents(str(p), DataConfig(val_fraction=0.0), files.Decoding()):
        pieces.append(text)
        if doc_end:
            _add_document(data, pieces, p)
    _add_document(data, pieces, p)
    return data


def _add_document(data: EvalData, pieces: list[str], p: Path) -> None:
    text = "".join(pieces)
    pieces.clear()
    if text:
        data.items.append(text)
        data.where.append(str(p) if p.is_file() else f"{p}: document {len(data.items)}")


def _read_records(p: Path, fmt: str) -> EvalData:
    data, invalid = EvalData([], []), []
    for where, row in files.iter_rows(str(p), files.Decoding()):
        try:
            _, content = parse_record(row, fmt)
        except RecordError as e:
            invalid.append(f"{where}: {e}")
            continue
        data.items.append(content)
        data.where.append(where)
    if invalid:
        more = f" (and {len(invalid) - 1} more invalid records)" if len(invalid) > 1 else ""
        raise DataError(f"{invalid[0]}{more}")
    return data


# ---------------------------------------------------------------------------- windows


def text_windows(ids: Sequence[int], block_size: int, stride: int) -> list[Window]:
    """Sliding windows over one document: every target (ids[1:]) scored once, with >= block_size - stride
    tokens of context; stride == block_size gives disjoint windows."""
    ids = np.asarray(ids, dtype=np.int64)
    out, done, start = [], 0, 0  # done: targets ids[1 : done + 1] already scored
    while done < len(ids) - 1:
        end = min(start + block_size, len(ids) - 1)  # last target index of this window
        score = np.zeros(end - start, dtype=bool)
        score[done - start:] = True
        out.append(Window(ids[start:end + 1], score))
        done, start = end, start + stride
    return out


def chat_window(template: ChatTemplate, messages: list[dict], block_size: int) -> tuple[Window, bool]:
    """The conversation as SFT sees it: same tokens, same loss mask, same truncation."""
    example, truncated = encode_chat(template, messages, block_size + 1)
    return Window(example.ids, example.mask[1:].copy()), truncated


def scored_bytes(tokenizer: Tokenizer, window: Window) -> int:
    """UTF-8 bytes of the scored targets; a special token (a chat end marker) counts as one byte."""
    targets = window.ids[1:][window.score].tolist()
    special = set(tokenizer.special_tokens.values())
    plain = [t for t in targets if t not in special]
    return len(tokenizer.decode_bytes(plain)) + (len(targets) - len(plain))


def _cap(windows: list[Window], max_tokens: int) -> list[Window]:
    """Keep the first max_tokens scored targets (0 = all)."""
    if not max_tokens:
        return windows
    out, left = [], max_tokens
    for w in windows:
        if left <= 0:
            break
        n = int(w.score.sum())
        if n > left:
            score = w.score.copy()
            score[np.flatnonzero(score)[left:]] = False
            w = Window(w.ids, score)
        out.append(w)
        left -= min(n, left)
    return out


# ---------------------------------------------------------------------------- scoring


def collate(windows: list[Window], device: torch.device) -> Batch:
    """Right-padded (x, y); y is IGNORE_INDEX where a target is not scored or is padding."""
    T = max(len(w.ids) - 1 for w in windows)
    x = np.zeros((len(windows), T), dtype=np.int64)
    y = np.full((len(windows), T), IGNORE_INDEX, dtype=np.int64)
    for r, w in enumerate(windows):
        n = len(w.ids) - 1
        x[r, :n] = w.ids[:-1]
        y[r, :n] = np.where(w.score, w.ids[1:], IGNORE_INDEX)
    return Batch(torch.from_numpy(x).to(device), torch.from_numpy(y).to(device))


@torch.no_grad()  # not inference_mode: fit() calls this on DDP/FSDP-wrapped and compiled models
def loss_sums(model: torch.nn.Module, batches: Iterable[Batch], device: torch.device,
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(sum of token losses, scored tokens) over `batches`: the one scoring pass, shared with fit()."""
    was_training = model.training
    model.eval()
    sums = torch.zeros(2, device=device, dtype=torch.float32 if device.type == "mps" else torch.float64)
    try:
        for b in batches:
            with autocast(device, dtype):
                _, loss_sum = model(b.x, b.y, doc_ids=b.doc_ids, reduction="sum")
            sums[0] += loss_sum.double()
            sums[1] += (b.y != IGNORE_INDEX).sum()
    finally:
        model.train(was_training)
    return sums


def evaluate(model: GPT, tokenizer: Tokenizer, texts_or_records: Sequence[str | list[dict]] | EvalData, *,
             stride: int | None = None, batch_size: int = 32, max_tokens: int = 0, exact_match: bool = False,
             max_new_tokens: int = 0, device: torch.device | str | None = None,
             dtype: torch.dtype = torch.float32, progress: bool = False) -> EvalResult:
    """Loss, perplexity and bits per byte of `model` on documents (str) and conversations (message lists);
    `progress` shows bars on a terminal's stderr (batches scored, replies generated)."""
    data = EvalData.of(texts_or_records)
    block = model.config.block_size
    stride = (block // 2 or 1) if stride is None else stride
    if not 0 < stride <= block:
        raise UserError(f"--stride must be between 1 and the block size ({block}), got {stride}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    template = ChatTemplate(tokenizer)
    windows: list[Window] = []
    result = EvalResult(math.nan, math.nan, math.nan, 0, 0)
    for item, where in zip(data.items, data.where):
        try:
            if isinstance(item, str):
                windows += text_windows(tokenizer.encode(item), block, stride)
                result.documents += 1
            else:
                window, cut = chat_window(template, item, block)
                windows.append(window)
                result.conversations += 1
                result.truncated += cut
        except TokenizerError:  # the tokenizer does not know a character; the text itself is not shown
            raise DataError(f"{_locate(tokenizer, item, where)}: has a character this checkpoint's tokenizer "
                            "cannot encode (a char model knows only the characters of its training corpus)") from None
    windows = _cap([w for w in windows if w.score.any()], max_tokens)
    if not windows:
        raise DataError("nothing to score: every document is a single token or every response is empty")
    order = sorted(range(len(windows)), key=lambda i: len(windows[i].ids))  # similar lengths, less padding
    starts = tqdm(range(0, len(order), batch_size), desc="scoring", unit="batch", disable=None if progress else True,
                  file=sys.stderr, leave=False)
    batches = (collate([windows[i] for i in order[k:k + batch_size]], device) for k in starts)
    total, tokens = loss_sums(model, batches, device, dtype).tolist()
    result.tokens, result.bytes = int(tokens), sum(scored_bytes(tokenizer, w) for w in windows)
    result.loss = total / tokens
    result.ppl = math.exp(min(result.loss, 700.0))
    result.bpb = total / math.log(2) / max(result.bytes, 1)
    if exact_match:
        result.exact_match = exact_match_rate(model, template, [c for c in data.items if not isinstance(c, str)],
                                              max_new_tokens, device, progress)
    return result


def _locate(tokenizer: Tokenizer, item: str | list[dict], where: str) -> str:
    """`where`, plus the line of a long document that holds the unknown character."""
    if not isinstance(item, str):
        return where
    for lineno, line in enumerate(item.splitlines(), 1):
        try:
            tokenizer.encode(line)
        except TokenizerError:
            return f"{where}: line {lineno}"
    return where


def exact_match_rate(model: GPT, template: ChatTemplate, conversations: list[list[dict]], max_new_tokens: int,
                     device: torch.device, progress: bool = False) -> float | None:
    """Share of conversations whose greedy reply to everything before the last assistant turn equals it."""
    tok, hits, n = template.tok, 0, 0
    stop_ids = template.end_ids
    for messages in tqdm(conversations, desc="exact match", unit="reply", disable=None if progress else True, file=sys.stderr,
                         leave=False):
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        if last == 0:
            continue
        reference = messages[last]["content"]
        budget = max_new_tokens or len(tok.encode(reference)) + 8
        prompt = template.encode(messages[:last], add_generation_prompt=True)
        params = SamplingParams(temperature=0.0, max_tokens=budget, stop=tuple(template.stop_strings))
        reply = complete(model, tok, prompt, params, stop_ids=stop_ids)[0].text
        hits += reply.strip() == reference.strip()
        n += 1
    return hits / n if n else None


# ---------------------------------------------------------------------------- command line


def load_scored(path: str, device: torch.device) -> LoadedModel:
    """Our run or checkpoint folder, a local Hugging Face folder or a PEFT adapter folder (never the hub), in eval mode."""
    if not Path(path).exists():
        raise DataError(f"--ckpt {path}: no such checkpoint or run folder")
    loaded = load_pretrained(path, device)
    loaded.model.eval()
    return loaded


def format_table(rows: list[tuple[str, EvalResult]]) -> str:
    head = ["checkpoint", "loss", "ppl", "bits/byte", "tokens", "bytes"]
    show_em = any(r.exact_match is not None for _, r in rows)
    head += ["exact match"] if show_em else []
    lines = [head]
    for name, r in rows:
        cells = [name, f"{r.loss:.4f}", f"{r.ppl:.2f}", f"{r.bpb:.4f}", f"{r.tokens:,}", f"{r.bytes:,}"]
        if show_em:
            cells.append("-" if r.exact_match is None else f"{r.exact_match:.1%}")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w)  # noqa: E731
                                  for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join(fmt(c) for c in lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt.eval", description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", nargs="+", required=True, help="run folders, checkpoint folders, Hugging Face folders or PEFT adapter folders")
    p.add_argument("--data", required=True, help="text file, folder of .txt, JSONL/JSON/CSV/Parquet, datasets folder")
    p.add_argument("--format", default="auto", choices=FORMATS, help="record format (auto: per record)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride in tokens (default: block/2)")
    p.add_argument("--batch-size", type=int, default=32, help="windows per forward pass (does not change results)")
    p.add_argument("--max-tokens", type=int, default=0, help="score only the first N tokens (0 = all)")
    p.add_argument("--exact-match", action="store_true", help="also generate greedy replies (chat/instruction)")
    p.add_argument("--max-new-tokens", type=int, default=0, help="reply budget for --exact-match (0 = auto)")
    p.add_argument("--tool-calls", action="store_true",
                   help="tool-call accuracy on chat records with tools, free and grammar-held (greedy replies)")
    p.add_argument("--limit", type=int, default=0, help="--tool-calls: the first N records only (0 = all)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--json", action="store_true", help="one JSON object per checkpoint instead of a table")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[tuple[str, EvalResult]]:
    if args.tool_calls:
        return run_tool_calls(args)
    if args.limit:
        raise UserError("--limit counts records of --tool-calls; --max-tokens caps what is scored")
    if args.stride is not None and args.stride <= 0:
        raise UserError(f"--stride must be a positive number of tokens, got {args.stride}")
    if args.max_tokens < 0:
        raise UserError(f"--max-tokens must be >= 0, got {args.max_tokens}")
    data = read_data(args.data, args.format)
    device = _device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    rows = []
    for path in args.ckpt:
        loaded = load_scored(path, device)
        model, tok = loaded.model, loaded.tokenizer
        try:
            result = evaluate(model, tok, data, stride=args.stride, batch_size=args.batch_size,
                              max_tokens=args.max_tokens, exact_match=args.exact_match,
                              max_new_tokens=args.max_new_tokens, device=device, dtype=dtype, progress=True)
        except UserError as e:
            raise UserError(f"{path}: {e}") from None
        rows.append((path, result))
        if args.json:
            print(json.dumps({"ckpt": path, "data": str(args.data), **result.to_dict()}), flush=True)
    if not args.json:
        print(format_table(rows))
    return rows


def _device(name: str) -> torch.device:
    try:
        return pick_device(name)
    except RuntimeError as e:
        raise UserError(str(e)) from None


def run_tool_calls(args: argparse.Namespace) -> list:
    """--tool-calls: each checkpoint's replies to the records' first requests, free and held to the tools' grammar."""
    refused = [flag for flag, on in (("--max-tokens", args.max_tokens), ("--stride", args.stride is not None),
                                     ("--exact-match", args.exact_match)) if on]
    if refused:
        raise UserError(f"{refused[0]} does not apply to --tool-calls (--limit N evaluates the first N records)")
    if args.limit < 0 or args.max_new_tokens < 0 or args.batch_size < 1:
        raise UserError("--limit and --max-new-tokens must be >= 0 and --batch-size >= 1")
    data = read_data(args.data, "chat" if args.format == "auto" else args.format)
    device = _device(args.device)
    torch.set_num_threads(pick_threads())  # decoding: a thread barrier on a busy core costs a time slice each
    rows = []
    for path in args.ckpt:
        loaded = load_scored(path, device)
        with autocast(device, resolve_dtype(args.dtype, device)):
            try:
                results = evaluate_tool_calls(loaded.model, loaded.tokenizer, data.items, where=data.where,
                                              max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                              limit=args.limit, progress=True)
            except UserError as e:
                raise UserError(f"{path}: {e}") from None
        rows += [(path, r) for r in results]
        for r in results if args.json else []:
            print(json.dumps({"ckpt": path, "data": str(args.data), **r.to_dict()}), flush=True)
    if not args.json:
        print(format_tool_table(rows))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["lm-eval"]:  # lm-evaluation-harness tasks, in process (gpt/lm_eval_model.py)
        entry.main(lambda: _lm_eval_main(argv[1:]))
        return
    args = parse_args(argv)
    entry.main(lambda: run(args))


def _lm_eval_main(argv: list[str]) -> None:
    try:
        from gpt import lm_eval_model
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "lm_eval":
            raise
        raise UserError("lm-eval is not installed: pip install 'lm-eval[api]'") from None
    lm_eval_model.run(lm_eval_model.parse_args(argv))


if __name__ == "__main__":
    main()
