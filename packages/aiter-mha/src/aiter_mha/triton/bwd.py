"""Flash attention backward kernels: preprocess (delta, dsink), dK/dV, dQ.

P is recomputed from q, k and the forward's LSE with exactly the forward's pipeline (the shared
helpers in masking.py). Both main kernels own their outputs (dK/dV: one key block of one kv
head, summing the query heads of its GQA group; dQ: one query block of one query head), so
dq/dk/dv are written once, without atomics, and are bitwise reproducible. Only dbias crosses
(batch, head) programs: atomics when deterministic=False, a per-(batch, head) buffer reduced
in a fixed order when deterministic=True. The launch (host) side is ``launch.py``.
"""

import triton
import triton.language as tl

from .fwd import _load_kv_tile
from .masking import (
    dropout_keep,
    key_block_range,
    query_block_range,
    scores_log2,
    tanh_f32,
    visible,
)

__all__ = ["bwd_preprocess_kernel", "bwd_dkdv_kernel", "bwd_dq_kernel"]


@triton.jit
def bwd_preprocess_kernel(
    Out, dO, Lse, Delta, Sink, SinkPartial,
    stride_ob, stride_om, stride_oh, stride_dob, stride_dom, stride_doh,
    stride_lb, stride_lh, stride_lm,
    cu_seqlens_q, seqstart_q, seqlen_q_dense, num_heads_q,
    D_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQSTART: tl.constexpr, HAS_SINK: tl.constexpr,
):
    """delta_i = sum_d dO_id * O_id (fp32, lse layout); with a sink, per-block partial sums of
    exp(sink - lse_i) * delta_i (reduced on the host in a fixed order)."""
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if IS_VARLEN:
        cq0 = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - cq0
        if HAS_SEQSTART:
            row0 = tl.load(seqstart_q + b)
        else:
            row0 = cq0
    else:
        seqlen_q = seqlen_q_dense
        row0 = 0
    m_lo = pid_m * BLOCK_M
    if m_lo >= seqlen_q:
        return
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < seqlen_q
    mask = row_ok[:, None] & (offs_d < D_V)[None, :]
    b64 = b.to(tl.int64)
    rows64 = (row0 + offs_m).to(tl.int64)
    o = tl.load(Out + b64 * stride_ob + rows64[:, None] * stride_om + h * stride_oh + offs_d[None, :],
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dO + b64 * stride_dob + rows64[:, None] * stride_dom + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse_ptrs = b64 * stride_lb + h * stride_lh + rows64 * stride_lm
    tl.store(Delta + lse_ptrs, delta, mask=row_ok)
    if HAS_SINK:
        lse = tl.load(Lse + lse_ptrs, mask=row_ok, other=0.0)
        sink = tl.load(Sink + h).to(tl.float32)
        w = tl.where(row_ok, tl.exp(sink - lse) * delta, 0.0)
        tl.store(SinkPartial + (b * num_heads_q + h) * tl.num_programs(0) + pid_m, tl.sum(w, 0))


@triton.jit
def _dkdv_segment(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                  stride_qm, stride_dom, stride_lm, start, end,
                  offs_n, offs_mb, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                  win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale, softcap_log2,
                  bias_base, stride_bias_m, slope_log2, dbias_base, stride_dbias_m,
                  seed, philox_base, philox_row_stride, dropout_p, D_QK, D_V,
                  MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                  DBIAS_MODE: tl.constexpr, PAD_QK: tl.constexpr, PAD_V: tl.constexpr,
                  BLOCK_M: tl.constexpr, HAS_LEFT: tl.constexpr,
                  dq_base, stride_dqm, softmax_scale, DQ_ATOMIC: tl.constexpr):
    """Accumulate dK, dV of one key block over query blocks [start, end); tiles are transposed
    (keys x queries) so P^T and dS^T feed the matmuls without a layout change. DQ_ATOMIC: also
    add this key block's share of dQ into an fp32 buffer with atomics (no dQ kernel)."""
    cols = offs_n[:, None]  # key index j, along dim 0
    for start_m in range(start, end, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + offs_mb
        rows = offs_m[None, :]  # query index i, along dim 1
        q_ptrs = q_base + tl.cast(start_m, tl.int64) * stride_qm + (offs_mb * stride_qm)[:, None] + offs_dqk[None, :]
        do_ptrs = do_base + tl.cast(start_m, tl.int64) * stride_dom + (offs_mb * stride_dom)[:, None] + offs_dv[None, :]
        if MASKED:
            q_mask = (offs_m < seqlen_q)[:, None]
            do_mask = q_mask
            if PAD_QK:
                q_mask = q_mask & (offs_dqk < D_QK)[None, :]
            if PAD_V:
                do_mask = do_mask & (offs_dv < D_V)[None, :]
            q = tl.load(q_ptrs, mask=q_mask, other=0.0)
            do = tl.load(do_ptrs, mask=do_mask, other=0.0)
            lse2 = tl.load(lse_base + offs_m.to(tl.int64) * stride_lm, mask=offs_m < seqlen_q, other=0.0) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m.to(tl.int64) * stride_lm, mask=offs_m < seqlen_q, other=0.0)
        else:
            if PAD_QK:
                q = tl.load(q_ptrs, mask=(offs_dqk < D_QK)[None, :], other=0.0)
            else:
                q = tl.load(q_ptrs)
            if PAD_V:
                do = tl.load(do_ptrs, mask=(offs_dv < D_V)[None, :], other=0.0)
            else:
                do = tl.load(do_ptrs)
            lse2 = tl.load(lse_base + offs_m.to(tl.int64) * stride_lm) * 1.4426950408889634
            delta = tl.load(delta_base + offs_m.to(tl.int64) * stride_lm)
        qkT = tl.dot(k, tl.trans(q))
        in_range = (rows < seqlen_q) & (cols < seqlen_k)
        sT = scores_log2(qkT, rows, cols, diag_off, qk_scale_log2, softcap_inv_scale, softcap_log2,
                         bias_base, stride_bias_m, in_range, slope_log2,
                         HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
        pT = tl.exp2(sT - lse2[None, :])
        if MASKED:
            # key columns >= seqlen_k only reach dK/dV rows that are never stored
            vis = visible(rows, cols, seqlen_q, seqlen_k, diag_off, win_left, win_right, sink_size,
                          HAS_WINDOW, True, False, HAS_LEFT)
            pT = tl.where(vis, pT, 0.0)
        dpT = tl.dot(v, tl.trans(do))
        if HAS_DROPOUT:
            keep = dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p)
            inv_keep = 1.0 / (1.0 - dropout_p)
            pT_drop = tl.where(keep, pT * inv_keep, 0.0)
            dpT = tl.where(keep, dpT * inv_keep, 0.0)
        else:
            pT_drop = pT
        dv = tl.dot(pT_drop.to(do.dtype), do, dv)
        dsT = pT * (dpT - delta[None, :])
        if DBIAS_MODE == 1:
            tl.atomic_add(dbias_base + rows * stride_dbias_m + cols, dsT, mask=in_range)
        elif DBIAS_MODE == 2:
            tl.store(dbias_base + rows * stride_dbias_m + cols, dsT, mask=in_range)
        if HAS_SOFTCAP:
            t = tanh_f32(qkT * softcap_inv_scale)
            dsT = dsT * (1.0 - t * t)
        dk = tl.dot(dsT.to(q.dtype), q, dk)
        if DQ_ATOMIC:
            # key columns past seqlen_k were loaded as zeros but must not add NaN/inf products
            dsT_k = tl.where(cols < seqlen_k, dsT, 0.0).to(k.dtype)
            dq_part = tl.dot(tl.trans(dsT_k), k) * softmax_scale
            dq_ptrs = dq_base + offs_m.to(tl.int64)[:, None] * stride_dqm + offs_dqk[None, :]
            tl.atomic_add(dq_ptrs, dq_part, mask=(offs_m < seqlen_q)[:, None] & (offs_dqk < D_QK)[None, :])
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, K, V, dO, Lse, Delta, dK, dV, DBias, DQacc,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh, stride_dvb, stride_dvn, stride_dvh,
    stride_dqab, stride_dqam, stride_dqah,
    stride_lb, stride_lh, stride_lm,
    cu_seqlens_q, cu_seqlens_k, seqstart_q, seqstart_k,
    alibi, stride_ab, bias, stride_bias_m, stride_dbias_bh, stride_dbias_m,
    rng_state, dropout_p,
    seqlen_q_dense, seqlen_k_dense, dmask_rows, dmask_cols,
    num_heads_q, group,
    qk_scale_log2, softcap_inv_scale, softcap_log2, softmax_scale,
    win_left, win_right, sink_size,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQSTART: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, DBIAS_MODE: tl.constexpr,
    SPLIT_GROUP: tl.constexpr, TAIL_Q: tl.constexpr, DQ_ATOMIC: tl.constexpr,
):
    """One key block of one kv head; loops over the query heads of its group, or with
    SPLIT_GROUP handles one query head and writes its share into a per-query-head (fp32)
    buffer that the host sums over the group (more programs when there are few kv heads).
    DBIAS_MODE: 0 none, 1 atomic add into (Sq, Sk), 2 store into a (B*Hq, Sq, Sk) buffer."""
    pid_n = tl.program_id(0)
    head = tl.program_id(1)
    b = tl.program_id(2)
    if SPLIT_GROUP:
        hk = head // group
        h_first = head
        heads_here = 1
    else:
        hk = head
        h_first = head * group
        heads_here = group
    if IS_VARLEN:
        cq0 = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - cq0
        ck0 = tl.load(cu_seqlens_k + b)
        seqlen_k = tl.load(cu_seqlens_k + b + 1) - ck0
        if HAS_SEQSTART:
            q_row0 = tl.load(seqstart_q + b)
            k_row0 = tl.load(seqstart_k + b)
        else:
            q_row0 = cq0
            k_row0 = ck0
    else:
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
        q_row0 = 0
        k_row0 = 0
    n_lo = pid_n * BLOCK_N
    if n_lo >= seqlen_k:
        return
    diag_off = seqlen_k - seqlen_q
    PAD_QK: tl.constexpr = BLOCK_DQK != D_QK
    PAD_V: tl.constexpr = BLOCK_DV != D_V
    offs_n = n_lo + tl.arange(0, BLOCK_N)
    offs_nb = tl.arange(0, BLOCK_N)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)

    k_base = K + b64 * stride_kb + k_row0.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b64 * stride_vb + k_row0.to(tl.int64) * stride_vn + hk * stride_vh
    k = _load_kv_tile(k_base, stride_kn, offs_nb, n_lo, offs_dqk, seqlen_k, D_QK, True, PAD_QK)
    v = _load_kv_tile(v_base, stride_vn, offs_nb, n_lo, offs_dv, seqlen_k, D_V, True, PAD_V)

    lo, full_lo, full_hi, hi = query_block_range(n_lo, n_lo + BLOCK_N, seqlen_q, diag_off,
                                                 win_left, win_right, sink_size, BLOCK_M, HAS_WINDOW)
    dk = tl.zeros([BLOCK_N, BLOCK_DQK], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)
    seed = 0
    if HAS_DROPOUT:
        seed = tl.load(rng_state)
    for g in range(0, heads_here):
        h = h_first + g
        q_base = Q + b64 * stride_qb + q_row0.to(tl.int64) * stride_qm + h * stride_qh
        do_base = dO + b64 * stride_dob + q_row0.to(tl.int64) * stride_dom + h * stride_doh
        lse_base = Lse + b64 * stride_lb + h * stride_lh + q_row0.to(tl.int64) * stride_lm
        delta_base = Delta + b64 * stride_lb + h * stride_lh + q_row0.to(tl.int64) * stride_lm
        slope_log2 = 0.0
        if HAS_ALIBI:
            slope_log2 = tl.load(alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
        philox_base = 0
        if HAS_DROPOUT:
            philox_base = tl.load(rng_state + 1) + ((b64 * num_heads_q + h) * dmask_rows + q_row0) * dmask_cols
        dq_base = DQacc + b64 * stride_dqab + q_row0.to(tl.int64) * stride_dqam + h * stride_dqah
        dbias_base = DBias
        if DBIAS_MODE == 2:
            dbias_base = DBias + (b64 * num_heads_q + h) * stride_dbias_bh
        dk, dv = _dkdv_segment(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, stride_lm,
            lo, full_lo, offs_n, offs_mb, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale, softcap_log2,
            bias, stride_bias_m, slope_log2, dbias_base, stride_dbias_m,
            seed, philox_base, dmask_cols, dropout_p, D_QK, D_V,
            True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DBIAS_MODE,
            PAD_QK, PAD_V, BLOCK_M, HAS_LEFT, dq_base, stride_dqam, softmax_scale, DQ_ATOMIC)
        dk, dv = _dkdv_segment(
            dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, stride_lm,
            full_lo, full_hi, offs_n, offs_mb, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
            win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale, softcap_log2,
            bias, stride_bias_m, slope_log2, dbias_base, stride_dbias_m,
            seed, philox_base, dmask_cols, dropout_p, D_QK, D_V,
            False, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DBIAS_MODE,
            PAD_QK, PAD_V, BLOCK_M, HAS_LEFT, dq_base, stride_dqam, softmax_scale, DQ_ATOMIC)
        if TAIL_Q:
            dk, dv = _dkdv_segment(
                dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qm, stride_dom, stride_lm,
                full_hi, hi, offs_n, offs_mb, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale, softcap_log2,
                bias, stride_bias_m, slope_log2, dbias_base, stride_dbias_m,
                seed, philox_base, dmask_cols, dropout_p, D_QK, D_V,
                True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT, DBIAS_MODE,
                PAD_QK, PAD_V, BLOCK_M, HAS_LEFT, dq_base, stride_dqam, softmax_scale, DQ_ATOMIC)

    dk = dk * softmax_scale
    row_ok = (offs_n < seqlen_k)[:, None]
    dk_ptrs = (dK + b64 * stride_dkb + (k_row0 + n_lo).to(tl.int64) * stride_dkn + head * stride_dkh
               + (offs_nb * stride_dkn)[:, None] + offs_dqk[None, :])
    dv_ptrs = (dV + b64 * stride_dvb + (k_row0 + n_lo).to(tl.int64) * stride_dvn + head * stride_dvh
               + (offs_nb * stride_dvn)[:, None] + offs_dv[None, :])
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=row_ok & (offs_dqk < D_QK)[None, :])
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=row_ok & (offs_dv < D_V)[None, :])


