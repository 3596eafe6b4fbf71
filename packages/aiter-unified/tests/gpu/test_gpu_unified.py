"""GPU tier: spec 9.5's unified rows (``test_triton_unified_attn`` and the 3D decode sweep) through
the public API and the forced kernels against the PyTorch paged reference, in bf16, fp16, fp8 KV and
fp8 q+KV, plus non-power-of-two GQA, random prefill/decode mixes, fp8 output and CUDA-graph replay.

Tolerances as upstream: bf16 atol 1.5e-2 / rtol 1e-2, everything else 1.5e-1 (and for the 3D
sweep at most 1% of elements outside it)."""

from __future__ import annotations

import pytest
import torch

import aiter_unified
from aiter_unified.reference import unified_attention_ref
from aiter_unified.testing import make_batch, random_seqs, run_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
DEV = "cuda"
BF16, F16, FP8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn

# Upstream's 10-sequence mix lists (query_len, kv_len) pairs; a pair with kv_len < query_len is
# read as (query_len, context) here, since seqused_k counts the new tokens.
MIX = [(1, 1328), (5, 18), (129, 463), (1, 15), (567, 275), (777, 777), (1, 2011), (37, 523), (1, 37), (16, 1024)]
SEQ_SETS = {"single512": [(512, 512)], "mix10": [(q, kv if kv >= q else q + kv) for q, kv in MIX]}
DTYPES = {  # name: (q dtype, kv dtype, q descale, kv descales)
    "bf16": (BF16, BF16, False, False),
    "bf16-fp8kv": (BF16, FP8, False, True),
    "fp8": (FP8, FP8, True, True),
    "fp16": (F16, F16, False, False),
}


def _tol(name):
    return (1.5e-2, 1e-2) if name == "bf16" else (1.5e-1, 1.5e-1)


def _descale(on, value):
    return torch.tensor([value], device=DEV) if on else None


def _call(b, out, *, window=(-1, -1), softcap=0.0, descales=(None, None, None), **kw):
    return aiter_unified.unified_attention(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k,
                                           b.max_seqlen_k, b.q.shape[-1] ** -0.5, True, window, b.block_table,
                                           softcap, *descales, **kw)


def _ref(b, *, window=(-1, -1), softcap=0.0, descales=(None, None, None), out_dtype=None, **kw):
    qd, kd, vd = descales
    return unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, b.q.shape[-1] ** -0.5,
                                 window_size=window, softcap=softcap, q_descale=qd, k_descale=kd, v_descale=vd,
                                 out_dtype=out_dtype, **kw)


