"""The compiled decode step (--compile): torch.compile of GPT.forward gives the eager step's tokens, and
falls back in one line where compile cannot run.

The tests compile with the "eager" backend: dynamo captures the graph inductor would get (the same
guards, so the same recompiles) and runs it as aten ops instead of generated C++; inductor's C++
compile takes about a minute on a 2-core machine, aot_eager ~20 s a test here, too slow for the suite.
Inductor itself runs in bench/llama_cpp_race.py (ours-compiled rows)."""

import dataclasses

import pytest
import torch
import torch._dynamo
from conftest import lively_model, run_in_process

from gpt.checkpoint import save_checkpoint
from gpt.config import ModelConfig
from gpt.data.tokenizer import CharTokenizer
from gpt.infer import compiled_decode
from gpt.infer.compiled_decode import compile_decoding
from gpt.infer.engine import Engine, generate
from gpt.infer.sampling import SamplingParams
from gpt.model import GPT

GREEDY = SamplingParams(temperature=0)


def modern_model(seed=0) -> GPT:
    """RoPE, RMSNorm, SwiGLU, grouped-query attention and a sliding layer, weights scaled up for confident tokens."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layer=2, n_head=4, n_kv_head=2, n_embd=32, block_size=24, vocab_size=40, dropout=0.0,
                      norm="rmsnorm", position="rope", mlp="swiglu", bias=False, sliding_window=6,
                      sliding_window_pattern=2)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" not in name and "norm" not in name:
                p.normal_(0, 0.3)
    return model.eval()


def continuous_batch(model: GPT, compile: bool) -> list[list[int]]:
    """Prompts of different lengths joining a 3-row batch as rows free up, decoding past the context (the window slides)."""
    engine = Engine(model, max_batch=3, compile=compile)
    prompts = [[1, 2, 3], [5] * 11, [7, 8], [9] * 20, [4]]
    reqs = [engine.add(p, dataclasses.replace(GREEDY, max_tokens=n)) for p, n in zip(prompts, [30, 5, 12, 20, 9])]
    engine.run()
    return [r.out_ids for r in reqs]


@pytest.mark.parametrize("make", [modern_model, lambda: lively_model(30, block_size=16)], ids=["modern", "gpt2"])
def test_compiled_step_gives_the_eager_tokens(make):
    torch._dynamo.reset()
    eager = continuous_batch(make(), compile=False)
    model = make()
    assert compile_decoding(model, backend="eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    assert continuous_batch(model, compile=True) == eager
    assert len(set(eager[0])) > 3  # real sequences, not one repeated token
    compiled = torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs
    assert 1 <= compiled <= 2  # the step ran compiled: one graph for one row, one for several, whatever the lengths


def test_compiled_int8_step_gives_the_eager_tokens():
    from gpt.infer.weights import prepare_for_decoding

    idx = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    eager = generate(prepare_for_decoding(modern_model(), torch.float32, "int8"), idx, 10, GREEDY)
    model = prepare_for_decoding(modern_model(), torch.float32, "int8")
    compile_decoding(model, backend="eager")
    assert torch.equal(generate(model, idx, 10, GREEDY), eager)


def test_without_a_compiler_decoding_stays_eager_and_says_so(monkeypatch, capsys):
    monkeypatch.setenv("PATH", "")
    monkeypatch.delenv("CXX", raising=False)
    model = modern_model()
    assert not compile_decoding(model)
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["--compile: no C++ compiler (g++ or clang++) on PATH for inductor's CPU kernels; decoding without it"]
    idx = torch.tensor([[1, 2, 3]])
    assert torch.equal(generate(model, idx, 6, GREEDY), generate(modern_model(), idx, 6, GREEDY))


def test_a_failing_backend_falls_back_in_one_line(capsys):
    def broken(gm, example_inputs):
        raise RuntimeError("no kernels today")

    torch._dynamo.reset()
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    model = modern_model()
    compile_decoding(model, backend=broken)
    assert torch.equal(generate(model, idx, 6, GREEDY), generate(modern_model(), idx, 6, GREEDY))
    assert capsys.readouterr().err.strip().splitlines() == [
        "--compile: the broken backend failed (RuntimeError); decoding without it"]


def test_sample_py_compile_flag_gives_the_same_text(tmp_path, capsys, monkeypatch):
    chars = list("abcdefghijklmnopqrstuvwxyz .\n")
    model = lively_model(len(chars), block_size=32)
    save_checkpoint(tmp_path / "ck", model.state_dict(), {"model": dataclasses.asdict(model.config)},
                    CharTokenizer(chars))
    monkeypatch.setattr(compiled_decode, "BACKEND", "eager")
    torch._dynamo.reset()
    base = ["--ckpt", tmp_path / "ck", "--prompt", "the", "--max-new-tokens", 20, "--temperature", 0, "--dtype",
            "float32", "--json"]
    plain = run_in_process(capsys, "sample.py", *base)
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    compiled = run_in_process(capsys, "sample.py", *base, "--compile")
    assert plain.returncode == compiled.returncode == 0, compiled.stderr
    assert compiled.stdout == plain.stdout
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs


def test_inductor_compiles_the_int8_step(monkeypatch):
    """int8 --compile runs inductor's graph, not the eager fallback: with the CPU settings (CPU_TEMPLATES: freezing)
    inductor lowers the int8 weight kernel itself (its weight-only int8 template; the 124M step took 10 ms against
    14 with torch's kernel called as it is), with the eager step's logits and tokens."""
    import torch._inductor.config

    from gpt.infer.weights import prepare_for_decoding
    from gpt.model import KVCache

    # freezing is what the int8 lowering needs; the C++ wrapper (~10 s more to compile here) and max-autotune's
    # kernel timing (~2 s) are left out, and so are inductor's probe compiles of each vector ISA the CPU's flags
    # name (vec_isa_ok: ~6 s on a machine's first compile, as in CI)
    monkeypatch.setitem(compiled_decode.CPU_INDUCTOR, "cpp_wrapper", False)
    monkeypatch.setitem(compiled_decode.CPU_TEMPLATES, "max_autotune", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "vec_isa_ok", True)
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=4, n_embd=64, block_size=32, vocab_size=50, dropout=0.0)
    model = prepare_for_decoding(GPT(cfg), torch.float32, "int8")
    torch._dynamo.reset()
    step = compiled_decode.CompiledDecode(model, "inductor")
    cache = KVCache.empty(cfg, 1, 32, "cpu", torch.float32)
    with torch._inductor.config.patch(fx_graph_cache=False), torch.no_grad():  # no graph from an earlier run
        compiled, compiled_lse = step(torch.tensor([[4]]), cache, [3], cfg.vocab_size)
        assert not step.failed
        eager, eager_lse = compiled_decode.decode_step(model, torch.tensor([[4]]), cache.k, cache.v, torch.tensor([3]), 4,
                                                       cfg.vocab_size)
    torch.testing.assert_close(compiled, eager, atol=0.05, rtol=0.05)  # int8 layers compute in bf16: fused norms
    assert compiled.argmax(-1).equal(eager.argmax(-1))                 # round once, not twice
    torch.testing.assert_close(compiled_lse, eager_lse, atol=0.05, rtol=0.05)


def test_fp32_one_row_step_compiles_without_frozen_weights():
    """inductor's settings per graph: freezing and max-autotune (minutes of compiling, and no graph cache across
    runs) where its matrix templates pay, bf16 or int8 weights or several rows; not for fp32 weights at one row."""
    import torch._inductor.config as inductor

    from gpt.infer.weights import prepare_for_decoding

    def frozen(model, rows):
        with compiled_decode.CompiledDecode(model, "inductor").inductor_settings(rows):
            assert inductor.cpp_wrapper
            return inductor.freezing and inductor.max_autotune

    assert not frozen(modern_model(), rows=1)
    assert frozen(modern_model(), rows=3)
    assert frozen(modern_model().to(torch.bfloat16), rows=1)
    assert frozen(prepare_for_decoding(modern_model(), torch.float32, "int8"), rows=1)
    assert not inductor.freezing  # set only around the step


def test_compiled_bf16_step_does_not_recompile_as_the_cache_grows():
    """bf16 attention on CPU picks matmul_attention above a count of scores; under compile a test on the growing
    cache length recompiled the step mid-reply (tens of seconds with inductor), and so did a view spanning the
    whole cache once the rows filled their context: one graph for several rows, past the context."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layer=1, n_head=16, n_embd=64, block_size=64, vocab_size=40, dropout=0.0)
    model = GPT(cfg).to(torch.bfloat16).eval()
    torch._dynamo.reset()
    assert compile_decoding(model, backend="eager")
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    generate(model, torch.arange(8).view(8, 1) + 1, 100, GREEDY)  # 8 rows x 16 heads x 16+ positions: 2,048 scores
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs == 1
