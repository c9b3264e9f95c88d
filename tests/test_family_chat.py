"""Each family end to end, as a user takes a model from the hub through fine-tuning and back (issue 23):
a random odd-shaped transformers model saved with a tokenizer built here and its family's chat template as
the real models ship it (tests/shipped_templates.py) -> `python -m gpt.convert from-hf` (greedy decoding
like transformers' `generate`) -> `finetune.py` on a tiny chat JSONL, through the model's own template ->
`python -m gpt.convert to-hf` -> transformers' `apply_chat_template` + greedy `generate` on the export
gives the reply `sample.py --chat --temperature 0` gives.

The templates: Llama 3.1's (Llama), Qwen2.5's (Qwen2), Qwen3's (with its <think> block), Mistral
v0.2's ([INST], no generation prompt, replies end with </s>) and Gemma 3's (<start_of_turn>), unchanged.
The tokenizers are ~300-token byte-level BPEs with the family's special tokens, bos/eos/pad names
(tokenizer_config.json) and eos ids (generation_config.json and config.json) as the real ones have them.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_hf_model, qa, run_in_process, write_hf_model, write_hf_tokenizer, write_jsonl
from safetensors.torch import load_file
from shipped_templates import GEMMA3, LLAMA31, MISTRAL, QWEN3, QWEN25

from gpt.checkpoint import load_checkpoint
from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import HFTokenizer
from gpt.infer.engine import generate
from gpt.infer.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

SHAPE = dict(num_hidden_layers=2, max_position_embeddings=128)
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN_TOKENS = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
# family -> transformers' config and model classes, the config (odd shapes), the tokenizer's special tokens
# (their ids in order), its other added tokens, the BOS its post-processor adds, tokenizer_config.json's
# token names and template, and generation_config.json's eos ids
FAMILIES = {
    "llama": dict(
        classes=("LlamaConfig", "LlamaForCausalLM"),
        config=dict(hidden_size=40, intermediate_size=72, num_attention_heads=5, num_key_value_heads=1,
                    tie_word_embeddings=True, rope_theta=5e5, rope_scaling={
                        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position_embeddings": 32}, bos_token_id=0, eos_token_id=[1, 5]),
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>"],
        added=(), prefix="<|begin_of_text|>",
        tokens={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, template=LLAMA31, eos=[1, 4, 5]),
    "qwen2": dict(
        classes=("Qwen2Config", "Qwen2ForCausalLM"),
        config=dict(hidden_size=48, intermediate_size=80, num_attention_heads=6, num_key_value_heads=2,
                    tie_word_embeddings=False, rope_theta=1e6, bos_token_id=0, eos_token_id=2),
        specials=QWEN_SPECIALS, added=(), prefix=None, tokens=QWEN_TOKENS, template=QWEN25, eos=[2, 0]),
    "qwen3": dict(
        classes=("Qwen3Config", "Qwen3ForCausalLM"),
        config=dict(hidden_size=32, intermediate_size=56, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    tie_word_embeddings=True, rope_theta=1e6, bos_token_id=0, eos_token_id=2),
        specials=QWEN_SPECIALS, added=("<think>", "</think>"), prefix=None, tokens=QWEN_TOKENS, template=QWEN3,
        eos=[2, 0]),
    "mistral": dict(
        classes=("MistralConfig", "MistralForCausalLM"),
        config=dict(hidden_size=36, intermediate_size=64, num_attention_heads=6, num_key_value_heads=3,
                    sliding_window=8, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        specials=["<unk>", "<s>", "</s>"], added=(), prefix="<s>",
        tokens={"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, template=MISTRAL, eos=[2]),
    "gemma3": dict(
        classes=("Gemma3TextConfig", "Gemma3ForCausalLM"),
        config=dict(hidden_size=40, intermediate_size=72, num_attention_heads=4, num_key_value_heads=1, head_dim=16,
                    query_pre_attn_scalar=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"],
                    final_logit_softcapping=30.0, rope_theta=1e5, rope_local_base_freq=1e4, rms_norm_eps=1e-6,
                    bos_token_id=2, eos_token_id=[1, 5], pad_token_id=0),
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], added=(), prefix="<bos>",
        tokens={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"},
        template=GEMMA3, eos=[1, 5]),
}
WORDS = ["cat", "sun", "red", "one", "hot", "yes", "big", "dog"]
CORPUS = ("system user assistant model Cutting Knowledge Date: December 2023 Today Date: 26 Jul 2024 [INST] [/INST]\n"
          "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.\n" + " ".join(WORDS) + "?!.\n"
          "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.\n") * 10
QUESTION = "big dog?"
GREEDY = SamplingParams(temperature=0)
FINETUNE = {"train.max_iters": 4, "train.batch_size": 2, "train.eval_interval": 3, "train.eval_iters": 1,
            "train.log_interval": 1, "train.device": "cpu", "train.dtype": "float32", "train.threads": 1,
            "sft.block_size": 64, "optim.lr": 3e-2, "optim.warmup_iters": 1, "optim.lr_decay_iters": 4,
            "logging.progress": False, "logging.sample_tokens": 0, "logging.plot": False}


@pytest.fixture(scope="module")
def chats(tmp_path_factory):
    """Eight one-turn conversations: a word and a question mark, answered by the word backwards."""
    return write_jsonl(tmp_path_factory.mktemp("chats") / "chats.jsonl", [qa(f"{w}?", f"{w[::-1]}.") for w in WORDS])


def write_family_tokenizer(folder, family: str):
    """The family's tokenizer and chat template, saved as a hub folder of an instruct model ships them."""
    spec = FAMILIES[family]
    folder.mkdir()
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **spec["tokens"], "chat_template": spec["template"]}
    return write_hf_tokenizer(folder, CORPUS, spec["specials"], config, added=spec["added"], prefix=spec["prefix"])


