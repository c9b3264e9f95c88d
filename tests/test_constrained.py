"""Constrained decoding (gpt/infer/constraints.py): random tiny models, so validity comes from the grammar alone."""

import dataclasses
import json
import re

import pytest
import torch
from conftest import lively_model, run_in_process

from gpt.checkpoint import save_checkpoint
from gpt.data.bpe import GPT2_PATTERN
from gpt.data.tokenizer import BPETokenizer, CharTokenizer
from gpt.infer.constraints import ConstraintError
from gpt.infer.engine import Engine, complete, generate
from gpt.infer.sampling import Constraint, SamplingError, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "color"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"}, "color": {"enum": ["red", "green"]}}}
MERGES = [b'{"', b'":', b'",', b'"}', b"true", b"false", b"name", b"age", b"red", b"yes"]


@pytest.fixture(scope="module")
def tok():
    """A byte-level BPE (every byte + a few JSON-ish merges, then <|endoftext|>)."""
    return BPETokenizer([bytes([b]) for b in range(256)] + MERGES, GPT2_PATTERN)


@pytest.fixture(scope="module")
def model(tok):
    return lively_model(tok.vocab_size, block_size=64)


def check_schema(obj):
    try:
        import jsonschema
    except ImportError:
        assert set(obj) == set(SCHEMA["required"]) and obj["color"] in ("red", "green") and 0 <= obj["age"] <= 120
        return
    jsonschema.validate(obj, SCHEMA)


def test_json_schema_twenty_of_twenty_samples_are_valid(model, tok):
    params = SamplingParams(max_tokens=64, seed=3, constraint=Constraint.json_schema(SCHEMA))
    results = complete(model, tok, "x", params, num_samples=20)
    for r in results:
        assert r.finish_reason == "eos" and r.token_ids[-1] == tok.eot_id, r
        check_schema(json.loads(r.text))


def test_regex_choice_grammar_and_any_object(model, tok):
    for r in complete(model, tok, "x", SamplingParams(max_tokens=30, seed=1, constraint=Constraint.regex(
            r"[a-c]{2,5}-[0-9]{1,3}")), num_samples=5):
        assert r.finish_reason == "eos" and re.fullmatch(r"[a-c]{2,5}-[0-9]{1,3}", r.text), r
    options = ["yes", "no", "maybe not"]
    got = complete(model, tok, "x", SamplingParams(max_tokens=30, seed=2, constraint=Constraint.choice(options)),
                   num_samples=6)
    assert all(r.text in options and r.finish_reason == "eos" for r in got)
    gbnf = Constraint.grammar('root ::= "A" [0-9] "B"')
    [r] = complete(model, tok, "x", SamplingParams(max_tokens=30, constraint=gbnf), stop_ids=())
    assert re.fullmatch("A[0-9]B", r.text) and r.finish_reason == "stop"  # no end token: the grammar ended it
    for r in complete(model, tok, "x", SamplingParams(max_tokens=40, seed=4, constraint=Constraint.json_object()),
                      num_samples=4):
        assert r.text.startswith("{") and (r.finish_reason == "length" or isinstance(json.loads(r.text), dict))


def test_rows_keep_their_own_constraint_under_continuous_batching(model, tok):
    """5 requests through 3 rows (two join later): four constraints and one free row, each as if alone."""
    kinds = [Constraint.json_schema(SCHEMA), None, Constraint.regex("[0-9]{4}"), Constraint.choice(["red", "blue"]),
             Constraint.grammar('start: "(" /[a-z]{1,3}/ ")"')]
    engine = Engine(model, tok, max_batch=3)
    end = [tok.eot_id]
    reqs = [engine.add([65], SamplingParams(max_tokens=80, seed=i, temperature=0.9, top_k=50, constraint=c),
                       stop_ids=end) for i, c in enumerate(kinds)]
    engine.run()
    texts = [r.completion(tok).text for r in reqs]
    check_schema(json.loads(texts[0]))
    assert re.fullmatch("[0-9]{4}", texts[2]) and texts[3] in ("red", "blue") and re.fullmatch(r"\([a-z]{1,3}\)", texts[4])
    assert all(r.finish_reason == "eos" for i, r in enumerate(reqs) if i != 1)
    alone = complete(model, tok, [65], SamplingParams(max_tokens=80, seed=1, temperature=0.9, top_k=50), stop_ids=end)
    assert alone[0].token_ids == reqs[1].out_ids  # the free row is untouched by its neighbours' masks


