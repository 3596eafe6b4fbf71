"""The backends of every aiter-mla op, as registered with ``aiter_core``'s registry.

* ``triton`` (priority 100): :mod:`aiter_mla.triton.launch` turns the op's Call into kernel
  launches. Runs on CUDA/ROCm devices, or on CPU tensors when ``TRITON_INTERPRET=1``.
* ``reference`` (priority 0): :mod:`aiter_mla.reference` in PyTorch, on any device (syncs with
  the host: not for CUDA graphs).

Each implementation below takes the op's Call (:mod:`aiter_mla.checks`) and writes the op's
outputs in place. They import their launcher or reference on first use, so importing this
module (entry-point discovery) pulls in neither Triton nor the kernels.
"""

from __future__ import annotations

from aiter_core.registry import (
    BackendSpec,
    Family,
    reference_specs,
    specs_for,
    triton_available,
    triton_device_reasons,
    triton_dtype_reasons,
)

TRITON_PRIORITY = 100
REFERENCE_PRIORITY = 0
_launch_module = None  # aiter_mla.triton.launch once imported (an import statement costs microseconds per call)

__all__ = ["OPS", "backend_specs", "family", "triton_supports"]


def triton_supports(key) -> list[str]:
    """Why the Triton kernels cannot run a call with this key (empty list: they can)."""
    return triton_device_reasons(key.device) + triton_dtype_reasons(key.device, key.dtypes)


# -- triton --------------------------------------------------------------------------------------


def _launch():
    """:mod:`aiter_mla.triton.launch`, imported on first use (it imports Triton and the kernels)."""
    global _launch_module
    if _launch_module is None:
        from .triton import launch

        _launch_module = launch
    return _launch_module


def triton_mla_decode_fwd(call) -> None:
    _launch().mla_decode_fwd(call)


def triton_mla_prefill_fwd(call) -> None:
    _launch().mla_prefill_fwd(call)


def triton_mla_decode_fwd_persistent(call) -> None:
    _launch().mla_decode_fwd_persistent(call)


def triton_mla_reduce_v1(call) -> None:
    _launch().mla_reduce_v1(call)


def triton_mla_prefill_ps_fwd(call) -> None:
    _launch().mla_prefill_ps_fwd(call)


def triton_mla_attention_block_table(call) -> None:
    _launch().mla_attention_block_table(call)


def triton_decode_attention_fwd_grouped_rope(call) -> None:
    _launch().decode_attention_fwd_grouped_rope(call)


def triton_decode_attention_fwd(call) -> None:
    _launch().decode_attention_fwd(call)


def triton_concat_and_cache_mla(call) -> None:
    _launch().concat_and_cache_mla(call)


def triton_fused_qk_rope_concat_and_cache_mla(call) -> None:
    _launch().fused_qk_rope_concat_and_cache_mla(call)


def triton_fused_qk_rope_cat_and_cache_mla(call) -> None:
    _launch().fused_qk_rope_cat_and_cache_mla(call)


# -- reference -----------------------------------------------------------------------------------


def _write_result(o32, lse32, out, lse, partial_o=None, partial_lse=None) -> None:
    """The reference's fp32 result into the op's outputs; split partials (when the op has
    them) as a single-split decomposition: split 0 holds the result, the others nothing."""
    out.copy_(o32)
    if lse is not None:
        lse.copy_(lse32)
    if partial_o is not None:
        partial_o.zero_()
        partial_o[:, 0] = o32
        partial_lse.fill_(float("-inf"))
        partial_lse[:, 0] = lse32


def reference_paged_attention(call) -> None:
    """``mla_decode_fwd`` and ``mla_prefill_fwd`` (one Call type)."""
    from .reference import mla_decode_ref

    o32, lse32 = mla_decode_ref(call.q, call.kv_buffer, call.qo_indptr, call.kv_indptr, call.kv_indices,
                                call.kv_last_page_lens, kv_lora_rank=call.key.d_v, page_size=call.page_size,
                                sm_scale=call.sm_scale, causal=call.causal, q_scale=call.q_scale,
                                kv_scale=call.kv_scale)
    _write_result(o32, lse32, call.o, call.final_lse, call.logits, call.attn_lse)


