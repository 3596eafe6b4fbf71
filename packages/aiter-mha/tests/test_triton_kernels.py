"""Triton forward/backward kernels against reference.py (tier 2: interpreter on the CPU, or CUDA).

Under TRITON_INTERPRET=1 everything runs in fp32 (plus one fp16 case) on tiny shapes with small
blocks (so masked/unmasked loop segments, sink segments and partial blocks are all exercised);
on CUDA the same cases run in fp16. Tolerances follow FlashAttention's tests: a multiple of
the error the reference itself makes in the low precision, with a floor. Outputs are poisoned
with NaN before each call so unwritten elements fail.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
pytestmark = [
    pytest.mark.interpreter,
    pytest.mark.skipif(not (INTERPRET or CUDA),
                       reason="Triton kernels need TRITON_INTERPRET=1 (CPU interpreter) or a CUDA device"),
]

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

from aiter_mha.reference import (  # noqa: E402
    attention_ref,
    attention_ref_varlen,
    dropout_mask_from_s_dmask,
    gather_paged_kv,
)
from aiter_mha.triton.configs import TileConfig  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kernel_calls import run_bwd as flash_bwd  # noqa: E402
from kernel_calls import run_fwd as flash_fwd  # noqa: E402
from kernel_calls import run_paged_fwd  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
# small tiles under the interpreter: several blocks per sequence even at S < 70
FWD_CFG = None if CUDA else TileConfig(BLOCK_M=32, BLOCK_N=16, num_warps=4, num_stages=1)
BWD_CFG = None if CUDA else TileConfig(BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1)
FLOOR = {torch.float32: (2e-5, 1e-4), torch.float16: (2e-3, 1e-2)}  # (forward, gradients)


def _rand(*shape, dtype=DTYPE, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE, dtype)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


def _assert_fa_close(name, got, ref, ref_lowp, mult, floor, rows=None):
    if rows is not None:
        got, ref, ref_lowp = got[rows], ref[rows], ref_lowp[rows]
    got, ref, ref_lowp = got.float(), ref.float(), ref_lowp.float()
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten or invalid) elements"
    tol = max(mult * (ref_lowp - ref).abs().max().item(), floor)
    err = (got - ref).abs().max().item()
    assert err <= tol, f"{name}: max error {err:.3e} > tolerance {tol:.3e}"


def _dense_case(*, B=2, Sq=37, Sk=45, Hq=4, Hk=2, D=40, Dv=None, causal=False, window=(-1, -1, 0),
                alibi=None, bias=False, sink=False, softcap=0.0, dropout_p=0.0, dbias=False,
                dtype=DTYPE, deterministic=False, seed=0, split_group=None, dq_atomic=False):
    """Forward + backward on dense bshd inputs; returns kernel outputs for extra checks."""
    gen = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q, k, v = _rand(B, Sq, Hq, D, dtype=dtype, gen=gen), _rand(B, Sk, Hk, D, dtype=dtype, gen=gen), \
        _rand(B, Sk, Hk, Dv, dtype=dtype, gen=gen)
    scale = D ** -0.5
    extra = {}
    if alibi == "h":
        extra["alibi_slopes"] = torch.rand(Hq, generator=gen).to(DEVICE)
    elif alibi == "bh":
        extra["alibi_slopes"] = torch.rand(B, Hq, generator=gen).to(DEVICE)
    bias_t = torch.randn(Sq, Sk, generator=gen).to(DEVICE) if bias else None
    sink_t = torch.randn(Hq, generator=gen).to(DEVICE) if sink else None
    rng = torch.tensor([1234 + seed, 99], dtype=torch.int64, device=DEVICE)

    out = _nan_like(torch.empty(B, Sq, Hq, Dv, dtype=dtype, device=DEVICE))
    out, lse, s_dmask = flash_fwd(
        q, k, v, softmax_scale=scale, causal=causal, window=window, bias=bias_t, sink=sink_t,
        softcap=softcap, dropout_p=dropout_p, rng_state=rng, return_dropout_mask=dropout_p > 0,
        out=out, config=FWD_CFG, **extra)
    keep = dropout_mask_from_s_dmask(s_dmask) if dropout_p > 0 else None

    def ref(upcast):
        qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        br = bias_t.clone().requires_grad_(True) if bias_t is not None else None
        sr = sink_t.clone().requires_grad_(True) if sink_t is not None else None
        o, probs, l = attention_ref(qr, kr, vr, softmax_scale=scale, causal=causal, window=window,
                                    bias=br, sink=sr, softcap=softcap, dropout_p=dropout_p,
                                    dropout_mask=keep, upcast=upcast, reorder_ops=not upcast, **extra)
        return o, probs, l, (qr, kr, vr, br, sr)

    o_ref, probs_ref, lse_ref, leaves_ref = ref(True)
    o_low, _, _, leaves_low = ref(False)
    fwd_floor, bwd_floor = FLOOR[dtype]
    _assert_fa_close("out", out, o_ref, o_low, 2, fwd_floor)
    finite = torch.isfinite(lse_ref)
    assert torch.equal(torch.isfinite(lse), finite), "lse: -inf pattern differs"
    torch.testing.assert_close(lse[finite], lse_ref[finite], atol=fwd_floor * 10, rtol=1e-4)
    if dropout_p > 0:
        # |S_dmask| is the softmax probability, the sign marks dropped elements
        torch.testing.assert_close(s_dmask.abs(), probs_ref.detach().float(), atol=fwd_floor * 10, rtol=1e-3)

    do = _rand(*out.shape, dtype=dtype, gen=gen)
    dq, dk, dv = _nan_like(q), _nan_like(k), _nan_like(v)
    dq, dk, dv, delta, dsink, dbias_k = flash_bwd(
        do, q, k, v, out, lse, softmax_scale=scale, causal=causal, window=window, bias=bias_t,
        sink=sink_t, softcap=softcap, dropout_p=dropout_p, rng_state=rng, dq=dq, dk=dk, dv=dv,
        compute_dbias=dbias, deterministic=deterministic, config=BWD_CFG, split_group=split_group,
        dq_atomic=dq_atomic, **extra)
    torch.testing.assert_close(delta, (do.float() * out.float()).sum(-1).transpose(1, 2),
                               atol=fwd_floor * 10, rtol=1e-3)
    o_ref.backward(do.float())
    o_low.backward(do)
    names = ["dq", "dk", "dv", "dbias", "dsink"]
    got = [dq, dk, dv, dbias_k, dsink]
    for name, g, lr, ll in zip(names, got, leaves_ref, leaves_low):
        if lr is None or (name == "dbias" and not dbias):
            continue
        _assert_fa_close(name, g, lr.grad, ll.grad, 10, bwd_floor)
    return dict(out=out, lse=lse, s_dmask=s_dmask, dq=dq, dk=dk, dv=dv, dbias=dbias_k, q=q, k=k,
                v=v, do=do, bias=bias_t, rng=rng, scale=scale, keep=keep)


# one case per feature; ids say what is covered
CASES = {
    "gqa_padded_headdim": dict(D=40),
    # Sq a multiple of the backward's BLOCK_M and no left bound: the dK/dV kernel drops its tail loop
    "gqa_one_program_per_kv_head": dict(D=16, Sq=32, Sk=45, causal=True, split_group=False),
    "gqa_one_program_per_q_head": dict(D=16, Sq=48, Sk=40, causal=True, split_group=True),
    "causal_sq_lt_sk": dict(Sq=23, Sk=61, D=16, causal=True),
    "causal_sq_gt_sk_empty_rows": dict(Sq=61, Sk=23, D=16, causal=True),
    "window_sink_tokens": dict(Sq=50, Sk=66, D=16, window=(9, 4, 5)),
    "left_window_causal_sink_tokens": dict(Sq=66, Sk=50, D=16, causal=True, window=(7, -1, 3)),
    "alibi_h_bias_dbias": dict(D=16, alibi="h", bias=True, dbias=True),
    "alibi_bh_softcap_sink": dict(D=16, alibi="bh", softcap=2.0, sink=True, causal=True),
    "dqk_ne_dv": dict(D=64, Dv=32, Hq=2, Hk=2, causal=True),
    "mqa": dict(Hq=4, Hk=1, D=16, Sq=33, Sk=33),
    # dQ by fp32 atomics from the dK/dV kernel (deterministic=False only)
    "dq_atomic_window_sink_alibi_dropout": dict(D=16, Sq=41, Sk=50, window=(9, 2, 3), alibi="h", sink=True,
                                                dropout_p=0.2, dq_atomic=True, split_group=False),
    "dq_atomic_gqa_split_bias": dict(D=40, causal=True, bias=True, dq_atomic=True, split_group=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_dense_forward_backward(name):
    _dense_case(**CASES[name])


def test_fully_masked_rows_zero_out_and_neg_inf_lse():
    r = _dense_case(Sq=61, Sk=23, D=16, causal=True, seed=3)
    # bottom-right alignment: rows i < Sq - Sk see no key
    assert torch.all(r["out"][:, :38] == 0)
    assert torch.all(torch.isneginf(r["lse"][:, :, :38]))
    assert torch.all(r["dq"][:, :38] == 0)


def test_dropout_mask_and_gradients():
    p = 0.3
    r = _dense_case(Sq=48, Sk=56, D=16, causal=True, dropout_p=p, seed=5)
    keep = r["keep"]
    visible = r["s_dmask"] != 0
    kept_fraction = (keep & visible).sum().item() / visible.sum().item()
    assert abs(kept_fraction - (1 - p)) < 0.05, kept_fraction
    # same rng_state without returning the mask gives the same output (same Philox stream)
    again, _, none = flash_fwd(r["q"], r["k"], r["v"], softmax_scale=r["scale"], causal=True,
                               dropout_p=p, rng_state=r["rng"], config=FWD_CFG)
    assert none is None and torch.equal(again, r["out"])


def test_deterministic_backward_is_bitwise_reproducible():
    r = _dense_case(D=16, causal=True, bias=True, dbias=True, deterministic=True, seed=7)
    kw = dict(softmax_scale=r["scale"], causal=True, bias=r["bias"], compute_dbias=True,
              deterministic=True, config=BWD_CFG)
    again = flash_bwd(r["do"], r["q"], r["k"], r["v"], r["out"], r["lse"], **kw)
    for a, b in zip((r["dq"], r["dk"], r["dv"], r["dbias"]), (again[0], again[1], again[2], again[5])):
        assert torch.equal(a, b)


@pytest.mark.skipif(CUDA, reason="fp16 variant of the interpreter run; the CUDA run is all fp16")
def test_fp16_under_interpreter():
    _dense_case(D=32, causal=True, dtype=torch.float16, Sq=33, Sk=40)


def test_production_configs_small():
    """The per-head-dim launch configs (BLOCK_M 128) on a shape smaller than one tile."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (_rand(1, 20, 2, 64, gen=gen) for _ in range(3))
    out, lse, _ = flash_fwd(q, k, v, softmax_scale=0.125, causal=True)
    o_ref, _, l_ref = attention_ref(q, k, v, softmax_scale=0.125, causal=True)
    _assert_fa_close("out", out, o_ref, o_ref, 2, FLOOR[DTYPE][0])
    do = _rand(*out.shape, gen=gen)
    dq, dk, dv, *_ = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.125, causal=True)
    qr, kr, vr = (t.clone().requires_grad_(True) for t in (q, k, v))
    attention_ref(qr, kr, vr, softmax_scale=0.125, causal=True)[0].backward(do)
    for name, g, leaf in (("dq", dq, qr), ("dk", dk, kr), ("dv", dv, vr)):
        _assert_fa_close(name, g, leaf.grad, leaf.grad, 10, FLOOR[DTYPE][1])


