"""Host side of the MLA kernels: tile and launch configs, the split heuristic, launches.

Nothing here reads device memory on the host: configs and split counts come from shapes only,
so every launch can be captured in a CUDA graph.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Optional

import torch

from aiter_core.triton_attn import max_element_offset, splitk_merge
from aiter_core.triton_utils import cdiv

from .attention import mla_attn_kernel, mla_attn_persistent_kernel, mla_reduce_kernel

Tensor = torch.Tensor

FP8_DTYPES = tuple(
    getattr(torch, n) for n in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz") if hasattr(torch, n)
)
MAX_SPLITS = 16
# Work-equivalent of one extra split, in KV tokens: its prologue (Q load), its partial store and
# its share of the merge. Used by the split heuristic below.
SPLIT_OVERHEAD_TOKENS = 64
MERGE_BLOCK_H = 8


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_pow2(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


@dataclass(frozen=True)
class TileConfig:
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


def decode_config(num_heads: int, max_seqlen_q: int, kv_dtype: torch.dtype, d_nope: int = 512) -> TileConfig:
    """The launch config for absorbed decode/prefill on a GPU (CPU interpreter: small tiles).

    Override with ``AITER_MLA_CONFIG="BLOCK_N=64,num_warps=8,num_stages=2,BLOCK_H=32"``.
    """
    block_h, block_q = tiling(num_heads, max_seqlen_q)
    if interpreting():
        cfg = TileConfig(block_h, block_q, 16, 4, 1, 1)
    else:
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
            cfg = TileConfig(block_h, block_q, block_n, 4, stages, 2)
        else:
            # compute-bound (64 rows of wgmma): 8 warps share the 64 x 512 fp32 accumulator;
            # BLOCK_N 32 / 3 stages keeps ptxas at 255 registers with (almost) no spills
            cfg = TileConfig(block_h, block_q, 32, 8, 3 if kv_bytes > 1 else 2, 1)
    return _env_override(cfg)


def _env_override(cfg: TileConfig) -> TileConfig:
    spec = os.environ.get("AITER_MLA_CONFIG", "").strip()
    if not spec:
        return cfg
    fields = {}
    for item in spec.split(","):
        key, _, value = item.partition("=")
        key = key.strip()
        if key not in TileConfig.__dataclass_fields__:
            raise ValueError(f"AITER_MLA_CONFIG: unknown field {key!r} (known: {', '.join(TileConfig.__dataclass_fields__)})")
        fields[key] = int(value)
    return replace(cfg, **fields)


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


def compute_code(dtype: torch.dtype, kv_dtype: torch.dtype, v_dtype: Optional[torch.dtype] = None) -> int:
    """``COMPUTE`` constexpr: the operand type of the dots (see attention.py).

    fp8 caches meet the query in fp16 when every KV operand is fp8 or fp16: fp8 -> fp16 is one
    cheap conversion where fp8 -> bf16 is not (H100, the issue's fp8 shape: 0.331 -> 0.259 ms
    here, 0.253 -> 0.223 ms in aiter-pa), and fp16 holds e4m3 exactly; a bf16 query is clamped to fp16's
    range in the kernel (``saturate_to_fp16``). A bf16 KV operand next to fp8 keeps bf16.
    The interpreter computes fp8 in fp32 (its bf16/fp16 dots are not exact)."""
    kv_types = {kv_dtype, v_dtype or kv_dtype}
    if dtype in FP8_DTYPES or kv_types & set(FP8_DTYPES):
        if interpreting():
            return 3
        return 2 if kv_types <= {*FP8_DTYPES, torch.float16} else 1
    if dtype != kv_dtype:
        return 3 if torch.float32 in (dtype, kv_dtype) else 1
    return 0


_PLACEHOLDERS: dict = {}


def _placeholder(device, dtype: torch.dtype, value: float) -> Tensor:
    """A tiny tensor standing in for an absent optional pointer argument (never read, or read as
    1.0 for a missing scale). Cached per device so a decode step launches no fill kernels; not
    cached while a CUDA graph is being captured (its memory belongs to the graph's pool)."""
    key = (str(device), dtype)
    cached = _PLACEHOLDERS.get(key)
    if cached is not None:
        return cached
    t = torch.full((2,), value, dtype=dtype, device=device)
    capturing = t.is_cuda and torch.cuda.is_current_stream_capturing()
    if not capturing:
        _PLACEHOLDERS[key] = t
    return t


def _dummy(device) -> Tensor:
    return _placeholder(device, torch.int32, 0)


def _f32_dummy(device) -> Tensor:
    return _placeholder(device, torch.float32, 1.0)


def _kv_strides(buf: Tensor) -> tuple[int, int, int]:
    """(page, token-in-page, head) strides of a ``[pages, page_size, Hk, D]`` or ``[tokens, Hk, D]``
    buffer (the latter: page size 1)."""
    if buf.dim() == 4:
        return buf.stride(0), buf.stride(1), buf.stride(2)
    return buf.stride(0), 0, buf.stride(1)


def offset_bits(*caches: Tensor) -> int:
    """32 when every element of the caches is within 2**31 of its data pointer (int32 address
    arithmetic in the kernels: a sixth fewer instructions in the memory-bound decode), else 64."""
    return 32 if max(max_element_offset(c) for c in caches) < 2**31 else 64


def attention(q: Tensor, kv: Tensor, out: Tensor, *, qo_indptr: Tensor, max_seqlen_q: int, table_mode: int,
              page_size: int, d_nope: int, sm_scale: float, causal: bool,
              kv_indptr: Optional[Tensor] = None, kv_indices: Optional[Tensor] = None,
              kv_last_page_lens: Optional[Tensor] = None, seqused_k: Optional[Tensor] = None,
              block_tables: Optional[Tensor] = None, v: Optional[Tensor] = None, lse: Optional[Tensor] = None,
              q_scale: Optional[Tensor] = None, kv_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
              num_splits: int = 1, partial_o: Optional[Tensor] = None, partial_lse: Optional[Tensor] = None,
              config: Optional[TileConfig] = None, softcap: float = 0.0, last_rope: Optional[Tensor] = None,
              merge_partials: bool = True, always_partials: bool = False) -> None:
    """Run attention of ``q [T, H, D]`` over ``kv`` into ``out [T, H, Dv]`` (and ``lse [T, H]``).

    With ``num_splits > 1`` the split partials go to ``partial_o [T, S, H, Dv]`` and
    ``partial_lse [T, S, H]`` (fp32, any strides), then are merged into ``out``/``lse``.
    ``softcap > 0`` caps the scores (``softcap * tanh(s / softcap)``); ``last_rope [B, D_ROPE]``
    replaces the rope part of each sequence's last key (decode with in-kernel RoPE).
    """
    device = q.device
    num_heads, dim = q.shape[1], q.shape[2]
    d_rope = dim - d_nope
    d_v = out.shape[-1] if v is None else v.shape[-1]
    kv_heads = kv.shape[-2]
    heads_per_kv = num_heads // kv_heads
    if config is None:
        config = decode_config(num_heads, max_seqlen_q, kv.dtype, d_nope)
    if kv_heads > 1:
        # one KV head per CTA: the head group may not straddle two KV heads
        block_h = min(config.BLOCK_H, next_pow2(heads_per_kv))
        while heads_per_kv % block_h:
            block_h //= 2
        block_q = max(16 // block_h, min(config.block_m // block_h, next_pow2(max_seqlen_q)))
        config = replace(config, BLOCK_H=block_h, BLOCK_Q=block_q)
    batch = qo_indptr.numel() - 1
    if batch <= 0 or q.shape[0] == 0:
        return  # nothing to attend (an empty grid is not launched)
    q_tiles = cdiv(max(1, max_seqlen_q), config.BLOCK_Q)
    stride_page, stride_tok, stride_head = _kv_strides(kv)
    vbuf = kv if v is None else v
    v_page, v_tok, v_head = _kv_strides(vbuf)
    dummy = _dummy(device)
    one = _f32_dummy(device)
    split = num_splits > 1 or always_partials
    if split:
        o_t, o_s, o_h = partial_o.stride(0), partial_o.stride(1), partial_o.stride(2)
        l_t, l_s, l_h = partial_lse.stride(0), partial_lse.stride(1), partial_lse.stride(2)
        o_dst, l_dst = partial_o, partial_lse
    else:
        o_t, o_s, o_h = out.stride(0), 0, out.stride(1)
        l_dst = lse if lse is not None else one
        l_t, l_s, l_h = (lse.stride(0), 0, lse.stride(1)) if lse is not None else (0, 0, 0)
        o_dst = out
    grid = (batch * q_tiles, cdiv(num_heads, config.BLOCK_H), num_splits)
    mla_attn_kernel[grid](
        q, q.stride(0), q.stride(1),
        kv, stride_page, stride_tok, stride_head,
        vbuf, v_page, v_tok, v_head,
        qo_indptr, kv_indptr if kv_indptr is not None else dummy, kv_indices if kv_indices is not None else dummy,
        kv_last_page_lens if kv_last_page_lens is not None else dummy, seqused_k if seqused_k is not None else dummy,
        block_tables if block_tables is not None else dummy, block_tables.stride(0) if block_tables is not None else 0,
        o_dst, o_t, o_s, o_h,
        l_dst, l_t, l_s, l_h,
        q_scale if q_scale is not None else one, kv_scale if kv_scale is not None else one,
        v_scale if v_scale is not None else one,
        last_rope if last_rope is not None else one, last_rope.stride(0) if last_rope is not None else 0,
        float(sm_scale), float(softcap), num_heads, heads_per_kv, kv.shape[0], q_tiles, num_splits,
        block_tables.shape[1] if table_mode == 1 else kv_indices.numel(), q.shape[0],
        D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v,
        BLOCK_DN=max(16, next_pow2(d_nope)), BLOCK_DR=max(16, next_pow2(d_rope)), BLOCK_DV=max(16, next_pow2(d_v)),
        SEPARATE_V=v is not None, BLOCK_H=config.BLOCK_H, BLOCK_Q=config.BLOCK_Q, BLOCK_N=config.BLOCK_N,
        PAGE_SIZE=page_size, TABLE_MODE=table_mode,
        CAUSAL=causal, COMPUTE=compute_code(q.dtype, kv.dtype, v.dtype if v is not None else None), WRITE_LSE=split or lse is not None,
        HAS_Q_SCALE=q_scale is not None, HAS_KV_SCALE=kv_scale is not None, HAS_V_SCALE=v_scale is not None,
        SOFTCAP=softcap > 0, LAST_ROPE=last_rope is not None, PREFETCH=bool(config.prefetch),
        OFFSET_BITS=offset_bits(kv, vbuf), num_warps=config.num_warps, num_stages=config.num_stages,
    )
    if split and merge_partials:
        merge(partial_o, partial_lse, out, lse)


def merge(partial_o: Tensor, partial_lse: Tensor, out: Tensor, lse: Optional[Tensor]) -> None:
    """LSE-weighted merge of ``partial_o [T, S, H, Dv]`` / ``partial_lse [T, S, H]`` into
    ``out [T, H, Dv]`` (and ``lse [T, H]``), by aiter_core's split-K merge (rows (T, H))."""
    if partial_o.shape[0] == 0:
        return
    splitk_merge(partial_o.permute(0, 2, 1, 3), partial_lse.permute(0, 2, 1), out, lse)


def persistent_attention(q: Tensor, kv: Tensor, out: Tensor, *, qo_indptr: Tensor, kv_indptr: Tensor,
                         kv_indices: Tensor, page_size: int, d_nope: int, max_seqlen_q: int, sm_scale: float,
                         causal: bool, work_indptr: Tensor, work_info_set: Tensor, partial_o: Tensor,
                         partial_lse: Tensor, lse: Optional[Tensor] = None, q_scale: Optional[Tensor] = None,
                         kv_scale: Optional[Tensor] = None, config: Optional[TileConfig] = None) -> None:
    """Stage 1 of the persistent form: every worker runs its work items (see the kernel)."""
    num_heads, dim = q.shape[1], q.shape[2]
    if config is None:
        config = decode_config(num_heads, max_seqlen_q, kv.dtype, d_nope)
    # the work items' head and token ranges come from tiling(): the CTA tile must match them
    block_h, block_q = tiling(num_heads, max_seqlen_q)
    config = replace(config, BLOCK_H=block_h, BLOCK_Q=block_q)
    stride_page, stride_tok, _ = _kv_strides(kv)
    one = _f32_dummy(q.device)
    workers = work_indptr.numel() - 1
    if workers <= 0 or q.shape[0] == 0:
        return
    po = partial_o.reshape(partial_o.shape[0], num_heads, partial_o.shape[-1])
    pl = partial_lse.reshape(partial_lse.shape[0], num_heads)
    mla_attn_persistent_kernel[(workers,)](
        q, q.stride(0), q.stride(1),
        kv, stride_page, stride_tok,
        qo_indptr, kv_indptr, kv_indices,
        work_indptr, work_info_set,
        out, out.stride(0), out.stride(1),
        lse if lse is not None else one, lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        po, po.stride(0), po.stride(1),
        pl, pl.stride(0), pl.stride(1),
        q_scale if q_scale is not None else one, kv_scale if kv_scale is not None else one,
        float(sm_scale), num_heads, kv.shape[0], kv_indices.numel(), q.shape[0],
        D_NOPE=d_nope, D_ROPE=dim - d_nope, BLOCK_DN=max(16, next_pow2(d_nope)),
        BLOCK_DR=max(16, next_pow2(dim - d_nope)),
        BLOCK_H=config.BLOCK_H, BLOCK_Q=config.BLOCK_Q, BLOCK_N=config.BLOCK_N, PAGE_SIZE=page_size,
        MAX_Q=max_seqlen_q, CAUSAL=causal, COMPUTE=compute_code(q.dtype, kv.dtype), WRITE_LSE=lse is not None,
        HAS_Q_SCALE=q_scale is not None, HAS_KV_SCALE=kv_scale is not None, OFFSET_BITS=offset_bits(kv),
        num_warps=config.num_warps, num_stages=config.num_stages,
    )


def reduce(partial_o: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
           reduce_partial_map: Tensor, max_seqlen_q: int, out: Tensor, lse: Optional[Tensor]) -> None:
    """``mla_reduce_v1``: merge partial slots into ``out`` (and ``lse``) per reduce tile."""
    tiles = reduce_final_map.shape[0]
    heads, d_v = out.shape[-2], out.shape[-1]
    if tiles == 0 or max_seqlen_q == 0:
        return
    po = partial_o.reshape(partial_o.shape[0], heads, d_v)
    pl = partial_lse.reshape(partial_lse.shape[0], heads)
    one = _f32_dummy(out.device)
    grid = (tiles, max_seqlen_q, cdiv(heads, MERGE_BLOCK_H))
    mla_reduce_kernel[grid](
        po, po.stride(0), po.stride(1),
        pl, pl.stride(0), pl.stride(1),
        reduce_indptr, reduce_final_map, reduce_partial_map,
        out, out.stride(0), out.stride(1),
        lse if lse is not None else one, lse.stride(0) if lse is not None else 0, lse.stride(1) if lse is not None else 0,
        heads,
        MAX_Q=max_seqlen_q, D_V=d_v, BLOCK_D=max(16, next_pow2(d_v)), BLOCK_HM=MERGE_BLOCK_H,
        WRITE_LSE=lse is not None, num_warps=4,
    )
