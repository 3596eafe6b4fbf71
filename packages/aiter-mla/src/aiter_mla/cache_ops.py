"""MLA KV-cache ops with upstream's signatures: ``concat_and_cache_mla`` (``aiter.ops.cache``),
``fused_qk_rope_concat_and_cache_mla`` (``aiter.ops.cache``, HIP in upstream) and
``fused_qk_rope_cat_and_cache_mla`` (``aiter.ops.triton.fusions.fused_kv_cache``).

All write the cache in place; slots < 0 are skipped; fp8 caches store ``x / scale``. RoPE:
``is_neox`` halves or interleaved pairs, tables ``[max_pos, rope/2]`` (or full ``rope`` width).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C

Tensor = torch.Tensor

__all__ = ["concat_and_cache_mla", "fused_qk_rope_concat_and_cache_mla", "fused_qk_rope_cat_and_cache_mla"]

KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "float16", "bfloat16")
SLOT_DTYPES = (torch.int32, torch.int64)


def _ops():
    from .ops import OPS

    return OPS


def _check_slots(slot_mapping, tokens: int, device) -> None:
    C.tensor("slot_mapping", slot_mapping, dims=(1,), dtypes=SLOT_DTYPES, device=device)
    if slot_mapping.shape[0] != tokens:
        raise ValueError(f"slot_mapping must have one entry per token ({tokens}), got {slot_mapping.shape[0]}")


def _check_tables(cos, sin, rope: int, device, names=("cos_cache", "sin_cache")) -> None:
    for name, t in zip(names, (cos, sin)):
        C.tensor(name, t, dims=(2,), dtypes=C.FLOAT_DTYPES, device=device)
        if t.shape[1] not in (rope // 2, rope):
            raise ValueError(f"{name} must be [max_pos, {rope // 2}] (or full width {rope}), got {tuple(t.shape)}")
        C.last_dim_contiguous(name, t)
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape and strides, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if rope % 2:
        raise ValueError(f"the rope width must be even, got {rope}")


def _mla_cache(name: str, kv_cache, width: int, device) -> None:
    C.tensor(name, kv_cache, dims=(3, 4), device=device)
    if kv_cache.dim() == 4 and kv_cache.shape[2] != 1:
        raise ValueError(f"{name} must be [num_blocks, block_size, (1,) {width}], got {tuple(kv_cache.shape)}")
    if kv_cache.shape[-1] != width:
        raise ValueError(f"{name} rows must be {width} wide (kv_lora_rank + rope), got {kv_cache.shape[-1]}")
    C.last_dim_contiguous(name, kv_cache)


def concat_and_cache_mla(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_cache_dtype: str,
                         scale: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """``kv_cache[slot // bs, slot % bs] = cat(kv_c[t], k_pe[t])`` (fp8 cache: ``/ scale``).

    ``kv_c [T, kv_lora_rank]``, ``k_pe [T, rope]`` (or ``[T, 1, rope]``), ``kv_cache
    [num_blocks, block_size, (1,) kv_lora_rank + rope]``, ``slot_mapping [T]`` int32/int64.
    """
    C.tensor("kv_c", kv_c, dims=(2, 3), dtypes=C.FLOAT_DTYPES)
    C.tensor("k_pe", k_pe, dims=(2, 3), dtypes=C.FLOAT_DTYPES, device=kv_c.device)
    tokens = kv_c.shape[0]
    if k_pe.shape[0] != tokens:
        raise ValueError(f"k_pe must have {tokens} tokens like kv_c, got {tuple(k_pe.shape)}")
    lora, pe = kv_c.shape[-1], k_pe.shape[-1]
    _mla_cache("kv_cache", kv_cache, lora + pe, kv_c.device)
    _check_slots(slot_mapping, tokens, kv_c.device)
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    scale = C.scale("scale", scale, kv_c.device)
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe)):
        C.last_dim_contiguous(name, t)
    _ops()["concat_and_cache_mla"](kv_c, k_pe, kv_cache, slot_mapping, scale, backend=backend)


def fused_qk_rope_concat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                       q_out: Tensor, slot_mapping: Tensor, k_scale: Optional[Tensor],
                                       q_scale: Optional[Tensor], positions: Tensor, cos_cache: Tensor,
                                       sin_cache: Tensor, is_neox: bool, is_nope_first: bool,
                                       compute_all_q_rope: bool = False, *, backend: Optional[str] = None) -> None:
    """RoPE on ``q_pe [T, H, rope]`` and ``k_pe [T, (1,) rope]`` at ``positions [T]``;
    ``q_out [T, H, lora + rope] = cat(q_nope, rope(q_pe))`` (pe first unless ``is_nope_first``;
    fp8 ``q_out``: ``/ q_scale``); cache row of token ``t`` = ``cat(kv_c, rope(k_pe))`` in the same
    order (fp8 cache: ``/ k_scale``). ``compute_all_q_rope`` is accepted (every token is rotated)."""
    C.tensor("q_nope", q_nope, dims=(3,), dtypes=C.FLOAT_DTYPES)
    dev = q_nope.device
    C.tensor("q_pe", q_pe, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("kv_c", kv_c, dims=(2, 3), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("k_pe", k_pe, dims=(2, 3), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("q_out", q_out, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    tokens, heads, lora = q_nope.shape
    pe = q_pe.shape[-1]
    if q_pe.shape[:2] != (tokens, heads):
        raise ValueError(f"q_pe must be [{tokens}, {heads}, rope], got {tuple(q_pe.shape)}")
    if kv_c.shape[0] != tokens or kv_c.shape[-1] != lora or k_pe.shape[0] != tokens or k_pe.shape[-1] != pe:
        raise ValueError(f"kv_c / k_pe must be [{tokens}, {lora}] / [{tokens}, {pe}], got {tuple(kv_c.shape)} / "
                         f"{tuple(k_pe.shape)}")
    if tuple(q_out.shape) != (tokens, heads, lora + pe):
        raise ValueError(f"q_out must be [{tokens}, {heads}, {lora + pe}], got {tuple(q_out.shape)}")
    _mla_cache("kv_cache", kv_cache, lora + pe, dev)
    _check_slots(slot_mapping, tokens, dev)
    C.tensor("positions", positions, dims=(1,), dtypes=SLOT_DTYPES, device=dev)
    if positions.shape[0] != tokens:
        raise ValueError(f"positions must have {tokens} entries, got {positions.shape[0]}")
    _check_tables(cos_cache, sin_cache, pe, dev)
    k_scale = C.scale("k_scale", k_scale, dev)
    q_scale = C.scale("q_scale", q_scale, dev)
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("kv_c", kv_c), ("k_pe", k_pe), ("q_out", q_out)):
        C.last_dim_contiguous(name, t)
    _ops()["fused_qk_rope_concat_and_cache_mla"](q_nope, q_pe, kv_c, k_pe, kv_cache, q_out, slot_mapping, k_scale,
                                                 q_scale, positions, cos_cache, sin_cache, bool(is_neox),
                                                 bool(is_nope_first), backend=backend)


def fused_qk_rope_cat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, k_nope: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                    slot_mapping: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
                                    k_scale: Optional[Tensor], is_neox: bool, num_decode_toks_for_zeros: int = 0,
                                    apply_scale: bool = True, q_out: Optional[Tensor] = None,
                                    decode_q_pe_out: Optional[Tensor] = None, k_pe_out: Optional[Tensor] = None,
                                    q_out_dtype: Optional[torch.dtype] = None, shuffled_kv_cache: bool = False,
                                    upcast_operand: bool = False, *, backend: Optional[str] = None):
    """RoPE + concat + cache write (slot = cache row, page size 1).

    ``q_nope/q_pe [B, QH, D1|D2]`` (positions ``pos[:B]``), ``k_nope/k_pe [B_slot, KH, D1|D2]``
    (positions ``pos[:B_slot]``), ``kv_cache [rows, KH, D1 + D2]``. Returns ``(q_out [B, QH,
    D1 + D2], decode_q_pe_out, k_pe_out [B_slot, KH, D2], q_nope_zeros_out)``: ``q_out =
    cat(q_nope, rope(q_pe))`` (dtype ``q_out_dtype`` or q_nope's), ``decode_q_pe_out`` (written
    when given: ``rope(q_pe)`` of its first rows), ``k_pe_out = rope(k_pe)`` (allocated when not
    given), ``q_nope_zeros_out`` zeros ``[num_decode_toks_for_zeros, QH, D1]`` (None when 0).
    fp8 caches store ``x / k_scale`` when ``apply_scale``. RoPE runs in fp32 (``upcast_operand``
    is accepted)."""
    if shuffled_kv_cache:
        raise ValueError("shuffled_kv_cache=True (gfx950 preshuffled/fp4 cache) is not supported on this backend")
    C.tensor("q_nope", q_nope, dims=(3,), dtypes=C.FLOAT_DTYPES)
    dev = q_nope.device
    C.tensor("q_pe", q_pe, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("k_nope", k_nope, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("k_pe", k_pe, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    C.tensor("kv_cache", kv_cache, dims=(3,), device=dev)
    batch, q_heads, d1 = q_nope.shape
    d2 = q_pe.shape[-1]
    n_slot, k_heads = k_nope.shape[0], k_nope.shape[1]
    if q_pe.shape[:2] != (batch, q_heads):
        raise ValueError(f"q_pe must be [{batch}, {q_heads}, D2], got {tuple(q_pe.shape)}")
    if tuple(k_nope.shape) != (n_slot, k_heads, d1) or tuple(k_pe.shape) != (n_slot, k_heads, d2):
        raise ValueError(f"k_nope / k_pe must be [B_slot, KH, {d1}] / [B_slot, KH, {d2}], got {tuple(k_nope.shape)} / "
                         f"{tuple(k_pe.shape)}")
    if kv_cache.shape[1] != k_heads or kv_cache.shape[2] != d1 + d2:
        raise ValueError(f"kv_cache must be [rows, {k_heads}, {d1 + d2}], got {tuple(kv_cache.shape)}")
    if k_heads > 16:
        raise ValueError(f"at most 16 KV heads are supported, got {k_heads}")
    _check_slots(slot_mapping, n_slot, dev)
    C.tensor("pos", pos, dims=(1,), dtypes=SLOT_DTYPES, device=dev)
    if pos.shape[0] < max(batch, n_slot):
        raise ValueError(f"pos must have at least max(B, B_slot) = {max(batch, n_slot)} entries, got {pos.shape[0]}")
    _check_tables(cos, sin, d2, dev, names=("cos", "sin"))
    k_scale = C.scale("k_scale", k_scale, dev)
    out_dtype = q_out_dtype or q_nope.dtype
    if q_out is None:
        q_out = torch.empty(batch, q_heads, d1 + d2, dtype=out_dtype, device=dev)
    C.tensor("q_out", q_out, dims=(3,), dtypes=C.Q_DTYPES, device=dev)
    if tuple(q_out.shape) != (batch, q_heads, d1 + d2):
        raise ValueError(f"q_out must be [{batch}, {q_heads}, {d1 + d2}], got {tuple(q_out.shape)}")
    if k_pe_out is None:
        k_pe_out = torch.empty_like(k_pe)
    C.tensor("k_pe_out", k_pe_out, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
    if tuple(k_pe_out.shape) != tuple(k_pe.shape):
        raise ValueError(f"k_pe_out must be {tuple(k_pe.shape)}, got {tuple(k_pe_out.shape)}")
    if decode_q_pe_out is not None:
        C.tensor("decode_q_pe_out", decode_q_pe_out, dims=(3,), dtypes=C.FLOAT_DTYPES, device=dev)
        if decode_q_pe_out.shape[0] > batch or decode_q_pe_out.shape[1:] != (q_heads, d2):
            raise ValueError(f"decode_q_pe_out must be [n <= {batch}, {q_heads}, {d2}], got {tuple(decode_q_pe_out.shape)}")
    zeros = None
    if num_decode_toks_for_zeros > 0:
        zeros = torch.empty(num_decode_toks_for_zeros, q_heads, d1, dtype=q_nope.dtype, device=dev)
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("q_out", q_out),
                    ("kv_cache", kv_cache), ("k_pe_out", k_pe_out)):
        C.last_dim_contiguous(name, t)
    _ops()["fused_qk_rope_cat_and_cache_mla"](q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin,
                                              k_scale, bool(is_neox), bool(apply_scale), q_out, k_pe_out,
                                              decode_q_pe_out, zeros, backend=backend)
    return q_out, decode_q_pe_out, k_pe_out, zeros
