"""The ``torch.ops.aiter.*`` ops of aiter-pa: one declaration each.

Each op's schema is its :mod:`aiter_pa.checks` function's signature and its body is
``registry.run(op, checks.<op>(...))``, so a direct ``torch.ops.aiter.<op>(...)`` call is validated
exactly like the public function. Every op writes its outputs in place (listed exactly in
``mutates_args``) and returns nothing, so the default fake implementation (nothing) serves all of
them and they run under ``torch.compile`` and CUDA-graph capture.
"""

from __future__ import annotations

from aiter_core.ops import declare_op

from . import checks

_CACHES = ("key_cache", "value_cache")
_SCALES = ("k_dequant_scales", "v_dequant_scales")

pa_reshape_and_cache = declare_op("pa_reshape_and_cache", checks.pa_reshape_and_cache, mutates_args=_CACHES)
pa_reshape_and_cache_pertoken = declare_op("pa_reshape_and_cache_pertoken", checks.pa_reshape_and_cache_pertoken,
                                           mutates_args=_CACHES + _SCALES)
pa_reshape_and_cache_block_quant = declare_op("pa_reshape_and_cache_block_quant",
                                              checks.pa_reshape_and_cache_block_quant, mutates_args=_CACHES + _SCALES)
pa_swap_blocks = declare_op("pa_swap_blocks", checks.pa_swap_blocks, mutates_args=("dst",))
pa_copy_blocks = declare_op("pa_copy_blocks", checks.pa_copy_blocks, mutates_args=("key_caches", "value_caches"))
paged_attention_decode = declare_op("paged_attention_decode", checks.paged_attention_decode,
                                    mutates_args=("output", "partial_out", "partial_max", "partial_sum"))
paged_attention_rocm = declare_op("paged_attention_rocm", checks.paged_attention_rocm,
                                  mutates_args=("out", "exp_sums", "max_logits", "tmp_out"))
paged_attention_v1 = declare_op("paged_attention_v1", checks.paged_attention_v1,
                                mutates_args=("out", "workspace_buffer"))
paged_attention_ragged = declare_op("paged_attention_ragged", checks.paged_attention_ragged,
                                    mutates_args=("out", "workspace_buffer"))
pa_fwd_asm = declare_op("pa_fwd_asm", checks.pa_fwd_asm, mutates_args=("out",))
pa_context_attention_fwd = declare_op("pa_context_attention_fwd", checks.pa_context_attention_fwd,
                                      mutates_args=("o",))
extend_attention_fwd = declare_op("extend_attention_fwd", checks.extend_attention_fwd, mutates_args=("o_extend",))
prefill_attention = declare_op("prefill_attention", checks.prefill_attention, mutates_args=("o",))

OPS = (pa_reshape_and_cache, pa_reshape_and_cache_pertoken, pa_reshape_and_cache_block_quant, pa_swap_blocks,
       pa_copy_blocks, paged_attention_decode, paged_attention_rocm, paged_attention_v1, paged_attention_ragged,
       pa_fwd_asm, pa_context_attention_fwd, extend_attention_fwd, prefill_attention)
