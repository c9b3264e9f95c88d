"""Models' own tokenizers and chat templates, as shipped, against transformers.

One byte-level BPE (built here with `tokenizers`, holding ChatML, Llama 3 and Gemma markers) is saved as
hub folders with the chat templates SmolLM2, Qwen2.5, Llama 3.1 and Gemma 2 ship (their text in
tests/shipped_templates.py). Our ids equal `AutoTokenizer`'s and `apply_chat_template`'s, the SFT loss mask is exactly each
assistant reply and its end-of-turn token, decoding stops at that token, a hostile template fails in
one line without running, and an exported model answers a chat like `sample.py --chat` does.
"""

import io
import json

import pytest
import torch
from conftest import write_hf_model
from shipped_templates import GEMMA2, LLAMA31, QWEN25, SMOLLM2

from gpt import checkpoint, convert
from gpt.config import ModelConfig
from gpt.data.chat_template import ChatTemplate
from gpt.data.examples import encode_chat, encode_reply
from gpt.data.jinja_template import ChatTemplateError
from gpt.data.tokenizer import HFTokenizer
from gpt.errors import UserError
from gpt.infer.chat_session import run_chat
from gpt.infer.engine import complete
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT
from gpt.train.sft import add_chat_tokens

transformers = pytest.importorskip("transformers")

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|eot_id|>", "<start_of_turn>", "<end_of_turn>"]
CORPUS = ("Grüße aus Köln! Ça va? Привет, мир! 東京の天気は晴れ。مرحبا بالعالم 🤖👍🏽\n"
          "def f(x):\n    return x ** 2  # square\n\tif a != b: print(f\"{a!r}\")\r\n"
          "You are a helpful assistant. The quick brown fox jumps over the lazy dog.\n") * 30
HIDDEN = "Grüße — Привет! 東京タワー 🎉🤖👍🏽 naïve café\n```python\nx = {'k': [1, 2.5]}  # ok\n```\r\n\t end  "

