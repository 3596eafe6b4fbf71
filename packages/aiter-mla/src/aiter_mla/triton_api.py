"""The block-table forms of ``aiter.ops.triton.attention.mla``: ``mla_decode_fwd`` and
``mla_prefill_fwd`` with ``cu_seqlens_q``, ``seqused_k`` and ``block_tables`` (vLLM style).

Their names collide with ``aiter.mla``'s page-indptr forms in :mod:`aiter_mla.api`, hence this
second module; otherwise they are public functions like those (allocate, call the op
``aiter::mla_attention_block_table``, return what upstream returns).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks, ops
from .triton.launch import choose_num_kv_splits

Tensor = torch.Tensor
F32 = torch.float32

__all__ = ["mla_decode_fwd", "mla_prefill_fwd"]


def _block_table(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                 qk_rope_head_dim, causal, q_descale, kv_descale, max_seqlen_q, num_kv_splits, backend) -> Tensor:
    """``num_kv_splits`` None: automatic (decode); prefill passes 1."""
    partial_o = partial_lse = None
    try:
        total_q, heads, _ = q.shape
        batch = cu_seqlens_q.shape[0] - 1
        if max_seqlen_q is None:
            # decode batches are usually one token per sequence: known from shapes, no sync
            max_seqlen_q = 1 if total_q == batch else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
        if num_kv_splits is None:
            num_kv_splits = choose_num_kv_splits(batch, block_tables.numel() * kv_buffer.shape[1], heads,
                                                 max_seqlen_q, kv_buffer.dtype, kv_lora_rank,
                                                 "mla_attention_block_table")
        if num_kv_splits > 1:
            partial_o = torch.empty(total_q, num_kv_splits, heads, kv_lora_rank, dtype=F32, device=q.device)
            partial_lse = torch.empty(total_q, num_kv_splits, heads, dtype=F32, device=q.device)
    except Exception as exc:
        checks.explain(exc, checks.mla_attention_block_table, q, kv_buffer, out, cu_seqlens_q, seqused_k,
                       block_tables, max_seqlen_q, softmax_scale, kv_lora_rank, qk_rope_head_dim, causal,
                       num_kv_splits, None, None, None, q_descale, kv_descale)
        raise
    ops.mla_attention_block_table(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, max_seqlen_q,
                                  softmax_scale, kv_lora_rank, qk_rope_head_dim, bool(causal), num_kv_splits,
                                  partial_o, partial_lse, None, q_descale, kv_descale, backend)
    return out


def mla_decode_fwd(q: Tensor, kv_buffer: Tensor, out: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                   max_seqlen_kv: int, block_tables: Tensor, softmax_scale: float, kv_lora_rank: int,
                   qk_rope_head_dim: int, causal: bool, q_descale: Optional[Tensor], kv_descale: Optional[Tensor],
                   q_scales: Optional[Tensor] = None, out_scale: Optional[Tensor] = None,
                   shuffled_kv_cache: bool = False, skip_reduce: bool = False, *,
                   max_seqlen_q: Optional[int] = None, num_kv_splits: Optional[int] = None,
                   backend: Optional[str] = None) -> Tensor:
    """Block-table MLA decode: ``q [total_q, H, lora + rope]``, ``kv_buffer [num_blocks,
    block_size, 1, lora + rope]``, ``block_tables [B, max_blocks]`` int32, ``seqused_k [B]``
    keys per sequence, ``cu_seqlens_q [B + 1]``; writes ``out [total_q, H, lora]`` and returns it.

    Extensions: ``max_seqlen_q`` (default: 1 when every sequence has one query token, else read
    from ``cu_seqlens_q`` with a host sync) and ``num_kv_splits`` (default: automatic).
    """
    checks.block_table_options(q_scales, out_scale, shuffled_kv_cache, skip_reduce)
    return _block_table(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                        qk_rope_head_dim, causal, q_descale, kv_descale, max_seqlen_q, num_kv_splits, backend)


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, out: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                    max_seqlen_kv: int, block_tables: Tensor, softmax_scale: float, kv_lora_rank: int,
                    qk_rope_head_dim: int, causal: bool, q_descale: Optional[Tensor], kv_descale: Optional[Tensor],
                    out_scale: Optional[Tensor] = None, shuffled_kv_cache: bool = False, *,
                    max_seqlen_q: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Block-table absorbed MLA prefill (one split, bottom-right causal); same layouts as
    :func:`mla_decode_fwd`."""
    checks.block_table_options(None, out_scale, shuffled_kv_cache, False)
    return _block_table(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                        qk_rope_head_dim, causal, q_descale, kv_descale, max_seqlen_q, 1, backend)
