"""The one validation of every aiter-pa op, and the Calls it builds.

One function per ``aiter::`` op, named like the op; its annotated signature (ending in
``backend: Optional[str] = None``) is the op's schema (:mod:`aiter_pa.ops` declares the ops from
these functions). Each checks every argument once, raising ``TypeError`` / ``ValueError`` that
names the argument, what was expected and what came, and returns the op's Call:

* :class:`PagedCall` for every attention op (decode, MTP, prefill, extend: one kernel family),
  keyed by :class:`PagedKey`;
* :class:`CacheWrite` for the three ``reshape_and_cache*`` ops, keyed by :class:`WriteKey`;
* :class:`CopyBlocks` and :class:`SwapBlocks` for the block moves.

Calls are NamedTuples: tensors, sizes, options, ``key`` (what the registry picks a backend by
and the launcher picks a tile config by) and ``backend`` (the caller's explicit choice).

What is checked on the host (cheap, no device sync): ranks, shapes, dtypes, devices, head
counts (GQA divisibility), head dims, scale shapes, block-table width against
``max_context_len``, workspace sizes. What is not checked (it would need a device sync): the
values inside ``block_tables`` / page indices (out-of-range or negative ids are skipped by the
kernel: their tokens are treated as padding), ``context_lens`` values (clamped to
``max_context_len`` by the kernel), and ``qo_indptr`` / ``kv_indptr`` monotonicity. Index tensors
that already live on the CPU (``copy_blocks`` / ``swap_blocks`` mappings) are range-checked.

The checks are written as one fast test per argument whose failure path calls the
:mod:`aiter_core.checks` validator that words the error, so a valid call pays a few attribute
reads per argument and the messages are the shared ones.
"""

from __future__ import annotations

from functools import lru_cache
from typing import List, NamedTuple, Optional

import torch

from aiter_core.checks import (
    check_block_table,
    check_float,
    check_gqa,
    check_index_tensor,
    check_index_vector,
    check_int,
    check_ndim,
    check_output,
    check_per_head_f32,
    check_tensor,
)
from aiter_core.quant import KVQuant

from .layouts import PagedKV, ScaleAddressing, describe_geometry, scale_addressing

Tensor = torch.Tensor

__all__ = [
    "PagedKey", "PagedCall", "WriteKey", "CacheWrite", "CopyBlocks", "SwapBlocks", "BlockKey",
    "split_head_dim", "head_dim_supported", "kv_quant_for", "check_query", "workspace_bytes",
    "FP8_DTYPES", "NVIDIA_FP8_DTYPES", "supported_fp8_dtypes", "check_fp8_cache", "SUPPORTED_HEAD_DIMS",
    "MODE_CAST", "MODE_PER_TENSOR", "MODE_PER_TOKEN", "MODE_INT4", "MODE_BLOCK",
    "pa_reshape_and_cache", "pa_reshape_and_cache_pertoken", "pa_reshape_and_cache_block_quant", "pa_swap_blocks",
    "pa_copy_blocks", "paged_attention_decode", "paged_attention_rocm", "paged_attention_v1",
    "paged_attention_ragged", "pa_fwd_asm", "pa_context_attention_fwd", "extend_attention_fwd", "prefill_attention",
]

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz")
                   if hasattr(torch, n))
QUERY_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
OUT_DTYPES = QUERY_DTYPES
MAX_HEAD_DIM = 256
MAX_SPLIT_HEAD_DIM = 576
SUPPORTED_HEAD_DIMS = ("q/k head dims 1..256, or a power of two up to 512 plus a power-of-two rest >= 16 "
                       "(288 = 256 + 32, 576 = 512 + 64); v head dims 1..512")

# cache-write modes (the write kernel's MODE constexpr)
MODE_CAST, MODE_PER_TENSOR, MODE_PER_TOKEN, MODE_INT4, MODE_BLOCK = 0, 1, 2, 3, 4


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


_QK_HEAD_DIMS = frozenset(d for d in range(1, MAX_SPLIT_HEAD_DIM + 1) if head_dim_supported(d))


# -- the Calls --------------------------------------------------------------------------------------


class PagedKey(NamedTuple):
    """What picks the backend (``supports``) and the tile config of a paged-attention call."""

    device_type: str
    dtype: torch.dtype  # the query's
    kv_dtype: torch.dtype  # the caches' storage dtype
    head_dim: int  # q/k
    head_dim_v: int
    kv_quant: int  # KVQuant of both caches
    high_precision: int


class PagedCall(NamedTuple):
    """One validated paged-attention call (every attention op builds one; the kernel serves all).

    Query rows of sequence ``s``: ``qo_indptr[s]..`` (at most ``max_qlen``) or ``s * max_qlen..``.
    KV of sequence ``s``: block-table row ``s`` with ``context_lens[s]`` tokens, or with
    ``kv_indptr`` the page list ``block_tables[kv_indptr[s]:kv_indptr[s+1]]`` (``token_lists``: page
    size 1, the list length is the context). ``new_k/new_v`` (prefill) follow the cached tokens.
    """

    op: str  # the aiter op that built it (names its AITER_<OP>_CONFIG override)
    out: Tensor
    query: Tensor
    key_cache: Tensor
    value_cache: Tensor
    info: PagedKV
    scale: float
    max_context_len: int
    num_seqs: int
    num_heads: int  # query heads
    block_tables: Optional[Tensor]
    context_lens: Optional[Tensor]
    k_scale: Optional[ScaleAddressing]
    v_scale: Optional[ScaleAddressing]
    key: PagedKey
    backend: Optional[str] = None
    alibi_slopes: Optional[Tensor] = None
    softcap: float = 0.0
    sliding_window: int = 0
    qo_indptr: Optional[Tensor] = None
    max_qlen: int = 1
    kv_indptr: Optional[Tensor] = None
    kv_last_page_lens: Optional[Tensor] = None
    token_lists: bool = False
    new_k: Optional[Tensor] = None
    new_v: Optional[Tensor] = None
    new_causal: bool = True
    skip_decode: bool = False
    custom_mask: Optional[Tensor] = None  # uint8 flags, extend only
    mask_indptr: Optional[Tensor] = None
    mask_prefix: bool = False  # apply the custom mask to the prefix keys too
    num_partitions: Optional[int] = None  # None: the launcher's heuristic
    partition_size: Optional[int] = None  # tokens per partition (None: context / partitions)
    partials: Optional[tuple] = None  # (partial_out, partial_max, partial_sum): fixes the partition count
    workspace: Optional[Tensor] = None  # a byte buffer the launcher carves the partials from


class WriteKey(NamedTuple):
    device_type: str
    dtype: torch.dtype  # the rows written
    cache_dtype: torch.dtype
    mode: int  # MODE_*