@triton.jit
def _dq_segment(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, start, end,
                offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale, softcap_log2,
                bias_base, stride_bias_m, slope_log2, seed, philox_base, philox_row_stride,
                dropout_p, D_QK, D_V,
                MASKED: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                HAS_BIAS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                PAD_QK: tl.constexpr, PAD_V: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr):
    rows = offs_m[:, None]
    for start_n in range(start, end, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        k = _load_kv_tile(k_base, stride_kn, offs_n, start_n, offs_dqk, seqlen_k, D_QK, MASKED, PAD_QK)
        v = _load_kv_tile(v_base, stride_vn, offs_n, start_n, offs_dv, seqlen_k, D_V, MASKED, PAD_V)
        cols = (start_n + offs_n)[None, :]
        qk = tl.dot(q, tl.trans(k))
        s = scores_log2(qk, rows, cols, diag_off, qk_scale_log2, softcap_inv_scale, softcap_log2,
                        bias_base, stride_bias_m, (rows < seqlen_q) & (cols < seqlen_k), slope_log2,
                        HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI)
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            vis = visible(rows, cols, seqlen_q, seqlen_k, diag_off, win_left, win_right, sink_size,
                          HAS_WINDOW, True, True, HAS_LEFT)
            p = tl.where(vis, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        if HAS_DROPOUT:
            keep = dropout_keep(seed, philox_base, rows, cols, philox_row_stride, dropout_p)
            dp = tl.where(keep, dp * (1.0 / (1.0 - dropout_p)), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = tanh_f32(qk * softcap_inv_scale)
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, dO, Lse, Delta, dQ,
    stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh, stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh, stride_lm,
    cu_seqlens_q, cu_seqlens_k, seqstart_q, seqstart_k,
    alibi, stride_ab, bias, stride_bias_m,
    rng_state, dropout_p,
    seqlen_q_dense, seqlen_k_dense, dmask_rows, dmask_cols,
    num_heads_q, group,
    qk_scale_log2, softcap_inv_scale, softcap_log2, softmax_scale,
    win_left, win_right, sink_size,
    D_QK: tl.constexpr, D_V: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DQK: tl.constexpr, BLOCK_DV: tl.constexpr,
    IS_VARLEN: tl.constexpr, HAS_SEQSTART: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, REVERSE_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if REVERSE_M:
        pid_m = tl.num_programs(0) - 1 - pid_m
    hk = h // group
    if IS_VARLEN:
        cq0 = tl.load(cu_seqlens_q + b)
        seqlen_q = tl.load(cu_seqlens_q + b + 1) - cq0
        ck0 = tl.load(cu_seqlens_k + b)
        seqlen_k = tl.load(cu_seqlens_k + b + 1) - ck0
        if HAS_SEQSTART:
            q_row0 = tl.load(seqstart_q + b)
            k_row0 = tl.load(seqstart_k + b)
        else:
            q_row0 = cq0
            k_row0 = ck0
    else:
        seqlen_q = seqlen_q_dense
        seqlen_k = seqlen_k_dense
        q_row0 = 0
        k_row0 = 0
    m_lo = pid_m * BLOCK_M
    if m_lo >= seqlen_q:
        return
    diag_off = seqlen_k - seqlen_q
    PAD_QK: tl.constexpr = BLOCK_DQK != D_QK
    PAD_V: tl.constexpr = BLOCK_DV != D_V
    offs_m = m_lo + tl.arange(0, BLOCK_M)
    offs_mb = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_dqk = tl.arange(0, BLOCK_DQK)
    offs_dv = tl.arange(0, BLOCK_DV)
    b64 = b.to(tl.int64)
    row_ok = offs_m < seqlen_q

    q_ptrs = (Q + b64 * stride_qb + (q_row0 + m_lo).to(tl.int64) * stride_qm + h * stride_qh
              + (offs_mb * stride_qm)[:, None] + offs_dqk[None, :])
    do_ptrs = (dO + b64 * stride_dob + (q_row0 + m_lo).to(tl.int64) * stride_dom + h * stride_doh
               + (offs_mb * stride_dom)[:, None] + offs_dv[None, :])
    q = tl.load(q_ptrs, mask=row_ok[:, None] & (offs_dqk < D_QK)[None, :], other=0.0)
    do = tl.load(do_ptrs, mask=row_ok[:, None] & (offs_dv < D_V)[None, :], other=0.0)
    l_off = b64 * stride_lb + h * stride_lh + (q_row0 + offs_m).to(tl.int64) * stride_lm
    lse2 = tl.load(Lse + l_off, mask=row_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + l_off, mask=row_ok, other=0.0)

    k_base = K + b64 * stride_kb + k_row0.to(tl.int64) * stride_kn + hk * stride_kh
    v_base = V + b64 * stride_vb + k_row0.to(tl.int64) * stride_vn + hk * stride_vh
    slope_log2 = 0.0
    if HAS_ALIBI:
        slope_log2 = tl.load(alibi + b * stride_ab + h).to(tl.float32) * 1.4426950408889634
    seed = 0
    philox_base = 0
    if HAS_DROPOUT:
        seed = tl.load(rng_state)
        philox_base = tl.load(rng_state + 1) + ((b64 * num_heads_q + h) * dmask_rows + q_row0) * dmask_cols

    m_hi = tl.minimum(m_lo + BLOCK_M, seqlen_q)
    sink_end, lo, full_lo, full_hi, hi = key_block_range(
        m_lo, m_hi, seqlen_k, diag_off, win_left, win_right, sink_size, BLOCK_N, HAS_WINDOW)
    dq = tl.zeros([BLOCK_M, BLOCK_DQK], dtype=tl.float32)
    # sink-token and left-edge loops only with a left bound (each loop costs registers)
    if HAS_LEFT:
        dq = _dq_segment(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, 0, sink_end,
                         offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                         win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale,
                         softcap_log2, bias, stride_bias_m, slope_log2, seed, philox_base,
                         dmask_cols, dropout_p, D_QK, D_V,
                         True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT,
                         PAD_QK, PAD_V, BLOCK_N, HAS_LEFT)
        dq = _dq_segment(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, lo, full_lo,
                         offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                         win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale,
                         softcap_log2, bias, stride_bias_m, slope_log2, seed, philox_base,
                         dmask_cols, dropout_p, D_QK, D_V,
                         True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT,
                         PAD_QK, PAD_V, BLOCK_N, HAS_LEFT)
    dq = _dq_segment(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full_lo, full_hi,
                     offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                     win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale,
                     softcap_log2, bias, stride_bias_m, slope_log2, seed, philox_base,
                     dmask_cols, dropout_p, D_QK, D_V,
                     False, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT,
                     PAD_QK, PAD_V, BLOCK_N, HAS_LEFT)
    dq = _dq_segment(dq, q, do, lse2, delta, k_base, v_base, stride_kn, stride_vn, full_hi, hi,
                     offs_m, offs_n, offs_dqk, offs_dv, seqlen_q, seqlen_k, diag_off,
                     win_left, win_right, sink_size, qk_scale_log2, softcap_inv_scale,
                     softcap_log2, bias, stride_bias_m, slope_log2, seed, philox_base,
                     dmask_cols, dropout_p, D_QK, D_V,
                     True, HAS_WINDOW, HAS_SOFTCAP, HAS_BIAS, HAS_ALIBI, HAS_DROPOUT,
                     PAD_QK, PAD_V, BLOCK_N, HAS_LEFT)
    dq = dq * softmax_scale
    dq_ptrs = (dQ + b64 * stride_dqb + (q_row0 + m_lo).to(tl.int64) * stride_dqm + h * stride_dqh
               + (offs_mb * stride_dqm)[:, None] + offs_dqk[None, :])
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty), mask=row_ok[:, None] & (offs_dqk < D_QK)[None, :])

