"""Generic argument validators for the families' public functions.

Each check raises ``TypeError`` for the wrong kind of object or dtype and ``ValueError`` for a
wrong value, shape, device or layout, with a message that names the argument, what was expected
and what came, e.g. ``"q must have dtype float16/bfloat16, got torch.float32"``. They read
shapes, dtypes, devices and Python values only, never tensor contents: no device sync, safe under
CUDA-graph capture, and fake tensors / ``torch.SymInt`` sizes under ``torch.compile`` pass.
Family-specific rules (head dims, GQA, windows, dtype pairings) stay in the families.
"""

from __future__ import annotations

import math
import numbers
from typing import Iterable, Sequence

import torch

__all__ = [
    "describe",
    "dtype_name",
    "check_tensor",
    "check_optional_tensor",
    "check_dtype",
    "check_ndim",
    "check_shape",
    "check_device",
    "check_same_device",
    "check_last_dim_contiguous",
    "check_int32_vector",
    "check_int",
    "check_float",
    "check_bool",
    "check_scalar_f32",
    "INDEX_DTYPES",
    "check_index_tensor",
    "check_index_vector",
    "check_gqa",
    "check_per_head_f32",
    "check_output",
    "check_paired",
    "check_block_table",
]


def dtype_name(dtype) -> str:
    """``torch.float16`` -> ``"float16"``."""
    return str(dtype).replace("torch.", "")


def _names(dtypes: Iterable[torch.dtype]) -> str:
    return "/".join(dtype_name(d) for d in dtypes)


def describe(x) -> str:
    """A short description of what came: dtype, shape and device of a tensor, else the type name."""
    if isinstance(x, torch.Tensor):
        return f"{x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    return type(x).__name__


def _is_symbolic(value, kind: str) -> bool:
    # torch.SymInt / SymFloat stand in for ints/floats under torch.compile with dynamic shapes
    return type(value).__name__ == kind and type(value).__module__.startswith("torch")


def check_tensor(name: str, x, *, ndim: int | Sequence[int] | None = None, dtypes: Sequence[torch.dtype] | None = None,
                 device: torch.device | None = None, like: str | None = None) -> torch.Tensor:
    """A ``torch.Tensor`` (fake tensors included); optionally of a rank, a dtype set and a device."""
    # the common case (all good) in one expression: these checks run many times per op call
    if (isinstance(x, torch.Tensor) and (ndim is None or (x.dim() == ndim if type(ndim) is int else x.dim() in ndim))
            and (dtypes is None or x.dtype in dtypes) and (device is None or x.device == device)):
        return x
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if ndim is not None:
        check_ndim(name, x, ndim)
    if dtypes is not None:
        check_dtype(name, x, dtypes)
    if device is not None:
        check_device(name, x, device, like=like)
    return x


def check_optional_tensor(name: str, x, **kwargs) -> torch.Tensor | None:
    """None, or a tensor passing :func:`check_tensor` with the same keywords."""
    return None if x is None else check_tensor(name, x, **kwargs)


def check_dtype(name: str, x: torch.Tensor, allowed: Sequence[torch.dtype]) -> None:
    """``x.dtype`` is one of ``allowed``."""
    if x.dtype not in tuple(allowed):
        raise TypeError(f"{name} must have dtype {_names(allowed)}, got {x.dtype}")


def check_ndim(name: str, x: torch.Tensor, ndims: int | Sequence[int], layout: str = "") -> None:
    """``x.dim()`` is ``ndims`` (or one of them); ``layout`` names the dims, e.g. '(B, S, H, D)'."""
    allowed = (ndims,) if isinstance(ndims, int) else tuple(ndims)
    if x.dim() not in allowed:
        want = " or ".join(f"{n}-D" for n in allowed) + (f" {layout}" if layout else "")
        raise ValueError(f"{name} must be {want}, got {x.dim()}-D with shape {tuple(x.shape)}")


