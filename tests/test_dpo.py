"""DPO: the loss and rewards against the formulas, the reply-only mask, the reference (init, precompute,
LoRA with adapters off), learning a preference, exact resume, and the record formats it reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file as load_tensors
from conftest import CHAT_CHARS as CHARS
from conftest import chat_template, sft_config, write_base, write_jsonl

from gpt import checkpoint
from gpt.config import ConfigError, DPOConfig, LoRAConfig, ModelConfig, SFTDataConfig
from gpt.data.corpus import DataError
from gpt.data.examples import Pair, encode_reply
from gpt.data.finetune_data import load_file, load_sft_data
from gpt.lora import apply_lora
from gpt.model import GPT, IGNORE_INDEX
from gpt.train.dist import Dist
from gpt.train.dpo import (
    REFERENCE_FILE,
    DPOLoss,
    PairBatch,
    PairBatches,
    adapters_off,
    frozen_copy,
    precompute,
    sequence_logps,
)
from gpt.train.sft import finetune, greedy_reply

WORDS = ["cat", "sun", "red", "one", "up", "hot", "big", "sea", "day", "fox", "owl", "ink", "elm", "bay", "cup",
         "jam", "kit", "log", "mud", "nut", "oak", "pin", "rag", "tan"]


def pair(word: str) -> dict:
    """The synthetic preference: reply "yes <word>." rather than "no <word>."."""
    return {"prompt": f"{word}?", "chosen": f"yes {word}.", "rejected": f"no {word}."}


def dpo_run(tmp: Path, base: Path, train: Path, val: Path, **extra):
    values = {"data.val_path": val, "train.batch_size": 4, "train.eval_batch_size": 8, "optim.lr": 3e-3,
              "dpo.beta": 0.5, **extra}
    return sft_config(tmp, base, train, **values)


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def tiny_model(seed: int = 0, vocab: int | None = None) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(n_layer=2, n_head=2, n_embd=16, block_size=48, vocab_size=vocab or len(CHARS) + 4))


def pair_batches(words=WORDS[:6], **kw) -> PairBatches:
    tpl = chat_template()
    pairs = []
    for w in words:
        p = pair(w)
        pairs.append(Pair(*(encode_reply(tpl, [{"role": "user", "content": p["prompt"]}],
                                         [{"role": "assistant", "content": p[side]}], 49)[0]
                            for side in ("chosen", "rejected"))))
    return PairBatches(pairs, pairs[:2], batch_size=kw.pop("batch_size", 3), device=torch.device("cpu"), **kw)


def test_packed_pairs_give_the_same_sequence_log_probs_in_fewer_rows():
    torch.manual_seed(0)
    model = tiny_model().eval()
    words = ["a", "hippopotamus", "b", "kaleidoscope", "c", "d"]  # short and long replies: room to share rows
    padded, packed = pair_batches(words, batch_size=6), pair_batches(words, batch_size=6, packing=True)
    a, b = padded.train_batch(0, 0), packed.train_batch(0, 0)
    assert b.x.shape[1] == a.x.shape[1] and b.x.shape[0] < a.x.shape[0] == 12  # rows as long, fewer of them
    assert torch.allclose(sequence_logps(model, a), sequence_logps(model, b), atol=1e-5)
    last = list(packed.split_batches("val", 3))[-1]  # 2 validation pairs in a batch of 3: one padding pair
    assert (last.index < 0).sum() == 1
    assert torch.allclose(sequence_logps(model, last), sequence_logps(model, list(padded.split_batches("val", 3))[-1]),
                          atol=1e-5)


# ---------------------------------------------------------------------------- the objective


def logsig(v: float) -> float:
    return -math.log1p(math.exp(-v))


class FixedLogps(torch.nn.Module):
    """A stand-in model whose token losses are given: sequence log-probs exactly as built by hand."""

    def __init__(self, token_loss: torch.Tensor):
        super().__init__()
        self.token_loss = token_loss

    def forward(self, x, y, reduction, doc_ids=None):
        return None, torch.where(y != IGNORE_INDEX, self.token_loss, 0.0)


@pytest.mark.parametrize("loss,eps", [("sigmoid", 0.0), ("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0)])
def test_loss_and_rewards_equal_the_formulas(loss, eps):
    """A hand-built batch of 3 pairs + 1 padding pair against the papers' formulas computed in floats here."""
    beta = 0.3
    cfg = DPOConfig(beta=beta, loss=loss, label_smoothing=eps)
    policy = {"chosen": [-4.0, -9.5, -2.25], "rejected": [-6.0, -3.5, -2.25]}
    ref = {"chosen": [-5.0, -7.0, -2.0], "rejected": [-5.5, -4.0, -2.0]}
    B, T = 4, 3
    y = torch.full((2 * B, T), IGNORE_INDEX)
    token_loss = torch.zeros(2 * B, T)
    for side, offset in (("chosen", 0), ("rejected", B)):
        for i, value in enumerate(policy[side]):  # a reply of two tokens and a prompt token (ignored)
            y[offset + i, 1:] = 1
            token_loss[offset + i] = torch.tensor([99.0, -value / 2, -value / 2])
    batch = PairBatch(torch.zeros(2 * B, T, dtype=torch.long), y, torch.tensor([0, 1, 2, -1]), "train")
    ref_logps = torch.tensor(ref["chosen"] + [0.0] + ref["rejected"] + [0.0])
    objective = DPOLoss(cfg, lambda b: ref_logps)
    loss_sum, stats = objective(FixedLogps(token_loss), batch)

    def logsig(v: float) -> float:
        return -math.log1p(math.exp(-v))

    expected, chosen, rejected, accuracy = 0.0, 0.0, 0.0, 0.0
    for pc, pr, rc, rr in zip(policy["chosen"], policy["rejected"], ref["chosen"], ref["rejected"]):
        d = (pc - rc) - (pr - rr)
        if loss == "sigmoid":
            expected += -(1 - eps) * logsig(beta * d) - eps * logsig(-beta * d)
        elif loss == "ipo":
            expected += (d - 1 / (2 * beta)) ** 2
        else:
            expected += max(0.0, 1 - beta * d)
        chosen += beta * (pc - rc)
        rejected += beta * (pr - rr)
        accuracy += 1.0 if pc - rc > pr - rr else 0.5 if pc - rc == pr - rr else 0.0
    assert objective.units(batch) == 3
    assert loss_sum.item() == pytest.approx(expected, rel=1e-6, abs=1e-6)
    assert stats.tolist() == pytest.approx([chosen, rejected, chosen - rejected, accuracy], abs=1e-6)
    assert accuracy == 1.5  # one win, one loss, one tie (counted half)


