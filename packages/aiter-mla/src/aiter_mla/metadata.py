"""Persistent-mode scheduling: ``get_mla_metadata_info_v1`` / ``get_mla_metadata_v1``.

Buffers have upstream's shapes and dtypes; the schedule is simpler than upstream's.

Work items (``work_info_set [max_work, 8]`` int32), one per (sequence, q tile, KV split, head
group)::

    0 batch index
    1 partial slot (-1: the item covers the whole KV range and writes the final output)
    2 q_start, 3 q_end          global query-token range of the tile (at most BLOCK_Q tokens)
    4 kv_start, 5 kv_end        global page range (indices into kv_indices)
    6 kv_len                    the sequence's KV length in tokens (causal diagonal, last page)
    7 head_lo | head_hi << 16   query-head range of the item

Split count per sequence: ``min(max_split_per_batch, ceil(pages / chunk))`` where ``chunk``
spreads the batch's total page work evenly over the workers (``work_indptr.numel() - 1``,
= SMs x 2), and never below ``max(kv_granularity, 64)`` tokens. Items are dealt out to workers
in order, in equal contiguous runs: ``work_indptr[w] = min(total, w * ceil(total / workers))``.

Reduce: tile ``i`` (sequence ``i // q_tiles``, q tile ``i % q_tiles``) has
``reduce_final_map[i] = (q_start, q_end)`` and the slots ``reduce_partial_map[reduce_indptr[i]:
reduce_indptr[i+1]]`` (none when the sequence is not split). Slot ``p`` is rows
``p * max_seqlen_q + t`` of the partial buffers ``[slots * max_seqlen_q, 1, H, Dv]`` / ``[.., 1, H, 1]``.

Everything is computed with device tensor ops from the index tensors: no host sync when
``max_seqlen_qo`` (or ``uni_seqlen_qo``) is given.
"""

from __future__ import annotations

import torch

from aiter_core.checks import check_int, check_int32_vector, check_tensor

from . import checks as C
from .triton.launch import tiling

Tensor = torch.Tensor

__all__ = ["get_mla_metadata_info_v1", "get_mla_metadata_v1", "get_mla_decode_fwd_max_splits", "workers_for"]

WORKERS_PER_SM = 2
MIN_SPLIT_TOKENS = 64


def workers_for(device=None) -> int:
    from aiter_core.arch import get_arch_info

    return max(1, get_arch_info().num_cu) * WORKERS_PER_SM


def get_mla_decode_fwd_max_splits(num_head_qo: int, max_seqlen_qo: int, q_dtype=None, kv_dtype=None) -> int:
    """Persistent workers: SMs (``aiter_core.arch``) x 2 CTAs per SM."""
    return workers_for()


