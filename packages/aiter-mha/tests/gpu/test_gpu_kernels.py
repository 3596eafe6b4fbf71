"""Tier 4 (CUDA only): the Triton kernels in bf16 / fp8 at the production shapes of upstream's
Triton test-suite (spec §9.5), against reference.py.

Run on the H100:   pytest packages/aiter-mha/tests/gpu/test_gpu_kernels.py -q
Quick config sweep / throughput (not a test):
    python packages/aiter-mha/tests/gpu/test_gpu_kernels.py --bench [--sweep]
"""

from __future__ import annotations

import itertools
import math
import os
import sys

import pytest
import torch

if __name__ != "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") == "1" or not torch.cuda.is_available():
        pytest.skip("GPU tier: needs CUDA and no TRITON_INTERPRET", allow_module_level=True)

from pathlib import Path  # noqa: E402

from aiter_mha.reference import (  # noqa: E402
    attention_ref,
    attention_ref_varlen,
    dropout_mask_from_s_dmask,
    gather_paged_kv,
)
from aiter_mha.triton.configs import TileConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # tests/kernel_calls.py
from kernel_calls import run_bwd as flash_bwd  # noqa: E402
from kernel_calls import run_fwd as flash_fwd  # noqa: E402
from kernel_calls import run_paged_fwd  # noqa: E402

DEV = "cuda"
BF16 = torch.bfloat16


def _fa_tol(ref, ref_lowp, mult, floor):
    return max(mult * (ref_lowp.float() - ref.float()).abs().max().item(), floor)


def _check(name, got, ref, ref_lowp, mult, floor):
    assert not torch.isnan(got).any(), f"{name}: NaN"
    tol = _fa_tol(ref, ref_lowp, mult, floor)
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.4g} > tolerance {tol:.4g}"


def _qkv(B, Sq, Sk, Hq, Hk, D, Dv=None, dtype=BF16, seed=0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Sq, Hq, D, device=DEV, generator=g).to(dtype)
    k = torch.randn(B, Sk, Hk, D, device=DEV, generator=g).to(dtype)
    v = torch.randn(B, Sk, Hk, Dv, device=DEV, generator=g).to(dtype)
    return q, k, v


def _run_fwd_bwd(q, k, v, *, causal, dropout_p=0.0, sink=None, window=(-1, -1, 0), fwd_floor=1e-2,
                 bwd_floor=1.5e-2, dsink_floor=5e-2, backward=True, bwd_mult=10):
    scale = q.shape[-1] ** -0.5
    rng = torch.tensor([2024, 0], dtype=torch.int64, device=DEV)
    out = torch.full((*q.shape[:-1], v.shape[-1]), float("nan"), dtype=q.dtype, device=DEV)
    out, lse, s_dmask = flash_fwd(q, k, v, softmax_scale=scale, causal=causal, window=window, sink=sink,
                                  dropout_p=dropout_p, rng_state=rng, return_dropout_mask=dropout_p > 0,
                                  out=out)
    keep = dropout_mask_from_s_dmask(s_dmask) if dropout_p > 0 else None

    def ref(upcast):
        leaves = [t.detach().clone().requires_grad_(backward) for t in (q, k, v)]
        s_leaf = sink.detach().clone().requires_grad_(backward) if sink is not None else None
        o, _, l = attention_ref(*leaves, softmax_scale=scale, causal=causal, window=window, sink=s_leaf,
                                dropout_p=dropout_p, dropout_mask=keep, upcast=upcast, reorder_ops=not upcast)
        return o, l, leaves + [s_leaf]

    o_ref, l_ref, leaves_ref = ref(True)
    o_low, _, leaves_low = ref(False)
    _check("out", out, o_ref, o_low, 2, fwd_floor)
    fin = torch.isfinite(l_ref)
    assert torch.equal(torch.isfinite(lse), fin)
    torch.testing.assert_close(lse[fin], l_ref[fin], atol=2e-2, rtol=1e-3)
    if not backward:
        return
    do = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
    dq, dk, dv, _, dsink, _ = flash_bwd(do, q, k, v, out, lse, softmax_scale=scale, causal=causal, window=window,
                                        sink=sink, dropout_p=dropout_p, rng_state=rng, dq=dq, dk=dk, dv=dv)
    o_ref.backward(do.float())
    o_low.backward(do)
    for name, got, lr, ll in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves_ref, leaves_low):
        _check(name, got, lr.grad, ll.grad, bwd_mult, bwd_floor)
    if sink is not None:
        _check("dsink", dsink, leaves_ref[3].grad, leaves_low[3].grad, bwd_mult, dsink_floor)


