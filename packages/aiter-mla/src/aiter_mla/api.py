"""Public MLA functions with upstream AITER's signatures (``aiter.mla`` / ``aiter.ops.attention``).

Each function checks its arguments (shapes, dtypes, devices: no host sync), allocates the
buffers the caller did not pass, and calls the ``torch.ops.aiter.*`` op, which dispatches to
the ``triton`` or ``reference`` backend (``backend=`` forces one).
"""

from __future__ import annotations

from typing import Optional

import torch

from . import _checks as C
from .metadata import get_mla_decode_fwd_max_splits, get_mla_metadata_info_v1, get_mla_metadata_v1

Tensor = torch.Tensor

__all__ = [
    "mla_decode_fwd",
    "mla_prefill_fwd",
    "mla_prefill_ps_fwd",
    "mla_reduce_v1",
    "get_mla_metadata_info_v1",
    "get_mla_metadata_v1",
    "get_mla_decode_fwd_max_splits",
    "choose_num_kv_splits",
]


def _ops():
    from .ops import OPS

    return OPS


def _paged_kv(name: str, kv_buffer, q: Tensor, page_size: int, nhead_kv: int = 1) -> Tensor:
    """``kv_buffer`` as ``[num_pages, page_size, 1, D]`` (3-D ``[pages, page_size, D]`` and the
    flat ``[pages * page_size, 1, 1, D]`` view are accepted)."""
    C.tensor(name, kv_buffer, dims=(3, 4), dtypes=C.Q_DTYPES, device=q.device)
    if kv_buffer.dim() == 3:
        kv_buffer = kv_buffer.unsqueeze(2)
    if kv_buffer.shape[2] != 1 or nhead_kv != 1:
        raise ValueError(f"{name}: MLA has one latent KV head (nhead_kv=1), got nhead_kv={nhead_kv} and a buffer "
                         f"of shape {tuple(kv_buffer.shape)}")
    if kv_buffer.shape[-1] != q.shape[-1]:
        raise ValueError(f"{name} rows must be as wide as q (kv_lora_rank + rope = {q.shape[-1]}), got "
                         f"{kv_buffer.shape[-1]}")
    if kv_buffer.shape[1] != page_size:
        if kv_buffer.shape[1] == 1 and kv_buffer.shape[0] % page_size == 0 and kv_buffer.is_contiguous():
            kv_buffer = kv_buffer.view(-1, page_size, 1, kv_buffer.shape[-1])
        else:
            raise ValueError(f"{name} must be [num_pages, page_size={page_size}, 1, D], got {tuple(kv_buffer.shape)}")
    C.last_dim_contiguous(name, kv_buffer)
    return kv_buffer


def _check_q_o(q, o, min_rope: int = 1) -> tuple[int, int, int]:
    C.tensor("q", q, dims=(3,), dtypes=C.Q_DTYPES)
    C.tensor("o", o, dims=(3,), dtypes=C.FLOAT_DTYPES, device=q.device)
    C.last_dim_contiguous("q", q)
    C.last_dim_contiguous("o", o)
    total_q, heads, dim = q.shape
    if heads < 1:
        raise ValueError(f"q must have at least one head, got shape {tuple(q.shape)}")
    if o.shape[0] != total_q or o.shape[1] != heads or not (0 < o.shape[2] <= dim - min_rope):
        raise ValueError(f"o must be [total_q={total_q}, heads={heads}, kv_lora_rank] with kv_lora_rank < "
                         f"{dim} (q's width), got {tuple(o.shape)}")
    return total_q, heads, o.shape[2]


def _check_page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, device) -> int:
    C.index("qo_indptr", qo_indptr, None, device)
    batch = qo_indptr.numel() - 1
    if batch < 0:
        raise ValueError("qo_indptr must have batch + 1 >= 1 entries, got 0")
    C.index("kv_indptr", kv_indptr, batch + 1, device)
    C.index("kv_indices", kv_indices, None, device)
    C.index("kv_last_page_lens", kv_last_page_lens, batch, device)
    return batch


def choose_num_kv_splits(batch: int, kv_tokens: int, num_heads: int, max_seqlen_q: int, kv_dtype: torch.dtype,
                         kv_lora_rank: int = 512) -> int:
    """The automatic split count (see :func:`aiter_mla.triton.launch.auto_num_kv_splits`)."""
    from aiter_core.arch import get_arch_info

    from .triton.launch import auto_num_kv_splits, decode_config

    cfg = decode_config(num_heads, max_seqlen_q, kv_dtype, kv_lora_rank)
    avg = kv_tokens / max(batch, 1)
    return auto_num_kv_splits(batch, avg, num_heads, max_seqlen_q, cfg, get_arch_info().num_cu)


