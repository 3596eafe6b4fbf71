"""The one validation of every ``aiter::`` MHA op: each function below is named like its op, has
the op's signature (its schema, see ``ops.py``) and returns the op's Call.

Every check raises ``TypeError`` (wrong kind of object or dtype) or ``ValueError`` (wrong value,
shape, device or layout) naming the argument, what was expected and what came. Checks read
shapes, dtypes, devices and strides only: the contents of ``cu_seqlens`` / ``block_table`` /
``cache_seqlens`` are never inspected (that would sync with the host and break CUDA-graph
capture); out-of-range block ids are skipped by the kernels (see the README).

A Call is a ``NamedTuple``: the tensors, the sizes, the normalised options (window bounds with -1
for unbounded and causal folded in, the default softmax scale filled in, sink tokens dropped
without a left bound), the ``key`` the registry and the launch-config choice read, and the
caller's ``backend``. Forward ops share :class:`FwdCall`, backward ops :class:`BwdCall`; ``form``
says which outputs the op returns (see ``ops.fwd_result``).
"""

from __future__ import annotations

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor

from aiter_core.checks import (
    check_bool,
    check_dtype,
    check_float,
    check_int,
    check_int32_vector,
    check_last_dim_contiguous,
    check_ndim,
    check_shape,
    check_tensor,
    dtype_name,
)

__all__ = [
    "Key", "FwdCall", "BwdCall",
    "mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd",
    "flash_attn_func", "flash_attn_varlen_func", "flash_attn_fp8_pertensor_func",
    "flash_attn_varlen_fp8_pertensor_func", "flash_attn_fp8_func", "flash_attn_varlen_fp8_func",
    "flash_attn_with_kvcache", "check_paged_forward_only",
    "check_window", "check_head_dims", "check_gqa",
]

HIGH_PRECISION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
ALL_INPUT_DTYPES = HIGH_PRECISION_DTYPES + FP8_DTYPES
SCORE_BIAS_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FP8_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 8, 256

# FwdCall.layout / BwdCall.layout: how q, k, v are laid out
DENSE = 0  # q (B, Sq, Hq, D), k/v (B, Sk, Hk, D)
PACKED = 1  # q (Tq, Hq, D) packed by cu_seqlens_q; k/v (Tk, Hk, D), or a paged cache with block_table
PADDED_BATCH = 2  # dense tensors with per-batch logical lengths (cu_seqlens on the dense API)
PAGED_DENSE_Q = 3  # q (B, Sq, Hq, D) over a paged cache (num_blocks, page, Hk, D), lengths in seqlens_k

# FwdCall.form: what the op returns (ops.fwd_result)
FORM_LOW_LEVEL = 0  # (out or a 0-element placeholder when out was given, lse or empty, s_dmask or empty, rng_state)
FORM_TRAINING = 1  # (out, lse, s_dmask or empty, rng_state): flash_attn_func / flash_attn_varlen_func
FORM_OUT = 2  # out
FORM_OUT_LSE = 3  # (out, lse): the fp8 training ops
FORM_KVCACHE = 4  # (out, lse (B, Hq, Sq))


class Key(NamedTuple):
    """What backends' ``supports`` and the launch-config choice read (the registry caches per key)."""

    device: torch.device
    dtype: torch.dtype  # q's dtype as given
    fp8: bool  # the kernel computes in fp8 (fp8 inputs, or inputs the op quantizes)
    head_dim_qk: int
    head_dim_v: int
    backward: bool
    paged: bool
    dropout: bool
    window: bool  # causal or a bounded window (after normalisation)
    bias: bool


class FwdCall(NamedTuple):
    q: Tensor
    k: Tensor
    v: Tensor
    out: Optional[Tensor]  # the caller's buffer, written in place (mha_fwd / mha_varlen_fwd)
    cu_seqlens_q: Optional[Tensor]  # int32 (B+1) logical lengths (PACKED, PADDED_BATCH)
    cu_seqlens_k: Optional[Tensor]
    seqstart_q: Optional[Tensor]  # int32 (B+1) physical row starts (padded varlen)
    seqstart_k: Optional[Tensor]
    block_table: Optional[Tensor]  # int32 (B, max_blocks)
    seqlens_k: Optional[Tensor]  # int32 (B,) key lengths (paged)
    bias: Optional[Tensor]
    alibi_slopes: Optional[Tensor]
    sink: Optional[Tensor]
    q_descale: Optional[Tensor]
    k_descale: Optional[Tensor]
    v_descale: Optional[Tensor]
    rng_state: Optional[Tensor]  # given (2,) int64 seed/offset, or None (drawn when dropout_p > 0)
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    softmax_scale: float
    softcap: float
    causal: bool
    window_left: int  # -1 = unbounded
    window_right: int  # -1 = unbounded, 0 when causal
    sink_size: int  # 0 without a left bound
    return_lse: bool
    return_dropout_mask: bool  # S_dmask asked for and dropout_p > 0
    zero_tensors: bool
    out_dtype: torch.dtype
    layout: int
    form: int
    quantize: bool  # fp8 training ops: the backend quantizes q/k/v first
    k_new: Optional[Tensor]  # flash_attn_with_kvcache: rows appended at cache_seqlens before attention
    v_new: Optional[Tensor]
    rotary_cos: Optional[Tensor]
    rotary_sin: Optional[Tensor]
    rotary_interleaved: bool
    key: Key
    backend: Optional[str]


class BwdCall(NamedTuple):
    dout: Tensor
    q: Tensor
    k: Tensor
    v: Tensor
    out: Tensor
    lse: Tensor
    dq: Optional[Tensor]  # the caller's gradient buffers, written in place
    dk: Optional[Tensor]
    dv: Optional[Tensor]
    dbias: Optional[Tensor]  # fp32, filled in place
    d_sink: Optional[Tensor]  # fp32, filled in place
    cu_seqlens_q: Optional[Tensor]
    cu_seqlens_k: Optional[Tensor]
    seqstart_q: Optional[Tensor]
    seqstart_k: Optional[Tensor]
    bias: Optional[Tensor]
    alibi_slopes: Optional[Tensor]
    sink: Optional[Tensor]
    rng_state: Optional[Tensor]
    batch: int
    max_seqlen_q: int
    max_seqlen_k: int
    dropout_p: float
    softmax_scale: float
    softcap: float
    causal: bool
    window_left: int
    window_right: int
    sink_size: int
    deterministic: bool
    zero_tensors: bool
    layout: int
    key: Key
    backend: Optional[str]


# -- attention-specific validators (candidates for aiter_core.checks) ---------------------------


