"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /health,
vLLM's /tokenize and /detokenize.

Requests become engine sequences (gpt/serve/protocol.py checks the fields), which the engine
thread (gpt/serve/worker.py) decodes in one continuous batch; their tokens come back to the
handler's event loop through an asyncio queue and leave as JSON or Server-Sent Events. A client
that disconnects cancels its sequences, streaming or not. Who may ask (Host, Origin, key, a JSON body) is
checked first, by gpt/serve/access.py. Every error is OpenAI's error JSON with its status; the access
log (uvicorn's) records method, path and status, never prompt or completion text.

A reply held to a `response_format` that the model's vocabulary cannot continue (the format needs a
character no token has: the engine ends the row with finish reason "error", see
gpt/infer/constraints.py) is cut off, not failed: OpenAI has no reason for it, so the choice ends
with "length", the one reason clients read as "incomplete, do not parse", and carries an `error`
object saying why (param "response_format", code "response_format_unreachable"). A failed engine
step stays a 500.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, AsyncIterator

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.data.tokenizer import Tokenizer
from gpt.data.tool_calls import CallReader, Delta, ParsedCall, read_calls
from gpt.infer.constraints import ConstraintError, token_masks
from gpt.infer.engine import DecodeRequest, Engine, FinishReason, sample_seed
from gpt.infer.prefix_cache import DEFAULT_PREFIX_CACHE_MB
from gpt.infer.scoring import TokenScore
from gpt.infer.speculative import SPECULATE_TOKENS, Speculation, load_speculation
from gpt.model import GPT
from gpt.serve.access import Gate, error_response, too_large
from gpt.serve.protocol import RF, APIError, Job, bad, chat_job, completion_job, detokenize_ids, tokenize_ids
from gpt.serve.responses import Responses, response_job
from gpt.serve.worker import QueueFull, ShuttingDown, Worker

log = logging.getLogger("gpt.serve")
FINISH: dict[FinishReason, str] = {"eos": "stop", "stop": "stop", "length": "length"}  # OpenAI's finish_reason
STATIC = Path(__file__).resolve().parent / "static"  # the playground page, served at /
DEFAULT_PREFILL_CHUNK = 256  # serve.py --prefill-chunk: prompt tokens per engine step (gpt/infer/engine.py)
DEFAULT_BATCH_WAIT_MS = 3.0  # serve.py --batch-wait-ms: an idle engine's wait for more requests (gpt/serve/worker.py)
RETRY_AFTER_S = 1  # a full server's 429 asks the client to wait this long (rows free up within steps)
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of a UTF-16 surrogate, paired or lone
UNREACHABLE = {"message": "The reply was cut off: the model's vocabulary has no token for what the response_format "
                          "needs next.", "type": "invalid_request_error", "param": RF,
               "code": "response_format_unreachable"}  # a stuck constrained row's choice carries it (module doc)


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    max_body_bytes: int = 1 << 20
    max_model_len: int | None = None  # the context of decoding (None: gpt.infer.engine.context_length's default)
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB  # MiB of prompt prefixes' keys and values kept; 0 = off
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK  # most prompt tokens computed per step (chunked prefill); 0 = whole
    batch_wait_ms: float = DEFAULT_BATCH_WAIT_MS  # an idle engine waits this long for each next request; 0 = none
    speculate: str | None = None  # speculative decoding: "ngram" or a draft checkpoint's folder; None = off
    speculate_tokens: int = SPECULATE_TOKENS  # guesses verified per row and forward pass when speculating
    host: str = "127.0.0.1"  # the bound address: a Host the server answers to (unless 0.0.0.0 or ::)
    allowed_hosts: tuple[str, ...] = ()  # more Host names it answers to; "*": any
    cors_origins: tuple[str, ...] = ()  # other pages' origins that may call it from a browser; "*": any


@dataclass
class ServerState:
    """What every route needs: the settings, the tokenizer and the engine thread (app.state.server)."""

    config: ServerConfig
    tokenizer: Tokenizer
    worker: Worker
    block_size: int  # the context length: the model's block_size, capped by max_model_len (the engine's)
    created: int  # when the model was loaded (the model card's `created`)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


Server = Annotated[ServerState, Depends(server_state)]
router = APIRouter()