def test_sequence_log_probs_sum_the_reply_tokens_of_the_model():
    """On a real model: the summed log-prob equals log_softmax gathered by hand over the reply tokens."""
    model = tiny_model()
    b = pair_batches().train_batch(0, 0)
    with torch.no_grad():
        logp = torch.log_softmax(model(b.x)[0].double(), -1)
        got = sequence_logps(model, b)
    for r in range(b.x.shape[0]):
        keep = b.y[r] != IGNORE_INDEX
        assert 0 < keep.sum() < (b.x[r] != 0).sum()  # some tokens count, not all
        expected = logp[r][keep].gather(1, b.y[r][keep, None]).sum().item()
        assert got[r].item() == pytest.approx(expected, rel=1e-5)


def test_only_reply_tokens_count():
    tpl = chat_template()
    prompt = [{"role": "user", "content": "which?"}]
    chosen, rejected = [{"role": "assistant", "content": "this one."}], [{"role": "assistant", "content": "no."}]
    ex, _ = encode_reply(tpl, prompt, chosen, 100)
    assert tpl.tok.decode(ex.ids[ex.mask].tolist()) == "this one.<|end|>"
    other, _ = encode_reply(tpl, [{"role": "user", "content": "witch?"}], chosen, 100)
    assert other.mask.tolist() == ex.mask.tolist()  # another prompt token: the same mask
    # an assistant turn inside the prompt is context, not a reply
    multi, _ = encode_reply(tpl, [*prompt, {"role": "assistant", "content": "hm."}, *prompt], chosen, 100)
    assert tpl.tok.decode(multi.ids[multi.mask].tolist()) == "this one.<|end|>"

    model = tiny_model()

    def logps(chosen_text: str, prompt_text: str = "which?") -> torch.Tensor:
        p = [{"role": "user", "content": prompt_text}]
        c, r = (encode_reply(tpl, p, [{"role": "assistant", "content": t}], 100)[0] for t in (chosen_text, "no."))
        batches = PairBatches([Pair(c, r)], [Pair(c, r)], batch_size=1, device=torch.device("cpu"))
        return sequence_logps(model, batches.collate([0], "train")).detach()

    a, b = logps("this one."), logps("that one.")
    assert a[1] == b[1] and a[0] != b[0]  # changing the chosen reply changes only the chosen log-prob

    # the gradient reaches the logits at reply positions only
    batches = PairBatches([Pair(ex, encode_reply(tpl, prompt, rejected, 100)[0])], [], batch_size=1,
                          device=torch.device("cpu"))
    batch = batches.collate([0], "train")
    logits, _ = model(batch.x)
    logits.retain_grad()
    from gpt.model import cross_entropy

    cross_entropy(logits, batch.y, "none").sum().backward()
    touched = logits.grad.abs().sum(-1) > 0
    assert torch.equal(touched, batch.y != IGNORE_INDEX)


