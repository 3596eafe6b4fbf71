"""Paged KV-cache layouts: names, allocation, conversion, and how kernels address them.

Four layouts (spec 2.1), ``C`` = storage columns per row (``head_dim``, or ``head_dim // 2`` for
packed int4), ``x = 16 // element_size`` (8 for bf16/fp16, 16 for 8-bit and packed int4, 4 fp32):

=================  ======================================  ======================================
layout             key_cache                               value_cache
=================  ======================================  ======================================
``"NHD"``          ``[num_blocks, block_size, Hk, C]``     same  (upstream "flash")
``"HND"``          ``[num_blocks, Hk, block_size, C]``     same
``"vllm"``         ``[num_blocks, Hk, C/x, block_size, x]`` ``[num_blocks, Hk, C, block_size]``
``"vllm_shuffled"`` same as vllm                           ``[num_blocks, Hk, block_size/x, C, x]``
=================  ======================================  ======================================

Conventions shared by every op of the package:

* ``block_tables [num_seqs, max_blocks_per_seq]`` int32: logical block ``i`` of sequence ``s``
  lives in physical block ``block_tables[s, i]``. Entries that are negative or ``>= num_blocks``
  are padding: kernels skip their tokens (never read them).
* ``context_lens [num_seqs]`` int32: KV tokens of each sequence (the query tokens included for
  decode/MTP). Token ``t`` is at ``(block_tables[s, t // block_size], t % block_size)``.
* ``slot_mapping [num_tokens]`` int32/int64: ``slot = block * block_size + offset``; a negative slot
  (padding) or one past the end of the cache is not written.
* Quantization scales are dequantization scales (``x = stored * scale``). Per-token scales may be
  given as ``[Hk, num_blocks * block_size]`` (aiter_core's ``[Hk, T]``, indexed by slot),
  ``[num_blocks * block_size, Hk]`` (upstream HIP) or ``[num_blocks, Hk, block_size]`` (upstream
  ASM / Triton). Per-head ``[Hk]``, per-tensor ``[1]`` (or 0-d).
"""

from __future__ import annotations

from functools import lru_cache
from typing import NamedTuple

import torch

from aiter_core.quant import KVQuant, kv_storage_dtype
from aiter_core.triton_utils import max_element_offset

__all__ = [
    "LAYOUTS",
    "Addressing",
    "PagedKV",
    "ScaleAddressing",
    "normalize_layout",
    "vector_width",
    "describe_kv_cache",
    "describe_geometry",
    "allocate_kv_cache",
    "kv_cache_shapes",
    "to_nhd",
    "from_nhd",
    "convert_kv_cache",
    "asm_V_shuffle",
    "scale_addressing",
    "gather_tokens",
]

LAYOUTS = ("NHD", "HND", "vllm", "vllm_shuffled")
_ALIASES = {"nhd": "NHD", "flash": "NHD", "hnd": "HND", "vllm": "vllm", "hip": "vllm", "vllm_shuffled": "vllm_shuffled",
            "asm": "vllm_shuffled", "shuffled": "vllm_shuffled"}


def normalize_layout(layout: str) -> str:
    if not isinstance(layout, str) or layout.lower() not in _ALIASES:
        raise ValueError(f"kv cache layout must be one of {LAYOUTS} (aliases: flash=NHD, hip=vllm, asm=vllm_shuffled), "
                         f"got {layout!r}")
    return _ALIASES[layout.lower()]


