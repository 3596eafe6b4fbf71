"""One Triton kernel family for paged attention: decode (v1 and v2 split-K), MTP and prefill.

A program handles one sequence, one KV head, one tile of query rows and one KV partition. Its
``BLOCK_M`` query rows are (query token, query head of this KV head) pairs,
``row = token * GQA + head_in_group``, so every GQA ratio and MTP length feeds ``tl.dot`` with at
least 16 rows. Keys come from the paged cache (any layout, through aiter_core.triton_attn's
address formula) and, for prefill, from a contiguous ``new_k/new_v`` segment that follows the
cached tokens.

Positions: with ``HAS_NEW`` (prefill) query token ``i`` of a sequence sits at position
``ctx + i`` and attends to the ``ctx`` cached tokens plus new tokens ``0..i``; without it (decode
/ MTP) it sits at ``ctx - qlen + i`` and attends causally to the cache. Scores are
``scale * q.k * k_scale``, then the soft cap, then ALiBi ``slope * (kpos - qpos)``; a sliding
window ``w > 0`` keeps keys with ``qpos - kpos < w``.

Quantized KV: K and V tiles are converted (not scaled) to a 16-bit type for the dots, which is
exact for fp8/int8/int4; per-token scales multiply the score columns (K) and the probabilities (V),
per-tensor / per-head scales fold into the softmax scale (K) and the output (V). ``KV_FP16`` makes
that type fp16 whatever the query's (the launcher sets it for bf16 queries on an 8-bit cache):
sm_90 converts e4m3 pairs to fp16 directly while bf16 takes an extra pass through fp32
(benchmarks/probes/sass_fp8_dots.py: the fp8 decode kernel loses its 128 F2F + 128 HADD2, 4120 ->
3816 SASS instructions), and fp16 keeps 3 more mantissa bits of P. The query is clamped to fp16's
range and rounded to fp16 (every bf16 value between 6e-5 and 65504 is exact there); per-token V
scales are divided by their tile maximum first so ``p * scale`` stays clear of fp16 subnormals.
``HIGH_PREC`` picks how the probabilities meet V (only different for 8-bit fp V):
0 = P cast to V's fp8 type and an fp8 PV dot (per-token V scales are normalised by the tile max
first; P is scaled by 256 into fp8's normal range and the softmax sums use the rounded P);
1 = P and V in that 16-bit type; 2 = P and dequantized V in fp32 with an IEEE fp32 dot.

Addresses: ``OFFSET_BITS`` 32 when every element of both caches is within ``2**31`` of its data
pointer (the launcher checks the shapes and strides), else 64.

Split-K (``SPLIT``): program ``part`` covers keys ``[part * PART, (part+1) * PART)`` and writes the
normalised partial output, its running max (natural log) and exp-sum; aiter_core's
``splitk_merge`` combines them (an empty partition writes sum 0 and is never read).
"""

from __future__ import annotations

import triton
import triton.language as tl

from aiter_core import triton_attn as ta