def get_mla_metadata_info_v1(batch_size: int, max_seqlen_qo: int, num_head_qo: int, q_dtype, kv_dtype,
                             is_sparse: bool, fast_mode: bool = True, num_kv_splits: int = 32,
                             intra_batch_mode: bool = False, max_split_per_batch: int = -1):
    """``[(shape, dtype)] * 6`` of ``work_metadata``, ``work_indptr``, ``work_info_set``,
    ``reduce_indptr``, ``reduce_final_map``, ``reduce_partial_map`` (allocate them with
    ``torch.empty(shape, dtype=dtype, device=...)``)."""
    check_int("batch_size", batch_size, minimum=1)
    check_int("max_seqlen_qo", max_seqlen_qo, minimum=1)
    check_int("num_head_qo", num_head_qo, minimum=1)
    C.metadata_options(is_sparse=is_sparse)
    splits = max_split_per_batch if max_split_per_batch > 0 else check_int("num_kv_splits", num_kv_splits, minimum=1)
    block_h, block_q = tiling(num_head_qo, max_seqlen_qo)
    q_tiles = -(-max_seqlen_qo // block_q)
    groups = -(-num_head_qo // block_h)
    tiles = batch_size * q_tiles
    workers = workers_for()
    return [
        ((2,), torch.uint64),
        ((workers + 1,), torch.int32),
        ((tiles * splits * groups, 8), torch.int32),
        ((tiles + 1,), torch.int32),
        ((tiles, 2), torch.int32),
        ((tiles * splits,), torch.int32),
    ]


def get_mla_metadata_v1(seqlens_qo_indptr: Tensor, seqlens_kv_indptr: Tensor, kv_last_page_lens: Tensor,
                        num_heads_per_head_k: int, num_heads_k: int, is_causal: bool, work_metadata_ptrs: Tensor,
                        work_info_set: Tensor, work_indptr: Tensor, reduce_indptr: Tensor,
                        reduce_final_map: Tensor, reduce_partial_map: Tensor, page_size: int = 1,
                        kv_granularity: int = 16, max_seqlen_qo: int = -1, uni_seqlen_qo: int = -1,
                        fast_mode: bool = True, topk: int = -1, max_split_per_batch: int = -1,
                        intra_batch_mode: bool = False, is_cp_round_robin: bool = False, mla_version=None,
                        dtype_q_nope=None, dtype_q_rope=None, dtype_kv_nope=None, dtype_kv_rope=None,
                        dtype_q=None, dtype_kv=None) -> None:
    """Fill the buffers from :func:`get_mla_metadata_info_v1` for this batch (in place)."""
    like = "seqlens_qo_indptr"
    batch = check_int32_vector(like, seqlens_qo_indptr).shape[0] - 1
    device = seqlens_qo_indptr.device
    check_int32_vector("seqlens_kv_indptr", seqlens_kv_indptr, batch + 1, device=device, like=like)
    check_int32_vector("kv_last_page_lens", kv_last_page_lens, batch, device=device, like=like)
    C.metadata_options(topk=topk, num_heads_k=num_heads_k)
    check_int("page_size", page_size, minimum=1)
    heads = check_int("num_heads_per_head_k", num_heads_per_head_k, minimum=1)
    for name, buf, dims in (("work_info_set", work_info_set, 2), ("work_indptr", work_indptr, 1),
                            ("reduce_indptr", reduce_indptr, 1), ("reduce_final_map", reduce_final_map, 2),
                            ("reduce_partial_map", reduce_partial_map, 1)):
        check_tensor(name, buf, ndim=dims, dtypes=C.I32, device=device, like=like)
    if work_info_set.shape[1] != 8:
        raise ValueError(f"work_info_set must have 8 int32 fields per row, got shape {tuple(work_info_set.shape)}")
    if max_seqlen_qo <= 0:
        max_seqlen_qo = uni_seqlen_qo if uni_seqlen_qo > 0 else int((seqlens_qo_indptr[1:] - seqlens_qo_indptr[:-1]).max())
    block_h, block_q = tiling(heads, max_seqlen_qo)
    q_tiles = -(-max_seqlen_qo // block_q)
    groups = -(-heads // block_h)
    tiles = batch * q_tiles
    if reduce_final_map.shape[0] != tiles or reduce_indptr.numel() != tiles + 1:
        raise ValueError(f"reduce_indptr/reduce_final_map must hold {tiles} tiles (batch {batch} x {q_tiles} q tiles), "
                         f"got {reduce_indptr.numel() - 1} and {reduce_final_map.shape[0]}: allocate them from "
                         f"get_mla_metadata_info_v1 with the same batch size, max_seqlen_qo and head count")
    capacity = min(reduce_partial_map.numel() // max(tiles, 1), work_info_set.shape[0] // max(tiles * groups, 1))
    max_splits = max(1, capacity if max_split_per_batch <= 0 else min(capacity, max_split_per_batch))
    workers = work_indptr.numel() - 1

    i64 = torch.int64
    qo = seqlens_qo_indptr.to(i64)
    kvp = seqlens_kv_indptr.to(i64)
    pages = kvp[1:] - kvp[:-1]
    kv_len = torch.where(pages > 0, (pages - 1) * page_size + kv_last_page_lens.to(i64), torch.zeros_like(pages))
    # pages per split: the whole batch's page work spread over the workers, at least MIN tokens
    min_pages = -(-max(kv_granularity, MIN_SPLIT_TOKENS) // page_size)
    total_pages = pages.sum() * (q_tiles * groups)
    chunk = torch.clamp((total_pages + workers - 1) // workers, min=min_pages)
    splits = torch.clamp((pages + chunk - 1) // chunk, min=1, max=max_splits)  # [B]

    b_idx = torch.arange(batch, device=device, dtype=i64)[:, None, None, None]
    qt_idx = torch.arange(q_tiles, device=device, dtype=i64)[None, :, None, None]
    s_idx = torch.arange(max_splits, device=device, dtype=i64)[None, None, :, None]
    g_idx = torch.arange(groups, device=device, dtype=i64)[None, None, None, :]
    shape = (batch, q_tiles, max_splits, groups)
    n_split = splits[:, None, None, None]
    valid = (s_idx < n_split).expand(shape)

    split_rows = torch.where(splits > 1, splits, torch.zeros_like(splits))  # partial slots per tile
    per_tile = split_rows[:, None].expand(batch, q_tiles).reshape(-1)
    slot_base = torch.cumsum(per_tile, 0) - per_tile  # [tiles]
    tile = (b_idx * q_tiles + qt_idx).expand(shape)
    slot = torch.where(n_split > 1, slot_base[tile] + s_idx, torch.full_like(tile, -1))
    q_start = (qo[:-1][:, None, None, None] + qt_idx * block_q)
    q_end = torch.minimum(q_start + block_q, qo[1:][:, None, None, None])
    p_seq = pages[:, None, None, None]
    kv_start = kvp[:-1][:, None, None, None] + (p_seq * s_idx) // n_split
    kv_end = kvp[:-1][:, None, None, None] + (p_seq * (s_idx + 1)) // n_split
    heads_field = g_idx * block_h + (torch.clamp((g_idx + 1) * block_h, max=heads) << 16)
    fields = [b_idx, slot, q_start, q_end, kv_start, kv_end, kv_len[:, None, None, None], heads_field]
    rows = torch.stack([f.expand(shape) for f in fields], dim=-1).reshape(-1, 8)

    flat_valid = valid.reshape(-1)
    order = torch.cumsum(flat_valid.to(i64), 0) - 1
    trash = work_info_set.shape[0]
    dest = torch.where(flat_valid, order, torch.full_like(order, trash))
    staged = torch.zeros(trash + 1, 8, dtype=torch.int32, device=device)
    staged.index_put_((dest,), rows.to(torch.int32))  # invalid entries all land on the trash row
    work_info_set.copy_(staged[:trash])

    total = flat_valid.sum()
    per_worker = (total + workers - 1) // workers
    work_indptr.copy_(torch.minimum(torch.arange(workers + 1, device=device, dtype=i64) * per_worker, total))

    reduce_indptr.copy_(torch.cat([torch.zeros(1, dtype=i64, device=device), torch.cumsum(per_tile, 0)]))
    tile_q0 = (qo[:-1][:, None] + torch.arange(q_tiles, device=device, dtype=i64)[None, :] * block_q)
    tile_q1 = torch.minimum(tile_q0 + block_q, qo[1:][:, None])
    reduce_final_map.copy_(torch.stack([tile_q0.reshape(-1), tile_q1.reshape(-1)], dim=-1))
    reduce_partial_map.copy_(torch.arange(reduce_partial_map.numel(), device=device, dtype=torch.int32))
