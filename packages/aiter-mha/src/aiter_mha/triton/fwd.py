"""Flash attention forward kernel for NVIDIA Hopper (and anything Triton targets).

One kernel, specialised by constexpr feature flags so the plain path carries no dead work.
Online softmax in base 2 (log2(e) folded into the scale); each query block walks its key range
in up to four segments: sink-token blocks and window edges with the mask, the interior without
it. Fully masked key blocks are never visited. Grid = (query blocks, query heads, batch); GQA
maps query head h to kv head h // group.

Paged K/V (``PAGED``): key rows are found through the block table with
``aiter_core.triton_attn.paged_block_lookup``, the rule every family shares: a block id outside
``[0, num_physical_blocks)`` (negative = padding) makes its keys invalid; they are skipped (score
-inf, never read from outside the cache). The launch (host) side is ``launch.py``.
"""

import triton
import triton.language as tl

from aiter_core.triton_attn import paged_block_lookup

from .masking import (
    dropout_keep,
    key_block_range,
    scores_log2,
    visible,
)

__all__ = ["flash_fwd_kernel"]


@triton.jit
def _load_kv_tile(base, stride_n, offs_n, start_n, offs_d, seqlen_k, D,
                  CHECK_N: tl.constexpr, PAD_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D) tile of K or V rows start_n + offs_n; zeros outside."""
    pos = start_n + offs_n
    ptrs = base + tl.cast(start_n, tl.int64) * stride_n + (offs_n * stride_n)[:, None] + offs_d[None, :]
    if CHECK_N:
        if PAD_D:
            return tl.load(ptrs, mask=(pos < seqlen_k)[:, None] & (offs_d < D)[None, :], other=0.0)
        return tl.load(ptrs, mask=(pos < seqlen_k)[:, None], other=0.0)
    if PAD_D:
        return tl.load(ptrs, mask=(offs_d < D)[None, :], other=0.0)
    return tl.load(ptrs)


@triton.jit
def _load_paged_tile(base, phys, off, stride_page, stride_n, offs_d, valid, D, PAD_D: tl.constexpr):
    """(BLOCK_N, BLOCK_D) tile of K or V from a paged cache; zeros for invalid keys."""
    rows = phys * stride_page + off.to(tl.int64) * stride_n
    ptrs = base + rows[:, None] + offs_d[None, :]
    if PAD_D:
        return tl.load(ptrs, mask=valid[:, None] & (offs_d < D)[None, :], other=0.0)
    return tl.load(ptrs, mask=valid[:, None], other=0.0)


@triton.jit
def _fwd_segment(acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, start, end,
                 offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                 win_left, win_right, sink_size,
                 qk_scale_log2, softcap_inv_scale, softcap_log2,
                 bias_base, stride_bias_m, slope_log2,
                 seed, philox_base, philox_row_stride, dropout_p,
                 bt_base, page_size, num_logical_blocks, num_physical_blocks, stride_kpage, stride_vpage,
                 D_QK, D_V,
                 MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 PAGED: tl.constexpr, PAD_QK: tl.constexpr, PAD_V: tl.constexpr,
                 IS_FP8: tl.constexpr, BLOCK_N: tl.constexpr, HAS_LEFT: tl.constexpr):
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        if PAGED:
            pos = start_n + offs_n
            phys, off, valid = paged_block_lookup(bt_base, pos, page_size, num_logical_blocks, num_physical_blocks,
                                                  pos < seqlen_k)
            k = _load_paged_tile(k_base, phys, off, stride_kpage, stride_kn, offs_dqk, valid, D_QK, PAD_QK)
        else:
            k = _load_kv_tile(k_base, stride_kn, offs_n, start_n, offs_dqk, seqlen_k, D_QK, MASKED, PAD_QK)
        qk = tl.dot(q, tl.trans(k))
        cols = start_n + offs_n
        s = scores_log2(qk, offs_m[:, None], cols[None, :], diag_off, qk_scale_log2, softcap_inv_scale, softcap_log2,
                        bias_base, stride_bias_m,
                        (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :], slope_log2,
                        HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
        if MASKED or PAGED:
            if MASKED:
                vis = visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag_off, win_left,
                              win_right, sink_size, HAS_WINDOW, False, True, HAS_LEFT)
                if PAGED:
                    vis = vis & valid[None, :]
            else:
                vis = valid[None, :]  # keys of invalid blocks are skipped
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
        if PAGED:
            v = _load_paged_tile(v_base, phys, off, stride_vpage, stride_vn, offs_dv, valid, D_V, PAD_V)
        else:
            v = _load_kv_tile(v_base, stride_vn, offs_n, start_n, offs_dv, seqlen_k, D_V, MASKED, PAD_V)
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
    block_table, stride_btb, page_size, num_logical_blocks, num_physical_blocks,
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
            bt_base, page_size, num_logical_blocks, num_physical_blocks, stride_kb, stride_vb, D_QK, D_V,
            True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
            PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
        acc, l_i, m_i = _fwd_segment(
            acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, lo, full_lo,
            offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
            bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
            bt_base, page_size, num_logical_blocks, num_physical_blocks, stride_kb, stride_vb, D_QK, D_V,
            True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
            PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_lo, full_hi,
        offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
        win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
        bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
        bt_base, page_size, num_logical_blocks, num_physical_blocks, stride_kb, stride_vb, D_QK, D_V,
        False, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, PAGED,
        PAD_QK, PAD_V, IS_FP8, BLOCK_N, HAS_LEFT)
    acc, l_i, m_i = _fwd_segment(
        acc, l_i, m_i, q, k_base, v_base, stride_kn, stride_vn, full_hi, hi,
        offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
        win_left, win_right, sink_size, qk_scale, softcap_inv, softcap_log2,
        bias_base, stride_bias_m, slope_log2, seed, philox_base, dmask_cols, dropout_p,
        bt_base, page_size, num_logical_blocks, num_physical_blocks, stride_kb, stride_vb, D_QK, D_V,
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
            if PAGED:
                pos = start_n + offs_n
                phys, off, valid = paged_block_lookup(bt_base, pos, page_size, num_logical_blocks,
                                                      num_physical_blocks, pos < seqlen_k)
                k = _load_paged_tile(k_base, phys, off, stride_kb, stride_kn, offs_dqk, valid, D_QK, PAD_QK)
            else:
                k = _load_kv_tile(k_base, stride_kn, offs_n, start_n, offs_dqk, seqlen_k, D_QK, True, PAD_QK)
            qk = tl.dot(q, tl.trans(k))
            cols = start_n + offs_n
            s = scores_log2(qk, offs_m[:, None], cols[None, :], diag_off, qk_scale, softcap_inv,
                            softcap_log2,
                            bias_base, stride_bias_m,
                            (offs_m < seqlen_q)[:, None] & (cols < seqlen_k)[None, :], slope_log2,
                            HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
            vis = visible(offs_m[:, None], cols[None, :], seqlen_q, seqlen_k, diag_off, win_left,
                          win_right, sink_size, HAS_WINDOW, True, True, HAS_LEFT)
            if PAGED:
                vis = vis & valid[None, :]
            p = tl.where(vis, tl.exp2(s - lse2_row[:, None]), 0.0)
            if HAS_DROPOUT:
                keep = dropout_keep(seed, philox_base, offs_m[:, None], cols[None, :], dmask_cols,
                                    dropout_p)
                p = tl.where(keep, p, -p)
            d_ptrs = d_base + (tl.arange(0, BLOCK_M) * stride_dm)[:, None] + cols[None, :]
            tl.store(d_ptrs, p, mask=(offs_m < seqlen_q)[:, None] & (cols < dmask_cols)[None, :])

