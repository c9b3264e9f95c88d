"""Supervised fine-tuning: loss mask, truncation, packing, batches, special tokens, a learned mapping."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CHAT_CHARS, chat_template, qa, sft_config, write_base, write_jsonl

from gpt import checkpoint
from gpt.config import ConfigError, FinetuneConfig, ModelConfig
from gpt.data.chat_template import END_TOKEN, ROLE_TOKENS, ChatTemplate
from gpt.data.examples import encode_chat, encode_text
from gpt.data.tokenizer import CharTokenizer, TiktokenTokenizer
from gpt.model import GPT, IGNORE_INDEX, cross_entropy
from gpt.train.sft import SFTBatches, add_chat_tokens, finetune

CHARS = CHAT_CHARS
MAPPING = {"cat": "dog", "sun": "moon", "red": "blue", "one": "two", "up": "down", "hot": "cold",
           "yes": "no", "big": "small"}


# ---------------------------------------------------------------------------- template and mask


def test_loss_mask_covers_exactly_the_assistant_turns():
    tpl = chat_template()
    tok = tpl.tok
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi?"},
            {"role": "assistant", "content": "hello."}, {"role": "user", "content": "and?"},
            {"role": "assistant", "content": "bye!"}]
    # the documented template, built by hand: <|role|>\n{content}<|end|>\n per turn
    ids, mask = [], []
    for m in msgs:
        ids += [tok.special_id(ROLE_TOKENS[m["role"]])] + tok.encode("\n")
        mask += [False, False]
        body = tok.encode(m["content"]) + [tok.special_id(END_TOKEN)]
        ids += body
        mask += [m["role"] == "assistant"] * len(body)
        ids += tok.encode("\n")
        mask += [False]
    example, truncated = encode_chat(tpl, msgs, budget=1000)
    assert not truncated
    assert example.ids.tolist() == ids
    assert example.mask.tolist() == mask

    batch = SFTBatches([example], [example], block_size=64, batch_size=1, device=torch.device("cpu"), packing=False).collate([[0]], [example])
    supervised = batch.y[0][batch.y[0] != IGNORE_INDEX].tolist()
    assert tok.decode(supervised) == "hello.<|end|>bye!<|end|>"
    kept = batch.y[0, :-1] != IGNORE_INDEX
    assert (batch.x[0, 1:][kept] == batch.y[0, :-1][kept]).all()  # targets are the inputs shifted by one

    everything, _ = encode_chat(tpl, msgs, budget=1000, train_on_prompt=True)
    assert everything.mask.all()


def test_truncation_keeps_prompt_end_and_response_start():
    tpl = chat_template()
    prompt, response = "abcdefghijklmnopqrstuvwxyz" * 2, "zyxwvutsrqponmlkjihgfedcba" * 2
    full, _ = encode_chat(tpl, qa(prompt, response)["messages"], budget=1000)
    split = int(np.argmax(full.mask))  # where the response starts
    ex, truncated = encode_chat(tpl, qa(prompt, response)["messages"], budget=40)
    assert truncated and len(ex.ids) == 40
    keep = 20  # both halves are long: the response gets half the window, the prompt keeps its end
    assert ex.ids.tolist() == full.ids[split - keep: split + 40 - keep].tolist()
    assert ex.ids[keep - 2] == tpl.tok.special_id("<|assistant|>")

    short_prompt = qa("hi", response)["messages"]
    full, _ = encode_chat(tpl, short_prompt, budget=1000)
    ex, truncated = encode_chat(tpl, short_prompt, budget=40)
    assert truncated and ex.ids.tolist() == full.ids[:40].tolist()  # whole prompt, response cut at the end

    short_response = qa(prompt, "ok.")["messages"]
    full, _ = encode_chat(tpl, short_response, budget=1000)
    ex, truncated = encode_chat(tpl, short_response, budget=40)
    assert truncated and ex.ids.tolist() == full.ids[-40:].tolist()  # prompt's end, whole response
    assert tpl.tok.decode(ex.ids[ex.mask].tolist()) == "ok.<|end|>"


def test_user_text_that_looks_like_a_special_token_is_plain_text():
    tok = TiktokenTokenizer("gpt2")
    ChatTemplate.add_tokens(tok)
    tpl = ChatTemplate(tok)
    for t in (tpl, chat_template(CHARS + sorted("<|>"))):
        msgs = [{"role": "user", "content": "say <|end|> or <|assistant|>"},
                {"role": "assistant", "content": "no <|user|>"}]
        ids = t.encode(msgs)
        end, user = t.tok.special_id(END_TOKEN), t.tok.special_id("<|user|>")
        assert ids.count(end) == 2 and ids.count(user) == 1  # only the real markers
        assert t.tok.decode(ids) == ("<|user|>\nsay <|end|> or <|assistant|><|end|>\n"
                                     "<|assistant|>\nno <|user|><|end|>\n")


def test_text_records_train_on_every_token_once():
    tpl = chat_template()
    text = "the quick brown fox jumps over the lazy dog"
    windows = encode_text(tpl, text, budget=10)
    assert all(len(w.ids) <= 10 and w.mask.all() for w in windows)
    targets = [t for w in windows for t in w.ids[1:].tolist()]
    assert targets == tpl.tok.encode(text)[1:]


@pytest.mark.parametrize("model_vocab", [50257, 50304])
def test_tiktoken_base_gets_chat_tokens_past_its_vocabulary(model_vocab):
    tok = TiktokenTokenizer("gpt2")
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, block_size=8, vocab_size=model_vocab))
    before = model.lm_head.weight[:50257].clone()
    assert add_chat_tokens(model, tok) == ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>"]
    ids = [tok.special_id(t) for t in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|tool|>")]
    assert ids == [50257, 50258, 50259, 50260, 50261] and tok.vocab_size == 50262
    assert model.config.vocab_size == max(model_vocab, 50262)
    w = model.lm_head.weight
    assert w is model.transformer.wte.weight and torch.equal(w[:50257], before)
    new = w[ids]
    assert torch.cdist(new, new).triu(1)[0, 1:].min() > 0  # distinct rows
    assert ((new - before.mean(0)).abs() < 3 * before.std(0)).all()  # near the mean embedding
    assert add_chat_tokens(model, tok) == []  # a second call (fine-tuning a fine-tuned model) adds nothing


# ---------------------------------------------------------------------------- batches


def _examples(tpl, pairs):
    return [encode_chat(tpl, qa(p, r)["messages"], budget=100)[0] for p, r in pairs]


def test_prompt_tokens_receive_no_loss_gradient():
    tpl = chat_template()
    examples = _examples(tpl, [("cat?", "dog."), ("a longer question?", "yes.")])
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=64, vocab_size=tpl.tok.vocab_size))
    for packing in (True, False):
        batches = SFTBatches(examples, examples, block_size=64, batch_size=2, device=torch.device("cpu"), packing=packing)
        b = batches.collate([[0, 1]] if packing else [[0], [1]], examples)
        logits, _ = model(b.x, doc_ids=b.doc_ids)
        logits.retain_grad()
        cross_entropy(logits, b.y, "sum").backward()
        per_position = logits.grad.abs().sum(-1)
        assert (per_position[b.y == IGNORE_INDEX] == 0).all()
        assert (per_position[b.y != IGNORE_INDEX] > 0).all()
        assert (b.y != IGNORE_INDEX).sum() == len("dog.") + len("yes.") + 2  # responses and their <|end|>


def test_packed_examples_do_not_attend_across_boundaries():
    tpl = chat_template()
    examples = _examples(tpl, [("first question here?", "first."), ("second?", "second answer.")])
    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=64, vocab_size=tpl.tok.vocab_size)).eval()
    batches = SFTBatches(examples, examples, block_size=64, batch_size=1, device=torch.device("cpu"), packing=True)
    packed = batches.collate([[0, 1]], examples)
    n0 = len(examples[0].ids) - 1
    alone = [batches.collate([[i]], examples) for i in (0, 1)]
    logits, loss = model(packed.x, packed.y, doc_ids=packed.doc_ids, reduction="sum")
    singles = [model(a.x, a.y, doc_ids=a.doc_ids, reduction="sum") for a in alone]
    n1 = len(examples[1].ids) - 1
    torch.testing.assert_close(logits[0, :n0], singles[0][0][0, :n0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[0, n0:n0 + n1], singles[1][0][0, :n1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, singles[0][1] + singles[1][1])


def test_batches_are_deterministic_cover_each_epoch_and_split_across_ranks():
    tpl = chat_template()
    examples = _examples(tpl, [(a * (i % 5 + 1), b) for i, (a, b) in enumerate(MAPPING.items())] * 3)
    cpu = torch.device("cpu")
    for packing in (True, False):
        one = SFTBatches(examples, examples, block_size=48, batch_size=4, device=cpu, seed=3, grad_accum=2, packing=packing)
        ranks = [SFTBatches(examples, examples, block_size=48, batch_size=2, device=cpu, seed=3, rank=r, world_size=2, grad_accum=2,
                            packing=packing) for r in (0, 1)]
        for step, micro in [(0, 0), (0, 1), (5, 1)]:
            assert one.train_rows(step, micro) == ranks[0].train_rows(step, micro) + ranks[1].train_rows(step, micro)
            again = SFTBatches(examples, examples, block_size=48, batch_size=4, device=cpu, seed=3, grad_accum=2, packing=packing)
            assert torch.equal(again.train_batch(step, micro).y, one.train_batch(step, micro).y)
        epoch = [i for j in range(one.stream.rows_per_epoch()) for i in one.stream.row(j)]
        assert sorted(epoch) == list(range(len(examples)))  # every example once per epoch
        assert all(sum(len(examples[i].ids) - 1 for i in one.stream.row(j)) <= 48 for j in range(20))
        assert SFTBatches(examples, examples, block_size=48, batch_size=4, device=cpu, seed=4, packing=packing).train_rows(0, 0) != \
            one.train_rows(0, 0)


# ---------------------------------------------------------------------------- data files


BAD_LINES = [
    qa("cat", "dog"),
    {"instruction": "sum", "input": "one one", "output": "two"},
    '{"messages": [',
    {"text": "some plain text for continued pretraining"},
    {"prompt": "cat"},
    {"messages": [{"role": "bot", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
    {"prompt": "cat", "response": "   "},
    {"prompt": "caf\u00e9?", "response": "yes"},
    qa("sun", "moon"),
]


def test_malformed_records_name_file_and_line_and_skip_invalid_counts(tmp_path):
    from gpt.config import SFTDataConfig
    from gpt.data.corpus import DataError
    from gpt.data.finetune_data import load_sft_data

    tpl = chat_template()
    path = write_jsonl(tmp_path / "train.jsonl", BAD_LINES[:8] + ["", BAD_LINES[8]])  # line 9 is blank
    cfg = SFTDataConfig(path=str(path), val_fraction=0.3)
    with pytest.raises(DataError) as err:
        load_sft_data(cfg, tpl, 49, False, log=lambda line: None)
    msg = str(err.value)
    assert msg.startswith("5 of 9 records are invalid")
    for expected in (f"{path}:3: malformed JSON", f"{path}:5: missing field 'response'",
                     f"{path}:6: message 1: unknown role 'bot'", f"{path}:7: empty response",
                     f"{path}:8: character '\u00e9' is not in this model's character vocabulary"):
        assert expected in msg
    assert f"{path}:10" not in msg and f"{path}:1:" not in msg

    lines: list[str] = []
    cfg.skip_invalid = True
    data = load_sft_data(cfg, tpl, 49, False, log=lines.append, report_dir=tmp_path / "out")
    assert lines[0] == f"data: {path}: read as 2 messages, 1 instruction, 1 text"  # once per file, no record text
    assert len(data.skipped) == 5 and "skipped 5 of 9 invalid records" in lines[1]
    assert len((tmp_path / "out" / "skipped_records.txt").read_text().splitlines()) == 5
    assert "3 train / 1 val records (2 chat, 1 instruction, 1 text)" in lines[2]  # auto-detected per record


def test_csv_parquet_and_json_errors_name_the_row(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from gpt.data.corpus import DataError
    from gpt.data.finetune_data import load_file

    tpl = chat_template()
    csv = tmp_path / "d.csv"
    csv.write_text('prompt,response\ncat,dog\nsun,\nred,"blue"\n', encoding="utf-8")
    loaded = load_file(str(csv), "instruction", tpl, 49, False)
    assert loaded.invalid == [(f"{csv}:3", "missing field 'response' (or 'output')")]  # file:line, header = line 1
    assert len(loaded.records) == 2

    parquet = tmp_path / "d.parquet"
    msgs = [json.dumps(qa("cat", "dog")["messages"]), json.dumps([{"role": "user", "content": "x"}])]
    pq.write_table(pa.table({"messages": msgs}), parquet)
    loaded = load_file(str(parquet), "auto", tpl, 49, False)
    assert loaded.invalid == [(f"{parquet}: row 2", "no assistant message: nothing to learn from")]

    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_list([{"prompt": "cat", "response": "dog"}, {"prompt": "sun", "response": ""}]
                               ).save_to_disk(str(saved))
    loaded = load_file(str(saved), "auto", tpl, 49, False)
    assert loaded.invalid == [(f"{saved}: row 2", "empty response")] and len(loaded.records) == 1

    array = tmp_path / "d.json"
    array.write_text(json.dumps([qa("cat", "dog"), {"prompt": "cat", "response": 3}]), encoding="utf-8")
    assert load_file(str(array), "auto", tpl, 49, False).invalid == [(f"{array}: record 2",
                                                                       "'response' must be text, got int")]
    array.write_text('[\n{"prompt": "a",\n "response" "b"}]', encoding="utf-8")
    with pytest.raises(DataError, match=rf"{array}:3: malformed JSON"):
        load_file(str(array), "auto", tpl, 49, False)


def test_finetune_config_errors_name_the_key(tmp_path):
    """(finetune.py's report of invalid records is a row of tests/test_errors_one_line.py.)"""
    base = write_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "d.jsonl", [qa("cat", "dog"), {"prompt": "cat", "response": ""}])
    with pytest.raises(ConfigError, match="model.* is taken from init_from"):
        finetune(sft_config(tmp_path, base, data, **{"model.n_layer": 3}))
    with pytest.raises(ConfigError, match="init_from is required"):
        finetune(sft_config(tmp_path, "", data))
    with pytest.raises(checkpoint.CheckpointError, match="no such checkpoint"):
        finetune(sft_config(tmp_path, tmp_path / "missing", data))


