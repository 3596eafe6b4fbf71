"""The ``torch.ops.aiter.*`` ops of aiter-pa: argument checks, then dispatch.

Every op mutates its outputs in place (listed exactly in ``mutates_args``) and returns nothing,
so its fake implementation is trivial and it runs under ``torch.compile`` and CUDA-graph capture.
Op names: ``pa_reshape_and_cache``, ``pa_reshape_and_cache_pertoken``,
``pa_reshape_and_cache_block_quant``, ``pa_swap_blocks``, ``pa_copy_blocks``,
``paged_attention_decode``, ``paged_attention_rocm``, ``paged_attention_v1``,
``paged_attention_ragged``, ``pa_fwd_asm``, ``pa_context_attention_fwd``,
``extend_attention_fwd``, ``prefill_attention``.
"""

from __future__ import annotations

from typing import List, Optional

import torch

from aiter_core.checks import check_device, check_dtype, check_shape, check_tensor
from aiter_core.ops import register_op
from aiter_core.quant import KVQuant
from aiter_core.registry import Problem, dispatch

from .backends import CacheWrite
from .core import PagedCall, check_block_tables, check_heads, check_int_tensor, check_query, kv_quant_for, run_paged
from .layouts import describe_kv_cache, scale_addressing

Tensor = torch.Tensor


def _none(*args, **kwargs):
    return None


def _check_hp(high_precision: int) -> None:
    if high_precision not in (0, 1, 2):
        raise ValueError(f"high_precision must be 0, 1 or 2, got {high_precision}")


def _check_out(name: str, out: Tensor, shape: tuple, device) -> None:
    check_tensor(name, out)
    check_shape(name, out, tuple(shape))
    check_dtype(name, out, (torch.float16, torch.bfloat16, torch.float32))
    check_device(name, out, device)


def _check_alibi(alibi: Optional[Tensor], num_heads: int, device) -> None:
    if alibi is None:
        return
    if not isinstance(alibi, Tensor) or alibi.dtype != torch.float32 or tuple(alibi.shape) != (num_heads,):
        got = f"{alibi.dtype} {tuple(alibi.shape)}" if isinstance(alibi, Tensor) else type(alibi).__name__
        raise ValueError(f"alibi_slopes must be float32 [num_heads={num_heads}], got {got}")
    if alibi.device != device:
        raise ValueError(f"alibi_slopes must be on {device}, got {alibi.device}")


def _kv_dtype_name(cache: Tensor) -> str:
    return "auto" if cache.element_size() >= 2 else "inferred"


# -- cache writes -------------------------------------------------------------------------------------


def _check_kv_rows(name: str, x: Tensor, num_tokens: int, heads: int, head_dim: int, device) -> Tensor:
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(x).__name__}")
    if x.dim() == 4:  # [B, S, H, D] (block-quant's batch form)
        x = x.reshape(-1, x.shape[2], x.shape[3])
    if x.dim() != 3 or tuple(x.shape) != (num_tokens, heads, head_dim):
        raise ValueError(f"{name} must be [num_tokens={num_tokens}, num_kv_heads={heads}, head_dim={head_dim}], "
                         f"got {tuple(x.shape)}")
    if not x.dtype.is_floating_point or x.element_size() == 1:
        raise TypeError(f"{name} must be float16, bfloat16 or float32, got {x.dtype}")
    if x.device != device:
        raise ValueError(f"{name} must be on the caches' device {device}, got {x.device}")
    return x


def _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout, kv_cache_layout, packed=False):
    layout = kv_cache_layout if key_cache.dim() == 4 else None
    if key_cache.dim() == 4 and kv_cache_layout is None:
        raise ValueError("4-D caches need kv_cache_layout='NHD' or 'HND' (reshape_and_cache writes the 5-D vLLM "
                         "layout; use reshape_and_cache_flash for NHD)")
    info = describe_kv_cache(key_cache, value_cache, layout)
    if key_cache.dim() == 5 and bool(asm_layout) != (info.layout == "vllm_shuffled"):
        raise ValueError(f"asm_layout={asm_layout} but the value cache is in the {info.layout!r} layout "
                         "(asm_layout=True needs V [num_blocks, Hk, block_size/x, D, x])")
    check_int_tensor("slot_mapping", slot_mapping, None, key_cache.device)
    T = slot_mapping.numel()
    D = info.cols * 2 if packed else info.cols
    key = _check_kv_rows("key", key, T, info.num_kv_heads, D, key_cache.device)
    value = _check_kv_rows("value", value, T, info.num_kv_heads, D, key_cache.device)
    return info, key, value, slot_mapping.reshape(-1)