def vector_width(dtype: torch.dtype) -> int:
    """vLLM's ``x``: elements per 16 bytes."""
    return max(1, 16 // dtype.itemsize)


class Addressing(NamedTuple):
    """Address parameters of one cache tensor (see aiter_core.triton_attn's docstring)."""

    s_blk: int
    s_head: int
    TX: int
    s_t_hi: int
    s_t_lo: int
    CX: int
    s_c_hi: int
    s_c_lo: int


class PagedKV(NamedTuple):
    layout: str
    num_blocks: int
    block_size: int
    num_kv_heads: int
    cols: int  # storage columns (head_dim, or head_dim // 2 for packed int4)
    k: Addressing
    v: Addressing
    v_cols: int | None = None  # V's storage columns when they differ from K's (NHD/HND only)
    # the largest element offset from either cache's data pointer (-1 for empty caches): under
    # 2**31 the kernels address both with int32 arithmetic
    max_offset: int = -1


def _nhd_like(shape, stride, layout: str) -> Addressing:
    if layout == "NHD":  # [nb, bs, H, C]
        return Addressing(stride[0], stride[2], shape[1], 0, stride[1], shape[3], 0, stride[3])
    return Addressing(stride[0], stride[1], shape[2], 0, stride[2], shape[3], 0, stride[3])  # HND


def describe_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, layout: str | None = None) -> PagedKV:
    """Layout, sizes and addressing of a (key_cache, value_cache) pair; ValueError on mismatch.

    A 5-D key cache is the vLLM layout (the value cache's rank tells plain from shuffled V);
    4-D caches need ``layout`` "NHD" or "HND" (default "HND", as upstream's Triton decode).
    The result depends on the shapes and strides only and is cached per geometry
    (:func:`describe_geometry`).
    """
    if not isinstance(key_cache, torch.Tensor) or not isinstance(value_cache, torch.Tensor):
        raise TypeError("key_cache and value_cache must be tensors")
    return describe_geometry(key_cache.shape, key_cache.stride(), value_cache.shape, value_cache.stride(), layout)


