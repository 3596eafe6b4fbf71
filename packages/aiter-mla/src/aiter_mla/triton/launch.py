"""Host side of the MLA kernels: each op's Call -> its kernel launches.

One function per op (named like it) reads the validated Call of :mod:`aiter_mla.checks` and
launches; the attention ops share :func:`attention` (one kernel, three page-table modes), the
split heuristic and the tile configs. Tile configs are a function of the Call key, cached, and
``AITER_<OP>_CONFIG="BLOCK_N=64,num_warps=8"`` overrides their fields (``aiter_core.configs``).

Nothing here reads device memory on the host: configs and split counts come from shapes only,
and the small constant tensors (absent-pointer placeholders, ``arange`` query offsets) are
cached per device, so every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import inspect
from functools import lru_cache
from typing import NamedTuple, Optional

import torch

from aiter_core import configs
from aiter_core.arch import get_arch_info
from aiter_core.triton_attn import max_element_offset, splitk_merge
from aiter_core.triton_utils import cdiv, install_compile_notice, interpreter_active, launch, next_pow2

from ..checks import FP8_DTYPES, MAX_ROPE_KV_HEADS, q_block
from .attention import mla_attn_kernel, mla_attn_persistent_kernel, mla_reduce_kernel
from .cache import _concat_cache_kernel, _fused_rope_cache_kernel
from .rope import _rope_decode_kernel

Tensor = torch.Tensor

install_compile_notice()

# Triton decorates its kernels for the interpreter (or not) when they are imported: fixed from here on
INTERPRET = interpreter_active()
MAX_SPLITS = 16
# Work-equivalent of one extra split, in KV tokens: its prologue (Q load), its partial store and
# its share of the merge. Used by the split heuristic below.
SPLIT_OVERHEAD_TOKENS = 64
MERGE_BLOCK_H = 8
ROPE_BLOCK_HQ = MAX_ROPE_KV_HEADS  # query heads per program of the RoPE kernels; the most KV heads of the cache kernel


class TileConfig(NamedTuple):
    """One launch config of :func:`mla_attn_kernel`: rows per CTA = ``BLOCK_H * BLOCK_Q``."""

    BLOCK_H: int
    BLOCK_Q: int
    BLOCK_N: int
    num_warps: int
    num_stages: int
    ctas_per_sm: int  # how many CTAs of this config share an SM (shared memory bound), for the split heuristic
    prefetch: int = 0  # 1: register double buffering of the KV tiles (see attention._mla_tile)

    @property
    def block_m(self) -> int:
        return self.BLOCK_H * self.BLOCK_Q


def tiling(num_heads: int, max_seqlen_q: int, max_rows: int = 64) -> tuple[int, int]:
    """(BLOCK_H, BLOCK_Q) for ``num_heads`` heads and up to ``max_seqlen_q`` query tokens per
    sequence: all MTP tokens of a sequence in one CTA when they fit, at least 16 rows (the
    smallest ``tl.dot`` M), at most ``max_rows`` (the fp32 accumulator is ``rows x 512``).
    Depends on nothing else, so the persistent metadata and the decode agree on it."""
    block_q = min(next_pow2(max(1, max_seqlen_q)), max_rows // 16 if num_heads >= 16 else max_rows)
    rows = min(max(16, next_pow2(num_heads * block_q)), max_rows)
    block_h = max(1, rows // block_q)
    if block_h * block_q < 16:
        block_h = 16 // block_q
    return block_h, block_q


@lru_cache(maxsize=512)
def default_config(num_heads: int, q_rows: int, kv_dtype: torch.dtype, d_nope: int) -> TileConfig:
    """The tuned launch config for absorbed attention (CPU interpreter: small tiles); ``q_rows``
    is :func:`aiter_mla.checks.q_block` of ``max_seqlen_q`` (all the tiling reads of it)."""
    block_h, block_q = tiling(num_heads, q_rows)
    if INTERPRET:
        return TileConfig(block_h, block_q, 16, 4, 1, 1)
    rows = block_h * block_q
    kv_bytes = 1 if kv_dtype in FP8_DTYPES else kv_dtype.itemsize
    wide = d_nope > 256
    if rows <= 32:
        # memory-bound (mma.sync path): KV tiles prefetched by cp.async, two CTAs per SM
        block_n = 32 if wide else 64
        # H100, b128 h16 ctx4k page64, CUDA-graph timed, 2 splits: bf16 BLOCK_N 32 with 3
        # stages 0.247 ms (2.45 TB/s), 2 stages 0.250-0.255, BLOCK_N 64 0.33 (an earlier
        # sweep that timed eager calls had 3 stages far behind: launch overhead, not the
        # kernel); fp8 (fp16 dots) BLOCK_N 64 spills (61 stores), BLOCK_N 32 does not
        stages = 3 if kv_bytes > 1 else 2
        return TileConfig(block_h, block_q, block_n, 4, stages, 2)
    # compute-bound (64 rows of wgmma): 8 warps share the 64 x 512 fp32 accumulator;
    # BLOCK_N 32 / 3 stages keeps ptxas at 255 registers with (almost) no spills
    return TileConfig(block_h, block_q, 32, 8, 3 if kv_bytes > 1 else 2, 1)


def decode_config(num_heads: int, max_seqlen_q: int, kv_dtype: torch.dtype, d_nope: int = 512,
                  op: str = "mla_decode_fwd") -> TileConfig:
    """The launch config of ``op`` (``AITER_<OP>_CONFIG`` applied) for these dims."""
    return configs.override(op, default_config(num_heads, q_block(max_seqlen_q), kv_dtype, d_nope))


def attention_config(op: str, key) -> TileConfig:
    """:func:`decode_config` from a Call key (:class:`aiter_mla.checks.AttnKey`)."""
    return configs.override(op, default_config(key.num_heads, key.q_block, key.kv_dtype, key.d_nope))


@lru_cache(maxsize=4096)
def auto_num_kv_splits(batch: int, avg_kv_tokens: float, num_heads: int, max_seqlen_q: int, cfg: TileConfig,
                       num_cu: int) -> int:
    """Split count maximising ``occupancy(s) * useful_fraction(s)`` over ``s`` in 1..16.

    * ``occupancy(s)``: CTAs ``batch * head_groups * q_tiles * s`` over the CTA slots they take
      in whole waves, where a wave is ``num_cu * cfg.ctas_per_sm`` CTAs (SM count from
      ``aiter_core.arch.get_arch_info().num_cu``): the fraction of the machine busy.
    * ``useful_fraction(s) = avg_kv / (avg_kv + s * SPLIT_OVERHEAD_TOKENS)``: the per-split
      cost (Q load, partial store, merge) counted in KV tokens.
    Splits never go below ``cfg.BLOCK_N`` tokens each. Shapes only: no host sync.
    """
    ctas = batch * cdiv(num_heads, cfg.BLOCK_H) * cdiv(max(1, max_seqlen_q), cfg.BLOCK_Q)
    slots = max(1, num_cu * cfg.ctas_per_sm)
    limit = max(1, min(MAX_SPLITS, int(avg_kv_tokens // cfg.BLOCK_N)))
    best, best_score = 1, -1.0
    for s in range(1, limit + 1):
        work = ctas * s
        occupancy = work / (cdiv(work, slots) * slots)
        score = occupancy * avg_kv_tokens / (avg_kv_tokens + s * SPLIT_OVERHEAD_TOKENS)
        if score > best_score + 1e-9:
            best, best_score = s, score
    return best


def choose_num_kv_splits(batch: int, kv_tokens: int, num_heads: int, max_seqlen_q: int, kv_dtype: torch.dtype,
                         kv_lora_rank: int = 512, op: str = "mla_decode_fwd") -> int:
    """The automatic split count of ``op`` (:func:`auto_num_kv_splits` with its launch config)."""
    cfg = decode_config(num_heads, max_seqlen_q, kv_dtype, kv_lora_rank, op)
    return auto_num_kv_splits(batch, kv_tokens / max(batch, 1), num_heads, max_seqlen_q, cfg, get_arch_info().num_cu)


@lru_cache(maxsize=64)
def compute_code(dtype: torch.dtype, kv_dtype: torch.dtype, v_dtype: Optional[torch.dtype] = None) -> int:
    """``COMPUTE`` constexpr: the operand type of the dots (see attention.py).

    fp8 caches meet the query in fp16 when every KV operand is fp8 or fp16: fp8 -> fp16 is one
    cheap conversion where fp8 -> bf16 is not (H100, the issue's fp8 shape: 0.331 -> 0.259 ms
    here, 0.253 -> 0.223 ms in aiter-pa), and fp16 holds e4m3 exactly; a bf16 query is clamped to fp16's
    range in the kernel (``saturate_to_fp16``). A bf16 KV operand next to fp8 keeps bf16.
    The interpreter computes fp8 in fp32 (its bf16/fp16 dots are not exact)."""
    kv_types = {kv_dtype, v_dtype or kv_dtype}
    if dtype in FP8_DTYPES or kv_types & set(FP8_DTYPES):
        if INTERPRET:
            return 3
        return 2 if kv_types <= {*FP8_DTYPES, torch.float16} else 1
    if dtype != kv_dtype:
        return 3 if torch.float32 in (dtype, kv_dtype) else 1
    return 0


@lru_cache(maxsize=64)
def fp8_max(dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 ``dtype``; 0.0 for any other dtype (no clamp, no scale)."""
    return float(torch.finfo(dtype).max) if (dtype.itemsize == 1 and dtype.is_floating_point) else 0.0


