"""Speed of a Llama-family model (SmolLM2-135M's shape, random weights): ours against transformers.

    python bench/family_speed.py                                   # decode and train, fp32 and bf16 (~3 min on 2 cores)
    python bench/family_speed.py --parts decode --batches 1 --new-tokens 64 --repeats 3
    python bench/family_speed.py --parts train --train-steps 3
    python bench/family_speed.py --compile --repeats 3   # also ours with torch.compile (decode step, training step)

The shape: 30 layers x 576, 9 query / 3 key-value heads of 64, SwiGLU 1536, vocabulary 49152, RoPE theta
1e5, RMSNorm, tied embeddings (SmolLM2-135M). transformers' LlamaForCausalLM is built with its own random
init and ours imported from it (gpt/hf_families.py: the same tensors, fused), so both hold identical weights.
  decode  ours: gpt.infer.engine.generate on a model prepared by gpt.infer.weights.prepare_for_decoding;
          theirs: LlamaForCausalLM.generate(use_cache=True), greedy, min_new_tokens = max_new_tokens, so
          both make exactly N tokens. Decode rate = batch x (N - 1) / (t(N) - t(1)), prefill removed alike
          (as bench/sample_throughput.py); median of --repeats. Weights in the dtype named (bf16: cast).
  train   one step = forward, backward, clip 1.0, AdamW step (fused, as transformers' Trainer uses from
          torch 2.8) at batch 4 x 256 on random tokens: ours is bench/train_throughput.py's step (our training
          loop's _train_step); theirs LlamaForCausalLM(input_ids, labels=...) with torch.optim.AdamW; fp32,
          and bf16 autocast on fp32 weights. Median step time of --train-steps after one warm-up step.
--compile adds rows for ours compiled (inductor): the decode step as `sample.py --compile` runs it
(gpt/infer/compiled_decode.py) and the training step as `train.compile: true` does; transformers stays eager
in those rows (its eager rows are the baseline), and --compile-theirs adds transformers' training step under
torch.compile too. A compile takes a minute or more on 2 cores, untimed (warm-up).
Targets from issue 23, for information: decode >= 2x transformers at batch 1, training >= 1.5x.
glibc's allocator is tuned (gpt.device.tune_allocator) for the whole process, both systems alike.
The machine may be shared: compare the ratios of one run, not absolute figures across runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from sample_throughput import decode_rate  # noqa: E402
from gpt.device import cpu_model  # noqa: E402
from train_throughput import cpu_flag, ours_step  # noqa: E402

from gpt.checkpoint import load_state_checked  # noqa: E402
from gpt.config import ModelConfig  # noqa: E402
from gpt.device import tune_allocator  # noqa: E402
from gpt.hf_families import config_from_hf, weights_from_hf  # noqa: E402
from gpt.infer.engine import generate  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.model import GPT  # noqa: E402

SMOLLM2_135M = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                    num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
                    bos_token_id=None, eos_token_id=None, pad_token_id=None)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
GREEDY = SamplingParams(temperature=0)


def theirs_fp32():
    """transformers' LlamaForCausalLM in SmolLM2-135M's shape, its own random init, fp32, eval mode."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(**SMOLLM2_135M)).eval()
    hf.generation_config.eos_token_id = None  # never stop early: both sides make the same number of tokens
    hf.generation_config.pad_token_id = 0
    return hf


def ours_from(hf) -> GPT:
    """Our model holding transformers' weights exactly (q/k/v and gate/up fused), fp32."""
    cfg: ModelConfig = config_from_hf({**hf.config.to_dict(), "architectures": ["LlamaForCausalLM"]}, "bench")
    model = GPT(cfg)
    load_state_checked(model, weights_from_hf(hf.state_dict(), cfg, "bench"), "bench")
    return model


def bench_decode(args, rows: list) -> None:
    for dtype_name in args.dtypes:
        for compiled in (False, True) if args.compile else (False,):
            decode_rows(args, rows, dtype_name, compiled)


def decode_rows(args, rows: list, dtype_name: str, compiled: bool) -> None:
    dtype = DTYPES[dtype_name]
    hf = theirs_fp32()
    model = prepare_for_decoding(ours_from(hf), dtype, compile=compiled)
    if compiled:  # the compiled step computes the eager step's function; greedy tokens show any rounding change
        eager = prepare_for_decoding(ours_from(hf), dtype)
        idx = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
        same = torch.equal(generate(model, idx, 32, GREEDY), generate(eager, idx, 32, GREEDY))
        print(f"{dtype_name} compiled: greedy tokens identical to ours eager (2 x 32): {same}")
    hf = hf.to(dtype)
    if dtype == torch.float32:
        check_parity(model, hf)
    label = dtype_name + (" ours compiled" if compiled else "")
    for batch in args.batches:
        idx = torch.randint(0, model.config.vocab_size, (batch, args.prompt),
                            generator=torch.Generator().manual_seed(batch))

        def hf_run(k):
            with torch.inference_mode():
                hf.generate(idx, max_new_tokens=k, min_new_tokens=k, do_sample=False, use_cache=True)

        for _ in range(args.warmup):  # first calls pay one-off costs (allocations, kernel selection)
            generate(model, idx, 2, GREEDY), hf_run(2)
        ours = decode_rate(lambda k: generate(model, idx, k, GREEDY), batch, args.new_tokens, args.repeats)
        theirs = decode_rate(hf_run, batch, args.new_tokens, args.repeats)
        rows.append((f"decode batch {batch}", label, ours, theirs, "tok/s", 2.0 if batch == 1 else None))
        show(rows[-1])


