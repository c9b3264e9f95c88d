"""OpenAI's request fields checked and turned into the engine's terms; OpenAI's error shape.

Every value a client can send is checked here, with OpenAI's ranges, and a bad one becomes an
`APIError` (400 and the offending `param`), never an exception further down. A field the endpoint
does not know is refused as the hosted API refuses it ("Unrecognized request argument supplied"),
and OpenAI's legacy `functions`/`function_call` are refused by name, never accepted and ignored. vLLM's
sampling extensions (`top_k`, `min_p`, `repetition_penalty`) are fields of both endpoints; vLLM's /tokenize
and /detokenize read their bodies here too (`tokenize_ids`, `detokenize_ids`). The Responses API is a
translation onto `chat_job` (gpt/serve/responses.py).

`tools`, `tool_choice` and `parallel_tool_calls` (chat): the tools are checked by gpt/data/messages.py's rules
(the ones fine-tuning records follow) and shown to the model through its chat template; the reply is held
to the Lark grammar of gpt/data/tool_calls.py in the model's call format (Hermes `<tool_call>` for ours and
Qwen, Llama 3's JSON): "required" or a named function = one call (several with parallel_tool_calls), "auto"
= text or calls, "none" = the tools are shown but the reply is text and is not read for calls. A template
that renders no calls is a 400 naming `tools`. `tool_use` and `build_chat_job` are the parts another
endpoint (the Responses API) reuses.

`response_format` (OpenAI's structured outputs) becomes the engine's constraint
(gpt/infer/constraints.py): {"type": "text"} none, {"type": "json_object"} any JSON object,
{"type": "json_schema", "json_schema": {"name", "schema", "strict"}} that schema, compiled here so a
schema the grammar library refuses is a 400 naming `response_format`; `strict: true` also holds the
schema to OpenAI's strict rules (an object at the root; every object lists all its properties in
`required` and sets `additionalProperties: false`).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

from gpt.data.chat_template import ChatTemplate
from gpt.data.files import RecordError
from gpt.data.messages import MessageError, ToolsError, read_messages, read_tools
from gpt.data.tokenizer import Tokenizer
from gpt.data.tool_calls import ToolFormat, tool_grammar
from gpt.errors import UserError
from gpt.infer.constraints import ConstraintError, compiled_matcher
from gpt.infer.sampling import Constraint, SamplingParams

MAX_STOPS = 4
MAX_N = 64  # n and best_of
MAX_LOGPROBS = 20
COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "n", "stop", "frequency_penalty",
                           "presence_penalty", "seed", "logit_bias", "logprobs", "stream", "stream_options",
                           "response_format", "ignore_eos", "user",  # user: accepted and ignored
                           "top_k", "min_p", "repetition_penalty"})  # vLLM's sampling extensions
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "best_of", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls"}
NOT_YET = ("functions", "function_call", "suffix")  # OpenAI's, not ours
SCHEMA_NAME = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # OpenAI's rule for json_schema.name
RF = "response_format"


class APIError(Exception):
    """An error answered as {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}  # e.g. 429's Retry-After

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


@dataclass
class Job:
    """One API request in the engine's terms: prompts x best_of sequences, of which n are returned."""

    prompts: list[list[int]]
    params: SamplingParams
    n: int = 1
    best_of: int = 1
    stream: bool = False
    include_usage: bool = False
    echo: bool = False
    logprobs: int | None = None  # None: not asked for; K: the chosen token and the K most likely
    stop_ids: list[int] = field(default_factory=list)  # tokens that end a sequence (none under ignore_eos)
    hidden_ids: list[int] = field(default_factory=list)  # tokens whose text is never shown (the end tokens)
    tools: "ToolUse | None" = None  # a chat request's tools (None: none sent)

    @property
    def reads_calls(self) -> bool:
        """The replies are read for tool calls (tools were sent and tool_choice is not "none")."""
        return self.tools is not None and self.tools.choice != "none"


