"""Backends of ``unified_attention`` in ``aiter_core``'s registry, and their adaptors.

* ``triton`` (priority 100): :mod:`aiter_unified.triton` (CUDA, or CPU under TRITON_INTERPRET=1).
* ``reference`` (priority 0): :mod:`aiter_unified.reference` in PyTorch, any device; it syncs with
  the host, so it is not for CUDA graphs, and it has no segment buffers (``skip_reduce``).

Importing this module is cheap (no torch, no Triton): the entry points ``aiter.backends`` ->
:func:`backend_specs` and ``aiter.families`` -> :data:`family` only describe.
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

OPS = ("unified_attention", "unified_attention_segments")
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0

__all__ = ["OPS", "backend_specs", "family", "triton_supports", "reference_supports", "make_problem"]


def make_problem(q, k, *, skip_reduce=False):
    from aiter_core.registry import Problem

    return Problem(device=q.device, device_type=q.device.type, dtype=q.dtype, kv_dtype=k.dtype, head_dim=q.shape[-1],
                   skip_reduce=skip_reduce)


def triton_supports(problem) -> list[str]:
    """Why the Triton kernels cannot run ``problem`` (empty list: they can)."""
    return triton_device_reasons(problem.device) + triton_dtype_reasons(problem.device,
                                                                         (problem.dtype, problem.kv_dtype))


def reference_supports(problem) -> list[str]:
    if getattr(problem, "skip_reduce", False):
        return ["the reference has no split-KV segment buffers (skip_reduce=True)"]
    return []


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``unified``."""
    triton = specs_for(OPS, backend="triton", impl="aiter_unified.backends:triton_{op}", priority=TRITON_PRIORITY,
                       available=triton_available, supports=triton_supports, cuda_graph=True,
                       description="Triton 2D/3D unified paged attention (CUDA; CPU under TRITON_INTERPRET=1)")
    # the reference computes unified_attention only: it has no segment buffers
    return triton + reference_specs(("unified_attention",), "aiter_unified.backends", priority=REFERENCE_PRIORITY,
                                    supports=reference_supports)


family = Family(name="unified", distribution="aiter-unified", smoke="aiter_unified.smoke:run",
                bench="aiter_unified.bench:main", ops=OPS)


# -- adaptors: keyword arguments of the op, minus skip_reduce / backend ---------------------------


def triton_unified_attention(**kw):
    from .triton.launch import unified_attention_triton

    unified_attention_triton(**kw, skip_reduce=False)


def triton_unified_attention_segments(**kw):
    from .triton.launch import unified_attention_triton

    return unified_attention_triton(**kw, skip_reduce=True)


def reference_unified_attention(*, q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                                window_size, block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes,
                                output_scale, qq_bias, sinks):
    from .reference import unified_attention_ref

    res = unified_attention_ref(q, k, v, cu_seqlens_q, seqused_k, block_table, softmax_scale, window_size=window_size,
                                softcap=softcap, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                                alibi_slopes=alibi_slopes, output_scale=output_scale, qq_bias=qq_bias, sinks=sinks,
                                out_dtype=out.dtype)
    out.copy_(res)