def reference_mla_decode_fwd_persistent(call) -> None:
    """The work items one by one in PyTorch, then the reference reduce."""
    from .reference import mla_decode_persistent_ref, mla_reduce_ref

    mla_decode_persistent_ref(call.q, call.kv_buffer, call.o, call.qo_indptr, call.kv_indptr, call.kv_indices,
                              page_size=call.page_size, max_seqlen_q=call.max_seqlen_q, sm_scale=call.sm_scale,
                              causal=call.causal, work_indptr=call.work_indptr, work_info_set=call.work_info_set,
                              partial_o=call.partial_o, partial_lse=call.partial_lse, final_lse=call.final_lse,
                              q_scale=call.q_scale, kv_scale=call.kv_scale)
    mla_reduce_ref(call.partial_o, call.partial_lse, call.reduce_indptr, call.reduce_final_map,
                   call.reduce_partial_map, call.max_seqlen_q, call.o, call.final_lse)


def reference_mla_reduce_v1(call) -> None:
    from .reference import mla_reduce_ref

    mla_reduce_ref(call.partial_output, call.partial_lse, call.reduce_indptr, call.reduce_final_map,
                   call.reduce_partial_map, call.max_seqlen_q, call.final_output, call.final_lse)


def reference_mla_prefill_ps_fwd(call) -> None:
    from .reference import mla_prefill_ps_ref

    o32, lse32 = mla_prefill_ps_ref(call.q, call.k, call.v, call.qo_indptr, call.kv_indptr, call.kv_page_indices,
                                    is_causal=call.is_causal, softmax_scale=call.softmax_scale, q_scale=call.q_scale,
                                    k_scale=call.k_scale, v_scale=call.v_scale)
    _write_result(o32, lse32, call.output, call.lse)


def reference_mla_attention_block_table(call) -> None:
    from .reference import mla_block_table_ref

    o32, lse32 = mla_block_table_ref(call.q, call.kv_buffer, call.cu_seqlens_q, call.seqused_k, call.block_tables,
                                     kv_lora_rank=call.kv_lora_rank, sm_scale=call.softmax_scale, causal=call.causal,
                                     q_scale=call.q_descale, kv_scale=call.kv_descale)
    _write_result(o32, lse32, call.out, call.lse, call.partial_o, call.partial_lse)


def reference_decode_attention_fwd_grouped_rope(call) -> None:
    from .reference import decode_grouped_rope_ref

    lora = call.kv_lora_rank
    o32, lse32, k_pe = decode_grouped_rope_ref(
        call.q, call.k_buffer, call.v_buffer, call.kv_indptr, call.kv_indices, kv_lora_rank=lora,
        rotary_dim=call.rotary_dim, sm_scale=call.sm_scale, logit_cap=call.logit_cap, use_rope=call.use_rope,
        is_neox_style=call.is_neox_style, cos_sin_cache=call.cos_sin_cache, positions=call.positions)
    call.o.copy_(o32)
    logits = call.attn_logits
    logits.zero_()
    logits[:, :, 1:, -1] = float("-inf")
    logits[:, :, 0, :lora] = o32
    logits[:, :, 0, -1] = lse32
    if call.use_rope:
        call.k_pe_tokens.copy_(k_pe.reshape(call.k_pe_tokens.shape))


def _sglang_partials(call):
    """[B, S, H, Dv] / [B, S, H] views of the SGLang partial buffers ([B, H, S, Dv (+1)], [B, H, S])."""
    d_v = call.key.d_v
    partial_o = call.attn_logits[..., :d_v].permute(0, 2, 1, 3)
    lse_src = call.attn_logits[..., d_v] if call.attn_lse is None else call.attn_lse
    return partial_o, lse_src.permute(0, 2, 1)


def reference_decode_attention_fwd(call) -> None:
    from .reference import decode_paged_ref

    o32, lse32 = decode_paged_ref(call.q, call.k_buffer, call.v_buffer, call.req_to_token, call.b_seq_len,
                                  page_size=call.page_size, sm_scale=call.sm_scale, logit_cap=call.logit_cap,
                                  k_scale=call.k_scale, v_scale=call.v_scale)
    _write_result(o32, lse32, call.o, call.lse, *_sglang_partials(call))


def reference_concat_and_cache_mla(call) -> None:
    from .reference import concat_and_cache_mla_ref

    call.kv_cache.copy_(concat_and_cache_mla_ref(call.kv_c, call.k_pe, call.kv_cache, call.slot_mapping, call.scale))


