"""Argument validators used at the API boundary.

The generic checks (tensor-ness, dtype, rank, shape, device, layout, Python scalars) live in
:mod:`aiter_core.checks` and are re-exported here; this module adds the attention-specific ones
(``check_window``, ``check_head_dims``, ``check_gqa``). All raise ``TypeError`` (wrong kind of
object or dtype) or ``ValueError`` (wrong value, shape, device or layout) before any kernel runs.
"""

from __future__ import annotations

from aiter_core import checks as _generic
from aiter_core.checks import (  # noqa: F401  (re-exported: api.py, kvcache.py and fp8.py import them from here)
    check_bool,
    check_device,
    check_dtype,
    check_float,
    check_int,
    check_int32_vector,
    check_last_dim_contiguous,
    check_ndim,
    check_optional_tensor,
    check_same_device,
    check_scalar_f32,
    check_shape,
    check_tensor,
    describe,
    dtype_name,
)

__all__ = [*_generic.__all__, "check_window", "check_head_dims", "check_gqa"]


# -- attention-specific ---------------------------------------------------------------------


def check_window(name: str, window) -> tuple[int, int, int]:
    """(left, right) or (left, right, sink_size); -1 (any negative) = unbounded, sink_size >= 0."""
    if not isinstance(window, (tuple, list)) or len(window) not in (2, 3):
        raise ValueError(f"{name} must be a tuple (left, right) or (left, right, sink_size), got {window!r}")
    for i, w in enumerate(window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name}[{i}] must be an int, got {type(w).__name__}")
    left, right = int(window[0]), int(window[1])
    sink_size = int(window[2]) if len(window) == 3 else 0
    if sink_size < 0:
        raise ValueError(f"{name}[2] (sink_size) must be an int >= 0, got {sink_size}")
    return (-1 if left < 0 else left), (-1 if right < 0 else right), sink_size


def check_head_dims(dim_qk: int, dim_v: int, *, minimum: int = 8, maximum: int = 256) -> None:
    for name, d in (("q/k head dim", dim_qk), ("v head dim", dim_v)):
        if d < minimum or d > maximum:
            raise ValueError(f"{name} must satisfy {minimum} <= head dim <= {maximum}, got {d}")


def check_gqa(heads_q: int, heads_kv: int, *, q_name: str = "q", k_name: str = "k") -> None:
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(
            f"{k_name} must have a number of heads dividing the {heads_q} heads of {q_name} (GQA/MQA), got {heads_kv}"
        )
