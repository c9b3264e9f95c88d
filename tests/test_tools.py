"""Tool calling end to end: messages and records with tools (gpt/data/messages.py), their rendering and loss masks
(our template, Qwen's and Llama 3's Jinja templates), the call grammar and reader (gpt/data/tool_calls.py), and
the server's tools/tool_choice with the real `openai` client on random tiny models (valid calls come from the
grammar, not the model)."""

import json
import string

import httpx  # openai (0.7 s to import, in every worker that collects this file) only where a test uses it
import pytest
from conftest import Running, lively_model, sft_config, write_base, write_hf_tokenizer, write_jsonl
from shipped_templates import LLAMA31, QWEN25, SMOLLM2

from gpt.data.bpe import GPT2_PATTERN
from gpt.data.chat_template import END_TOKEN, ChatTemplate, hf_chat_template
from gpt.data.files import RecordError
from gpt.data.jinja_template import ChatTemplateError, compile_template
from gpt.data.record_formats import parse_record
from gpt.data.tokenizer import BPETokenizer, CharTokenizer, HFTokenizer
from gpt.data.tool_calls import HERMES, LLAMA3_JSON, CallReader, read_calls

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "days", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 8},
                          "days": {"type": "integer", "minimum": 1, "maximum": 7},
                          "unit": {"enum": ["c", "f"]}}}
SEARCH = {"type": "object", "additionalProperties": False, "required": ["query", "exact"],
          "properties": {"query": {"type": "string", "maxLength": 6}, "exact": {"type": "boolean"}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "search", "parameters": SEARCH}}]
SCHEMAS = {"get_weather": WEATHER, "search": SEARCH}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                         "arguments": '{"city": "Paris", "days": 2, "unit": "c"}'}}
HISTORY = [{"role": "user", "content": "Weather in Paris?"},
           {"role": "assistant", "content": None, "tool_calls": [CALL]},
           {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
           {"role": "assistant", "content": "It is sunny."}]


def valid(value, schema) -> bool:
    """`value` follows these small schemas (object, string maxLength, integer range, enum, boolean)."""
    if "enum" in schema:
        return value in schema["enum"]
    kind = schema["type"]
    if kind == "object":
        return (isinstance(value, dict) and set(value) == set(schema["required"])
                and all(valid(value[k], schema["properties"][k]) for k in value))
    if kind == "string":
        return isinstance(value, str) and len(value) <= schema.get("maxLength", len(value))
    if kind == "integer":
        return type(value) is int and schema["minimum"] <= value <= schema["maximum"]
    return type(value) is bool


@pytest.fixture(scope="module")
def srv():
    """A byte-level BPE with our chat markers under a random model: its calls are valid by the grammar alone."""
    tok = BPETokenizer([bytes([b]) for b in range(256)] + [b'{"', b'":', b'",', b'"}', b"true", b"name"], GPT2_PATTERN)
    ChatTemplate.add_tokens(tok)
    s = Running(lively_model(tok.vocab_size, block_size=1536), tok, max_batch=8, max_queue=32)
    yield s
    s.stop()


def post(srv, body):
    return httpx.post(srv.url + "/v1/chat/completions", json={"model": "tiny", "messages": MESSAGES, **body},
                      headers={"Content-Type": "application/json"})


# ---------------------------------------------------------------------------- the server


def test_required_gives_twenty_of_twenty_schema_valid_calls(srv):
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, n=20, seed=1, max_tokens=200)
    assert len(r.choices) == 20
    ids = []
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.content is None, c
        (call,) = c.message.tool_calls
        assert call.type == "function" and call.id.startswith("call_")
        assert valid(json.loads(call.function.arguments), SCHEMAS[call.function.name]), call
        ids.append(call.id)
    assert len(set(ids)) == 20


def test_a_named_tool_choice_calls_that_tool(srv):
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, n=6, seed=3, max_tokens=300,
                                           tool_choice={"type": "function", "function": {"name": "search"}})
    calls = [call for c in r.choices if c.finish_reason == "tool_calls" for call in c.message.tool_calls]
    assert calls and all(c.function.name == "search" and valid(json.loads(c.function.arguments), SEARCH)
                         for c in calls)
    assert all(c.finish_reason in ("tool_calls", "length") for c in r.choices)


def test_streamed_deltas_reassemble_to_the_non_streamed_calls(srv):
    args = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=300)
    whole = srv.client.chat.completions.create(**args).choices[0]
    calls: dict[int, dict] = {}
    finish = None
    for chunk in srv.client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.id is not None:  # a call's first delta: id, type and name, empty arguments
                    assert d.index not in calls and d.type == "function" and d.function.arguments == ""
                    calls[d.index] = {"name": d.function.name, "arguments": ""}
                else:
                    calls[d.index]["arguments"] += d.function.arguments
            finish = choice.finish_reason or finish
    assert whole.finish_reason == finish == "tool_calls"
    assert [calls[i] for i in sorted(calls)] == [{"name": c.function.name, "arguments": c.function.arguments}
                                                 for c in whole.message.tool_calls]