# ---------------------------------------------------------------------------- the reference


def test_init_and_precompute_give_identical_reference_log_probs(tmp_path):
    model = tiny_model()
    batches = pair_batches(batch_size=3, eval_batch_size=2)
    init = frozen_copy(model, torch.device("cpu"))
    lines: list[str] = []
    cached = precompute(model, batches, tmp_path, torch.device("cpu"), torch.float32, Dist(), lines.append)
    assert "cached in" in lines[-1]
    for step in range(3):
        b = batches.train_batch(step, 0)
        with torch.no_grad():
            assert torch.allclose(cached(b), init(b), rtol=0, atol=1e-6)
    val = next(batches.val_batches())
    with torch.no_grad():
        assert torch.allclose(cached(val), init(val), rtol=0, atol=1e-6)

    # the cache is reused while data and weights are the same, recomputed when the weights change
    again = precompute(model, batches, tmp_path, torch.device("cpu"), torch.float32, Dist(), lines.append)
    assert "reference log-probs from" in lines[-1] and torch.equal(again(b), cached(b))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    precompute(model, batches, tmp_path, torch.device("cpu"), torch.float32, Dist(), lines.append)
    assert "cached in" in lines[-1]
    assert set(load_tensors(tmp_path / REFERENCE_FILE)) == {"train", "val"}


def test_lora_reference_is_the_base_model():
    model = tiny_model()
    base = frozen_copy(model, torch.device("cpu"))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, dropout=0.5))
    with torch.no_grad():  # adapters that change the output
        for name, p in model.named_parameters():
            if name.endswith("lora_B"):
                p.normal_()
    reference = adapters_off(model)
    b = pair_batches().train_batch(0, 0)
    with torch.no_grad():
        assert torch.equal(reference(b), base(b))
        assert not torch.allclose(sequence_logps(model.eval(), b), base(b))
    assert model.training is False
    model.train()
    with torch.no_grad():
        reference(b)
    assert model.training  # the mode is restored


# ---------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def preference_files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pref")
    base = write_base(tmp / "base")
    train = write_jsonl(tmp / "train.jsonl", [pair(w) for w in WORDS[:16]])
    val = write_jsonl(tmp / "val.jsonl", [pair(w) for w in WORDS[16:]])
    return tmp, base, train, val


def test_dpo_raises_held_out_preference_accuracy_and_moves_greedy_replies(preference_files):
    tmp, base, train, val = preference_files
    cfg = dpo_run(tmp / "learn", base, train, val, **{"train.max_iters": 40, "train.eval_interval": 20})
    template = None
    loaded = checkpoint.load_checkpoint(base)
    model, tok = loaded.model, loaded.tokenizer
    from gpt.data.chat_template import ChatTemplate
    from gpt.train.sft import add_chat_tokens

    add_chat_tokens(model, tok, cfg.train.seed)
    template = ChatTemplate(tok)
    held_out = [[{"role": "user", "content": f"{w}?"}] for w in WORDS[16:]]
    before = [greedy_reply(model, template, p, 6) for p in held_out]

    result = finetune(cfg)
    assert result.step == 40
    evals = [m for m in metrics(Path(cfg.out_dir)) if "val_accuracy" in m]
    assert evals[0]["iter"] == 0 and evals[0]["val_accuracy"] == 0.5  # policy = reference: chance
    assert evals[-1]["val_accuracy"] >= 0.9 and evals[-1]["val_margin"] > 0
    assert evals[-1]["val_reward_chosen"] > evals[-1]["val_reward_rejected"]
    logged = [m for m in metrics(Path(cfg.out_dir)) if "accuracy" in m]
    assert logged and {"loss", "reward_chosen", "reward_rejected", "margin"} <= set(logged[-1])

    loaded = checkpoint.load_checkpoint(Path(cfg.out_dir) / "latest")
    trained, tok = loaded.model, loaded.tokenizer
    after = [greedy_reply(trained, ChatTemplate(tok), p, 6) for p in held_out]
    assert sum(r.startswith("yes") for r in after) > sum(r.startswith("yes") for r in before)
    assert sum(r.startswith("yes") for r in after) >= 0.75 * len(held_out), after


