"""Flash attention forward for NVIDIA Hopper (and anything Triton targets).

One kernel, specialised by constexpr feature flags so the plain path carries no dead work.
Online softmax in base 2 (log2(e) folded into the scale); each query block walks its key range
in up to four segments: sink-token blocks and window edges with the mask, the interior without
it. Fully masked key blocks are never visited. Grid = (query blocks, query heads, batch); GQA
maps query head h to kv head h // group.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from aiter_core.triton_utils import cdiv

from .configs import fwd_config
from .masking import (
    LOG2E,
    UNBOUNDED,
    dropout_keep,
    key_block_range,
    scores_log2,
    visible,
)

__all__ = ["flash_fwd", "launch_params"]


@triton.jit
def _load_kv_tile(base, stride_n, offs_n, start_n, offs_d, seqlen_k, D,
                  bt_base, page_size, stride_page,
                  CHECK_N: tl.constexpr, PAD_D: tl.constexpr, PAGED: tl.constexpr):
    """(BLOCK_N, BLOCK_D) tile of K or V rows start_n + offs_n; zeros outside."""
    pos = start_n + offs_n
    if PAGED:
        page = tl.load(bt_base + pos // page_size, mask=pos < seqlen_k, other=0)
        rows = page.to(tl.int64) * stride_page + (pos % page_size).to(tl.int64) * stride_n
        ptrs = base + rows[:, None] + offs_d[None, :]
    else:
        ptrs = base + tl.cast(start_n, tl.int64) * stride_n + (offs_n * stride_n)[:, None] + offs_d[None, :]
    if CHECK_N:
        if PAD_D:
            return tl.load(ptrs, mask=(pos < seqlen_k)[:, None] & (offs_d < D)[None, :], other=0.0)
        return tl.load(ptrs, mask=(pos < seqlen_k)[:, None], other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _fwd_segment(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, end,
                 offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                 win_left, win_right, sink_size,
                 qk_scale_log2, softcap_inv_scale, softcap_log2,
                 bias_base, stride_bias_m, slope_log2,
                 seed, philox_base, philox_row_stride, dropout_p,
                 bt_base, page_size, stride_kpage, stride_vpage, D_QK, D_V,
                 MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 PAGED: tl.constexpr, PAD_QK: tl.constexpr, PAD_V: tl.constexpr,
                 IS_FP8: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_kv_tile(k_base, stride_kn, offs_n, start_n, offs_dqk, seqlen_k, D_QK,
                          bt_base, page_size, stride_kpage, MASKED, PAD_QK, PAGED)
        qk = tl.dot(q, tl.trans(k))
        cols = start_n + offs_n
        s = scores_log2(qk, offs_m[:, None], cols[None, :], diag_off, qk_scale_log2, softcap_inv_scale, softcap_log2,
                        bias_base, stride_bias_m,
                        (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :], slope_log2,
                        HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
        if MASKED:
            vis = visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag_off, win_left,
                          win_right, sink_size, HAS_WINDOW, False, True, HAS_LEFT)
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # rows with nothing visible yet keep a finite shift so exp2 gives 0, not NaN
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = m_new
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if HAS_DROPOUT:
            keep = dropout_keep(seed, philox_base, offs_m[:, None], cols[None, :], philox_row_stride,
                                dropout_p)
            p = tl.where(keep, p, 0.0)
        v = _load_kv_tile(v_base, stride_vn, offs_n, start_n, offs_dv, seqlen_k, D_V,
                          bt_base, page_size, stride_vpage, MASKED, PAD_V, PAGED)
        if IS_FP8:
            acc = tl.dot(p.to(tl.bfloat16), v.to(tl.bfloat16), acc)
        else:
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def flash_fwd_kernel(
    Q, K, V, Out, Lse, Dmask,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh, stride_lm,
    stride_db, stride_dh, stride_dm,
    cu_seqlens_q, cu_seqlens_k, seqstart_q, seqstart_k, seqlens_k,
    block_table, stride_btb, page_size,
    alibi, stride_ab, bias, stride_bias_m, sink,
    q_descale, k_descale, v_descale,
    rng_state, dropout_p,
    seqlen_q_dense, seqlen_k_dense, dmask_rows, dmask_cols,
    num_heads_q, group, num_heads_k,
    qk_scale_log2, softcap_inv_scale, softcap_log2,
    win_left, win_right, sink_size,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQSTART: tl.constexpr, K_LEN_MODE: tl.constexpr,
    PAGED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_SINK: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, RETURN_DMASK: tl.constexpr, STORE_LSE: tl.constexpr,
    IS_FP8: tl.constexpr, REVERSE_M: tl.constexpr,
):
    """K_LEN_MODE: 0 = every sequence has seqlen_k_dense keys, 1 = cu_seqlens_k, 2 = seqlens_k."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    hk = h // group

    if IS_VARLEN:
        cq0 = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - cq0
        if HAS_SEQSTART:
            q_row0 = tl.load(seqstart_q + b)
        else:
            q_row0 = cq0
    else:
        seqlen_q = seqlen_q_dense
        q_row0 = 0
    if K_LEN_MODE == 1:
        ck0 = tl.load(cu_seqlens_k + b)
        seqlen_k = tl.load(cu_seqlens_k + b + 1) - ck0
        if HAS_SEQSTART:
            k_row0 = tl.load(seqstart_k + b)
        else:
            k_row0 = ck0
    elif K_LEN_MODE == 2:
        seqlen_k = tl.load(seqlens_k + b)
        k_row0 = 0
    else:
        seqlen_k = seqlen_k_dense
        k_row0 = 0
    if PAGED:
        k_row0 = 0
    m_lo = pid_m * BLOCK_M
    if m_lo >= seqlen_q:
        return
    diag_off = seqlen_k - seqlen_q

    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    PAD_QK: tl.constexpr = BLOCK_DQK != D_QK
    PAD_V: tl.constexpr = BLOCK_DV != D_V

    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + (q_row0 + m_lo).to(tl.int64) * stride_qm + h * stride_qh
    q_ptrs = q_base + (tl.arange(0, BLOCK_M) * stride_qm)[:, None] + offs_dqk[None, :]
    q_mask = (offs_m < seqlen_q)[:, None]
    if PAD_QK:
        q_mask = q_mask & (offs_dqk < D_QK)[None, :]
    q = tl.load(q_ptrs, mask=q_mask, other=0.0)

    k_base = K + b64 * stride_kb + k_row0.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b64 * stride_vb + k_row0.to(tl.int64) * stride_vn + hk * stride_vh
    bt_base = block_table
    if PAGED:
        bt_base = block_table + b64 * stride_btb
        k_base = K + hk * stride_kh
        v_base = V + hk * stride_vh

    qk_scale = qk_scale_log2
    if IS_FP8:
        descale = tl.load(q_descale + b * num_heads_k + hk) * tl.load(k_descale + b * num_heads_k + hk)
        qk_scale = qk_scale * descale
        softcap_inv = softcap_inv_scale * descale
    else:
        softcap_inv = softcap_inv_scale
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
    bias_base = bias
    seed = 0
    philox_base = 0
    if HAS_DROPOUT:
        seed = tl.load(rng_state)
        philox_base = tl.load(rng_state + 1) + ((b64 * num_heads_q + h) * dmask_rows + q_row0) * dmask_cols

    if HAS_SINK:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) + tl.load(sink + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32) + 1.0
    else:
        m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)

    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    sink_end, lo, full_lo, full_hi, hi = key_block_range(
        m_lo, m_hi, seqlen_k, diag_off, win_left, win_right, sink_size, BLOCK_N, HAS_WINDOW)

    # every loop costs registers (the compiler hoists each loop's invariant address tiles), so
    # the sink-token and left-edge loops exist only when the window has a left bound
    if HAS_LEFT:
        acc, l_i, m_i = _fwd_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, 0, sink_end,
            offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
            bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
            bt_base, page_size, stride_kb, stride_vb, D_QK, D_V,
            True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
            PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
        acc, l_i, m_i = _fwd_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, full_lo,
            offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
            bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
            bt_base, page_size, stride_kb, stride_vb, D_QK, D_V,
            True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
            PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_lo, full_hi,
        offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
        win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
        bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
        bt_base, page_size, stride_kb, stride_vb, D_QK, D_V,
        False, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
        PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_hi, hi,
        offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
        win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
        bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
        bt_base, page_size, stride_kb, stride_vb, D_QK, D_V,
        True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
        PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)

    # rows with no visible key and no sink: out = 0, lse = -inf
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    inv_l = 1.0 / l_safe
    if HAS_DROPOUT:
        inv_l = inv_l / (1.0 - dropout_p)
    if IS_FP8:
        inv_l = inv_l * tl.load(v_descale + b * num_heads_k + hk)
    out = acc * inv_l[:, None]
    lse2 = tl.where(empty, float("-inf"), m_i + tl.log2(l_safe))

    o_base = Out + b64 * stride_ob + (q_row0 + m_lo).to(tl.int64) * stride_om + h * stride_oh
    o_ptrs = o_base + (tl.arange(0, BLOCK_M) * stride_om)[:, None] + offs_dv[None, :]
    o_mask = (offs_m < seqlen_q)[:, None]
    if PAD_V:
        o_mask = o_mask & (offs_dv < D_V)[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=o_mask)
    if STORE_LSE:
        l_ptrs = Lse + b64 * stride_lb + h * stride_lh + (q_row0 + offs_m).to(tl.int64) * stride_lm
        tl.store(l_ptrs, lse2 * 0.6931471805599453, mask=offs_m < seqlen_q)

    if RETURN_DMASK:
        # second pass with the final lse: normalised P, negated where dropped, 0 where masked
        d_base = Dmask + b64 * stride_db + h * stride_dh + (q_row0 + m_lo).to(tl.int64) * stride_dm
        lse2_row = tl.where(empty, 0.0, lse2)
        for start_n in range(0, dmask_cols, BLOCK_N):
            k = _load_kv_tile(k_base, stride_kn, offs_n, start_n, offs_dqk, seqlen_k, D_QK,
                              bt_base, page_size, stride_kb, True, PAD_QK, PAGED)
            qk = tl.dot(q, tl.trans(k))
            cols = start_n + offs_n
            s = scores_log2(qk, offs_m[:, None], cols[None, :], diag_off, qk_scale, softcap_inv,
                            softcap_log2,
                            bias_base, stride_bias_m,
                            (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :], slope_log2,
                            HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
            vis = visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag_off, win_left,
                          win_right, sink_size, HAS_WINDOW, True, True, HAS_LEFT)
            p = tl.where(vis, tl.exp2(s - lse2_row[:, None]), 0.0)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, philox_base, offs_m[:, None], cols[None, :], dmask_cols,
                                    dropout_p)
                p = tl.where(keep, p, -p)
            d_ptrs = d_base + (tl.arange(0, BLOCK_M) * stride_dm)[:, None] + cols[None, :]
            tl.store(d_ptrs, p, mask=(offs_m < seqlen_q)[:, None] & (cols < dmask_cols)[None, :])