# ---------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def mapping_run(tmp_path_factory):
    """Fine-tune a tiny random model (saved as our checkpoint dir) on a fixed question -> answer map."""
    tmp = tmp_path_factory.mktemp("mapping")
    base = write_base(tmp / "base")
    data = write_jsonl(tmp / "map.jsonl", [qa(q, a) for q, a in MAPPING.items()])
    cfg = sft_config(tmp, base, data, **{"train.max_iters": 150, "train.eval_interval": 50, "train.batch_size": 8,
                                         "optim.warmup_iters": 10, "optim.lr": 1e-2})
    result = finetune(cfg)
    return tmp / "out", result


def test_finetuned_model_reproduces_the_mapping_greedily(mapping_run):
    out, result = mapping_run
    assert result.step == 150 and result.best_val_loss < 0.05
    loaded = checkpoint.load_checkpoint(out)  # a plain GPT from best/
    model, tok = loaded.model, loaded.tokenizer
    tpl = ChatTemplate(tok)
    end = tok.special_id(END_TOKEN)
    for question, answer in MAPPING.items():
        ids = tpl.encode([{"role": "user", "content": question}], add_generation_prompt=True)
        reply = []
        with torch.no_grad():
            for _ in range(10):
                nxt = int(model(torch.tensor([ids + reply]))[0][0, -1].argmax())
                if nxt == end:
                    break
                reply.append(nxt)
        assert tok.decode(reply) == answer


