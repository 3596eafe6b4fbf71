"""Public API: ``unified_attention`` with upstream AITER's signature (aiter.ops.triton.attention.
unified_attention, from vLLM). See :mod:`aiter_unified.reference` for the exact semantics and
README.md for the support matrix. Every argument is validated inside the op
(:mod:`aiter_unified.checks`); ``skip_reduce`` picks the op."""

from __future__ import annotations

from . import ops
from .checks import skip_reduce_flag

__all__ = ["unified_attention"]


def unified_attention(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                      window_size, block_table, softcap, q_descale, k_descale, v_descale, q_scales=None,
                      alibi_slopes=None, output_scale=None, qq_bias=None, sinks=None, shuffled_kv_cache=False,
                      skip_reduce=False, *, backend: str | None = None):
    """Causal attention of packed (thd) queries over an NHD paged KV cache, any mix of prefill,
    extend and decode sequences in one launch.

    ``q [T, Hq, D]``; ``k, v [num_blocks, block_size, Hk, D]``; ``out [T, Hq, D]`` (written);
    ``cu_seqlens_q [B+1]``, ``seqused_k [B]`` (total KV length, new tokens included) and
    ``block_table [B, max_blocks]`` int32; ``max_seqlen_q`` / ``max_seqlen_k`` host ints (upper
    bounds, they size the launch). Returns ``out``, or with ``skip_reduce=True`` the split-KV
    buffers ``(segm_output [T, Hq, S, next_pow2(D)], segm_max [T, Hq, S], segm_expsum [T, Hq, S])``
    (``out`` untouched; ``segm_output`` holds normalised per-segment outputs, ``segm_max`` the
    per-segment max logit in natural-log units). ``backend``: force "triton" or "reference".
    """
    op = ops.unified_attention_segments if skip_reduce_flag(skip_reduce) else ops.unified_attention
    segments = op(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                  window_size, block_table, softcap, q_descale, k_descale, v_descale, q_scales, alibi_slopes,
                  output_scale, qq_bias, sinks, shuffled_kv_cache, backend)
    return out if segments is None else tuple(segments)