def check_window(name: str, window) -> tuple[int, int, int]:
    """(left, right) or (left, right, sink_size); -1 (any negative) = unbounded, sink_size >= 0."""
    if not isinstance(window, (tuple, list)) or len(window) not in (2, 3):
        raise ValueError(f"{name} must be a tuple (left, right) or (left, right, sink_size), got {window!r}")
    for i, w in enumerate(window):
        if isinstance(w, bool) or not isinstance(w, int):
            raise TypeError(f"{name}[{i}] must be an int, got {type(w).__name__}")
    left, right = window[0], window[1]
    sink_size = window[2] if len(window) == 3 else 0
    if sink_size < 0:
        raise ValueError(f"{name}[2] (sink_size) must be an int >= 0, got {sink_size}")
    return (-1 if left < 0 else left), (-1 if right < 0 else right), sink_size


def check_head_dims(dim_qk: int, dim_v: int, *, minimum: int = MIN_HEAD_DIM, maximum: int = MAX_HEAD_DIM) -> None:
    for name, d in (("q/k head dim", dim_qk), ("v head dim", dim_v)):
        if d < minimum or d > maximum:
            raise ValueError(f"{name} must satisfy {minimum} <= head dim <= {maximum}, got {d}")


def check_gqa(heads_q: int, heads_kv: int, *, q_name: str = "q", k_name: str = "k") -> None:
    if heads_kv < 1 or heads_q % heads_kv != 0:
        raise ValueError(
            f"{k_name} must have a number of heads dividing the {heads_q} heads of {q_name} (GQA/MQA), got {heads_kv}"
        )


def _normalised_window(left: int, right: int, sink_size: int, causal: bool, seqlen_k: int) -> tuple[int, int, int]:
    """Values >= the key length are unbounded; causal means right = 0; sink tokens only matter
    under a left bound."""
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if causal:
        right = 0
    return left, right, (sink_size if left >= 0 else 0)


def _window_list(window_size, causal: bool, seqlen_k: int) -> tuple[int, int, int]:
    if window_size is None:
        return -1, (0 if causal else -1), 0
    return _normalised_window(*check_window("window_size", window_size), causal, seqlen_k)


def _window_ints(left, right, sink_size, causal: bool, seqlen_k: int) -> tuple[int, int, int]:
    return _normalised_window(*check_window("window_size", (check_int("window_size_left", left),
                                                             check_int("window_size_right", right),
                                                             check_int("sink_size", sink_size))),
                              causal, seqlen_k)


# Fast paths for the common, valid case; anything else goes to aiter_core.checks for the error (or
# the same acceptance of numpy scalars, SymInts, ...). isinstance against numbers.Integral/Real is an
# abstract-class test that costs a microsecond a call.


def _scale(softmax_scale, dim_qk: int) -> float:
    if softmax_scale is None:
        return dim_qk ** -0.5
    if type(softmax_scale) is float:  # the common case without check_float's abstract-class test
        return softmax_scale
    return check_float("softmax_scale", softmax_scale)


def _dropout(dropout_p) -> float:
    if type(dropout_p) is float and 0.0 <= dropout_p < 1.0:
        return dropout_p
    return check_float("dropout_p", dropout_p, minimum=0.0, below=1.0)


def _softcap(name: str, value) -> float:
    if type(value) is float and value >= 0.0:
        return value
    return check_float(name, value, minimum=0.0)


def _same_device(name: str, x: Tensor, device) -> None:
    if x.device != device:
        raise ValueError(f"{name} must be on {device} (the device of q), got {x.device}")


def _float32_vector(name: str, x, device, shape: tuple, what: str) -> None:
    check_tensor(name, x)
    check_dtype(name, x, (torch.float32,))
    _same_device(name, x, device)
    check_shape(name, x, shape, what)


def _bias(bias, device, rows, cols, what: str) -> None:
    if bias is None:
        return
    check_tensor("bias", bias)
    check_dtype("bias", bias, SCORE_BIAS_DTYPES)
    _same_device("bias", bias, device)
    check_shape("bias", bias, (rows, cols), what)
    check_last_dim_contiguous("bias", bias)


def _alibi(alibi_slopes, device, batch, heads_q: int) -> None:
    if alibi_slopes is None:
        return
    check_tensor("alibi_slopes", alibi_slopes)
    check_dtype("alibi_slopes", alibi_slopes, (torch.float32,))
    _same_device("alibi_slopes", alibi_slopes, device)
    if tuple(alibi_slopes.shape) not in ((heads_q,), (batch, heads_q)):
        raise ValueError(f"alibi_slopes must have shape ({heads_q},) or ({batch}, {heads_q}), got {tuple(alibi_slopes.shape)}")
    check_last_dim_contiguous("alibi_slopes", alibi_slopes)


def _sink(sink, device, heads_q: int, name: str) -> None:
    if sink is None:
        return
    _float32_vector(name, sink, device, (heads_q,), "(heads_q,)")
    if heads_q > 1 and sink.stride(0) != 1:
        raise ValueError(f"{name} must be a contiguous tensor, got stride {sink.stride(0)}")


def _descale(name: str, descale, device, batch, heads_kv: int) -> None:
    check_tensor(name, descale)
    check_dtype(name, descale, (torch.float32,))
    _same_device(name, descale, device)
    if tuple(descale.shape) not in ((1,), (batch, heads_kv)):
        raise ValueError(f"{name} must have shape (1,) or ({batch}, {heads_kv}), got {tuple(descale.shape)}")


def _descales(dtype, q_descale, k_descale, v_descale, device, batch, heads_kv: int, *, low_level: bool) -> bool:
    """fp8 inputs need all three descales; other inputs none (True: the kernel computes in fp8)."""
    if dtype in FP8_DTYPES:
        for name, d in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            if d is None:
                raise TypeError(f"{name} must be a float32 tensor (1,) or ({batch}, {heads_kv}) for fp8 inputs, got None")
            _descale(name, d, device, batch, heads_kv)
        return True
    if low_level and (q_descale is not None or k_descale is not None or v_descale is not None):
        raise ValueError(f"q_descale/k_descale/v_descale must be None for {dtype_name(dtype)} inputs "
                         "(descales apply to fp8 only), got a tensor")
    return False


def _out(out, device, shape, dtype, *, any_high_precision: bool = False) -> None:
    """``out`` has ``shape`` and ``dtype`` (or, for fp8 inputs, any of bf16/fp16/fp32)."""
    if out is None:
        return
    check_tensor("out", out)
    if any_high_precision:
        check_dtype("out", out, FP8_OUT_DTYPES)
    elif out.dtype != dtype:
        raise TypeError(f"out must have dtype {dtype_name(dtype)}, got {dtype_name(out.dtype)}")
    _same_device("out", out, device)
    check_shape("out", out, shape)
    check_last_dim_contiguous("out", out)


def _cu_seqlens(name: str, cu, batch, device, *, allow_int64: bool = False) -> Optional[Tensor]:
    if cu is None:
        return None
    check_tensor(name, cu)
    if allow_int64 and cu.dtype == torch.int64:  # accepted on the dense API, like upstream; kernels read int32
        cu = cu.to(torch.int32)
    if batch is None:
        check_int32_vector(name, cu, None, device=device, like="q")
        if cu.shape[0] < 2:
            raise ValueError(f"{name} must have at least 2 entries (batch + 1), got {cu.shape[0]}")
    else:
        check_int32_vector(name, cu, batch + 1, device=device, like="q")
    return cu


