"""The one internal paged-attention call every front end builds, its checks and its dispatch.

:class:`PagedCall` carries already-validated tensors; :func:`run_paged` picks a backend
(``triton`` or ``reference``) through aiter_core's registry (op ``"paged_attention"``) and runs it.

What is checked on the host (cheap, no device sync): ranks, shapes, dtypes, devices, head
counts (GQA divisibility), head dims, scale shapes, block-table width against
``max_context_len``, workspace sizes. What is not checked (it would need a device sync): the
values inside ``block_tables`` / page indices (out-of-range or negative ids are skipped by the
kernel: their tokens are treated as padding), ``context_lens`` values (clamped to
``max_context_len`` by the kernel), and ``qo_indptr`` / ``kv_indptr`` monotonicity.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from aiter_core.checks import check_ndim, check_tensor
from aiter_core.quant import KVQuant
from aiter_core.registry import Problem, dispatch

from .layouts import PagedKV, ScaleAddressing, describe_kv_cache, scale_addressing

__all__ = ["PagedCall", "run_paged", "split_head_dim", "head_dim_supported", "kv_quant_for", "check_query", "FP8_DTYPES", "SUPPORTED_HEAD_DIMS",
           "check_int_tensor"]

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
                   if hasattr(torch, n))
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
MAX_SPLIT_HEAD_DIM = 576
SUPPORTED_HEAD_DIMS = ("q/k head dims 1..256, or a power of two up to 512 plus a power-of-two rest >= 16 "
                       "(288 = 256 + 32, 576 = 512 + 64); v head dims 1..512")


def split_head_dim(d: int) -> tuple[int, int]:
    """(first chunk, second chunk) of a q/k head dim as the kernel runs it: ``(d, 0)`` when ``d``
    is a power of two or fits no split, else the largest power of two below it plus a
    power-of-two rest >= 16 (576 -> 512 + 64, 288 -> 256 + 32, 192 -> 128 + 64, 80 -> 64 + 16)."""
    p = 1
    while p < d:
        p *= 2
    if p == d or d < 32:
        return d, 0
    p //= 2
    rest = d - p
    if rest >= 16 and rest & (rest - 1) == 0:
        return p, rest
    return d, 0


def head_dim_supported(d: int) -> bool:
    return 1 <= d <= MAX_HEAD_DIM or (d <= MAX_SPLIT_HEAD_DIM and split_head_dim(d)[1] > 0)


@dataclass
class PagedCall:
    out: torch.Tensor
    query: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    info: PagedKV
    scale: float
    max_context_len: int
    block_tables: torch.Tensor | None = None
    context_lens: torch.Tensor | None = None
    k_quant: KVQuant = KVQuant.NONE
    v_quant: KVQuant = KVQuant.NONE
    k_scale: ScaleAddressing | None = None
    v_scale: ScaleAddressing | None = None
    alibi_slopes: torch.Tensor | None = None
    softcap: float = 0.0
    sliding_window: int = 0
    qo_indptr: torch.Tensor | None = None
    max_qlen: int = 1
    kv_indptr: torch.Tensor | None = None
    kv_last_page_lens: torch.Tensor | None = None
    token_lists: bool = False
    new_k: torch.Tensor | None = None
    new_v: torch.Tensor | None = None
    new_causal: bool = True
    skip_decode: bool = False
    custom_mask: torch.Tensor | None = None  # uint8 flags, extend only
    mask_indptr: torch.Tensor | None = None
    mask_prefix: bool = False  # apply the custom mask to the prefix keys too
    high_precision: int = 1
    num_partitions: int | None = None
    partition_size: int | None = None
    partials: tuple | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def num_seqs(self) -> int:
        if self.kv_indptr is not None:
            return self.kv_indptr.shape[0] - 1
        return self.block_tables.shape[0]

    def problem(self) -> Problem:
        return Problem(op="paged_attention", device=self.query.device, device_type=self.query.device.type,
                       dtype=self.query.dtype, kv_dtype=self.key_cache.dtype, head_dim=self.query.shape[-1],
                       head_dim_v=self.out.shape[-1], k_quant=KVQuant(self.k_quant), v_quant=KVQuant(self.v_quant),
                       high_precision=self.high_precision, prefill=self.new_k is not None, layout=self.info.layout)


def run_paged(call: PagedCall, backend: str | None = None) -> torch.Tensor:
    impl = dispatch("paged_attention", call.problem(), backend=backend)
    impl(call)
    return call.out


def check_int_tensor(name: str, t, dims: int | None = None, device=None) -> torch.Tensor:
    """An int32 or int64 tensor (block tables, slot mappings), optionally of a rank and on a device."""
    return check_tensor(name, t, ndim=dims, dtypes=(torch.int32, torch.int64), device=device)


def check_query(name: str, q, dims: int = 3) -> torch.Tensor:
    check_tensor(name, q)
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 (fp8 queries are not supported), got {q.dtype}")
    check_ndim(name, q, dims, "[tokens, heads, head_dim]")
    if not head_dim_supported(q.shape[-1]):
        raise ValueError(f"{name} head_dim {q.shape[-1]} is not supported; supported: {SUPPORTED_HEAD_DIMS}")
    return q


_FP8_NAMES = ("fp8", "fp8_e4m3", "fp8e4m3", "fp8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz")


def kv_quant_for(query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, info: PagedKV,
                 k_scale, v_scale, kv_cache_dtype: str = "auto", quant: KVQuant | int | None = None):
    """(k_quant, v_quant, k ScaleAddressing, v ScaleAddressing) for a cache pair.

    16/32-bit caches must match the query dtype (no scales). 8-bit caches (fp8/int8) pick per
    tensor (one scale element), per head (``[Hk]``) or per token (the accepted per-token shapes)
    from the scale's shape unless ``quant`` names the method; uint8 caches are packed int4 per
    token (``head_dim // 2`` columns).
    """
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {key_cache.dtype} and {value_cache.dtype}")
    if key_cache.device != query.device or value_cache.device != query.device:
        raise ValueError(f"caches must be on the query's device {query.device}, got {key_cache.device}")
    dt = key_cache.dtype
    D = query.shape[-1]
    if dt.itemsize >= 2:
        if kv_cache_dtype not in ("auto", None) and kv_cache_dtype.lower() not in ("bf16", "fp16", "half", "bfloat16",
                                                                                 "float16", "float32", "fp32"):
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} but the caches are {dt}: an 8-bit cache dtype needs "
                             "int8/fp8/uint8 caches")
        if dt != query.dtype:
            raise TypeError(f"a {dt} KV cache must match the query dtype {query.dtype} (or be int8/fp8/uint8 quantized)")
        if info.cols != D:
            raise ValueError(f"cache head_dim {info.cols} does not match the query's head_dim {D}")
        return KVQuant.NONE, KVQuant.NONE, None, None
    if kv_cache_dtype == "auto" and dt != torch.uint8 and quant is None:
        raise ValueError(f"kv_cache_dtype='auto' means 'same as the query' ({query.dtype}) but the caches are {dt}; "
                         "pass kv_cache_dtype='fp8' (or 'int8') with dequantization scales")
    if dt == torch.uint8 and kv_cache_dtype.lower() in _FP8_NAMES:
        raise TypeError("an fp8 cache stored as uint8 must be passed as a float8 tensor (cache.view(torch.float8_e4m3fn)); "
                        "uint8 caches mean packed int4")
    if dt == torch.uint8:
        method = KVQuant.PER_TOKEN_4BIT
        if info.cols * 2 != D:
            raise ValueError(f"packed int4 caches hold head_dim/2 = {D // 2} byte columns, got {info.cols}")
    else:
        if dt not in FP8_DTYPES + (torch.int8,):
            raise TypeError(f"8-bit caches must be int8 or float8, got {dt}")
        if info.cols != D:
            raise ValueError(f"cache head_dim {info.cols} does not match the query's head_dim {D}")
        if quant is not None:
            method = KVQuant(quant)
        elif not isinstance(k_scale, torch.Tensor):
            raise TypeError(f"an 8-bit KV cache needs k_scale/v_scale float32 tensors, got {type(k_scale).__name__}")
        elif k_scale.numel() == 1:
            method = KVQuant.PER_TENSOR_8BIT
        elif tuple(k_scale.shape) == (info.num_kv_heads,):
            method = KVQuant.PER_HEAD_8BIT
        else:
            method = KVQuant.PER_TOKEN_8BIT
    nb, bs, H = info.num_blocks, info.block_size, info.num_kv_heads
    ka = scale_addressing(k_scale, method, nb, bs, H, "k_scale")
    va = scale_addressing(v_scale, method, nb, bs, H, "v_scale")
    for name, sa in (("k_scale", ka), ("v_scale", va)):
        if sa.tensor.device != query.device:
            raise ValueError(f"{name} must be on {query.device}, got {sa.tensor.device}")
    return method, method, ka, va


def check_heads(query: torch.Tensor, info: PagedKV, num_kv_heads: int | None = None) -> None:
    Hq = query.shape[1]
    if num_kv_heads is not None and num_kv_heads != info.num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} but the caches have {info.num_kv_heads} KV heads")
    if Hq % info.num_kv_heads:
        raise ValueError(f"query heads ({Hq}) must be a multiple of the KV heads ({info.num_kv_heads})")


def check_block_tables(block_tables, context_lens, max_context_len: int, info: PagedKV, device) -> None:
    check_int_tensor("block_tables", block_tables, 2, device)
    check_int_tensor("context_lens", context_lens, 1, device)
    if context_lens.shape[0] != block_tables.shape[0]:
        raise ValueError(f"context_lens has {context_lens.shape[0]} entries but block_tables has "
                         f"{block_tables.shape[0]} rows")
    need = -(-int(max_context_len) // info.block_size)
    if block_tables.shape[1] < need:
        raise ValueError(f"block_tables is too short: max_context_len={max_context_len} with block_size "
                         f"{info.block_size} needs {need} blocks per sequence, got {block_tables.shape[1]}")
    if block_tables.stride(1) != 1:
        raise ValueError("block_tables rows must be contiguous (stride 1 along blocks)")


def describe(key_cache, value_cache, layout=None) -> PagedKV:
    return describe_kv_cache(key_cache, value_cache, layout)