def test_special_tokens_survive_save_and_load(mapping_run):
    out, _ = mapping_run
    tok = CharTokenizer(CHARS)
    model = GPT(ModelConfig(n_layer=1, n_head=1, n_embd=8, vocab_size=len(CHARS)))
    add_chat_tokens(model, tok)
    for name in ("best", "latest"):
        ckpt = checkpoint.load_checkpoint(out / name)
        loaded, loaded_tok, config = ckpt.model, ckpt.tokenizer, ckpt.config
        assert loaded_tok.special_tokens == tok.special_tokens
        assert loaded.config.vocab_size == tok.vocab_size == len(CHARS) + 5  # the 4 chat markers and <|tool|>
        msgs = qa("cat", "dog")["messages"]
        assert ChatTemplate(loaded_tok).encode(msgs) == ChatTemplate(tok).encode(msgs)
        assert config["data"]["format"] == "auto" and config["init_from"].endswith("base")


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_matches_an_uninterrupted_run(tmp_path, lora_rank):
    base = write_base(tmp_path / "base")
    data = write_jsonl(tmp_path / "map.jsonl", [qa(q, a) for q, a in MAPPING.items()])
    extra = {"lora.rank": lora_rank, "lora.dropout": 0.1, "optim.lr_decay_iters": 12}
    whole = sft_config(tmp_path / "a", base, data, **extra)
    finetune(whole)
    finetune(sft_config(tmp_path / "b", base, data, **extra, **{"train.max_iters": 6}))
    resumed = finetune(sft_config(tmp_path / "b", base, data, **extra, **{"train.resume": True}))
    assert resumed.step == 12
    from safetensors.torch import load_file

    a = load_file(tmp_path / "a" / "out" / "latest" / checkpoint.MODEL_FILE)
    b = load_file(tmp_path / "b" / "out" / "latest" / checkpoint.MODEL_FILE)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    start = load_file(base / "best" / checkpoint.MODEL_FILE)
    assert not torch.equal(a["transformer.h.0.attn.c_attn.weight"], start["transformer.h.0.attn.c_attn.weight"])
    if lora_rank:  # the frozen base is rebuilt from init_from on resume: another base must be refused
        other = write_base(tmp_path / "other", seed=1)
        with pytest.raises(checkpoint.CheckpointError, match="same init_from"):
            finetune(sft_config(tmp_path / "b", other, data, **extra, **{"train.resume": True, "train.max_iters": 14}))


