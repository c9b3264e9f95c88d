"""The OpenAI-compatible server, driven by the real `openai` client against in-process uvicorn on loopback."""

import copy
import dataclasses
import json
import math
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx  # openai (0.7 s to import, in every worker that collects this file) only where a test uses it
import pytest
import torch
from conftest import ROOT, SERVE_BLOCK, SERVE_CHARS, Running, lively_model, python_command, run_in_process

from gpt.checkpoint import save_checkpoint
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer
from gpt.infer.engine import complete
from gpt.infer.quantize import quantize_int8
from gpt.infer.sampling import SamplingParams

CHARS, BLOCK = SERVE_CHARS, SERVE_BLOCK


@pytest.fixture(scope="module")
def tok():
    t = CharTokenizer(CHARS)
    ChatTemplate.add_tokens(t)
    return t


@pytest.fixture(scope="module")
def model(tok):
    return lively_model(tok.vocab_size + 3, block_size=BLOCK)  # padded past the tokenizer: padding ids are never served


@pytest.fixture(scope="module")
def srv(model, tok):
    s = Running(model, tok, max_batch=4, max_queue=16)
    yield s
    s.stop()


def greedy(model, tok, prompt, n=20, **kw):
    """What the server's completion returns: it ends at the end-of-turn token too (a chat tokenizer)."""
    ends = ChatTemplate(tok).stop_ids + ([tok.eot_id] if tok.eot_id is not None else [])
    return complete(model, tok, prompt, SamplingParams(temperature=0, max_tokens=n, **kw), stop_ids=ends)[0]


def test_models_and_health(srv):
    assert [m.id for m in srv.client.models.list().data] == ["tiny"]
    card = httpx.get(srv.url + "/v1/models").json()["data"][0]
    assert card["max_model_len"] == card["context_length"] == BLOCK  # vLLM's name, and ours
    assert httpx.get(srv.url + "/health").json()["status"] == "ok"


def test_greedy_and_logprobs_equal_sample_py(srv, model, tok, tmp_path, capsys):
    save_checkpoint(tmp_path / "best", model.state_dict(), {"model": dataclasses.asdict(model.config)}, tok)
    proc = run_in_process(capsys, "sample.py", "--ckpt", tmp_path, "--prompt", "Hello there", "--temperature", 0,
                          "--max-new-tokens", 24, "--logprobs", 3, "--json", "--dtype", "float32")
    assert proc.returncode == 0, proc.stderr
    ref = json.loads(proc.stdout)
    r = srv.client.completions.create(model="tiny", prompt="Hello there", temperature=0, max_tokens=24, logprobs=3)
    c = r.choices[0]
    assert c.text == ref["text"] and c.finish_reason == "length"
    assert r.usage.prompt_tokens == 11 and r.usage.completion_tokens == 24
    assert c.logprobs.tokens == [e["token"] for e in ref["logprobs"]]
    assert c.logprobs.token_logprobs == pytest.approx([e["logprob"] for e in ref["logprobs"]], abs=1e-5)
    assert [list(t) for t in c.logprobs.top_logprobs] == [[a["token"] for a in e["top"]] for e in ref["logprobs"]]
    assert c.logprobs.text_offset[0] == len("Hello there")


def test_concurrent_requests_each_equal_alone(srv, model, tok):
    prompts = ["a", "Hello there, how are you", "xyz", "The quick brown fox jumps over", "Q", "ok ok ok"]
    kws = [dict(temperature=0), dict(temperature=0.9, seed=5), dict(temperature=0), dict(temperature=1.0, seed=7),
           dict(temperature=0.5, seed=1, top_p=0.9), dict(temperature=0)]
    lengths = [30, 12, 25, 8, 20, 16]

    def call(i):
        return srv.client.completions.create(model="tiny", prompt=prompts[i], max_tokens=lengths[i], **kws[i])

    alone = [call(i).choices[0].text for i in range(len(prompts))]
    with ThreadPoolExecutor(len(prompts)) as pool:
        together = [r.choices[0].text for r in pool.map(call, range(len(prompts)))]
    assert together == alone
    assert alone[0] == greedy(model, tok, "a", 30).text