def _varlen_case(padded: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    Hq, Hk, D = 4, 2, 16
    lens_q = [5, 0, 37]  # keys: 20, 9, 40
    cu_q = torch.tensor([0, 5, 5, 42], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 20, 29, 69], dtype=torch.int32, device=DEVICE)
    if padded:
        start_q = torch.tensor([0, 7, 9, 50], dtype=torch.int32, device=DEVICE)
        start_k = torch.tensor([2, 25, 40, 80], dtype=torch.int32, device=DEVICE)
        tq, tk = 50, 80
    else:
        start_q = start_k = None
        tq, tk = 42, 69
    q, k, v = _rand(tq, Hq, D, gen=gen), _rand(tk, Hk, D, gen=gen), _rand(tk, Hk, D, gen=gen)
    rows_q = torch.cat([torch.arange(int((start_q if padded else cu_q)[b]),
                                     int((start_q if padded else cu_q)[b]) + lens_q[b]) for b in range(3)])
    kw = dict(softmax_scale=0.25, causal=True, window=(11, -1, 2), cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
              max_seqlen_q=37, max_seqlen_k=40, seqstart_q=start_q, seqstart_k=start_k,
              sink=torch.randn(Hq, generator=gen).to(DEVICE),
              alibi_slopes=torch.rand(3, Hq, generator=gen).to(DEVICE))
    out = _nan_like(torch.empty(tq, Hq, D, dtype=DTYPE, device=DEVICE))
    out, lse, _ = flash_fwd(q, k, v, out=out, config=FWD_CFG, **kw)
    ref_kw = {n: kw[n] for n in ("softmax_scale", "causal", "window", "seqstart_q", "seqstart_k",
                                 "alibi_slopes")}
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v, kw["sink"])]
    o_ref, lse_ref = attention_ref_varlen(*leaves[:3], cu_q, cu_k, sink=leaves[3], **ref_kw)
    fwd_floor, bwd_floor = FLOOR[DTYPE]
    _assert_fa_close("out", out, o_ref, o_ref, 2, fwd_floor, rows=rows_q)
    torch.testing.assert_close(lse[:, rows_q], lse_ref[:, rows_q], atol=fwd_floor * 10, rtol=1e-4)

    do = _rand(tq, Hq, D, gen=gen)
    row_mask = torch.zeros(tq, 1, 1, device=DEVICE)
    row_mask[rows_q] = 1
    do = (do * row_mask).to(DTYPE)
    dq, dk, dv = _nan_like(q), _nan_like(k), _nan_like(v)
    # both GQA launch shapes: per-query-head programs (unpadded) and per-kv-head loops (padded)
    dq, dk, dv, _, dsink, _ = flash_bwd(do, q, k, v, out, lse, dq=dq, dk=dk, dv=dv, config=BWD_CFG,
                                        split_group=not padded, **kw)
    (o_ref.float() * row_mask).backward(do.float())
    for name, g, leaf in zip(("dq", "dk", "dv", "dsink"), (dq, dk, dv, dsink), leaves):
        _assert_fa_close(name, g, leaf.grad, leaf.grad, 10, bwd_floor)


