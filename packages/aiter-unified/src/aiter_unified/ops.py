"""``torch.ops.aiter.unified_attention`` (writes ``out``, returns nothing) and
``torch.ops.aiter.unified_attention_segments`` (``skip_reduce``: returns the three split-KV
buffers), registered through ``aiter_core.ops.register_op`` with fake implementations, so both run
under ``torch.compile`` and CUDA-graph capture. Each checks its arguments, then dispatches through
the backend registry (``backend=""``: the best available backend)."""

from __future__ import annotations

from typing import List, Optional

import torch

from aiter_core.ops import register_op
from aiter_core.registry import dispatch

from ._checks import check_unified_args
from .backends import make_problem

Tensor = torch.Tensor


def _common(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, window_size,
            block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes, output_scale, qq_bias, sinks):
    return dict(q=q, k=k, v=v, out=out, cu_seqlens_q=cu_seqlens_q, max_seqlen_q=max_seqlen_q, seqused_k=seqused_k,
                max_seqlen_k=max_seqlen_k, softmax_scale=softmax_scale, window_size=tuple(window_size),
                block_table=block_table, softcap=softcap, q_descale=q_descale, k_descale=k_descale,
                v_descale=v_descale, alibi_slopes=alibi_slopes, output_scale=output_scale, qq_bias=qq_bias,
                sinks=sinks)


def _unified_attention(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor, max_seqlen_q: int,
                       seqused_k: Tensor, max_seqlen_k: int, softmax_scale: float, window_size: List[int],
                       block_table: Tensor, softcap: float, q_descale: Optional[Tensor], k_descale: Optional[Tensor],
                       v_descale: Optional[Tensor], alibi_slopes: Optional[Tensor], output_scale: Optional[Tensor],
                       qq_bias: Optional[Tensor], sinks: Optional[Tensor], backend: str = "") -> None:
    kw = _common(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, window_size,
                 block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes, output_scale, qq_bias, sinks)
    check_unified_args(causal=True, q_scales=None, shuffled_kv_cache=False, skip_reduce=False, **kw)
    dispatch("unified_attention", make_problem(q, k), backend=backend or None)(**kw)


def _unified_attention_fake(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale,
                            window_size, block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes,
                            output_scale, qq_bias, sinks, backend=""):
    return None


def _segment_shape(q, k, num_seqs, max_seqlen_q, max_seqlen_k, window_size):
    from .triton.launch import plan

    window = 1 + int(window_size[0]) if int(window_size[0]) >= 0 else 0
    p = plan(num_tokens=q.shape[0], num_seqs=num_seqs, heads_q=q.shape[1], heads_kv=k.shape[2], head_dim=q.shape[2],
             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, sliding_window=window, device=q.device,
             skip_reduce=True)
    return p.num_segments, p.block_d


def _unified_attention_segments(q: Tensor, k: Tensor, v: Tensor, out: Tensor, cu_seqlens_q: Tensor,
                                max_seqlen_q: int, seqused_k: Tensor, max_seqlen_k: int, softmax_scale: float,
                                window_size: List[int], block_table: Tensor, softcap: float,
                                q_descale: Optional[Tensor], k_descale: Optional[Tensor],
                                v_descale: Optional[Tensor], alibi_slopes: Optional[Tensor],
                                output_scale: Optional[Tensor], qq_bias: Optional[Tensor], sinks: Optional[Tensor],
                                backend: str = "") -> List[Tensor]:
    kw = _common(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, window_size,
                 block_table, softcap, q_descale, k_descale, v_descale, alibi_slopes, output_scale, qq_bias, sinks)
    check_unified_args(causal=True, q_scales=None, shuffled_kv_cache=False, skip_reduce=True, **kw)
    res = dispatch("unified_attention_segments", make_problem(q, k, skip_reduce=True), backend=backend or None)(**kw)
    return list(res)


def _unified_attention_segments_fake(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k,
                                     softmax_scale, window_size, block_table, softcap, q_descale, k_descale,
                                     v_descale, alibi_slopes, output_scale, qq_bias, sinks, backend=""):
    segments, block_d = _segment_shape(q, k, cu_seqlens_q.shape[0] - 1, max_seqlen_q, max_seqlen_k, window_size)
    t, h = q.shape[0], q.shape[1]
    return [q.new_empty(t, h, segments, block_d, dtype=torch.float32),
            q.new_empty(t, h, segments, dtype=torch.float32), q.new_empty(t, h, segments, dtype=torch.float32)]


unified_attention_op = register_op("unified_attention", _unified_attention, mutates_args=("out",),
                                   fake=_unified_attention_fake)
unified_attention_segments_op = register_op("unified_attention_segments", _unified_attention_segments,
                                            mutates_args=(), fake=_unified_attention_segments_fake)
