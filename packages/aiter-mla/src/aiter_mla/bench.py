"""Benchmark CLI: ``python -m aiter_mla.bench [--quick] [--sweep] [--out DIR]`` (also ``aiter bench mla``).

The three shapes of issue 6 (absorbed decode, ``kv_lora_rank`` 512 + rope 64, one query token,
page 64, shuffled pages):

* ``mem``: b=128, h=16, context 4096, bf16 (memory-bound; target >= 2.4 TB/s);
* ``compute``: b=128, h=128, context 4096, bf16 (compute-bound; target >= 350 TFLOP/s);
* ``fp8``: the ``mem`` shape with an fp8 (e4m3) KV cache (target >= 1.5x faster than ``mem``).

Providers, measured in the same run: ``aiter-triton`` (``mla_decode_fwd``, automatic splits),
``aiter-persistent`` (metadata + persistent decode + reduce), and two PyTorch formulations of the
same absorbed attention on a contiguous copy of the KV rows: ``torch-matmul`` (bmm, fp32
softmax, bmm) and ``torch-sdpa`` (``scaled_dot_product_attention`` with the query heads as the
query sequence of one head). Every provider is timed by a CUDA-graph replay
(``aiter_core.bench.graph_median_ms``: kernel time, as serving frameworks run decode); the
``mla_decode-eager`` row times ``aiter-triton`` called from Python. FLOPs ``2*b*h*s_q*ctx*(576+512)`` and bytes (Q + KV rows once + O)
as in spec/anchors.md; the copy/matmul ceilings from ``aiter_core.bench``. Every provider is
checked against the reference once before timing.

``--sweep`` also times launch configs (heads per CTA incl. padding, BLOCK_N, warps, stages,
splits) of the Triton kernel per shape and reports the best: the data for tuning
``aiter_mla.triton.launch.decode_config``.

Writes a terminal table and ``<stem>.json`` / ``.md`` / ``.png`` into ``--out``. Without a GPU it
runs the family's smoke test instead.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from aiter_core.host import HostCase

SHAPES = {
    "mem": dict(batch=128, heads=16, ctx=4096, kv="bf16"),
    "compute": dict(batch=128, heads=128, ctx=4096, kv="bf16"),
    "fp8": dict(batch=128, heads=16, ctx=4096, kv="fp8"),
}
PROVIDERS = ("aiter-triton", "aiter-persistent", "torch-matmul", "torch-sdpa")
LORA, ROPE, PAGE = 512, 64, 64
# where and in what the run happens; tests swap these for a CPU dry run under the interpreter
DEVICE = "cuda"
ACT = "bfloat16"
TARGETS = {"mem": ("tbps", 2.4), "compute": ("tflops", 350.0)}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aiter_mla.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="mem,compute,fp8", help="comma list of mem, compute, fp8")
    p.add_argument("--quick", action="store_true", help="batch 32 instead of 128 (smoke timing)")
    p.add_argument("--providers", default=",".join(PROVIDERS), help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--sweep", action="store_true", help="also time Triton launch configs per shape")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy/matmul ceilings")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./aiter-mla-bench)")
    p.add_argument("--stem", default="mla", help="output file stem (default mla)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.shapes = tuple(s for s in args.shapes.split(",") if s)
    bad = [s for s in args.shapes if s not in SHAPES]
    if bad:
        p.error(f"unknown shape(s) {bad}; choose from {', '.join(SHAPES)}")
    args.providers = tuple(s for s in args.providers.split(",") if s)
    bad = [s for s in args.providers if s not in PROVIDERS]
    if bad:
        p.error(f"unknown provider(s) {bad}; choose from {', '.join(PROVIDERS)}")
    return args


def _make(shape: dict, quick: bool):
    import torch

    from .testing import make_paged_case

    batch = 32 if quick else shape["batch"]
    fp8 = shape["kv"] == "fp8"
    case = make_paged_case(batch=batch, heads=shape["heads"], kv_lens=shape["ctx"], q_lens=1, page_size=PAGE,
                           kv_lora_rank=LORA, rope=ROPE, dtype=getattr(torch, ACT),
                           kv_dtype=torch.float32 if fp8 else getattr(torch, ACT), seed=0, device=DEVICE)
    kv_scale = None
    if fp8:
        kv_scale = (case.kv.abs().amax() / 448.0).reshape(1).float()
        case.kv = (case.kv / kv_scale).to(torch.float8_e4m3fn)
    return case, kv_scale


def _contiguous_kv(case, kv_scale):
    """[b, ctx, 576] bf16 rows of every sequence (the peers' input: no paging)."""
    import torch

    pages = case.kv_indices.long().view(len(case.kv_lens), -1)
    rows = case.kv[pages].reshape(pages.shape[0], -1, case.kv.shape[-1])[:, : case.kv_lens[0]]
    rows = rows.float() * kv_scale if kv_scale is not None else rows
    return rows.to(getattr(torch, ACT)).contiguous()


def _sync() -> None:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()


def _refcheck(name: str, got, want, atol: float = 3e-2) -> None:
    err = (got.float() - want.float()).abs().max().item()
    if not err <= atol:
        raise AssertionError(f"{name}: differs from the reference by {err:.3g} (tolerance {atol}); not timing it")


def _providers(case, kv_scale, scale, heads, names):
    """{name: zero-arg callable} plus each one's output for the refcheck."""
    import torch
    import torch.nn.functional as F

    from . import api

    total_q = case.q.shape[0]
    fns = {}
    if "aiter-triton" in names:
        o = torch.empty(total_q, heads, LORA, dtype=getattr(torch, ACT), device=DEVICE)
        fns["aiter-triton"] = (lambda: api.mla_decode_fwd(
            case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, 1,
            page_size=PAGE, sm_scale=scale, kv_scale=kv_scale), o)
    if "aiter-persistent" in names:
        o_p = torch.empty(total_q, heads, LORA, dtype=getattr(torch, ACT), device=DEVICE)
        batch = len(case.kv_lens)
        info = api.get_mla_metadata_info_v1(batch, 1, heads, case.q.dtype, case.kv.dtype, is_sparse=False)
        meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(s, dtype=d, device=DEVICE) for s, d in info]
        api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info,
                                w_ind, r_ind, r_final, r_part, page_size=PAGE, max_seqlen_qo=1)
        fns["aiter-persistent"] = (lambda: api.mla_decode_fwd(
            case.q, case.kv, o_p, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, 1,
            page_size=PAGE, sm_scale=scale, kv_scale=kv_scale, work_meta_data=meta, work_indptr=w_ind,
            work_info_set=w_info, reduce_indptr=r_ind, reduce_final_map=r_final, reduce_partial_map=r_part), o_p)
    if "torch-matmul" in names or "torch-sdpa" in names:
        rows = _contiguous_kv(case, kv_scale)  # [b, ctx, 576]
        q3 = case.q.view(len(case.kv_lens), heads, -1)  # one query token per sequence
        out_m = torch.empty(q3.shape[0], heads, LORA, dtype=getattr(torch, ACT), device=DEVICE)

        def matmul():
            s = torch.bmm(q3, rows.transpose(1, 2)).float() * scale
            p = torch.softmax(s, dim=-1).to(getattr(torch, ACT))
            torch.bmm(p, rows[..., :LORA], out=out_m)

        if "torch-matmul" in names:
            fns["torch-matmul"] = (matmul, out_m.view(total_q, heads, LORA))
        if "torch-sdpa" in names:
            out_s = {}

            def sdpa():
                out_s["o"] = F.scaled_dot_product_attention(q3.unsqueeze(1), rows.unsqueeze(1),
                                                            rows[..., :LORA].unsqueeze(1), scale=scale)

            fns["torch-sdpa"] = (sdpa, out_s)
    return fns


