"""``flash_attn_with_kvcache``: decode / append against a KV cache (upstream spec §1.7, FA2 API).

Steps, all device-side (no host sync, so it can be captured in a CUDA graph):
1. optional rotary embedding of the new k (at positions ``cache_seqlens + i``) and of q (same
   positions when causal or windowed, else all at ``cache_seqlens``), interleaved (GPT-J) or
   not (GPT-NeoX), on the first ``2 * rotary_cos.shape[1]`` channels;
2. in-place append of the new k/v into the cache at ``cache_seqlens`` (paged through
   ``block_table``, or rows ``cache_batch_idx`` of a contiguous cache);
3. attention of q over ``cache_seqlens + seqlen_new`` keys through ``torch.ops.aiter.mha_varlen_fwd``.
   A contiguous cache is handed to it as a paged cache with one page per row
   (``page_block_size = cache capacity``), so both forms share one kernel path.

The caller guarantees ``cache_seqlens + seqlen_new <= capacity`` (checking it would need a host
sync). ``cache_leftpad`` is not supported. No backward.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from ._checks import (
    check_bool,
    check_dtype,
    check_float,
    check_gqa,
    check_head_dims,
    check_int,
    check_int32_vector,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    check_tensor,
    dtype_name,
)
from .api import (
    HIGH_PRECISION_DTYPES,
    MAX_HEAD_DIM,
    MIN_HEAD_DIM,
    _check_alibi,
    _check_sink,
    _softmax_scale,
    _window,
)

Tensor = torch.Tensor

__all__ = ["flash_attn_with_kvcache", "apply_rotary"]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor, positions: Tensor, *, interleaved: bool) -> Tensor:
    """Rotate the first ``2 * cos.shape[1]`` channels of x (B, S, H, D) at ``positions`` (B, S).

    ``interleaved``: channel pairs (2i, 2i+1) (GPT-J); otherwise halves (i, i + rd/2) (GPT-NeoX).
    Computed in fp32, returned in x's dtype; channels past the rotary dim pass through.
    """
    half = cos.shape[1]
    rot = 2 * half
    c = cos.float()[positions][:, :, None, :]  # (B, S, 1, rd/2)
    s = sin.float()[positions][:, :, None, :]
    xr = x[..., :rot].float()
    if interleaved:
        x0, x1 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    else:
        x0, x1 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1)
    if rot == x.shape[-1]:
        return rotated.to(x.dtype)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)


def _check_cache(name: str, cache, paged: bool) -> None:
    check_tensor(name, cache)
    layout = "(num_blocks, page_block_size, heads_kv, head_dim) paged cache" if paged else "(batch_cache, seqlen_cache, heads_kv, head_dim)"
    check_ndim(name, cache, 4, layout)
    check_last_dim_contiguous(name, cache)


def _seqlens_tensor(cache_seqlens, batch: int, device, default: Optional[int]) -> Tensor:
    if cache_seqlens is None:
        if default is None:
            raise TypeError("cache_seqlens must be an int or an int32 tensor (batch,) with a paged cache, got None")
        return torch.full((batch,), default, dtype=torch.int32, device=device)
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        check_int("cache_seqlens", cache_seqlens, minimum=0)
        return torch.full((batch,), cache_seqlens, dtype=torch.int32, device=device)
    check_int32_vector("cache_seqlens", cache_seqlens, batch, device=device)
    return cache_seqlens


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[int, Tensor, None] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    num_splits: int = 0,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    rotary_interleaved: bool = True,
    return_softmax_lse: bool = False,
    *,
    sink_ptr: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """Attention of q (B, Sq, Hq, D) over a KV cache, appending k/v (B, Snew, Hk, D) first.

    Caches: contiguous ``(B_cache, S_cache, Hk, D)`` (rows picked by ``cache_batch_idx`` (B,)
    int32, default row b) or paged ``(num_blocks, page_block_size, Hk, D)`` with ``block_table``
    (B, max_blocks) int32. ``cache_seqlens``: int or (B,) int32, the valid length before the
    append (None = the whole contiguous cache). Rotary tables ``(seqlen_ro, rotary_dim / 2)``.
    Returns ``out (B, Sq, Hq, Dv)``, plus ``softmax_lse (B, Hq, Sq)`` fp32 when asked.
    ``num_splits`` is accepted and ignored. Extensions: ``sink_ptr`` (attention sinks) and
    ``backend``.
    """
    paged = block_table is not None
    check_tensor("q", q)
    check_ndim("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    check_dtype("q", q, HIGH_PRECISION_DTYPES)
    check_last_dim_contiguous("q", q)
    _check_cache("k_cache", k_cache, paged)
    _check_cache("v_cache", v_cache, paged)
    for name, x in (("k_cache", k_cache), ("v_cache", v_cache)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(q.dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
    check_same_device("q", q, k_cache=k_cache, v_cache=v_cache)
    batch, seqlen_q, heads_q, dim = q.shape
    heads_kv, dim_v = k_cache.shape[2], v_cache.shape[3]
    if k_cache.shape[3] != dim:
        raise ValueError(f"k_cache must have head dim {dim} (the head dim of q), got {k_cache.shape[3]}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"v_cache must have leading dims {tuple(k_cache.shape[:3])} (those of k_cache), got {tuple(v_cache.shape[:3])}")
    check_head_dims(dim, dim_v, minimum=MIN_HEAD_DIM, maximum=MAX_HEAD_DIM)
    check_gqa(heads_q, heads_kv, k_name="k_cache")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad must be None: left padding of the cache is not supported")
    check_int("num_splits", num_splits, minimum=0)
    check_bool("causal", causal)
    check_bool("rotary_interleaved", rotary_interleaved)
    check_bool("return_softmax_lse", return_softmax_lse)
    softcap = check_float("softcap", softcap, minimum=0.0)

    if paged:
        check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must have dtype int32, got {dtype_name(block_table.dtype)}")
        check_ndim("block_table", block_table, 2, "(batch, max_blocks_per_seq)")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (the batch of q), got {block_table.shape[0]}")
        check_same_device("q", q, block_table=block_table)
        check_last_dim_contiguous("block_table", block_table)
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx must be None with a paged cache (block_table picks the pages), got a tensor")
        capacity = block_table.shape[1] * k_cache.shape[1]
        table = block_table
    else:
        capacity = k_cache.shape[1]
        if cache_batch_idx is not None:
            check_int32_vector("cache_batch_idx", cache_batch_idx, batch, device=q.device)
            rows = cache_batch_idx
        else:
            if k_cache.shape[0] < batch:
                raise ValueError(f"k_cache must have at least {batch} rows (the batch of q), got {k_cache.shape[0]}")
            rows = torch.arange(batch, dtype=torch.int32, device=q.device)
        table = rows.reshape(batch, 1)  # one page per sequence: the whole cache row
    lens = _seqlens_tensor(cache_seqlens, batch, q.device, None if paged else capacity)

    seqlen_new = 0
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together, got k={'None' if k is None else 'a tensor'} and v={'None' if v is None else 'a tensor'}")
    if k is not None:
        if cache_seqlens is None:
            raise TypeError("cache_seqlens must be an int or an int32 tensor (batch,) when appending k/v, got None")
        for name, x, d in (("k", k, dim), ("v", v, dim_v)):
            check_tensor(name, x)
            check_ndim(name, x, 4, "(batch, seqlen_new, heads_kv, head_dim)")
            if x.dtype != q.dtype:
                raise TypeError(f"{name} must have dtype {dtype_name(q.dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
            if x.shape[0] != batch or x.shape[2] != heads_kv or x.shape[3] != d:
                raise ValueError(f"{name} must have shape ({batch}, seqlen_new, {heads_kv}, {d}), got {tuple(x.shape)}")
            check_same_device("q", q, **{name: x})
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v must have seqlen_new {k.shape[1]} (that of k), got {v.shape[1]}")
        seqlen_new = k.shape[1]
        if seqlen_new > capacity:
            raise ValueError(f"k must have at most {capacity} new tokens (the cache capacity), got {seqlen_new}")

    window = _window(window_size, causal, capacity)
    local = causal or window[0] >= 0 or window[1] >= 0
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos must be None when no new k/v are appended (k, v are None)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t)
            check_ndim(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
            check_dtype(name, t, HIGH_PRECISION_DTYPES)
            check_same_device("q", q, **{name: t})
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have shape {tuple(rotary_cos.shape)} (that of rotary_cos), got {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > dim:
            raise ValueError(f"rotary_cos must have at most {dim // 2} columns (rotary_dim = 2 x columns <= head dim {dim}), got {rotary_cos.shape[1]}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos must have at least {capacity} positions (the cache capacity), got {rotary_cos.shape[0]}")
    _check_alibi(alibi_slopes, q, batch, heads_q)
    _check_sink(sink_ptr, q, heads_q)
    scale = _softmax_scale(softmax_scale, dim)

    if k is not None:
        positions = lens.to(torch.int64)[:, None] + torch.arange(seqlen_new, device=q.device)[None, :]  # (B, Snew)
        if rotary_cos is not None:
            k = apply_rotary(k, rotary_cos, rotary_sin, positions, interleaved=rotary_interleaved)
            if local:
                q_pos = lens.to(torch.int64)[:, None] + torch.arange(seqlen_q, device=q.device)[None, :]
            else:
                q_pos = lens.to(torch.int64)[:, None].expand(batch, seqlen_q)
            q = apply_rotary(q, rotary_cos, rotary_sin, q_pos, interleaved=rotary_interleaved)
        page = k_cache.shape[1]
        blocks = torch.gather(table.to(torch.int64), 1, positions // page) if paged else table.to(torch.int64).expand(batch, seqlen_new)
        slots = positions % page if paged else positions
        k_cache[blocks, slots] = k
        v_cache[blocks, slots] = v
        lens = lens + seqlen_new

    cu_q = torch.arange(0, (batch + 1) * seqlen_q, seqlen_q, dtype=torch.int32, device=q.device)
    cu_k = torch.zeros(batch + 1, dtype=torch.int32, device=q.device)
    cu_k[1:] = torch.cumsum(lens, 0).to(torch.int32)
    q_packed = q.reshape(batch * seqlen_q, heads_q, dim)
    out, lse, _, _ = torch.ops.aiter.mha_varlen_fwd(
        q_packed, k_cache, v_cache, cu_q, cu_k, seqlen_q, capacity, 0, 0.0, scale, softcap, False, causal, window[0],
        window[1], window[2], return_softmax_lse, False, block_table=table, alibi_slopes=alibi_slopes,
        sink_ptr=sink_ptr, seqlens_k=lens.to(torch.int32), backend=backend,
    )
    out = out.reshape(batch, seqlen_q, heads_q, dim_v)
    if return_softmax_lse:
        return out, lse.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()
    return out
