"""`python sample.py --ckpt out/run ...`: the command line of the sampler (flags, output formats, chat)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

from gpt.config import ConfigError
from gpt.device import pick_device, pick_threads, resolve_dtype
from gpt.infer.engine import DEFAULT_MAX_MODEL_LEN, Completion, complete
from gpt.infer.sampling import Constraint, SamplingParams
from gpt.infer.speculative import SPECULATE_TOKENS, load_speculation
from gpt.infer.weights import add_model_args, load_for_decoding


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample.py", description="Sample text from a trained checkpoint, or chat with it.")
    p.add_argument("--ckpt", required=True, help="output directory (its best checkpoint, else latest), a checkpoint folder, or a PEFT adapter folder (merged into its base)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, help="prompt text (default: the end-of-text token, or a newline)")
    src.add_argument("--prompt-file", default=None, help="read the prompt from this file ('-' for stdin)")
    p.add_argument("--num-samples", type=int, default=1, help="continuations generated together in one batch")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=200, help="keep the k most likely tokens (0 = all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling: keep tokens up to this total probability")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep tokens at least this fraction of the most likely one's probability (0 = off)")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="> 1 discourages tokens already in the context")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI: subtract count x this from a logit")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI: subtract this once a token appeared")
    p.add_argument("--stop", action="append", default=[], metavar="STR",
                   help="end generation at this text, which is not printed (repeatable)")
    p.add_argument("--seed", type=int, default=None, help="same seed, same output (default: random)")
    shape = p.add_mutually_exclusive_group()  # constrained decoding (llguidance), docs/sampling.md#constrained-decoding
    shape.add_argument("--json-schema", metavar="FILE", default=None,
                       help="the output is JSON valid against this JSON schema file (compact, no free whitespace)")
    shape.add_argument("--regex", metavar="RE", default=None, help="the whole output matches this regular expression")
    shape.add_argument("--choice", metavar="A,B,C", default=None, help="the output is exactly one of these strings")
    shape.add_argument("--grammar", metavar="FILE", default=None, help="the output follows this Lark or GBNF grammar file")
    add_model_args(p, threads="0 = the cores other processes leave idle; see docs/performance.md#threads",
                   context_cap=DEFAULT_MAX_MODEL_LEN)
    p.add_argument("--no-kv-cache", action="store_true", help="recompute the whole context every token (reference path)")
    spec = p.add_argument_group("speculative decoding (docs/sampling.md#speculative-decoding)")
    spec.add_argument("--speculate", default=None, metavar="ngram|DRAFT_CKPT",
                      help="guess tokens cheaply and verify several per forward pass: ngram (prompt lookup: copy "
                           "what followed the last tokens earlier in the context) or a draft model's checkpoint "
                           "folder (a smaller model with the same tokenizer); same output distribution, greedy "
                           "output identical (default: off)")
    spec.add_argument("--speculate-tokens", type=int, default=None, metavar="K",
                      help=f"tokens guessed and verified per forward pass (default {SPECULATE_TOKENS})")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=None,
                   help="print tokens as they are generated (default: on when writing to a terminal)")
    p.add_argument("--logprobs", type=int, default=0, metavar="K",
                   help="show each token's probability and the K most likely alternatives")
    p.add_argument("--json", action="store_true", help="one JSON object per sample (text, token_ids, finish_reason)")
    p.add_argument("--chat", action="store_true", help="interactive conversation using the chat template")
    p.add_argument("--system", default=None, help="system message for --chat")
    return p


def read_prompt(args: argparse.Namespace) -> str | None:
    if args.prompt_file is None:
        return args.prompt
    if args.prompt_file == "-":
        return sys.stdin.read()
    return _read_text(args.prompt_file, "--prompt-file")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The flags as the engine's one SamplingParams (validated: a bad value is a one-line error naming the flag)."""
    params = SamplingParams(temperature=args.temperature, top_k=args.top_k or None, top_p=args.top_p, min_p=args.min_p,
                            repetition_penalty=args.repetition_penalty, frequency_penalty=args.frequency_penalty,
                            presence_penalty=args.presence_penalty, max_tokens=args.max_new_tokens,
                            stop=tuple(args.stop), seed=args.seed, logprobs=args.logprobs,
                            constraint=read_constraint(args))
    return params.validate(name=lambda key: "--max-new-tokens" if key == "max_tokens" else "--" + key.replace("_", "-"))


def read_constraint(args: argparse.Namespace) -> Constraint | None:
    """--json-schema / --regex / --choice / --grammar as a Constraint, checked by the grammar library (one-line errors)."""
    from gpt.infer.constraints import ConstraintError, check_constraint

    if args.json_schema is not None:
        flag, constraint = "--json-schema", Constraint.json_schema(_read_text(args.json_schema, "--json-schema"))
    elif args.regex is not None:
        flag, constraint = "--regex", Constraint.regex(args.regex)
    elif args.choice is not None:
        flag, constraint = "--choice", Constraint.choice([c for c in args.choice.split(",") if c])
    elif args.grammar is not None:
        flag, constraint = "--grammar", Constraint.grammar(_read_text(args.grammar, "--grammar"))
    else:
        return None
    try:
        check_constraint(constraint.validate())
    except ConfigError as e:
        raise ConstraintError(f"{flag}: {e}") from None
    return constraint


