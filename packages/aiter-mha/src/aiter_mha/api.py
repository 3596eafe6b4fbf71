"""Public MHA functions with upstream AITER's names and signatures (spec §1.1-§1.3, §1.5, §1.7, §1.8).

Each calls its ``torch.ops.aiter`` op (``ops.py``), which validates the arguments (``checks.py``)
and runs the backend the registry picks; this module only maps upstream's signature onto the op's
and upstream's return structure onto the op's outputs.
"""

from __future__ import annotations

from typing import Optional, Union

import torch

from . import ops

Tensor = torch.Tensor

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_fp8_pertensor_func",
    "flash_attn_varlen_fp8_pertensor_func",
    "flash_attn_fp8_func",
    "flash_attn_varlen_fp8_func",
    "flash_attn_with_kvcache",
    "mha_fwd",
    "mha_varlen_fwd",
    "mha_bwd",
    "mha_varlen_bwd",
]


def _result(out, lse, s_dmask, return_lse, return_attn_probs):
    if not return_lse and not return_attn_probs:
        return out
    result = [out]
    if return_lse:
        result.append(lse)
    if return_attn_probs:
        result.append(s_dmask)
    return tuple(result)


def flash_attn_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple = (-1, -1, 0),
    bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = True,
    return_lse: bool = False,
    return_attn_probs: bool = False,
    how_v3_bf16_cvt: int = 1,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_kv: Optional[Tensor] = None,
    sink_ptr: Optional[Tensor] = None,
    num_splits: int = 0,
    *,
    logits_soft_cap: float = 0.0,
    backend: Optional[str] = None,
):
    """Dense (bshd) flash attention, forward and backward (autograd).

    q ``(B, Sq, Hq, Dq)``, k ``(B, Sk, Hk, Dq)``, v ``(B, Sk, Hk, Dv)``, fp16/bf16 (fp32 accepted).
    Returns ``out (B, Sq, Hq, Dv)``, plus ``softmax_lse (B, Hq, Sq)`` fp32 (natural log) when
    ``return_lse``, plus ``S_dmask (B, Hq, Sq, Sk)`` fp32 when ``return_attn_probs`` and
    ``dropout_p > 0`` (the probabilities, negated where dropped). ``cu_seqlens_q/kv`` (B+1) give
    per-batch logical lengths inside the padded batch (rows past a length: out 0, lse -inf).
    ``how_v3_bf16_cvt`` and ``num_splits`` are accepted for compatibility and have no effect.
    Extensions: ``logits_soft_cap`` (as in the varlen form) and ``backend`` ("triton" /
    "reference"; None = automatic).
    """
    out, lse, s_dmask, _ = ops.flash_attn_func(
        q, k, v, dropout_p, softmax_scale, causal, window_size, bias, alibi_slopes, deterministic, return_lse,
        return_attn_probs, how_v3_bf16_cvt, cu_seqlens_q, cu_seqlens_kv, sink_ptr, num_splits, logits_soft_cap,
        backend)
    return _result(out, lse, s_dmask, return_lse, return_attn_probs)


