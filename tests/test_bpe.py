"""The custom byte-level BPE tokenizer: lossless, deterministic, tiktoken-fast, and kept with every checkpoint."""

import json
import os
import random

import pytest
from conftest import ROOT, run_script, tiny_overrides

from gpt import checkpoint
from gpt.config import ConfigError, PretrainConfig, load_config
from gpt.data import corpus
from gpt.data.bpe import GPT2_PATTERN, CorpusError, train_bpe
from gpt.data.tokenizer import EOT, BPETokenizer, from_spec
from gpt.errors import UserError
from gpt.train.pretrain import pretrain

RANGES = [(0x20, 0x7E), (0x00, 0x1F), (0x7F, 0x9F), (0xA0, 0x24F), (0x300, 0x36F), (0x370, 0x4FF), (0x600, 0x6FF),
          (0x900, 0x97F), (0x3040, 0x30FF), (0x4E00, 0x9FFF), (0xAC00, 0xD7A3), (0x200B, 0x200F), (0xE000, 0xE0FF),
          (0x1F300, 0x1FAFF), (0x0, 0x10FFFF)]


def random_text(rng: random.Random, n: int = 60) -> str:
    out = []
    while len(out) < n:
        lo, hi = rng.choice(RANGES)
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:  # lone surrogates: see test_lone_surrogates_become_replacement_characters
            out.append(chr(c) * rng.choice([1, 1, 1, 2, 3]))
    return "".join(out)


@pytest.fixture(scope="module")
def bpe_tok(tmp_path_factory) -> BPETokenizer:
    text = (ROOT / "data" / "shakespeare" / "input.txt")
    if not text.is_file():
        pytest.skip("Tiny Shakespeare is not available offline")
    return train_bpe([text.read_text(encoding="utf-8")[:50_000]], 600, log=lambda line: None)


def test_any_unicode_round_trips(bpe_tok):
    rng = random.Random(0)
    for _ in range(300):
        s = random_text(rng)
        assert bpe_tok.decode(bpe_tok.encode(s)) == s
    assert bpe_tok.decode(bpe_tok.encode("")) == ""


def test_lone_surrogates_become_replacement_characters(bpe_tok):
    # UTF-8 cannot hold them; like tiktoken's GPT-2, each becomes U+FFFD and the rest is kept
    assert bpe_tok.decode(bpe_tok.encode("a\ud800b\udfff")) == "a\ufffdb\ufffd"


def test_learned_merges_compress_and_specials_follow_the_vocabulary(bpe_tok):
    text = "First Citizen:\nWe are accounted poor citizens, the patricians good."
    assert len(bpe_tok.encode(text)) < len(text.encode()) / 2
    assert bpe_tok.vocab_size == 600 and bpe_tok.eot_id == 599 and bpe_tok.pattern == GPT2_PATTERN
    assert bpe_tok.encode(EOT) != [599]  # special-token text in user data stays plain text
    bpe_tok2 = from_spec(json.loads(json.dumps(bpe_tok.to_spec())))
    assert bpe_tok2.add_special_tokens(["<|end|>"]) == {"<|end|>": 600}
    assert from_spec(bpe_tok2.to_spec()).special_tokens == {"<|end|>": 600}


def test_hf_form_encodes_exactly_like_tiktoken_on_random_unicode(bpe_tok):
    from gpt.convert import bpe_to_hf

    hf = bpe_to_hf(bpe_tok, {EOT: bpe_tok.eot_id})
    rng = random.Random(1)
    for _ in range(300):
        s = random_text(rng)
        assert hf.encode(s).ids == bpe_tok.encode(s), repr(s)


def test_two_trainings_and_two_preparations_are_identical(tmp_path, tiny_corpus):
    texts = tiny_corpus.read_text(encoding="utf-8")[:30_000]
    a = train_bpe(iter([texts[:10_000], texts[10_000:]]), 500, log=lambda line: None)
    b = train_bpe(iter([texts[:10_000], texts[10_000:]]), 500, log=lambda line: None)
    assert a.tokens == b.tokens
    folders = []
    for name in ("a", "b"):
        cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path / name, tiny_corpus, **{
            "data.tokenizer": "bpe", "data.bpe_vocab_size": 400}))
        folders.append(corpus.ensure_prepared(cfg.data, log=lambda line: None))
    for f in ("train.bin", "val.bin", "meta.json"):
        assert (folders[0] / f).read_bytes() == (folders[1] / f).read_bytes(), f


def test_preparation_reports_compression_and_rebuilds_when_settings_change(tmp_path, tiny_corpus):
    lines: list[str] = []
    args = tiny_overrides(tmp_path, tiny_corpus, **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 400})
    cfg = load_config(PretrainConfig, None, args)
    folder = corpus.ensure_prepared(cfg.data, log=lines.append)
    assert any("bytes/token" in line and "GPT-2's tokenizer" in line for line in lines), lines
    lines.clear()
    corpus.ensure_prepared(cfg.data, log=lines.append)
    assert lines == []  # cached
    cfg = load_config(PretrainConfig, None, args + ["data.bpe_vocab_size=450"])
    corpus.ensure_prepared(cfg.data, log=lines.append)
    assert any("prepared from other settings" in line for line in lines)
    assert corpus.read_data_meta(folder)["vocab_size"] == 450