def _required_cu(name: str, cu, batch, device) -> Tensor:
    if cu is None:
        entries = "batch + 1" if batch is None else str(batch + 1)
        raise TypeError(f"{name} must be an int32 tensor of {entries} entries, got None")
    return _cu_seqlens(name, cu, batch, device)


def _block_table(block_table, batch, device, rows: str) -> None:
    """An int32 (batch, max_blocks_per_seq) table; ``rows`` says where the batch comes from."""
    if (isinstance(block_table, Tensor) and block_table.dtype == torch.int32 and block_table.dim() == 2
            and block_table.shape[0] == batch and block_table.device == device and block_table.stride(-1) == 1):
        return
    check_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        raise TypeError(f"block_table must have dtype int32, got {dtype_name(block_table.dtype)}")
    check_ndim("block_table", block_table, 2, "(batch, max_blocks_per_seq)")
    if block_table.shape[0] != batch:
        raise ValueError(f"block_table must have {batch} rows ({rows}), got {block_table.shape[0]}")
    _same_device("block_table", block_table, device)
    check_last_dim_contiguous("block_table", block_table)


def _rng(rng_state, dropout_p: float, device) -> None:
    if rng_state is None:
        return
    check_tensor("rng_state", rng_state)
    check_dtype("rng_state", rng_state, (torch.int64,))
    check_shape("rng_state", rng_state, (2,))
    _same_device("rng_state", rng_state, device)


