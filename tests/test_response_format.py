"""response_format on the server (gpt/serve/protocol.py): the real `openai` client against in-process servers
of random tiny models, so a valid reply comes from the constraint alone."""

import json
from typing import Literal

import httpx  # openai (0.7 s to import, in every worker that collects this file) only where a test uses it
import pytest
from conftest import Running, lively_model
from pydantic import BaseModel, Field

from gpt.data.bpe import GPT2_PATTERN
from gpt.data.tokenizer import BPETokenizer, CharTokenizer

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "color"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "color": {"enum": ["red", "green"]}}}
MESSAGES = [{"role": "user", "content": "Who are you?"}]


class Person(BaseModel):
    name: str = Field(max_length=6)
    age: int = Field(ge=0, le=120)
    ok: bool
    color: Literal["red", "green"]


@pytest.fixture(scope="module")
def srv():
    """A byte-level BPE (every byte + a few JSON-ish merges, then <|endoftext|>) under a random model."""
    tok = BPETokenizer([bytes([b]) for b in range(256)] + [b'{"', b'":', b'",', b'"}', b"true", b"name"], GPT2_PATTERN)
    s = Running(lively_model(tok.vocab_size, block_size=128), tok, max_batch=8, max_queue=16)
    yield s
    s.stop()


def post(srv, path, body):
    return httpx.post(srv.url + path, json=body, headers={"Content-Type": "application/json"})


def test_parse_with_a_pydantic_model_twenty_of_twenty(srv):
    r = srv.client.chat.completions.parse(model="tiny", messages=MESSAGES, response_format=Person, n=20, seed=1)
    assert len(r.choices) == 20
    for c in r.choices:
        assert c.finish_reason == "stop" and isinstance(c.message.parsed, Person), c


def test_json_object_parses_and_max_tokens_mid_object_is_length(srv):
    """A random model rambles inside strings: a bias towards `"` closes them (no schema bounds them here)."""
    r = srv.client.chat.completions.create(model="tiny", messages=MESSAGES, response_format={"type": "json_object"},
                                           n=8, seed=2, max_tokens=60, logit_bias={"34": 6})
    ended = [c for c in r.choices if c.finish_reason == "stop"]
    assert ended and all(c.finish_reason in ("stop", "length") for c in r.choices)
    assert all(isinstance(json.loads(c.message.content), dict) for c in ended)
    r = srv.client.completions.create(model="tiny", prompt="x", max_tokens=1, seed=0,  # 3 tokens could be "{}" + end
                                      extra_body={"response_format": {"type": "json_object"}})
    c = r.choices[0]
    assert c.finish_reason == "length" and c.text.startswith("{")
    assert srv.client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4, seed=0,
                                              response_format={"type": "text"}).choices[0].finish_reason


def test_streamed_json_schema_reassembles_to_valid_json(srv):
    rf = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    text, reasons = "", []
    for chunk in srv.client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=rf, stream=True,
                                                    seed=3):
        for c in chunk.choices:
            text += c.delta.content or ""
            reasons += [c.finish_reason] if c.finish_reason else []
    obj = json.loads(text)
    assert reasons == ["stop"] and set(obj) == set(SCHEMA["required"]) and obj["color"] in ("red", "green")


@pytest.mark.parametrize("rf", [
    {"type": "json_schema", "json_schema": {"name": "u", "schema": {"type": "array", "uniqueItems": True}}},
    {"type": "json_schema", "json_schema": {"name": "p", "schema": {"type": "string", "pattern": "(("}}},
    {"type": "json_schema", "json_schema": {"name": "open", "strict": True,
                                            "schema": {"type": "object", "properties": {"a": {"type": "string"}}}}},
    {"type": "json_schema", "json_schema": {"name": "opt", "strict": True, "schema": {
        "type": "object", "additionalProperties": False, "properties": {"a": {"type": "string"}}}}},
    {"type": "json_schema", "json_schema": {"name": "has space", "schema": SCHEMA}},
    {"type": "json_schema", "json_schema": {"schema": SCHEMA}}, {"type": "json_schema"}, {"type": "yaml"}, {},
    "json", [], {"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA, "strict": "yes"}},
])
def test_a_schema_llguidance_or_strict_mode_refuses_is_400_naming_response_format(srv, rf):
    import openai
    for path, body in [("/v1/chat/completions", {"messages": MESSAGES}), ("/v1/completions", {"prompt": "x"})]:
        r = post(srv, path, {"model": "tiny", "response_format": rf, **body})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format" and err["type"] == "invalid_request_error" and err["message"]
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="tiny", messages=MESSAGES, response_format=rf)
    assert e.value.param == "response_format"


@pytest.mark.parametrize("field,value", [("functions", [{"name": "f"}]), ("function_call", "auto"),
                                         ("unknown_field", 1), ("best_of", 2)])
def test_legacy_functions_and_unknown_fields_are_400_naming_them(srv, field, value):
    r = post(srv, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, field: value})
    assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    assert ("not supported yet" if field in ("functions", "function_call") else "Unrecognized") in r.text
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "x", "unknown": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "unknown"
    assert post(srv, "/v1/chat/completions", {"model": "tiny", "messages": MESSAGES, "max_tokens": 1, "tools": None,
                                              "user": "u"}).status_code == 200  # null is absent; user is ignored


def test_a_format_the_vocabulary_cannot_finish_is_cut_off_as_length_with_an_error():
    """A character vocabulary with `{"a:` and digits but no `q`: the row is stuck after `{"a":D,"` (no 500)."""
    tok = CharTokenizer(list('{}":,ab0123456789 '))
    schema = {"type": "object", "additionalProperties": False, "required": ["a", "q"],
              "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                             "q": {"type": "integer", "minimum": 0, "maximum": 9}}}
    rf = {"type": "json_schema", "json_schema": {"name": "aq", "schema": schema}}
    s = Running(lively_model(tok.vocab_size, block_size=64), tok)
    try:
        r = s.client.completions.create(model="tiny", prompt="ab", max_tokens=30, seed=1,
                                        extra_body={"response_format": rf})
        c = r.choices[0]
        assert c.finish_reason == "length" and c.text.startswith('{"a":') and "q" not in c.text
        assert c.error["param"] == "response_format" and c.error["code"] == "response_format_unreachable"
        chunks = list(s.client.completions.create(model="tiny", prompt="ab", max_tokens=30, stream=True, seed=1,
                                                  extra_body={"response_format": rf}))  # the same seed: the same text
        assert "".join(ch.choices[0].text for ch in chunks) == c.text
        assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].error["param"] == "response_format"
        r = post(s, "/v1/completions", {"model": "tiny", "prompt": "ab", "response_format": {"type": "json_schema",
                 "json_schema": {"name": "b", "schema": {"type": "string", "enum": ["[x]"]}}}})
        assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"  # cannot even begin
    finally:
        s.stop()