def test_auto_none_and_max_tokens_mid_call(srv):
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, n=8, seed=5, max_tokens=40)
    for c in r.choices:  # auto: text, or calls that parse
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and all(valid(json.loads(t.function.arguments),
                                                                 SCHEMAS[t.function.name]) for t in c.message.tool_calls)
        else:
            assert "<tool_call>" not in (c.message.content or "")
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", n=4,
                                           seed=5, max_tokens=8)
    assert all(c.message.tool_calls is None and c.finish_reason in ("stop", "length") for c in r.choices)
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                           max_tokens=6, seed=1)
    c = r.choices[0]  # cut inside the call: "length", and no broken call shown as one
    assert c.finish_reason == "length" and c.message.tool_calls is None


def test_a_history_with_calls_and_results_is_accepted(srv):
    r = srv.client.chat.completions.create(model="tiny", messages=HISTORY + [{"role": "user", "content": "And Rome?"}],
                                           tools=TOOLS, tool_choice="required", max_tokens=300, seed=2)
    assert r.choices[0].finish_reason in ("tool_calls", "length")


@pytest.mark.parametrize("body,param", [
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
    ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [MESSAGES[0], {"role": "assistant", "tool_calls": [{**CALL, "function": {
        "name": "get_weather", "arguments": "{not json"}}]}]}, "messages[1].tool_calls[0].function.arguments"),
    ({"tools": TOOLS, "messages": [MESSAGES[0], {"role": "assistant", "tool_calls": [{**CALL, "function": {
        "name": "other", "arguments": "{}"}}]}]}, "messages[1].tool_calls[0].function.name"),
    ({"messages": [MESSAGES[0], {"role": "tool", "tool_call_id": "x", "content": "r"}]}, "messages[1].role"),
    ({"functions": [{"name": "f"}]}, "functions"),
])
def test_bad_tools_and_tool_calls_are_400_naming_the_field(srv, body, param):
    r = post(srv, {"max_tokens": 1, **body})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    assert "\n" not in r.json()["error"]["message"]


# ---------------------------------------------------------------------------- templates and masks


def test_our_template_puts_loss_on_calls_and_answers_only():
    tok = CharTokenizer(sorted(set(string.printable)))
    ChatTemplate.add_tokens(tok)
    tpl = ChatTemplate(tok)
    segs = tpl.segments(parse_record({"messages": HISTORY, "tools": TOOLS}, "auto")[1])
    learned = "".join(tok.decode(s.ids) for s in segs if s.trainable)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "c"}}\n</tool_call>'
    assert learned == f"{call}{END_TOKEN}It is sunny.{END_TOKEN}"
    text = "".join(tok.decode(s.ids) for s in segs)
    assert text.startswith("<|system|>\n# Tools") and "<|tool|>\nsunny<|end|>" in text and '"search"' in text
    exported = compile_template(hf_chat_template()).render(messages=HISTORY, tools=TOOLS, add_generation_prompt=False)
    assert exported == text  # the Hugging Face export renders the same text
    old = CharTokenizer(sorted(set(string.printable)))  # a chat model from before <|tool|>
    old.add_special_tokens(["<|system|>", "<|user|>", "<|assistant|>", END_TOKEN])
    with pytest.raises(ChatTemplateError, match="no <\\|tool\\|> marker"):
        ChatTemplate(old).encode(HISTORY)


def hf_tok(tmp_path, template, specials, eos):
    corpus = " ".join(json.dumps(TOOLS) for _ in range(3)) + " Weather in Paris? It is sunny. <tool_call> tool"
    write_hf_tokenizer(tmp_path, corpus, specials, {"chat_template": template, "eos_token": eos})
    return HFTokenizer.from_folder(tmp_path)


@pytest.mark.parametrize("name", ["qwen", "llama"])
def test_jinja_templates_render_calls_and_mask_exactly_the_assistant_turns(tmp_path, name):
    if name == "qwen":
        tok = hf_tok(tmp_path, QWEN25, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>")
        call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2, "unit": "c"}}\n</tool_call>'
        end, fmt = "<|im_end|>", HERMES
    else:
        tok = hf_tok(tmp_path, LLAMA31, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                     "<|eot_id|>")
        call, end, fmt = '{"name": "get_weather", "parameters": {"city": "Paris", "days": 2, "unit": "c"}}', "<|eot_id|>", \
            LLAMA3_JSON
    tpl = ChatTemplate(tok)
    assert tpl.tool_format is fmt
    segs = tpl.segments(parse_record({"messages": HISTORY, "tools": TOOLS}, "auto")[1])
    learned = [tok.decode(s.ids) for s in segs if s.trainable]
    assert learned == [f"{call}{end}", f"It is sunny.{end}"]  # the calls and the answer, nothing else
    text = "".join(tok.decode(s.ids) for s in segs)
    assert "get_weather" in text.split(call)[0]  # the definitions come before
    assert "sunny" in text.split(call)[1]
    reader = read_calls(call, fmt)
    assert [(c.name, json.loads(c.arguments)) for c in reader.calls] == [("get_weather", json.loads(CALL["function"]["arguments"]))]