def test_streaming_equals_non_streaming(srv):
    kw = dict(model="tiny", prompt="Once upon", temperature=0.8, seed=3, max_tokens=20)
    full = srv.client.completions.create(**kw).choices[0].text
    chunks = list(srv.client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == full
    assert chunks[-1].usage.completion_tokens == 20
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    chat = srv.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=15)
    parts = list(srv.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=15,
                                                     stream=True))
    assert parts[0].choices[0].delta.role == "assistant"
    assert "".join(p.choices[0].delta.content or "" for p in parts) == chat.choices[0].message.content
    assert chat.object == "chat.completion" and chat.choices[0].finish_reason in ("stop", "length")


def test_chat_uses_the_template_and_ends_at_the_end_of_turn(srv, model, tok):
    end = tok.special_id("<|end|>")
    with torch.no_grad():
        saved = model.lm_head.weight[end].clone()
        model.lm_head.weight[end] *= 40  # the model ends its turn at once
    try:
        r = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                               temperature=0, max_completion_tokens=30, logprobs=True, top_logprobs=2)
    finally:
        with torch.no_grad():
            model.lm_head.weight[end] = saved
    c = r.choices[0]
    assert c.finish_reason == "stop" and "<|end|>" not in c.message.content and len(c.message.content) < 30
    assert len(c.logprobs.content) == r.usage.completion_tokens - 1  # the end token is not reported
    assert all(len(e.top_logprobs) == 2 for e in c.logprobs.content)


class EndsTurnAtOnce:
    """The model writes its end-of-turn token first, whatever the prompt (its lm_head row scaled up)."""

    def __init__(self, model, tok):
        self.model, self.end = model, tok.special_id("<|end|>")

    def __enter__(self):
        with torch.no_grad():
            self.saved = self.model.lm_head.weight[self.end].clone()
            self.model.lm_head.weight[self.end] *= 40

    def __exit__(self, *exc):
        with torch.no_grad():
            self.model.lm_head.weight[self.end] = self.saved


def test_completions_stop_at_the_end_of_turn_unless_ignore_eos(srv, model, tok):
    kw = dict(model="tiny", prompt="Hello", temperature=0, max_tokens=12)
    with EndsTurnAtOnce(model, tok):
        r = srv.client.completions.create(logprobs=1, **kw)
        streamed = list(srv.client.completions.create(stream=True, **kw))
        ignored = srv.client.completions.create(extra_body={"ignore_eos": True}, logprobs=1, **kw)
        chat = srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}],
                                                  temperature=0, max_tokens=12, extra_body={"ignore_eos": True})
    c = r.choices[0]
    assert c.finish_reason == "stop" and c.text == "" and r.usage.completion_tokens == 1
    assert c.logprobs.tokens == ["<|end|>"]  # reported, as vLLM does (lm-eval's echo scoring counts on it)
    assert "".join(p.choices[0].text for p in streamed) == ""
    assert streamed[-1].choices[0].finish_reason == "stop"
    # ignore_eos (vLLM's extension): past the end token to max_tokens, whose text is never shown
    c = ignored.choices[0]
    assert c.finish_reason == "length" and ignored.usage.completion_tokens == 12
    assert "<|end|>" not in c.text and c.logprobs.tokens.count("<|end|>") >= 1
    assert all(o <= len("Hello") + len(c.text) for o in c.logprobs.text_offset)  # hidden tokens add no text
    assert chat.choices[0].finish_reason == "length" and chat.usage.completion_tokens == 12
    assert "<|end|>" not in chat.choices[0].message.content


def test_n_and_best_of_returns_the_best_by_mean_logprob(srv):
    kw = dict(model="tiny", prompt="ab", temperature=1.0, seed=11, max_tokens=10,
              extra_body={"ignore_eos": True})  # every candidate 10 reported tokens: the means compare like for like
    four = srv.client.completions.create(n=4, logprobs=0, **kw).choices
    means = [sum(c.logprobs.token_logprobs) / len(c.logprobs.token_logprobs) for c in four]
    best = [four[i].text for i in sorted(range(4), key=lambda i: means[i], reverse=True)[:2]]
    got = srv.client.completions.create(n=2, best_of=4, **kw).choices
    assert [c.text for c in got] == best and [c.index for c in got] == [0, 1]
    assert len({c.text for c in four}) == 4


