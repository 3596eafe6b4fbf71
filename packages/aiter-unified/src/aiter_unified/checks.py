"""The one validation of a ``unified_attention`` call, run inside the op: it returns the op's
:class:`Call`.

Host-side only (shapes, dtypes, devices, strides, Python values), never tensor contents, so it
costs no device sync and runs under CUDA-graph capture. Every tensor attribute is read once and
kept in the Call (the launcher reads sizes and strides from there). Each test is a cheap
comparison; when one fails, the generic check of :mod:`aiter_core.checks` (or the message here)
raises ``TypeError``/``ValueError`` naming the argument, what was expected and what came.

``unified_attention_segments`` (the ``skip_reduce`` form) takes the same arguments and is
checked the same way: it is the same function.
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch

from aiter_core.checks import (
    check_bool,
    check_device,
    check_dtype,
    check_float,
    check_int,
    check_last_dim_contiguous,
    check_ndim,
    check_scalar_f32,
    check_tensor,
    describe,
)

Tensor = torch.Tensor
FP8 = (torch.float8_e4m3fn,)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)
Q_OUT_DTYPES = frozenset(FLOAT + FP8)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 512
MIN_BLOCK, MAX_BLOCK = 1, 256
SHORT_Q = 16  # sequences with at most this many new tokens run on the small (decode) row tile
_I32 = torch.int32
_new = tuple.__new__
_F32 = torch.float32
_INF = float("inf")

__all__ = ["Call", "Key", "unified_attention", "unified_attention_segments", "skip_reduce_flag", "SHORT_Q"]


class Key(NamedTuple):
    """What the backends' ``supports`` and the launch configuration read (see ``triton/launch.py``)."""

    device_type: str
    dtype: torch.dtype  # q's
    kv_dtype: torch.dtype
    out_dtype: torch.dtype
    head_dim: int
    heads_q: int
    heads_kv: int
    block_size: int  # tokens per KV cache block
    decode: bool  # max_seqlen_q == 1: one query block per sequence
    short_q: bool  # max_seqlen_q <= SHORT_Q: the small row tile, no prefill-tile launch
    window: bool  # sliding window on
    softcap: bool  # softcap > 0
    alibi: bool
    qq_bias: bool
    sinks: bool
    q_descale: bool
    kv_descale: bool
    output_scale: bool
    offset_bits: int  # 32 when every element offset of both caches fits int32, else 64
    same_kv_offsets: bool  # K and V caches share their block and token strides


class Call(NamedTuple):
    """A validated call: tensors, sizes and options as the backends take them."""

    q: Tensor  # [num_tokens, heads_q, head_dim]
    k: Tensor  # [num_blocks, block_size, heads_kv, head_dim]
    v: Tensor
    out: Tensor  # q's shape
    cu_seqlens_q: Tensor  # [num_seqs + 1] int32
    seqused_k: Tensor  # [num_seqs] int32
    block_table: Tensor  # [>= num_seqs, max_blocks] int32
    max_seqlen_q: int
    max_seqlen_k: int
    softmax_scale: float
    window_size: List[int]  # (left, right) as given
    sliding_window: int  # 1 + left, 0 when off
    softcap: float
    q_descale: Optional[Tensor]
    k_descale: Optional[Tensor]
    v_descale: Optional[Tensor]
    alibi_slopes: Optional[Tensor]
    output_scale: Optional[Tensor]
    qq_bias: Optional[Tensor]
    sinks: Optional[Tensor]
    num_tokens: int
    num_seqs: int
    num_blocks: int  # KV cache blocks (k.shape[0])
    max_blocks: int  # block_table.shape[1]
    device: torch.device
    q_stride: tuple
    out_stride: tuple
    k_stride: tuple
    v_stride: tuple
    block_table_stride: tuple
    key: Key
    backend: Optional[str]


