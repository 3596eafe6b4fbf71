"""Public MHA functions: argument checks, then the ``torch.ops.aiter`` ops (see ``ops.py``).

Names, signatures, layouts and semantics follow upstream AITER (spec §1.1-§1.3, §1.5). Every
function checks its arguments before anything runs and raises ``TypeError`` / ``ValueError``
naming the argument, what was expected and what came. Checks look at shapes, dtypes, devices
and strides only: the contents of ``cu_seqlens`` / ``block_table`` are not inspected, because
that would need a host sync (and break CUDA-graph capture).
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from . import ops as _ops  # noqa: F401  (registers torch.ops.aiter.mha_*)
from ._checks import (
    check_bool,
    check_dtype,
    check_float,
    check_gqa,
    check_head_dims,
    check_int,
    check_int32_vector,
    check_last_dim_contiguous,
    check_ndim,
    check_same_device,
    check_shape,
    check_tensor,
    check_window,
    dtype_name,
)
from .ops import FP8_DTYPES

Tensor = torch.Tensor

__all__ = [
    "flash_attn_func",
    "flash_attn_varlen_func",
    "flash_attn_fp8_pertensor_func",
    "flash_attn_varlen_fp8_pertensor_func",
    "mha_fwd",
    "mha_varlen_fwd",
    "mha_bwd",
    "mha_varlen_bwd",
]

HIGH_PRECISION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
SCORE_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256


# -- shared checks ------------------------------------------------------------------------------


def _check_qkv(q, k, v, *, layout: str, dtypes: Sequence[torch.dtype], paged: bool = False) -> None:
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    if layout == "bshd":
        check_ndim("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
        check_ndim("k", k, 4, "(batch, seqlen_k, heads_kv, head_dim)")
        check_ndim("v", v, 4, "(batch, seqlen_k, heads_kv, head_dim_v)")
    else:
        check_ndim("q", q, 3, "(total_q, heads_q, head_dim)")
        kv_ndim = 4 if paged else 3
        kv_layout = "(num_blocks, page_block_size, heads_kv, head_dim) paged cache" if paged else "(total_k, heads_kv, head_dim)"
        check_ndim("k", k, kv_ndim, kv_layout)
        check_ndim("v", v, kv_ndim, kv_layout)
    if q.dtype in FP8_DTYPES and not any(d in FP8_DTYPES for d in dtypes):
        raise TypeError(
            f"q must have dtype {'/'.join(dtype_name(d) for d in dtypes)}, got {dtype_name(q.dtype)} "
            "(fp8 inputs go through flash_attn_fp8_pertensor_func / flash_attn_varlen_fp8_pertensor_func)"
        )
    check_dtype("q", q, dtypes)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(q.dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
    check_same_device("q", q, k=k, v=v)
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, x)
    dim_qk, dim_v = q.shape[-1], v.shape[-1]
    if k.shape[-1] != dim_qk:
        raise ValueError(f"k must have head dim {dim_qk} (the head dim of q), got {k.shape[-1]}")
    check_head_dims(dim_qk, dim_v, minimum=MIN_HEAD_DIM, maximum=MAX_HEAD_DIM)
    check_gqa(q.shape[-2], k.shape[-2])
    if v.shape[-2] != k.shape[-2]:
        raise ValueError(f"v must have {k.shape[-2]} heads (the heads of k), got {v.shape[-2]}")
    if layout == "bshd":
        if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
            bad, got = ("k", k) if k.shape[0] != q.shape[0] else ("v", v)
            raise ValueError(f"{bad} must have batch size {q.shape[0]} (the batch of q), got {got.shape[0]}")
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v must have seqlen {k.shape[1]} (the seqlen of k), got {v.shape[1]}")
    elif v.shape[:-1] != k.shape[:-1]:
        raise ValueError(f"v must have leading dims {tuple(k.shape[:-1])} (those of k), got {tuple(v.shape[:-1])}")


def _softmax_scale(softmax_scale, dim_qk: int) -> float:
    if softmax_scale is None:
        return dim_qk ** -0.5
    return check_float("softmax_scale", softmax_scale)


def _window(window_size, causal: bool, seqlen_k: int) -> tuple[int, int, int]:
    """Normalised (left, right, sink_size): values >= seqlen_k mean unbounded; causal => right 0."""
    left, right, sink_size = check_window("window_size", window_size)
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    return left, right, sink_size


def _check_dropout(dropout_p) -> float:
    return check_float("dropout_p", dropout_p, minimum=0.0, below=1.0)


def _check_bias(bias, q, rows: int, cols: int, what: str) -> None:
    if bias is None:
        return
    check_tensor("bias", bias)
    check_dtype("bias", bias, SCORE_BIAS_DTYPES)
    check_same_device("q", q, bias=bias)
    check_shape("bias", bias, (rows, cols), what)
    check_last_dim_contiguous("bias", bias)


def _check_alibi(alibi_slopes, q, batch: int, heads_q: int) -> None:
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    check_dtype("alibi_slopes", alibi_slopes, (torch.float32,))
    check_same_device("q", q, alibi_slopes=alibi_slopes)
    if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}")
    check_last_dim_contiguous("alibi_slopes", alibi_slopes)


def _check_sink(sink, q, heads_q: int, name: str = "sink_ptr") -> None:
    if sink is None:
        return
    check_tensor(name, sink)
    check_dtype(name, sink, (torch.float32,))
    check_same_device("q", q, **{name: sink})
    check_shape(name, sink, (heads_q,), "(heads_q,)")
    if sink.stride(0) != 1 and heads_q > 1:
        raise ValueError(f"{name} must be a contiguous tensor, got stride {sink.stride(0)}")


def _check_descale(name: str, descale, q, batch: int, heads_kv: int) -> None:
    check_tensor(name, descale)
    check_dtype(name, descale, (torch.float32,))
    check_same_device("q", q, **{name: descale})
    if tuple(descale.shape) not in ((1,), (batch, heads_kv)):
        raise ValueError(f"{name} must have shape (1,) or ({batch}, {heads_kv}), got {tuple(descale.shape)}")


def _check_softcap(logits_soft_cap) -> float:
    return check_float("logits_soft_cap", logits_soft_cap, minimum=0.0)


def _check_out(out, q, shape, dtype) -> None:
    if out is None:
        return
    check_tensor("out", out)
    if out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype_name(dtype)}, got {dtype_name(out.dtype)}")
    check_same_device("q", q, out=out)
    check_shape("out", out, shape)
    check_last_dim_contiguous("out", out)


def _cu_seqlens(name: str, cu, batch: int | None, device) -> Tensor | None:
    if cu is None:
        return None
    check_tensor(name, cu)
    if cu.dtype == torch.int64:  # accepted on the batch API, like upstream; the kernels read int32
        cu = cu.to(torch.int32)
    if batch is None:
        check_int32_vector(name, cu, device=device)
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must have at least 2 entries (batch + 1), got {cu.shape[0]}")
    else:
        check_int32_vector(name, cu, batch + 1, device=device)
    return cu


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _result(out, lse, s_dmask, return_lse: bool, return_attn_probs: bool):
    result = [out]
    if return_lse:
        result.append(lse)
    if return_attn_probs:
        result.append(s_dmask)
    return result[0] if len(result) == 1 else tuple(result)


def _rng_from_generator(gen, dropout_p: float, device) -> Tensor | None:
    if dropout_p <= 0 or gen is None:
        return None  # the op draws from the default generator itself
    seed = torch.randint(1, 2**62, (1,), dtype=torch.int64, device=device, generator=gen)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])


# -- autograd -----------------------------------------------------------------------------------


def _distinct(*tensors):
    """Alias repeated tensors (q is k, cu_seqlens_q is cu_seqlens_k) through views: dynamo cannot
    trace autograd.Function.apply with one tensor in two input slots. Views cost nothing."""
    seen = set()
    result = []
    for t in tensors:
        if t is not None and id(t) in seen:
            t = t.view_as(t)
        elif t is not None:
            seen.add(id(t))
        result.append(t)
    return result


class _FlashAttnFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_kv, dropout_p, softmax_scale, causal,
                window_left, window_right, sink_size, logits_soft_cap, deterministic, return_attn_probs, backend):
        out, lse, s_dmask, rng_state = torch.ops.aiter.mha_fwd(
            q, k, v, dropout_p, softmax_scale, causal, window_left, window_right, sink_size, True, return_attn_probs,
            cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, bias=bias, alibi_slopes=alibi_slopes,
            sink_ptr=sink, logits_soft_cap=logits_soft_cap, backend=backend,
        )
        ctx.save_for_backward(q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_kv)
        ctx.args = (dropout_p, softmax_scale, causal, window_left, window_right, deterministic, sink_size,
                    logits_soft_cap, backend)
        ctx.mark_non_differentiable(lse, s_dmask)
        return out, lse, s_dmask

    @staticmethod
    def backward(ctx, dout, _dlse, _ds_dmask):
        q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_q, cu_k = ctx.saved_tensors
        dropout_p, softmax_scale, causal, wl, wr, deterministic, sink_size, softcap, backend = ctx.args
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        want_dsink = sink is not None and ctx.needs_input_grad[5]
        dbias = torch.empty(bias.shape, dtype=torch.float32, device=q.device) if want_dbias else None
        d_sink = torch.empty(sink.shape, dtype=torch.float32, device=q.device) if want_dsink else None
        dq, dk, dv, _ = torch.ops.aiter.mha_bwd(
            dout.contiguous(), q, k, v, out, lse, dropout_p, softmax_scale, causal, wl, wr, deterministic,
            dbias=dbias, bias=bias, alibi_slopes=alibi_slopes, rng_state=rng_state, sink=sink, d_sink=d_sink,
            sink_size=sink_size, logits_soft_cap=softcap, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, backend=backend,
        )
        return (dq, dk, dv, dbias.to(bias.dtype) if want_dbias else None, None,
                d_sink.to(sink.dtype) if want_dsink else None) + (None,) * 12


class _FlashAttnVarlenFunc(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_k, cu_seqlens_q_padded,
                cu_seqlens_k_padded, block_table, out, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p,
                softmax_scale, logits_soft_cap, causal, window_left, window_right, sink_size, deterministic,
                return_attn_probs, backend):
        o, lse, s_dmask, rng_state = torch.ops.aiter.mha_varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p, softmax_scale,
            logits_soft_cap, False, causal, window_left, window_right, sink_size, True, return_attn_probs, out=out,
            block_table=block_table, bias=bias, alibi_slopes=alibi_slopes, cu_seqlens_q_padded=cu_seqlens_q_padded,
            cu_seqlens_k_padded=cu_seqlens_k_padded, sink_ptr=sink, backend=backend,
        )
        if out is not None:
            o = out
            ctx.mark_dirty(out)
        ctx.save_for_backward(q, k, v, o, lse, rng_state, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_k,
                              cu_seqlens_q_padded, cu_seqlens_k_padded)
        ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_left, window_right,
                    deterministic, sink_size, logits_soft_cap, backend)
        ctx.mark_non_differentiable(lse, s_dmask)
        return o, lse, s_dmask

    @staticmethod
    def backward(ctx, dout, _dlse, _ds_dmask):
        (q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_q, cu_k, cu_q_pad, cu_k_pad) = ctx.saved_tensors
        max_q, max_k, dropout_p, softmax_scale, causal, wl, wr, deterministic, sink_size, softcap, backend = ctx.args
        want_dbias = bias is not None and ctx.needs_input_grad[3]
        want_dsink = sink is not None and ctx.needs_input_grad[5]
        dbias = torch.empty(bias.shape, dtype=torch.float32, device=q.device) if want_dbias else None
        d_sink = torch.empty(sink.shape, dtype=torch.float32, device=q.device) if want_dsink else None
        dq, dk, dv, _ = torch.ops.aiter.mha_varlen_bwd(
            dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, False, causal,
            wl, wr, deterministic, alibi_slopes=alibi_slopes, rng_state=rng_state, cu_seqlens_q_padded=cu_q_pad,
            cu_seqlens_k_padded=cu_k_pad, sink=sink, d_sink=d_sink, sink_size=sink_size, logits_soft_cap=softcap,
            bias=bias, dbias=dbias, backend=backend,
        )
        return (dq, dk, dv, dbias.to(bias.dtype) if want_dbias else None, None,
                d_sink.to(sink.dtype) if want_dsink else None) + (None,) * 19


# -- dense --------------------------------------------------------------------------------------


def _validate_dense(q, k, v, *, dtypes, dropout_p, softmax_scale, causal, window_size, bias, alibi_slopes, sink,
                    cu_seqlens_q, cu_seqlens_kv, logits_soft_cap, sink_name="sink_ptr"):
    _check_qkv(q, k, v, layout="bshd", dtypes=dtypes)
    batch, seqlen_q, heads_q, dim_qk = q.shape
    seqlen_k = k.shape[1]
    dropout_p = _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, dim_qk)
    check_bool("causal", causal)
    window = _window(window_size, causal, seqlen_k)
    _check_bias(bias, q, seqlen_q, seqlen_k, "(seqlen_q, seqlen_k)")
    _check_alibi(alibi_slopes, q, batch, heads_q)
    _check_sink(sink, q, heads_q, sink_name)
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, batch, q.device)
    cu_k = _cu_seqlens("cu_seqlens_kv", cu_seqlens_kv, batch, q.device)
    softcap = _check_softcap(logits_soft_cap)
    return dropout_p, scale, window, cu_q, cu_k, softcap


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
    dropout_p, scale, window, cu_q, cu_k, softcap = _validate_dense(
        q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, bias=bias, alibi_slopes=alibi_slopes, sink=sink_ptr, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_kv=cu_seqlens_kv, logits_soft_cap=logits_soft_cap,
    )
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    check_bool("return_attn_probs", return_attn_probs)
    if how_v3_bf16_cvt not in (0, 1, 2):
        raise ValueError(f"how_v3_bf16_cvt must be 0 (RTNE), 1 (RTNA) or 2 (RTZ), got {how_v3_bf16_cvt!r}")
    check_int("num_splits", num_splits, minimum=0)
    want_probs = return_attn_probs and dropout_p > 0
    q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k = _distinct(q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k)
    out, lse, s_dmask = _FlashAttnFunc.apply(
        q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k, dropout_p, scale, causal, window[0], window[1], window[2],
        softcap, deterministic, want_probs, backend,
    )
    return _result(out, lse, s_dmask, return_lse, return_attn_probs)


# -- varlen -------------------------------------------------------------------------------------


def _validate_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dtypes, min_seqlen_q,
                     dropout_p, softmax_scale, logits_soft_cap, causal, window_size, bias, alibi_slopes, block_table,
                     cu_seqlens_q_padded, cu_seqlens_k_padded, sink, sink_name="sink_ptr"):
    paged = block_table is not None
    _check_qkv(q, k, v, layout="thd", dtypes=dtypes, paged=paged)
    heads_q, dim_qk = q.shape[1], q.shape[2]
    cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, None, q.device)
    if cu_q is None:
        raise TypeError("cu_seqlens_q must be an int32 tensor of batch + 1 entries, got None")
    batch = cu_q.shape[0] - 1
    cu_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch, q.device)
    if cu_k is None:
        raise TypeError(f"cu_seqlens_k must be an int32 tensor of {batch + 1} entries, got None")
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, minimum=0)
    min_seqlen_q = check_int("min_seqlen_q", min_seqlen_q, minimum=0)
    dropout_p = _check_dropout(dropout_p)
    scale = _softmax_scale(softmax_scale, dim_qk)
    softcap = _check_softcap(logits_soft_cap)
    check_bool("causal", causal)
    window = _window(window_size, causal, max(max_seqlen_k, 1))
    _check_bias(bias, q, max_seqlen_q, max_seqlen_k, "(max_seqlen_q, max_seqlen_k)")
    _check_alibi(alibi_slopes, q, batch, heads_q)
    _check_sink(sink, q, heads_q, sink_name)
    pad_q = _cu_seqlens("cu_seqlens_q_padded", cu_seqlens_q_padded, batch, q.device)
    pad_k = _cu_seqlens("cu_seqlens_k_padded", cu_seqlens_k_padded, batch, q.device)
    if paged:
        check_tensor("block_table", block_table)
        if block_table.dtype != torch.int32:
            raise TypeError(f"block_table must have dtype int32, got {dtype_name(block_table.dtype)}")
        check_ndim("block_table", block_table, 2, "(batch, max_blocks_per_seq)")
        if block_table.shape[0] != batch:
            raise ValueError(f"block_table must have {batch} rows (one per sequence), got {block_table.shape[0]}")
        check_same_device("q", q, block_table=block_table)
        check_last_dim_contiguous("block_table", block_table)
        if pad_q is not None or pad_k is not None:
            raise ValueError("cu_seqlens_q_padded / cu_seqlens_k_padded must be None with block_table (paged KV), got a tensor")
        if max_seqlen_k > block_table.shape[1] * k.shape[1]:
            raise ValueError(
                f"max_seqlen_k must be at most {block_table.shape[1] * k.shape[1]} (block_table columns x "
                f"page_block_size), got {max_seqlen_k}"
            )
    return cu_q, cu_k, pad_q, pad_k, dropout_p, scale, softcap, window, (max_seqlen_q, max_seqlen_k, min_seqlen_q)


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
    Dv)`` (written into ``out`` when given), plus ``softmax_lse (Hq, Tq)`` fp32 when
    ``return_lse``, plus ``S_dmask (Hq, Tq, max_seqlen_k)`` when ``return_attn_probs``.
    """
    cu_q, cu_k, pad_q, pad_k, dropout_p, scale, softcap, window, lengths = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
        min_seqlen_q=min_seqlen_q, dropout_p=dropout_p, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        causal=causal, window_size=window_size, bias=bias, alibi_slopes=alibi_slopes, block_table=block_table,
        cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink_ptr,
    )
    max_seqlen_q, max_seqlen_k, min_seqlen_q = lengths
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    check_bool("return_attn_probs", return_attn_probs)
    if how_v3_bf16_cvt not in (0, 1, 2):
        raise ValueError(f"how_v3_bf16_cvt must be 0 (RTNE), 1 (RTNA) or 2 (RTZ), got {how_v3_bf16_cvt!r}")
    _check_out(out, q, (q.shape[0], q.shape[1], v.shape[-1]), q.dtype)
    if block_table is not None and _needs_grad(q, k, v, bias, sink_ptr):
        raise ValueError("block_table must be None for inputs that require grad: paged KV is forward-only (use torch.no_grad())")
    want_probs = return_attn_probs and dropout_p > 0
    q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k, pad_q, pad_k = _distinct(
        q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k, pad_q, pad_k)
    o, lse, s_dmask = _FlashAttnVarlenFunc.apply(
        q, k, v, bias, alibi_slopes, sink_ptr, cu_q, cu_k, pad_q, pad_k, block_table, out, max_seqlen_q,
        max_seqlen_k, min_seqlen_q, dropout_p, scale, softcap, causal, window[0], window[1], window[2],
        deterministic, want_probs, backend,
    )
    return _result(o, lse, s_dmask, return_lse, return_attn_probs)


