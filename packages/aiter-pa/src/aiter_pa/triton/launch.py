"""Calls -> Triton launches: the paged-attention kernel (and its split-K merge), the cache writes
and the block copies. The kernels themselves live in :mod:`.attention` and :mod:`.cache`.

Nothing here syncs with the device or allocates when the caller passes the split-K buffers, so
decode can be captured in a CUDA graph. What depends only on the Call's key and geometry (the
tile config, the constexprs) is computed once per specialisation and cached; a call pays for its
strides, its partition count and the launch.

v1/v2 heuristic (:func:`choose_num_partitions`), overridable by ``num_partitions=`` or the
environment variable ``AITER_PA_NUM_PARTITIONS``: with ``ctas = num_seqs * num_kv_heads * m_tiles``
programs in a single pass, decode is memory bound and wants every SM streaming with several CTAs
in flight. One pass (v1) when the context fits in one partition of ``MIN_PART_TOKENS`` or when
``ctas >= c * num_sms`` already fills the machine; otherwise split each sequence into
``P = min(ceil(c * num_sms / ctas), ceil(max_context_len / MIN_PART_TOKENS))``
partitions (v2) and merge them with aiter_core's split-K reduce. ``num_sms`` is
``aiter_core.arch.get_arch_info().num_cu``; ``c`` is ``CTAS_PER_SM`` (4) for 16-bit caches and
``CTAS_PER_SM_8BIT`` (2) for 8-bit ones, from the H100 run in benchmarks/results/h100 (b=64 hkv=8
ctx 4k, 512 CTAs): bf16 took 0.470 ms at P=1 and 0.416 at P=2, fp8 0.310 at P=1 and 0.329 at P=2
(per tensor; per token 0.322 / 0.338): a CTA streaming 8-bit tiles needs fewer neighbours to
keep memory busy, and the split's partial writes and merge then cost more than they gain.

Tile config (:func:`default_config`, by head dim, KV element size and query-row tile) can be
overridden per op with ``AITER_<OP>_CONFIG="BLOCK_N=32,num_warps=8,num_stages=2"`` (``OP`` the
aiter op's name, e.g. ``PAGED_ATTENTION_DECODE``; see :mod:`aiter_core.configs`).
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from math import gcd
from typing import NamedTuple

import torch

from aiter_core import configs, env
from aiter_core import triton_attn as ta
from aiter_core.triton_utils import cdiv, install_compile_notice, interpreter_active, next_pow2

from ..checks import MODE_BLOCK, MODE_INT4, CacheWrite, CopyBlocks, PagedCall, PagedKey, split_head_dim
from ..layouts import Addressing
from .attention import _paged_attn_kernel
from .cache import _block_absmax_kernel, _block_requant_kernel, _cache_write_kernel, _copy_blocks_kernel

__all__ = ["Launch", "KernelConfig", "prepare_launch", "paged_attention", "kv_cache_write", "copy_blocks",
           "write_cache", "block_quant_write", "copy_blocks_launch", "default_config", "config_for",
           "choose_num_partitions", "block_m_for", "MIN_PART_TOKENS", "CTAS_PER_SM", "CTAS_PER_SM_8BIT"]

install_compile_notice()

MIN_PART_TOKENS = 512
CTAS_PER_SM = 4
CTAS_PER_SM_8BIT = 2
MAX_BLOCK_M = 64
_INTERPRET = interpreter_active()  # Triton fixed its mode when it was imported (above)


def _pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= ``n``, at least ``lo``."""
    return max(lo, next_pow2(n))



class KernelConfig(NamedTuple):
    BLOCK_N: int = 64
    num_warps: int = 4
    num_stages: int = 2