# -- per-device constants ------------------------------------------------------------------------

_PLACEHOLDERS: dict = {}
_IOTA: dict = {}


def _capturing(t: Tensor) -> bool:
    return t.is_cuda and torch.cuda.is_current_stream_capturing()


def placeholders(device) -> tuple[Tensor, Tensor]:
    """(int32 zeros, float32 ones): tiny tensors standing in for absent optional pointer
    arguments (an index table never read; a missing scale read as 1.0). Cached per device so a
    decode step launches no fill kernels; not cached while a CUDA graph is being captured (their
    memory would belong to the graph's pool)."""
    cached = _PLACEHOLDERS.get(device)
    if cached is not None:
        return cached
    pair = (torch.zeros(2, dtype=torch.int32, device=device), torch.ones(2, dtype=torch.float32, device=device))
    if not _capturing(pair[0]):
        _PLACEHOLDERS[device] = pair
    return pair


def _one(device) -> Tensor:
    return placeholders(device)[1]


def iota(device, n: int) -> Tensor:
    """``arange(n)`` int32 on ``device`` (one query token per sequence: ``qo_indptr``), cached per
    device and length (as :func:`placeholders`)."""
    cached = _IOTA.get((device, n))
    if cached is None:
        cached = torch.arange(n, dtype=torch.int32, device=device)
        if not _capturing(cached):
            _IOTA[(device, n)] = cached
    return cached