def _qkv(q, k, v, *, layout: int, dtypes, paged: bool = False):
    """q, k, v of one layout: (shape of q, shape of k, shape of v, device, dtype)."""
    if not isinstance(q, Tensor):
        check_tensor("q", q)
    if not isinstance(k, Tensor):
        check_tensor("k", k)
    if not isinstance(v, Tensor):
        check_tensor("v", v)
    qs, ks, vs = q.shape, k.shape, v.shape
    if layout == DENSE:
        if len(qs) != 4:
            check_ndim("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
        if len(ks) != 4:
            check_ndim("k", k, 4, "(batch, seqlen_k, heads_kv, head_dim)")
        if len(vs) != 4:
            check_ndim("v", v, 4, "(batch, seqlen_k, heads_kv, head_dim_v)")
    else:
        if len(qs) != 3:
            check_ndim("q", q, 3, "(total_q, heads_q, head_dim)")
        kv_ndim = 4 if paged else 3
        if len(ks) != kv_ndim or len(vs) != kv_ndim:
            kv_layout = ("(num_blocks, page_block_size, heads_kv, head_dim) paged cache" if paged
                         else "(total_k, heads_kv, head_dim)")
            check_ndim("k", k, kv_ndim, kv_layout)
            check_ndim("v", v, kv_ndim, kv_layout)
    dtype = q.dtype
    if dtype not in dtypes:
        if dtype in FP8_DTYPES and not any(d in FP8_DTYPES for d in dtypes):
            raise TypeError(
                f"q must have dtype {'/'.join(dtype_name(d) for d in dtypes)}, got {dtype_name(dtype)} "
                "(fp8 inputs go through flash_attn_fp8_pertensor_func / flash_attn_varlen_fp8_pertensor_func)"
            )
        check_dtype("q", q, dtypes)
    if k.dtype != dtype or v.dtype != dtype:
        name, x = ("k", k) if k.dtype != dtype else ("v", v)
        raise TypeError(f"{name} must have dtype {dtype_name(dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
    device = q.device
    if k.device != device or v.device != device:
        _same_device("k", k, device)
        _same_device("v", v, device)
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        for name, x in (("q", q), ("k", k), ("v", v)):
            check_last_dim_contiguous(name, x)
    dim_qk = qs[-1]
    if ks[-1] != dim_qk:
        raise ValueError(f"k must have head dim {dim_qk} (the head dim of q), got {ks[-1]}")
    dim_v = vs[-1]
    if dim_qk < MIN_HEAD_DIM or dim_qk > MAX_HEAD_DIM or dim_v < MIN_HEAD_DIM or dim_v > MAX_HEAD_DIM:
        check_head_dims(dim_qk, dim_v)
    heads_q, heads_k = qs[-2], ks[-2]
    if heads_k < 1 or heads_q % heads_k != 0:
        check_gqa(heads_q, heads_k)
    if vs[-2] != heads_k:
        raise ValueError(f"v must have {heads_k} heads (the heads of k), got {vs[-2]}")
    if layout == DENSE:
        if ks[0] != qs[0] or vs[0] != qs[0]:
            bad, got = ("k", ks) if ks[0] != qs[0] else ("v", vs)
            raise ValueError(f"{bad} must have batch size {qs[0]} (the batch of q), got {got[0]}")
        if vs[1] != ks[1]:
            raise ValueError(f"v must have seqlen {ks[1]} (the seqlen of k), got {vs[1]}")
    elif vs[:-1] != ks[:-1]:
        raise ValueError(f"v must have leading dims {tuple(ks[:-1])} (those of k), got {tuple(vs[:-1])}")
    return qs, ks, vs, device, dtype


def _how_v3_bf16_cvt(value) -> None:
    if value not in (0, 1, 2):
        raise ValueError(f"how_v3_bf16_cvt must be 0 (RTNE), 1 (RTNA) or 2 (RTZ), got {value!r}")


def _any_requires_grad(*tensors) -> bool:
    return any(t is not None and t.requires_grad for t in tensors)


def check_paged_forward_only(block_table, needs_grad: bool) -> None:
    """Paged KV has no backward: a differentiable call with ``block_table`` is refused."""
    if block_table is not None and needs_grad:
        raise ValueError("block_table must be None for inputs that require grad: paged KV is forward-only "
                         "(use torch.no_grad())")


def _fp8_unsupported(qv, attention_chunk, num_splits, sm_margin) -> None:
    if qv is not None:
        raise NotImplementedError("qv: not supported (expected None)")
    check_int("attention_chunk", attention_chunk)
    if attention_chunk not in (0, 1):
        raise NotImplementedError(f"attention_chunk: only 0 or 1 is supported, got {attention_chunk}")
    check_int("num_splits", num_splits, minimum=0)
    if num_splits > 1:
        raise NotImplementedError(f"num_splits: only 0 or 1 is supported, got {num_splits}")
    check_int("sm_margin", sm_margin)
    if sm_margin != 0:
        raise NotImplementedError(f"sm_margin: only 0 is supported, got {sm_margin}")


# -- the shared builders: one for each q layout ---------------------------------------------------


def _dense(q, k, v, *, dtypes, dropout_p, softmax_scale, causal, window, bias, alibi_slopes, sink, sink_name,
           cu_seqlens_q, cu_seqlens_kv, softcap, softcap_name, out, out_any_high_precision, q_descale, k_descale,
           v_descale, low_level, rng_state, return_lse, return_dropout_mask, form, quantize, backend) -> FwdCall:
    """Forward ops over bshd q/k/v; ``window`` is the raw (left, right, sink) as given (ints checked)."""
    qs, ks, vs, device, dtype = _qkv(q, k, v, layout=DENSE, dtypes=dtypes)
    batch, seqlen_q, heads_q, dim_qk = qs
    seqlen_k, heads_k, dim_v = ks[1], ks[2], vs[3]
    dropout_p = _dropout(dropout_p)
    scale = _scale(softmax_scale, dim_qk)
    check_bool("causal", causal)
    left, right, sink_size = window(causal, seqlen_k)
    if bias is not None:
        _bias(bias, device, seqlen_q, seqlen_k, "(seqlen_q, seqlen_k)")
    if alibi_slopes is not None:
        _alibi(alibi_slopes, device, batch, heads_q)
    if sink is not None:
        _sink(sink, device, heads_q, sink_name)
    cu_q = cu_k = None
    layout = DENSE
    if cu_seqlens_q is not None or cu_seqlens_kv is not None:
        cu_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, batch, device, allow_int64=True)
        cu_k = _cu_seqlens("cu_seqlens_kv", cu_seqlens_kv, batch, device, allow_int64=True)
        layout = PADDED_BATCH
    softcap = _softcap(softcap_name, softcap)
    fp8 = _descales(dtype, q_descale, k_descale, v_descale, device, batch, heads_k, low_level=low_level) or quantize
    out_shape = (batch, seqlen_q, heads_q, dim_v)
    if out is not None:
        _out(out, device, out_shape, dtype, any_high_precision=out_any_high_precision and dtype in FP8_DTYPES)
        out_dtype = out.dtype
    else:
        out_dtype = torch.bfloat16 if dtype in FP8_DTYPES else dtype
    if dropout_p > 0.0:
        _rng(rng_state, dropout_p, device)
    dropout = dropout_p > 0.0
    key = Key(device, dtype, fp8, dim_qk, dim_v, False, False, dropout, left >= 0 or right >= 0, bias is not None)
    return FwdCall(q, k, v, out, cu_q, cu_k, None, None, None, None, bias, alibi_slopes, sink, q_descale, k_descale,
                   v_descale, rng_state, batch, seqlen_q, seqlen_k, dropout_p, scale, softcap, causal, left, right,
                   sink_size, return_lse, return_dropout_mask and dropout, False, out_dtype, layout, form, quantize,
                   None, None, None, None, False, key, backend)


def _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, dtypes, min_seqlen_q, dropout_p,
            softmax_scale, softcap, causal, window, bias, alibi_slopes, block_table, seqlens_k, cu_seqlens_q_padded,
            cu_seqlens_k_padded, sink, sink_name, out, q_descale, k_descale, v_descale, low_level, rng_state,
            return_lse, return_dropout_mask, zero_tensors, form, quantize, backend) -> FwdCall:
    """Forward ops over thd q (k/v packed, or a paged cache with ``block_table``)."""
    paged = block_table is not None
    qs, ks, vs, device, dtype = _qkv(q, k, v, layout=PACKED, dtypes=dtypes, paged=paged)
    total_q, heads_q, dim_qk = qs
    heads_k, dim_v = ks[-2], vs[-1]
    cu_q = _required_cu("cu_seqlens_q", cu_seqlens_q, None, device)
    batch = cu_q.shape[0] - 1
    cu_k = _required_cu("cu_seqlens_k", cu_seqlens_k, batch, device) if seqlens_k is None else \
        _cu_seqlens("cu_seqlens_k", cu_seqlens_k, batch, device)
    max_seqlen_q = check_int("max_seqlen_q", max_seqlen_q, minimum=0)
    max_seqlen_k = check_int("max_seqlen_k", max_seqlen_k, minimum=0)
    check_int("min_seqlen_q", min_seqlen_q, minimum=0)
    dropout_p = _dropout(dropout_p)
    scale = _scale(softmax_scale, dim_qk)
    softcap = _softcap("logits_soft_cap", softcap)
    check_bool("causal", causal)
    left, right, sink_size = window(causal, max(max_seqlen_k, 1))
    _bias(bias, device, max_seqlen_q, max_seqlen_k, "(max_seqlen_q, max_seqlen_k)")
    _alibi(alibi_slopes, device, batch, heads_q)
    _sink(sink, device, heads_q, sink_name)
    pad_q = _cu_seqlens("cu_seqlens_q_padded", cu_seqlens_q_padded, batch, device)
    pad_k = _cu_seqlens("cu_seqlens_k_padded", cu_seqlens_k_padded, batch, device)
    if paged:
        _block_table(block_table, batch, device, "one per sequence")
        if pad_q is not None or pad_k is not None:
            raise ValueError("cu_seqlens_q_padded / cu_seqlens_k_padded must be None with block_table (paged KV), got a tensor")
        if max_seqlen_k > block_table.shape[1] * ks[1]:
            raise ValueError(f"max_seqlen_k must be at most {block_table.shape[1] * ks[1]} (block_table columns x "
                             f"page_block_size), got {max_seqlen_k}")
        if seqlens_k is not None:
            check_int32_vector("seqlens_k", seqlens_k, batch, device=device, like="q")
    elif seqlens_k is not None:
        raise ValueError("seqlens_k must be None without block_table (it gives the key lengths of a paged cache), got a tensor")
    check_bool("zero_tensors", zero_tensors)
    fp8 = _descales(dtype, q_descale, k_descale, v_descale, device, batch, heads_k, low_level=low_level) or quantize
    if out is not None:
        _out(out, device, (total_q, heads_q, dim_v), dtype, any_high_precision=low_level and dtype in FP8_DTYPES)
        out_dtype = out.dtype
    else:
        out_dtype = torch.bfloat16 if dtype in FP8_DTYPES else dtype
    if dropout_p > 0.0:
        _rng(rng_state, dropout_p, device)
    dropout = dropout_p > 0.0
    key = Key(device, dtype, fp8, dim_qk, dim_v, False, paged, dropout, left >= 0 or right >= 0, bias is not None)
    return FwdCall(q, k, v, out, cu_q, cu_k, pad_q, pad_k, block_table, seqlens_k, bias, alibi_slopes, sink,
                   q_descale, k_descale, v_descale, rng_state, batch, max_seqlen_q, max_seqlen_k, dropout_p, scale,
                   softcap, causal, left, right, sink_size, return_lse, return_dropout_mask and dropout, zero_tensors,
                   out_dtype, PACKED, form, quantize, None, None, None, None, False, key, backend)


def _list_window(window_size):
    return lambda causal, seqlen_k: _window_list(window_size, causal, seqlen_k)


def _int_window(left, right, sink_size):
    return lambda causal, seqlen_k: _window_ints(left, right, sink_size, causal, seqlen_k)


# -- forward ops -----------------------------------------------------------------------------------


