"""Argument validators used at the API boundary.

Each one raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value,
shape, device or layout) with a message of the form ``"<argument>: expected <what>, got <what
came>"``, before any kernel runs. Everything here is family-neutral except the block at the end
(``check_head_dims``), so it can move to ``aiter_core`` unchanged.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import torch

__all__ = [
    "dtype_name",
    "check_tensor",
    "check_optional_tensor",
    "check_dtype",
    "check_ndim",
    "check_shape",
    "check_same_device",
    "check_last_dim_contiguous",
    "check_int32_vector",
    "check_int",
    "check_float",
    "check_bool",
    "check_window",
    "check_head_dims",
    "check_gqa",
]


def dtype_name(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(dtype_name(d) for d in dtypes)


def check_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    return x


def check_optional_tensor(name: str, x) -> torch.Tensor | None:
    return None if x is None else check_tensor(name, x)


def check_dtype(name: str, x: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    if x.dtype not in tuple(allowed):
        raise TypeError(f"{name}: expected dtype {_names(allowed)}, got {dtype_name(x.dtype)}")


def check_ndim(name: str, x: torch.Tensor, ndims: int | Sequence[int], layout: str = "") -> None:
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.dim() not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed) + (f" {layout}" if layout else "")
        raise ValueError(f"{name}: expected a {want} tensor, got {x.dim()}-D with shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``expected`` entries of None match any size. ``what`` names the dims, e.g. '(B, Sk, Hk, D)'."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + ")"
        if len(expected) == 1:
            want = want[:-1] + ",)"
        label = f" {what}" if what else ""
        raise ValueError(f"{name}: expected shape {want}{label}, got {shape}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    for name, x in others.items():
        if x is not None and x.device != reference.device:
            raise ValueError(f"{name}: expected a tensor on {reference.device} (the device of {reference_name}), got {x.device}")


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name}: expected the last dimension to be contiguous (stride 1), got strides {tuple(x.stride())}")


def check_int32_vector(name: str, x, length: int | None = None, *, device: torch.device | None = None) -> torch.Tensor:
    """A 1-D int32 tensor (cu_seqlens, seqlens, block ids), optionally of a given length/device."""
    check_tensor(name, x)
    if x.dtype != torch.int32:
        raise TypeError(f"{name}: expected dtype int32, got {dtype_name(x.dtype)}")
    if x.dim() != 1:
        raise ValueError(f"{name}: expected a 1-D tensor, got shape {tuple(x.shape)}")
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name}: expected {length} entries, got {x.shape[0]}")
    if device is not None and x.device != device:
        raise ValueError(f"{name}: expected a tensor on {device}, got {x.device}")
    if x.shape[0] > 1 and x.stride(0) != 1:
        raise ValueError(f"{name}: expected a contiguous tensor, got stride {x.stride(0)}")
    return x


def _is_symbolic(value, kind: str) -> bool:
    # torch.SymInt / SymFloat stand in for ints/floats under torch.compile with dynamic shapes
    return type(value).__name__ == kind and type(value).__module__.startswith("torch")


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """A Python int or anything integral (numpy ints, SymInt); bools are refused."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or _is_symbolic(value, "SymInt")):
        raise TypeError(f"{name}: expected an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {value}")
    return value if _is_symbolic(value, "SymInt") else int(value)


def check_float(name: str, value, *, minimum: float | None = None, below: float | None = None) -> float:
    """A real number (int, float, numpy scalar, SymFloat); bools are refused."""
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or _is_symbolic(value, "SymFloat")):
        raise TypeError(f"{name}: expected a float, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected a value >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name}: expected a value < {below}, got {value}")
    return value if _is_symbolic(value, "SymFloat") else float(value)


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name}: expected a bool, got {type(value).__name__}")
    return value


def check_window(name: str, window) -> tuple[int, int, int]:
    """(left, right) or (left, right, sink_size); -1 (any negative) = unbounded, sink_size >= 0."""
    if not isinstance(window, (tuple, list)) or len(window) not in (2, 3):
        raise ValueError(f"{name}: expected a tuple (left, right) or (left, right, sink_size), got {window!r}")
    for i, w in enumerate(window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name}[{i}]: expected an int, got {type(w).__name__}")
    left, right = int(window[0]), int(window[1])
    sink_size = int(window[2]) if len(window) == 3 else 0
    if sink_size < 0:
        raise ValueError(f"{name}[2] (sink_size): expected an int >= 0, got {sink_size}")
    return (-1 if left < 0 else left), (-1 if right < 0 else right), sink_size


# -- attention-specific ---------------------------------------------------------------------


def check_head_dims(dim_qk: int, dim_v: int, *, minimum: int = 8, maximum: int = 256) -> None:
    for name, d in (("q/k head dim", dim_qk), ("v head dim", dim_v)):
        if d < minimum or d > maximum:
            raise ValueError(f"{name}: expected {minimum} <= head dim <= {maximum}, got {d}")


def check_gqa(heads_q: int, heads_kv: int, *, q_name: str = "q", k_name: str = "k") -> None:
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(
            f"{k_name}: expected a number of heads dividing the {heads_q} heads of {q_name} (GQA/MQA), got {heads_kv}"
        )