def create_app(model: GPT, tokenizer: Tokenizer, cfg: ServerConfig, speculation: Speculation | None = None) -> FastAPI:
    """The app around one loaded model; the engine thread starts and stops with the app. cfg.speculate's
    proposer is loaded here (a draft in the model's dtype) unless the caller passes it built (serve.py)."""
    model.eval()
    if cfg.speculate is not None and speculation is None:
        w = model.transformer.wte.weight
        speculation = load_speculation(cfg.speculate, cfg.speculate_tokens, w.device, w.dtype)
    engine = Engine(model, tokenizer, max_batch=cfg.max_batch, max_model_len=cfg.max_model_len,
                    prefix_cache_mb=cfg.prefix_cache_mb, prefill_chunk=cfg.prefill_chunk, speculation=speculation)
    worker = Worker(engine, cfg.max_queue, cfg.batch_wait_ms / 1000)
    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = ServerState(cfg, tokenizer, worker, engine.context, int(time.time()))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.add_middleware(Gate, host=cfg.host, allowed_hosts=cfg.allowed_hosts, cors_origins=cfg.cors_origins,
                       api_key=cfg.api_key, max_body_bytes=cfg.max_body_bytes)
    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, internal_error)
    app.include_router(router)
    return app


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    worker = app.state.server.worker
    worker.start()
    yield
    worker.stop()
    speculation = worker.engine.speculation
    if speculation is not None:  # what speculation did over the server's life, in its log
        log.info("%s", speculation.stats.summary(speculation.name))


# ---------------------------------------------------------------------------- errors and the body


async def api_error(_request: Request, e: APIError):
    return error_response(e)


async def http_error(_request: Request, e: StarletteHTTPException):
    code = "not_found" if e.status_code == 404 else None
    return error_response(APIError(e.status_code, str(e.detail), code=code))


async def internal_error(_request: Request, e: Exception):
    """A bug: logged with its traceback, answered in OpenAI's shape."""
    log.error("internal error", exc_info=e)
    return error_response(APIError(500, "The server had an error while processing your request.",
                                   type="server_error"))


def shutting_down() -> APIError:
    return APIError(503, "The server is shutting down; the request was not completed.", type="server_error",
                    code="server_shutting_down")


async def read_body(request: Request, server: ServerState) -> dict:
    """The JSON object of the request, read up to the size limit."""
    raw = b""
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > server.config.max_body_bytes:
            raise too_large(server.config.max_body_bytes)
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise APIError(400, "The body of the request is not valid JSON.") from None
    if not isinstance(body, dict):
        raise APIError(400, "The body of the request must be a JSON object.")
    if SURROGATE_ESCAPE.search(raw) and has_lone_surrogate(body):
        raise APIError(400, "The body of the request is not valid JSON: a \\u escape names half of a UTF-16 "
                            "surrogate pair without the other half.")
    return body


def has_lone_surrogate(value) -> bool:
    """Whether a string of the parsed body (keys included) holds a lone UTF-16 surrogate, which JSON's \\ud800
    escape parses to and which no tokenizer, and no UTF-8 encoder, takes. Iterative: any depth json.loads took."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            try:
                v.encode("utf-8")
            except UnicodeEncodeError:
                return True
        elif isinstance(v, dict):
            stack += [*v.keys(), *v.values()]
        elif isinstance(v, list):
            stack += v
    return False


def require_model(body: dict, server: ServerState) -> None:
    """A generation request names the model, as OpenAI requires: a string, and ours."""
    name = body.get("model")
    if name is None:
        raise APIError(400, "you must provide a model parameter", param="model")
    if not isinstance(name, str):
        raise APIError(400, f"Invalid type for 'model': expected a string, but got {type(name).__name__}.",
                       param="model")
    check_model(name, server)


def check_model(name: str | None, server: ServerState) -> None:
    """A model name, when given, must be the served one (404 model_not_found, as OpenAI answers)."""
    if name is not None and name != server.config.model_name:
        raise APIError(404, f"The model '{name}' does not exist; this server serves '{server.config.model_name}'.",
                       param="model", code="model_not_found")


# ---------------------------------------------------------------------------- routes


@router.get("/", include_in_schema=False)
async def playground():
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.post("/tokenize")
async def tokenize(request: Request, server: Server):
    """vLLM's /tokenize: a completion {"prompt"} or chat {"messages"} -> its prompt's token ids (the playground's
    live count)."""
    body = await read_body(request, server)
    check_model(body.get("model"), server)
    ids = tokenize_ids(body, server.tokenizer)
    return {"tokens": ids, "count": len(ids), "max_model_len": server.block_size}


@router.post("/detokenize")
async def detokenize(request: Request, server: Server):
    """vLLM's /detokenize: {"tokens": [ids]} -> {"prompt": their text}."""
    body = await read_body(request, server)
    check_model(body.get("model"), server)
    return {"prompt": server.tokenizer.decode(detokenize_ids(body, server.tokenizer))}


