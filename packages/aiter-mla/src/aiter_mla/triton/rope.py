"""RoPE in Triton for MLA, and the SGLang-style grouped decode with in-kernel RoPE.

RoPE is written per element so a rotated segment is produced by one store: element ``j`` of
a rotary segment of width ``ROT`` pairs with ``partner(j)`` and uses frequency ``f(j)``:

* neox: halves, ``partner = j +- ROT/2``, ``f = j % (ROT/2)``;
* interleaved (GPT-J): pairs ``(2i, 2i+1)``, ``partner = j ^ 1``, ``f = j // 2``;

``out_j = x_j * cos_f + sign_j * x_partner * sin_f`` with ``sign = -1`` for the first element
of a pair. Tables are ``[max_pos, ROT/2]`` (frequency ``f``) or full width ``[max_pos, ROT]``
(indexed by ``j``).

The RoPE helper may move to ``aiter_core.triton_attn`` (DESIGN: shared RoPE lives in core).
Kernels only: :mod:`.launch` launches them.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def rope_indices(offs, ROT: tl.constexpr, IS_NEOX: tl.constexpr, COS_FULL: tl.constexpr):
    """(partner index, cos/sin column, sign of the partner term) of elements ``offs``."""
    HALF: tl.constexpr = ROT // 2
    if IS_NEOX:
        first = offs < HALF
        partner = tl.where(first, offs + HALF, offs - HALF)
        freq = offs % HALF
    else:
        first = (offs % 2) == 0
        partner = tl.where(first, offs + 1, offs - 1)
        freq = offs // 2
    if COS_FULL:
        col = offs
    else:
        col = freq
    sign = tl.where(first, -1.0, 1.0)
    return partner, col, sign


@triton.jit
def _rope_decode_kernel(
    Q, stride_qb, stride_qh, QOut, stride_ob, stride_oh,
    KBuf, stride_kt, KPe, stride_kpe,
    kv_indptr, kv_indices, positions, cos_sin, stride_cs,
    num_heads, max_pos, n_indices, n_tokens,
    LORA: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HQ: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Sequence ``program_id(0)``: rotate the first ``ROT`` rope channels of its query heads
    (into ``QOut``) and of its last key (into ``KPe [B, ROPE]``), at ``positions[b]`` clamped
    into ``[0, max_pos)`` (the table's rows). The last key's entry of ``kv_indices`` (``n_indices``
    entries) and its token id (``n_tokens`` rows of ``KBuf``) are read only when in range; a
    skipped last key gives a zero ``KPe`` row (the attention skips that key too)."""
    b = tl.program_id(0)
    pos = tl.minimum(tl.maximum(tl.load(positions + b).to(tl.int64), 0), max_pos - 1)
    offs = tl.arange(0, BLOCK_R)
    ok = offs < ROPE
    partner, col, sign = rope_indices(offs, ROT, IS_NEOX, False)
    rot = offs < ROT
    c = tl.load(cos_sin + pos * stride_cs + col, mask=rot & ok, other=1.0).to(tl.float32)
    s = tl.load(cos_sin + pos * stride_cs + ROT // 2 + col, mask=rot & ok, other=0.0).to(tl.float32)
    for h0 in range(0, num_heads, BLOCK_HQ):
        heads = h0 + tl.arange(0, BLOCK_HQ)
        h_ok = heads < num_heads
        base = Q + b.to(tl.int64) * stride_qb + heads[:, None].to(tl.int64) * stride_qh + LORA
        m = h_ok[:, None] & ok[None, :]
        x = tl.load(base + offs[None, :], mask=m, other=0.0).to(tl.float32)
        xp = tl.load(base + partner[None, :], mask=m & rot[None, :], other=0.0).to(tl.float32)
        y = tl.where(rot[None, :], x * c[None, :] + sign[None, :] * xp * s[None, :], x)
        dst = QOut + b.to(tl.int64) * stride_ob + heads[:, None].to(tl.int64) * stride_oh + LORA + offs[None, :]
        tl.store(dst, y.to(QOut.dtype.element_ty), mask=m)
    p0 = tl.load(kv_indptr + b)
    p1 = tl.load(kv_indptr + b + 1)
    has_keys = p1 > p0
    entry_ok = has_keys & (p1 >= 1) & (p1 <= n_indices)
    last = tl.load(kv_indices + tl.where(entry_ok, p1 - 1, 0), mask=entry_ok, other=-1).to(tl.int64)
    last_ok = (last >= 0) & (last < n_tokens)
    last = tl.where(last_ok, last, 0)
    kok = offs < tl.where(last_ok, ROPE, 0)  # (a scalar & vector mask trips the interpreter)
    kst = offs < tl.where(has_keys, ROPE, 0)
    kbase = KBuf + last * stride_kt + LORA
    x = tl.load(kbase + offs, mask=kok, other=0.0).to(tl.float32)
    xp = tl.load(kbase + partner, mask=kok & rot, other=0.0).to(tl.float32)
    y = tl.where(rot, x * c + sign * xp * s, x)
    tl.store(KPe + b.to(tl.int64) * stride_kpe + offs, y.to(KPe.dtype.element_ty), mask=kst)
