"""The kernel tests' way in: build an op's Call through ``aiter_mha.checks`` (the upstream low-level
signatures) and run it through ``aiter_mha.triton.launch`` with the tests' tile configs and GQA /
dQ launch shapes. Imported by tests/test_triton_kernels.py and tests/gpu/test_gpu_kernels.py."""

from __future__ import annotations

import torch

from aiter_mha import checks
from aiter_mha.triton import launch
from aiter_mha.triton.configs import TileConfig


def _window(window):
    left, right, *rest = window
    return left, right, (rest[0] if rest else 0)


def run_fwd(q, k, v, *, softmax_scale, causal, window=(-1, -1, 0), cu_seqlens_q=None, cu_seqlens_k=None,
            max_seqlen_q=None, max_seqlen_k=None, seqstart_q=None, seqstart_k=None, alibi_slopes=None, bias=None,
            sink=None, softcap=0.0, dropout_p=0.0, rng_state=None, return_dropout_mask=False, q_descale=None,
            k_descale=None, v_descale=None, out=None, config=None):
    """Dense (q 4-D) or packed (``cu_seqlens_q``) forward: (out, lse, S_dmask or None)."""
    left, right, sink_size = _window(window)
    if cu_seqlens_q is None:
        call = checks.mha_fwd(q, k, v, dropout_p, softmax_scale, causal, left, right, sink_size, True,
                              return_dropout_mask, None, None, out, bias, alibi_slopes, q_descale, k_descale, v_descale,
                              sink, rng_state, softcap)
    else:
        call = checks.mha_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0, dropout_p,
                                     softmax_scale, softcap, False, causal, left, right, sink_size, True,
                                     return_dropout_mask, out, None, bias, alibi_slopes, q_descale, k_descale,
                                     v_descale, rng_state, seqstart_q, seqstart_k, sink)
    o, lse, s_dmask, _ = launch.fwd(call, config)
    return (out if out is not None else o), lse, (s_dmask if return_dropout_mask else None)


def run_paged_fwd(q, k_cache, v_cache, block_table, *, softmax_scale, causal, seqlens_k=None, cu_seqlens_q=None,
                  cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, config=None):
    """Paged K/V: dense q with ``seqlens_k`` (the KV-cache form) or packed q with ``cu_seqlens_q/k``."""
    if cu_seqlens_q is None:
        call = checks.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens_k,
                                              softmax_scale=softmax_scale, causal=causal, block_table=block_table,
                                              return_softmax_lse=True)
        return launch.fwd(call, config)
    call = checks.mha_varlen_fwd(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, 0, 0.0,
                                 softmax_scale, 0.0, False, causal, -1, -1, 0, True, False, block_table=block_table)
    out, lse, _, _ = launch.fwd(call, config)
    return out, lse


def run_bwd(do, q, k, v, out, lse, *, softmax_scale, causal, window=(-1, -1, 0), cu_seqlens_q=None,
            cu_seqlens_k=None, max_seqlen_q=None, max_seqlen_k=None, seqstart_q=None, seqstart_k=None,
            alibi_slopes=None, bias=None, sink=None, softcap=0.0, dropout_p=0.0, rng_state=None,
            deterministic=False, dq=None, dk=None, dv=None, compute_dbias=False, config=None, split_group=None,
            dq_atomic=None):
    """Gradients of a forward: (dq, dk, dv, delta, dsink or None, dbias or None); ``config`` is one
    TileConfig for both kernels or a (dK/dV, dQ) pair."""
    left, right, sink_size = _window(window)
    d_sink = torch.empty(q.shape[-2], dtype=torch.float32, device=q.device) if sink is not None else None
    dbias = torch.empty(bias.shape, dtype=torch.float32, device=q.device) if compute_dbias else None
    if cu_seqlens_q is None:
        call = checks.mha_bwd(do, q, k, v, out, lse, dropout_p, softmax_scale, causal, left, right, deterministic, dq,
                              dk, dv, dbias, bias, alibi_slopes, rng_state, sink, d_sink, sink_size, softcap)
    else:
        call = checks.mha_varlen_bwd(do, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p, softmax_scale, False, causal, left, right, deterministic, dq, dk, dv,
                                     alibi_slopes, rng_state, seqstart_q, seqstart_k, sink, d_sink, sink_size, softcap,
                                     bias, dbias)
    if isinstance(config, TileConfig):
        config = (config, config)
    gq, gk, gv, delta = launch.bwd(call, config, split_group, dq_atomic)
    return (dq if dq is not None else gq, dk if dk is not None else gk, dv if dv is not None else gv, delta, d_sink,
            dbias)
