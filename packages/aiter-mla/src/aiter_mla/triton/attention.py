"""The MLA attention kernels: one tile body, three launch forms.

:func:`_mla_tile` attends ``BLOCK_Q`` query tokens x ``BLOCK_H`` query heads of one sequence to
a token range of its paged KV cache. The (token, head) pairs are packed into the M dimension of
``tl.dot`` (row ``m`` = token ``m // BLOCK_H``, head ``m % BLOCK_H``), so every KV row a CTA
loads serves all its heads and MTP tokens: with one latent KV head, the 576-wide rows are read
once per CTA. The row is loaded as two tiles, the ``D_NOPE`` (512) part and the ``D_ROPE`` (64)
part (576 is no power of two); in the absorbed form V is the nope tile itself (no second load).

Launch forms:

* :func:`mla_attn_kernel`: grid ``(batch * q_tiles, head_groups, num_splits)``. With one split
  it writes the final output (and LSE); with several, each split writes its normalised partial
  output and LSE, merged by ``aiter_core.triton_attn.splitk_merge`` (split-K / flash-decoding).
* :func:`mla_attn_persistent_kernel`: grid ``(workers,)``; worker ``w`` runs the work items
  ``work_indptr[w]:work_indptr[w+1]`` of ``work_info_set`` (the 8-int layout of
  :mod:`aiter_mla.metadata`), writing final rows or partial slots; :func:`mla_reduce_kernel`
  merges the slots (``mla_reduce_v1``).

Page addressing (``TABLE_MODE``): 0 = page-level ``kv_indptr``/``kv_indices`` +
``kv_last_page_lens``; 1 = ``block_tables [B, max_blocks]`` + ``seqused_k``; 2 = token-level
``kv_indptr``/``kv_indices`` (page size 1, no last-page lengths). ``SEPARATE_V`` reads V from its
own buffer (non-absorbed prefill, SGLang ``v_buffer``) instead of the nope part of the K row.
Page ids outside ``[0, num_kv_pages)`` are skipped (``aiter_core.triton_attn.paged_block_lookup``),
never read. The online-softmax step and finalisation are aiter_core's as well.
``COMPUTE``: operand type of ``tl.dot`` after loading (0 = as stored, 1 = bf16, 2 = fp16,
3 = fp32): fp8 inputs are upcast in registers, so fp8 KV halves the bytes read; fp8 caches
meet a bf16 query in fp16 (``launch.compute_code``).
"""

from __future__ import annotations

import triton
import triton.language as tl

from aiter_core.triton_attn import (
    online_softmax_finalize,
    online_softmax_step,
    paged_block_lookup,
    saturate_to_fp16,
    softcap_scores,
)

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _upcast(x, COMPUTE: tl.constexpr):
    if COMPUTE == 1:
        x = x.to(tl.bfloat16)
    elif COMPUTE == 2:
        x = x.to(tl.float16)
    elif COMPUTE == 3:
        x = x.to(tl.float32)
    return x


@triton.jit
def _upcast_query(x, COMPUTE: tl.constexpr):
    """Query-side operands (and the rotated last key) may be bf16 where the cache is fp8: fp16
    dots need them clamped to fp16's range, once per CTA."""
    if COMPUTE == 2:
        return saturate_to_fp16(x)
    return _upcast(x, COMPUTE)


@triton.jit
def _kv_tile(KV, stride_kv_page, stride_kv_tok, table, num_pages_seq, num_pages_total, offs_n, kv_hi,
             offs_dn, offs_dr, dn_ok, dr_ok, D_NOPE: tl.constexpr, PAGE_SIZE: tl.constexpr,
             OFFSET_BITS: tl.constexpr):
    """Load the K rows of tokens ``offs_n`` (< kv_hi): (nope tile, rope tile, page, offset, valid).
    ``OFFSET_BITS`` 32: int32 address arithmetic (the launcher checked every offset fits)."""
    page, in_page, n_ok = paged_block_lookup(table, offs_n, PAGE_SIZE, num_pages_seq, num_pages_total, offs_n < kv_hi)
    if OFFSET_BITS == 32:
        page = page.to(tl.int32)
    else:
        in_page = in_page.to(tl.int64)
    k_off = page * stride_kv_page + in_page * stride_kv_tok
    k_nope = tl.load(KV + k_off[:, None] + offs_dn[None, :], mask=n_ok[:, None] & dn_ok[None, :], other=0.0)
    k_rope = tl.load(KV + k_off[:, None] + D_NOPE + offs_dr[None, :], mask=n_ok[:, None] & dr_ok[None, :], other=0.0)
    return k_nope, k_rope, page, in_page, n_ok


