"""The one validation of every aiter-mla op, run inside the op, and the Call it builds.

One function per ``aiter::`` op, named like the op, with the op's signature (it *is* the op's
schema, see :mod:`aiter_mla.ops`): it checks every argument once (``TypeError``/``ValueError``
naming the argument, what was expected and what came; shapes, dtypes and devices only, so no
host sync and safe under CUDA-graph capture) and returns the op's Call: a NamedTuple of the
tensors (normalised views), sizes and options the backends read, its ``key`` (what backend
selection and the launch config depend on) and ``backend``.

The public functions (:mod:`aiter_mla.api`) validate nothing themselves: they read the sizes
they allocate from, and only when that fails run the op's check here so the caller sees its
error (:func:`explain`). Upstream arguments that no op takes, and that aiter-mla refuses, are
checked by the ``*_options`` functions at the end.

The generic validators are :mod:`aiter_core.checks`, called directly (each accepts the common
case in one expression and words every failure), so each rule and its message exist once;
floats go through ``check_float``, which refuses NaN and infinities (a NaN or infinite scale or
soft cap raises a ValueError naming the argument).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from aiter_core.checks import (
    check_bool,
    check_float,
    check_index_tensor,
    check_int,
    check_int32_vector,
    check_last_dim_contiguous,
    check_scalar_f32,
    check_shape,
    check_tensor,
)

Tensor = torch.Tensor

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
Q_DTYPES = FLOAT_DTYPES + FP8_DTYPES
F32 = (torch.float32,)
I32 = (torch.int32,)
SLOT_DTYPES = (torch.int32, torch.int64)
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3", "fp8_e5m2", "bf16", "fp16", "float16", "bfloat16")
MAX_ROPE_KV_HEADS = 16  # the RoPE cache kernel's head block (triton.launch.ROPE_BLOCK_HQ): KV heads it writes
MAX_Q_BLOCK = 64  # query tokens per CTA never exceed this (see triton.launch.tiling)

__all__ = [
    "AttnKey", "ReduceKey", "CacheKey",
    "PagedCall", "PersistentCall", "ReduceCall", "PrefillPsCall", "BlockTableCall", "GroupedRopeCall",
    "DecodeCall", "ConcatCacheCall", "RopeConcatCacheCall", "RopeCatCacheCall",
    "mla_decode_fwd", "mla_decode_fwd_persistent", "mla_reduce_v1", "mla_prefill_fwd", "mla_prefill_ps_fwd",
    "mla_attention_block_table", "decode_attention_fwd_grouped_rope", "decode_attention_fwd",
    "concat_and_cache_mla", "fused_qk_rope_concat_and_cache_mla", "fused_qk_rope_cat_and_cache_mla",
    "explain", "decode_options", "prefill_options", "block_table_options", "rope_cat_options", "metadata_options",
]


# -- keys: what backend selection (supports) and the launch configs read ---------------------------


class AttnKey(NamedTuple):
    """The attention ops: ``d_nope``/``d_rope`` split the K row into two tiles, V is the first
    ``d_v`` values of the K row unless ``v_dtype`` is set (a separate V buffer)."""

    device: torch.device
    q_dtype: torch.dtype
    kv_dtype: torch.dtype
    v_dtype: Optional[torch.dtype]
    out_dtype: torch.dtype
    num_heads: int
    kv_heads: int
    q_block: int  # next power of two of max_seqlen_q, at most MAX_Q_BLOCK: all the tiling reads of it
    d_nope: int
    d_rope: int
    d_v: int

    @property
    def dtypes(self) -> tuple:
        return (self.q_dtype, self.kv_dtype, self.out_dtype) + ((self.v_dtype,) if self.v_dtype is not None else ())


class ReduceKey(NamedTuple):
    device: torch.device
    out_dtype: torch.dtype
    d_v: int

    @property
    def dtypes(self) -> tuple:
        return (torch.float32, self.out_dtype)


class CacheKey(NamedTuple):
    """The cache ops: ``src_dtype`` of the new rows, ``cache_dtype`` of the cache (fp8 stores
    ``x / scale``), ``q_dtype`` of the rotated query output (None: the op writes no query)."""

    device: torch.device
    src_dtype: torch.dtype
    cache_dtype: torch.dtype
    q_dtype: Optional[torch.dtype]
    d_nope: int
    d_rope: int

    @property
    def dtypes(self) -> tuple:
        return (self.src_dtype, self.cache_dtype) + ((self.q_dtype,) if self.q_dtype is not None else ())


# -- calls -----------------------------------------------------------------------------------------


class PagedCall(NamedTuple):
    """``mla_decode_fwd`` (split KV) and ``mla_prefill_fwd``: ``kv_buffer`` as ``[pages,
    page_size, 1, D]``; ``logits``/``attn_lse`` the split partials (None for one split)."""

    q: Tensor
    kv_buffer: Tensor
    o: Tensor
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    kv_last_page_lens: Tensor
    max_seqlen_q: int
    page_size: int
    sm_scale: float
    causal: bool
    num_kv_splits: int
    logits: Optional[Tensor]
    attn_lse: Optional[Tensor]
    final_lse: Optional[Tensor]
    q_scale: Optional[Tensor]
    kv_scale: Optional[Tensor]
    key: AttnKey
    backend: Optional[str]


class PersistentCall(NamedTuple):
    q: Tensor
    kv_buffer: Tensor
    o: Tensor
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    max_seqlen_q: int
    page_size: int
    sm_scale: float
    causal: bool
    work_indptr: Tensor
    work_info_set: Tensor
    reduce_indptr: Tensor
    reduce_final_map: Tensor
    reduce_partial_map: Tensor
    partial_o: Tensor
    partial_lse: Tensor
    final_lse: Optional[Tensor]
    q_scale: Optional[Tensor]
    kv_scale: Optional[Tensor]
    key: AttnKey
    backend: Optional[str]


class ReduceCall(NamedTuple):
    partial_output: Tensor
    partial_lse: Tensor
    reduce_indptr: Tensor
    reduce_final_map: Tensor
    reduce_partial_map: Tensor
    max_seqlen_q: int
    final_output: Tensor
    final_lse: Optional[Tensor]  # [total_q, H]
    key: ReduceKey
    backend: Optional[str]


class PrefillPsCall(NamedTuple):
    """``k``/``v`` as ``[tokens, Hk, D]``; ``softmax_scale`` resolved."""

    q: Tensor
    k: Tensor
    v: Tensor
    output: Tensor
    qo_indptr: Tensor
    kv_indptr: Tensor
    kv_page_indices: Tensor
    max_seqlen_q: int
    is_causal: bool
    softmax_scale: float
    q_scale: Optional[Tensor]
    k_scale: Optional[Tensor]
    v_scale: Optional[Tensor]
    lse: Optional[Tensor]
    key: AttnKey
    backend: Optional[str]


class BlockTableCall(NamedTuple):
    q: Tensor
    kv_buffer: Tensor
    out: Tensor
    cu_seqlens_q: Tensor
    seqused_k: Tensor
    block_tables: Tensor
    max_seqlen_q: int
    softmax_scale: float
    kv_lora_rank: int
    causal: bool
    num_splits: int
    partial_o: Optional[Tensor]
    partial_lse: Optional[Tensor]
    lse: Optional[Tensor]
    q_descale: Optional[Tensor]
    kv_descale: Optional[Tensor]
    key: AttnKey
    backend: Optional[str]


class GroupedRopeCall(NamedTuple):
    """``key.v_dtype`` is None when ``v_buffer`` is the first ``kv_lora_rank`` values of the K rows
    (then read from there); the RoPE tensors are None unless ``use_rope``."""

    q: Tensor
    k_buffer: Tensor
    v_buffer: Tensor
    o: Tensor
    kv_indptr: Tensor
    kv_indices: Tensor
    k_pe_tokens: Optional[Tensor]  # [B, rope]
    kv_lora_rank: int
    rotary_dim: int
    cos_sin_cache: Optional[Tensor]
    positions: Optional[Tensor]
    attn_logits: Tensor
    num_kv_splits: int
    sm_scale: float
    logit_cap: float
    use_rope: bool
    is_neox_style: bool
    key: AttnKey
    backend: Optional[str]


class DecodeCall(NamedTuple):
    """``decode_attention_fwd``: ``key.v_dtype`` is None when ``v_buffer`` is the first ``d_v``
    values of the K rows (MLA: read from there); ``lse`` viewed ``[B, H]``; ``attn_lse`` None
    when ``attn_logits`` holds the split LSEs in its last channel."""

    q: Tensor
    k_buffer: Tensor
    v_buffer: Tensor
    o: Tensor
    lse: Optional[Tensor]
    req_to_token: Tensor
    b_seq_len: Tensor
    attn_logits: Tensor
    attn_lse: Optional[Tensor]
    num_kv_splits: int
    sm_scale: float
    page_size: int
    logit_cap: float
    k_scale: Optional[Tensor]
    v_scale: Optional[Tensor]
    key: AttnKey
    backend: Optional[str]


class ConcatCacheCall(NamedTuple):
    kv_c: Tensor  # [T, lora]
    k_pe: Tensor  # [T, rope]
    kv_cache: Tensor
    slot_mapping: Tensor
    scale: Optional[Tensor]
    key: CacheKey
    backend: Optional[str]


class RopeConcatCacheCall(NamedTuple):
    q_nope: Tensor
    q_pe: Tensor
    kv_c: Tensor
    k_pe: Tensor
    kv_cache: Tensor
    q_out: Tensor
    slot_mapping: Tensor
    k_scale: Optional[Tensor]
    q_scale: Optional[Tensor]
    positions: Tensor
    cos_cache: Tensor
    sin_cache: Tensor
    is_neox: bool
    is_nope_first: bool
    key: CacheKey
    backend: Optional[str]


class RopeCatCacheCall(NamedTuple):
    q_nope: Tensor
    q_pe: Tensor
    k_nope: Tensor
    k_pe: Tensor
    kv_cache: Tensor
    slot_mapping: Tensor
    pos: Tensor
    cos: Tensor
    sin: Tensor
    k_scale: Optional[Tensor]
    is_neox: bool
    apply_scale: bool
    q_out: Tensor
    k_pe_out: Tensor
    decode_q_pe_out: Optional[Tensor]
    q_nope_zeros_out: Optional[Tensor]
    key: CacheKey
    backend: Optional[str]


# -- validators: aiter_core.checks (each has its own fast path); the helpers below are MLA's -------


def scale_f32(name: str, x, device, like: str = "q") -> Optional[Tensor]:
    """None or a per-tensor float32 scale (one element) on ``device``."""
    return None if x is None else check_scalar_f32(name, x, device=device, like=like)


def q_block(max_seqlen_q: int) -> int:
    """The part of ``max_seqlen_q`` the launch tiling reads: its next power of two, capped."""
    if max_seqlen_q <= 1:
        return 1
    return min(1 << (max_seqlen_q - 1).bit_length(), MAX_Q_BLOCK)


def _shape(name: str, x: Tensor, expected: tuple) -> None:
    if x.shape != expected:
        check_shape(name, x, expected)


# -- shared parts of the attention checks ----------------------------------------------------------


def _query_and_output(q, o, o_name: str = "o"):
    """``q [total_q, H, D]`` and ``o [total_q, H, kv_lora_rank]`` with ``kv_lora_rank < D``:
    (total_q, heads, D, kv_lora_rank, device)."""
    check_tensor("q", q, ndim=3, dtypes=Q_DTYPES)
    device = q.device
    check_tensor(o_name, o, ndim=3, dtypes=FLOAT_DTYPES, device=device, like="q")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous(o_name, o)
    total_q, heads, dim = q.shape
    if heads < 1:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    rows, o_heads, d_v = o.shape
    if rows != total_q or o_heads != heads or not 0 < d_v < dim:
        raise ValueError(f"{o_name} must be [total_q={total_q}, heads={heads}, kv_lora_rank] with kv_lora_rank < "
                         f"{dim} (q's width), got {tuple(o.shape)}")
    return total_q, heads, dim, d_v, device


def _page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, device) -> int:
    """Page-level ``qo_indptr [B+1]``, ``kv_indptr [B+1]``, ``kv_indices``, ``kv_last_page_lens [B]``: B."""
    batch = check_int32_vector("qo_indptr", qo_indptr, device=device, like="q").shape[0] - 1
    if batch < 0:
        raise ValueError("qo_indptr must have batch + 1 >= 1 entries, got 0")
    check_int32_vector("kv_indptr", kv_indptr, batch + 1, device=device, like="q")
    check_int32_vector("kv_indices", kv_indices, device=device, like="q")
    if kv_last_page_lens is not None:
        check_int32_vector("kv_last_page_lens", kv_last_page_lens, batch, device=device, like="q")
    return batch


def _paged_kv(kv_buffer, dim: int, page_size: Optional[int], device) -> Tensor:
    """``kv_buffer`` as ``[num_pages, page_size, 1, D]``: 3-D ``[pages, page_size, D]`` and the flat
    ``[pages * page_size, 1, 1, D]`` view are accepted; ``page_size`` None: ``kv_buffer.shape[1]``."""
    check_tensor("kv_buffer", kv_buffer, ndim=(3, 4), dtypes=Q_DTYPES, device=device, like="q")
    kv = kv_buffer.unsqueeze(2) if kv_buffer.dim() == 3 else kv_buffer
    pages, rows, heads, width = kv.shape
    if heads != 1:
        raise ValueError(f"kv_buffer: MLA has one latent KV head (nhead_kv=1), got a buffer of shape {tuple(kv.shape)}")
    if width != dim:
        raise ValueError(f"kv_buffer rows must be as wide as q (kv_lora_rank + rope = {dim}), got {width}")
    if page_size is not None and rows != page_size:
        if rows == 1 and pages % page_size == 0 and kv.is_contiguous():
            kv = kv.view(-1, page_size, 1, width)
        else:
            raise ValueError(f"kv_buffer must be [num_pages, page_size={page_size}, 1, D], got {tuple(kv.shape)}")
    check_last_dim_contiguous("kv_buffer", kv)
    return kv


def _lse(name: str, x, rows: int, heads: int, device) -> Optional[Tensor]:
    """None or an fp32 ``[rows, heads]`` LSE buffer (any shape holding that many values, viewed so)."""
    if x is None:
        return None
    check_tensor(name, x, dtypes=F32, device=device, like="q")
    if x.numel() != rows * heads:
        raise ValueError(f"{name} must hold [{rows}, {heads}] float32 values, got shape {tuple(x.shape)}")
    return x if x.dim() == 2 and x.shape[0] == rows else x.view(rows, heads)


def _split_partials(names: tuple[str, str, str], partial_o, partial_lse, splits, total_q: int, heads: int,
                    d_v: int, device):
    """(splits, partial_o, partial_lse): fp32 ``[total_q, splits, H, Dv]`` / ``[total_q, splits,
    H]`` partial buffers, required when ``splits`` (named ``names[0]``) is > 1, else None."""
    splits = check_int(names[0], splits, minimum=1)
    if splits == 1:
        return 1, None, None
    check_tensor(names[1], partial_o, ndim=4, dtypes=F32, device=device, like="q")
    check_tensor(names[2], partial_lse, ndim=3, dtypes=F32, device=device, like="q")
    _shape(names[1], partial_o, (total_q, splits, heads, d_v))
    _shape(names[2], partial_lse, (total_q, splits, heads))
    check_last_dim_contiguous(names[1], partial_o)
    return splits, partial_o, partial_lse


def _sm_scale(value, dim: int) -> float:
    return dim ** -0.5 if value is None else check_float("sm_scale", value)


# -- the ops' checks ---------------------------------------------------------------------------------


def mla_decode_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                   kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int,
                   sm_scale: Optional[float], causal: bool, num_kv_splits: int, logits: Optional[Tensor],
                   attn_lse: Optional[Tensor], final_lse: Optional[Tensor], q_scale: Optional[Tensor],
                   kv_scale: Optional[Tensor], backend: Optional[str] = None) -> PagedCall:
    """Absorbed decode over page-level tables, split into ``num_kv_splits`` KV ranges whose
    partials go to ``logits [total_q, splits, H, Dv]`` / ``attn_lse [total_q, splits, H]`` (fp32,
    required when splits > 1) and are merged into ``o`` (and ``final_lse [total_q, H]``)."""
    total_q, heads, dim, d_v, device = _query_and_output(q, o)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    page_size = check_int("page_size", page_size, minimum=1)
    _page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, device)
    kv = _paged_kv(kv_buffer, dim, page_size, device)
    splits, logits, attn_lse = _split_partials(("num_kv_splits", "logits", "attn_lse"), logits, attn_lse,
                                               num_kv_splits, total_q, heads, d_v, device)
    key = AttnKey(device, q.dtype, kv.dtype, None, o.dtype, heads, 1, q_block(max_seqlen_q), d_v, dim - d_v, d_v)
    return PagedCall(q, kv, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, page_size,
                     _sm_scale(sm_scale, dim), check_bool("causal", causal), splits, logits, attn_lse,
                     _lse("final_lse", final_lse, total_q, heads, device), scale_f32("q_scale", q_scale, device),
                     scale_f32("kv_scale", kv_scale, device), key, backend)


def mla_decode_fwd_persistent(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                              kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int,
                              sm_scale: Optional[float], causal: bool, work_indptr: Optional[Tensor],
                              work_info_set: Optional[Tensor], reduce_indptr: Optional[Tensor],
                              reduce_final_map: Optional[Tensor], reduce_partial_map: Optional[Tensor],
                              partial_o: Tensor, partial_lse: Tensor, final_lse: Optional[Tensor],
                              q_scale: Optional[Tensor], kv_scale: Optional[Tensor],
                              backend: Optional[str] = None) -> PersistentCall:
    """Persistent decode: the work items of ``get_mla_metadata_v1``; partial slots are rows
    ``slot * max_seqlen_q + t`` of ``partial_o [slots * max_seqlen_q, 1, H, Dv]`` /
    ``partial_lse [.., 1, H, 1]`` (fp32), merged by the reduce maps."""
    missing = [n for n, v in (("work_indptr", work_indptr), ("work_info_set", work_info_set),
                              ("reduce_indptr", reduce_indptr), ("reduce_final_map", reduce_final_map),
                              ("reduce_partial_map", reduce_partial_map)) if v is None]
    if missing:
        raise ValueError(f"persistent mode (work_meta_data given) also needs {', '.join(missing)}")
    total_q, heads, dim, d_v, device = _query_and_output(q, o)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    page_size = check_int("page_size", page_size, minimum=1)
    _page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, device)
    kv = _paged_kv(kv_buffer, dim, page_size, device)
    check_int32_vector("work_indptr", work_indptr, device=device, like="q")
    check_tensor("work_info_set", work_info_set, ndim=2, dtypes=I32, device=device, like="q")
    if work_info_set.shape[1] != 8:
        raise ValueError(f"work_info_set must be [max_work, 8] int32, got {tuple(work_info_set.shape)}")
    check_int32_vector("reduce_indptr", reduce_indptr, device=device, like="q")
    slots = check_int32_vector("reduce_partial_map", reduce_partial_map, device=device, like="q").shape[0]
    check_tensor("reduce_final_map", reduce_final_map, ndim=2, dtypes=I32, device=device, like="q")
    check_tensor("partial_o", partial_o, ndim=4, dtypes=F32, device=device, like="q")
    check_tensor("partial_lse", partial_lse, ndim=4, dtypes=F32, device=device, like="q")
    rows = slots * max_seqlen_q
    _shape("partial_o", partial_o, (rows, 1, heads, d_v))
    _shape("partial_lse", partial_lse, (rows, 1, heads, 1))
    key = AttnKey(device, q.dtype, kv.dtype, None, o.dtype, heads, 1, q_block(max_seqlen_q), d_v, dim - d_v, d_v)
    return PersistentCall(q, kv, o, qo_indptr, kv_indptr, kv_indices, max_seqlen_q, page_size,
                          _sm_scale(sm_scale, dim), check_bool("causal", causal), work_indptr, work_info_set, reduce_indptr,
                          reduce_final_map, reduce_partial_map, partial_o, partial_lse,
                          _lse("final_lse", final_lse, total_q, heads, device), scale_f32("q_scale", q_scale, device),
                          scale_f32("kv_scale", kv_scale, device), key, backend)


def mla_reduce_v1(partial_output: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
                  reduce_partial_map: Tensor, max_seqlen_q: int, final_output: Tensor,
                  final_lse: Optional[Tensor], backend: Optional[str] = None) -> ReduceCall:
    """Merge persistent partials ``partial_output [.., H, Dv]`` / ``partial_lse`` (one value per
    partial row and head) into ``final_output [total_q, H, Dv]`` (and ``final_lse``)."""
    check_tensor("final_output", final_output, ndim=3, dtypes=FLOAT_DTYPES)
    device = final_output.device
    check_tensor("partial_output", partial_output, ndim=(2, 3, 4), dtypes=F32, device=device, like="final_output")
    check_tensor("partial_lse", partial_lse, ndim=(1, 2, 3, 4), dtypes=F32, device=device, like="final_output")
    total_q, heads, d_v = final_output.shape
    if tuple(partial_output.shape[-2:]) != (heads, d_v):
        raise ValueError(f"partial_output must end in (H={heads}, Dv={d_v}), got {tuple(partial_output.shape)}")
    per_head = partial_output.numel() // d_v
    if partial_lse.numel() != per_head:
        raise ValueError(f"partial_lse must hold one value per partial row and head ({per_head}), got "
                         f"{partial_lse.numel()}")
    tiles = check_int32_vector("reduce_indptr", reduce_indptr, device=device, like="final_output").shape[0] - 1
    check_tensor("reduce_final_map", reduce_final_map, ndim=2, dtypes=I32, device=device, like="final_output")
    check_int32_vector("reduce_partial_map", reduce_partial_map, device=device, like="final_output")
    if reduce_final_map.shape[0] != tiles:
        raise ValueError(f"reduce_final_map must have {tiles} rows (reduce_indptr tiles), got "
                         f"{reduce_final_map.shape[0]}")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    return ReduceCall(partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map, max_seqlen_q,
                      final_output, _lse("final_lse", final_lse, total_q, heads, device),
                      ReduceKey(device, final_output.dtype, d_v), backend)


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                    kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, sm_scale: Optional[float],
                    causal: bool, lse: Optional[Tensor], backend: Optional[str] = None) -> PagedCall:
    """Absorbed prefill in one split; the page size is ``kv_buffer.shape[1]``."""
    total_q, heads, dim, d_v, device = _query_and_output(q, o)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    _page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, device)
    kv = _paged_kv(kv_buffer, dim, None, device)
    key = AttnKey(device, q.dtype, kv.dtype, None, o.dtype, heads, 1, q_block(max_seqlen_q), d_v, dim - d_v, d_v)
    return PagedCall(q, kv, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q, kv.shape[1],
                     _sm_scale(sm_scale, dim), check_bool("causal", causal), 1, None, None,
                     _lse("lse", lse, total_q, heads, device), None, None, key, backend)


def _token_rows(name: str, x, device) -> Tensor:
    """``[tokens, Hk, D]`` (a 4-D ``[tokens, 1, Hk, D]`` cache is viewed so)."""
    check_tensor(name, x, ndim=(3, 4), dtypes=Q_DTYPES, device=device, like="q")
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} as a 4-D cache must have page size 1 ([tokens, 1, Hk, D]), got {tuple(x.shape)}")
        x = x[:, 0]
    check_last_dim_contiguous(name, x)
    return x


def mla_prefill_ps_fwd(q: Tensor, k: Tensor, v: Tensor, output: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                       kv_page_indices: Tensor, max_seqlen_q: int, is_causal: bool, softmax_scale: Optional[float],
                       q_scale: Optional[Tensor], k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                       lse: Optional[Tensor], backend: Optional[str] = None) -> PrefillPsCall:
    """Non-absorbed prefill: ``q [total_q, H, D]``, ``k [tokens, Hk, D]``, ``v [tokens, Hk, Dv]``
    (GQA), token rows of each sequence in ``kv_page_indices`` (``kv_indptr`` prefix sums)."""
    check_tensor("Q", q, ndim=3, dtypes=Q_DTYPES)
    device = q.device
    k = _token_rows("K", k, device)
    v = _token_rows("V", v, device)
    check_tensor("output", output, ndim=3, dtypes=FLOAT_DTYPES, device=device, like="Q")
    check_last_dim_contiguous("Q", q)
    check_last_dim_contiguous("output", output)
    total_q, heads, dim = q.shape
    tokens, kv_heads, k_dim = k.shape
    d_v = v.shape[-1]
    if k_dim != dim:
        raise ValueError(f"K head dim must equal Q's ({dim}), got {k_dim}")
    if v.shape[0] != tokens or v.shape[1] != kv_heads:
        raise ValueError(f"K and V must have the same tokens and heads, got {tuple(k.shape)} and {tuple(v.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if dim < 32:
        raise ValueError(f"Q head dim must be >= 32, got {dim}")
    _shape("output", output, (total_q, heads, d_v))
    n = check_int32_vector("qo_indptr", qo_indptr, device=device, like="Q").shape[0]
    check_int32_vector("kv_indptr", kv_indptr, n, device=device, like="Q")
    check_int32_vector("kv_page_indices", kv_page_indices, device=device, like="Q")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    d_rope = min(64, dim // 3)  # the K row as two tiles: 192 = 128 + 64
    key = AttnKey(device, q.dtype, k.dtype, v.dtype, output.dtype, heads, kv_heads, q_block(max_seqlen_q),
                  dim - d_rope, d_rope, d_v)
    return PrefillPsCall(q, k, v, output, qo_indptr, kv_indptr, kv_page_indices, max_seqlen_q,
                         check_bool("is_causal", is_causal),
                         dim ** -0.5 if softmax_scale is None else check_float("softmax_scale", softmax_scale),
                         scale_f32("q_scale", q_scale, device, "Q"), scale_f32("k_scale", k_scale, device, "Q"),
                         scale_f32("v_scale", v_scale, device, "Q"), _lse("lse", lse, total_q, heads, device), key,
                         backend)


def mla_attention_block_table(q: Tensor, kv_buffer: Tensor, out: Tensor, cu_seqlens_q: Tensor, seqused_k: Tensor,
                              block_tables: Tensor, max_seqlen_q: int, softmax_scale: float, kv_lora_rank: int,
                              qk_rope_head_dim: int, causal: bool, num_splits: int, partial_o: Optional[Tensor],
                              partial_lse: Optional[Tensor], lse: Optional[Tensor], q_descale: Optional[Tensor],
                              kv_descale: Optional[Tensor], backend: Optional[str] = None) -> BlockTableCall:
    """Absorbed attention over ``block_tables [B, max_blocks]`` with ``seqused_k [B]`` keys; split
    partials ``partial_o [total_q, splits, H, lora]`` / ``partial_lse [total_q, splits, H]``
    (fp32, required when ``num_splits > 1``)."""
    check_tensor("q", q, ndim=3, dtypes=Q_DTYPES)
    device = q.device
    check_tensor("kv_buffer", kv_buffer, ndim=4, dtypes=Q_DTYPES, device=device, like="q")
    check_tensor("out", out, ndim=3, dtypes=FLOAT_DTYPES, device=device, like="q")
    kv_lora_rank = check_int("kv_lora_rank", kv_lora_rank, minimum=1)
    rope = check_int("qk_rope_head_dim", qk_rope_head_dim, minimum=0)
    total_q, heads, dim = q.shape
    if dim != kv_lora_rank + rope:
        raise ValueError(f"q's last dim must be kv_lora_rank + qk_rope_head_dim = {kv_lora_rank + rope}, got {dim}")
    if kv_buffer.shape[-1] != dim or kv_buffer.shape[2] != 1:
        raise ValueError(f"kv_buffer must be [num_blocks, block_size, 1, {dim}], got {tuple(kv_buffer.shape)}")
    _shape("out", out, (total_q, heads, kv_lora_rank))
    batch = check_int32_vector("cu_seqlens_q", cu_seqlens_q, device=device, like="q").shape[0] - 1
    check_int32_vector("seqused_k", seqused_k, batch, device=device, like="q")
    check_tensor("block_tables", block_tables, ndim=2, dtypes=I32, device=device, like="q")
    if block_tables.shape[0] != batch or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be [batch={batch}, max_blocks] with contiguous rows, got "
                         f"{tuple(block_tables.shape)} strides {tuple(block_tables.stride())}")
    check_last_dim_contiguous("q", q)
    check_last_dim_contiguous("kv_buffer", kv_buffer)
    check_last_dim_contiguous("out", out)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    splits, partial_o, partial_lse = _split_partials(("num_splits", "partial_o", "partial_lse"), partial_o,
                                                     partial_lse, num_splits, total_q, heads, kv_lora_rank, device)
    key = AttnKey(device, q.dtype, kv_buffer.dtype, None, out.dtype, heads, 1, q_block(max_seqlen_q), kv_lora_rank,
                  rope, kv_lora_rank)
    return BlockTableCall(q, kv_buffer, out, cu_seqlens_q, seqused_k, block_tables, max_seqlen_q,
                          check_float("softmax_scale", softmax_scale), kv_lora_rank, check_bool("causal", causal), splits, partial_o,
                          partial_lse, _lse("lse", lse, total_q, heads, device),
                          scale_f32("q_descale", q_descale, device), scale_f32("kv_descale", kv_descale, device), key, backend)


def _sglang_buffers(q, k_buffer, v_buffer, o, attn_logits):
    """The five tensors of SGLang's decode forms (3-D q, k, v, o; 4-D fp32 ``attn_logits``), each
    contiguous in its last dimension: their device."""
    check_tensor("q", q, ndim=3, dtypes=Q_DTYPES)
    device = q.device
    check_tensor("k_buffer", k_buffer, ndim=3, dtypes=Q_DTYPES, device=device, like="q")
    check_tensor("v_buffer", v_buffer, ndim=3, dtypes=Q_DTYPES, device=device, like="q")
    check_tensor("o", o, ndim=3, dtypes=FLOAT_DTYPES, device=device, like="q")
    check_tensor("attn_logits", attn_logits, ndim=4, dtypes=F32, device=device, like="q")
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("o", o), ("attn_logits", attn_logits)):
        check_last_dim_contiguous(name, t)
    return device


def _shares_storage(k_buffer: Tensor, v_buffer: Tensor, d_v: int) -> bool:
    """V is the first ``d_v`` values of each K row (the MLA view ``k_buffer[..., :d_v]``)."""
    return (v_buffer.data_ptr() == k_buffer.data_ptr() and v_buffer.stride() == k_buffer.stride()
            and v_buffer.shape[-1] == d_v)


def decode_attention_fwd_grouped_rope(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, kv_indptr: Tensor,
                                      kv_indices: Tensor, k_pe_tokens: Optional[Tensor], kv_lora_rank: int,
                                      rotary_dim: int, cos_sin_cache: Optional[Tensor], positions: Optional[Tensor],
                                      attn_logits: Tensor, num_kv_splits: int, sm_scale: float, logit_cap: float,
                                      use_rope: bool, is_neox_style: bool,
                                      backend: Optional[str] = None) -> GroupedRopeCall:
    """SGLang decode, page size 1 (token-level ``kv_indptr``/``kv_indices``), optional RoPE of q
    and of each sequence's last key; partials in ``attn_logits [B, H, splits, lora + 1]``."""
    device = _sglang_buffers(q, k_buffer, v_buffer, o, attn_logits)
    batch, heads, dim = q.shape
    kv_lora_rank = check_int("kv_lora_rank", kv_lora_rank, minimum=1)
    splits = check_int("num_kv_splits", num_kv_splits, minimum=1)
    if not 0 < kv_lora_rank < dim:
        raise ValueError(f"kv_lora_rank must be in (0, {dim}) (q's width), got {kv_lora_rank}")
    tokens = k_buffer.shape[0]
    if k_buffer.shape[1] != 1 or k_buffer.shape[2] != dim:
        raise ValueError(f"k_buffer must be [tokens, 1, {dim}], got {tuple(k_buffer.shape)}")
    if v_buffer.shape[0] != tokens or v_buffer.shape[1] != 1 or v_buffer.shape[2] != kv_lora_rank:
        raise ValueError(f"v_buffer must be [{tokens}, 1, {kv_lora_rank}], got {tuple(v_buffer.shape)}")
    _shape("o", o, (batch, heads, kv_lora_rank))
    if tuple(attn_logits.shape) != (batch, heads, splits, kv_lora_rank + 1):
        raise ValueError(f"attn_logits must be [{batch}, {heads}, num_kv_splits={splits}, {kv_lora_rank + 1}], got "
                         f"{tuple(attn_logits.shape)}")
    check_int32_vector("kv_indptr", kv_indptr, batch + 1, device=device, like="q")
    check_int32_vector("kv_indices", kv_indices, device=device, like="q")
    rope = dim - kv_lora_rank
    use_rope = check_bool("use_rope", use_rope)
    if use_rope:
        if cos_sin_cache is None or positions is None or k_pe_tokens is None:
            raise ValueError("use_rope=True needs cos_sin_cache, positions and k_pe_tokens")
        check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=FLOAT_DTYPES, device=device, like="q")
        if isinstance(positions, Tensor) and positions.dim() == 2 and positions.shape[1] == 1:
            positions = positions.reshape(-1)  # upstream's test passes positions as [B, 1]
        _index_vector("positions", positions, device, "q")
        check_tensor("k_pe_tokens", k_pe_tokens, ndim=(1, 2, 3), dtypes=FLOAT_DTYPES, device=device, like="q")
        rotary_dim = check_int("rotary_dim", rotary_dim)
        if not (0 < rotary_dim <= rope and rotary_dim % 2 == 0):
            raise ValueError(f"rotary_dim must be even and in (0, {rope}] (the rope width), got {rotary_dim}")
        if cos_sin_cache.shape[1] != rotary_dim:
            raise ValueError(f"cos_sin_cache must be [max_pos, rotary_dim={rotary_dim}], got {tuple(cos_sin_cache.shape)}")
        if positions.shape[0] != batch:
            raise ValueError(f"positions must have {batch} entries, got {positions.shape[0]}")
        if k_pe_tokens.numel() != batch * rope or not k_pe_tokens.is_contiguous():
            raise ValueError(f"k_pe_tokens must be contiguous with {batch} x {rope} elements, got "
                             f"{tuple(k_pe_tokens.shape)}")
        k_pe_tokens = k_pe_tokens.view(batch, rope)
    else:
        k_pe_tokens = cos_sin_cache = positions = None
    separate = not _shares_storage(k_buffer, v_buffer, kv_lora_rank)
    key = AttnKey(device, q.dtype, k_buffer.dtype, v_buffer.dtype if separate else None, o.dtype, heads, 1, 1,
                  kv_lora_rank, rope, kv_lora_rank)
    return GroupedRopeCall(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens, kv_lora_rank, rotary_dim,
                           cos_sin_cache, positions, attn_logits, splits, check_float("sm_scale", sm_scale),
                           check_float("logit_cap", logit_cap), use_rope, check_bool("is_neox_style", is_neox_style), key, backend)


