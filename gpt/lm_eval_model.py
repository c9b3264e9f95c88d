"""Our checkpoints as an lm-evaluation-harness model, in process: `python -m gpt.eval lm-eval`.

    python -m gpt.eval lm-eval --ckpt out/sft_qa --tasks my_task --include-path tasks/

Importing this module registers the model "gpt" with lm-eval (`lm_eval.api.registry`), so
`lm_eval.simple_evaluate(model="gpt", model_args={"ckpt": DIR})` works too; nothing in `gpt` imports it
(lm-eval is an optional dependency: `pip install 'lm-eval[api]'`). Any folder `load_pretrained` takes:
our run or checkpoint folders and local Hugging Face folders; never the hub.

The three request kinds, on the model's own forward pass and decode loop:
  loglikelihood          context + continuation tokenized whole and split on the context's token count
                         (lm-eval's rule, as its Hugging Face backend does); the continuation's tokens
                         scored in batches of right-padded rows (gpt.infer.scoring.score_continuations);
                         a row longer than the context length keeps its last tokens
  loglikelihood_rolling  a document's tokens in lm-eval's disjoint rolling windows, scored the same way
  generate_until         the engine (continuous batching, KV cache): greedy unless the task samples,
                         stopping at the task's `until` strings and at the model's end tokens
With --apply-chat-template, prompts are rendered by the checkpoint's chat template (gpt.data.chat_template)
and handed to the engine as the template's own token ids.

Task data is read offline unless --allow-download: a task whose data is on the hub stops with one line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import lm_eval.models  # noqa: F401  lm-eval's own models, registered (lazily) before ours: an empty registry is
from lm_eval.api.model import TemplateLM  # filled on first use, a non-empty one is not
from lm_eval.api.registry import register_model
from tqdm import tqdm

from gpt import entry
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import HFTokenizer
from gpt.device import pick_device, resolve_dtype
from gpt.errors import UserError
from gpt.infer.engine import Engine, context_length
from gpt.infer.sampling import SamplingParams
from gpt.infer.scoring import score_continuations
from gpt.infer.weights import prepare_for_decoding
from gpt.pretrained import load_pretrained

MODEL_NAME = "gpt"
GEN_KEYS = {"until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k"}  # what generate_until honours


class HarnessError(UserError):
    """A run lm-eval cannot do on this checkpoint or these tasks (one line)."""


@register_model(MODEL_NAME)
class HarnessModel(TemplateLM):
    """lm-eval's LM on one of our checkpoints (model_args: ckpt, device, dtype, batch_size, max_length,
    max_gen_toks, seed)."""

    def __init__(self, ckpt: str, device: str | None = None, dtype: str = "float32", batch_size: int | str = 16,
                 max_length: int | None = None, max_gen_toks: int = 256, seed: int = 1234, **_lm_eval_extras):
        super().__init__()
        if not Path(str(ckpt)).exists():
            raise HarnessError(f"ckpt={ckpt}: no such checkpoint, run folder or Hugging Face folder")
        try:
            self._device = pick_device(device or "auto")
        except RuntimeError as e:
            raise HarnessError(str(e)) from None
        loaded = load_pretrained(str(ckpt), self._device)
        self.model = prepare_for_decoding(loaded.model, resolve_dtype(dtype, self._device))
        self.tok, self.ckpt = loaded.tokenizer, str(ckpt)
        self.template = ChatTemplate(self.tok)
        self.max_length = context_length(self.model.config, int(max_length) if max_length else None)
        if str(batch_size).startswith("auto"):
            batch_size = 16
        self.batch_size, self.max_gen_toks, self.seed = int(batch_size), int(max_gen_toks), int(seed)
        self.vocab = min(self.tok.vocab_size, self.model.config.vocab_size)
        self._rendered: dict[str, list[int]] = {}  # chat prompts rendered by apply_chat_template -> their ids

    # ------------------------------------------------------------------ tokens

    @property
    def eot_token_id(self) -> int | None:
        return self.tok.eot_id

    @property
    def prefix_token_id(self) -> int | None:
        """What stands for an empty context: BOS when the tokenizer has one, else end-of-text (lm-eval's rule)."""
        bos = getattr(self.tok, "bos_id", None)
        return bos if bos is not None else self.tok.eot_id

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}:{self.ckpt}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Text to ids; a chat prompt rendered here keeps the template's own ids. A Hugging Face tokenizer reads
        special-token strings as those tokens, as transformers (and lm-eval's hf model) does."""
        if string in self._rendered:
            return list(self._rendered[string])
        if isinstance(self.tok, HFTokenizer):
            return self.tok.encode(string, split_special_tokens=False)
        return self.tok.encode(string)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        return None if chat_template is False or chat_template is None else self.template.name

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        if not add_generation_prompt:
            raise HarnessError("this task continues an assistant message in the chat template, which the "
                               "checkpoint's template cannot render: run it without --apply-chat-template")
        try:
            ids = self.template.encode(chat_history, add_generation_prompt=True)
        except ValueError as e:
            raise HarnessError(f"the chat template refused a task's messages: {e}") from None
        text = self.tok.decode(ids)
        self._rendered[text] = ids
        return text

    # ------------------------------------------------------------------ scoring

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log-probabilities, greedy) of each request's continuation tokens given its context."""
        rows = []
        for _key, context, continuation in requests:
            if not continuation:
                raise HarnessError("a task asked for the log-likelihood of an empty continuation")
            if None in context:
                raise HarnessError("this checkpoint's tokenizer has no BOS or end-of-text token to stand for an "
                                   "empty context")
            whole = (list(context) + list(continuation))[-(self.max_length + 1):]
            rows.append((whole, min(len(continuation), len(whole) - 1)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list = [None] * len(rows)
        for k in tqdm(range(0, len(order), self.batch_size), desc="scoring", disable=disable_tqdm, file=sys.stderr):
            batch = order[k:k + self.batch_size]
            scores = score_continuations(self.model, [rows[i] for i in batch], self.vocab)
            for i, score in zip(batch, scores):
                results[i] = (score.logprob, score.greedy)
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A whole document's log-likelihood, in lm-eval's disjoint rolling windows of the context length."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in tqdm([r.args for r in requests], desc="documents", disable=disable_tqdm, file=sys.stderr):
            windows = [(None, *make_disjoint_window(w)) for w in get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                context_len=1)]
            total = sum(lp for lp, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------ generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) continued by the engine, all requests in one continuous batch."""
        engine = Engine(self.model, self.tok, max_batch=self.batch_size, max_model_len=self.max_length)
        seqs = []
        for i, (context, gen_kwargs) in enumerate(r.args for r in requests):
            params = self.sampling(gen_kwargs, i)
            ids = self.tok_encode(context)[-max(1, self.max_length - params.max_tokens):]
            seqs.append(engine.add(ids, params, stop_ids=self.template.end_ids))
        with tqdm(total=len(seqs), desc="generating", disable=disable_tqdm, file=sys.stderr) as bar:
            while engine.busy:
                engine.step()
                bar.update(sum(s.done for s in seqs) - bar.n)
        texts = [s.completion(self.tok).text for s in seqs]
        for r, text in zip(requests, texts):
            self.cache_hook.add_partial("generate_until", r.args, text)
        return texts

    def sampling(self, gen_kwargs: dict, index: int) -> SamplingParams:
        """A task's generation_kwargs as the engine's SamplingParams; a key the engine cannot honour is refused."""
        kw = dict(gen_kwargs or {})
        unknown = sorted(set(kw) - GEN_KEYS)
        if unknown:
            raise HarnessError(f"generation_kwargs {', '.join(unknown)} are not supported (supported: "
                               f"{', '.join(sorted(GEN_KEYS))})")
        until = kw.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        sample = bool(kw.get("do_sample", False)) and float(kw.get("temperature", 1.0)) > 0
        params = SamplingParams(temperature=float(kw.get("temperature", 1.0)) if sample else 0.0,
                                top_p=float(kw.get("top_p") or 1.0), top_k=kw.get("top_k"),
                                max_tokens=int(kw.get("max_gen_toks", self.max_gen_toks)), stop=tuple(until),
                                seed=(self.seed * 1_000_003 + index) % 2**63)
        return params.validate()  # a SamplingError (one line) names a value out of range


# ---------------------------------------------------------------------------- command line


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m gpt.eval lm-eval",
                                description="Run lm-evaluation-harness tasks on checkpoints, in process.")
    p.add_argument("--ckpt", nargs="+", required=True, help="run folders, checkpoint folders or local HF folders")
    p.add_argument("--tasks", required=True, help="comma-separated task or group names")
    p.add_argument("--include-path", default=None, help="a folder of your own task YAML files")
    p.add_argument("--num-fewshot", type=int, default=None)
    p.add_argument("--limit", type=float, default=None, help="score only the first N documents of each task")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass / sequences per decode batch")
    p.add_argument("--max-length", type=int, default=None, help="context length (default: the model's, at most 4096)")
    p.add_argument("--apply-chat-template", action="store_true",
                   help="render prompts with the checkpoint's chat template")
    p.add_argument("--allow-download", action="store_true", help="let lm-eval download task data from the hub")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", choices=("auto", "float32", "bfloat16", "float16"))
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--json", action="store_true", help="one JSON object of results per checkpoint")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """Evaluate every checkpoint on the tasks; prints lm-eval's table (or JSON) per checkpoint."""
    with offline_hub(not args.allow_download):
        return _run(args)


def _run(args: argparse.Namespace) -> list[dict]:
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.utils import make_table

    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    manager = task_manager(args.include_path, tasks, args.allow_download)
    out = []
    for path in args.ckpt:
        lm = HarnessModel(path, device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                          max_length=args.max_length, seed=args.seed)
        res = simple_evaluate(model=lm, tasks=tasks, task_manager=manager, num_fewshot=args.num_fewshot,
                              limit=args.limit, apply_chat_template=args.apply_chat_template, log_samples=False,
                              random_seed=args.seed, numpy_random_seed=args.seed, torch_random_seed=args.seed,
                              fewshot_random_seed=args.seed)
        out.append({"ckpt": path, "results": res["results"]})
        print(json.dumps(out[-1]) if args.json else f"{path}\n{make_table(res)}", flush=True)
    return out


@contextmanager
def offline_hub(offline: bool = True):
    """Task data from local files only, while it lasts: the hub libraries' offline switches (their environment
    variables, and the flags they read at import when they are already imported); restored on exit."""
    if not offline:
        yield
        return
    switches = (("datasets.config", "HF_HUB_OFFLINE"), ("datasets.config", "HF_DATASETS_OFFLINE"),
                ("huggingface_hub.constants", "HF_HUB_OFFLINE"))
    flags = [(m, name) for m, name in switches if m in sys.modules]
    saved_env = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    saved_flags = [getattr(sys.modules[m], name) for m, name in flags]
    os.environ.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    for m, name in flags:
        setattr(sys.modules[m], name, True)
    try:
        yield
    finally:
        for k, v in saved_env.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        for (m, name), v in zip(flags, saved_flags):
            setattr(sys.modules[m], name, v)


def task_manager(include_path: str | None, tasks: list[str], allow_download: bool):
    """lm-eval's TaskManager (its tasks and --include-path's; only the latter when they hold every task asked for),
    whose failure to load a task is one line."""
    from lm_eval.tasks import TaskManager

    class OneLineTasks(TaskManager):
        def load(self, tasks, *a, **kw):
            try:
                return super().load(tasks, *a, **kw)
            except Exception as e:  # an unknown name, data that is not on this machine, a broken YAML
                raise HarnessError(task_problem(e, tasks, allow_download)) from None

    if include_path is None:
        return OneLineTasks()
    if not Path(include_path).is_dir():
        raise HarnessError(f"--include-path {include_path}: no such folder")
    local = OneLineTasks(include_path=include_path, include_defaults=False)  # lm-eval's own index takes seconds
    return local if set(tasks) <= set(local.all_tasks) else OneLineTasks(include_path=include_path)


def task_problem(e: Exception, tasks: list[str], allow_download: bool) -> str:
    """One line for lm-eval's failure to load or run a task."""
    text = str(e.args[0] if isinstance(e, KeyError) and e.args else e).strip()
    text = text.splitlines()[0] if text else type(e).__name__
    names = ", ".join(map(str, tasks))
    offline_markers = ("offline", "connect", "hub", "couldn't reach", "not found on the hugging face")
    if not allow_download and any(m in text.lower() for m in offline_markers + ("doesn't exist",)):
        return (f"{names}: the task's data is not on this machine and downloads are off ({text}); pass "
                "--allow-download to let lm-eval fetch it, or write a local task (--include-path)")
    return f"{names}: {text}"


def main(argv: list[str] | None = None) -> None:
    """`python -m gpt.eval lm-eval ...` lands here (gpt.eval hands its arguments over)."""
    args = parse_args(argv)
    entry.main(lambda: run(args))