def write_family(folder, family: str) -> None:
    """The family's random model and tokenizer (write_family_tokenizer), with its generation_config.json."""
    spec = FAMILIES[family]
    tok = write_family_tokenizer(folder, family)
    write_hf_model(folder, *spec["classes"], vocab_size=tok.get_vocab_size(), **SHAPE, **spec["config"])
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": spec["eos"]}), encoding="utf-8")


@pytest.mark.parametrize("family", FAMILIES)
def test_fine_tuned_family_model_answers_a_chat_after_export_like_sample_chat(family, chats, tmp_path, capsys):
    hf, ours, tuned, export = tmp_path / "hf", tmp_path / "ours", tmp_path / "tuned", tmp_path / "export"
    write_family(hf, family)
    messages = [{"role": "user", "content": QUESTION}]
    proc = run_in_process(capsys, "gpt.convert", "from-hf", hf, ours)
    assert proc.returncode == 0, proc.stderr

    # imported: its template renders apply_chat_template's ids, and greedy decoding is transformers'
    loaded = load_checkpoint(ours)
    template = ChatTemplate(loaded.tokenizer)
    assert template.name == "jinja" and loaded.tokenizer.chat_template == FAMILIES[family]["template"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf)
    prompt = template.encode(messages, add_generation_prompt=True)
    assert prompt == list(hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                     return_dict=False))
    ids = torch.tensor([prompt])
    with torch.no_grad():
        theirs = load_hf_model(hf).generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12,
                                            min_new_tokens=12, do_sample=False, eos_token_id=None)
    assert torch.equal(generate(loaded.model.eval(), ids, 12, GREEDY), theirs)

    # fine-tuned through its own template: no markers of ours added, the weights moved
    proc = run_in_process(capsys, "finetune.py", f"init_from={ours}", f"data.path={chats}", f"data.val_path={chats}",
                          f"out_dir={tuned}", *[f"{k}={v}" for k, v in FINETUNE.items()])
    assert proc.returncode == 0, proc.stderr
    tuned_tok = load_checkpoint(tuned).tokenizer
    assert tuned_tok.vocab_size == loaded.tokenizer.vocab_size
    assert tuned_tok.chat_template == FAMILIES[family]["template"]
    before, after = load_file(ours / "model.safetensors"), load_file(tuned / "latest" / "model.safetensors")
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])

    proc = run_in_process(capsys, "gpt.convert", "to-hf", tuned, export)
    assert proc.returncode == 0, proc.stderr
    # in fp32 as transformers computes (--dtype auto is bf16 on CPUs with native bf16: another reply, at times)
    proc = run_in_process(capsys, "sample.py", "--ckpt", tuned, "--chat", "--temperature", 0, "--max-new-tokens", 12,
                          "--dtype", "float32", "--threads", 1, stdin=QUESTION + "\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("> ") and proc.stdout.endswith("\n> \n"), proc.stdout  # input()'s prompts
    ours_reply = proc.stdout[2:-4]

    # transformers on the export: the same prompt, the same greedy reply (ending where ours ends)
    hf_tok = transformers.AutoTokenizer.from_pretrained(export)
    inputs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    prompt = inputs["input_ids"][0].tolist()
    assert prompt == ChatTemplate(tuned_tok).encode(messages, add_generation_prompt=True)
    with torch.no_grad():
        out = transformers.AutoModelForCausalLM.from_pretrained(export).eval().generate(
            **inputs, do_sample=False, max_new_tokens=12)
    new = out[0, len(prompt):].tolist()
    ended = new[-1] in json.loads((export / "generation_config.json").read_text())["eos_token_id"]
    reply = hf_tok.decode(new[:-1] if ended else new)
    assert reply == ours_reply and len(new) > 1  # a reply, not just the end of the turn


CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "The weather in a city", "parameters": CITY}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = [  # a system prompt, two questions, a tool call and its result
    {"role": "system", "content": "Be terse."}, {"role": "user", "content": "cat?"},
    {"role": "assistant", "content": "tac."}, {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "{\"sky\": \"sunny\"}", "tool_call_id": "call_1"},
    {"role": "assistant", "content": "It is sunny."}]
