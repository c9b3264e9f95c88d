"""python -m gpt.eval: parity with transformers, the sliding window, bits per byte, SFT's token count,
and one-line errors for bad input. Every comparison runs in float32."""

import json
import math
import sys

import pytest
import torch

from gpt import checkpoint, convert
from gpt import eval as gpt_eval
from gpt.config import ModelConfig, to_dict
from gpt.data.chat_template import ChatTemplate
from gpt.data.finetune_data import load_file
from gpt.data.tokenizer import CharTokenizer
from gpt.infer.engine import complete
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT, IGNORE_INDEX
from gpt.train import dist as distributed
from gpt.train.loop import StepContext, TokenLoss, validation_loss
from gpt.train.sft import SFTBatches, add_chat_tokens

CHARS = sorted(set("abcdefghijklmnopqrstuvwxyz ABCDEFGHIJKLMNOPQRSTUVWXYZ.,?!:'\n-0123456789éïü"))
CPU = torch.device("cpu")


def tiny_model(block_size=16, vocab_size=len(CHARS), seed=0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(block_size=block_size, vocab_size=vocab_size, n_layer=2, n_head=2, n_embd=16)).eval()


@pytest.fixture(scope="module")
def char_ckpt(tmp_path_factory):
    """A random char-model checkpoint folder (no training needed: we compare numbers, not quality)."""
    folder = tmp_path_factory.mktemp("ckpt") / "run"
    model, tok = tiny_model(), CharTokenizer(CHARS)
    checkpoint.save_checkpoint(folder / "best", model.state_dict(), {"model": to_dict(model.config)}, tok)
    return folder


def run_cli(capsys, *argv):
    """(exit code, stdout, stderr) of python -m gpt.eval, in process."""
    try:
        gpt_eval.main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


# ---------------------------------------------------------------------------- numbers


def test_loss_equals_transformers_on_a_converted_gpt2(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    hf.save_pretrained(tmp_path / "hf")
    convert.from_hf(str(tmp_path / "hf"), tmp_path / "ours")
    text = "ROMEO: But, soft! what light through yonder window breaks? It is the east."
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    tok = checkpoint.load_checkpoint(tmp_path / "ours").tokenizer
    ids = torch.tensor([tok.encode(text)])
    assert ids.shape[1] <= 64  # one window: no sliding involved
    with torch.no_grad():
        expected = hf(ids, labels=ids).loss.item()
    code, out, _ = run_cli(capsys, "--ckpt", tmp_path / "hf", tmp_path / "ours", "--data", tmp_path / "t.txt", "--json")
    assert code == 0
    rows = [json.loads(line) for line in out.splitlines()]
    assert [r["ckpt"] for r in rows] == [str(tmp_path / "hf"), str(tmp_path / "ours")]
    for r in rows:
        assert r["tokens"] == ids.shape[1] - 1
        assert abs(r["loss"] - expected) < 1e-5, (r["loss"], expected)
        assert r["ppl"] == pytest.approx(math.exp(expected), rel=1e-4)


def reference_loss(model: GPT, ids: list[int], stride: int) -> tuple[float, int]:
    """Token by token: target t is predicted from the window its sliding-window rule assigns it."""
    W, total = model.config.block_size, 0.0
    for t in range(1, len(ids)):
        start = 0 if t <= W else stride * math.ceil((t - W) / stride)
        assert t - start >= min(t, W - stride + 1)  # at least block_size - stride tokens of context
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[start:t]]))
        total -= torch.log_softmax(logits[0, -1].double(), -1)[ids[t]].item()
    return total / (len(ids) - 1), len(ids) - 1


@pytest.mark.parametrize("stride", [16, 5, 2])
def test_sliding_window_matches_a_hand_rolled_reference_at_any_batch_size(stride):
    model, tok = tiny_model(), CharTokenizer(CHARS)
    text = "To be, or not to be, that is the question: whether tis nobler in the mind."
    expected, n = reference_loss(model, tok.encode(text), stride)
    losses = []
    for batch_size in (1, 3, 64):
        r = gpt_eval.evaluate(model, tok, [text], stride=stride, batch_size=batch_size)
        assert r.tokens == n
        losses.append(r.loss)
    assert losses == pytest.approx([expected] * 3, rel=1e-6)  # fp32 rounding of batched matmuls only


