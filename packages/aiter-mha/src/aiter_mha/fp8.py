"""The quantization behind ``flash_attn_fp8_func`` / ``flash_attn_varlen_fp8_func`` (upstream
``mha_v3``), shared by both backends.

Those functions take fp16/bf16/fp32 q, k, v; their ops quantize them to the arch's e4m3 type
(``aiter_core.dtypes.get_fp8``: ``float8_e4m3fn`` on NVIDIA) with one scale per (batch or
sequence, kv head) - the query heads of a GQA group share their kv head's scale - and run the fp8
forward kernel. ``descale = max(amax, 1e-9) / fp8_max``.

Deviation from upstream: the output has the input's dtype (upstream returns fp32).

Backward (straight-through): gradients come from the regular high-precision backward kernel run
on the original, unquantized q/k/v, with the fp8 forward's output and LSE. They are the exact
gradients of the unquantized attention up to the fp8 forward's error in ``out`` and ``lse``.
"""

from __future__ import annotations

from typing import Optional

import torch

from aiter_core.dtypes import get_fp8

from .checks import PACKED, FwdCall

Tensor = torch.Tensor

__all__ = ["AMAX_FLOOR", "quantize_bshd_per_kv_head", "quantize_thd_per_kv_head", "quantize_call"]

AMAX_FLOOR = 1e-9


def _quantize_grouped(x: Tensor, scale: Tensor, fp8_dtype: torch.dtype) -> Tensor:
    """x (..., Hk, G, D) * scale broadcast over (..., Hk, 1, 1) -> fp8, saturating."""
    fp8_max = torch.finfo(fp8_dtype).max
    return (x * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)


def quantize_bshd_per_kv_head(x: Tensor, heads_kv: int, fp8_dtype: Optional[torch.dtype] = None):
    """x (B, S, H, D) -> (fp8 x, descale (B, heads_kv) fp32); heads h share scale h // (H/heads_kv)."""
    fp8_dtype = fp8_dtype or get_fp8(x.device)
    batch, seqlen, heads, dim = x.shape
    group = heads // heads_kv
    xf = x.float().reshape(batch, seqlen, heads_kv, group, dim)
    amax = xf.abs().amax(dim=(1, 3, 4)).clamp_min(AMAX_FLOOR)  # (B, Hk)
    fp8_max = torch.finfo(fp8_dtype).max
    descale = amax / fp8_max
    x_q = _quantize_grouped(xf, (fp8_max / amax)[:, None, :, None, None], fp8_dtype)
    return x_q.reshape(batch, seqlen, heads, dim), descale


def quantize_thd_per_kv_head(x: Tensor, cu_seqlens: Tensor, heads_kv: int, fp8_dtype: Optional[torch.dtype] = None):
    """x (T, H, D) packed by int32 ``cu_seqlens`` (B+1) -> (fp8 x, descale (B, heads_kv) fp32).

    Per-sequence amax without a host sync: each token's sequence id comes from searchsorted.
    Rows past ``cu_seqlens[-1]`` (padding) are scaled with the last sequence's scale.
    """
    fp8_dtype = fp8_dtype or get_fp8(x.device)
    total, heads, dim = x.shape
    batch = cu_seqlens.shape[0] - 1
    group = heads // heads_kv
    xf = x.float().reshape(total, heads_kv, group, dim)
    token = torch.arange(total, device=x.device, dtype=torch.int64)
    seq_id = torch.searchsorted(cu_seqlens[1:].to(torch.int64), token, right=True).clamp_max(batch - 1)
    token_amax = xf.abs().amax(dim=(2, 3))  # (T, Hk)
    amax = torch.zeros(batch, heads_kv, dtype=torch.float32, device=x.device)
    amax = amax.scatter_reduce(0, seq_id[:, None].expand(total, heads_kv), token_amax, reduce="amax", include_self=True)
    amax = amax.clamp_min(AMAX_FLOOR)
    fp8_max = torch.finfo(fp8_dtype).max
    descale = amax / fp8_max
    x_q = _quantize_grouped(xf, (fp8_max / amax)[seq_id][:, :, None, None], fp8_dtype)
    return x_q.reshape(total, heads, dim), descale


def quantize_call(call: FwdCall):
    """q, k, v of an fp8 training op's Call quantized to e4m3 per (batch or sequence, kv head), with
    their descales: (q8, k8, v8, q_descale, k_descale, v_descale)."""
    q, k, v = call.q, call.k, call.v
    heads_kv = k.shape[-2]
    if call.layout == PACKED:
        q8, qd = quantize_thd_per_kv_head(q, call.cu_seqlens_q, heads_kv)
        k8, kd = quantize_thd_per_kv_head(k, call.cu_seqlens_k, heads_kv)
        v8, vd = quantize_thd_per_kv_head(v, call.cu_seqlens_k, heads_kv)
    else:
        q8, qd = quantize_bshd_per_kv_head(q, heads_kv)
        k8, kd = quantize_bshd_per_kv_head(k, heads_kv)
        v8, vd = quantize_bshd_per_kv_head(v, heads_kv)
    return q8, k8, v8, qd, kd, vd
