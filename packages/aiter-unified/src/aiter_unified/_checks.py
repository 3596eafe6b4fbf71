"""Argument checks of ``unified_attention``: host-side only (shapes, dtypes, devices, Python
values), never tensor contents, so they cost no device sync and run under CUDA-graph capture.
The generic checks are :mod:`aiter_core.checks`; the rules here are unified attention's own."""

from __future__ import annotations

import torch

from aiter_core.checks import (
    check_bool,
    check_device,
    check_float,
    check_int,
    check_last_dim_contiguous,
    check_scalar_f32,
    check_tensor,
    describe,
)

FP8 = (torch.float8_e4m3fn,)
FLOAT = (torch.float16, torch.bfloat16, torch.float32)
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 512
MIN_BLOCK, MAX_BLOCK = 1, 256


def check_unified_args(q, k, v, out, cu_seqlens_q, max_seqlen_q, seqused_k, max_seqlen_k, softmax_scale, causal,
                       window_size, block_table, softcap, q_descale, k_descale, v_descale, q_scales, alibi_slopes,
                       output_scale, qq_bias, sinks, shuffled_kv_cache, skip_reduce) -> None:
    """Raise ValueError/TypeError naming the argument, what was expected and what came."""
    if q_scales is not None:
        raise ValueError("q_scales (nvfp4 block-scaled q) is not supported: pass q as float16, bfloat16 or "
                         "float8_e4m3fn with an optional per-tensor q_descale")
    if shuffled_kv_cache:
        raise ValueError("shuffled_kv_cache=True (gfx1250 shuffled layout) is not supported: pass the NHD cache "
                         "k, v [num_blocks, block_size, num_kv_heads, head_dim]")
    if causal is not True:
        raise ValueError(f"causal must be True (unified attention is causal only, as upstream), got {causal!r}")
    for name, x in (("q", q), ("k", k), ("v", v), ("out", out)):
        check_tensor(name, x, ndim=3 if name in ("q", "out") else 4)
    device = q.device
    for name, x in (("k", k), ("v", v), ("out", out)):
        check_device(name, x, device, like="q")
    if q.dtype not in FLOAT + FP8:
        raise TypeError(f"q must be float16, bfloat16, float32 or float8_e4m3fn, got {q.dtype}")
    if k.dtype != v.dtype:
        raise TypeError(f"k and v must have the same dtype, got k {k.dtype} and v {v.dtype}")
    if q.dtype in FP8:
        if k.dtype not in FP8:
            raise TypeError(f"an fp8 q needs an fp8 (float8_e4m3fn) KV cache, got {k.dtype}")
    elif k.dtype not in FP8 and k.dtype != q.dtype:
        raise TypeError(f"k/v must have q's dtype {q.dtype} or be float8_e4m3fn, got {k.dtype}")
    if out.dtype not in FLOAT + FP8:
        raise TypeError(f"out must be float16, bfloat16, float32 or float8_e4m3fn, got {out.dtype}")
    num_tokens, heads_q, head_dim = q.shape
    num_blocks, block_size, heads_kv, head_dim_k = k.shape
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have k's shape {tuple(k.shape)} [num_blocks, block_size, Hk, D], got {tuple(v.shape)}")
    if head_dim_k != head_dim:
        raise ValueError(f"k's head dim (last) must equal q's {head_dim}, got {head_dim_k}")
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {head_dim}")
    if not MIN_BLOCK <= block_size <= MAX_BLOCK:
        raise ValueError(f"block_size (k.shape[1]) must be in [{MIN_BLOCK}, {MAX_BLOCK}], got {block_size}")
    if heads_kv == 0 or heads_q % heads_kv != 0:
        raise ValueError(f"q heads ({heads_q}) must be a multiple of the KV heads ({heads_kv})")
    if tuple(out.shape) != tuple(q.shape):
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
    for name, x in (("q", q), ("out", out), ("k", k), ("v", v)):
        check_last_dim_contiguous(name, x)
    for name, x, ndim in (("cu_seqlens_q", cu_seqlens_q, 1), ("seqused_k", seqused_k, 1), ("block_table", block_table, 2)):
        check_tensor(name, x, ndim=ndim, dtypes=(torch.int32,), device=device, like="q")
    num_seqs = cu_seqlens_q.shape[0] - 1
    if num_seqs < 1:
        raise ValueError(f"cu_seqlens_q must have num_seqs + 1 >= 2 entries, got shape {tuple(cu_seqlens_q.shape)}")
    if seqused_k.shape[0] != num_seqs:
        raise ValueError(f"seqused_k must have num_seqs={num_seqs} entries, got {seqused_k.shape[0]}")
    if block_table.shape[0] < num_seqs:
        raise ValueError(f"block_table must have at least num_seqs={num_seqs} rows, got {block_table.shape[0]}")
    check_int("max_seqlen_q", max_seqlen_q, minimum=1)
    check_int("max_seqlen_k", max_seqlen_k, minimum=1)
    if max_seqlen_q > max_seqlen_k:
        raise ValueError(f"max_seqlen_q ({max_seqlen_q}) cannot exceed max_seqlen_k ({max_seqlen_k}): "
                         "seqused_k counts the new tokens too")
    if block_table.shape[1] * block_size < max_seqlen_k:
        raise ValueError(f"block_table has {block_table.shape[1]} blocks of {block_size} per sequence, fewer than "
                         f"max_seqlen_k={max_seqlen_k} tokens")
    check_float("softmax_scale", softmax_scale, above=0.0)  # the kernel folds it into exp2's FMA
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or \
            not all(isinstance(w, int) and not isinstance(w, bool) for w in window_size):
        raise ValueError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    check_float("softcap", softcap, minimum=0.0)
    for name, x in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale),
                    ("output_scale", output_scale)):
        if x is not None:
            check_scalar_f32(name, x, device=device, like="q")
    if (k_descale is None) != (v_descale is None):
        raise ValueError("k_descale and v_descale must be given together (per-tensor KV scales), got only "
                         + ("k_descale" if v_descale is None else "v_descale"))
    for name, x in (("alibi_slopes", alibi_slopes), ("sinks", sinks)):
        if x is None:
            continue
        check_tensor(name, x, ndim=1)
        if x.shape[0] != heads_q or x.dtype != torch.float32:
            raise ValueError(f"{name} must be float32 [{heads_q}] (one per q head), got {describe(x)}")
        check_device(name, x, device, like="q")
    if qq_bias is not None:
        check_tensor("qq_bias", qq_bias, ndim=2)
        if qq_bias.shape[0] < max_seqlen_q or qq_bias.shape[1] < max_seqlen_q or qq_bias.stride(1) != 1:
            raise ValueError(f"qq_bias must be [n, n] with n >= max_seqlen_q={max_seqlen_q} and unit last stride, "
                             f"got {describe(qq_bias)}")
        if qq_bias.dtype not in FLOAT:
            raise TypeError(f"qq_bias must be float16, bfloat16 or float32, got {qq_bias.dtype}")
        check_device("qq_bias", qq_bias, device, like="q")
    check_bool("skip_reduce", skip_reduce)