@pytest.mark.parametrize("reference,lora", [("init", 0), ("precompute", 0), ("init", 4)])
def test_resume_is_bit_exact(preference_files, tmp_path, reference, lora, capsys):
    _, base, train, val = preference_files
    extra = {"dpo.reference": reference, "lora.rank": lora, "train.max_iters": 6, "train.eval_interval": 3,
             "train.grad_accum": 2, "optim.lr_decay_iters": 6}
    finetune(dpo_run(tmp_path / "a", base, train, val, **extra))
    finetune(dpo_run(tmp_path / "b", base, train, val, **{**extra, "train.max_iters": 3}))
    capsys.readouterr()
    resumed = finetune(dpo_run(tmp_path / "b", base, train, val, **{**extra, "train.resume": True}))
    if reference == "precompute":  # the resumed run reads the cache instead of recomputing it
        assert "dpo: reference log-probs from" in capsys.readouterr().out
    assert resumed.step == 6
    a = load_tensors(tmp_path / "a" / "out" / "latest" / checkpoint.MODEL_FILE)
    b = load_tensors(tmp_path / "b" / "out" / "latest" / checkpoint.MODEL_FILE)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    last = lambda out: [m for m in metrics(out) if m.get("iter") == 6]  # noqa: E731
    assert last(tmp_path / "a" / "out")[-1]["val_loss"] == last(tmp_path / "b" / "out")[-1]["val_loss"]
    assert (tmp_path / "b" / "out" / REFERENCE_FILE).is_file() == (reference == "precompute")


def test_dpo_config_and_mixed_files_are_errors(preference_files, tmp_path):
    _, base, train, val = preference_files
    with pytest.raises(ConfigError, match="dpo.beta"):
        finetune(dpo_run(tmp_path, base, train, val, **{"dpo.beta": 0}))
    with pytest.raises(ConfigError, match="label_smoothing applies to dpo.loss=sigmoid"):
        finetune(dpo_run(tmp_path, base, train, val, **{"dpo.loss": "ipo", "dpo.label_smoothing": 0.1}))
    with pytest.raises(ConfigError, match="train_on_prompt"):
        finetune(dpo_run(tmp_path, base, train, val, **{"sft.train_on_prompt": True}))
    mixed = write_jsonl(tmp_path / "mixed.jsonl", [pair("cat"), {"prompt": "a", "response": "b"}])
    with pytest.raises(DataError, match="preference pairs mixed with SFT records"):
        load_sft_data(SFTDataConfig(path=str(mixed), val_path=str(mixed)), chat_template(), 49, False, lambda s: None)
    with pytest.raises(ConfigError, match="data.canaries plants text records"):
        load_sft_data(SFTDataConfig(path=str(train), val_path=str(val), canaries=2), chat_template(), 49, False,
                      lambda s: None)


# ---------------------------------------------------------------------------- preference records