def test_varlen_gqa_window_sink_alibi():
    _varlen_case(padded=False, seed=21)


def test_padded_varlen():
    _varlen_case(padded=True, seed=22)


@pytest.mark.parametrize("query_layout", ["dense", "varlen"])
def test_paged_kv_forward(query_layout):
    gen = torch.Generator().manual_seed(31)
    Hq, Hk, D, page = 4, 2, 16, 8
    cache_k, cache_v = _rand(12, page, Hk, D, gen=gen), _rand(12, page, Hk, D, gen=gen)
    table = torch.randperm(12, generator=gen).reshape(2, 6).to(torch.int32).to(DEVICE)
    seqlens_k = torch.tensor([33, 17], dtype=torch.int32, device=DEVICE)
    k, v, cu_k = gather_paged_kv(cache_k, cache_v, table, seqlens_k)
    if query_layout == "dense":
        q = _rand(2, 9, Hq, D, gen=gen)
        out, lse = run_paged_fwd(q, cache_k, cache_v, table, softmax_scale=0.25, causal=True, seqlens_k=seqlens_k,
                                 config=FWD_CFG)
        for b in range(2):
            s = slice(int(cu_k[b]), int(cu_k[b + 1]))
            o_ref, _, l_ref = attention_ref(q[b:b + 1], k[None, s], v[None, s], softmax_scale=0.25, causal=True)
            _assert_fa_close("out", out[b], o_ref[0], o_ref[0], 2, FLOOR[DTYPE][0])
            torch.testing.assert_close(lse[b], l_ref[0], atol=1e-4, rtol=1e-4)
    else:
        cu_q = torch.tensor([0, 6, 9], dtype=torch.int32, device=DEVICE)
        q = _rand(9, Hq, D, gen=gen)
        out, lse = run_paged_fwd(q, cache_k, cache_v, table, softmax_scale=0.25, causal=True, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=33, config=FWD_CFG)
        o_ref, l_ref = attention_ref_varlen(q, k, v, cu_q, cu_k, softmax_scale=0.25, causal=True)
        _assert_fa_close("out", out, o_ref, o_ref, 2, FLOOR[DTYPE][0])
        torch.testing.assert_close(lse, l_ref, atol=1e-4, rtol=1e-4)