def test_tiny_model_trains_samples_offline_and_resumes(tmp_path, tiny_corpus):
    args = tiny_overrides(tmp_path, tiny_corpus, **{"data.tokenizer": "bpe", "data.bpe_vocab_size": 320,
                                                    "train.max_iters": 6, "train.eval_interval": 6})
    assert pretrain(load_config(PretrainConfig, None, args)).step == 6
    resumed = pretrain(load_config(PretrainConfig, None, args + ["train.max_iters=10", "train.resume=true"]))
    assert resumed.step == 10
    tok = checkpoint.load_checkpoint(tmp_path / "out", prefer="latest").tokenizer
    assert tok.to_spec()["kind"] == "bpe" and tok.vocab_size == 320
    offline = {**os.environ, "TIKTOKEN_CACHE_DIR": str(tmp_path / "no-cache"), "HF_HUB_OFFLINE": "1"}
    proc = run_script("sample.py", "--ckpt", tmp_path / "out", "--prompt", "ROMEO:", "--max-new-tokens", 8,
                      "--temperature", 0, "--json", env=offline)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["token_ids"]


def test_bad_vocab_sizes_and_empty_corpus_are_one_line_errors(tmp_path, tiny_corpus):
    with pytest.raises(ConfigError, match=r"key 'data.bpe_vocab_size' must be >= 257, got 256"):
        load_config(PretrainConfig, None, tiny_overrides(tmp_path, tiny_corpus, **{
            "data.tokenizer": "bpe", "data.bpe_vocab_size": 256}))
    small = tmp_path / "small.txt"
    small.write_text("abab abab\n" * 50, encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bpe_vocab_size=5000 is more than this corpus supports: it yields only \d+"):
        train_bpe([small.read_text()], 5000, log=lambda line: None)
    empty = tmp_path / "empty.txt"
    empty.write_text("", encoding="utf-8")
    cfg = load_config(PretrainConfig, None, tiny_overrides(tmp_path, empty, **{"data.tokenizer": "bpe"}))
    with pytest.raises(UserError, match="is empty"):
        corpus.ensure_prepared(cfg.data, log=lambda line: None)
    with pytest.raises(ConfigError, match="data.bpe_pattern"):
        train_bpe(["some text"], 300, pattern="(unclosed", log=lambda line: None)


def test_a_custom_pattern_is_used_by_training_encoding_and_export(bpe_tok):
    from gpt.convert import bpe_to_hf

    text = "In 1599 the Globe opened; 1600 and 1601 followed. " * 40
    digits = train_bpe([text], 280, pattern=r"\p{N}{1,3}| ?[^\s\p{N}]+|\s+", log=lambda line: None)
    # numbers split into groups of at most three digits, so no token holds four
    assert all(len(digits.decode([i])) <= 3 for i in digits.encode("1599 1600 1601") if digits.decode([i]).isdigit())
    assert digits.decode(digits.encode("12345")) == "12345" and len(digits.encode("12345")) >= 2
    gpt2_split = train_bpe([text], 290, log=lambda line: None)  # GPT-2's pattern keeps digit runs together
    assert any(sum(c.isdigit() for c in gpt2_split.decode([i])) >= 4 for i in gpt2_split.encode("1599 1600 1601"))
    hf = bpe_to_hf(digits, {EOT: digits.eot_id})
    for s in ("In 1599, 123456 naïve 東京", text[:200]):
        assert hf.encode(s).ids == digits.encode(s)


def test_continued_pretraining_of_a_bpe_or_char_checkpoint_encodes_new_text_with_its_tokenizer(tmp_path, tiny_corpus):
    text = tiny_corpus.read_text(encoding="utf-8")
    first, second = tmp_path / "first.txt", tmp_path / "second.txt"
    first.write_text(text[:50_000], encoding="utf-8")
    # new text: the first part's lines in reverse order (the char model's vocabulary covers it), then
    # more Shakespeare, which a BPE trained on it would merge differently
    second.write_text("\n".join(text[:50_000].splitlines()[::-1]) + text[50_000:], encoding="utf-8")
    more_text = {"char": tmp_path / "reversed.txt", "bpe": second}
    more_text["char"].write_text("\n".join(text[:50_000].splitlines()[::-1]), encoding="utf-8")

    def tokenizer_of(run):
        return sorted(run.rglob("tokenizer.json"))[0].read_bytes()

    for tokenizer in ("bpe", "char"):
        settings = {"data.tokenizer": tokenizer, "data.bpe_vocab_size": 320, "train.max_iters": 4}
        base, fresh, more = tmp_path / tokenizer, tmp_path / f"{tokenizer}-fresh", tmp_path / f"{tokenizer}-more"
        pretrain(load_config(PretrainConfig, None, tiny_overrides(base, first, **settings)))
        pretrain(load_config(PretrainConfig, None, tiny_overrides(fresh, second, **settings)))
        pretrain(load_config(PretrainConfig, None, tiny_overrides(more, more_text[tokenizer], **settings, **{
            "data.dataset": "second", "init_from": base / "out"})))
        assert tokenizer_of(more) == tokenizer_of(base)
        if tokenizer == "bpe":
            assert tokenizer_of(fresh) != tokenizer_of(base)  # what it would have trained on the new text
    unknown = tmp_path / "unknown.txt"
    unknown.write_text(text[:20_000] + "\u00e9" * 5, encoding="utf-8")  # a character the vocabulary lacks
    with pytest.raises(UserError, match="unknown.txt"):
        pretrain(load_config(PretrainConfig, None, tiny_overrides(tmp_path / "char-unknown", unknown, **{
            "data.dataset": "unknown", "init_from": tmp_path / "char" / "out", "train.max_iters": 2})))
