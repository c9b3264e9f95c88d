"""An interactive conversation with a checkpoint (`sample.py --chat`).

The history is formatted with the checkpoint's chat template (gpt/chat.py): the special-token
template for fine-tuned chat models, a plain "User:/Assistant:" one otherwise. When the history
no longer fits the context window (leaving room for the reply), the oldest messages are dropped,
whole user/assistant exchanges at a time, and the user is told; the system prompt is always kept.
"""

from __future__ import annotations

import sys
from typing import Callable, TextIO

from gpt.data.chat import ChatTemplate
from gpt.data.tokenizer import Tokenizer
from gpt.infer.engine import complete
from gpt.model import GPT

HELP = "/reset clears the history, /exit or Ctrl-D leaves"


class ChatSession:
    """The messages of one conversation and how they become a prompt that fits the window."""

    def __init__(self, template: ChatTemplate, budget: int, system: str | None = None):
        self.template = template
        self.budget = budget  # prompt tokens allowed: block_size minus the room kept for the reply
        self.system = [{"role": "system", "content": system}] if system else []
        self.turns: list[dict] = []

    def reset(self) -> None:
        self.turns = []

    def prompt_for(self, user_text: str) -> tuple[list[int], int]:
        """Token ids for the next reply and how many old messages were dropped to fit."""
        self.turns.append({"role": "user", "content": user_text})
        dropped = 0
        ids = self.template.encode(self.system + self.turns, add_generation_prompt=True)
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
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    stop: list[str] | None = None,
    read: Callable[[str], str] = input,
    out: TextIO = sys.stdout,
    err: TextIO = sys.stderr,
    **sampling,
) -> None:
    """Read a message, stream the reply, repeat; `sampling` holds complete()'s decoding keywords."""
    template = ChatTemplate(tokenizer)
    block = model.config.block_size
    session = ChatSession(template, block - min(max_new_tokens, block // 2), system)
    stop_ids = template.stop_ids + ([tokenizer.eot_id] if tokenizer.eot_id is not None else [])
    stops = template.stop_strings + list(stop or [])
    print(f"chat ({template.name} template, {block}-token context); {HELP}", file=err)
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
        ids, dropped = session.prompt_for(line)
        if dropped:
            print(f"(dropped the {dropped} oldest message(s) to fit the {block}-token context window)", file=err)
        if len(ids) > block:
            print(f"(this message alone is longer than the context window; the model sees its last {block} tokens)",
                  file=err)

        def show(_: int, text: str) -> None:
            out.write(text)
            out.flush()

        try:
            reply = complete(model, tokenizer, ids, max_new_tokens=max_new_tokens, stop=stops, stop_ids=stop_ids,
                             on_text=show, **sampling)[0]
        except KeyboardInterrupt:
            print("\n(interrupted)", file=err)
            session.turns.pop()
            continue
        print(file=out)
        session.add_reply(reply.text.strip())
