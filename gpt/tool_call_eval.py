"""Tool-call accuracy of a checkpoint on held-out chat records with tools (`python -m gpt.eval --tool-calls`).

For each record, everything before its first assistant turn (the tool definitions, the system and user
turns) is the prompt; the engine answers it greedily, and the reply is read for calls with `read_calls`,
the reader the server uses. The reference is that first assistant turn: its calls, or plain text (a
record that needs no tool). Two decodings of the same prompts:

  free     the reply is the model's own text (tool_choice "auto" without a grammar), read for calls.
  grammar  the reply is held to the tools' grammar in "auto" mode (`tool_grammar`: text without the call
           marker, or calls that name an offered tool with arguments that follow its schema), exactly
           the constraint the server's tool_choice "auto" decodes with.

Counted, on the records whose reference is a call:
  attempted   the reply starts a call (the format's marker), valid or not
  valid       at least one call, and every call is complete, names an offered tool and has arguments that
              follow that tool's parameters schema (checked by the grammar engine: the arguments, their
              keys put in the schema's order, must match the schema's grammar)
  right tool  the calls name the reference's tools, in order
  right args  and every call's arguments equal the reference's as JSON values
and on the records whose reference is text: `no call` (the reply makes no call and never writes the call
marker: not even a call the reader cannot take).
`correct` = right args on call records + no call on text records, over all records.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass

from tqdm import tqdm

from gpt.data.chat_template import ChatTemplate
from gpt.data.corpus import DataError
from gpt.data.tool_calls import ToolFormat, read_calls, tool_grammar
from gpt.infer.constraints import text_matches
from gpt.infer.engine import Engine, context_length
from gpt.infer.sampling import Constraint, SamplingParams
from gpt.model import GPT

DECODINGS = ("free", "grammar")


@dataclass
class Case:
    """One record as a question: the prompt's messages, the offered tools and the reference reply."""

    prompt: list[dict]
    tools: list[dict]
    calls: list[tuple[str, dict]] | None  # the reference's (name, arguments); None: a reply without calls
    where: str


@dataclass
class ToolCallResult:
    decoding: str  # "free" or "grammar"
    records: int = 0
    call_records: int = 0  # records whose reference is a call
    attempted: int = 0
    valid: int = 0
    right_tool: int = 0
    right_args: int = 0
    text_records: int = 0  # records whose reference is text
    no_call: int = 0
    tokens: int = 0  # generated tokens

    def rate(self, name: str) -> float | None:
        total = self.text_records if name == "no_call" else self.call_records
        return getattr(self, name) / total if total else None

    @property
    def correct(self) -> float | None:
        return (self.right_args + self.no_call) / self.records if self.records else None

    def to_dict(self) -> dict:
        return {**asdict(self), "correct": self.correct}


def cases_of(conversations: list[list[dict]], where: list[str]) -> list[Case]:
    """Each record's prompt and reference; a record without tools or without an assistant turn is an error."""
    out = []
    for messages, at in zip(conversations, where):
        tools = getattr(messages, "tools", None)
        first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), None)
        if not tools or not first:
            what = "declares no tools" if not tools else "has no assistant turn after a prompt"
            raise DataError(f"{at}: {what}; --tool-calls needs chat records with tools (data/tools/prepare.py)")
        reply = messages[first]
        calls = [(c["function"]["name"], c["function"]["arguments"]) for c in reply.get("tool_calls") or []]
        out.append(Case(messages[:first], tools, calls or None, at))
    return out


def schema_order(value, schema):
    """`value` with the keys of each object put in its schema's `properties` order (the others after, as
    written), the order the grammar writes them in; arrays follow `items`."""
    if not isinstance(schema, dict):
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        keys = [k for k in props if k in value] + [k for k in value if k not in props]
        return {k: schema_order(value[k], props.get(k)) for k in keys}
    if isinstance(value, list):
        return [schema_order(v, schema.get("items")) for v in value]
    return value


def valid_call(name: str, arguments: str, tools: list[dict], template: ChatTemplate) -> bool:
    """The call names an offered tool and its arguments are a JSON object that follows the tool's schema."""
    fn = next((t["function"] for t in tools if t["function"]["name"] == name), None)
    try:
        args = json.loads(arguments)
    except json.JSONDecodeError:
        return False
    if fn is None or not isinstance(args, dict):
        return False
    schema = fn.get("parameters") or {"type": "object"}
    text = json.dumps(schema_order(args, schema), ensure_ascii=False, separators=(",", ":"))
    return text_matches(Constraint.json_schema(schema), text, template.tok)