def flash_attn_varlen_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    min_seqlen_q: int = 0,
    dropout_p: float = 0.0,
    softmax_scale: Optional[float] = None,
    logits_soft_cap: float = 0.0,
    causal: bool = False,
    window_size: tuple = (-1, -1, 0),
    bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    deterministic: bool = False,
    return_lse: bool = False,
    return_attn_probs: bool = False,
    how_v3_bf16_cvt: int = 1,
    block_table: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    cu_seqlens_q_padded: Optional[Tensor] = None,
    cu_seqlens_k_padded: Optional[Tensor] = None,
    sink_ptr: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
):
    """Packed (thd) flash attention, forward and backward (autograd).

    q ``(Tq, Hq, Dq)``, k ``(Tk, Hk, Dq)``, v ``(Tk, Hk, Dv)``; int32 ``cu_seqlens_q/k`` (B+1)
    hold logical lengths; ``cu_seqlens_*_padded`` (B+1) physical row offsets when sequences are
    stored with gaps. Paged KV: k/v ``(num_blocks, page_block_size, Hk, D)`` with
    ``block_table (B, max_blocks)`` int32 (forward only). ``bias`` is ``(max_seqlen_q,
    max_seqlen_k)``, indexed per sequence from its first row/column. Returns ``out (Tq, Hq,
    Dv)`` (copied into ``out`` when given), plus ``softmax_lse (Hq, Tq)`` fp32 when
    ``return_lse``, plus ``S_dmask (Hq, Tq, max_seqlen_k)`` when ``return_attn_probs``.
    """
    o, lse, s_dmask, _ = ops.flash_attn_varlen_func(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p, softmax_scale,
        logits_soft_cap, causal, window_size, bias, alibi_slopes, deterministic, return_lse, return_attn_probs,
        how_v3_bf16_cvt, block_table, out, cu_seqlens_q_padded, cu_seqlens_k_padded, sink_ptr, backend)
    if out is not None:
        out.copy_(o)
        o = out
    return _result(o, lse, s_dmask, return_lse, return_attn_probs)


def flash_attn_fp8_pertensor_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_descale: Tensor,
    k_descale: Tensor,
    v_descale: Tensor,
    causal: bool = False,
    window_size: tuple = (-1, -1, 0),
    softmax_scale: Optional[float] = None,
    sink_ptr: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """fp8 (e4m3) bshd attention, forward only. Descales fp32 ``(1,)`` or ``(B, Hk)``; out bf16."""
    return ops.flash_attn_fp8_pertensor_func(q, k, v, q_descale, k_descale, v_descale, causal, window_size,
                                             softmax_scale, sink_ptr, backend)


def flash_attn_varlen_fp8_pertensor_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    q_descale: Tensor,
    k_descale: Tensor,
    v_descale: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    min_seqlen_q: int = 0,
    logits_soft_cap: float = 0.0,
    causal: bool = False,
    window_size: tuple = (-1, -1, 0),
    softmax_scale: Optional[float] = None,
    sink_ptr: Optional[Tensor] = None,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """fp8 (e4m3) thd attention, forward only. Descales fp32 ``(1,)`` or ``(B, Hk)``; out bf16."""
    return ops.flash_attn_varlen_fp8_pertensor_func(
        q, k, v, q_descale, k_descale, v_descale, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        min_seqlen_q, logits_soft_cap, causal, window_size, softmax_scale, sink_ptr, backend)


def flash_attn_fp8_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    qv: Optional[Tensor] = None,
    window_size: tuple = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    num_splits: int = 1,
    pack_gqa: Optional[bool] = None,
    deterministic: bool = False,
    sm_margin: int = 0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """bshd attention in fp8 from fp16/bf16/fp32 inputs (quantized per (batch, kv head)).

    Returns ``out (B, Sq, Hq, Dv)`` in q's dtype, differentiable (straight-through backward: the
    high-precision backward on the unquantized inputs). ``pack_gqa`` is a hint with no effect;
    ``softcap`` is supported (upstream raises).
    """
    out, _ = ops.flash_attn_fp8_func(q, k, v, softmax_scale, causal, qv, window_size, attention_chunk, softcap,
                                     num_splits, pack_gqa, deterministic, sm_margin, backend)
    return out


def flash_attn_varlen_fp8_func(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    window_size: tuple = (-1, -1),
    attention_chunk: int = 0,
    softcap: float = 0.0,
    deterministic: bool = False,
    sm_margin: int = 0,
    *,
    backend: Optional[str] = None,
) -> Tensor:
    """thd attention in fp8 from fp16/bf16/fp32 inputs (quantized per (sequence, kv head))."""
    out, _ = ops.flash_attn_varlen_fp8_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                            softmax_scale, causal, window_size, attention_chunk, softcap,
                                            deterministic, sm_margin, backend)
    return out


