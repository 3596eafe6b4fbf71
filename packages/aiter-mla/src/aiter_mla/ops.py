"""The ``aiter::`` op table of aiter-mla: one declaration per op.

Each op's schema is its check's signature (:mod:`aiter_mla.checks`), its body
``registry.run(name, check(...))``: a direct ``torch.ops.aiter.<name>(...)`` call is validated
exactly like the public function. Every op writes its outputs in place (``mutates_args`` lists
exactly those) and returns nothing, so the default fake (no outputs) serves under
``torch.compile(fullgraph=True)`` and CUDA-graph capture.
"""

from __future__ import annotations

from aiter_core.ops import declare_op

from . import checks

__all__ = ["OPS", "mla_decode_fwd", "mla_decode_fwd_persistent", "mla_reduce_v1", "mla_prefill_fwd",
           "mla_prefill_ps_fwd", "mla_attention_block_table", "decode_attention_fwd_grouped_rope",
           "decode_attention_fwd", "concat_and_cache_mla", "fused_qk_rope_concat_and_cache_mla",
           "fused_qk_rope_cat_and_cache_mla"]

mla_decode_fwd = declare_op("mla_decode_fwd", checks.mla_decode_fwd,
                            mutates_args=("o", "logits", "attn_lse", "final_lse"))
mla_decode_fwd_persistent = declare_op("mla_decode_fwd_persistent", checks.mla_decode_fwd_persistent,
                                       mutates_args=("o", "partial_o", "partial_lse", "final_lse"))
mla_reduce_v1 = declare_op("mla_reduce_v1", checks.mla_reduce_v1, mutates_args=("final_output", "final_lse"))
mla_prefill_fwd = declare_op("mla_prefill_fwd", checks.mla_prefill_fwd, mutates_args=("o", "lse"))
mla_prefill_ps_fwd = declare_op("mla_prefill_ps_fwd", checks.mla_prefill_ps_fwd, mutates_args=("output", "lse"))
mla_attention_block_table = declare_op("mla_attention_block_table", checks.mla_attention_block_table,
                                       mutates_args=("out", "partial_o", "partial_lse", "lse"))
decode_attention_fwd_grouped_rope = declare_op("decode_attention_fwd_grouped_rope",
                                               checks.decode_attention_fwd_grouped_rope,
                                               mutates_args=("o", "attn_logits", "k_pe_tokens"))
decode_attention_fwd = declare_op("decode_attention_fwd", checks.decode_attention_fwd,
                                  mutates_args=("o", "lse", "attn_logits", "attn_lse"))
concat_and_cache_mla = declare_op("concat_and_cache_mla", checks.concat_and_cache_mla, mutates_args=("kv_cache",))
fused_qk_rope_concat_and_cache_mla = declare_op("fused_qk_rope_concat_and_cache_mla",
                                                checks.fused_qk_rope_concat_and_cache_mla,
                                                mutates_args=("kv_cache", "q_out"))
fused_qk_rope_cat_and_cache_mla = declare_op("fused_qk_rope_cat_and_cache_mla", checks.fused_qk_rope_cat_and_cache_mla,
                                             mutates_args=("kv_cache", "q_out", "k_pe_out", "decode_q_pe_out",
                                                           "q_nope_zeros_out"))

OPS = {op.name: op for op in (
    mla_decode_fwd, mla_decode_fwd_persistent, mla_reduce_v1, mla_prefill_fwd, mla_prefill_ps_fwd,
    mla_attention_block_table, decode_attention_fwd_grouped_rope, decode_attention_fwd, concat_and_cache_mla,
    fused_qk_rope_concat_and_cache_mla, fused_qk_rope_cat_and_cache_mla)}