def _sweep_configs(heads: int):
    """Heads per CTA (the natural tiling, and padded to 32/64 rows: 64 rows use wgmma), BLOCK_N,
    warps, and the KV pipelining: Triton's cp.async pipeline (2 or 3 stages) or register
    double buffering (``prefetch``, 1 stage). About 30 configs; the split count is a runtime
    argument, so splits > 1 share one compile. Configs that do not fit fail and are skipped."""
    from .triton.launch import TileConfig, tiling

    block_h, _ = tiling(heads, 1)
    pipelines = ((2, 0), (3, 0), (1, 1))  # (num_stages, prefetch)
    for bh in sorted({block_h, 32, 64}):
        if bh >= 64:  # 64 x 512 fp32 accumulator: 8 warps (4 spill heavily)
            grid = itertools.product((16, 32), (8,), pipelines)
        else:
            grid = itertools.product((32, 64), (4, 8), pipelines)
        for bn, warps, (stages, prefetch) in grid:
            yield TileConfig(bh, 1, bn, warps, stages, 1, prefetch)


# -- host cost per eager call (`aiter bench host`) and the warmup specialisations (`aiter warmup`) --


def _host_dims(device):
    """(dtype, kv_lora_rank, rope, non-absorbed q/k dim, v dim): production dims in bf16 on a GPU;
    small fp16 ones on the CPU (Triton interpreter)."""
    import torch

    if torch.device(device).type == "cuda":
        return torch.bfloat16, 512, 64, 192, 128
    return torch.float16, 64, 16, 48, 32