@lru_cache(maxsize=256)
def describe_geometry(kshape: tuple, kstride: tuple, vshape: tuple, vstride: tuple, layout: str | None) -> PagedKV:
    """:func:`describe_kv_cache` from the caches' shapes and strides (cached: a serving process
    has a handful of cache geometries, and a decode call pays a dict lookup instead of building
    the addressing again)."""
    max_offset = max(max_element_offset(kshape, kstride), max_element_offset(vshape, vstride))
    if len(kshape) == 5:
        nb, H, cx_groups, bs, x = kshape
        C = cx_groups * x
        if len(vshape) == 4:
            if tuple(vshape) != (nb, H, C, bs):
                raise ValueError(f"value_cache for the vllm layout must be [num_blocks, Hk, head_dim, block_size] = "
                                 f"{(nb, H, C, bs)}, got {tuple(vshape)}")
            name = "vllm"
            v = Addressing(vstride[0], vstride[1], bs, 0, vstride[3], C, 0, vstride[2])
        elif len(vshape) == 5:
            vx = vshape[4]
            if vx == 0 or bs % vx or tuple(vshape) != (nb, H, bs // vx, C, vx):
                raise ValueError(f"shuffled value_cache must be [num_blocks, Hk, block_size/x, head_dim, x] with x="
                                 f"{x} -> {(nb, H, bs // x if x else 0, C, x)}, got {tuple(vshape)}")
            name = "vllm_shuffled"
            v = Addressing(vstride[0], vstride[1], vx, vstride[2], vstride[4], C, 0, vstride[3])
        else:
            raise ValueError(f"value_cache must be 4-D or 5-D with a 5-D key_cache, got {len(vshape)}-D")
        if layout is not None and normalize_layout(layout) != name:
            raise ValueError(f"kv_cache_layout={layout!r} does not match 5-D caches (layout {name!r})")
        k = Addressing(kstride[0], kstride[1], bs, 0, kstride[3], x, kstride[2], kstride[4])
        return PagedKV(name, nb, bs, H, C, k, v, None, max_offset)
    if len(kshape) != 4:
        raise ValueError(f"key_cache must be 4-D (NHD/HND) or 5-D (vllm), got shape {tuple(kshape)}")
    name = normalize_layout(layout or "HND")
    if name not in ("NHD", "HND"):
        raise ValueError(f"4-D caches are NHD or HND, got layout {layout!r}")
    if len(vshape) != 4 or tuple(vshape[:3]) != tuple(kshape[:3]):
        raise ValueError(f"value_cache must have the key_cache's shape {tuple(kshape)} in layout {name} "
                         f"(the head dim may differ), got {tuple(vshape)}")
    if name == "NHD":
        nb, bs, H, C = kshape
    else:
        nb, H, bs, C = kshape
    v_cols = vshape[3]
    return PagedKV(name, nb, bs, H, C, _nhd_like(kshape, kstride, name), _nhd_like(vshape, vstride, name),
                   v_cols if v_cols != C else None, max_offset)


def kv_cache_shapes(num_blocks: int, block_size: int, num_kv_heads: int, cols: int, dtype: torch.dtype,
                    layout: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(key_cache shape, value_cache shape) of ``layout`` with ``cols`` storage columns."""
    layout = normalize_layout(layout)
    if layout == "NHD":
        s = (num_blocks, block_size, num_kv_heads, cols)
        return s, s
    if layout == "HND":
        s = (num_blocks, num_kv_heads, block_size, cols)
        return s, s
    x = vector_width(dtype)
    if cols % x:
        raise ValueError(f"the vllm layout needs head_dim (storage columns {cols}) divisible by x={x} for {dtype}")
    k = (num_blocks, num_kv_heads, cols // x, block_size, x)
    if layout == "vllm":
        return k, (num_blocks, num_kv_heads, cols, block_size)
    if block_size % x:
        raise ValueError(f"the shuffled-V layout needs block_size divisible by x={x} for {dtype}, got {block_size}")
    return k, (num_blocks, num_kv_heads, block_size // x, cols, x)


def allocate_kv_cache(num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                      layout: str = "HND", device: str | torch.device = "cpu",
                      quant: KVQuant | int = KVQuant.NONE) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (key_cache, value_cache) of ``layout``. ``dtype`` is the model dtype for
    ``quant=NONE`` and the 8-bit storage dtype (fp8/int8) for the 8-bit methods; int4 stores uint8
    with ``head_dim // 2`` columns."""
    quant = KVQuant(quant)
    store = dtype if quant == KVQuant.NONE else kv_storage_dtype(quant, dtype if quant != KVQuant.PER_TOKEN_4BIT else None)
    cols = head_dim // 2 if quant == KVQuant.PER_TOKEN_4BIT else head_dim
    ks, vs = kv_cache_shapes(num_blocks, block_size, num_kv_heads, cols, store, layout)
    return torch.empty(ks, dtype=store, device=device), torch.empty(vs, dtype=store, device=device)


def to_nhd(key_cache: torch.Tensor, value_cache: torch.Tensor, layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Any layout -> NHD ``[num_blocks, block_size, Hk, C]`` views (copies for the vllm layouts)."""
    info = describe_kv_cache(key_cache, value_cache, layout)
    if info.layout == "NHD":
        return key_cache, value_cache
    if info.layout == "HND":
        return key_cache.transpose(1, 2), value_cache.transpose(1, 2)
    nb, H, g, bs, x = key_cache.shape
    k = key_cache.permute(0, 3, 1, 2, 4).reshape(nb, bs, H, g * x)
    if info.layout == "vllm":
        v = value_cache.permute(0, 3, 1, 2)
    else:
        v = value_cache.permute(0, 2, 4, 1, 3).reshape(nb, bs, H, info.cols)
    return k, v


def from_nhd(key_nhd: torch.Tensor, value_nhd: torch.Tensor, layout: str) -> tuple[torch.Tensor, torch.Tensor]:
    """NHD ``[num_blocks, block_size, Hk, C]`` -> contiguous caches of ``layout``."""
    layout = normalize_layout(layout)
    nb, bs, H, C = key_nhd.shape
    if layout == "NHD":
        return key_nhd.contiguous(), value_nhd.contiguous()
    if layout == "HND":
        return key_nhd.transpose(1, 2).contiguous(), value_nhd.transpose(1, 2).contiguous()
    ks, vs = kv_cache_shapes(nb, bs, H, C, key_nhd.dtype, layout)
    x = ks[-1]
    k = key_nhd.reshape(nb, bs, H, C // x, x).permute(0, 2, 3, 1, 4).contiguous()
    if layout == "vllm":
        v = value_nhd.permute(0, 2, 3, 1).contiguous()
    else:
        v = value_nhd.reshape(nb, bs // x, x, H, C).permute(0, 3, 1, 4, 2).contiguous()
    return k, v


def convert_kv_cache(key_cache: torch.Tensor, value_cache: torch.Tensor, dst_layout: str,
                     src_layout: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Copy a cache pair into ``dst_layout`` (``src_layout`` only needed for 4-D sources)."""
    k, v = to_nhd(key_cache, value_cache, src_layout)
    return from_nhd(k, v, dst_layout)


def asm_V_shuffle(value_cache: torch.Tensor) -> torch.Tensor:  # noqa: N802 (upstream's test helper name)
    """vLLM V ``[nb, Hk, D, bs]`` -> shuffled V ``[nb, Hk, bs/x, D, x]`` (a copy)."""
    nb, H, D, bs = value_cache.shape
    x = vector_width(value_cache.dtype)
    if bs % x:
        raise ValueError(f"block_size {bs} must be divisible by x={x}")
    return value_cache.reshape(nb, H, D, bs // x, x).permute(0, 1, 3, 2, 4).contiguous()


class ScaleAddressing(NamedTuple):
    tensor: torch.Tensor
    s_blk: int
    s_head: int
    s_tok: int


def scale_addressing(scale: torch.Tensor | None, method: KVQuant, num_blocks: int, block_size: int,
                     num_kv_heads: int, name: str) -> ScaleAddressing | None:
    """Strides that map (physical block, head, offset) to ``scale``'s element; ValueError when the
    shape fits no accepted form of ``method`` (see the module docstring)."""
    method = KVQuant(method)
    if method == KVQuant.NONE:
        return None
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be a float32 tensor for {method.name}, got {type(scale).__name__}")
    if scale.dtype != torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    T = num_blocks * block_size
    shape = tuple(scale.shape)
    if method == KVQuant.PER_TENSOR_8BIT:
        if scale.numel() != 1:
            raise ValueError(f"{name} for per-tensor quantization must have one element, got shape {shape}")
        return ScaleAddressing(scale, 0, 0, 0)
    if method == KVQuant.PER_HEAD_8BIT:
        if shape != (num_kv_heads,):
            raise ValueError(f"{name} for per-head quantization must be [num_kv_heads] = ({num_kv_heads},), got {shape}")
        return ScaleAddressing(scale, 0, scale.stride(0), 0)
    if shape == (num_kv_heads, T):
        return ScaleAddressing(scale, block_size * scale.stride(1), scale.stride(0), scale.stride(1))
    if shape == (T, num_kv_heads):
        return ScaleAddressing(scale, block_size * scale.stride(0), scale.stride(1), scale.stride(0))
    if shape == (num_blocks, num_kv_heads, block_size):
        return ScaleAddressing(scale, scale.stride(0), scale.stride(1), scale.stride(2))
    raise ValueError(f"{name} for per-token quantization must be [Hk, num_blocks*block_size] = {(num_kv_heads, T)}, "
                     f"[num_blocks*block_size, Hk] = {(T, num_kv_heads)} or [num_blocks, Hk, block_size] = "
                     f"{(num_blocks, num_kv_heads, block_size)}, got {shape}")


def gather_tokens(cache_nhd: torch.Tensor, block_table_row: torch.Tensor, length: int) -> torch.Tensor:
    """Tokens ``0..length-1`` of one sequence from an NHD cache -> ``[length, Hk, C]`` (reference use)."""
    bs = cache_nhd.shape[1]
    t = torch.arange(length, device=cache_nhd.device)
    blocks = block_table_row.to(cache_nhd.device).long()[t // bs]
    return cache_nhd[blocks, t % bs]