def test_preference_formats_give_the_same_pairs(tmp_path):
    tpl = chat_template()
    plain = {"prompt": "cat?", "chosen": "yes.", "rejected": "no."}
    user = [{"role": "user", "content": "cat?"}]
    trl = {"prompt": user, "chosen": [{"role": "assistant", "content": "yes."}],
           "rejected": {"role": "assistant", "content": "no."}}
    openai = {"input": {"messages": user}, "preferred_output": [{"role": "assistant", "content": "yes."}],
              "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "no."}]}]}
    path = write_jsonl(tmp_path / "p.jsonl", [plain, trl, openai])
    lines: list[str] = []
    data = load_sft_data(SFTDataConfig(path=str(path), val_path=str(path)), tpl, 49, False, lines.append)
    assert data.preference and len(data.train_pairs) == 3 and not data.train
    assert lines[0] == (f"data: {path}: read as 1 prompt/chosen/rejected, 1 prompt/chosen/rejected "
                        "(conversational), 1 openai preference")
    first = data.train_pairs[0]
    for other in data.train_pairs[1:]:
        assert other.chosen.ids.tolist() == first.chosen.ids.tolist()
        assert other.chosen.mask.tolist() == first.chosen.mask.tolist()
        assert other.rejected.ids.tolist() == first.rejected.ids.tolist()
    assert tpl.tok.decode(first.rejected.ids[first.rejected.mask].tolist()) == "no.<|end|>"


BAD_PAIRS = [
    ({"prompt": "cat?", "chosen": "yes."}, "missing field 'rejected'"),
    ({"prompt": "cat?", "chosen": "same.", "rejected": "same."}, "'chosen' and 'rejected' are identical"),
    ({"prompt": "cat?", "chosen": "  ", "rejected": "no."}, "'chosen': empty reply"),
    ({"prompt": [{"role": "bot", "content": "x"}], "chosen": "a.", "rejected": "b."}, "message 1: unknown role 'bot'"),
    ({"prompt": "cat?", "chosen": [{"role": "user", "content": "a"}], "rejected": "b."},
     "'chosen': message 1: expected role 'assistant', got 'user'"),
    ({"chosen": "a.", "rejected": "b."}, "missing field 'prompt'"),
    ({"input": {"messages": [{"role": "user", "content": "x"}]}, "preferred_output": [{"role": "assistant",
                                                                                        "content": "a."}]},
     "missing field 'non_preferred_output'"),
    ({"input": {"messages": [{"role": "tool", "content": "x"}]}, "preferred_output": "a.",
      "non_preferred_output": "b."}, "message 1: a tool message needs the 'tool_call_id'"),
    ({"prompt": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "chosen": "a.",
      "rejected": "b."}, "the prompt must end with a user message"),
    ({"prompt": "cat?", "chosen": [{"role": "assistant", "content": ""}], "rejected": "b."},
     "'chosen': message 1: empty assistant response"),
]


def test_malformed_preference_records_are_file_line_errors(tmp_path):
    tpl = chat_template()
    path = write_jsonl(tmp_path / "bad.jsonl", [pair("cat")] + [row for row, _ in BAD_PAIRS])
    loaded = load_file(str(path), "preference", tpl, 49, False)
    assert len(loaded.records) == 1
    assert [where for where, _ in loaded.invalid] == [f"{path}:{i}" for i in range(2, len(BAD_PAIRS) + 2)]
    for (_, message), (_, expected) in zip(loaded.invalid, BAD_PAIRS):
        assert message.startswith(expected)
        assert "cat" not in message  # no record text in errors
    with pytest.raises(DataError, match=rf"{len(BAD_PAIRS)} of {len(BAD_PAIRS) + 1} records are invalid"):
        load_sft_data(SFTDataConfig(path=str(path), format="preference"), tpl, 49, False, lambda s: None)


def test_pairs_identical_once_truncated_are_refused_with_counts_or_skipped(tmp_path):
    tpl = chat_template()
    long = "the same long start of a reply " * 3  # the window ends before the replies differ
    rows = [pair("cat"), pair("sun"), {"prompt": "dog?", "chosen": long + "yes.", "rejected": long + "no."}]
    path = write_jsonl(tmp_path / "p.jsonl", rows)
    loaded = load_file(str(path), "preference", tpl, 49, False)
    assert len(loaded.records) == 2 and loaded.invalid == [
        (f"{path}:3", "'chosen' and 'rejected' are identical once cut to the 48-token window: nothing to prefer; "
                      "a larger model.block_size keeps them apart")]
    with pytest.raises(DataError, match="2 of 6 records are invalid"):  # train and val read the same file
        load_sft_data(SFTDataConfig(path=str(path), val_path=str(path)), tpl, 49, False, lambda s: None)
    lines: list[str] = []
    data = load_sft_data(SFTDataConfig(path=str(path), val_path=str(path), skip_invalid=True), tpl, 49, False,
                         lines.append)
    assert len(data.train_pairs) == 2 and any("skipped 2 of 6 invalid records" in line for line in lines)
    assert len(load_file(str(path), "preference", tpl, 400, False).records) == 3  # a window that holds them


def test_a_damaged_reference_cache_is_computed_again(tmp_path):
    model, batches = tiny_model(), pair_batches()
    logs: list[str] = []
    precompute(model, batches, tmp_path, torch.device("cpu"), torch.float32, Dist(), logs.append)
    cache = tmp_path / REFERENCE_FILE
    good = load_tensors(str(cache))
    cache.write_bytes(cache.read_bytes()[:-9])  # truncated
    lookup = precompute(model, batches, tmp_path, torch.device("cpu"), torch.float32, Dist(), logs.append)
    assert any(f"dpo: {cache} is unreadable" in line for line in logs)
    assert torch.equal(load_tensors(str(cache))["train"], good["train"])  # computed again, the same
    assert lookup(batches.train_batch(0, 0)).shape == (2 * batches.batch_size,)
