"""Shared test setup: the network guard, offline tiktoken cache, the Tiny Shakespeare copy, tiny configs, the
suite's time budget, and the helpers several test modules share (no test module imports another):
running entry scripts (`run_script` in a fresh interpreter, `run_in_process` in this one, `run_scripts`
for a table of cases), tiny fine-tuning material (`write_base`, `qa`, `sft_config`, ...), Hugging Face
model folders built here (`write_hf_tokenizer`, `write_hf_model`, `load_hf_model`) and an in-process
server with an OpenAI client (`Running`)."""

from __future__ import annotations

import io
import json
import os
import runpy
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
NETGUARD = Path(__file__).resolve().parent / "netguard"
sys.path.insert(0, str(NETGUARD))

from netguard_rules import ATTEMPTS as NETWORK_ATTEMPTS  # noqa: E402
from netguard_rules import install  # noqa: E402

# The network guard, for the whole session (module fixtures included) and every Python process the
# tests start: connecting off this machine, or looking up a remote name, raises and fails the test.
install()  # once per process, even when conftest is imported a second time (`from conftest import ...`)
os.environ["PYTHONPATH"] = os.pathsep.join(
    [str(NETGUARD)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(NETGUARD)])


@pytest.fixture(autouse=True)
def network_guard() -> list[str]:
    """Fails a test that tried to use the network, even if the code under test caught the error."""
    yield NETWORK_ATTEMPTS
    attempts = list(NETWORK_ATTEMPTS)
    NETWORK_ATTEMPTS.clear()
    assert not attempts, f"the test tried to use the network: {attempts}"


if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken_cache").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken_cache")

# Tiny models gain nothing from a second thread, and on a shared CPU the spin-waits of two OpenMP
# threads make them 2-3x slower; set before torch is imported (subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

# The whole suite must stay fast enough to run on every change: 2 minutes on 2 CPU cores.
# GPT_TEST_BUDGET_S changes the budget (0 = no limit).
SUITE_BUDGET_S = float(os.environ.get("GPT_TEST_BUDGET_S", 120))
_STARTED = pytest.StashKey[tuple[float, float]]()


def _cpu_seconds() -> float:
    """CPU time of this process and the subprocesses it waited for (entry scripts, torchrun ranks)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def pytest_sessionstart(session: pytest.Session) -> None:
    session.config.stash[_STARTED] = (time.monotonic(), _cpu_seconds())


_WORKER_CPU = pytest.StashKey[list[float]]()


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node, error) -> None:
    """pytest-xdist (the controller): a worker's CPU seconds, which it reports as it ends."""
    node.config.stash.setdefault(_WORKER_CPU, []).append(node.workeroutput.get("cpu_s", 0.0))


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Report the suite's time and fail the session when it is over budget (--durations=10, set in
    pyproject.toml, lists the slowest tests). The suite runs in one pytest-xdist worker per core (-n 2 in
    pyproject.toml), each test on one thread, so on a quiet machine wall time is about CPU time per worker;
    on a machine shared with other jobs wall time grows and CPU time does not, so the smaller of the two is
    what is held to the budget. A worker only reports its CPU time to the controller."""
    wall0, cpu0 = session.config.stash.get(_STARTED, (time.monotonic(), _cpu_seconds()))
    wall, cpu = time.monotonic() - wall0, _cpu_seconds() - cpu0
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller adds it up
        session.config.workeroutput["cpu_s"] = cpu
        return
    workers = session.config.stash.get(_WORKER_CPU, [])
    cpu_per_worker = sum(workers) / len(workers) if workers else cpu  # (reaped workers are in `cpu` too)
    over = SUITE_BUDGET_S > 0 and min(wall, cpu_per_worker) > SUITE_BUDGET_S
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write("\n")
        budget = f"{SUITE_BUDGET_S:.0f} s budget" if SUITE_BUDGET_S > 0 else "no budget"
        where = f"{len(workers)} workers, {cpu_per_worker:.0f} s CPU each" if workers else f"{cpu:.0f} s CPU"
        reporter.write_line(f"suite time: {wall:.0f} s wall, {where} ({budget})" +
                            (": TOO SLOW, make the slowest tests smaller" if over else ""), red=over)
    if over and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="session")
def shakespeare_text() -> str:
    """Tiny Shakespeare from the repo's data folder or ../shared (never the network)."""
    for p in (ROOT / "data" / "shakespeare" / "input.txt", SHARED / "data" / "tinyshakespeare" / "input.txt"):
        if p.is_file():
            return p.read_text(encoding="utf-8")
    pytest.skip("Tiny Shakespeare is not available offline")