@triton.jit
def _attend_step(q_nope, q_rope, k_nope, k_rope, page, in_page, n_ok, offs_n, diag, m_i, l_i, acc,
                 V, stride_v_page, stride_v_tok, offs_dv, dv_ok, kv_len, qk_scale_log2, softcap, last_pe,
                 SEPARATE_V: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE: tl.constexpr, SOFTCAP: tl.constexpr,
                 LAST_ROPE: tl.constexpr, CLEAN_V: tl.constexpr = False):
    """One KV tile of the online softmax: returns the updated (m_i, l_i, acc). ``CLEAN_V``: tiles
    may hold keys masked for some of their rows."""
    k_nope = _upcast(k_nope, COMPUTE)
    k_rope = _upcast(k_rope, COMPUTE)
    if LAST_ROPE:
        k_rope = tl.where((offs_n == kv_len - 1)[:, None], last_pe[None, :].to(k_rope.dtype), k_rope)
    qk = tl.dot(q_nope, tl.trans(k_nope))
    qk = tl.dot(q_rope, tl.trans(k_rope), qk)
    if SOFTCAP:
        qk = softcap_scores(qk * (qk_scale_log2 / LOG2E), softcap) * LOG2E
    else:
        qk = qk * qk_scale_log2
    visible = n_ok[None, :]
    if CAUSAL:
        visible = visible & (offs_n[None, :] <= diag[:, None])
    qk = tl.where(visible, qk, float("-inf"))
    m_i, alpha, p, l_i = online_softmax_step(m_i, l_i, qk)
    if SEPARATE_V:
        v_off = page * stride_v_page + in_page * stride_v_tok
        v = tl.load(V + v_off[:, None] + offs_dv[None, :], mask=n_ok[:, None] & dv_ok[None, :], other=0.0)
        v = _upcast(v, COMPUTE)
    else:
        v = k_nope  # absorbed MLA: V is the first D_V (= D_NOPE) values of the K row
        if CLEAN_V and tl.max(offs_n, 0) > tl.min(diag, 0):
            # a tile holding a key some row cannot see (runtime branch: the other tiles skip it):
            # a masked key's non-finite latent row must not reach the rows that do not see it
            # (p = 0 there, but 0 x NaN = NaN); the rows that see it are NaN already through
            # q.k (the same row is the key), so zeroing it changes no finite result
            v = tl.where(v - v == 0, v, 0.0)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return m_i, l_i, acc


