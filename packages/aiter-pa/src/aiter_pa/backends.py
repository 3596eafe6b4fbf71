"""Backends of the aiter-pa ops, as registered with aiter_core's registry (what ``aiter explain``
lists), one spec per (op, backend):

* every attention op (``paged_attention_decode``, ``_rocm``, ``_v1``, ``_ragged``, ``pa_fwd_asm``,
  ``pa_context_attention_fwd``, ``extend_attention_fwd``, ``prefill_attention``) takes a
  :class:`aiter_pa.checks.PagedCall`;
* the ``pa_reshape_and_cache*`` ops a :class:`~aiter_pa.checks.CacheWrite`;
* ``pa_copy_blocks`` a :class:`~aiter_pa.checks.CopyBlocks`, ``pa_swap_blocks`` a
  :class:`~aiter_pa.checks.SwapBlocks`.

Backends: ``triton`` (priority 100; CUDA/ROCm, or CPU tensors under ``TRITON_INTERPRET=1``),
``torch`` for ``pa_swap_blocks`` (``index_copy_`` across devices) and ``reference`` (priority 0;
PyTorch, any device; syncs with the host, not CUDA-graph safe). Importing this module is cheap:
each implementation below imports its launcher (Triton) or the reference on first call.
"""

from __future__ import annotations

from functools import cache

from aiter_core.registry import (
    BackendSpec,
    Family,
    always_available,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

ATTENTION_OPS = ("paged_attention_decode", "paged_attention_rocm", "paged_attention_v1", "paged_attention_ragged",
                 "pa_fwd_asm", "pa_context_attention_fwd", "extend_attention_fwd", "prefill_attention")
WRITE_OPS = ("pa_reshape_and_cache", "pa_reshape_and_cache_pertoken", "pa_reshape_and_cache_block_quant")
OPS = ATTENTION_OPS + WRITE_OPS + ("pa_copy_blocks", "pa_swap_blocks")
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0
MAX_TRITON_HEAD_DIM_V = 512

__all__ = ["OPS", "ATTENTION_OPS", "WRITE_OPS", "backend_specs", "family", "triton_supports", "triton_write_supports",
           "triton_block_supports"]

_TRITON = "Triton kernels (CUDA/ROCm; CPU under TRITON_INTERPRET=1)"


# -- triton ---------------------------------------------------------------------------------------


def triton_supports(key) -> list[str]:
    """Why the Triton kernel cannot run a paged-attention call with this :class:`PagedKey`."""
    reasons = triton_device_reasons(key.device_type) + triton_dtype_reasons(key.device_type, (key.dtype,))
    if key.high_precision == 0 and key.device_type == "cpu" and key.kv_dtype.is_floating_point \
            and key.kv_dtype.itemsize == 1:
        reasons.append("high_precision=0 (fp8 PV dot) does not run in the Triton interpreter")
    if key.head_dim_v > MAX_TRITON_HEAD_DIM_V:
        reasons.append(f"v head dim {key.head_dim_v} > {MAX_TRITON_HEAD_DIM_V}")
    return reasons


def triton_write_supports(key) -> list[str]:
    """Why the Triton write kernels cannot run a cache write with this :class:`WriteKey`."""
    return triton_device_reasons(key.device_type) + triton_dtype_reasons(key.device_type, (key.dtype,))


def triton_block_supports(key) -> list[str]:
    """Why the Triton copy kernel cannot copy blocks of this :class:`BlockKey`."""
    return triton_device_reasons(key.device_type) + triton_dtype_reasons(key.device_type, (key.dtype,))


@cache
def _launch():
    """aiter_pa.triton.launch, imported on the first call (it imports Triton)."""
    from .triton import launch

    return launch


def triton_paged_attention(call) -> None:
    _launch().paged_attention(call)


def triton_kv_cache_write(call) -> None:
    _launch().kv_cache_write(call)


def triton_copy_blocks(call) -> None:
    _launch().copy_blocks(call)


def torch_swap_blocks(call) -> None:
    """``dst[d] = src[s]`` with one ``index_copy_`` (src and dst may live on different devices)."""
    dst = call.dst
    if call.sources.numel():
        rows = call.src.index_select(0, call.sources.to(call.src.device))
        dst.index_copy_(0, call.destinations.to(dst.device), rows.to(dst.device))


# -- reference ------------------------------------------------------------------------------------


def reference_paged_attention(call) -> None:
    from .reference import paged_attention_call_ref

    paged_attention_call_ref(call)


def reference_kv_cache_write(call) -> None:
    from .reference import kv_cache_write_call_ref

    kv_cache_write_call_ref(call)


def reference_copy_blocks(call) -> None:
    from .reference import copy_blocks_ref

    n = len(call.caches) // 2
    copy_blocks_ref(call.caches[:n], call.caches[n:], call.block_mapping)


def reference_swap_blocks(call) -> None:
    import torch

    from .reference import swap_blocks_ref

    swap_blocks_ref(call.src, call.dst, torch.stack([call.sources, call.destinations], 1))


def backend_specs() -> list[BackendSpec]:
    common = dict(backend="triton", priority=TRITON_PRIORITY, available=triton_available, cuda_graph=True,
                  description=_TRITON)
    return [
        *specs_for(dict.fromkeys(ATTENTION_OPS, triton_paged_attention), supports=triton_supports, **common),
        *specs_for(dict.fromkeys(WRITE_OPS, triton_kv_cache_write), supports=triton_write_supports, **common),
        *specs_for({"pa_copy_blocks": triton_copy_blocks}, supports=triton_block_supports, **common),
        *specs_for({"pa_swap_blocks": torch_swap_blocks}, backend="torch", priority=TRITON_PRIORITY,
                   available=always_available, cuda_graph=False,
                   description="PyTorch index_copy_ (the mapping lives on the CPU, as upstream's)"),
        *reference_specs({**dict.fromkeys(ATTENTION_OPS, reference_paged_attention),
                          **dict.fromkeys(WRITE_OPS, reference_kv_cache_write),
                          "pa_copy_blocks": reference_copy_blocks, "pa_swap_blocks": reference_swap_blocks},
                         priority=REFERENCE_PRIORITY),
    ]


family = Family(name="pa", distribution="aiter-pa", smoke="aiter_pa.smoke:run", bench="aiter_pa.bench:main",
                host="aiter_pa.bench:host_cases", warmup="aiter_pa.bench:warmup_cases", ops=OPS)