def _next_pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


def window_bounds(causal: bool, window, seqlen_k_max: int):
    """Host-side normalisation: (has_window, left, right, sink_size) with UNBOUNDED for -1.

    Window values >= the key length are unbounded; causal means right = 0.
    """
    left, right, sink_size = (tuple(window) + (0,))[:3] if window is not None else (-1, -1, 0)
    left = -1 if left is None or left < 0 or left >= seqlen_k_max else int(left)
    right = -1 if right is None or right < 0 or right >= seqlen_k_max else int(right)
    if causal:
        right = 0
    has_window = left >= 0 or right >= 0
    sink_size = int(sink_size or 0) if left >= 0 else 0  # sinks only matter under a left bound
    return (has_window, UNBOUNDED if left < 0 else left, UNBOUNDED if right < 0 else right,
            sink_size)


def launch_params(q, k, v, *, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
                  max_seqlen_k=None, seqstart_q=None, seqstart_k=None, block_table=None,
                  seqlens_k=None):
    """Shared shape/stride bookkeeping for forward and backward launches."""
    varlen = cu_seqlens_q is not None
    paged = block_table is not None
    p = {}
    if varlen:
        p["batch"] = cu_seqlens_q.numel() - 1
        p["heads_q"], p["d_qk"] = q.shape[1], q.shape[2]
        p["q_strides"] = (0, q.stride(0), q.stride(1))
        p["max_sq"] = int(max_seqlen_q) if max_seqlen_q is not None else int(
            (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max().item())
        p["seqlen_q_dense"] = 0
    else:
        p["batch"] = q.shape[0]
        p["heads_q"], p["d_qk"] = q.shape[2], q.shape[3]
        p["q_strides"] = (q.stride(0), q.stride(1), q.stride(2))
        p["max_sq"] = q.shape[1]
        p["seqlen_q_dense"] = q.shape[1]
    if paged:
        p["heads_k"] = k.shape[2]
        p["k_strides"] = (k.stride(0), k.stride(1), k.stride(2))
        p["v_strides"] = (v.stride(0), v.stride(1), v.stride(2))
        p["page_size"] = k.shape[1]
        if seqlens_k is not None:
            p["k_len_mode"] = 2
        else:
            p["k_len_mode"] = 1
        p["seqlen_k_dense"] = 0
        if max_seqlen_k is None:
            lens = seqlens_k if seqlens_k is not None else cu_seqlens_k[1:] - cu_seqlens_k[:-1]
            max_seqlen_k = int(lens.max().item())
        p["max_sk"] = int(max_seqlen_k)
    elif k.dim() == 3:
        p["heads_k"] = k.shape[1]
        p["k_strides"] = (0, k.stride(0), k.stride(1))
        p["v_strides"] = (0, v.stride(0), v.stride(1))
        p["page_size"] = 1
        p["k_len_mode"] = 1
        p["seqlen_k_dense"] = 0
        p["max_sk"] = int(max_seqlen_k) if max_seqlen_k is not None else int(
            (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).max().item())
    else:
        p["heads_k"] = k.shape[2]
        p["k_strides"] = (k.stride(0), k.stride(1), k.stride(2))
        p["v_strides"] = (v.stride(0), v.stride(1), v.stride(2))
        p["page_size"] = 1
        p["k_len_mode"] = 2 if seqlens_k is not None else 0
        p["seqlen_k_dense"] = k.shape[1]
        p["max_sk"] = int(max_seqlen_k) if (max_seqlen_k is not None and seqlens_k is not None) else k.shape[1]
    p["d_v"] = v.shape[-1]
    p["varlen"] = varlen
    p["paged"] = paged
    p["has_seqstart"] = seqstart_q is not None or seqstart_k is not None
    assert p["heads_q"] % p["heads_k"] == 0
    p["group"] = p["heads_q"] // p["heads_k"]
    return p


def _fp8_types():
    return tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


def flash_fwd(q, k, v, *, softmax_scale: float, causal: bool, window=(-1, -1, 0),
              cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None,
              seqstart_q=None, seqstart_k=None, block_table=None, seqlens_k=None,
              alibi_slopes=None, bias=None, sink=None, softcap: float = 0.0,
              dropout_p: float = 0.0, rng_state=None, return_dropout_mask: bool = False,
              q_descale=None, k_descale=None, v_descale=None,
              out=None, return_lse: bool = True, config: dict | None = None):
    """Launch the forward kernel. Returns (out, lse or None, s_dmask or None).

    Inputs are validated by the API layer; only internal invariants are asserted here.
    """
    p = launch_params(q, k, v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                      max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, seqstart_q=seqstart_q,
                      seqstart_k=seqstart_k, block_table=block_table, seqlens_k=seqlens_k)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    batch, hq, hk = p["batch"], p["heads_q"], p["heads_k"]
    is_fp8 = q.dtype in _fp8_types()
    dev = q.device
    if out is None:
        out_dtype = torch.bfloat16 if is_fp8 else q.dtype
        out_shape = (*q.shape[:-1], p["d_v"])
        out = torch.empty(out_shape, dtype=out_dtype, device=dev)
    o_strides = (0, out.stride(0), out.stride(1)) if p["varlen"] else (out.stride(0), out.stride(1), out.stride(2))

    lse = None
    if return_lse:
        if p["varlen"]:
            lse = torch.empty((hq, q.shape[0]), dtype=torch.float32, device=dev)
            l_strides = (0, lse.stride(0), lse.stride(1))
        else:
            lse = torch.empty((batch, hq, p["max_sq"]), dtype=torch.float32, device=dev)
            l_strides = (lse.stride(0), lse.stride(1), lse.stride(2))
    else:
        l_strides = (0, 0, 0)

    has_dropout = dropout_p > 0.0
    if p["varlen"]:
        dmask_rows, dmask_cols = q.shape[0], p["max_sk"]
    else:
        dmask_rows, dmask_cols = p["max_sq"], p["max_sk"]
    s_dmask = None
    if return_dropout_mask:
        if p["varlen"]:
            s_dmask = torch.zeros((hq, dmask_rows, dmask_cols), dtype=torch.float32, device=dev)
            d_strides = (0, s_dmask.stride(0), s_dmask.stride(1))
        else:
            s_dmask = torch.zeros((batch, hq, dmask_rows, dmask_cols), dtype=torch.float32, device=dev)
            d_strides = (s_dmask.stride(0), s_dmask.stride(1), s_dmask.stride(2))
    else:
        d_strides = (0, 0, 0)
    if has_dropout:
        assert rng_state is not None and rng_state.numel() == 2

    has_window, win_left, win_right, sink_size = window_bounds(causal, window, p["max_sk"])
    has_softcap = softcap is not None and softcap > 0.0
    qk_scale_log2 = float(softmax_scale) * LOG2E
    softcap_inv_scale = float(softmax_scale) / softcap if has_softcap else 0.0
    softcap_log2 = float(softcap) * LOG2E if has_softcap else 0.0

    def expand_descale(d):
        if d is None:
            return torch.ones((batch, hk), dtype=torch.float32, device=dev)
        d = d.to(torch.float32)
        return d.reshape(1, 1).expand(batch, hk).contiguous() if d.numel() == 1 else d.reshape(batch, hk).contiguous()

    if is_fp8:
        qd, kd, vd = expand_descale(q_descale), expand_descale(k_descale), expand_descale(v_descale)
    else:
        qd = kd = vd = q
    if bias is not None:
        bias = bias if bias.stride(-1) == 1 else bias.contiguous()
    stride_ab = 0
    if alibi_slopes is not None:
        alibi_slopes = alibi_slopes.contiguous()
        stride_ab = alibi_slopes.stride(0) if alibi_slopes.dim() == 2 else 0

    cfg = dict(config) if config else fwd_config(p["d_qk"], p["d_v"], is_fp8=is_fp8, dropout=has_dropout,
                                                 causal=has_window, has_bias=bias is not None)
    block_m, block_n = cfg["BLOCK_M"], cfg["BLOCK_N"]
    grid = (cdiv(p["max_sq"], block_m), hq, batch)
    if 0 in grid:  # nothing to compute (no queries, heads or sequences)
        return out, lse, s_dmask
    dummy = q
    flash_fwd_kernel[grid](
        q, k, v, out, lse if lse is not None else dummy, s_dmask if s_dmask is not None else dummy,
        *p["q_strides"], *p["k_strides"], *p["v_strides"], *o_strides, *l_strides, *d_strides,
        cu_seqlens_q if cu_seqlens_q is not None else dummy,
        cu_seqlens_k if cu_seqlens_k is not None else dummy,
        seqstart_q if seqstart_q is not None else cu_seqlens_q if cu_seqlens_q is not None else dummy,
        seqstart_k if seqstart_k is not None else cu_seqlens_k if cu_seqlens_k is not None else dummy,
        seqlens_k if seqlens_k is not None else dummy,
        block_table if block_table is not None else dummy,
        block_table.stride(0) if block_table is not None else 0, p["page_size"],
        alibi_slopes if alibi_slopes is not None else dummy, stride_ab,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        sink if sink is not None else dummy,
        qd, kd, vd,
        rng_state if has_dropout else dummy, float(dropout_p),
        p["seqlen_q_dense"], p["seqlen_k_dense"], dmask_rows, dmask_cols,
        hq, p["group"], hk,
        qk_scale_log2, softcap_inv_scale, softcap_log2,
        win_left, win_right, sink_size,
        p["d_qk"], p["d_v"],
        BLOCK_M=block_m, BLOCK_N=block_n,
        BLOCK_DQK=_next_pow2(p["d_qk"]), BLOCK_DV=_next_pow2(p["d_v"]),
        IS_VARLEN=p["varlen"], HAS_SEQSTART=p["has_seqstart"], K_LEN_MODE=p["k_len_mode"],
        PAGED=p["paged"], HAS_WINDOW=has_window, HAS_LEFT=win_left != UNBOUNDED,
        HAS_SOFTCAP=has_softcap,
        HAS_BIAS=bias is not None, HAS_ALIBI=alibi_slopes is not None, HAS_SINK=sink is not None,
        HAS_DROPOUT=has_dropout, RETURN_DMASK=return_dropout_mask and s_dmask is not None,
        STORE_LSE=lse is not None, IS_FP8=is_fp8, REVERSE_M=has_window,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out, lse, s_dmask