@triton.jit
def _mla_tile(
    Q, stride_qt, stride_qh,
    KV, stride_kv_page, stride_kv_tok,
    V, stride_v_page, stride_v_tok,
    table, num_pages_seq, num_pages_total,
    O, stride_ot, stride_oh, o_row0,
    L, stride_lt, stride_lh,
    q_row0, n_q, q_pos0, qlen, head_lo, num_heads,
    kv_lo, kv_hi, kv_len,
    qk_scale_log2, o_scale, softcap, last_rope,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    SEPARATE_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE: tl.constexpr, WRITE_LSE: tl.constexpr,
    SOFTCAP: tl.constexpr = False, LAST_ROPE: tl.constexpr = False, PREFETCH: tl.constexpr = False,
    OFFSET_BITS: tl.constexpr = 64,
):
    """Attend rows (token, head) of one sequence to keys ``[kv_lo, kv_hi)``; write ``O``/``L``."""
    BLOCK_M: tl.constexpr = BLOCK_H * BLOCK_Q
    offs_m = tl.arange(0, BLOCK_M)
    tok = offs_m // BLOCK_H
    head = head_lo + offs_m % BLOCK_H
    row_ok = (tok < n_q) & (head < num_heads)
    offs_dn = tl.arange(0, BLOCK_DN)
    offs_dr = tl.arange(0, BLOCK_DR)
    offs_dv = tl.arange(0, BLOCK_DV)
    dn_ok = offs_dn < D_NOPE
    dr_ok = offs_dr < D_ROPE
    dv_ok = offs_dv < D_V

    q_off = (q_row0 + tok).to(tl.int64) * stride_qt + head.to(tl.int64) * stride_qh
    q_nope = tl.load(Q + q_off[:, None] + offs_dn[None, :], mask=row_ok[:, None] & dn_ok[None, :], other=0.0)
    q_rope = tl.load(Q + q_off[:, None] + D_NOPE + offs_dr[None, :], mask=row_ok[:, None] & dr_ok[None, :],
                     other=0.0)
    q_nope = _upcast_query(q_nope, COMPUTE)
    q_rope = _upcast_query(q_rope, COMPUTE)

    # Causal: query token i (position q_pos0 + tok in a sequence of qlen) sees keys
    # j <= kv_len - qlen + q_pos0 + tok (bottom-right aligned).
    diag = kv_len - qlen + q_pos0 + tok

    if LAST_ROPE:
        # the last key's rope part comes rotated from last_rope [D_ROPE] (SGLang in-kernel RoPE)
        last_pe = _upcast_query(tl.load(last_rope + offs_dr, mask=dr_ok, other=0.0), COMPUTE)
    else:
        last_pe = q_rope  # unused
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)
    offs_n0 = tl.arange(0, BLOCK_N)
    # NaN rule (absorbed MLA, causal, several query tokens per tile: only then can a loaded key be
    # masked for some rows): see _attend_step
    CLEAN_V: tl.constexpr = CAUSAL and (not SEPARATE_V) and BLOCK_Q > 1
    if PREFETCH:
        # register double buffering: the next tile's loads are issued before this tile's math,
        # so they are in flight while the tensor cores work (Triton's own pipeliner keeps a
        # single shared buffer for a tile read by both dots on the mma.sync path)
        nx_nope, nx_rope, nx_page, nx_in_page, nx_ok = _kv_tile(
            KV, stride_kv_page, stride_kv_tok, table, num_pages_seq, num_pages_total, kv_lo + offs_n0, kv_hi,
            offs_dn, offs_dr, dn_ok, dr_ok, D_NOPE, PAGE_SIZE, OFFSET_BITS)
        for start in range(kv_lo, kv_hi, BLOCK_N):
            k_nope, k_rope, page, in_page, n_ok = nx_nope, nx_rope, nx_page, nx_in_page, nx_ok
            nx_nope, nx_rope, nx_page, nx_in_page, nx_ok = _kv_tile(
                KV, stride_kv_page, stride_kv_tok, table, num_pages_seq, num_pages_total, start + BLOCK_N + offs_n0,
                kv_hi, offs_dn, offs_dr, dn_ok, dr_ok, D_NOPE, PAGE_SIZE, OFFSET_BITS)
            m_i, l_i, acc = _attend_step(
                q_nope, q_rope, k_nope, k_rope, page, in_page, n_ok, start + offs_n0, diag, m_i, l_i, acc,
                V, stride_v_page, stride_v_tok, offs_dv, dv_ok, kv_len, qk_scale_log2, softcap, last_pe,
                SEPARATE_V, CAUSAL, COMPUTE, SOFTCAP, LAST_ROPE, CLEAN_V)
    else:
        for start in range(kv_lo, kv_hi, BLOCK_N):
            k_nope, k_rope, page, in_page, n_ok = _kv_tile(
                KV, stride_kv_page, stride_kv_tok, table, num_pages_seq, num_pages_total, start + offs_n0, kv_hi,
                offs_dn, offs_dr, dn_ok, dr_ok, D_NOPE, PAGE_SIZE, OFFSET_BITS)
            m_i, l_i, acc = _attend_step(
                q_nope, q_rope, k_nope, k_rope, page, in_page, n_ok, start + offs_n0, diag, m_i, l_i, acc,
                V, stride_v_page, stride_v_tok, offs_dv, dv_ok, kv_len, qk_scale_log2, softcap, last_pe,
                SEPARATE_V, CAUSAL, COMPUTE, SOFTCAP, LAST_ROPE, CLEAN_V)

    out, lse = online_softmax_finalize(acc, m_i, l_i)
    out = out * o_scale
    o_off = (o_row0 + tok).to(tl.int64) * stride_ot + head.to(tl.int64) * stride_oh
    tl.store(O + o_off[:, None] + offs_dv[None, :], out.to(O.dtype.element_ty),
             mask=row_ok[:, None] & dv_ok[None, :])
    if WRITE_LSE:
        l_off = (o_row0 + tok).to(tl.int64) * stride_lt + head.to(tl.int64) * stride_lh
        tl.store(L + l_off, lse, mask=row_ok)


