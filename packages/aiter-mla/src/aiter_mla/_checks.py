"""Argument checks shared by the public functions: each failure names the argument, what was
expected and what came. Shapes, dtypes and devices only: nothing reads device memory, so the
checks cost no host sync and are safe inside CUDA-graph capture."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

Tensor = torch.Tensor

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Q_DTYPES = FLOAT_DTYPES + FP8_DTYPES
INDEX_DTYPES = (torch.int32,)


def _names(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


def tensor(name: str, x, *, dims: Optional[Sequence[int]] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           device: Optional[torch.device] = None) -> Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dims is not None and x.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in dims)
        raise ValueError(f"{name} must be {want}, got shape {tuple(x.shape)}")
    if dtypes is not None and x.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype in ({_names(dtypes)}), got {x.dtype}")
    if device is not None and x.device != device:
        raise ValueError(f"{name} must be on {device} (like q), got {x.device}")
    return x


def optional(name: str, x, **kw) -> Optional[Tensor]:
    return None if x is None else tensor(name, x, **kw)


def shape(name: str, x: Tensor, expected: Sequence[Optional[int]], what: str = "") -> None:
    ok = x.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, x.shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        raise ValueError(f"{name} must have shape {want}{' ' + what if what else ''}, got {tuple(x.shape)}")


def index(name: str, x, n: Optional[int], device, dims=(1,)) -> Tensor:
    tensor(name, x, dims=dims, dtypes=INDEX_DTYPES, device=device)
    if n is not None and x.shape[0] != n:
        raise ValueError(f"{name} must have {n} entries, got {x.shape[0]}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous")
    return x


def scale(name: str, x, device) -> Optional[Tensor]:
    if x is None:
        return None
    tensor(name, x, dtypes=(torch.float32,), device=device)
    if x.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scale with one element (shape (1,)), got shape {tuple(x.shape)}")
    return x


def positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def last_dim_contiguous(name: str, x: Tensor) -> None:
    if x.dim() and x.stride(-1) != 1 and x.shape[-1] > 1:
        raise ValueError(f"{name} must be contiguous in its last dimension, got strides {tuple(x.stride())}")