def test_no_keys_and_no_queries():
    gen = torch.Generator().manual_seed(41)
    q, k, v = _rand(1, 5, 2, 16, gen=gen), _rand(1, 0, 2, 16, gen=gen), _rand(1, 0, 2, 16, gen=gen)
    out = _nan_like(torch.empty(1, 5, 2, 16, dtype=DTYPE, device=DEVICE))
    out, lse, _ = flash_fwd(q, k, v, softmax_scale=0.25, causal=False, out=out, config=FWD_CFG)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))
    dq, dk, dv, delta, _, _ = flash_bwd(_rand(1, 5, 2, 16, gen=gen), q, k, v, out, lse, softmax_scale=0.25,
                                        causal=False, dq=_nan_like(q), config=BWD_CFG)
    assert torch.all(dq == 0) and dk.numel() == 0 and torch.all(delta == 0)
    q0 = _rand(1, 0, 2, 16, gen=gen)
    out0, lse0, _ = flash_fwd(q0, q, q, softmax_scale=0.25, causal=True, config=FWD_CFG)
    assert out0.shape == (1, 0, 2, 16) and lse0.shape == (1, 2, 0)


def test_strided_layouts_bhsd_and_sbhd_views():
    """q/k/v as views of BHSD / SBHD storage (only the head dim is contiguous), out/dq into views."""
    gen = torch.Generator().manual_seed(51)
    B, S, Hq, Hk, D = 2, 24, 4, 2, 16
    q = _rand(B, Hq, S, D, gen=gen).transpose(1, 2)  # BHSD storage
    k = _rand(S, B, Hk, D, gen=gen).transpose(0, 1)  # SBHD storage
    v = _rand(B, Hk, S, D, gen=gen).transpose(1, 2)
    out_store = _nan_like(torch.empty(B, Hq, S, D, dtype=DTYPE, device=DEVICE))
    out, lse, _ = flash_fwd(q, k, v, softmax_scale=0.25, causal=True, out=out_store.transpose(1, 2),
                            config=FWD_CFG)
    o_ref, _, l_ref = attention_ref(q, k, v, softmax_scale=0.25, causal=True)
    _assert_fa_close("out", out_store.transpose(1, 2), o_ref, o_ref, 2, FLOOR[DTYPE][0])
    torch.testing.assert_close(lse, l_ref, atol=1e-4, rtol=1e-4)
    do = _rand(S, B, Hq, D, gen=gen).transpose(0, 1)
    dq_store = _nan_like(torch.empty(B, Hq, S, D, dtype=DTYPE, device=DEVICE))
    dq, dk, dv, *_ = flash_bwd(do, q, k, v, out, lse, softmax_scale=0.25, causal=True,
                               dq=dq_store.transpose(1, 2), config=BWD_CFG)
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    attention_ref(*leaves, softmax_scale=0.25, causal=True)[0].backward(do)
    for name, g, leaf in (("dq", dq_store.transpose(1, 2), leaves[0]), ("dk", dk, leaves[1]), ("dv", dv, leaves[2])):
        _assert_fa_close(name, g, leaf.grad, leaf.grad, 10, FLOOR[DTYPE][1])