class CacheWrite(NamedTuple):
    """One ``reshape_and_cache*`` call: ``key_rows`` / ``value_rows [T, Hk, D]`` (the op's ``key`` and
    ``value``: the name ``key`` is the Call's registry key) to ``slot_mapping`` of both caches."""

    op: str
    key_rows: Tensor
    value_rows: Tensor
    key_cache: Tensor
    value_cache: Tensor
    slot_mapping: Tensor  # flat
    info: PagedKV
    mode: int  # MODE_*
    k_scale: Optional[Tensor]  # per-tensor scale, or the per-token / per-block scales written
    v_scale: Optional[Tensor]
    k_scale_strides: tuple  # (per block, per head, per token)
    v_scale_strides: tuple
    key: WriteKey
    backend: Optional[str] = None


class BlockKey(NamedTuple):
    device_type: str
    dtype: Optional[torch.dtype]


class CopyBlocks(NamedTuple):
    caches: tuple  # every key cache, then every value cache
    block_mapping: Tensor  # [n, 2] int64
    key: BlockKey
    backend: Optional[str] = None


class SwapBlocks(NamedTuple):
    src: Tensor
    dst: Tensor
    sources: Tensor  # int64 on the CPU
    destinations: Tensor
    key: BlockKey
    backend: Optional[str] = None


# -- shared argument checks --------------------------------------------------------------------------


def check_query(name: str, q) -> torch.Size:
    """A float16/bfloat16/float32 ``[tokens, heads, head_dim]`` tensor with a supported head dim;
    returns its shape."""
    if isinstance(q, Tensor) and q.dtype in QUERY_DTYPES:
        shape = q.shape
        if len(shape) == 3 and shape[2] in _QK_HEAD_DIMS:
            return shape
    check_tensor(name, q)
    if q.dtype not in QUERY_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16 or float32 (fp8 queries are not supported), got {q.dtype}")
    check_ndim(name, q, 3, "[tokens, heads, head_dim]")
    raise ValueError(f"{name} head_dim {q.shape[-1]} is not supported; supported: {SUPPORTED_HEAD_DIMS}")


def _index_vector(name: str, t, device) -> Tensor:
    """A 1-D int32/int64 index vector on ``device`` with unit stride (the kernels read it so)."""
    return check_index_vector(name, t, device=device)


def _out(name: str, out, shape, device) -> None:
    if not (isinstance(out, Tensor) and out.shape == shape and out.dtype in OUT_DTYPES and out.device == device):
        check_output(name, out, tuple(shape), device=device, dtypes=OUT_DTYPES)


def _high_precision(value) -> int:
    if type(value) is not int:
        value = check_int("high_precision", value)
    if 0 <= value <= 2:
        return value
    raise ValueError(f"high_precision must be 0, 1 or 2, got {value}")


def _caches(key_cache, value_cache, layout: str | None, four_d_only: bool = True) -> PagedKV:
    """The pair's geometry (cached per shapes and strides). ``layout`` is applied to 4-D caches
    only when ``four_d_only`` (decode's ``kv_cache_layout`` default "HND" must not reject 5-D caches)."""
    if not isinstance(key_cache, Tensor) or not isinstance(value_cache, Tensor):
        raise TypeError("key_cache and value_cache must be tensors")
    kshape = key_cache.shape
    if four_d_only and len(kshape) != 4:
        layout = None
    return describe_geometry(kshape, key_cache.stride(), value_cache.shape, value_cache.stride(), layout)


def _heads(num_heads: int, info: PagedKV, num_kv_heads: int | None = None) -> None:
    if num_kv_heads is not None and num_kv_heads != info.num_kv_heads:
        raise ValueError(f"num_kv_heads={num_kv_heads} but the caches have {info.num_kv_heads} KV heads")
    if num_heads % info.num_kv_heads:
        check_gqa(num_heads, info.num_kv_heads)


def _block_tables(block_tables, context_lens, max_context_len: int | None, info: PagedKV, device,
                  lens_name: str = "context_lens") -> int:
    """Checks a block table and its context lengths; returns the number of sequences.
    ``max_context_len=None``: the table's width bounds the context (nothing to check)."""
    _index_vector(lens_name, context_lens, device)
    num_seqs = context_lens.shape[0]
    check_block_table("block_tables", block_tables, num_seqs=num_seqs,
                      max_len=block_tables.shape[1] * info.block_size if max_context_len is None else max_context_len,
                      block_size=info.block_size, device=device)
    if block_tables.shape[0] != num_seqs:
        raise ValueError(f"{lens_name} has {num_seqs} entries but block_tables has {block_tables.shape[0]} rows")
    return num_seqs


_FP8_NAMES = ("fp8", "fp8_e4m3", "fp8e4m3", "fp8_e5m2", "float8_e4m3fn", "float8_e4m3fnuz")
_16BIT_NAMES = ("bf16", "fp16", "half", "bfloat16", "float16", "float32", "fp32")


NVIDIA_FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@lru_cache(maxsize=16)
def supported_fp8_dtypes(device: torch.device) -> tuple:
    """The fp8 storage dtypes the kernels compile for on ``device``: on NVIDIA GPUs the OCP types
    (float8_e4m3fn, float8_e5m2; the fnuz types are AMD's), elsewhere (ROCm, the CPU interpreter,
    meta tensors) every float8 dtype."""
    if device.type == "cuda":
        from aiter_core.arch import get_arch_info

        if get_arch_info().vendor == "cuda":
            return NVIDIA_FP8_DTYPES
    return FP8_DTYPES


def check_fp8_cache(name: str, dtype: torch.dtype, device: torch.device) -> None:
    """An fp8 cache dtype this device's kernels can compile (float8_e4m3fnuz on an NVIDIA GPU is refused
    up front, not a CompilationError at launch)."""
    if dtype in FP8_DTYPES and dtype not in supported_fp8_dtypes(device):
        names = ", ".join(str(d).replace("torch.", "") for d in supported_fp8_dtypes(device))
        raise TypeError(f"{name} is {str(dtype).replace('torch.', '')}, which this GPU does not support; "
                        f"supported fp8 cache dtypes: {names} (the fnuz types are AMD's)")