def mha_fwd(q: Tensor, k: Tensor, v: Tensor, dropout_p: float, softmax_scale: float, is_causal: bool,
            window_size_left: int, window_size_right: int, sink_size: int, return_softmax_lse: bool,
            return_dropout_randval: bool, cu_seqlens_q: Optional[Tensor] = None,
            cu_seqlens_kv: Optional[Tensor] = None, out: Optional[Tensor] = None, bias: Optional[Tensor] = None,
            alibi_slopes: Optional[Tensor] = None, q_descale: Optional[Tensor] = None,
            k_descale: Optional[Tensor] = None, v_descale: Optional[Tensor] = None, sink_ptr: Optional[Tensor] = None,
            rng_state: Optional[Tensor] = None, logits_soft_cap: float = 0.0,
            backend: Optional[str] = None) -> FwdCall:
    """Upstream's low-level dense forward (spec §1.3); ``rng_state`` takes ``gen``'s place."""
    check_bool("return_softmax_lse", return_softmax_lse)
    check_bool("return_dropout_randval", return_dropout_randval)
    return _dense(q, k, v, dtypes=ALL_INPUT_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale,
                  causal=is_causal, window=_int_window(window_size_left, window_size_right, sink_size), bias=bias,
                  alibi_slopes=alibi_slopes, sink=sink_ptr, sink_name="sink_ptr", cu_seqlens_q=cu_seqlens_q,
                  cu_seqlens_kv=cu_seqlens_kv, softcap=logits_soft_cap, softcap_name="logits_soft_cap", out=out,
                  out_any_high_precision=True, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                  low_level=True, rng_state=rng_state, return_lse=return_softmax_lse,
                  return_dropout_mask=return_dropout_randval, form=FORM_LOW_LEVEL, quantize=False, backend=backend)


def mha_varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Optional[Tensor],
                   max_seqlen_q: int, max_seqlen_k: int, min_seqlen_q: int, dropout_p: float, softmax_scale: float,
                   logits_soft_cap: float, zero_tensors: bool, is_causal: bool, window_size_left: int,
                   window_size_right: int, sink_size: int, return_softmax_lse: bool, return_dropout_randval: bool,
                   out: Optional[Tensor] = None, block_table: Optional[Tensor] = None, bias: Optional[Tensor] = None,
                   alibi_slopes: Optional[Tensor] = None, q_descale: Optional[Tensor] = None,
                   k_descale: Optional[Tensor] = None, v_descale: Optional[Tensor] = None,
                   rng_state: Optional[Tensor] = None, cu_seqlens_q_padded: Optional[Tensor] = None,
                   cu_seqlens_k_padded: Optional[Tensor] = None, sink_ptr: Optional[Tensor] = None,
                   seqlens_k: Optional[Tensor] = None, backend: Optional[str] = None) -> FwdCall:
    """Upstream's low-level varlen forward; ``seqlens_k`` (paged key lengths) is an extension."""
    check_bool("return_softmax_lse", return_softmax_lse)
    check_bool("return_dropout_randval", return_dropout_randval)
    return _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=ALL_INPUT_DTYPES,
                   min_seqlen_q=min_seqlen_q, dropout_p=dropout_p, softmax_scale=softmax_scale,
                   softcap=logits_soft_cap, causal=is_causal,
                   window=_int_window(window_size_left, window_size_right, sink_size), bias=bias,
                   alibi_slopes=alibi_slopes, block_table=block_table, seqlens_k=seqlens_k,
                   cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink_ptr,
                   sink_name="sink_ptr", out=out, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                   low_level=True, rng_state=rng_state, return_lse=return_softmax_lse,
                   return_dropout_mask=return_dropout_randval, zero_tensors=zero_tensors, form=FORM_LOW_LEVEL,
                   quantize=False, backend=backend)


def flash_attn_func(q: Tensor, k: Tensor, v: Tensor, dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                    causal: bool = False, window_size: Optional[List[int]] = None, bias: Optional[Tensor] = None,
                    alibi_slopes: Optional[Tensor] = None, deterministic: bool = True, return_lse: bool = False,
                    return_attn_probs: bool = False, how_v3_bf16_cvt: int = 1,
                    cu_seqlens_q: Optional[Tensor] = None, cu_seqlens_kv: Optional[Tensor] = None,
                    sink_ptr: Optional[Tensor] = None, num_splits: int = 0, logits_soft_cap: float = 0.0,
                    backend: Optional[str] = None) -> FwdCall:
    """Dense attention with autograd; ``window_size`` None = (-1, -1, 0)."""
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    check_bool("return_attn_probs", return_attn_probs)
    _how_v3_bf16_cvt(how_v3_bf16_cvt)
    if num_splits != 0:
        check_int("num_splits", num_splits, minimum=0)
    return _dense(q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale,
                  causal=causal, window=_list_window(window_size), bias=bias, alibi_slopes=alibi_slopes, sink=sink_ptr,
                  sink_name="sink_ptr", cu_seqlens_q=cu_seqlens_q, cu_seqlens_kv=cu_seqlens_kv,
                  softcap=logits_soft_cap, softcap_name="logits_soft_cap", out=None, out_any_high_precision=False,
                  q_descale=None, k_descale=None, v_descale=None, low_level=False, rng_state=None, return_lse=True,
                  return_dropout_mask=return_attn_probs, form=FORM_TRAINING, quantize=False, backend=backend)


def flash_attn_varlen_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                           max_seqlen_q: int, max_seqlen_k: int, min_seqlen_q: int = 0, dropout_p: float = 0.0,
                           softmax_scale: Optional[float] = None, logits_soft_cap: float = 0.0, causal: bool = False,
                           window_size: Optional[List[int]] = None, bias: Optional[Tensor] = None,
                           alibi_slopes: Optional[Tensor] = None, deterministic: bool = False,
                           return_lse: bool = False, return_attn_probs: bool = False, how_v3_bf16_cvt: int = 1,
                           block_table: Optional[Tensor] = None, out: Optional[Tensor] = None,
                           cu_seqlens_q_padded: Optional[Tensor] = None, cu_seqlens_k_padded: Optional[Tensor] = None,
                           sink_ptr: Optional[Tensor] = None, backend: Optional[str] = None) -> FwdCall:
    """Packed attention with autograd. ``out`` is checked here; the op is functional (it carries
    an autograd formula), so the public function copies the result into ``out``."""
    check_bool("deterministic", deterministic)
    check_bool("return_lse", return_lse)
    check_bool("return_attn_probs", return_attn_probs)
    _how_v3_bf16_cvt(how_v3_bf16_cvt)
    call = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
                   min_seqlen_q=min_seqlen_q, dropout_p=dropout_p, softmax_scale=softmax_scale,
                   softcap=logits_soft_cap, causal=causal, window=_list_window(window_size), bias=bias,
                   alibi_slopes=alibi_slopes, block_table=block_table, seqlens_k=None,
                   cu_seqlens_q_padded=cu_seqlens_q_padded, cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink_ptr,
                   sink_name="sink_ptr", out=out, q_descale=None, k_descale=None, v_descale=None, low_level=False,
                   rng_state=None, return_lse=True, return_dropout_mask=return_attn_probs, zero_tensors=False,
                   form=FORM_TRAINING, quantize=False, backend=backend)
    if block_table is not None:
        check_paged_forward_only(block_table, torch.is_grad_enabled() and _any_requires_grad(q, k, v, bias, sink_ptr))
    return call._replace(out=None) if out is not None else call