def test_lora_trains_only_adapters_and_the_merged_model_matches(tmp_path):
    from gpt.config import LoRAConfig
    from gpt.lora import apply_lora, merged_state_dict

    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=20)
    model = GPT(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    names = apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=["c_attn", "mlp.c_proj"]))
    assert names == ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_proj",
                     "transformer.h.1.attn.c_attn", "transformer.h.1.mlp.c_proj"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    x = torch.randint(0, 20, (4, 16))
    torch.testing.assert_close(model(x)[0], _plain(cfg, merged_state_dict(model))(x)[0])  # B = 0: no change yet

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(5):
        _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad()
    merged = merged_state_dict(model)
    assert merged.keys() == before.keys()
    for k, v in model.state_dict().items():
        if "lora_" not in k:
            assert torch.equal(v, before[k.replace(".base.", ".")]), k  # frozen weights did not move
    assert not torch.equal(merged["transformer.h.0.attn.c_attn.weight"], before["transformer.h.0.attn.c_attn.weight"])
    torch.testing.assert_close(model.eval()(x)[0], _plain(cfg, merged)(x)[0], atol=1e-5, rtol=1e-5)

    with pytest.raises(ConfigError, match="match no Linear layer"):
        apply_lora(GPT(cfg), LoRAConfig(rank=2, targets=["q_proj"]))