@lru_cache(maxsize=256)
def default_config(head_dim: int, kv_elem_bytes: float, block_m: int) -> KernelConfig:
    """Tile config by head dim, KV element size and query-row tile (the sm_90 compile test checks
    each fits)."""
    if _INTERPRET:
        return KernelConfig(BLOCK_N=16, num_warps=4, num_stages=1)
    if head_dim > 256:  # MLA-style 576/512 dims: 512-wide accumulator rows over 8 warps
        return KernelConfig(BLOCK_N=32, num_warps=8, num_stages=2)
    if block_m * head_dim >= 64 * 256:  # big accumulators (long MTP x GQA at d=256): spread over 8 warps
        return KernelConfig(BLOCK_N=32, num_warps=8, num_stages=2)
    if head_dim > 128:
        return KernelConfig(BLOCK_N=32, num_warps=4, num_stages=2)
    if kv_elem_bytes < 2:
        return KernelConfig(BLOCK_N=128 if block_m <= 32 else 64, num_warps=4, num_stages=3)
    return KernelConfig(BLOCK_N=64, num_warps=4, num_stages=3)


def _kv_bytes(key: PagedKey) -> float:
    return 0.5 if key.kv_quant == 3 else key.kv_dtype.itemsize  # packed int4: two values a byte


def config_for(op: str, key: PagedKey, block_m: int) -> KernelConfig:
    """The tile config of ``op``'s call with ``key``: :func:`default_config` through the
    ``AITER_<OP>_CONFIG`` override (cached per value of that variable)."""
    return _config(op, key, block_m, env.get(_config_variable(op)))


@lru_cache(maxsize=64)
def _config_variable(op: str) -> str:
    return configs.variable(op)


@lru_cache(maxsize=1024)
def _config(op: str, key: PagedKey, block_m: int, override: str | None) -> KernelConfig:
    del override  # part of the cache key: configs.override reads the variable itself
    return configs.override(op, default_config(max(key.head_dim, key.head_dim_v), _kv_bytes(key), block_m))


@lru_cache(maxsize=256)
def block_m_for(gqa: int, max_qlen: int, head_dim_v: int = 128) -> int:
    cap = MAX_BLOCK_M if head_dim_v <= 256 else 16  # a 512-wide fp32 accumulator: keep the row tile small
    return min(cap, _pow2(gqa * max_qlen, 16))


def _num_sms() -> int:
    from aiter_core.arch import get_arch_info

    return max(1, int(get_arch_info().num_cu or 1))


def choose_num_partitions(num_seqs: int, num_kv_heads: int, m_tiles: int, max_context_len: int,
                          num_sms: int | None = None, kv_elem_bytes: float = 2) -> int:
    """Partitions per sequence (1 = v1 single pass); see the module docstring."""
    forced = env.get("AITER_PA_NUM_PARTITIONS")
    if forced:
        return max(1, int(forced))
    max_parts = cdiv(max(max_context_len, 1), MIN_PART_TOKENS)
    if max_parts <= 1:
        return 1
    ctas = max(1, num_seqs * num_kv_heads * m_tiles)
    target = (CTAS_PER_SM if kv_elem_bytes >= 2 else CTAS_PER_SM_8BIT) * (num_sms or _num_sms())
    if ctas >= target:
        return 1
    return max(1, min(cdiv(target, ctas), max_parts))


def _kv_in_fp16(query_dtype: torch.dtype, kv_elem_bytes: int, has_new: bool) -> bool:
    """Whether an 8-bit cache's (fp8, int8, packed int4) tiles are converted to fp16 rather than
    the query's bf16 for the dots: cheaper on sm_90 (see the kernel's docstring). Decode and MTP
    only: prefill also dots the query with new bf16 keys. ``AITER_PA_KV_COMPUTE`` = ``query`` /
    ``fp16`` forces either choice for 8-bit caches (comparisons and tests)."""
    if kv_elem_bytes != 1 or has_new:
        return False
    mode = env.get("AITER_PA_KV_COMPUTE", "auto")
    if mode not in ("auto", "query", "fp16"):
        raise ValueError(f"AITER_PA_KV_COMPUTE must be auto, query or fp16, got {mode!r}")
    if mode != "auto":
        return mode == "fp16"
    return query_dtype == torch.bfloat16