def unified_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor, max_seqlen_q: int,
                      seqused_k: Tensor, max_seqlen_k: int, softmax_scale: float, causal: bool,
                      window_size: List[int], block_table: Tensor, softcap: float, q_descale: Optional[Tensor],
                      k_descale: Optional[Tensor], v_descale: Optional[Tensor], q_scales: Optional[Tensor] = None,
                      alibi_slopes: Optional[Tensor] = None, output_scale: Optional[Tensor] = None,
                      qq_bias: Optional[Tensor] = None, sinks: Optional[Tensor] = None,
                      shuffled_kv_cache: bool = False, backend: Optional[str] = None) -> Call:
    """Validate every argument of ``aiter::unified_attention`` once and return its Call."""
    if q_scales is not None:
        raise ValueError("q_scales (nvfp4 block-scaled q) is not supported: pass q as float16, bfloat16 or "
                         "float8_e4m3fn with an optional per-tensor q_descale")
    if shuffled_kv_cache:
        raise ValueError("shuffled_kv_cache=True (gfx1250 shuffled layout) is not supported: pass the NHD cache "
                         "k, v [num_blocks, block_size, num_kv_heads, head_dim]")
    if causal is not True:
        raise ValueError(f"causal must be True (unified attention is causal only, as upstream), got {causal!r}")

    # q, k, v, out: tensors of rank 3, 4, 4, 3 on q's device
    if not (isinstance(q, Tensor) and isinstance(k, Tensor) and isinstance(v, Tensor) and isinstance(out, Tensor)):
        for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
            check_tensor(name, x)
    q_shape, k_shape, v_shape, out_shape = q.shape, k.shape, v.shape, out.shape
    if len(q_shape) != 3 or len(k_shape) != 4 or len(v_shape) != 4 or len(out_shape) != 3:
        for name, x, ndim in (("q", q, 3), ("k", k, 4), ("v", v, 4), ("out", out, 3)):
            check_ndim(name, x, ndim)
    device = q.device
    if k.device != device or v.device != device or out.device != device:
        for name, x in (("k", k), ("v", v), ("out", out)):
            check_device(name, x, device, like="q")

    # dtypes
    q_dtype, kv_dtype, out_dtype = q.dtype, k.dtype, out.dtype
    if not (q_dtype in FLOAT and kv_dtype is q_dtype and out_dtype is q_dtype and v.dtype is q_dtype):
        _check_dtypes(q_dtype, kv_dtype, v.dtype, out_dtype)

    # shapes and layouts
    num_tokens, heads_q, head_dim = q_shape
    num_blocks, block_size, heads_kv, head_dim_k = k_shape
    if v_shape != k_shape:
        raise ValueError(f"v must have k's shape {tuple(k_shape)} [num_blocks, block_size, Hk, D], got {tuple(v_shape)}")
    if head_dim_k != head_dim:
        raise ValueError(f"k's head dim (last) must equal q's {head_dim}, got {head_dim_k}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}] (q.shape[2]), got {head_dim}")
    if not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise ValueError(f"block_size (k.shape[1]) must be in [{MIN_BLOCK}, {MAX_BLOCK}], got {block_size}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of the KV heads (k.shape[2]={heads_kv})")
    if out_shape != q_shape:
        raise ValueError(f"out must have q's shape {tuple(q_shape)}, got {tuple(out_shape)}")
    q_stride, out_stride, k_stride, v_stride = q.stride(), out.stride(), k.stride(), v.stride()
    if q_stride[2] != 1 or out_stride[2] != 1 or k_stride[3] != 1 or v_stride[3] != 1:  # head_dim >= 16 here
        for name, x in (("q", q), ("out", out), ("k", k), ("v", v)):
            check_last_dim_contiguous(name, x)

    # the int32 index tensors
    if not (isinstance(cu_seqlens_q, Tensor) and isinstance(seqused_k, Tensor) and isinstance(block_table, Tensor)):
        for name, x in (("cu_seqlens_q", cu_seqlens_q), ("seqused_k", seqused_k), ("block_table", block_table)):
            check_tensor(name, x)
    cu_shape, used_shape, table_shape = cu_seqlens_q.shape, seqused_k.shape, block_table.shape
    if len(cu_shape) != 1 or len(used_shape) != 1 or len(table_shape) != 2 or cu_seqlens_q.dtype != _I32 or \
            seqused_k.dtype != _I32 or block_table.dtype != _I32 or cu_seqlens_q.device != device or \
            seqused_k.device != device or block_table.device != device:
        for name, x, ndim in (("cu_seqlens_q", cu_seqlens_q, 1), ("seqused_k", seqused_k, 1),
                              ("block_table", block_table, 2)):
            check_ndim(name, x, ndim)
            check_dtype(name, x, (_I32,))
            check_device(name, x, device, like="q")
    num_seqs = cu_shape[0] - 1
    if num_seqs < 1:
        raise ValueError(f"cu_seqlens_q must have num_seqs + 1 >= 2 entries, got shape {tuple(cu_shape)}")
    if used_shape[0] != num_seqs:
        raise ValueError(f"seqused_k must have num_seqs={num_seqs} entries (cu_seqlens_q has {num_seqs + 1}), "
                         f"got {used_shape[0]}")
    if table_shape[0] < num_seqs:
        raise ValueError(f"block_table must have at least num_seqs={num_seqs} rows, got {table_shape[0]}")
    if cu_seqlens_q.stride(0) != 1 or (seqused_k.stride(0) != 1 and num_seqs > 1):
        for name, x in (("cu_seqlens_q", cu_seqlens_q), ("seqused_k", seqused_k)):
            if x.stride(0) != 1 and x.shape[0] > 1:
                raise ValueError(f"{name} must be contiguous (unit stride), got stride {x.stride(0)}: "
                                 f"pass {name}.contiguous()")
    table_stride = block_table.stride()
    if table_stride[1] != 1 and table_shape[1] > 1:
        raise ValueError(f"block_table must have unit stride along its block axis (dim 1), got strides "
                         f"{tuple(table_stride)}: pass block_table.contiguous()")

    # host values
    if type(max_seqlen_q) is not int or max_seqlen_q < 1:
        max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    if type(max_seqlen_k) is not int or max_seqlen_k < 1:
        max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, minimum=1)
    if max_seqlen_q > max_seqlen_k:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) cannot exceed max_seqlen_k ({max_seqlen_k}): "
                         "seqused_k counts the new tokens too")
    if table_shape[1] * block_size < max_seqlen_k:
        raise ValueError(f"block_table has {table_shape[1]} blocks of {block_size} per sequence, fewer than "
                         f"max_seqlen_k={max_seqlen_k} tokens")
    if type(softmax_scale) is not float or not 0.0 < softmax_scale < _INF:
        # finite and > 0 (aiter_core.checks: a NaN or infinite scale is refused); folded into exp2's FMA
        softmax_scale = check_float("softmax_scale", softmax_scale, above=0.0)
    if (type(window_size) is tuple or type(window_size) is list) and len(window_size) == 2 and \
            type(window_size[0]) is int and type(window_size[1]) is int:
        left = window_size[0]
    elif isinstance(window_size, (tuple, list)) and len(window_size) == 2 and \
            all(isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        left = int(window_size[0])  # an int subclass
    else:
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    if type(softcap) is not float or not 0.0 <= softcap < _INF:
        softcap = check_float("softcap", softcap, minimum=0.0)  # finite

    # optional tensors
    if q_descale is not None:
        check_scalar_f32("q_descale", q_descale, device=device, like="q")
    if k_descale is not None or v_descale is not None:
        for name, x in (("k_descale", k_descale), ("v_descale", v_descale)):
            if x is not None:
                check_scalar_f32(name, x, device=device, like="q")
        if k_descale is None or v_descale is None:
            raise ValueError("k_descale and v_descale must be given together (per-tensor KV scales), got only "
                             + ("k_descale" if v_descale is None else "v_descale"))
    if output_scale is not None:
        check_scalar_f32("output_scale", output_scale, device=device, like="q")
    if alibi_slopes is not None:
        _check_per_head("alibi_slopes", alibi_slopes, heads_q, device)
    if sinks is not None:
        _check_per_head("sinks", sinks, heads_q, device)
    if qq_bias is not None:
        _check_qq_bias(qq_bias, max_seqlen_q, device)

    # Key and Call in their field order, through tuple.__new__ (a NamedTuple's own __new__ costs 0.5 us more)
    key = _new(Key, (
        _DEVICE_TYPES.get(device) or _device_type(device), q_dtype, kv_dtype, out_dtype, head_dim, heads_q, heads_kv,
        block_size, max_seqlen_q == 1, max_seqlen_q <= SHORT_Q, left >= 0, softcap > 0, alibi_slopes is not None,
        qq_bias is not None, sinks is not None, q_descale is not None, k_descale is not None,
        output_scale is not None, _offset_bits(k_shape, k_stride, v_stride), k_stride[0] == v_stride[0] and
        k_stride[1] == v_stride[1]))
    return _new(Call, (
        q, k, v, out, cu_seqlens_q, seqused_k, block_table, max_seqlen_q, max_seqlen_k, softmax_scale, window_size,
        left + 1 if left >= 0 else 0, softcap, q_descale, k_descale, v_descale, alibi_slopes, output_scale, qq_bias,
        sinks, num_tokens, num_seqs, num_blocks, table_shape[1], device, q_stride, out_stride, k_stride, v_stride,
        table_stride, key, backend))


# the skip_reduce form: same arguments, same checks (its backends return the segment buffers)
unified_attention_segments = unified_attention


def skip_reduce_flag(skip_reduce) -> bool:
    """The public function's ``skip_reduce``, which picks the op: a bool."""
    return skip_reduce if skip_reduce is False or skip_reduce is True else check_bool("skip_reduce", skip_reduce)


def _check_dtypes(q_dtype, kv_dtype, v_dtype, out_dtype) -> None:
    """The dtype rules, when q, k, v and out do not all share one 16/32-bit float dtype."""
    if q_dtype not in Q_OUT_DTYPES:
        raise TypeError(f"q must be float16, bfloat16, float32 or float8_e4m3fn, got {q_dtype}")
    if v_dtype != kv_dtype:
        raise TypeError(f"k and v must have the same dtype, got k {kv_dtype} and v {v_dtype}")
    if q_dtype in FP8:
        if kv_dtype not in FP8:
            raise TypeError(f"an fp8 q needs an fp8 (float8_e4m3fn) KV cache, got {kv_dtype}")
    elif kv_dtype != q_dtype and kv_dtype not in FP8:
        raise TypeError(f"k/v must have q's dtype {q_dtype} or be float8_e4m3fn, got {kv_dtype}")
    if out_dtype not in Q_OUT_DTYPES:
        raise TypeError(f"out must be float16, bfloat16, float32 or float8_e4m3fn, got {out_dtype}")


_DEVICE_TYPES: dict = {}


def _device_type(device: torch.device) -> str:
    """``device.type`` (a new str on every read: 0.8 us), remembered per device."""
    _DEVICE_TYPES[device] = device.type
    return device.type


def _offset_bits(shape, k_stride, v_stride) -> int:
    """32 when every element offset of both caches (of one shape) fits int32, else 64: the largest
    offset is ``aiter_core.triton_attn.max_element_offset`` (-1 for an empty cache)."""
    if 0 in shape:
        return 32
    n0, n1, n2, n3 = shape[0] - 1, shape[1] - 1, shape[2] - 1, shape[3] - 1
    top = n0 * k_stride[0] + n1 * k_stride[1] + n2 * k_stride[2] + n3 * k_stride[3]
    if v_stride != k_stride:
        top = max(top, n0 * v_stride[0] + n1 * v_stride[1] + n2 * v_stride[2] + n3 * v_stride[3])
    return 32 if top < 2**31 else 64


def _check_per_head(name: str, x, heads_q: int, device: torch.device) -> None:
    check_tensor(name, x, ndim=1)
    if x.shape[0] != heads_q or x.dtype != _F32:
        raise ValueError(f"{name} must be float32 [{heads_q}] (one per q head), got {describe(x)}")
    if x.stride(0) != 1 and heads_q > 1:
        raise ValueError(f"{name} must be contiguous (unit stride), got stride {x.stride(0)}")
    check_device(name, x, device, like="q")


def _check_qq_bias(qq_bias, max_seqlen_q: int, device: torch.device) -> None:
    check_tensor("qq_bias", qq_bias, ndim=2)
    if qq_bias.shape[0] < max_seqlen_q or qq_bias.shape[1] < max_seqlen_q or qq_bias.stride(1) != 1:
        raise ValueError(f"qq_bias must be [n, n] with n >= max_seqlen_q={max_seqlen_q} and unit last stride, "
                         f"got {describe(qq_bias)}")
    if qq_bias.dtype not in FLOAT:
        raise TypeError(f"qq_bias must be float16, bfloat16 or float32, got {qq_bias.dtype}")
    check_device("qq_bias", qq_bias, device, like="q")
