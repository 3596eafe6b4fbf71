"""Public functions of aiter-pa with upstream AITER's names and signatures.

Each function allocates what upstream allocates (an output when ``out_`` is None) and calls its
``torch.ops.aiter.*`` op (see :mod:`aiter_pa.ops`); the op validates the arguments
(:mod:`aiter_pa.checks`: ValueError / TypeError naming the argument), builds the Call and runs it
on a backend. Every function takes a trailing ``backend=`` keyword (None = automatic: ``triton``,
else ``reference``).
"""

from __future__ import annotations

from typing import Optional

import torch

from aiter_core.checks import check_tensor

from . import ops as _ops
from .checks import workspace_bytes

Tensor = torch.Tensor

__all__ = [
    "reshape_and_cache", "reshape_and_cache_flash", "reshape_and_cache_with_pertoken_quant",
    "reshape_and_cache_with_block_quant", "swap_blocks", "copy_blocks",
    "paged_attention_decode", "paged_attention_rocm", "paged_attention_v1", "paged_attention_ragged",
    "pa_fwd_asm", "paged_attention_common", "context_attention_fwd", "chunked_prefill_paged_decode",
    "extend_attention_fwd", "prefill_attention", "paged_attention_workspace_size", "decode_partials",
    "should_use_asm_kernel",
]


# -- cache writes -------------------------------------------------------------------------------


def reshape_and_cache(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
                      kv_cache_dtype: str = "auto", k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                      asm_layout: bool = False, *, kv_cache_layout: Optional[str] = None,
                      backend: Optional[str] = None) -> None:
    """Write ``key/value [T, Hk, D]`` into the vLLM-layout caches (``asm_layout``: shuffled V) at
    ``slot_mapping`` (negative = skip). 8-bit caches store ``x / k_scale`` (per-tensor ``[1]``
    float32 scales; None means 1). ``kv_cache_layout`` "NHD"/"HND" (extension) accepts 4-D caches."""
    _ops.pa_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale,
                              asm_layout, kv_cache_layout, backend)