def check_parity(model: GPT, hf) -> None:
    """Greedy tokens must agree with transformers on the same weights (fp32)."""
    idx = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(1))
    ours = generate(model, idx, 16, GREEDY)
    with torch.inference_mode():
        theirs = hf.generate(idx, max_new_tokens=16, min_new_tokens=16, do_sample=False)
    print(f"fp32 greedy tokens identical to transformers on the same weights (2 x 16): {torch.equal(ours, theirs)}")


def hf_step(batch: int, block: int, dtype: torch.dtype, compiled: bool = False):
    """transformers' training step: forward with labels, backward, clip 1.0, fused AdamW, bf16 autocast if asked;
    compiled: the model under torch.compile."""
    hf = theirs_fp32().train()
    model = torch.compile(hf) if compiled else hf
    opt = torch.optim.AdamW(hf.parameters(), lr=1e-3, betas=(0.9, 0.99), weight_decay=0.1, fused=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, hf.config.vocab_size, (batch, block), generator=g)

    def step(i):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss  # shifts the labels inside: block - 1 targets a row
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return hf, step


def step_seconds(step, n: int) -> float:
    step(0)  # warm-up; allocates the optimizer state
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        step(i + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_train(args, rows: list) -> None:
    batch, block = args.train_batch, args.train_block
    cfg = ours_from(theirs_fp32()).config
    cfg.block_size, cfg.dropout = block, 0.0
    tokens = batch * block
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        name = dtype_name + (" autocast" if dtype != torch.float32 else "")
        theirs_s = step_seconds(hf_step(batch, block, dtype)[1], args.train_steps)
        ours_s = {}
        for compiled in (False, True) if args.compile else (False,):
            ours_s[compiled] = step_seconds(ours_step(cfg, batch, torch.device("cpu"), dtype, compiled)[1],
                                            args.train_steps)
            label = name + (" ours compiled" if compiled else "")
            rows.append((f"train {batch} x {block}", label, tokens / ours_s[compiled], tokens / theirs_s, "tok/s", 1.5))
            show(rows[-1])
        if args.compile_theirs:  # ours compiled against theirs compiled
            both_s = step_seconds(hf_step(batch, block, dtype, compiled=True)[1], args.train_steps)
            rows.append((f"train {batch} x {block}", name + " both compiled", tokens / ours_s[True], tokens / both_s,
                         "tok/s", None))
            show(rows[-1])


def show(row) -> None:
    what, dtype, ours, theirs, unit, target = row
    goal = f"target >= {target:.1f}x" if target else ""
    print(f"{what:<20} {dtype:<18} {ours:>10,.1f} {theirs:>12,.1f} {unit:>6} {ours / theirs:>7.2f}x  {goal}",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--parts", default="decode,train", help="comma list of: decode, train")
    p.add_argument("--dtypes", default="float32,bfloat16", help="comma list of: float32, bfloat16")
    p.add_argument("--batches", default="1,8", help="decode batch sizes")
    p.add_argument("--prompt", type=int, default=16, help="decode prompt tokens")
    p.add_argument("--new-tokens", type=int, default=24, help="decode N: tokens generated per timed call")
    p.add_argument("--repeats", type=int, default=1, help="decode: timed (t(1), t(N)) pairs; the median rate")
    p.add_argument("--warmup", type=int, default=1, help="decode: untimed 2-token calls per system first")
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--train-block", type=int, default=256)
    p.add_argument("--train-steps", type=int, default=2, help="timed training steps after one warm-up")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--compile", action="store_true", help="also ours compiled (decode step and training step)")
    p.add_argument("--compile-theirs", action="store_true",
                   help="with --compile: also transformers' training step compiled (a last row: both compiled)")
    args = p.parse_args()
    if args.compile_theirs and not args.compile:
        p.error("--compile-theirs compares both compiled: give --compile too")
    args.dtypes = args.dtypes.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    allocator = tune_allocator()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    flags = sorted(f for f in ("avx512_bf16", "amx_bf16", "avx512f", "avx2") if cpu_flag(f))
    print(f"CPU {cpu_model()}, {os.cpu_count()} cores {flags}; torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {torch.get_num_threads()} threads, allocator {allocator}")
    print("SmolLM2-135M shape (random weights): 30 x 576, 9/3 heads of 64, SwiGLU 1536, vocab 49152, tied")
    print(f"{'what':<20} {'dtype':<18} {'ours':>10} {'transformers':>12} {'unit':>6} {'ratio':>8}")
    rows: list = []
    parts = args.parts.split(",")
    if "decode" in parts:
        bench_decode(args, rows)
    if "train" in parts:
        bench_train(args, rows)


if __name__ == "__main__":
    main()