@dataclass
class ToolUse:
    """A chat request's tools: the definitions, how its model writes calls, tool_choice ("none", "auto",
    "required" or "function" with `name`) and parallel_tool_calls."""

    tools: list[dict]
    format: ToolFormat
    choice: str = "auto"
    name: str | None = None
    parallel: bool = True

    def constraint(self) -> Constraint | None:
        """The grammar every reply follows (None under "none": the reply is text, not read for calls)."""
        if self.choice == "none":
            return None
        mode = "auto" if self.choice == "auto" else "required"
        return Constraint.grammar(tool_grammar(self.format, self.tools, mode, self.parallel, self.name))


# ---------------------------------------------------------------------------- field readers


def _number(body: dict, name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        raise bad(name, f"{name} must be a number, got {v!r}")  # an int is finite (10**400 too: no float of it)
    if v < lo or v > hi or (lo_open and v == lo):
        upper = f" and <= {hi:g}" if math.isfinite(hi) else ""
        raise bad(name, f"{name} must be {'>' if lo_open else '>='} {lo:g}{upper}, got {v}")
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int | None = None) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(name, f"{name} must be an integer, got {v!r}")
    if v < lo or (hi is not None and v > hi):
        raise bad(name, f"{name} must be >= {lo}" + (f" and <= {hi}" if hi is not None else "") + f", got {v}")
    return v


def _bool(body: dict, name: str, default: bool = False) -> bool:
    v = body.get(name)
    if v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"{name} must be true or false, got {v!r}")
    return v


def _stops(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise bad("stop", "stop must be a string or a list of strings")
    if len(stops) > MAX_STOPS:
        raise bad("stop", f"stop takes at most {MAX_STOPS} sequences, got {len(stops)}")
    return tuple(s for s in stops if s)


def _logit_bias(body: dict, vocab_size: int) -> dict[int, float]:
    v = body.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise bad("logit_bias", "logit_bias must be an object mapping token ids to numbers from -100 to 100")
    out = {}
    for key, value in v.items():
        try:
            token = int(key)
        except (TypeError, ValueError):
            raise bad("logit_bias", f"logit_bias key {key!r} is not a token id") from None
        if not 0 <= token < vocab_size:
            raise bad("logit_bias", f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})")
        out[token] = _number({"logit_bias": value}, "logit_bias", 0.0, -100.0, 100.0)
    return out


def _sampling(body: dict, tokenizer: Tokenizer, max_tokens: int, logprobs: int | None) -> SamplingParams:
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad("seed", f"seed must be an integer, got {seed!r}")
    return SamplingParams(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        top_k=max(_int(body, "top_k", 0, -1), 0) or None,  # vLLM's: -1 or 0 = no limit
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.0, math.inf, lo_open=True),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        logit_bias=_logit_bias(body, tokenizer.vocab_size),
        max_tokens=max_tokens,
        stop=_stops(body),
        seed=None if seed is None else seed % 2**63,
        logprobs=logprobs or 0,
    )


def _fits(prompt: list[int], max_tokens: int, block_size: int, param: str) -> None:
    if len(prompt) + max_tokens > block_size:
        raise bad(param, f"This model's maximum context length is {block_size} tokens, however you requested "
                         f"{len(prompt) + max_tokens} tokens ({len(prompt)} in your prompt; {max_tokens} for the "
                         "completion). Please reduce your prompt or completion length.", "context_length_exceeded")


def _n_best_of(body: dict, stream: bool) -> tuple[int, int]:
    n = _int(body, "n", 1, 1, MAX_N)
    best_of = _int(body, "best_of", n, 1, MAX_N)
    if best_of < n:
        raise bad("best_of", f"best_of ({best_of}) must be >= n ({n})")
    if stream and best_of > n:
        raise bad("best_of", "best_of cannot be used with stream (the best candidates are known only at the end)")
    return n, best_of


def _include_usage(body: dict, stream: bool) -> bool:
    opts = body.get("stream_options")
    if opts is None:
        return False
    if not isinstance(opts, dict):
        raise bad("stream_options", "stream_options must be an object")
    if not stream:
        raise bad("stream_options", "stream_options is only allowed with stream: true")
    return _bool(opts, "include_usage")


