"""The unified attention kernel: one program per (query block, KV head[, KV segment]).

Query blocks: each sequence's new tokens are cut into blocks of ``BLOCK_Q`` tokens. Block ``b`` of
the launch belongs to the last sequence ``s`` with ``cu_seqlens_q[s] // BLOCK_Q + s <= b`` (found
by binary search in the kernel), so ``num_tokens // BLOCK_Q + num_seqs`` programs per KV head
cover any mix of lengths without reading lengths on the host; surplus blocks exit at once. With
``BLOCKS_PER_SEQ = n > 0`` block ``b`` is block ``b % n`` of sequence ``b // n`` instead (``n = 1``
when every sequence has one new token). A launch attends only the sequences whose new-token
count ``qlen`` has ``qlen_lo < qlen <= qlen_hi``: a mixed batch runs as two launches of this
kernel, decode-like sequences with small row tiles and prefills with big ones (launch.plans).

Rows: a program's ``BLOCK_M = BLOCK_Q * GROUP_P2`` rows are (query token, query head of this KV
head) pairs, ``row = token * GROUP_P2 + head_in_group``. ``GROUP_P2`` is the GQA ratio rounded up
to a power of two and the surplus rows are masked, so ratios like 3 or 5 work (``tl.arange``
needs power-of-two lengths; upstream's layout breaks there).

Keys: tiles of ``TILE_N`` tokens looked up token by token through the block table (so a tile may
span several cache blocks, or part of one), limited to the causal and sliding-window range of the
block's rows. With ``NUM_SEGMENTS > 1`` (the 3D kernel) the tiles of a program are split into
contiguous segments, one per program along grid axis 2; each writes its normalised partial output,
running max (natural log) and exp-sum, merged by ``aiter_core.triton_attn.splitk_merge``.

Scores follow :mod:`aiter_unified.reference`: scale (with q/k descales), soft cap, ALiBi, qq_bias,
mask; the sink initialises the running max and sum of segment 0. KV tiles are converted to the
compute dtype (q's dtype; fp16 when q is fp8, exact for e4m3 values) before the dots. Cache
addresses are int32 (``OFFSET_BITS`` 32) when every offset of both caches fits, else int64.

Index metadata (README "Index metadata and NaN"): ``cu_seqlens_q`` entries are clamped into
``[0, num_tokens]``, the KV length into ``[0, table width x KV_BLOCK]``, out-of-range block ids are
skipped in every tile, rows ``>= max_seqlen_q`` are written NaN; masked tiles holding a non-finite
V value recompute P @ V with those values zeroed for the rows that do not see them.
"""

from __future__ import annotations

import triton
import triton.language as tl

from aiter_core import triton_attn as ta


@triton.jit
def _clamp_row(x, num_tokens):
    # a cu_seqlens_q entry clamped into [0, num_tokens]: no index content reaches past q / out
    return tl.minimum(tl.maximum(x, 0), num_tokens)


@triton.jit
def _flag_rows(out_ptr, so_ptr, sm_ptr, ss_ptr, q_rows, head, ok, offs_d, d_ok, s_ot, s_oh, s_od, s_sot, s_soh,
               s_sos, s_smt, s_smh, s_sms, seg, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
               NUM_SEGMENTS: tl.constexpr):
    # rows past max_seqlen_q: written NaN (flagged), never left unwritten. Split launches write
    # NaN outputs with max 0 and sum 1 so the merge keeps them (it skips NaN-weighted segments).
    nan = tl.full([BLOCK_M, BLOCK_D], float("nan"), tl.float32)
    if NUM_SEGMENTS == 1:
        tl.store(out_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od,
                 nan.to(out_ptr.dtype.element_ty), mask=ok[:, None] & d_ok[None, :])
    else:
        seg64 = seg.to(tl.int64)
        tl.store(so_ptr + q_rows[:, None] * s_sot + head[:, None] * s_soh + seg64 * s_sos + offs_d[None, :], nan,
                 mask=ok[:, None])
        stat = q_rows * s_smt + head * s_smh + seg64 * s_sms
        tl.store(sm_ptr + stat, tl.zeros([BLOCK_M], tl.float32), mask=ok)
        tl.store(ss_ptr + stat, tl.full([BLOCK_M], 1.0, tl.float32), mask=ok)


