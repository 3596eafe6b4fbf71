"""Backends of the aiter-pa ops, as registered with aiter_core's registry.

Registry ops (what ``aiter explain`` lists):

* ``paged_attention``: every decode / MTP / prefill / extend front end ends here with a
  :class:`aiter_pa.core.PagedCall`.
* ``kv_cache_write``: every ``reshape_and_cache*`` op, with a :class:`CacheWrite`.
* ``copy_blocks``.

Backends: ``triton`` (priority 100; CUDA/ROCm, or CPU tensors under ``TRITON_INTERPRET=1``) and
``reference`` (priority 0; PyTorch, any device; syncs with the host, not CUDA-graph safe).
Importing this module is cheap: the adaptors import torch/Triton on first call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

OPS = ("paged_attention", "kv_cache_write", "copy_blocks")
TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0

__all__ = ["OPS", "backend_specs", "family", "triton_supports", "CacheWrite"]


def triton_supports(problem) -> list[str]:
    reasons = triton_device_reasons(problem.device)
    reasons += triton_dtype_reasons(problem.device, (getattr(problem, "dtype", None),))
    if getattr(problem, "high_precision", 1) == 0 and problem.device_type == "cpu" and getattr(
            problem, "kv_dtype", None) is not None and problem.kv_dtype.is_floating_point and problem.kv_dtype.itemsize == 1:
        reasons.append("high_precision=0 (fp8 PV dot) does not run in the Triton interpreter")
    return reasons


def backend_specs() -> list[BackendSpec]:
    triton = specs_for(OPS, backend="triton", impl="aiter_pa.backends:triton_{op}", priority=TRITON_PRIORITY,
                       available=triton_available, supports=triton_supports, cuda_graph=True,
                       description="Triton kernels (CUDA/ROCm; CPU under TRITON_INTERPRET=1)")
    return triton + reference_specs(OPS, "aiter_pa.backends", priority=REFERENCE_PRIORITY)


family = Family(name="pa", distribution="aiter-pa", smoke="aiter_pa.smoke:run", bench="aiter_pa.bench:main",
                ops=OPS)


@dataclass
class CacheWrite:
    """One cache tensor's write: ``src [T, H, D]`` rows to ``slot_mapping`` of ``cache``."""

    src: Any
    cache: Any
    slot_mapping: Any
    addr: Any  # layouts.Addressing
    layout: str
    block_size: int
    num_blocks: int
    mode: int  # triton.cache MODE_*
    scale: Any = None  # per-tensor scale tensor, or the per-token / per-block scale tensor written
    scale_strides: tuple = (0, 0, 0)  # (per block, per head, per token)
    # the other cache of the pair and its layout name, for the reference (it converts whole pairs)
    value_like: Any = None


# -- triton -------------------------------------------------------------------------------------


def triton_paged_attention(call) -> None:
    from .triton.launch import paged_attention_fwd

    paged_attention_fwd(
        call.out, call.query, call.key_cache, call.value_cache, call.info, scale=call.scale,
        max_context_len=call.max_context_len, block_tables=call.block_tables, context_lens=call.context_lens,
        k_quant=int(call.k_quant), v_quant=int(call.v_quant), k_scale=call.k_scale, v_scale=call.v_scale,
        alibi_slopes=call.alibi_slopes, softcap=call.softcap, sliding_window=call.sliding_window,
        qo_indptr=call.qo_indptr, max_qlen=call.max_qlen, kv_indptr=call.kv_indptr,
        kv_last_page_lens=call.kv_last_page_lens, token_lists=call.token_lists, new_k=call.new_k, new_v=call.new_v,
        new_causal=call.new_causal, skip_decode=call.skip_decode, custom_mask=call.custom_mask,
        mask_indptr=call.mask_indptr, mask_prefix=call.mask_prefix, high_precision=call.high_precision,
        num_partitions=call.num_partitions, partition_size=call.partition_size, partials=call.partials,
        num_seqs=call.num_seqs)


def triton_kv_cache_write(w: CacheWrite) -> None:
    from .triton import cache as tc

    if w.mode == tc.MODE_BLOCK:
        tc.block_quant_write(w.src, w.slot_mapping, w.cache, w.addr, w.block_size, w.num_blocks, w.scale,
                             w.scale_strides[0], w.scale_strides[1])
    else:
        tc.write_cache(w.src, w.slot_mapping, w.cache, w.addr, w.block_size, w.mode, w.scale, w.scale_strides,
                       w.num_blocks)


def triton_copy_blocks(cache, block_mapping) -> None:
    from .triton.cache import copy_blocks_launch

    copy_blocks_launch(cache, block_mapping)


# -- reference ----------------------------------------------------------------------------------


