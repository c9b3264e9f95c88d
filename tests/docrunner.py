"""Run the code blocks of README.md and docs/*.md, as a reader would, in a sandbox (tests/test_doc_examples.py).

Every fenced block declares its language: `bash` and `python` blocks run, `text` blocks (output samples,
listings, templates) never do. A runnable block that cannot run on a test machine says why on the line
before its fence, with an HTML comment the site does not show, giving one of NOT_RUN_REASONS:

    <!-- not run in tests: needs a GPU -->

Within a block that runs, the few commands in NOT_HERE are taken as done (pip installs that CI makes,
the test suite itself, the network).

How blocks run:

- In a sandbox laid out like the repository: copies of the entry scripts, configs/, bench/, the data
  preparation scripts and docs/gen_config_reference.py (copies, not links, so that a script writing next
  to itself writes into the sandbox), Tiny Shakespeare in data/shakespeare/input.txt, the working
  directory the sandbox and the package imported from the repository. out/, data/ and hf/ never land
  in the repository. HOME is a folder of the sandbox too (`--salt-file ~/.redact_salt`).
- Pages in PAGE_ORDER (later pages use what earlier ones made), blocks in document order, and each
  distinct command once (README and the pages repeat the quickstart); a server again on a page whose
  later blocks call it.
- Shell syntax: backslash continuations, comments, `a && b` and `producer | python ...` are understood
  here; words are expanded by bash itself (quotes, `$(...)`, `~`).
- `python X.py ...`, `python -m mod ...`, `python -c ...` and python blocks run in one worker process
  (runpy with sys.argv set; exit status 0 required), so torch is imported once, not once per command.
  Any other command runs under bash.
- Step counts are tiny (CAPS): training commands get TRAINING_CAPS appended (after the doc's own
  overrides, so they win; out_dir, configs, tokenizers and contexts stay the doc's), sample.py at most
  8 new tokens, `--chat` gets "hello" on stdin, data/qa/prepare.py writes 200 conversations (data/tools/prepare.py and data/extract/prepare.py 200 records),
  `gpt.eval --tool-calls` answers 4 records.
- `python serve.py ...` starts a real server in the background on a free port (a child of the worker: a
  fork, torch imported already, running serve.py as __main__); the page's later blocks
  talk to it (`127.0.0.1:8000` and `localhost:8000`, or the `--port` the doc gave, are rewritten to that
  port) and it is stopped when the page ends.

`python tests/docrunner.py worker` is the worker's entry point.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import runpy
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.request
import warnings
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NETGUARD = Path(__file__).resolve().parent / "netguard"

# Pages that make what later pages use come first; any other page follows, alphabetically.
PAGE_ORDER = ("README.md", "docs/getting-started.md", "docs/data.md", "docs/finetuning.md", "docs/sampling.md",
              "docs/interop.md", "docs/evaluation.md", "docs/private-data.md", "docs/reliability.md",
              "docs/configuration.md", "docs/serving.md", "docs/distributed.md", "docs/development.md")
LANGUAGES = ("bash", "python", "text")
NOT_RUN_REASONS = ("needs a GPU", "needs the network", "several nodes", "starts a long-running server",
                   "installs packages", "the test suite itself")
MARKER = re.compile(r"^\s*<!--\s*not run in tests:?\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^\s*(```|~~~)\s*(\S*)")

# Commands of runnable blocks taken as done, with the reason (one of NOT_RUN_REASONS). Keep it tiny.
NOT_HERE = (
    (re.compile(r"\bpip install torch --index-url "), "needs the network"),  # the CPU build of torch
    (re.compile(r"^pip install -e "), "installs packages"),  # .ci/run installs the project with its extras
    (re.compile(r"^python -m pytest\b"), "the test suite itself"),
    (re.compile(r"^mkdocs build\b"), "the test suite itself"),  # tests/test_docs.py builds the site, strict
    (re.compile(r"^mkdocs serve\b"), "starts a long-running server"),
)

# Tiny runs: appended to the commands of these programs (argparse and the config overrides: the last wins).
# The tokenizer, the context (block size) and the data stay the configs'; pretraining makes narrow models
# (GPT-2's 50k vocabulary at width 384 writes 120 MB checkpoints), which fine-tuning inherits.
TRAINING_CAPS = ["train.max_iters=2", "train.eval_interval=2", "train.eval_iters=1", "train.log_interval=1",
                 "train.batch_size=2", "logging.sample_tokens=0", "logging.plot=false", "logging.progress=false"]
CAPS = {
    "train.py": [*TRAINING_CAPS, "model.n_layer=2", "model.n_head=2", "model.n_embd=32"],
    "finetune.py": TRAINING_CAPS,
    "sample.py": ["--max-new-tokens", "8"],
    "data/qa/prepare.py": ["--train", "200", "--val", "20", "--pairs", "100"],
    "data/tools/prepare.py": ["--train", "200", "--val", "20"],
    "data/extract/prepare.py": ["--train", "200", "--val", "20"],
    "bench/dpo_qa.py": ["--n-questions", "4"],
    "bench/speculative.py": ["--new-tokens", "8", "--repeats", "1"],
    "gpt.audit": ["--samples", "8", "--candidates", "500"],
    "gpt.eval": ["--max-tokens", "2000"],
    "gpt.eval --tool-calls": ["--limit", "4"],  # counts records: generated replies, not scored tokens
    "gpt.eval lm-eval": [],  # lm-eval's own options; its docs examples run tiny local tasks
}


def caps_for(name: str, args: list[str]) -> list[str]:
    """A command's caps: those of its subcommand or mode ("gpt.eval lm-eval", "gpt.eval --tool-calls") when
    CAPS has them, else the program's."""
    return next((CAPS[f"{name} {a}"] for a in args if f"{name} {a}" in CAPS), CAPS.get(name, []))