def decode_attention_fwd(q: Tensor, k_buffer: Tensor, v_buffer: Tensor, o: Tensor, lse: Optional[Tensor],
                         req_to_token: Tensor, b_seq_len: Tensor, attn_logits: Tensor, attn_lse: Optional[Tensor],
                         num_kv_splits: int, sm_scale: float, page_size: int, logit_cap: float,
                         k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                         backend: Optional[str] = None) -> DecodeCall:
    """SGLang decode over ``req_to_token [B, max_pages]`` pages of ``page_size`` token rows:
    ``k_buffer [tokens, Hk, Dk]``, ``v_buffer [tokens, Hk, Dv]`` (GQA; MLA when V is a view of
    K); partials in ``attn_logits [B, H, splits, Dv (+1)]``, split LSEs in its last channel or
    in ``attn_lse [B, H, splits]`` (fp32, required without that channel)."""
    device = _sglang_buffers(q, k_buffer, v_buffer, o, attn_logits)
    batch, heads, dim = q.shape
    tokens, kv_heads, k_dim = k_buffer.shape
    d_v = v_buffer.shape[-1]
    splits = check_int("num_kv_splits", num_kv_splits, minimum=1)
    page_size = check_int("page_size", page_size, minimum=1)
    if k_dim != dim:
        raise ValueError(f"k_buffer must be [tokens, Hk, {dim}] (q's head dim), got {tuple(k_buffer.shape)}")
    if tuple(v_buffer.shape[:2]) != (tokens, kv_heads):
        raise ValueError(f"v_buffer must be [{tokens}, {kv_heads}, Dv], got {tuple(v_buffer.shape)}")
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if dim < 16:
        raise ValueError(f"the head dim must be >= 16, got {dim}")
    _shape("o", o, (batch, heads, d_v))
    channels = attn_logits.shape[3]
    if tuple(attn_logits.shape[:3]) != (batch, heads, splits) or channels not in (d_v, d_v + 1):
        raise ValueError(f"attn_logits must be [{batch}, {heads}, num_kv_splits={splits}, {d_v} or {d_v + 1}], got "
                         f"{tuple(attn_logits.shape)}")
    if channels == d_v + 1:
        attn_lse = None
    else:
        check_tensor("attn_lse", attn_lse, ndim=3, dtypes=F32, device=device, like="q")
        _shape("attn_lse", attn_lse, (batch, heads, splits))
    if tokens % page_size:
        raise ValueError(f"k_buffer's token count ({tokens}) must be a multiple of page_size ({page_size})")
    check_tensor("req_to_token", req_to_token, ndim=2, dtypes=I32, device=device, like="q")
    if req_to_token.shape[0] != batch or req_to_token.stride(1) != 1:
        raise ValueError(f"req_to_token must be [batch={batch}, max_pages] with contiguous rows, got "
                         f"{tuple(req_to_token.shape)}")
    check_int32_vector("b_seq_len", b_seq_len, batch, device=device, like="q")
    # the K row is loaded as a power-of-two tile plus the rest (576 = 512 + 64, 192 = 128 + 64)
    d_nope = 1 << (dim.bit_length() - 1)
    if d_nope == dim and dim >= 32:
        d_nope = dim // 2  # e.g. 128 = 64 + 64: both tiles stay MMA-sized
    separate = not _shares_storage(k_buffer, v_buffer, d_nope)
    key = AttnKey(device, q.dtype, k_buffer.dtype, v_buffer.dtype if separate else None, o.dtype, heads, kv_heads, 1,
                  d_nope, dim - d_nope, d_v)
    return DecodeCall(q, k_buffer, v_buffer, o, _lse("lse", lse, batch, heads, device),
                      req_to_token, b_seq_len, attn_logits, attn_lse, splits, check_float("sm_scale", sm_scale), page_size,
                      check_float("logit_cap", logit_cap), scale_f32("k_scale", k_scale, device),
                      scale_f32("v_scale", v_scale, device), key, backend)