def _reshape_and_cache_impl(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, slot_mapping: Tensor,
                            kv_cache_dtype: str, k_scale: Optional[Tensor], v_scale: Optional[Tensor],
                            asm_layout: bool, kv_cache_layout: Optional[str], backend: Optional[str]) -> None:
    from .triton import cache as tc

    info, key, value, slots = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout, kv_cache_layout)
    if key_cache.dtype != value_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {key_cache.dtype} and {value_cache.dtype}")
    eight_bit = key_cache.element_size() == 1
    if eight_bit:
        if kv_cache_dtype == "auto":
            raise ValueError(f"kv_cache_dtype='auto' but the caches are {key_cache.dtype}: pass kv_cache_dtype='fp8' "
                             "(or 'int8') with per-tensor k_scale/v_scale")
        if key_cache.dtype == torch.uint8:
            raise TypeError("reshape_and_cache does not write packed int4 (uint8) caches; use "
                            "reshape_and_cache_with_pertoken_quant")
        scales = []
        for name, sc in (("k_scale", k_scale), ("v_scale", v_scale)):
            if sc is None:
                sc = torch.ones(1, dtype=torch.float32, device=key_cache.device)
            if not isinstance(sc, Tensor) or sc.numel() != 1 or sc.dtype != torch.float32:
                raise ValueError(f"{name} must be a float32 tensor with one element (per-tensor), got "
                                 f"{getattr(sc, 'dtype', type(sc).__name__)} {tuple(getattr(sc, 'shape', ()))}")
            if sc.device != key_cache.device:
                raise ValueError(f"{name} must be on {key_cache.device}, got {sc.device}")
            scales.append(sc)
        mode = tc.MODE_PER_TENSOR
    else:
        scales = [None, None]
        mode = tc.MODE_CAST
    fn = dispatch("kv_cache_write", Problem(op="kv_cache_write", device=key_cache.device,
                                            device_type=key_cache.device.type, dtype=key.dtype), backend=backend)
    for src, cache, addr, sc in ((key, key_cache, info.k, scales[0]), (value, value_cache, info.v, scales[1])):
        fn(CacheWrite(src, cache, slots, addr, info.layout, info.block_size, info.num_blocks, mode, sc))


def _pertoken_impl(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, k_dequant_scales: Tensor,
                   v_dequant_scales: Tensor, slot_mapping: Tensor, asm_layout: bool, kv_cache_layout: Optional[str],
                   backend: Optional[str]) -> None:
    from .triton import cache as tc

    packed = key_cache.dtype == torch.uint8
    info, key, value, slots = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout,
                                           kv_cache_layout, packed)
    if key_cache.dtype not in (torch.int8, torch.uint8) + tuple(
            d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e4m3fnuz", None),
                        getattr(torch, "float8_e5m2", None)) if d is not None):
        raise TypeError(f"per-token quantized caches must be fp8, int8 or uint8 (packed int4), got {key_cache.dtype}")
    if value_cache.dtype != key_cache.dtype:
        raise TypeError(f"key_cache and value_cache must have one dtype, got {key_cache.dtype} and {value_cache.dtype}")
    if packed and info.layout != "NHD" and info.layout != "HND" and info.layout != "vllm":
        raise ValueError("packed int4 caches need the NHD, HND or vllm layout (not shuffled V)")
    mode = tc.MODE_INT4 if packed else tc.MODE_PER_TOKEN
    fn = dispatch("kv_cache_write", Problem(op="kv_cache_write", device=key_cache.device,
                                            device_type=key_cache.device.type, dtype=key.dtype), backend=backend)
    for src, cache, addr, sc, name in ((key, key_cache, info.k, k_dequant_scales, "k_dequant_scales"),
                                       (value, value_cache, info.v, v_dequant_scales, "v_dequant_scales")):
        sa = scale_addressing(sc, KVQuant.PER_TOKEN_8BIT, info.num_blocks, info.block_size, info.num_kv_heads, name)
        if sa.tensor.device != key_cache.device:
            raise ValueError(f"{name} must be on {key_cache.device}, got {sa.tensor.device}")
        fn(CacheWrite(src, cache, slots, addr, info.layout, info.block_size, info.num_blocks, mode, sa.tensor,
                      (sa.s_blk, sa.s_head, sa.s_tok)))