def _phys_group(block_size: int, block_n: int, part_tokens: int) -> int:
    """Tokens per group sharing a block: the largest power of two (at most 16) dividing block, tile
    and partition."""
    g = gcd(block_size, block_n, part_tokens)
    return min(16, g & -g)


# the kernel's constexpr parameters, in its signature's order (they are passed positionally: Triton
# binds ~100 arguments per launch, and keyword binding costs more)
_KERNEL_PARAMS = tuple(inspect.signature(_paged_attn_kernel.fn).parameters)
CONSTEXPR_NAMES = _KERNEL_PARAMS[_KERNEL_PARAMS.index("GQA"):]


@lru_cache(maxsize=1024)
def _constexprs(key: PagedKey, info, gqa: int, block_m: int, block_n: int, qo_mode: int, kv_mode: int,
                has_new: bool, new_causal: bool, skip_decode: bool, has_mask: bool, mask_prefix: bool, causal: bool,
                has_alibi: bool, use_softcap: bool, use_window: bool, split: bool, phys_group: int,
                kv_fp16: bool) -> tuple:
    """The kernel's constexpr values of one specialisation, in :data:`CONSTEXPR_NAMES` order."""
    D, Dv = key.head_dim, key.head_dim_v
    d1, d2 = split_head_dim(D)
    k, v = info.k, info.v
    values = dict(
        GQA=gqa, BLOCK_M=block_m, HEAD_D=d1, HEAD_DV=Dv, BLOCK_D=_pow2(d1, 16),
        HEAD_D2=d2, BLOCK_D2=max(16, d2),
        BLOCK_DV=_pow2(Dv, 16), BLOCK_N=block_n, KV_BLOCK=info.block_size,
        K_TX=k.TX, K_CX=k.CX, V_TX=v.TX, V_CX=v.CX,
        s_kt_hi=k.s_t_hi, s_kt_lo=k.s_t_lo, s_kc_hi=k.s_c_hi, s_kc_lo=k.s_c_lo,
        s_vt_hi=v.s_t_hi, s_vt_lo=v.s_t_lo, s_vc_hi=v.s_c_hi, s_vc_lo=v.s_c_lo,
        QUANT_K=int(key.kv_quant), QUANT_V=int(key.kv_quant), HIGH_PREC=key.high_precision,
        V_FP8=key.kv_dtype.is_floating_point and key.kv_dtype.itemsize == 1,
        QO_MODE=qo_mode, KV_MODE=kv_mode, HAS_NEW=has_new, NEW_CAUSAL=new_causal, SKIP_DECODE=skip_decode,
        PHYS_GROUP=phys_group, HAS_MASK=has_mask, MASK_PREFIX=mask_prefix, CAUSAL=causal, HAS_ALIBI=has_alibi,
        USE_SOFTCAP=use_softcap, USE_WINDOW=use_window, SPLIT=split, KV_FP16=kv_fp16,
        OFFSET_BITS=32 if info.max_offset < 2**31 else 64,
    )
    if len(values) != len(CONSTEXPR_NAMES):
        raise RuntimeError(f"the launcher sets {sorted(values)}, the kernel takes {CONSTEXPR_NAMES}")
    return tuple(values[name] for name in CONSTEXPR_NAMES)


class Launch(NamedTuple):
    """Everything one kernel launch needs; :func:`prepare_launch` builds it, the compile-only
    tests turn it into an ``ASTSource`` signature."""

    grid: tuple
    args: list  # the runtime arguments
    constexprs: dict  # by name (the launch passes the values positionally, after ``args``)
    num_warps: int
    num_stages: int
    merge: tuple | None  # (partial_out, partial_max, partial_sum) when split-K