@triton.jit
def _seq_kv(b, kv_indptr, kv_indices, kv_last_page_lens, seqused_k, block_tables, stride_bt, table_size,
            PAGE_SIZE: tl.constexpr, TABLE_MODE: tl.constexpr):
    """(tokens of sequence b, pointer to its first page-table entry, entries usable from there).

    ``table_size``: entries of ``kv_indices`` (modes 0, 2) or columns of ``block_tables`` (mode 1);
    an indptr past it (a caller's inconsistent metadata) reads nothing instead of out of bounds."""
    if TABLE_MODE == 1:
        kv_len = tl.load(seqused_k + b)
        table = block_tables + b.to(tl.int64) * stride_bt
        table_left = table_size
    else:
        p0 = tl.load(kv_indptr + b)
        p1 = tl.load(kv_indptr + b + 1)
        if TABLE_MODE == 0:
            last = tl.load(kv_last_page_lens + b)
            kv_len = tl.where(p1 > p0, (p1 - p0 - 1) * PAGE_SIZE + last, 0)
        else:
            kv_len = p1 - p0
        table = kv_indices + p0
        table_left = table_size - p0
    return kv_len, table, table_left


@triton.jit
def _flag_rows(O, stride_ot, stride_oh, L, stride_lt, stride_lh, row_lo, row_hi, head_lo, num_heads, lse_flag,
               BLOCK_H: tl.constexpr, BLOCK_DV: tl.constexpr, D_V: tl.constexpr, WRITE_LSE: tl.constexpr):
    """NaN into output rows ``[row_lo, row_hi)`` (heads ``head_lo ..``) and ``lse_flag`` into their
    LSE: the rows a too-small ``max_seqlen_q`` leaves outside every q tile. Split partials take
    LSE 0 (aiter_core's merge drops a NaN-LSE split, so the NaN output carries the flag through
    it); final outputs take NaN."""
    head = head_lo + tl.arange(0, BLOCK_H)
    offs_dv = tl.arange(0, BLOCK_DV)
    h_ok = head < num_heads
    nan = tl.full([BLOCK_H, BLOCK_DV], float("nan"), dtype=tl.float32)
    for row in range(row_lo, row_hi):
        r = row_lo.to(tl.int64) + (row - row_lo)  # (the interpreter's loop variable is a Python int)
        o_off = r * stride_ot + head.to(tl.int64) * stride_oh
        tl.store(O + o_off[:, None] + offs_dv[None, :], nan.to(O.dtype.element_ty),
                 mask=h_ok[:, None] & (offs_dv < D_V)[None, :])
        if WRITE_LSE:
            tl.store(L + r * stride_lt + head.to(tl.int64) * stride_lh,
                     tl.zeros([BLOCK_H], dtype=tl.float32) + lse_flag, mask=h_ok)


