"""The OpenAI-compatible HTTP API: /v1/models, /v1/completions, /v1/chat/completions, /health.

Requests become engine sequences (gpt/serve/protocol.py checks the fields), which the engine
thread (gpt/serve/worker.py) decodes in one continuous batch; their tokens come back to the
handler's event loop through an asyncio queue and leave as JSON or Server-Sent Events. A client
that disconnects cancels its sequences. Every error is OpenAI's error JSON with its status; the
access log (uvicorn's) records method, path and status, never prompt or completion text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from pathlib import Path
from typing import AsyncIterator

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpt.data.tokenizer import Tokenizer
from gpt.infer.engine import Engine, sample_seed
from gpt.infer.engine import Request as Seq
from gpt.model import GPT
from gpt.serve.protocol import APIError, Job, chat_job, completion_job
from gpt.serve.worker import QueueFull, Worker

log = logging.getLogger("gpt.serve")
FINISH = {"eos": "stop", "stop": "stop", "length": "length"}
STATIC = Path(__file__).resolve().parent / "static"  # the playground page, served at /


@dataclass
class ServerConfig:
    model_name: str
    api_key: str | None = None
    max_batch: int = 8
    max_queue: int = 32
    max_body_bytes: int = 1 << 20


def create_app(model: GPT, tokenizer: Tokenizer, cfg: ServerConfig) -> FastAPI:
    """The app around one loaded model; the engine thread starts and stops with the app."""
    model.eval()
    worker = Worker(Engine(model, tokenizer, max_batch=cfg.max_batch), cfg.max_queue)
    block = model.config.block_size
    created = int(time.time())

    async def lifespan(_app):
        worker.start()
        yield
        worker.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.state.worker = worker

    @app.middleware("http")
    async def guard(request: Request, call_next):
        """Bearer key and body size, before any handler reads the body."""
        try:
            if cfg.api_key and request.url.path.startswith(("/v1", "/tokenize")):
                given = request.headers.get("authorization", "")
                if not secrets.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                    raise APIError(401, "Incorrect or missing API key: send it as 'Authorization: Bearer KEY'.",
                                   code="invalid_api_key")
            length = request.headers.get("content-length")
            if length is not None and (not length.isdigit() or int(length) > cfg.max_body_bytes):
                raise APIError(413, f"The request body is larger than the server's limit of {cfg.max_body_bytes} "
                                    "bytes.", code="request_too_large")
            return await call_next(request)
        except APIError as e:
            return error_response(e)

    @app.exception_handler(APIError)
    async def api_error(_request, e: APIError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, e: StarletteHTTPException):
        code = "not_found" if e.status_code == 404 else None
        return error_response(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(Exception)
    async def internal_error(_request, e: Exception):  # a bug: logged with its traceback, answered in OpenAI's shape
        log.error("internal error", exc_info=e)
        return error_response(APIError(500, "The server had an error while processing your request.",
                                       type="server_error"))

    @app.get("/", include_in_schema=False)
    async def playground():
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.post("/tokenize")
    async def tokenize(request: Request):
        """Prompt tokens of a completion prompt or chat messages (the playground's live count)."""
        body = await read_body(request)
        if "messages" in body:
            n = len(chat_job({**body, "max_tokens": 1, "stream": False}, tokenizer, 1 << 30).prompts[0])
        else:
            n = sum(len(p) for p in completion_job({"prompt": body.get("prompt"), "max_tokens": 0}, tokenizer,
                                                   1 << 30).prompts)
        return {"tokens": n, "context_length": block}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": cfg.model_name}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str):
        check_model(name)
        return model_card()

    def model_card() -> dict:
        return {"id": cfg.model_name, "object": "model", "created": created, "owned_by": "local",
                "context_length": block}

    def check_model(name) -> None:
        if name is not None and name != cfg.model_name:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{cfg.model_name}'.",
                           param="model", code="model_not_found")

    async def read_body(request: Request) -> dict:
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > cfg.max_body_bytes:
                raise APIError(413, f"The request body is larger than the server's limit of {cfg.max_body_bytes} "
                                    "bytes.", code="request_too_large")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            raise APIError(400, "The body of the request is not valid JSON.") from None
        if not isinstance(body, dict):
            raise APIError(400, "The body of the request must be a JSON object.")
        check_model(body.get("model"))
        return body

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_body(request)
        job = completion_job(body, tokenizer, block)
        return await respond(request, job, Completions(cfg.model_name, tokenizer, job, model))

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await read_body(request)
        job = chat_job(body, tokenizer, block)
        return await respond(request, job, ChatCompletions(cfg.model_name, tokenizer, job, model))

    async def respond(request: Request, job: Job, shape: "Shape"):
        run = Run(worker, job)
        run.start()
        if job.stream:
            return StreamingResponse(stream_events(request, run, shape), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        try:
            await run.wait(request)
        finally:
            run.cancel()
        return JSONResponse(await shape.full(run))

    return app


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


@dataclass
class Event:
    seq: Seq
    token: int | None
    text: str
    position: int  # index of `token` in seq.out_ids
    finish_reason: str | None  # set on the sequence's last event


class Run:
    """The engine sequences of one API request and the events their tokens produce."""

    def __init__(self, worker: Worker, job: Job):
        self.worker, self.job = worker, job
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.seqs: list[Seq] = []
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
            self.seqs = self.worker.submit(items, job.stop_ids, self._on_token)
        except QueueFull as e:
            raise APIError(429, f"The server is busy ({e}); retry shortly.", type="rate_limit_exceeded",
                           code="rate_limit_exceeded") from None

    def _on_token(self, seq: Seq, token: int | None, text: str) -> None:  # engine thread
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
        """Until every sequence is done; a client that goes away cancels them."""
        checked = time.monotonic()
        while not all(s.done for s in self.seqs):
            try:
                await asyncio.wait_for(self.events.get(), timeout=0.25)
            except asyncio.TimeoutError:
                pass
            if time.monotonic() - checked > 0.25:
                checked = time.monotonic()
                if await request.is_disconnected():
                    self.cancel()
                    raise APIError(499, "The client closed the connection.")
        self._check_failed()

    def _check_failed(self) -> None:
        if any(s.finish_reason == "error" for s in self.seqs):
            raise APIError(500, "The server had an error while generating.", type="server_error")
        if any(s.finish_reason == "cancelled" for s in self.seqs):
            raise APIError(503, "The server is shutting down; the request was not completed.", type="server_error")

    def chosen(self) -> list[list[Seq]]:
        """Per prompt, the n sequences returned: the best by mean token log-probability when best_of > n."""
        job, out = self.job, []
        for p in range(len(job.prompts)):
            cands = self.seqs[p * job.best_of : (p + 1) * job.best_of]
            if job.best_of > job.n:
                cands = sorted(cands, key=lambda s: s.mean_logprob(), reverse=True)[: job.n]
            out.append(cands)
        return out


async def stream_events(request: Request, run: Run, shape: "Shape") -> AsyncIterator[str]:
    """Server-Sent Events: one chunk per token (text held back at a possible stop is sent later)."""
    index = {id(s): i for i, s in enumerate(run.seqs)}  # best_of == n when streaming
    try:
        for chunk in await shape.opening(run.seqs):
            yield sse(chunk)
        left = len(run.seqs)
        while left:
            events = [await run.events.get()]
            while not run.events.empty():  # what piled up goes out in one write
                events.append(run.events.get_nowait())
            out = []
            for e in events:
                i = index[id(e.seq)]
                if e.finish_reason in ("error", "cancelled"):
                    yield "".join(out) + sse(APIError(500, "generation was interrupted", type="server_error").body())
                    return
                chunk = shape.delta(i, e)
                if chunk is not None:
                    out.append(sse(chunk))
                if e.finish_reason is not None:
                    left -= 1
                    out.append(sse(shape.finish(i, e.finish_reason)))
            yield "".join(out)
        if run.job.include_usage:
            yield sse(shape.usage_chunk(run.seqs))
        yield "data: [DONE]\n\n"
    finally:
        run.cancel()  # the client went away (or we are done): free the rows


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Shape(ABC):
    """OpenAI's response objects for one endpoint."""

    object_full = object_chunk = ""

    def __init__(self, model_name: str, tokenizer: Tokenizer, job: Job, model: GPT):
        self.model_name, self.tok, self.job, self.model = model_name, tokenizer, job, model
        self.id = self.prefix + secrets.token_hex(12)
        self.created = int(time.time())

    prefix = ""

    def envelope(self, obj: str, **fields) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model_name, **fields}

    def usage(self, seqs: list[Seq]) -> dict:
        prompt = sum(len(p) for p in self.job.prompts)
        completion = sum(len(s.out_ids) for s in seqs)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def usage_chunk(self, seqs: list[Seq]) -> dict:
        return self.envelope(self.object_chunk, choices=[], usage=self.usage(seqs))

    def token_str(self, token: int) -> str:
        return self.tok.decode([token])

    def reported(self, seq: Seq) -> list[int]:
        """Indices of the generated tokens that logprobs report: all but an end-of-text/turn token."""
        n = len(seq.out_ids) - (1 if seq.finish_reason == "eos" else 0)
        return list(range(n))

    async def opening(self, seqs: list[Seq]) -> list[dict]:
        return []

    @abstractmethod
    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict: ...

    @abstractmethod
    def logprobs(self, seq: Seq, indices: list[int]) -> dict: ...

    def delta(self, i: int, e: Event) -> dict | None:
        """The chunk for one token event (None when it shows nothing yet)."""
        lp = None
        if self.job.logprobs is not None and e.token is not None and e.finish_reason != "eos":
            lp = self.logprobs(e.seq, [e.position])
        if not e.text and lp is None:
            return None
        return self.envelope(self.object_chunk, choices=[self.chunk_choice(i, e.text, lp, None)])

    def finish(self, i: int, reason: str) -> dict:
        return self.envelope(self.object_chunk, choices=[self.chunk_choice(i, None, None, FINISH[reason])])


