"""PyTorch references of every aiter-pa op: the test oracle and the ``reference`` backend.

They run on any device, loop over sequences in Python and compute in fp32 (fp64 where asked), so
they are slow and sync with the host: not for CUDA graphs.
"""

from __future__ import annotations

from typing import Sequence

import torch

from aiter_core.dtypes import dtype_max
from aiter_core.quant import KVQuant, dequantize_kv

from .layouts import describe_kv_cache, from_nhd, scale_addressing, to_nhd

__all__ = [
    "scale_per_slot",
    "dequantize_cache",
    "paged_attention_ref",
    "reshape_and_cache_ref",
    "reshape_and_cache_pertoken_ref",
    "reshape_and_cache_block_quant_ref",
    "copy_blocks_ref",
    "swap_blocks_ref",
    "attention_rows_ref",
    "paged_attention_call_ref",
    "kv_cache_write_call_ref",
]


def scale_per_slot(scale: torch.Tensor | None, method: KVQuant, num_blocks: int, block_size: int,
                   num_kv_heads: int, name: str = "scale") -> torch.Tensor | None:
    """Any accepted scale form -> aiter_core's ``kv_scale_shape`` form (``[Hk, T]`` per token)."""
    method = KVQuant(method)
    sa = scale_addressing(scale, method, num_blocks, block_size, num_kv_heads, name)
    if sa is None:
        return None
    if method == KVQuant.PER_TENSOR_8BIT:
        return sa.tensor.reshape(1).float()
    if method == KVQuant.PER_HEAD_8BIT:
        return sa.tensor.float()
    full = torch.as_strided(sa.tensor, (num_blocks, num_kv_heads, block_size), (sa.s_blk, sa.s_head, sa.s_tok))
    return full.permute(1, 0, 2).reshape(num_kv_heads, num_blocks * block_size).float()