def test_stride_equal_to_block_size_scores_disjoint_windows():
    windows = gpt_eval.text_windows(list(range(50)), block_size=16, stride=16)
    assert [w.ids[0] for w in windows] == [0, 16, 32, 48]
    assert all(w.score.all() for w in windows)  # nothing is context only: the windows do not overlap
    assert sum(int(w.score.sum()) for w in windows) == 49


def test_bits_per_byte_by_hand_ascii_and_multibyte():
    model, tok = tiny_model(), CharTokenizer(CHARS)
    for text in ["Hello there, good friend.", "Café naïve, über alles: é é é!"]:
        r = gpt_eval.evaluate(model, tok, [text])
        scored = text[1:]  # the first character is context only
        assert r.tokens == len(scored)
        assert r.bytes == len(scored.encode("utf-8"))
        assert r.bpb == pytest.approx(r.loss / math.log(2) * r.tokens / r.bytes, rel=1e-9)
    assert r.bytes > r.tokens  # the multi-byte characters count their bytes


def test_max_tokens_scores_only_the_first_n_tokens():
    model, tok = tiny_model(), CharTokenizer(CHARS)
    text = "abcdefghij" * 10
    r = gpt_eval.evaluate(model, tok, [text], max_tokens=37, stride=4)
    assert r.tokens == 37 and r.bytes == 37


def chat_records(path):
    convs = [
        [{"role": "user", "content": "Spell love."}, {"role": "assistant", "content": "L-O-V-E."}],
        [{"role": "system", "content": "Brief."}, {"role": "user", "content": "Hi?"},
         {"role": "assistant", "content": "Hail!"}, {"role": "user", "content": "Again?"},
         {"role": "assistant", "content": "Good morrow."}],
        [{"role": "user", "content": "Tell me a long tale."}, {"role": "assistant", "content": "Once upon " * 6}],
    ]
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in convs), encoding="utf-8")
    return convs


def test_chat_records_score_exactly_what_sft_supervises(tmp_path):
    model, tok = tiny_model(block_size=64), CharTokenizer(CHARS)
    add_chat_tokens(model, tok)
    model.eval()
    chat_records(tmp_path / "chat.jsonl")
    template = ChatTemplate(tok)
    loaded = load_file(str(tmp_path / "chat.jsonl"), "chat", template, 65, train_on_prompt=False)
    examples = [e for r in loaded.records for e in r]
    assert loaded.truncated == 1  # the long tale is cut as SFT cuts it
    batches = SFTBatches(examples, examples, block_size=64, batch_size=2, device=CPU, eval_iters=100)
    sft_tokens = sum(int((b.y != IGNORE_INDEX).sum()) for b in batches.val_batches())
    sft_loss, _ = validation_loss(StepContext(model, TokenLoss(), CPU, torch.float32, distributed.Dist()), batches)

    r = gpt_eval.evaluate(model, tok, gpt_eval.read_data(tmp_path / "chat.jsonl"), batch_size=2)
    assert (r.tokens, r.conversations, r.truncated) == (sft_tokens, 3, 1)
    assert r.loss == pytest.approx(sft_loss, abs=1e-5)
    # bytes: the assistant turns' text, each <|end|> counted as one byte
    whole = loaded.conversations[:2]  # not truncated
    replies = [m["content"] for c in whole for m in c if m["role"] == "assistant"]
    assert gpt_eval.evaluate(model, tok, whole).bytes == sum(len(s.encode()) + 1 for s in replies)


def test_exact_match_compares_the_greedy_reply_with_the_reference():
    model, tok = tiny_model(block_size=32), CharTokenizer(CHARS)
    add_chat_tokens(model, tok)
    template = ChatTemplate(tok)
    prompt = [{"role": "user", "content": "Spell love."}]
    ids = template.encode(prompt, add_generation_prompt=True)
    greedy = complete(model, tok, ids, SamplingParams(temperature=0.0, max_tokens=6), stop_ids=template.stop_ids)[0].text
    assert greedy.strip()
    right = prompt + [{"role": "assistant", "content": greedy}]
    wrong = prompt + [{"role": "assistant", "content": greedy + "x"}]
    r = gpt_eval.evaluate(model, tok, [right, wrong, right], exact_match=True, max_new_tokens=6)
    assert r.exact_match == pytest.approx(2 / 3)
    assert gpt_eval.evaluate(model, tok, [right]).exact_match is None  # off by default: it generates


