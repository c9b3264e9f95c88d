"""The server checks who is asking (gpt/serve/access.py; docs/security.md) and no request can make it fail.

A web page must not reach the model through the visitor's browser: a Host the server does not answer to
(DNS rebinding) and another page's Origin get 403, a POST not declared JSON (a cross-site form or
text/plain post) gets 415, unless --allowed-hosts / --cors-origins say otherwise; every response carries
the page's security headers. A non-streaming request whose client goes away frees its row at once. And
a fuzz of every field of both endpoints: each answer is a 2xx or a 4xx in OpenAI's error shape, never a 500.
Most tests run the app in-process (Starlette's TestClient); the disconnect needs a real socket (uvicorn).
"""

import json
import logging
import re
import socket
import time

import httpx
import pytest
from conftest import SERVE_BLOCK, SERVE_CHARS, Running, lively_model
from starlette.testclient import TestClient

from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer
from gpt.serve.app import ServerConfig, create_app
from gpt.serve.serve_cli import exposure_warning

JSON = {"Content-Type": "application/json"}
COMPLETION = {"model": "tiny", "prompt": "hi", "max_tokens": 2}
CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture(scope="module")
def tok():
    t = CharTokenizer(SERVE_CHARS)
    ChatTemplate.add_tokens(t)
    return t


@pytest.fixture(scope="module")
def model(tok):
    return lively_model(tok.vocab_size, block_size=SERVE_BLOCK)


def client(model, tok, **cfg) -> TestClient:
    """The app in-process, called as http://127.0.0.1:8000 (`with` it to run the engine thread too)."""
    return TestClient(create_app(model, tok, ServerConfig("tiny", **cfg)), base_url="http://127.0.0.1:8000",
                      raise_server_exceptions=False)


@pytest.fixture(scope="module")
def running(model, tok):
    with client(model, tok) as c:
        yield c


def refused(r, status: int, code: str) -> bool:
    return r.status_code == status and r.json()["error"]["code"] == code and r.json()["error"]["message"]


def test_only_the_servers_own_hosts_are_answered(model, tok, running):
    for host in ("127.0.0.1:8000", "localhost:8000", "LOCALHOST.", "[::1]:8000", "127.0.0.1"):
        assert running.get("/health", headers={"Host": host}).status_code == 200, host
        assert running.post("/v1/completions", json=COMPLETION, headers={"Host": host}).status_code == 200, host
    for host in ("attacker.example", "attacker.example:8000", "localhost.attacker.example", "127.0.0.1.nip.io"):
        for r in (running.get("/", headers={"Host": host}), running.get("/v1/models", headers={"Host": host}),
                  running.post("/v1/completions", json=COMPLETION, headers={"Host": host})):
            assert refused(r, 403, "host_not_allowed"), (host, r.text)
            assert r.json()["error"]["type"] == "permission_error" and r.json()["error"]["param"] is None
    # bound to every address: this machine's other names only when listed; '*' answers to any
    anywhere = client(model, tok, host="0.0.0.0")
    assert anywhere.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert refused(anywhere.get("/health", headers={"Host": "gpu-box:8000"}), 403, "host_not_allowed")
    listed = client(model, tok, host="0.0.0.0", allowed_hosts=("gpu-box", "10.0.0.7"))
    assert listed.get("/health", headers={"Host": "GPU-box:8000"}).status_code == 200
    assert listed.get("/health", headers={"Host": "10.0.0.7"}).status_code == 200
    assert client(model, tok, host="0.0.0.0", allowed_hosts=("*",)).get(
        "/health", headers={"Host": "anything.example"}).status_code == 200
    assert client(model, tok, host="10.0.0.7").get("/health", headers={"Host": "10.0.0.7:8000"}).status_code == 200
    assert client(model, tok, host="::1").get("/health", headers={"Host": "[::1]:8000"}).status_code == 200


