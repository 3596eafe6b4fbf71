"""The Triton-module forms of upstream's MLA (spec §3.5), whose names collide with the
page-indptr forms of :mod:`aiter_mla.api`:

* ``mla_decode_fwd`` / ``mla_prefill_fwd`` of ``aiter.ops.triton.attention.mla``: block tables
  (vLLM style) with ``cu_seqlens_q`` and ``seqused_k``;
* ``decode_attention_fwd_grouped_rope`` of ``aiter.ops.triton.attention.mla_decode_rope``
  (SGLang, page size 1, optional in-kernel RoPE);
* ``decode_attention_fwd`` of ``aiter.ops.triton.attention.mla_decode`` (SGLang decode over a
  request-to-page table, any head dims and GQA, MLA when V is a view of K).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C

Tensor = torch.Tensor

__all__ = ["mla_decode_fwd", "mla_prefill_fwd", "decode_attention_fwd_grouped_rope", "decode_attention_fwd"]


def _ops():
    from .ops import OPS

    return OPS


def _block_table_call(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                      qk_rope_head_dim, causal, q_descale, kv_descale, out_scale, shuffled_kv_cache, max_seqlen_q,
                      num_kv_splits, backend, decode: bool):
    C.tensor("q", q, dims=(3,), dtypes=C.Q_DTYPES)
    C.tensor("kv_buffer", kv_buffer, dims=(4,), dtypes=C.Q_DTYPES, device=q.device)
    C.tensor("out", out, dims=(3,), dtypes=C.FLOAT_DTYPES, device=q.device)
    C.positive_int("kv_lora_rank", kv_lora_rank)
    C.positive_int("qk_rope_head_dim", qk_rope_head_dim, minimum=0)
    if shuffled_kv_cache:
        raise ValueError("shuffled_kv_cache=True (the gfx950 preshuffled layout) is not supported on this backend")
    if out_scale is not None:
        raise ValueError("out_scale (fp8 output) is not supported: pass a bf16/fp16/fp32 out")
    total_q, heads, dim = q.shape
    if dim != kv_lora_rank + qk_rope_head_dim:
        raise ValueError(f"q's last dim must be kv_lora_rank + qk_rope_head_dim = {kv_lora_rank + qk_rope_head_dim}, "
                         f"got {dim}")
    if kv_buffer.shape[-1] != dim or kv_buffer.shape[2] != 1:
        raise ValueError(f"kv_buffer must be [num_blocks, block_size, 1, {dim}], got {tuple(kv_buffer.shape)}")
    if tuple(out.shape) != (total_q, heads, kv_lora_rank):
        raise ValueError(f"out must be [{total_q}, {heads}, {kv_lora_rank}], got {tuple(out.shape)}")
    C.index("cu_seqlens_q", cu_seqlens_q, None, q.device)
    batch = cu_seqlens_q.numel() - 1
    C.index("seqused_k", seqused_k, batch, q.device)
    C.tensor("block_tables", block_tables, dims=(2,), dtypes=(torch.int32,), device=q.device)
    if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks] with contiguous rows, got "
                         f"{tuple(block_tables.shape)} strides {tuple(block_tables.stride())}")
    for name, t in (("q", q), ("kv_buffer", kv_buffer), ("out", out)):
        C.last_dim_contiguous(name, t)
    q_descale = C.scale("q_descale", q_descale, q.device)
    kv_descale = C.scale("kv_descale", kv_descale, q.device)
    if max_seqlen_q is None:
        # decode batches are usually one token per sequence: known from shapes, no sync
        max_seqlen_q = 1 if total_q == batch else int((cu_seqlens_q[1:] - cu_seqlens_q[:-1]).max())
    C.positive_int("max_seqlen_q", max_seqlen_q)
    splits = 1
    partial_o = partial_lse = None
    if decode:
        if num_kv_splits is None:
            from .api import choose_num_kv_splits

            num_kv_splits = choose_num_kv_splits(batch, block_tables.numel() * kv_buffer.shape[1], heads,
                                                 max_seqlen_q, kv_buffer.dtype, kv_lora_rank)
        splits = C.positive_int("num_kv_splits", num_kv_splits)
        if splits > 1:
            partial_o = torch.empty(total_q, splits, heads, kv_lora_rank, dtype=torch.float32, device=q.device)
            partial_lse = torch.empty(total_q, splits, heads, dtype=torch.float32, device=q.device)
    _ops()["mla_attention_block_table"](q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, max_seqlen_q,
                                        float(softmax_scale), kv_lora_rank, bool(causal), splits, partial_o,
                                        partial_lse, None, q_descale, kv_descale, backend=backend)
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
    if q_scales is not None:
        raise ValueError("q_scales (nvfp4 queries) are not supported on this backend")
    if skip_reduce:
        raise ValueError("skip_reduce=True is not supported: the partials are always merged")
    return _block_table_call(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                             qk_rope_head_dim, causal, q_descale, kv_descale, out_scale, shuffled_kv_cache,
                             max_seqlen_q, num_kv_splits, backend, decode=True)


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, out: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                    max_seqlen_kv: int, block_tables: Tensor, softmax_scale: float, kv_lora_rank: int,
                    qk_rope_head_dim: int, causal: bool, q_descale: Optional[Tensor], kv_descale: Optional[Tensor],
                    out_scale: Optional[Tensor] = None, shuffled_kv_cache: bool = False, *,
                    max_seqlen_q: Optional[int] = None, backend: Optional[str] = None) -> Tensor:
    """Block-table absorbed MLA prefill (one split, bottom-right causal); same layouts as
    :func:`mla_decode_fwd`."""
    return _block_table_call(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, softmax_scale, kv_lora_rank,
                             qk_rope_head_dim, causal, q_descale, kv_descale, out_scale, shuffled_kv_cache,
                             max_seqlen_q, 1, backend, decode=False)


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
    C.tensor("q", q, dims=(3,), dtypes=C.Q_DTYPES)
    dev = q.device
    C.tensor("k_buffer", k_buffer, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    C.tensor("v_buffer", v_buffer, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    C.tensor("o", o, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("attn_logits", attn_logits, dims=(4,), dtypes=(torch.float32,), device=dev)
    batch, heads, dim = q.shape
    C.positive_int("kv_lora_rank", kv_lora_rank)
    splits = C.positive_int("num_kv_splits", num_kv_splits)
    if not 0 < kv_lora_rank < dim:
        raise ValueError(f"kv_lora_rank must be in (0, {dim}) (q's width), got {kv_lora_rank}")
    if k_buffer.shape[1] != 1 or k_buffer.shape[2] != dim:
        raise ValueError(f"k_buffer must be [tokens, 1, {dim}], got {tuple(k_buffer.shape)}")
    if v_buffer.shape[0] != k_buffer.shape[0] or v_buffer.shape[1] != 1 or v_buffer.shape[2] != kv_lora_rank:
        raise ValueError(f"v_buffer must be [{k_buffer.shape[0]}, 1, {kv_lora_rank}], got {tuple(v_buffer.shape)}")
    if tuple(o.shape) != (batch, heads, kv_lora_rank):
        raise ValueError(f"o must be [{batch}, {heads}, {kv_lora_rank}], got {tuple(o.shape)}")
    if tuple(attn_logits.shape) != (batch, heads, splits, kv_lora_rank + 1):
        raise ValueError(f"attn_logits must be [{batch}, {heads}, num_kv_splits={splits}, {kv_lora_rank + 1}], got "
                         f"{tuple(attn_logits.shape)}")
    C.index("kv_indptr", kv_indptr, batch + 1, dev)
    C.index("kv_indices", kv_indices, None, dev)
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("o", o), ("attn_logits", attn_logits)):
        C.last_dim_contiguous(name, t)
    rope = dim - kv_lora_rank
    if use_rope:
        if cos_sin_cache is None or positions is None or k_pe_tokens is None:
            raise ValueError("use_rope=True needs cos_sin_cache, positions and k_pe_tokens")
        C.tensor("cos_sin_cache", cos_sin_cache, dims=(2,), dtypes=C.FLOAT_DTYPES, device=dev)
        C.tensor("positions", positions, dims=(1,), dtypes=(torch.int32, torch.int64), device=dev)
        C.tensor("k_pe_tokens", k_pe_tokens, dtypes=C.FLOAT_DTYPES, device=dev)
        if not (0 < rotary_dim <= rope and rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in (0, {rope}] (the rope width), got {rotary_dim}")
        if cos_sin_cache.shape[1] != rotary_dim:
            raise ValueError(f"cos_sin_cache must be [max_pos, rotary_dim={rotary_dim}], got {tuple(cos_sin_cache.shape)}")
        if positions.shape[0] != batch:
            raise ValueError(f"positions must have {batch} entries, got {positions.shape[0]}")
        if k_pe_tokens.numel() != batch * rope or not k_pe_tokens.is_contiguous():
            raise ValueError(f"k_pe_tokens must be contiguous with {batch} x {rope} elements, got {tuple(k_pe_tokens.shape)}")
    _ops()["decode_attention_fwd_grouped_rope"](
        q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens if use_rope else None, kv_lora_rank, rotary_dim,
        cos_sin_cache if use_rope else None, positions if use_rope else None, attn_logits, splits, float(sm_scale),
        float(logit_cap), bool(use_rope), bool(is_neox_style), backend=backend)


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
    C.tensor("q", q, dims=(3,), dtypes=C.Q_DTYPES)
    dev = q.device
    C.tensor("k_buffer", k_buffer, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    C.tensor("v_buffer", v_buffer, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    C.tensor("o", o, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("attn_logits", attn_logits, dims=(4,), dtypes=(torch.float32,), device=dev)
    batch, heads, dim = q.shape
    tokens, kv_heads = k_buffer.shape[0], k_buffer.shape[1]
    d_v = v_buffer.shape[-1]
    splits = C.positive_int("num_kv_splits", num_kv_splits)
    C.positive_int("page_size", page_size)
    if k_buffer.shape[2] != dim:
        raise ValueError(f"k_buffer must be [tokens, Hk, {dim}] (q's head dim), got {tuple(k_buffer.shape)}")
    if v_buffer.shape[:2] != k_buffer.shape[:2]:
        raise ValueError(f"v_buffer must be [{tokens}, {kv_heads}, Dv], got {tuple(v_buffer.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if dim < 16:
        raise ValueError(f"the head dim must be >= 16, got {dim}")
    if tuple(o.shape) != (batch, heads, d_v):
        raise ValueError(f"o must be [{batch}, {heads}, {d_v}], got {tuple(o.shape)}")
    if attn_logits.shape[:3] != (batch, heads, splits) or attn_logits.shape[3] not in (d_v, d_v + 1):
        raise ValueError(f"attn_logits must be [{batch}, {heads}, num_kv_splits={splits}, {d_v} or {d_v + 1}], got "
                         f"{tuple(attn_logits.shape)}")
    if tokens % page_size:
        raise ValueError(f"k_buffer's token count ({tokens}) must be a multiple of page_size ({page_size})")
    C.tensor("req_to_token", req_to_token, dims=(2,), dtypes=(torch.int32,), device=dev)
    if req_to_token.shape[0] != batch or req_to_token.stride(1) != 1:
        raise ValueError(f"req_to_token must be [batch={batch}, max_pages] with contiguous rows, got "
                         f"{tuple(req_to_token.shape)}")
    C.index("b_seq_len", b_seq_len, batch, dev)
    if lse is not None:
        C.tensor("lse", lse, dtypes=(torch.float32,), device=dev)
        if lse.numel() != batch * heads:
            raise ValueError(f"lse must hold [{batch}, {heads}] values, got shape {tuple(lse.shape)}")
        lse = lse.view(batch, heads)
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("o", o), ("attn_logits", attn_logits)):
        C.last_dim_contiguous(name, t)
    k_scale = C.scale("k_scale", k_scale, dev)
    v_scale = C.scale("v_scale", v_scale, dev)
    # without an LSE channel in attn_logits the split LSEs go to a scratch buffer
    attn_lse = None if attn_logits.shape[3] == d_v + 1 else torch.empty(batch, heads, splits, dtype=torch.float32,
                                                                         device=dev)
    _ops()["decode_attention_fwd"](q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, attn_logits, attn_lse,
                                   splits, float(sm_scale), page_size, float(logit_cap), k_scale, v_scale,
                                   backend=backend)