def _end_ids(body: dict, tokenizer: Tokenizer) -> dict[str, list[int]]:
    """The model's end-of-turn and end-of-text tokens: they end a reply (unless `ignore_eos`, vLLM's extension,
    asks to generate past them) and their text is never shown. The Job fields stop_ids and hidden_ids."""
    ends = ChatTemplate(tokenizer).end_ids
    return {"stop_ids": [] if _bool(body, "ignore_eos") else ends, "hidden_ids": ends}


def _known_fields(body: dict, known: frozenset[str]) -> None:
    """Refuse a field the endpoint does not take: OpenAI's 400 naming it (tools by name, until they land)."""
    for name, value in body.items():
        if name in NOT_YET:
            if value is not None:
                raise bad(name, f"{name} is not supported yet by this server")
        elif name not in known:
            raise bad(name, f"Unrecognized request argument supplied: {name}")


def _response_format(body: dict, tokenizer: Tokenizer) -> Constraint | None:
    """response_format as the engine's constraint, compiled for this tokenizer (the engine reuses it)."""
    v = body.get(RF)
    if v is None:
        return None
    if not isinstance(v, dict) or not isinstance(v.get("type"), str):
        raise bad(RF, "response_format must be an object with a type: 'text', 'json_object' or 'json_schema'")
    kind, name = v["type"], None
    if kind == "text":
        return None
    if kind == "json_object":
        constraint = Constraint.json_object()
    elif kind == "json_schema":
        name, constraint = _json_schema(v.get("json_schema"))
    else:
        raise bad(RF, f"response_format.type must be 'text', 'json_object' or 'json_schema', got {kind!r}")
    try:
        compiled_matcher(constraint, tokenizer)
    except ConstraintError as e:
        raise bad(RF, f"Invalid schema for response_format{'' if name is None else f' {name!r}'}: {e}") from None
    return constraint


def _json_schema(v) -> tuple[str, Constraint]:
    """OpenAI's json_schema object: name (required), description, schema (absent: any JSON object), strict."""
    if not isinstance(v, dict):
        raise bad(RF, "response_format.json_schema must be an object with a name and a schema")
    name, schema, strict = v.get("name"), v.get("schema"), v.get("strict")
    if not isinstance(name, str) or not SCHEMA_NAME.fullmatch(name):
        raise bad(RF, "response_format.json_schema.name must be 1-64 letters, digits, '_' or '-', "
                      f"got {name!r}")
    if strict is not None and not isinstance(strict, bool):
        raise bad(RF, f"response_format.json_schema.strict must be true or false, got {strict!r}")
    if schema is None:
        return name, Constraint.json_object()
    if not isinstance(schema, dict):
        raise bad(RF, f"Invalid schema for response_format {name!r}: the schema must be a JSON object")
    if strict:
        problem = _strict_problem(schema)
        if problem is not None:
            raise bad(RF, f"Invalid schema for response_format {name!r}: {problem}")
    return name, Constraint.json_schema(schema)


def _strict_problem(schema: dict) -> str | None:
    """What breaks OpenAI's strict rules in the schema (an object root; closed objects whose properties are
    all required), or None. Iterative, over every subschema of properties, items, anyOf and $defs."""
    if schema.get("type") != "object":
        return "In strict mode the root of the schema must be an object ('type': 'object')"
    stack: list[tuple[tuple, object]] = [((), schema)]
    while stack:
        where, node = stack.pop()
        if not isinstance(node, dict):
            continue
        if node.get("type") == "object" or "properties" in node:
            props = node.get("properties") or {}
            if node.get("additionalProperties") is not False:
                return f"In context={where}, 'additionalProperties' is required to be supplied and to be false"
            missing = [k for k in props if k not in (node.get("required") or [])]
            if missing:
                return f"In context={where}, 'required' is required to include every property; missing {missing[0]!r}"
        for key in ("properties", "$defs", "definitions"):
            if isinstance(node.get(key), dict):
                stack += [((*where, key, k), sub) for k, sub in node[key].items()]
        for key in ("anyOf", "prefixItems"):
            if isinstance(node.get(key), list):
                stack += [((*where, key, str(i)), sub) for i, sub in enumerate(node[key])]
        stack.append(((*where, "items"), node.get("items")))
    return None


