"""Quantization types (upstream values) and the KV-cache quantization methods.

The KV-cache methods are shared by paged attention, unified attention and MLA. Each comes with a
reference quantize/dequantize pair in PyTorch and a documented scale shape. Scales are
*dequantization* scales, as in upstream and vLLM: ``stored = x / scale``, ``x ~ stored * scale``.

KV tensors here are token-major ``[num_tokens, num_kv_heads, head_dim]``; a paged cache is the
same thing after flattening ``[num_blocks, block_size]`` into tokens (slot = block * block_size +
offset), so per-token scales are indexed by slot.
"""

from __future__ import annotations

import enum

import torch

from .dtypes import dtype_max, get_fp8


class QuantType(enum.IntEnum):
    """Upstream ``aiter.QuantType`` with its exact values."""

    No = 0
    per_Tensor = 1
    per_Token = 2
    per_1x32 = 3
    per_1x128 = 4
    per_128x128 = 5
    per_256x128 = 6
    per_1024x128 = 7


class ActivationType(enum.IntEnum):
    No = -1
    Silu = 0
    Gelu = 1
    Swiglu = 2
    Situv2 = 3


class MlaVersion(enum.IntEnum):
    V32 = 0
    V40 = 1


class KVQuant(enum.IntEnum):
    """KV-cache quantization methods, numbered as upstream's ``quant_algo`` ids."""

    NONE = 0
    PER_HEAD_8BIT = 1  # one scale per KV head for the whole cache: scale [num_kv_heads]
    PER_TOKEN_8BIT = 2  # one scale per (token, KV head): scale [num_kv_heads, num_tokens]
    PER_TOKEN_4BIT = 3  # int4, two values per byte along head_dim: scale [num_kv_heads, num_tokens]
    PER_TENSOR_8BIT = 4  # one scale for the whole cache: scale [1]

    @property
    def bits(self) -> int:
        return {KVQuant.NONE: 16, KVQuant.PER_TOKEN_4BIT: 4}.get(self, 8)


_EPS = 1e-12  # absmax floor: an all-zero row gets a tiny scale, not a division by zero
INT4_MAX = 7


def kv_scale_shape(method: KVQuant, num_tokens: int, num_kv_heads: int) -> tuple[int, ...]:
    """Shape of the dequantization scale tensor for ``method`` (empty tuple for NONE)."""
    method = KVQuant(method)
    if method == KVQuant.NONE:
        return ()
    if method == KVQuant.PER_TENSOR_8BIT:
        return (1,)
    if method == KVQuant.PER_HEAD_8BIT:
        return (num_kv_heads,)
    return (num_kv_heads, num_tokens)


def kv_storage_dtype(method: KVQuant, dtype: torch.dtype | None = None) -> torch.dtype | None:
    """The cache dtype: the given 8-bit dtype (fp8 default), uint8 for packed int4, None for NONE."""
    method = KVQuant(method)
    if method == KVQuant.NONE:
        return None
    if method == KVQuant.PER_TOKEN_4BIT:
        return torch.uint8
    dtype = dtype or get_fp8()
    if dtype not in (torch.int8, torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2):
        raise TypeError(f"8-bit KV cache dtype must be int8 or an fp8 type, got {dtype}")
    return dtype


def _absmax(x: torch.Tensor, method: KVQuant) -> torch.Tensor:
    a = x.abs().float()
    if method == KVQuant.PER_TENSOR_8BIT:
        return a.amax().reshape(1)
    if method == KVQuant.PER_HEAD_8BIT:
        return a.amax(dim=(0, 2))  # [H]
    return a.amax(dim=2).transpose(0, 1)  # per (token, head) -> [H, T]


def _broadcast_scale(scale: torch.Tensor, method: KVQuant) -> torch.Tensor:
    """Scale of shape kv_scale_shape -> broadcastable against [T, H, D]."""
    if method == KVQuant.PER_TENSOR_8BIT:
        return scale.reshape(1, 1, 1)
    if method == KVQuant.PER_HEAD_8BIT:
        return scale.reshape(1, -1, 1)
    return scale.transpose(0, 1).unsqueeze(-1)  # [H, T] -> [T, H, 1]


def _check_kv(x: torch.Tensor, name: str) -> None:
    if x.dim() != 3:
        raise ValueError(f"{name} must be [num_tokens, num_kv_heads, head_dim], got shape {tuple(x.shape)}")


def quantize_kv(
    x: torch.Tensor, method: KVQuant, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference quantization of ``x [T, H, D]``. Returns ``(stored, dequant_scale)``.

    8-bit methods store ``x / scale`` cast to ``dtype`` (fp8 rounds to nearest; int8 rounds and
    clamps). ``PER_TOKEN_4BIT`` stores signed int4 in ``[-8, 7]``, two per byte along D: element
    ``2i`` in the low nibble, ``2i+1`` in the high nibble, as ``uint8 [T, H, D/2]``.
    """
    method = KVQuant(method)
    _check_kv(x, "x")
    if method == KVQuant.NONE:
        return x, None
    store = kv_storage_dtype(method, dtype)
    if method == KVQuant.PER_TOKEN_4BIT:
        if x.shape[-1] % 2:
            raise ValueError(f"int4 KV needs an even head_dim, got {x.shape[-1]}")
        scale = _absmax(x, method).clamp_min(_EPS) / INT4_MAX
        q = torch.round(x.float() / _broadcast_scale(scale, method)).clamp(-8, INT4_MAX).to(torch.int16)
        nibbles = q & 0xF
        packed = nibbles[..., 0::2] | (nibbles[..., 1::2] << 4)
        return packed.to(torch.uint8), scale
    scale = _absmax(x, method).clamp_min(_EPS) / dtype_max(store)
    y = x.float() / _broadcast_scale(scale, method)
    if store == torch.int8:
        y = torch.round(y).clamp(-128, 127)
    return y.to(store), scale


def dequantize_kv(
    stored: torch.Tensor, scale: torch.Tensor | None, method: KVQuant, out_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of :func:`quantize_kv`: ``[T, H, D]`` (unpacked for int4) in ``out_dtype``."""
    method = KVQuant(method)
    _check_kv(stored, "stored")
    if method == KVQuant.NONE:
        return stored.to(out_dtype)
    if scale is None:
        raise ValueError(f"{method.name} needs a dequantization scale, got None")
    if method == KVQuant.PER_TOKEN_4BIT:
        b = stored.to(torch.int16)
        lo, hi = b & 0xF, (b >> 4) & 0xF
        # nibble -> signed int4 (two's complement)
        lo = torch.where(lo >= 8, lo - 16, lo)
        hi = torch.where(hi >= 8, hi - 16, hi)
        values = torch.stack((lo, hi), dim=-1).flatten(-2).float()
    else:
        values = stored.float()
    expected = kv_scale_shape(method, stored.shape[0], stored.shape[1])
    if tuple(scale.shape) != expected:
        raise ValueError(f"{method.name} scale must have shape {expected}, got {tuple(scale.shape)}")
    return (values * _broadcast_scale(scale.float(), method)).to(out_dtype)