def kv_quant_for(query_dtype: torch.dtype, device, head_dim: int, key_cache: Tensor, value_cache: Tensor,
                 info: PagedKV, k_scale, v_scale, kv_cache_dtype: str = "auto",
                 quant: KVQuant | int | None = None):
    """(quantization, k ScaleAddressing, v ScaleAddressing) of a cache pair read by a query of
    ``query_dtype`` with ``head_dim`` on ``device``.

    16/32-bit caches must match the query dtype (no scales). 8-bit caches (fp8/int8) pick per
    tensor (one scale element), per head (``[Hk]``) or per token (the accepted per-token shapes)
    from the scale's shape unless ``quant`` names the method; uint8 caches are packed int4 per
    token (``head_dim // 2`` columns).
    """
    dt = key_cache.dtype
    if value_cache.dtype != dt:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {dt} and {value_cache.dtype}")
    if key_cache.device != device or value_cache.device != device:
        raise ValueError(f"caches must be on the query's device {device}, got {key_cache.device}")
    if dt.itemsize >= 2:
        if kv_cache_dtype not in ("auto", None) and kv_cache_dtype.lower() not in _16BIT_NAMES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r} but the caches are {dt}: an 8-bit cache dtype needs "
                             "int8/fp8/uint8 caches")
        if dt != query_dtype:
            raise TypeError(f"a {dt} KV cache must match the query dtype {query_dtype} (or be int8/fp8/uint8 quantized)")
        if info.cols != head_dim:
            raise ValueError(f"cache head_dim {info.cols} does not match the query's head_dim {head_dim}")
        return KVQuant.NONE, None, None
    if kv_cache_dtype == "auto" and dt != torch.uint8 and quant is None:
        raise ValueError(f"kv_cache_dtype='auto' means 'same as the query' ({query_dtype}) but the caches are {dt}; "
                         "pass kv_cache_dtype='fp8' (or 'int8') with dequantization scales")
    if dt == torch.uint8 and kv_cache_dtype.lower() in _FP8_NAMES:
        raise TypeError("an fp8 cache stored as uint8 must be passed as a float8 tensor (cache.view(torch.float8_e4m3fn)); "
                        "uint8 caches mean packed int4")
    if dt == torch.uint8:
        method = KVQuant.PER_TOKEN_4BIT
        if info.cols * 2 != head_dim:
            raise ValueError(f"packed int4 caches hold head_dim/2 = {head_dim // 2} byte columns, got {info.cols}")
    else:
        if dt not in FP8_DTYPES + (torch.int8,):
            raise TypeError(f"8-bit caches must be int8 or float8, got {dt}")
        check_fp8_cache("key_cache", dt, device)
        if info.cols != head_dim:
            raise ValueError(f"cache head_dim {info.cols} does not match the query's head_dim {head_dim}")
        if quant is not None:
            method = KVQuant(quant)
        elif not isinstance(k_scale, Tensor):
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
        if sa.tensor.device != device:
            raise ValueError(f"{name} must be on {device}, got {sa.tensor.device}")
    return method, ka, va


def _inferred(cache: Tensor) -> str:
    """The kv_cache_dtype of front ends that take none: the scales' shapes decide."""
    return "auto" if cache.dtype.itemsize >= 2 else "inferred"


@lru_cache(maxsize=1024)
def _key(device, dtype, kv_dtype, head_dim: int, head_dim_v: int, quant, high_precision: int) -> PagedKey:
    """The :class:`PagedKey` of a call (one object per distinct key: a serving process has a few)."""
    return PagedKey(device.type, dtype, kv_dtype, head_dim, head_dim_v, quant, high_precision)


def workspace_bytes(rows: int, num_heads: int, partitions: int, head_dim: int, out_dtype: torch.dtype) -> int:
    """Bytes of a ``paged_attention_v1`` / ``_ragged`` workspace (upstream's formula):
    ``n*P*D*elem + 2*n*P*4`` with ``n = rows * heads``."""
    n = rows * num_heads * partitions
    return n * head_dim * out_dtype.itemsize + 2 * n * 4


def _workspace(ws, rows: int, num_heads: int, partitions: int, head_dim: int, out_dtype: torch.dtype) -> Tensor:
    need = workspace_bytes(rows, num_heads, partitions, head_dim, out_dtype)
    if not isinstance(ws, Tensor) or not ws.is_contiguous():
        raise ValueError("workspace_buffer must be a contiguous tensor")
    have = ws.numel() * ws.dtype.itemsize
    if have < need:
        raise ValueError(f"workspace_buffer holds {have} bytes, {need} are needed "
                         f"({rows} query rows x {num_heads} heads x {partitions} partitions)")
    return ws


def _decode_front(query_name: str, query, key_cache, value_cache, layout: str | None, out_name: str, out,
                  high_precision, alibi_slopes, num_kv_heads: int | None = None):
    """What every decode front end checks first: the query, the caches' geometry, the head counts,
    the output, ``high_precision`` and ALiBi. Returns (query shape, device, cache info, high_precision)."""
    qshape = check_query(query_name, query)
    device = query.device
    info = _caches(key_cache, value_cache, layout)
    _heads(qshape[1], info, num_kv_heads)
    _out(out_name, out, qshape, device)
    if alibi_slopes is not None:
        check_per_head_f32("alibi_slopes", alibi_slopes, qshape[1], device=device)
    return qshape, device, info, _high_precision(high_precision)


def _mtp_rows(rows: int, num_seqs: int, mtp) -> int:
    """``mtp`` query rows per sequence: the query has ``num_seqs * mtp`` rows."""
    mtp = check_int("mtp", mtp)
    if mtp < 1 or rows != num_seqs * mtp:
        raise ValueError(f"query must have num_seqs * mtp = {num_seqs} x {mtp} rows, got {rows}")
    return mtp


def _cache_rank(key_cache, rank: int, what: str) -> None:
    if not isinstance(key_cache, Tensor) or key_cache.dim() != rank:
        raise ValueError(f"{what}, got {tuple(getattr(key_cache, 'shape', ()))}")


def _fp8_out(fp8_out_scale) -> None:
    if fp8_out_scale is not None:
        raise ValueError("fp8_out_scale (fp8 output) is not supported; supported: output in the query dtype")


# -- cache writes -------------------------------------------------------------------------------------