HERMES_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
# family -> what each assistant turn of TOOL_CHAT learns, in the family's own format
TOOL_REPLIES = {"qwen3": ["tac.<|im_end|>", HERMES_CALL + "<|im_end|>",
                          "<think>\n\n</think>\n\nIt is sunny.<|im_end|>"],  # its empty block: before the last
                "qwen2": ["tac.<|im_end|>", HERMES_CALL + "<|im_end|>", "It is sunny.<|im_end|>"],
                "llama": ["tac.<|eot_id|>", '{"name": "get_weather", "parameters": {"city": "Paris"}}<|eot_id|>',
                          "It is sunny.<|eot_id|>"]}


@pytest.mark.parametrize("family", TOOL_REPLIES)
def test_multi_turn_mask_with_tool_calls_is_each_reply_and_ids_are_apply_chat_templates(family, tmp_path):
    """A system prompt, two questions, a tool call and its result through the family's own template: the ids are
    `apply_chat_template`'s (with the tools), and the learned tokens are exactly each reply (the call in the
    family's format) and its end-of-turn token; the tool definitions and the result are not. Qwen3's template
    writes an empty <think> block before the reply after the tool result only (the last one): it is learned
    with it (the prompt ends at `<|im_start|>assistant\n`: the model writes the block)."""
    write_family_tokenizer(tmp_path / family, family)
    tok = HFTokenizer.from_folder(tmp_path / family)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / family)
    template = ChatTemplate(tok)
    segments = template.segments(TOOL_CHAT, tools=TOOLS)
    assert [i for s in segments for i in s.ids] == list(theirs.apply_chat_template(
        TOOL_CHAT, tools=TOOLS, tokenize=True, return_dict=False))
    assert [tok.decode(s.ids) for s in segments if s.trainable] == TOOL_REPLIES[family]


def test_qwen3_learns_reasoning_where_its_template_shows_it(tmp_path):
    """Qwen3's template writes a reply's reasoning (`<think>...</think>` at the start of its content) only for the
    replies after the last user message and drops it from earlier ones (so it renders a conversation up to an
    earlier reply differently from the whole): where it is shown the think block is learned with the reply, where
    it is dropped the reply alone is, and a last reply without reasoning learns the empty block the template
    writes (the model writes it after the prompt, as Qwen3 does to answer without reasoning). The ids are
    `apply_chat_template`'s."""
    write_family_tokenizer(tmp_path / "qwen3", "qwen3")
    tok = HFTokenizer.from_folder(tmp_path / "qwen3")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "qwen3")
    template = ChatTemplate(tok)
    chat = [{"role": "system", "content": "Be terse."}, *qa("cat?", "<think>\nbackwards\n</think>\n\ntac.")["messages"],
            *qa("dog?", "<think>again</think>god.")["messages"]]
    segments = template.segments(chat)
    assert [i for s in segments for i in s.ids] == list(theirs.apply_chat_template(chat, tokenize=True,
                                                                                   return_dict=False))
    learned = [tok.decode(s.ids) for s in segments if s.trainable]
    assert learned == ["tac.<|im_end|>", "<think>\nagain\n</think>\n\ngod.<|im_end|>"]
    plain = [chat[0], *qa("cat?", "tac.")["messages"], *qa("dog?", "god.")["messages"]]
    learned = [tok.decode(s.ids) for s in template.segments(plain) if s.trainable]
    assert learned == ["tac.<|im_end|>", "<think>\n\n</think>\n\ngod.<|im_end|>"]


def test_qwen3_fine_tunes_on_multi_turn_records_with_tool_calls(tmp_path, capsys):
    """A tiny random Qwen3 model fine-tunes on records with a system prompt, several replies, reasoning, tool calls
    and their results through its own template (refused before masks were found in the whole conversation)."""
    hf, ours, tuned = tmp_path / "hf", tmp_path / "ours", tmp_path / "tuned"
    write_family(hf, "qwen3")
    assert run_in_process(capsys, "gpt.convert", "from-hf", hf, ours).returncode == 0
    rows = [{"messages": TOOL_CHAT, "tools": TOOLS}]
    for w, v in zip(WORDS, WORDS[1:]):
        rows.append({"messages": [{"role": "system", "content": "Be terse."}, *qa(f"{w}?", f"{w[::-1]}.")["messages"],
                                  *qa(f"{v}?", f"<think>{v}</think>{v[::-1]}.")["messages"]]})
    data = write_jsonl(tmp_path / "chats.jsonl", rows)
    proc = run_in_process(capsys, "finetune.py", f"init_from={ours}", f"data.path={data}", f"data.val_path={data}",
                          f"out_dir={tuned}", *[f"{k}={v}" for k, v in FINETUNE.items()])
    assert proc.returncode == 0, proc.stderr
    before, after = load_file(ours / "model.safetensors"), load_file(tuned / "latest" / "model.safetensors")
    assert not torch.equal(before["transformer.wte.weight"], after["transformer.wte.weight"])
