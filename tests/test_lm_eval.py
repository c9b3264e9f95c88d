"""lm-evaluation-harness on our models, two ways, offline: its OpenAI clients (`local-completions`,
`local-chat-completions`) against the server, and our checkpoint in process (gpt/lm_eval_model.py). The same
random model scored both ways gives the same log-likelihoods and the same greedy text, and equals lm-eval's
own Hugging Face backend on the folder; a task whose data is on the hub stops with one line."""

from __future__ import annotations

import json

import pytest
from conftest import Running, write_hf_model, write_hf_tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("tenacity")  # lm-eval's API models (lm-eval[api])

TEXT = ("Paris is in France. Rome is in Italy. The quick brown fox jumps over the lazy dog.\n"
        "Question: where is Paris? Answer: France\n") * 20
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MC = [{"question": "Paris is in", "choices": [" France", " Italy", " the lazy dog"], "label": 0},
      {"question": "Rome is in", "choices": [" France", " Italy"], "label": 1},
      {"question": "The quick brown", "choices": [" fox", " dog", " box"], "label": 0}]
GEN = [{"question": "Question: where is Paris? Answer:", "answer": " France"},
       {"question": "The quick brown fox", "answer": " jumps"},
       {"question": "Rome is", "answer": " in"}]
DOCS = [{"text": TEXT[:150]}, {"text": TEXT[40:400]}]  # the second is longer than the context: rolling windows
MAX_LENGTH = 64


def task_yaml(name: str, data: str, body: str) -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\n"
            f"test_split: test\n{body}")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random Llama folder (our loader and transformers read it), the same model served, and three local tasks."""
    from lm_eval.tasks import TaskManager

    from gpt.lm_eval_model import offline_hub
    from gpt.pretrained import load_pretrained

    root = tmp_path_factory.mktemp("lm_eval")
    hf, tasks = root / "hf", root / "tasks"
    hf.mkdir(), tasks.mkdir()
    config = {"eos_token": "<|endoftext|>", "chat_template": TEMPLATE}
    vocab = write_hf_tokenizer(hf, TEXT, ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], config).get_vocab_size()
    write_hf_model(hf, "LlamaConfig", "LlamaForCausalLM", vocab_size=vocab, hidden_size=48, intermediate_size=80,
                   num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2,
                   max_position_embeddings=MAX_LENGTH, bos_token_id=None, eos_token_id=0, pad_token_id=None, tie_word_embeddings=True)
    for name, rows in (("mc", MC), ("gen", GEN), ("docs", DOCS)):
        (tasks / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tasks / "tiny_mc.yaml").write_text(task_yaml("tiny_mc", tasks / "mc.jsonl", (
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: label\nmetric_list:\n  - metric: acc\n")))
    (tasks / "tiny_gen.yaml").write_text(task_yaml("tiny_gen", tasks / "gen.jsonl", (
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 8\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n")))
    (tasks / "tiny_docs.yaml").write_text(task_yaml("tiny_docs", tasks / "docs.jsonl", (
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")))
    (tasks / "hub_task.yaml").write_text(  # data on the hub: refused offline
        "task: hub_task\ndataset_path: Rowan/hellaswag\ntest_split: validation\noutput_type: multiple_choice\n"
        "doc_to_text: '{{ctx}}'\ndoc_to_choice: '{{endings}}'\ndoc_to_target: label\n")
    loaded = load_pretrained(hf)
    srv = Running(loaded.model.eval(), loaded.tokenizer)
    with offline_hub():  # `datasets` pings the hub when it reads a local JSONL file, unless offline
        yield hf, tasks, srv, TaskManager(include_path=str(tasks), include_defaults=False)
    srv.stop()


def responses(model, model_args, tasks, manager, **kw) -> dict[str, list]:
    """task -> each request's answer (log-likelihood, greedy) or text, in lm-eval's order."""
    from lm_eval import simple_evaluate

    res = simple_evaluate(model=model, model_args=model_args, tasks=tasks, task_manager=manager, log_samples=True,
                          bootstrap_iters=0, **kw)
    return {t: [r for s in samples for r in s["resps"]] for t, samples in res["samples"].items()}


def flat(answers) -> list:
    """Every value of lm-eval's nested answers, in order: log-likelihoods, greedy flags, texts."""
    return [x for r in answers for x in flat(r)] if isinstance(answers, (list, tuple)) else [answers]


def test_server_clients_in_process_and_hf_backend_agree(setup):
    import gpt.lm_eval_model  # noqa: F401  registers "gpt"

    hf, tasks, srv, manager = setup
    names = ["tiny_mc", "tiny_gen", "tiny_docs"]
    client = dict(model="tiny", base_url=srv.url + "/v1/completions", tokenizer_backend="huggingface",
                  tokenizer=str(hf), max_length=MAX_LENGTH, batch_size=2)  # batched prompts of token ids
    served = responses("local-completions", client, names, manager)
    # lm-eval's API models keep a token for the reply and one more in rolling windows: 62-token windows all three
    ours = responses("gpt", {"ckpt": str(hf), "batch_size": 4, "max_length": MAX_LENGTH - 2}, names, manager)
    theirs = responses("hf", {"pretrained": str(hf), "dtype": "float32", "device": "cpu",
                              "max_length": MAX_LENGTH - 2}, names, manager)
    for task in names:
        a, b, c = flat(served[task]), flat(ours[task]), flat(theirs[task])
        if task == "tiny_gen":
            assert a == b == c and any(a)  # the same greedy text, cut at the task's "\n"
        else:
            scores = [[x for x in v if isinstance(x, float)] for v in (a, b, c)]
            assert scores[1] == pytest.approx(scores[0], abs=1e-4)  # in process == through the server
            assert scores[1] == pytest.approx(scores[2], abs=1e-4)  # == lm-eval's Hugging Face backend
            assert len(scores[1]) == {"tiny_mc": 8, "tiny_docs": 2}[task]
            assert [x for x in a if isinstance(x, bool)] == [x for x in b if isinstance(x, bool)]  # is_greedy
    chat = dict(model="tiny", base_url=srv.url + "/v1/chat/completions", max_length=MAX_LENGTH)
    served_chat = responses("local-chat-completions", chat, ["tiny_gen"], manager, apply_chat_template=True)
    ours_chat = responses("gpt", {"ckpt": str(hf)}, ["tiny_gen"], manager, apply_chat_template=True)
    assert served_chat == ours_chat and served_chat["tiny_gen"] != served["tiny_gen"]  # the template was applied


def test_command_runs_local_tasks_and_refuses_hub_data_in_one_line(setup, capsys):
    from gpt import eval as gpt_eval

    hf, tasks, _, _ = setup
    gpt_eval.main(["lm-eval", "--ckpt", str(hf), "--tasks", "tiny_mc", "--include-path", str(tasks), "--json"])
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ckpt"] == str(hf) and 0 <= out["results"]["tiny_mc"]["acc,none"] <= 1
    with pytest.raises(SystemExit) as e:
        gpt_eval.main(["lm-eval", "--ckpt", str(hf), "--tasks", "hub_task", "--include-path", str(tasks)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 1 and len(err) >= 1 and err[-1].startswith("error: hub_task: ")
    assert "downloads are off" in err[-1] and "--allow-download" in err[-1] and "Traceback" not in "\n".join(err)