def _kv_rows(name: str, x, num_tokens: int, heads: int, head_dim: int, device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 4:  # [B, S, H, D] (block-quant's batch form)
        x = x.reshape(-1, x.shape[2], x.shape[3])
    if x.shape != (num_tokens, heads, head_dim):
        raise ValueError(f"{name} must be [num_tokens={num_tokens}, num_kv_heads={heads}, head_dim={head_dim}], "
                         f"got {tuple(x.shape)}")
    if not x.dtype.is_floating_point or x.dtype.itemsize == 1:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the caches' device {device}, got {x.device}")
    return x


def _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout, kv_cache_layout, packed=False):
    if not isinstance(key_cache, Tensor) or not isinstance(value_cache, Tensor):
        raise TypeError("key_cache and value_cache must be tensors")
    four_d = key_cache.dim() == 4
    if four_d and kv_cache_layout is None:
        raise ValueError("4-D caches need kv_cache_layout='NHD' or 'HND' (reshape_and_cache writes the 5-D vLLM "
                         "layout; use reshape_and_cache_flash for NHD)")
    info = _caches(key_cache, value_cache, kv_cache_layout if four_d else None, four_d_only=False)
    if not four_d and bool(asm_layout) != (info.layout == "vllm_shuffled"):
        raise ValueError(f"asm_layout={asm_layout} but the value cache is in the {info.layout!r} layout "
                         "(asm_layout=True needs V [num_blocks, Hk, block_size/x, D, x])")
    device = key_cache.device
    check_fp8_cache("key_cache", key_cache.dtype, device)
    check_fp8_cache("value_cache", value_cache.dtype, device)
    check_index_tensor("slot_mapping", slot_mapping, device=device)
    T = slot_mapping.numel()
    D = info.cols * 2 if packed else info.cols
    key = _kv_rows("key", key, T, info.num_kv_heads, D, device)
    value = _kv_rows("value", value, T, info.num_kv_heads, D, device)
    slots = slot_mapping if slot_mapping.dim() == 1 else slot_mapping.reshape(-1)
    if slots.stride(0) != 1 and T > 1:
        raise ValueError(f"slot_mapping must be contiguous (stride 1), got strides {tuple(slot_mapping.stride())}")
    return info, key, value, slots, device


def _reused(factory, device: torch.device, *args):
    """``factory(device, *args)``: tensors made once per device and arguments and never written
    (``factory`` is lru-cached), except during CUDA-graph capture, where a tensor made now would
    hold its values only once the graph replays: then a fresh one, filled by the replay."""
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return factory.__wrapped__(device, *args)
    return factory(device, *args)


@lru_cache(maxsize=16)
def _unit_scale(device: torch.device) -> Tensor:
    """A float32 ``[1]`` tensor of 1.0 on ``device`` (the per-tensor scale None stands for)."""
    return torch.ones(1, dtype=torch.float32, device=device)


def pa_reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
                         kv_cache_dtype: str, k_scale: Optional[Tensor], v_scale: Optional[Tensor], asm_layout: bool,
                         kv_cache_layout: Optional[str], backend: Optional[str] = None) -> CacheWrite:
    info, key, value, slots, device = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout,
                                                   kv_cache_layout)
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {key_cache.dtype} and {value_cache.dtype}")
    if key_cache.dtype.itemsize == 1:
        if kv_cache_dtype == "auto":
            raise ValueError(f"kv_cache_dtype='auto' but the caches are {key_cache.dtype}: pass kv_cache_dtype='fp8' "
                             "(or 'int8') with per-tensor k_scale/v_scale")
        if key_cache.dtype == torch.uint8:
            raise TypeError("reshape_and_cache does not write packed int4 (uint8) caches; use "
                            "reshape_and_cache_with_pertoken_quant")
        scales = []
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc is None:
                sc = _reused(_unit_scale, device)
            if not isinstance(sc, Tensor) or sc.numel() != 1 or sc.dtype != torch.float32:
                raise ValueError(f"{name} must be a float32 tensor with one element (per-tensor), got "
                                 f"{getattr(sc, 'dtype', type(sc).__name__)} {tuple(getattr(sc, 'shape', ()))}")
            if sc.device != device:
                raise ValueError(f"{name} must be on {device}, got {sc.device}")
            scales.append(sc)
        mode = MODE_PER_TENSOR
    else:
        scales = [None, None]
        mode = MODE_CAST
    return CacheWrite("pa_reshape_and_cache", key, value, key_cache, value_cache, slots, info, mode, scales[0],
                      scales[1], (0, 0, 0), (0, 0, 0), WriteKey(device.type, key.dtype, key_cache.dtype, mode), backend)


_PER_TOKEN_CACHE_DTYPES = (torch.int8, torch.uint8) + tuple(
    d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e4m3fnuz", None),
                getattr(torch, "float8_e5m2", None)) if d is not None)


def pa_reshape_and_cache_pertoken(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                                  k_dequant_scales: Tensor, v_dequant_scales: Tensor, slot_mapping: Tensor,
                                  asm_layout: bool, kv_cache_layout: Optional[str],
                                  backend: Optional[str] = None) -> CacheWrite:
    packed = isinstance(key_cache, Tensor) and key_cache.dtype == torch.uint8
    info, key, value, slots, device = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout,
                                                   kv_cache_layout, packed)
    if key_cache.dtype not in _PER_TOKEN_CACHE_DTYPES:
        raise TypeError(f"per-token quantized caches must be fp8, int8 or uint8 (packed int4), got {key_cache.dtype}")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {key_cache.dtype} and {value_cache.dtype}")
    if packed and info.layout not in ("NHD", "HND", "vllm"):
        raise ValueError("packed int4 caches need the NHD, HND or vllm layout (not shuffled V)")
    mode = MODE_INT4 if packed else MODE_PER_TOKEN
    addressed = []
    for sc, name in ((k_dequant_scales, "k_dequant_scales"), (v_dequant_scales, "v_dequant_scales")):
        sa = scale_addressing(sc, KVQuant.PER_TOKEN_8BIT, info.num_blocks, info.block_size, info.num_kv_heads, name)
        if sa.tensor.device != device:
            raise ValueError(f"{name} must be on {device}, got {sa.tensor.device}")
        addressed.append(sa)
    ka, va = addressed
    return CacheWrite("pa_reshape_and_cache_pertoken", key, value, key_cache, value_cache, slots, info, mode,
                      ka.tensor, va.tensor, (ka.s_blk, ka.s_head, ka.s_tok), (va.s_blk, va.s_head, va.s_tok),
                      WriteKey(device.type, key.dtype, key_cache.dtype, mode), backend)