def flash_attn_fp8_pertensor_func(q: Tensor, k: Tensor, v: Tensor, q_descale: Tensor, k_descale: Tensor,
                                  v_descale: Tensor, causal: bool = False, window_size: Optional[List[int]] = None,
                                  softmax_scale: Optional[float] = None, sink_ptr: Optional[Tensor] = None,
                                  backend: Optional[str] = None) -> FwdCall:
    """fp8 (e4m3) bshd inputs with fp32 descales (1,) or (B, Hk); out bf16; forward only."""
    return _dense(q, k, v, dtypes=FP8_DTYPES, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
                  window=_list_window(window_size), bias=None, alibi_slopes=None, sink=sink_ptr, sink_name="sink_ptr",
                  cu_seqlens_q=None, cu_seqlens_kv=None, softcap=0.0, softcap_name="logits_soft_cap", out=None,
                  out_any_high_precision=False, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                  low_level=False, rng_state=None, return_lse=False, return_dropout_mask=False, form=FORM_OUT,
                  quantize=False, backend=backend)


def flash_attn_varlen_fp8_pertensor_func(q: Tensor, k: Tensor, v: Tensor, q_descale: Tensor, k_descale: Tensor,
                                         v_descale: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                                         max_seqlen_q: int, max_seqlen_k: int, min_seqlen_q: int = 0,
                                         logits_soft_cap: float = 0.0, causal: bool = False,
                                         window_size: Optional[List[int]] = None,
                                         softmax_scale: Optional[float] = None, sink_ptr: Optional[Tensor] = None,
                                         backend: Optional[str] = None) -> FwdCall:
    """fp8 (e4m3) thd inputs with fp32 descales (1,) or (B, Hk); out bf16; forward only."""
    return _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=FP8_DTYPES,
                   min_seqlen_q=min_seqlen_q, dropout_p=0.0, softmax_scale=softmax_scale, softcap=logits_soft_cap,
                   causal=causal, window=_list_window(window_size), bias=None, alibi_slopes=None, block_table=None,
                   seqlens_k=None, cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=sink_ptr,
                   sink_name="sink_ptr", out=None, q_descale=q_descale, k_descale=k_descale, v_descale=v_descale,
                   low_level=False, rng_state=None, return_lse=False, return_dropout_mask=False, zero_tensors=False,
                   form=FORM_OUT, quantize=False, backend=backend)


def flash_attn_fp8_func(q: Tensor, k: Tensor, v: Tensor, softmax_scale: Optional[float] = None, causal: bool = False,
                        qv: Optional[Tensor] = None, window_size: Optional[List[int]] = None, attention_chunk: int = 0,
                        softcap: float = 0.0, num_splits: int = 1, pack_gqa: Optional[bool] = None,
                        deterministic: bool = False, sm_margin: int = 0, backend: Optional[str] = None) -> FwdCall:
    """bshd attention in fp8 from fp16/bf16/fp32 inputs (the op quantizes); straight-through backward."""
    _fp8_unsupported(qv, attention_chunk, num_splits, sm_margin)
    if pack_gqa is not None:
        check_bool("pack_gqa", pack_gqa)
    check_bool("deterministic", deterministic)
    call = _dense(q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=0.0, softmax_scale=softmax_scale, causal=causal,
                  window=_list_window(window_size), bias=None, alibi_slopes=None, sink=None, sink_name="sink_ptr",
                  cu_seqlens_q=None, cu_seqlens_kv=None, softcap=softcap, softcap_name="softcap", out=None,
                  out_any_high_precision=False, q_descale=None, k_descale=None, v_descale=None, low_level=False,
                  rng_state=None, return_lse=True, return_dropout_mask=False, form=FORM_OUT_LSE, quantize=True,
                  backend=backend)
    return call


def flash_attn_varlen_fp8_func(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                               max_seqlen_q: int, max_seqlen_k: int, softmax_scale: Optional[float] = None,
                               causal: bool = False, window_size: Optional[List[int]] = None,
                               attention_chunk: int = 0, softcap: float = 0.0, deterministic: bool = False,
                               sm_margin: int = 0, backend: Optional[str] = None) -> FwdCall:
    """thd attention in fp8 from fp16/bf16/fp32 inputs (quantized per sequence and kv head)."""
    _fp8_unsupported(None, attention_chunk, 0, sm_margin)
    check_bool("deterministic", deterministic)
    return _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
                   min_seqlen_q=0, dropout_p=0.0, softmax_scale=softmax_scale, softcap=softcap, causal=causal,
                   window=_list_window(window_size), bias=None, alibi_slopes=None, block_table=None, seqlens_k=None,
                   cu_seqlens_q_padded=None, cu_seqlens_k_padded=None, sink=None, sink_name="sink_ptr", out=None,
                   q_descale=None, k_descale=None, v_descale=None, low_level=False, rng_state=None, return_lse=True,
                   return_dropout_mask=False, zero_tensors=False, form=FORM_OUT_LSE, quantize=True, backend=backend)


def _cache(name: str, cache, paged: bool) -> None:
    if not isinstance(cache, Tensor):
        check_tensor(name, cache)
    if cache.dim() != 4:
        layout = ("(num_blocks, page_block_size, heads_kv, head_dim) paged cache" if paged
                  else "(batch_cache, seqlen_cache, heads_kv, head_dim)")
        check_ndim(name, cache, 4, layout)
    if cache.stride(-1) != 1:
        check_last_dim_contiguous(name, cache)