@triton.jit
def _find_seq(cu_q_ptr, qblock, num_seqs, num_tokens, BLOCK_Q: tl.constexpr):
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        start = _clamp_row(tl.load(cu_q_ptr + mid), num_tokens) // BLOCK_Q + mid
        if start <= qblock:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(acc, m_i, l_i, q, t, offs_n, offs_d, d_ok, bt_row, num_logical_blocks, num_phys_blocks, kv_end,
                 k_base, v_base, s_kblk, s_ktok, s_vblk, s_vtok, qk_scale, softcap, row_ok, qt, qpos, ctx,
                 sliding_window, slope, qq_ptr, s_qq, HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr,
                 TILE_N: tl.constexpr, KV_BLOCK: tl.constexpr, s_kd: tl.constexpr, s_vd: tl.constexpr,
                 CDT: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
                 HAS_QQ: tl.constexpr, MASKED: tl.constexpr, OFFSET_BITS: tl.constexpr,
                 SAME_KV_OFFSETS: tl.constexpr):
    """One tile of TILE_N keys: scores, online softmax, P @ V. ``MASKED=False`` is only for tiles
    every row sees entirely (all keys valid, causal and window satisfied)."""
    tok = t * TILE_N + offs_n
    phys, off, valid = ta.paged_block_lookup(bt_row, tok, KV_BLOCK, num_logical_blocks, num_phys_blocks, tok < kv_end)
    k_tok = ta.paged_token_offset_from_tok(phys, tok, s_kblk, KV_BLOCK, KV_BLOCK, 0, s_ktok, OFFSET_BITS)
    if SAME_KV_OFFSETS:  # K and V caches share their block and token strides: one address vector
        v_tok = k_tok
    else:
        v_tok = ta.paged_token_offset_from_tok(phys, tok, s_vblk, KV_BLOCK, KV_BLOCK, 0, s_vtok, OFFSET_BITS)
    # K as [TILE_N, D] like V (the dot takes its transpose): both tiles use the same token layout
    if MASKED:
        k = tl.load(k_base + k_tok[:, None] + offs_d[None, :] * s_kd, mask=valid[:, None] & d_ok[None, :])
    elif BLOCK_D != HEAD_D:  # invalid block ids still address block 0 (in bounds), see paged_block_lookup
        k = tl.load(k_base + k_tok[:, None] + offs_d[None, :] * s_kd, mask=d_ok[None, :])
    else:
        k = tl.load(k_base + k_tok[:, None] + offs_d[None, :] * s_kd)
    if BLOCK_D != HEAD_D:  # padded head dims must be 0 (0 * NaN); invalid keys are masked below
        k = tl.where(d_ok[None, :], k.to(CDT), 0.0).to(CDT)
    else:
        k = k.to(CDT)
    s = tl.dot(q, tl.trans(k))
    if MASKED:
        keep = row_ok[:, None] & valid[None, :] & (tok[None, :] <= qpos[:, None])
        if USE_WINDOW:
            keep = keep & ((qpos[:, None] - tok[None, :]) < sliding_window)
    if USE_SOFTCAP or HAS_ALIBI or HAS_QQ:
        # score modifiers act on scaled scores: scale first, then log2 units
        s = s * qk_scale
        if USE_SOFTCAP:
            s = ta.softcap_scores(s, softcap)
        rel = tok - ctx
        if HAS_ALIBI:
            s = s + slope[:, None] * rel[None, :].to(tl.float32)
        if HAS_QQ:
            qq_ok = (keep if MASKED else row_ok[:, None]) & (rel[None, :] >= 0)
            s = s + tl.load(qq_ptr + qt[:, None].to(tl.int64) * s_qq + rel[None, :], mask=qq_ok,
                            other=0.0).to(tl.float32)
        s_scale = 1.4426950408889634
    else:
        # plain scores: the scale rides in the exponent's FMA (one op per score instead of three)
        s_scale = qk_scale * 1.4426950408889634
    if MASKED:
        s = tl.where(keep, s, float("-inf"))
    else:  # every key is in every row's range; a bad block id is still skipped (one select a score)
        s = tl.where(valid[None, :], s, float("-inf"))
    m_new, alpha, p, l_new = ta.online_softmax_step_scaled(m_i, l_i, s, s_scale)
    if MASKED:
        v = tl.load(v_base + v_tok[:, None] + offs_d[None, :] * s_vd, mask=valid[:, None] & d_ok[None, :])
        # masked lanes are undefined (NaN bits possible for fp8): zero them, P is 0 there anyway
        v = tl.where(valid[:, None] & d_ok[None, :], v.to(CDT), 0.0).to(CDT)
        pv = tl.dot(p.to(CDT), v)
        # NaN policy: a key a row does not see must not reach it as 0 x NaN (or 0 x inf). Only
        # tiles with a non-finite V value pay: rows that see one keep the IEEE product, the
        # others take the product with those values zeroed.
        bad = (v != v) | (tl.abs(v.to(tl.float32)) == float("inf"))
        if tl.max(tl.max(bad.to(tl.int32), 1), 0) > 0:
            seen = tl.dot(keep.to(CDT), bad.to(CDT))
            pv = tl.where(seen > 0, pv, tl.dot(p.to(CDT), tl.where(bad, 0.0, v).to(CDT)))
    else:
        # invalid block ids address a clamped block (in bounds): their V rows load as 0
        if BLOCK_D != HEAD_D:
            v = tl.load(v_base + v_tok[:, None] + offs_d[None, :] * s_vd, mask=valid[:, None] & d_ok[None, :],
                        other=0.0)
            v = tl.where(d_ok[None, :], v.to(CDT), 0.0).to(CDT)
        else:
            v = tl.load(v_base + v_tok[:, None] + offs_d[None, :] * s_vd, mask=valid[:, None], other=0.0).to(CDT)
        pv = tl.dot(p.to(CDT), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_new


@triton.jit
def unified_attn_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, seqused_ptr, bt_ptr,
    sinks_ptr, alibi_ptr, qq_ptr, qdesc_ptr, kdesc_ptr, vdesc_ptr, oscale_ptr,
    so_ptr, sm_ptr, ss_ptr,
    num_seqs, num_tokens, max_seqlen_q, qlen_lo, qlen_hi, num_logical_blocks, num_phys_blocks,
    s_qt, s_qh, s_ot, s_oh,
    s_kblk, s_ktok, s_kh, s_vblk, s_vtok, s_vh,
    s_bt, s_qq,
    s_sot, s_soh, s_sos, s_smt, s_smh, s_sms,
    softmax_scale, softcap, sliding_window,
    HEAD_D: tl.constexpr, BLOCK_D: tl.constexpr, GROUP: tl.constexpr, GROUP_P2: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, TILE_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    # innermost strides as constants so the compiler sees the contiguous axis (vector loads)
    s_qd: tl.constexpr, s_od: tl.constexpr, s_kd: tl.constexpr, s_vd: tl.constexpr,
    CDT: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_QQ: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_QDESC: tl.constexpr, HAS_KVDESC: tl.constexpr,
    HAS_OSCALE: tl.constexpr, OUT_FP8_MAX: tl.constexpr, NUM_SEGMENTS: tl.constexpr, BLOCKS_PER_SEQ: tl.constexpr,
    OFFSET_BITS: tl.constexpr, SAME_KV_OFFSETS: tl.constexpr,
):
    # query blocks on axis 0: the only axis allowed more than 65535 programs
    qblock = tl.program_id(0)
    kvh = tl.program_id(1)
    seg = tl.program_id(2)

    # cu_seqlens_q entries are clamped into [0, num_tokens] (an empty or reversed range: nothing)
    if BLOCKS_PER_SEQ > 0:  # a fixed number of query blocks per sequence, no search
        seq = qblock // BLOCKS_PER_SEQ
        q_begin = _clamp_row(tl.load(cu_q_ptr + seq), num_tokens)
        qlen = _clamp_row(tl.load(cu_q_ptr + seq + 1), num_tokens) - q_begin
        local = qblock % BLOCKS_PER_SEQ
    else:
        seq = _find_seq(cu_q_ptr, qblock, num_seqs, num_tokens, BLOCK_Q)
        q_begin = _clamp_row(tl.load(cu_q_ptr + seq), num_tokens)
        qlen = _clamp_row(tl.load(cu_q_ptr + seq + 1), num_tokens) - q_begin
        local = qblock - (q_begin // BLOCK_Q + seq)
    if (local * BLOCK_Q >= qlen) | (qlen <= qlen_lo) | (qlen > qlen_hi):
        return
    # the KV length is clamped into [0, what the block table holds]
    kv_len = tl.minimum(tl.maximum(tl.load(seqused_ptr + seq), 0), num_logical_blocks * KV_BLOCK)
    ctx = kv_len - qlen

    offs_m = tl.arange(0, BLOCK_M)
    qt = local * BLOCK_Q + offs_m // GROUP_P2
    in_group = offs_m % GROUP_P2
    store_ok = (qt < qlen) & (in_group < GROUP)
    # rows at or past max_seqlen_q (a bound smaller than the sequence) are not computed: flagged NaN
    qlim = tl.minimum(qlen, max_seqlen_q)
    row_ok = (qt < qlim) & (in_group < GROUP)
    head = kvh * GROUP + in_group
    qpos = ctx + qt
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    q_rows = (q_begin + qt).to(tl.int64)
    if BLOCKS_PER_SEQ > 0:
        # rows past the fixed blocks of a sequence (more new tokens than max_seqlen_q allows)
        if (local == BLOCKS_PER_SEQ - 1) & (qlen > BLOCKS_PER_SEQ * BLOCK_Q):
            for r0 in range(BLOCKS_PER_SEQ * BLOCK_Q, qlen, BLOCK_Q):
                _flag_rows(out_ptr, so_ptr, sm_ptr, ss_ptr, (q_begin + r0 + offs_m // GROUP_P2).to(tl.int64), head,
                           (r0 + offs_m // GROUP_P2 < qlen) & (in_group < GROUP), offs_d, d_ok, s_ot, s_oh, s_od,
                           s_sot, s_soh, s_sos, s_smt, s_smh, s_sms, seg, BLOCK_M, BLOCK_D, NUM_SEGMENTS)
    if local * BLOCK_Q >= qlim:  # every row of the block is past max_seqlen_q
        _flag_rows(out_ptr, so_ptr, sm_ptr, ss_ptr, q_rows, head, store_ok, offs_d, d_ok, s_ot, s_oh, s_od,
                   s_sot, s_soh, s_sos, s_smt, s_smh, s_sms, seg, BLOCK_M, BLOCK_D, NUM_SEGMENTS)
        return
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :])
    q = tl.where(row_ok[:, None] & d_ok[None, :], q.to(CDT), 0.0).to(CDT)

    qk_scale = softmax_scale
    if HAS_QDESC:
        qk_scale = qk_scale * tl.load(qdesc_ptr)
    if HAS_KVDESC:
        qk_scale = qk_scale * tl.load(kdesc_ptr)
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32)
    else:
        slope = 0.0

    if HAS_SINKS:
        sink = tl.load(sinks_ptr + head, mask=row_ok, other=float("-inf")).to(tl.float32)
        if NUM_SEGMENTS > 1:
            sink = tl.where((offs_m * 0 + seg) == 0, sink, float("-inf"))
        m_i = sink * 1.4426950408889634
        l_i = tl.where(sink > float("-inf"), 1.0, 0.0)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    # keys this block can see: causal end of its last row, window start of its first row
    last_q = tl.minimum(local * BLOCK_Q + BLOCK_Q, qlim) - 1
    kv_end = ctx + last_q + 1
    num_tiles = tl.cdiv(kv_end, TILE_N)
    first_tile = 0
    if USE_WINDOW:
        first_tile = tl.maximum(ctx + local * BLOCK_Q - sliding_window + 1, 0) // TILE_N
    if NUM_SEGMENTS > 1:
        per_seg = tl.cdiv(num_tiles - first_tile, NUM_SEGMENTS)
        t_lo = first_tile + seg * per_seg
        t_hi = tl.minimum(t_lo + per_seg, num_tiles)
    else:
        t_lo = first_tile
        t_hi = num_tiles

    bt_row = bt_ptr + seq.to(tl.int64) * s_bt
    if OFFSET_BITS == 32:  # the launcher checked every cache offset fits: int32 address arithmetic
        k_base = k_ptr + kvh * s_kh
        v_base = v_ptr + kvh * s_vh
    else:
        k_base = k_ptr + kvh.to(tl.int64) * s_kh
        v_base = v_ptr + kvh.to(tl.int64) * s_vh
    offs_n = tl.arange(0, TILE_N)
    # Tiles whose every key is visible to every row of the block need no mask: keys at or before
    # the first row's position and, with a window, inside the last row's window. Decode and the
    # body of prefill blocks run there; only the diagonal and window edges pay for the mask.
    full_hi = (ctx + local * BLOCK_Q + 1) // TILE_N
    if USE_WINDOW:
        full_lo = tl.cdiv(tl.maximum(ctx + last_q - sliding_window + 1, 0), TILE_N)
        mid_lo = tl.minimum(tl.maximum(full_lo, t_lo), t_hi)
        for t in range(t_lo, mid_lo):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, t, offs_n, offs_d, d_ok, bt_row, num_logical_blocks, num_phys_blocks, kv_end,
                k_base, v_base, s_kblk, s_ktok, s_vblk, s_vtok, qk_scale, softcap, row_ok, qt, qpos, ctx,
                sliding_window, slope, qq_ptr, s_qq, HEAD_D, BLOCK_D, TILE_N, KV_BLOCK, s_kd, s_vd, CDT, USE_SOFTCAP,
                USE_WINDOW, HAS_ALIBI, HAS_QQ, True, OFFSET_BITS, SAME_KV_OFFSETS)
    else:
        mid_lo = t_lo
    mid_hi = tl.minimum(tl.maximum(full_hi, mid_lo), t_hi)
    for t in range(mid_lo, mid_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, t, offs_n, offs_d, d_ok, bt_row, num_logical_blocks, num_phys_blocks, kv_end,
            k_base, v_base, s_kblk, s_ktok, s_vblk, s_vtok, qk_scale, softcap, row_ok, qt, qpos, ctx,
            sliding_window, slope, qq_ptr, s_qq, HEAD_D, BLOCK_D, TILE_N, KV_BLOCK, s_kd, s_vd, CDT, USE_SOFTCAP,
            USE_WINDOW, HAS_ALIBI, HAS_QQ, False, OFFSET_BITS, SAME_KV_OFFSETS)
    for t in range(mid_hi, t_hi):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, t, offs_n, offs_d, d_ok, bt_row, num_logical_blocks, num_phys_blocks, kv_end,
            k_base, v_base, s_kblk, s_ktok, s_vblk, s_vtok, qk_scale, softcap, row_ok, qt, qpos, ctx,
            sliding_window, slope, qq_ptr, s_qq, HEAD_D, BLOCK_D, TILE_N, KV_BLOCK, s_kd, s_vd, CDT, USE_SOFTCAP,
            USE_WINDOW, HAS_ALIBI, HAS_QQ, True, OFFSET_BITS, SAME_KV_OFFSETS)

    o, lse = ta.online_softmax_finalize(acc, m_i, l_i)
    if HAS_KVDESC:
        o = o * tl.load(vdesc_ptr)
    flag = store_ok & (qt >= qlim)  # rows past max_seqlen_q in this block
    if NUM_SEGMENTS == 1:
        if HAS_OSCALE:
            o = o / tl.load(oscale_ptr)
        if OUT_FP8_MAX > 0:
            o = tl.minimum(tl.maximum(o, -OUT_FP8_MAX), OUT_FP8_MAX)
        o = tl.where(flag[:, None], float("nan"), o)
        tl.store(out_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_d[None, :] * s_od,
                 o.to(out_ptr.dtype.element_ty), mask=store_ok[:, None] & d_ok[None, :])
    else:
        # a NaN max or sum (a NaN or inf score the row sees) is stored as a NaN output of weight 1:
        # the merge keeps it (it skips segments whose weight is NaN); flagged rows the same way
        flag = flag | (l_i != l_i)
        seg64 = seg.to(tl.int64)
        tl.store(so_ptr + q_rows[:, None] * s_sot + head[:, None] * s_soh + seg64 * s_sos + offs_d[None, :],
                 tl.where(flag[:, None], float("nan"), o), mask=store_ok[:, None])
        stat = q_rows * s_smt + head * s_smh + seg64 * s_sms
        tl.store(sm_ptr + stat, tl.where(flag, 0.0, m_i * 0.6931471805599453), mask=store_ok)
        tl.store(ss_ptr + stat, tl.where(flag, 1.0, l_i), mask=store_ok)