# -- cache ops ---------------------------------------------------------------------------------------


def _index_vector(name: str, x, device, like: str) -> None:
    """A 1-D int32/int64 tensor the kernels read as ``x[i]`` (unit stride): a strided view (a
    column of a 2-D tensor) is refused rather than read wrongly."""
    check_index_tensor(name, x, ndim=1, device=device, like=like)
    if x.shape[0] > 1 and x.stride(0) != 1:
        raise ValueError(f"{name} must be contiguous (stride 1), got stride {x.stride(0)}")


def _slots(slot_mapping, tokens: int, device, like: str) -> None:
    _index_vector("slot_mapping", slot_mapping, device, like)
    if slot_mapping.shape[0] != tokens:
        raise ValueError(f"slot_mapping must have one entry per token ({tokens}), got {slot_mapping.shape[0]}")


def _rope_tables(cos, sin, rope: int, device, like: str, names=("cos_cache", "sin_cache")) -> None:
    for name, t in zip(names, (cos, sin)):
        check_tensor(name, t, ndim=2, dtypes=FLOAT_DTYPES, device=device, like=like)
        if t.shape[1] not in (rope // 2, rope):
            raise ValueError(f"{name} must be [max_pos, {rope // 2}] (or full width {rope}), got {tuple(t.shape)}")
        check_last_dim_contiguous(name, t)
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"{names[0]} and {names[1]} must have the same shape and strides, got {tuple(cos.shape)} "
                         f"and {tuple(sin.shape)}")
    if rope % 2:
        raise ValueError(f"the rope width must be even, got {rope}")


