"""RoPE in Triton for MLA, and the SGLang-style grouped decode with in-kernel RoPE.

RoPE is written per element so a rotated segment is produced by one store: element ``j`` of
a rotary segment of width ``ROT`` pairs with ``partner(j)`` and uses frequency ``f(j)``:

* neox: halves, ``partner = j +- ROT/2``, ``f = j % (ROT/2)``;
* interleaved (GPT-J): pairs ``(2i, 2i+1)``, ``partner = j ^ 1``, ``f = j // 2``;

``out_j = x_j * cos_f + sign_j * x_partner * sin_f`` with ``sign = -1`` for the first element
of a pair. Tables are ``[max_pos, ROT/2]`` (frequency ``f``) or full width ``[max_pos, ROT]``
(indexed by ``j``).

The RoPE helper may move to ``aiter_core.triton_attn`` (DESIGN: shared RoPE lives in core).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .launch import attention, next_pow2

Tensor = torch.Tensor


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
    num_heads,
    LORA: tl.constexpr, ROPE: tl.constexpr, ROT: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_HQ: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    """Sequence ``program_id(0)``: rotate the first ``ROT`` rope channels of its query heads
    (into ``QOut``) and of its last key (into ``KPe [B, ROPE]``), at ``positions[b]``."""
    b = tl.program_id(0)
    pos = tl.load(positions + b).to(tl.int64)
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
    last = tl.load(kv_indices + tl.maximum(p1 - 1, 0), mask=has_keys, other=0).to(tl.int64)
    kok = offs < tl.where(has_keys, ROPE, 0)  # (a scalar & vector mask trips the interpreter)
    kbase = KBuf + last * stride_kt + LORA
    x = tl.load(kbase + offs, mask=kok, other=0.0).to(tl.float32)
    xp = tl.load(kbase + partner, mask=kok & rot, other=0.0).to(tl.float32)
    y = tl.where(rot, x * c + sign * xp * s, x)
    tl.store(KPe + b.to(tl.int64) * stride_kpe + offs, y.to(KPe.dtype.element_ty), mask=kok)


def rope_for_decode(q: Tensor, k_buffer: Tensor, kv_indptr: Tensor, kv_indices: Tensor, k_pe_tokens: Tensor,
                    kv_lora_rank: int, rotary_dim: int, cos_sin_cache: Tensor, positions: Tensor,
                    is_neox_style: bool) -> tuple[Tensor, Tensor]:
    """(q with its rope part rotated, k_pe_tokens as ``[B, rope]``) for the grouped decode."""
    batch, heads, dim = q.shape
    rope = dim - kv_lora_rank
    q_rot = q.clone()
    k_pe = k_pe_tokens.view(batch, rope)
    _rope_decode_kernel[(batch,)](
        q, q.stride(0), q.stride(1), q_rot, q_rot.stride(0), q_rot.stride(1),
        k_buffer, k_buffer.stride(0), k_pe, k_pe.stride(0),
        kv_indptr, kv_indices, positions, cos_sin_cache, cos_sin_cache.stride(0),
        heads,
        LORA=kv_lora_rank, ROPE=rope, ROT=rotary_dim, BLOCK_R=max(16, next_pow2(rope)), BLOCK_HQ=16,
        IS_NEOX=is_neox_style, num_warps=4,
    )
    return q_rot, k_pe


def grouped_decode(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                   attn_logits: Tensor, kv_lora_rank: int, num_kv_splits: int, sm_scale: float,
                   last_rope: Optional[Tensor], softcap: float = 0.0) -> None:
    """SGLang decode (page size 1, token-level ``kv_indptr``/``kv_indices``): split partials in
    ``attn_logits [B, H, S, lora + 1]`` (``[..., :lora]`` output, ``[..., lora]`` LSE), merged into ``o``."""
    batch = q.shape[0]
    qo_indptr = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    # V shares storage with K's first lora columns (the usual SGLang view): read it from the K row
    same = (v_buffer.data_ptr() == k_buffer.data_ptr() and v_buffer.stride() == k_buffer.stride()
            and v_buffer.shape[-1] == kv_lora_rank)
    partial_o = attn_logits[..., :kv_lora_rank].permute(0, 2, 1, 3)  # [B, S, H, lora]
    partial_lse = attn_logits[..., kv_lora_rank].permute(0, 2, 1)  # [B, S, H]
    attention(q, k_buffer, o, qo_indptr=qo_indptr, max_seqlen_q=1, table_mode=2, page_size=1,
              d_nope=kv_lora_rank, sm_scale=sm_scale, causal=False, kv_indptr=kv_indptr, kv_indices=kv_indices,
              v=None if same else v_buffer, num_splits=num_kv_splits, partial_o=partial_o, always_partials=True,
              partial_lse=partial_lse, softcap=softcap, last_rope=last_rope)