def _block_quant_impl(key: Tensor, value: Tensor, key_cache: Tensor, value_cache: Tensor, k_dequant_scales: Tensor,
                      v_dequant_scales: Tensor, slot_mapping: Tensor, asm_layout: bool,
                      kv_cache_layout: Optional[str], backend: Optional[str]) -> None:
    from .triton import cache as tc

    info, key, value, slots = _cache_setup(key, value, key_cache, value_cache, slot_mapping, asm_layout, kv_cache_layout)
    if key_cache.element_size() != 1 or key_cache.dtype == torch.uint8 or value_cache.dtype != key_cache.dtype:
        raise TypeError(f"block-quantized caches must be fp8 or int8 (both the same), got {key_cache.dtype} and "
                        f"{value_cache.dtype}")
    nb, H = info.num_blocks, info.num_kv_heads
    fn = dispatch("kv_cache_write", Problem(op="kv_cache_write", device=key_cache.device,
                                            device_type=key_cache.device.type, dtype=key.dtype), backend=backend)
    for src, cache, addr, sc, name in ((key, key_cache, info.k, k_dequant_scales, "k_dequant_scales"),
                                       (value, value_cache, info.v, v_dequant_scales, "v_dequant_scales")):
        want = (nb, H) if asm_layout else (H, nb)
        if not isinstance(sc, Tensor) or sc.dtype != torch.float32 or tuple(sc.shape) != want:
            raise ValueError(f"{name} must be float32 {'[num_blocks, Hk]' if asm_layout else '[Hk, num_blocks]'} = "
                             f"{want}, got {getattr(sc, 'dtype', None)} {tuple(getattr(sc, 'shape', ()))}")
        if sc.device != key_cache.device:
            raise ValueError(f"{name} must be on {key_cache.device}, got {sc.device}")
        strides = (sc.stride(0), sc.stride(1), 0) if asm_layout else (sc.stride(1), sc.stride(0), 0)
        fn(CacheWrite(src, cache, slots, addr, info.layout, info.block_size, nb, tc.MODE_BLOCK, sc, strides))


def _swap_blocks_impl(src: Tensor, dst: Tensor, block_mapping: Tensor) -> None:
    check_int_tensor("block_mapping", block_mapping, 2)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [n, 2], got {tuple(block_mapping.shape)}")
    if src.shape[1:] != dst.shape[1:] or src.dtype != dst.dtype:
        raise ValueError(f"src and dst must hold the same blocks: got {src.dtype} {tuple(src.shape)} and "
                         f"{dst.dtype} {tuple(dst.shape)}")
    if block_mapping.numel() == 0:
        return
    m = block_mapping.to("cpu", torch.int64)  # upstream keeps the mapping on the CPU
    s, d = m[:, 0], m[:, 1]
    if int(s.min()) < 0 or int(s.max()) >= src.shape[0] or int(d.min()) < 0 or int(d.max()) >= dst.shape[0]:
        raise ValueError(f"block_mapping ids out of range: sources must be in [0, {src.shape[0]}), destinations in "
                         f"[0, {dst.shape[0]})")
    dst.index_copy_(0, d.to(dst.device), src.index_select(0, s.to(src.device)).to(dst.device))


def _copy_blocks_impl(key_caches: List[Tensor], value_caches: List[Tensor], block_mapping: Tensor,
                      backend: Optional[str]) -> None:
    if len(key_caches) != len(value_caches):
        raise ValueError(f"key_caches and value_caches must have the same length, got {len(key_caches)} and "
                         f"{len(value_caches)}")
    check_int_tensor("block_mapping", block_mapping, 2)
    if block_mapping.shape[1] != 2:
        raise ValueError(f"block_mapping must be [n, 2], got {tuple(block_mapping.shape)}")
    caches = list(key_caches) + list(value_caches)
    if not caches or block_mapping.shape[0] == 0:
        return
    nb = min(c.shape[0] for c in caches)
    if block_mapping.device.type == "cpu":  # checked on the host only when it already is there
        m = block_mapping.long()
        if int(m.min()) < 0 or int(m.max()) >= nb:
            raise ValueError(f"block_mapping ids must be in [0, {nb}), got range [{int(m.min())}, {int(m.max())}]")
        dsts = set(m[:, 1].tolist())
        if len(dsts) != m.shape[0] or dsts & set(m[:, 0].tolist()):
            raise ValueError("block_mapping destinations must be distinct and must not also be sources")
    for c in caches:
        if not c.is_contiguous():
            raise ValueError("copy_blocks needs contiguous caches")
    fn = dispatch("copy_blocks", Problem(op="copy_blocks", device=caches[0].device, device_type=caches[0].device.type,
                                         dtype=caches[0].dtype), backend=backend)
    for c in caches:
        fn(c, block_mapping.to(c.device, torch.int64))


# -- attention ----------------------------------------------------------------------------------------


def _carve_workspace(ws: Tensor, total_q: int, Hq: int, P: int, D: int, out_dtype: torch.dtype):
    n = total_q * Hq * P
    elem = torch.empty(0, dtype=out_dtype).element_size()
    need = n * D * elem + 2 * n * 4
    if not isinstance(ws, Tensor) or not ws.is_contiguous():
        raise ValueError("workspace_buffer must be a contiguous tensor")
    raw = ws.view(torch.uint8).reshape(-1)
    if raw.numel() < need:
        raise ValueError(f"workspace_buffer holds {raw.numel()} bytes, {need} are needed "
                         f"({total_q} query rows x {Hq} heads x {P} partitions)")
    pmax = raw[: 4 * n].view(torch.float32).view(total_q, Hq, P)
    psum = raw[4 * n: 8 * n].view(torch.float32).view(total_q, Hq, P)
    po = raw[8 * n: 8 * n + n * D * elem].view(out_dtype).view(total_q, Hq, P, D)
    return po, pmax, psum


