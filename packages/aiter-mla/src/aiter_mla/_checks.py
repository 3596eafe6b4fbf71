"""Argument checks shared by the public functions: each failure names the argument, what was
expected and what came. Shapes, dtypes and devices only: nothing reads device memory, so the
checks cost no host sync and are safe inside CUDA-graph capture.

The checks themselves are :mod:`aiter_core.checks`; this module holds MLA's dtype sets and the
short names its call sites use."""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from aiter_core.checks import check_int, check_int32_vector, check_last_dim_contiguous, check_scalar_f32, check_tensor

Tensor = torch.Tensor

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Q_DTYPES = FLOAT_DTYPES + FP8_DTYPES

last_dim_contiguous = check_last_dim_contiguous


def tensor(name: str, x, *, dims: Optional[Sequence[int]] = None, dtypes: Optional[Sequence[torch.dtype]] = None,
           device: Optional[torch.device] = None) -> Tensor:
    return check_tensor(name, x, ndim=dims, dtypes=dtypes, device=device)


def index(name: str, x, n: Optional[int], device) -> Tensor:
    """A contiguous 1-D int32 tensor of ``n`` entries (any number when None) on ``device``."""
    return check_int32_vector(name, x, n, device=device)


def scale(name: str, x, device) -> Optional[Tensor]:
    """None or a per-tensor float32 scale on ``device``."""
    return None if x is None else check_scalar_f32(name, x, device=device)


def positive_int(name: str, value, minimum: int = 1) -> int:
    return check_int(name, value, minimum=minimum)
