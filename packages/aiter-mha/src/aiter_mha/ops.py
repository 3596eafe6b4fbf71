"""The four low-level MHA ops as ``torch.ops.aiter.*`` custom ops, and their dispatch.

``torch.ops.aiter.mha_fwd``, ``mha_varlen_fwd``, ``mha_bwd`` and ``mha_varlen_bwd`` follow
upstream's compiled-op signatures (spec §1.3) with three differences forced by torch.library:

* ``gen`` (a ``torch.Generator``) cannot appear in an op schema. The ops take ``rng_state``
  ((2,) int64 seed/offset) instead, in the same position; the Python functions in
  :mod:`aiter_mha.api` keep ``gen`` and turn it into ``rng_state`` on the device.
* An op may not return a tensor that aliases an input. When ``out`` (or ``dq``/``dk``/``dv``)
  is passed, the op writes it in place (declared in ``mutates_args``) and returns a 0-element
  placeholder in that slot; the Python functions return the caller's tensor there.
* Trailing keyword arguments beyond upstream: ``logits_soft_cap`` (dense), ``sink_size`` and
  ``logits_soft_cap`` (backward), ``cu_seqlens_*`` (dense backward, batch padding), ``bias`` /
  ``dbias`` (varlen backward), ``seqlens_k`` (paged varlen) and ``backend`` (force a backend by
  name; None = automatic selection, see ``aiter_core.registry``).

Each op's body builds a :class:`aiter_core.Problem`, asks the registry for the implementation
(``triton`` or ``reference``) and calls it with the op's arguments as keywords. Results are
normalised here so every backend returns exactly what the fake implementation promises.
"""

# No `from __future__ import annotations`: register_op infers the schemas from real annotations.
from typing import Optional

import torch

from aiter_core.ops import register_op
from aiter_core.registry import Problem, dispatch

Tensor = torch.Tensor

__all__ = ["mha_fwd_op", "mha_varlen_fwd_op", "mha_bwd_op", "mha_varlen_bwd_op", "make_problem", "FP8_DTYPES"]

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)


def _out_dtype(q: Tensor, out: Optional[Tensor]) -> torch.dtype:
    if out is not None:
        return out.dtype
    return torch.bfloat16 if q.dtype in FP8_DTYPES else q.dtype


def make_problem(op: str, q: Tensor, k: Tensor, v: Tensor, **features) -> Problem:
    """What the backends' ``supports`` look at: device, dtype, head dims and features used."""
    return Problem(
        op=op,
        device=q.device,
        device_type=q.device.type,
        dtype=q.dtype,
        fp8=q.dtype in FP8_DTYPES,
        head_dim_qk=q.shape[-1],
        head_dim_v=v.shape[-1],
        heads_q=q.shape[-2],
        heads_kv=k.shape[-2],
        backward=op.endswith("_bwd"),
        **features,
    )


def _empty_f32(like: Tensor) -> Tensor:
    return torch.empty(0, dtype=torch.float32, device=like.device)


def _draw_rng_state(device: torch.device) -> Tensor:
    # A device-side draw: inside CUDA-graph capture the generator's philox offset advances per
    # replay, so each replay gets a fresh seed and nothing syncs with the host.
    seed = torch.randint(1, 2**62, (1,), dtype=torch.int64, device=device)
    return torch.cat([seed, torch.zeros(1, dtype=torch.int64, device=device)])


def _rng_out(rng_state: Optional[Tensor], dropout_p: float, device: torch.device) -> tuple[Optional[Tensor], Tensor]:
    """(state to hand the backend, state to return)."""
    if dropout_p <= 0.0:
        return None, torch.zeros(2, dtype=torch.int64, device=device)
    if rng_state is None:
        rng_state = _draw_rng_state(device)
        return rng_state, rng_state
    return rng_state, rng_state.clone()


def _place(result: Tensor, given: Optional[Tensor]) -> Tensor:
    """Copy into the caller's buffer when the backend wrote elsewhere; return the op's slot value."""
    if given is None:
        return result.contiguous()
    if result.data_ptr() != given.data_ptr() or result.stride() != given.stride():
        given.copy_(result.reshape(given.shape))
    return given.new_empty(0)


# -- mha_fwd ----------------------------------------------------------------------------------