# upstream test_mha: B {1,30,50}; (Sq,Sk) {(1,1),(128,128),(32,16),(64,128),(2048,2048)};
# (Hq,Hk) {(1,1),(8,8),(48,8)}; D {64,128}; causal. The 2048 rows use B=1 (reference memory).
MHA_SHAPES = [(B, sq, sk) for B in (1, 30) for sq, sk in ((1, 1), (128, 128), (32, 16), (64, 128))]
MHA_SHAPES += [(1, 2048, 2048)]


@pytest.mark.parametrize("B,Sq,Sk", MHA_SHAPES)
@pytest.mark.parametrize("Hq,Hk", [(1, 1), (8, 8), (48, 8)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_mha_bf16_forward(B, Sq, Sk, Hq, Hk, D, causal):
    q, k, v = _qkv(B, Sq, Sk, Hq, Hk, D)
    scale = D ** -0.5
    out, _, _ = flash_fwd(q, k, v, softmax_scale=scale, causal=causal)
    ref, _, _ = attention_ref(q, k, v, softmax_scale=scale, causal=causal)
    torch.testing.assert_close(out.float(), ref.float(), atol=1e-2, rtol=1e-2)


# upstream fwd+bwd production shapes: B {1,4}; S {512,1024,2048}; Hq {32,64}, Hk 8; D 128;
# causal; dropout {0, 0.2}. Floors fwd 1e-2 / bwd 1.5e-2 (dropout 1e-1 / 2.0).
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("S", [512, 1024, 2048])
@pytest.mark.parametrize("Hq", [32, 64])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_mha_bf16_forward_backward_production(B, S, Hq, dropout_p):
    if B * Hq * S * S > 4 * 32 * 2048 * 2048:
        pytest.skip("reference would need > 40 GB")
    q, k, v = _qkv(B, S, S, Hq, 8, 128, seed=B + S + Hq)
    floors = (1e-1, 2.0) if dropout_p else (1e-2, 1.5e-2)
    _run_fwd_bwd(q, k, v, causal=True, dropout_p=dropout_p, fwd_floor=floors[0], bwd_floor=floors[1])


# upstream test_mha_with_sink: B {1,3}; (Sq,Sk) {(128,64),(32,128),(1024,1024)};
# (Hq,Hk) {(64,8),(8,1)}; D {64,128}; dropout {0,0.2}; causal
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("Sq,Sk", [(128, 64), (32, 128), (1024, 1024)])
@pytest.mark.parametrize("Hq,Hk", [(64, 8), (8, 1)])
@pytest.mark.parametrize("D", [64, 128])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_mha_sink_bf16(B, Sq, Sk, Hq, Hk, D, dropout_p):
    q, k, v = _qkv(B, Sq, Sk, Hq, Hk, D, seed=Sq)
    sink = torch.randn(Hq, device=DEV)
    floors = (1e-1, 2.0, 2.0) if dropout_p else (1e-2, 2.5e-2, 5e-2)
    _run_fwd_bwd(q, k, v, causal=True, sink=sink, dropout_p=dropout_p, fwd_floor=floors[0],
                 bwd_floor=floors[1], dsink_floor=floors[2])


# upstream test_mha_with_pe: (Dqk, Dv) {(128,64),(192,128),(96,64),(32,16)}
@pytest.mark.parametrize("Dqk,Dv", [(128, 64), (192, 128), (96, 64), (32, 16)])
@pytest.mark.parametrize("Hq,Hk", [(1, 1), (64, 8), (8, 1)])
def test_mha_head_dims_qk_ne_v(Dqk, Dv, Hq, Hk):
    q, k, v = _qkv(2, 256, 256, Hq, Hk, Dqk, Dv)
    _run_fwd_bwd(q, k, v, causal=True, fwd_floor=1e-2, bwd_floor=1e-1)


@pytest.mark.parametrize("D", [8, 40, 59, 96, 111, 160, 224, 256])
def test_odd_head_dims(D):
    q, k, v = _qkv(2, 113, 203, 6, 2, D)
    _run_fwd_bwd(q, k, v, causal=True, window=(64, 8, 4), fwd_floor=1e-2, bwd_floor=2e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_mha_varlen_bf16(causal):
    g = torch.Generator().manual_seed(5)
    lens_q = torch.randint(1, 300, (8,), generator=g)
    lens_k = lens_q + torch.randint(0, 200, (8,), generator=g)
    lens_q[3] = 0
    cu_q = torch.zeros(9, dtype=torch.int32)
    cu_q[1:] = lens_q.cumsum(0)
    cu_k = torch.zeros(9, dtype=torch.int32)
    cu_k[1:] = lens_k.cumsum(0)
    cu_q, cu_k = cu_q.to(DEV), cu_k.to(DEV)
    Hq, Hk, D = 16, 4, 128
    q = torch.randn(int(cu_q[-1]), Hq, D, device=DEV, dtype=BF16)
    k = torch.randn(int(cu_k[-1]), Hk, D, device=DEV, dtype=BF16)
    v = torch.randn(int(cu_k[-1]), Hk, D, device=DEV, dtype=BF16)
    kw = dict(softmax_scale=D ** -0.5, causal=causal)
    out, lse, _ = flash_fwd(q, k, v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=int(lens_q.max()),
                            max_seqlen_k=int(lens_k.max()), **kw)
    leaves = [t.clone().float().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref_varlen(*leaves, cu_q, cu_k, **kw)
    torch.testing.assert_close(out.float(), o_ref.float(), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(lse, l_ref, atol=2e-2, rtol=1e-3)
    do = torch.randn_like(out)
    dq, dk, dv, *_ = flash_bwd(do, q, k, v, out, lse, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                               max_seqlen_q=int(lens_q.max()), max_seqlen_k=int(lens_k.max()), **kw)
    o_ref.backward(do.float())
    for name, got, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        torch.testing.assert_close(got.float(), leaf.grad, atol=5e-2, rtol=5e-2, msg=name)


@pytest.mark.parametrize("page_size", [1, 16, 128])
def test_paged_bf16(page_size):
    B, Hq, Hk, D = 4, 16, 2, 128
    seqlens = torch.tensor([1000, 17, 513, 256], dtype=torch.int32, device=DEV)
    pages_per_seq = math.ceil(1000 / page_size)
    num_pages = B * pages_per_seq
    k_cache = torch.randn(num_pages, page_size, Hk, D, device=DEV, dtype=BF16)
    v_cache = torch.randn(num_pages, page_size, Hk, D, device=DEV, dtype=BF16)
    table = torch.randperm(num_pages, device=DEV).reshape(B, pages_per_seq).to(torch.int32)
    q = torch.randn(B, 64, Hq, D, device=DEV, dtype=BF16)
    out, lse = run_paged_fwd(q, k_cache, v_cache, table, softmax_scale=D ** -0.5, causal=True, seqlens_k=seqlens)
    k, v, cu = gather_paged_kv(k_cache, v_cache, table, seqlens)
    for b in range(B):
        s = slice(int(cu[b]), int(cu[b + 1]))
        ref, _, _ = attention_ref(q[b:b + 1], k[None, s], v[None, s], softmax_scale=D ** -0.5, causal=True)
        torch.testing.assert_close(out[b].float(), ref[0].float(), atol=1e-2, rtol=1e-2)


# upstream test_mha_fp8 (Triton): max abs <= 1.0 and cosine >= 0.96 vs the bf16 reference;
# CK test_mha_fp8: inputs in [0, 1), per-tensor quant, max |fp8 - bf16| < 0.055.
@pytest.mark.parametrize("B", [1, 4])
@pytest.mark.parametrize("Sq,Sk", [(1, 1), (64, 128), (2048, 2048)])
@pytest.mark.parametrize("Hq,Hk", [(1, 1), (48, 8)])
@pytest.mark.parametrize("causal", [False, True])
def test_fp8_forward(B, Sq, Sk, Hq, Hk, causal):
    if B * Hq * Sq * Sk > 4 * 48 * 1024 * 1024:
        B = 1
    D = 128
    g = torch.Generator(device=DEV).manual_seed(Sq)
    q, k, v = (torch.rand(B, s, h, D, device=DEV, generator=g).to(BF16)
               for s, h in ((Sq, Hq), (Sk, Hk), (Sk, Hk)))
    fp8 = torch.float8_e4m3fn
    fp8_max = torch.finfo(fp8).max

    def quant(x):
        descale = (x.abs().amax().float().clamp(min=1e-9) / fp8_max).reshape(1)
        return (x.float() / descale).to(fp8), descale

    (q8, qd), (k8, kd), (v8, vd) = quant(q), quant(k), quant(v)
    out, _, _ = flash_fwd(q8, k8, v8, softmax_scale=D ** -0.5, causal=causal, q_descale=qd, k_descale=kd,
                          v_descale=vd)
    assert out.dtype == BF16
    ref, _, _ = attention_ref(q, k, v, softmax_scale=D ** -0.5, causal=causal)
    err = (out.float() - ref.float()).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), ref.float().flatten(), dim=0).item()
    assert err < 0.055 and cos >= 0.96, (err, cos)


def test_deterministic_bitwise_production():
    q, k, v = _qkv(2, 2048, 2048, 16, 4, 128, seed=9)
    out, lse, _ = flash_fwd(q, k, v, softmax_scale=128 ** -0.5, causal=True)
    do = torch.randn_like(out)
    a = flash_bwd(do, q, k, v, out, lse, softmax_scale=128 ** -0.5, causal=True, deterministic=True)
    b = flash_bwd(do, q, k, v, out, lse, softmax_scale=128 ** -0.5, causal=True, deterministic=True)
    for x, y in zip(a[:3], b[:3]):
        assert torch.equal(x, y)


@pytest.mark.parametrize("Hq,Hk", [(16, 16), (32, 8)])
def test_dq_atomic_matches_dq_kernel(Hq, Hk):
    """The opt-in fp32-atomic dQ path (deterministic=False) against the dQ kernel."""
    q, k, v = _qkv(2, 1024, 1024, Hq, Hk, 128, seed=13)
    out, lse, _ = flash_fwd(q, k, v, softmax_scale=128 ** -0.5, causal=True)
    do = torch.randn_like(out)
    kw = dict(softmax_scale=128 ** -0.5, causal=True)
    a = flash_bwd(do, q, k, v, out, lse, dq_atomic=False, **kw)
    b = flash_bwd(do, q, k, v, out, lse, dq_atomic=True, **kw)
    torch.testing.assert_close(b[0].float(), a[0].float(), atol=2e-2, rtol=2e-2)
    for x, y in zip(a[1:3], b[1:3]):  # same dK/dV math, separately compiled
        torch.testing.assert_close(y.float(), x.float(), atol=1e-2, rtol=1e-2)


def test_cuda_graph_capture():
    q, k, v = _qkv(2, 1024, 1024, 16, 16, 128, seed=3)
    rng = torch.tensor([7, 0], dtype=torch.int64, device=DEV)
    kw = dict(softmax_scale=128 ** -0.5, causal=True, dropout_p=0.1, rng_state=rng)
    flash_fwd(q, k, v, **kw)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, _ = flash_fwd(q, k, v, **kw)
    graph.replay()
    torch.cuda.synchronize()
    eager, _, _ = flash_fwd(q, k, v, **kw)
    assert torch.equal(out, eager)


# ------------------------------------------------------------------------------ bench helper

def _bench(argv):
    import triton.testing

    from aiter_mha.triton import configs

    sweep = "--sweep" in argv
    B, H, D = 2, 16, 128
    print(f"device: {torch.cuda.get_device_name()}  triton {__import__('triton').__version__}")
    fwd_cands = [None]
    bwd_cands = [None]
    if sweep:
        fwd_cands += [TileConfig(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s)
                      for bm, bn, w, s in itertools.product((128,), (64, 128), (4, 8), (2, 3, 4))]
        # dK/dV and dQ configs vary independently (a (dK/dV, dQ) pair, None = the default); the same
        # sweep from the shell: AITER_MHA_BWD_DKDV_CONFIG="BLOCK_M=64,num_stages=2" / AITER_MHA_BWD_DQ_CONFIG
        bwd_cands += [(TileConfig(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s), None)
                      for bm, bn, w, s in ((16, 128, 8, 2), (32, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3))]
        bwd_cands += [(None, TileConfig(BLOCK_M=bm, BLOCK_N=bn, num_warps=w, num_stages=s))
                      for bm, bn, w, s in ((64, 64, 4, 3), (128, 32, 8, 2), (128, 64, 8, 3), (64, 32, 4, 3))]
    for S in (4096, 8192, 16384):
        q, k, v = _qkv(B, S, S, H, H, D)
        for causal in (False, True):
            flops = 4 * B * H * S * S * D / (2 if causal else 1)
            for cfg in fwd_cands:
                try:
                    ms = triton.testing.do_bench(lambda: flash_fwd(q, k, v, softmax_scale=D ** -0.5,
                                                                   causal=causal, config=cfg))
                except Exception as exc:  # a config that does not fit: report and go on
                    print(f"fwd S={S} causal={causal} cfg={cfg}: failed ({type(exc).__name__})")
                    continue
                print(f"fwd S={S} causal={int(causal)} {flops / ms / 1e9:7.1f} TFLOP/s  cfg={cfg or 'default'}")
            out, lse, _ = flash_fwd(q, k, v, softmax_scale=D ** -0.5, causal=causal)
            do = torch.randn_like(out)
            ms = triton.testing.do_bench(lambda: flash_bwd(do, q, k, v, out, lse, softmax_scale=D ** -0.5,
                                                           causal=causal, dq_atomic=True))
            print(f"bwd S={S} causal={int(causal)} {2.5 * flops / ms / 1e9:7.1f} TFLOP/s  dq_atomic (default cfg)")
            for cfg in bwd_cands:
                try:
                    ms = triton.testing.do_bench(lambda: flash_bwd(do, q, k, v, out, lse, softmax_scale=D ** -0.5,
                                                                   causal=causal, config=cfg))
                except Exception as exc:
                    print(f"bwd S={S} causal={causal} cfg={cfg}: failed ({type(exc).__name__})")
                    continue
                print(f"bwd S={S} causal={int(causal)} {2.5 * flops / ms / 1e9:7.1f} TFLOP/s  cfg={cfg or 'default'}")
    print("defaults:", configs.FWD_CONFIGS, configs.BWD_CONFIGS, configs.BWD_DQ_CONFIGS)


if __name__ == "__main__":
    if "--bench" in sys.argv:
        _bench(sys.argv)
