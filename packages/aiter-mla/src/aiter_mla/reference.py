"""PyTorch references of every aiter-mla op: the test oracle and the ``reference`` backend.

Everything here runs on any device, computes in fp32 (fp64 when ``acc_dtype`` says so), loops
over sequences on the host (so it syncs: not for CUDA graphs) and follows upstream's semantics:

* Absorbed MLA: a single latent KV head, K is the whole ``kv_lora_rank + rope`` row, V its first
  ``kv_lora_rank`` values; the query tokens of a sequence are its last tokens, so the causal mask
  is bottom-right aligned (query ``i`` of ``sq`` sees key ``j`` iff ``j <= i + sk - sq``).
* A query row that sees no key gives output 0 and LSE ``-inf``.
* LSE is the natural-log ``logsumexp(sm_scale * q.k)`` in fp32.
* fp8: values are dequantised as ``x.float() * scale`` (per-tensor scales, shape ``(1,)``).
"""

from __future__ import annotations

from typing import Optional

import torch

Tensor = torch.Tensor

__all__ = [
    "kv_lengths",
    "gather_pages",
    "attend",
    "mla_decode_ref",
    "mla_block_table_ref",
    "mla_prefill_ps_ref",
    "decode_grouped_rope_partials_ref",
    "mla_decode_persistent_ref",
    "mla_reduce_ref",
    "merge_splits_ref",
    "rope_ref",
    "concat_and_cache_mla_ref",
    "fused_qk_rope_concat_and_cache_mla_ref",
    "fused_qk_rope_cat_and_cache_mla_ref",
    "decode_grouped_rope_ref",
    "decode_paged_ref",
]


def _dequant(x: Tensor, scale: Optional[Tensor], acc: torch.dtype) -> Tensor:
    x = x.to(acc)
    if scale is not None:
        x = x * scale.to(acc).reshape(-1)[0]
    return x


def kv_lengths(kv_indptr: Tensor, kv_last_page_lens: Tensor, page_size: int) -> Tensor:
    """Tokens per sequence: ``(pages - 1) * page_size + last_page_len`` (0 for no pages)."""
    pages = (kv_indptr[1:] - kv_indptr[:-1]).to(torch.int64)
    last = kv_last_page_lens.to(torch.int64)
    return torch.where(pages > 0, (pages - 1) * page_size + last, torch.zeros_like(pages))


def gather_pages(kv_buffer: Tensor, page_ids: Tensor, length: int) -> Tensor:
    """The first ``length`` token rows ``[length, Hk, D]`` of the pages ``page_ids`` (in order)."""
    if kv_buffer.dim() == 3:  # [pages, page_size, D]: one KV head
        kv_buffer = kv_buffer.unsqueeze(2)
    rows = kv_buffer[page_ids.to(torch.int64)]
    return rows.reshape(-1, *kv_buffer.shape[2:])[:length]