@triton.jit
def _paged_attn_kernel(
    out_ptr, q_ptr, k_ptr, v_ptr, bt_ptr, ctx_ptr, qo_ptr, kv_indptr_ptr, last_ptr,
    ks_ptr, vs_ptr, alibi_ptr, nk_ptr, nv_ptr, mask_ptr, mask_indptr_ptr,
    po_ptr, pmax_ptr, psum_ptr,
    s_qt, s_qh, s_qd, s_ot, s_oh, s_od,
    s_bt, num_logical_blocks, num_phys_blocks, max_ctx,
    s_kblk, s_kh, s_vblk, s_vh,
    s_ksblk, s_ksh, s_kstok, s_vsblk, s_vsh, s_vstok,
    s_nkt, s_nkh, s_nkd, s_nvt, s_nvh, s_nvd,
    s_pot, s_poh, s_pop, s_pod, s_pmt, s_pmh, s_pmp,
    sm_scale, softcap, window, part_tokens, max_qlen, total_q,
    GQA: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr, HEAD_DV: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    K_TX: tl.constexpr, K_CX: tl.constexpr, V_TX: tl.constexpr, V_CX: tl.constexpr,
    # strides inside a block are compile-time constants: the compiler then sees which axis is
    # contiguous and issues 16-byte loads (Triton does not specialise integer arguments equal to 1)
    s_kt_hi: tl.constexpr, s_kt_lo: tl.constexpr, s_kc_hi: tl.constexpr, s_kc_lo: tl.constexpr,
    s_vt_hi: tl.constexpr, s_vt_lo: tl.constexpr, s_vc_hi: tl.constexpr, s_vc_lo: tl.constexpr,
    QUANT_K: tl.constexpr, QUANT_V: tl.constexpr, HIGH_PREC: tl.constexpr, V_FP8: tl.constexpr,
    QO_MODE: tl.constexpr, KV_MODE: tl.constexpr, HAS_NEW: tl.constexpr, CAUSAL: tl.constexpr,
    NEW_CAUSAL: tl.constexpr, SKIP_DECODE: tl.constexpr, PHYS_GROUP: tl.constexpr,
    HAS_MASK: tl.constexpr, MASK_PREFIX: tl.constexpr,
    # q/k head dims that are not a power of two run as two chunks, HEAD_D (a power of two) plus
    # HEAD_D2 (MLA's 576 = 512 + 64, 192 = 128 + 64): two dots instead of one padded to 1024 / 256
    HEAD_D2: tl.constexpr, BLOCK_D2: tl.constexpr,
    HAS_ALIBI: tl.constexpr, USE_SOFTCAP: tl.constexpr, USE_WINDOW: tl.constexpr, SPLIT: tl.constexpr,
    KV_FP16: tl.constexpr, OFFSET_BITS: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    mt = tl.program_id(2)  # (partition, query-row tile) folded into one grid axis
    num_m_tiles = tl.cdiv(max_qlen * GQA, BLOCK_M)
    part = mt // num_m_tiles
    mt = mt % num_m_tiles

    # -- sequence geometry ------------------------------------------------------------------------
    # Index metadata is clamped on the device (int32 from here on, whatever the index dtype): row
    # offsets into [0, total_q] (the packed query's rows), page offsets into [0, num_logical_blocks]
    # (the page list's length), lengths into what the tables hold; an empty range produces nothing.
    if QO_MODE == 1:  # query rows from qo_indptr
        q0 = tl.minimum(tl.maximum(tl.load(qo_ptr + seq), 0), total_q).to(tl.int32)
        q1 = tl.minimum(tl.maximum(tl.load(qo_ptr + seq + 1), q0), total_q).to(tl.int32)
        qlen_all = q1 - q0
        qlen = tl.minimum(qlen_all, max_qlen)
    else:  # fixed max_qlen rows per sequence
        q0 = seq * max_qlen
        qlen = max_qlen
    if KV_MODE == 1:  # ragged pages: kv_indptr + page indices + last page lengths
        page0 = tl.minimum(tl.maximum(tl.load(kv_indptr_ptr + seq), 0), num_logical_blocks).to(tl.int32)
        npages = tl.minimum(tl.maximum(tl.load(kv_indptr_ptr + seq + 1), page0), num_logical_blocks).to(tl.int32) - page0
        last = tl.minimum(tl.maximum(tl.load(last_ptr + seq), 0), KV_BLOCK).to(tl.int32)
        ctx = tl.where(npages > 0, (npages - 1) * KV_BLOCK + last, 0)
        bt_row = bt_ptr + page0
        nlog = npages
    elif KV_MODE == 2:  # page size 1 token lists: kv_indptr + token indices
        page0 = tl.minimum(tl.maximum(tl.load(kv_indptr_ptr + seq), 0), num_logical_blocks).to(tl.int32)
        ctx = tl.minimum(tl.maximum(tl.load(kv_indptr_ptr + seq + 1), page0), num_logical_blocks).to(tl.int32) - page0
        bt_row = bt_ptr + page0
        nlog = ctx
    else:
        ctx = tl.minimum(tl.maximum(tl.load(ctx_ptr + seq), 0), max_ctx).to(tl.int32)
        bt_row = bt_ptr + seq.to(tl.int64) * s_bt
        nlog = num_logical_blocks

    offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
    qt = offs_m // GQA
    head = kvh * GQA + offs_m % GQA
    row_ok = qt < qlen
    if SKIP_DECODE:  # chunked prefill: single-token sequences are left to the decode path
        row_ok = row_ok & ((qt * 0 + qlen) > 1)
    if HAS_NEW:
        qpos = ctx + qt
    else:
        qpos = ctx - qlen + qt

    if HAS_MASK:
        # custom mask (extend): row r of a sequence is [ctx + qlen] flags, from mask_indptr[seq]
        mask_row = tl.load(mask_indptr_ptr + seq).to(tl.int64) + qt.to(tl.int64) * (ctx + qlen)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_D
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DV
    q_rows = (q0 + qt).to(tl.int64)
    q = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d[None, :] * s_qd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    if HEAD_D2 > 0:
        offs_d2 = HEAD_D + tl.arange(0, BLOCK_D2)
        d2_ok = offs_d2 < HEAD_D + HEAD_D2
        q2 = tl.load(q_ptr + q_rows[:, None] * s_qt + head[:, None] * s_qh + offs_d2[None, :] * s_qd,
                     mask=row_ok[:, None] & d2_ok[None, :], other=0.0)
        kcol2, kshift2 = ta.kv_storage_col(offs_d2, QUANT_K)
        k2_col_off = ta.packed_col_offset(kcol2, K_CX, s_kc_hi, s_kc_lo)
    # cdt: the type cached K/V tiles are converted to and meet the query in; new (prefill) keys
    # always meet the query in its own dtype
    if KV_FP16:
        cdt = tl.float16
        qc = ta.saturate_to_fp16(q)
        if HEAD_D2 > 0:
            q2c = ta.saturate_to_fp16(q2)
    else:
        cdt = q.dtype
        qc = q
        if HEAD_D2 > 0:
            q2c = q2

    # the tile's lowest and highest query positions (which key tiles hold masked pairs)
    qpos_lo = tl.min(tl.where(row_ok, qpos, 1 << 30), 0)
    qpos_hi = tl.max(tl.where(row_ok, qpos, -(1 << 30)), 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    if HAS_ALIBI:
        slope = tl.load(alibi_ptr + head, mask=row_ok, other=0.0).to(tl.float32)

    if QUANT_K == 1 or QUANT_K == 4:
        k_scalar = ta.load_kv_scale(ks_ptr, QUANT_K, kvh, 0, 0, 0, s_ksh, 0, True)
    else:
        k_scalar = 1.0
    if QUANT_V == 1 or QUANT_V == 4:
        v_scalar = ta.load_kv_scale(vs_ptr, QUANT_V, kvh, 0, 0, 0, s_vsh, 0, True)
    else:
        v_scalar = 1.0
    if QUANT_K == 2 or QUANT_K == 3:
        qk_scale = sm_scale
    else:
        qk_scale = sm_scale * k_scalar
    kcol, kshift = ta.kv_storage_col(offs_d, QUANT_K)
    vcol, vshift = ta.kv_storage_col(offs_dv, QUANT_V)
    k_col_off = ta.packed_col_offset(kcol, K_CX, s_kc_hi, s_kc_lo)
    v_col_off = ta.packed_col_offset(vcol, V_CX, s_vc_hi, s_vc_lo)
    # OFFSET_BITS 32 (the launcher checked every cache offset fits): int32 address arithmetic
    if OFFSET_BITS == 32:
        k_base = k_ptr + kvh * s_kh
        v_base = v_ptr + kvh * s_vh
    else:
        k_base = k_ptr + kvh.to(tl.int64) * s_kh
        v_base = v_ptr + kvh.to(tl.int64) * s_vh

    # -- the cached keys of this partition --------------------------------------------------------
    lo = part * part_tokens
    hi = tl.minimum(lo + part_tokens, ctx)
    if USE_WINDOW:
        # the earliest key any row of this tile can see
        first_q = tl.maximum(mt * BLOCK_M // GQA, 0)
        if HAS_NEW:
            lowest = ctx + first_q - window + 1
        else:
            lowest = ctx - qlen + first_q - window + 1
        lo = lo + (tl.maximum(lowest - lo, 0) // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        # Tokens come in groups of PHYS_GROUP that share a physical block (n0 is a multiple of it).
        # Looking the block up per group and telling the compiler so (max_constancy) keeps the
        # token-contiguous V layouts (vllm, shuffled) on vector loads; the per-token validity
        # (tok < hi) only masks scores and zeroes V rows, never the loads themselves.
        tok = tl.max_contiguous(tl.multiple_of(n0 + tl.arange(0, BLOCK_N), PHYS_GROUP), BLOCK_N)
        tok_g = (tok // PHYS_GROUP) * PHYS_GROUP
        phys, _, gvalid = ta.paged_block_lookup(bt_row, tok_g, KV_BLOCK, nlog, num_phys_blocks, tok_g < hi)
        phys = tl.max_constancy(phys, PHYS_GROUP)
        gvalid = tl.max_constancy(gvalid, PHYS_GROUP)
        off = tok % KV_BLOCK
        valid = gvalid & (tok < hi)
        k_tok = ta.paged_token_offset_from_tok(phys, tok, s_kblk, KV_BLOCK, K_TX, s_kt_hi, s_kt_lo, OFFSET_BITS)
        # No token mask on the K/V loads: paged_block_lookup clamps every block id into the pool, so
        # each address is in bounds, and invalid tokens (past the context, padding ids) leave the
        # scores through `keep` and P @ V through the V zeroing below. Dropping the masks took the
        # fp8 decode kernel from 3816 to 3160 SASS instructions (benchmarks/probes/sass_fp8_dots.py).
        # Only padded head-dim columns (a head dim that is not a power of two) are masked.
        if BLOCK_D == HEAD_D:
            kx = tl.load(k_base + k_tok[None, :] + k_col_off[:, None])
        else:
            kx = tl.load(k_base + k_tok[None, :] + k_col_off[:, None], mask=d_ok[:, None])
        if QUANT_K == 3:
            k = ta.kv_to_float(kx, QUANT_K, kshift[:, None]).to(cdt)
        else:
            k = kx.to(cdt)
        s = tl.dot(qc, k)
        if HEAD_D2 > 0:
            if BLOCK_D2 == HEAD_D2:
                k2x = tl.load(k_base + k_tok[None, :] + k2_col_off[:, None])
            else:
                k2x = tl.load(k_base + k_tok[None, :] + k2_col_off[:, None], mask=d2_ok[:, None])
            if QUANT_K == 3:
                k2 = ta.kv_to_float(k2x, QUANT_K, kshift2[:, None]).to(cdt)
            else:
                k2 = k2x.to(cdt)
            s += tl.dot(q2c, k2)
        if QUANT_K == 2 or QUANT_K == 3:
            ksc = ta.load_kv_scale(ks_ptr, QUANT_K, kvh, phys, off, s_ksblk, s_ksh, s_kstok, valid)
            s = s * (ksc * qk_scale)[None, :]
        else:
            s = s * qk_scale
        if USE_SOFTCAP:
            s = ta.softcap_scores(s, softcap)
        rel = tok[None, :] - qpos[:, None]
        if HAS_ALIBI:
            s = s + slope[:, None] * rel.to(tl.float32)
        keep = valid[None, :] & row_ok[:, None]
        if CAUSAL:
            if not HAS_NEW:
                keep = keep & (rel <= 0)
        if USE_WINDOW:
            keep = keep & (rel > -window)
        if HAS_MASK:
            if MASK_PREFIX:
                keep = keep & (tl.load(mask_ptr + mask_row[:, None] + tok[None, :], mask=keep, other=0) != 0)
        s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
        l_prev = l_i
        m_i, alpha, p, l_i = ta.online_softmax_step(m_i, l_i, s)

        v_tok = ta.paged_token_offset_from_tok(phys, tok, s_vblk, KV_BLOCK, V_TX, s_vt_hi, s_vt_lo, OFFSET_BITS)
        if BLOCK_DV == HEAD_DV:
            vx = tl.load(v_base + v_tok[:, None] + v_col_off[None, :])
        else:
            vx = tl.load(v_base + v_tok[:, None] + v_col_off[None, :], mask=dv_ok[None, :])
        # The NaN rule where (row, key) pairs are masked among valid keys (MTP causal, window, custom
        # mask): a key with a non-finite V row is zeroed and the rows that keep it are flagged NaN,
        # so 0 x NaN never reaches a row that does not see it. Plain decode has no such pairs.
        # Only tiles that can hold such pairs pay (the causal diagonal, the window's edge).
        vvalid = valid
        if CAUSAL or USE_WINDOW or (HAS_MASK and MASK_PREFIX):
            rbad = qt < 0
            edge = (HAS_MASK and MASK_PREFIX) or (CAUSAL and n0 + BLOCK_N - 1 > qpos_lo) or (
                USE_WINDOW and n0 <= qpos_hi - window)
            if edge:
                vxf = vx.to(tl.float32)
                vbad = tl.max(((vxf - vxf) != 0.0).to(tl.int32), 1) > 0  # x - x is NaN for NaN and +-inf
                rbad = tl.max((keep & vbad[None, :]).to(tl.int32), 1) > 0
                vvalid = valid & (vbad == 0)
        if QUANT_V == 2 or QUANT_V == 3:
            vsc = ta.load_kv_scale(vs_ptr, QUANT_V, kvh, phys, off, s_vsblk, s_vsh, s_vstok, valid)
        if HIGH_PREC == 0 and V_FP8:
            vz = tl.where(vvalid[:, None], vx.to(tl.float32), 0.0).to(vx.dtype)
            # P (<= 1) goes in as P * 256 (<= 256 < 448): small probabilities stay out of fp8's
            # subnormal range; the power of two adds no rounding. The row sums are taken from the
            # rounded probabilities the dot used, so their 3-bit rounding cancels in the
            # normalisation (with the unrounded sums a peaked row was off by up to ~3%).
            if QUANT_V == 2:
                vmax = tl.max(vsc, 0)
                vmax = tl.where(vmax > 0.0, vmax, 1.0)
                ratio = vsc / vmax
                p8 = (p * (ratio * 256.0)[None, :]).to(vx.dtype)
                pv = tl.dot(p8, vz) * (vmax * 0.00390625)
                # a token with V scale 0 contributes nothing to PV but still its exact p to the sum
                inv = tl.where(ratio > 0.0, 0.00390625 / tl.where(ratio > 0.0, ratio, 1.0), 0.0)
                used = tl.where(ratio[None, :] > 0.0, p8.to(tl.float32) * inv[None, :], p)
            else:
                p8 = (p * 256.0).to(vx.dtype)
                pv = tl.dot(p8, vz) * 0.00390625
                used = p8.to(tl.float32) * 0.00390625
            l_i = l_prev * alpha + tl.sum(used, 1)
        elif HIGH_PREC == 2:
            v = tl.where(vvalid[:, None], ta.kv_to_float(vx, QUANT_V, vshift[None, :]), 0.0)
            if QUANT_V == 2 or QUANT_V == 3:
                v = v * vsc[:, None]
                pv = tl.dot(p, v, input_precision="ieee")
            else:
                pv = tl.dot(p, v, input_precision="ieee")
        else:
            v = tl.where(vvalid[:, None], ta.kv_to_float(vx, QUANT_V, vshift[None, :]), 0.0).to(cdt)
            if QUANT_V == 2 or QUANT_V == 3:
                vmax = tl.max(vsc, 0)
                vmax = tl.where(vmax > 0.0, vmax, 1.0)
                pv = tl.dot((p * (vsc / vmax)[None, :]).to(cdt), v) * vmax
            else:
                pv = tl.dot(p.to(cdt), v)
        acc = acc * alpha[:, None] + pv
        if CAUSAL or USE_WINDOW or (HAS_MASK and MASK_PREFIX):
            acc = tl.where(rbad[:, None], float("nan"), acc)

    # -- new (not yet cached) keys: prefill -------------------------------------------------------
    if HAS_NEW:
        if part == 0:
            if NEW_CAUSAL and not HAS_MASK:
                last_q = tl.minimum((mt * BLOCK_M + BLOCK_M - 1) // GQA + 1, qlen)
            else:
                last_q = qlen
            new_lo = 0
            if USE_WINDOW:
                first_q = mt * BLOCK_M // GQA
                new_lo = (tl.maximum(first_q - window + 1, 0) // BLOCK_N) * BLOCK_N
            for n0 in range(new_lo, last_q, BLOCK_N):
                j = n0 + tl.arange(0, BLOCK_N)
                jv = j < qlen
                rows_j = (q0 + j).to(tl.int64)
                k = tl.load(nk_ptr + rows_j[None, :] * s_nkt + kvh * s_nkh + offs_d[:, None] * s_nkd,
                            mask=jv[None, :] & d_ok[:, None], other=0.0).to(cdt)
                s = tl.dot(q, k)
                if HEAD_D2 > 0:
                    k2 = tl.load(nk_ptr + rows_j[None, :] * s_nkt + kvh * s_nkh + offs_d2[:, None] * s_nkd,
                                 mask=jv[None, :] & d2_ok[:, None], other=0.0).to(cdt)
                    s += tl.dot(q2, k2)
                s = s * sm_scale
                if USE_SOFTCAP:
                    s = ta.softcap_scores(s, softcap)
                rel = (ctx + j)[None, :] - qpos[:, None]
                if HAS_ALIBI:
                    s = s + slope[:, None] * rel.to(tl.float32)
                keep = jv[None, :] & row_ok[:, None]
                if HAS_MASK:  # the custom mask replaces the causal rule, as upstream
                    keep = keep & (tl.load(mask_ptr + mask_row[:, None] + (ctx + j)[None, :], mask=keep, other=0) != 0)
                elif NEW_CAUSAL:
                    keep = keep & (rel <= 0)
                if USE_WINDOW:
                    keep = keep & (rel > -window)
                s = tl.where(keep, s * 1.4426950408889634, float("-inf"))
                m_i, alpha, p, l_i = ta.online_softmax_step(m_i, l_i, s)
                v = tl.load(nv_ptr + rows_j[:, None] * s_nvt + kvh * s_nvh + offs_dv[None, :] * s_nvd,
                            mask=jv[:, None] & dv_ok[None, :], other=0.0)
                if NEW_CAUSAL or USE_WINDOW or HAS_MASK:  # the NaN rule (see the cached loop)
                    nbad = qt < 0
                    edge = HAS_MASK or (NEW_CAUSAL and ctx + n0 + BLOCK_N - 1 > qpos_lo) or (
                        USE_WINDOW and ctx + n0 <= qpos_hi - window)
                    if edge:
                        vf = v.to(tl.float32)
                        vbad = tl.max(((vf - vf) != 0.0).to(tl.int32), 1) > 0
                        nbad = tl.max((keep & vbad[None, :]).to(tl.int32), 1) > 0
                        v = tl.where(vbad[:, None], 0.0, vf).to(v.dtype)
                if HIGH_PREC == 2:
                    pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
                else:
                    pv = tl.dot(p.to(cdt), v.to(cdt))
                # the cache's per-tensor/per-head V scale is applied to acc at the end: undo it here
                acc = acc * alpha[:, None] + pv / v_scalar
                if NEW_CAUSAL or USE_WINDOW or HAS_MASK:
                    acc = tl.where(nbad[:, None], float("nan"), acc)

    # -- epilogue ---------------------------------------------------------------------------------
    if SPLIT:
        o = acc * v_scalar / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        prow = q_rows[:, None] * s_pot + head[:, None] * s_poh + part * s_pop
        tl.store(po_ptr + prow + offs_dv[None, :] * s_pod, o.to(po_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & dv_ok[None, :])
        mrow = q_rows * s_pmt + head * s_pmh + part * s_pmp
        tl.store(pmax_ptr + mrow, m_i * 0.6931471805599453, mask=row_ok)
        tl.store(psum_ptr + mrow, l_i, mask=row_ok)
    else:
        o, _ = ta.online_softmax_finalize(acc, m_i, l_i)
        o = o * v_scalar
        tl.store(out_ptr + q_rows[:, None] * s_ot + head[:, None] * s_oh + offs_dv[None, :] * s_od,
                 o.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & dv_ok[None, :])
    if QO_MODE == 1:
        # rows past max_qlen (a too-small max_input_len / max_len_extend / mtp): flagged NaN, never
        # left unwritten (the last row tile of the sequence writes them)
        if mt == num_m_tiles - 1:
            for r0 in range(max_qlen * GQA, qlen_all * GQA, BLOCK_M):
                r = r0 + tl.arange(0, BLOCK_M)
                x_rows = (q0 + r // GQA).to(tl.int64)
                x_head = kvh * GQA + r % GQA
                x_ok = r < qlen_all * GQA
                nan = tl.full([BLOCK_M, BLOCK_DV], float("nan"), tl.float32)
                if SPLIT:
                    tl.store(po_ptr + x_rows[:, None] * s_pot + x_head[:, None] * s_poh + part * s_pop
                             + offs_dv[None, :] * s_pod, nan.to(po_ptr.dtype.element_ty),
                             mask=x_ok[:, None] & dv_ok[None, :])
                    xm = x_rows * s_pmt + x_head * s_pmh + part * s_pmp
                    tl.store(pmax_ptr + xm, tl.zeros([BLOCK_M], tl.float32), mask=x_ok)
                    tl.store(psum_ptr + xm, tl.full([BLOCK_M], 1.0, tl.float32), mask=x_ok)
                else:
                    tl.store(out_ptr + x_rows[:, None] * s_ot + x_head[:, None] * s_oh + offs_dv[None, :] * s_od,
                             nan.to(out_ptr.dtype.element_ty), mask=x_ok[:, None] & dv_ok[None, :])
