"""The Responses API (gpt/serve/responses.py): the real `openai` client's `responses.create` against an in-process
server of a random tiny model; its replies must equal the chat endpoint's for the same conversation."""

import json
from typing import Literal

import httpx  # openai (0.7 s to import, in every worker that collects this file) only where a test uses it
import pytest
from conftest import Running, lively_model
from pydantic import BaseModel, Field

from gpt.data.bpe import GPT2_PATTERN
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import BPETokenizer, CharTokenizer
from gpt.serve.responses import Responses, chat_request, output_items

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "color"],
          "properties": {"name": {"type": "string", "maxLength": 6}, "color": {"enum": ["red", "green"]}}}
TOOL = {"type": "function", "name": "get_weather", "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


class Person(BaseModel):
    name: str = Field(max_length=6)
    color: Literal["red", "green"]


@pytest.fixture(scope="module")
def srv():
    """A byte-level BPE with the chat template's tokens under a random model: any JSON can be written."""
    tok = BPETokenizer([bytes([b]) for b in range(256)] + [b'{"', b'":', b'",', b'"}', b"name"], GPT2_PATTERN)
    ChatTemplate.add_tokens(tok)
    s = Running(lively_model(tok.vocab_size, block_size=96), tok, max_batch=4, max_queue=8)
    yield s
    s.stop()


def post(srv, body):
    return httpx.post(srv.url + "/v1/responses", json={"model": "tiny", **body})


def test_text_and_item_inputs_answer_as_chat_does(srv):
    chat = srv.client.chat.completions.create(model="tiny", temperature=0, max_tokens=12, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"}])
    r = srv.client.responses.create(model="tiny", instructions="Be brief.", input="Who are you?", temperature=0,
                                    max_output_tokens=12)
    assert r.id.startswith("resp_") and r.object == "response" and r.model == "tiny"
    assert r.output_text == chat.choices[0].message.content and r.output[0].role == "assistant"
    assert r.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens and r.store is False
    history = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
               {"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "and you?"}]
    chat = srv.client.chat.completions.create(model="tiny", messages=history, temperature=0, max_tokens=10)
    items = [{"role": "user", "content": [{"type": "input_text", "text": "hi"}]},
             {"type": "message", "role": "assistant", "id": "msg_1", "status": "completed",
              "content": [{"type": "output_text", "text": "hello", "annotations": []}]},
             {"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "and you?"}]
    r = srv.client.responses.create(model="tiny", input=items, temperature=0, max_output_tokens=10,
                                    store=False, include=[])
    assert r.output_text == chat.choices[0].message.content
    cut = srv.client.responses.create(model="tiny", input="Who are you?", temperature=0, max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 2 and cut.output[0].status == "incomplete"


def test_text_format_json_schema_is_valid_by_construction(srv):
    fmt = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
    for temperature in (0.7, 1.0):
        r = srv.client.responses.create(model="tiny", input="Who?", text={"format": fmt}, temperature=temperature)
        obj = json.loads(r.output_text)
        assert r.status == "completed" and set(obj) == {"name", "color"} and obj["color"] in ("red", "green")
    parsed = srv.client.responses.parse(model="tiny", input="Who?", text_format=Person)
    assert isinstance(parsed.output_parsed, Person)
    r = srv.client.responses.create(model="tiny", input="Who?", text={"format": fmt}, max_output_tokens=3)
    assert r.status == "incomplete" and r.output_text.startswith('{"')  # cut off mid-object: not "completed"
    r = srv.client.responses.create(model="tiny", input="Who?", text={"format": {"type": "json_object"}},
                                    temperature=0)
    assert r.output_text.startswith("{") and r.status == "incomplete"  # a random model rambles in a string


def test_stream_is_openais_event_sequence_and_adds_up_to_the_reply(srv):
    kw = dict(model="tiny", input="Tell me", temperature=0, max_output_tokens=10)
    whole = srv.client.responses.create(**kw)
    events = list(srv.client.responses.create(stream=True, **kw))
    kinds = [e.type for e in events]
    deltas = [e for e in events if e.type == "response.output_text.delta"]
    end = "response.incomplete" if whole.status == "incomplete" else "response.completed"
    assert kinds == ["response.created", "response.in_progress", "response.output_item.added",
                     "response.content_part.added", *["response.output_text.delta"] * len(deltas),
                     "response.output_text.done", "response.content_part.done", "response.output_item.done", end]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert "".join(d.delta for d in deltas) == events[-4].text == whole.output_text
    assert events[-2].item.content[0].text == whole.output_text
    final = events[-1].response
    assert final.output_text == whole.output_text and final.usage.output_tokens == whole.usage.output_tokens
    assert events[0].response.status == "in_progress" and final.id == events[0].response.id
    fmt = {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
    text = "".join(e.delta for e in srv.client.responses.create(model="tiny", input="Who?", stream=True,
                                                                text={"format": fmt})
                   if e.type == "response.output_text.delta")
    assert set(json.loads(text)) == {"name", "color"}


@pytest.mark.parametrize("body,param", [
    ({"previous_response_id": "resp_1"}, "previous_response_id"), ({"store": True}, "store"),
    ({"background": True}, "background"), ({"conversation": "conv_1"}, "conversation"),
    ({"include": ["message.output_text.logprobs"]}, "include"), ({"reasoning": {"effort": "low"}}, "reasoning"),
    ({"seed": 1}, "seed"), ({"frobnicate": 1}, "frobnicate"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"), ({"tools": [{"type": "file_search"}]}, "tools[0].type"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0].type"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "input[0].content[0].type"),
    ({"input": [{"role": "user", "content": "a"}, {"role": "wizard", "content": "b"}]}, "input[1].role"),
    ({"input": []}, "input"), ({"input": 5}, "input"), ({"instructions": 5}, "instructions"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     "text.format"), ({"text": {"format": {"type": "yaml"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "has space", "schema": SCHEMA}}}, "text.format"),
    ({"text": {"verbosity": "low"}}, "text.verbosity"), ({"max_output_tokens": 10_000}, "max_output_tokens"),
    ({"max_output_tokens": 0}, "max_output_tokens"), ({"temperature": 3}, "temperature"), ({"top_p": 0}, "top_p"),
    ({"metadata": {"a": 1}}, "metadata"), ({"input": "x" * 200}, "input"),
])
def test_what_this_server_cannot_do_is_400_naming_the_param(srv, body, param):
    import openai
    r = post(srv, {"input": "hi", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"], err
    assert "response_format" not in err["message"] and "messages" not in err["message"]
    if param in ("previous_response_id", "store"):
        assert "store: false" in err["message"]
    client_knows = not {"seed", "frobnicate"} & set(body)  # what the client has no argument for goes in extra_body
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.responses.create(model="tiny", **({"input": "hi", **body} if client_knows else
                                                     {"input": "hi", "extra_body": body}))
    assert e.value.param == param


def test_no_model_is_openais_400(srv):
    r = httpx.post(srv.url + "/v1/responses", json={"input": "hi"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_requests_translate_onto_chats_tools_and_replies_back_into_function_calls():
    """The translation both ways, tools included (their decoding is the chat path's; see the test below)."""
    chat, _ = chat_request({"model": "m", "instructions": "sys", "tools": [TOOL], "tool_choice":
                            {"type": "function", "name": "get_weather"}, "parallel_tool_calls": False, "input": [
        {"role": "user", "content": "Weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city":"Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sunny"}]})
    assert chat == {"model": "m", "parallel_tool_calls": False, "messages": [
        {"role": "system", "content": "sys"}, {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}],
        "tools": [{"type": "function", "function": {k: v for k, v in TOOL.items() if k != "type"}}],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    calls = [{"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
             {"id": "call_b", "type": "function", "function": {"name": "g", "arguments": '{"x":1}'}}]
    items = output_items({"role": "assistant", "content": None, "tool_calls": calls}, True)
    assert [(i["type"], i["call_id"], i["name"], i["arguments"]) for i in items] == \
        [("function_call", "call_a", "f", "{}"), ("function_call", "call_b", "g", '{"x":1}')]
    assert [i["type"] for i in output_items({"content": "Let me look.", "tool_calls": calls[:1]}, True)] == \
        ["message", "function_call"]


class FakeChat:
    """Stands for the chat shape: hands out the given chat chunks' deltas (as OpenAI streams tool calls)."""

    def __init__(self, deltas):
        self.deltas = iter(deltas)

    def chunks(self, i, e):
        return [{"choices": [{"index": 0, "delta": next(self.deltas)}]}]

    def finish_chunks(self, i, seq, reply):
        return [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}]


def test_streamed_tool_call_deltas_become_function_call_events():
    deltas = [{"content": "Looking."},
              {"tool_calls": [{"index": 0, "id": "call_a", "type": "function",
                               "function": {"name": "get_weather", "arguments": ""}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}]
    shape = Responses(FakeChat(deltas), {})
    events = [ev for _ in deltas for chunk in shape.chunks(0, None) for ev in chunk]
    events += [ev for chunk in shape.finish_chunks(0, None, None) for ev in chunk]
    assert [e["type"].removeprefix("response.") for e in events] == [
        "output_item.added", "content_part.added", "output_text.delta", "output_text.done", "content_part.done",
        "output_item.done", "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
        "function_call_arguments.done", "output_item.done"]
    assert events[-2]["arguments"] == '{"city":"Paris"}' and events[-2]["output_index"] == 1
    assert events[-1]["item"] == {**events[-1]["item"], "type": "function_call", "call_id": "call_a",
                                  "name": "get_weather", "arguments": '{"city":"Paris"}', "status": "completed"}
    assert [i["type"] for i in shape.output] == ["message", "function_call"]


def test_function_tools_answer_with_calls_and_stream_them_as_returned():
    """tool_choice="required": a function_call item whose arguments fit the tool's schema; the streamed
    function_call_arguments deltas add up to it; a history with a call and its output is accepted."""
    tool = {**TOOL, "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4}},
                                   "required": ["city"], "additionalProperties": False}}
    tok = BPETokenizer([bytes([b]) for b in range(256)] + [b'{"', b'":'], GPT2_PATTERN)
    ChatTemplate.add_tokens(tok)
    s = Running(lively_model(tok.vocab_size, block_size=1024), tok)
    try:
        body = {"model": "tiny", "input": "Weather?", "tools": [tool], "tool_choice": "required",
                "parallel_tool_calls": False, "temperature": 0, "max_output_tokens": 120}
        r = httpx.post(s.url + "/v1/responses", json=body).json()
        assert r["status"] == "completed", r
        (call,) = [i for i in r["output"] if i["type"] == "function_call"]
        assert call["name"] == "get_weather" and set(json.loads(call["arguments"])) == {"city"}
        assert len(json.loads(call["arguments"])["city"]) <= 4
        events = []
        with httpx.stream("POST", s.url + "/v1/responses", json={**body, "stream": True}) as resp:
            events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ")]
        deltas = "".join(e["delta"] for e in events if e["type"] == "response.function_call_arguments.delta")
        (done,) = [e for e in events if e["type"] == "response.function_call_arguments.done"]
        assert deltas == done["arguments"] == call["arguments"] and done["name"] == "get_weather"
        assert events[-1]["type"] == "response.completed"
        history = [{"role": "user", "content": "Weather?"},
                   {"type": "function_call", "call_id": "c1", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
                   {"type": "function_call_output", "call_id": "c1", "output": "sunny"}]
        r = httpx.post(s.url + "/v1/responses", json={"model": "tiny", "input": history, "tools": [tool],
                                                      "tool_choice": "none", "max_output_tokens": 5})
        assert r.status_code == 200 and r.json()["output"][0]["type"] == "message", r.text
    finally:
        s.stop()


def test_a_format_the_vocabulary_cannot_finish_is_incomplete_with_its_reason():
    """A character vocabulary without `q`: the schema's second key cannot be written (no 500, not "completed")."""
    tok = CharTokenizer(list('{}":,ab0123456789 \n'))
    ChatTemplate.add_tokens(tok)
    schema = {"type": "object", "additionalProperties": False, "required": ["a", "q"],
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                             "q": {"type": "integer", "minimum": 0, "maximum": 9}}}
    s = Running(lively_model(tok.vocab_size, block_size=64), tok)
    try:
        r = s.client.responses.create(model="tiny", input="ab", text={"format": {"type": "json_schema", "name": "aq",
                                                                                  "schema": schema}})
        assert r.status == "incomplete" and r.incomplete_details.reason == "response_format_unreachable"
        assert r.output_text.startswith('{"a":') and "q" not in r.output_text
    finally:
        s.stop()