def attend(q: Tensor, k: Tensor, v: Tensor, scale: float, causal: bool, acc: torch.dtype = torch.float32,
           logit_cap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Attention of one sequence: ``q [sq, H, Dk]``, ``k [sk, Hk, Dk]``, ``v [sk, Hk, Dv]``
    (GQA: consecutive query heads share a KV head) -> ``(o [sq, H, Dv], lse [sq, H])``."""
    sq, heads, _ = q.shape
    sk, heads_kv = k.shape[0], k.shape[1]
    group = heads // heads_kv
    k = k.to(acc).repeat_interleave(group, dim=1)
    v = v.to(acc).repeat_interleave(group, dim=1)
    s = torch.einsum("qhd,khd->hqk", q.to(acc), k) * scale
    if logit_cap > 0:
        s = logit_cap * torch.tanh(s / logit_cap)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None]
        j = torch.arange(sk, device=q.device)[None, :]
        s = s.masked_fill(j > i + sk - sq, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)  # [H, sq]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    p = torch.nan_to_num(p, nan=0.0)
    o = torch.einsum("hqk,khd->qhd", p, v)
    return o.to(torch.float32), lse.transpose(0, 1).to(torch.float32)


def mla_decode_ref(q: Tensor, kv_buffer: Tensor, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                   kv_last_page_lens: Tensor, *, kv_lora_rank: int, page_size: int = 1,
                   sm_scale: Optional[float] = None, causal: bool = True, q_scale: Optional[Tensor] = None,
                   kv_scale: Optional[Tensor] = None, acc_dtype: torch.dtype = torch.float32,
                   logit_cap: float = 0.0) -> tuple[Tensor, Tensor]:
    """Absorbed MLA over a paged cache addressed by page-level ``kv_indptr``/``kv_indices``.

    ``q [total_q, H, D]``, ``kv_buffer [num_pages, page_size, Hk, D]`` (or 3-D without Hk);
    returns ``(o [total_q, H, kv_lora_rank] fp32, lse [total_q, H] fp32)``.
    """
    if kv_buffer.dim() == 3:
        kv_buffer = kv_buffer.unsqueeze(2)
    dim = kv_buffer.shape[-1]
    scale = dim ** -0.5 if sm_scale is None else sm_scale
    lens = kv_lengths(kv_indptr.cpu(), kv_last_page_lens.cpu(), page_size).tolist()
    qo = qo_indptr.cpu().tolist()
    kp = kv_indptr.cpu().tolist()
    o = torch.zeros(q.shape[0], q.shape[1], kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(lens)):
        q0, q1 = qo[b], qo[b + 1]
        if q1 == q0:
            continue
        rows = _dequant(gather_pages(kv_buffer, kv_indices[kp[b]:kp[b + 1]], lens[b]), kv_scale, acc_dtype)
        qb = _dequant(q[q0:q1], q_scale, acc_dtype)
        ob, lb = attend(qb, rows, rows[..., :kv_lora_rank], scale, causal, acc_dtype, logit_cap)
        o[q0:q1], lse[q0:q1] = ob, lb
    return o, lse


def mla_block_table_ref(q: Tensor, kv_buffer: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                        block_tables: Tensor, *, kv_lora_rank: int, sm_scale: float, causal: bool = True,
                        q_scale: Optional[Tensor] = None, kv_scale: Optional[Tensor] = None,
                        acc_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Absorbed MLA over ``kv_buffer [num_blocks, block_size, Hk, D]`` addressed by
    ``block_tables [B, max_blocks]`` with ``seqused_k [B]`` keys per sequence."""
    block = kv_buffer.shape[1]
    cu = cu_seqlens_q.cpu().tolist()
    used = seqused_k.cpu().tolist()
    o = torch.zeros(q.shape[0], q.shape[1], kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(used)):
        q0, q1 = cu[b], cu[b + 1]
        if q1 == q0:
            continue
        pages = block_tables[b, : -(-used[b] // block)]
        rows = _dequant(gather_pages(kv_buffer, pages, used[b]), kv_scale, acc_dtype)
        ob, lb = attend(_dequant(q[q0:q1], q_scale, acc_dtype), rows, rows[..., :kv_lora_rank], sm_scale, causal,
                        acc_dtype)
        o[q0:q1], lse[q0:q1] = ob, lb
    return o, lse


def mla_prefill_ps_ref(q: Tensor, k: Tensor, v: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                       kv_page_indices: Tensor, *, is_causal: bool, softmax_scale: Optional[float] = None,
                       q_scale: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
                       v_scale: Optional[Tensor] = None, acc_dtype: torch.dtype = torch.float32
                       ) -> tuple[Tensor, Tensor]:
    """Non-absorbed MLA prefill: ``q [total_q, H, Dqk]``, ``k [tokens, Hk, Dqk]``,
    ``v [tokens, Hk, Dv]`` (page size 1: ``kv_page_indices`` are token rows) -> ``(o, lse)``."""
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    qo, kp = qo_indptr.cpu().tolist(), kv_indptr.cpu().tolist()
    o = torch.zeros(q.shape[0], q.shape[1], v.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for b in range(len(qo) - 1):
        q0, q1 = qo[b], qo[b + 1]
        if q1 == q0:
            continue
        idx = kv_page_indices[kp[b]:kp[b + 1]].to(torch.int64)
        ob, lb = attend(_dequant(q[q0:q1], q_scale, acc_dtype), _dequant(k[idx], k_scale, acc_dtype),
                        _dequant(v[idx], v_scale, acc_dtype), scale, is_causal, acc_dtype)
        o[q0:q1], lse[q0:q1] = ob, lb
    return o, lse


def mla_decode_persistent_ref(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                              kv_indices: Tensor, *, page_size: int, max_seqlen_q: int, sm_scale: float, causal: bool,
                              work_indptr: Tensor, work_info_set: Tensor, partial_o: Tensor, partial_lse: Tensor,
                              final_lse: Optional[Tensor] = None, q_scale: Optional[Tensor] = None,
                              kv_scale: Optional[Tensor] = None) -> None:
    """Stage 1 of the persistent decode (in place): runs the work items of ``get_mla_metadata_v1``
    one by one, writing final rows of ``o``/``final_lse`` (slot -1) or partial slots (rows ``slot *
    max_seqlen_q + t`` of ``partial_o [.., 1, H, Dv]`` / ``partial_lse [.., 1, H, 1]``)."""
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


def merge_splits_ref(partial_o: Tensor, partial_lse: Tensor) -> tuple[Tensor, Tensor]:
    """LSE-weighted merge over dim 0: ``partial_o [S, ..., Dv]``, ``partial_lse [S, ...]``."""
    lse_max = partial_lse.max(dim=0).values
    safe = torch.where(torch.isinf(lse_max), torch.zeros_like(lse_max), lse_max)
    w = torch.exp(partial_lse - safe)
    total = w.sum(dim=0)
    o = (w[..., None] * partial_o).sum(dim=0) / torch.where(total > 0, total, torch.ones_like(total))[..., None]
    lse = torch.where(total > 0, safe + torch.log(total), torch.full_like(total, float("-inf")))
    return o, lse


def mla_reduce_ref(partial_output: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
                   reduce_partial_map: Tensor, max_seqlen_q: int, final_output: Tensor,
                   final_lse: Optional[Tensor] = None) -> None:
    """Reference of ``mla_reduce_v1`` (in place): tile ``i`` merges the partial slots
    ``reduce_partial_map[reduce_indptr[i]:reduce_indptr[i+1]]`` (rows ``slot * max_seqlen_q + t``)
    into the global query tokens ``reduce_final_map[i] = (q_start, q_end)``."""
    po = partial_output.reshape(-1, partial_output.shape[-2], partial_output.shape[-1]).float()
    pl = partial_lse.reshape(po.shape[0], po.shape[1]).float()
    ind = reduce_indptr.cpu().tolist()
    fmap = reduce_final_map.cpu().tolist()
    pmap = reduce_partial_map.cpu().tolist()
    for i in range(len(ind) - 1):
        slots = pmap[ind[i]:ind[i + 1]]
        if not slots:
            continue
        q0, q1 = fmap[i]
        for t in range(q1 - q0):
            rows = [s * max_seqlen_q + t for s in slots]
            o, lse = merge_splits_ref(po[rows], pl[rows])
            final_output[q0 + t] = o.to(final_output.dtype)
            if final_lse is not None:
                final_lse[q0 + t] = lse


# -- RoPE and cache writes -------------------------------------------------------------------------


def _full_width(table: Tensor, width: int, is_neox: bool) -> Tensor:
    """A ``[.., width/2]`` cos/sin table expanded to one value per element (``[.., width]``)."""
    if table.shape[-1] == width:
        return table
    return torch.cat([table, table], dim=-1) if is_neox else table.repeat_interleave(2, dim=-1)


def rope_ref(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, is_neox: bool) -> Tensor:
    """Rotary embedding of ``x [T, H, D]`` at ``positions [T]`` with ``cos/sin [max_pos, D/2 | D]``.

    neox: halves ``(x1, x2)`` -> ``(x1 c - x2 s, x2 c + x1 s)``; interleaved (GPT-J): pairs
    ``(x[2i], x[2i+1])`` rotated the same way. Computed in fp32, returned in fp32. Positions
    are clamped into ``[0, max_pos)``: one past the table uses its last row (the kernels' rule).
    """
    width = x.shape[-1]
    pos = positions.to(torch.int64).clamp(0, cos.shape[0] - 1)
    c = _full_width(cos.float()[pos], width, is_neox)[:, None, :]
    s = _full_width(sin.float()[pos], width, is_neox)[:, None, :]
    xf = x.float()
    if is_neox:
        half = width // 2
        rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    else:
        pairs = xf.reshape(*xf.shape[:-1], width // 2, 2)
        rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).reshape(xf.shape)
    return xf * c + rotated * s


def _store(values: Tensor, dtype: torch.dtype, scale: Optional[Tensor]) -> Tensor:
    """fp32 values as stored in a cache of ``dtype`` (fp8: divided by the scale, then cast)."""
    if dtype.itemsize == 1 and dtype.is_floating_point:
        if scale is not None:
            values = values / scale.float().reshape(-1)[0]
        limit = float(torch.finfo(dtype).max)
        values = values.clamp(-limit, limit)
    return values.to(dtype)


def concat_and_cache_mla_ref(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor,
                             scale: Optional[Tensor]) -> Tensor:
    """A copy of ``kv_cache`` ``[blocks, block_size, (1,) lora+pe]`` with row ``slot`` of token
    ``t`` set to ``cat(kv_c[t], k_pe[t])`` (fp8 caches: divided by ``scale``); a slot outside
    ``[0, blocks * block_size)`` is skipped."""
    out = kv_cache.clone()
    flat = out.view(-1, kv_cache.shape[-1])
    rows = torch.cat([kv_c.reshape(kv_c.shape[0], -1).float(), k_pe.reshape(k_pe.shape[0], -1).float()], dim=-1)
    for t, slot in enumerate(slot_mapping.cpu().tolist()):
        if 0 <= slot < flat.shape[0]:
            flat[slot] = _store(rows[t], kv_cache.dtype, scale)
    return out


def fused_qk_rope_concat_and_cache_mla_ref(q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor,
                                           kv_cache: Tensor, q_out: Tensor, slot_mapping: Tensor,
                                           k_scale: Optional[Tensor], q_scale: Optional[Tensor],
                                           positions: Tensor, cos_cache: Tensor, sin_cache: Tensor,
                                           is_neox: bool, is_nope_first: bool) -> tuple[Tensor, Tensor]:
    """(new q_out, new kv_cache) of ``fused_qk_rope_concat_and_cache_mla``: RoPE on ``q_pe`` and
    ``k_pe``; ``q_out = cat(q_nope, rope(q_pe))`` (pe first when not ``is_nope_first``; fp8
    ``q_out`` divided by ``q_scale``); the cache row of each token ``cat(kv_c, rope(k_pe))``
    likewise (divided by ``k_scale`` when fp8)."""
    q_rot = rope_ref(q_pe, cos_cache, sin_cache, positions, is_neox)
    k_rot = rope_ref(k_pe.reshape(k_pe.shape[0], 1, -1), cos_cache, sin_cache, positions, is_neox)[:, 0]
    parts = (q_nope.float(), q_rot) if is_nope_first else (q_rot, q_nope.float())
    new_q = _store(torch.cat(parts, dim=-1), q_out.dtype, q_scale)
    kv_parts = (kv_c.reshape(kv_c.shape[0], -1).float(), k_rot)
    rows = torch.cat(kv_parts if is_nope_first else kv_parts[::-1], dim=-1)
    cache = kv_cache.clone()
    flat = cache.view(-1, kv_cache.shape[-1])
    for t, slot in enumerate(slot_mapping.cpu().tolist()):
        if 0 <= slot < flat.shape[0]:
            flat[slot] = _store(rows[t], kv_cache.dtype, k_scale)
    return new_q, cache


def fused_qk_rope_cat_and_cache_mla_ref(q_nope: Tensor, q_pe: Tensor, k_nope: Tensor, k_pe: Tensor,
                                        kv_cache: Tensor, slot_mapping: Tensor, pos: Tensor, cos: Tensor,
                                        sin: Tensor, k_scale: Optional[Tensor], is_neox: bool,
                                        apply_scale: bool = True, q_out_dtype: Optional[torch.dtype] = None
                                        ) -> tuple[Tensor, Tensor, Tensor]:
    """(q_out, k_pe_out, new kv_cache) of the Triton ``fused_qk_rope_cat_and_cache_mla``.

    ``q_nope/q_pe [B, QH, D1|D2]`` (B query tokens, positions ``pos[:B]``), ``k_nope/k_pe
    [B_slot, KH, D1|D2]`` (positions ``pos[:B_slot]``), ``kv_cache [rows, KH, D1+D2]`` with
    ``slot_mapping[t]`` the row of token ``t`` (outside ``[0, rows)``: skipped).
    """
    nq = q_nope.shape[0]
    q_rot = rope_ref(q_pe, cos, sin, pos[:nq], is_neox)
    k_rot = rope_ref(k_pe, cos, sin, pos[: k_pe.shape[0]], is_neox)
    q_out = torch.cat([q_nope.float(), q_rot], dim=-1).to(q_out_dtype or q_nope.dtype)
    rows = torch.cat([k_nope.float(), k_rot], dim=-1)
    cache = kv_cache.clone()
    scale = k_scale if apply_scale else None
    for t, slot in enumerate(slot_mapping.cpu().tolist()):
        if 0 <= slot < cache.shape[0]:
            cache[slot] = _store(rows[t], kv_cache.dtype, scale)
    return q_out, k_rot.to(k_pe.dtype), cache


def decode_grouped_rope_ref(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                            *, kv_lora_rank: int, rotary_dim: int, sm_scale: float, logit_cap: float = 0.0,
                            use_rope: bool = False, is_neox_style: bool = False,
                            cos_sin_cache: Optional[Tensor] = None, positions: Optional[Tensor] = None
                            ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """SGLang-style MLA decode (page size 1): ``q [B, H, lora+rope]``, ``k_buffer [tokens, Hk,
    lora+rope]``, ``v_buffer [tokens, Hk, lora]``. With ``use_rope`` the first ``rotary_dim``
    channels of the rope part of q and of each sequence's **last** key are rotated at
    ``positions[b]`` (``cos_sin_cache [max_pos, rotary_dim]`` = cos half | sin half); the cache
    is not modified. Returns ``(o [B, H, lora] fp32, lse [B, H], k_pe_rotated [B, Hk, rope])``."""
    batch = q.shape[0]
    rope = q.shape[-1] - kv_lora_rank
    ind = kv_indptr.cpu().tolist()
    o = torch.zeros(batch, q.shape[1], kv_lora_rank, dtype=torch.float32, device=q.device)
    lse = torch.full((batch, q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    k_pe_tokens = torch.zeros(batch, k_buffer.shape[1], rope, dtype=torch.float32, device=q.device) if use_rope else None
    for b in range(batch):
        idx = kv_indices[ind[b]:ind[b + 1]].to(torch.int64)
        last_ok = idx.numel() > 0 and 0 <= int(idx[-1]) < k_buffer.shape[0]
        idx = idx[(idx >= 0) & (idx < k_buffer.shape[0])]  # out-of-range ids are skipped
        qb = q[b : b + 1].float().clone()
        kb = k_buffer[idx].float().clone()
        vb = v_buffer[idx].float()
        if use_rope and ind[b + 1] > ind[b]:
            cos, sin = cos_sin_cache.float().chunk(2, dim=-1)
            lo, hi = kv_lora_rank, kv_lora_rank + rotary_dim
            qb[..., lo:hi] = rope_ref(qb[..., lo:hi], cos, sin, positions[b : b + 1], is_neox_style)
        if use_rope and last_ok:
            pos = positions[b : b + 1]
            last = kb[-1:].clone()
            last[..., lo:hi] = rope_ref(last[..., lo:hi], cos, sin, pos, is_neox_style)
            kb[-1:] = last
            k_pe_tokens[b] = last[0, :, kv_lora_rank:]
        if idx.numel() == 0:
            continue
        ob, lb = attend(qb, kb, vb, sm_scale, False, logit_cap=logit_cap)
        o[b], lse[b] = ob[0], lb[0]
    return o, lse, k_pe_tokens


def decode_grouped_rope_partials_ref(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, kv_indptr: Tensor,
                                     kv_indices: Tensor, *, kv_lora_rank: int, rotary_dim: int, splits: int,
                                     sm_scale: float, cos_sin_cache: Tensor, positions: Tensor, is_neox_style: bool,
                                     round_to: Optional[torch.dtype] = None) -> tuple[Tensor, Tensor]:
    """Upstream's ``attn_logits`` of the grouped RoPE decode: split ``s`` of a sequence of ``n``
    keys attends keys ``[s * c, min((s + 1) * c, n))``, ``c = cdiv(n, splits)``, with the rotated
    query and the rotated last key. Returns (partial o [B, H, S, lora], partial lse [B, H, S]);
    empty splits are NaN (upstream writes nothing there). ``round_to``: the rotated query and
    last key are rounded to this dtype first (the kernel stores them so)."""
    batch, heads = q.shape[:2]
    cos, sin = cos_sin_cache.float().chunk(2, dim=-1)
    lo, hi = kv_lora_rank, kv_lora_rank + rotary_dim
    q_rot = q.float().clone()
    q_rot[..., lo:hi] = rope_ref(q_rot[..., lo:hi], cos, sin, positions, is_neox_style)
    k_rot = k_buffer.float().clone()
    ind = kv_indptr.tolist()
    for b in range(batch):
        if ind[b + 1] > ind[b]:
            last = int(kv_indices[ind[b + 1] - 1])
            k_rot[last:last + 1, :, lo:hi] = rope_ref(k_rot[last:last + 1, :, lo:hi], cos, sin, positions[b:b + 1],
                                                      is_neox_style)
    o = torch.full((batch, heads, splits, kv_lora_rank), float("nan"), device=q.device)
    lse = torch.full((batch, heads, splits), float("nan"), device=q.device)
    for b in range(batch):
        n = ind[b + 1] - ind[b]
        c = -(-n // splits)
        for s in range(splits):
            a, e = min(s * c, n), min((s + 1) * c, n)
            if e <= a:
                continue
            sub = kv_indices[ind[b] + a: ind[b] + e]
            ob, lb, _ = decode_grouped_rope_ref(q_rot[b:b + 1], k_rot, v_buffer.float(),
                                                torch.tensor([0, e - a], dtype=torch.int32, device=q.device), sub,
                                                kv_lora_rank=kv_lora_rank, rotary_dim=rotary_dim, sm_scale=sm_scale)
            o[b, :, s], lse[b, :, s] = ob[0], lb[0]
    return o, lse


def decode_paged_ref(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, req_to_token: Tensor, b_seq_len: Tensor, *,
                     page_size: int, sm_scale: float, logit_cap: float = 0.0, k_scale: Optional[Tensor] = None,
                     v_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """SGLang ``decode_attention_fwd``: ``q [B, H, Dk]``, ``k_buffer [tokens, Hk, Dk]``,
    ``v_buffer [tokens, Hk, Dv]`` (GQA), key ``j`` of request ``b`` at token row
    ``req_to_token[b, j // page_size] * page_size + j % page_size``. Returns ``(o, lse)``."""
    lens = b_seq_len.cpu().tolist()
    o = torch.zeros(q.shape[0], q.shape[1], v_buffer.shape[-1], dtype=torch.float32, device=q.device)
    lse = torch.full((q.shape[0], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
    for b, n in enumerate(lens):
        if n == 0:
            continue
        j = torch.arange(n, device=q.device)
        rows = req_to_token[b, j // page_size].to(torch.int64) * page_size + j % page_size
        ob, lb = attend(q[b : b + 1].float(), _dequant(k_buffer[rows], k_scale, torch.float32),
                        _dequant(v_buffer[rows], v_scale, torch.float32), sm_scale, False, logit_cap=logit_cap)
        o[b], lse[b] = ob[0], lb[0]
    return o, lse