def _plain(cfg: ModelConfig, state: dict) -> GPT:
    model = GPT(cfg)
    checkpoint.load_state_checked(model, state, "merged")
    return model.eval()


# ---------------------------------------------------------------------------- other formats


def test_sharegpt_and_openai_records_give_the_tokens_of_messages_records(tmp_path):
    from gpt.config import SFTDataConfig
    from gpt.data.finetune_data import load_sft_data

    tpl = chat_template()
    turns = [("system", "be brief."), ("user", "cat?"), ("assistant", "dog."), ("user", "sun?"),
             ("assistant", "moon.")]
    messages = {"messages": [{"role": r, "content": c} for r, c in turns]}
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    sharegpt = {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    sharegpt_plain = {"conversations": [{"from": r, "value": c} for r, c in turns]}
    openai = {"messages": [{"role": "system", "content": [{"type": "text", "text": "be "},
                                                          {"type": "text", "text": "brief."}]},
                           {"role": "user", "content": "cat?", "name": "ann"},
                           {"role": "assistant", "content": "dog.", "weight": 1},
                           {"role": "user", "content": [{"type": "text", "text": "sun?"}]},
                           {"role": "assistant", "content": "moon.", "name": "bot", "weight": 1}]}
    weighted = json.loads(json.dumps(openai))
    weighted["messages"][2]["weight"] = 0  # shown as context, not learned
    path = write_jsonl(tmp_path / "mixed.jsonl", [messages, sharegpt, sharegpt_plain, openai, weighted])
    lines: list[str] = []
    data = load_sft_data(SFTDataConfig(path=str(path), val_path=str(path)), tpl, 100, False, lines.append)
    assert lines[0] == f"data: {path}: read as 2 messages, 2 sharegpt, 1 messages with weight-0 turns"
    assert sum(str(path) in line for line in lines) == 2  # once per file (here both train and val)

    reference = data.train[0]
    for other in data.train[1:4]:
        assert other.ids.tolist() == reference.ids.tolist() and other.mask.tolist() == reference.mask.tolist()
    w = data.train[4]
    assert w.ids.tolist() == reference.ids.tolist()
    assert tpl.tok.decode(reference.ids[reference.mask].tolist()) == "dog.<|end|>moon.<|end|>"
    assert tpl.tok.decode(w.ids[w.mask].tolist()) == "moon.<|end|>"  # weight 0: no loss on "dog."


BAD_FORMATS = [
    ({"conversations": [{"from": "bot", "value": "x"}, {"from": "gpt", "value": "y"}]}, "message 1: unknown 'from' 'bot'"),
    ({"conversations": [{"from": "human"}, {"from": "gpt", "value": "y"}]},
     "message 1: expected an object with 'from' and 'value'"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{}"}]},
     "message 2: role 'function_call' is not supported: write calls as an assistant"),
    ({"conversations": "not json"}, "'conversations' is text that is not a JSON list"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y", "tool_call_id": "c"},
                   {"role": "assistant", "content": "z"}]}, "message 2: a tool message must answer the tool_calls"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                      "tool_calls": [{"id": "1"}]}]},
     "message 2: tool call 1: expected"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]},
                   {"role": "assistant", "content": "z"}]}, "message 1: content part 1 of type 'image_url' is not"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z", "weight": 2}]},
     "message 2: 'weight' must be 0 or 1"),
    ({"messages": [{"role": "user", "content": "x", "weight": 1}, {"role": "assistant", "content": "z"}]},
     "message 1: 'weight' is only allowed on assistant messages"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z", "weight": 0}]},
     "every assistant message has weight 0"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "z"}],
      "tools": [{"type": "function"}]}, "tools[0]: expected {\"type\": \"function\""),
    ({"messages": [{"role": "user", "content": "x", "name": 3}, {"role": "assistant", "content": "z"}]},
     "message 1: 'name' must be text"),
    ({"messages": [{"role": "user", "content": [{"text": "x"}]}, {"role": "assistant", "content": "z"}]},
     "message 1: content part 1: expected"),
]