def mla_decode_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                   kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int, page_size: int = 1,
                   nhead_kv: int = 1, sm_scale: Optional[float] = None, logit_cap: float = 0.0,
                   num_kv_splits: Optional[int] = None, num_kv_splits_indptr: Optional[Tensor] = None,
                   work_meta_data: Optional[Tensor] = None, work_indptr: Optional[Tensor] = None,
                   work_info_set: Optional[Tensor] = None, reduce_indptr: Optional[Tensor] = None,
                   reduce_final_map: Optional[Tensor] = None, reduce_partial_map: Optional[Tensor] = None,
                   q_scale: Optional[Tensor] = None, kv_scale: Optional[Tensor] = None,
                   intra_batch_mode: bool = False, return_logits: bool = False, return_lse: bool = False,
                   g_kv_indptr: Optional[Tensor] = None, cp_world_size: int = 1, cp_rank: int = 0,
                   causal: bool = True, *, backend: Optional[str] = None):
    """Absorbed MLA decode over a paged latent cache; writes ``o`` in place.

    ``q [total_q, H, kv_lora_rank + rope]`` (bf16/fp16/fp32, or fp8 with ``q_scale``),
    ``kv_buffer [num_pages, page_size, 1, kv_lora_rank + rope]`` (K = the row, V = its first
    ``kv_lora_rank`` values; fp8 with ``kv_scale``), ``o [total_q, H, kv_lora_rank]``. Any head
    count. Returns ``(logits, lse)``: ``logits`` the fp32 split partials ``[total_q, splits, H,
    kv_lora_rank]`` (``o`` viewed as ``[total_q, 1, H, kv_lora_rank]`` when there is one
    split), ``lse`` ``[total_q, H]`` fp32 when ``return_lse`` else None.

    Persistent mode when ``work_meta_data`` is given (buffers from ``get_mla_metadata_v1``): the
    partial buffers are ``[reduce_partial_map.numel() * max_seqlen_q, 1, H, kv_lora_rank]`` and
    are returned as ``logits``.
    """
    total_q, heads, d_v = _check_q_o(q, o)
    C.positive_int("max_seqlen_q", max_seqlen_q)
    C.positive_int("page_size", page_size)
    batch = _check_page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, q.device)
    kv_buffer = _paged_kv("kv_buffer", kv_buffer, q, page_size, nhead_kv)
    q_scale = C.scale("q_scale", q_scale, q.device)
    kv_scale = C.scale("kv_scale", kv_scale, q.device)
    if logit_cap > 0:
        raise ValueError(f"logit_cap must be <= 0 (soft-capping is not supported by MLA decode, as upstream), got {logit_cap}")
    if cp_world_size != 1 or g_kv_indptr is not None:
        raise ValueError(f"context parallelism (cp_world_size={cp_world_size}, g_kv_indptr) is not supported")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    lse = torch.empty(total_q, heads, dtype=torch.float32, device=q.device) if return_lse else None
    ops = _ops()

    if work_meta_data is not None:
        missing = [n for n, v in (("work_indptr", work_indptr), ("work_info_set", work_info_set),
                                  ("reduce_indptr", reduce_indptr), ("reduce_final_map", reduce_final_map),
                                  ("reduce_partial_map", reduce_partial_map)) if v is None]
        if missing:
            raise ValueError(f"persistent mode (work_meta_data given) also needs {', '.join(missing)}")
        C.index("work_indptr", work_indptr, None, q.device)
        C.tensor("work_info_set", work_info_set, dims=(2,), dtypes=(torch.int32,), device=q.device)
        if work_info_set.shape[1] != 8:
            raise ValueError(f"work_info_set must be [max_work, 8] int32, got {tuple(work_info_set.shape)}")
        for name, buf in (("reduce_indptr", reduce_indptr), ("reduce_partial_map", reduce_partial_map)):
            C.index(name, buf, None, q.device)
        C.tensor("reduce_final_map", reduce_final_map, dims=(2,), dtypes=(torch.int32,), device=q.device)
        rows = reduce_partial_map.numel() * max_seqlen_q
        partial_o = torch.empty(rows, 1, heads, d_v, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(rows, 1, heads, 1, dtype=torch.float32, device=q.device)
        ops["mla_decode_fwd_persistent"](
            q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, max_seqlen_q, page_size, scale, causal, work_indptr,
            work_info_set, reduce_indptr, reduce_final_map, reduce_partial_map, partial_o, partial_lse, lse, q_scale,
            kv_scale, backend=backend)
        return partial_o, lse

    if num_kv_splits is None:
        num_kv_splits = choose_num_kv_splits(batch, kv_indices.numel() * page_size, heads, max_seqlen_q,
                                             kv_buffer.dtype, d_v)
    C.positive_int("num_kv_splits", num_kv_splits)
    if num_kv_splits > 1:
        logits = torch.empty(total_q, num_kv_splits, heads, d_v, dtype=torch.float32, device=q.device)
        attn_lse = torch.empty(total_q, num_kv_splits, heads, dtype=torch.float32, device=q.device)
    else:
        logits = attn_lse = None
    ops["mla_decode_fwd"](q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                          page_size, scale, causal, num_kv_splits, logits, attn_lse, lse, q_scale, kv_scale,
                          backend=backend)
    if logits is None:
        logits = o.view(total_q, 1, heads, d_v)
    return logits, lse


def mla_prefill_fwd(q: Tensor, kv_buffer: Tensor, o: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                    kv_indices: Tensor, kv_last_page_lens: Tensor, max_seqlen_q: int,
                    sm_scale: Optional[float] = None, logit_cap: float = 0.0, num_kv_splits: Optional[int] = None,
                    *, causal: bool = True, backend: Optional[str] = None):
    """Absorbed MLA prefill (causal, bottom-right), one split: returns ``(o, lse [total_q, H])``.

    The page size is ``kv_buffer.shape[1]`` (upstream's ASM kernel only takes page size 1).
    """
    total_q, heads, _ = _check_q_o(q, o)
    C.positive_int("max_seqlen_q", max_seqlen_q)
    _check_page_table(qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, q.device)
    C.tensor("kv_buffer", kv_buffer, dims=(3, 4), dtypes=C.Q_DTYPES, device=q.device)
    kv_buffer = _paged_kv("kv_buffer", kv_buffer, q, kv_buffer.shape[1])
    if logit_cap > 0:
        raise ValueError(f"logit_cap must be <= 0 (not supported), got {logit_cap}")
    scale = q.shape[-1] ** -0.5 if sm_scale is None else float(sm_scale)
    lse = torch.empty(total_q, heads, dtype=torch.float32, device=q.device)
    _ops()["mla_prefill_fwd"](q, kv_buffer, o, qo_indptr, kv_indptr, kv_indices, kv_last_page_lens, max_seqlen_q,
                              kv_buffer.shape[1], scale, causal, lse, backend=backend)
    return o, lse


def mla_prefill_ps_fwd(Q: Tensor, K: Tensor, V: Tensor, output: Tensor, qo_indptr: Tensor, kv_indptr: Tensor,
                       kv_page_indices: Tensor, work_indptr: Optional[Tensor], work_info_set: Optional[Tensor],
                       max_seqlen_q: int, is_causal: bool, reduce_indptr: Optional[Tensor] = None,
                       reduce_final_map: Optional[Tensor] = None, reduce_partial_map: Optional[Tensor] = None,
                       softmax_scale: Optional[float] = None, q_scale: Optional[Tensor] = None,
                       k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None,
                       *, backend: Optional[str] = None):
    """Non-absorbed MLA prefill: ``Q [total_q, H, 192]``, ``K [tokens, Hk, 192]``, ``V [tokens,
    Hk, 128]`` (any head dims; GQA ``H % Hk == 0``; 4-D ``[tokens, 1, Hk, D]`` accepted),
    ``kv_page_indices`` the token rows of each sequence (``kv_indptr`` prefix sums), bottom-right
    causal when ``is_causal``; bf16/fp16/fp32 or fp8 with per-tensor scales. Writes ``output
    [total_q, H, Dv]``; returns ``(output, lse [total_q, H])``. The work/reduce arguments are
    accepted for compatibility and not needed (the kernel schedules itself)."""
    C.tensor("Q", Q, dims=(3,), dtypes=C.Q_DTYPES)
    K = _token_rows("K", K, Q)
    V = _token_rows("V", V, Q)
    C.tensor("output", output, dims=(3,), dtypes=C.FLOAT_DTYPES, device=Q.device)
    total_q, heads, dim = Q.shape
    if K.shape[-1] != dim:
        raise ValueError(f"K head dim must equal Q's ({dim}), got {K.shape[-1]}")
    if K.shape[0] != V.shape[0] or K.shape[1] != V.shape[1]:
        raise ValueError(f"K and V must have the same tokens and heads, got {tuple(K.shape)} and {tuple(V.shape)}")
    if heads % K.shape[1]:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({K.shape[1]})")
    if dim < 32:
        raise ValueError(f"Q head dim must be >= 32, got {dim}")
    if tuple(output.shape) != (total_q, heads, V.shape[-1]):
        raise ValueError(f"output must be [{total_q}, {heads}, {V.shape[-1]}], got {tuple(output.shape)}")
    C.index("qo_indptr", qo_indptr, None, Q.device)
    C.index("kv_indptr", kv_indptr, qo_indptr.numel(), Q.device)
    C.index("kv_page_indices", kv_page_indices, None, Q.device)
    C.positive_int("max_seqlen_q", max_seqlen_q)
    scales = [C.scale(n, s, Q.device) for n, s in (("q_scale", q_scale), ("k_scale", k_scale), ("v_scale", v_scale))]
    scale = dim ** -0.5 if softmax_scale is None else float(softmax_scale)
    lse = torch.empty(total_q, heads, dtype=torch.float32, device=Q.device)
    _ops()["mla_prefill_ps_fwd"](Q, K, V, output, qo_indptr, kv_indptr, kv_page_indices, max_seqlen_q, bool(is_causal),
                                 scale, *scales, lse, backend=backend)
    return output, lse


def _token_rows(name: str, x, q: Tensor) -> Tensor:
    C.tensor(name, x, dims=(3, 4), dtypes=C.Q_DTYPES, device=q.device)
    if x.dim() == 4:
        if x.shape[1] != 1:
            raise ValueError(f"{name} as a 4-D cache must have page size 1 ([tokens, 1, Hk, D]), got {tuple(x.shape)}")
        x = x[:, 0]
    C.last_dim_contiguous(name, x)
    return x


def mla_reduce_v1(partial_output: Tensor, partial_lse: Tensor, reduce_indptr: Tensor, reduce_final_map: Tensor,
                  reduce_partial_map: Tensor, max_seqlen_q: int, num_kv_splits: int, final_output: Tensor,
                  final_lse: Optional[Tensor] = None, *, backend: Optional[str] = None) -> None:
    """Merge the persistent partials: ``partial_output [slots * max_seqlen_q, 1, H, Dv]`` and
    ``partial_lse [.., 1, H, 1]`` fp32 into ``final_output [total_q, H, Dv]`` (and
    ``final_lse [total_q, H]``), per the reduce maps of ``get_mla_metadata_v1``."""
    C.tensor("final_output", final_output, dims=(3,), dtypes=C.FLOAT_DTYPES)
    device = final_output.device
    C.tensor("partial_output", partial_output, dtypes=(torch.float32,), device=device)
    C.tensor("partial_lse", partial_lse, dtypes=(torch.float32,), device=device)
    heads, d_v = final_output.shape[1], final_output.shape[2]
    if partial_output.shape[-2:] != (heads, d_v):
        raise ValueError(f"partial_output must end in (H={heads}, Dv={d_v}), got {tuple(partial_output.shape)}")
    if partial_lse.numel() != partial_output.numel() // d_v:
        raise ValueError(f"partial_lse must hold one value per partial row and head ({partial_output.numel() // d_v}),"
                         f" got {partial_lse.numel()}")
    C.index("reduce_indptr", reduce_indptr, None, device)
    C.tensor("reduce_final_map", reduce_final_map, dims=(2,), dtypes=(torch.int32,), device=device)
    C.index("reduce_partial_map", reduce_partial_map, None, device)
    if reduce_final_map.shape[0] != reduce_indptr.numel() - 1:
        raise ValueError(f"reduce_final_map must have {reduce_indptr.numel() - 1} rows (reduce_indptr tiles), got "
                         f"{reduce_final_map.shape[0]}")
    C.positive_int("max_seqlen_q", max_seqlen_q)
    if final_lse is not None:
        C.tensor("final_lse", final_lse, dtypes=(torch.float32,), device=device)
        final_lse = final_lse.view(final_output.shape[0], heads)
    _ops()["mla_reduce_v1"](partial_output, partial_lse, reduce_indptr, reduce_final_map, reduce_partial_map,
                            max_seqlen_q, final_output, final_lse, backend=backend)