CASES = []
for dname in DTYPES:
    for d in (64, 128, 256, 512):
        for heads in ((8, 8), (8, 1), (12, 4)):
            i = len(CASES)
            CASES.append((dname, d, heads, (16, 64)[i % 2], (None, 256)[(i // 2) % 2], (None, 50.0)[(i // 4) % 2],
                          ("mix10", "single512")[(i // 3) % 2]))


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)) for c in CASES])
def test_triton_unified_attn(case):
    dname, d, (hq, hk), bs, sw, softcap, seqset = case
    qdt, kvdt, qdesc, kvdesc = DTYPES[dname]
    b = make_batch(SEQ_SETS[seqset], heads_q=hq, heads_kv=hk, head_dim=d, block_size=bs, dtype=BF16 if qdt == FP8
                   else qdt, kv_dtype=kvdt, device=DEV, seed=d + hq, extra_blocks=1024)
    b.q = b.q.to(qdt)
    descales = (_descale(qdesc, 0.8), _descale(kvdesc, 0.6), _descale(kvdesc, 1.3))
    sinks = torch.randn(hq, device=DEV)  # always on, as upstream
    window = (sw - 1, 0) if sw else (-1, -1)
    out_dtype = BF16 if qdt == FP8 else qdt
    out = torch.full(b.q.shape, float("nan"), dtype=out_dtype, device=DEV)
    _call(b, out, window=window, softcap=softcap or 0.0, descales=descales, sinks=sinks)
    ref = _ref(b, window=window, softcap=softcap or 0.0, descales=descales, sinks=sinks, out_dtype=out_dtype)
    atol, rtol = _tol(dname)
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=rtol)


DECODE_SETS = {"1328": [(1, 1328)], "8192x32": [(1, 8192)] * 32, "three": [(1, 523), (1, 37), (1, 2011)],
               "mix": [(1, 1328), (1, 18), (1, 463), (1, 4096), (1, 1)]}


@pytest.mark.parametrize("dname", ["bf16", "bf16-fp8kv", "fp8", "fp8-out"])
@pytest.mark.parametrize("heads", [(64, 8), (8, 1), (40, 8)])
@pytest.mark.parametrize("seqset", list(DECODE_SETS))
@pytest.mark.parametrize("force", ["heuristic", "3d"])
def test_triton_unified_attn_3d_decode(seqset, heads, dname, force):
    hq, hk = heads
    qdt, kvdt, qdesc, kvdesc = DTYPES["fp8" if dname == "fp8-out" else dname]
    b = make_batch(DECODE_SETS[seqset], heads_q=hq, heads_kv=hk, head_dim=64, block_size=16,
                   dtype=BF16 if qdt == FP8 else qdt, kv_dtype=kvdt, device=DEV, seed=hq)
    b.q = b.q.to(qdt)
    descales = (_descale(qdesc, 0.8), _descale(kvdesc, 0.6), _descale(kvdesc, 1.3))
    out_dtype = FP8 if dname == "fp8-out" else BF16
    output_scale = torch.tensor([0.05], device=DEV) if dname == "fp8-out" else None
    sinks = torch.randn(hq, device=DEV)
    out = torch.full(b.q.shape, float("nan"), dtype=BF16, device=DEV).to(out_dtype)
    run_triton(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.125, (-1, -1),
               b.block_table, 0.0, *descales, sinks=sinks, output_scale=output_scale,
               force=None if force == "heuristic" else force)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.125,
                                q_descale=descales[0], k_descale=descales[1], v_descale=descales[2], sinks=sinks,
                                output_scale=output_scale, out_dtype=torch.float32)
    got = out.float()
    atol, rtol = _tol(dname)
    if dname == "fp8-out":  # values are ~20x larger after / 0.05: compare relative to the fp8 grid
        atol = atol / 0.05
    assert torch.isfinite(got).all()
    bad = ((got - ref).abs() > atol + rtol * ref.abs()).float().mean().item()
    assert bad <= 0.01, f"{bad:.2%} of elements outside tolerance (max err {(got - ref).abs().max().item():.3g})"


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("force", [None, "2d", "3d"])
def test_random_prefill_decode_mix_nonpow2_gqa(seed, force):
    gen = torch.Generator().manual_seed(seed)
    seqs = random_seqs(24, max_q=300, max_ctx=3000, gen=gen)
    hq, hk = ((20, 4), (24, 8), (28, 4), (64, 8))[seed]  # GQA 5, 3, 7, 8
    b = make_batch(seqs, heads_q=hq, heads_kv=hk, head_dim=128, block_size=(16, 32, 64, 128)[seed], dtype=BF16,
                   device=DEV, seed=seed)
    alibi = torch.rand(hq, device=DEV) * 0.01
    qq = torch.randn(b.max_seqlen_q, b.max_seqlen_q, device=DEV)
    out = torch.full_like(b.q, float("nan"))
    run_triton(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.088, (-1, -1),
               b.block_table, 30.0, None, None, None, alibi_slopes=alibi, qq_bias=qq, force=force)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.088, softcap=30.0,
                                alibi_slopes=alibi, qq_bias=qq)
    torch.testing.assert_close(out.float(), ref.float(), atol=1.5e-2, rtol=1e-2)