def test_stop_across_token_boundaries_penalties_echo_and_bias(srv, model, tok):
    free = greedy(model, tok, "Hello", 30).text
    stop = free[8:12]
    r = srv.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=30, stop=[stop, "QQQ"])
    assert r.choices[0].text == free[: free.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].text for c in srv.client.completions.create(
        model="tiny", prompt="Hello", temperature=0, max_tokens=30, stop=stop, stream=True))
    assert streamed == r.choices[0].text  # the stop sequence is never streamed
    pen = srv.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=30,
                                        presence_penalty=2.0, frequency_penalty=1.0).choices[0].text
    assert pen == greedy(model, tok, "Hello", 30, presence_penalty=2.0, frequency_penalty=1.0).text != free
    echo = srv.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=5, echo=True,
                                         logprobs=1).choices[0]
    assert echo.text == "Hello" + greedy(model, tok, "Hello", 5).text
    assert echo.logprobs.token_logprobs[0] is None and len(echo.logprobs.tokens) == 10
    banned = greedy(model, tok, "Hello", 1).token_ids[0]
    biased = srv.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=5,
                                           logit_bias={str(banned): -100}).choices[0].text
    assert not biased.startswith(tok.decode([banned]))


def test_vllm_sampling_extensions_decode_as_the_engine_does(srv, model, tok):
    """top_k, min_p and repetition_penalty reach SamplingParams: the server returns what complete() returns."""
    kw = dict(model="tiny", prompt="Hello", max_tokens=20)
    free = greedy(model, tok, "Hello", 20).text

    def text(**extra):
        return srv.client.completions.create(**kw, extra_body=extra).choices[0].text

    assert text(temperature=1.5, seed=3, top_k=1) == free  # one candidate: the most likely token
    assert text(temperature=1.0, seed=3, min_p=1.0) == free  # only tokens as likely as the top one
    ends = ChatTemplate(tok).end_ids
    for extra in (dict(top_k=3), dict(min_p=0.3), dict(top_k=5, min_p=0.3, top_p=0.9)):
        ref = complete(model, tok, "Hello", SamplingParams(temperature=1.0, seed=5, max_tokens=20, **extra),
                       stop_ids=ends)
        assert text(temperature=1.0, seed=5, **extra) == ref[0].text, extra
    off = text(temperature=1.0, seed=5)
    assert text(temperature=1.0, seed=5, top_k=-1) == text(temperature=1.0, seed=5, top_k=0) == off
    rep = text(temperature=0, repetition_penalty=1.8)
    assert rep == greedy(model, tok, "Hello", 20, repetition_penalty=1.8).text != free
    msgs = [{"role": "user", "content": "hi"}]
    chat = [srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=10, **k)
            for k in (dict(temperature=0), dict(temperature=1.2, seed=1, extra_body={"top_k": 1}))]
    chat = [c.choices[0].message.content for c in chat]
    assert chat[0] == chat[1]