def pa_reshape_and_cache_block_quant(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                                     k_dequant_scales: Tensor, v_dequant_scales: Tensor, slot_mapping: Tensor,
                                     asm_layout: bool, kv_cache_layout: Optional[str],
                                     backend: Optional[str] = None) -> CacheWrite:
    info, key, value, slots, device = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout,
                                                   kv_cache_layout)
    if key_cache.dtype.itemsize != 1 or key_cache.dtype == torch.uint8 or value_cache.dtype != key_cache.dtype:
        raise TypeError(f"block-quantized caches must be fp8 or int8 (both the same), got {key_cache.dtype} and "
                        f"{value_cache.dtype}")
    nb, H = info.num_blocks, info.num_kv_heads
    want = (nb, H) if asm_layout else (H, nb)
    strides = []
    for sc, name in ((k_dequant_scales, "k_dequant_scales"), (v_dequant_scales, "v_dequant_scales")):
        if not isinstance(sc, Tensor) or sc.dtype != torch.float32 or tuple(sc.shape) != want:
            raise ValueError(f"{name} must be float32 {'[num_blocks, Hk]' if asm_layout else '[Hk, num_blocks]'} = "
                             f"{want}, got {getattr(sc, 'dtype', None)} {tuple(getattr(sc, 'shape', ()))}")
        if sc.device != device:
            raise ValueError(f"{name} must be on {device}, got {sc.device}")
        strides.append((sc.stride(0), sc.stride(1), 0) if asm_layout else (sc.stride(1), sc.stride(0), 0))
    return CacheWrite("pa_reshape_and_cache_block_quant", key, value, key_cache, value_cache, slots, info, MODE_BLOCK,
                      k_dequant_scales, v_dequant_scales, strides[0], strides[1],
                      WriteKey(device.type, key.dtype, key_cache.dtype, MODE_BLOCK), backend)


def _block_mapping(block_mapping) -> Tensor:
    check_index_tensor("block_mapping", block_mapping, ndim=2)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [n, 2], got {tuple(block_mapping.shape)}")
    return block_mapping


def pa_swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor, backend: Optional[str] = None) -> SwapBlocks:
    _block_mapping(block_mapping)
    check_tensor("src", src)
    check_tensor("dst", dst)
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"src and dst must hold the same blocks: got {src.dtype} {tuple(src.shape)} and "
                         f"{dst.dtype} {tuple(dst.shape)}")
    m = block_mapping.to("cpu", torch.int64)  # upstream keeps the mapping on the CPU
    pairs = m.tolist()
    if pairs:
        sources, destinations = [s for s, _ in pairs], [d for _, d in pairs]
        if min(sources) < 0 or max(sources) >= src.shape[0] or min(destinations) < 0 \
                or max(destinations) >= dst.shape[0]:
            raise ValueError(f"block_mapping ids out of range: sources must be in [0, {src.shape[0]}), destinations "
                             f"in [0, {dst.shape[0]})")
    return SwapBlocks(src, dst, m[:, 0], m[:, 1], BlockKey(dst.device.type, dst.dtype), backend)


def pa_copy_blocks(key_caches: List[Tensor], value_caches: List[Tensor], block_mapping: Tensor,
                   backend: Optional[str] = None) -> CopyBlocks:
    if len(key_caches) != len(value_caches):
        raise ValueError(f"key_caches and value_caches must have the same length, got {len(key_caches)} and "
                         f"{len(value_caches)}")
    _block_mapping(block_mapping)
    caches = tuple(key_caches) + tuple(value_caches)
    for i, c in enumerate(caches):
        check_tensor(f"key_caches[{i}]" if i < len(key_caches) else f"value_caches[{i - len(key_caches)}]", c)
    if caches and block_mapping.shape[0]:
        nb = min(c.shape[0] for c in caches)
        if block_mapping.device.type == "cpu":  # checked on the host only when it already is there
            pairs = block_mapping.tolist()
            ids = [i for pair in pairs for i in pair]
            if min(ids) < 0 or max(ids) >= nb:
                raise ValueError(f"block_mapping ids must be in [0, {nb}), got range [{min(ids)}, {max(ids)}]")
            dsts = {d for _, d in pairs}
            if len(dsts) != len(pairs) or not dsts.isdisjoint(s for s, _ in pairs):
                raise ValueError("block_mapping destinations must be distinct and must not also be sources")
        for c in caches:
            if not c.is_contiguous():
                raise ValueError("copy_blocks needs contiguous caches")
    else:
        caches = ()  # nothing to copy
    first = caches[0] if caches else block_mapping
    return CopyBlocks(caches, block_mapping, BlockKey(first.device.type, caches[0].dtype if caches else None),
                      backend)


# -- decode -------------------------------------------------------------------------------------------


def paged_attention_decode(output: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, seq_lens: Tensor,
                           block_tables: Tensor, attn_scale: float, max_seq_len: int, k_scale: Optional[Tensor],
                           v_scale: Optional[Tensor], num_seq_partitions: int, alibi_slopes: Optional[Tensor],
                           kv_cache_layout: str, high_precision: int, mtp: int, logits_soft_cap: float,
                           sliding_window: int, partial_out: Optional[Tensor], partial_max: Optional[Tensor],
                           partial_sum: Optional[Tensor], backend: Optional[str] = None) -> PagedCall:
    qshape, device, info, high_precision = _decode_front("query", query, key_cache, value_cache, kv_cache_layout,
                                                         "output", output, high_precision, alibi_slopes)
    rows, Hq, D = qshape
    max_seq_len = check_int("max_seq_len", max_seq_len, minimum=0)
    num_seqs = _block_tables(block_tables, seq_lens, max_seq_len, info, device, "seq_lens")
    mtp = _mtp_rows(rows, num_seqs, mtp)
    quant, ka, va = kv_quant_for(query.dtype, device, D, key_cache, value_cache, info, k_scale, v_scale,
                                 _inferred(key_cache))
    partials = None
    if partial_out is not None:
        P = partial_out.shape[2] if isinstance(partial_out, Tensor) and partial_out.dim() == 4 else -1
        want = (rows, Hq, P)
        if (P < 0 or tuple(partial_out.shape) != want + (D,)
                or not isinstance(partial_max, Tensor) or not isinstance(partial_sum, Tensor)
                or tuple(partial_max.shape) != want or tuple(partial_sum.shape) != want):
            raise ValueError(f"workspace must be (partial_out [rows, Hq, P, D], partial_max [rows, Hq, P], "
                             f"partial_sum [rows, Hq, P]) with rows={rows}, Hq={Hq}")
        if partial_max.stride() != partial_sum.stride():
            raise ValueError("partial_max and partial_sum must have the same strides")
        partials = (partial_out, partial_max, partial_sum)
    num_seq_partitions = check_int("num_seq_partitions", num_seq_partitions, minimum=0)
    softcap = check_float("logits_soft_cap", logits_soft_cap)
    window = check_int("sliding_window", sliding_window)
    return PagedCall("paged_attention_decode", output, query, key_cache, value_cache, info,
                     check_float("attn_scale", attn_scale), max_seq_len, num_seqs, Hq, block_tables, seq_lens, ka, va,
                     _key(device, query.dtype, key_cache.dtype, D, D, quant, high_precision), backend,
                     alibi_slopes, softcap, window, None, mtp,
                     num_partitions=num_seq_partitions or None, partials=partials)