def test_a_template_without_tools_refuses_them(tmp_path):
    from gpt.serve.protocol import APIError, chat_job

    tok = hf_tok(tmp_path, SMOLLM2, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "<|im_end|>")
    assert ChatTemplate(tok).tool_format is None
    with pytest.raises(APIError) as e:
        chat_job({"model": "m", "messages": MESSAGES, "tools": TOOLS}, tok, 4096)
    assert e.value.param == "tools"
    with pytest.raises(APIError) as e:
        chat_job({"model": "m", "messages": HISTORY}, tok, 4096)
    assert e.value.param == "messages" and "no tool calling" in e.value.message


# ---------------------------------------------------------------------------- the reader


def test_a_stream_read_in_pieces_gives_the_calls_read_whole():
    text = HERMES.write("get_weather", {"city": "a}\n</tool_call>", "days": 1}) + "\n" + HERMES.write("search", {})
    whole = read_calls(text, HERMES)
    for size in (1, 3, 7):
        reader, args = CallReader(HERMES), {}
        for i in range(0, len(text), size):
            for d in reader.feed(text[i:i + size]):
                args[d.index] = args.get(d.index, "") + d.text if d.kind == "arguments" else ""
        for d in reader.finish():
            args[d.index] += d.text
        assert [c.arguments for c in whole.calls] == [args[0], args[1]] == [c.arguments for c in reader.calls]
    assert [(c.name, c.complete) for c in whole.calls] == [("get_weather", True), ("search", True)]
    cut = read_calls(text[:60], HERMES)  # cut inside the arguments: a call, not complete
    assert [(c.name, c.complete) for c in cut.calls] == [("get_weather", False)]
    assert read_calls(text[:40], HERMES).calls == []  # cut before the name is complete: no call at all


# ---------------------------------------------------------------------------- records


def test_records_with_tools_fine_tune_with_loss_on_calls_and_answers(tmp_path):
    from gpt.data.finetune_data import load_file
    from gpt.train.sft import finetune

    chars = sorted(set(string.printable))
    base = write_base(tmp_path / "base", chars=chars, block_size=512)
    row = {"messages": HISTORY, "tools": [TOOLS[0]]}
    data = write_jsonl(tmp_path / "tools.jsonl", [row, {**row, "tools": json.dumps(row["tools"])}])
    tok = CharTokenizer(chars)
    ChatTemplate.add_tokens(tok)
    loaded = load_file(str(data), "auto", ChatTemplate(tok), 1024, False)
    assert not loaded.invalid and len(loaded.records) == 2
    ex = loaded.records[0][0]
    assert tok.decode(ex.ids[ex.mask].tolist()).endswith("It is sunny.<|end|>")
    assert "sunny<|end|>" not in tok.decode(ex.ids[ex.mask].tolist())[:-len("It is sunny.<|end|>")]
    result = finetune(sft_config(tmp_path, base, data, **{"train.max_iters": 3, "train.eval_interval": 3,
                                                          "train.batch_size": 2}))
    assert result.step == 3


@pytest.mark.parametrize("row,error", [
    ({"messages": HISTORY, "tools": [{"type": "function", "function": {"name": "x y"}}]}, "tools[0].function.name"),
    ({"messages": HISTORY, "tools": [TOOLS[1]]}, "message 2: tool call 1 names 'get_weather', which is not among"),
    ({"messages": HISTORY, "functions": [{"name": "f"}]}, "'functions' (OpenAI's legacy"),
    ({"messages": [HISTORY[0], {**HISTORY[1], "function_call": {"name": "f"}}]}, "message 2: 'function_call'"),
    ({"messages": [HISTORY[0], HISTORY[1], {**HISTORY[2], "tool_call_id": "other"}, HISTORY[3]]},
     "message 3: tool_call_id 'other' is not the id"),
])
def test_bad_tool_records_are_one_line_errors(row, error):
    with pytest.raises(RecordError) as e:
        parse_record(row, "auto")
    assert error in str(e.value) and "\n" not in str(e.value)


def test_openai_client_rejects_nothing_we_accept(srv):
    """The 400 for an undeclared named tool reaches the client as openai's BadRequestError naming the param."""
    import openai
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, max_tokens=1,
                                           tool_choice={"type": "function", "function": {"name": "nope"}})
    assert e.value.param == "tool_choice"