def test_chat_streams_usage_under_max_completion_tokens_with_seed_and_logit_bias(srv, model, tok):
    msgs = [{"role": "user", "content": "tell me"}]
    kw = dict(model="tiny", messages=msgs, max_completion_tokens=6, seed=8, temperature=1.0)
    full = srv.client.chat.completions.create(**kw)
    chunks = list(srv.client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens <= 6
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    def first_token(r):
        return next(i for i in range(tok.vocab_size) if tok.decode([i]) == r.choices[0].logprobs.content[0].token)

    first = first_token(srv.client.chat.completions.create(**kw, logprobs=True))
    biased = srv.client.chat.completions.create(**kw, logprobs=True, logit_bias={str(first): -100})
    assert first_token(biased) != first  # the same seed, the first token banned
    no_usage = list(srv.client.chat.completions.create(stream=True, **kw))
    assert all(c.usage is None for c in no_usage)


def test_tokenize_and_detokenize_have_vllms_shapes(srv, tok):
    r = post(srv, "/tokenize", {"model": "tiny", "prompt": "Hello"}).json()
    assert r == {"tokens": tok.encode("Hello"), "count": 5, "max_model_len": BLOCK}
    msgs = [{"role": "user", "content": "hi there"}]
    chat = post(srv, "/tokenize", {"model": "tiny", "messages": msgs}).json()
    used = srv.client.chat.completions.create(model="tiny", messages=msgs, max_tokens=1).usage.prompt_tokens
    assert chat["count"] == len(chat["tokens"]) == used
    assert post(srv, "/detokenize", {"model": "tiny", "tokens": r["tokens"]}).json() == {"prompt": "Hello"}
    assert post(srv, "/detokenize", {"tokens": chat["tokens"]}).json()["prompt"] == tok.decode(chat["tokens"])
    for path, body, param in [("/detokenize", {"tokens": [tok.vocab_size]}, "tokens"),
                              ("/detokenize", {"tokens": "Hello"}, "tokens"), ("/detokenize", {}, "tokens"),
                              ("/detokenize", {"tokens": [1], "skip_special_tokens": True}, "skip_special_tokens"),
                              ("/tokenize", {"prompt": "a", "add_special_tokens": False}, "add_special_tokens"),
                              ("/tokenize", {"prompt": ["a", "b"]}, "prompt"),
                              ("/tokenize", {"messages": msgs, "chat_template": "x"}, "chat_template")]:
        e = post(srv, path, body)
        assert e.status_code == 400 and e.json()["error"]["param"] == param, (path, body, e.text)
    assert post(srv, "/detokenize", {"model": "other", "tokens": [1]}).status_code == 404


def post(srv, path, body, **kw):
    """A raw POST, declared JSON as clients send it (the server refuses any other Content-Type: 415)."""
    return httpx.post(srv.url + path, content=body if isinstance(body, bytes) else json.dumps(body),
                      headers={"Content-Type": "application/json"}, **kw)


@pytest.mark.parametrize("body,param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"n": 0}, "n"),
    ({"n": 3, "best_of": 2}, "best_of"), ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": BLOCK}, "max_tokens"), ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"logit_bias": {"999": 1}}, "logit_bias"), ({"temperature": "hot"}, "temperature"),
    ({"prompt": 5}, "prompt"), ({"prompt": "no ~ in this vocabulary"}, "prompt"), ({"logprobs": 99}, "logprobs"), ({"seed": 1.5}, "seed"),
    ({"ignore_eos": "yes"}, "ignore_eos"), ({"top_k": -2}, "top_k"), ({"top_k": 2.5}, "top_k"),
    ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"model": None}, "model"), ({"model": 5}, "model"),
])
def test_bad_parameters_are_400_with_the_param(srv, body, param):
    r = post(srv, "/v1/completions", {"model": "tiny", "prompt": "hi", **body})  # unknown fields: test_response_format.py
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    if param == "max_tokens":
        assert err["code"] == "context_length_exceeded"


@pytest.mark.parametrize("path,body", [("/v1/completions", {"prompt": "hi"}),
                                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})])