def _carve(ws: torch.Tensor, rows: int, num_heads: int, partitions: int, head_dim: int, dtype: torch.dtype):
    """(partial_out, partial_max, partial_sum) views of a v1/ragged ``workspace_buffer`` (upstream's
    layout: max logits, exp sums, then the partial outputs in the output dtype; sized by the checks)."""
    n = rows * num_heads * partitions
    raw = ws.view(torch.uint8).reshape(-1)
    pmax = raw[: 4 * n].view(torch.float32).view(rows, num_heads, partitions)
    psum = raw[4 * n: 8 * n].view(torch.float32).view(rows, num_heads, partitions)
    po = raw[8 * n: 8 * n + n * head_dim * dtype.itemsize].view(dtype).view(rows, num_heads, partitions, head_dim)
    return po, pmax, psum


def _plan(call: PagedCall, config: KernelConfig | None) -> tuple:
    """The launch of ``call`` as a plain tuple, its constexprs as the value tuple (see
    :func:`prepare_launch`)."""
    key, info = call.key, call.info
    query, out = call.query, call.out
    Hk = info.num_kv_heads
    gqa = call.num_heads // Hk
    max_qlen = call.max_qlen
    Dv = key.head_dim_v
    block_m = block_m_for(gqa, max_qlen, Dv)
    m_tiles = cdiv(gqa * max_qlen, block_m)
    cfg = config or config_for(call.op, key, block_m)
    block_n = cfg.BLOCK_N
    max_ctx = call.max_context_len
    partials = call.partials
    if partials is None and call.workspace is not None:
        partials = _carve(call.workspace, query.shape[0], call.num_heads, call.num_partitions, key.head_dim,
                          out.dtype)
    if partials is not None:
        P = partials[0].shape[2]
    elif call.num_partitions is not None:
        P = max(1, call.num_partitions)
    else:
        P = choose_num_partitions(call.num_seqs, Hk, m_tiles, max_ctx, kv_elem_bytes=_kv_bytes(key))
    part_tokens = call.partition_size or cdiv(cdiv(max(max_ctx, 1), P), block_n) * block_n
    split = P > 1
    dummy = query
    if split:
        if partials is None:
            total_q, dev = query.shape[0], query.device
            partials = (torch.empty(total_q, call.num_heads, P, Dv, dtype=torch.float32, device=dev),
                        torch.empty(total_q, call.num_heads, P, dtype=torch.float32, device=dev),
                        torch.empty(total_q, call.num_heads, P, dtype=torch.float32, device=dev))
        po, pmax, psum = partials
        po_s = po.stride()
        pm_s = pmax.stride()
    else:
        po = pmax = psum = dummy
        po_s, pm_s = (0, 0, 0, 0), (0, 0, 0)
    ks, vs = call.k_scale, call.v_scale
    if ks is not None:
        ks_t, ks_s = ks.tensor, (ks.s_blk, ks.s_head, ks.s_tok)
        vs_t, vs_s = vs.tensor, (vs.s_blk, vs.s_head, vs.s_tok)
    else:
        ks_t = vs_t = dummy
        ks_s = vs_s = (0, 0, 0)
    new_k, new_v = call.new_k, call.new_v
    has_new = new_k is not None
    if has_new:
        nk, nv, nk_s, nv_s = new_k, new_v, new_k.stride(), new_v.stride()
    else:
        nk = nv = dummy
        nk_s = nv_s = (0, 0, 0)
    kv_indptr = call.kv_indptr
    ragged = kv_indptr is not None
    bt = call.block_tables
    if bt is not None and not ragged:
        s_bt, nlog = bt.stride(0), bt.shape[1]
    elif ragged:  # the page list's length: kv_indptr entries are clamped to it
        s_bt, nlog = 0, bt.shape[0]
    else:
        s_bt = nlog = 0
    qo, ctx, last = call.qo_indptr, call.context_lens, call.kv_last_page_lens
    alibi, mask, mask_indptr = call.alibi_slopes, call.custom_mask, call.mask_indptr
    softcap, window = call.softcap, call.sliding_window
    kv_fp16 = _kv_in_fp16(key.dtype, key.kv_dtype.itemsize, has_new)
    constexprs = _constexprs(
        key, info, gqa, block_m, block_n, 1 if qo is not None else 0, (2 if call.token_lists else 1) if ragged else 0,
        has_new, call.new_causal, call.skip_decode, mask is not None, call.mask_prefix,
        not has_new and max_qlen > 1, alibi is not None, bool(softcap), window > 0, split,
        _phys_group(info.block_size, block_n, part_tokens), kv_fp16)
    k, v = info.k, info.v
    args = [
        out, query, call.key_cache, call.value_cache, bt if bt is not None else dummy,
        ctx if ctx is not None else dummy, qo if qo is not None else dummy, kv_indptr if ragged else dummy,
        last if last is not None else dummy, ks_t, vs_t, alibi if alibi is not None else dummy, nk, nv,
        mask if mask is not None else dummy, mask_indptr if mask_indptr is not None else dummy, po, pmax, psum,
        *query.stride(), *out.stride(), s_bt, nlog, info.num_blocks, max(max_ctx, 0),
        k.s_blk, k.s_head, v.s_blk, v.s_head, *ks_s, *vs_s, *nk_s, *nv_s, *po_s, *pm_s,
        float(call.scale), float(softcap) if softcap else 1.0, window, part_tokens, max_qlen, query.shape[0],
    ]
    return ((call.num_seqs, Hk, m_tiles * P), args, constexprs, cfg.num_warps, cfg.num_stages,
            (po, pmax, psum) if split else None)