def test_max_tokens_mid_object_is_length_and_cache_matches_reference(model, tok):
    params = SamplingParams(max_tokens=5, seed=0, constraint=Constraint.json_schema(SCHEMA))
    [r] = complete(model, tok, "x", params)
    assert r.finish_reason == "length" and len(r.token_ids) == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.text)
    full = dataclasses.replace(params, max_tokens=64, temperature=0.7, top_p=0.9, repetition_penalty=1.3,
                               frequency_penalty=0.5, logprobs=2, logit_bias={ord("}"): 5.0}, stop=("zzz",))
    cached, naive = (complete(model, tok, "x", full, num_samples=3, use_kv_cache=c) for c in (True, False))
    assert [r.token_ids for r in cached] == [r.token_ids for r in naive]
    for r in cached:
        check_schema(json.loads(r.text))
        assert len(r.logprobs) == len(r.token_ids) and len(r.logprobs[0]["top"]) == 2
    out = generate(model, torch.tensor([[65]]), 60, SamplingParams(seed=1, constraint=Constraint.choice(["yes", "no"])),
                   tokenizer=tok)  # the row ends with "yes" or "no", then the end-of-text id pads it
    assert tok.decode(out[0, 1:].tolist()).replace("<|endoftext|>", "") in ("yes", "no")


def test_character_vocabularies_work_or_are_refused_in_one_line():
    chars = CharTokenizer(sorted(set('abcdefghijklmnopqrstuvwxyz{}":,0123456789')))
    for r in complete(lively_model(chars.vocab_size, block_size=64), chars, "a",
                      SamplingParams(max_tokens=60, seed=0, constraint=Constraint.json_schema(SCHEMA)), num_samples=3):
        assert r.finish_reason == "stop"  # a character vocabulary has no end token: the grammar's end stops it
        check_schema(json.loads(r.text))
    shakespeare = CharTokenizer(sorted(set("abcdefghijklmnopqrstuvwxyz ,.;:!?'\n")))  # no '{'
    with pytest.raises(ConstraintError, match="cannot begin the json schema constraint") as e:
        complete(lively_model(shakespeare.vocab_size), shakespeare, "a",
                 SamplingParams(constraint=Constraint.json_schema(SCHEMA)))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("constraint, message", [
    (Constraint.regex("[0-9"), "invalid regex"), (Constraint.json_schema('{"type": "objec"}'), "invalid json schema"),
    (Constraint.json_schema("{x"), "not valid JSON"), (Constraint.grammar("root ::= foo"), "neither Lark nor GBNF"),
    (Constraint.choice([]), "non-empty list"), (Constraint("yaml", "x"), "constraint kind must be one of"),
])
def test_bad_constraints_are_one_line_errors(model, tok, constraint, message):
    with pytest.raises(SamplingError, match=message) as e:
        complete(model, tok, "x", SamplingParams(max_tokens=4, constraint=constraint))
    assert "\n" not in str(e.value) and e.value.param == "constraint"


def test_sample_py_constraint_flags(tmp_path, capsys, tok, model):
    save_checkpoint(tmp_path / "out" / "best", model.state_dict(), {"model": dataclasses.asdict(model.config)}, tok)
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    base = ["--ckpt", tmp_path / "out", "--prompt", "x", "--max-new-tokens", 64, "--json", "--num-samples", 2]
    proc = run_in_process(capsys, "sample.py", *base, "--json-schema", tmp_path / "schema.json")
    assert proc.returncode == 0, proc.stderr
    for line in proc.stdout.splitlines():
        check_schema(json.loads(json.loads(line)["text"]))
    proc = run_in_process(capsys, "sample.py", *base, "--choice", "left,right")
    assert {json.loads(line)["text"] for line in proc.stdout.splitlines()} <= {"left", "right"}
    for flags, said in ((["--regex", "a("], "--regex: invalid regex"), (["--regex", "a", "--choice", "b"], "not allowed"),
                        (["--grammar", tmp_path / "none.lark"], "--grammar"), (["--json-schema", tmp_path / "schema.json",
                                                                               "--chat"], "not --chat")):
        proc = run_in_process(capsys, "sample.py", *base[:2], *flags)
        assert proc.returncode != 0 and said in proc.stderr, proc.stderr