def _paged(device, dtype, *, batch, heads, kv_len, q_len, page, lora, rope, kv_dtype=None, seed=0):
    """A paged MLA problem (see :func:`aiter_mla.testing.make_paged_case`); fp8 ``kv_dtype`` is
    quantised with a per-tensor scale: (case, kv_scale or None)."""
    import torch

    from .testing import make_paged_case

    fp8 = kv_dtype is not None and kv_dtype.itemsize == 1
    case = make_paged_case(batch=batch, heads=heads, kv_lens=kv_len, q_lens=q_len, page_size=page,
                           kv_lora_rank=lora, rope=rope, dtype=dtype, kv_dtype=torch.float32 if fp8 else kv_dtype,
                           seed=seed, device=str(device))
    kv_scale = None
    if fp8:
        kv_scale = (case.kv.abs().amax() / 448.0).reshape(1).float()
        case.kv = (case.kv / kv_scale).to(kv_dtype)
    return case, kv_scale


def _decode_case(device, dtype, *, heads=16, batch=2, kv_len=64, q_len=1, page=64, lora=512, rope=64,
                 kv_dtype=None, splits=None, persistent=False, like="decode", name="mla_decode_fwd"):
    import torch

    from .api import get_mla_metadata_info_v1, get_mla_metadata_v1, mla_decode_fwd, mla_prefill_fwd

    case, kv_scale = _paged(device, dtype, batch=batch, heads=heads, kv_len=kv_len, q_len=q_len, page=page, lora=lora,
                            rope=rope, kv_dtype=kv_dtype)
    o = torch.empty(case.q.shape[0], heads, lora, dtype=dtype, device=device)
    args = (case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, q_len)
    scale = (lora + rope) ** -0.5
    if name == "mla_prefill_fwd":
        return HostCase(name, lambda: mla_prefill_fwd(*args, sm_scale=scale), like)
    extra = {}
    if persistent:
        info = get_mla_metadata_info_v1(batch, q_len, heads, dtype, case.kv.dtype, is_sparse=False)
        meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(sh, dtype=dt, device=device) for sh, dt in info]
        get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info,
                            w_ind, r_ind, r_final, r_part, page_size=page, max_seqlen_qo=q_len)
        extra = dict(work_meta_data=meta, work_indptr=w_ind, work_info_set=w_info, reduce_indptr=r_ind,
                     reduce_final_map=r_final, reduce_partial_map=r_part)
    return HostCase(name, lambda: mla_decode_fwd(*args, page_size=page, sm_scale=scale, num_kv_splits=splits,
                                                 kv_scale=kv_scale, **extra), like)


def _reduce_cases(device, dtype, heads=16, lora=512):
    """``get_mla_metadata_v1`` and ``mla_reduce_v1`` on a persistent schedule of 2 sequences."""
    import torch

    from .api import get_mla_metadata_info_v1, get_mla_metadata_v1, mla_reduce_v1

    case, _ = _paged(device, dtype, batch=2, heads=heads, kv_len=[700, 64], q_len=1, page=16, lora=lora, rope=0)
    info = get_mla_metadata_info_v1(2, 1, heads, dtype, dtype, is_sparse=False)
    meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(sh, dtype=dt, device=device) for sh, dt in info]
    meta_args = (case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info, w_ind, r_ind,
                 r_final, r_part)
    get_mla_metadata_v1(*meta_args, page_size=16, max_seqlen_qo=1)
    rows = r_part.numel()
    partial_o = torch.randn(rows, 1, heads, lora, device=device)
    partial_lse = torch.randn(rows, 1, heads, 1, device=device)
    out = torch.empty(2, heads, lora, dtype=dtype, device=device)
    lse = torch.empty(2, heads, device=device)
    return [
        HostCase("get_mla_metadata_v1", lambda: get_mla_metadata_v1(*meta_args, page_size=16, max_seqlen_qo=1)),
        HostCase("mla_reduce_v1", lambda: mla_reduce_v1(partial_o, partial_lse, r_ind, r_final, r_part, 1, 4, out,
                                                        lse)),
    ]


