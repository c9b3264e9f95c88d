"""The workflows on imported model families, each on a tiny random model: a Llama (untied head, GQA,
llama3 rotary scaling) and a Gemma 3 (sliding-window layers, QK-norm, soft-cap, GeGLU), written as Hugging
Face folders by our exporter (no transformers needed here; tests/test_families.py holds them against
transformers) and imported with `python -m gpt.convert from-hf`. SFT (full, LoRA on the fused
projections), DPO, exact resume, `gpt.eval`, `gpt.audit`, redaction at preparation, the server, int8
decoding, `init_from: hf://...` downloads on request only, and the KV cache bounded by the decoding context.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import Running, qa, run_in_process, sft_config, tiny_overrides, write_jsonl
from safetensors.torch import load_file

from gpt import audit, checkpoint, convert
from gpt import eval as gpt_eval
from gpt.checkpoint import CheckpointError, load_checkpoint
from gpt.config import ModelConfig, PretrainConfig, load_config
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import HFTokenizer
from gpt.infer.engine import DEFAULT_MAX_MODEL_LEN, Engine, context_length, generate
from gpt.infer.sampling import SamplingError, SamplingParams
from gpt.infer.weights import prepare_for_decoding
from gpt.model import GPT, KVCache
from gpt.train.pretrain import pretrain
from gpt.train.sft import add_chat_tokens, finetune

hf_tokenizers = pytest.importorskip("tokenizers")

SHAPE = dict(n_layer=2, n_head=4, n_kv_head=2, head_dim=8, n_embd=32, intermediate_size=64, block_size=256,
             dropout=0.0, bias=False, norm="rmsnorm", position="rope")  # what an imported config spells out
FAMILIES = {
    "llama": dict(mlp="swiglu", tie_embeddings=False, rope_theta=5e5, rope_scaling="llama3", rope_factor=8.0,
                  rope_original_context=32),
    "gemma3": dict(mlp="geglu", qk_norm=True, post_norms=True, embed_scale=True, norm_offset=1.0,
                   norm_eps=1e-6, logit_softcap=30.0, sliding_window=8, sliding_window_pattern=2,
                   rope_theta=1e5, rope_local_theta=1e4),
}
TEXT = ("The quick brown fox jumps over the lazy dog. Write to ana@example.com or call 555-0100!\n"
        "Pack my box with five dozen liquor jugs; sphinx of black quartz, judge my vow.\n") * 20
WORDS = ["cat", "sun", "red", "one", "up", "hot", "yes", "big"]
GREEDY = SamplingParams(temperature=0)
RUN = {"train.max_iters": 4, "train.eval_interval": 2, "train.log_interval": 1, "train.batch_size": 2,
       "train.threads": 1, "sft.block_size": 48, "optim.lr_decay_iters": 4, "optim.warmup_iters": 1}


def build_tokenizer(folder: Path) -> None:
    """A ~300-token byte-level BPE saved as a hub folder ships it (tokenizer.json + tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.save(str(folder / "tokenizer.json"))
    template = "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "chat_template": template}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def lively(model: GPT) -> GPT:
    """Weights large enough for confident predictions (near-flat logits hide decoding bugs)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, (3.0 if "lm_head" in name else 1.0) / p.shape[-1] ** 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict[str, Path]:
    """family -> our checkpoint imported from its Hugging Face folder ("hf_<family>")."""
    root = tmp_path_factory.mktemp("families")
    (root / "tok").mkdir()
    build_tokenizer(root / "tok")
    tok = HFTokenizer.from_folder(root / "tok")
    out = {}
    for name, options in FAMILIES.items():
        torch.manual_seed(0)
        model = lively(GPT(ModelConfig(**SHAPE, **options, vocab_size=tok.vocab_size)))
        checkpoint.save_checkpoint(root / f"ours_{name}", model.state_dict(), {"model": asdict(model.config)}, tok)
        out[f"hf_{name}"] = convert.to_hf(root / f"ours_{name}", root / f"hf_{name}")
        convert.main(["from-hf", str(out[f"hf_{name}"]), str(root / name)])  # python -m gpt.convert from-hf
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("chats") / "qa.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in WORDS])


@pytest.fixture(scope="module")
def sft_llama(imported, chats, tmp_path_factory) -> Path:
    """Full fine-tuning of the imported Llama (4 steps): the chat model the later tests use."""
    tmp = tmp_path_factory.mktemp("sft")
    finetune(sft_config(tmp, imported["llama"], chats, **RUN))
    return tmp / "out"


# ---------------------------------------------------------------------------- decoding context and KV cache


def test_kv_cache_is_bounded_by_the_decoding_context_and_holds_only_the_kv_heads():
    torch.manual_seed(0)
    cfg = ModelConfig(**{**SHAPE, **FAMILIES["llama"], "n_layer": 1, "block_size": 131072, "vocab_size": 40})
    model = lively(GPT(cfg))
    assert Engine(model, max_batch=2).cache.k.shape == (1, 2, 2, DEFAULT_MAX_MODEL_LEN, 8)  # not 131,072 per row
    assert Engine(model, max_batch=2, max_model_len=100).cache.k.shape[3] == 100
    assert context_length(replace(cfg, block_size=64)) == 64  # a short model keeps its own block size
    with pytest.raises(SamplingError, match=r"^--max-model-len must be between 1 and the model's block_size "
                                            r"\(131072\), got 131073$"):
        Engine(model, max_model_len=131073)
    # past the cap the window slides as it does at block_size: cached and uncached decoding agree
    prompt = torch.randint(0, 40, (2, 10), generator=torch.Generator().manual_seed(1))
    cached = generate(model, prompt, 30, GREEDY, max_model_len=16)
    assert torch.equal(cached, generate(model, prompt, 30, GREEDY, max_model_len=16, use_kv_cache=False))
    # SmolLM2-135M's shape (30 layers, 9 query and 3 key/value heads of 64, 8,192 positions), bf16, one row
    smol = ModelConfig(n_layer=30, n_head=9, n_kv_head=3, n_embd=576, block_size=8192, vocab_size=49152,
                       position="rope", norm="rmsnorm", mlp="swiglu", bias=False)

    def row_bytes(c: ModelConfig) -> int:  # what the engine allocates per row, on the meta device (no memory)
        cache = KVCache.empty(c, 1, context_length(c), "meta", torch.bfloat16)
        return cache.k.nbytes + cache.v.nbytes

    assert row_bytes(smol) == 2 * 30 * 3 * 64 * 4096 * 2 == 94_371_840  # 90 MiB
    assert row_bytes(replace(smol, n_kv_head=9)) == 3 * row_bytes(smol)  # multi-head: n_head / n_kv_head times more


# ---------------------------------------------------------------------------- fine-tuning


def test_chat_tokens_start_distinct_in_both_matrices_of_an_untied_head(imported):
    loaded = load_checkpoint(imported["llama"])
    model, tok = loaded.model, loaded.tokenizer
    tok.chat_template = None  # a base model without a template of its own gets our chat markers
    n = tok.vocab_size
    ids = [tok.special_id(t) for t in add_chat_tokens(model, tok)]
    assert len(ids) == 5 and model.lm_head.weight is not model.transformer.wte.weight  # 3 roles, <|tool|>, <|end|>
    for w in (model.transformer.wte.weight, model.lm_head.weight):
        rows, old = w[ids].detach(), w[:n].detach()
        gaps = torch.cdist(rows, rows) + torch.eye(len(ids)) * 1e9
        assert gaps.min() > 0.1 * old.std(0).norm()  # distinct tokens, in the input embedding too
        assert (rows.mean(0) - old.mean(0)).norm() < old.std(0).norm()  # near the mean row: neutral
    assert not torch.equal(model.transformer.wte.weight[ids], model.lm_head.weight[ids])  # each from its own rows


def test_full_sft_keeps_the_family_and_trains(sft_llama, imported):
    ckpt = load_checkpoint(sft_llama)
    assert ckpt.model.config.mlp == "swiglu" and not ckpt.model.config.tie_embeddings
    assert isinstance(ckpt.tokenizer, HFTokenizer) and ChatTemplate(ckpt.tokenizer).name == "jinja"
    assert "<|assistant|>" not in ckpt.tokenizer.special_tokens  # its own template brings its own tokens
    losses = [json.loads(line)["loss"] for line in (sft_llama / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]
    base = load_file(imported["llama"] / "model.safetensors")
    tuned = load_file(sft_llama / "latest" / "model.safetensors")
    assert not torch.equal(base["lm_head.weight"], tuned["lm_head.weight"][: base["lm_head.weight"].shape[0]])


def fake_hub(folder: Path, downloads: list[str]):
    """huggingface_hub.snapshot_download that 'downloads' `folder` into cache_dir, as the hub lays it out."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    def snapshot_download(repo_id, *, allow_patterns=None, cache_dir=None, local_files_only=False, **_):
        snapshot = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}" / "snapshots" / ("0" * 40)
        if not snapshot.is_dir():
            if local_files_only:
                raise LocalEntryNotFoundError("not in the cache")
            downloads.append(repo_id)
            shutil.copytree(folder, snapshot)
        return str(snapshot)

    return snapshot_download