def _read_text(file: str, flag: str) -> str:
    """The UTF-8 text of the file a flag names (a missing or undecodable file is a one-line error)."""
    path = Path(file)
    if not path.is_file():
        raise ConfigError(f"{flag} {path}: no such file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{flag} {path}: not UTF-8 text (byte {e.start})") from None


def check_args(args: argparse.Namespace) -> None:
    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.threads < 0:
        raise ConfigError(f"--threads must be >= 0 (0 = the cores other processes leave idle), got {args.threads}")
    sampling_params(args)
    if args.chat and (args.json or args.num_samples > 1 or args.logprobs or args.prompt or args.prompt_file):
        raise ConfigError("--chat is interactive: it cannot be combined with --json, --logprobs, --num-samples > 1 "
                          "or a --prompt/--prompt-file")
    if args.chat and any(v is not None for v in (args.json_schema, args.regex, args.choice, args.grammar)):
        raise ConfigError("--json-schema, --regex, --choice and --grammar apply to completions, not --chat")
    if args.system is not None and not args.chat:
        raise ConfigError("--system only applies to --chat")
    check_speculate_args(args)


def check_speculate_args(args: argparse.Namespace) -> None:
    """--speculate and its flags: each needs the others it depends on (one-line errors naming the flag)."""
    if args.speculate is None:
        if args.speculate_tokens is not None:
            raise ConfigError("--speculate-tokens needs --speculate")
        return
    if args.speculate_tokens is not None and args.speculate_tokens < 1:
        raise ConfigError(f"--speculate-tokens must be >= 1, got {args.speculate_tokens}")
    if args.speculate != "ngram" and not Path(args.speculate).is_dir():
        raise ConfigError(f"--speculate {args.speculate}: neither ngram nor a checkpoint folder (a draft model)")
    if args.no_kv_cache:
        raise ConfigError("--speculate verifies guesses in the KV cache: it cannot be combined with --no-kv-cache")


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    check_args(args)
    prompt = read_prompt(args)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    torch.set_num_threads(pick_threads(args.threads))  # barriers on shared cores cost a time slice each
    loaded = load_for_decoding(args, device, dtype)
    model, tokenizer, folder = loaded.model, loaded.tokenizer, loaded.folder
    params = sampling_params(args)
    if args.chat:
        from gpt.infer.chat_session import run_chat

        print(f"loaded {folder}", file=sys.stderr)
        run_chat(model, tokenizer, params, system=args.system, use_kv_cache=not args.no_kv_cache,
                 max_model_len=args.max_model_len, speculation=_speculation(args, device, dtype))
        return
    if prompt is None:
        prompt = "" if tokenizer.eot_id is not None else "\n"
    stream = args.stream if args.stream is not None else sys.stdout.isatty()
    stream = stream and not args.json and args.num_samples == 1
    if stream:
        sys.stdout.write(prompt)
    on_text = _write_stream if stream else None

    results = _complete(args, loaded, prompt, params, on_text, device, dtype)
    for i, r in enumerate(results):
        if args.json:
            print(json.dumps({"index": i, **r.to_dict()}, ensure_ascii=False))
            continue
        if not stream:
            if i:
                print("-" * 40)
            sys.stdout.write(prompt + r.text)
        print()
        if args.logprobs:
            print(format_logprobs(r))
        print(f"[{len(r.token_ids)} tokens, finish reason: {r.finish_reason}]", file=sys.stderr)


def _complete(args: argparse.Namespace, loaded, prompt: str, params: SamplingParams, on_text, device,
              dtype: torch.dtype) -> list[Completion]:
    """The completions of the prompt: the engine, or speculative decoding (--speculate) with its stats on stderr."""
    speculation = _speculation(args, device, dtype)
    results = complete(loaded.model, loaded.tokenizer, prompt, params, num_samples=args.num_samples,
                       use_kv_cache=not args.no_kv_cache, on_text=on_text, max_model_len=args.max_model_len,
                       speculation=speculation)
    if speculation is not None:
        print(speculation.stats.summary(speculation.name), file=sys.stderr)
    return results


def _speculation(args: argparse.Namespace, device, dtype: torch.dtype):
    """--speculate's proposer (a draft checkpoint loaded and checked), or None."""
    if args.speculate is None:
        return None
    return load_speculation(args.speculate, args.speculate_tokens or SPECULATE_TOKENS, device, dtype, args.quantize,
                            verify=not args.no_verify)


def format_logprobs(r: Completion) -> str:
    """One line per generated token: its probability, then the most likely alternatives."""
    lines = [f"{'token':>14}  {'prob':>6}  top alternatives"]
    for e in r.logprobs or []:
        alts = "  ".join(f"{json.dumps(a['token'], ensure_ascii=False)} {_p(a['logprob'])}" for a in e["top"])
        lines.append(f"{json.dumps(e['token'], ensure_ascii=False):>14}  {_p(e['logprob'])}  {alts}")
    return "\n".join(lines)


def _p(logprob: float) -> str:
    return f"{math.exp(logprob):6.3f}"


def _write_stream(_: int, text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()