def judge(result: ToolCallResult, case: Case, reply: str, fmt: ToolFormat, template: ChatTemplate) -> None:
    """Count one reply."""
    read = read_calls(reply, fmt)
    result.records += 1
    if case.calls is None:
        result.text_records += 1
        result.no_call += not read.calls and fmt.trigger not in reply
        return
    result.call_records += 1
    result.attempted += fmt.trigger in reply
    if not read.calls:
        return
    valid = all(c.complete and valid_call(c.name, c.arguments, case.tools, template) for c in read.calls)
    result.valid += valid
    if [c.name for c in read.calls] != [name for name, _ in case.calls]:
        return
    result.right_tool += 1
    result.right_args += valid and [json.loads(c.arguments) for c in read.calls] == [a for _, a in case.calls]


def replies(model: GPT, template: ChatTemplate, cases: list[Case], decoding: str, max_new_tokens: int,
            batch_size: int, progress: bool = False) -> tuple[list[str], int]:
    """Greedy replies to every case in one continuous batch (the engine of sample.py and the server), held to
    the tools' "auto" grammar under decoding "grammar"; and the tokens generated."""
    tok, fmt = template.tok, tool_format(template)
    context = context_length(model.config)
    engine, reqs = Engine(model, tok, max_batch=batch_size), []
    for case in cases:
        prompt = template.encode(case.prompt, add_generation_prompt=True, tools=case.tools)
        budget = max_new_tokens or min(_auto_budget(tok, fmt, case), context - len(prompt))
        if len(prompt) + budget > context or budget < 1:
            raise DataError(f"{case.where}: the prompt ({len(prompt)} tokens) and a reply of {budget} do not fit "
                            f"the model's context ({context}); use a base with a longer block_size")
        grammar = Constraint.grammar(tool_grammar(fmt, case.tools, "auto")) if decoding == "grammar" else None
        params = SamplingParams(temperature=0.0, max_tokens=budget, stop=tuple(template.stop_strings),
                                constraint=grammar)
        reqs.append(engine.add(prompt, params, stop_ids=template.end_ids))
    with tqdm(total=len(reqs), desc=f"tool calls ({decoding})", unit="reply", disable=None if progress else True,
              file=sys.stderr, leave=False) as bar:
        while engine.busy:
            engine.step()
            bar.update(sum(r.done for r in reqs) - bar.n)
    done = [r.completion(tok) for r in reqs]
    return [c.text for c in done], sum(len(c.token_ids) for c in done)


def _auto_budget(tok, fmt: ToolFormat, case: Case) -> int:
    """Twice the reference reply's tokens and 16 more (room for a call longer than the right one); the caller
    caps it at what the context leaves."""
    reference = fmt.write_all([{"function": {"name": n, "arguments": a}} for n, a in case.calls or []])
    return 2 * len(tok.encode(reference or "x" * 32)) + 16


def tool_format(template: ChatTemplate) -> ToolFormat:
    fmt = template.tool_format
    if fmt is None:
        raise DataError("this checkpoint's chat template has no tool calling (it renders no tool calls)")
    return fmt


def evaluate_tool_calls(model: GPT, tokenizer, conversations: list[list[dict]], *, where: list[str] | None = None,
                        decodings: tuple[str, ...] = DECODINGS, max_new_tokens: int = 0, batch_size: int = 32,
                        limit: int = 0, progress: bool = False) -> list[ToolCallResult]:
    """Tool-call accuracy of `model` on chat records with tools (Conversations, as read_data reads them), one
    result per decoding ("free", "grammar"); `limit` keeps the first records (0 = all)."""
    where = where or [f"record {i}" for i in range(1, len(conversations) + 1)]
    cases = cases_of(conversations, where)[:limit or None]
    template = ChatTemplate(tokenizer)
    fmt = tool_format(template)
    out = []
    for decoding in decodings:
        if decoding not in DECODINGS:
            raise ValueError(f"decoding must be one of {DECODINGS}, got {decoding!r}")
        texts, tokens = replies(model, template, cases, decoding, max_new_tokens, batch_size, progress)
        result = ToolCallResult(decoding, tokens=tokens)
        for case, text in zip(cases, texts):
            judge(result, case, text, fmt, template)
        out.append(result)
    return out


def format_tool_table(rows: list[tuple[str, ToolCallResult]]) -> str:
    """One line per (checkpoint, decoding): the rates in percent."""
    head = ["checkpoint", "decoding", "records", "attempted", "valid", "right tool", "right args", "no call",
            "correct"]
    pct = lambda v: "-" if v is None else f"{v:.1%}"  # noqa: E731
    lines = [head] + [[name, r.decoding, str(r.records), pct(r.rate("attempted")), pct(r.rate("valid")),
                       pct(r.rate("right_tool")), pct(r.rate("right_args")), pct(r.rate("no_call")), pct(r.correct)]
                      for name, r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths)))
                     for line in lines)
