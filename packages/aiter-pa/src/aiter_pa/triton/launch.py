"""Host side of the paged-attention kernel: configs, the v1/v2 choice and the launch.

Nothing here syncs with the device or allocates when the caller passes the split-K buffers, so
decode can be captured in a CUDA graph.

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
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton

from aiter_core import triton_attn as ta
from aiter_core.triton_utils import cdiv, interpreter_active

from ..core import split_head_dim
from ..layouts import PagedKV, ScaleAddressing
from .attention import _paged_attn_kernel

__all__ = ["Launch", "prepare_launch", "KernelConfig", "default_config", "choose_num_partitions", "paged_attention_fwd", "block_m_for",
           "MIN_PART_TOKENS", "CTAS_PER_SM", "CTAS_PER_SM_8BIT"]

MIN_PART_TOKENS = 512
CTAS_PER_SM = 4
CTAS_PER_SM_8BIT = 2
MAX_BLOCK_M = 64


@dataclass(frozen=True)
class KernelConfig:
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2


def default_config(head_dim: int, kv_elem_bytes: float, block_m: int) -> KernelConfig:
    """Tile config by head dim, KV element size and query-row tile (the sm_90 compile test checks
    each fits). ``AITER_PA_CONFIG="block_n,num_warps,num_stages"`` overrides it (for tuning)."""
    env = os.environ.get("AITER_PA_CONFIG")
    if env:
        try:
            bn, nw, ns = (int(x) for x in env.split(","))
        except ValueError:
            raise ValueError(f"AITER_PA_CONFIG must be 'block_n,num_warps,num_stages', got {env!r}") from None
        return KernelConfig(bn, nw, ns)
    if interpreter_active():
        return KernelConfig(block_n=16, num_warps=4, num_stages=1)
    if head_dim > 256:  # MLA-style 576/512 dims: 512-wide accumulator rows over 8 warps
        return KernelConfig(block_n=32, num_warps=8, num_stages=2)
    if block_m * head_dim >= 64 * 256:  # big accumulators (long MTP x GQA at d=256): spread over 8 warps
        return KernelConfig(block_n=32, num_warps=8, num_stages=2)
    if head_dim > 128:
        return KernelConfig(block_n=32, num_warps=4, num_stages=2)
    if kv_elem_bytes < 2:
        return KernelConfig(block_n=128 if block_m <= 32 else 64, num_warps=4, num_stages=3)
    return KernelConfig(block_n=64, num_warps=4, num_stages=3)


def block_m_for(gqa: int, max_qlen: int, head_dim_v: int = 128) -> int:
    cap = MAX_BLOCK_M if head_dim_v <= 256 else 16  # a 512-wide fp32 accumulator: keep the row tile small
    return min(cap, max(16, triton.next_power_of_2(gqa * max_qlen)))


def _num_sms() -> int:
    from aiter_core.arch import get_arch_info

    return max(1, int(get_arch_info().num_cu or 1))


def choose_num_partitions(num_seqs: int, num_kv_heads: int, m_tiles: int, max_context_len: int,
                          num_sms: int | None = None, kv_elem_bytes: float = 2) -> int:
    """Partitions per sequence (1 = v1 single pass); see the module docstring."""
    env = os.environ.get("AITER_PA_NUM_PARTITIONS")
    if env:
        return max(1, int(env))
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
    mode = os.environ.get("AITER_PA_KV_COMPUTE", "auto")
    if mode not in ("auto", "query", "fp16"):
        raise ValueError(f"AITER_PA_KV_COMPUTE must be auto, query or fp16, got {mode!r}")
    if mode != "auto":
        return mode == "fp16"
    return query_dtype == torch.bfloat16


def _inner(prefix: str, a) -> dict:
    return {f"s_{prefix}t_hi": a.s_t_hi, f"s_{prefix}t_lo": a.s_t_lo, f"s_{prefix}c_hi": a.s_c_hi,
            f"s_{prefix}c_lo": a.s_c_lo}


def _scale(sa: ScaleAddressing | None, dummy: torch.Tensor):
    if sa is None:
        return dummy, 0, 0, 0
    return sa.tensor, sa.s_blk, sa.s_head, sa.s_tok


@dataclass
class Launch:
    """Everything one kernel launch needs; :func:`prepare_launch` builds it, the compile-only
    tests turn it into an ``ASTSource`` signature."""

    grid: tuple
    args: list
    constexprs: dict
    num_warps: int
    num_stages: int
    merge: tuple | None  # (partial_out, partial_max, partial_sum) when split-K


def paged_attention_fwd(*args, **kwargs) -> torch.Tensor:
    """Launch the kernel (and the split-K merge when partitioned); see :func:`prepare_launch`."""
    out = args[0] if args else kwargs["out"]
    launch = prepare_launch(*args, **kwargs)
    _paged_attn_kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                    num_stages=launch.num_stages)
    if launch.merge is not None:
        po, pmax, psum = launch.merge
        ta.splitk_merge(po, pmax, out, partial_sum=psum)
    return out


def prepare_launch(
    out: torch.Tensor, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, info: PagedKV, *,
    scale: float, max_context_len: int, block_tables: torch.Tensor | None = None,
    context_lens: torch.Tensor | None = None, k_quant: int = 0, v_quant: int = 0,
    k_scale: ScaleAddressing | None = None, v_scale: ScaleAddressing | None = None,
    alibi_slopes: torch.Tensor | None = None, softcap: float = 0.0, sliding_window: int = 0,
    qo_indptr: torch.Tensor | None = None, max_qlen: int = 1, kv_indptr: torch.Tensor | None = None,
    kv_last_page_lens: torch.Tensor | None = None, new_k: torch.Tensor | None = None,
    new_v: torch.Tensor | None = None, new_causal: bool = True, skip_decode: bool = False,
    token_lists: bool = False, custom_mask: torch.Tensor | None = None, mask_indptr: torch.Tensor | None = None,
    mask_prefix: bool = False, high_precision: int = 1, num_partitions: int | None = None,
    partition_size: int | None = None, partials: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    config: KernelConfig | None = None, num_seqs: int | None = None,
) -> Launch:
    """Kernel arguments of one call. Arguments are assumed checked
    by the API layer. ``out/query [total_q, Hq, D]``; ``partials = (partial_out [total_q, Hq, P, Dv],
    partial_max [total_q, Hq, P], partial_sum [total_q, Hq, P])`` fixes P; otherwise P comes from
    ``num_partitions`` or the heuristic and the buffers are allocated here."""
    Hq, D = query.shape[1], query.shape[2]
    Dv = out.shape[2]
    Hk = info.num_kv_heads
    gqa = Hq // Hk
    if num_seqs is None:
        num_seqs = block_tables.shape[0] if kv_indptr is None else kv_indptr.shape[0] - 1
    block_m = block_m_for(gqa, max_qlen, Dv)
    d1, d2 = split_head_dim(D)
    m_tiles = cdiv(gqa * max_qlen, block_m)
    kv_bytes = 0.5 if k_quant == 3 else key_cache.element_size()
    cfg = config or default_config(max(D, Dv), kv_bytes, block_m)
    if Dv > 512:
        raise ValueError(f"the v head dim must be <= 512, got {Dv}")
    if partials is not None:
        P = partials[0].shape[2]
    elif num_partitions is not None:
        P = max(1, int(num_partitions))
    else:
        P = choose_num_partitions(num_seqs, Hk, m_tiles, max_context_len, kv_elem_bytes=kv_bytes)
    if partition_size is not None:
        part_tokens = int(partition_size)
    else:
        part_tokens = cdiv(cdiv(max(max_context_len, 1), P), cfg.block_n) * cfg.block_n
    split = P > 1
    phys_group = 1  # tokens per group sharing a block: a power of two dividing block, tile and partition
    while phys_group < 16 and all(v % (2 * phys_group) == 0 for v in (info.block_size, cfg.block_n, part_tokens)):
        phys_group *= 2
    if split and partials is None:
        total_q = query.shape[0]
        partials = (torch.empty(total_q, Hq, P, Dv, dtype=torch.float32, device=query.device),
                    torch.empty(total_q, Hq, P, dtype=torch.float32, device=query.device),
                    torch.empty(total_q, Hq, P, dtype=torch.float32, device=query.device))
    dummy = query
    ks_t, *ks_s = _scale(k_scale, dummy)
    vs_t, *vs_s = _scale(v_scale, dummy)
    po, pmax, psum = partials if split else (dummy, dummy, dummy)
    po_s = (po.stride(0), po.stride(1), po.stride(2), po.stride(3)) if split else (0, 0, 0, 0)
    pm_s = (pmax.stride(0), pmax.stride(1), pmax.stride(2)) if split else (0, 0, 0)
    if split and (psum.stride(0), psum.stride(1), psum.stride(2)) != pm_s:
        raise ValueError("partial_max and partial_sum must have the same strides")
    ragged = kv_indptr is not None
    bt_tensor = block_tables if block_tables is not None else dummy
    nk = new_k if new_k is not None else dummy
    nv = new_v if new_v is not None else dummy
    nk_s = (new_k.stride(0), new_k.stride(1), new_k.stride(2)) if new_k is not None else (0, 0, 0)
    nv_s = (new_v.stride(0), new_v.stride(1), new_v.stride(2)) if new_v is not None else (0, 0, 0)
    v_fp8 = value_cache.dtype.is_floating_point and value_cache.element_size() == 1
    kv_fp16 = _kv_in_fp16(query.dtype, key_cache.element_size(), new_k is not None)
    grid = (num_seqs, Hk, m_tiles * P)
    args = [
        out, query, key_cache, value_cache, bt_tensor,
        context_lens if context_lens is not None else dummy,
        qo_indptr if qo_indptr is not None else dummy,
        kv_indptr if ragged else dummy,
        kv_last_page_lens if kv_last_page_lens is not None else dummy,
        ks_t, vs_t, alibi_slopes if alibi_slopes is not None else dummy, nk, nv,
        custom_mask if custom_mask is not None else dummy, mask_indptr if mask_indptr is not None else dummy,
        po, pmax, psum,
        query.stride(0), query.stride(1), query.stride(2), out.stride(0), out.stride(1), out.stride(2),
        block_tables.stride(0) if (block_tables is not None and not ragged) else 0,
        block_tables.shape[1] if (block_tables is not None and not ragged) else 0,
        info.num_blocks, max(int(max_context_len), 0),
        info.k.s_blk, info.k.s_head, info.v.s_blk, info.v.s_head, *ks_s, *vs_s, *nk_s, *nv_s, *po_s, *pm_s,
        float(scale), float(softcap) if softcap else 1.0, int(sliding_window), part_tokens, int(max_qlen),
    ]
    constexprs = dict(
        GQA=gqa, BLOCK_M=block_m, HEAD_D=d1, HEAD_DV=Dv, BLOCK_D=max(16, triton.next_power_of_2(d1)),
        HEAD_D2=d2, BLOCK_D2=max(16, d2),
        BLOCK_DV=max(16, triton.next_power_of_2(Dv)), BLOCK_N=cfg.block_n, KV_BLOCK=info.block_size,
        K_TX=info.k.TX, K_CX=info.k.CX, V_TX=info.v.TX, V_CX=info.v.CX, **_inner("k", info.k), **_inner("v", info.v),
        QUANT_K=int(k_quant), QUANT_V=int(v_quant), HIGH_PREC=int(high_precision), V_FP8=v_fp8,
        QO_MODE=1 if qo_indptr is not None else 0, KV_MODE=(2 if token_lists else 1) if ragged else 0,
        HAS_NEW=new_k is not None, NEW_CAUSAL=bool(new_causal), SKIP_DECODE=bool(skip_decode),
        PHYS_GROUP=phys_group, HAS_MASK=custom_mask is not None, MASK_PREFIX=bool(mask_prefix),
        CAUSAL=(new_k is None and max_qlen > 1), HAS_ALIBI=alibi_slopes is not None,
        USE_SOFTCAP=bool(softcap), USE_WINDOW=bool(sliding_window and sliding_window > 0), SPLIT=split,
        KV_FP16=kv_fp16, OFFSET_BITS=32 if max(map(ta.max_element_offset, (key_cache, value_cache))) < 2**31 else 64,
    )
    return Launch(grid, args, constexprs, cfg.num_warps, cfg.num_stages, (po, pmax, psum) if split else None)