def paged_attention_rocm(out: Tensor, exp_sums: Tensor, max_logits: Tensor, tmp_out: Tensor, query: Tensor,
                         key_cache: Tensor, value_cache: Tensor, num_kv_heads: int, scale: float, block_tables: Tensor,
                         context_lens: Tensor, block_size: int, max_context_len: int, alibi_slopes: Optional[Tensor],
                         kv_cache_dtype: str, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                         fp8_out_scale: Optional[Tensor], partition_size: int, mtp: int, q_scale: Optional[Tensor],
                         high_precision: int, backend: Optional[str] = None) -> PagedCall:
    _fp8_out(fp8_out_scale)
    if q_scale is not None:
        raise ValueError("q_scale (fp8 query) is not supported; supported: fp16/bf16/fp32 queries")
    _cache_rank(key_cache, 5, "paged_attention_rocm needs the vLLM 5-D key cache [nb, Hk, D/x, bs, x]")
    qshape, device, info, high_precision = _decode_front("query", query, key_cache, value_cache, None, "out", out,
                                                         high_precision, alibi_slopes,
                                                         check_int("num_kv_heads", num_kv_heads))
    rows, Hq, D = qshape
    if check_int("block_size", block_size) != info.block_size:
        raise ValueError(f"block_size={block_size} but the caches have block size {info.block_size}")
    max_context_len = check_int("max_context_len", max_context_len, minimum=0)
    num_seqs = _block_tables(block_tables, context_lens, max_context_len, info, device)
    mtp = _mtp_rows(rows, num_seqs, mtp)
    partition_size = check_int("partition_size", partition_size)
    if partition_size < 1:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    quant, ka, va = kv_quant_for(query.dtype, device, D, key_cache, value_cache, info, k_scale, v_scale,
                                 kv_cache_dtype)
    for name, t in (("exp_sums", exp_sums), ("max_logits", max_logits), ("tmp_out", tmp_out)):
        check_tensor(name, t, device=device)
    P = exp_sums.shape[-1] if exp_sums.dim() >= 1 else 0
    need = -(-max_context_len // partition_size)
    for name, t, shape in (("exp_sums", exp_sums, (rows, Hq, P)), ("max_logits", max_logits, (rows, Hq, P)),
                           ("tmp_out", tmp_out, (rows, Hq, P, D))):
        if t.numel() != torch.Size(shape).numel() or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with {rows}x{Hq}x{P}{'x' + str(D) if name == 'tmp_out' else ''} "
                             f"elements ([num_seqs*mtp, Hq, P{', D' if name == 'tmp_out' else ''}]), got {tuple(t.shape)}")
    if exp_sums.dtype != torch.float32 or max_logits.dtype != torch.float32:
        raise TypeError("exp_sums and max_logits must be float32")
    if P < need:
        raise ValueError(f"exp_sums/max_logits/tmp_out hold {P} partitions; max_context_len={max_context_len} with "
                         f"partition_size={partition_size} needs {need}")
    partials = None
    if P > 1:
        partials = (tmp_out.view(rows, Hq, P, D), max_logits.view(rows, Hq, P), exp_sums.view(rows, Hq, P))
    return PagedCall("paged_attention_rocm", out, query, key_cache, value_cache, info, check_float("scale", scale),
                     max_context_len, num_seqs, Hq, block_tables, context_lens, ka, va,
                     _key(device, query.dtype, key_cache.dtype, D, D, quant, high_precision), backend, alibi_slopes,
                     max_qlen=mtp, partition_size=partition_size, partials=partials,
                     num_partitions=1 if P <= 1 else None)