def _decode_impl(output: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor, seq_lens: Tensor,
                 block_tables: Tensor, attn_scale: float, max_seq_len: int, k_scale: Optional[Tensor],
                 v_scale: Optional[Tensor], num_seq_partitions: int, alibi_slopes: Optional[Tensor],
                 kv_cache_layout: str, high_precision: int, mtp: int, logits_soft_cap: float, sliding_window: int,
                 partial_out: Optional[Tensor], partial_max: Optional[Tensor], partial_sum: Optional[Tensor],
                 backend: Optional[str]) -> None:
    check_query("query", query)
    info = describe_kv_cache(key_cache, value_cache, kv_cache_layout if key_cache.dim() == 4 else None)
    check_heads(query, info)
    _check_out("output", output, query.shape, query.device)
    _check_hp(high_precision)
    _check_alibi(alibi_slopes, query.shape[1], query.device)
    check_block_tables(block_tables, seq_lens, max_seq_len, info, query.device)
    if mtp < 1 or query.shape[0] != block_tables.shape[0] * mtp:
        raise ValueError(f"query must have num_seqs * mtp = {block_tables.shape[0]} x {mtp} rows, got {query.shape[0]}")
    kq, vq, ka, va = kv_quant_for(query, key_cache, value_cache, info, k_scale, v_scale, _kv_dtype_name(key_cache))
    partials = None
    if partial_out is not None:
        P = partial_out.shape[2] if partial_out.dim() == 4 else -1
        want = (query.shape[0], query.shape[1], P)
        if (partial_out.dim() != 4 or tuple(partial_out.shape) != want + (query.shape[2],)
                or partial_max is None or partial_sum is None or tuple(partial_max.shape) != want
                or tuple(partial_sum.shape) != want):
            raise ValueError(f"workspace must be (partial_out [rows, Hq, P, D], partial_max [rows, Hq, P], "
                             f"partial_sum [rows, Hq, P]) with rows={query.shape[0]}, Hq={query.shape[1]}")
        partials = (partial_out, partial_max, partial_sum)
    call = PagedCall(output, query, key_cache, value_cache, info, attn_scale, max_seq_len, block_tables, seq_lens,
                     kq, vq, ka, va, alibi_slopes, logits_soft_cap, sliding_window, max_qlen=mtp,
                     high_precision=high_precision, num_partitions=num_seq_partitions or None, partials=partials)
    run_paged(call, backend)


def _rocm_impl(out: Tensor, exp_sums: Tensor, max_logits: Tensor, tmp_out: Tensor, query: Tensor, key_cache: Tensor,
               value_cache: Tensor, num_kv_heads: int, scale: float, block_tables: Tensor, context_lens: Tensor,
               block_size: int, max_context_len: int, alibi_slopes: Optional[Tensor], kv_cache_dtype: str,
               k_scale: Optional[Tensor], v_scale: Optional[Tensor], partition_size: int, mtp: int,
               high_precision: int, backend: Optional[str]) -> None:
    check_query("query", query)
    if key_cache.dim() != 5:
        raise ValueError(f"paged_attention_rocm needs the vLLM 5-D key cache [nb, Hk, D/x, bs, x], got "
                         f"{tuple(key_cache.shape)}")
    info = describe_kv_cache(key_cache, value_cache)
    check_heads(query, info, num_kv_heads)
    if block_size != info.block_size:
        raise ValueError(f"block_size={block_size} but the caches have block size {info.block_size}")
    _check_out("out", out, query.shape, query.device)
    _check_hp(high_precision)
    _check_alibi(alibi_slopes, query.shape[1], query.device)
    check_block_tables(block_tables, context_lens, max_context_len, info, query.device)
    if mtp < 1 or query.shape[0] != block_tables.shape[0] * mtp:
        raise ValueError(f"query must have num_seqs * mtp = {block_tables.shape[0]} x {mtp} rows, got {query.shape[0]}")
    if partition_size < 1:
        raise ValueError(f"partition_size must be positive, got {partition_size}")
    kq, vq, ka, va = kv_quant_for(query, key_cache, value_cache, info, k_scale, v_scale, kv_cache_dtype)
    rows, Hq, D = query.shape
    P = exp_sums.shape[-1] if exp_sums.dim() >= 1 else 0
    need = -(-max_context_len // partition_size)
    for name, t, shape in (("exp_sums", exp_sums, (rows, Hq, P)), ("max_logits", max_logits, (rows, Hq, P)),
                           ("tmp_out", tmp_out, (rows, Hq, P, D))):
        if t.numel() != torch.Size(shape).numel() or not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous with {rows}x{Hq}x{P}{'x' + str(D) if name == 'tmp_out' else ''} "
                             f"elements ([num_seqs*mtp, Hq, P{', D' if name == 'tmp_out' else ''}]), got {tuple(t.shape)}")
    if exp_sums.dtype != torch.float32 or max_logits.dtype != torch.float32:
        raise TypeError("exp_sums and max_logits must be float32")
    if P < need:
        raise ValueError(f"exp_sums/max_logits/tmp_out hold {P} partitions; max_context_len={max_context_len} with "
                         f"partition_size={partition_size} needs {need}")
    partials = (tmp_out.view(rows, Hq, P, D), max_logits.view(rows, Hq, P), exp_sums.view(rows, Hq, P))
    call = PagedCall(out, query, key_cache, value_cache, info, scale, max_context_len, block_tables, context_lens,
                     kq, vq, ka, va, alibi_slopes, max_qlen=mtp, high_precision=high_precision,
                     partition_size=partition_size, partials=partials if P > 1 else None, num_partitions=1 if P <= 1 else None)
    run_paged(call, backend)