def flash_attn_with_kvcache(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Optional[Tensor] = None,
                            v: Optional[Tensor] = None, cache_seqlens: Optional[Tensor] = None,
                            softmax_scale: Optional[float] = None, causal: bool = True,
                            window_size: Optional[List[int]] = None, softcap: float = 0.0, num_splits: int = 0,
                            rotary_cos: Optional[Tensor] = None, rotary_sin: Optional[Tensor] = None,
                            cache_batch_idx: Optional[Tensor] = None, cache_leftpad: Optional[Tensor] = None,
                            block_table: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                            rotary_interleaved: bool = True, return_softmax_lse: bool = False,
                            sink_ptr: Optional[Tensor] = None, cache_seqlens_int: Optional[int] = None,
                            backend: Optional[str] = None) -> FwdCall:
    """Decode / append against a KV cache. ``cache_seqlens`` (B,) int32, or the int form of upstream's
    ``cache_seqlens`` in ``cache_seqlens_int`` (one length for every sequence). A contiguous cache
    is attended as a paged cache with one page per row (``block_table`` = the cache rows)."""
    paged = block_table is not None
    if not isinstance(q, Tensor):
        check_tensor("q", q)
    if q.dim() != 4:
        check_ndim("q", q, 4, "(batch, seqlen_q, heads_q, head_dim)")
    dtype, device = q.dtype, q.device
    if dtype not in HIGH_PRECISION_DTYPES:
        check_dtype("q", q, HIGH_PRECISION_DTYPES)
    if q.stride(-1) != 1:
        check_last_dim_contiguous("q", q)
    _cache("k_cache", k_cache, paged)
    _cache("v_cache", v_cache, paged)
    if k_cache.dtype != dtype or v_cache.dtype != dtype:
        name, x = ("k_cache", k_cache) if k_cache.dtype != dtype else ("v_cache", v_cache)
        raise TypeError(f"{name} must have dtype {dtype_name(dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
    if k_cache.device != device or v_cache.device != device:
        _same_device("k_cache", k_cache, device)
        _same_device("v_cache", v_cache, device)
    batch, seqlen_q, heads_q, dim = q.shape
    kcs, vcs = k_cache.shape, v_cache.shape
    heads_kv, dim_v = kcs[2], vcs[3]
    if kcs[3] != dim:
        raise ValueError(f"k_cache must have head dim {dim} (the head dim of q), got {kcs[3]}")
    if vcs[:3] != kcs[:3]:
        raise ValueError(f"v_cache must have leading dims {tuple(kcs[:3])} (those of k_cache), got {tuple(vcs[:3])}")
    if dim < MIN_HEAD_DIM or dim > MAX_HEAD_DIM or dim_v < MIN_HEAD_DIM or dim_v > MAX_HEAD_DIM:
        check_head_dims(dim, dim_v)
    if heads_kv < 1 or heads_q % heads_kv != 0:
        check_gqa(heads_q, heads_kv, k_name="k_cache")
    if cache_leftpad is not None:
        raise NotImplementedError("cache_leftpad must be None: left padding of the cache is not supported")
    check_int("num_splits", num_splits, minimum=0)
    check_bool("causal", causal)
    check_bool("rotary_interleaved", rotary_interleaved)
    check_bool("return_softmax_lse", return_softmax_lse)
    softcap = _softcap("softcap", softcap)
    if paged:
        _block_table(block_table, batch, device, "the batch of q")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx must be None with a paged cache (block_table picks the pages), got a tensor")
        capacity = block_table.shape[1] * kcs[1]
    else:
        capacity = kcs[1]
        if cache_batch_idx is not None:
            check_int32_vector("cache_batch_idx", cache_batch_idx, batch, device=device, like="q")
        elif kcs[0] < batch:
            raise ValueError(f"k_cache must have at least {batch} rows (the batch of q), got {kcs[0]}")
    if cache_seqlens is not None:
        check_int32_vector("cache_seqlens", cache_seqlens, batch, device=device, like="q")
    elif cache_seqlens_int is not None:
        check_int("cache_seqlens", cache_seqlens_int, minimum=0)
    elif paged:
        raise TypeError("cache_seqlens must be an int or an int32 tensor (batch,) with a paged cache, got None")
    if cache_seqlens_int is not None and cache_seqlens is not None:
        raise ValueError("cache_seqlens_int must be None when cache_seqlens is a tensor, got an int")
    if (k is None) != (v is None):
        raise ValueError(f"k and v must be given together, got k={'None' if k is None else 'a tensor'} and "
                         f"v={'None' if v is None else 'a tensor'}")
    if k is not None:
        if cache_seqlens is None and cache_seqlens_int is None:
            raise TypeError("cache_seqlens must be an int or an int32 tensor (batch,) when appending k/v, got None")
        for name, x, d in (("k", k, dim), ("v", v, dim_v)):
            check_tensor(name, x)
            check_ndim(name, x, 4, "(batch, seqlen_new, heads_kv, head_dim)")
            if x.dtype != dtype:
                raise TypeError(f"{name} must have dtype {dtype_name(dtype)} (the dtype of q), got {dtype_name(x.dtype)}")
            if x.shape[0] != batch or x.shape[2] != heads_kv or x.shape[3] != d:
                raise ValueError(f"{name} must have shape ({batch}, seqlen_new, {heads_kv}, {d}), got {tuple(x.shape)}")
            _same_device(name, x, device)
        if v.shape[1] != k.shape[1]:
            raise ValueError(f"v must have seqlen_new {k.shape[1]} (that of k), got {v.shape[1]}")
        if k.shape[1] > capacity:
            raise ValueError(f"k must have at most {capacity} new tokens (the cache capacity), got {k.shape[1]}")
    left, right, sink_size = _window_list(window_size, causal, capacity)
    if (rotary_cos is None) != (rotary_sin is None):
        raise ValueError("rotary_cos and rotary_sin must be given together")
    if rotary_cos is not None:
        if k is None:
            raise ValueError("rotary_cos must be None when no new k/v are appended (k, v are None)")
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            check_tensor(name, t)
            check_ndim(name, t, 2, "(seqlen_ro, rotary_dim / 2)")
            check_dtype(name, t, HIGH_PRECISION_DTYPES)
            _same_device(name, t, device)
        if rotary_sin.shape != rotary_cos.shape:
            raise ValueError(f"rotary_sin must have shape {tuple(rotary_cos.shape)} (that of rotary_cos), "
                             f"got {tuple(rotary_sin.shape)}")
        if 2 * rotary_cos.shape[1] > dim:
            raise ValueError(f"rotary_cos must have at most {dim // 2} columns (rotary_dim = 2 x columns <= head dim "
                             f"{dim}), got {rotary_cos.shape[1]}")
        if rotary_cos.shape[0] < capacity:
            raise ValueError(f"rotary_cos must have at least {capacity} positions (the cache capacity), "
                             f"got {rotary_cos.shape[0]}")
    _alibi(alibi_slopes, device, batch, heads_q)
    _sink(sink_ptr, device, heads_q, "sink_ptr")
    scale = _scale(softmax_scale, dim)
    seqlens = cache_seqlens
    if seqlens is None:  # one length for every sequence: the int form, or the whole contiguous cache
        seqlens = torch.full((batch,), capacity if cache_seqlens_int is None else cache_seqlens_int,
                             dtype=torch.int32, device=device)
    if not paged and cache_batch_idx is not None:
        block_table = cache_batch_idx.view(batch, 1)  # one page per sequence: its cache row
    # block_table None: a contiguous cache read row b for sequence b (the backends add the row table)
    key = Key(device, dtype, False, dim, dim_v, False, True, False, left >= 0 or right >= 0, False)
    return FwdCall(q, k_cache, v_cache, None, None, None, None, None, block_table, seqlens, None, alibi_slopes,
                   sink_ptr, None, None, None, None, batch, seqlen_q, capacity, 0.0, scale, softcap, causal, left,
                   right, sink_size, return_softmax_lse, False, False, dtype, PAGED_DENSE_Q, FORM_KVCACHE, False, k, v,
                   rotary_cos, rotary_sin, rotary_interleaved, key, backend)


# -- backward ops ----------------------------------------------------------------------------------


def _bwd_tensors(dout, out, softmax_lse, q, v, device, lse_shape) -> None:
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
    for name, x in (("dout", dout), ("out", out), ("softmax_lse", softmax_lse)):
        _same_device(name, x, device)


def _grad_buffers(q, k, v, dq, dk, dv, device) -> None:
    for name, buf, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        if buf is None:
            continue
        check_tensor(name, buf)
        if buf.dtype != like.dtype:
            raise TypeError(f"{name} must have dtype {dtype_name(like.dtype)}, got {dtype_name(buf.dtype)}")
        _same_device(name, buf, device)
        check_shape(name, buf, tuple(like.shape))
        check_last_dim_contiguous(name, buf)


def _bwd_rng(rng_state, dropout_p: float, device) -> None:
    if dropout_p <= 0:
        return
    if rng_state is None:
        raise TypeError("rng_state must be the (2,) int64 tensor the forward returned (dropout_p > 0), got None")
    _rng(rng_state, dropout_p, device)


def _extra_grads(dbias, dbias_shape, d_sink, heads_q, bias, sink, device) -> None:
    if dbias is not None:
        _float32_vector("dbias", dbias, device, dbias_shape, "")
        if bias is None:
            raise ValueError("dbias must be None when bias is None, got a tensor")
    if d_sink is not None:
        _float32_vector("d_sink", d_sink, device, (heads_q,), "(heads_q,)")
        if sink is None:
            raise ValueError("d_sink must be None when sink is None, got a tensor")


def mha_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor, dropout_p: float,
            softmax_scale: float, is_causal: bool, window_size_left: int, window_size_right: int, deterministic: bool,
            dq: Optional[Tensor] = None, dk: Optional[Tensor] = None, dv: Optional[Tensor] = None,
            dbias: Optional[Tensor] = None, bias: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
            rng_state: Optional[Tensor] = None, sink: Optional[Tensor] = None, d_sink: Optional[Tensor] = None,
            sink_size: int = 0, logits_soft_cap: float = 0.0, cu_seqlens_q: Optional[Tensor] = None,
            cu_seqlens_kv: Optional[Tensor] = None, backend: Optional[str] = None) -> BwdCall:
    """Upstream's low-level dense backward; ``sink_size``, ``logits_soft_cap``, ``cu_seqlens_*`` extend it."""
    fwd = _dense(q, k, v, dtypes=HIGH_PRECISION_DTYPES, dropout_p=dropout_p, softmax_scale=softmax_scale,
                 causal=is_causal, window=_int_window(window_size_left, window_size_right, sink_size), bias=bias,
                 alibi_slopes=alibi_slopes, sink=sink, sink_name="sink", cu_seqlens_q=cu_seqlens_q,
                 cu_seqlens_kv=cu_seqlens_kv, softcap=logits_soft_cap, softcap_name="logits_soft_cap", out=None,
                 out_any_high_precision=False, q_descale=None, k_descale=None, v_descale=None, low_level=False,
                 rng_state=None, return_lse=False, return_dropout_mask=False, form=FORM_LOW_LEVEL, quantize=False,
                 backend=backend)
    return _bwd_call(fwd, dout, out, softmax_lse, dq, dk, dv, dbias, d_sink, rng_state, deterministic, False,
                     (fwd.batch, q.shape[2], q.shape[1]), (q.shape[1], k.shape[1]))


