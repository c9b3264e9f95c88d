"""How decoding stores the weights: in the compute dtype, and laid out for the matrix-vector products
that dominate it (or int8, gpt.infer.quantize).

Decoding a token reads every weight once, so its speed is the bandwidth at which the matmul kernel
streams them. On CPU in fp32, BLAS streams a weight stored (in, out) — the layout of GPT-2's and
transformers' Conv1D — faster than nn.Linear's (out, in): 24 vs 20 GB/s for the 124M shape's
matrices, 31 vs 21 GB/s for its LM head, here. So fp32 CPU decoding keeps each Linear's weight in
column-major memory: the same (out, in) tensor to every caller (F.linear, state_dict, the tied
embedding), only its strides change, so the forward pass and its results stay the same. bf16 streams
faster row-major on the same CPU and keeps it.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn as nn

from gpt.checkpoint import LoadedModel, load_checkpoint
from gpt.infer.compiled_decode import compile_decoding
from gpt.infer.quantize import quantize_int8
from gpt.lora_peft import is_peft_dir
from gpt.pretrained import load_adapter_folder


def add_model_args(p: argparse.ArgumentParser, threads: str, context_cap: int) -> None:
    """How a decoding command loads and holds its model: the flags sample.py and serve.py share.
    context_cap: the default cap of --max-model-len (gpt.infer.engine.DEFAULT_MAX_MODEL_LEN)."""
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16 (weights are converted)")
    p.add_argument("--threads", type=int, default=0, help=f"CPU threads for torch ({threads})")
    p.add_argument("--no-verify", action="store_true", help="skip the checksum check of the weights file")
    p.add_argument("--quantize", choices=["int8"], default=None,
                   help="int8: weight-only int8 Linear layers (faster decoding of large models on CPU; "
                        "see docs/performance.md#int8-weights)")
    p.add_argument("--compile", action="store_true",
                   help="compile the one-token decode step with torch.compile (inductor; a C++ compiler on CPU); "
                        "the first tokens wait for the compile (on 2 cores about 1 minute for 12 layers, 6 for 30; "
                        "fp32 at one row half that, and under a minute for 30 once inductor's cache holds it); "
                        "then about 1.6-1.8x eager's speed in bf16 on a 2-core Xeon, 1.9x in int8, 1.1-1.8x in fp32: "
                        "docs/performance.md#compiled-decoding")
    p.add_argument("--max-model-len", type=int, default=None, metavar="N",
                   help="context length of decoding: tokens one sequence holds, prompt included, in its KV cache "
                        f"row (default: the model's block_size, at most {context_cap})")


def load_for_decoding(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """args.ckpt (one of our checkpoints, or a PEFT adapter folder on its base, merged), verified unless
    --no-verify, prepared for decoding (the flags of add_model_args)."""
    if is_peft_dir(args.ckpt):
        loaded = load_adapter_folder(args.ckpt, device, verify=not args.no_verify)
    else:
        loaded = load_checkpoint(args.ckpt, device, verify=not args.no_verify)
    prepare_for_decoding(loaded.model, dtype, args.quantize, compile=getattr(args, "compile", False))
    return loaded


def prepare_for_decoding(model: nn.Module, dtype: torch.dtype, quantize: str | None = None,
                         compile: bool = False) -> nn.Module:
    """Eval mode, weights in the compute dtype, then int8 (quantize="int8"), or on CPU the layout that streams
    fastest: fp32 weights column-major, bf16 Linears as MatVecLinear. Dropout
    modules become Identity: off in eval mode anyway, they cost a call each a layer and a token.
    compile: the engine's decode step through torch.compile (gpt/infer/compiled_decode.py)."""
    model.to(dtype=dtype).eval()
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Dropout):
                setattr(module, name, nn.Identity())
    if quantize == "int8":
        quantize_int8(model)
    elif dtype == torch.float32 and next(model.parameters()).device.type == "cpu":
        column_major_linears(model)
    elif dtype == torch.bfloat16 and next(model.parameters()).device.type == "cpu":
        matvec_linears(model)
    if compile:
        compile_decoding(model)
    return model


class MatVecLinear(nn.Linear):
    """nn.Linear whose one-row products run as a matrix-vector product (torch.addmv). On CPU in bf16, torch's
    linear streams a weight matrix for a single row at about 15 GB/s and addmv at about 20 (Xeon-2,
    docs/performance.md#xeon-2-quiet-batch-1-against-llamacpp-2026-12-06), and a batch-1 decode step is one row through every
    matrix. The same function; any other shape goes through nn.Linear, and so does a compiled step, where
    inductor picks the kernel (gpt/infer/compiled_decode.py)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() != x.shape[-1] or torch.compiler.is_compiling():
            return super().forward(x)
        row = x.reshape(-1)
        y = torch.mv(self.weight, row) if self.bias is None else torch.addmv(self.bias, self.weight, row)
        return y.reshape(*x.shape[:-1], self.out_features)


def matvec_linears(model: nn.Module) -> None:
    """Every plain Linear of a bf16 CPU model for decoding becomes a MatVecLinear (same weights, in place)."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = MatVecLinear


def column_major_linears(model: nn.Module) -> None:
    """Store every Linear weight transposed in memory, keeping its (out, in) shape and values."""
    for module in model.modules():
        if isinstance(module, nn.Linear) and module.weight.is_contiguous():
            module.weight.data = module.weight.data.t().contiguous().t()