@router.get("/health")
async def health(server: Server):
    return {"status": "ok", "model": server.config.model_name}


@router.get("/v1/models")
async def models(server: Server):
    return {"object": "list", "data": [model_card(server)]}


@router.get("/v1/models/{name:path}")
async def one_model(name: str, server: Server):
    check_model(name, server)
    return model_card(server)


def model_card(server: ServerState) -> dict:
    """OpenAI's model object, with the context length (vLLM's max_model_len; context_length, as before)."""
    return {"id": server.config.model_name, "object": "model", "created": server.created, "owned_by": "local",
            "context_length": server.block_size, "max_model_len": server.block_size}


@router.post("/v1/completions")
async def completions(request: Request, server: Server):
    return await generation(request, server, completion_job, Completions)


@router.post("/v1/chat/completions")
async def chat(request: Request, server: Server):
    return await generation(request, server, chat_job, ChatCompletions)


@router.post("/v1/responses")
async def responses(request: Request, server: Server):
    """OpenAI's Responses API: the chat path's job, its reply translated (gpt/serve/responses.py)."""
    body = await read_body(request, server)
    require_model(body, server)
    job = response_job(body, server.tokenizer, server.block_size)
    return await respond(request, server, job, Responses(ChatCompletions(server, job), body))


async def generation(request: Request, server: ServerState, make_job, shape: type["Shape"]):
    """The two generating endpoints: read and check the body, build the endpoint's job, answer in its shape."""
    body = await read_body(request, server)
    require_model(body, server)
    job = make_job(body, server.tokenizer, server.block_size)
    return await respond(request, server, job, shape(server, job))