def mha_varlen_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, softmax_lse: Tensor,
                   cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int,
                   dropout_p: float, softmax_scale: float, zero_tensors: bool, is_causal: bool, window_size_left: int,
                   window_size_right: int, deterministic: bool, dq: Optional[Tensor] = None,
                   dk: Optional[Tensor] = None, dv: Optional[Tensor] = None, alibi_slopes: Optional[Tensor] = None,
                   rng_state: Optional[Tensor] = None, cu_seqlens_q_padded: Optional[Tensor] = None,
                   cu_seqlens_k_padded: Optional[Tensor] = None, sink: Optional[Tensor] = None,
                   d_sink: Optional[Tensor] = None, sink_size: int = 0, logits_soft_cap: float = 0.0,
                   bias: Optional[Tensor] = None, dbias: Optional[Tensor] = None,
                   backend: Optional[str] = None) -> BwdCall:
    """Upstream's low-level varlen backward; ``sink_size``, ``logits_soft_cap``, ``bias``/``dbias`` extend it."""
    fwd = _packed(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dtypes=HIGH_PRECISION_DTYPES,
                  min_seqlen_q=0, dropout_p=dropout_p, softmax_scale=softmax_scale, softcap=logits_soft_cap,
                  causal=is_causal, window=_int_window(window_size_left, window_size_right, sink_size), bias=bias,
                  alibi_slopes=alibi_slopes, block_table=None, seqlens_k=None, cu_seqlens_q_padded=cu_seqlens_q_padded,
                  cu_seqlens_k_padded=cu_seqlens_k_padded, sink=sink, sink_name="sink", out=None, q_descale=None,
                  k_descale=None, v_descale=None, low_level=False, rng_state=None, return_lse=False,
                  return_dropout_mask=False, zero_tensors=zero_tensors, form=FORM_LOW_LEVEL, quantize=False,
                  backend=backend)
    return _bwd_call(fwd, dout, out, softmax_lse, dq, dk, dv, dbias, d_sink, rng_state, deterministic, zero_tensors,
                     (q.shape[1], q.shape[0]), (fwd.max_seqlen_q, fwd.max_seqlen_k))


def _bwd_call(fwd: FwdCall, dout, out, softmax_lse, dq, dk, dv, dbias, d_sink, rng_state, deterministic,
              zero_tensors, lse_shape, dbias_shape) -> BwdCall:
    q, k, v = fwd.q, fwd.k, fwd.v
    device = fwd.key.device
    check_bool("deterministic", deterministic)
    _bwd_tensors(dout, out, softmax_lse, q, v, device, lse_shape)
    _grad_buffers(q, k, v, dq, dk, dv, device)
    _bwd_rng(rng_state, fwd.dropout_p, device)
    _extra_grads(dbias, dbias_shape, d_sink, q.shape[-2], fwd.bias, fwd.sink, device)
    key = fwd.key._replace(backward=True)
    return BwdCall(dout, q, k, v, out, softmax_lse, dq, dk, dv, dbias, d_sink, fwd.cu_seqlens_q, fwd.cu_seqlens_k,
                   fwd.seqstart_q, fwd.seqstart_k, fwd.bias, fwd.alibi_slopes, fwd.sink, rng_state, fwd.batch,
                   fwd.max_seqlen_q, fwd.max_seqlen_k, fwd.dropout_p, fwd.softmax_scale, fwd.softcap, fwd.causal,
                   fwd.window_left, fwd.window_right, fwd.sink_size, deterministic, zero_tensors, fwd.layout, key,
                   fwd.backend)