def dequantize_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, layout: str | None, k_quant: KVQuant,
                     v_quant: KVQuant, k_scale=None, v_scale=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Caches of any layout/quantization -> fp32 NHD ``[num_blocks, block_size, Hk, head_dim]``."""
    info = describe_kv_cache(key_cache, value_cache, layout)
    k, v = to_nhd(key_cache, value_cache, layout)
    nb, bs, H = info.num_blocks, info.block_size, info.num_kv_heads
    out = []
    for t, method, scale, name in ((k, k_quant, k_scale, "k_scale"), (v, v_quant, v_scale, "v_scale")):
        method = KVQuant(method)
        flat = t.reshape(nb * bs, H, t.shape[-1])
        s = scale_per_slot(scale, method, nb, bs, H, name)
        deq = dequantize_kv(flat, s, method, torch.float32)
        out.append(deq.reshape(nb, bs, H, deq.shape[-1]))
    return out[0], out[1]


def _valid_tokens(block_row: torch.Tensor, length: int, block_size: int, num_blocks: int, device) -> tuple:
    t = torch.arange(length, device=device)
    logical = t // block_size
    in_table = logical < block_row.numel()
    blocks = torch.full_like(t, -1)
    blocks[in_table] = block_row.to(device).long()[logical[in_table]]
    ok = (blocks >= 0) & (blocks < num_blocks)
    return t, blocks.clamp(0, num_blocks - 1), ok


def attention_rows_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, qpos: torch.Tensor, kpos: torch.Tensor,
                       kvalid: torch.Tensor, scale: float, *, causal: bool = True, alibi_slopes=None,
                       softcap: float = 0.0, sliding_window: int = 0, extra_mask: torch.Tensor | None = None,
                       dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: ``q [Sq, Hq, Dqk]``, ``k [Sk, Hk, Dqk]``, ``v [Sk, Hk, Dv]`` at key positions
    ``kpos``; query ``i`` sits at ``qpos[i]``. Returns ``(out [Sq, Hq, Dv], lse [Sq, Hq])``.
    Order of score terms: ``scale * qk``, soft cap, then ALiBi ``slope * (kpos - qpos)``."""
    Hq, Hk = q.shape[1], k.shape[1]
    g = Hq // Hk
    qd, kd, vd = q.to(dtype), k.to(dtype).repeat_interleave(g, 1), v.to(dtype).repeat_interleave(g, 1)
    s = torch.einsum("qhd,khd->hqk", qd, kd) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    rel = (kpos[None, :] - qpos[:, None]).to(dtype)  # [Sq, Sk]
    if alibi_slopes is not None:
        s = s + alibi_slopes.to(dtype).reshape(Hq, 1, 1).to(s.device) * rel[None]
    mask = kvalid[None, :].expand(q.shape[0], -1).clone()
    if causal:
        mask &= rel <= 0
    if sliding_window and sliding_window > 0:
        mask &= rel > -sliding_window
    if extra_mask is not None:
        mask &= extra_mask
    s = s.masked_fill(~mask[None], float("-inf"))
    lse = torch.logsumexp(s, -1)  # [Hq, Sq]
    p = torch.exp(s - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    # the NaN rule: a masked key contributes nothing (not 0 x NaN); a row that sees a key with a
    # non-finite V row gets NaN
    vbad = ~torch.isfinite(vd).all(-1)  # [Sk, Hq]
    out = torch.einsum("hqk,khd->qhd", p, vd.masked_fill(vbad[..., None], 0.0))
    rbad = (mask[None] & vbad.transpose(0, 1)[:, None, :]).any(-1).transpose(0, 1)  # [Sq, Hq]
    out = out.masked_fill(rbad[..., None], float("nan"))
    return out, lse.transpose(0, 1)


def paged_attention_ref(query: torch.Tensor, k_nhd: torch.Tensor, v_nhd: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor | Sequence[int], scale: float, *, q_starts: Sequence[int] | None = None,
                        q_lens: Sequence[int] | None = None, alibi_slopes=None, softcap: float = 0.0,
                        sliding_window: int = 0, new_k: torch.Tensor | None = None,
                        new_v: torch.Tensor | None = None, out_dtype=None, dtype=torch.float64) -> torch.Tensor:
    """Paged attention over dequantized NHD caches (``k_nhd/v_nhd [nb, bs, Hk, D]``).

    ``query [total_q, Hq, D]``; sequence ``s`` owns query rows ``q_starts[s] .. + q_lens[s]`` (default:
    one row each). Without ``new_k``, the queries are the last ``q_lens[s]`` of the
    ``context_lens[s]`` cached tokens (decode / MTP, causal). With ``new_k/new_v [total_q, Hk, D]``
    (prefill), the ``context_lens[s]`` cached tokens come first, fully visible, then the sequence's
    new tokens, causal. Blocks outside ``[0, num_blocks)`` are padding (their tokens are skipped).
    """
    num_seqs = block_tables.shape[0]
    ctx = [int(c) for c in (context_lens.tolist() if isinstance(context_lens, torch.Tensor) else context_lens)]
    q_lens = list(q_lens) if q_lens is not None else [1] * num_seqs
    q_starts = list(q_starts) if q_starts is not None else [sum(q_lens[:i]) for i in range(num_seqs)]
    nb, bs = k_nhd.shape[0], k_nhd.shape[1]
    dv = v_nhd.shape[-1]
    out = torch.zeros(query.shape[0], query.shape[1], dv, dtype=out_dtype or query.dtype, device=query.device)
    for s in range(num_seqs):
        qlen, q0, c = q_lens[s], q_starts[s], ctx[s]
        if qlen == 0:
            continue
        t, blocks, ok = _valid_tokens(block_tables[s], c, bs, nb, k_nhd.device)
        k = k_nhd[blocks, t % bs]
        v = v_nhd[blocks, t % bs]
        kpos = t
        if new_k is not None:
            k = torch.cat([k.to(dtype), new_k[q0:q0 + qlen].to(dtype).to(k.device)])
            v = torch.cat([v.to(dtype), new_v[q0:q0 + qlen].to(dtype).to(v.device)])
            kpos = torch.cat([t, c + torch.arange(qlen, device=t.device)])
            ok = torch.cat([ok, torch.ones(qlen, dtype=torch.bool, device=ok.device)])
            qpos = c + torch.arange(qlen, device=t.device)
        else:
            qpos = c - qlen + torch.arange(qlen, device=t.device)
        o, _ = attention_rows_ref(query[q0:q0 + qlen].to(k_nhd.device), k, v, qpos, kpos, ok, scale,
                                  alibi_slopes=alibi_slopes, softcap=softcap, sliding_window=sliding_window, dtype=dtype)
        out[q0:q0 + qlen] = o.to(out.dtype).to(out.device)
    return out


# ----------------------------------------------------------------------------- cache writes


def _write_rows(cache_nhd: torch.Tensor, rows: torch.Tensor, slots: torch.Tensor) -> None:
    bs = cache_nhd.shape[1]
    keep = (slots >= 0) & (slots < cache_nhd.shape[0] * bs)  # negative or past the end: skipped
    s = slots[keep].long()
    cache_nhd[s // bs, s % bs] = rows[keep].to(cache_nhd.dtype)


def _div(x: torch.Tensor, divisor) -> torch.Tensor:
    """``x / divisor`` correctly rounded on every device, as the kernels' ``div_rn``. On CUDA,
    ``tensor / python_float`` is computed as ``tensor * (1 / float)``, which is one ulp off for
    some values (and then flips fp8/int8 codes); a divisor tensor on x's device takes the true
    division path on both CPU and CUDA."""
    if isinstance(divisor, torch.Tensor):
        divisor = divisor.to(device=x.device, dtype=x.dtype)
    else:
        divisor = torch.full((), float(divisor), dtype=x.dtype, device=x.device)
    return x / divisor


def _quantize_per_tensor(x: torch.Tensor, scale, store: torch.dtype) -> torch.Tensor:
    y = _div(x.float(), scale.float().reshape(()) if isinstance(scale, torch.Tensor) else scale)
    if store == torch.int8:
        y = torch.floor(y + 0.5).clamp(-128, 127)
    elif store.is_floating_point and store.itemsize == 1:
        lim = dtype_max(store)
        y = y.clamp(-lim, lim)
    return y.to(store)


def reshape_and_cache_ref(key, value, key_cache, value_cache, slot_mapping, layout: str | None = None,
                          k_scale=None, v_scale=None) -> None:
    """Write ``key/value [T, Hk, D]`` at ``slot_mapping`` (negative = skip); 8-bit caches store
    ``x / scale`` (per-tensor scale; None means 1)."""
    info = describe_kv_cache(key_cache, value_cache, layout)
    k, v = to_nhd(key_cache, value_cache, layout)
    k, v = k.clone(), v.clone()
    for src, dst, sc in ((key, k, k_scale), (value, v, v_scale)):
        rows = src if dst.dtype == src.dtype else _quantize_per_tensor(src, 1.0 if sc is None else sc, dst.dtype)
        _write_rows(dst, rows, slot_mapping)
    nk, nv = from_nhd(k, v, info.layout)
    key_cache.copy_(nk)
    value_cache.copy_(nv)


def reshape_and_cache_pertoken_ref(key, value, key_cache, value_cache, k_scales, v_scales, slot_mapping,
                                   layout: str | None = None, int4: bool = False) -> None:
    """Per-(token, head) quantization: ``scale = absmax / max``, stored ``x / scale`` (int4 packs
    two values a byte); the scale goes to the token's slot in ``k_scales/v_scales``."""
    info = describe_kv_cache(key_cache, value_cache, layout)
    nb, bs, H = info.num_blocks, info.block_size, info.num_kv_heads
    k, v = to_nhd(key_cache, value_cache, layout)
    k, v = k.clone(), v.clone()
    keep = (slot_mapping >= 0) & (slot_mapping < nb * bs)
    slots = slot_mapping[keep].long()
    for src, dst, scales, name in ((key, k, k_scales, "k_scales"), (value, v, v_scales, "v_scales")):
        x = src[keep].float()  # [n, H, D]
        qmax = 7.0 if int4 else dtype_max(dst.dtype)
        sc = _div(x.abs().amax(-1).clamp_min(1e-12), qmax)  # [n, H]
        y = x / sc[..., None]
        if int4:
            qv = torch.floor(y + 0.5).clamp(-8, 7).to(torch.int16) & 0xF
            stored = (qv[..., 0::2] | (qv[..., 1::2] << 4)).to(torch.uint8)
        elif dst.dtype == torch.int8:
            stored = torch.floor(y + 0.5).clamp(-128, 127).to(torch.int8)
        else:
            stored = y.to(dst.dtype)
        dst[slots // bs, slots % bs] = stored
        sa = scale_addressing(scales, KVQuant.PER_TOKEN_8BIT, nb, bs, H, name)
        view = torch.as_strided(sa.tensor, (nb, H, bs), (sa.s_blk, sa.s_head, sa.s_tok))
        view[slots // bs, :, slots % bs] = sc
    nk, nv = from_nhd(k, v, info.layout)
    key_cache.copy_(nk)
    value_cache.copy_(nv)


def reshape_and_cache_block_quant_ref(key, value, key_cache, value_cache, k_scales, v_scales, slot_mapping,
                                      layout: str | None = None) -> None:
    """Per-(block, head) quantization, scales ``[Hk, num_blocks]`` or ``[num_blocks, Hk]`` (the
    latter for ``asm_layout``; given as a tensor we read its strides). For each touched block the
    new scale is ``max(old, absmax(new tokens) / max)``; when it grows, the tokens already in the
    block are re-quantized to it (the scale only ever grows). Scale 0 = empty block."""
    info = describe_kv_cache(key_cache, value_cache, layout)
    nb, bs, H = info.num_blocks, info.block_size, info.num_kv_heads
    k, v = to_nhd(key_cache, value_cache, layout)
    k, v = k.clone(), v.clone()
    flat_slots = slot_mapping.reshape(-1)
    keep = (flat_slots >= 0) & (flat_slots < nb * bs)
    slots = flat_slots[keep].long()
    for src, dst, scales in ((key, k, k_scales), (value, v, v_scales)):
        x = src.reshape(-1, H, src.shape[-1])[keep].float()
        sc = scales if scales.shape == (nb, H) else scales.transpose(0, 1)  # -> [nb, H] view
        qmax = dtype_max(dst.dtype)
        blocks = slots // bs
        old = sc.clone()
        new = old.clone()
        row_max = _div(x.abs().amax(-1), qmax)  # [n, H]
        for i in range(slots.numel()):
            new[blocks[i]] = torch.maximum(new[blocks[i]], row_max[i])
        grown = (new > old)  # [nb, H]
        for b in torch.nonzero(grown.any(1)).flatten().tolist():
            for h in range(H):
                if grown[b, h]:
                    ratio = (old[b, h] / new[b, h]).item()
                    dst[b, :, h] = _quantize_per_tensor(dst[b, :, h].float() * ratio, 1.0, dst.dtype)
        for i in range(slots.numel()):
            b = blocks[i]
            dst[b, slots[i] % bs] = _quantize_per_tensor(x[i] / new[b][:, None], 1.0, dst.dtype)
        sc.copy_(new)
    nk, nv = from_nhd(k, v, info.layout)
    key_cache.copy_(nk)
    value_cache.copy_(nv)


def copy_blocks_ref(key_caches, value_caches, block_mapping) -> None:
    """``cache[dst] = cache[src]`` for each ``(src, dst)`` row, every cache in the lists."""
    pairs = block_mapping.to("cpu").long().tolist()
    for caches in (key_caches, value_caches):
        for c in caches:
            for s, d in pairs:
                c[d] = c[s].clone()


def swap_blocks_ref(src, dst, block_mapping) -> None:
    for s, d in block_mapping.to("cpu").long().tolist():
        dst[d] = src[s].to(dst.device)


# -- the reference backend: a validated Call (aiter_pa.checks) on the references above -------------


def paged_attention_call_ref(call) -> None:
    """Run a :class:`aiter_pa.checks.PagedCall` on the PyTorch reference, writing ``call.out``."""
    quant = call.key.kv_quant
    kd, vd = dequantize_cache(call.key_cache, call.value_cache, call.info.layout, quant, quant,
                              call.k_scale.tensor if call.k_scale is not None else None,
                              call.v_scale.tensor if call.v_scale is not None else None)
    nb, bs = kd.shape[0], kd.shape[1]
    S = call.num_seqs
    over = []  # (first row, end row) past max_qlen: flagged NaN, as the kernel does
    if call.qo_indptr is not None:
        total = call.query.shape[0]
        qo = call.qo_indptr.tolist()
        starts, lens = [], []
        for i in range(S):  # entries clamped into [0, total rows]; an empty range produces nothing
            a = min(max(qo[i], 0), total)
            b = min(max(qo[i + 1], a), total)
            starts.append(a)
            lens.append(min(b - a, call.max_qlen))
            if b - a > call.max_qlen:
                over.append((a + call.max_qlen, b))
    else:
        starts = [i * call.max_qlen for i in range(S)]
        lens = [call.max_qlen] * S
    for s in range(S):
        if call.kv_indptr is not None:  # entries clamped into [0, page-list length]
            n = call.block_tables.shape[0]
            a = min(max(int(call.kv_indptr[s]), 0), n)
            b = min(max(int(call.kv_indptr[s + 1]), a), n)
            pages = call.block_tables[a:b].long().cpu()
            if call.token_lists:
                ctx = b - a
            else:
                last = min(max(int(call.kv_last_page_lens[s]), 0), bs)
                ctx = (b - a - 1) * bs + last if b > a else 0
        else:
            pages = call.block_tables[s].long().cpu()
            ctx = max(min(int(call.context_lens[s]), call.max_context_len), 0)
        qlen, q0 = lens[s], starts[s]
        if qlen <= 0 or (call.skip_decode and qlen == 1):
            continue
        t = torch.arange(ctx)
        logical = t // bs
        blk = torch.full_like(t, -1)
        inside = logical < pages.numel()
        blk[inside] = pages[logical[inside]]
        ok = (blk >= 0) & (blk < nb)
        blk = blk.clamp(0, nb - 1)
        k, v = kd[blk.to(kd.device), (t % bs).to(kd.device)], vd[blk.to(kd.device), (t % bs).to(kd.device)]
        kpos = t.to(kd.device)
        ok = ok.to(kd.device)
        if call.new_k is not None:
            k = torch.cat([k, call.new_k[q0:q0 + qlen].float()])
            v = torch.cat([v, call.new_v[q0:q0 + qlen].float()])
            kpos = torch.cat([kpos, ctx + torch.arange(qlen, device=kd.device)])
            ok = torch.cat([ok, torch.ones(qlen, dtype=torch.bool, device=kd.device)])
            qpos = ctx + torch.arange(qlen, device=kd.device)
            causal = call.new_causal
        else:
            qpos = ctx - qlen + torch.arange(qlen, device=kd.device)
            causal = True
        extra = None
        if call.custom_mask is not None:
            m0 = int(call.mask_indptr[s])
            flags = call.custom_mask[m0:m0 + qlen * (ctx + qlen)].reshape(qlen, ctx + qlen).bool().to(kd.device)
            if not call.mask_prefix:
                flags[:, :ctx] = True
            extra, causal = flags, False  # the custom mask replaces the causal rule
        o, _ = attention_rows_ref(call.query[q0:q0 + qlen], k, v, qpos, kpos, ok, call.scale, causal=causal,
                                  alibi_slopes=call.alibi_slopes, softcap=call.softcap,
                                  sliding_window=call.sliding_window, extra_mask=extra, dtype=torch.float32)
        call.out[q0:q0 + qlen] = o.to(call.out.dtype)
    for a, b in over:
        call.out[a:b] = float("nan")


def kv_cache_write_call_ref(call) -> None:
    """Run a :class:`aiter_pa.checks.CacheWrite` on the PyTorch reference (both caches)."""
    info = call.info
    _write_cache_ref(call.key_rows, call.key_cache, call.slot_mapping, info.k, info.block_size, info.num_blocks,
                     call.mode, call.k_scale, call.k_scale_strides)
    _write_cache_ref(call.value_rows, call.value_cache, call.slot_mapping, info.v, info.block_size, info.num_blocks,
                     call.mode, call.v_scale, call.v_scale_strides)


def _write_cache_ref(src, cache, slot_mapping, a, bs: int, num_blocks: int, mode: int, scale, scale_strides) -> None:
    """One cache's write, addressing the cache through the same formula as the kernels, element by
    element (slow, exact)."""
    from .checks import MODE_CAST, MODE_INT4, MODE_PER_TENSOR, MODE_PER_TOKEN

    keep = (slot_mapping.reshape(-1) >= 0) & (slot_mapping.reshape(-1) < num_blocks * bs)
    src = src.reshape(-1, src.shape[-2], src.shape[-1])
    slots = slot_mapping.reshape(-1)[keep].long().cpu()
    rows = src[keep.to(src.device)].float()
    H = rows.shape[1]
    flat = cache.view(-1) if cache.is_contiguous() else None
    if flat is None:
        raise ValueError("the reference cache writer needs contiguous caches")

    def offsets(blocks, offs, cols):
        tok = blocks * a.s_blk + (offs // a.TX) * a.s_t_hi + (offs % a.TX) * a.s_t_lo  # [n]
        col = (cols // a.CX) * a.s_c_hi + (cols % a.CX) * a.s_c_lo  # [c]
        return tok[:, None, None] + torch.arange(H)[None, :, None] * a.s_head + col[None, None, :]

    blocks, offs = slots // bs, slots % bs
    s0, s1, s2 = scale_strides
    if mode == MODE_INT4:
        qmax = 7.0
        sc = rows.abs().amax(-1).clamp_min(1e-12) / qmax
        qv = torch.floor(rows / sc[..., None] + 0.5).clamp(-8, 7).to(torch.int16) & 0xF
        stored = (qv[..., 0::2] | (qv[..., 1::2] << 4)).to(torch.uint8)
        flat[offsets(blocks, offs, torch.arange(stored.shape[-1])).to(flat.device)] = stored.to(flat.device)
        idx = blocks[:, None] * s0 + torch.arange(H)[None, :] * s1 + offs[:, None] * s2
        torch.as_strided(scale, (scale.numel(),), (1,))[idx.to(scale.device)] = sc.to(scale.device)
        return
    cols = torch.arange(rows.shape[-1])
    if mode == MODE_CAST:
        flat[offsets(blocks, offs, cols).to(flat.device)] = src[keep.to(src.device)].to(flat.dtype)
        return
    if mode == MODE_PER_TENSOR:
        stored = _quantize_per_tensor(rows, scale, cache.dtype)
    elif mode == MODE_PER_TOKEN:
        sc = rows.abs().amax(-1).clamp_min(1e-12) / dtype_max(cache.dtype)
        stored = _quantize_per_tensor(rows / sc[..., None], 1.0, cache.dtype)
        idx = blocks[:, None] * s0 + torch.arange(H)[None, :] * s1 + offs[:, None] * s2
        torch.as_strided(scale, (scale.numel(),), (1,))[idx.to(scale.device)] = sc.to(scale.device)
    else:  # MODE_BLOCK: grow the scales, re-quantize grown blocks, write
        qmax = dtype_max(cache.dtype)
        scales = torch.as_strided(scale, (num_blocks, H), (s0, s1))
        old = scales.clone()
        new = old.clone()
        row_max = rows.abs().amax(-1) / qmax
        for i in range(slots.numel()):
            new[blocks[i]] = torch.maximum(new[blocks[i]], row_max[i].to(new.device))
        grown = new > old
        for b in torch.nonzero(grown.any(1)).flatten().tolist():
            for h in range(H):
                if grown[b, h]:
                    o = offsets(torch.full((bs,), b), torch.arange(bs), cols)[:, h, :].to(flat.device)
                    flat[o] = _quantize_per_tensor(flat[o].float() * (old[b, h] / new[b, h]), 1.0, flat.dtype)
        scales.copy_(new)
        stored = _quantize_per_tensor(rows / new[blocks.to(new.device)][..., None].to(rows.device), 1.0, cache.dtype)
    flat[offsets(blocks, offs, cols).to(flat.device)] = stored.to(flat.device)