@pytest.fixture
def tiny_corpus(tmp_path: Path, shakespeare_text: str) -> Path:
    """The first 100k characters of Tiny Shakespeare as a standalone corpus file."""
    p = tmp_path / "corpus.txt"
    p.write_text(shakespeare_text[:100_000], encoding="utf-8")
    return p


def lively_model(vocab_size: int, block_size: int = 16, n_embd: int = 32, seed: int = 0):
    """A random GPT whose greedy output does not collapse into one repeated token (large weights)."""
    import torch

    from gpt.config import ModelConfig
    from gpt.model import GPT

    torch.manual_seed(seed)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=n_embd, block_size=block_size, vocab_size=vocab_size))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name:
                p.normal_(0, 1.0 if "wpe" in name else 0.3)
    return model.eval()


def tiny_overrides(tmp_path: Path, corpus: Path, **extra) -> list[str]:
    """Overrides that make any config a few-thousand-parameter, few-second CPU run.

    Numbers are compared in fp32 (`auto` picks bf16 on CPUs with native bf16, fp32 elsewhere, so a
    test left on auto would compare different things on different machines); bf16 tests say so."""
    base = {
        "out_dir": str(tmp_path / "out"),
        "data.dataset": "tiny",
        "data.path": str(corpus),
        "data.data_dir": str(tmp_path / "data"),
        "model.n_layer": 2,
        "model.n_head": 2,
        "model.n_embd": 16,
        "model.block_size": 32,
        "train.batch_size": 4,
        "train.max_iters": 20,
        "train.eval_interval": 10,
        "train.eval_iters": 2,
        "train.log_interval": 5,
        "train.device": "cpu",
        "train.dtype": "float32",
        "optim.warmup_iters": 2,
        "optim.name": "adamw",  # configs/shakespeare.yaml uses muon; these tests compare AdamW runs
        "logging.progress": "false",
        "logging.sample_tokens": 0,
        "logging.plot": "false",  # matplotlib costs seconds per run; test_plot.py covers it
    }
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]



# ---------------------------------------------------------------------------- entry scripts


def python_command(entry: str, *args, nproc: int = 1) -> list[str]:
    """The command line of `python ENTRY ARGS`: ENTRY is a script at the repo root (train.py) or a module
    run with -m (gpt.convert); nproc > 1 launches it with torchrun on that many ranks."""
    runner = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    target = [entry] if entry.endswith(".py") else ["-m", entry]
    return [*runner, *target, *map(str, args)]