# -- fp8, already quantized (spec §1.5) ------------------------------------------------------------


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
    _, scale, window, _, _, _ = _validate_dense(
        q, k, v, dtypes=FP8_DTYPES, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
        window_size=window_size, bias=None, alibi_slopes=None, sink=sink_ptr, cu_seqlens_q=None, cu_seqlens_kv=None,
        logits_soft_cap=0.0,
    )
    batch, heads_kv = q.shape[0], k.shape[2]
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        _check_descale(name, d, q, batch, heads_kv)
    out, _, _, _ = torch.ops.aiter.mha_fwd(
        q, k, v, 0.0, scale, causal, window[0], window[1], window[2], False, False, q_descale=q_descale,
        k_descale=k_descale, v_descale=v_descale, sink_ptr=sink_ptr, backend=backend,
    )
    return out


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
    cu_q, cu_k, _, _, _, scale, softcap, window, lengths = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=FP8_DTYPES,
        min_seqlen_q=min_seqlen_q, dropout_p=0.0, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        causal=causal, window_size=window_size, bias=None, alibi_slopes=None, block_table=None,
        cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=sink_ptr,
    )
    max_seqlen_q, max_seqlen_k, min_seqlen_q = lengths
    batch, heads_kv = cu_q.shape[0] - 1, k.shape[1]
    for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
        _check_descale(name, d, q, batch, heads_kv)
    out, _, _, _ = torch.ops.aiter.mha_varlen_fwd(
        q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, 0.0, scale, softcap, False, causal,
        window[0], window[1], window[2], False, False, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
        sink_ptr=sink_ptr, backend=backend,
    )
    return out