def test_other_pages_and_non_json_posts_never_run(running):
    same = running.post("/v1/completions", json=COMPLETION, headers={"Origin": "http://127.0.0.1:8000"})
    assert same.status_code == 200 and "access-control-allow-origin" not in same.headers  # the playground
    for origin in ("http://attacker.example", "null", "http://127.0.0.1:9999", "http://localhost:8000"):
        r = running.post("/v1/completions", json=COMPLETION, headers={"Origin": origin})
        assert refused(r, 403, "origin_not_allowed"), origin
        assert "access-control-allow-origin" not in r.headers
        pre = running.options("/v1/completions", headers={"Origin": origin, "Access-Control-Request-Method": "POST"})
        assert refused(pre, 403, "origin_not_allowed")
    # a simple cross-site post (no preflight): refused for its Origin, and for its body type without one
    text = json.dumps(COMPLETION)
    for kind in (None, "text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                 "application/jsonp"):
        r = running.post("/v1/completions", content=text, headers={"Content-Type": kind} if kind else {})
        assert refused(r, 415, "unsupported_media_type"), kind
    assert refused(running.post("/v1/chat/completions", content=json.dumps(CHAT),
                                headers={"Content-Type": "text/plain", "Origin": "http://attacker.example"}),
                   403, "origin_not_allowed")
    ok = running.post("/v1/completions", content=text, headers={"Content-Type": "Application/JSON; charset=utf-8"})
    assert ok.status_code == 200


def test_cors_origins_let_a_listed_page_call_the_api(model, tok):
    page = "https://app.example"
    with client(model, tok, cors_origins=(page,), api_key="k") as c:
        asks = {"Origin": page, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type"}
        pre = c.options("/v1/chat/completions", headers=asks)
        assert pre.status_code == 204 and pre.headers["access-control-allow-origin"] == page  # no key needed
        assert "POST" in pre.headers["access-control-allow-methods"]
        assert {"authorization", "content-type"} <= set(pre.headers["access-control-allow-headers"].lower().split(", "))
        r = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": page, "Authorization": "Bearer k"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == page
        assert r.headers["vary"] == "Origin"
        denied = c.post("/v1/chat/completions", json=CHAT, headers={"Origin": page})
        assert refused(denied, 401, "invalid_api_key") and denied.headers["access-control-allow-origin"] == page
        assert refused(c.post("/v1/chat/completions", json=CHAT, headers={"Origin": "https://other.example",
                                                                        "Authorization": "Bearer k"}),
                       403, "origin_not_allowed")
    anyone = client(model, tok, cors_origins=("*",))
    r = anyone.get("/v1/models", headers={"Origin": "https://other.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://other.example"


def test_every_response_carries_the_security_headers_and_the_page_has_no_inline_code(running):
    for path in ("/", "/static/playground.js", "/static/playground.css", "/health", "/v1/models", "/v1/nothing"):
        h = running.get(path).headers
        csp = h["content-security-policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe" not in csp, path
        assert h["x-frame-options"] == "DENY" and h["x-content-type-options"] == "nosniff", path
        assert h["referrer-policy"] == "no-referrer", path
    page = running.get("/").text
    assert re.findall(r"<script\b[^>]*>(.*?)</script>", page, re.S) == [""]  # one script, a file
    assert '<script src="/static/playground.js">' in page
    assert not re.search(r"\son[a-z]+\s*=", page) and "style=" not in page and "<style" not in page
    assert "javascript:" not in page


def test_a_lone_surrogate_is_a_400_and_a_pair_is_text(running):
    r = running.post("/v1/completions", content=b'{"model": "\\ud800", "prompt": "hi"}', headers=JSON)
    assert r.status_code == 400 and "surrogate" in r.json()["error"]["message"]
    pair = running.post("/v1/completions", content=b'{"model": "tiny", "prompt": "\\ud83d\\ude00"}', headers=JSON)
    assert pair.status_code == 400 and pair.json()["error"]["param"] == "prompt"  # parsed: not in this vocabulary


def test_a_client_that_goes_away_frees_its_row_at_once(model, tok):
    small = Running(model, tok, max_batch=1, max_queue=0)
    engine = small.server.config.app.state.server.worker.engine
    step = engine.step

    def slow_step():  # 94 tokens take about 2 s
        time.sleep(0.02)
        step()

    engine.step = slow_step
    try:
        port = int(small.url.rsplit(":", 1)[1])
        body = json.dumps({"model": "tiny", "prompt": "a", "max_tokens": SERVE_BLOCK - 2, "ignore_eos": True}).encode()
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            for _ in range(500):
                if engine.busy:
                    break
                time.sleep(0.01)
            assert engine.busy
            time.sleep(0.1)  # generating, not streaming: nothing comes back until the end
        gone = time.monotonic()  # the client went away
        while (r := httpx.post(small.url + "/v1/completions", json={**COMPLETION, "max_tokens": 1})).status_code == 429:
            assert time.monotonic() - gone < 5
            time.sleep(0.01)
        assert r.status_code == 200 and time.monotonic() - gone < 1.0  # the abandoned generation needed ~1.8 s more
    finally:
        small.stop()


def test_binding_beyond_loopback_without_a_key_warns():
    for host in ("127.0.0.1", "localhost", "::1", "[::1]", "127.0.0.2"):
        assert exposure_warning(host, None) is None, host
    for host in ("0.0.0.0", "::", "192.168.1.5", "gpu-box"):
        assert "without --api-key" in exposure_warning(host, None), host
        assert exposure_warning(host, "k") is None


# ---------------------------------------------------------------------------- never a 500

DEEP: list = []
for _ in range(60):
    DEEP = [DEEP]
# wrong types, huge and non-finite numbers, a lone surrogate (json.dumps writes "\ud800"), nesting
VALUES = [True, -1, 10**400, 1e308, float("nan"), "\ud800", [], DEEP, {"a": None}]


def fuzzed(base: dict, path: tuple) -> list[dict]:
    """Copies of `base` with the field at `path` (keys and list indices) set to each of VALUES."""
    out = []
    for v in VALUES:
        body = json.loads(json.dumps(base))
        target = body
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = v
        out.append(body)
    return out


COMPLETION_FIELDS = ["model", "prompt", "max_tokens", "temperature", "top_p", "n", "best_of", "logprobs", "echo",
                     "stop", "frequency_penalty", "presence_penalty", "seed", "logit_bias", "stream",
                     "stream_options", "ignore_eos", "user", "suffix"]
CHAT_FIELDS = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "n", "stop",
               "frequency_penalty", "presence_penalty", "seed", "logit_bias", "logprobs", "top_logprobs", "stream",
               "stream_options", "ignore_eos"]
CASES = (
    [("/v1/completions", b) for f in COMPLETION_FIELDS for b in fuzzed(COMPLETION, (f,))]
    + [("/v1/completions", b) for p in [("prompt", 0), ("stop", 0), ("logit_bias", "5"),
                                        ("stream_options", "include_usage")]
       for b in fuzzed({**COMPLETION, "prompt": ["hi"], "stop": ["x"], "logit_bias": {"5": 1}, "stream": True,
                        "stream_options": {"include_usage": True}}, p)]
    + [("/v1/chat/completions", b) for f in CHAT_FIELDS for b in fuzzed(CHAT, (f,))]
    + [("/v1/chat/completions", b) for f in ("role", "content", "name", "weight")
       for b in fuzzed(CHAT, ("messages", 0, f))]
    + [("/tokenize", b) for f in ("model", "prompt", "messages") for b in fuzzed({"prompt": "hi"}, (f,))]
)
RAW = [b"", b"null", b"[]", b"5", b'"\\ud800"', b"{", b"\xff\xfe{}", b'{"model": "tiny", "prompt": "\xc3"}',
       b'{"model": "tiny", "prompt": "hi", "model": 5}', b'{"\\udc00": 1, "model": "tiny", "prompt": "hi"}']


def test_no_request_yields_a_500(running, caplog):
    requests = [(path, json.dumps(body).encode()) for path, body in CASES]
    requests += [(path, raw) for path in ("/v1/completions", "/v1/chat/completions", "/tokenize") for raw in RAW]
    assert 300 < len(requests) < 600
    caplog.set_level(logging.ERROR)
    for path, raw in requests:
        r = running.post(path, content=raw, headers=JSON)
        assert r.status_code < 500, (path, raw[:200], r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}, (path, raw[:200], r.text)
        else:
            assert r.headers["content-type"].startswith(("application/json", "text/event-stream")), (path, raw[:200])
    assert not caplog.records, [rec.getMessage() for rec in caplog.records]  # no traceback was logged
