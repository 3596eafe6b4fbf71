"""Triton launches of the MHA ops: a validated Call (``checks.py``) in, the op's outputs out.

``fwd(call)`` serves every forward op (dense, packed, paged, the padded batch of the dense API,
fp8, the KV-cache decode form), ``bwd(call)`` both backward ops. The kernels live in ``fwd.py``
and ``bwd.py``; their tile configs come from ``configs.py`` per Call key (cached), through
``aiter_core.configs.override`` (``AITER_MHA_FWD_CONFIG``, ``AITER_MHA_BWD_DKDV_CONFIG``,
``AITER_MHA_BWD_DQ_CONFIG``). Nothing here syncs with the host, so every launch can be captured
in a CUDA graph (dropout seeds are drawn on the device).

The keyword arguments of ``fwd`` / ``bwd`` (``config``, ``split_group``, ``dq_atomic``) are for
tests and tuning sweeps; the backends never pass them.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from aiter_core import configs as _configs
from aiter_core import env
from aiter_core.triton_utils import cdiv, install_compile_notice, launch, next_pow2

from ..checks import PACKED, PADDED_BATCH, PAGED_DENSE_Q, BwdCall, FwdCall, Key
from ..fp8 import quantize_call
from ..kvcache import prepare
from ..ops import arange, bwd_result, fwd_result, fwd_shapes, rng_states
from .bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .configs import TileConfig, bwd_configs, fwd_config
from .fwd import flash_fwd_kernel
from .masking import LOG2E, UNBOUNDED

__all__ = ["fwd", "bwd", "fwd_tiles", "bwd_tiles"]

install_compile_notice()

_FP8_KERNEL_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


@lru_cache(maxsize=None)
def _fwd_default(d_qk: int, d_v: int, fp8: bool, dropout: bool, window: bool, bias: bool) -> TileConfig:
    return fwd_config(d_qk, d_v, is_fp8=fp8, dropout=dropout, causal=window, has_bias=bias)


def fwd_tiles(key: Key) -> TileConfig:
    """The forward kernel's config for ``key`` (``AITER_MHA_FWD_CONFIG`` overrides fields)."""
    return _configs.override("mha_fwd", _fwd_default(key.head_dim_qk, key.head_dim_v, key.fp8, key.dropout,
                                                      key.window, key.bias))


