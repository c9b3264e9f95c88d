"""Decode throughput of gpt's sampler against transformers and a nanoGPT-style loop, in one run.

    python bench/sample_throughput.py                      # the full matrix (several minutes on 2 cores)
    python bench/sample_throughput.py --models char --repeats 1 --new-tokens 100   # a quick look

For each model shape (the Shakespeare character model, and a GPT-2-124M-shaped random model),
batch size and prompt length it measures decode tokens/s of:
  ours          gpt.infer.engine.generate with the KV cache (prefill, then GPT.forward one token per row)
  ours-nocache  gpt.infer.engine.generate(use_kv_cache=False): the whole window through the model every token
  hf            transformers GPT2LMHeadModel.generate(use_cache=True), the same weights
  hf-nocache    the same with use_cache=False                      (batch 1 only: it is slow)
  nanogpt       nanoGPT's sample loop (crop, full forward, top-k, multinomial, torch.cat) (batch 1)
All runs generate greedily and exactly `new-tokens` tokens (transformers' end-of-text stopping is
disabled). Decode rate = batch x (n - 1) / (time(n tokens) - time(1 token)), which removes the
prefill from every system alike; each figure is the median of --repeats runs. The machine is
shared and timings are noisy: compare the ratios printed in the same run, not absolute numbers
across runs. The 124M model reads its fp32 weights once per token, so memory bandwidth caps
batch-1 decode at bandwidth / (4 bytes x params); the table shows the share of that cap reached.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.config import ModelConfig  # noqa: E402
from gpt.device import pick_device, resolve_dtype, tune_allocator  # noqa: E402
from gpt.infer.engine import generate  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT  # noqa: E402

SHAPES = {
    "char": ModelConfig(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65, dropout=0.0),
    "124m": ModelConfig(n_layer=12, n_head=12, n_embd=768, block_size=1024, vocab_size=50257, dropout=0.0),
}
GREEDY = SamplingParams(temperature=0)
TRANSPOSED = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def hf_model(model: GPT, n_positions: int):
    """transformers' GPT-2 with our weights (Conv1D stores them transposed). Positions past our
    block_size (transformers cannot slide a window) keep their random init: speed is unaffected."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.config
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=cfg.vocab_size, n_positions=n_positions, n_embd=cfg.n_embd,
                                    n_layer=cfg.n_layer, n_head=cfg.n_head, activation_function="gelu_new",
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    state = hf.state_dict()
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if k == "transformer.wpe.weight":
                state[k][: v.shape[0]] = v
            elif k in state:
                state[k].copy_(v.t() if k.endswith(TRANSPOSED) else v)
    hf.load_state_dict(state)
    hf.generation_config.eos_token_id = None  # never stop early: both sides make the same number of tokens
    hf.generation_config.pad_token_id = 0
    return hf.eval()


@torch.no_grad()
def nanogpt_generate(model: GPT, idx: torch.Tensor, max_new_tokens: int, temperature=1.0, top_k=None):
    """nanoGPT's GPT.generate loop (uncached; crops to block_size each step), run on our model."""
    for _ in range(max_new_tokens):
        idx_cond = idx if idx.size(1) <= model.config.block_size else idx[:, -model.config.block_size:]
        logits, _ = model(idx_cond, logits_to_keep=1)
        logits = logits[:, -1, :] / temperature
        if top_k is not None:
            v, _ = torch.topk(logits, min(top_k, logits.size(-1)))
            logits[logits < v[:, [-1]]] = -float("Inf")
        probs = F.softmax(logits, dim=-1)
        idx = torch.cat((idx, torch.multinomial(probs, num_samples=1)), dim=1)
    return idx


def decode_rate(run, batch: int, n: int, repeats: int) -> float:
    """Median tokens/s of the decode phase: batch x (n - 1) / (time(n) - time(1))."""
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(1)
        t1 = time.perf_counter()
        run(n)
        t2 = time.perf_counter()
        rates.append(batch * (n - 1) / max((t2 - t1) - (t1 - t0), 1e-9))
    return statistics.median(rates)