class Completions(Shape):
    prefix = "cmpl-"
    object_full = object_chunk = "text_completion"

    async def full(self, run: "Run") -> dict:
        choices, i = [], 0
        for p, seqs in enumerate(run.chosen()):
            prompt_lp = await self.prompt_logprobs(p) if self.job.echo and self.job.logprobs is not None else None
            for seq in seqs:
                c = seq.completion()
                text = (self.tok.decode(self.job.prompts[p]) if self.job.echo else "") + c.text
                offset = 0 if self.job.echo else len(self.tok.decode(self.job.prompts[p]))
                lp = self.logprobs(seq, self.reported(seq), prompt_lp, offset) if self.job.logprobs is not None else None
                choices.append({"text": text, "index": i, "logprobs": lp, "finish_reason": FINISH[c.finish_reason]})
                i += 1
        return self.envelope("text_completion", choices=choices, usage=self.usage(run.seqs))

    async def prompt_logprobs(self, p: int) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
        ids, k = self.job.prompts[p], self.job.logprobs or 0
        return await asyncio.to_thread(score, self.model, ids, k, self.tok.vocab_size)

    def logprobs(self, seq: Seq, indices: list[int], prefix=None, offset: int = 0) -> dict:
        rows = list(prefix or []) + [(seq.out_ids[j], seq.out_logprobs[j], seq.top[j] if seq.top else [])
                                     for j in indices]
        tokens = [self.token_str(t) for t, _, _ in rows]
        offsets, pos = [], offset
        for s in tokens:
            offsets.append(pos)
            pos += len(s)
        tops = [None if lp is None and not top else {self.token_str(i): v for i, v in top} for _, lp, top in rows]
        return {"tokens": tokens, "token_logprobs": [lp for _, lp, _ in rows], "top_logprobs": tops,
                "text_offset": offsets}

    async def opening(self, seqs: list[Seq]) -> list[dict]:
        if not self.job.echo:
            return []
        return [self.envelope("text_completion", choices=[{"text": self.tok.decode(self.job.prompts[i // self.job.n]),
                                                           "index": i, "logprobs": None, "finish_reason": None}])
                for i in range(len(seqs))]

    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict:
        return {"text": text or "", "index": i, "logprobs": lp, "finish_reason": reason}


class ChatCompletions(Shape):
    prefix = "chatcmpl-"
    object_full, object_chunk = "chat.completion", "chat.completion.chunk"

    async def full(self, run: "Run") -> dict:
        choices = []
        for i, seq in enumerate(run.chosen()[0]):
            c = seq.completion()
            lp = self.logprobs(seq, self.reported(seq)) if self.job.logprobs is not None else None
            choices.append({"index": i, "message": {"role": "assistant", "content": c.text, "refusal": None},
                            "logprobs": lp, "finish_reason": FINISH[c.finish_reason]})
        return self.envelope("chat.completion", choices=choices, usage=self.usage(run.seqs),
                             system_fingerprint=None)

    def entry(self, token: int, logprob: float) -> dict:
        s = self.token_str(token)
        return {"token": s, "logprob": logprob, "bytes": list(self.tok.decode_bytes([token]))}

    def logprobs(self, seq: Seq, indices: list[int]) -> dict:
        content = []
        for j in indices:
            e = self.entry(seq.out_ids[j], seq.out_logprobs[j])
            e["top_logprobs"] = [self.entry(t, v) for t, v in (seq.top[j] if seq.top else [])]
            content.append(e)
        return {"content": content, "refusal": None}

    async def opening(self, seqs: list[Seq]) -> list[dict]:
        return [self.envelope(self.object_chunk, choices=[{"index": i, "delta": {"role": "assistant", "content": ""},
                                                           "logprobs": None, "finish_reason": None}])
                for i in range(len(seqs))]

    def chunk_choice(self, i: int, text: str | None, lp: dict | None, reason: str | None) -> dict:
        return {"index": i, "delta": {} if text is None else {"content": text}, "logprobs": lp,
                "finish_reason": reason}


@torch.inference_mode()
def score(model: GPT, ids: list[int], k: int, vocab: int) -> list[tuple[int, float | None, list[tuple[int, float]]]]:
    """Log-probability of each prompt token given the ones before it (echo + logprobs); the first has none."""
    window = ids[-model.config.block_size :]
    logits, _ = model(torch.tensor([window], device=next(model.parameters()).device))
    logp = logits[0, :, :vocab].float().log_softmax(-1)
    out: list[tuple[int, float | None, list[tuple[int, float]]]] = [(window[0], None, [])]
    for j in range(1, len(window)):
        top = logp[j - 1].topk(min(k, vocab)) if k else None
        alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
        out.append((window[j], float(logp[j - 1, window[j]]), alts))
    return out