def _v1_impl(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
             scale: float, block_tables: Tensor, cu_query_lens: Optional[Tensor], context_lens: Tensor,
             max_context_len: int, alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
             logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor], partition_size: int,
             mtp: int, sliding_window: int, high_precision: int, backend: Optional[str]) -> None:
    check_query("query", query)
    if key_cache.dim() != 4:
        raise ValueError(f"paged_attention_v1 takes 4-D HND/NHD caches, got {key_cache.dim()}-D")
    info = describe_kv_cache(key_cache, value_cache, kv_cache_layout)
    check_heads(query, info)
    _check_out("out", out, query.shape, query.device)
    _check_hp(high_precision)
    _check_alibi(alibi_slopes, query.shape[1], query.device)
    check_block_tables(block_tables, context_lens, max_context_len, info, query.device)
    S = block_tables.shape[0]
    if cu_query_lens is not None:
        check_int_tensor("cu_query_lens", cu_query_lens, 1, query.device)
        if cu_query_lens.shape[0] != S + 1:
            raise ValueError(f"cu_query_lens must have num_seqs + 1 = {S + 1} entries, got {cu_query_lens.shape[0]}")
    elif query.shape[0] != S * mtp:
        raise ValueError(f"query must have num_seqs * mtp = {S} x {mtp} rows, got {query.shape[0]}")
    if sliding_window < 0:
        raise ValueError(f"sliding_window must be >= 0 (0 = off), got {sliding_window}")
    kq, vq, ka, va = kv_quant_for(query, key_cache, value_cache, info, k_scale, v_scale, kv_cache_dtype)
    P = max(1, -(-max_context_len // partition_size))
    partials = _carve_workspace(workspace_buffer, query.shape[0], query.shape[1], P, query.shape[2], out.dtype) \
        if P > 1 else None
    call = PagedCall(out, query, key_cache, value_cache, info, scale, max_context_len, block_tables, context_lens,
                     kq, vq, ka, va, alibi_slopes, logits_soft_cap, sliding_window, qo_indptr=cu_query_lens,
                     max_qlen=mtp, high_precision=high_precision, partition_size=partition_size, partials=partials,
                     num_partitions=P)
    run_paged(call, backend)


def _ragged_impl(out: Tensor, workspace_buffer: Tensor, query: Tensor, key_cache: Tensor, value_cache: Tensor,
                 scale: float, kv_indptr: Tensor, kv_page_indices: Tensor, kv_last_page_lens: Tensor, block_size: int,
                 max_num_partitions: int, alibi_slopes: Optional[Tensor], kv_cache_dtype: str, kv_cache_layout: str,
                 logits_soft_cap: float, k_scale: Optional[Tensor], v_scale: Optional[Tensor], partition_size: int,
                 mtp: int, high_precision: int, backend: Optional[str]) -> None:
    check_query("query", query)
    if key_cache.dim() != 4:
        raise ValueError(f"paged_attention_ragged takes 4-D HND/NHD caches, got {key_cache.dim()}-D")
    info = describe_kv_cache(key_cache, value_cache, kv_cache_layout)
    check_heads(query, info)
    if block_size != info.block_size:
        raise ValueError(f"block_size={block_size} but the caches have block size {info.block_size}")
    _check_out("out", out, query.shape, query.device)
    _check_hp(high_precision)
    _check_alibi(alibi_slopes, query.shape[1], query.device)
    check_int_tensor("kv_indptr", kv_indptr, 1, query.device)
    check_int_tensor("kv_page_indices", kv_page_indices, 1, query.device)
    check_int_tensor("kv_last_page_lens", kv_last_page_lens, 1, query.device)
    S = kv_indptr.shape[0] - 1
    if kv_last_page_lens.shape[0] != S:
        raise ValueError(f"kv_last_page_lens must have {S} entries (kv_indptr has {S + 1}), got {kv_last_page_lens.shape[0]}")
    if query.shape[0] != S * mtp:
        raise ValueError(f"query must have num_seqs * mtp = {S} x {mtp} rows, got {query.shape[0]}")
    if max_num_partitions < 1:
        raise ValueError(f"max_num_partitions must be >= 1, got {max_num_partitions}")
    kq, vq, ka, va = kv_quant_for(query, key_cache, value_cache, info, k_scale, v_scale, kv_cache_dtype)
    P = max_num_partitions
    partials = _carve_workspace(workspace_buffer, query.shape[0], query.shape[1], P, query.shape[2], out.dtype) \
        if P > 1 else None
    call = PagedCall(out, query, key_cache, value_cache, info, scale, P * partition_size, kv_page_indices, None,
                     kq, vq, ka, va, alibi_slopes, logits_soft_cap, 0, max_qlen=mtp, kv_indptr=kv_indptr,
                     kv_last_page_lens=kv_last_page_lens, high_precision=high_precision, partition_size=partition_size,
                     partials=partials, num_partitions=P)
    run_paged(call, backend)


def _asm_impl(out: Tensor, Q: Tensor, K: Tensor, V: Tensor, block_tables: Tensor, context_lens: Tensor,  # noqa: N803
              max_qlen: int, K_QScale: Optional[Tensor], V_QScale: Optional[Tensor],  # noqa: N803
              qo_indptr: Optional[Tensor], high_precision: int, backend: Optional[str]) -> None:
    check_query("Q", Q)
    if K.dim() != 5:
        raise ValueError(f"pa_fwd_asm needs the vLLM 5-D key cache [nb, Hk, D/x, bs, x], got {tuple(K.shape)}")
    info = describe_kv_cache(K, V)
    check_heads(Q, info)
    _check_out("out_", out, Q.shape, Q.device)
    _check_hp(high_precision)
    max_ctx = block_tables.shape[1] * info.block_size
    check_block_tables(block_tables, context_lens, max_ctx, info, Q.device)
    S = block_tables.shape[0]
    if qo_indptr is not None:
        check_int_tensor("qo_indptr", qo_indptr, 1, Q.device)
        if qo_indptr.shape[0] != S + 1:
            raise ValueError(f"qo_indptr must have num_seqs + 1 = {S + 1} entries, got {qo_indptr.shape[0]}")
    elif Q.shape[0] != S * max_qlen:
        raise ValueError(f"Q must have num_seqs * max_qlen = {S} x {max_qlen} rows, got {Q.shape[0]}")
    if not 1 <= max_qlen:
        raise ValueError(f"max_qlen must be >= 1, got {max_qlen}")
    kq, vq, ka, va = kv_quant_for(Q, K, V, info, K_QScale, V_QScale, _kv_dtype_name(K))
    call = PagedCall(out, Q, K, V, info, Q.shape[2] ** -0.5, max_ctx, block_tables, context_lens, kq, vq, ka, va,
                     qo_indptr=qo_indptr, max_qlen=max_qlen, high_precision=high_precision)
    run_paged(call, backend)


def _prefill_common(q, k, v, o, k_cache, v_cache, layout, kv_cache_dtype, k_scale, v_scale):
    check_query("q", q)
    info = describe_kv_cache(k_cache, v_cache, layout if k_cache.dim() == 4 else None)
    check_heads(q, info)
    Dv = info.v_cols or info.cols
    for name, t, d in (("k", k, q.shape[2]), ("v", v, Dv)):
        if not isinstance(t, Tensor) or t.dim() != 3 or tuple(t.shape) != (q.shape[0], info.num_kv_heads, d):
            raise ValueError(f"{name} must be [total_tokens={q.shape[0]}, Hk={info.num_kv_heads}, {d}], got "
                             f"{tuple(getattr(t, 'shape', ()))}")
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have the query dtype {q.dtype}, got {t.dtype}")
    _check_out("o", o, (q.shape[0], q.shape[1], Dv), q.device)
    kq, vq, ka, va = kv_quant_for(q, k_cache, v_cache, info, k_scale, v_scale, kv_cache_dtype)
    return info, kq, vq, ka, va


def _context_impl(q: Tensor, k: Tensor, v: Tensor, o: Tensor, kv_cache_dtype: str, k_cache: Tensor, v_cache: Tensor,
                  b_loc: Tensor, b_start_loc: Tensor, b_seq_len: Tensor, max_input_len: int, k_scale: Optional[Tensor],
                  v_scale: Optional[Tensor], alibi_slopes: Optional[Tensor], sliding_window: int,
                  sm_scale: Optional[float], skip_decode: bool, max_seq_len: Optional[int],
                  kv_cache_layout: Optional[str], backend: Optional[str]) -> None:
    info, kq, vq, ka, va = _prefill_common(q, k, v, o, k_cache, v_cache, kv_cache_layout or "NHD", kv_cache_dtype,
                                           k_scale, v_scale)
    check_int_tensor("b_loc", b_loc, 2, q.device)
    check_int_tensor("b_start_loc", b_start_loc, 1, q.device)
    check_int_tensor("b_seq_len", b_seq_len, 1, q.device)
    B = b_seq_len.shape[0]
    if b_start_loc.shape[0] != B + 1 or b_loc.shape[0] != B:
        raise ValueError(f"b_start_loc must have B+1 = {B + 1} entries and b_loc {B} rows, got "
                         f"{b_start_loc.shape[0]} and {b_loc.shape[0]}")
    _check_alibi(alibi_slopes, q.shape[1], q.device)
    if max_input_len < 1:
        raise ValueError(f"max_input_len must be >= 1, got {max_input_len}")
    max_ctx = int(max_seq_len) if max_seq_len is not None else b_loc.shape[1] * info.block_size
    if max_seq_len is not None:
        need = -(-max_ctx // info.block_size)
        if b_loc.shape[1] < need:
            raise ValueError(f"b_loc is too short: max_seq_len={max_ctx} needs {need} blocks, got {b_loc.shape[1]}")
    cached = (b_seq_len - (b_start_loc[1:] - b_start_loc[:-1])).to(torch.int32)  # on the device, no sync
    call = PagedCall(o, q, k_cache, v_cache, info, q.shape[2] ** -0.5 if sm_scale is None else sm_scale, max_ctx,
                     b_loc, cached, kq, vq, ka, va, alibi_slopes, 0.0, sliding_window, qo_indptr=b_start_loc,
                     max_qlen=max_input_len, new_k=k, new_v=v, skip_decode=skip_decode, num_partitions=1)
    run_paged(call, backend)


def _extend_impl(q_extend: Tensor, k_extend: Tensor, v_extend: Tensor, o_extend: Tensor, k_buffer: Tensor,
                 v_buffer: Tensor, qo_indptr: Tensor, kv_indptr: Tensor, kv_indices: Tensor,
                 custom_mask: Optional[Tensor], is_causal: bool, mask_indptr: Optional[Tensor], max_len_extend: int,
                 sm_scale: Optional[float], logit_cap: float, skip_prefix_custom_mask: bool,
                 backend: Optional[str]) -> None:
    for name, t in (("k_buffer", k_buffer), ("v_buffer", v_buffer)):
        if not isinstance(t, Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be [tokens, Hk, D], got {tuple(getattr(t, 'shape', ()))}")
    kc, vc = k_buffer.unsqueeze(1), v_buffer.unsqueeze(1)  # page size 1, NHD
    info, kq, vq, ka, va = _prefill_common(q_extend, k_extend, v_extend, o_extend, kc, vc, "NHD", "auto", None, None)
    check_int_tensor("qo_indptr", qo_indptr, 1, q_extend.device)
    check_int_tensor("kv_indptr", kv_indptr, 1, q_extend.device)
    check_int_tensor("kv_indices", kv_indices, 1, q_extend.device)
    if qo_indptr.shape[0] != kv_indptr.shape[0]:
        raise ValueError(f"qo_indptr and kv_indptr must both have B+1 entries, got {qo_indptr.shape[0]} and "
                         f"{kv_indptr.shape[0]}")
    if max_len_extend < 1:
        raise ValueError(f"max_len_extend must be >= 1, got {max_len_extend}")
    mask = None
    if custom_mask is not None:
        if not isinstance(custom_mask, Tensor) or custom_mask.dim() != 1 or custom_mask.dtype not in (
                torch.bool, torch.uint8, torch.int8):
            raise TypeError(f"custom_mask must be a flat bool tensor, got {getattr(custom_mask, 'dtype', None)} "
                            f"{tuple(getattr(custom_mask, 'shape', ()))}")
        if custom_mask.device != q_extend.device:
            raise ValueError(f"custom_mask must be on {q_extend.device}, got {custom_mask.device}")
        check_int_tensor("mask_indptr", mask_indptr, 1, q_extend.device)
        if mask_indptr.shape[0] < qo_indptr.shape[0] - 1:
            raise ValueError(f"mask_indptr needs an entry per sequence ({qo_indptr.shape[0] - 1}), got "
                             f"{mask_indptr.shape[0]}")
        mask = custom_mask.contiguous().view(torch.uint8)
    call = PagedCall(o_extend, q_extend, kc, vc, info, q_extend.shape[2] ** -0.5 if sm_scale is None else sm_scale,
                     k_buffer.shape[0], kv_indices, None, kq, vq, ka, va, None, logit_cap, 0, qo_indptr=qo_indptr,
                     max_qlen=max_len_extend, kv_indptr=kv_indptr, token_lists=True, new_k=k_extend, new_v=v_extend,
                     new_causal=is_causal, num_partitions=1, custom_mask=mask, mask_indptr=mask_indptr,
                     mask_prefix=not skip_prefix_custom_mask)
    run_paged(call, backend)


def _prefill_impl(q: Tensor, k: Tensor, v: Tensor, o: Tensor, b_start_loc: Tensor, b_seq_len: Tensor,
                  max_input_len: int, is_causal: bool, backend: Optional[str]) -> None:
    check_query("q", q)
    check_int_tensor("b_start_loc", b_start_loc, 1, q.device)
    check_int_tensor("b_seq_len", b_seq_len, 1, q.device)
    if b_start_loc.shape[0] != b_seq_len.shape[0]:
        raise ValueError(f"b_start_loc and b_seq_len must have one entry per sequence, got {b_start_loc.shape[0]} and "
                         f"{b_seq_len.shape[0]}")
    if k.dim() != 3 or q.shape[1] % k.shape[1]:
        raise ValueError(f"k must be [total_tokens, Hk, D] with Hq a multiple of Hk, got {tuple(k.shape)}")
    B, Hk = b_seq_len.shape[0], k.shape[1]
    # an empty cache: every sequence is "new tokens only"
    kc = q.new_zeros(1, 1, Hk, q.shape[2])
    vc = q.new_zeros(1, 1, Hk, v.shape[2])
    info, kq, vq, ka, va = _prefill_common(q, k, v, o, kc, vc, "NHD", "auto", None, None)
    qo = torch.cat([b_start_loc, (b_start_loc[-1:] + b_seq_len[-1:])]).to(torch.int32)
    bt = torch.zeros(B, 1, dtype=torch.int32, device=q.device)
    ctx = torch.zeros(B, dtype=torch.int32, device=q.device)
    call = PagedCall(o, q, kc, vc, info, q.shape[2] ** -0.5, 0, bt, ctx, kq, vq, ka, va, qo_indptr=qo,
                     max_qlen=max_input_len, new_k=k, new_v=v, new_causal=is_causal, num_partitions=1)
    run_paged(call, backend)


# -- registration ---------------------------------------------------------------------------------------

reshape_and_cache_op = register_op("pa_reshape_and_cache", _reshape_and_cache_impl,
                                   mutates_args=("key_cache", "value_cache"), fake=_none)
reshape_and_cache_pertoken_op = register_op(
    "pa_reshape_and_cache_pertoken", _pertoken_impl,
    mutates_args=("key_cache", "value_cache", "k_dequant_scales", "v_dequant_scales"), fake=_none)
reshape_and_cache_block_quant_op = register_op(
    "pa_reshape_and_cache_block_quant", _block_quant_impl,
    mutates_args=("key_cache", "value_cache", "k_dequant_scales", "v_dequant_scales"), fake=_none)
swap_blocks_op = register_op("pa_swap_blocks", _swap_blocks_impl, mutates_args=("dst",), fake=_none)
copy_blocks_op = register_op("pa_copy_blocks", _copy_blocks_impl, mutates_args=("key_caches", "value_caches"),
                             fake=_none)
paged_attention_decode_op = register_op(
    "paged_attention_decode", _decode_impl, mutates_args=("output", "partial_out", "partial_max", "partial_sum"),
    fake=_none)
paged_attention_rocm_op = register_op("paged_attention_rocm", _rocm_impl,
                                      mutates_args=("out", "exp_sums", "max_logits", "tmp_out"), fake=_none)
paged_attention_v1_op = register_op("paged_attention_v1", _v1_impl, mutates_args=("out", "workspace_buffer"),
                                    fake=_none)
paged_attention_ragged_op = register_op("paged_attention_ragged", _ragged_impl,
                                        mutates_args=("out", "workspace_buffer"), fake=_none)
pa_fwd_asm_op = register_op("pa_fwd_asm", _asm_impl, mutates_args=("out",), fake=_none)
context_attention_fwd_op = register_op("pa_context_attention_fwd", _context_impl, mutates_args=("o",), fake=_none)
extend_attention_fwd_op = register_op("extend_attention_fwd", _extend_impl, mutates_args=("o_extend",), fake=_none)
prefill_attention_op = register_op("prefill_attention", _prefill_impl, mutates_args=("o",), fake=_none)
