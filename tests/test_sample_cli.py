"""sample.py end to end (JSON output, stops, errors) and the chat mode's history handling."""

import dataclasses
import io
import json

import pytest
import torch
from conftest import lively_model, run_in_process, run_script

from gpt.checkpoint import save_checkpoint
from gpt.config import ConfigError
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer, TokenizerError
from gpt.infer.chat_session import ChatSession, run_chat
from gpt.infer.sample_cli import build_parser, check_args, sampling_params
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

CHARS = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ <>:.,!?'\n")


def tiny_model(vocab_size: int, block_size: int = 32) -> GPT:
    return lively_model(vocab_size, block_size=block_size, n_embd=16)


@pytest.fixture
def ckpt(tmp_path):
    """An output dir with a best/ checkpoint of a random char model whose vocabulary is padded to 64."""
    tok = CharTokenizer(CHARS)
    model = tiny_model(64)
    save_checkpoint(tmp_path / "out" / "best", model.state_dict(), {"model": dataclasses.asdict(model.config)}, tok)
    return tmp_path / "out"


def test_json_output_parses_and_cache_matches_reference_path(ckpt, capsys):
    """sample.py in this process (its behaviour, not the interpreter's, is tested here; the real process
    runs in test_chat_script_reads_stdin_until_eof and tests/test_errors_one_line.py)."""

    def sample(*args):
        return run_in_process(capsys, "sample.py", *args)

    base = ["--ckpt", ckpt, "--prompt", "Hello", "--max-new-tokens", 12, "--json"]
    proc = sample(*base, "--num-samples", 3, "--seed", 7, "--logprobs", 2, "--stop", "zz")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1, 2]
    for r in rows:
        assert r["finish_reason"] in ("length", "stop", "eos") and isinstance(r["text"], str)
        assert all(0 <= i < len(CHARS) for i in r["token_ids"])  # padded ids 62, 63 are never sampled
        assert len(r["logprobs"]) == len(r["token_ids"]) and len(r["logprobs"][0]["top"]) == 2
    greedy = [sample(*base, "--temperature", 0, "--dtype", "float32", *extra) for extra in ([], ["--no-kv-cache"])]
    assert greedy[0].returncode == 0 and greedy[0].stdout == greedy[1].stdout


def test_prompt_from_stdin_stop_and_plain_output(ckpt, capsys):
    def sample(*args, stdin):
        return run_in_process(capsys, "sample.py", *args, stdin=stdin)

    free = sample("--ckpt", ckpt, "--prompt-file", "-", "--max-new-tokens", 20, "--temperature", 0, "--json",
                  stdin="abc")
    text = json.loads(free.stdout)["text"]
    stop = text[4:6]
    proc = sample("--ckpt", ckpt / "best", "--prompt-file", "-", "--max-new-tokens", 20, "--temperature", 0,
                  "--stop", stop, "--logprobs", 1, "--no-stream", stdin="abc")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("abc" + text[: text.index(stop)] + "\n")
    assert "finish reason: stop" in proc.stderr
    assert "top alternatives" in proc.stdout


def test_bad_flag_combinations_are_refused():
    with pytest.raises(ConfigError, match="--chat"):
        check_args(build_parser().parse_args(["--ckpt", "x", "--chat", "--json"]))
    with pytest.raises(ConfigError, match="--threads"):
        check_args(build_parser().parse_args(["--ckpt", "x", "--threads", "-1"]))
    with pytest.raises(ConfigError, match="--num-samples"):
        check_args(build_parser().parse_args(["--ckpt", "x", "--num-samples", "0"]))
    with pytest.raises(ConfigError, match="--min-p must be >= 0 and <= 1, got 1.5"):
        check_args(build_parser().parse_args(["--ckpt", "x", "--min-p", "1.5"]))
    assert sampling_params(build_parser().parse_args(["--ckpt", "x", "--min-p", "0.1"])).min_p == 0.1


# ---------------------------------------------------------------------------- chat


def test_chat_history_drops_oldest_exchanges_and_keeps_the_system_prompt():
    tok = CharTokenizer(CHARS)
    template = ChatTemplate(tok)
    session = ChatSession(template, budget=60, system="Be brief.")
    ids, dropped = session.prompt_for("hi")
    assert dropped == 0
    session.add_reply("hello there")
    ids, dropped = session.prompt_for("how are you")
    assert dropped == 2 and len(ids) <= 60  # the first exchange no longer fits
    assert session.turns == [{"role": "user", "content": "how are you"}]
    assert tok.decode(ids).startswith("System: Be brief.\nUser: how are you\nAssistant: ")
    session.add_reply("fine")
    session.reset()
    ids, _ = session.prompt_for("again")
    assert tok.decode(ids) == "System: Be brief.\nUser: again\nAssistant: "


def test_chat_loop_streams_replies_resets_and_exits():
    tok = CharTokenizer(CHARS)
    model = tiny_model(len(CHARS), block_size=48)
    inputs = iter(["hello", "tell me more about it", "/reset", "again", "/exit", "never read"])
    prompts = []

    def read(prompt):
        prompts.append(prompt)
        return next(inputs)

    out, err = io.StringIO(), io.StringIO()
    run_chat(model, tok, SamplingParams(temperature=0, max_tokens=10), system="Be nice.", read=read, out=out, err=err)
    assert len(prompts) == 5  # /exit ends the loop
    assert "dropped" in err.getvalue() and "history cleared" in err.getvalue()
    assert len(out.getvalue().splitlines()) == 3  # three streamed replies


def test_chat_refuses_a_line_it_cannot_encode_and_goes_on():
    tok = CharTokenizer(CHARS)
    model = tiny_model(len(CHARS), block_size=48)
    assert "~" not in CHARS
    inputs = iter(["hello", "price~2", "bye", "/exit"])
    out, err = io.StringIO(), io.StringIO()
    run_chat(model, tok, SamplingParams(temperature=0, max_tokens=5), read=lambda _: next(inputs), out=out, err=err)
    assert "(not sent: character '~' is not in this model's character vocabulary" in err.getvalue()
    assert len(out.getvalue().splitlines()) == 2  # replies to "hello" and "bye"; the session went on
    session = ChatSession(ChatTemplate(tok), budget=60)
    with pytest.raises(TokenizerError):
        session.prompt_for("~")
    assert session.turns == []  # the refused line is not in the history


def test_chat_ends_on_ctrl_d_and_stops_at_the_end_of_turn_token():
    tok = CharTokenizer(CHARS)
    ChatTemplate.add_tokens(tok)
    model = tiny_model(tok.vocab_size, block_size=64)
    end_id = tok.special_id("<|end|>")
    with torch.no_grad():
        model.lm_head.weight[end_id] *= 40  # the model ends its turn almost at once
    inputs = iter(["hi"])

    def read(_):
        try:
            return next(inputs)
        except StopIteration:
            raise EOFError from None

    out = io.StringIO()
    run_chat(model, tok, SamplingParams(temperature=0, max_tokens=30), read=read, out=out, err=io.StringIO())
    assert "<|end|>" not in out.getvalue() and len(out.getvalue()) < 30


def test_chat_script_reads_stdin_until_eof(ckpt):
    proc = run_script("sample.py", "--ckpt", ckpt, "--chat", "--system", "You are terse.", "--max-new-tokens", 8,
                      "--temperature", 0, stdin="hello\n/reset\nbye\n")
    assert proc.returncode == 0, proc.stderr
    assert "history cleared" in proc.stderr