def bwd_tiles(key: Key) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel config, dQ kernel config) for ``key`` (``AITER_MHA_BWD_DKDV_CONFIG`` /
    ``AITER_MHA_BWD_DQ_CONFIG`` override fields)."""
    cfg_kv, cfg_q = _bwd_default(key.head_dim_qk, key.head_dim_v, key.window)
    return _configs.override("mha_bwd_dkdv", cfg_kv), _configs.override("mha_bwd_dq", cfg_q)


@lru_cache(maxsize=None)
def _bwd_default(d_qk: int, d_v: int, window: bool) -> tuple[TileConfig, TileConfig]:
    return bwd_configs(d_qk, d_v, masked=window)


def _block_d(d: int) -> int:
    return max(16, next_pow2(d))


@lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132  # H100 SXM; only steers the launch shape under the interpreter


def _window_bounds(call, max_sk: int) -> tuple[bool, int, int, int]:
    """(has_window, left, right, sink_size) with UNBOUNDED for -1 (the checks normalised against the
    same key length; this also covers a key length of 0)."""
    left, right, sink_size = call.window_left, call.window_right, call.sink_size
    if left >= max_sk:
        left = -1
    if right >= max_sk:
        right = -1
    if call.causal:
        right = 0
    has_window = left >= 0 or right >= 0
    if left < 0:
        return has_window, UNBOUNDED, (UNBOUNDED if right < 0 else right), 0
    return has_window, left, (UNBOUNDED if right < 0 else right), sink_size


def _strides3(t: torch.Tensor, packed: bool) -> tuple:
    s = t.stride()
    return (0, s[0], s[1]) if packed else (s[0], s[1], s[2])


def _expand_descale(d, batch: int, heads_k: int) -> torch.Tensor:
    d = d.to(torch.float32)
    return d.reshape(1, 1).expand(batch, heads_k).contiguous() if d.numel() == 1 else d.reshape(batch, heads_k).contiguous()


# -- forward ----------------------------------------------------------------------------------------


def fwd(call: FwdCall, config: TileConfig | None = None):
    """Run a forward op's Call; returns the op's outputs (``ops.fwd_result``)."""
    return fwd_result(call, *_fwd(call, config))


def _fwd(call: FwdCall, config: TileConfig | None):
    """(out, lse, S_dmask or None, rng_state to return) of a forward Call."""
    if call.layout == PADDED_BATCH:
        return _padded_batch_fwd(call, config)
    q, k, v = call.q, call.k, call.v
    q_descale, k_descale, v_descale = call.q_descale, call.k_descale, call.v_descale
    seqlens_k, block_table = call.seqlens_k, call.block_table
    if call.quantize:
        q, k, v, q_descale, k_descale, v_descale = quantize_call(call)
    elif call.layout == PAGED_DENSE_Q:
        q, seqlens_k, block_table = prepare(call)
    device = q.device
    out_shape, lse_shape, dmask_shape = fwd_shapes(call)
    out = call.out
    if out is None:
        alloc = torch.zeros if (call.quantize and call.layout == PACKED) else torch.empty  # rows between sequences
        out = alloc(out_shape, dtype=call.out_dtype, device=device)
    elif call.zero_tensors:
        out.zero_()
    lse = torch.empty(lse_shape, dtype=torch.float32, device=device)
    s_dmask = torch.zeros(dmask_shape, dtype=torch.float32, device=device) if call.return_dropout_mask else None
    rng_in, rng_out = rng_states(call, device)
    _launch_fwd(call, q, k, v, out, lse, s_dmask, rng_in, seqlens_k, block_table, q_descale, k_descale, v_descale,
                config)
    return out, lse, s_dmask, rng_out


def _launch_fwd(call: FwdCall, q, k, v, out, lse, s_dmask, rng_state, seqlens_k, block_table, q_descale, k_descale,
                v_descale, config):
    packed = call.layout == PACKED
    paged = call.key.paged
    qs, ks = q.shape, k.shape
    batch, max_sq, max_sk = call.batch, call.max_seqlen_q, call.max_seqlen_k
    heads_q, d_qk, d_v = qs[-2], qs[-1], v.shape[-1]
    cfg = config or fwd_tiles(call.key)
    block_m = cfg.BLOCK_M
    if max_sq == 0 or heads_q == 0 or batch == 0:  # nothing to compute (no queries, heads or sequences)
        return
    q_st, k_st, v_st, o_st = q.stride(), k.stride(), v.stride(), out.stride()
    if packed:
        q_strides, o_strides, seqlen_q_dense, dmask_rows = (0, q_st[0], q_st[1]), (0, o_st[0], o_st[1]), 0, qs[0]
        l_strides = (0, *lse.stride())
    else:
        q_strides, o_strides, seqlen_q_dense, dmask_rows = q_st[:3], o_st[:3], qs[1], max_sq
        l_strides = lse.stride()
    num_logical_blocks = num_physical_blocks = 0
    if paged:
        heads_k, page_size, seqlen_k_dense = ks[2], ks[1], 0
        k_strides, v_strides = k_st[:3], v_st[:3]
        k_len_mode = 2 if seqlens_k is not None else 1
        num_logical_blocks, num_physical_blocks = block_table.shape[1], ks[0]
    elif packed:
        heads_k, page_size, seqlen_k_dense, k_len_mode = ks[1], 1, 0, 1
        k_strides, v_strides = (0, k_st[0], k_st[1]), (0, v_st[0], v_st[1])
    else:
        heads_k, page_size, seqlen_k_dense, k_len_mode = ks[2], 1, ks[1], 0
        k_strides, v_strides = k_st[:3], v_st[:3]
    d_strides = (0, 0, 0) if s_dmask is None else _strides3(s_dmask, packed)
    has_window, win_left, win_right, sink_size = _window_bounds(call, max_sk)
    softcap, scale = call.softcap, call.softmax_scale
    has_softcap = softcap > 0.0
    is_fp8 = q.dtype in _FP8_KERNEL_DTYPES
    dummy = q
    if is_fp8:
        qd = _expand_descale(q_descale, batch, heads_k)
        kd = _expand_descale(k_descale, batch, heads_k)
        vd = _expand_descale(v_descale, batch, heads_k)
    else:
        qd = kd = vd = dummy
    bias, alibi, sink = call.bias, call.alibi_slopes, call.sink
    stride_ab = 0
    if alibi is not None:
        alibi = alibi.contiguous()
        stride_ab = alibi.stride(0) if alibi.dim() == 2 else 0
    has_dropout = call.dropout_p > 0.0
    cu_q, cu_k = call.cu_seqlens_q, call.cu_seqlens_k
    st_q, st_k = call.seqstart_q, call.seqstart_k
    launch(flash_fwd_kernel, (cdiv(max_sq, block_m), heads_q, batch),
        q, k, v, out, lse, s_dmask if s_dmask is not None else dummy,
        *q_strides, *k_strides, *v_strides, *o_strides, *l_strides, *d_strides,
        cu_q if cu_q is not None else dummy,
        cu_k if cu_k is not None else dummy,
        st_q if st_q is not None else cu_q if cu_q is not None else dummy,
        st_k if st_k is not None else cu_k if cu_k is not None else dummy,
        seqlens_k if seqlens_k is not None else dummy,
        block_table if block_table is not None else dummy,
        block_table.stride(0) if block_table is not None else 0, page_size, num_logical_blocks, num_physical_blocks,
        alibi if alibi is not None else dummy, stride_ab,
        bias if bias is not None else dummy, bias.stride(0) if bias is not None else 0,
        sink if sink is not None else dummy,
        qd, kd, vd,
        rng_state if has_dropout else dummy, call.dropout_p,
        seqlen_q_dense, seqlen_k_dense, dmask_rows, max_sk,
        heads_q, heads_q // heads_k, heads_k,
        scale * LOG2E, scale / softcap if has_softcap else 0.0, softcap * LOG2E if has_softcap else 0.0,
        win_left, win_right, sink_size,
        # the constexprs, in the kernel's order (positional: no keyword dict per launch)
        d_qk, d_v, block_m, cfg.BLOCK_N, _block_d(d_qk), _block_d(d_v),
        packed, st_q is not None or st_k is not None, k_len_mode, paged, has_window, win_left != UNBOUNDED,
        has_softcap, bias is not None, alibi is not None, sink is not None, has_dropout, s_dmask is not None,
        True, is_fp8, has_window,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )


def _pack(x: torch.Tensor) -> torch.Tensor:
    """(B, S, H, D) -> (B*S, H, D); a view when the batch and sequence dims are mergeable."""
    return x.reshape(x.shape[0] * x.shape[1], *x.shape[2:])


def _padded_batch(call, batch: int, seqlen_q: int, seqlen_k: int, device):
    """(cu_q, cu_k, starts_q, starts_k) of a dense batch run as padded varlen: logical lengths as
    given (full length where not), physical starts every seqlen rows."""
    starts_q = arange(batch + 1, seqlen_q, device=device)
    starts_k = arange(batch + 1, seqlen_k, device=device)
    cu_q = starts_q if call.cu_seqlens_q is None else call.cu_seqlens_q
    cu_k = starts_k if call.cu_seqlens_k is None else call.cu_seqlens_k
    return cu_q, cu_k, starts_q, starts_k


def _padded_batch_fwd(call: FwdCall, config):
    """Per-batch logical lengths inside a padded bshd batch: run as padded varlen."""
    q, k, v = call.q, call.k, call.v
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    cu_q, cu_k, starts_q, starts_k = _padded_batch(call, batch, seqlen_q, seqlen_k, q.device)
    # rows past each sequence's length are never written: zeros
    o_packed = torch.zeros(batch * seqlen_q, heads_q, v.shape[-1], dtype=call.out_dtype, device=q.device)
    packed = call._replace(q=_pack(q), k=_pack(k), v=_pack(v), out=o_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           seqstart_q=starts_q, seqstart_k=starts_k, layout=PACKED, zero_tensors=False)
    o_packed, lse, s_dmask, rng = _fwd(packed, config)
    out = o_packed.reshape(batch, seqlen_q, heads_q, -1)
    if call.out is not None:
        call.out.copy_(out)
        out = call.out
    lse = lse.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()
    past = torch.arange(seqlen_q, device=lse.device)[None, :] >= (cu_q[1:] - cu_q[:-1]).to(torch.int64)[:, None]
    lse = lse.masked_fill(past[:, None, :], float("-inf"))
    if s_dmask is not None:
        s_dmask = s_dmask.reshape(heads_q, batch, seqlen_q, -1).permute(1, 0, 2, 3).contiguous()
    return out, lse, s_dmask, rng


# -- backward ---------------------------------------------------------------------------------------


def bwd(call: BwdCall, config: tuple[TileConfig | None, TileConfig | None] | None = None,
        split_group: bool | None = None, dq_atomic: bool | None = None):
    """Run a backward op's Call: fills ``dbias`` / ``d_sink`` when given; returns (dq, dk, dv, softmax_d).

    ``split_group`` (GQA): None picks by occupancy; True = one dK/dV program per query head plus a
    sum over the group, False = one program per kv head looping over its group. ``dq_atomic``
    (only with deterministic=False; None reads ``AITER_MHA_DQ_ATOMIC``, default off): the dK/dV
    kernel also accumulates dQ with fp32 atomics and the dQ kernel is skipped (fewer matmuls, not
    bitwise reproducible). ``config``: (dK/dV config, dQ config), either may be None.
    """
    if call.zero_tensors:
        for buf in (call.dq, call.dk, call.dv):
            if buf is not None:
                buf.zero_()
    if call.layout == PADDED_BATCH:
        dq, dk, dv, delta, dsink, dbias = _padded_batch_bwd(call, config, split_group, dq_atomic)
    else:
        dq, dk, dv, delta, dsink, dbias = _bwd(call, call.dq, call.dk, call.dv, config, split_group, dq_atomic)
    if call.d_sink is not None:
        call.d_sink.copy_(dsink)
    if call.dbias is not None:
        call.dbias.copy_(dbias)
    return bwd_result(call, dq, dk, dv, delta)


def _padded_batch_bwd(call: BwdCall, config, split_group, dq_atomic):
    q, k, v = call.q, call.k, call.v
    batch, seqlen_q, heads_q, _ = q.shape
    seqlen_k = k.shape[1]
    cu_q, cu_k, starts_q, starts_k = _padded_batch(call, batch, seqlen_q, seqlen_k, q.device)
    # padding rows/keys are never touched by the kernels: start from zeros so they get zero gradients
    gq = torch.zeros(batch * seqlen_q, *q.shape[2:], dtype=q.dtype, device=q.device)
    gk = torch.zeros(batch * seqlen_k, *k.shape[2:], dtype=k.dtype, device=q.device)
    gv = torch.zeros(batch * seqlen_k, *v.shape[2:], dtype=v.dtype, device=q.device)
    lse_packed = call.lse.permute(1, 0, 2).reshape(heads_q, batch * seqlen_q).contiguous()
    packed = call._replace(dout=_pack(call.dout), q=_pack(q), k=_pack(k), v=_pack(v), out=_pack(call.out),
                           lse=lse_packed, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, seqstart_q=starts_q,
                           seqstart_k=starts_k, layout=PACKED)
    gq, gk, gv, delta, dsink, dbias = _bwd(packed, gq, gk, gv, config, split_group, dq_atomic)
    delta = delta.reshape(heads_q, batch, seqlen_q).permute(1, 0, 2).contiguous()
    grads = []
    for given, g, like in ((call.dq, gq, q), (call.dk, gk, k), (call.dv, gv, v)):
        g = g.reshape(like.shape)
        if given is not None:
            given.copy_(g)
            g = given
        grads.append(g)
    return (*grads, delta, dsink, dbias)


def _bwd(call: BwdCall, dq, dk, dv, config, split_group, dq_atomic):
    """Gradients of one (dense or packed) backward Call: (dq, dk, dv, delta, dsink or None, dbias or None)."""
    q, k, v, do, out, lse = call.q, call.k, call.v, call.dout, call.out, call.lse
    varlen = call.layout == PACKED
    qs, ks = q.shape, k.shape
    batch, max_sq, max_sk = call.batch, call.max_seqlen_q, call.max_seqlen_k
    heads_q, d_qk, d_v = qs[-2], qs[-1], v.shape[-1]
    heads_k = ks[-2]
    group = heads_q // heads_k
    has_seqstart = call.seqstart_q is not None or call.seqstart_k is not None
    dev = q.device
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    # rows outside every sequence (padded varlen) are not written by the kernels: zero them
    if varlen and has_seqstart:
        dq.zero_()
        dk.zero_()
        dv.zero_()
    delta = torch.zeros_like(lse) if has_seqstart else torch.empty_like(lse)
    sink, bias = call.sink, call.bias
    compute_dbias = call.dbias is not None
    if batch == 0 or heads_q == 0 or max_sq == 0 or max_sk == 0:
        # no query or no key anywhere: every gradient is zero
        for t in (dq, dk, dv, delta):
            t.zero_()
        dsink = torch.zeros((heads_q,), dtype=torch.float32, device=dev) if sink is not None else None
        dbias = torch.zeros(tuple(bias.shape[-2:]), dtype=torch.float32, device=dev) if compute_dbias else None
        return dq, dk, dv, delta, dsink, dbias
    if varlen:
        q_strides, k_strides, v_strides = _strides3(q, True), _strides3(k, True), _strides3(v, True)
        l_strides = (0, lse.stride(0), lse.stride(1))
        seqlen_q_dense = seqlen_k_dense = 0
        dmask_rows = qs[0]
    else:
        q_strides, k_strides, v_strides = _strides3(q, False), _strides3(k, False), _strides3(v, False)
        l_strides = lse.stride()
        seqlen_q_dense, seqlen_k_dense = qs[1], ks[1]
        dmask_rows = max_sq
    dmask_cols = max_sk
    dummy = q
    cu_q = call.cu_seqlens_q if call.cu_seqlens_q is not None else dummy
    cu_k = call.cu_seqlens_k if call.cu_seqlens_k is not None else dummy
    st_q = call.seqstart_q if call.seqstart_q is not None else cu_q
    st_k = call.seqstart_k if call.seqstart_k is not None else cu_k
    block_dqk, block_dv = _block_d(d_qk), _block_d(d_v)

    pre_block = 64
    num_pre = cdiv(max_sq, pre_block)
    sink_partial = torch.zeros((batch, heads_q, num_pre), dtype=torch.float32, device=dev) if sink is not None else None
    launch(bwd_preprocess_kernel, (num_pre, heads_q, batch),
        out, do, lse, delta, sink if sink is not None else dummy,
        sink_partial if sink_partial is not None else dummy,
        *_strides3(out, varlen), *_strides3(do, varlen), *l_strides,
        cu_q, st_q, seqlen_q_dense, heads_q,
        D_V=d_v, BLOCK_M=pre_block, BLOCK_DV=block_dv, IS_VARLEN=varlen,
        HAS_SEQSTART=has_seqstart, HAS_SINK=sink is not None, num_warps=4,
    )
    dsink = -sink_partial.sum(dim=(0, 2)) if sink is not None else None

    has_window, win_left, win_right, sink_size = _window_bounds(call, max_sk)
    softcap, scale = call.softcap, call.softmax_scale
    has_softcap = softcap > 0.0
    has_dropout = call.dropout_p > 0.0
    softcap_inv_scale = scale / softcap if has_softcap else 0.0
    softcap_log2 = softcap * LOG2E if has_softcap else 0.0
    alibi = call.alibi_slopes
    stride_ab = 0
    if alibi is not None:
        alibi = alibi.contiguous()
        stride_ab = alibi.stride(0) if alibi.dim() == 2 else 0

    dbias_buf = None
    dbias_mode = 0
    if compute_dbias:
        bias_shape = tuple(bias.shape[-2:])
        if call.deterministic:
            dbias_mode = 2
            dbias_buf = torch.zeros((batch * heads_q, *bias_shape), dtype=torch.float32, device=dev)
        else:
            dbias_mode = 1
            dbias_buf = torch.zeros(bias_shape, dtype=torch.float32, device=dev)
    cfg_kv, cfg_q = bwd_tiles(call.key)
    if config is not None:
        cfg_kv, cfg_q = config[0] or cfg_kv, config[1] or cfg_q

    common_flags = dict(D_QK=d_qk, D_V=d_v, BLOCK_DQK=block_dqk, BLOCK_DV=block_dv,
                        IS_VARLEN=varlen, HAS_SEQSTART=has_seqstart, HAS_WINDOW=has_window,
                        HAS_LEFT=win_left != UNBOUNDED,
                        HAS_SOFTCAP=has_softcap, HAS_BIAS=bias is not None,
                        HAS_ALIBI=alibi is not None, HAS_DROPOUT=has_dropout)
    scalars_tail = (seqlen_q_dense, seqlen_k_dense, dmask_rows, dmask_cols, heads_q, group,
                    scale * LOG2E, softcap_inv_scale, softcap_log2, scale,
                    win_left, win_right, sink_size)
    rng = call.rng_state if has_dropout else dummy
    alibi_arg = alibi if alibi is not None else dummy
    bias_arg = bias if bias is not None else dummy
    stride_bias_m = bias.stride(0) if bias is not None else 0

    n_blocks = cdiv(max_sk, cfg_kv.BLOCK_N)
    # few kv heads (GQA/MQA) and short keys leave most SMs idle when one program walks a whole
    # group: then one program per query head, partial dK/dV summed over the group
    if split_group is None:
        split_group = n_blocks * heads_k * batch < 2 * _sm_count(dev)
    split_group = bool(split_group) and group > 1
    if split_group:
        dk_out = torch.zeros((*ks[:-2], heads_q, ks[-1]), dtype=torch.float32, device=dev)
        dv_out = torch.zeros((*v.shape[:-2], heads_q, d_v), dtype=torch.float32, device=dev)
    else:
        dk_out, dv_out = dk, dv
    grid_kv = (n_blocks, heads_q if split_group else heads_k, batch)
    if dq_atomic is None:
        dq_atomic = env.get("AITER_MHA_DQ_ATOMIC", "0") == "1"
    dq_atomic = bool(dq_atomic) and not call.deterministic
    dq_acc = torch.zeros(qs, dtype=torch.float32, device=dev) if dq_atomic else None
    launch(bwd_dkdv_kernel, grid_kv,
        q, k, v, do, lse, delta, dk_out, dv_out, dbias_buf if dbias_buf is not None else dummy,
        dq_acc if dq_acc is not None else dummy,
        *q_strides, *k_strides, *v_strides, *_strides3(do, varlen),
        *_strides3(dk_out, varlen), *_strides3(dv_out, varlen),
        *(_strides3(dq_acc, varlen) if dq_acc is not None else (0, 0, 0)), *l_strides,
        cu_q, cu_k, st_q, st_k,
        alibi_arg, stride_ab, bias_arg, stride_bias_m,
        dbias_buf.stride(0) if dbias_mode == 2 else 0,
        dbias_buf.stride(-2) if dbias_buf is not None else 0,
        rng, call.dropout_p, *scalars_tail,
        BLOCK_M=cfg_kv.BLOCK_M, BLOCK_N=cfg_kv.BLOCK_N, DBIAS_MODE=dbias_mode,
        SPLIT_GROUP=split_group, DQ_ATOMIC=dq_atomic,
        # the masked tail loop over query blocks is needed only for a left bound or ragged rows
        TAIL_Q=varlen or win_left != UNBOUNDED or max_sq % cfg_kv.BLOCK_M != 0,
        num_warps=cfg_kv.num_warps, num_stages=cfg_kv.num_stages, **common_flags,
    )
    if split_group:
        # fixed summation order over the group: still bitwise reproducible
        dk.copy_(dk_out.unflatten(-2, (heads_k, group)).sum(-2))
        dv.copy_(dv_out.unflatten(-2, (heads_k, group)).sum(-2))
    if dq_atomic:
        dq.copy_(dq_acc)  # dQ was accumulated by the dK/dV kernel
    else:
        grid_q = (cdiv(max_sq, cfg_q.BLOCK_M), heads_q, batch)
        launch(bwd_dq_kernel, grid_q,
            q, k, v, do, lse, delta, dq,
            *q_strides, *k_strides, *v_strides, *_strides3(do, varlen),
            *_strides3(dq, varlen), *l_strides,
            cu_q, cu_k, st_q, st_k,
            alibi_arg, stride_ab, bias_arg, stride_bias_m,
            rng, call.dropout_p, *scalars_tail,
            BLOCK_M=cfg_q.BLOCK_M, BLOCK_N=cfg_q.BLOCK_N, REVERSE_M=has_window,
            num_warps=cfg_q.num_warps, num_stages=cfg_q.num_stages, **common_flags,
        )
    dbias = None
    if compute_dbias:
        dbias = dbias_buf.sum(dim=0) if dbias_mode == 2 else dbias_buf
    return dq, dk, dv, delta, dsink, dbias
