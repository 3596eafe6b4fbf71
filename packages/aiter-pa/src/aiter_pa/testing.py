"""Random paged-attention problems for the tests, the smoke test and the benchmark.

:func:`make_paged_kv` builds a cache pair in any layout and quantization with random block
tables (each sequence gets distinct random blocks; optional padding entries), plus the fp32
dequantized NHD copy the reference reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from aiter_core.quant import KVQuant, quantize_kv

from .layouts import describe_kv_cache, from_nhd, vector_width

__all__ = ["PagedKVCase", "make_paged_kv", "scale_in_form"]


@dataclass
class PagedKVCase:
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    layout: str
    quant: KVQuant
    k_scale: torch.Tensor | None  # in aiter_core's form: [1], [Hk] or [Hk, T]
    v_scale: torch.Tensor | None
    k_deq: torch.Tensor  # NHD [nb, bs, Hk, D]: fp32 dequantized, or the 16/32-bit cache values
    v_deq: torch.Tensor
    block_tables: torch.Tensor  # int32 [S, max_blocks]
    context_lens: torch.Tensor  # int32 [S]
    block_size: int
    num_blocks: int

    @property
    def layout_arg(self) -> str | None:
        return self.layout if self.layout in ("NHD", "HND") else None


def scale_in_form(scale: torch.Tensor | None, form: str, num_blocks: int, block_size: int) -> torch.Tensor | None:
    """Per-token scale ``[Hk, T]`` -> ``"core"`` (same), ``"hip"`` ``[T, Hk]`` or ``"asm"``
    ``[nb, Hk, bs]``; other scales unchanged."""
    if scale is None or scale.dim() != 2 or form == "core":
        return scale
    H = scale.shape[0]
    if form == "hip":
        return scale.transpose(0, 1).contiguous()
    if form == "asm":
        return scale.reshape(H, num_blocks, block_size).permute(1, 0, 2).contiguous()
    raise ValueError(f"unknown scale form {form!r}")


def make_paged_kv(context_lens: list[int], num_kv_heads: int, head_dim: int, block_size: int, layout: str = "HND",
                  quant: KVQuant = KVQuant.NONE, dtype: torch.dtype = torch.float16, store_dtype=None,
                  device="cpu", extra_blocks: int = 2, pad_entries: bool = True, seed: int = 0,
                  head_dim_v: int | None = None) -> PagedKVCase:
    g = torch.Generator(device=device).manual_seed(seed)
    quant = KVQuant(quant)
    need = [-(-c // block_size) for c in context_lens]
    max_blocks = max(need + [1]) + (1 if pad_entries else 0)
    num_blocks = sum(need) + extra_blocks
    if quant != KVQuant.NONE and layout in ("vllm", "vllm_shuffled"):
        x = 16 if quant == KVQuant.PER_TOKEN_4BIT else vector_width(store_dtype or torch.float8_e4m3fn)
        if layout == "vllm_shuffled" and block_size % x:
            raise ValueError(f"block_size {block_size} must be a multiple of x={x} for the shuffled layout")
    T = num_blocks * block_size
    dv = head_dim_v or head_dim
    from aiter_core.quant import dequantize_kv

    def draw(width):
        # drawn on the target device, one tensor at a time (a benchmark cache is GBs)
        x = torch.randn(T, num_kv_heads, width, generator=g, device=device)
        if quant == KVQuant.NONE:
            stored, scale = x.to(dtype), None
            deq = stored  # 16-bit values are read exactly by the reference: no fp32 copy
        else:
            stored, scale = quantize_kv(x, quant, store_dtype)
            del x
            deq = dequantize_kv(stored, scale, quant)
        return stored, scale, deq.reshape(num_blocks, block_size, num_kv_heads, width)

    ks, ksc, k_deq = draw(head_dim)
    vs, vsc, v_deq = draw(dv)
    kc, vc = from_nhd(ks.reshape(num_blocks, block_size, num_kv_heads, -1),
                      vs.reshape(num_blocks, block_size, num_kv_heads, -1), layout)
    perm = torch.randperm(num_blocks, generator=g, device=device).cpu()
    bt = torch.full((len(context_lens), max_blocks), -1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(need):
        bt[s, :n] = perm[used:used + n].to(torch.int32)
        used += n
    if pad_entries and len(context_lens) > 0:
        bt[0, -1] = num_blocks + 5  # an out-of-range id past the context: must never be read
    describe_kv_cache(kc, vc, layout if layout in ("NHD", "HND") else None)  # validates the pair
    to = lambda t: None if t is None else t.to(device)  # noqa: E731
    return PagedKVCase(kc, vc, layout, quant, to(ksc), to(vsc), k_deq, v_deq, bt.to(device),
                       torch.tensor(context_lens, dtype=torch.int32, device=device), block_size, num_blocks)


def relocate_to_pool_end(kv: PagedKVCase, total_blocks: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``kv``'s blocks copied to the end of a pool of ``total_blocks`` (the rest left uninitialised)
    and its block tables remapped, padding (-1) kept: ``(key_cache, value_cache, block_tables)``.
    A pool past 2**31 elements makes the kernels address with int64 offsets. Methods whose scales
    are per block slot (per token, int4) are refused: their scales would need moving too."""
    if kv.quant in (KVQuant.PER_TOKEN_8BIT, KVQuant.PER_TOKEN_4BIT):
        raise ValueError(f"relocate_to_pool_end: per-slot scales ({kv.quant.name}) are not relocated")
    if total_blocks < kv.num_blocks:
        raise ValueError(f"total_blocks must be >= {kv.num_blocks}, got {total_blocks}")
    shift = total_blocks - kv.num_blocks
    caches = []
    for cache in (kv.key_cache, kv.value_cache):
        pool = torch.empty((total_blocks,) + tuple(cache.shape[1:]), dtype=cache.dtype, device=cache.device)
        pool[shift:] = cache
        caches.append(pool)
    tables = torch.where(kv.block_tables >= 0, kv.block_tables + shift, kv.block_tables)
    return caches[0], caches[1], tables
