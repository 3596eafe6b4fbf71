"""Backends of the aiter-mla ops, as registered with ``aiter_core``'s registry, and their adaptors.

Two backends implement every op:

* ``triton`` (priority 100): the kernels in :mod:`aiter_mla.triton`. Runs on CUDA/ROCm devices,
  or on CPU tensors when ``TRITON_INTERPRET=1`` (how CI exercises the kernels).
* ``reference`` (priority 0): :mod:`aiter_mla.reference` in PyTorch, on any device (syncs with
  the host: not for CUDA graphs).

Every adaptor takes the op's arguments as keywords and writes the op's outputs in place (the
ops return nothing; see :mod:`aiter_mla.ops`). Importing this module is cheap (no torch, no
Triton): the entry points only describe.
"""

from __future__ import annotations

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

ATTENTION_OPS = (
    "mla_decode_fwd",
    "mla_decode_fwd_persistent",
    "mla_reduce_v1",
    "mla_prefill_fwd",
    "mla_prefill_ps_fwd",
    "mla_attention_block_table",
    "decode_attention_fwd_grouped_rope",
    "decode_attention_fwd",
)
CACHE_OPS = ("concat_and_cache_mla", "fused_qk_rope_concat_and_cache_mla", "fused_qk_rope_cat_and_cache_mla")
OPS = ATTENTION_OPS + CACHE_OPS
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0

__all__ = ["OPS", "backend_specs", "family", "triton_supports"]