def test_varlen_dropout_mask_layout_and_gradients():
    """Varlen S_dmask is (Hq, Tq, max_seqlen_k); its signs are the keep-mask of the backward."""
    gen = torch.Generator().manual_seed(61)
    Hq, Hk, D, p = 2, 1, 16, 0.25
    cu_q = torch.tensor([0, 9, 30], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 17, 29], dtype=torch.int32, device=DEVICE)
    q, k, v = _rand(30, Hq, D, gen=gen), _rand(29, Hk, D, gen=gen), _rand(29, Hk, D, gen=gen)
    rng = torch.tensor([5, 321], dtype=torch.int64, device=DEVICE)
    kw = dict(softmax_scale=0.25, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=21,
              max_seqlen_k=17, dropout_p=p, rng_state=rng)
    out, lse, s_dmask = flash_fwd(q, k, v, return_dropout_mask=True, config=FWD_CFG, **kw)
    assert s_dmask.shape == (Hq, 30, 17)
    # columns past a sequence's own key length are never visible
    assert torch.all(s_dmask[:, 9:, 12:] == 0)
    keep = dropout_mask_from_s_dmask(s_dmask)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
    o_ref, l_ref = attention_ref_varlen(*leaves, cu_q, cu_k, softmax_scale=0.25, causal=True, dropout_p=p,
                                        dropout_mask=keep)
    _assert_fa_close("out", out, o_ref, o_ref, 2, FLOOR[DTYPE][0])
    torch.testing.assert_close(lse, l_ref, atol=1e-4, rtol=1e-4)
    do = _rand(30, Hq, D, gen=gen)
    dq, dk, dv, *_ = flash_bwd(do, q, k, v, out, lse, config=BWD_CFG, **kw)
    o_ref.backward(do)
    for name, g, leaf in zip(("dq", "dk", "dv"), (dq, dk, dv), leaves):
        _assert_fa_close(name, g, leaf.grad, leaf.grad, 10, FLOOR[DTYPE][1])