def _prefill_ps_case(device, dtype, heads=16, kv_heads=16, d_qk=192, d_v=128, q_len=16):
    import torch

    from .api import mla_prefill_ps_fwd

    gen = torch.Generator().manual_seed(0)
    tokens = 2 * q_len
    q = torch.randn(tokens, heads, d_qk, generator=gen).to(device, dtype)
    k = torch.randn(tokens, kv_heads, d_qk, generator=gen).to(device, dtype)
    v = torch.randn(tokens, kv_heads, d_v, generator=gen).to(device, dtype)
    indptr = torch.tensor([0, q_len, tokens], dtype=torch.int32, device=device)
    rows = torch.arange(tokens, dtype=torch.int32, device=device)
    out = torch.empty(tokens, heads, d_v, dtype=dtype, device=device)
    return HostCase("mla_prefill_ps_fwd", lambda: mla_prefill_ps_fwd(q, k, v, out, indptr, indptr, rows, None, None,
                                                                     q_len, True, softmax_scale=d_qk ** -0.5),
                    "prefill")


def _sglang_cases(device, dtype, heads=16, lora=512, rope=64, with_rope=True):
    """``decode_attention_fwd_grouped_rope`` (with in-kernel RoPE) and ``decode_attention_fwd``
    (MLA: V a view of K, page size 1, split LSEs in ``attn_logits``' last channel)."""
    import torch

    from .api import decode_attention_fwd, decode_attention_fwd_grouped_rope

    gen = torch.Generator().manual_seed(0)
    batch, kv_len, splits, dim = 2, 64, 4, lora + rope
    tokens = batch * kv_len
    k_buffer = torch.randn(tokens, 1, dim, generator=gen).to(device, dtype)
    v_buffer = k_buffer[..., :lora]
    q = torch.randn(batch, heads, dim, generator=gen).to(device, dtype)
    kv_indptr = torch.tensor([0, kv_len, tokens], dtype=torch.int32, device=device)
    kv_indices = torch.arange(tokens, dtype=torch.int32, device=device)
    o = torch.empty(batch, heads, lora, dtype=dtype, device=device)
    logits = torch.empty(batch, heads, splits, lora + 1, dtype=torch.float32, device=device)
    cos_sin = torch.randn(256, rope, generator=gen).to(device)
    positions = torch.tensor([kv_len - 1, kv_len - 1], device=device)
    k_pe = torch.empty(batch, 1, rope, dtype=dtype, device=device)
    req_to_token = kv_indices.view(batch, kv_len)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    lse = torch.empty(batch, heads, device=device)
    scale = dim ** -0.5
    return [
        HostCase("decode_attention_fwd_grouped_rope", lambda: decode_attention_fwd_grouped_rope(
            q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe if with_rope else None, lora, rope,
            cos_sin if with_rope else None, positions if with_rope else None, logits, splits, scale,
            use_rope=with_rope)),
        HostCase("decode_attention_fwd", lambda: decode_attention_fwd(
            q, k_buffer, v_buffer, o, lse, req_to_token, seq_lens, logits, splits, scale)),
    ]


