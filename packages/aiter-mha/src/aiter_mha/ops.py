"""The ``aiter::`` MHA op table: one ``declare_op`` per op, its fake, and the autograd formulas.

Each op's schema is its checks function's signature (``checks.py``); its body is
``registry.run(op, checks.<op>(...))``, so ``torch.ops.aiter.<op>(...)`` called directly is
validated exactly like the public function. Differences from upstream forced by torch.library:

* ``gen`` (a ``torch.Generator``) cannot appear in an op schema: ``mha_fwd`` / ``mha_varlen_fwd``
  take ``rng_state`` ((2,) int64 seed/offset) in its place; ``api.mha_fwd`` keeps ``gen``.
* An op may not return an alias of its input: when ``out`` (``dq``/``dk``/``dv``) is passed, the
  op writes it (declared in ``mutates_args``) and returns a 0-element placeholder in that slot.
* An op with an autograd formula may not mutate its inputs: ``flash_attn_varlen_func``'s op is
  functional and the public function copies the result into ``out``.
* Tuples are lists in a schema (``window_size: List[int]``, None = (-1, -1, 0)), and the int form
  of ``flash_attn_with_kvcache``'s ``cache_seqlens`` travels as ``cache_seqlens_int``.

``fwd_shapes`` / ``fwd_result`` / ``bwd_result`` say what each op returns; the fakes, the Triton
launcher and the reference backend all use them, so the three agree by construction.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import Tensor

from aiter_core.ops import declare_op

from . import checks
from .checks import (
    FORM_KVCACHE,
    FORM_LOW_LEVEL,
    FORM_OUT,
    FORM_OUT_LSE,
    FORM_TRAINING,
    PACKED,
    BwdCall,
    FwdCall,
)

__all__ = ["OPS", "fwd_shapes", "fwd_result", "bwd_result", "empty", "arange", "rng_states", "mha_fwd", "mha_varlen_fwd", "mha_bwd",
           "mha_varlen_bwd", "flash_attn_func", "flash_attn_varlen_func", "flash_attn_fp8_pertensor_func",
           "flash_attn_varlen_fp8_pertensor_func", "flash_attn_fp8_func", "flash_attn_varlen_fp8_func",
           "flash_attn_with_kvcache"]

T4 = Tuple[Tensor, Tensor, Tensor, Tensor]
T2 = Tuple[Tensor, Tensor]


# -- what each op returns -----------------------------------------------------------------------


def fwd_shapes(call: FwdCall) -> tuple[tuple, tuple, tuple]:
    """(out, lse, S_dmask) shapes of a forward Call: bshd / thd out, (B, Hq, Sq) / (Hq, Tq) lse."""
    q = call.q
    heads_q, dim_v = q.shape[-2], call.v.shape[-1]
    if call.layout == PACKED:
        total_q = q.shape[0]
        return (total_q, heads_q, dim_v), (heads_q, total_q), (heads_q, total_q, call.max_seqlen_k)
    batch, seqlen_q = q.shape[0], q.shape[1]
    return (batch, seqlen_q, heads_q, dim_v), (batch, heads_q, seqlen_q), (batch, heads_q, seqlen_q, call.max_seqlen_k)


_EMPTIES: dict = {}


def empty(like: Tensor, dtype: torch.dtype = torch.float32, slot: int = 0) -> Tensor:
    """A 0-element tensor on ``like``'s device: output ``slot`` of an op when not asked for. One
    per (device, dtype, slot), shared by every call (outputs of one call stay distinct objects): it
    holds no data (no storage to write, nothing a CUDA graph or a stream could hold on to), and an
    allocation costs microseconds per slot."""
    key = (like.device, dtype, slot)
    t = _EMPTIES.get(key)
    if t is None:
        t = _EMPTIES[key] = torch.empty(0, dtype=dtype, device=like.device)
    return t


def _fresh_empty(like: Tensor, dtype: torch.dtype = torch.float32, slot: int = 0) -> Tensor:
    return like.new_empty(0, dtype=dtype)


_ARANGES: dict = {}


def arange(count: int, step: int, *, device: torch.device) -> Tensor:
    """int32 ``[0, step, 2 * step, ...]`` (``count`` entries) on ``device``: the row table of a
    contiguous KV cache, the sequence starts of a padded batch. Cached per (count, step, device):
    the kernels only read it. Not cached while a CUDA graph is being captured (the values would only
    exist after a replay)."""
    key = (count, step, device)
    t = _ARANGES.get(key)
    if t is None:
        t = torch.arange(count, dtype=torch.int32, device=device) * step
        if device.type != "cuda" or not torch.cuda.is_current_stream_capturing():
            if len(_ARANGES) > 512:
                _ARANGES.clear()
            _ARANGES[key] = t
    return t


def _draw_rng_state(device: torch.device) -> Tensor:
    # A device-side draw: inside CUDA-graph capture the generator's philox offset advances per
    # replay, so each replay gets a fresh seed and nothing syncs with the host.
    seed = torch.randint(1, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])


def rng_states(call: FwdCall, device: torch.device) -> tuple:
    """(dropout state the backend uses or None, state the op returns): without dropout, zeros for
    the low-level ops (upstream returns them), a 0-element placeholder for the training ops (their
    backward reads no state then) and None for the ops that return none; with dropout, a
    device-side draw when none was given, else a copy of the given one (an op cannot return its input)."""
    if call.dropout_p <= 0.0:
        if call.form == FORM_LOW_LEVEL:
            return None, torch.zeros(2, dtype=torch.int64, device=device)
        if call.form == FORM_TRAINING:
            return None, empty(call.q, torch.int64, 3)
        return None, None
    if call.rng_state is None:
        state = _draw_rng_state(device)
        return state, state
    return call.rng_state, call.rng_state.clone()


def fwd_result(call: FwdCall, out: Tensor, lse: Tensor, s_dmask, rng_state, empty=empty):
    """The op's outputs from the tensors a backend computed (``out`` is the caller's buffer when given)."""
    form = call.form
    if form == FORM_TRAINING:
        return out, lse, (s_dmask if call.return_dropout_mask else empty(out, torch.float32, 2)), rng_state
    if form == FORM_OUT:
        return out
    if form == FORM_OUT_LSE:
        return out, lse
    if form == FORM_KVCACHE:
        return out, lse  # flash_attn_with_kvcache returns lse only when asked
    return ((empty(out, out.dtype, 0) if call.out is not None else out),
            (lse if call.return_lse else empty(out, torch.float32, 1)),
            (s_dmask if call.return_dropout_mask else empty(out, torch.float32, 2)), rng_state)


def bwd_result(call: BwdCall, dq: Tensor, dk: Tensor, dv: Tensor, delta: Tensor, empty=empty):
    """(dq, dk, dv, softmax_d): a 0-element placeholder where the caller passed the buffer."""
    return (empty(dq, dq.dtype, 0) if call.dq is not None else dq, empty(dk, dk.dtype, 1) if call.dk is not None else dk,
            empty(dv, dv.dtype, 2) if call.dv is not None else dv, delta)


def _fake_fwd(check):
    def fake(*args, **kwargs):
        call = check(*args, **kwargs)
        q = call.q
        out_shape, lse_shape, dmask_shape = fwd_shapes(call)
        out = call.out if call.out is not None else q.new_empty(out_shape, dtype=call.out_dtype)
        lse = q.new_empty(lse_shape, dtype=torch.float32)
        s_dmask = q.new_empty(dmask_shape, dtype=torch.float32) if call.return_dropout_mask else None
        rng = q.new_empty(0 if call.form == FORM_TRAINING and call.dropout_p <= 0.0 else 2, dtype=torch.int64)
        return fwd_result(call, out, lse, s_dmask, rng, _fresh_empty)

    return fake


def _fake_bwd(*args, **kwargs):
    call = checks.mha_bwd(*args, **kwargs)
    return _fake_bwd_result(call)


def _fake_varlen_bwd(*args, **kwargs):
    return _fake_bwd_result(checks.mha_varlen_bwd(*args, **kwargs))


def _fake_bwd_result(call: BwdCall):
    q = call.q
    grads = [buf if buf is not None else torch.empty_like(like, memory_format=torch.contiguous_format)
             for buf, like in ((call.dq, q), (call.dk, call.k), (call.dv, call.v))]
    delta = q.new_empty(tuple(call.lse.shape), dtype=torch.float32)
    return bwd_result(call, *grads, delta, _fresh_empty)


# -- autograd formulas -----------------------------------------------------------------------------
# setup_context keeps the inputs as given (the backward op validates and normalises them again);
# the backward calls mha_bwd / mha_varlen_bwd. lse, S_dmask and rng_state are not differentiable.


def _window3(window_size) -> tuple[int, int, int]:
    if window_size is None:
        return -1, -1, 0
    return window_size[0], window_size[1], (window_size[2] if len(window_size) == 3 else 0)


def _scale_of(softmax_scale, q: Tensor) -> float:
    return q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale


def _extra_grad(t, wanted: bool):
    return torch.empty(t.shape, dtype=torch.float32, device=t.device) if wanted else None


def _as(grad, like):
    return grad.to(like.dtype) if grad is not None else None


def _dense_setup(ctx, inputs, output):
    (q, k, v, dropout_p, softmax_scale, causal, window_size, bias, alibi_slopes, deterministic, _, _, _,
     cu_seqlens_q, cu_seqlens_kv, sink, _, softcap, backend) = inputs
    out, lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_kv)
    ctx.args = (dropout_p, softmax_scale, causal, window_size, deterministic, softcap, backend)
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)


def _dense_backward(ctx, dout, _dlse, _ds_dmask, _drng):
    q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_q, cu_k = ctx.saved_tensors
    dropout_p, softmax_scale, causal, window_size, deterministic, softcap, backend = ctx.args
    left, right, sink_size = _window3(window_size)
    dbias = _extra_grad(bias, bias is not None and ctx.needs_input_grad[7])
    d_sink = _extra_grad(sink, sink is not None and ctx.needs_input_grad[15])
    dq, dk, dv, _ = mha_bwd(
        dout.contiguous(), q, k, v, out, lse, dropout_p, _scale_of(softmax_scale, q), causal, left, right,
        deterministic, None, None, None, dbias, bias, alibi_slopes, rng_state, sink, d_sink, sink_size, softcap,
        cu_q, cu_k, backend)
    return (dq, dk, dv, None, None, None, None, _as(dbias, bias), None, None, None, None, None, None, None,
            _as(d_sink, sink), None, None, None)


def _varlen_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, _, dropout_p, softmax_scale, softcap, causal,
     window_size, bias, alibi_slopes, deterministic, _, _, _, block_table, _, pad_q, pad_k, sink, backend) = inputs
    checks.check_paged_forward_only(block_table, True)
    out, lse, s_dmask, rng_state = output
    ctx.save_for_backward(q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_seqlens_q, cu_seqlens_k,
                          pad_q, pad_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size, deterministic, softcap,
                backend)
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)


def _varlen_backward(ctx, dout, _dlse, _ds_dmask, _drng):
    q, k, v, out, lse, rng_state, bias, alibi_slopes, sink, cu_q, cu_k, pad_q, pad_k = ctx.saved_tensors
    max_q, max_k, dropout_p, softmax_scale, causal, window_size, deterministic, softcap, backend = ctx.args
    left, right, sink_size = _window3(window_size)
    dbias = _extra_grad(bias, bias is not None and ctx.needs_input_grad[13])
    d_sink = _extra_grad(sink, sink is not None and ctx.needs_input_grad[23])
    dq, dk, dv, _ = mha_varlen_bwd(
        dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, _scale_of(softmax_scale, q), False,
        causal, left, right, deterministic, None, None, None, alibi_slopes, rng_state, pad_q, pad_k, sink, d_sink,
        sink_size, softcap, bias, dbias, backend)
    return ((dq, dk, dv) + (None,) * 10 + (_as(dbias, bias),) + (None,) * 9 + (_as(d_sink, sink), None))


def _fp8_setup(ctx, inputs, output):
    q, k, v, softmax_scale, causal, _, window_size, _, softcap, _, _, deterministic, _, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.args = (softmax_scale, causal, window_size, softcap, deterministic, backend)
    ctx.mark_non_differentiable(lse)


def _fp8_backward(ctx, dout, _dlse):
    """Straight-through: the high-precision backward on the unquantized q, k, v."""
    q, k, v, out, lse = ctx.saved_tensors
    softmax_scale, causal, window_size, softcap, deterministic, backend = ctx.args
    left, right, sink_size = _window3(window_size)
    dq, dk, dv, _ = mha_bwd(dout.contiguous(), q, k, v, out, lse, 0.0, _scale_of(softmax_scale, q), causal, left,
                            right, deterministic, None, None, None, None, None, None, None, None, None, sink_size,
                            softcap, None, None, backend)
    return (dq, dk, dv) + (None,) * 11


def _varlen_fp8_setup(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, _, softcap,
     deterministic, _, backend) = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
    ctx.args = (max_seqlen_q, max_seqlen_k, softmax_scale, causal, window_size, softcap, deterministic, backend)
    ctx.mark_non_differentiable(lse)


def _varlen_fp8_backward(ctx, dout, _dlse):
    q, k, v, out, lse, cu_q, cu_k = ctx.saved_tensors
    max_q, max_k, softmax_scale, causal, window_size, softcap, deterministic, backend = ctx.args
    left, right, sink_size = _window3(window_size)
    dq, dk, dv, _ = mha_varlen_bwd(dout.contiguous(), q, k, v, out, lse, cu_q, cu_k, max_q, max_k, 0.0,
                                   _scale_of(softmax_scale, q), False, causal, left, right, deterministic, None, None,
                                   None, None, None, None, None, None, None, sink_size, softcap, None, None, backend)
    return (dq, dk, dv) + (None,) * 12


# -- the op table ------------------------------------------------------------------------------------

mha_fwd = declare_op("mha_fwd", checks.mha_fwd, mutates_args=("out",), fake=_fake_fwd(checks.mha_fwd), returns=T4)
mha_varlen_fwd = declare_op("mha_varlen_fwd", checks.mha_varlen_fwd, mutates_args=("out",),
                            fake=_fake_fwd(checks.mha_varlen_fwd), returns=T4)
mha_bwd = declare_op("mha_bwd", checks.mha_bwd, mutates_args=("dq", "dk", "dv", "dbias", "d_sink"), fake=_fake_bwd,
                     returns=T4)
mha_varlen_bwd = declare_op("mha_varlen_bwd", checks.mha_varlen_bwd, mutates_args=("dq", "dk", "dv", "dbias", "d_sink"),
                            fake=_fake_varlen_bwd, returns=T4)
flash_attn_func = declare_op("flash_attn_func", checks.flash_attn_func, mutates_args=(),
                             fake=_fake_fwd(checks.flash_attn_func), returns=T4, autograd=(_dense_backward, _dense_setup))
flash_attn_varlen_func = declare_op("flash_attn_varlen_func", checks.flash_attn_varlen_func, mutates_args=(),
                                    fake=_fake_fwd(checks.flash_attn_varlen_func), returns=T4,
                                    autograd=(_varlen_backward, _varlen_setup))
flash_attn_fp8_pertensor_func = declare_op("flash_attn_fp8_pertensor_func", checks.flash_attn_fp8_pertensor_func,
                                           mutates_args=(), fake=_fake_fwd(checks.flash_attn_fp8_pertensor_func),
                                           returns=Tensor)
flash_attn_varlen_fp8_pertensor_func = declare_op(
    "flash_attn_varlen_fp8_pertensor_func", checks.flash_attn_varlen_fp8_pertensor_func, mutates_args=(),
    fake=_fake_fwd(checks.flash_attn_varlen_fp8_pertensor_func), returns=Tensor)
flash_attn_fp8_func = declare_op("flash_attn_fp8_func", checks.flash_attn_fp8_func, mutates_args=(),
                                 fake=_fake_fwd(checks.flash_attn_fp8_func), returns=T2,
                                 autograd=(_fp8_backward, _fp8_setup))
flash_attn_varlen_fp8_func = declare_op("flash_attn_varlen_fp8_func", checks.flash_attn_varlen_fp8_func, mutates_args=(),
                                        fake=_fake_fwd(checks.flash_attn_varlen_fp8_func), returns=T2,
                                        autograd=(_varlen_fp8_backward, _varlen_fp8_setup))
flash_attn_with_kvcache = declare_op("flash_attn_with_kvcache", checks.flash_attn_with_kvcache,
                                     mutates_args=("k_cache", "v_cache"), fake=_fake_fwd(checks.flash_attn_with_kvcache),
                                     returns=T2)

OPS = ("mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd", "flash_attn_func", "flash_attn_varlen_func",
       "flash_attn_fp8_pertensor_func", "flash_attn_varlen_fp8_pertensor_func", "flash_attn_fp8_func",
       "flash_attn_varlen_fp8_func", "flash_attn_with_kvcache")