def check_shape(name: str, x: torch.Tensor, expected: Sequence[int | None], what: str = "") -> None:
    """``x.shape`` equals ``expected``, whose None entries match any size; ``what`` names the dims."""
    shape = tuple(x.shape)
    ok = len(shape) == len(expected) and all(e is None or e == s for e, s in zip(expected, shape))
    if not ok:
        want = "(" + ", ".join("*" if e is None else str(e) for e in expected) + (",)" if len(expected) == 1 else ")")
        label = f" {what}" if what else ""
        raise ValueError(f"{name} must have shape {want}{label}, got {shape}")


def check_device(name: str, x: torch.Tensor, device: torch.device, *, like: str | None = None) -> None:
    """``x`` lives on ``device``; ``like`` names the argument that device comes from."""
    if x.device != device:
        origin = f" (the device of {like})" if like else ""
        raise ValueError(f"{name} must be on {device}{origin}, got {x.device}")


def check_same_device(reference_name: str, reference: torch.Tensor, **others: torch.Tensor | None) -> None:
    """Every non-None tensor of ``others`` (keyword = its name) lives on ``reference``'s device."""
    for name, x in others.items():
        if x is not None:
            check_device(name, x, reference.device, like=reference_name)


def check_last_dim_contiguous(name: str, x: torch.Tensor) -> None:
    """Unit stride along the last dimension (a size-1 last dimension passes)."""
    if x.is_contiguous():
        return
    if x.dim() > 0 and x.shape[-1] > 1 and x.stride(-1) != 1:
        raise ValueError(f"{name} must be contiguous in its last dimension (stride 1), got strides {tuple(x.stride())}")


def check_int32_vector(name: str, x, length: int | None = None, *, device: torch.device | None = None,
                       like: str | None = None) -> torch.Tensor:
    """A contiguous 1-D int32 tensor (cu_seqlens, seqlens, indices), optionally of a length and a device."""
    if (isinstance(x, torch.Tensor) and x.dtype is torch.int32 and x.dim() == 1 and (device is None or x.device == device)
            and (length is None or x.shape[0] == length) and x.is_contiguous()):
        return x
    check_tensor(name, x, ndim=1, dtypes=(torch.int32,), device=device, like=like)
    if length is not None and x.shape[0] != length:
        raise ValueError(f"{name} must have {length} entries, got {x.shape[0]}")
    if x.shape[0] > 1 and x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous, got stride {x.stride(0)}")
    return x


def check_int(name: str, value, *, minimum: int | None = None) -> int:
    """A Python int or anything integral (numpy ints, SymInt), optionally ``>= minimum``; bools are refused."""
    if type(value) is int and (minimum is None or value >= minimum):
        return value
    symbolic = _is_symbolic(value, "SymInt")
    if isinstance(value, bool) or not (isinstance(value, numbers.Integral) or symbolic):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value if symbolic else int(value)