# -- low-level ops with upstream's signatures (spec §1.3) --------------------------------------------

_ALL_INPUT_DTYPES = HIGH_PRECISION_DTYPES + FP8_DTYPES


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
    _, scale, window, cu_q, cu_k, softcap = _validate_dense(
        q, k, v, dtypes=_ALL_INPUT_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=is_causal,
        window_size=(window_size_left, window_size_right, sink_size), bias=bias, alibi_slopes=alibi_slopes,
        sink=sink_ptr, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, logits_soft_cap=logits_soft_cap,
    )
    batch, seqlen_q, heads_q, _ = q.shape
    _check_fp8_descales(q, q_descale, k_descale, v_descale, batch, k.shape[2])
    _check_low_level_out(out, q, (batch, seqlen_q, heads_q, v.shape[-1]))
    o, lse, p, rng = torch.ops.aiter.mha_fwd(
        q, k, v, float(dropout_p), scale, is_causal, window[0], window[1], window[2], return_softmax_lse,
        return_dropout_randval, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, out=out, bias=bias, alibi_slopes=alibi_slopes,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, sink_ptr=sink_ptr,
        rng_state=_rng_from_generator(gen, dropout_p, q.device), logits_soft_cap=softcap, backend=backend,
    )
    return (out if out is not None else o), lse, p, rng