def offset_bits(*caches: Tensor) -> int:
    """32 when every element of the caches is within 2**31 of its data pointer (int32 address
    arithmetic in the kernels: a sixth fewer instructions in the memory-bound decode), else 64."""
    for c in caches:
        # a contiguous tensor's last element is numel - 1 from its pointer (the common case, cheaply)
        if (c.numel() - 1 if c.is_contiguous() else max_element_offset(c)) >= 2**31:
            return 64
    return 32


def _constexpr_names(kernel) -> tuple[str, ...]:
    """The ``tl.constexpr`` parameters of ``kernel`` in signature order (they follow every runtime
    parameter, so a launch can pass them positionally after the runtime arguments: keyword
    arguments cost microseconds per launch in Triton's launcher and in Python)."""
    params = list(inspect.signature(kernel.fn).parameters.values())
    is_constexpr = ["constexpr" in str(p.annotation) for p in params]
    first = is_constexpr.index(True)
    if not all(is_constexpr[first:]):
        raise TypeError(f"{kernel.fn.__name__}: the constexpr parameters must come after the runtime ones")
    return tuple(p.name for p in params[first:])


_ATTN_CONSTEXPRS = _constexpr_names(mla_attn_kernel)


@lru_cache(maxsize=1024)
def attention_constexprs(config: TileConfig, d_nope: int, d_rope: int, d_v: int, separate_v: bool, page_size: int,
                         table_mode: int, causal: bool, compute: int, write_lse: bool, has_q_scale: bool,
                         has_kv_scale: bool, has_v_scale: bool, softcap: bool, last_rope: bool,
                         offset_bits: int) -> tuple:
    """The constexpr arguments of :func:`mla_attn_kernel` for one specialisation, in its
    signature order (see :func:`_constexpr_names`)."""
    named = dict(
        D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v,
        BLOCK_DN=max(16, next_pow2(d_nope)), BLOCK_DR=max(16, next_pow2(d_rope)), BLOCK_DV=max(16, next_pow2(d_v)),
        SEPARATE_V=separate_v, BLOCK_H=config.BLOCK_H, BLOCK_Q=config.BLOCK_Q, BLOCK_N=config.BLOCK_N,
        PAGE_SIZE=page_size, TABLE_MODE=table_mode, CAUSAL=causal, COMPUTE=compute, WRITE_LSE=write_lse,
        HAS_Q_SCALE=has_q_scale, HAS_KV_SCALE=has_kv_scale, HAS_V_SCALE=has_v_scale, SOFTCAP=softcap,
        LAST_ROPE=last_rope, PREFETCH=bool(config.prefetch), OFFSET_BITS=offset_bits,
    )
    return tuple(named[name] for name in _ATTN_CONSTEXPRS)