# name -> (template, tokenizer_config.json tokens, generation_config.json eos, the end-of-turn marker)
MODELS = {
    "smollm2": (SMOLLM2, {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>"},
                ["<|im_end|>"], "<|im_end|>"),
    "qwen2.5": (QWEN25, {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
                ["<|im_end|>", "<|endoftext|>"], "<|im_end|>"),
    "llama3.1": (LLAMA31, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                 ["<|endoftext|>", "<|eot_id|>"], "<|eot_id|>"),
    "gemma2": (GEMMA2, {"bos_token": "<|begin_of_text|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
               ["<|endoftext|>", "<end_of_turn>"], "<end_of_turn>"),
}
CHAT = [
    {"role": "system", "content": "You are terse. Réponds en une ligne."},
    {"role": "user", "content": "Grüße! What is 東京?"},
    {"role": "assistant", "content": "A city 🤖. Code: `x = f(3.14)`"},
    {"role": "user", "content": "And Köln?\n"},
    {"role": "assistant", "content": " Another city, on the Rhine. "},
]


@pytest.fixture(scope="module")
def tokenizer_json() -> str:
    """A ~400-token byte-level BPE with every model's markers as special added tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return tok.to_str()


@pytest.fixture(scope="module")
def folders(tokenizer_json, tmp_path_factory):
    """name -> a hub-style folder: tokenizer.json, tokenizer_config.json (with the template), generation_config.json."""
    out = {}
    for name, (template, tokens, eos, _) in MODELS.items():
        folder = tmp_path_factory.mktemp(name.replace(".", "_"))
        (folder / "tokenizer.json").write_text(tokenizer_json, encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, **tokens}
        (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
        ids = [SPECIALS.index(t) for t in eos]
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}), encoding="utf-8")
        out[name] = folder
    return out


def conversation(name: str) -> list[dict]:
    return CHAT[1:] if name == "gemma2" else CHAT  # Gemma 2's template refuses a system role


def test_shipped_tokenizer_encodes_like_autotokenizer(folders):
    folder = folders["qwen2.5"]
    tok, theirs = HFTokenizer.from_folder(folder), transformers.AutoTokenizer.from_pretrained(folder)
    assert tok.encode(HIDDEN) == theirs(HIDDEN, add_special_tokens=False)["input_ids"]
    assert tok.decode(tok.encode(HIDDEN)) == HIDDEN
    marked = f"<|im_start|>user\n{HIDDEN}<|im_end|>"
    assert tok.encode(marked, split_special_tokens=False) == theirs(marked, add_special_tokens=False)["input_ids"]
    ids = {t: SPECIALS.index(t) for t in SPECIALS}
    end, eot = ids["<|im_end|>"], ids["<|endoftext|>"]
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (None, [end, eot], eot)
    llama = HFTokenizer.from_folder(folders["llama3.1"])
    assert (llama.bos_id, llama.eos_ids) == (ids["<|begin_of_text|>"], [ids["<|eot_id|>"], ids["<|endoftext|>"]])


@pytest.mark.parametrize("name", MODELS)
def test_rendered_ids_equal_apply_chat_template_and_turns_end_at_the_template_token(name, folders):
    tok, theirs = HFTokenizer.from_folder(folders[name]), transformers.AutoTokenizer.from_pretrained(folders[name])
    template, chat = ChatTemplate(tok), conversation(name)
    assert template.name == "jinja" and template.stop_strings == []
    for messages, prompt in ((chat, False), (chat[:-1], True), (chat[:2], True)):
        ours = template.encode(messages, add_generation_prompt=prompt)
        assert ours == list(theirs.apply_chat_template(messages, add_generation_prompt=prompt, tokenize=True,
                                                       return_dict=False))
    end = SPECIALS.index(MODELS[name][3])
    assert template.stop_ids == [end] and template.end_ids[0] == end
    assert set(template.end_ids) == {end, *tok.eos_ids}  # every eos id of generation_config.json too


@pytest.mark.parametrize("name", MODELS)
def test_loss_mask_is_exactly_each_reply_and_its_end_of_turn(name, folders):
    tok = HFTokenizer.from_folder(folders[name])
    template, chat, marker = ChatTemplate(tok), conversation(name), MODELS[name][3]
    trim = name in ("llama3.1", "gemma2")  # these templates trim message text
    example, truncated = encode_chat(template, chat, 10_000)
    assert not truncated and example.ids.tolist() == template.encode(chat)
    learned = [seg.ids for seg in template.segments(chat) if seg.trainable]
    replies = [m["content"].strip() if trim else m["content"] for m in chat if m["role"] == "assistant"]
    assert [tok.decode(ids) for ids in learned] == [r + marker for r in replies]
    assert int(example.mask.sum()) == sum(map(len, learned))
    context = [{**m, "weight": 0} if m is chat[-3] else m for m in chat]  # the first reply shown, not learned
    assert [tok.decode(s.ids) for s in template.segments(context) if s.trainable] == [replies[-1] + marker]
    pair, _ = encode_reply(template, chat[:-1], chat[-1:], 10_000)  # a preference side: the reply only
    assert pair.ids.tolist() == template.encode(chat)
    assert tok.decode(pair.ids[pair.mask].tolist()) == replies[-1] + marker


def test_loss_mask_equals_transformers_generation_blocks(folders, tmp_path):
    """A template with {% generation %} blocks: transformers' assistant mask is the one we find by rendering."""
    turn = "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    source = SMOLLM2.replace(turn, (
        "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}{% generation %}"
        "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}{% else %}"
        "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endif %}"))
    assert source != SMOLLM2
    for f in ("tokenizer.json", "generation_config.json"):
        (tmp_path / f).write_bytes((folders["smollm2"] / f).read_bytes())
    config = json.loads((folders["smollm2"] / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": source}))
    template = ChatTemplate(HFTokenizer.from_folder(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path).apply_chat_template(
        CHAT, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    ids, mask = zip(*[(i, s.trainable) for s in template.segments(CHAT) for i in s.ids])
    assert list(ids) == list(theirs["input_ids"]) and [int(m) for m in mask] == list(theirs["assistant_masks"])


def test_a_template_that_renders_the_last_reply_differently_is_masked_from_its_prompt(folders):
    """A template that renders a turn differently once more turns follow (as Qwen3's does, so the conversation up
    to a reply is not a prefix of the whole): the mask is found in the whole conversation, each reply from the end
    of the prompt the model answers (what the template writes there is the model's to write) to its end-of-turn
    token."""
    tok = HFTokenizer.from_folder(folders["smollm2"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.role == 'assistant' and "
                         "loop.last %}(last) {% endif %}{{ m.content }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = ChatTemplate(tok)
    learned = [tok.decode(s.ids) for s in template.segments(CHAT) if s.trainable]
    assert learned == [CHAT[2]["content"] + "<|im_end|>", "(last) " + CHAT[4]["content"] + "<|im_end|>"]
    assert [i for s in template.segments(CHAT) for i in s.ids] == template.encode(CHAT)


@pytest.mark.parametrize("turn, why", [
    ("{% if m.role == 'assistant' and not loop.last %}(earlier reply){% else %}{{ m.content }}{% endif %}",
     "does not write the text of assistant message 3 as given"),  # drops a reply: it cannot be found
    ("{{ m.content }}{% if m.role == 'user' and loop.index0 > 1 %} (you said {{ messages[loop.index0 - 1].content }})"
     "{% endif %}", "does not write the text of assistant message 3 as given"),  # writes it twice
    ("{{ m.content }}{% if m.role == 'user' and loop.index0 > 1 %} ({{ messages[loop.index0 - 1].content | length }})"
     "{% endif %}", "renders later turns by what assistant message 3 says"),  # changes another turn by it
])
def test_a_reply_that_cannot_be_located_is_refused_never_masked_wrong(turn, why, folders):
    tok = HFTokenizer.from_folder(folders["smollm2"])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m.role }}\n" + turn + "<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    template = ChatTemplate(tok)
    assert template.encode(CHAT)  # rendering works; only the mask cannot be found
    with pytest.raises(ChatTemplateError, match=why) as info:
        template.segments(CHAT)
    assert "\n" not in str(info.value) and '"weight": 0' in str(info.value)
    shown = [{**m, "weight": 0} if m is CHAT[2] else m for m in CHAT]  # that reply as context only
    learned = [tok.decode(s.ids) for s in template.segments(shown) if s.trainable]
    assert learned == [CHAT[4]["content"] + "<|im_end|>"]


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__.os.popen('touch {marker}').read() }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ messages.append({'role': 'user', 'content': 'injected'}) }}",
    "{% set ns = namespace(__init__=1) %}{{ ns }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{{ raise_exception('System role not supported') }}",
    "{% for m in messages %}never closed",
])
def test_an_untrusted_template_fails_in_one_line_and_never_runs_python(source, folders, tmp_path):
    marker = tmp_path / "pwned"
    tok = HFTokenizer.from_folder(folders["smollm2"])
    tok.chat_template = source.replace("{marker}", str(marker))
    template = ChatTemplate(tok)
    with pytest.raises(ChatTemplateError) as info:
        template.encode(CHAT, add_generation_prompt=True)
    assert isinstance(info.value, UserError) and "\n" not in str(info.value)
    assert str(info.value).startswith("the model's chat template")
    assert not marker.exists()
    assert template.stop_ids == [SPECIALS.index("<|im_end|>")]  # decoding still knows the usual end-of-turn token