def _mha_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    dropout_p: float,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    sink_size: int,
    return_softmax_lse: bool,
    return_dropout_randval: bool,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_kv: Optional[Tensor] = None,
    out: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    q_descale: Optional[Tensor] = None,
    k_descale: Optional[Tensor] = None,
    v_descale: Optional[Tensor] = None,
    sink_ptr: Optional[Tensor] = None,
    rng_state: Optional[Tensor] = None,
    logits_soft_cap: float = 0.0,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rng_in, rng_ret = _rng_out(rng_state, dropout_p, q.device)
    problem = make_problem(
        "mha_fwd", q, k, v, varlen=False, batch_padding=cu_seqlens_q is not None or cu_seqlens_kv is not None,
        paged=False, padded=False, dropout=dropout_p > 0, bias=bias is not None, alibi=alibi_slopes is not None,
        sink=sink_ptr is not None, softcap=logits_soft_cap > 0, window=(window_size_left, window_size_right, sink_size),
        deterministic=False, page_size=None,
    )
    impl = dispatch("mha_fwd", problem, backend=backend)
    o, lse, s_dmask = impl(
        q=q, k=k, v=v, dropout_p=dropout_p, softmax_scale=softmax_scale, is_causal=is_causal,
        window_size_left=window_size_left, window_size_right=window_size_right, sink_size=sink_size,
        return_softmax_lse=return_softmax_lse, return_dropout_randval=return_dropout_randval and dropout_p > 0,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv, out=out, bias=bias, alibi_slopes=alibi_slopes,
        q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, sink_ptr=sink_ptr, rng_state=rng_in,
        logits_soft_cap=logits_soft_cap,
    )
    lse = lse.contiguous() if return_softmax_lse else _empty_f32(q)
    s_dmask = s_dmask.contiguous() if (return_dropout_randval and dropout_p > 0) else _empty_f32(q)
    return _place(o, out), lse, s_dmask, rng_ret


def _mha_fwd_fake(q, k, v, dropout_p, softmax_scale, is_causal, window_size_left, window_size_right, sink_size,
                  return_softmax_lse, return_dropout_randval, cu_seqlens_q=None, cu_seqlens_kv=None, out=None,
                  bias=None, alibi_slopes=None, q_descale=None, k_descale=None, v_descale=None, sink_ptr=None,
                  rng_state=None, logits_soft_cap=0.0, backend=None):
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k, dim_v = k.shape[1], v.shape[-1]
    o = q.new_empty(0, dtype=out.dtype) if out is not None else q.new_empty((batch, seqlen_q, heads_q, dim_v), dtype=_out_dtype(q, None))
    lse = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32) if return_softmax_lse else _empty_f32(q)
    wants_mask = return_dropout_randval and dropout_p > 0
    s_dmask = q.new_empty((batch, heads_q, seqlen_q, seqlen_k), dtype=torch.float32) if wants_mask else _empty_f32(q)
    return o, lse, s_dmask, q.new_empty(2, dtype=torch.int64)


mha_fwd_op = register_op("mha_fwd", _mha_fwd, mutates_args=("out",), fake=_mha_fwd_fake)


# -- mha_varlen_fwd ---------------------------------------------------------------------------


def _mha_varlen_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Optional[Tensor],
    max_seqlen_q: int,
    max_seqlen_k: int,
    min_seqlen_q: int,
    dropout_p: float,
    softmax_scale: float,
    logits_soft_cap: float,
    zero_tensors: bool,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    sink_size: int,
    return_softmax_lse: bool,
    return_dropout_randval: bool,
    out: Optional[Tensor] = None,
    block_table: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    q_descale: Optional[Tensor] = None,
    k_descale: Optional[Tensor] = None,
    v_descale: Optional[Tensor] = None,
    rng_state: Optional[Tensor] = None,
    cu_seqlens_q_padded: Optional[Tensor] = None,
    cu_seqlens_k_padded: Optional[Tensor] = None,
    sink_ptr: Optional[Tensor] = None,
    seqlens_k: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    rng_in, rng_ret = _rng_out(rng_state, dropout_p, q.device)
    problem = make_problem(
        "mha_varlen_fwd", q, k, v, varlen=True, batch_padding=False, paged=block_table is not None,
        padded=cu_seqlens_q_padded is not None or cu_seqlens_k_padded is not None, dropout=dropout_p > 0,
        bias=bias is not None, alibi=alibi_slopes is not None, sink=sink_ptr is not None, softcap=logits_soft_cap > 0,
        window=(window_size_left, window_size_right, sink_size), deterministic=False,
        page_size=k.shape[1] if block_table is not None else None,
    )
    impl = dispatch("mha_varlen_fwd", problem, backend=backend)
    if zero_tensors and out is not None:
        out.zero_()
    o, lse, s_dmask = impl(
        q=q, k=k, v=v, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q,
        max_seqlen_k=max_seqlen_k, dropout_p=dropout_p, softmax_scale=softmax_scale, logits_soft_cap=logits_soft_cap,
        is_causal=is_causal, window_size_left=window_size_left, window_size_right=window_size_right,
        sink_size=sink_size, return_softmax_lse=return_softmax_lse,
        return_dropout_randval=return_dropout_randval and dropout_p > 0, out=out, block_table=block_table, bias=bias,
        alibi_slopes=alibi_slopes, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale, rng_state=rng_in,
        cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded, sink_ptr=sink_ptr,
        seqlens_k=seqlens_k,
    )
    lse = lse.contiguous() if return_softmax_lse else _empty_f32(q)
    s_dmask = s_dmask.contiguous() if (return_dropout_randval and dropout_p > 0) else _empty_f32(q)
    return _place(o, out), lse, s_dmask, rng_ret


