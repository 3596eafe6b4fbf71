"""Public MLA functions with upstream AITER's names and signatures.

``aiter.mla`` (decode, prefill, the persistent metadata and reduce), ``aiter.ops.cache`` and
``aiter.ops.triton.fusions.fused_kv_cache`` (the MLA cache writes), and SGLang's decode forms of
``aiter.ops.triton.attention.mla_decode_rope`` / ``mla_decode``. The block-table forms of
``aiter.ops.triton.attention.mla``, whose names collide with ``aiter.mla``'s, are in
:mod:`aiter_mla.triton_api`.

Each function allocates what upstream allocates (shapes from its arguments, no host sync),
calls its ``aiter::`` op (:mod:`aiter_mla.ops`, which validates the call in
:mod:`aiter_mla.checks` and runs the ``triton`` or ``reference`` backend; ``backend=`` forces
one) and returns what upstream returns. When the sizes it allocates from cannot be read, the
op's check names the bad argument (:func:`aiter_mla.checks.explain`).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import checks, ops
from .metadata import get_mla_decode_fwd_max_splits, get_mla_metadata_info_v1, get_mla_metadata_v1
from .triton.launch import choose_num_kv_splits

Tensor = torch.Tensor
F32 = torch.float32

__all__ = [
    "mla_decode_fwd",
    "mla_prefill_fwd",
    "mla_prefill_ps_fwd",
    "mla_reduce_v1",
    "get_mla_metadata_info_v1",
    "get_mla_metadata_v1",
    "get_mla_decode_fwd_max_splits",
    "decode_attention_fwd_grouped_rope",
    "decode_attention_fwd",
    "concat_and_cache_mla",
    "fused_qk_rope_concat_and_cache_mla",
    "fused_qk_rope_cat_and_cache_mla",
]


def mla_decode_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                   kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int = 1,
                   nhead_kv: int = 1, sm_scale: Optional[float] = None, logit_cap: float = 0.0,
                   num_kv_splits: Optional[int] = None, num_kv_splits_indptr: Optional[Tensor] = None,
                   work_meta_data: Optional[Tensor] = None, work_indptr: Optional[Tensor] = None,
                   work_info_set: Optional[Tensor] = None, reduce_indptr: Optional[Tensor] = None,
                   reduce_final_map: Optional[Tensor] = None, reduce_partial_map: Optional[Tensor] = None,
                   q_scale: Optional[Tensor] = None, kv_scale: Optional[Tensor] = None,
                   intra_batch_mode: bool = False, return_logits: bool = False, return_lse: bool = False,
                   g_kv_indptr: Optional[Tensor] = None, cp_world_size: int = 1, cp_rank: int = 0,
                   causal: bool = True, *, backend: Optional[str] = None):
    """Absorbed MLA decode over a paged latent cache; writes ``o`` in place.

    ``q [total_q, H, kv_lora_rank + rope]`` (bf16/fp16/fp32, or fp8 with ``q_scale``),
    ``kv_buffer [num_pages, page_size, 1, kv_lora_rank + rope]`` (K = the row, V = its first
    ``kv_lora_rank`` values; fp8 with ``kv_scale``), ``o [total_q, H, kv_lora_rank]``. Any head
    count. Returns ``(logits, lse)``: ``logits`` the fp32 split partials ``[total_q, splits, H,
    kv_lora_rank]`` (``o`` viewed as ``[total_q, 1, H, kv_lora_rank]`` when there is one
    split), ``lse`` ``[total_q, H]`` fp32 when ``return_lse`` else None.

    Persistent mode when ``work_meta_data`` is given (buffers from ``get_mla_metadata_v1``): the
    partial buffers are ``[reduce_partial_map.numel() * max_seqlen_q, 1, H, kv_lora_rank]`` and
    are returned as ``logits``.
    """
    checks.decode_options(nhead_kv, logit_cap, cp_world_size, g_kv_indptr)
    if work_meta_data is not None:
        try:
            total_q, heads, _ = q.shape
            d_v = o.shape[2]
            rows = reduce_partial_map.shape[0] * max_seqlen_q
            partial_o = torch.empty(rows, 1, heads, d_v, dtype=F32, device=q.device)
            partial_lse = torch.empty(rows, 1, heads, 1, dtype=F32, device=q.device)
            lse = torch.empty(total_q, heads, dtype=F32, device=q.device) if return_lse else None
        except Exception as exc:
            checks.explain(exc, checks.mla_decode_fwd_persistent, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices,
                           kv_last_page_lens, max_seqlen_q, page_size, sm_scale, causal, work_indptr, work_info_set,
                           reduce_indptr, reduce_final_map, reduce_partial_map, None, None, None, q_scale, kv_scale)
            raise
        ops.mla_decode_fwd_persistent(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens,
                                      max_seqlen_q, page_size, sm_scale, causal, work_indptr, work_info_set,
                                      reduce_indptr, reduce_final_map, reduce_partial_map, partial_o, partial_lse, lse,
                                      q_scale, kv_scale, backend)
        return partial_o, lse

    try:
        total_q, heads, _ = q.shape
        d_v = o.shape[2]
        if num_kv_splits is None:
            num_kv_splits = choose_num_kv_splits(qo_indptr.shape[0] - 1, kv_indices.shape[0] * page_size, heads,
                                                 max_seqlen_q, kv_buffer.dtype, d_v)
        lse = torch.empty(total_q, heads, dtype=F32, device=q.device) if return_lse else None
        if num_kv_splits > 1:
            logits = torch.empty(total_q, num_kv_splits, heads, d_v, dtype=F32, device=q.device)
            attn_lse = torch.empty(total_q, num_kv_splits, heads, dtype=F32, device=q.device)
        else:
            logits = attn_lse = None
    except Exception as exc:
        checks.explain(exc, checks.mla_decode_fwd, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices,
                       kv_last_page_lens, max_seqlen_q, page_size, sm_scale, causal, num_kv_splits, None, None, None,
                       q_scale, kv_scale)
        raise
    ops.mla_decode_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, page_size,
                       sm_scale, causal, num_kv_splits, logits, attn_lse, lse, q_scale, kv_scale, backend)
    if logits is None:
        logits = o.view(total_q, 1, heads, d_v)
    return logits, lse


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                    kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int,
                    sm_scale: Optional[float] = None, logit_cap: float = 0.0, num_kv_splits: Optional[int] = None,
                    *, causal: bool = True, backend: Optional[str] = None):
    """Absorbed MLA prefill (causal, bottom-right), one split: returns ``(o, lse [total_q, H])``.

    The page size is ``kv_buffer.shape[1]`` (upstream's ASM kernel only takes page size 1).
    """
    checks.prefill_options(logit_cap)
    try:
        lse = torch.empty(q.shape[0], q.shape[1], dtype=F32, device=q.device)
    except Exception as exc:
        checks.explain(exc, checks.mla_prefill_fwd, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices,
                       kv_last_page_lens, max_seqlen_q, sm_scale, causal, None)
        raise
    ops.mla_prefill_fwd(q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, sm_scale,
                        causal, lse, backend)
    return o, lse


def mla_prefill_ps_fwd(Q: Tensor, K: Tensor, V: Tensor, output: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                       kv_page_indices: Tensor, work_indptr: Optional[Tensor], work_info_set: Optional[Tensor],
                       max_seqlen_q: int, is_causal: bool, reduce_indptr: Optional[Tensor] = None,
                       reduce_final_map: Optional[Tensor] = None, reduce_partial_map: Optional[Tensor] = None,
                       softmax_scale: Optional[float] = None, q_scale: Optional[Tensor] = None,
                       k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                       *, backend: Optional[str] = None):
    """Non-absorbed MLA prefill: ``Q [total_q, H, 192]``, ``K [tokens, Hk, 192]``, ``V [tokens,
    Hk, 128]`` (any head dims; GQA ``H % Hk == 0``; 4-D ``[tokens, 1, Hk, D]`` accepted),
    ``kv_page_indices`` the token rows of each sequence (``kv_indptr`` prefix sums), bottom-right
    causal when ``is_causal``; bf16/fp16/fp32 or fp8 with per-tensor scales. Writes ``output
    [total_q, H, Dv]``; returns ``(output, lse [total_q, H])``. The work/reduce arguments are
    accepted for compatibility and not needed (the kernel schedules itself)."""
    try:
        lse = torch.empty(Q.shape[0], Q.shape[1], dtype=F32, device=Q.device)
    except Exception as exc:
        checks.explain(exc, checks.mla_prefill_ps_fwd, Q, K, V, output, qo_indptr, kv_indptr, kv_page_indices,
                       max_seqlen_q, is_causal, softmax_scale, q_scale, k_scale, v_scale, None)
        raise
    ops.mla_prefill_ps_fwd(Q, K, V, output, qo_indptr, kv_indptr, kv_page_indices, max_seqlen_q, bool(is_causal),
                           softmax_scale, q_scale, k_scale, v_scale, lse, backend)
    return output, lse


def mla_reduce_v1(partial_output: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
                  reduce_partial_map: Tensor, max_seqlen_q: int, num_kv_splits: int, final_output: Tensor,
                  final_lse: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """Merge the persistent partials: ``partial_output [slots * max_seqlen_q, 1, H, Dv]`` and
    ``partial_lse [.., 1, H, 1]`` fp32 into ``final_output [total_q, H, Dv]`` (and
    ``final_lse [total_q, H]``), per the reduce maps of ``get_mla_metadata_v1``."""
    ops.mla_reduce_v1(partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map, max_seqlen_q,
                      final_output, final_lse, backend)


def decode_attention_fwd_grouped_rope(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, kv_indptr: Tensor,
                                      kv_indices: Tensor, k_pe_tokens: Optional[Tensor], kv_lora_rank: int,
                                      rotary_dim: int, cos_sin_cache: Optional[Tensor], positions: Optional[Tensor],
                                      attn_logits: Tensor, num_kv_splits: int, sm_scale: float,
                                      logit_cap: float = 0.0, use_rope: bool = False, is_neox_style: bool = False,
                                      config=None, *, backend: Optional[str] = None) -> None:
    """SGLang MLA decode (page size 1): ``q [B, H, lora + rope]``, ``k_buffer [tokens, 1, lora +
    rope]``, ``v_buffer [tokens, 1, lora]`` (usually a view of ``k_buffer``), token-level
    ``kv_indptr [B + 1]`` / ``kv_indices``. Writes ``o [B, H, lora]`` and the split partials
    ``attn_logits [B, H, num_kv_splits, lora + 1]`` (last channel: the split's LSE). With
    ``use_rope``, the first ``rotary_dim`` rope channels of q and of each sequence's last key are
    rotated at ``positions [B]`` (``cos_sin_cache [max_pos, rotary_dim]``: cos half | sin half);
    the rotated last-key rope part is written to ``k_pe_tokens [B, (1,) rope]`` and the cache is
    left as is. ``logit_cap > 0`` soft-caps the scores. ``config`` is accepted and ignored."""
    ops.decode_attention_fwd_grouped_rope(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens, kv_lora_rank,
                                          rotary_dim, cos_sin_cache, positions, attn_logits, num_kv_splits, sm_scale,
                                          logit_cap, bool(use_rope), bool(is_neox_style), backend)


def decode_attention_fwd(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, lse: Optional[Tensor],
                         req_to_token: Tensor, b_seq_len: Tensor, attn_logits: Tensor, num_kv_splits: int,
                         sm_scale: float, page_size: int = 1, logit_cap: float = 0.0, k_scale: Optional[Tensor] = None,
                         v_scale: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """SGLang decode: ``q [B, H, Dk]``, ``k_buffer [tokens, Hk, Dk]``, ``v_buffer [tokens, Hk, Dv]``
    (GQA ``H % Hk == 0``; MLA: ``v_buffer`` a view of ``k_buffer[..., :Dv]``, read once), key ``j``
    of request ``b`` at token row ``req_to_token[b, j // page_size] * page_size + j % page_size``
    for ``j < b_seq_len[b]``. Writes ``o [B, H, Dv]``, ``lse [B, H]`` (when given) and the split
    partials ``attn_logits [B, H, num_kv_splits, Dv (+ 1)]`` (with the extra channel: each split's
    LSE). fp8 caches: per-tensor ``k_scale`` / ``v_scale``; ``logit_cap > 0`` soft-caps."""
    try:
        # without an LSE channel in attn_logits the split LSEs go to a scratch buffer
        attn_lse = None
        if attn_logits.shape[3] != v_buffer.shape[2] + 1:
            attn_lse = torch.empty(q.shape[0], q.shape[1], num_kv_splits, dtype=F32, device=q.device)
    except Exception as exc:
        checks.explain(exc, checks.decode_attention_fwd, q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len,
                       attn_logits, None, num_kv_splits, sm_scale, page_size, logit_cap, k_scale, v_scale)
        raise
    ops.decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, attn_logits, attn_lse,
                             num_kv_splits, sm_scale, page_size, logit_cap, k_scale, v_scale, backend)


def concat_and_cache_mla(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_cache_dtype: str,
                         scale: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """``kv_cache[slot // bs, slot % bs] = cat(kv_c[t], k_pe[t])`` (fp8 cache: ``/ scale``); slots
    < 0 are skipped. ``kv_c [T, kv_lora_rank]``, ``k_pe [T, rope]`` (or ``[T, 1, rope]``),
    ``kv_cache [num_blocks, block_size, (1,) kv_lora_rank + rope]``, ``slot_mapping [T]``
    int32/int64."""
    ops.concat_and_cache_mla(kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, scale, backend)


def fused_qk_rope_concat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                       q_out: Tensor, slot_mapping: Tensor, k_scale: Optional[Tensor],
                                       q_scale: Optional[Tensor], positions: Tensor, cos_cache: Tensor,
                                       sin_cache: Tensor, is_neox: bool, is_nope_first: bool,
                                       compute_all_q_rope: bool = False, *, backend: Optional[str] = None) -> None:
    """RoPE on ``q_pe [T, H, rope]`` and ``k_pe [T, (1,) rope]`` at ``positions [T]``;
    ``q_out [T, H, lora + rope] = cat(q_nope, rope(q_pe))`` (pe first unless ``is_nope_first``;
    fp8 ``q_out``: ``/ q_scale``); cache row of token ``t`` = ``cat(kv_c, rope(k_pe))`` in the same
    order (fp8 cache: ``/ k_scale``). RoPE tables ``[max_pos, rope/2]`` (or full ``rope`` width),
    ``is_neox`` halves or interleaved pairs. ``compute_all_q_rope`` is accepted (every token is
    rotated)."""
    ops.fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale, q_scale,
                                           positions, cos_cache, sin_cache, bool(is_neox), bool(is_nope_first),
                                           backend)


def fused_qk_rope_cat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, k_nope: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                    slot_mapping: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
                                    k_scale: Optional[Tensor], is_neox: bool, num_decode_toks_for_zeros: int = 0,
                                    apply_scale: bool = True, q_out: Optional[Tensor] = None,
                                    decode_q_pe_out: Optional[Tensor] = None, k_pe_out: Optional[Tensor] = None,
                                    q_out_dtype: Optional[torch.dtype] = None, shuffled_kv_cache: bool = False,
                                    upcast_operand: bool = False, *, backend: Optional[str] = None):
    """RoPE + concat + cache write (slot = cache row, page size 1).

    ``q_nope/q_pe [B, QH, D1|D2]`` (positions ``pos[:B]``), ``k_nope/k_pe [B_slot, KH, D1|D2]``
    (positions ``pos[:B_slot]``), ``kv_cache [rows, KH, D1 + D2]``. Returns ``(q_out [B, QH,
    D1 + D2], decode_q_pe_out, k_pe_out [B_slot, KH, D2], q_nope_zeros_out)``: ``q_out =
    cat(q_nope, rope(q_pe))`` (dtype ``q_out_dtype`` or q_nope's), ``decode_q_pe_out`` (written
    when given: ``rope(q_pe)`` of its first rows), ``k_pe_out = rope(k_pe)`` (allocated when not
    given), ``q_nope_zeros_out`` zeros ``[num_decode_toks_for_zeros, QH, D1]`` (None when 0).
    fp8 caches store ``x / k_scale`` when ``apply_scale``. RoPE runs in fp32 (``upcast_operand``
    is accepted)."""
    checks.rope_cat_options(shuffled_kv_cache)
    try:
        batch, q_heads, d1 = q_nope.shape
        if q_out is None:
            q_out = torch.empty(batch, q_heads, d1 + q_pe.shape[2], dtype=q_out_dtype or q_nope.dtype,
                                device=q_nope.device)
        if k_pe_out is None:
            k_pe_out = torch.empty_like(k_pe)
        zeros = None
        if num_decode_toks_for_zeros > 0:
            zeros = torch.empty(num_decode_toks_for_zeros, q_heads, d1, dtype=q_nope.dtype, device=q_nope.device)
    except Exception as exc:
        checks.explain(exc, checks.fused_qk_rope_cat_and_cache_mla, q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping,
                       pos, cos, sin, k_scale, is_neox, apply_scale, q_out, k_pe_out, decode_q_pe_out, None)
        raise
    ops.fused_qk_rope_cat_and_cache_mla(q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin, k_scale,
                                        bool(is_neox), bool(apply_scale), q_out, k_pe_out, decode_q_pe_out, zeros,
                                        backend)
    return q_out, decode_q_pe_out, k_pe_out, zeros
