"""The opt-in compiled decode step (`sample.py --compile`, `serve.py --compile`, `Engine(compile=True)`).

Decoding one token on a CPU runs a few hundred small eager operations a step (norms, rotary
embeddings, residual adds, the cache write, the mask) around the matmuls that stream the weights;
at batch 1 their dispatch is a large share of a step. As gpt-fast does, the engine's one-token
cached step can instead run GPT.forward itself through `torch.compile` (inductor: C++ kernels on a
CPU, gcc or clang needed; Triton on a GPU), which fuses the elementwise work between the matmuls.
It is the same forward pass, not a second copy: prefill, training and the uncached path stay
eager, and tests/test_compiled_decode.py checks the compiled step gives the eager step's tokens.

Shapes. The step always takes the per-row path of GPT.forward (positions as a (A,) tensor, the
cache view of the A active rows up to the longest row, a mask hiding each row's unused tail), and
is compiled with dynamic shapes, so a new length or number of rows does not recompile: one graph for a
single row and one for several (torch specialises sizes of 1), each compiled once, on first use. The cache's
shape is a constant of the graph: an engine with another max_batch or context (generate() on another number
of rows) compiles its own.

On a CPU the graph's calls run from a C++ wrapper rather than a Python one (CPU_INDUCTOR, `cpp_wrapper`:
some seconds more to compile, about 1.5 ms less a step for the 124M shape in bf16), and inductor compiles
the step with freezing and max-autotune (CPU_TEMPLATES): the weights become constants of the graph, laid
out once for its kernels, and each matrix product takes the faster of torch's kernel and inductor's own C++
template (AMX or AVX-512 micro-kernels), timed at compile time; int8 products (gpt/infer/quantize.py) get
inductor's weight-only int8 template the same way. A SmolLM2-135M-shaped bf16 step took 19.3 ms with them
against 25.9 with torch.mv (Xeon-2). One graph goes without them: fp32 weights at one row, where torch's
matrix-vector products stream the weights nearly as fast (0.88-0.94x the tok/s) and the templates cost
minutes every run: freezing packs fp32 weights as mkldnn tensors, which inductor's graph cache cannot store,
so each run compiled the graph again (bench/compile_time.py, SmolLM2-135M shape on a warm cache: 247 s with
them, 27 s without; docs/performance.md#compiled-decoding).
With freezing the step holds its own copy of the weights: the model's weights must not change after the
first compiled step (a decoding model's do not; compile again after changing them).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import warnings

import torch

from gpt.infer.sampling import scores
from gpt.model import GPT, KVCache

BACKEND = "inductor"
CPU_INDUCTOR = dict(cpp_wrapper=True)  # the graph's calls from C++, not from a Python function
CPU_TEMPLATES = dict(freezing=True, max_autotune=True, max_autotune_gemm_backends="CPP,ATEN",  # set while tracing
                     autotune_num_choices_displayed=0, max_autotune_report_choices_stats=False)  # no timing tables


class CompiledDecode:
    """`model.forward` compiled for the engine's decode step: (A, 1) last tokens, the engine's whole cache,
    each row's position, the vocabulary sampled -> sampling.scores of the (A, vocab) logits. Falls back to the
    eager forward, with one line on stderr, if the backend fails to compile."""

    def __init__(self, model: GPT, backend):
        self.model, self.backend = model, backend
        self.compiled = torch.compile(decode_step, backend=backend, dynamic=True)
        self.failed = False
        self.on_cpu = backend == "inductor" and next(model.parameters()).device.type == "cpu"
        self.fp32 = all(t.dtype == torch.float32 for t in (*model.parameters(), *model.buffers()))

    def __call__(self, last: torch.Tensor, cache: KVCache, positions: list[int],
                 vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        length = min(cache.max_len, max(max(positions) + 1, 2))  # never 1: torch would compile a graph for it
        pos = torch.tensor(positions, device=last.device)
        if not self.failed:
            for t in (cache.k, cache.v):  # its sizes are constants: not symbols that could equal the batch's
                torch._dynamo.mark_static(t)
            try:
                with warnings.catch_warnings():  # rope_frequencies' lru_cache is traced through: harmless
                    warnings.filterwarnings("ignore", message=".*lru_cache.*")
                    warnings.filterwarnings("ignore", message="TypedStorage is deprecated")  # inductor's autotuner
                    with self.inductor_settings(rows=last.shape[0]):
                        return self.compiled(self.model, last, cache.k, cache.v, pos, length, vocab)
            except torch._dynamo.exc.BackendCompilerFailed as e:  # raised before the graph ran: the cache is intact
                self.failed = True
                name = getattr(self.backend, "__name__", self.backend)
                print(f"--compile: the {name} backend failed ({type(e.inner_exception).__name__}); "
                      "decoding without it", file=sys.stderr)
        return decode_step(self.model, last, cache.k, cache.v, pos, length, vocab)

    def inductor_settings(self, rows: int):
        """CPU_INDUCTOR on a CPU, with CPU_TEMPLATES unless the weights are fp32 and the step has one row (dynamo
        reads `freezing` while tracing, so it is set around every call: one graph for one row, one for several)."""
        if not self.on_cpu:
            return contextlib.nullcontext()
        import torch._inductor.config

        templates = {} if self.fp32 and rows == 1 else CPU_TEMPLATES
        return torch._inductor.config.patch({**CPU_INDUCTOR, **templates})


def decode_step(model: GPT, last: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor,
                length: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The engine's per-row step through model.forward: (A, 1) tokens at positions pos (A,) against the first
    `length` slots of the first A rows of the whole cache (k, v) -> sampling.scores of the (A, vocab) logits
    (in the graph, the float copy and the normalizer fuse with the LM head). The whole cache goes in (its shape
    never changes, so neither do the compiled graph's guards) and is sliced here."""
    a = last.shape[0]
    view = KVCache(k[:, :a, :, :length], v[:, :a, :, :length], whole=KVCache(k, v))  # rows written into k, v
    return scores(model(last, kv_cache=view, start_pos=pos, logits_to_keep=1)[0][:, -1], vocab)


def compile_unavailable(device: torch.device, backend=BACKEND) -> str | None:
    """Why torch.compile cannot run the decode step here (None: it can)."""
    try:
        import torch._dynamo

        if not torch._dynamo.is_dynamo_supported():
            return f"torch.compile does not support Python {sys.version_info.major}.{sys.version_info.minor} here"
    except Exception as e:  # noqa: BLE001 - any import failure means no compile
        return f"torch.compile is unavailable ({type(e).__name__}: {e})"
    if backend != "inductor":
        return None
    if device.type == "cpu":
        compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
        if not any(c and shutil.which(c) for c in compilers):
            return "no C++ compiler (g++ or clang++) on PATH for inductor's CPU kernels"
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return "Triton is not installed (inductor's GPU kernels need it)"
    elif device.type not in ("cpu", "cuda"):
        return f"inductor does not compile for the {device.type} device"
    return None


def compile_decoding(model: GPT, backend=None) -> bool:
    """Give `model` its compiled decode step (`model.compiled_decode`, which the engine uses); True if it did.
    backend: torch.compile's (default BACKEND, inductor). Where compile is unavailable, says why in one
    line on stderr and leaves decoding eager."""
    if getattr(model, "compiled_decode", None) is not None:
        return True
    backend = backend or BACKEND
    reason = compile_unavailable(next(model.parameters()).device, backend)
    if reason:
        print(f"--compile: {reason}; decoding without it", file=sys.stderr)
        return False
    model.compiled_decode = CompiledDecode(model, backend)  # a plain object: no submodule, no state_dict keys
    return True