def bench_shape(name: str, args) -> None:
    torch.manual_seed(0)
    device = pick_device(args.device)
    dtype = resolve_dtype(args.dtype, device)
    model = GPT(SHAPES[name]).eval()
    cfg = model.config
    n_params = sum(p.numel() for p in model.parameters())
    hf = None if args.skip_hf else hf_model(model, max(cfg.block_size, max(args.prompts) + args.new_tokens))
    hf = hf.to(device, dtype) if hf is not None else None
    prepare_for_decoding(model.to(device), dtype, args.quantize)
    if args.row_major:  # undo the fp32 CPU layout, to measure what it gains
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.data = module.weight.data.contiguous()
    width = 1 if args.quantize == "int8" else torch.finfo(dtype).bits // 8
    cap = args.bandwidth_gbs * 1e9 / (width * n_params)
    print(f"\n## {name}: {cfg.n_layer} layers x {cfg.n_head} heads x {cfg.n_embd}, block {cfg.block_size}, "
          f"vocab {cfg.vocab_size}, {n_params / 1e6:.1f}M params, {str(dtype).replace('torch.', '')} on {device}"
          f"{', int8 weights (ours only)' if args.quantize else ''}; bandwidth cap at batch 1 ~{cap:.0f} tok/s")
    print(f"{'batch':>5} {'prompt':>6} {'system':>13} {'tok/s':>9} {'ms/tok':>8}  note")
    for batch in args.batches:
        for plen in args.prompts:
            idx = torch.randint(0, cfg.vocab_size, (batch, plen), generator=torch.Generator().manual_seed(plen))
            idx = idx.to(device)
            n, n_slow = args.new_tokens, args.uncached_tokens
            rows = {}
            rows["ours"] = decode_rate(lambda k: generate(model, idx, k, GREEDY), batch, n, args.repeats)
            if args.sampled:
                rows["ours-sampled"] = decode_rate(
                    lambda k: generate(model, idx, k, SamplingParams(temperature=0.8, top_k=200, seed=0)), batch, n, args.repeats)
            rows["ours-nocache"] = decode_rate(
                lambda k: generate(model, idx, k, GREEDY, use_kv_cache=False), batch, n_slow, 1)
            if hf is not None:
                def hf_run(k, cache=True):
                    with torch.inference_mode():
                        hf.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=cache)
                rows["hf"] = decode_rate(hf_run, batch, n, args.repeats)
                if batch == 1:
                    rows["hf-nocache"] = decode_rate(lambda k: hf_run(k, cache=False), batch, n_slow, 1)
            if batch == 1:
                rows["nanogpt"] = decode_rate(
                    lambda k: nanogpt_generate(model, idx, k, temperature=0.8, top_k=200), batch, n_slow, 1)
            for system, rate in rows.items():
                note = ""
                if system != "ours":
                    note = f"ours is {rows['ours'] / rate:.2f}x"
                elif batch == 1:
                    note = f"{100 * rate / cap:.0f}% of the bandwidth cap"
                print(f"{batch:>5} {plen:>6} {system:>13} {rate:>9.1f} {1000 * batch / rate:>8.2f}  {note}", flush=True)
    if hf is not None:
        check_parity(model, hf)


def check_parity(model: GPT, hf) -> None:
    """Greedy tokens must agree with transformers on the same weights (within our block_size)."""
    idx = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    idx = idx.to(model.transformer.wpe.weight.device)
    k = min(24, model.config.block_size - 8)
    ours = generate(model, idx, k, GREEDY)
    with torch.inference_mode():
        theirs = hf.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False)
    print(f"greedy tokens identical to transformers on the same weights: {torch.equal(ours, theirs)}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="char,124m", help="comma-separated: char, 124m")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--prompts", default="16,512")
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--uncached-tokens", type=int, default=6, help="tokens for the slow uncached systems")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="float32", help="weights and activations: float32, bfloat16, auto")
    p.add_argument("--quantize", choices=["int8"], help="weight-only int8 for ours (gpt/infer/quantize.py)")
    p.add_argument("--row-major", action="store_true", help="ours without the fp32 CPU weight layout (gpt/infer/weights.py)")
    p.add_argument("--bandwidth-gbs", type=float, default=40.0, help="memory bandwidth for the cap column")
    p.add_argument("--sampled", action="store_true", help="also time ours with temperature 0.8 / top-k 200")
    p.add_argument("--skip-hf", action="store_true")
    args = p.parse_args()
    allocator = tune_allocator()
    args.batches = [int(x) for x in args.batches.split(",")]
    args.prompts = [int(x) for x in args.prompts.split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, allocator {allocator}; decode tokens/s (median of "
          f"{args.repeats}); noisy on a shared machine")
    for name in args.models.split(","):
        bench_shape(name, args)


if __name__ == "__main__":
    main()
