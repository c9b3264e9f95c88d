"""The thread that owns the engine: it steps the running batch while requests arrive from the web server.

HTTP handlers `submit` sequences (thread-safe); they join the batch at the next step and their
tokens come back through each request's on_token callback (the handler hands them to its event
loop). When rows and the bounded queue are full, submit raises QueueFull (the server's 429).
A cancelled sequence, or every held one when a step fails, ends in the engine (finish reason
"cancelled" or "error") and its on_token hears of it. A server shutting down first stops accepting
(submit raises ShuttingDown, the server's 503), then cancels what is left.
"""

from __future__ import annotations

import logging
import threading
import time

import torch
from typing import Callable, Sequence

from gpt.infer.engine import DecodeRequest, Engine
from gpt.infer.sampling import SamplingParams
from gpt.infer.scoring import TokenScore, score_prompt

log = logging.getLogger("gpt.serve")


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class Worker:
    def __init__(self, engine: Engine, max_queue: int, batch_wait_s: float = 0.0):
        """batch_wait_s: how long an idle engine waits after each arriving request for the next (_gather)."""
        self.engine, self.max_queue, self.batch_wait_s = engine, max_queue, batch_wait_s
        self.threads = torch.get_num_threads()  # the creating thread's setting: a thread's OpenMP setting is its own
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="gpt-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def capacity(self) -> int:
        """Sequences the server holds at once: the batch's rows plus the queue."""
        return self.engine.max_batch + self.max_queue

    def submit(self, items: Sequence[tuple[list[int], SamplingParams]], stop_ids: Sequence[int],
               on_token: Callable[[DecodeRequest, int | None, str], None],
               hidden_ids: Sequence[int] = ()) -> list[DecodeRequest]:
        """Queue all of a request's sequences, or none of them (QueueFull); see DecodeRequest for the ids."""
        with self._lock:
            if self._stopping:
                raise ShuttingDown("the server is shutting down")
            held = self.engine.held
            if held + len(items) > self.capacity:
                raise QueueFull(f"{held} sequences running or queued; the server holds at most {self.capacity}")
            reqs = [self.engine.add(ids, params, stop_ids=stop_ids, hidden_ids=hidden_ids, on_token=on_token)
                    for ids, params in items]
        self._wake.set()
        return reqs

    def score_prompt(self, ids: list[int], top_k: int) -> list[TokenScore]:
        """The log-probability of each prompt token (echo + logprobs), on the caller's thread: one forward
        pass of the engine's model outside the batch. On one thread: a second OpenMP team in this process
        would slow every engine step from then on (serve_cli.in_passing_thread says why)."""
        torch.set_num_threads(1)  # this thread's setting only
        return score_prompt(self.engine.model, ids, top_k, self.engine.vocab)

    def stop_accepting(self) -> None:
        """Refuse new requests (ShuttingDown); those held go on (the server is draining)."""
        with self._lock:
            self._stopping = True
        self._wake.set()

    def cancel_all(self) -> None:
        """End every held sequence at the next step, finish reason "cancelled" (the drain's time is up)."""
        self.engine.cancel_all()
        self._wake.set()

    def stop(self) -> None:
        """Cancel what is left and end the thread (the server is shutting down)."""
        self.stop_accepting()
        self.cancel_all()
        self._thread.join(timeout=30)

    def _gather(self) -> None:
        """Requests sent together arrive one by one (each parsed on the event loop, a few per millisecond): an
        idle engine that started on the first would prefill it alone and the rest one step later, two or three
        forward calls where one does. So it waits until none came for batch_wait_s, at most 8 x batch_wait_s."""
        deadline = time.monotonic() + 8 * self.batch_wait_s
        while self.batch_wait_s and not self._stopping and self._wake.wait(self.batch_wait_s):
            self._wake.clear()
            if time.monotonic() >= deadline:
                return

    def _loop(self) -> None:
        torch.set_num_threads(self.threads)
        while True:
            if self._stopping and not self.engine.busy:
                return
            if not self.engine.busy:
                self._wake.wait()
                self._wake.clear()
                self._gather()
                continue
            try:
                self.engine.step()
            except Exception:  # a bug: fail the running requests, keep serving the next ones
                log.exception("engine step failed")
                self.engine.fail_all()
