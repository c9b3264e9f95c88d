"""Tool-call accuracy (gpt/tool_call_eval.py, `python -m gpt.eval --tool-calls`): the counting on hand-made
replies, and the grammar-held decoding of a random model, whose calls are valid by the grammar alone."""

import json
from dataclasses import asdict

import pytest
from conftest import lively_model, write_jsonl

from gpt import checkpoint
from gpt.data.bpe import GPT2_PATTERN
from gpt.data.chat_template import ChatTemplate
from gpt.data.messages import Conversation
from gpt.data.tokenizer import BPETokenizer
from gpt.data.tool_calls import HERMES
from gpt.eval import main as eval_main
from gpt.tool_call_eval import Case, ToolCallResult, evaluate_tool_calls, judge

WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "maxLength": 8}, "unit": {"enum": ["c", "f"]}}}
FIND = {"type": "object", "additionalProperties": False, "required": ["name"],
        "properties": {"name": {"type": "string", "maxLength": 8}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "find", "parameters": FIND}}]


def record(question: str, call: tuple[str, dict] | None) -> dict:
    reply = ({"role": "assistant", "content": "Hi."} if call is None else
             {"role": "assistant", "content": None, "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": call[0], "arguments": json.dumps(call[1])}}]})
    return {"tools": TOOLS, "messages": [{"role": "user", "content": question}, reply]}


RECORDS = [record("Weather in Oslo?", ("get_weather", {"city": "Oslo", "unit": "c"})),
           record("Who is Ada?", ("find", {"name": "Ada"})),
           record("Hello!", None),
           record("Weather in Rome, in f?", ("get_weather", {"city": "Rome", "unit": "f"}))]


@pytest.fixture(scope="module")
def tok():
    t = BPETokenizer([bytes([b]) for b in range(256)] + [b'{"', b'":', b'",', b'"}', b"name", b"<tool_call>"],
                     GPT2_PATTERN)
    ChatTemplate.add_tokens(t)
    return t


def conversations() -> list[Conversation]:
    from gpt.data.record_formats import parse_record

    return [parse_record(r, "chat")[1] for r in RECORDS]


def call(name: str, args: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {args}}}\n</tool_call>'


def test_counting_of_hand_made_replies(tok):
    weather = Case([], TOOLS, [("get_weather", {"city": "Oslo", "unit": "c"})], "r1")
    text = Case([], TOOLS, None, "r2")
    replies = [
        (weather, call("get_weather", '{"city": "Oslo", "unit": "c"}')),  # right tool, right arguments
        (weather, call("get_weather", '{"unit": "c", "city": "Oslo"}')),  # the same, keys in another order
        (weather, call("get_weather", '{"city": "Lima", "unit": "c"}')),  # valid, right tool, wrong city
        (weather, call("get_weather", '{"city": "Oslo", "unit": "k"}')),  # right tool, not in the enum: invalid
        (weather, call("get_weather", '{"city": "Oslo", "unit": "c"')),  # almost: the object is not closed
        (weather, call("find", '{"name": "Oslo"}')),  # a valid call of the wrong tool
        (weather, call("get_time", '{"city": "Oslo"}')),  # a tool not offered
        (weather, "It is sunny in Oslo."),  # no call at all
        (text, "Hello."),  # a text record answered in text
        (text, call("find", '{"name": "Ada"}')),  # a text record answered with a call
        (text, '<tool_call>\n{"name"name": "}'),  # ... or with the start of one
    ]
    result, template = ToolCallResult("free"), ChatTemplate(tok)
    for case, reply in replies:
        judge(result, case, reply, HERMES, template)
    assert (result.records, result.call_records, result.text_records) == (11, 8, 3)
    assert result.attempted == 7
    assert result.valid == 4  # the first three and the wrong tool
    assert result.right_tool == 5  # get_weather named, valid or not
    assert result.right_args == 2
    assert result.no_call == 1
    assert result.correct == pytest.approx(3 / 11)


def eager_caller(tok):
    """A random model that begins every reply with the call marker (one token here) and ranks its end token next:
    it starts calls but never learned their form, so whatever follows the marker is the grammar's doing."""
    import torch

    model = lively_model(tok.vocab_size, block_size=1024, seed=3)
    u = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the final norm's bias dominates every hidden state; tied embeddings make it the logits
        model.transformer.ln_f.bias.copy_(3 * u)
        marker = next(i for i in range(tok.vocab_size) if tok.decode_bytes([i]) == b"<tool_call>")
        model.transformer.wte.weight[marker] = 2 * u
        model.transformer.wte.weight[ChatTemplate(tok).end_ids[0]] = 1.8 * u
    return model


def test_grammar_turns_a_random_models_attempts_into_valid_calls(tok):
    free, held = evaluate_tool_calls(eager_caller(tok), tok, conversations(), max_new_tokens=60, batch_size=4)
    assert (free.decoding, held.decoding) == ("free", "grammar")
    assert free.attempted == 3 and free.valid == 0  # the marker, then no call the reader can take
    assert held.attempted == 3 and held.valid == 3  # the same prompts held to the grammar: every call valid
    assert held.no_call == 0 and held.records == 4  # it calls where no tool is needed too


def test_command_line_prints_both_decodings_per_checkpoint(tmp_path, tok, capsys):
    model = eager_caller(tok)
    ckpt = tmp_path / "ckpt"
    checkpoint.save_checkpoint(ckpt / "best", model.state_dict(), {"model": asdict(model.config)}, tok)
    data = write_jsonl(tmp_path / "val.jsonl", RECORDS)
    eval_main(["--tool-calls", "--ckpt", str(ckpt), "--data", str(data), "--limit", "2", "--max-new-tokens", "80",
               "--json"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["decoding"], r["records"], r["valid"]) for r in rows] == [("free", 2, 0), ("grammar", 2, 2)]
    with pytest.raises(SystemExit):
        eval_main(["--tool-calls", "--ckpt", str(ckpt), "--data", str(data), "--max-tokens", "100"])
    assert "--max-tokens does not apply to --tool-calls" in capsys.readouterr().err