def reference_paged_attention(call) -> None:
    import torch

    from .reference import attention_rows_ref, dequantize_cache

    kd, vd = dequantize_cache(call.key_cache, call.value_cache, call.info.layout, call.k_quant, call.v_quant,
                              call.k_scale.tensor if call.k_scale is not None else None,
                              call.v_scale.tensor if call.v_scale is not None else None)
    nb, bs = kd.shape[0], kd.shape[1]
    S = call.num_seqs
    if call.qo_indptr is not None:
        qo = call.qo_indptr.tolist()
        starts = qo[:-1]
        lens = [min(qo[i + 1] - qo[i], call.max_qlen) for i in range(S)]
    else:
        starts = [i * call.max_qlen for i in range(S)]
        lens = [call.max_qlen] * S
    for s in range(S):
        if call.kv_indptr is not None:
            a, b = int(call.kv_indptr[s]), int(call.kv_indptr[s + 1])
            pages = call.block_tables[a:b].long().cpu()
            if call.token_lists:
                ctx = b - a
            else:
                ctx = (b - a - 1) * bs + int(call.kv_last_page_lens[s]) if b > a else 0
        else:
            pages = call.block_tables[s].long().cpu()
            ctx = min(int(call.context_lens[s]), call.max_context_len)
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


def reference_kv_cache_write(w: CacheWrite) -> None:
    import torch

    from .reference import _quantize_per_tensor
    from .triton import cache as tc

    # address the cache through the same formula as the kernels, element by element (slow, exact)
    bs = w.block_size
    keep = (w.slot_mapping.reshape(-1) >= 0) & (w.slot_mapping.reshape(-1) < w.num_blocks * bs)
    src = w.src.reshape(-1, w.src.shape[-2], w.src.shape[-1])
    slots = w.slot_mapping.reshape(-1)[keep].long().cpu()
    rows = src[keep.to(src.device)].float()
    a = w.addr
    H = rows.shape[1]
    flat = w.cache.view(-1) if w.cache.is_contiguous() else None
    if flat is None:
        raise ValueError("the reference cache writer needs contiguous caches")

    def offsets(blocks, offs, cols):
        tok = blocks * a.s_blk + (offs // a.TX) * a.s_t_hi + (offs % a.TX) * a.s_t_lo  # [n]
        col = (cols // a.CX) * a.s_c_hi + (cols % a.CX) * a.s_c_lo  # [c]
        return tok[:, None, None] + torch.arange(H)[None, :, None] * a.s_head + col[None, None, :]

    blocks, offs = slots // bs, slots % bs
    s0, s1, s2 = w.scale_strides
    if w.mode == tc.MODE_INT4:
        qmax = 7.0
        sc = rows.abs().amax(-1).clamp_min(1e-12) / qmax
        qv = torch.floor(rows / sc[..., None] + 0.5).clamp(-8, 7).to(torch.int16) & 0xF
        stored = (qv[..., 0::2] | (qv[..., 1::2] << 4)).to(torch.uint8)
        flat[offsets(blocks, offs, torch.arange(stored.shape[-1])).to(flat.device)] = stored.to(flat.device)
        idx = blocks[:, None] * s0 + torch.arange(H)[None, :] * s1 + offs[:, None] * s2
        torch.as_strided(w.scale, (w.scale.numel(),), (1,))[idx.to(w.scale.device)] = sc.to(w.scale.device)
        return
    cols = torch.arange(rows.shape[-1])
    if w.mode == tc.MODE_CAST:
        flat[offsets(blocks, offs, cols).to(flat.device)] = w.src.reshape(src.shape)[keep.to(src.device)].to(flat.dtype)
        return
    if w.mode == tc.MODE_PER_TENSOR:
        stored = _quantize_per_tensor(rows, w.scale, w.cache.dtype)
    elif w.mode == tc.MODE_PER_TOKEN:
        from aiter_core.dtypes import dtype_max

        sc = rows.abs().amax(-1).clamp_min(1e-12) / dtype_max(w.cache.dtype)
        stored = _quantize_per_tensor(rows / sc[..., None], 1.0, w.cache.dtype)
        idx = blocks[:, None] * s0 + torch.arange(H)[None, :] * s1 + offs[:, None] * s2
        torch.as_strided(w.scale, (w.scale.numel(),), (1,))[idx.to(w.scale.device)] = sc.to(w.scale.device)
    else:  # MODE_BLOCK: grow the scales, re-quantize grown blocks, write
        from aiter_core.dtypes import dtype_max

        qmax = dtype_max(w.cache.dtype)
        scales = torch.as_strided(w.scale, (w.num_blocks, H), (s0, s1))
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
        stored = _quantize_per_tensor(rows / new[blocks.to(new.device)][..., None].to(rows.device), 1.0, w.cache.dtype)
    flat[offsets(blocks, offs, cols).to(flat.device)] = stored.to(flat.device)


def reference_copy_blocks(cache, block_mapping) -> None:
    for s, d in block_mapping.to("cpu").long().tolist():
        cache[d] = cache[s].clone()
