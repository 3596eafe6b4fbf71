"""MLA cache writes in Triton: ``concat_and_cache_mla`` and the fused RoPE + cache ops.

One program per token (``program_id(0)``); the second grid axis walks blocks of query heads,
and its last index writes the token's cache row. A slot outside ``[0, capacity)`` (the cache's
rows) is skipped: nothing is written for it. Positions are clamped into ``[0, max_pos)`` (the
rows of the cos/sin table: a position past it uses the last row). fp8 caches store
``x / scale`` (clamped to the type's range); the RoPE formula is :mod:`.rope`'s. Kernels only:
:mod:`.launch` launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .rope import rope_indices


@triton.jit
def _to_store(x, scale, FP8: tl.constexpr, FP8_MAX: tl.constexpr, dtype):
    if FP8:
        x = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
    return x.to(dtype)


@triton.jit
def _rope_row(ptr, offs, ok, cos_row, sin_row, ROT: tl.constexpr, IS_NEOX: tl.constexpr, COS_FULL: tl.constexpr):
    """Rotated values (fp32) of the ``ROT``-wide segment at ``ptr`` (``offs``: 1-D or [rows, cols])."""
    partner, col, sign = rope_indices(offs, ROT, IS_NEOX, COS_FULL)
    x = tl.load(ptr + offs, mask=ok, other=0.0).to(tl.float32)
    xp = tl.load(ptr + partner, mask=ok, other=0.0).to(tl.float32)
    c = tl.load(cos_row + col, mask=ok, other=1.0).to(tl.float32)
    s = tl.load(sin_row + col, mask=ok, other=0.0).to(tl.float32)
    return x * c + sign * xp * s


@triton.jit
def _concat_cache_kernel(
    KVC, stride_ct, KPE, stride_pt, Cache, stride_cb, stride_cs, slots, scale, block_size, capacity,
    LORA: tl.constexpr, PE: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_P: tl.constexpr,
    FP8: tl.constexpr, FP8_MAX: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slots + t).to(tl.int64)
    live = (slot >= 0) & (slot < capacity)
    slot = tl.where(live, slot, 0)
    row = Cache + (slot // block_size) * stride_cb + (slot % block_size) * stride_cs
    s = tl.load(scale) if FP8 else 1.0
    offs_l = tl.arange(0, BLOCK_L)
    ml = offs_l < tl.where(live, LORA, 0)  # (a scalar & vector mask trips the interpreter)
    x = tl.load(KVC + t * stride_ct + offs_l, mask=ml, other=0.0).to(tl.float32)
    tl.store(row + offs_l, _to_store(x, s, FP8, FP8_MAX, Cache.dtype.element_ty), mask=ml)
    offs_p = tl.arange(0, BLOCK_P)
    mp = offs_p < tl.where(live, PE, 0)
    y = tl.load(KPE + t * stride_pt + offs_p, mask=mp, other=0.0).to(tl.float32)
    tl.store(row + LORA + offs_p, _to_store(y, s, FP8, FP8_MAX, Cache.dtype.element_ty), mask=mp)


@triton.jit
def _fused_rope_cache_kernel(
    QN, s_qn_t, s_qn_h, QP, s_qp_t, s_qp_h,
    KN, s_kn_t, s_kn_h, KP, s_kp_t, s_kp_h,
    QOut, s_qo_t, s_qo_h, KPOut, s_kpo_t, s_kpo_h, DQP, s_dqp_t, s_dqp_h, n_dq,
    Cache, s_cb, s_cs, s_ch, block_size, capacity, slots,
    pos, cos, sin, s_cos, max_pos, q_scale, k_scale,
    n_q, n_k, q_heads, k_heads,
    D1: tl.constexpr, D2: tl.constexpr, B1: tl.constexpr, B2: tl.constexpr, BLOCK_HQ: tl.constexpr,
    IS_NEOX: tl.constexpr, COS_FULL: tl.constexpr, NOPE_FIRST: tl.constexpr,
    Q_FP8: tl.constexpr, K_FP8: tl.constexpr, Q_FP8_MAX: tl.constexpr, K_FP8_MAX: tl.constexpr,
    HAS_KPE_OUT: tl.constexpr, HAS_DQP: tl.constexpr,
):
    """Token ``program_id(0)``; axis 1: query-head blocks, then (last index) the KV side:
    cache row ``cat(k_nope, rope(k_pe))`` (order by ``NOPE_FIRST``) and ``k_pe_out``."""
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    p = tl.minimum(tl.maximum(tl.load(pos + t).to(tl.int64), 0), max_pos - 1)
    cos_row = cos + p * s_cos
    sin_row = sin + p * s_cos
    o1 = tl.arange(0, B1)
    o2 = tl.arange(0, B2)
    if NOPE_FIRST:
        first_off = 0
        pe_off = D1
    else:
        first_off = D2
        pe_off = 0
    if part < tl.num_programs(1) - 1:
        heads = part * BLOCK_HQ + tl.arange(0, BLOCK_HQ)
        h_ok = heads < tl.where(t < n_q, q_heads, 0)
        hh = heads[:, None].to(tl.int64)
        m1 = h_ok[:, None] & (o1 < D1)[None, :]
        m2 = h_ok[:, None] & (o2 < D2)[None, :]
        qs = tl.load(q_scale) if Q_FP8 else 1.0
        xn = tl.load(QN + t * s_qn_t + hh * s_qn_h + o1[None, :], mask=m1, other=0.0).to(tl.float32)
        xr = _rope_row(QP + t * s_qp_t + hh * s_qp_h, o2[None, :], m2, cos_row, sin_row, D2, IS_NEOX, COS_FULL)
        qo = QOut + t * s_qo_t + hh * s_qo_h
        tl.store(qo + first_off + o1[None, :], _to_store(xn, qs, Q_FP8, Q_FP8_MAX, QOut.dtype.element_ty), mask=m1)
        tl.store(qo + pe_off + o2[None, :], _to_store(xr, qs, Q_FP8, Q_FP8_MAX, QOut.dtype.element_ty), mask=m2)
        if HAS_DQP:
            md = m2 & (heads[:, None] < tl.where(t < n_dq, q_heads, 0))
            tl.store(DQP + t * s_dqp_t + hh * s_dqp_h + o2[None, :], xr.to(DQP.dtype.element_ty), mask=md)
    else:
        slot = tl.load(slots + t, mask=t < n_k, other=-1).to(tl.int64)
        heads = tl.arange(0, BLOCK_HQ)
        h_ok = heads < tl.where(t < n_k, k_heads, 0)
        hh = heads[:, None].to(tl.int64)
        m1 = h_ok[:, None] & (o1 < D1)[None, :]
        m2 = h_ok[:, None] & (o2 < D2)[None, :]
        ks = tl.load(k_scale) if K_FP8 else 1.0
        kn = tl.load(KN + t * s_kn_t + hh * s_kn_h + o1[None, :], mask=m1, other=0.0).to(tl.float32)
        kr = _rope_row(KP + t * s_kp_t + hh * s_kp_h, o2[None, :], m2, cos_row, sin_row, D2, IS_NEOX, COS_FULL)
        if HAS_KPE_OUT:
            tl.store(KPOut + t * s_kpo_t + hh * s_kpo_h + o2[None, :], kr.to(KPOut.dtype.element_ty), mask=m2)
        in_cache = (slot >= 0) & (slot < capacity)
        live = heads[:, None] < tl.where(in_cache, k_heads, 0)
        slot = tl.where(in_cache, slot, 0)
        row = Cache + (slot // block_size) * s_cb + (slot % block_size) * s_cs + hh * s_ch
        tl.store(row + first_off + o1[None, :], _to_store(kn, ks, K_FP8, K_FP8_MAX, Cache.dtype.element_ty),
                 mask=m1 & live)
        tl.store(row + pe_off + o2[None, :], _to_store(kr, ks, K_FP8, K_FP8_MAX, Cache.dtype.element_ty),
                 mask=m2 & live)