def test_instruction_records_and_text_records_in_one_file(tmp_path, char_ckpt, capsys):
    rows = [{"prompt": "Spell love.", "response": "L-O-V-E."}, {"text": "a plain document for scoring"}]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    code, out, _ = run_cli(capsys, "--ckpt", char_ckpt, "--data", tmp_path / "mixed.jsonl", "--json")
    assert code == 0
    r = json.loads(out)
    assert (r["conversations"], r["documents"]) == (1, 1)


def test_table_has_one_row_per_checkpoint_and_no_record_text(tmp_path, char_ckpt, capsys):
    chat_records(tmp_path / "chat.jsonl")
    code, out, err = run_cli(capsys, "--ckpt", char_ckpt, char_ckpt / "best", "--data", tmp_path / "chat.jsonl",
                             "--exact-match")
    assert code == 0, err
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["checkpoint", "loss", "ppl", "bits/byte"] and "exact match" in lines[0]
    assert len(lines) == 3 and lines[1].startswith(str(char_ckpt)) and lines[2].startswith(str(char_ckpt / "best"))
    assert "Hail" not in out + err and "love" not in out + err


# ---------------------------------------------------------------------------- bad input


def one_line_error(code, out, err, *words):
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    for w in words:
        assert w in err, err


def test_bad_inputs_are_one_line_errors(tmp_path, char_ckpt, capsys):
    good = tmp_path / "good.txt"
    good.write_text("some text to score here", encoding="utf-8")
    (tmp_path / "empty.txt").write_text("", encoding="utf-8")
    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.bin").write_bytes(b"\0")
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    (tmp_path / "odd.jsonl").write_text(json.dumps({"prompt": "Say 東京", "response": "ok"}) + "\n", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"messages": [{"role": "bot", "content": "x"}]}\n', encoding="utf-8")
    damaged = tmp_path / "damaged"
    (damaged / "best").mkdir(parents=True)
    for f in (char_ckpt / "best").iterdir():
        (damaged / "best" / f.name).write_bytes(f.read_bytes())
    weights = damaged / "best" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    ck = ["--ckpt", char_ckpt]
    one_line_error(*run_cli(capsys, *ck, "--data", tmp_path / "empty.txt"), "empty")
    one_line_error(*run_cli(capsys, *ck, "--data", tmp_path / "nothing"), "nothing")
    one_line_error(*run_cli(capsys, *ck, "--data", tmp_path / "empty.jsonl"), "empty.jsonl")
    one_line_error(*run_cli(capsys, *ck, "--data", tmp_path / "missing.txt"), "no such file")
    one_line_error(*run_cli(capsys, *ck, "--data", tmp_path / "bad.jsonl"), "bad.jsonl:1", "unknown role")
    code, out, err = run_cli(capsys, *ck, "--data", tmp_path / "odd.jsonl")
    one_line_error(code, out, err, "odd.jsonl:1", "cannot encode")
    assert "東" not in err  # record text never appears in an error
    one_line_error(*run_cli(capsys, "--ckpt", tmp_path / "nope", "--data", good), "nope", "no such")
    one_line_error(*run_cli(capsys, "--ckpt", damaged, "--data", good), "model.safetensors", "damaged")
    one_line_error(*run_cli(capsys, *ck, "--data", good, "--stride", 0), "--stride")
    one_line_error(*run_cli(capsys, *ck, "--data", good, "--stride", 17), "--stride", "16")


def test_long_runs_show_progress_on_a_terminal(tmp_path, char_ckpt, monkeypatch, capsys):
    import io

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"q {i}"}, {"role": "assistant", "content": "a"}]}) + "\n" for i in range(3)))
    monkeypatch.setattr(sys, "stderr", Terminal())
    gpt_eval.main(["--ckpt", str(char_ckpt), "--data", str(tmp_path / "chat.jsonl"), "--exact-match",
                   "--max-new-tokens", "2"])
    shown = sys.stderr.getvalue()
    assert "scoring" in shown and "exact match" in shown and "q 1" not in shown  # progress, never record text