@pytest.mark.parametrize("decode_only", [True, False])
def test_cuda_graph_replay(decode_only):
    """Capture once, then change lengths, block tables and data in place and replay."""
    seqs_a = [(1, 900), (1, 3000), (1, 17)] if decode_only else [(1, 900), (40, 3000), (7, 17)]
    seqs_b = [(1, 2000), (1, 33), (1, 1200)] if decode_only else [(1, 2000), (40, 1000), (7, 1200)]
    a = make_batch(seqs_a, heads_q=32, heads_kv=8, head_dim=128, block_size=16, dtype=BF16, device=DEV, seed=1,
                   extra_blocks=400)
    b = make_batch(seqs_b, heads_q=32, heads_kv=8, head_dim=128, block_size=16, dtype=BF16, device=DEV, seed=2,
                   extra_blocks=400)
    width = max(a.block_table.shape[1], b.block_table.shape[1])
    pool = max(a.k.shape[0], b.k.shape[0])

    def grow(batch):
        table = torch.full((3, width), -1, dtype=torch.int32, device=DEV)
        table[:, :batch.block_table.shape[1]] = batch.block_table
        k = torch.zeros(pool, *batch.k.shape[1:], dtype=BF16, device=DEV)
        v = torch.zeros_like(k)
        k[:batch.k.shape[0]] = batch.k
        v[:batch.v.shape[0]] = batch.v
        return table, k, v

    table_a, k_a, v_a = grow(a)
    table_b, k_b, v_b = grow(b)
    max_k = 3000
    q, k, v, table = a.q.clone(), k_a.clone(), v_a.clone(), table_a.clone()
    cu, used = a.cu_seqlens_q.clone(), a.seqused_k.clone()
    out = torch.full_like(q, float("nan"))
    sinks = torch.randn(32, device=DEV)

    def step():
        aiter_unified.unified_attention(q, k, v, out, cu, a.max_seqlen_q, used, max_k, 0.088, True, (-1, -1), table,
                                        0.0, None, None, None, sinks=sinks, backend="triton")

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # compile outside the capture
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for src, tbl, kk, vv in ((a, table_a, k_a, v_a), (b, table_b, k_b, v_b)):
        q.copy_(src.q)
        k.copy_(kk)
        v.copy_(vv)
        table.copy_(tbl)
        cu.copy_(src.cu_seqlens_q)
        used.copy_(src.seqused_k)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        ref = unified_attention_ref(src.q, kk, vv, src.cu_seqlens_q, src.seqused_k, tbl, 0.088, sinks=sinks)
        torch.testing.assert_close(out.float(), ref.float(), atol=1.5e-2, rtol=1e-2)


def test_skip_reduce_on_gpu_and_torch_op():
    from aiter_core.triton_attn import splitk_merge_reference

    b = make_batch([(1, 4000), (1, 700)], heads_q=16, heads_kv=2, head_dim=128, block_size=16, dtype=BF16,
                   device=DEV, seed=5)
    out = torch.full_like(b.q, float("nan"))
    so, sm, ss = _call(b, out, skip_reduce=True)
    merged, _ = splitk_merge_reference(so[..., :128], sm, ss)
    ref = _ref(b)
    torch.testing.assert_close(merged.to(BF16).float(), ref.float(), atol=1.5e-2, rtol=1e-2)
    assert torch.isnan(out).all()


@pytest.mark.parametrize("force", ["2d", "3d"])
def test_pool_past_2_31_elements(force):
    """A KV pool of more than 2**31 elements (4.3 GB per fp16 cache) gets int64 address arithmetic;
    the sequences' blocks sit at its far end, where int32 offsets would wrap."""
    from aiter_core.triton_attn import max_element_offset

    b = make_batch([(1, 900), (37, 300), (5, 5)], heads_q=32, heads_kv=8, head_dim=128, block_size=16, dtype=F16,
                   device=DEV, seed=5)
    ref = _ref(b)
    per_block = b.k[0].numel()
    shift = (2**31 + per_block - 1) // per_block
    pools = []
    for cache in (b.k, b.v):
        pool = torch.empty((shift + cache.shape[0],) + tuple(cache.shape[1:]), dtype=cache.dtype, device=DEV)
        pool[shift:] = cache
        pools.append(pool)
    table = torch.where(b.block_table >= 0, b.block_table + shift, b.block_table)
    assert max_element_offset(pools[0]) >= 2**31
    out = torch.full(b.q.shape, float("nan"), dtype=F16, device=DEV)
    run_triton(b.q, pools[0], pools[1], out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k,
               128 ** -0.5, (-1, -1), table, 0.0, None, None, None, force=force)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=1e-2)
    del pools
    torch.cuda.empty_cache()