def test_a_request_without_model_is_openais_400(srv, path, body):
    r = post(srv, path, body)
    assert r.status_code == 400
    assert r.json() == {"error": {"message": "you must provide a model parameter", "type": "invalid_request_error",
                                  "param": "model", "code": None}}
    r = post(srv, path, {**body, "model": ["tiny"]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"


def test_error_statuses(srv, model, tok):
    import openai
    with pytest.raises(openai.NotFoundError):
        srv.client.completions.create(model="other", prompt="hi")
    with pytest.raises(openai.BadRequestError) as e:
        srv.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x" * BLOCK}])
    assert e.value.code == "context_length_exceeded"
    assert post(srv, "/v1/completions", b"{not json").status_code == 400
    assert post(srv, "/v1/completions", b"[" * 100_000).status_code == 400
    assert post(srv, "/v1/completions", b"x" * (2 << 20)).status_code == 413
    wizard = post(srv, "/v1/chat/completions", {"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]})
    assert wizard.status_code == 400 and wizard.json()["error"]["param"] == "messages[0].role"
    other = post(srv, "/v1/chat/completions", {"model": "other", "messages": [{"role": "user", "content": "x"}]})
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    missing = httpx.get(srv.url + "/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    keyed = Running(model, tok, api_key="s3cret")
    try:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=keyed.url + "/v1", api_key="wrong", max_retries=0).models.list()
        for path in ("/tokenize", "/detokenize"):  # vLLM's token routes take the key too
            assert httpx.post(keyed.url + path, json={"prompt": "a", "tokens": [1]}).status_code == 401
        assert keyed.client.completions.create(model="tiny", prompt="a", max_tokens=2).choices[0].text
    finally:
        keyed.stop()


def test_full_queue_is_429_and_a_disconnect_frees_the_slot(model, tok):
    import openai
    small = Running(model, tok, max_batch=1, max_queue=0)
    try:
        stream = small.client.completions.create(model="tiny", prompt="a", max_tokens=BLOCK - 1, temperature=0,
                                                 stream=True)
        next(iter(stream))  # generating
        with pytest.raises(openai.RateLimitError) as busy:
            small.client.completions.create(model="tiny", prompt="b", max_tokens=3)
        assert busy.value.response.headers["retry-after"] == "1"
        with pytest.raises(openai.BadRequestError, match="at most 1"):  # could never fit: not worth a retry
            small.client.completions.create(model="tiny", prompt="b", max_tokens=3, n=2)
        stream.close()  # the client goes away mid-stream
        for _ in range(100):  # the slot is freed within a step or two
            try:
                r = small.client.completions.create(model="tiny", prompt="b", max_tokens=3)
                break
            except openai.RateLimitError:
                time.sleep(0.05)
        assert r.choices[0].finish_reason == "length"
        engine = small.server.config.app.state.server.worker.engine
        for _ in range(100):  # the reply can reach the client a moment before the finished row leaves the batch
            if not engine.busy:
                break
            time.sleep(0.02)
        assert not engine.busy
    finally:
        small.stop()


def test_seeded_chat_is_reproducible_and_logprobs_are_probabilities(srv):
    msgs = [{"role": "user", "content": "tell me"}]
    a = srv.client.chat.completions.create(model="tiny", messages=msgs, seed=4, max_tokens=12, logprobs=True)
    b = srv.client.chat.completions.create(model="tiny", messages=msgs, seed=4, max_tokens=12, logprobs=True)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert all(math.exp(e.logprob) <= 1.0 for e in a.choices[0].logprobs.content)


@pytest.fixture(scope="module")
def serve_py(model, tok, tmp_path_factory):
    """`python serve.py` serving `model`'s checkpoint (folder "run"), as is and with --quantize int8, with
    GPT_API_KEY=k: both started at once, so that their start-ups overlap; by quantize, (process, port)."""
    tmp = tmp_path_factory.mktemp("serve_py")
    save_checkpoint(tmp / "run" / "best", model.state_dict(), {"model": dataclasses.asdict(model.config)}, tok)
    with socket.socket() as a, socket.socket() as b:  # both held while picking: two different free ports
        a.bind(("127.0.0.1", 0))
        b.bind(("127.0.0.1", 0))
        ports = {None: a.getsockname()[1], "int8": b.getsockname()[1]}
    procs = {quantize: (subprocess.Popen(python_command("serve.py", "--ckpt", tmp / "run", "--port", port, "--dtype",
                                                        "float32", "--max-batch", 1, "--shutdown-timeout", 0,
                                                        *(["--quantize", quantize] if quantize else [])),
                                         cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                         env={**os.environ, "GPT_API_KEY": "k"}), port)
             for quantize, port in ports.items()}
    yield procs
    for proc, _ in procs.values():
        proc.kill()
        proc.wait()


def in_flight_stream(url: str, body: dict, first_token: bool, ready: threading.Event) -> list[str]:
    """A streamed request's SSE lines; `ready` is set once the server answered (or, with first_token, once its
    first token arrived: it is generating)."""
    with httpx.stream("POST", url, json=body, headers={"Authorization": "Bearer k"}, timeout=30) as r:
        assert r.status_code == 200
        if not first_token:
            ready.set()
        lines = []
        for line in r.iter_lines():
            if line:
                lines.append(line)
                ready.set()
        return lines


def stream_ended_well(lines: list[str]) -> bool:
    """Finished ([DONE]), or cut by the shutdown with OpenAI's error as the last event."""
    if lines[-1] == "data: [DONE]":
        return True
    return json.loads(lines[-1][len("data: "):])["error"]["code"] == "server_shutting_down"


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_serve_py_prints_its_url_serves_and_drains_on_sigterm(model, tok, serve_py, quantize):
    import openai
    proc, port = serve_py[quantize]
    try:
        for line in proc.stderr:
            if "serving" in line:
                break
        assert "serving run" in line and f"http://127.0.0.1:{port}/v1" in line and "API key" in line
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0)
        r = client.completions.create(model="run", prompt="Secret prompt text", temperature=0, max_tokens=8)
        served = quantize_int8(copy.deepcopy(model)) if quantize else model  # what the server computes
        assert r.choices[0].text == greedy(served, tok, "Secret prompt text", 8).text

        # SIGTERM under load: one stream generating, a request of 16 sequences and a stream queued behind it
        url, long = f"http://127.0.0.1:{port}/v1/completions", {"model": "run", "prompt": "a", "stream": True,
                                                               "max_tokens": BLOCK - 2, "ignore_eos": True}
        with ThreadPoolExecutor(2) as pool:
            ready = [threading.Event(), threading.Event()]
            generating = pool.submit(in_flight_stream, url, long, True, ready[0])
            assert ready[0].wait(30)
            body = json.dumps({**long, "stream": False, "n": 16}).encode()
            waiting = socket.create_connection(("127.0.0.1", port), timeout=30)
            waiting.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer k\r\n"
                            b"Content-Type: application/json\r\nConnection: close\r\n"
                            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
            queued = pool.submit(in_flight_stream, url, long, False, ready[1])
            assert ready[1].wait(30)
            proc.terminate()
            assert stream_ended_well(generating.result()) and stream_ended_well(queued.result())
        head, _, answer = waiting.makefile("rb").read().partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 "), head  # 16 x 94 tokens one row at a time: not done yet
        assert json.loads(answer)["error"] == {"message": "The server is shutting down; the request was not "
                                               "completed.", "type": "server_error", "param": None,
                                               "code": "server_shutting_down"}
        assert proc.wait(timeout=60) == 0
        log = proc.stderr.read() + proc.stdout.read()
        assert "POST /v1/completions" in log and "Secret" not in log and "Traceback" not in log
        assert "\" 500 " not in log and "Exception" not in log  # no handler was killed mid-request
    finally:
        proc.kill()


def test_serve_py_help_shows_the_limits_and_their_defaults(capsys):
    proc = run_in_process(capsys, "serve.py", "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())  # argparse wraps help lines
    for flag, default in (("--max-batch", 8), ("--max-queue", 32), ("--max-body", 1 << 20), ("--port", 8000),
                          ("--prefill-chunk", 256), ("--prefix-cache-mb", 1024), ("--shutdown-timeout", 30.0),
                          ("--speculate-tokens", 5)):
        assert flag in text and f"(default: {default})" in text.split(flag, 2)[-1].split("--", 1)[0], flag
    assert "(default: off)" in text.split("--speculate ngram|DRAFT_CKPT")[-1].split("--speculate-tokens")[0]



@pytest.mark.parametrize("flag, value, message", [
    ("--max-batch", "0", "--max-batch must be >= 1, got 0"), ("--port", "70000", "--port must be between 1 and 65535"),
    ("--max-queue", "-1", "--max-queue must be >= 0"), ("--max-body", "0", "--max-body must be >= 1"),
    ("--prefill-chunk", "-8", "--prefill-chunk must be >= 0, got -8"), ("--threads", "-1", "--threads must be >= 0"),
    ("--shutdown-timeout", "inf", "--shutdown-timeout must be >= 0, got inf"),
    ("--prefix-cache-mb", "nan", "--prefix-cache-mb must be >= 0, got nan"),
    ("--speculate-tokens", "0", "--speculate-tokens must be >= 1, got 0"),
    ("--speculate-tokens", "3", "--speculate-tokens needs --speculate"),
])
def test_serve_py_limits_are_checked_before_loading(flag, value, message):
    from gpt.serve.serve_cli import ServeError, run

    with pytest.raises(ServeError) as e:
        run(["--ckpt", "nowhere", flag, value])
    assert message in str(e.value) and "\n" not in str(e.value)


def completions_at_once(client, prompts: list[str], max_tokens: list[int]) -> list[str]:
    """Every prompt from its own client thread at once, greedy: the odd ones streamed (their text put back
    together), the even ones not."""

    def call(i):
        kw = dict(model="tiny", prompt=prompts[i], max_tokens=max_tokens[i], temperature=0)
        if i % 2:
            return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        return client.completions.create(**kw).choices[0].text

    with ThreadPoolExecutor(len(prompts)) as pool:
        return list(pool.map(call, range(len(prompts))))


def test_32_concurrent_requests_each_equal_alone(model, tok):
    """32 clients at once, streaming and not, on 8 rows with a queue and a small prefill budget (long prompts
    prefilled in chunks while other rows decode): every reply is the greedy reply of its prompt alone."""
    s = Running(model, tok, max_batch=8, max_queue=24, prefill_chunk=8)
    prompts = [("Hello there, how are you today? " * (1 + i % 3))[: 5 + 7 * i % 70] for i in range(32)]
    lengths = [6 + i % 11 for i in range(32)]
    try:
        together = completions_at_once(s.client, prompts, lengths)
    finally:
        s.stop()
    assert together == [greedy(model, tok, p, n).text for p, n in zip(prompts, lengths)]
    assert len(set(together)) > 8


@pytest.mark.parametrize("speculate", ["ngram", "draft"])
def test_a_speculating_server_answers_each_request_as_alone(model, tok, tmp_path, speculate):
    """serve.py --speculate ngram|DRAFT_CKPT: concurrent requests of different lengths, streamed and not, each
    get the greedy reply of their prompt alone (the draft: a checkpoint with the same tokenizer, here the model
    itself, so that its guesses are kept)."""
    if speculate == "draft":
        draft = model
        save_checkpoint(tmp_path / "draft", draft.state_dict(), {"model": dataclasses.asdict(draft.config)}, tok)
        speculate = str(tmp_path / "draft")
    s = Running(model, tok, max_batch=3, max_queue=8, speculate=speculate, speculate_tokens=3)
    prompts = [("abc abd abc abd " * (1 + i % 3))[: 4 + 5 * i] for i in range(6)]
    try:
        together = completions_at_once(s.client, prompts, [8 + i for i in range(6)])
        stats = s.server.config.app.state.server.worker.engine.speculation.stats
    finally:
        s.stop()
    assert together == [greedy(model, tok, p, 8 + i).text for i, p in enumerate(prompts)]
    assert stats.proposed > 0 and stats.rounds < stats.tokens  # guesses were made, and some kept


def test_the_engine_thread_decodes_with_the_threads_serve_chose():
    """A thread's OpenMP setting is its own: the engine thread takes the count set where the app was built
    (serve.py builds it in a passing thread, gpt/serve/serve_cli.py in_passing_thread), not OpenMP's default."""
    from gpt.infer.engine import Engine
    from gpt.infer.sampling import SamplingParams
    from gpt.serve.serve_cli import in_passing_thread
    from gpt.serve.worker import Worker

    tok = CharTokenizer(list(SERVE_CHARS))
    before = torch.get_num_threads()

    def build():
        torch.set_num_threads(1)
        return Worker(Engine(lively_model(tok.vocab_size), tok), max_queue=2)

    worker = in_passing_thread(build)
    assert torch.get_num_threads() == before  # this thread's setting is untouched
    seen, step = [], worker.engine.step
    worker.engine.step = lambda: seen.append(torch.get_num_threads()) or step()
    done = threading.Event()
    worker.start()
    worker.submit([(tok.encode("ab"), SamplingParams(max_tokens=3))], [], lambda s, t, x: s.done and done.set())
    assert done.wait(10) and seen and set(seen) == {1}
    scored = in_passing_thread(lambda: (worker.score_prompt(tok.encode("abc"), 0), torch.get_num_threads()))
    assert len(scored[0]) == 3 and scored[1] == 1  # echo's scoring: on its own thread, without an OpenMP team
    worker.stop()
    with pytest.raises(ZeroDivisionError):  # an error in the passing thread reaches the caller
        in_passing_thread(lambda: 1 / 0)


@pytest.mark.parametrize("wait_s", [0.0, 0.2])
def test_an_idle_worker_waits_for_requests_sent_together(wait_s):
    """serve.py --batch-wait-ms: requests that arrive a few milliseconds apart at an idle server are prefilled in
    one forward call, not the first alone and the rest a step later; with no wait, the first starts at once."""
    from gpt.infer.engine import Engine
    from gpt.serve.worker import Worker

    tok = CharTokenizer(list(SERVE_CHARS))
    worker = Worker(Engine(lively_model(tok.vocab_size), tok), max_queue=4, batch_wait_s=wait_s)
    prefills, fill = [], worker.engine._fill_joined

    def counted_fill(joined):  # the rows of each joint prefill call
        if joined:
            prefills.append(len(joined))
        return fill(joined)

    worker.engine._fill_joined = counted_fill
    ended = threading.Semaphore(0)
    worker.start()
    for i in range(3):
        worker.submit([(tok.encode("ab"), SamplingParams(max_tokens=2))], [], lambda s, t, x: s.done and ended.release())
        time.sleep(0.02 if wait_s else 0.1)  # the engine has long started on the first when there is no wait
    assert all(ended.acquire(timeout=10) for _ in range(3))
    worker.stop()
    assert prefills == ([3] if wait_s else [1, 1, 1])