def test_lora_sft_from_a_hub_name_downloads_once_into_the_run_and_resumes_exactly(imported, chats, tmp_path,
                                                                                   monkeypatch):
    import huggingface_hub

    downloads: list[str] = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_hub(imported["hf_llama"], downloads))
    extra = {**RUN, "allow_download": True, "lora.rank": 4, "lora.targets": "[c_attn,c_proj,c_fc]"}
    hub = "hf://acme/tiny-llama"
    finetune(sft_config(tmp_path / "a", hub, chats, **extra))
    finetune(sft_config(tmp_path / "b", hub, chats, **{**extra, "train.max_iters": 2}))
    finetune(sft_config(tmp_path / "b", hub, chats, **extra, **{"train.resume": True}))
    assert downloads == ["acme/tiny-llama"] * 2  # once per run folder: the resume found its copy
    assert list((tmp_path / "a" / "out" / ".hub_download").iterdir())  # inside the run, never ~/.cache
    a = load_file(tmp_path / "a" / "out" / "latest" / "model.safetensors")
    b = load_file(tmp_path / "b" / "out" / "latest" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    base = load_file(imported["llama"] / "model.safetensors")
    assert not torch.equal(a["transformer.h.0.mlp.c_fc.weight"], base["transformer.h.0.mlp.c_fc.weight"])


def hub_offline(monkeypatch) -> None:
    """huggingface_hub in offline mode, whether or not this process imported it before (it reads
    HF_HUB_OFFLINE at import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_a_hub_init_from_is_refused_without_allow_download_and_fails_in_one_line_offline(chats, tmp_path,
                                                                                          monkeypatch):
    cfg = sft_config(tmp_path, "hf://acme/tiny-llama", chats)
    with pytest.raises(CheckpointError, match=r"^hf://acme/tiny-llama is on the Hugging Face hub and downloads "
                                              r"are off: set allow_download=true to download it once") as err:
        finetune(cfg)
    assert "\n" not in str(err.value)
    hub_offline(monkeypatch)
    with pytest.raises(CheckpointError, match=r"^could not download 'acme/tiny-llama' from the Hugging Face hub"):
        finetune(sft_config(tmp_path, "hf://acme/tiny-llama", chats, allow_download=True))
    assert not list((tmp_path / "out" / ".hub_download").rglob("*.safetensors"))


def test_dpo_on_the_chat_llama(sft_llama, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"{w}?", "chosen": f"{w[::-1]}.", "rejected": f"{w}."}
                                                   for w in WORDS])
    result = finetune(sft_config(tmp_path, sft_llama, pairs, **RUN, **{"dpo.beta": 0.5}))
    assert result.step == 4
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_accuracy" in r for r in records) and all(np.isfinite(r.get("loss", 0.0)) for r in records)


# ---------------------------------------------------------------------------- tools


def test_eval_and_audit_score_the_chat_llama(sft_llama, chats, capsys):
    gpt_eval.main(["--ckpt", str(sft_llama), "--data", str(chats), "--exact-match", "--max-new-tokens", "4",
                   "--device", "cpu", "--json"])
    row = json.loads(capsys.readouterr().out)
    assert np.isfinite(row["loss"]) and row["tokens"] > 0 and row["exact_match"] is not None
    audit.main(["--ckpt", str(sft_llama), "--data", str(chats), "--samples", "4", "--candidates", "50",
                "--device", "cpu", "--json"])
    report = json.loads(capsys.readouterr().out)
    assert report["gate"]["passed"]


def test_continued_pretraining_redacts_at_preparation_with_the_model_tokenizer(imported, tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    args = tiny_overrides(tmp_path, corpus, init_from=imported["llama"], **{
        "data.redact": "[email]", "train.max_iters": 2, "train.eval_interval": 2, "train.batch_size": 2,
        "model.block_size": 32, "train.threads": 1})
    pretrain(load_config(PretrainConfig, None, args))
    (meta_file,) = (tmp_path / "data").rglob("meta.json")
    meta = json.loads(meta_file.read_text())
    tok = HFTokenizer.from_spec(meta["tokenizer"])
    assert tok.to_spec() == load_checkpoint(imported["llama"]).tokenizer.to_spec()  # the model's own tokenizer
    text = tok.decode(np.fromfile(meta_file.parent / "train.bin", dtype=meta["dtype"]).tolist())
    assert "<EMAIL>" in text and "ana@example.com" not in text and "555-0100" in text
    assert load_checkpoint(tmp_path / "out").model.config.mlp == "swiglu"


# ---------------------------------------------------------------------------- serving and int8


def test_the_server_answers_a_chat_request_within_its_max_model_len(sft_llama):
    loaded = load_checkpoint(sft_llama)
    server = Running(prepare_for_decoding(loaded.model, torch.float32), loaded.tokenizer, max_model_len=40)
    try:
        card = server.client.models.list().data[0]
        assert card.max_model_len == 40 and card.context_length == 40
        reply = server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat?"}],
                                                      max_tokens=6, temperature=0)
        assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        import openai

        with pytest.raises(openai.BadRequestError, match="maximum context length is 40 tokens"):
            server.client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "cat?"}],
                                                  max_tokens=40)
    finally:
        server.stop()


@pytest.mark.parametrize("family", FAMILIES)
def test_int8_decoding_stays_within_the_documented_tolerance(imported, family):
    """As tests/test_quantize.py holds GPT-2: logits within 5% of their largest, the same next tokens mostly
    (a random model's greedy continuations part at the first near-tie; docs/performance.md#int8-weights)."""
    ref = load_checkpoint(imported[family]).model.eval()
    model = prepare_for_decoding(load_checkpoint(imported[family]).model, torch.float32, "int8")
    idx = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ref_logits = model(idx)[0], ref(idx)[0]
    assert (logits - ref_logits).abs().max() < 0.05 * ref_logits.abs().max()
    assert (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() > 0.9  # the same next token, mostly
    out = generate(model, idx, 8, GREEDY)  # cached decoding through the int8 layers
    assert torch.equal(out[:, 12], ref_logits[:, -1].argmax(-1))


def test_sample_py_chats_with_the_llama_under_a_context_cap(sft_llama, capsys):
    proc = run_in_process(capsys, "sample.py", "--ckpt", sft_llama, "--chat", "--max-new-tokens", 4,
                          "--temperature", 0, "--max-model-len", 32, "--threads", 1, stdin="cat?\n")
    assert proc.returncode == 0, proc.stderr
    assert "32-token context" in proc.stderr