def _check_low_level_out(out, q, shape):
    """``out`` has q's dtype, or for fp8 inputs any of bf16/fp16/fp32 (bf16 by default)."""
    if out is None:
        return
    check_tensor("out", out)
    if q.dtype in FP8_DTYPES:
        check_dtype("out", out, (torch.bfloat16, torch.float16, torch.float32))
    _check_out(out, q, shape, out.dtype if q.dtype in FP8_DTYPES else q.dtype)


def _check_fp8_descales(q, q_descale, k_descale, v_descale, batch, heads_kv):
    given = [d is not None for d in (q_descale, k_descale, v_descale)]
    if q.dtype in FP8_DTYPES:
        for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            if d is None:
                raise TypeError(f"{name} must be a float32 tensor (1,) or ({batch}, {heads_kv}) for fp8 inputs, got None")
            _check_descale(name, d, q, batch, heads_kv)
    elif any(given):
        raise ValueError(f"q_descale/k_descale/v_descale must be None for {dtype_name(q.dtype)} inputs (descales apply to fp8 only), got a tensor")


def mha_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, min_seqlen_q: int,
                   dropout_p: float, softmax_scale: float, logits_soft_cap: float, zero_tensors: bool, is_causal: bool,
                   window_size_left: int, window_size_right: int, sink_size: int, return_softmax_lse: bool,
                   return_dropout_randval: bool, out=None, block_table=None, bias=None, alibi_slopes=None,
                   q_descale=None, k_descale=None, v_descale=None, gen=None, cu_seqlens_q_padded=None,
                   cu_seqlens_k_padded=None, sink_ptr=None, *, backend: Optional[str] = None):
    """Upstream ``mha_varlen_fwd``: returns ``(out, softmax_lse (Hq, Tq), p_randval, rng_state)``."""
    cu_q, cu_k, pad_q, pad_k, dropout_p, scale, softcap, window, lengths = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=_ALL_INPUT_DTYPES,
        min_seqlen_q=min_seqlen_q, dropout_p=dropout_p, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        causal=is_causal, window_size=(window_size_left, window_size_right, sink_size), bias=bias,
        alibi_slopes=alibi_slopes, block_table=block_table, cu_seqlens_q_padded=cu_seqlens_q_padded,
        cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink_ptr,
    )
    max_seqlen_q, max_seqlen_k, min_seqlen_q = lengths
    check_bool("zero_tensors", zero_tensors)
    _check_fp8_descales(q, q_descale, k_descale, v_descale, cu_q.shape[0] - 1, k.shape[-2])
    _check_low_level_out(out, q, (q.shape[0], q.shape[1], v.shape[-1]))
    o, lse, p, rng = torch.ops.aiter.mha_varlen_fwd(
        q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p, scale, softcap, zero_tensors,
        is_causal, window[0], window[1], window[2], return_softmax_lse, return_dropout_randval, out=out,
        block_table=block_table, bias=bias, alibi_slopes=alibi_slopes, q_descale=q_descale, k_descale=k_descale,
        v_descale=v_descale, rng_state=_rng_from_generator(gen, dropout_p, q.device), cu_seqlens_q_padded=pad_q,
        cu_seqlens_k_padded=pad_k, sink_ptr=sink_ptr, backend=backend,
    )
    return (out if out is not None else o), lse, p, rng