CHAT_INPUT = "hello\n"
SERVER = re.compile(r"^python3? (\./)?serve\.py\b")
DOCS_PORT = 8000  # what the docs' clients call when serve.py was given no --port
COMMAND_TIMEOUT_S = 300
SERVER_START_S = 120


# ---------------------------------------------------------------------------- reading the pages


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    reason: str | None = None  # the not-run marker's reason; None: no marker

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def pages() -> list[Path]:
    found = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    rank = {ROOT / p: i for i, p in enumerate(PAGE_ORDER)}
    return sorted(found, key=lambda p: (rank.get(p, len(rank)), p.name))


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, each with its language and the not-run marker on the line before it."""
    out, current, body = [], None, []
    lines = page.read_text(encoding="utf-8").splitlines()
    for n, line in enumerate(lines, 1):
        m = FENCE.match(line)
        if current is None and m:
            before = next((lines[i] for i in range(n - 2, -1, -1) if lines[i].strip()), "")
            marker = MARKER.match(before)
            current, body = Block(page, n, m.group(2), "", marker.group(1) if marker else None), []
        elif current is not None and m and line.strip() == m.group(1):
            current.text = "\n".join(body) + "\n"
            out.append(current)
            current = None
        elif current is not None:
            body.append(line)
    return out


def stray_markers(page: Path) -> list[int]:
    """Lines of not-run markers that are not directly followed by a fence (they would mark nothing)."""
    lines = page.read_text(encoding="utf-8").splitlines()
    bad = []
    for n, line in enumerate(lines, 1):
        if MARKER.match(line):
            after = next((lines[i] for i in range(n, len(lines)) if lines[i].strip()), "")
            if not FENCE.match(after):
                bad.append(n)
    return bad


# ---------------------------------------------------------------------------- a little shell syntax


def _split_unquoted(text: str, sep: str) -> list[str]:
    """Split at `sep` outside quotes (`|` never splits `||`); `#` after a blank starts a comment."""
    parts, start, quote, i = [], 0, "", 0
    while i < len(text):
        c = text[i]
        if quote:
            if c == "\\" and quote == '"':
                i += 1
            elif c == quote:
                quote = ""
        elif c == "\\":
            i += 1
        elif c in "'\"":
            quote = c
        elif c == "#" and (i == 0 or text[i - 1].isspace()):
            parts.append(text[start:i])
            return [p.strip() for p in parts if p.strip()] if sep else [text[:i].rstrip()]
        elif sep and text.startswith(sep, i) and not (sep == "|" and ("|" in (text[i + 1:i + 2], text[i - 1:i]))):
            parts.append(text[start:i])
            start = i + len(sep)
            i += len(sep)
            continue
        i += 1
    parts.append(text[start:])
    return [p.strip() for p in parts if p.strip()] if sep else [text.rstrip()]


def commands(text: str) -> list[tuple[int, str]]:
    """(line offset in the block, command) for each `&&`-separated command, comments and continuations gone."""
    out, pending, first = [], "", 0
    for i, line in enumerate(text.splitlines()):
        if not pending:
            first = i
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        logical = _split_unquoted(pending + line, "")[0].strip()
        pending = ""
        out += [(first, c) for c in _split_unquoted(logical, "&&")] if logical else []
    return out


def not_here(command: str) -> str | None:
    return next((why for pattern, why in NOT_HERE if pattern.search(command)), None)


def pip_extras(text: str) -> list[str]:
    """The extras named by `pip install -e ".[a,b]"` commands in `text`."""
    return [x.strip() for m in re.finditer(r"pip install -e ['\"]?\.\[([^\]]*)\]", text) for x in m.group(1).split(",")]


# ---------------------------------------------------------------------------- the sandbox


class DocExampleFailed(AssertionError):
    pass


@dataclass
class Step:
    where: str
    command: str
    seconds: float
    status: str  # "ran", "same as <where>", "not run: <reason>", "server"


@dataclass
class Sandbox:
    """A folder laid out like the repository, the worker that runs python in it, and the servers it started."""

    folder: Path
    shakespeare: Path
    steps: list[Step] = field(default_factory=list)
    seen: dict[str, str] = field(default_factory=dict)  # command -> where it ran first
    ports: dict[int, int] = field(default_factory=dict)  # port the docs name -> port the server listens on
    servers: list[int] = field(default_factory=list)  # pids of the worker's serve.py children
    worker: subprocess.Popen | None = None
    clients_follow: bool = False  # later blocks of the page may call the servers started by this one
    n_logs: int = 0

    def __post_init__(self) -> None:
        f = self.folder
        for script in ROOT.glob("*.py"):
            shutil.copy2(script, f / script.name)
        shutil.copytree(ROOT / "configs", f / "configs")
        shutil.copytree(ROOT / "bench", f / "bench", ignore=shutil.ignore_patterns("*.png", "*.json", "__pycache__"))
        for script in (ROOT / "data").glob("*/*.py"):
            (f / script.parent.relative_to(ROOT)).mkdir(parents=True, exist_ok=True)
            shutil.copy2(script, f / script.relative_to(ROOT))
        (f / "docs").mkdir()
        shutil.copy2(ROOT / "docs" / "gen_config_reference.py", f / "docs")
        (f / "data" / "shakespeare").mkdir(parents=True, exist_ok=True)
        shutil.copy2(self.shakespeare, f / "data" / "shakespeare" / "input.txt")
        for d in ("home", ".bin", ".logs"):
            (f / d).mkdir()
        (f / ".bin" / "python").symlink_to(sys.executable)
        (f / ".bin" / "python3").symlink_to(sys.executable)
        home = Path.home()
        self.env = {**os.environ, "HOME": str(f / "home"), "PATH": f"{f / '.bin'}{os.pathsep}{os.environ['PATH']}",
                    "MPLCONFIGDIR": os.environ.get("MPLCONFIGDIR", str(home / ".config" / "matplotlib")),
                    "PYTHONPATH": os.pathsep.join([str(NETGUARD), str(ROOT)]), "PYTHONUNBUFFERED": "1"}

    # -------------------------------------------------------------- pages

    def run_page(self, page: Path) -> None:
        runnable = [b for b in blocks(page) if b.lang in ("bash", "python") and b.reason is None]
        try:
            for i, block in enumerate(runnable):
                self.run_block(block, later_blocks=i + 1 < len(runnable))
        finally:
            self.stop_servers()

    def run_block(self, block: Block, later_blocks: bool = False) -> None:
        text = self.rewrite_ports(block.text)
        self.clients_follow = later_blocks
        if block.lang == "python":
            run = lambda: self.in_worker(block.where, "block", block.where, [], "", text, code=text)  # noqa: E731
            self.once(block.where, text, run)
            return
        steps = commands(text)
        for i, (offset, command) in enumerate(steps):
            self.clients_follow = later_blocks or i + 1 < len(steps)
            where = f"{block.page.relative_to(ROOT)}:{block.line + 1 + offset}"
            why = not_here(command)
            if why:
                self.steps.append(Step(where, command, 0.0, f"not run: {why}"))
                continue
            self.once(where, command, lambda: self.run_command(where, command))

    def once(self, where: str, command: str, run) -> None:
        key = " ".join(command.split())
        if SERVER.match(key) and self.clients_follow:  # servers stop when their page ends: start it again
            key = f"{where.split(':')[0]}: {key}"
        if key in self.seen:
            self.steps.append(Step(where, command, 0.0, f"same as {self.seen[key]}"))
            return
        self.seen[key] = where
        t0 = time.perf_counter()
        status = run()
        self.steps.append(Step(where, command, time.perf_counter() - t0, status))

    def run_command(self, where: str, command: str) -> str:
        *producers, last = _split_unquoted(command, "|")
        program = last.split(None, 1)
        if program[0] not in ("python", "python3"):
            self.shell(where, command)
            return "ran"
        stdin = self.shell(where, " | ".join(producers)) if producers else None
        words = self.expand(where, program[1] if len(program) > 1 else "")
        if words[0] == "-m":
            kind, target, args = "module", words[1], words[2:]
        elif words[0] == "-c":
            kind, target, args = "code", words[1], words[2:]
        else:
            kind, target, args = "path", words[0], words[1:]
        name = os.path.normpath(target)
        if name == "serve.py" and not {"-h", "--help"} & set(args):  # --help prints and exits: a plain command
            self.start_server(where, [target, *args])
            return "server"
        args = args + caps_for(name, args)
        if stdin is None:
            stdin = CHAT_INPUT if name == "sample.py" and "--chat" in args else ""
        return self.in_worker(where, kind, target, args, stdin, command)

    # -------------------------------------------------------------- running

    def fail(self, where: str, command: str, what: str, output: str) -> None:
        tail = "\n".join(output.strip().splitlines()[-30:])
        raise DocExampleFailed(f"{where}: `{command.strip()}` {what}\n--- output (tail) ---\n{tail}")

    def shell(self, where: str, command: str) -> str:
        proc = subprocess.run(["bash", "-o", "pipefail", "-c", command], cwd=self.folder, env=self.env,
                              capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            self.fail(where, command, f"exited {proc.returncode}", proc.stdout + proc.stderr)
        return proc.stdout

    def expand(self, where: str, words: str) -> list[str]:
        """The words of a command line as bash expands them (quotes, $(...), ~)."""
        out = self.shell(where, f'printf "%s\\0" {words}')
        return out.split("\0")[:-1]

    def in_worker(self, where: str, kind: str, target: str, args: list[str], stdin: str, command: str,
                  code: str = "") -> str:
        log = self.new_log()
        request = {"kind": kind, "target": target, "args": args, "stdin": stdin, "code": code, "log": str(log)}
        rc = self.ask_worker(where, command, request, log)["rc"]
        if rc != 0:
            self.fail(where, command, f"exited {rc}", log.read_text(encoding="utf-8", errors="replace"))
        return "ran"

    def new_log(self) -> Path:
        self.n_logs += 1
        return self.folder / ".logs" / f"{self.n_logs}.txt"

    def ask_worker(self, where: str, command: str, request: dict, log: Path | None = None) -> dict:
        """Send the worker one request (starting the worker if there is none); its answer."""
        if self.worker is None or self.worker.poll() is not None:
            self.servers.clear()  # a dead worker's servers died with it
            self.worker = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "worker"], cwd=self.folder,
                                           env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.worker.stdin.write(json.dumps(request) + "\n")
        self.worker.stdin.flush()
        ready, _, _ = select.select([self.worker.stdout], [], [], COMMAND_TIMEOUT_S)
        reply = self.worker.stdout.readline() if ready else ""
        if not reply:
            self.worker.kill()
            self.worker.wait()
            output = log.read_text(encoding="utf-8", errors="replace") if log and log.exists() else ""
            self.fail(where, command, "did not finish" if not ready else "crashed the worker", output)
        return json.loads(reply)

    # -------------------------------------------------------------- servers

    def rewrite_ports(self, text: str) -> str:
        for doc_port, port in self.ports.items():
            text = re.sub(rf"\b(127\.0\.0\.1|localhost):{doc_port}\b", rf"\g<1>:{port}", text)
        return text

    def start_server(self, where: str, argv: list[str]) -> None:
        """serve.py in a child of the worker (torch already imported), on a free port; back once it answers
        /health (or failed)."""
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if "--port" in argv:
            i = argv.index("--port") + 1
            doc_port, argv[i] = int(argv[i]), str(port)
        else:
            doc_port, argv = DOCS_PORT, [*argv, "--port", str(port)]
        log = self.new_log()
        command = " ".join(["python", *argv])
        request = {"kind": "serve", "target": argv[0], "args": argv[1:], "stdin": "", "log": str(log), "port": port}
        reply = self.ask_worker(where, command, request, log)
        if "pid" in reply:
            self.servers.append(reply["pid"])
            self.ports[doc_port] = port
            return
        what = f"exited {reply['rc']}" if reply["rc"] is not None else f"did not answer /health in {SERVER_START_S} s"
        self.fail(where, command, what, log.read_text(errors="replace"))

    def stop_servers(self) -> None:
        if self.servers and self.worker is not None and self.worker.poll() is None:
            self.ask_worker("", "stopping the servers", {"kind": "stop", "pids": self.servers})
        self.servers.clear()
        self.ports.clear()

    def close(self) -> None:
        self.stop_servers()
        if self.worker is not None:
            self.worker.stdin.close()
            try:
                self.worker.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


# ---------------------------------------------------------------------------- the worker process


def _run(request: dict) -> int:
    """Run one command or block in this process, as `python ...` would; its exit status."""
    kind, target, args = request["kind"], request["target"], request["args"]
    saved_argv, saved_path, saved_stdin = sys.argv[:], sys.path[:], sys.stdin
    sys.stdin = io.TextIOWrapper(io.BytesIO(request["stdin"].encode("utf-8")), encoding="utf-8")
    try:
        if kind == "module":
            sys.argv = [target, *args]
            runpy.run_module(target, run_name="__main__", alter_sys=True)
        elif kind == "path":
            sys.argv = [target, *args]
            sys.path.insert(0, str(Path(target).resolve().parent))
            runpy.run_path(target, run_name="__main__")
        else:  # python -c, or a python block
            sys.argv = ["-c" if kind == "code" else "", *args]
            code = target if kind == "code" else request["code"]
            # dont_inherit: compiled as `python` would, without this file's `from __future__` flags
            exec(compile(code, "<string>" if kind == "code" else target, "exec", dont_inherit=True),
                 {"__name__": "__main__"})
        return 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BaseException:  # noqa: BLE001 - a traceback is what the reader would see
        traceback.print_exc()
        return 1
    finally:
        sys.argv[:], sys.path[:], sys.stdin = saved_argv, saved_path, saved_stdin


def _serve(request: dict, inherited: list[int]) -> dict:
    """`python serve.py ARGS` in a child of this process (torch and the package already imported): {"pid"}
    once it answers /health; else {"rc"}: its exit status, or None if it never answered (it is killed).
    The child closes `inherited` (the worker's pipes: a hung server must not hold them open) and dies
    with the worker."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        rc = 1
        try:
            _die_with_parent()
            for fd in inherited:
                os.close(fd)
            rc = _run({**request, "kind": "path"})
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    url, deadline = f"http://127.0.0.1:{request['port']}/health", time.monotonic() + SERVER_START_S
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return {"rc": os.waitstatus_to_exitcode(status)}
        try:
            with urllib.request.urlopen(url, timeout=2):
                return {"pid": pid}
        except OSError:
            time.sleep(0.05)
    _stop([pid], grace_s=0)
    return {"rc": None}


def _die_with_parent() -> None:
    """Linux: this process is killed when its parent (the worker) ends, however it ends."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _stop(pids: list[int], grace_s: float = 30) -> dict:
    """SIGTERM to the servers, SIGKILL to any still running `grace_s` later; they are reaped."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM if grace_s else signal.SIGKILL)
    deadline = time.monotonic() + grace_s
    for pid in pids:
        while os.waitpid(pid, os.WNOHANG)[0] == 0:
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                break
            time.sleep(0.02)
    return {"rc": 0}


def worker() -> None:
    """Read one JSON request per line on stdin, run it with stdout and stderr going to its log file, and
    answer with its exit status. Requests come on the original stdin, answers go to the original stdout;
    what runs sees /dev/null and its log file. A "serve" request starts serve.py in a child process
    (answered with its pid, see _serve), a "stop" request ends such children."""
    # `python -m gpt.x` after gpt.x was imported by an earlier command: harmless here, noise in the logs.
    warnings.filterwarnings("ignore", r".*found in sys\.modules after import of package", RuntimeWarning)
    requests, replies = os.fdopen(os.dup(0), "r"), os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    for line in requests:
        request = json.loads(line)
        if request["kind"] == "stop":
            replies.write(json.dumps(_stop(request["pids"])) + "\n")
            replies.flush()
            continue
        saved = os.dup(1), os.dup(2)
        with open(request["log"], "wb") as log:
            os.dup2(log.fileno(), 1)
            os.dup2(log.fileno(), 2)
        try:
            if request["kind"] == "serve":
                answer = _serve(request, [requests.fileno(), replies.fileno(), *saved])
            else:
                answer = {"rc": _run(request)}
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])
        replies.write(json.dumps(answer) + "\n")
        replies.flush()
    os._exit(0)  # no interpreter teardown (a second or so with torch loaded): the sandbox is thrown away


if __name__ == "__main__" and sys.argv[1:] == ["worker"]:
    worker()
