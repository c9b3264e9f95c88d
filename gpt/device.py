"""Which device and which numeric precision a run uses, and the autocast context for it."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import platform
import time
from functools import lru_cache

import torch

from gpt.config import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Dense bf16/fp16 tensor-core peaks (FLOP/s) for MFU; unknown GPUs report no MFU.
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12, "4090": 165e12}


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu for "auto"; anything else is taken as given."""
    if name != "auto":
        try:
            device = torch.device(name)
        except RuntimeError:
            raise ConfigError(f"device '{name}' is not a device name; use auto, cpu, cuda, cuda:N or mps") from None
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"device '{name}' requested but this machine has no usable CUDA GPU; "
                              "use device=cpu or device=auto")
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            raise ConfigError(f"device '{name}' requested but this machine has {torch.cuda.device_count()} GPU(s)")
        if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConfigError(f"device '{name}' requested but MPS is not available; use device=cpu or device=auto")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True on CPUs with bf16 matmul instructions (AVX512_BF16 or AMX); without them bf16 is emulated
    and far slower than fp32, so auto precision keeps fp32."""
    if platform.system() != "Linux":
        return False
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return "avx512_bf16" in flags or "amx_bf16" in flags
    except OSError:
        pass
    return False


MATMUL_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what CPU matmul speed depends on


def cpu_model() -> str:
    """The CPU as benchmarks name it: model name, family and model numbers, the matmul flags it has."""
    try:
        info = dict(line.split(":", 1) for line in open("/proc/cpuinfo").read().split("\n\n")[0].splitlines()
                    if ":" in line)
    except OSError:
        return platform.processor() or platform.machine() or "unknown CPU"
    info = {k.strip(): v.strip() for k, v in info.items()}
    flags = [f for f in MATMUL_FLAGS if f in info.get("flags", "").split()]
    return (f"{info.get('model name', 'unknown CPU')} (family {info.get('cpu family', '?')} model "
            f"{info.get('model', '?')}; {' '.join(flags) or 'no AVX2'})")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA when supported (else fp16 + GradScaler); bf16 on CPUs with native bf16; else fp32."""
    if name != "auto":
        if name not in DTYPES:
            raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {name!r}")
        return DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


def autocast(device: torch.device, dtype: torch.dtype):
    """Mixed-precision context: weights stay fp32, matmuls run in `dtype`."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def pick_threads(requested: int = 0) -> int:
    """CPU threads for this process: `requested` if > 0, else the cores other processes leave idle.

    Why: torch's default is one thread per core, and its parallel kernels (oneDNN's bf16 matmuls,
    the int8 kernel) end in a barrier. When another process holds one of the cores, every kernel
    waits for the descheduled thread -- a scheduler time slice -- so decoding the 124M model fell
    from 18.6 to 5.2 tok/s (fp32) and 16.7 to 2.1 (bf16) on 2 shared cores (docs/performance.md#threads).
    How many cores are busy is read from the kernel's count of runnable threads (/proc/loadavg),
    sampled for 50 ms -- not the 1-minute load average, which still counts a job that just ended.
    """
    if requested > 0:
        return requested
    try:
        cores = len(os.sched_getaffinity(0))
        busy = _other_runnable()
    except (AttributeError, OSError, ValueError):
        return torch.get_num_threads()
    return max(1, min(cores, cores - busy))


def _other_runnable(samples: int = 5) -> int:
    """Median count of runnable threads other than this one, over `samples` reads 10 ms apart."""
    counts = []
    for i in range(samples):
        with open("/proc/loadavg", encoding="ascii") as f:
            counts.append(int(f.read().split()[3].split("/")[0]) - 1)
        if i < samples - 1:
            time.sleep(0.01)
    return max(0, sorted(counts)[len(counts) // 2])


def enable_tf32() -> None:
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def gpu_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), None)


# glibc mallopt parameters (malloc.h); values are C ints, so 2**31 - 1 is the largest setting.
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP = 2**31 - 1
_allocator_state: str | None = None


def tune_allocator() -> str:
    """Tell glibc's malloc to keep freed memory for reuse; returns "on", "off" or why not.

    By default every buffer over 32 MB (activations, logits, their gradients) is mmap'ed on allocation
    and unmapped on free, so the kernel zeroes fresh pages every training step; on CPU that page
    faulting cost more than the matmuls at small shapes. Raising the mmap and trim thresholds lets
    the heap keep and reuse those buffers (what MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ do,
    without needing them set before Python starts). GPT_MALLOC_TUNE=0 in the environment turns it off.
    Call it before the first big allocation; later calls return the first answer.
    """
    global _allocator_state
    if _allocator_state is None:
        _allocator_state = _set_malloc_thresholds()
    return _allocator_state


def _set_malloc_thresholds() -> str:
    if os.environ.get("GPT_MALLOC_TUNE", "1").strip().lower() in ("0", "false", "off", "no"):
        return "off"
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return "off (not glibc)"
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        ok = libc.mallopt(_M_MMAP_THRESHOLD, _KEEP) and libc.mallopt(_M_TRIM_THRESHOLD, _KEEP)
    except (OSError, AttributeError):
        return "off (mallopt unavailable)"
    return "on" if ok else "off (mallopt refused)"