def paged_attention_v1(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                       scale: float, block_tables: Tensor, cu_query_lens: Optional[Tensor], context_lens: Tensor,
                       max_context_len: int, alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
                       logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                       fp8_out_scale: Optional[Tensor], partition_size: int, mtp: int, sliding_window: int,
                       high_precision: int, backend: Optional[str] = None) -> PagedCall:
    _fp8_out(fp8_out_scale)
    _cache_rank(key_cache, 4, "paged_attention_v1 takes 4-D HND/NHD caches")
    qshape, device, info, high_precision = _decode_front("query", query, key_cache, value_cache, kv_cache_layout,
                                                         "out", out, high_precision, alibi_slopes)
    rows, Hq, D = qshape
    max_context_len = check_int("max_context_len", max_context_len, minimum=0)
    num_seqs = _block_tables(block_tables, context_lens, max_context_len, info, device)
    if cu_query_lens is not None:  # MTP rows per sequence from cu_query_lens: mtp is not used
        _index_vector("cu_query_lens", cu_query_lens, device)
        if cu_query_lens.shape[0] != num_seqs + 1:
            raise ValueError(f"cu_query_lens must have num_seqs + 1 = {num_seqs + 1} entries, got "
                             f"{cu_query_lens.shape[0]}")
        mtp = check_int("mtp", mtp)
    else:
        mtp = _mtp_rows(rows, num_seqs, mtp)
    window = check_int("sliding_window", sliding_window)
    if window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = off), got {window}")
    partition_size = check_int("partition_size", partition_size, minimum=1)
    quant, ka, va = kv_quant_for(query.dtype, device, D, key_cache, value_cache, info, k_scale, v_scale,
                                 kv_cache_dtype)
    P = max(1, -(-max_context_len // partition_size))
    workspace = _workspace(workspace_buffer, rows, Hq, P, D, out.dtype) if P > 1 else None
    return PagedCall("paged_attention_v1", out, query, key_cache, value_cache, info, check_float("scale", scale),
                     max_context_len, num_seqs, Hq, block_tables, context_lens, ka, va,
                     _key(device, query.dtype, key_cache.dtype, D, D, quant, high_precision), backend, alibi_slopes,
                     check_float("logits_soft_cap", logits_soft_cap), window, cu_query_lens, mtp,
                     partition_size=partition_size, num_partitions=P, workspace=workspace)


def paged_attention_ragged(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor,
                           value_cache: Tensor, scale: float, kv_indptr: Tensor, kv_page_indices: Tensor,
                           kv_last_page_lens: Tensor, block_size: int, max_num_partitions: int,
                           alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
                           logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                           fp8_out_scale: Optional[Tensor], partition_size: int, mtp: int, high_precision: int,
                           backend: Optional[str] = None) -> PagedCall:
    _fp8_out(fp8_out_scale)
    _cache_rank(key_cache, 4, "paged_attention_ragged takes 4-D HND/NHD caches")
    qshape, device, info, high_precision = _decode_front("query", query, key_cache, value_cache, kv_cache_layout,
                                                         "out", out, high_precision, alibi_slopes)
    rows, Hq, D = qshape
    if check_int("block_size", block_size) != info.block_size:
        raise ValueError(f"block_size={block_size} but the caches have block size {info.block_size}")
    _index_vector("kv_indptr", kv_indptr, device)
    _index_vector("kv_page_indices", kv_page_indices, device)
    _index_vector("kv_last_page_lens", kv_last_page_lens, device)
    num_seqs = kv_indptr.shape[0] - 1
    if kv_last_page_lens.shape[0] != num_seqs:
        raise ValueError(f"kv_last_page_lens must have {num_seqs} entries (kv_indptr has {num_seqs + 1}), got "
                         f"{kv_last_page_lens.shape[0]}")
    mtp = _mtp_rows(rows, num_seqs, mtp)
    P = check_int("max_num_partitions", max_num_partitions)
    if P < 1:
        raise ValueError(f"max_num_partitions must be >= 1, got {P}")
    partition_size = check_int("partition_size", partition_size, minimum=1)
    quant, ka, va = kv_quant_for(query.dtype, device, D, key_cache, value_cache, info, k_scale, v_scale,
                                 kv_cache_dtype)
    workspace = _workspace(workspace_buffer, rows, Hq, P, D, out.dtype) if P > 1 else None
    return PagedCall("paged_attention_ragged", out, query, key_cache, value_cache, info, check_float("scale", scale),
                     P * partition_size, num_seqs, Hq, kv_page_indices, None, ka, va,
                     _key(device, query.dtype, key_cache.dtype, D, D, quant, high_precision), backend, alibi_slopes,
                     check_float("logits_soft_cap", logits_soft_cap), 0, None, mtp, kv_indptr, kv_last_page_lens,
                     partition_size=partition_size, num_partitions=P, workspace=workspace)


def pa_fwd_asm(out: Tensor, Q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor, context_lens: Tensor,  # noqa: N803
               block_tables_stride0: int, max_qlen: int, K_QScale: Optional[Tensor],  # noqa: N803
               V_QScale: Optional[Tensor], qo_indptr: Optional[Tensor], high_precision: int,  # noqa: N803
               backend: Optional[str] = None) -> PagedCall:
    _cache_rank(K, 5, "pa_fwd_asm needs the vLLM 5-D key cache [nb, Hk, D/x, bs, x]")
    qshape, device, info, high_precision = _decode_front("Q", Q, K, V, None, "out_", out, high_precision, None)
    rows, Hq, D = qshape
    num_seqs = _block_tables(block_tables, context_lens, None, info, device)
    if check_int("block_tables_stride0", block_tables_stride0) != block_tables.stride(0):
        raise ValueError(f"block_tables_stride0={block_tables_stride0} but block_tables.stride(0) is "
                         f"{block_tables.stride(0)}")
    max_ctx = block_tables.shape[1] * info.block_size
    max_qlen = check_int("max_qlen", max_qlen, minimum=1)
    if qo_indptr is not None:
        _index_vector("qo_indptr", qo_indptr, device)
        if qo_indptr.shape[0] != num_seqs + 1:
            raise ValueError(f"qo_indptr must have num_seqs + 1 = {num_seqs + 1} entries, got {qo_indptr.shape[0]}")
    elif rows != num_seqs * max_qlen:
        raise ValueError(f"Q must have num_seqs * max_qlen = {num_seqs} x {max_qlen} rows, got {rows}")
    quant, ka, va = kv_quant_for(Q.dtype, device, D, K, V, info, K_QScale, V_QScale, _inferred(K))
    return PagedCall("pa_fwd_asm", out, Q, K, V, info, D ** -0.5, max_ctx, num_seqs, Hq, block_tables, context_lens,
                     ka, va, _key(device, Q.dtype, K.dtype, D, D, quant, high_precision), backend,
                     qo_indptr=qo_indptr, max_qlen=max_qlen)


# -- prefill / extend ---------------------------------------------------------------------------------


def _prefill_common(q, k, v, o, k_cache, v_cache, layout, kv_cache_dtype, k_scale, v_scale, four_d_only=True):
    qshape = check_query("q", q)
    total, Hq, D = qshape
    device = q.device
    info = _caches(k_cache, v_cache, layout, four_d_only)
    _heads(Hq, info)
    Dv = info.v_cols or info.cols
    for name, t, d in (("k", k, D), ("v", v, Dv)):
        if not isinstance(t, Tensor) or t.shape != (total, info.num_kv_heads, d):
            raise ValueError(f"{name} must be [total_tokens={total}, Hk={info.num_kv_heads}, {d}], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the query dtype {q.dtype}, got {t.dtype}")
        if t.device != device:
            raise ValueError(f"{name} must be on {device}, got {t.device}")
    _out("o", o, (total, Hq, Dv), device)
    quant, ka, va = kv_quant_for(q.dtype, device, D, k_cache, v_cache, info, k_scale, v_scale, kv_cache_dtype)
    return info, Hq, D, Dv, device, quant, ka, va


def pa_context_attention_fwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, kv_cache_dtype: str, k_cache: Tensor,
                             v_cache: Tensor, b_loc: Tensor, b_start_loc: Tensor, b_seq_len: Tensor,
                             max_input_len: int, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                             alibi_slopes: Optional[Tensor], sliding_window: Optional[int],
                             sm_scale: Optional[float], skip_decode: bool, max_seq_len: Optional[int],
                             kv_cache_layout: Optional[str], backend: Optional[str] = None) -> PagedCall:
    info, Hq, D, Dv, device, quant, ka, va = _prefill_common(q, k, v, o, k_cache, v_cache, kv_cache_layout or "NHD",
                                                             kv_cache_dtype, k_scale, v_scale)
    check_index_tensor("b_loc", b_loc, ndim=2, device=device)
    _index_vector("b_start_loc", b_start_loc, device)
    _index_vector("b_seq_len", b_seq_len, device)
    B = b_seq_len.shape[0]
    if b_start_loc.shape[0] != B + 1 or b_loc.shape[0] != B:
        raise ValueError(f"b_start_loc must have B+1 = {B + 1} entries and b_loc {B} rows, got "
                         f"{b_start_loc.shape[0]} and {b_loc.shape[0]}")
    if alibi_slopes is not None:
        check_per_head_f32("alibi_slopes", alibi_slopes, Hq, device=device)
    max_input_len = check_int("max_input_len", max_input_len)
    if max_input_len < 1:
        raise ValueError(f"max_input_len must be >= 1, got {max_input_len}")
    if max_seq_len is not None:
        max_ctx = check_int("max_seq_len", max_seq_len, minimum=0)
        need = -(-max_ctx // info.block_size)
        if b_loc.shape[1] < need:
            raise ValueError(f"b_loc is too short: max_seq_len={max_ctx} needs {need} blocks, got {b_loc.shape[1]}")
    else:
        max_ctx = b_loc.shape[1] * info.block_size
    if b_loc.shape[1] > 1 and b_loc.stride(1) != 1:
        raise ValueError("b_loc rows must be contiguous (stride 1 along blocks)")
    window = 0 if sliding_window is None else check_int("sliding_window", sliding_window)
    scale = D ** -0.5 if sm_scale is None else check_float("sm_scale", sm_scale)
    cached = b_seq_len - b_start_loc.diff()  # cached tokens per sequence: on the device, no sync
    if cached.dtype != torch.int32:
        cached = cached.to(torch.int32)
    return PagedCall("pa_context_attention_fwd", o, q, k_cache, v_cache, info, scale, max_ctx, B, Hq, b_loc, cached,
                     ka, va, _key(device, q.dtype, k_cache.dtype, D, Dv, quant, 1), backend, alibi_slopes, 0.0, window,
                     b_start_loc, max_input_len, new_k=k, new_v=v, skip_decode=bool(skip_decode), num_partitions=1)


def extend_attention_fwd(q_extend: Tensor, k_extend: Tensor, v_extend: Tensor, o_extend: Tensor, k_buffer: Tensor,
                         v_buffer: Tensor, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                         custom_mask: Optional[Tensor], is_causal: bool, mask_indptr: Optional[Tensor],
                         max_len_extend: int, sm_scale: Optional[float], logit_cap: float,
                         skip_prefix_custom_mask: bool, backend: Optional[str] = None) -> PagedCall:
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, Hk, D], got {tuple(getattr(t, 'shape', ()))}")
    kc, vc = k_buffer.unsqueeze(1), v_buffer.unsqueeze(1)  # page size 1, NHD
    info, Hq, D, Dv, device, quant, ka, va = _prefill_common(q_extend, k_extend, v_extend, o_extend, kc, vc, "NHD",
                                                             "auto", None, None)
    _index_vector("qo_indptr", qo_indptr, device)
    _index_vector("kv_indptr", kv_indptr, device)
    _index_vector("kv_indices", kv_indices, device)
    if qo_indptr.shape[0] != kv_indptr.shape[0]:
        raise ValueError(f"qo_indptr and kv_indptr must both have B+1 entries, got {qo_indptr.shape[0]} and "
                         f"{kv_indptr.shape[0]}")
    max_len_extend = check_int("max_len_extend", max_len_extend)
    if max_len_extend < 1:
        raise ValueError(f"max_len_extend must be >= 1, got {max_len_extend}")
    mask = None
    if custom_mask is not None:
        if not isinstance(custom_mask, Tensor) or custom_mask.dim() != 1 or custom_mask.dtype not in (
                torch.bool, torch.uint8, torch.int8):
            raise TypeError(f"custom_mask must be a flat bool tensor, got {getattr(custom_mask, 'dtype', None)} "
                            f"{tuple(getattr(custom_mask, 'shape', ()))}")
        if custom_mask.device != device:
            raise ValueError(f"custom_mask must be on {device}, got {custom_mask.device}")
        _index_vector("mask_indptr", mask_indptr, device)
        if mask_indptr.shape[0] < qo_indptr.shape[0] - 1:
            raise ValueError(f"mask_indptr needs an entry per sequence ({qo_indptr.shape[0] - 1}), got "
                             f"{mask_indptr.shape[0]}")
        mask = custom_mask.contiguous().view(torch.uint8)
    scale = D ** -0.5 if sm_scale is None else check_float("sm_scale", sm_scale)
    return PagedCall("extend_attention_fwd", o_extend, q_extend, kc, vc, info, scale, k_buffer.shape[0],
                     kv_indptr.shape[0] - 1, Hq, kv_indices, None, ka, va,
                     _key(device, q_extend.dtype, kc.dtype, D, Dv, quant, 1), backend, None,
                     check_float("logit_cap", logit_cap), 0, qo_indptr, max_len_extend, kv_indptr, token_lists=True,
                     new_k=k_extend, new_v=v_extend, new_causal=bool(is_causal), num_partitions=1, custom_mask=mask,
                     mask_indptr=mask_indptr, mask_prefix=not skip_prefix_custom_mask)


@lru_cache(maxsize=64)
def _empty_cache(device: torch.device, dtype: torch.dtype, num_kv_heads: int, head_dim: int, head_dim_v: int):
    """A one-token NHD cache pair of zeros (prefill without a cache reads none of it)."""
    return (torch.zeros(1, 1, num_kv_heads, head_dim, dtype=dtype, device=device),
            torch.zeros(1, 1, num_kv_heads, head_dim_v, dtype=dtype, device=device))


@lru_cache(maxsize=64)
def _no_context(device: torch.device, num_seqs: int):
    """(block_tables [B, 1], context_lens [B]) of zeros: sequences with no cached tokens."""
    return (torch.zeros(num_seqs, 1, dtype=torch.int32, device=device),
            torch.zeros(num_seqs, dtype=torch.int32, device=device))


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, o: Tensor, b_start_loc: Tensor, b_seq_len: Tensor,
                      max_input_len: int, is_causal: bool, backend: Optional[str] = None) -> PagedCall:
    qshape = check_query("q", q)
    device = q.device
    _index_vector("b_start_loc", b_start_loc, device)
    _index_vector("b_seq_len", b_seq_len, device)
    B = b_seq_len.shape[0]
    if b_start_loc.shape[0] != B:
        raise ValueError(f"b_start_loc and b_seq_len must have one entry per sequence, got {b_start_loc.shape[0]} and "
                         f"{B}")
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, Tensor) or t.dim() != 3 or qshape[1] % t.shape[1]:
            raise ValueError(f"{name} must be [total_tokens, Hk, D] with Hq a multiple of Hk, got "
                             f"{tuple(getattr(t, 'shape', ()))}")
    kc, vc = _reused(_empty_cache, device, q.dtype, k.shape[1], qshape[2], v.shape[2])
    info, Hq, D, Dv, device, quant, ka, va = _prefill_common(q, k, v, o, kc, vc, "NHD", "auto", None, None)
    qo = torch.cat([b_start_loc, (b_start_loc[-1:] + b_seq_len[-1:])])  # [B + 1] row offsets, on the device
    if qo.dtype != torch.int32:
        qo = qo.to(torch.int32)
    bt, ctx = _reused(_no_context, device, B)
    return PagedCall("prefill_attention", o, q, kc, vc, info, D ** -0.5, 0, B, Hq, bt, ctx, ka, va,
                     _key(device, q.dtype, kc.dtype, D, Dv, quant, 1), backend, qo_indptr=qo,
                     max_qlen=check_int("max_input_len", max_input_len, minimum=1), new_k=k, new_v=v, new_causal=bool(is_causal),
                     num_partitions=1)