def reference_fused_qk_rope_concat_and_cache_mla(call) -> None:
    from .reference import fused_qk_rope_concat_and_cache_mla_ref

    new_q, new_cache = fused_qk_rope_concat_and_cache_mla_ref(
        call.q_nope, call.q_pe, call.kv_c, call.k_pe, call.kv_cache, call.q_out, call.slot_mapping, call.k_scale,
        call.q_scale, call.positions, call.cos_cache, call.sin_cache, call.is_neox, call.is_nope_first)
    call.q_out.copy_(new_q)
    call.kv_cache.copy_(new_cache)


def reference_fused_qk_rope_cat_and_cache_mla(call) -> None:
    from .reference import fused_qk_rope_cat_and_cache_mla_ref, rope_ref

    new_q, k_rot, new_cache = fused_qk_rope_cat_and_cache_mla_ref(
        call.q_nope, call.q_pe, call.k_nope, call.k_pe, call.kv_cache, call.slot_mapping, call.pos, call.cos, call.sin,
        call.k_scale, call.is_neox, call.apply_scale, call.q_out.dtype)
    call.q_out.copy_(new_q)
    call.kv_cache.copy_(new_cache)
    call.k_pe_out.copy_(k_rot)
    if call.decode_q_pe_out is not None:
        n = call.decode_q_pe_out.shape[0]
        call.decode_q_pe_out.copy_(rope_ref(call.q_pe[:n], call.cos, call.sin, call.pos[:n], call.is_neox))
    if call.q_nope_zeros_out is not None:
        call.q_nope_zeros_out.zero_()


# -- the table -------------------------------------------------------------------------------------

TRITON = {
    "mla_decode_fwd": triton_mla_decode_fwd,
    "mla_decode_fwd_persistent": triton_mla_decode_fwd_persistent,
    "mla_reduce_v1": triton_mla_reduce_v1,
    "mla_prefill_fwd": triton_mla_prefill_fwd,
    "mla_prefill_ps_fwd": triton_mla_prefill_ps_fwd,
    "mla_attention_block_table": triton_mla_attention_block_table,
    "decode_attention_fwd_grouped_rope": triton_decode_attention_fwd_grouped_rope,
    "decode_attention_fwd": triton_decode_attention_fwd,
    "concat_and_cache_mla": triton_concat_and_cache_mla,
    "fused_qk_rope_concat_and_cache_mla": triton_fused_qk_rope_concat_and_cache_mla,
    "fused_qk_rope_cat_and_cache_mla": triton_fused_qk_rope_cat_and_cache_mla,
}
REFERENCE = {
    "mla_decode_fwd": reference_paged_attention,
    "mla_decode_fwd_persistent": reference_mla_decode_fwd_persistent,
    "mla_reduce_v1": reference_mla_reduce_v1,
    "mla_prefill_fwd": reference_paged_attention,
    "mla_prefill_ps_fwd": reference_mla_prefill_ps_fwd,
    "mla_attention_block_table": reference_mla_attention_block_table,
    "decode_attention_fwd_grouped_rope": reference_decode_attention_fwd_grouped_rope,
    "decode_attention_fwd": reference_decode_attention_fwd,
    "concat_and_cache_mla": reference_concat_and_cache_mla,
    "fused_qk_rope_concat_and_cache_mla": reference_fused_qk_rope_concat_and_cache_mla,
    "fused_qk_rope_cat_and_cache_mla": reference_fused_qk_rope_cat_and_cache_mla,
}
OPS = tuple(TRITON)


def backend_specs() -> list[BackendSpec]:
    """Entry point ``aiter.backends`` -> ``mla``: every backend of every MLA op."""
    triton = specs_for(TRITON, backend="triton", priority=TRITON_PRIORITY, available=triton_available,
                       supports=triton_supports, cuda_graph=True,
                       description="Triton MLA kernels (CUDA/ROCm; CPU under TRITON_INTERPRET=1)")
    return triton + reference_specs(REFERENCE, priority=REFERENCE_PRIORITY)


family = Family(name="mla", distribution="aiter-mla", smoke="aiter_mla.smoke:run", bench="aiter_mla.bench:main",
                host="aiter_mla.bench:host_cases", warmup="aiter_mla.bench:warmup_cases", ops=OPS)
