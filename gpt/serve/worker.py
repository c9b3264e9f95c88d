"""The thread that owns the engine: it steps the running batch while requests arrive from the web server.

HTTP handlers `submit` sequences (thread-safe); they join the batch at the next step and their
tokens come back through each request's on_token callback (the handler hands them to its event
loop). When rows and the bounded queue are full, submit raises QueueFull (the server's 429).
"""

from __future__ import annotations

import logging
import threading
from typing import Callable, Sequence

from gpt.infer.engine import Engine, Request
from gpt.infer.sampling import SamplingParams

log = logging.getLogger("gpt.serve")


class QueueFull(Exception):
    pass


class Worker:
    def __init__(self, engine: Engine, max_queue: int):
        self.engine, self.max_queue = engine, max_queue
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
               on_token: Callable[[Request, int | None, str], None]) -> list[Request]:
        """Queue all of a request's sequences, or none of them (QueueFull)."""
        with self._lock:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            held = len(self.engine.active) + len(self.engine.waiting)
            if held + len(items) > self.capacity:
                raise QueueFull(f"{held} sequences running or queued; the server holds at most {self.capacity}")
            reqs = [self.engine.add(ids, params, stop_ids=stop_ids, on_token=on_token) for ids, params in items]
        self._wake.set()
        return reqs

    def stop(self) -> None:
        """Cancel what is left and end the thread (the server is shutting down)."""
        with self._lock:
            self._stopping = True
            for req in self.engine.active + self.engine.waiting:
                req.cancel()
        self._wake.set()
        self._thread.join(timeout=30)

    def _loop(self) -> None:
        while True:
            if self._stopping and not self.engine.busy:
                return
            if not self.engine.busy:
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                cancelled = [r for r in self.engine.active + self.engine.waiting if r.cancelled]
                self.engine.step()
                for req in cancelled:
                    req.finish_reason = req.finish_reason or "cancelled"
                    req.notify(None)
            except Exception:  # a bug: fail the running requests, keep serving the next ones
                log.exception("engine step failed")
                for req in self.engine.active + self.engine.waiting:
                    req.finish_reason = "error"
                    req.notify(None)
                self.engine.active.clear()
                self.engine.waiting.clear()