def triton_supports(problem) -> list[str]:
    """Why the Triton kernels cannot run ``problem`` (empty list: they can)."""

    reasons = list(triton_device_reasons(problem.device))
    reasons += triton_dtype_reasons(problem.device, getattr(problem, "dtypes", ()))
    return reasons


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``mla``: every backend of every MLA op."""
    triton = specs_for(OPS, backend="triton", impl="aiter_mla.backends:triton_{op}", priority=TRITON_PRIORITY,
                       available=triton_available, supports=triton_supports, cuda_graph=True,
                       description="Triton MLA kernels (CUDA/ROCm; CPU under TRITON_INTERPRET=1)")
    return triton + reference_specs(OPS, "aiter_mla.backends", priority=REFERENCE_PRIORITY)


family = Family(name="mla", distribution="aiter-mla", smoke="aiter_mla.smoke:run", bench="aiter_mla.bench:main", ops=OPS)


# -- triton adaptors ------------------------------------------------------------------------------


def triton_mla_decode_fwd(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                          page_size, sm_scale, causal, num_kv_splits, logits, attn_lse, final_lse, q_scale, kv_scale):
    from .triton import launch

    launch.attention(
        q, kv_buffer, o, qo_indptr=qo_indptr, max_seqlen_q=max_seqlen_q, table_mode=0, page_size=page_size,
        d_nope=o.shape[-1], sm_scale=sm_scale, causal=causal, kv_indptr=kv_indptr, kv_indices=kv_indices,
        kv_last_page_lens=kv_last_page_lens, lse=final_lse, q_scale=q_scale, kv_scale=kv_scale,
        num_splits=num_kv_splits, partial_o=logits, partial_lse=attn_lse,
    )


def triton_mla_decode_fwd_persistent(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, max_seqlen_q, page_size,
                                     sm_scale, causal, work_indptr, work_info_set, reduce_indptr, reduce_final_map,
                                     reduce_partial_map, partial_o, partial_lse, final_lse, q_scale, kv_scale):
    from .triton import launch

    launch.persistent_attention(
        q, kv_buffer, o, qo_indptr=qo_indptr, kv_indptr=kv_indptr, kv_indices=kv_indices, page_size=page_size,
        d_nope=o.shape[-1], max_seqlen_q=max_seqlen_q, sm_scale=sm_scale, causal=causal, work_indptr=work_indptr,
        work_info_set=work_info_set, partial_o=partial_o, partial_lse=partial_lse, lse=final_lse, q_scale=q_scale,
        kv_scale=kv_scale,
    )
    launch.reduce(partial_o, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map, max_seqlen_q, o,
                  final_lse)


def triton_mla_reduce_v1(*, partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map,
                         max_seqlen_q, final_output, final_lse):
    from .triton import launch

    launch.reduce(partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map, max_seqlen_q,
                  final_output, final_lse)


def triton_mla_prefill_fwd(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                           page_size, sm_scale, causal, lse):
    from .triton import launch

    launch.attention(
        q, kv_buffer, o, qo_indptr=qo_indptr, max_seqlen_q=max_seqlen_q, table_mode=0, page_size=page_size,
        d_nope=o.shape[-1], sm_scale=sm_scale, causal=causal, kv_indptr=kv_indptr, kv_indices=kv_indices,
        kv_last_page_lens=kv_last_page_lens, lse=lse,
    )


def triton_mla_prefill_ps_fwd(*, q, k, v, output, qo_indptr, kv_indptr, kv_page_indices, max_seqlen_q, is_causal,
                              softmax_scale, q_scale, k_scale, v_scale, lse):
    from .triton import launch

    d_rope = min(64, q.shape[-1] // 3)  # the split of the K row into two tiles is free: 192 = 128 + 64
    launch.attention(
        q, k, output, qo_indptr=qo_indptr, max_seqlen_q=max_seqlen_q, table_mode=2, page_size=1,
        d_nope=q.shape[-1] - d_rope, sm_scale=softmax_scale, causal=is_causal, kv_indptr=kv_indptr,
        kv_indices=kv_page_indices, v=v, lse=lse, q_scale=q_scale, kv_scale=k_scale, v_scale=v_scale,
    )


def triton_mla_attention_block_table(*, q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, max_seqlen_q,
                                     softmax_scale, kv_lora_rank, causal, num_splits, partial_o, partial_lse, lse,
                                     q_descale, kv_descale):
    from .triton import launch

    launch.attention(
        q, kv_buffer, out, qo_indptr=cu_seqlens_q, max_seqlen_q=max_seqlen_q, table_mode=1,
        page_size=kv_buffer.shape[1], d_nope=kv_lora_rank, sm_scale=softmax_scale, causal=causal,
        seqused_k=seqused_k, block_tables=block_tables, lse=lse, q_scale=q_descale, kv_scale=kv_descale,
        num_splits=num_splits, partial_o=partial_o, partial_lse=partial_lse,
    )


def triton_decode_attention_fwd_grouped_rope(*, q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens,
                                             kv_lora_rank, rotary_dim, cos_sin_cache, positions, attn_logits,
                                             num_kv_splits, sm_scale, logit_cap, use_rope, is_neox_style):
    from .triton import rope

    q_use, last_override = q, None
    if use_rope:
        q_use, last_override = rope.rope_for_decode(q, k_buffer, kv_indptr, kv_indices, k_pe_tokens, kv_lora_rank,
                                                    rotary_dim, cos_sin_cache, positions, is_neox_style)
    rope.grouped_decode(q_use, k_buffer, v_buffer, o, kv_indptr, kv_indices, attn_logits, kv_lora_rank, num_kv_splits,
                        sm_scale, last_override, softcap=logit_cap)


def _decode_partials(attn_logits, attn_lse, d_v):
    """[B, S, H, Dv] / [B, S, H] views of the SGLang partial buffers ([B, H, S, Dv (+1)], [B, H, S])."""
    partial_o = attn_logits[..., :d_v].permute(0, 2, 1, 3)
    lse_src = attn_logits[..., d_v] if attn_lse is None else attn_lse
    return partial_o, lse_src.permute(0, 2, 1)


def triton_decode_attention_fwd(*, q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, attn_logits, attn_lse,
                                num_kv_splits, sm_scale, page_size, logit_cap, k_scale, v_scale):
    import torch

    from .triton import launch

    partial_o, partial_lse = _decode_partials(attn_logits, attn_lse, o.shape[-1])
    d_nope, absorbed = _decode_split_dims(q, k_buffer, v_buffer)
    k_pages = k_buffer.view(-1, page_size, *k_buffer.shape[1:])  # token rows as [pages, page_size, Hk, D]
    v_pages = None if absorbed else v_buffer.view(-1, page_size, *v_buffer.shape[1:])
    qo_indptr = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    launch.attention(
        q, k_pages, o, qo_indptr=qo_indptr, max_seqlen_q=1, table_mode=1, page_size=page_size, d_nope=d_nope,
        sm_scale=sm_scale, causal=False, seqused_k=b_seq_len, block_tables=req_to_token, v=v_pages, lse=lse,
        kv_scale=k_scale, v_scale=None if absorbed else v_scale, num_splits=num_kv_splits, partial_o=partial_o,
        partial_lse=partial_lse, softcap=logit_cap, always_partials=True,
    )


def _decode_split_dims(q, k_buffer, v_buffer):
    """(width of the first K tile, whether V is K's first columns): the K row is loaded as a
    power-of-two tile plus the rest (576 = 512 + 64, 192 = 128 + 64); V shares K's storage in MLA."""
    dim = q.shape[-1]
    d_nope = 1 << (dim.bit_length() - 1)
    if d_nope == dim and dim >= 32:
        d_nope = dim // 2  # e.g. 128 = 64 + 64: both tiles stay MMA-sized
    absorbed = (v_buffer.data_ptr() == k_buffer.data_ptr() and v_buffer.stride() == k_buffer.stride()
                and v_buffer.shape[-1] == d_nope)
    return d_nope, absorbed


def triton_concat_and_cache_mla(*, kv_c, k_pe, kv_cache, slot_mapping, scale):
    from .triton import cache

    cache.concat_and_cache(kv_c, k_pe, kv_cache, slot_mapping, scale)


def triton_fused_qk_rope_concat_and_cache_mla(*, q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale,
                                              q_scale, positions, cos_cache, sin_cache, is_neox, is_nope_first):
    from .triton import cache

    cache.fused_rope_concat(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale, q_scale, positions,
                            cos_cache, sin_cache, is_neox, is_nope_first)


def triton_fused_qk_rope_cat_and_cache_mla(*, q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin,
                                           k_scale, is_neox, apply_scale, q_out, k_pe_out, decode_q_pe_out,
                                           q_nope_zeros_out):
    from .triton import cache

    cache.fused_rope_cat(q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin, k_scale, is_neox,
                         apply_scale, q_out, k_pe_out, decode_q_pe_out, q_nope_zeros_out)


# -- reference adaptors ---------------------------------------------------------------------------


def _single_split_partials(logits, attn_lse, o32, lse32):
    """Partials of a single-split decomposition: split 0 holds the result, the others nothing."""
    if logits is None:
        return
    logits.zero_()
    logits[:, 0] = o32
    attn_lse.fill_(float("-inf"))
    attn_lse[:, 0] = lse32


def reference_mla_decode_fwd(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                             page_size, sm_scale, causal, num_kv_splits, logits, attn_lse, final_lse, q_scale,
                             kv_scale):
    from .reference import mla_decode_ref

    out, lse = mla_decode_ref(q, kv_buffer, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens,
                              kv_lora_rank=o.shape[-1], page_size=page_size, sm_scale=sm_scale, causal=causal,
                              q_scale=q_scale, kv_scale=kv_scale)
    o.copy_(out)
    if final_lse is not None:
        final_lse.copy_(lse)
    _single_split_partials(logits, attn_lse, out, lse)


def reference_mla_decode_fwd_persistent(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, max_seqlen_q,
                                        page_size, sm_scale, causal, work_indptr, work_info_set, reduce_indptr,
                                        reduce_final_map, reduce_partial_map, partial_o, partial_lse, final_lse,
                                        q_scale, kv_scale):
    """Runs the work items one by one in PyTorch, then the reference reduce."""
    import torch

    from .reference import gather_pages

    scale_q = None if q_scale is None else q_scale.float().reshape(-1)[0]
    scale_kv = None if kv_scale is None else kv_scale.float().reshape(-1)[0]
    qo = qo_indptr.cpu().tolist()
    kp = kv_indptr.cpu().tolist()
    ends = work_indptr.cpu().tolist()
    info = work_info_set.cpu().tolist()
    d_v = o.shape[-1]
    po = partial_o.reshape(partial_o.shape[0], q.shape[1], d_v)
    pl = partial_lse.reshape(partial_lse.shape[0], q.shape[1])
    for w in range(ends[0], ends[-1]):
        b, slot, q_lo, q_hi, page_lo, page_hi, kv_len, heads = info[w]
        h_lo, h_hi = heads & 0xFFFF, min(heads >> 16, q.shape[1])
        lo = min((page_lo - kp[b]) * page_size, kv_len)
        hi = min((page_hi - kp[b]) * page_size, kv_len)
        rows = gather_pages(kv_buffer, kv_indices[kp[b]:kp[b + 1]], kv_len).float()
        if scale_kv is not None:
            rows = rows * scale_kv
        qb = q[q_lo:q_hi, h_lo:h_hi].float()
        if scale_q is not None:
            qb = qb * scale_q
        qlen, pos0 = qo[b + 1] - qo[b], q_lo - qo[b]
        # keys [lo, hi) with the bottom-right causal diagonal of the whole sequence
        s = torch.einsum("qhd,kd->hqk", qb, rows[lo:hi, 0]) * sm_scale
        if causal:
            i = torch.arange(q_hi - q_lo, device=q.device)[:, None] + pos0
            j = torch.arange(lo, hi, device=q.device)[None, :]
            s = s.masked_fill(j > i + kv_len - qlen, float("-inf"))
        lse = torch.logsumexp(s, dim=-1) if hi > lo else torch.full(s.shape[:2], float("-inf"), device=q.device)
        p = torch.nan_to_num(torch.exp(s - torch.where(torch.isinf(lse), 0.0, lse)[..., None]), nan=0.0)
        out = torch.einsum("hqk,kd->qhd", p, rows[lo:hi, 0, :d_v])
        lse = lse.transpose(0, 1)
        if slot < 0:
            o[q_lo:q_hi, h_lo:h_hi] = out.to(o.dtype)
            if final_lse is not None:
                final_lse[q_lo:q_hi, h_lo:h_hi] = lse
        else:
            po[slot * max_seqlen_q: slot * max_seqlen_q + q_hi - q_lo, h_lo:h_hi] = out
            pl[slot * max_seqlen_q: slot * max_seqlen_q + q_hi - q_lo, h_lo:h_hi] = lse
    reference_mla_reduce_v1(partial_output=partial_o, partial_lse=partial_lse, reduce_indptr=reduce_indptr,
                            reduce_final_map=reduce_final_map, reduce_partial_map=reduce_partial_map,
                            max_seqlen_q=max_seqlen_q, final_output=o, final_lse=final_lse)


def reference_mla_reduce_v1(*, partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map,
                            max_seqlen_q, final_output, final_lse):
    from .reference import mla_reduce_ref

    mla_reduce_ref(partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map, max_seqlen_q,
                   final_output, final_lse)


def reference_mla_prefill_fwd(*, q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                              page_size, sm_scale, causal, lse):
    from .reference import mla_decode_ref

    out, lse_ref = mla_decode_ref(q, kv_buffer, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens,
                                  kv_lora_rank=o.shape[-1], page_size=page_size, sm_scale=sm_scale, causal=causal)
    o.copy_(out)
    if lse is not None:
        lse.copy_(lse_ref)


def reference_mla_prefill_ps_fwd(*, q, k, v, output, qo_indptr, kv_indptr, kv_page_indices, max_seqlen_q, is_causal,
                                 softmax_scale, q_scale, k_scale, v_scale, lse):
    from .reference import mla_prefill_ps_ref

    out, lse_ref = mla_prefill_ps_ref(q, k, v, qo_indptr, kv_indptr, kv_page_indices, is_causal=is_causal,
                                      softmax_scale=softmax_scale, q_scale=q_scale, k_scale=k_scale, v_scale=v_scale)
    output.copy_(out)
    if lse is not None:
        lse.copy_(lse_ref)


def reference_mla_attention_block_table(*, q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, max_seqlen_q,
                                        softmax_scale, kv_lora_rank, causal, num_splits, partial_o, partial_lse, lse,
                                        q_descale, kv_descale):
    from .reference import mla_block_table_ref

    o32, lse32 = mla_block_table_ref(q, kv_buffer, cu_seqlens_q, seqused_k, block_tables, kv_lora_rank=kv_lora_rank,
                                     sm_scale=softmax_scale, causal=causal, q_scale=q_descale, kv_scale=kv_descale)
    out.copy_(o32)
    if lse is not None:
        lse.copy_(lse32)
    _single_split_partials(partial_o, partial_lse, o32, lse32)


def reference_decode_attention_fwd_grouped_rope(*, q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens,
                                                kv_lora_rank, rotary_dim, cos_sin_cache, positions, attn_logits,
                                                num_kv_splits, sm_scale, logit_cap, use_rope, is_neox_style):
    from .reference import decode_grouped_rope_ref

    o32, lse32, k_pe = decode_grouped_rope_ref(
        q, k_buffer, v_buffer, kv_indptr, kv_indices, kv_lora_rank=kv_lora_rank, rotary_dim=rotary_dim,
        sm_scale=sm_scale, logit_cap=logit_cap, use_rope=use_rope, is_neox_style=is_neox_style,
        cos_sin_cache=cos_sin_cache,
        positions=positions)
    o.copy_(o32)
    attn_logits.zero_()
    attn_logits[:, :, 1:, -1] = float("-inf")
    attn_logits[:, :, 0, :kv_lora_rank] = o32
    attn_logits[:, :, 0, -1] = lse32
    if use_rope:
        k_pe_tokens.copy_(k_pe.reshape(k_pe_tokens.shape))


def reference_decode_attention_fwd(*, q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, attn_logits, attn_lse,
                                   num_kv_splits, sm_scale, page_size, logit_cap, k_scale, v_scale):
    from .reference import decode_paged_ref

    partial_o, partial_lse = _decode_partials(attn_logits, attn_lse, o.shape[-1])
    o32, lse32 = decode_paged_ref(q, k_buffer, v_buffer, req_to_token, b_seq_len, page_size=page_size,
                                  sm_scale=sm_scale, logit_cap=logit_cap, k_scale=k_scale, v_scale=v_scale)
    o.copy_(o32)
    if lse is not None:
        lse.copy_(lse32)
    _single_split_partials(partial_o, partial_lse, o32, lse32)


def reference_concat_and_cache_mla(*, kv_c, k_pe, kv_cache, slot_mapping, scale):
    from .reference import concat_and_cache_mla_ref

    kv_cache.copy_(concat_and_cache_mla_ref(kv_c, k_pe, kv_cache, slot_mapping, scale))


def reference_fused_qk_rope_concat_and_cache_mla(*, q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale,
                                                 q_scale, positions, cos_cache, sin_cache, is_neox, is_nope_first):
    from .reference import fused_qk_rope_concat_and_cache_mla_ref

    new_q, new_cache = fused_qk_rope_concat_and_cache_mla_ref(q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping,
                                                              k_scale, q_scale, positions, cos_cache, sin_cache,
                                                              is_neox, is_nope_first)
    q_out.copy_(new_q)
    kv_cache.copy_(new_cache)


def reference_fused_qk_rope_cat_and_cache_mla(*, q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin,
                                              k_scale, is_neox, apply_scale, q_out, k_pe_out, decode_q_pe_out,
                                              q_nope_zeros_out):
    from .reference import fused_qk_rope_cat_and_cache_mla_ref, rope_ref

    new_q, k_rot, new_cache = fused_qk_rope_cat_and_cache_mla_ref(
        q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin, k_scale, is_neox, apply_scale,
        q_out.dtype)
    q_out.copy_(new_q)
    kv_cache.copy_(new_cache)
    k_pe_out.copy_(k_rot)
    if decode_q_pe_out is not None:
        n = decode_q_pe_out.shape[0]
        decode_q_pe_out.copy_(rope_ref(q_pe[:n], cos, sin, pos[:n], is_neox))
    if q_nope_zeros_out is not None:
        q_nope_zeros_out.zero_()