def _mla_cache(kv_cache, width: int, device, like: str) -> None:
    check_tensor("kv_cache", kv_cache, ndim=(3, 4), dtypes=Q_DTYPES, device=device, like=like)
    if kv_cache.dim() == 4 and kv_cache.shape[2] != 1:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, (1,) {width}], got {tuple(kv_cache.shape)}")
    if kv_cache.shape[-1] != width:
        raise ValueError(f"kv_cache rows must be {width} wide (kv_lora_rank + rope), got {kv_cache.shape[-1]}")
    check_last_dim_contiguous("kv_cache", kv_cache)


def concat_and_cache_mla(kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor, slot_mapping: Tensor, kv_cache_dtype: str,
                         scale: Optional[Tensor], backend: Optional[str] = None) -> ConcatCacheCall:
    """``kv_c [T, lora]``, ``k_pe [T, (1,) rope]`` into ``kv_cache [blocks, block_size, (1,)
    lora + rope]`` at ``slot_mapping [T]``; fp8 caches store ``x / scale``."""
    check_tensor("kv_c", kv_c, ndim=(2, 3), dtypes=FLOAT_DTYPES)
    device = kv_c.device
    check_tensor("k_pe", k_pe, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device, like="kv_c")
    tokens = kv_c.shape[0]
    if k_pe.shape[0] != tokens:
        raise ValueError(f"k_pe must have {tokens} tokens like kv_c, got {tuple(k_pe.shape)}")
    lora, pe = kv_c.shape[-1], k_pe.shape[-1]
    _mla_cache(kv_cache, lora + pe, device, "kv_c")
    _slots(slot_mapping, tokens, device, "kv_c")
    if kv_cache_dtype not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {KV_CACHE_DTYPES}, got {kv_cache_dtype!r}")
    check_last_dim_contiguous("kv_c", kv_c)
    check_last_dim_contiguous("k_pe", k_pe)
    key = CacheKey(device, kv_c.dtype, kv_cache.dtype, None, lora, pe)
    return ConcatCacheCall(kv_c.reshape(tokens, lora), k_pe.reshape(tokens, pe), kv_cache, slot_mapping,
                           scale_f32("scale", scale, device, "kv_c"), key, backend)


