"""An interactive conversation with a checkpoint (`sample.py --chat`).

The history is formatted with the checkpoint's chat template (gpt/data/chat_template.py): the model's own
Jinja template when it ships one, the special-token template for fine-tuned chat models, a plain
"User:/Assistant:" one otherwise. When the history
no longer fits the context window (leaving room for the reply), the oldest messages are dropped,
whole user/assistant exchanges at a time, and the user is told; the system prompt is always kept.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Callable, TextIO

from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import Tokenizer, TokenizerError
from gpt.infer.engine import complete, context_length
from gpt.infer.sampling import SamplingParams
from gpt.infer.speculative import Speculation
from gpt.model import GPT

HELP = "/reset clears the history, /exit or Ctrl-D leaves"


class ChatSession:
    """The messages of one conversation and how they become a prompt that fits the window."""

    def __init__(self, template: ChatTemplate, budget: int, system: str | None = None):
        self.template = template
        self.budget = budget  # prompt tokens allowed: the context minus the room kept for the reply
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def prompt_for(self, user_text: str) -> tuple[list[int], int]:
        """Token ids for the next reply and how many old messages were dropped to fit. A message the
        tokenizer cannot encode raises TokenizerError and leaves the history as it was."""
        ids = self.template.encode(self.system + self.turns + [{"role": "user", "content": user_text}],
                                   add_generation_prompt=True)
        self.turns.append({"role": "user", "content": user_text})
        dropped = 0
        while len(ids) > self.budget and len(self.turns) > 1:
            n = 2 if len(self.turns) > 2 and self.turns[1]["role"] == "assistant" else 1  # one exchange
            self.turns, dropped = self.turns[n:], dropped + n
            ids = self.template.encode(self.system + self.turns, add_generation_prompt=True)
        return ids, dropped

    def add_reply(self, text: str) -> None:
        self.turns.append({"role": "assistant", "content": text})


def run_chat(
    model: GPT,
    tokenizer: Tokenizer,
    params: SamplingParams,
    *,
    system: str | None = None,
    use_kv_cache: bool = True,
    max_model_len: int | None = None,
    read: Callable[[str], str] = input,
    out: TextIO | None = None,
    err: TextIO | None = None,
    speculation: Speculation | None = None,
) -> None:
    """Read a message, stream the reply, repeat; params.max_tokens bounds each reply, params.stop adds
    to the template's own end-of-turn strings; the context is the engine's (`context_length`). `out` and
    `err` default to sys.stdout and sys.stderr as they are at the call (not at import). With `speculation`
    every reply is decoded speculatively (the same replies), and its stats are printed to `err` at the end."""
    out, err = sys.stdout if out is None else out, sys.stderr if err is None else err
    template = ChatTemplate(tokenizer)
    block = context_length(model.config, max_model_len)
    session = ChatSession(template, block - min(params.max_tokens, block // 2), system)
    params = replace(params, stop=tuple(template.stop_strings) + tuple(params.stop))
    print(f"chat ({template.name} template, {block}-token context); {HELP}", file=err)
    try:
        _converse(model, tokenizer, params, session, block, use_kv_cache, read, out, err, speculation)
    finally:
        if speculation is not None:
            print(speculation.stats.summary(speculation.name), file=err)


def _converse(model: GPT, tokenizer: Tokenizer, params: SamplingParams, session: ChatSession, block: int,
              use_kv_cache: bool, read: Callable[[str], str], out: TextIO, err: TextIO,
              speculation: Speculation | None) -> None:
    """run_chat's loop: until /exit or end of input."""
    stop_ids = session.template.end_ids
    while True:
        try:
            line = read("> ")
        except EOFError:
            print(file=out)
            return
        command = line.strip()
        if command == "/exit":
            return
        if command == "/reset":
            session.reset()
            print("(history cleared)", file=err)
            continue
        if not command:
            continue
        try:
            ids, dropped = session.prompt_for(line)
        except TokenizerError as e:  # e.g. a character the vocabulary lacks: refuse this line, keep talking
            print(f"(not sent: {e})", file=err)
            continue
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the {block}-token context window)", file=err)
        if len(ids) > block:
            print(f"(this message alone is longer than the context window; the model sees its last {block} tokens)",
                  file=err)

        def show(_: int, text: str) -> None:
            out.write(text)
            out.flush()

        try:
            reply = complete(model, tokenizer, ids, params, stop_ids=stop_ids, use_kv_cache=use_kv_cache,
                             on_text=show, max_model_len=block, speculation=speculation)[0]
        except KeyboardInterrupt:
            print("\n(interrupted)", file=err)
            session.turns.pop()
            continue
        print(file=out)
        session.add_reply(reply.text.strip())