@pytest.mark.parametrize("query_layout", ["dense", "varlen"])
@pytest.mark.parametrize("bad_id", ["negative", "past_the_pool"])
def test_paged_bad_block_ids_are_skipped_not_read(query_layout, bad_id):
    """A block id outside [0, num_blocks) makes its keys invalid (aiter_core.triton_attn.paged_block_lookup,
    the rule of every family): they are skipped, never read. The pool is a slice of a larger tensor
    poisoned with NaN on both sides, so a read just outside it would show up in the output."""
    import aiter_mha

    gen = torch.Generator().manual_seed(71)
    Hq, Hk, D, page, nb = 4, 2, 16, 4, 6
    storage_k = torch.full((nb + 2, page, Hk, D), float("nan"), dtype=DTYPE, device=DEVICE)
    storage_v = torch.full((nb + 2, page, Hk, D), float("nan"), dtype=DTYPE, device=DEVICE)
    k_cache, v_cache = storage_k[1 : nb + 1], storage_v[1 : nb + 1]
    k_cache.copy_(_rand(nb, page, Hk, D, gen=gen))
    v_cache.copy_(_rand(nb, page, Hk, D, gen=gen))
    bad = -1 if bad_id == "negative" else nb  # reads storage block 0 / nb + 1: NaN
    table = torch.tensor([[0, bad, 2], [3, 4, 5]], dtype=torch.int32, device=DEVICE)
    lens = [11, 10]
    seqlens_k = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    # the keys that count: sequence 0 loses its second block (keys 4..7)
    keep_rows = [[r for r in range(11) if not 4 <= r < 8], list(range(10))]
    if query_layout == "dense":
        q = _rand(2, 3, Hq, D, gen=gen)
        out, lse = run_paged_fwd(q, k_cache, v_cache, table, softmax_scale=0.25, causal=False, seqlens_k=seqlens_k,
                                 config=FWD_CFG)
        want = aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens_k, block_table=table,
                                                 softmax_scale=0.25, causal=False, backend="reference")
        q_rows = [q[b] for b in range(2)]
        got_rows = [out[b] for b in range(2)]
    else:
        cu_q = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)
        cu_k = torch.tensor([0, 11, 21], dtype=torch.int32, device=DEVICE)
        q = _rand(5, Hq, D, gen=gen)
        out, lse = run_paged_fwd(q, k_cache, v_cache, table, softmax_scale=0.25, causal=False, cu_seqlens_q=cu_q,
                                 cu_seqlens_k=cu_k, max_seqlen_q=3, max_seqlen_k=11, config=FWD_CFG)
        with torch.no_grad():
            want = aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 3, 11, softmax_scale=0.25,
                                                    block_table=table, backend="reference")
        q_rows = [q[0:3], q[3:5]]
        got_rows = [out[0:3], out[3:5]]
    assert torch.isfinite(out).all() and torch.isfinite(lse).all(), "a key outside the pool was read"
    _assert_fa_close("out vs reference backend", out, want, want, 2, FLOOR[DTYPE][0])
    for b in range(2):  # independently: attention over the valid keys only
        pos = torch.tensor(keep_rows[b], device=DEVICE)
        blocks = table[b].long()[pos // page]
        keys = k_cache[blocks, pos % page][None]
        vals = v_cache[blocks, pos % page][None]
        ref = attention_ref(q_rows[b][None], keys, vals, softmax_scale=0.25)[0][0]
        _assert_fa_close(f"sequence {b}", got_rows[b], ref, ref, 2, FLOOR[DTYPE][0])