def tool_use(body: dict, template: ChatTemplate) -> ToolUse | None:
    """tools, tool_choice and parallel_tool_calls checked (400s naming them); None when no tools are sent."""
    try:
        tools = read_tools(body.get("tools"))
    except ToolsError as e:
        raise bad(e.param, f"Invalid value for {e.param}: {e.why}") from None
    choice = body.get("tool_choice")
    if tools is None:
        for name in ("tool_choice", "parallel_tool_calls"):
            if body.get(name) is not None and body.get(name) != "none":
                raise bad(name, f"{name} is only allowed when 'tools' are specified")
        return None
    fmt = template.tool_format
    if fmt is None:
        raise bad("tools", "this model's chat template has no tool calling (it renders no tool calls): "
                           "send the request without tools")
    use = ToolUse(tools, fmt, parallel=_bool(body, "parallel_tool_calls", True))
    if isinstance(choice, str) and choice in ("none", "auto", "required"):
        use.choice = choice
    elif isinstance(choice, dict) and choice.get("type") == "function" and isinstance(choice.get("function"), dict):
        use.choice, use.name = "function", choice["function"].get("name")
        declared = [t["function"]["name"] for t in tools]
        if use.name not in declared:
            raise bad("tool_choice", f"tool_choice names the function {use.name!r}, which is not among the "
                                     f"declared tools ({', '.join(declared)})")
    elif choice is not None:
        raise bad("tool_choice", "tool_choice must be 'none', 'auto', 'required' or "
                                 "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    return use


def _tool_constraint(use: ToolUse | None, tokenizer: Tokenizer) -> Constraint | None:
    """The tools' grammar compiled for this tokenizer: a schema the grammar library refuses is a 400 naming tools."""
    constraint = None if use is None else use.constraint()
    if constraint is not None:
        try:
            compiled_matcher(constraint, tokenizer)
        except ConstraintError as e:
            raise bad("tools", f"Invalid tools for this model: {e}") from None
    return constraint


# ---------------------------------------------------------------------------- the two endpoints


def completion_job(body: dict, tokenizer: Tokenizer, block_size: int) -> Job:
    """POST /v1/completions: prompt (string, strings, token ids or lists of ids) and OpenAI's legacy fields."""
    _known_fields(body, COMPLETION_FIELDS)
    prompts = _prompts(body.get("prompt"), tokenizer)
    stream = _bool(body, "stream")
    max_tokens = _int(body, "max_tokens", 16, 0)
    logprobs = _int(body, "logprobs", None, 0, MAX_LOGPROBS)
    for p in prompts:
        _fits(p, max_tokens, block_size, "max_tokens")
    n, best_of = _n_best_of(body, stream)
    params = _sampling(body, tokenizer, max_tokens, logprobs)
    params.constraint = _response_format(body, tokenizer)
    return Job(prompts, params, n, best_of, stream, _include_usage(body, stream), _bool(body, "echo"), logprobs,
               **_end_ids(body, tokenizer))


def chat_job(body: dict, tokenizer: Tokenizer, block_size: int) -> Job:
    """POST /v1/chat/completions: messages (and tools) rendered with the checkpoint's chat template."""
    _known_fields(body, CHAT_FIELDS)
    template = ChatTemplate(tokenizer)
    tools = tool_use(body, template)
    messages = _messages(body.get("messages"), tools.tools if tools else None)
    return build_chat_job(body, template, block_size, messages, tools)


def build_chat_job(body: dict, template: ChatTemplate, block_size: int, messages: list[dict],
                   tools: ToolUse | None) -> Job:
    """A chat job from checked messages and tools (tool_use) and the body's sampling fields: the prompt rendered
    by the chat template, held to response_format or to the tools' grammar."""
    tokenizer = template.tok
    try:
        prompt = template.encode(messages, add_generation_prompt=True, tools=tools.tools if tools else None)
    except (UserError, ValueError) as e:  # text the tokenizer cannot encode (a character model's unknown character)
        raise bad("messages", str(e)) from None
    stream = _bool(body, "stream")
    param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _int(body, param, None, 1)
    if max_tokens is None:
        max_tokens = block_size - len(prompt)  # OpenAI: as much as the context allows
        if max_tokens < 1:
            _fits(prompt, 1, block_size, "messages")
    _fits(prompt, max_tokens, block_size, param)
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _int(body, "top_logprobs", 0, 0, MAX_LOGPROBS)
    elif body.get("top_logprobs") is not None:
        raise bad("top_logprobs", "top_logprobs requires logprobs: true")
    n, best_of = _n_best_of({"n": body.get("n")}, stream)
    params = _sampling(body, tokenizer, max_tokens, logprobs)
    params.stop = tuple(template.stop_strings) + params.stop
    params.constraint = _response_format(body, tokenizer)
    calls = _tool_constraint(tools, tokenizer)
    if calls is not None and params.constraint is not None:
        raise bad(RF, "response_format cannot be combined with tools unless tool_choice is 'none'")
    params.constraint = params.constraint or calls
    return Job([prompt], params, n, best_of, stream, _include_usage(body, stream), False, logprobs,
               **_end_ids(body, tokenizer), tools=tools)


def tokenize_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    """vLLM's /tokenize: the prompt tokens of a completion's {"prompt"} (one) or a chat's {"messages"} (with its
    generation prompt), exactly as those endpoints would count them."""
    if "messages" in body:
        return chat_job({**body, "max_tokens": 1, "stream": False}, tokenizer, 1 << 30).prompts[0]
    _known_fields(body, frozenset({"model", "prompt"}))
    prompts = _prompts(body.get("prompt"), tokenizer)
    if len(prompts) != 1:
        raise bad("prompt", f"/tokenize takes one prompt, got {len(prompts)}")
    return prompts[0]


def detokenize_ids(body: dict, tokenizer: Tokenizer) -> list[int]:
    """vLLM's /detokenize: {"tokens": [ids]}, each in the vocabulary."""
    _known_fields(body, frozenset({"model", "tokens"}))
    ids = body.get("tokens")
    if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise bad("tokens", "tokens must be a list of token ids")
    if any(not 0 <= t < tokenizer.vocab_size for t in ids):
        raise bad("tokens", f"token ids must be in 0..{tokenizer.vocab_size - 1}")
    return ids


def _prompts(v, tokenizer: Tokenizer) -> list[list[int]]:
    if v is None:
        raise bad("prompt", "prompt is required")
    if isinstance(v, str):
        items = [v]
    elif isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        items = [v]  # one prompt as token ids
    elif isinstance(v, list) and v:
        items = v
    else:
        raise bad("prompt", "prompt must be a string, a list of strings, or token ids")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = _encode(tokenizer, item, "prompt")
        elif isinstance(item, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in item):
            if any(not 0 <= t < tokenizer.vocab_size for t in item):
                raise bad("prompt", f"prompt token ids must be in 0..{tokenizer.vocab_size - 1}")
            ids = list(item)
        else:
            raise bad("prompt", "prompt must be a string, a list of strings, or token ids")
        if not ids:
            if tokenizer.eot_id is None:
                raise bad("prompt", "the prompt is empty")
            ids = [tokenizer.eot_id]  # an unconditional sample, as sample.py does
        out.append(ids)
    return out


def _encode(tokenizer: Tokenizer, text: str, param: str) -> list[int]:
    try:
        return tokenizer.encode(text)
    except (UserError, ValueError) as e:  # a character model's unknown character
        raise bad(param, str(e)) from None


def _messages(v, tools: list[dict] | None = None) -> list[dict]:
    """The request's messages by the rules fine-tuning records follow (gpt/data/messages.py); earlier
    assistant turns are context, so they may be empty; their calls name the request's tools."""
    try:
        return read_messages(v, "messages", empty_replies=True, tools=tools)
    except MessageError as e:
        raise bad(f"messages[{e.index}].{e.field}", f"messages[{e.index}]: {e.why}") from None
    except RecordError as e:  # not a non-empty list
        raise bad("messages", str(e)) from None
