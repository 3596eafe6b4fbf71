"""Upstream AITER's dtype names (``aiter.dtypes``), resolved for the running arch.

``fp8`` is the arch's native e4m3 flavour. It is resolved lazily on first access, so importing
this module never initialises CUDA.
"""

from __future__ import annotations

import torch

fp16 = torch.float16
bf16 = torch.bfloat16
fp32 = torch.float32
u32 = getattr(torch, "uint32", torch.int32)
i32 = torch.int32
i16 = torch.int16
i8 = torch.int8
u8 = torch.uint8
i64 = torch.int64
u64 = getattr(torch, "uint64", torch.int64)

# Types older torch builds may lack fall back to bytes, as upstream does.
fp8_e8m0 = getattr(torch, "float8_e8m0fnu", torch.uint8)
fp4x2 = getattr(torch, "float4_e2m1fn_x2", torch.uint8)
i4x2 = getattr(torch, "int4", torch.uint8)

_NAMED = {
    "fp16": fp16,
    "bf16": bf16,
    "fp32": fp32,
    "u32": u32,
    "i32": i32,
    "i16": i16,
    "i8": i8,
    "u8": u8,
    "i64": i64,
    "u64": u64,
    "fp8_e8m0": fp8_e8m0,
    "fp4x2": fp4x2,
    "i4x2": i4x2,
}


def get_fp8(device=None) -> torch.dtype:
    """The e4m3 fp8 dtype native to ``device``'s arch (uint8 when the arch has no fp8)."""
    from .arch import get_arch_info

    return get_arch_info(device).fp8_dtype or torch.uint8


def __getattr__(name: str):
    # `fp8` and `d_dtypes` depend on the device, so they are computed on first access.
    if name == "fp8":
        return get_fp8()
    if name == "d_dtypes":
        return {**_NAMED, "fp8": get_fp8()}
    raise AttributeError(f"module 'aiter_core.dtypes' has no attribute {name!r}")


def str2Dtype(name: str) -> torch.dtype:  # noqa: N802 (upstream name)
    """'bf16' / 'torch.bfloat16' / 'bfloat16' / 'fp8' -> torch dtype; ValueError otherwise."""
    key = name.strip().lower().removeprefix("torch.")
    if key == "fp8":
        return get_fp8()
    if key in _NAMED:
        return _NAMED[key]
    dtype = getattr(torch, key, None)
    if isinstance(dtype, torch.dtype):
        return dtype
    raise ValueError(f"unknown dtype name {name!r}; expected one of {sorted(_NAMED) + ['fp8']} or a torch dtype name")


def str2tuple(text: str) -> tuple[int, ...]:
    """'1,2,3' -> (1, 2, 3), the argparse helper upstream scripts use."""
    try:
        return tuple(int(x) for x in text.replace(" ", "").split(",") if x)
    except ValueError:
        raise ValueError(f"expected comma-separated integers, got {text!r}") from None


def str2bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "t", "yes", "y", "on"):
        return True
    if value in ("0", "false", "f", "no", "n", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false/1/0), got {text!r}")


def dtype_max(dtype: torch.dtype) -> float:
    """Largest finite value of a float or integer dtype (fp8 448 for e4m3fn, 240 for fnuz)."""
    if dtype.is_floating_point:
        return float(torch.finfo(dtype).max)
    return float(torch.iinfo(dtype).max)