def reshape_and_cache_flash(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
                            kv_cache_dtype: str = "auto", k_scale: Optional[Tensor] = None,
                            v_scale: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """:func:`reshape_and_cache` for NHD ("flash") caches ``[num_blocks, block_size, Hk, D]``."""
    _ops.pa_reshape_and_cache(key, value, key_cache, value_cache, slot_mapping, kv_cache_dtype, k_scale, v_scale,
                              False, "NHD", backend)


def reshape_and_cache_with_pertoken_quant(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                                          k_dequant_scales: Tensor, v_dequant_scales: Tensor, slot_mapping: Tensor,
                                          asm_layout: bool = False, *, kv_cache_layout: Optional[str] = None,
                                          backend: Optional[str] = None) -> None:
    """One scale per (token, head): ``absmax / max`` (eps 1e-12), stored ``x / scale``, cache
    dtype fp8 or int8 (or uint8 = packed int4, max 7: an extension). Scales ``[Hk, max_tokens]``
    indexed by slot, or ``[num_blocks, Hk, block_size]`` with ``asm_layout`` (shape decides)."""
    _ops.pa_reshape_and_cache_pertoken(key, value, key_cache, value_cache, k_dequant_scales, v_dequant_scales,
                                       slot_mapping, asm_layout, kv_cache_layout, backend)


def reshape_and_cache_with_block_quant(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor,
                                       k_dequant_scales: Tensor, v_dequant_scales: Tensor, slot_mapping: Tensor,
                                       asm_layout: bool = False, *, kv_cache_layout: Optional[str] = None,
                                       backend: Optional[str] = None) -> None:
    """One scale per (block, head): ``[Hk, num_blocks]`` (``[num_blocks, Hk]`` with ``asm_layout``),
    0 for an empty block. ``key [B, seq_len, Hk, D]`` (or ``[T, Hk, D]``). A block whose absmax
    grows gets the larger scale and its stored tokens are re-quantized: the scale only grows."""
    _ops.pa_reshape_and_cache_block_quant(key, value, key_cache, value_cache, k_dequant_scales, v_dequant_scales,
                                          slot_mapping, asm_layout, kv_cache_layout, backend)


def swap_blocks(src: Tensor, dst: Tensor, block_mapping: Tensor, *, backend: Optional[str] = None) -> None:
    """``dst[d] = src[s]`` for each row ``(s, d)`` of ``block_mapping [n, 2]`` (CPU int64);
    src and dst may be on different devices (swap in/out)."""
    _ops.pa_swap_blocks(src, dst, block_mapping, backend)


def copy_blocks(key_caches: list[Tensor], value_caches: list[Tensor], block_mapping: Tensor, *,
                backend: Optional[str] = None) -> None:
    """``cache[d] = cache[s]`` for every cache of both lists and each row ``(s, d)`` of
    ``block_mapping [n, 2]`` (int64). Destinations must be distinct and no destination may also be
    a source (the copies run in parallel)."""
    _ops.pa_copy_blocks(list(key_caches), list(value_caches), block_mapping, backend)


# -- decode ---------------------------------------------------------------------------------------


def paged_attention_workspace_size(num_seqs: int, num_heads: int, head_size: int, max_num_partitions: int,
                                   out_dtype: torch.dtype, mtp: int = 1) -> int:
    """Bytes :func:`paged_attention_v1` / :func:`paged_attention_ragged` need in ``workspace_buffer``
    (upstream's formula): ``n*P*D*elem + 2*n*P*4`` with ``n = num_seqs * mtp * num_heads``."""
    return workspace_bytes(num_seqs * mtp, num_heads, max_num_partitions, head_size, out_dtype)


def decode_partials(total_q: int, num_heads: int, head_dim_v: int, num_partitions: int,
                    device: str | torch.device = "cuda") -> tuple[Tensor, Tensor, Tensor]:
    """Pre-sized split-K buffers ``(partial_out, partial_max, partial_sum)`` for
    :func:`paged_attention_decode` (``workspace=``): allocate once outside a CUDA graph."""
    return (torch.empty(total_q, num_heads, num_partitions, head_dim_v, dtype=torch.float32, device=device),
            torch.empty(total_q, num_heads, num_partitions, dtype=torch.float32, device=device),
            torch.empty(total_q, num_heads, num_partitions, dtype=torch.float32, device=device))


def paged_attention_decode(output: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, seq_lens: Tensor,
                           block_tables: Tensor, attn_scale: float, max_seq_len: int, compute_type=None,
                           k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                           num_seq_partitions: int = 0, alibi_slopes: Optional[Tensor] = None, *,
                           kv_cache_layout: str = "HND", high_precision: int = 1, mtp: int = 1,
                           logits_soft_cap: float = 0.0, sliding_window: int = 0,
                           workspace: Optional[tuple[Tensor, Tensor, Tensor]] = None,
                           backend: Optional[str] = None) -> None:
    """Upstream's Triton decode: ``query/output [num_seqs*mtp, Hq, D]``, HND caches (any layout
    here). ``num_seq_partitions=0`` lets the v1/v2 heuristic choose; 1 forces v1. ``compute_type``
    is accepted and ignored (dots run in the query dtype). 8-bit caches take per-tensor (numel 1),
    per-head ``[Hk]`` or per-token scales; scales are never read on the host (no sync).
    ``workspace`` from :func:`decode_partials` fixes the partition count and avoids allocation."""
    del compute_type
    pm, pmax, psum = workspace if workspace is not None else (None, None, None)
    _ops.paged_attention_decode(output, query, key_cache, value_cache, seq_lens, block_tables, attn_scale, max_seq_len,
                                k_scale, v_scale, num_seq_partitions, alibi_slopes, kv_cache_layout, high_precision,
                                mtp, logits_soft_cap, sliding_window, pm, pmax, psum, backend)


def paged_attention_rocm(out: Tensor, exp_sums: Tensor, max_logits: Tensor, tmp_out: Tensor, query: Tensor,
                         key_cache: Tensor, value_cache: Tensor, num_kv_heads: int, scale: float, block_tables: Tensor,
                         context_lens: Tensor, block_size: int, max_context_len: int, alibi_slopes: Optional[Tensor],
                         kv_cache_dtype: str, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                         fp8_out_scale: Optional[Tensor] = None, partition_size: int = 256, mtp: int = 1,
                         q_scale: Optional[Tensor] = None, *, high_precision: int = 1,
                         backend: Optional[str] = None) -> Tensor:
    """Two-phase decode over vLLM caches (V 4-D or shuffled 5-D). ``exp_sums/max_logits
    [num_seqs*mtp, Hq, P]`` fp32 and ``tmp_out [num_seqs*mtp, Hq, P, D]`` receive each partition's
    exp-sum, max logit (natural log) and normalised output; ``P >= ceil(max_context_len /
    partition_size)``. Returns ``out``."""
    _ops.paged_attention_rocm(out, exp_sums, max_logits, tmp_out, query, key_cache, value_cache, num_kv_heads, scale,
                              block_tables, context_lens, block_size, max_context_len, alibi_slopes, kv_cache_dtype,
                              k_scale, v_scale, fp8_out_scale, partition_size, mtp, q_scale, high_precision, backend)
    return out


def paged_attention_v1(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                       scale: float, block_tables: Tensor, cu_query_lens: Optional[Tensor], context_lens: Tensor,
                       max_context_len: int, alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
                       logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                       fp8_out_scale: Optional[Tensor] = None, partition_size: int = 256, mtp: int = 1,
                       sliding_window: int = 0, *, high_precision: int = 1, backend: Optional[str] = None) -> Tensor:
    """Decode over HND/NHD caches with soft cap and sliding window (``w > 0``: the last ``w`` keys
    of each query are visible). ``cu_query_lens [num_seqs+1]`` (MTP rows per sequence) or None
    (``mtp`` rows each). ``workspace_buffer`` holds :func:`paged_attention_workspace_size` bytes."""
    _ops.paged_attention_v1(out, workspace_buffer, query, key_cache, value_cache, scale, block_tables, cu_query_lens,
                            context_lens, max_context_len, alibi_slopes, kv_cache_dtype, kv_cache_layout,
                            logits_soft_cap, k_scale, v_scale, fp8_out_scale, partition_size, mtp, sliding_window,
                            high_precision, backend)
    return out


def paged_attention_ragged(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor,
                           value_cache: Tensor, scale: float, kv_indptr: Tensor, kv_page_indices: Tensor,
                           kv_last_page_lens: Tensor, block_size: int, max_num_partitions: int,
                           alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
                           logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                           fp8_out_scale: Optional[Tensor] = None, partition_size: int = 256, mtp: int = 1, *,
                           high_precision: int = 1, backend: Optional[str] = None) -> Tensor:
    """Decode with FlashInfer-style page lists: sequence ``s`` owns pages
    ``kv_page_indices[kv_indptr[s]:kv_indptr[s+1]]``, the last holding ``kv_last_page_lens[s]``
    tokens. Context up to ``max_num_partitions * partition_size`` tokens."""
    _ops.paged_attention_ragged(out, workspace_buffer, query, key_cache, value_cache, scale, kv_indptr,
                                kv_page_indices, kv_last_page_lens, block_size, max_num_partitions, alibi_slopes,
                                kv_cache_dtype, kv_cache_layout, logits_soft_cap, k_scale, v_scale, fp8_out_scale,
                                partition_size, mtp, high_precision, backend)
    return out


def pa_fwd_asm(Q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor, context_lens: Tensor,  # noqa: N803
               block_tables_stride0: int, max_qlen: int = 1, K_QScale: Optional[Tensor] = None,  # noqa: N803
               V_QScale: Optional[Tensor] = None, out_: Optional[Tensor] = None,  # noqa: N803
               qo_indptr: Optional[Tensor] = None, high_precision: Optional[int] = 1,
               kernelName: Optional[str] = None, *, backend: Optional[str] = None) -> Tensor:  # noqa: N803
    """Upstream's ASM decode entry: K vLLM 5-D, V shuffled 5-D, scale fixed to ``1/sqrt(D)``, MTP
    through ``qo_indptr`` + ``max_qlen``, ``high_precision`` 0/1/2 (None = 1). ``kernelName`` is
    accepted and ignored. The context bound is ``block_tables.shape[1] * block_size`` (no sync)."""
    del kernelName
    out = out_ if out_ is not None else torch.empty_like(check_tensor("Q", Q))
    _ops.pa_fwd_asm(out, Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale, V_QScale,
                    qo_indptr, 1 if high_precision is None else high_precision, backend)
    return out


def should_use_asm_kernel(num_seqs: int, num_heads: int, head_size: int, kv_dtype: torch.dtype,
                          high_precision: Optional[int]) -> bool:
    """Upstream's ASM-vs-HIP rule of :func:`paged_attention_common`: head_size != 128 -> HIP;
    high_precision == 2 -> ASM; int8 KV -> ASM; else ASM iff ``num_seqs * num_heads > 2 * SMs``."""
    from aiter_core.arch import get_arch_info

    if head_size != 128:
        return False
    if high_precision == 2 or kv_dtype == torch.int8:
        return True
    return num_seqs * num_heads > 2 * max(1, int(get_arch_info().num_cu or 1))


def paged_attention_common(Q: Tensor, K: Tensor, V: Tensor, exp_sums: Tensor, max_logits: Tensor,  # noqa: N803
                           tmp_out: Tensor, block_tables: Tensor, context_lens: Tensor, block_tables_stride0: int,
                           scale: float, max_qlen: int = 1, max_seq_len: int = 1,
                           K_QScale_hip: Optional[Tensor] = None, V_QScale_hip: Optional[Tensor] = None,  # noqa: N803
                           K_QScale_asm: Optional[Tensor] = None, V_QScale_asm: Optional[Tensor] = None,  # noqa: N803
                           out_: Optional[Tensor] = None, qo_indptr: Optional[Tensor] = None,
                           high_precision: Optional[int] = 1, kernelName: Optional[str] = None,  # noqa: N803
                           kv_cache_dtype: str = "auto", kv_cache_tensor_dtype: Optional[torch.dtype] = None, *,
                           backend: Optional[str] = None) -> Tensor:
    """Upstream's dispatcher (V in the shuffled layout for both paths). "ASM" (see
    :func:`should_use_asm_kernel`) maps to the single-launch heuristic path with the ASM scales and
    fixed ``1/sqrt(D)``; "HIP" to :func:`paged_attention_rocm` with partition 256, ``scale`` and the
    HIP scales."""
    del kernelName
    for name, t in (("Q", Q), ("K", K), ("V", V), ("context_lens", context_lens)):
        check_tensor(name, t)  # the routing below reads their shapes and dtypes
    if kv_cache_tensor_dtype is not None and kv_cache_tensor_dtype != K.dtype:
        K, V = K.view(kv_cache_tensor_dtype), V.view(kv_cache_tensor_dtype)
    out = out_ if out_ is not None else torch.empty_like(Q)
    num_seqs = context_lens.shape[0]
    # a Q that is not [rows, heads, head_size] goes to pa_fwd_asm, whose checks name it
    if Q.dim() != 3 or should_use_asm_kernel(num_seqs, Q.shape[1], Q.shape[2], K.dtype, high_precision):
        return pa_fwd_asm(Q, K, V, block_tables, context_lens, block_tables_stride0, max_qlen, K_QScale_asm,
                          V_QScale_asm, out, qo_indptr, high_precision, backend=backend)
    if qo_indptr is not None and max_qlen > 1:
        raise ValueError("the HIP path of paged_attention_common takes MTP as mtp rows per sequence; "
                         "qo_indptr with max_qlen > 1 needs the ASM path (head_size 128)")
    kv_dtype = kv_cache_dtype if K.element_size() == 1 else "auto"
    if K.element_size() == 1 and kv_cache_dtype == "auto":
        kv_dtype = "fp8"
    block_size = V.shape[2] * V.shape[4] if V.dim() == 5 else V.shape[-1]
    return paged_attention_rocm(out, exp_sums, max_logits, tmp_out, Q, K, V, K.shape[1], scale, block_tables,
                                context_lens, block_size, max_seq_len, None, kv_dtype, K_QScale_hip, V_QScale_hip,
                                None, 256, max_qlen, None, high_precision=1 if high_precision is None else high_precision,
                                backend=backend)


# -- prefill / extend -----------------------------------------------------------------------------


def context_attention_fwd(q: Tensor, k: Tensor, v: Tensor, o: Tensor, kv_cache_dtype: str, k_cache: Tensor,
                          v_cache: Tensor, b_loc: Tensor, b_start_loc: Tensor, b_seq_len: Tensor, max_input_len: int,
                          k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                          alibi_slopes: Optional[Tensor] = None, sliding_window: Optional[int] = None,
                          sm_scale: Optional[float] = None, skip_decode: bool = False, *,
                          max_seq_len: Optional[int] = None, kv_cache_layout: Optional[str] = None,
                          backend: Optional[str] = None) -> None:
    """Prefix prefill (LightLLM/vLLM): ``q/k/v/o [total_q, H, D]`` packed with ``b_start_loc
    [B+1]``; ``b_seq_len [B]`` is the total length (cached context + new); new tokens attend to the
    ``b_seq_len - query_len`` cached tokens (vLLM 5-D caches; or NHD/HND with ``kv_cache_layout``)
    and causally to each other. ``max_seq_len`` bounds the context for the block-table check
    (default ``b_loc.shape[1] * block_size``)."""
    _ops.pa_context_attention_fwd(q, k, v, o, kv_cache_dtype, k_cache, v_cache, b_loc, b_start_loc, b_seq_len,
                                  max_input_len, k_scale, v_scale, alibi_slopes, sliding_window, sm_scale, skip_decode,
                                  max_seq_len, kv_cache_layout, backend)


def chunked_prefill_paged_decode(query: Tensor, key: Tensor, value: Tensor, output: Tensor, kv_cache_dtype: str,
                                 key_cache: Tensor, value_cache: Tensor, block_table: Tensor, query_start_loc: Tensor,
                                 seq_lens: Tensor, max_query_len: int, k_scale: Optional[Tensor] = None,
                                 v_scale: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                                 sliding_window: Optional[int] = None, sm_scale: Optional[float] = None, *,
                                 kv_cache_layout: Optional[str] = None, backend: Optional[str] = None) -> None:
    """Mixed batch of prefill and decode sequences in one launch (upstream runs two kernels; the
    results are the same). Default ``sm_scale`` is ``head_dim ** -0.5`` (upstream's default uses
    the head count, a bug)."""
    context_attention_fwd(query, key, value, output, kv_cache_dtype, key_cache, value_cache, block_table,
                          query_start_loc, seq_lens, max_query_len, k_scale, v_scale, alibi_slopes, sliding_window,
                          sm_scale, False, kv_cache_layout=kv_cache_layout, backend=backend)


def extend_attention_fwd(q_extend: Tensor, k_extend: Tensor, v_extend: Tensor, o_extend: Tensor, k_buffer: Tensor,
                         v_buffer: Tensor, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                         custom_mask: Optional[Tensor], is_causal: bool, mask_indptr: Optional[Tensor],
                         max_len_extend: int, sm_scale: Optional[float] = None, logit_cap: float = 0.0,
                         skip_prefix_custom_mask: bool = True, config: Optional[dict] = None, *,
                         backend: Optional[str] = None) -> None:
    """SGLang extend: the prefix of sequence ``s`` is ``k_buffer/v_buffer [tokens, Hk, D]`` rows
    ``kv_indices[kv_indptr[s]:kv_indptr[s+1]]`` (page size 1), fully visible; then its extend
    tokens (``qo_indptr``), causal when ``is_causal``. ``logit_cap`` = soft cap. Head dims of q/k
    and v may differ (up to 256 each). ``custom_mask`` (flat bool): for sequence ``s`` the
    ``[extend_len, prefix_len + extend_len]`` row-major flags at ``mask_indptr[s]``; it replaces
    the causal rule and, with ``skip_prefix_custom_mask=False``, also masks the prefix."""
    del config
    _ops.extend_attention_fwd(q_extend, k_extend, v_extend, o_extend, k_buffer, v_buffer, qo_indptr, kv_indptr,
                              kv_indices, custom_mask, is_causal, mask_indptr, max_len_extend, sm_scale,
                              logit_cap or 0.0, skip_prefix_custom_mask, backend)


def prefill_attention(q: Tensor, k: Tensor, v: Tensor, o: Tensor, b_start_loc: Tensor, b_seq_len: Tensor,
                      max_input_len: int, is_causal: bool = True, *, backend: Optional[str] = None) -> None:
    """Upstream ``prefill_attention.context_attention_fwd``: packed ``[total, H, D]`` sequences at
    ``b_start_loc [B]`` of ``b_seq_len [B]`` tokens (packed back to back), scale ``1/sqrt(D)``."""
    _ops.prefill_attention(q, k, v, o, b_start_loc, b_seq_len, max_input_len, is_causal, backend)