def flash_attn_with_kvcache(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    k: Optional[Tensor] = None,
    v: Optional[Tensor] = None,
    cache_seqlens: Union[int, Tensor, None] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = True,
    window_size: tuple = (-1, -1),
    softcap: float = 0.0,
    num_splits: int = 0,
    rotary_cos: Optional[Tensor] = None,
    rotary_sin: Optional[Tensor] = None,
    cache_batch_idx: Optional[Tensor] = None,
    cache_leftpad: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    rotary_interleaved: bool = True,
    return_softmax_lse: bool = False,
    *,
    sink_ptr: Optional[Tensor] = None,
    backend: Optional[str] = None,
):
    """Attention of q (B, Sq, Hq, D) over a KV cache, appending k/v (B, Snew, Hk, D) first.

    Caches: contiguous ``(B_cache, S_cache, Hk, D)`` (rows picked by ``cache_batch_idx`` (B,)
    int32, default row b) or paged ``(num_blocks, page_block_size, Hk, D)`` with ``block_table``
    (B, max_blocks) int32. ``cache_seqlens``: int or (B,) int32, the valid length before the
    append (None = the whole contiguous cache). Rotary tables ``(seqlen_ro, rotary_dim / 2)``.
    Returns ``out (B, Sq, Hq, Dv)``, plus ``softmax_lse (B, Hq, Sq)`` fp32 when asked.
    ``num_splits`` is accepted and ignored. Extensions: ``sink_ptr`` (attention sinks) and
    ``backend``.
    """
    seqlens, seqlens_int = cache_seqlens, None
    if cache_seqlens is not None and not isinstance(cache_seqlens, Tensor):
        seqlens, seqlens_int = None, cache_seqlens  # upstream's int form: one length for every sequence
    out, lse = ops.flash_attn_with_kvcache(
        q, k_cache, v_cache, k, v, seqlens, softmax_scale, causal, window_size, softcap, num_splits, rotary_cos,
        rotary_sin, cache_batch_idx, cache_leftpad, block_table, alibi_slopes, rotary_interleaved, return_softmax_lse,
        sink_ptr, seqlens_int, backend)
    return (out, lse) if return_softmax_lse else out


# -- low-level ops with upstream's signatures (spec §1.3) --------------------------------------------


def _rng_from_generator(gen, dropout_p) -> Optional[Tensor]:
    """Upstream's ``gen``: a dropout seed drawn from it on its device (``rng_state``); None without
    dropout or generator (the op then draws from torch's default generator itself)."""
    if gen is None or not isinstance(dropout_p, (int, float)) or not dropout_p > 0:
        return None
    seed = torch.randint(1, 2**62, (1,), dtype=torch.int64, device=gen.device, generator=gen)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=gen.device)])


def mha_fwd(q, k, v, dropout_p: float, softmax_scale: float, is_causal: bool, window_size_left: int,
            window_size_right: int, sink_size: int, return_softmax_lse: bool, return_dropout_randval: bool,
            cu_seqlens_q=None, cu_seqlens_kv=None, out=None, bias=None, alibi_slopes=None, q_descale=None,
            k_descale=None, v_descale=None, sink_ptr=None, gen=None, *, logits_soft_cap: float = 0.0,
            backend: Optional[str] = None):
    """Upstream ``mha_fwd``: returns ``(out, softmax_lse, p_randval, rng_state)``.

    ``p_randval`` is our fp32 S_dmask (negated where dropped), an empty tensor when not asked
    for; ``softmax_lse`` is empty when ``return_softmax_lse`` is False; ``rng_state`` is the
    (2,) int64 seed/offset used (zeros without dropout). ``gen`` seeds dropout (default: torch's
    generator of q's device).
    """
    o, lse, p, rng = ops.mha_fwd(q, k, v, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right,
                                 sink_size, return_softmax_lse, return_dropout_randval, cu_seqlens_q, cu_seqlens_kv,
                                 out, bias, alibi_slopes, q_descale, k_descale, v_descale, sink_ptr,
                                 _rng_from_generator(gen, dropout_p), logits_soft_cap, backend)
    return (out if out is not None else o), lse, p, rng