def run_script(entry: str, *args, stdin: str | None = None, env: dict | None = None, timeout: float = 120,
               nproc: int = 1, prefix: list[str] | tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """Run an entry point in a fresh interpreter from the repo root, as a user would: (returncode, stdout,
    stderr) as text. The process inherits this one's environment (the network guard on PYTHONPATH, one
    OpenMP thread, the offline tiktoken cache) unless `env` replaces it; `prefix` goes before the
    interpreter (e.g. `unshare -n`)."""
    return subprocess.run([*prefix, *python_command(entry, *args, nproc=nproc)], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def run_in_process(capsys, entry: str, *args, stdin: str = "") -> subprocess.CompletedProcess:
    """Run an entry point in this process, exactly as `python ENTRY ARGS` runs it (runpy, as __main__),
    without an interpreter's start-up: for tests whose subject is what the script does, not the process.
    Returns what `run_script` returns; a SystemExit gives the exit code, an exception propagates."""
    capsys.readouterr()
    script = ROOT / entry if entry.endswith(".py") else ROOT / (entry.replace(".", "/") + ".py")
    argv, stdin_was = sys.argv, sys.stdin
    sys.argv, sys.stdin = [str(script), *map(str, args)], io.StringIO(stdin)
    command = list(sys.argv)
    code = 0
    try:
        runpy.run_path(str(script), run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv, sys.stdin = argv, stdin_was
    out = capsys.readouterr()
    return subprocess.CompletedProcess(command, code, out.out, out.err)


# One interpreter imports the heavy libraries once, then forks a child per case (at most `parallel` at a
# time). The child leaves the loop and becomes `python ENTRY ARGS`: its stdin, stdout and stderr are its
# own, sys.argv and sys.path are what the interpreter would set, and it runs the entry point as __main__ at
# the top level, so an uncaught exception prints its traceback and SystemExit sets the exit status through
# the interpreter's own exit path. Only gpt itself is not preloaded: `python -m gpt.x` warns if gpt.x is
# imported already. The server prints the cases' exit statuses, in the cases' order, once all have ended.
_FORK_SERVER = textwrap.dedent("""
    import gc, json, os, runpy, sys
    cases, parallel = json.load(sys.stdin)
    import numpy, safetensors.torch, tiktoken, torch, yaml  # noqa: F401  (start-up paid once)
    gc.freeze()  # the children's collections skip these objects: fewer copied pages, a faster exit
    sys.stdout.flush()
    codes, running = [None] * len(cases), {}

    def reap():
        pid, status = os.wait()
        codes[running.pop(pid)] = os.waitstatus_to_exitcode(status)

    for i, case in enumerate(cases):
        while len(running) >= parallel:
            reap()
        pid = os.fork()
        if pid == 0:
            break
        running[pid] = i
    else:
        while running:
            reap()
        print(*codes, flush=True)
        sys.exit(0)
    for fd, (path, flags) in enumerate([(os.devnull, os.O_RDONLY), (case["stdout"], os.O_WRONLY | os.O_CREAT),
                                        (case["stderr"], os.O_WRONLY | os.O_CREAT)]):
        os.dup2(os.open(path, flags), fd)
    entry, sys.argv = case["entry"], [case["entry"], *case["args"]]
    if entry.endswith(".py"):
        sys.path[0] = os.path.dirname(os.path.abspath(entry))
        runpy.run_path(entry, run_name="__main__")
    else:
        sys.path[0] = os.getcwd()
        runpy._run_module_as_main(entry)  # what `python -m` calls
""")


def run_scripts(cases: list[tuple[str, list]], folder: Path, timeout: float = 300, env: dict | None = None,
                prefix: list[str] | tuple[str, ...] = (), parallel: int = 1) -> list[subprocess.CompletedProcess]:
    """`run_script(entry, *args, env=env, prefix=prefix)` for each (entry, args), each in its own process,
    for the price of one interpreter start-up (see _FORK_SERVER). Cases run one after another, in order,
    or, for cases independent of each other, up to `parallel` at a time (each core a case); their stdout
    and stderr are kept in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    spec = [{"entry": entry, "args": [str(a) for a in args], "stdout": str(folder / f"{i}.out"),
             "stderr": str(folder / f"{i}.err")} for i, (entry, args) in enumerate(cases)]
    server = subprocess.run([*prefix, sys.executable, "-c", _FORK_SERVER], cwd=ROOT, input=json.dumps([spec, parallel]),
                            env=env, capture_output=True, text=True, timeout=timeout)
    codes = server.stdout.split()
    assert server.returncode == 0 and len(codes) == len(cases), server.stdout + server.stderr
    return [subprocess.CompletedProcess(python_command(entry, *args), int(code),
                                        Path(c["stdout"]).read_text(), Path(c["stderr"]).read_text())
            for (entry, args), code, c in zip(cases, codes, spec)]


# ---------------------------------------------------------------------------- fine-tuning material

CHAT_CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ?.!\n"))  # the vocabulary of write_base's models


def chat_template(chars=CHAT_CHARS):
    """A character tokenizer with the chat tokens, in its ChatTemplate."""
    from gpt.data.chat_template import ChatTemplate
    from gpt.data.tokenizer import CharTokenizer

    tok = CharTokenizer(chars)
    ChatTemplate.add_tokens(tok)
    return ChatTemplate(tok)


def write_base(folder: Path, chars=CHAT_CHARS, block_size: int = 48, seed: int = 0) -> Path:
    """A tiny random base model saved as one of our checkpoint directories."""
    from dataclasses import asdict

    import torch

    from gpt import checkpoint
    from gpt.config import ModelConfig
    from gpt.data.tokenizer import CharTokenizer
    from gpt.model import GPT

    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=block_size, vocab_size=len(chars))
    checkpoint.save_checkpoint(folder / "best", GPT(cfg).state_dict(), {"model": asdict(cfg)}, CharTokenizer(chars))
    return folder


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def qa(prompt: str, response: str) -> dict:
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def sft_config(tmp_path: Path, base: Path, data: Path, **extra):
    """A FinetuneConfig for a few-second CPU fine-tune of `base` on `data`."""
    from gpt.config import FinetuneConfig, load_config

    values = {
        "out_dir": tmp_path / "out", "init_from": base, "data.path": data, "data.val_path": data,
        "train.max_iters": 12, "train.batch_size": 4, "train.eval_interval": 6, "train.eval_iters": 2,
        "train.log_interval": 6, "train.device": "cpu", "train.dtype": "float32",
        "optim.lr": 3e-3, "optim.warmup_iters": 2, "logging.progress": False, "logging.sample_tokens": 0,
        "logging.plot": False,
    }
    values.update(extra)
    return load_config(FinetuneConfig, None, [f"{k}={v}" for k, v in values.items()])


# ---------------------------------------------------------------------------- Hugging Face model folders


def write_hf_tokenizer(folder: Path, corpus: str, specials: list[str], config: dict, *, vocab_size: int = 300,
                       added: tuple[str, ...] = (), prefix: str | None = None):
    """A byte-level BPE of about `vocab_size` tokens trained on `corpus` (built with `tokenizers`), saved in
    `folder` as a model hub folder ships it: tokenizer.json, and tokenizer_config.json holding `config`
    (bos/eos/pad token names, chat_template, ...). `specials` are its first ids, in order; `added` are
    added tokens that are not special (Qwen3's <think>); `prefix` is the special token its post-processor
    puts first when special tokens are added (Llama's or Gemma's BOS). Returns the `tokenizers.Tokenizer`."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    if added:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    if prefix is not None:
        tok.post_processor = processors.TemplateProcessing(single=f"{prefix} $A",
                                                           special_tokens=[(prefix, specials.index(prefix))])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return tok


def write_hf_model(folder: Path, config_cls: str, model_cls: str, seed: int = 0, **config):
    """A random transformers model (`getattr(transformers, config_cls)(**config)`, fp32) saved in `folder`,
    its weights scaled up so that predictions are confident (flat random logits make greedy ties and hide
    bugs). Gemma's embeddings are scaled by sqrt(hidden) in its forward pass and its norms hold 1 + weight,
    so they are drawn smaller and around 0. Returns the model."""
    import torch
    import transformers

    cfg = getattr(transformers, config_cls)(**config)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(cfg).eval()
    gemma = cfg.model_type.startswith("gemma")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                embed = 0.3 / (cfg.hidden_size ** 0.5 if gemma else 1)
                p.normal_(0, 2.0 / p.shape[-1] ** 0.5 if "embed" not in name else embed)
            elif "norm" in name:
                p.uniform_(-0.3, 0.3).add_(0.0 if gemma else 1.0)
            else:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    return model


def load_hf_model(folder: Path):
    """transformers' model of a folder, as the tests compare it: fp32, eager attention, eval mode."""
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager",
                                                             dtype=torch.float32).eval()


# ---------------------------------------------------------------------------- the server

SERVE_CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ <>:.,!?'\n")
SERVE_BLOCK = 96


class Running:
    """uvicorn in a thread on a free loopback port, serving `model`, with an `openai` client for it."""

    def __init__(self, model, tok, **cfg):
        import openai
        import uvicorn

        from gpt.serve.app import ServerConfig, create_app

        app = create_app(model, tok, ServerConfig("tiny", **cfg))
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        self.client = openai.OpenAI(base_url=self.url + "/v1", api_key=cfg.get("api_key") or "none", max_retries=0)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)
