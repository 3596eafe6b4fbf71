"""Backends of the MHA ops, as registered with ``aiter_core``'s registry.

Two backends implement every op (``ops.OPS``):

* ``triton`` (priority 100): ``triton/launch.py`` and its kernels. Runs on CUDA/ROCm devices, or
  on CPU tensors when ``TRITON_INTERPRET=1`` (how CI exercises the kernels).
* ``reference`` (priority 0): ``reference.py`` in PyTorch, on any device.

Each implementation is a function taking the op's Call (``checks.py``) and returning the op's
outputs. Importing this module is cheap (no torch, no Triton): the entry points ``aiter.backends``
-> :func:`backend_specs` and ``aiter.families`` -> :data:`family` only describe; the functions
below import their backend on first call.
"""

from __future__ import annotations

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

# the op names (ops.OPS; repeated here so discovery does not import torch)
FORWARD_OPS = ("mha_fwd", "mha_varlen_fwd", "flash_attn_func", "flash_attn_varlen_func",
               "flash_attn_fp8_pertensor_func", "flash_attn_varlen_fp8_pertensor_func", "flash_attn_fp8_func",
               "flash_attn_varlen_fp8_func", "flash_attn_with_kvcache")
BACKWARD_OPS = ("mha_bwd", "mha_varlen_bwd")
OPS = FORWARD_OPS + BACKWARD_OPS
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0
MAX_HEAD_DIM = 256

__all__ = ["OPS", "backend_specs", "family", "triton_supports", "triton_fwd", "triton_bwd", "reference_fwd",
           "reference_bwd"]


def triton_fwd(call):
    return (_launch or _load_launch()).fwd(call)


def triton_bwd(call):
    return (_launch or _load_launch()).bwd(call)


def reference_fwd(call):
    from .reference import fwd

    return fwd(call)


def reference_bwd(call):
    from .reference import bwd

    return bwd(call)


_launch = None  # aiter_mha.triton.launch once a Triton call has run (an import statement per call costs ~4 us)


def _load_launch():
    global _launch
    from .triton import launch

    _launch = launch
    return launch


def triton_supports(key) -> list[str]:
    """Why the Triton kernels cannot run a call with this ``checks.Key`` (empty list: they can)."""
    import torch

    reasons = list(triton_device_reasons(key.device))
    interpreted = key.device.type == "cpu"
    if key.fp8:
        e4m3 = torch.float8_e4m3fn
        if key.dtype.itemsize == 1 and key.dtype != e4m3:
            reasons.append(f"fp8 dtype {key.dtype} is not supported (only float8_e4m3fn)")
        if key.backward:
            reasons.append("fp8 has no backward")
        if interpreted:
            # the fp8 kernel multiplies P and V in bf16, and bf16 tl.dot is silently wrong when interpreted
            reasons.append("fp8 is not supported by the Triton interpreter (its bf16 tl.dot is wrong there)")
    elif key.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        reasons.append(f"dtype {key.dtype} is not supported (fp16, bf16, fp32, fp8 e4m3fn)")
    # the ops that quantize (fp8 key, high-precision dtype) compute in e4m3 too
    quantized = key.fp8 and key.dtype.itemsize != 1
    reasons += triton_dtype_reasons(key.device, [key.dtype, torch.float8_e4m3fn] if quantized else [key.dtype])
    for name, d in (("q/k", key.head_dim_qk), ("v", key.head_dim_v)):
        if d > MAX_HEAD_DIM:
            reasons.append(f"{name} head dim {d} > {MAX_HEAD_DIM}")
    if key.backward and key.paged:
        reasons.append("paged KV has no backward")
    return reasons


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``mha``: every backend of every MHA op."""
    triton = specs_for({**dict.fromkeys(FORWARD_OPS, triton_fwd), **dict.fromkeys(BACKWARD_OPS, triton_bwd)},
                       backend="triton", priority=TRITON_PRIORITY, available=triton_available,
                       supports=triton_supports, cuda_graph=True,
                       description="Triton flash attention (CUDA/ROCm; CPU under TRITON_INTERPRET=1)")
    reference = reference_specs({**dict.fromkeys(FORWARD_OPS, reference_fwd),
                                 **dict.fromkeys(BACKWARD_OPS, reference_bwd)}, priority=REFERENCE_PRIORITY)
    return triton + reference


family = Family(name="mha", distribution="aiter-mha", smoke="aiter_mha.smoke:run", bench="aiter_mha.bench:main",
                host="aiter_mha.bench:host_cases", warmup="aiter_mha.bench:warmup_cases", ops=OPS)