def mha_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, min_seqlen_q: int,
                   dropout_p: float, softmax_scale: float, logits_soft_cap: float, zero_tensors: bool, is_causal: bool,
                   window_size_left: int, window_size_right: int, sink_size: int, return_softmax_lse: bool,
                   return_dropout_randval: bool, out=None, block_table=None, bias=None, alibi_slopes=None,
                   q_descale=None, k_descale=None, v_descale=None, gen=None, cu_seqlens_q_padded=None,
                   cu_seqlens_k_padded=None, sink_ptr=None, *, backend: Optional[str] = None):
    """Upstream ``mha_varlen_fwd``: returns ``(out, softmax_lse (Hq, Tq), p_randval, rng_state)``."""
    o, lse, p, rng = ops.mha_varlen_fwd(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p, softmax_scale,
        logits_soft_cap, zero_tensors, is_causal, window_size_left, window_size_right, sink_size, return_softmax_lse,
        return_dropout_randval, out, block_table, bias, alibi_slopes, q_descale, k_descale, v_descale,
        _rng_from_generator(gen, dropout_p), cu_seqlens_q_padded, cu_seqlens_k_padded, sink_ptr, None, backend)
    return (out if out is not None else o), lse, p, rng


def _given(buf, result):
    return buf if buf is not None else result


def mha_bwd(dout, q, k, v, out, softmax_lse, dropout_p: float, softmax_scale: float, is_causal: bool,
            window_size_left: int, window_size_right: int, deterministic: bool, dq=None, dk=None, dv=None,
            dbias=None, bias=None, alibi_slopes=None, rng_state=None, gen=None, sink=None, d_sink=None, *,
            sink_size: int = 0, logits_soft_cap: float = 0.0, cu_seqlens_q=None, cu_seqlens_kv=None,
            backend: Optional[str] = None):
    """Upstream ``mha_bwd``: returns ``(dq, dk, dv, softmax_d (B, Hq, Sq) fp32)``.

    ``dbias`` ((Sq, Sk) fp32) and ``d_sink`` ((Hq,) fp32), when given, are filled in place.
    ``rng_state`` must be the one the forward returned when ``dropout_p > 0``; ``gen`` is unused.
    """
    gq, gk, gv, delta = ops.mha_bwd(dout, q, k, v, out, softmax_lse, dropout_p, softmax_scale, is_causal,
                                    window_size_left, window_size_right, deterministic, dq, dk, dv, dbias, bias,
                                    alibi_slopes, rng_state, sink, d_sink, sink_size, logits_soft_cap, cu_seqlens_q,
                                    cu_seqlens_kv, backend)
    return _given(dq, gq), _given(dk, gk), _given(dv, gv), delta


def mha_varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                   dropout_p: float, softmax_scale: float, zero_tensors: bool, is_causal: bool, window_size_left: int,
                   window_size_right: int, deterministic: bool, dq=None, dk=None, dv=None, alibi_slopes=None,
                   rng_state=None, gen=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=None,
                   d_sink=None, *, sink_size: int = 0, logits_soft_cap: float = 0.0, bias=None, dbias=None,
                   backend: Optional[str] = None):
    """Upstream ``mha_varlen_bwd``: returns ``(dq, dk, dv, softmax_d (Hq, Tq) fp32)``."""
    gq, gk, gv, delta = ops.mha_varlen_bwd(
        dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, zero_tensors, is_causal, window_size_left, window_size_right, deterministic, dq, dk, dv,
        alibi_slopes, rng_state, cu_seqlens_q_padded, cu_seqlens_k_padded, sink, d_sink, sink_size, logits_soft_cap,
        bias, dbias, backend)
    return _given(dq, gq), _given(dk, gk), _given(dv, gv), delta