def prepare_launch(call: PagedCall, config: KernelConfig | None = None) -> Launch:
    """The kernel launch of ``call`` (``config`` replaces the tile config)."""
    grid, args, constexprs, num_warps, num_stages, merge = _plan(call, config)
    return Launch(grid, args, dict(zip(CONSTEXPR_NAMES, constexprs)), num_warps, num_stages, merge)


def paged_attention(call: PagedCall) -> None:
    """Launch the kernel (and the split-K merge when partitioned) for ``call``."""
    grid, args, constexprs, num_warps, num_stages, merge = _plan(call, None)
    _paged_attn_kernel[grid](*args, *constexprs, num_warps=num_warps, num_stages=num_stages)
    if merge is not None:
        po, pmax, psum = merge
        ta.splitk_merge(po, pmax, call.out, partial_sum=psum)


# -- cache writes and block copies ----------------------------------------------------------------


@lru_cache(maxsize=32)
def _qmax(dtype: torch.dtype) -> float:
    if dtype == torch.int8:
        return 127.0
    if dtype.is_floating_point and dtype.itemsize == 1:
        return float(torch.finfo(dtype).max)
    return 0.0


def write_cache(src: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor, addr: Addressing, block_size: int,
                mode: int, scale: torch.Tensor | None = None, scale_strides: tuple[int, int, int] = (0, 0, 0),
                num_blocks: int | None = None) -> None:
    """``src [T, H, D]`` -> ``cache`` rows at ``slot_mapping``; slots outside
    ``[0, num_blocks * block_size)`` are skipped."""
    num_slots = (num_blocks if num_blocks is not None else cache.shape[0]) * block_size
    T, H, D = src.shape
    if T == 0:
        return
    qmax, constexprs = _write_constexprs(addr, block_size, mode, cache.dtype, H, D)
    _cache_write_kernel[(T,)](
        src, slot_mapping, cache, scale if scale is not None else src,
        *src.stride(), addr.s_blk, addr.s_head, *scale_strides, H, D, qmax, num_slots, *constexprs,
        num_warps=4, enable_fp_fusion=False,
    )