def test_malformed_sharegpt_and_openai_records_are_file_line_errors(tmp_path):
    from gpt.data.finetune_data import load_file

    tpl = chat_template()
    path = write_jsonl(tmp_path / "bad.jsonl", [qa("cat", "dog")] + [row for row, _ in BAD_FORMATS])
    loaded = load_file(str(path), "auto", tpl, 49, False)
    assert len(loaded.records) == 1
    assert [where for where, _ in loaded.invalid] == [f"{path}:{i}" for i in range(2, len(BAD_FORMATS) + 2)]
    for (_, message), (_, expected) in zip(loaded.invalid, BAD_FORMATS):
        assert message.startswith(expected), message


def test_the_default_training_window_is_the_base_block_size_capped_at_4096():
    from gpt.train.sft import training_window

    cfg = FinetuneConfig()
    assert training_window(cfg, ModelConfig(block_size=64)) == 64
    assert training_window(cfg, ModelConfig(block_size=131072)) == 4096  # Llama 3.2's max_position_embeddings
    cfg.sft.block_size = 8192
    assert training_window(cfg, ModelConfig(block_size=131072)) == 8192  # asked for: allowed up to block_size
    with pytest.raises(ConfigError, match="exceeds the block size"):
        training_window(cfg, ModelConfig(block_size=64))