# -- the attention kernel --------------------------------------------------------------------------


def attention(q: Tensor, kv: Tensor, out: Tensor, *, qo_indptr: Tensor, max_seqlen_q: int, table_mode: int,
              page_size: int, d_nope: int, sm_scale: float, causal: bool, config: TileConfig,
              kv_indptr: Optional[Tensor] = None, kv_indices: Optional[Tensor] = None,
              kv_last_page_lens: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
              block_tables: Optional[Tensor] = None, v: Optional[Tensor] = None, lse: Optional[Tensor] = None,
              q_scale: Optional[Tensor] = None, kv_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
              num_splits: int = 1, partial_o: Optional[Tensor] = None, partial_lse: Optional[Tensor] = None,
              softcap: float = 0.0, last_rope: Optional[Tensor] = None, always_partials: bool = False) -> None:
    """Attention of ``q [T, H, D]`` over ``kv`` into ``out [T, H, Dv]`` (and ``lse [T, H]``).

    ``kv`` is ``[pages, page_size, Hk, D]`` or ``[tokens, Hk, D]`` (page size 1); ``v`` (same
    layout) a separate V, else V is the first ``Dv`` values of the K rows. With ``num_splits >
    1`` (or ``always_partials``) the split partials go to ``partial_o [T, H, S, Dv]`` and
    ``partial_lse [T, H, S]`` (fp32, any strides; rows, then splits: the layout of the merge),
    then are merged into ``out``/``lse``.
    ``softcap > 0`` caps the scores; ``last_rope [B, D_ROPE]`` replaces the rope part of each
    sequence's last key (decode with in-kernel RoPE).
    """
    total_q, num_heads, dim = q.shape
    batch = qo_indptr.shape[0] - 1
    if batch <= 0 or total_q == 0:
        return  # nothing to attend (an empty grid is not launched)
    device = q.device
    kv_shape, kv_st = kv.shape, kv.stride()
    if len(kv_shape) == 4:
        stride_page, stride_tok, stride_head, kv_heads = kv_st[0], kv_st[1], kv_st[2], kv_shape[2]
    else:
        stride_page, stride_tok, stride_head, kv_heads = kv_st[0], 0, kv_st[1], kv_shape[1]
    if v is None:
        vbuf, v_page, v_tok, v_head, d_v, v_dtype = kv, stride_page, stride_tok, stride_head, out.shape[2], None
        bits = offset_bits(kv)
    else:
        v_st = v.stride()
        vbuf, d_v, v_dtype = v, v.shape[-1], v.dtype
        v_page, v_tok, v_head = (v_st[0], v_st[1], v_st[2]) if v.dim() == 4 else (v_st[0], 0, v_st[1])
        bits = offset_bits(kv, v)
    heads_per_kv = num_heads // kv_heads
    if kv_heads > 1:
        # one KV head per CTA: the head group may not straddle two KV heads
        block_h = min(config.BLOCK_H, next_pow2(heads_per_kv))
        while heads_per_kv % block_h:
            block_h //= 2
        block_q = max(16 // block_h, min(config.block_m // block_h, next_pow2(max_seqlen_q)))
        config = config._replace(BLOCK_H=block_h, BLOCK_Q=block_q)
    q_tiles = cdiv(max(1, max_seqlen_q), config.BLOCK_Q)
    q_st = q.stride()
    split = num_splits > 1 or always_partials
    if split:
        po_st, pl_st = partial_o.stride(), partial_lse.stride()
        o_dst, o_t, o_h, o_s = partial_o, po_st[0], po_st[1], po_st[2]
        l_dst, l_t, l_h, l_s = partial_lse, pl_st[0], pl_st[1], pl_st[2]
    else:
        out_st = out.stride()
        o_dst, o_t, o_s, o_h = out, out_st[0], 0, out_st[1]
        if lse is not None:
            lse_st = lse.stride()
            l_dst, l_t, l_s, l_h = lse, lse_st[0], 0, lse_st[1]
        else:
            l_dst, l_t, l_s, l_h = None, 0, 0, 0
    dummy, one = placeholders(device)
    constexprs = attention_constexprs(config, d_nope, dim - d_nope, d_v, v is not None, page_size, table_mode, causal,
                                      compute_code(q.dtype, kv.dtype, v_dtype), split or lse is not None,
                                      q_scale is not None, kv_scale is not None, v_scale is not None, softcap > 0,
                                      last_rope is not None, bits)
    grid = (batch * q_tiles, cdiv(num_heads, config.BLOCK_H), num_splits)
    launch(mla_attn_kernel, grid,
        q, q_st[0], q_st[1],
        kv, stride_page, stride_tok, stride_head,
        vbuf, v_page, v_tok, v_head,
        qo_indptr, dummy if kv_indptr is None else kv_indptr, dummy if kv_indices is None else kv_indices,
        dummy if kv_last_page_lens is None else kv_last_page_lens, dummy if seqused_k is None else seqused_k,
        dummy if block_tables is None else block_tables, 0 if block_tables is None else block_tables.stride(0),
        o_dst, o_t, o_s, o_h,
        one if l_dst is None else l_dst, l_t, l_s, l_h,
        one if q_scale is None else q_scale, one if kv_scale is None else kv_scale,
        one if v_scale is None else v_scale,
        one if last_rope is None else last_rope, 0 if last_rope is None else last_rope.stride(0),
        sm_scale, softcap, num_heads, heads_per_kv, kv_shape[0], q_tiles, num_splits,
        block_tables.shape[1] if table_mode == 1 else kv_indices.shape[0], total_q, max(1, max_seqlen_q),
        *constexprs, num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split:
        splitk_merge(partial_o, partial_lse, out, lse)  # aiter_core's split-K merge over rows (T, H)


# -- one launcher per op ----------------------------------------------------------------------------


def _paged(call, op: str) -> None:
    """Page-level tables (table mode 0): ``mla_decode_fwd`` (split KV) and ``mla_prefill_fwd``."""
    key = call.key
    attention(call.q, call.kv_buffer, call.o, qo_indptr=call.qo_indptr, max_seqlen_q=call.max_seqlen_q, table_mode=0,
              page_size=call.page_size, d_nope=key.d_nope, sm_scale=call.sm_scale, causal=call.causal,
              config=attention_config(op, key), kv_indptr=call.kv_indptr, kv_indices=call.kv_indices,
              kv_last_page_lens=call.kv_last_page_lens, lse=call.final_lse, q_scale=call.q_scale,
              kv_scale=call.kv_scale, num_splits=call.num_kv_splits,
              partial_o=None if call.logits is None else call.logits.permute(0, 2, 1, 3),
              partial_lse=None if call.attn_lse is None else call.attn_lse.permute(0, 2, 1))


def mla_decode_fwd(call) -> None:
    _paged(call, "mla_decode_fwd")


def mla_prefill_fwd(call) -> None:
    _paged(call, "mla_prefill_fwd")


def mla_decode_fwd_persistent(call) -> None:
    """Stage 1 (every worker runs its work items), then the reduce of the split slots."""
    q, kv, key = call.q, call.kv_buffer, call.key
    total_q, num_heads, dim = q.shape
    workers = call.work_indptr.shape[0] - 1
    if workers > 0 and total_q > 0:
        # the work items' head and token ranges come from tiling(): the CTA tile must match them
        block_h, block_q = tiling(num_heads, call.max_seqlen_q)
        config = attention_config("mla_decode_fwd_persistent", key)._replace(BLOCK_H=block_h, BLOCK_Q=block_q)
        kv_st = kv.stride()
        one = _one(q.device)
        lse = call.final_lse
        po = call.partial_o.view(call.partial_o.shape[0], num_heads, key.d_v)
        pl = call.partial_lse.view(call.partial_lse.shape[0], num_heads)
        d_nope = key.d_nope
        q_st, o_st, po_st, pl_st = q.stride(), call.o.stride(), po.stride(), pl.stride()
        launch(mla_attn_persistent_kernel, (workers,),
            q, q_st[0], q_st[1],
            kv, kv_st[0], kv_st[1],
            call.qo_indptr, call.kv_indptr, call.kv_indices,
            call.work_indptr, call.work_info_set,
            call.o, o_st[0], o_st[1],
            one if lse is None else lse, 0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
            po, po_st[0], po_st[1],
            pl, pl_st[0], pl_st[1],
            one if call.q_scale is None else call.q_scale, one if call.kv_scale is None else call.kv_scale,
            call.sm_scale, num_heads, kv.shape[0], call.kv_indices.shape[0], total_q,
            D_NOPE=d_nope, D_ROPE=dim - d_nope, BLOCK_DN=max(16, next_pow2(d_nope)),
            BLOCK_DR=max(16, next_pow2(dim - d_nope)),
            BLOCK_H=config.BLOCK_H, BLOCK_Q=config.BLOCK_Q, BLOCK_N=config.BLOCK_N, PAGE_SIZE=call.page_size,
            MAX_Q=call.max_seqlen_q, CAUSAL=call.causal, COMPUTE=compute_code(q.dtype, kv.dtype),
            WRITE_LSE=lse is not None, HAS_Q_SCALE=call.q_scale is not None, HAS_KV_SCALE=call.kv_scale is not None,
            OFFSET_BITS=offset_bits(kv), num_warps=config.num_warps, num_stages=config.num_stages,
        )
    reduce(call.partial_o, call.partial_lse, call.reduce_indptr, call.reduce_final_map, call.reduce_partial_map,
           call.max_seqlen_q, call.o, call.final_lse)


def reduce(partial_o: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
           reduce_partial_map: Tensor, max_seqlen_q: int, out: Tensor, lse: Optional[Tensor]) -> None:
    """Merge partial slots into ``out`` (and ``lse``) per reduce tile."""
    tiles = reduce_final_map.shape[0]
    _, heads, d_v = out.shape
    if tiles == 0 or max_seqlen_q == 0:
        return
    po = partial_o.reshape(partial_o.shape[0], heads, d_v)
    pl = partial_lse.reshape(partial_lse.shape[0], heads)
    one = _one(out.device)
    grid = (tiles, max_seqlen_q, cdiv(heads, MERGE_BLOCK_H))
    po_st, pl_st, o_st = po.stride(), pl.stride(), out.stride()
    launch(mla_reduce_kernel, grid,
        po, po_st[0], po_st[1],
        pl, pl_st[0], pl_st[1],
        reduce_indptr, reduce_final_map, reduce_partial_map,
        out, o_st[0], o_st[1],
        one if lse is None else lse, 0 if lse is None else lse.stride(0), 0 if lse is None else lse.stride(1),
        heads,
        MAX_Q=max_seqlen_q, D_V=d_v, BLOCK_D=max(16, next_pow2(d_v)), BLOCK_HM=MERGE_BLOCK_H,
        WRITE_LSE=lse is not None, num_warps=4,
    )


def mla_reduce_v1(call) -> None:
    reduce(call.partial_output, call.partial_lse, call.reduce_indptr, call.reduce_final_map, call.reduce_partial_map,
           call.max_seqlen_q, call.final_output, call.final_lse)


def mla_prefill_ps_fwd(call) -> None:
    """Non-absorbed prefill: token rows (table mode 2, page size 1), a separate V."""
    key = call.key
    attention(call.q, call.k, call.output, qo_indptr=call.qo_indptr, max_seqlen_q=call.max_seqlen_q, table_mode=2,
              page_size=1, d_nope=key.d_nope, sm_scale=call.softmax_scale, causal=call.is_causal,
              config=attention_config("mla_prefill_ps_fwd", key), kv_indptr=call.kv_indptr,
              kv_indices=call.kv_page_indices, v=call.v, lse=call.lse, q_scale=call.q_scale, kv_scale=call.k_scale,
              v_scale=call.v_scale)


def mla_attention_block_table(call) -> None:
    """Block tables + ``seqused_k`` (table mode 1)."""
    key = call.key
    attention(call.q, call.kv_buffer, call.out, qo_indptr=call.cu_seqlens_q, max_seqlen_q=call.max_seqlen_q,
              table_mode=1, page_size=call.kv_buffer.shape[1], d_nope=key.d_nope, sm_scale=call.softmax_scale,
              causal=call.causal, config=attention_config("mla_attention_block_table", key),
              seqused_k=call.seqused_k, block_tables=call.block_tables, lse=call.lse, q_scale=call.q_descale,
              kv_scale=call.kv_descale, num_splits=call.num_splits,
              partial_o=None if call.partial_o is None else call.partial_o.permute(0, 2, 1, 3),
              partial_lse=None if call.partial_lse is None else call.partial_lse.permute(0, 2, 1))


def decode_attention_fwd_grouped_rope(call) -> None:
    """SGLang decode (page size 1, token-level ``kv_indptr``/``kv_indices``, table mode 2): split
    partials in ``attn_logits [B, H, S, lora + 1]`` (``[..., :lora]`` output, ``[..., lora]``
    LSE), merged into ``o``. With RoPE, a small kernel first rotates q (into a copy) and each
    sequence's last key (into ``k_pe_tokens``), which the attention substitutes for the cached one."""
    q, key, lora = call.q, call.key, call.kv_lora_rank
    batch = q.shape[0]
    last_rope = None
    if call.use_rope:
        q = q.clone()
        k_pe = last_rope = call.k_pe_tokens
        k_buffer, cos_sin = call.k_buffer, call.cos_sin_cache
        rope = key.d_rope
        q_st, rot_st = call.q.stride(), q.stride()
        launch(_rope_decode_kernel, (batch,),
            call.q, q_st[0], q_st[1], q, rot_st[0], rot_st[1],
            k_buffer, k_buffer.stride()[0], k_pe, k_pe.stride()[0],
            call.kv_indptr, call.kv_indices, call.positions, cos_sin, cos_sin.stride(0),
            key.num_heads, cos_sin.shape[0], call.kv_indices.shape[0], k_buffer.shape[0],
            LORA=lora, ROPE=rope, ROT=call.rotary_dim, BLOCK_R=max(16, next_pow2(rope)), BLOCK_HQ=ROPE_BLOCK_HQ,
            IS_NEOX=call.is_neox_style, num_warps=4,
        )
    logits = call.attn_logits
    attention(q, call.k_buffer, call.o, qo_indptr=iota(q.device, batch + 1), max_seqlen_q=1, table_mode=2,
              page_size=1, d_nope=lora, sm_scale=call.sm_scale, causal=False,
              config=attention_config("decode_attention_fwd_grouped_rope", key), kv_indptr=call.kv_indptr,
              kv_indices=call.kv_indices, v=None if key.v_dtype is None else call.v_buffer,
              num_splits=call.num_kv_splits, partial_o=logits.narrow(3, 0, lora), partial_lse=logits.select(3, lora),
              softcap=call.logit_cap, last_rope=last_rope,
              always_partials=True)


def decode_attention_fwd(call) -> None:
    """SGLang decode over ``req_to_token`` pages (table mode 1 with the token rows viewed as
    ``[pages, page_size, Hk, D]``); partials in ``attn_logits`` (LSE in its last channel or in
    ``attn_lse``), merged into ``o`` / ``lse``."""
    q, key, page = call.q, call.key, call.page_size
    k, v = call.k_buffer, call.v_buffer
    absorbed = key.v_dtype is None
    logits, d_v = call.attn_logits, key.d_v
    attention(q, k.view(-1, page, *k.shape[1:]), call.o, qo_indptr=iota(q.device, q.shape[0] + 1), max_seqlen_q=1,
              table_mode=1, page_size=page, d_nope=key.d_nope, sm_scale=call.sm_scale, causal=False,
              config=attention_config("decode_attention_fwd", key), seqused_k=call.b_seq_len,
              block_tables=call.req_to_token, v=None if absorbed else v.view(-1, page, *v.shape[1:]), lse=call.lse,
              kv_scale=call.k_scale, v_scale=None if absorbed else call.v_scale, num_splits=call.num_kv_splits,
              partial_o=logits.narrow(3, 0, d_v),
              partial_lse=logits.select(3, d_v) if call.attn_lse is None else call.attn_lse,
              softcap=call.logit_cap, always_partials=True)


# -- cache ops ----------------------------------------------------------------------------------------


def concat_and_cache_mla(call) -> None:
    kv_c, k_pe, cache = call.kv_c, call.k_pe, call.kv_cache
    tokens, lora = kv_c.shape
    if tokens == 0:
        return
    pe = k_pe.shape[1]
    fp8 = fp8_max(cache.dtype)
    c_st = cache.stride()
    launch(_concat_cache_kernel, (tokens,),
        kv_c, kv_c.stride()[0], k_pe, k_pe.stride()[0], cache, c_st[0], c_st[1], call.slot_mapping,
        _one(cache.device) if call.scale is None else call.scale, cache.shape[1], cache.shape[0] * cache.shape[1],
        LORA=lora, PE=pe, BLOCK_L=next_pow2(lora), BLOCK_P=next_pow2(pe), FP8=fp8 > 0, FP8_MAX=fp8, num_warps=4,
    )


def _fused_rope_cache(q_nope, q_pe, k_nope, k_pe, cache_rows, cache_head_stride, block_size, slot_mapping, pos, cos,
                      sin, q_out, k_pe_out, decode_q_pe_out, q_scale, k_scale, is_neox, nope_first) -> None:
    """RoPE + cache write of :func:`cache._fused_rope_cache_kernel`: ``k_nope``/``k_pe`` are
    ``[T, KH, D]``; ``cache_rows`` is addressed as ``block * stride(0) + in_block * stride(1) +
    head * cache_head_stride``."""
    n_q, q_heads, d1 = q_nope.shape
    d2 = q_pe.shape[-1]
    n_k, k_heads = k_nope.shape[0], k_nope.shape[1]
    tokens = max(n_q, n_k)
    if tokens == 0:
        return
    one = _one(q_nope.device)
    q_fp8, k_fp8 = fp8_max(q_out.dtype), fp8_max(cache_rows.dtype)
    dqp = decode_q_pe_out
    qn_st, qp_st, kn_st, kp_st, qo_st, c_st = (q_nope.stride(), q_pe.stride(), k_nope.stride(), k_pe.stride(),
                                               q_out.stride(), cache_rows.stride())
    kpo_st = (0, 0) if k_pe_out is None else k_pe_out.stride()
    dqp_st = (0, 0) if dqp is None else dqp.stride()
    grid = (tokens, cdiv(q_heads, ROPE_BLOCK_HQ) + 1)
    launch(_fused_rope_cache_kernel, grid,
        q_nope, qn_st[0], qn_st[1], q_pe, qp_st[0], qp_st[1],
        k_nope, kn_st[0], kn_st[1], k_pe, kp_st[0], kp_st[1],
        q_out, qo_st[0], qo_st[1],
        one if k_pe_out is None else k_pe_out, kpo_st[0], kpo_st[1],
        one if dqp is None else dqp, dqp_st[0], dqp_st[1], 0 if dqp is None else dqp.shape[0],
        cache_rows, c_st[0], c_st[1], cache_head_stride, block_size, cache_rows.shape[0] * block_size, slot_mapping,
        pos, cos, sin, cos.stride(0), cos.shape[0], one if q_scale is None else q_scale, one if k_scale is None else k_scale,
        n_q, n_k, q_heads, k_heads,
        D1=d1, D2=d2, B1=next_pow2(d1), B2=next_pow2(d2), BLOCK_HQ=ROPE_BLOCK_HQ, IS_NEOX=is_neox,
        COS_FULL=cos.shape[-1] == d2, NOPE_FIRST=nope_first, Q_FP8=q_fp8 > 0, K_FP8=k_fp8 > 0,
        Q_FP8_MAX=q_fp8, K_FP8_MAX=k_fp8, HAS_KPE_OUT=k_pe_out is not None, HAS_DQP=dqp is not None,
        num_warps=4,
    )


def fused_qk_rope_concat_and_cache_mla(call) -> None:
    """Cache ``[blocks, block_size, (1,) D]``, one KV head (``kv_c``/``k_pe`` are ``[T, 1, D]``)."""
    _fused_rope_cache(call.q_nope, call.q_pe, call.kv_c, call.k_pe, call.kv_cache, 0, call.kv_cache.shape[1],
                      call.slot_mapping, call.positions, call.cos_cache, call.sin_cache, call.q_out, None, None,
                      call.q_scale, call.k_scale, call.is_neox, call.is_nope_first)


def fused_qk_rope_cat_and_cache_mla(call) -> None:
    """Cache ``[rows, KH, D1 + D2]``, slot = row (block size 1)."""
    cache = call.kv_cache
    k_scale = call.k_scale if call.apply_scale else None  # an fp8 cache without a scale stores x / 1
    _fused_rope_cache(call.q_nope, call.q_pe, call.k_nope, call.k_pe, cache.unsqueeze(1), cache.stride()[1], 1,
                      call.slot_mapping, call.pos, call.cos, call.sin, call.q_out, call.k_pe_out,
                      call.decode_q_pe_out, None, k_scale, call.is_neox, True)
    if call.q_nope_zeros_out is not None:
        call.q_nope_zeros_out.zero_()
