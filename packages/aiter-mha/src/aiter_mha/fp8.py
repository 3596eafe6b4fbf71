"""fp8 attention from high-precision inputs (upstream ``mha_v3.flash_attn_fp8_func`` family).

``flash_attn_fp8_func`` / ``flash_attn_varlen_fp8_func`` take fp16/bf16/fp32 q, k, v, quantize
them to the arch's e4m3 type (``aiter_core.dtypes.get_fp8``: ``float8_e4m3fn`` on NVIDIA) with
one scale per (batch or sequence, kv head) - the query heads of a GQA group share their kv
head's scale - and run the fp8 forward kernel. ``descale = max(amax, 1e-9) / fp8_max``.

Deviation from upstream: the output has the input's dtype (upstream returns fp32).

Backward (straight-through): gradients come from the regular high-precision backward kernel run
on the original, unquantized q/k/v, with the fp8 forward's output and LSE. They are the exact
gradients of the unquantized attention up to the fp8 forward's error in ``out`` and ``lse``.
"""

from __future__ import annotations

from typing import Optional

import torch

from aiter_core.dtypes import get_fp8

from ._checks import check_bool, check_int, check_tensor
from .api import (
    HIGH_PRECISION_DTYPES,
    _distinct,
    _validate_dense,
    _validate_varlen,
)

Tensor = torch.Tensor

__all__ = [
    "AMAX_FLOOR",
    "quantize_bshd_per_kv_head",
    "quantize_thd_per_kv_head",
    "flash_attn_fp8_func",
    "flash_attn_varlen_fp8_func",
]

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


def _unsupported(qv, attention_chunk, num_splits, sm_margin) -> None:
    if qv is not None:
        raise NotImplementedError("qv: not supported (expected None)")
    if attention_chunk not in (0, 1):
        raise NotImplementedError(f"attention_chunk: only 0 or 1 is supported, got {attention_chunk}")
    check_int("num_splits", num_splits, minimum=0)
    if num_splits > 1:
        raise NotImplementedError(f"num_splits: only 0 or 1 is supported, got {num_splits}")
    if sm_margin != 0:
        raise NotImplementedError(f"sm_margin: only 0 is supported, got {sm_margin}")


class _FP8AttnFunc(torch.autograd.Function):
    """fp8 forward (quantize, fp8 kernel), straight-through high-precision backward."""

    @staticmethod
    def forward(ctx, q, k, v, cu_q, cu_k, max_q, max_k, scale, causal, wl, wr, sink_size, softcap, deterministic,
                backend):
        varlen = cu_q is not None
        if varlen:
            heads_kv = k.shape[1]
            q8, qd = quantize_thd_per_kv_head(q, cu_q, heads_kv)
            k8, kd = quantize_thd_per_kv_head(k, cu_k, heads_kv)
            v8, vd = quantize_thd_per_kv_head(v, cu_k, heads_kv)
            # zeros: rows outside every sequence are never written by the kernel
            out = torch.zeros((q.shape[0], q.shape[1], v.shape[-1]), dtype=q.dtype, device=q.device)
            _, lse, _, _ = torch.ops.aiter.mha_varlen_fwd(
                q8, k8, v8, cu_q, cu_k, max_q, max_k, 0, 0.0, scale, softcap, False, causal, wl, wr, sink_size, True,
                False, out=out, q_descale=qd, k_descale=kd, v_descale=vd, backend=backend,
            )
        else:
            heads_kv = k.shape[2]
            q8, qd = quantize_bshd_per_kv_head(q, heads_kv)
            k8, kd = quantize_bshd_per_kv_head(k, heads_kv)
            v8, vd = quantize_bshd_per_kv_head(v, heads_kv)
            out = torch.empty((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
            _, lse, _, _ = torch.ops.aiter.mha_fwd(
                q8, k8, v8, 0.0, scale, causal, wl, wr, sink_size, True, False, out=out, q_descale=qd, k_descale=kd,
                v_descale=vd, logits_soft_cap=softcap, backend=backend,
            )
        ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k)
        ctx.args = (max_q, max_k, scale, causal, wl, wr, sink_size, softcap, deterministic, backend)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
        max_q, max_k, scale, causal, wl, wr, sink_size, softcap, deterministic, backend = ctx.args
        dout = dout.contiguous()
        if cu_q is not None:
            dq, dk, dv, _ = torch.ops.aiter.mha_varlen_bwd(
                dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0, scale, False, causal, wl, wr, deterministic,
                sink_size=sink_size, logits_soft_cap=softcap, backend=backend,
            )
        else:
            dq, dk, dv, _ = torch.ops.aiter.mha_bwd(
                dout, q, k, v, out, lse, 0.0, scale, causal, wl, wr, deterministic, sink_size=sink_size,
                logits_soft_cap=softcap, backend=backend,
            )
        return (dq, dk, dv) + (None,) * 12


def flash_attn_fp8_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    qv: Optional[Tensor] = None,
    window_size: tuple = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: Optional[bool] = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """bshd attention in fp8 from fp16/bf16/fp32 inputs (quantized per (batch, kv head)).

    Returns ``out (B, Sq, Hq, Dv)`` in q's dtype, differentiable (straight-through backward, see
    the module docstring). ``pack_gqa`` is a hint with no effect; ``softcap`` is supported
    (upstream raises).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    _unsupported(qv, attention_chunk, num_splits, sm_margin)
    _, scale, window, _, _, softcap = _validate_dense(
        q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, bias=None, alibi_slopes=None, sink=None, cu_seqlens_q=None, cu_seqlens_kv=None,
        logits_soft_cap=softcap,
    )
    check_bool("deterministic", deterministic)
    q, k, v = _distinct(q, k, v)
    return _FP8AttnFunc.apply(q, k, v, None, None, q.shape[1], k.shape[1], scale, causal, window[0], window[1], window[2],
                              softcap, deterministic, backend)


def flash_attn_varlen_fp8_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    deterministic: bool = False,
    sm_margin: int = 0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """thd attention in fp8 from fp16/bf16/fp32 inputs (quantized per (sequence, kv head))."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    _unsupported(None, attention_chunk, 0, sm_margin)
    cu_q, cu_k, _, _, _, scale, softcap, window, lengths = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
        min_seqlen_q=0, dropout_p=0.0, softmax_scale=softmax_scale, logits_soft_cap=softcap, causal=causal,
        window_size=window_size, bias=None, alibi_slopes=None, block_table=None, cu_seqlens_q_padded=None,
        cu_seqlens_k_padded=None, sink=None,
    )
    max_seqlen_q, max_seqlen_k, min_seqlen_q = lengths
    check_bool("deterministic", deterministic)
    q, k, v, cu_q, cu_k = _distinct(q, k, v, cu_q, cu_k)
    return _FP8AttnFunc.apply(q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, scale, causal, window[0], window[1],
                              window[2], softcap, deterministic, backend)
