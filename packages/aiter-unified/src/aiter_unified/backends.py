"""Backends of the family's ops in ``aiter_core``'s registry.

* ``triton`` (priority 100): :mod:`aiter_unified.triton.launch` (CUDA, or CPU under
  TRITON_INTERPRET=1), both ops.
* ``reference`` (priority 0): :mod:`aiter_unified.reference` in PyTorch, any device, for
  ``unified_attention`` only (it has no segment buffers); it syncs with the host, so it is not for
  CUDA graphs.

Each implementation takes the op's :class:`~aiter_unified.checks.Call`. Importing this module is
cheap (no Triton, no kernel module): the entry points ``aiter.backends`` -> :func:`backend_specs`
and ``aiter.families`` -> :data:`family` only describe; the functions below import their backend
on first call.
"""

from __future__ import annotations

from functools import cache

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

OPS = ("unified_attention", "unified_attention_segments")
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0

__all__ = ["OPS", "backend_specs", "family", "triton_supports"]


def triton_supports(key) -> list[str]:
    """Why the Triton kernels cannot run a call with this Call key (empty list: they can)."""
    return triton_device_reasons(key.device_type) + triton_dtype_reasons(key.device_type, (key.dtype, key.kv_dtype))


def triton_unified_attention(call) -> None:
    _triton_launch().unified_attention(call)


def triton_unified_attention_segments(call) -> list:
    return _triton_launch().unified_attention_segments(call)


@cache
def _triton_launch():
    """:mod:`aiter_unified.triton.launch`, imported on the first call (it imports Triton)."""
    from .triton import launch

    return launch


def reference_unified_attention(call) -> None:
    from .reference import covered_rows, unified_attention_ref

    res = unified_attention_ref(call.q, call.k, call.v, call.cu_seqlens_q, call.seqused_k, call.block_table,
                                call.softmax_scale, window_size=call.window_size, softcap=call.softcap,
                                q_descale=call.q_descale, k_descale=call.k_descale, v_descale=call.v_descale,
                                alibi_slopes=call.alibi_slopes, output_scale=call.output_scale,
                                qq_bias=call.qq_bias, sinks=call.sinks, out_dtype=call.out.dtype,
                                max_seqlen_q=call.max_seqlen_q)
    rows = covered_rows(call.cu_seqlens_q, call.num_tokens).to(call.device)  # the Triton kernels' rows
    call.out[rows] = res[rows]


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``unified``."""
    triton = specs_for({"unified_attention": triton_unified_attention,
                        "unified_attention_segments": triton_unified_attention_segments},
                       backend="triton", priority=TRITON_PRIORITY, available=triton_available,
                       supports=triton_supports, cuda_graph=True,
                       description="Triton 2D/3D unified paged attention (CUDA; CPU under TRITON_INTERPRET=1)")
    return triton + reference_specs({"unified_attention": reference_unified_attention}, priority=REFERENCE_PRIORITY)


family = Family(name="unified", distribution="aiter-unified", smoke="aiter_unified.smoke:run",
                bench="aiter_unified.bench:main", host="aiter_unified.bench:host_cases",
                warmup="aiter_unified.bench:warmup_cases", ops=OPS)