def fused_qk_rope_concat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, kv_c: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                       q_out: Tensor, slot_mapping: Tensor, k_scale: Optional[Tensor],
                                       q_scale: Optional[Tensor], positions: Tensor, cos_cache: Tensor,
                                       sin_cache: Tensor, is_neox: bool, is_nope_first: bool,
                                       backend: Optional[str] = None) -> RopeConcatCacheCall:
    """RoPE on ``q_pe [T, H, rope]`` / ``k_pe [T, (1,) rope]`` at ``positions [T]``; ``q_out [T, H,
    lora + rope]`` and the cache rows (nope part first when ``is_nope_first``)."""
    like = "q_nope"
    check_tensor("q_nope", q_nope, ndim=3, dtypes=FLOAT_DTYPES)
    device = q_nope.device
    check_tensor("q_pe", q_pe, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("kv_c", kv_c, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("k_pe", k_pe, ndim=(2, 3), dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("q_out", q_out, ndim=3, dtypes=Q_DTYPES, device=device, like=like)
    tokens, heads, lora = q_nope.shape
    pe = q_pe.shape[-1]
    if tuple(q_pe.shape[:2]) != (tokens, heads):
        raise ValueError(f"q_pe must be [{tokens}, {heads}, rope], got {tuple(q_pe.shape)}")
    if kv_c.shape[0] != tokens or kv_c.shape[-1] != lora or k_pe.shape[0] != tokens or k_pe.shape[-1] != pe:
        raise ValueError(f"kv_c / k_pe must be [{tokens}, {lora}] / [{tokens}, {pe}], got {tuple(kv_c.shape)} / "
                         f"{tuple(k_pe.shape)}")
    _shape("q_out", q_out, (tokens, heads, lora + pe))
    _mla_cache(kv_cache, lora + pe, device, like)
    _slots(slot_mapping, tokens, device, like)
    _index_vector("positions", positions, device, like)
    if positions.shape[0] != tokens:
        raise ValueError(f"positions must have {tokens} entries, got {positions.shape[0]}")
    _rope_tables(cos_cache, sin_cache, pe, device, like)
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("kv_c", kv_c), ("k_pe", k_pe), ("q_out", q_out)):
        check_last_dim_contiguous(name, t)
    key = CacheKey(device, q_nope.dtype, kv_cache.dtype, q_out.dtype, lora, pe)
    return RopeConcatCacheCall(q_nope, q_pe, kv_c.reshape(tokens, 1, lora), k_pe.reshape(tokens, 1, pe), kv_cache,
                               q_out, slot_mapping, scale_f32("k_scale", k_scale, device, like),
                               scale_f32("q_scale", q_scale, device, like), positions, cos_cache, sin_cache,
                               check_bool("is_neox", is_neox), check_bool("is_nope_first", is_nope_first), key, backend)


def fused_qk_rope_cat_and_cache_mla(q_nope: Tensor, q_pe: Tensor, k_nope: Tensor, k_pe: Tensor, kv_cache: Tensor,
                                    slot_mapping: Tensor, pos: Tensor, cos: Tensor, sin: Tensor,
                                    k_scale: Optional[Tensor], is_neox: bool, apply_scale: bool, q_out: Tensor,
                                    k_pe_out: Tensor, decode_q_pe_out: Optional[Tensor],
                                    q_nope_zeros_out: Optional[Tensor],
                                    backend: Optional[str] = None) -> RopeCatCacheCall:
    """RoPE + cat + cache write, slot = cache row: ``q_nope/q_pe [B, QH, D1|D2]``, ``k_nope/k_pe
    [B_slot, KH, D1|D2]``, ``kv_cache [rows, KH, D1 + D2]``; ``q_out [B, QH, D1 + D2]``,
    ``k_pe_out`` like ``k_pe``, ``decode_q_pe_out [n <= B, QH, D2]``, zeros ``[n, QH, D1]``."""
    like = "q_nope"
    check_tensor("q_nope", q_nope, ndim=3, dtypes=FLOAT_DTYPES)
    device = q_nope.device
    check_tensor("q_pe", q_pe, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("k_nope", k_nope, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("k_pe", k_pe, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    check_tensor("kv_cache", kv_cache, ndim=3, dtypes=Q_DTYPES, device=device, like=like)
    batch, q_heads, d1 = q_nope.shape
    d2 = q_pe.shape[-1]
    n_slot, k_heads = k_nope.shape[0], k_nope.shape[1]
    if tuple(q_pe.shape[:2]) != (batch, q_heads):
        raise ValueError(f"q_pe must be [{batch}, {q_heads}, D2], got {tuple(q_pe.shape)}")
    if tuple(k_nope.shape) != (n_slot, k_heads, d1) or tuple(k_pe.shape) != (n_slot, k_heads, d2):
        raise ValueError(f"k_nope / k_pe must be [B_slot, KH, {d1}] / [B_slot, KH, {d2}], got {tuple(k_nope.shape)} / "
                         f"{tuple(k_pe.shape)}")
    if kv_cache.shape[1] != k_heads or kv_cache.shape[2] != d1 + d2:
        raise ValueError(f"kv_cache must be [rows, {k_heads}, {d1 + d2}], got {tuple(kv_cache.shape)}")
    if k_heads > MAX_ROPE_KV_HEADS:
        raise ValueError(f"at most {MAX_ROPE_KV_HEADS} KV heads are supported, got {k_heads}")
    _slots(slot_mapping, n_slot, device, like)
    _index_vector("pos", pos, device, like)
    if pos.shape[0] < max(batch, n_slot):
        raise ValueError(f"pos must have at least max(B, B_slot) = {max(batch, n_slot)} entries, got {pos.shape[0]}")
    _rope_tables(cos, sin, d2, device, like, names=("cos", "sin"))
    k_scale = scale_f32("k_scale", k_scale, device, like)
    check_tensor("q_out", q_out, ndim=3, dtypes=Q_DTYPES, device=device, like=like)
    _shape("q_out", q_out, (batch, q_heads, d1 + d2))
    check_tensor("k_pe_out", k_pe_out, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    _shape("k_pe_out", k_pe_out, tuple(k_pe.shape))
    if decode_q_pe_out is not None:
        check_tensor("decode_q_pe_out", decode_q_pe_out, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
        if decode_q_pe_out.shape[0] > batch or tuple(decode_q_pe_out.shape[1:]) != (q_heads, d2):
            raise ValueError(f"decode_q_pe_out must be [n <= {batch}, {q_heads}, {d2}], got "
                             f"{tuple(decode_q_pe_out.shape)}")
        check_last_dim_contiguous("decode_q_pe_out", decode_q_pe_out)
    if q_nope_zeros_out is not None:
        check_tensor("q_nope_zeros_out", q_nope_zeros_out, ndim=3, dtypes=FLOAT_DTYPES, device=device, like=like)
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("k_nope", k_nope), ("k_pe", k_pe), ("q_out", q_out),
                    ("kv_cache", kv_cache), ("k_pe_out", k_pe_out)):
        check_last_dim_contiguous(name, t)
    key = CacheKey(device, q_nope.dtype, kv_cache.dtype, q_out.dtype, d1, d2)
    return RopeCatCacheCall(q_nope, q_pe, k_nope, k_pe, kv_cache, slot_mapping, pos, cos, sin, k_scale,
                            check_bool("is_neox", is_neox), check_bool("apply_scale", apply_scale), q_out, k_pe_out,
                            decode_q_pe_out, q_nope_zeros_out, key, backend)


# -- the public functions' side ----------------------------------------------------------------------


def explain(error: BaseException, check, *args) -> None:
    """Called by a public function whose reading of the sizes it allocates from failed with
    ``error``: runs the op's ``check`` on the same arguments (the outputs it could not allocate
    as None; every op checks its inputs first), so that a bad argument raises the op's own error
    naming it. Returns when they pass, or when ``error`` is an out-of-memory error; the caller
    then re-raises ``error``."""
    if not isinstance(error, torch.OutOfMemoryError):
        check(*args)


def decode_options(nhead_kv, logit_cap, cp_world_size, g_kv_indptr) -> None:
    """``aiter.mla.mla_decode_fwd``'s arguments that no op takes."""
    if nhead_kv != 1:
        raise ValueError(f"nhead_kv must be 1 (MLA has one latent KV head), got {nhead_kv}")
    prefill_options(logit_cap, "soft-capping is not supported by MLA decode, as upstream")
    if cp_world_size != 1 or g_kv_indptr is not None:
        raise ValueError(f"context parallelism (cp_world_size={cp_world_size}, g_kv_indptr) is not supported")


def prefill_options(logit_cap, why: str = "soft-capping is not supported") -> None:
    """``logit_cap``: MLA's absorbed decode and prefill take none (<= 0)."""
    if check_float("logit_cap", logit_cap) > 0:
        raise ValueError(f"logit_cap must be <= 0 ({why}), got {logit_cap}")


def block_table_options(q_scales, out_scale, shuffled_kv_cache, skip_reduce) -> None:
    """The block-table forms' arguments that no op takes."""
    if q_scales is not None:
        raise ValueError("q_scales (nvfp4 queries) are not supported on this backend")
    if skip_reduce:
        raise ValueError("skip_reduce=True is not supported: the partials are always merged")
    rope_cat_options(shuffled_kv_cache)
    if out_scale is not None:
        raise ValueError("out_scale (fp8 output) is not supported: pass a bf16/fp16/fp32 out")


def rope_cat_options(shuffled_kv_cache) -> None:
    if shuffled_kv_cache:
        raise ValueError("shuffled_kv_cache=True (the gfx950 preshuffled / fp4 layout) is not supported on this "
                         "backend")


def metadata_options(is_sparse=False, topk=-1, num_heads_k=1) -> None:
    """The persistent metadata's options aiter-mla refuses."""
    if is_sparse:
        raise ValueError("is_sparse=True (top-k sparse MLA) is not supported by aiter-mla's persistent decode")
    if topk > 0:
        raise ValueError("topk > 0 (sparse MLA) is not supported by aiter-mla's persistent decode")
    if num_heads_k != 1:
        raise ValueError(f"num_heads_k must be 1 (MLA has one latent KV head), got {num_heads_k}")