@triton.jit
def mla_attn_kernel(
    Q, stride_qt, stride_qh,
    KV, stride_kv_page, stride_kv_tok, stride_kv_head,
    V, stride_v_page, stride_v_tok, stride_v_head,
    qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, seqused_k, block_tables, stride_bt,
    O, stride_ot, stride_os, stride_oh,
    L, stride_lt, stride_ls, stride_lh,
    q_scale, kv_scale, v_scale, last_rope, stride_last,
    sm_scale, softcap, num_heads, heads_per_kv, num_kv_pages, num_q_tiles, num_splits, table_size, total_q, max_seqlen_q,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr, D_V: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr, BLOCK_DV: tl.constexpr,
    SEPARATE_V: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, TABLE_MODE: tl.constexpr,
    CAUSAL: tl.constexpr, COMPUTE: tl.constexpr, WRITE_LSE: tl.constexpr,
    HAS_Q_SCALE: tl.constexpr, HAS_KV_SCALE: tl.constexpr, HAS_V_SCALE: tl.constexpr,
    SOFTCAP: tl.constexpr, LAST_ROPE: tl.constexpr, PREFETCH: tl.constexpr = False,
    OFFSET_BITS: tl.constexpr = 64,
):
    """Grid form. ``O``/``L`` are the final output (one split) or the split partials
    ``[T, num_splits, H, D_V]`` / ``[T, num_splits, H]`` (``stride_os``/``stride_ls`` per split).
    The q-tile and split counts are runtime values: new batch shapes do not recompile."""
    pid = tl.program_id(0)
    b = pid // num_q_tiles
    q_tile = pid % num_q_tiles
    head_lo = tl.program_id(1) * BLOCK_H
    split = tl.program_id(2)

    q_start = tl.load(qo_indptr + b)
    qlen = tl.load(qo_indptr + b + 1) - q_start
    q_pos0 = q_tile * BLOCK_Q
    # rows past total_q (an inconsistent qo_indptr) are neither read nor written
    n_q = tl.minimum(tl.minimum(tl.minimum(qlen, max_seqlen_q) - q_pos0, BLOCK_Q), total_q - q_start - q_pos0)
    kv_len, table, table_left = _seq_kv(b, kv_indptr, kv_indices, kv_last_page_lens, seqused_k, block_tables,
                                        stride_bt, table_size,
                            PAGE_SIZE, TABLE_MODE)
    hi = kv_len
    if CAUSAL:
        hi = tl.minimum(kv_len, kv_len - qlen + q_pos0 + n_q)
    hi = tl.maximum(hi, 0)
    if TABLE_MODE == 2:
        # SGLang's token-level forms: split s holds keys [s * c, (s + 1) * c), c = cdiv(len, splits),
        # the partition of upstream's attn_logits (a caller reads the partials per split)
        chunk = tl.cdiv(hi, num_splits)
    else:
        chunk = tl.cdiv(tl.cdiv(hi, num_splits), BLOCK_N) * BLOCK_N
    lo = tl.minimum(split * chunk, hi)
    hi = tl.minimum(lo + chunk, hi)
    if n_q <= 0:  # a q tile past this sequence's tokens: nothing to do
        hi = lo

    scale = sm_scale * LOG2E
    o_scale = 1.0
    if HAS_Q_SCALE:
        scale = scale * tl.load(q_scale)
    if HAS_KV_SCALE:
        kv_s = tl.load(kv_scale)
        scale = scale * kv_s
        if not SEPARATE_V:
            o_scale = kv_s
    if HAS_V_SCALE:
        o_scale = tl.load(v_scale)

    kv_head = (head_lo // heads_per_kv).to(tl.int64)
    _mla_tile(
        Q, stride_qt, stride_qh,
        KV + kv_head * stride_kv_head, stride_kv_page, stride_kv_tok,
        V + kv_head * stride_v_head, stride_v_page, stride_v_tok,
        table, tl.minimum(tl.cdiv(kv_len, PAGE_SIZE), table_left), num_kv_pages,
        O + split.to(tl.int64) * stride_os, stride_ot, stride_oh, q_start + q_pos0,
        L + split.to(tl.int64) * stride_ls, stride_lt, stride_lh,
        q_start + q_pos0, n_q, q_pos0, qlen, head_lo, num_heads,
        lo, hi, kv_len,
        scale, o_scale, softcap, last_rope + b.to(tl.int64) * stride_last,
        D_NOPE, D_ROPE, D_V, BLOCK_DN, BLOCK_DR, BLOCK_DV, SEPARATE_V, BLOCK_H, BLOCK_Q, BLOCK_N,
        PAGE_SIZE, CAUSAL, COMPUTE, WRITE_LSE, SOFTCAP, LAST_ROPE, PREFETCH, OFFSET_BITS,
    )
    if q_tile == num_q_tiles - 1:
        # rows past max_seqlen_q (the caller's bound below this sequence's length) are flagged
        # NaN, never left unwritten (issue 11); the loop runs only when the bound is too small
        _flag_rows(O + split.to(tl.int64) * stride_os, stride_ot, stride_oh,
                   L + split.to(tl.int64) * stride_ls, stride_lt, stride_lh,
                   q_start + max_seqlen_q, q_start + tl.minimum(qlen, total_q - q_start), head_lo, num_heads,
                   tl.where(stride_ls != 0, 0.0, float("nan")),
                   BLOCK_H, BLOCK_DV, D_V, WRITE_LSE)


@triton.jit
def mla_attn_persistent_kernel(
    Q, stride_qt, stride_qh,
    KV, stride_kv_page, stride_kv_tok,
    qo_indptr, kv_indptr, kv_indices,
    work_indptr, work_info,
    O, stride_ot, stride_oh,
    L, stride_lt, stride_lh,
    PO, stride_pot, stride_poh,
    PL, stride_plt, stride_plh,
    q_scale, kv_scale,
    sm_scale, num_heads, num_kv_pages, table_size, total_q,
    D_NOPE: tl.constexpr, D_ROPE: tl.constexpr,
    BLOCK_DN: tl.constexpr, BLOCK_DR: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    PAGE_SIZE: tl.constexpr, MAX_Q: tl.constexpr, CAUSAL: tl.constexpr, COMPUTE: tl.constexpr,
    WRITE_LSE: tl.constexpr, HAS_Q_SCALE: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
    OFFSET_BITS: tl.constexpr = 64,
):
    """Persistent form: worker ``program_id(0)`` runs its slice of ``work_info [*, 8]``:
    ``(batch, partial slot or -1, q_start, q_end, kv_page_start, kv_page_end, kv_len,
    head_lo | head_hi << 16)``;
    slot ``p`` holds rows ``p * MAX_Q + t`` of ``PO``/``PL``, ``-1`` writes ``O``/``L`` directly."""
    worker = tl.program_id(0)
    w_lo = tl.load(work_indptr + worker)
    w_hi = tl.load(work_indptr + worker + 1)
    scale = sm_scale * LOG2E
    o_scale = 1.0
    if HAS_Q_SCALE:
        scale = scale * tl.load(q_scale)
    if HAS_KV_SCALE:
        kv_s = tl.load(kv_scale)
        scale = scale * kv_s
        o_scale = kv_s
    for w in range(w_lo, w_hi):
        info = work_info + w * 8
        b = tl.load(info)
        slot = tl.load(info + 1)
        q_lo = tl.load(info + 2)
        q_hi = tl.load(info + 3)
        page_lo = tl.load(info + 4)
        page_hi = tl.load(info + 5)
        kv_len = tl.load(info + 6)
        heads = tl.load(info + 7)
        head_lo = heads & 0xFFFF
        head_hi = tl.minimum(heads >> 16, num_heads)
        seq_q0 = tl.load(qo_indptr + b)
        qlen = tl.load(qo_indptr + b + 1) - seq_q0
        seq_p0 = tl.load(kv_indptr + b)
        n_q = tl.minimum(q_hi - q_lo, total_q - q_lo)
        q_pos0 = q_lo - seq_q0
        lo = tl.minimum((page_lo - seq_p0) * PAGE_SIZE, kv_len)
        hi = tl.minimum((page_hi - seq_p0) * PAGE_SIZE, kv_len)
        if CAUSAL:
            hi = tl.minimum(hi, kv_len - qlen + q_pos0 + n_q)
        hi = tl.maximum(hi, lo)
        if slot < 0:
            _mla_tile(Q, stride_qt, stride_qh, KV, stride_kv_page, stride_kv_tok, KV, stride_kv_page, stride_kv_tok,
                      kv_indices + seq_p0, tl.minimum(tl.cdiv(kv_len, PAGE_SIZE), table_size - seq_p0), num_kv_pages, O, stride_ot, stride_oh, q_lo, L, stride_lt, stride_lh,
                      q_lo, n_q, q_pos0, qlen, head_lo, head_hi, lo, hi, kv_len, scale, o_scale, 0.0, q_scale,
                      D_NOPE, D_ROPE, D_NOPE, BLOCK_DN, BLOCK_DR, BLOCK_DN, False, BLOCK_H, BLOCK_Q, BLOCK_N,
                      PAGE_SIZE, CAUSAL, COMPUTE, WRITE_LSE, False, False, False, OFFSET_BITS)
        else:
            _mla_tile(Q, stride_qt, stride_qh, KV, stride_kv_page, stride_kv_tok, KV, stride_kv_page, stride_kv_tok,
                      kv_indices + seq_p0, tl.minimum(tl.cdiv(kv_len, PAGE_SIZE), table_size - seq_p0), num_kv_pages, PO, stride_pot, stride_poh, slot * MAX_Q, PL, stride_plt, stride_plh,
                      q_lo, n_q, q_pos0, qlen, head_lo, head_hi, lo, hi, kv_len, scale, o_scale, 0.0, q_scale,
                      D_NOPE, D_ROPE, D_NOPE, BLOCK_DN, BLOCK_DR, BLOCK_DN, False, BLOCK_H, BLOCK_Q, BLOCK_N,
                      PAGE_SIZE, CAUSAL, COMPUTE, True, False, False, False, OFFSET_BITS)


@triton.jit
def mla_reduce_kernel(
    PO, stride_pt, stride_ph,
    PL, stride_plt, stride_plh,
    reduce_indptr, reduce_final_map, reduce_partial_map,
    O, stride_ot, stride_oh,
    L, stride_lt, stride_lh,
    num_heads,
    MAX_Q: tl.constexpr, D_V: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_HM: tl.constexpr,
    WRITE_LSE: tl.constexpr,
):
    """``mla_reduce_v1``: tile ``program_id(0)``, token ``program_id(1)`` of the tile, heads block
    ``program_id(2)``. Partial slot ``p`` holds rows ``p * MAX_Q + t``; tiles with no partials
    (written directly by the attention kernel) are left alone."""
    tile = tl.program_id(0)
    t = tl.program_id(1)
    offs_h = tl.program_id(2) * BLOCK_HM + tl.arange(0, BLOCK_HM)
    p0 = tl.load(reduce_indptr + tile)
    p1 = tl.load(reduce_indptr + tile + 1)
    q0 = tl.load(reduce_final_map + tile * 2)
    q1 = tl.load(reduce_final_map + tile * 2 + 1)
    active = (p1 > p0) & (t < q1 - q0)
    h_ok = offs_h < tl.where(active, num_heads, 0)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D_V
    m = tl.full([BLOCK_HM], float("-inf"), dtype=tl.float32)
    denom = tl.zeros([BLOCK_HM], dtype=tl.float32)
    acc = tl.zeros([BLOCK_HM, BLOCK_D], dtype=tl.float32)
    for k in range(p0, p1):
        row = (tl.load(reduce_partial_map + k) * MAX_Q + t).to(tl.int64)
        lse = tl.load(PL + row * stride_plt + offs_h * stride_plh, mask=h_ok, other=float("-inf"))
        m_new = tl.maximum(m, lse)
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_use)
        w = tl.exp(lse - m_use)
        o = tl.load(PO + row * stride_pt + offs_h[:, None] * stride_ph + offs_d[None, :],
                    mask=h_ok[:, None] & d_ok[None, :], other=0.0)
        acc = acc * alpha[:, None] + w[:, None] * o
        denom = denom * alpha + w
        m = m_new
    ok = denom > 0.0
    out = acc / tl.where(ok, denom, 1.0)[:, None]
    dst = (q0 + t).to(tl.int64)
    tl.store(O + dst * stride_ot + offs_h[:, None] * stride_oh + offs_d[None, :], out.to(O.dtype.element_ty),
             mask=h_ok[:, None] & d_ok[None, :])
    if WRITE_LSE:
        lse = tl.where(ok, m + tl.log(tl.where(ok, denom, 1.0)), float("-inf"))
        tl.store(L + dst * stride_lt + offs_h * stride_lh, lse, mask=h_ok)