def _gqa_decode_case(device, dtype, head_dim, heads=32, kv_heads=8, page=16):
    """``decode_attention_fwd`` on a GQA cache of ``head_dim`` (not MLA: V its own buffer)."""
    import torch

    from .api import decode_attention_fwd

    gen = torch.Generator().manual_seed(0)
    batch, kv_len, splits = 2, 64, 4
    tokens = batch * kv_len
    k_buffer = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(device, dtype)
    v_buffer = torch.randn(tokens, kv_heads, head_dim, generator=gen).to(device, dtype)
    q = torch.randn(batch, heads, head_dim, generator=gen).to(device, dtype)
    req_to_token = torch.arange(tokens // page, dtype=torch.int32, device=device).view(batch, -1)
    seq_lens = torch.full((batch,), kv_len, dtype=torch.int32, device=device)
    o = torch.empty(batch, heads, head_dim, dtype=dtype, device=device)
    logits = torch.empty(batch, heads, splits, head_dim + 1, dtype=torch.float32, device=device)
    return HostCase("decode_attention_fwd", lambda: decode_attention_fwd(
        q, k_buffer, v_buffer, o, None, req_to_token, seq_lens, logits, splits, head_dim ** -0.5, page_size=page))


def _cache_cases(device, dtype, lora=512, rope=64, cache_dtype=None):
    """The three cache writes, 2 tokens into a 4 x 16 block cache (fp8 caches with a scale)."""
    import torch

    from .api import concat_and_cache_mla, fused_qk_rope_cat_and_cache_mla, fused_qk_rope_concat_and_cache_mla

    gen = torch.Generator().manual_seed(0)
    cache_dtype = cache_dtype or dtype
    fp8 = cache_dtype.itemsize == 1
    tokens, heads = 2, 16
    kv_c = torch.randn(tokens, lora, generator=gen).to(device, dtype)
    k_pe = torch.randn(tokens, rope, generator=gen).to(device, dtype)
    cache = torch.zeros(4, 16, lora + rope, device=device).to(cache_dtype)
    slots = torch.tensor([3, 17], dtype=torch.int64, device=device)
    scale = torch.ones(1, device=device) if fp8 else None
    q_nope = torch.randn(tokens, heads, lora, generator=gen).to(device, dtype)
    q_pe = torch.randn(tokens, heads, rope, generator=gen).to(device, dtype)
    q_out = torch.empty(tokens, heads, lora + rope, dtype=dtype, device=device)
    positions = torch.tensor([5, 9], dtype=torch.int64, device=device)
    cos = torch.randn(64, rope // 2, generator=gen).to(device, dtype)
    sin = torch.randn(64, rope // 2, generator=gen).to(device, dtype)
    rows = cache.view(-1, 1, lora + rope)
    k_nope3, k_pe3 = kv_c[:, None], k_pe[:, None]
    k_pe_out = torch.empty_like(k_pe3)
    return [
        HostCase("concat_and_cache_mla", lambda: concat_and_cache_mla(kv_c, k_pe, cache, slots,
                                                                      "fp8" if fp8 else "auto", scale)),
        HostCase("fused_qk_rope_concat_and_cache_mla", lambda: fused_qk_rope_concat_and_cache_mla(
            q_nope, q_pe, kv_c, k_pe, cache, q_out, slots, scale, None, positions, cos, sin, True, True)),
        HostCase("fused_qk_rope_cat_and_cache_mla", lambda: fused_qk_rope_cat_and_cache_mla(
            q_nope, q_pe, k_nope3, k_pe3, rows, slots, positions, cos, sin, scale, True, q_out=q_out,
            k_pe_out=k_pe_out)),
    ]


def _block_table_cases(device, dtype, heads=16, lora=512, rope=64, page=16):
    """The block-table forms of :mod:`aiter_mla.triton_api` (decode: automatic splits; prefill:
    ``max_seqlen_q`` given, which keeps the host from reading ``cu_seqlens_q``)."""
    import torch

    from . import triton_api

    cases = []
    for name, q_len, like in (("mla_decode_fwd", 1, "decode"), ("mla_prefill_fwd", 8, "prefill")):
        case, _ = _paged(device, dtype, batch=2, heads=heads, kv_len=64, q_len=q_len, page=page, lora=lora, rope=rope)
        seqused = torch.tensor(case.kv_lens, dtype=torch.int32, device=device)
        tables = case.block_tables
        out = torch.empty(case.q.shape[0], heads, lora, dtype=dtype, device=device)
        fn = getattr(triton_api, name)
        args = (case.q, case.kv, out, case.qo_indptr, seqused, 64, tables, (lora + rope) ** -0.5, lora, rope, True,
                None, None)
        kwargs = {} if q_len == 1 else dict(max_seqlen_q=q_len)
        cases.append(HostCase(f"triton_api.{name}", lambda fn=fn, args=args, kwargs=kwargs: fn(*args, **kwargs), like))
    return cases


def host_cases(device) -> list:
    """One :class:`aiter_core.host.HostCase` per public function of aiter-mla that launches work,
    at a tiny shape (production dims in bf16 on a GPU, small fp16 ones on the CPU), inputs made
    and outputs allocated here (``aiter bench host``)."""
    dtype, lora, rope, d_qk, d_v = _host_dims(device)
    return [
        _decode_case(device, dtype, lora=lora, rope=rope),
        _decode_case(device, dtype, lora=lora, rope=rope, q_len=8, name="mla_prefill_fwd", like="prefill"),
        _prefill_ps_case(device, dtype, d_qk=d_qk, d_v=d_v),
        *_reduce_cases(device, dtype, lora=lora),
        *_sglang_cases(device, dtype, lora=lora, rope=rope),
        *_cache_cases(device, dtype, lora=lora, rope=rope),
        *_block_table_cases(device, dtype, lora=lora, rope=rope),
    ]


def warmup_cases(device) -> list:
    """Calls compiling the kernel specialisations serving hits (``aiter warmup``): MLA's 576/512
    dims in bf16 and fp16 and with an fp8 KV cache, 16 and 128 heads (the memory- and
    compute-bound tiles), one split and split KV with its merge, MTP, page sizes 1 and 64, the
    persistent form, prefill (absorbed and 192/128 non-absorbed), SGLang's decode forms (MLA,
    and GQA head dims 64 and 128), the cache writes; plus every host case."""
    import torch

    gpu = torch.device(device).type == "cuda"
    dtypes = (torch.bfloat16, torch.float16) if gpu else (torch.float16,)
    _, lora, rope, d_qk, d_v = _host_dims(device)
    fp8 = torch.float8_e4m3fn
    cases = list(host_cases(device))
    for dtype in dtypes:
        kv_types = (None, fp8) if gpu else (None,)
        for kv_dtype, heads in itertools.product(kv_types, (16, 128)):
            for page, splits in itertools.product((1, 64), (1, 4)):
                cases.append(_decode_case(device, dtype, heads=heads, batch=4, kv_len=256, page=page, lora=lora,
                                          rope=rope, kv_dtype=kv_dtype, splits=splits))
            cases.append(_decode_case(device, dtype, heads=heads, batch=4, kv_len=256, q_len=2, lora=lora, rope=rope,
                                      kv_dtype=kv_dtype, splits=4))  # MTP
        for heads in (16, 128):
            cases.append(_decode_case(device, dtype, heads=heads, batch=4, kv_len=256, page=64, lora=lora, rope=rope,
                                      persistent=True))
            cases.append(_decode_case(device, dtype, heads=heads, batch=2, kv_len=256, q_len=64, page=64, lora=lora,
                                      rope=rope, name="mla_prefill_fwd", like="prefill"))
        cases.append(_prefill_ps_case(device, dtype, d_qk=d_qk, d_v=d_v, q_len=128))
        cases += _sglang_cases(device, dtype, lora=lora, rope=rope)
        cases += _sglang_cases(device, dtype, lora=lora, rope=rope, with_rope=False)
        cases += [_gqa_decode_case(device, dtype, head_dim) for head_dim in (64, 128)]
        cases += _cache_cases(device, dtype, lora=lora, rope=rope)
        if gpu:
            cases += _cache_cases(device, dtype, lora=lora, rope=rope, cache_dtype=fp8)
        cases += _block_table_cases(device, dtype, lora=lora, rope=rope, page=64)
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if DEVICE == "cuda" and not torch.cuda.is_available():
        from aiter_core.bench import smoke_instead

        from .smoke import run

        return smoke_instead("aiter-mla", run)

    from aiter_core.bench import (
        BenchRun,
        graph_median_ms,
        measure_ceilings,
        median_ms,
        mla_decode_bytes,
        mla_decode_flops,
        progress,
    )

    from .reference import mla_decode_ref
    from .triton import launch

    run = BenchRun.start("mla", argv=None if argv is None else ["python -m aiter_mla.bench", *argv])
    if not args.no_ceilings:
        run.ceilings = measure_ceilings(DEVICE)
    scale = 1.0 / (192 ** 0.5)
    summary = {}
    for shape_name in progress(args.shapes, "mla shapes", quiet=args.quiet):
        shape = SHAPES[shape_name]
        case, kv_scale = _make(shape, args.quick)
        heads, batch, ctx = shape["heads"], len(case.kv_lens), shape["ctx"]
        kv_bytes = 1 if shape["kv"] == "fp8" else 2
        flops = mla_decode_flops(batch, heads, 1, ctx)
        nbytes = mla_decode_bytes(batch, heads, 1, [ctx] * batch, q_bytes=2, kv_bytes=kv_bytes, o_bytes=2)
        ref_o, _ = mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                  case.kv_last_page_lens, kv_lora_rank=LORA, page_size=PAGE, sm_scale=scale,
                                  kv_scale=kv_scale)
        params = dict(shape=shape_name, b=batch, h=heads, ctx=ctx, page=PAGE, kv=shape["kv"])
        for name, (fn, out) in _providers(case, kv_scale, scale, heads, args.providers).items():
            try:
                fn()
                _sync()
                got = out["o"].view(batch, heads, LORA) if isinstance(out, dict) else out
                _refcheck(name, got.reshape(ref_o.shape), ref_o)
                ms = graph_median_ms(fn)
                row = run.add("mla_decode", name, ms, flops=flops, nbytes=nbytes, **params)
                if name == "aiter-triton":
                    summary[shape_name] = row
                    # eager: the Python launch overhead (checks, dispatch, two launches) included
                    run.add("mla_decode-eager", name, median_ms(fn), flops=flops, nbytes=nbytes, **params)
            except Exception as exc:  # a peer that cannot run this case is reported, not fatal
                run.add("mla_decode", name, None, error=f"{type(exc).__name__}: {str(exc)[:120]}", **params)
        if args.sweep:
            o = torch.empty(batch, heads, LORA, dtype=getattr(torch, ACT), device=DEVICE)
            best = None
            for cfg in _sweep_configs(heads):
                for splits in (1, 2, 4, 8):
                    po = torch.empty(batch, heads, splits, LORA, dtype=torch.float32, device=DEVICE)
                    pl = torch.empty(batch, heads, splits, dtype=torch.float32, device=DEVICE)

                    def fn(cfg=cfg, splits=splits, po=po, pl=pl):
                        launch.attention(case.q, case.kv, o, qo_indptr=case.qo_indptr, max_seqlen_q=1, table_mode=0,
                                         page_size=PAGE, d_nope=LORA, sm_scale=scale, causal=True,
                                         kv_indptr=case.kv_indptr, kv_indices=case.kv_indices,
                                         kv_last_page_lens=case.kv_last_page_lens, kv_scale=kv_scale,
                                         num_splits=splits, partial_o=po, partial_lse=pl, config=cfg)
                    label = (f"sweep BH{cfg.BLOCK_H} BN{cfg.BLOCK_N} w{cfg.num_warps} st{cfg.num_stages} "
                             f"pf{cfg.prefetch} S{splits}")
                    try:
                        fn()
                        _sync()
                        _refcheck(label, o, ref_o)
                        ms = graph_median_ms(fn, warmup=5, rep=20)
                    except Exception as exc:
                        print(f"{shape_name} {label}: {type(exc).__name__}: {str(exc)[:100]}", file=sys.stderr)
                        continue
                    if best is None or ms < best[0]:
                        best = (ms, label)
            if best is not None:
                run.add("mla_decode", f"best-{best[1]}", best[0], flops=flops, nbytes=nbytes, **params)
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    targets = {}
    if "mem" in summary and summary["mem"].get("tbps"):
        targets["mem_tbps"] = {"got": summary["mem"]["tbps"], "target": 2.4}
    if "compute" in summary and summary["compute"].get("tflops"):
        targets["compute_tflops"] = {"got": summary["compute"]["tflops"], "target": 350.0}
    if "mem" in summary and "fp8" in summary and summary["mem"].get("ms") and summary["fp8"].get("ms"):
        targets["fp8_speedup_over_bf16"] = {"got": summary["mem"]["ms"] / summary["fp8"]["ms"], "target": 1.5}
    run.metadata["targets"] = targets
    run.print_table()
    for key, value in targets.items():
        verdict = "meets" if value["got"] >= value["target"] else "MISSES"
        print(f"{key}: {value['got']:.3g} ({verdict} the target {value['target']})")
    out = args.out or Path("aiter-mla-bench")
    written = run.write_all(out, args.stem)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