def _mha_varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, min_seqlen_q, dropout_p,
                         softmax_scale, logits_soft_cap, zero_tensors, is_causal, window_size_left, window_size_right,
                         sink_size, return_softmax_lse, return_dropout_randval, out=None, block_table=None, bias=None,
                         alibi_slopes=None, q_descale=None, k_descale=None, v_descale=None, rng_state=None,
                         cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink_ptr=None, seqlens_k=None,
                         backend=None):
    total_q, heads_q, _ = q.shape
    dim_v = v.shape[-1]
    o = q.new_empty(0, dtype=out.dtype) if out is not None else q.new_empty((total_q, heads_q, dim_v), dtype=_out_dtype(q, None))
    lse = q.new_empty((heads_q, total_q), dtype=torch.float32) if return_softmax_lse else _empty_f32(q)
    wants_mask = return_dropout_randval and dropout_p > 0
    s_dmask = q.new_empty((heads_q, total_q, max_seqlen_k), dtype=torch.float32) if wants_mask else _empty_f32(q)
    return o, lse, s_dmask, q.new_empty(2, dtype=torch.int64)


mha_varlen_fwd_op = register_op("mha_varlen_fwd", _mha_varlen_fwd, mutates_args=("out",), fake=_mha_varlen_fwd_fake)


# -- mha_bwd ----------------------------------------------------------------------------------


def _store_extra_grads(dsink: Optional[Tensor], d_sink: Optional[Tensor], dbias_res: Optional[Tensor],
                       dbias: Optional[Tensor]) -> None:
    if d_sink is not None:
        if dsink is None:
            raise RuntimeError("d_sink: the backend returned no sink gradient")
        d_sink.copy_(dsink.reshape(d_sink.shape))
    if dbias is not None:
        if dbias_res is None:
            raise RuntimeError("dbias: the backend returned no bias gradient")
        dbias.copy_(dbias_res.reshape(dbias.shape))


def _mha_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    dropout_p: float,
    softmax_scale: float,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    deterministic: bool,
    dq: Optional[Tensor] = None,
    dk: Optional[Tensor] = None,
    dv: Optional[Tensor] = None,
    dbias: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    rng_state: Optional[Tensor] = None,
    sink: Optional[Tensor] = None,
    d_sink: Optional[Tensor] = None,
    sink_size: int = 0,
    logits_soft_cap: float = 0.0,
    cu_seqlens_q: Optional[Tensor] = None,
    cu_seqlens_kv: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = make_problem(
        "mha_bwd", q, k, v, varlen=False, batch_padding=cu_seqlens_q is not None or cu_seqlens_kv is not None,
        paged=False, padded=False, dropout=dropout_p > 0, bias=bias is not None, alibi=alibi_slopes is not None,
        sink=sink is not None, softcap=logits_soft_cap > 0, window=(window_size_left, window_size_right, sink_size),
        deterministic=deterministic, page_size=None,
    )
    impl = dispatch("mha_bwd", problem, backend=backend)
    gq, gk, gv, delta, dsink, dbias_res = impl(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, dropout_p=dropout_p, softmax_scale=softmax_scale,
        is_causal=is_causal, window_size_left=window_size_left, window_size_right=window_size_right,
        deterministic=deterministic, dq=dq, dk=dk, dv=dv, bias=bias, alibi_slopes=alibi_slopes,
        rng_state=rng_state, sink=sink, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
        cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
        compute_dsink=d_sink is not None, compute_dbias=dbias is not None,
    )
    _store_extra_grads(dsink, d_sink, dbias_res, dbias)
    return _place(gq, dq), _place(gk, dk), _place(gv, dv), delta.contiguous()


