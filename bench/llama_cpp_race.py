"""Batch-1 decoding against llama.cpp on the same weights, in one run: ours (fp32, bf16, int8) vs llama.cpp
(f32, bf16 or f16, q8_0) through llama-cpp-python, with the same thread count.

    python bench/llama_cpp_race.py --ckpt out/run --gguf f32=m-f32.gguf --gguf bf16=m-bf16.gguf --gguf q8_0=m-q8.gguf
    python bench/llama_cpp_race.py --ckpt out/run              # builds the GGUFs with `python -m gpt.convert to-gguf`
    python bench/llama_cpp_race.py --ckpt out/run --compile    # also ours with the compiled decode step
    python bench/llama_cpp_race.py --ckpt out/run --batch 8    # also 8 sequences decoded together

Ours in int8 (`--quantize int8`) computes in what `--dtype auto` picks on this CPU, as sample.py and
serve.py do: bf16 activations where the CPU has native bf16 (row "int8-bf16"), else fp32 ("int8-fp32").

For each precision it measures:
  decode   ms per token of batch-1 greedy decoding, 128 tokens after a 1-token prompt: ours
           (t(129) - t(1)) / 128 through gpt.infer.engine.generate (prefill cancels out); llama.cpp's own
           eval time per token (llama_perf_context: t_eval_ms / n_eval, C only) and, beside it, the
           Python loop's wall time per token (eval + argmax, as ours is timed).
  ttft     time to first token for a 512-token prompt: prefill + the first token (ours: generate(…, 1);
           llama.cpp: eval of the prompt + one sample).
  batch N  (--batch N, N > 1) aggregate tokens/s of N sequences decoded together, 128 tokens each after
           a 1-token prompt (a different token per sequence): ours through generate on an (N, 1) prompt
           (the engine's continuous batch), llama.cpp through its batch API (llama_batch with N sequence
           ids, one llama_decode per step, the argmax of each row's logits in Python); both timed as
           N x 128 / (t(129) - t(1)), wall time. With --compile, ours also compiled; the ratio takes
           the faster of ours.
Ratios are ours / llama.cpp in tokens per second (> 1: ours faster), each pair from this run. The machine
line names the CPU: figures from different CPUs do not compare. Weights stream once a token, so each
row also shows the bandwidth a step implies (weight bytes / ms per token).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpt.checkpoint import load_checkpoint  # noqa: E402
from gpt.device import resolve_dtype, tune_allocator  # noqa: E402
from gpt.infer.engine import generate  # noqa: E402
from gpt.infer.sampling import SamplingParams  # noqa: E402
from gpt.infer.weights import prepare_for_decoding  # noqa: E402
from gpt.device import cpu_model  # noqa: E402

GREEDY = SamplingParams(temperature=0)
# int8 weights compute in what `--quantize int8` gets from `--dtype auto` here (bf16 on a CPU with native bf16)
AUTO = resolve_dtype("auto", torch.device("cpu"))
PAIRS = [("fp32", torch.float32, None, ("f32",)), ("bf16", torch.bfloat16, None, ("bf16", "f16")),
         ("int8-bf16" if AUTO == torch.bfloat16 else "int8-fp32", AUTO, "int8", ("q8_0",))]


def weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def decode_seconds(model, idx: torch.Tensor, tokens: int) -> float:
    """Seconds to decode `tokens` tokens after the first: t(tokens + 1) - t(1), so the prefill cancels out."""
    t0 = time.perf_counter()
    generate(model, idx, 1, GREEDY)
    t1 = time.perf_counter()
    generate(model, idx, tokens + 1, GREEDY)
    return (time.perf_counter() - t1) - (t1 - t0)


def ours(args, dtype, quantize, compile: bool) -> dict:
    """ms/token of batch-1 decoding and the 512-token time to first token, ours."""
    model = load_checkpoint(args.ckpt, "cpu", verify=False).model
    prepare_for_decoding(model, dtype, quantize, compile=compile)
    vocab = model.config.vocab_size
    one = torch.randint(0, vocab, (1, 1), generator=torch.Generator().manual_seed(0))
    long = torch.randint(0, vocab, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    generate(model, one, args.tokens + 1, GREEDY)  # warm-up (and the compile, if asked)
    decode, ttft = [], []
    for _ in range(args.repeats):
        decode.append(decode_seconds(model, one, args.tokens) / args.tokens * 1e3)
        t0 = time.perf_counter()
        generate(model, long, 1, GREEDY)
        ttft.append((time.perf_counter() - t0) * 1e3)
    return dict(ms=statistics.median(decode), ttft=statistics.median(ttft), bytes=weight_bytes(model))


def llama(args, path: Path, repack: bool = True) -> dict:
    """ms/token of batch-1 decoding (C eval time and the Python loop's wall time) and the 512-token TTFT.
    repack=False: without llama.cpp's weight repacking (`llama-cli --no-repack`), which on CPUs with AMX
    crashes llama-cpp-python 0.3.36 at the first q8_0 decode."""
    import llama_cpp
    import numpy as np

    lib, default = llama_cpp.llama_cpp, llama_cpp.llama_cpp.llama_model_default_params

    def params():
        p = default()
        p.use_extra_bufts = repack
        return p

    lib.llama_model_default_params = params
    try:
        llm = llama_cpp.Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads,
                              n_ctx=max(1024, args.prompt + args.tokens + 8), n_batch=512, verbose=False)
    finally:
        lib.llama_model_default_params = default
    vocab = llm.n_vocab()
    rng = np.random.default_rng(1)
    prompt = rng.integers(0, vocab, args.prompt).tolist()
    decode, c_eval, ttft = [], [], []
    for rep in range(args.repeats + 1):  # the first is a warm-up
        llm.reset()
        llama_cpp.llama_perf_context_reset(llm.ctx)
        llm.eval([0])
        t0 = time.perf_counter()
        for _ in range(args.tokens):
            llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
        t1 = time.perf_counter()
        perf = llama_cpp.llama_perf_context(llm.ctx)
        llm.reset()
        t2 = time.perf_counter()
        llm.eval(prompt)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t3 = time.perf_counter()
        if rep:
            decode.append((t1 - t0) / args.tokens * 1e3)
            c_eval.append(perf.t_eval_ms / max(1, perf.n_eval))
            ttft.append((t3 - t2) * 1e3)
    c_ms = statistics.median(c_eval)  # 0 where the context keeps no perf counters (llama-cpp-python's no_perf)
    return dict(ms=c_ms or statistics.median(decode), loop_ms=statistics.median(decode), ttft=statistics.median(ttft),
                bytes=path.stat().st_size)


def ours_batched(args, dtype, quantize, compile: bool = False) -> float:
    """Aggregate tokens/s of --batch sequences decoded together, ours (compile: the compiled decode step)."""
    model = load_checkpoint(args.ckpt, "cpu", verify=False).model
    prepare_for_decoding(model, dtype, quantize, compile=compile)
    idx = torch.arange(args.batch).view(-1, 1) * 7 + 1
    generate(model, idx, 9, GREEDY)  # warm-up (and the compile, if asked)
    rates = [args.batch * args.tokens / decode_seconds(model, idx, args.tokens) for _ in range(args.repeats)]
    return statistics.median(rates)


def llama_batched(args, path: Path, repack: bool) -> float:
    """Aggregate tokens/s of --batch sequences decoded together by llama.cpp (its C batch API: one
    llama_decode a step over every sequence, as llama-server and llama-batched-bench drive it)."""
    import ctypes

    import llama_cpp
    import numpy as np

    lib, n = llama_cpp.llama_cpp, args.batch
    mparams = lib.llama_model_default_params()
    mparams.use_extra_bufts = repack
    model = lib.llama_model_load_from_file(str(path).encode(), mparams)
    cparams = lib.llama_context_default_params()
    cparams.n_ctx, cparams.n_batch, cparams.n_seq_max = n * (args.tokens + 16), max(512, n), n
    cparams.n_threads = cparams.n_threads_batch = args.threads
    ctx = lib.llama_init_from_model(model, cparams)
    vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
    batch = lib.llama_batch_init(n, 0, n)

    def step(tokens: list[int], pos: int) -> list[int]:
        batch.n_tokens = n
        for i, t in enumerate(tokens):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, pos, 1, True
            batch.seq_id[i][0] = i
        if lib.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [np.ctypeslib.as_array(ctypes.cast(lib.llama_get_logits_ith(ctx, i), ctypes.POINTER(ctypes.c_float)),
                                      shape=(vocab,)) for i in range(n)]
        return [int(np.argmax(r)) for r in rows]

    def run(k: int) -> float:
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        t0, tokens = time.perf_counter(), [i * 7 + 1 for i in range(n)]
        for pos in range(k):
            tokens = step(tokens, pos)
        return time.perf_counter() - t0

    try:
        run(9)  # warm-up
        rates = []
        for _ in range(args.repeats):
            one, full = run(1), run(args.tokens + 1)
            rates.append(n * args.tokens / (full - one))
        return statistics.median(rates)
    finally:
        lib.llama_batch_free(batch)
        lib.llama_free(ctx)
        lib.llama_model_free(model)


def build_ggufs(args, out: Path) -> dict[str, Path]:
    """The GGUFs of --ckpt through our exporter, when it exists; {} (and a clear line) when it does not."""
    probe = subprocess.run([sys.executable, "-m", "gpt.convert", "to-gguf", "--help"], capture_output=True, text=True)
    if probe.returncode != 0:
        print("llama.cpp: no --gguf given and this checkout has no `python -m gpt.convert to-gguf` (GGUF exporter) "
              "to build one: pass --gguf KIND=PATH (f32, bf16/f16, q8_0) from another converter", flush=True)
        return {}
    files = {}
    for kind in ("f32", "bf16", "q8_0"):
        path = out / f"model-{kind}.gguf"
        cmd = [sys.executable, "-m", "gpt.convert", "to-gguf", str(args.ckpt), str(path), "--type", kind]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode == 0 and path.is_file():
            files[kind] = path
        else:
            print(f"llama.cpp: `{' '.join(cmd[1:])}` failed: {(done.stderr or done.stdout).strip()[-300:]}", flush=True)
    return files


def gguf_args(values: list[str]) -> dict[str, Path]:
    files = {}
    for v in values:
        kind, _, path = v.partition("=")
        if not path or kind not in ("f32", "bf16", "f16", "q8_0"):
            raise SystemExit(f"--gguf {v}: expected KIND=PATH with KIND one of f32, bf16, f16, q8_0")
        files[kind] = Path(path)
    return files


def row(name: str, r: dict | None, ours_ms: float | None = None, ours_ttft: float | None = None) -> str:
    if r is None:
        return f"{name:<26} {'not measured':>10}"
    gbs = r["bytes"] / (r["ms"] * 1e-3) / 1e9
    s = f"{name:<26} {r['ms']:>8.2f} {1e3 / r['ms']:>8.1f} {gbs:>7.1f} {r['ttft']:>9.1f}"
    if "loop_ms" in r:
        s += f"   (Python loop {r['loop_ms']:.2f} ms/tok)"
    if ours_ms is not None:
        s += f"   ours/llama.cpp: decode {r['ms'] / ours_ms:.2f}x, ttft {r['ttft'] / ours_ttft:.2f}x"
    return s


def batched_row(args, name: str, dtype, quantize, gguf: Path | None, repack: bool) -> str:
    mine = ours_batched(args, dtype, quantize)
    s = f"  batch {args.batch}: ours {name} {mine:.1f} tok/s"
    if args.compile:
        compiled = ours_batched(args, dtype, quantize, compile=True)
        s += f", --compile {compiled:.1f}"
        mine = max(mine, compiled)
    if gguf is None:
        return s + ", llama.cpp not measured"
    theirs = llama_batched(args, gguf, repack)
    return s + f", llama.cpp {theirs:.1f} tok/s   ours/llama.cpp {mine / theirs:.2f}x"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", required=True, help="our checkpoint (output dir or checkpoint folder)")
    p.add_argument("--gguf", action="append", default=[], metavar="KIND=PATH",
                   help="llama.cpp's file of the same weights; KIND: f32, bf16, f16, q8_0 (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="threads for both (default: %(default)s)")
    p.add_argument("--tokens", type=int, default=128, help="decoded tokens timed (default: %(default)s)")
    p.add_argument("--prompt", type=int, default=512, help="prompt tokens of the TTFT measure (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="median of this many runs (default: %(default)s)")
    p.add_argument("--compile", action="store_true", help="also ours with the compiled decode step (--compile)")
    p.add_argument("--batch", type=int, default=1, help="also N sequences decoded together, N > 1 (default: off)")
    args = p.parse_args()
    allocator = tune_allocator()
    torch.set_num_threads(args.threads)
    try:
        import llama_cpp

        llama_version = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama_cpp, llama_version = None, "llama-cpp-python NOT INSTALLED (pip install llama-cpp-python): ours only"
    print(f"CPU: {cpu_model()}; {args.threads} threads; torch {torch.__version__}, allocator {allocator}; "
          f"{llama_version}; batch 1, {args.tokens} tokens decoded, TTFT of a {args.prompt}-token prompt; "
          f"median of {args.repeats}")
    with tempfile.TemporaryDirectory() as tmp:
        files = gguf_args(args.gguf) or (build_ggufs(args, Path(tmp)) if llama_cpp is not None else {})
        print(f"{'system':<26} {'ms/tok':>8} {'tok/s':>8} {'GB/s':>7} {'ttft ms':>9}")
        for name, dtype, quantize, kinds in PAIRS:
            mine = [(f"ours {name}", ours(args, dtype, quantize, False))]
            if args.compile:
                mine.append((f"ours {name} --compile", ours(args, dtype, quantize, True)))
            for label, r in mine:
                print(row(label, r), flush=True)
            kind = next((k for k in kinds if k in files), None)
            repack = not (kind == "q8_0" and "amx" in cpu_model())  # see llama()
            theirs = llama(args, files[kind], repack) if kind and llama_cpp is not None else None
            best = min(mine, key=lambda m: m[1]["ms"])[1]
            label = f"llama.cpp {kind or '/'.join(kinds)}" + ("" if repack else " no-repack")
            print(row(label, theirs, best["ms"], best["ttft"]), flush=True)
            if args.batch > 1:
                print(batched_row(args, name, dtype, quantize, files.get(kind) if llama_cpp else None, repack), flush=True)


if __name__ == "__main__":
    main()