def check_float(name: str, value, *, minimum: float | None = None, below: float | None = None,
                above: float | None = None, finite: bool = True) -> float:
    """A real number (int, float, numpy scalar, SymFloat), finite unless ``finite=False`` (the NaN
    rule: a NaN or infinite scale, soft cap or probability is refused at the boundary), optionally
    ``>= minimum``, ``< below`` and ``> above``; bools are refused."""
    if type(value) is float and value - value == 0.0 and minimum is None and below is None and above is None:
        return value  # finite (x - x is NaN for NaN and +-inf) and unbounded: the common case
    symbolic = _is_symbolic(value, "SymFloat")
    if isinstance(value, bool) or not (isinstance(value, numbers.Real) or symbolic):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if finite and not symbolic and not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if above is not None and not symbolic and not value > above:
        raise ValueError(f"{name} must be > {above}, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    if below is not None and value >= below:
        raise ValueError(f"{name} must be < {below}, got {value}")
    return value if symbolic else float(value)


def check_bool(name: str, value) -> bool:
    """A Python bool (ints are refused)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def check_scalar_f32(name: str, x, *, device: torch.device | None = None, like: str | None = None) -> torch.Tensor:
    """A float32 tensor with one element (a per-tensor scale), optionally on ``device``."""
    if isinstance(x, torch.Tensor) and x.dtype is torch.float32 and x.numel() == 1 and (device is None or x.device == device):
        return x
    check_tensor(name, x, dtypes=(torch.float32,))
    if x.numel() != 1:
        raise ValueError(f"{name} must be a float32 tensor with one element (a per-tensor scale), got shape {tuple(x.shape)}")
    if device is not None:
        check_device(name, x, device, like=like)
    return x


# -- attention checks the families share ----------------------------------------------------------

INDEX_DTYPES = (torch.int32, torch.int64)


def check_index_tensor(name: str, x, *, ndim: int | None = None, device: torch.device | None = None,
                       like: str | None = None) -> torch.Tensor:
    """An int32 or int64 tensor of ids or lengths (block tables, slot mappings, page lists)."""
    return check_tensor(name, x, ndim=ndim, dtypes=INDEX_DTYPES, device=device, like=like)


def check_index_vector(name: str, x, *, device: torch.device | None = None, like: str | None = None) -> torch.Tensor:
    """A 1-D int32/int64 tensor a kernel reads as ``x[i]`` (slot mappings, positions): a strided
    view is refused rather than misread."""
    check_index_tensor(name, x, ndim=1, device=device, like=like)
    if x.shape[0] > 1 and x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (stride 1), got stride {x.stride(0)}")
    return x


def check_gqa(num_heads_q: int, num_heads_kv: int, *, q_name: str = "query", kv_name: str = "KV") -> None:
    """Grouped-query attention: the query heads are a whole multiple of the KV heads."""
    if num_heads_kv <= 0 or num_heads_q % num_heads_kv:
        raise ValueError(f"{q_name} heads ({num_heads_q}) must be a multiple of the {kv_name} heads ({num_heads_kv})")


def check_per_head_f32(name: str, x, num_heads: int, *, device: torch.device | None = None,
                       like: str | None = None) -> torch.Tensor:
    """float32 ``[num_heads]``, one value per query head (``alibi_slopes``, ``sinks``)."""
    if (isinstance(x, torch.Tensor) and x.dtype is torch.float32 and x.dim() == 1 and x.shape[0] == num_heads
            and (device is None or x.device == device)):
        return x
    check_tensor(name, x, dtypes=(torch.float32,))
    if x.dim() != 1 or x.shape[0] != num_heads:
        raise ValueError(f"{name} must be float32 [num_heads={num_heads}] (one per query head), got {describe(x)}")
    if device is not None:
        check_device(name, x, device, like=like)
    return x


def check_output(name: str, out, shape: Sequence[int | None], *, device: torch.device | None = None,
                 dtypes: Sequence[torch.dtype] = (torch.float16, torch.bfloat16, torch.float32),
                 like: str | None = None) -> torch.Tensor:
    """An output buffer the caller passed: a tensor of ``shape`` (None = any size), a float dtype
    of ``dtypes``, on ``device``."""
    check_tensor(name, out, dtypes=dtypes, device=device, like=like)
    check_shape(name, out, shape)
    return out


def check_paired(first_name: str, first, second_name: str, second) -> None:
    """Two optional arguments that come together or not at all (``k_descale`` and ``v_descale``)."""
    if (first is None) != (second is None):
        given = first_name if second is None else second_name
        raise ValueError(f"{first_name} and {second_name} must be given together, got only {given}")


def check_block_table(name: str, table, *, num_seqs: int, max_len: int, block_size: int,
                      device: torch.device | None = None, dtypes: Sequence[torch.dtype] = INDEX_DTYPES,
                      like: str | None = None) -> torch.Tensor:
    """A paged-KV block table: 2-D of ids in ``dtypes``, at least ``num_seqs`` rows, wide enough
    for ``max_len`` tokens of ``block_size``, unit stride along a row (the kernels read it so)."""
    check_tensor(name, table, ndim=2, dtypes=dtypes, device=device, like=like)
    rows, width = table.shape
    if rows < num_seqs:
        raise ValueError(f"{name} must have a row per sequence ({num_seqs}), got {rows}")
    need = -(-max_len // block_size) if max_len > 0 else 0
    if width < need:
        raise ValueError(f"{name} is too narrow: {max_len} tokens in blocks of {block_size} need {need} entries per "
                         f"row, got {width}")
    if width > 1 and table.stride(1) != 1:
        raise ValueError(f"{name} rows must be contiguous (stride 1 along a row), got strides {tuple(table.stride())}")
    return table