def _check_grad_buffers(q, k, v, dq, dk, dv):
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            continue
        check_tensor(name, buf)
        if buf.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(like.dtype)}, got {dtype_name(buf.dtype)}")
        check_same_device("q", q, **{name: buf})
        check_shape(name, buf, tuple(like.shape))
        check_last_dim_contiguous(name, buf)


def _check_bwd_tensors(dout, out, softmax_lse, q, v, lse_shape):
    check_tensor("dout", dout)
    check_tensor("out", out)
    check_tensor("softmax_lse", softmax_lse)
    out_shape = tuple(q.shape[:-1]) + (v.shape[-1],)
    check_shape("dout", dout, out_shape)
    check_shape("out", out, out_shape)
    for name, x in (("dout", dout), ("out", out)):
        if x.dtype != q.dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(q.dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
        check_last_dim_contiguous(name, x)
    check_dtype("softmax_lse", softmax_lse, (torch.float32,))
    check_shape("softmax_lse", softmax_lse, lse_shape)
    check_same_device("q", q, dout=dout, out=out, softmax_lse=softmax_lse)


def _check_extra_grad(name, buf, shape, q):
    if buf is None:
        return
    check_tensor(name, buf)
    check_dtype(name, buf, (torch.float32,))
    check_same_device("q", q, **{name: buf})
    check_shape(name, buf, shape)


def mha_bwd(dout, q, k, v, out, softmax_lse, dropout_p: float, softmax_scale: float, is_causal: bool,
            window_size_left: int, window_size_right: int, deterministic: bool, dq=None, dk=None, dv=None,
            dbias=None, bias=None, alibi_slopes=None, rng_state=None, gen=None, sink=None, d_sink=None, *,
            sink_size: int = 0, logits_soft_cap: float = 0.0, cu_seqlens_q=None, cu_seqlens_kv=None,
            backend: Optional[str] = None):
    """Upstream ``mha_bwd``: returns ``(dq, dk, dv, softmax_d (B, Hq, Sq) fp32)``.

    ``dbias`` ((Sq, Sk) fp32) and ``d_sink`` ((Hq,) fp32), when given, are filled in place.
    ``rng_state`` must be the one the forward returned when ``dropout_p > 0``; ``gen`` is unused.
    """
    dropout_p, scale, window, cu_q, cu_k, softcap = _validate_dense(
        q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale, causal=is_causal,
        window_size=(window_size_left, window_size_right, sink_size), bias=bias, alibi_slopes=alibi_slopes,
        sink=sink, cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, logits_soft_cap=logits_soft_cap,
        sink_name="sink",
    )
    check_bool("deterministic", deterministic)
    _check_bwd_tensors(dout, out, softmax_lse, q, v, (q.shape[0], q.shape[2], q.shape[1]))
    _check_grad_buffers(q, k, v, dq, dk, dv)
    _check_rng(rng_state, dropout_p, q)
    _check_extra_grad("dbias", dbias, (q.shape[1], k.shape[1]), q)
    _check_extra_grad("d_sink", d_sink, (q.shape[2],), q)
    if dbias is not None and bias is None:
        raise ValueError("dbias must be None when bias is None, got a tensor")
    if d_sink is not None and sink is None:
        raise ValueError("d_sink must be None when sink is None, got a tensor")
    gq, gk, gv, delta = torch.ops.aiter.mha_bwd(
        dout, q, k, v, out, softmax_lse, dropout_p, scale, is_causal, window[0], window[1], deterministic, dq=dq,
        dk=dk, dv=dv, dbias=dbias, bias=bias, alibi_slopes=alibi_slopes, rng_state=rng_state, sink=sink,
        d_sink=d_sink, sink_size=window[2], logits_soft_cap=softcap, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k,
        backend=backend,
    )
    return (dq if dq is not None else gq), (dk if dk is not None else gk), (dv if dv is not None else gv), delta


def _check_rng(rng_state, dropout_p, q):
    if dropout_p <= 0:
        return
    if rng_state is None:
        raise TypeError("rng_state must be the (2,) int64 tensor the forward returned (dropout_p > 0), got None")
    check_tensor("rng_state", rng_state)
    check_dtype("rng_state", rng_state, (torch.int64,))
    check_shape("rng_state", rng_state, (2,))
    check_same_device("q", q, rng_state=rng_state)


def mha_varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int,
                   dropout_p: float, softmax_scale: float, zero_tensors: bool, is_causal: bool, window_size_left: int,
                   window_size_right: int, deterministic: bool, dq=None, dk=None, dv=None, alibi_slopes=None,
                   rng_state=None, gen=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=None,
                   d_sink=None, *, sink_size: int = 0, logits_soft_cap: float = 0.0, bias=None, dbias=None,
                   backend: Optional[str] = None):
    """Upstream ``mha_varlen_bwd``: returns ``(dq, dk, dv, softmax_d (Hq, Tq) fp32)``."""
    cu_q, cu_k, pad_q, pad_k, dropout_p, scale, softcap, window, lengths = _validate_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
        min_seqlen_q=0, dropout_p=dropout_p, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        causal=is_causal, window_size=(window_size_left, window_size_right, sink_size), bias=bias,
        alibi_slopes=alibi_slopes, block_table=None, cu_seqlens_q_padded=cu_seqlens_q_padded,
        cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink, sink_name="sink",
    )
    max_seqlen_q, max_seqlen_k, min_seqlen_q = lengths
    check_bool("zero_tensors", zero_tensors)
    check_bool("deterministic", deterministic)
    _check_bwd_tensors(dout, out, softmax_lse, q, v, (q.shape[1], q.shape[0]))
    _check_grad_buffers(q, k, v, dq, dk, dv)
    _check_rng(rng_state, dropout_p, q)
    _check_extra_grad("dbias", dbias, (max_seqlen_q, max_seqlen_k), q)
    _check_extra_grad("d_sink", d_sink, (q.shape[1],), q)
    if dbias is not None and bias is None:
        raise ValueError("dbias must be None when bias is None, got a tensor")
    if d_sink is not None and sink is None:
        raise ValueError("d_sink must be None when sink is None, got a tensor")
    gq, gk, gv, delta = torch.ops.aiter.mha_varlen_bwd(
        dout, q, k, v, out, softmax_lse, cu_q, cu_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, zero_tensors,
        is_causal, window[0], window[1], deterministic, dq=dq, dk=dk, dv=dv, alibi_slopes=alibi_slopes,
        rng_state=rng_state, cu_seqlens_q_padded=pad_q, cu_seqlens_k_padded=pad_k, sink=sink, d_sink=d_sink,
        sink_size=window[2], logits_soft_cap=softcap, bias=bias, dbias=dbias, backend=backend,
    )
    return (dq if dq is not None else gq), (dk if dk is not None else gk), (dv if dv is not None else gv), delta