def _mha_bwd_fake(dout, q, k, v, out, softmax_lse, dropout_p, softmax_scale, is_causal, window_size_left,
                  window_size_right, deterministic, dq=None, dk=None, dv=None, dbias=None, bias=None, alibi_slopes=None,
                  rng_state=None, sink=None, d_sink=None, sink_size=0, logits_soft_cap=0.0, cu_seqlens_q=None,
                  cu_seqlens_kv=None, backend=None):
    batch, seqlen_q, heads_q, _ = q.shape

    def slot(given, like):
        return given.new_empty(0) if given is not None else torch.empty_like(like, memory_format=torch.contiguous_format)

    delta = q.new_empty((batch, heads_q, seqlen_q), dtype=torch.float32)
    return slot(dq, q), slot(dk, k), slot(dv, v), delta


mha_bwd_op = register_op(
    "mha_bwd", _mha_bwd, mutates_args=("dq", "dk", "dv", "dbias", "d_sink"), fake=_mha_bwd_fake
)


# -- mha_varlen_bwd ---------------------------------------------------------------------------


def _mha_varlen_bwd(
    dout: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    softmax_lse: Tensor,
    cu_seqlens_q: Tensor,
    cu_seqlens_k: Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    softmax_scale: float,
    zero_tensors: bool,
    is_causal: bool,
    window_size_left: int,
    window_size_right: int,
    deterministic: bool,
    dq: Optional[Tensor] = None,
    dk: Optional[Tensor] = None,
    dv: Optional[Tensor] = None,
    alibi_slopes: Optional[Tensor] = None,
    rng_state: Optional[Tensor] = None,
    cu_seqlens_q_padded: Optional[Tensor] = None,
    cu_seqlens_k_padded: Optional[Tensor] = None,
    sink: Optional[Tensor] = None,
    d_sink: Optional[Tensor] = None,
    sink_size: int = 0,
    logits_soft_cap: float = 0.0,
    bias: Optional[Tensor] = None,
    dbias: Optional[Tensor] = None,
    backend: Optional[str] = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = make_problem(
        "mha_varlen_bwd", q, k, v, varlen=True, batch_padding=False, paged=False,
        padded=cu_seqlens_q_padded is not None or cu_seqlens_k_padded is not None, dropout=dropout_p > 0,
        bias=bias is not None, alibi=alibi_slopes is not None, sink=sink is not None, softcap=logits_soft_cap > 0,
        window=(window_size_left, window_size_right, sink_size), deterministic=deterministic, page_size=None,
    )
    impl = dispatch("mha_varlen_bwd", problem, backend=backend)
    if zero_tensors:
        for buf in (dq, dk, dv):
            if buf is not None:
                buf.zero_()
    gq, gk, gv, delta, dsink, dbias_res = impl(
        dout=dout, q=q, k=k, v=v, out=out, softmax_lse=softmax_lse, cu_seqlens_q=cu_seqlens_q,
        cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, dropout_p=dropout_p,
        softmax_scale=softmax_scale, is_causal=is_causal, window_size_left=window_size_left,
        window_size_right=window_size_right, deterministic=deterministic, dq=dq, dk=dk, dv=dv,
        alibi_slopes=alibi_slopes, rng_state=rng_state, cu_seqlens_q_padded=cu_seqlens_q_padded,
        cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink, sink_size=sink_size, logits_soft_cap=logits_soft_cap,
        bias=bias, compute_dsink=d_sink is not None, compute_dbias=dbias is not None,
    )
    _store_extra_grads(dsink, d_sink, dbias_res, dbias)
    return _place(gq, dq), _place(gk, dk), _place(gv, dv), delta.contiguous()


def _mha_varlen_bwd_fake(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                         dropout_p, softmax_scale, zero_tensors, is_causal, window_size_left, window_size_right,
                         deterministic, dq=None, dk=None, dv=None, alibi_slopes=None, rng_state=None,
                         cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=None, d_sink=None, sink_size=0,
                         logits_soft_cap=0.0, bias=None, dbias=None, backend=None):
    total_q, heads_q, _ = q.shape

    def slot(given, like):
        return given.new_empty(0) if given is not None else torch.empty_like(like, memory_format=torch.contiguous_format)

    delta = q.new_empty((heads_q, total_q), dtype=torch.float32)
    return slot(dq, q), slot(dk, k), slot(dv, v), delta


mha_varlen_bwd_op = register_op(
    "mha_varlen_bwd", _mha_varlen_bwd, mutates_args=("dq", "dk", "dv", "dbias", "d_sink"), fake=_mha_varlen_bwd_fake
)