def test_fine_tuning_adds_no_markers_to_a_model_with_its_own_template(folders):
    tok = HFTokenizer.from_folder(folders["qwen2.5"])
    model = GPT(ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=tok.vocab_size))
    before = (tok.vocab_size, model.config.vocab_size, dict(tok.special_tokens))
    assert add_chat_tokens(model, tok) == [] and ChatTemplate.add_tokens(tok) == {}
    assert (tok.vocab_size, model.config.vocab_size, tok.special_tokens) == before


def test_export_answers_a_chat_like_sample_chat(folders, tmp_path):
    """A random Qwen2 with SmolLM2's template: from-hf, then to-hf; transformers' apply_chat_template + generate
    on the export gives the reply sample.py --chat gives."""
    hf = tmp_path / "hf"
    hf.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (hf / f).write_bytes((folders["smollm2"] / f).read_bytes())
    write_hf_model(hf, "Qwen2Config", "Qwen2ForCausalLM", vocab_size=HFTokenizer.from_folder(hf).vocab_size,
                   hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                   bos_token_id=None, eos_token_id=None, pad_token_id=None)
    ours = convert.from_hf(str(hf), tmp_path / "ours")
    exported = convert.to_hf(ours, tmp_path / "export")
    loaded = checkpoint.load_checkpoint(ours)  # what sample.py --chat loads
    model, tok = loaded.model.eval(), loaded.tokenizer
    template = ChatTemplate(tok)
    assert tok.chat_template == SMOLLM2 and template.name == "jinja"
    messages = [{"role": "user", "content": "Grüße! What is 東京?"}]
    prompt = template.encode(messages, add_generation_prompt=True)
    params = SamplingParams(temperature=0, max_tokens=12)
    [reply] = complete(model, tok, prompt, params, stop_ids=template.end_ids)
    out, lines = io.StringIO(), ["Grüße! What is 東京?"]

    def read(_):
        if not lines:
            raise EOFError
        return lines.pop()

    run_chat(model, tok, params, read=read, out=out, err=io.StringIO())
    assert out.getvalue().strip() == reply.text.strip()

    hf_tok = transformers.AutoTokenizer.from_pretrained(exported)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(exported).eval()
    ids = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert list(ids) == prompt
    generation = json.loads((exported / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == SPECIALS.index("<|im_end|>")  # transformers stops where we do
    with torch.no_grad():
        new = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=12)[0, len(prompt):].tolist()
    assert new == reply.token_ids
    assert hf_tok.decode(new[:-1] if reply.finish_reason == "eos" else new) == reply.text  # the end token not shown