@lru_cache(maxsize=256)
def _write_constexprs(addr: Addressing, block_size: int, mode: int, cache_dtype: torch.dtype, H: int, D: int):
    """(qmax, the write kernel's constexprs in its signature's order: KV_BLOCK, TX, CX, s_t_hi, s_t_lo,
    s_c_hi, s_c_lo, MODE, IS_INT, BLOCK_H, BLOCK_D) of one specialisation."""
    qmax = 7.0 if mode == MODE_INT4 else _qmax(cache_dtype)
    return qmax, (block_size, addr.TX, addr.CX, addr.s_t_hi, addr.s_t_lo, addr.s_c_hi, addr.s_c_lo, mode,
                  cache_dtype == torch.int8, _pow2(H), _pow2(D // 2 if mode == MODE_INT4 else D, 2))


def block_quant_write(src: torch.Tensor, slot_mapping: torch.Tensor, cache: torch.Tensor, addr: Addressing,
                      block_size: int, num_blocks: int, scales: torch.Tensor, s_sblk: int, s_shead: int) -> None:
    """Grow the per-(block, head) scales, re-quantize grown blocks, then write the new tokens."""
    T, H, D = src.shape
    if T == 0:
        return
    qmax = _qmax(cache.dtype)
    old = scales.clone()  # scales is updated in place; the re-quantization needs the old values
    _block_absmax_kernel[(T,)](src, slot_mapping, scales, *src.stride(), s_sblk, s_shead,
                               H, D, qmax, num_blocks * block_size, KV_BLOCK=block_size, BLOCK_H=_pow2(H),
                               BLOCK_D=_pow2(D, 2), enable_fp_fusion=False)
    _block_requant_kernel[(num_blocks, H)](
        cache, old, scales, s_sblk, s_shead, addr.s_blk, addr.s_head, addr.s_t_hi, addr.s_t_lo, addr.s_c_hi,
        addr.s_c_lo, D, qmax, KV_BLOCK=block_size, TX=addr.TX, CX=addr.CX, IS_INT=cache.dtype == torch.int8,
        BLOCK_T=min(16, _pow2(block_size)), BLOCK_D=_pow2(D, 2), enable_fp_fusion=False)
    write_cache(src, slot_mapping, cache, addr, block_size, MODE_BLOCK, scales, (s_sblk, s_shead, 0), num_blocks)


def kv_cache_write(call: CacheWrite) -> None:
    """Both caches' writes of a ``reshape_and_cache*`` call."""
    info = call.info
    for src, cache, addr, scale, strides in (
            (call.key_rows, call.key_cache, info.k, call.k_scale, call.k_scale_strides),
            (call.value_rows, call.value_cache, info.v, call.v_scale, call.v_scale_strides)):
        if call.mode == MODE_BLOCK:
            block_quant_write(src, call.slot_mapping, cache, addr, info.block_size, info.num_blocks, scale,
                              strides[0], strides[1])
        else:
            write_cache(src, call.slot_mapping, cache, addr, info.block_size, call.mode, scale, strides,
                        info.num_blocks)


def copy_blocks_launch(cache: torch.Tensor, block_mapping: torch.Tensor) -> None:
    """``cache[dst] = cache[src]`` for each row of ``block_mapping [n, 2]`` (int64, cache's device).
    Destinations must be distinct and not also sources (checked by the checks when the mapping is
    on the CPU); out-of-range ids copy nothing."""
    n = block_mapping.shape[0]
    if n == 0:
        return
    block_numel = cache[0].numel()
    BLOCK = 1024
    _copy_blocks_kernel[(n, cdiv(block_numel, BLOCK))](cache, block_mapping, block_numel, cache.shape[0],
                                                       BLOCK=BLOCK)


def copy_blocks(call: CopyBlocks) -> None:
    for cache in call.caches:
        copy_blocks_launch(cache, call.block_mapping.to(cache.device, torch.int64))