async def respond(request: Request, server: ServerState, job: Job, shape: "Shape"):
    """Start the job's sequences; answer with their events as a stream, or with the whole reply at the end."""
    reply = PendingReply(server.worker, job)
    reply.start()
    if job.stream:
        return StreamingResponse(stream_events(reply, shape), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        await reply.wait(request)
    finally:
        reply.cancel()
    return JSONResponse(await shape.full(reply))


# ---------------------------------------------------------------------------- one request's sequences


async def client_gone(request: Request) -> None:
    """Returns when the client disconnects: its body is read, so the next message it can send is the disconnect."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


@dataclass
class Event:
    seq: DecodeRequest
    token: int | None
    text: str
    position: int  # index of `token` in seq.out_ids
    finish_reason: FinishReason | None  # set on the sequence's last event


class PendingReply:
    """The engine sequences of one API request and the events their tokens produce, until the reply is sent."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs: list[DecodeRequest] = []
        self._pending: list[Event] = []  # from the engine thread, not yet handed to the event loop
        self._pending_lock = threading.Lock()

    def start(self) -> None:
        job = self.job
        items = [(ids, replace(job.params, seed=sample_seed(job.params.seed, i)))
                 for ids in job.prompts for i in range(job.best_of)]
        if len(items) > self.worker.capacity:  # would never fit, however long it waited
            raise APIError(400, f"This request needs {len(items)} sequences (prompts x best_of); this server holds "
                                f"at most {self.worker.capacity}.", param="best_of" if job.best_of > 1 else "prompt")
        try:
            self.seqs = self.worker.submit(items, job.stop_ids, self._on_token, job.hidden_ids)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ShuttingDown:
            raise shutting_down() from None
        except ConstraintError as e:  # the vocabulary cannot even begin the format
            what = "tools" if job.reads_calls else RF
            raise bad(what, f"Invalid {what} for this model: {e}") from None

    def _on_token(self, seq: DecodeRequest, token: int | None, text: str) -> None:  # engine thread
        """Queue what happened now: the handler runs later, when the sequence may have moved on.

        Only a stream needs every token; otherwise only a sequence's end. Events wait in a list and
        the event loop is woken once per batch of them, not once per token: with a small model the
        per-token wake-ups and the handler's work took the GIL from the engine thread."""
        if seq.finish_reason is None and not self.job.stream:
            return
        event = Event(seq, token, text, len(seq.out_ids) - 1, seq.finish_reason)
        with self._pending_lock:
            self._pending.append(event)
            if len(self._pending) > 1:  # a wake-up is already on its way
                return
        self.loop.call_soon_threadsafe(self._deliver)

    def _deliver(self) -> None:  # event loop
        with self._pending_lock:
            events, self._pending = self._pending, []
        for event in events:
            self.events.put_nowait(event)

    def cancel(self) -> None:
        for s in self.seqs:
            if not s.done:
                s.cancel()

    async def wait(self, request: Request) -> None:
        """Until every sequence is done; a client that goes away cancels them at once (the next step frees their
        rows), not after the generation it no longer waits for."""
        gone, event = asyncio.ensure_future(client_gone(request)), None
        try:
            while not all(s.done for s in self.seqs):
                event = asyncio.ensure_future(self.events.get())
                await asyncio.wait((event, gone), return_when=asyncio.FIRST_COMPLETED)
                if gone.done():
                    self.cancel()
                    raise APIError(499, "The client closed the connection.")
        finally:
            for task in (gone, event):
                if task is not None:
                    task.cancel()
        self._check_failed()

    def stuck(self, seq: DecodeRequest) -> bool:
        """A row the engine ended because its vocabulary cannot continue the response_format (not a failed
        step): its grammar allows no token (the engine's own test, constraints.token_masks)."""
        return (seq.finish_reason == "error" and seq.grammar is not None
                and not token_masks([seq.grammar], [seq.stop_ids], self.worker.engine.vocab).any())

    def _check_failed(self) -> None:
        if any(s.finish_reason == "error" and not self.stuck(s) for s in self.seqs):
            raise APIError(500, "The server had an error while generating.", type="server_error")
        if any(s.finish_reason == "cancelled" for s in self.seqs):
            raise shutting_down()

    def chosen(self) -> list[list[DecodeRequest]]:
        """Per prompt, the n sequences returned: the best by mean token log-probability when best_of > n."""
        job, out = self.job, []
        for p in range(len(job.prompts)):
            cands = self.seqs[p * job.best_of : (p + 1) * job.best_of]
            if job.best_of > job.n:
                cands = sorted(cands, key=lambda s: s.mean_logprob(), reverse=True)[: job.n]
            out.append(cands)
        return out


async def stream_events(reply: PendingReply, shape: Shape) -> AsyncIterator[str]:
    """Server-Sent Events: one chunk per token (text held back at a possible stop is sent later)."""
    index = {id(s): i for i, s in enumerate(reply.seqs)}  # best_of == n when streaming
    try:
        for chunk in shape.opening(reply.seqs):
            yield shape.frame(chunk)
        left = len(reply.seqs)
        while left:
            events = [await reply.events.get()]
            while not reply.events.empty():  # what piled up goes out in one write
                events.append(reply.events.get_nowait())
            out = []
            for e in events:
                i = index[id(e.seq)]
                failed = e.finish_reason == "cancelled" or (e.finish_reason == "error" and not reply.stuck(e.seq))
                if failed:  # a failed step; a server shutting down
                    failed = APIError(500, "generation was interrupted", type="server_error")
                    yield "".join(out) + shape.failure(failed if e.finish_reason == "error" else shutting_down())
                    return
                out += [shape.frame(chunk) for chunk in shape.chunks(i, e)]
                if e.finish_reason is not None:
                    left -= 1
                    out += [shape.frame(chunk) for chunk in shape.finish_chunks(i, e.seq, reply)]
            yield "".join(out)
        yield shape.closing(reply)
    finally:
        reply.cancel()  # the client went away (or we are done): free the rows


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------- OpenAI's response objects


def finish_reason(seq: DecodeRequest, reply: PendingReply) -> str:
    """OpenAI's finish_reason of an ended sequence: a stuck constrained row is cut off, "length" (module doc)."""
    return "length" if reply.stuck(seq) else FINISH[seq.finish_reason]


def unreachable(seq: DecodeRequest, reply: PendingReply) -> dict:
    """The choice's extra `error` field when its row was stuck on the response_format (or the tools' grammar);
    else nothing."""
    if not reply.stuck(seq):
        return {}
    if reply.job.reads_calls:
        return {"error": {**UNREACHABLE, "message": UNREACHABLE["message"].replace("response_format", "tool call"),
                          "param": "tools", "code": "tools_unreachable"}}
    return {"error": UNREACHABLE}


def generated(seq: DecodeRequest, indices: list[int]) -> list[TokenScore]:
    """The generated tokens of seq at `indices`, with their log-probabilities and top alternatives."""
    return [TokenScore(seq.out_ids[j], seq.out_logprobs[j], seq.top[j] if seq.top else []) for j in indices]


class Shape(ABC):
    """OpenAI's response objects for one endpoint: the whole reply, or a stream's chunks."""

    prefix = object_chunk = ""
    reports_end = False  # logprobs list a generated end-of-text/turn token (which adds no text)

    def __init__(self, server: ServerState, job: Job):
        self.server, self.tok, self.job = server, server.tokenizer, job
        self.id = self.prefix + secrets.token_hex(12)
        self.created = int(time.time())

    @abstractmethod
    async def full(self, reply: PendingReply) -> dict:
        """The whole reply, once every sequence is done."""

    @abstractmethod
    def logprobs(self, seq: DecodeRequest, indices: list[int]) -> dict:
        """The logprobs object of the generated tokens of seq at `indices`."""

    @abstractmethod
    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict:
        """One choice of a stream chunk: new text, its logprobs, or the finish reason."""

    def opening(self, seqs: list[DecodeRequest]) -> list[dict]:
        """The chunks a stream starts with, before any token."""
        return []

    def frame(self, chunk: dict) -> str:
        """How a chunk goes on the wire: one Server-Sent Event."""
        return sse(chunk)

    def failure(self, e: APIError) -> str:
        """The event a stream ends with when generation fails."""
        return sse(e.body())

    def closing(self, reply: PendingReply) -> str:
        """What a stream ends with once every sequence is done: the usage chunk when asked for, then [DONE]."""
        return (sse(self.usage_chunk(reply.seqs)) if self.job.include_usage else "") + "data: [DONE]\n\n"

    def envelope(self, obj: str, **fields) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.server.config.model_name,
                **fields}

    def usage(self, seqs: list[DecodeRequest]) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(s.out_ids) for s in seqs)
        b = self.job.best_of  # a prompt's cached tokens: its sequences' fewest (the later ones reuse the first's)
        cached = sum(min(s.cached_tokens for s in seqs[p * b : (p + 1) * b]) for p in range(len(seqs) // b))
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                "prompt_tokens_details": {"cached_tokens": cached}}

    def usage_chunk(self, seqs: list[DecodeRequest]) -> dict:
        return self.envelope(self.object_chunk, choices=[], usage=self.usage(seqs))

    def token_str(self, token: int) -> str:
        return self.tok.decode([token])

    def reported(self, seq: DecodeRequest) -> list[int]:
        """Indices of the generated tokens that logprobs report: all (reports_end) or all but an end token."""
        n = len(seq.out_ids) - (1 if seq.finish_reason == "eos" and not self.reports_end else 0)
        return list(range(n))

    def delta(self, i: int, e: Event) -> dict | None:
        """The chunk for one token event (None when it shows nothing yet)."""
        lp = None
        if self.job.logprobs is not None and e.token is not None and (self.reports_end or e.finish_reason != "eos"):
            lp = self.logprobs(e.seq, [e.position])
        if not e.text and lp is None:
            return None
        return self.envelope(self.object_chunk, choices=[self.chunk_choice(i, e.text, lp, None)])

    def chunks(self, i: int, e: Event) -> list[dict]:
        """The chunks one token event adds to a stream (none, one, or several: a tool call's start and arguments)."""
        chunk = self.delta(i, e)
        return [] if chunk is None else [chunk]

    def finish_chunks(self, i: int, seq: DecodeRequest, reply: PendingReply) -> list[dict]:
        """The chunks that end choice i of a stream."""
        return [self.finish(i, seq, reply)]

    def finish(self, i: int, seq: DecodeRequest, reply: PendingReply) -> dict:
        """A stream's last chunk for choice i: its finish reason (and why a stuck row was cut off)."""
        choice = self.chunk_choice(i, None, None, finish_reason(seq, reply))
        return self.envelope(self.object_chunk, choices=[{**choice, **unreachable(seq, reply)}])


class Completions(Shape):
    prefix = "cmpl-"
    object_chunk = "text_completion"
    # Every generated token, the end token too, as vLLM and OpenAI's legacy endpoint list them: echo + logprobs
    # with max_tokens 1 (lm-eval's loglikelihood) then always has one entry past the prompt's.
    reports_end = True

    async def full(self, reply: PendingReply) -> dict:
        choices, i = [], 0
        for p, seqs in enumerate(reply.chosen()):
            prompt = self.job.prompts[p]
            scored = await self.prompt_scores(prompt) if self.job.echo and self.job.logprobs is not None else []
            for seq in seqs:
                c = seq.completion()
                text = (self.tok.decode(prompt) if self.job.echo else "") + c.text
                offset = 0 if self.job.echo else len(self.tok.decode(prompt))
                lp = None
                if self.job.logprobs is not None:
                    lp = self.text_logprobs(scored + generated(seq, self.reported(seq)), offset, len(scored))
                choices.append({"text": text, "index": i, "logprobs": lp, "finish_reason": finish_reason(seq, reply),
                                **unreachable(seq, reply)})
                i += 1
        return self.envelope("text_completion", choices=choices, usage=self.usage(reply.seqs))

    async def prompt_scores(self, prompt: list[int]) -> list[TokenScore]:
        """The prompt's own tokens scored by the model (echo + logprobs), off the event loop."""
        return await asyncio.to_thread(self.server.worker.score_prompt, prompt, self.job.logprobs or 0)

    def logprobs(self, seq: DecodeRequest, indices: list[int]) -> dict:
        return self.text_logprobs(generated(seq, indices), 0)

    def text_logprobs(self, rows: list[TokenScore], offset: int, n_prompt: int = 0) -> dict:
        """The legacy logprobs object; `offset` is where the first row's text starts in the choice's text, and
        rows from `n_prompt` on are generated (a hidden end token among them adds no text)."""
        tokens = [self.token_str(r.id) for r in rows]
        offsets, pos = [], offset
        for j, (r, s) in enumerate(zip(rows, tokens)):
            offsets.append(pos)
            pos += 0 if j >= n_prompt and r.id in self.job.hidden_ids else len(s)
        tops = [None if r.logprob is None and not r.top else {self.token_str(i): v for i, v in r.top} for r in rows]
        return {"tokens": tokens, "token_logprobs": [r.logprob for r in rows], "top_logprobs": tops,
                "text_offset": offsets}

    def opening(self, seqs: list[DecodeRequest]) -> list[dict]:
        if not self.job.echo:
            return []
        return [self.envelope("text_completion", choices=[{"text": self.tok.decode(self.job.prompts[i // self.job.n]),
                                                           "index": i, "logprobs": None, "finish_reason": None}])
                for i in range(len(seqs))]

    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict:
        return {"text": text or "", "index": i, "logprobs": lp, "finish_reason": reason}


class ChatCompletions(Shape):
    """Chat replies; with tools (job.reads_calls) each choice's text is read for calls (gpt/data/tool_calls.py):
    `message.tool_calls` and finish_reason "tool_calls", streamed as OpenAI's deltas (a call's id, type and name
    first, with empty arguments, then fragments of its arguments). A call cut off (max_tokens) ends the choice
    with "length" and is not listed in a non-streamed message."""

    prefix = "chatcmpl-"
    object_chunk = "chat.completion.chunk"

    def __init__(self, server: ServerState, job: Job):
        super().__init__(server, job)
        self.readers: dict[int, CallReader] = {}  # per streamed choice
        self.call_ids: dict[tuple[int, int], str] = {}  # (choice, call) -> id

    async def full(self, reply: PendingReply) -> dict:
        choices = []
        for i, seq in enumerate(reply.chosen()[0]):
            c = seq.completion()
            lp = self.logprobs(seq, self.reported(seq)) if self.job.logprobs is not None else None
            message, reason = {"role": "assistant", "content": c.text, "refusal": None}, finish_reason(seq, reply)
            if self.job.reads_calls:
                reader = read_calls(c.text, self.job.tools.format)
                reason = calls_finish(reader, reason)
                calls = [self.call_object(i, k, call) for k, call in enumerate(reader.calls) if call.complete]
                message["content"] = reader.content if reader.content.strip() or not calls else None
                if calls:
                    message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason,
                            **unreachable(seq, reply)})
        return self.envelope("chat.completion", choices=choices, usage=self.usage(reply.seqs),
                             system_fingerprint=None)

    def call_id(self, i: int, k: int) -> str:
        return self.call_ids.setdefault((i, k), "call_" + secrets.token_hex(12))

    def call_object(self, i: int, k: int, call: ParsedCall) -> dict:
        return {"id": self.call_id(i, k), "type": "function",
                "function": {"name": call.name, "arguments": call.arguments}}

    def chunks(self, i: int, e: Event) -> list[dict]:
        if not self.job.reads_calls:
            return super().chunks(i, e)
        reader = self.readers.setdefault(i, CallReader(self.job.tools.format))
        lp = None
        if self.job.logprobs is not None and e.token is not None and e.finish_reason != "eos":
            lp = self.logprobs(e.seq, [e.position])
        out = [self.tool_delta(i, d) for d in reader.feed(e.text)]
        if lp is not None:
            out = out or [self.envelope(self.object_chunk, choices=[self.chunk_choice(i, None, None, None)])]
            out[-1]["choices"][0]["logprobs"] = lp
        return out

    def finish_chunks(self, i: int, seq: DecodeRequest, reply: PendingReply) -> list[dict]:
        if not self.job.reads_calls:
            return super().finish_chunks(i, seq, reply)
        reader = self.readers.setdefault(i, CallReader(self.job.tools.format))
        out = [self.tool_delta(i, d) for d in reader.finish()]
        choice = self.chunk_choice(i, None, None, calls_finish(reader, finish_reason(seq, reply)))
        return out + [self.envelope(self.object_chunk, choices=[{**choice, **unreachable(seq, reply)}])]

    def tool_delta(self, i: int, d: Delta) -> dict:
        """One chunk of a streamed choice read for calls: content, a call's start, or an arguments fragment."""
        if d.kind == "content":
            delta = {"content": d.text}
        elif d.kind == "call":
            delta = {"tool_calls": [{"index": d.index, "id": self.call_id(i, d.index), "type": "function",
                                     "function": {"name": d.text, "arguments": ""}}]}
        else:
            delta = {"tool_calls": [{"index": d.index, "function": {"arguments": d.text}}]}
        return self.envelope(self.object_chunk, choices=[{"index": i, "delta": delta, "logprobs": None,
                                                          "finish_reason": None}])

    def entry(self, token: int, logprob: float) -> dict:
        s = self.token_str(token)
        return {"token": s, "logprob": logprob, "bytes": list(self.tok.decode_bytes([token]))}

    def logprobs(self, seq: DecodeRequest, indices: list[int]) -> dict:
        content = []
        for r in generated(seq, indices):
            e = self.entry(r.id, r.logprob)
            e["top_logprobs"] = [self.entry(t, v) for t, v in r.top]
            content.append(e)
        return {"content": content, "refusal": None}

    def opening(self, seqs: list[DecodeRequest]) -> list[dict]:
        return [self.envelope(self.object_chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}])
                for i in range(len(seqs))]

    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict:
        return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                "finish_reason": reason}


def calls_finish(reader: CallReader, reason: str) -> str:
    """OpenAI's finish_reason of a reply read for calls: "tool_calls" when it ended with complete calls, "length"
    when a call was cut off (never a broken call presented as complete)."""
    if any(not c.complete for c in reader.calls):
        return "length"
    return "tool_calls" if reader.calls and reason == "stop" else reason
