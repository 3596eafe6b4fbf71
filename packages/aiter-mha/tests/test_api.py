"""Public API semantics through the reference backend (tier 1, CPU).

Every call names backend="reference": CI sets TRITON_INTERPRET=1, under which CPU tensors would
otherwise go to the (slow) interpreted Triton kernels; those are covered by the
``interpreter``-marked tests at the end (fp16/fp32, tiny shapes).
"""

import math
import os

import pytest
import torch

import aiter_mha
from aiter_mha.reference import attention_ref, dropout_mask_from_s_dmask

REF = "reference"


def rand(*shape, dtype=torch.float32, requires_grad=False):
    x = torch.randn(*shape, dtype=dtype)
    return x.requires_grad_(requires_grad)


def grads(outputs, inputs, grad_out):
    return torch.autograd.grad(outputs, [x for x in inputs if x is not None], grad_out, allow_unused=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)


# -- dense ------------------------------------------------------------------------------------


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("dims", [(16, 16), (24, 8)])
def test_dense_forward_backward_matches_reference(causal, heads, dims):
    hq, hk = heads
    dqk, dv = dims
    q = rand(2, 5, hq, dqk, requires_grad=True)
    k = rand(2, 9, hk, dqk, requires_grad=True)
    v = rand(2, 9, hk, dv, requires_grad=True)
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=causal, return_lse=True, backend=REF)
    ref_out, _, ref_lse = attention_ref(q, k, v, causal=causal)
    assert out.shape == (2, 5, hq, dv) and lse.shape == (2, hq, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    for got, want in zip(grads(out, [q, k, v], g), grads(ref_out, [q, k, v], g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_all_score_features_and_their_gradients():
    hq, hk, sq, sk = 4, 2, 6, 10
    q = rand(2, sq, hq, 16, requires_grad=True)
    k = rand(2, sk, hk, 16, requires_grad=True)
    v = rand(2, sk, hk, 16, requires_grad=True)
    bias = rand(sq, sk, requires_grad=True)
    sink = rand(hq, requires_grad=True)
    slopes = torch.rand(2, hq)
    kw = dict(causal=True, window=(3, 0, 2), alibi_slopes=slopes, bias=bias, sink=sink, softcap=2.5, softmax_scale=0.3)
    out = aiter_mha.flash_attn_func(
        q, k, v, softmax_scale=0.3, causal=True, window_size=(3, -1, 2), bias=bias, alibi_slopes=slopes,
        sink_ptr=sink, logits_soft_cap=2.5, backend=REF,
    )
    ref_out = attention_ref(q, k, v, **kw)[0]
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(out)
    got = grads(out, [q, k, v, bias, sink], g)
    want = grads(ref_out, [q, k, v, bias, sink], g)
    for name, a, b in zip("q k v bias sink".split(), got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"d{name}")
    assert got[4].abs().sum() > 0  # the sink gradient is real, not a zero placeholder


def test_return_structure_follows_upstream():
    q, k, v = rand(1, 4, 2, 16), rand(1, 4, 2, 16), rand(1, 4, 2, 16)
    out = aiter_mha.flash_attn_func(q, k, v, backend=REF)
    assert isinstance(out, torch.Tensor)
    out, lse = aiter_mha.flash_attn_func(q, k, v, return_lse=True, backend=REF)
    assert lse.shape == (1, 2, 4)
    out, lse, s_dmask = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.5, return_lse=True, return_attn_probs=True, backend=REF)
    assert s_dmask.shape == (1, 2, 4, 4) and s_dmask.dtype == torch.float32


def test_window_values_beyond_seqlen_mean_unbounded():
    q, k, v = rand(1, 6, 2, 16), rand(1, 8, 2, 16), rand(1, 8, 2, 16)
    a = aiter_mha.flash_attn_func(q, k, v, window_size=(8, 100, 0), backend=REF)
    b = aiter_mha.flash_attn_func(q, k, v, window_size=(-1, -1, 0), backend=REF)
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_fully_masked_rows_give_zero_output_lse_minus_inf_and_zero_grads():
    # window (0, 0) with Sk < Sq: the first rows see no key at all (bottom-right alignment)
    q = rand(1, 6, 2, 16, requires_grad=True)
    k = rand(1, 3, 2, 16, requires_grad=True)
    v = rand(1, 3, 2, 16, requires_grad=True)
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, return_lse=True, backend=REF)
    assert torch.all(out[:, :3] == 0) and torch.all(torch.isneginf(lse[:, :, :3]))
    assert torch.isfinite(lse[:, :, 3:]).all()
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.all(dq[:, :3] == 0) and torch.isfinite(dq).all()


def test_batch_padding_through_cu_seqlens_matches_per_sequence():
    b, s, h, d = 3, 7, 2, 16
    q, k, v = rand(b, s, h, d, requires_grad=True), rand(b, s, h, d, requires_grad=True), rand(b, s, h, d, requires_grad=True)
    lens_q, lens_k = [7, 3, 5], [4, 7, 2]
    cu_q = torch.tensor([0] + list(torch.tensor(lens_q).cumsum(0)), dtype=torch.int32)
    cu_k = torch.tensor([0] + list(torch.tensor(lens_k).cumsum(0)), dtype=torch.int32)
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, return_lse=True, cu_seqlens_q=cu_q, cu_seqlens_kv=cu_k, backend=REF)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], g)
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        o_i, _, lse_i = attention_ref(q[i : i + 1, :lq], k[i : i + 1, :lk], v[i : i + 1, :lk], causal=True)
        torch.testing.assert_close(out[i, :lq], o_i[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[i, :, :lq], lse_i[0], atol=1e-5, rtol=1e-5)
        assert torch.all(out[i, lq:] == 0) and torch.all(torch.isneginf(lse[i, :, lq:]))
        gq, gk, gv = torch.autograd.grad(o_i, [q, k, v], g[i : i + 1, :lq])
        torch.testing.assert_close(dq[i], gq[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dk[i], gk[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dv[i], gv[i], atol=1e-5, rtol=1e-5)


# -- dropout ----------------------------------------------------------------------------------


def test_dropout_mask_is_consistent_with_output_and_gradients():
    p = 0.3
    q, k, v = rand(2, 5, 2, 16, requires_grad=True), rand(2, 8, 2, 16, requires_grad=True), rand(2, 8, 2, 16, requires_grad=True)
    out, lse, s_dmask = aiter_mha.flash_attn_func(q, k, v, dropout_p=p, causal=True, return_lse=True, return_attn_probs=True, backend=REF)
    keep = dropout_mask_from_s_dmask(s_dmask)
    dropped = (~keep).float().mean().item()
    assert 0.1 < dropped < 0.5
    ref_out, probs, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, causal=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(s_dmask.abs(), probs, atol=1e-6, rtol=1e-6)  # |S_dmask| = P
    g = torch.randn_like(out)
    for got, want in zip(grads(out, [q, k, v], g), grads(ref_out, [q, k, v], g)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_dropout_is_reproducible_from_the_generator_state():
    q, k, v = rand(1, 6, 2, 16), rand(1, 6, 2, 16), rand(1, 6, 2, 16)
    torch.manual_seed(7)
    a = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.4, backend=REF)
    b = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.4, backend=REF)
    torch.manual_seed(7)
    c = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.4, backend=REF)
    torch.testing.assert_close(a, c, atol=0, rtol=0)
    assert not torch.equal(a, b)


def test_low_level_mha_fwd_gen_and_rng_state_roundtrip():
    q, k, v = rand(1, 5, 2, 16), rand(1, 5, 2, 16), rand(1, 5, 2, 16)
    gen = torch.Generator().manual_seed(3)
    o1, lse1, p1, rng1 = aiter_mha.mha_fwd(q, k, v, 0.25, 0.25, False, -1, -1, 0, True, True, gen=gen, backend=REF)
    gen.manual_seed(3)
    o2, _, p2, rng2 = aiter_mha.mha_fwd(q, k, v, 0.25, 0.25, False, -1, -1, 0, True, True, gen=gen, backend=REF)
    assert rng1.dtype == torch.int64 and rng1.shape == (2,)
    assert torch.equal(rng1, rng2) and torch.equal(o1, o2) and torch.equal(p1, p2)
    # the backward regenerates the same mask from rng_state
    dout = torch.randn_like(o1)
    dq, dk, dv, delta = aiter_mha.mha_bwd(dout, q, k, v, o1, lse1, 0.25, 0.25, False, -1, -1, False, rng_state=rng1, backend=REF)
    keep = dropout_mask_from_s_dmask(p1)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = attention_ref(qr, kr, vr, softmax_scale=0.25, dropout_p=0.25, dropout_mask=keep)[0]
    for got, want in zip((dq, dk, dv), torch.autograd.grad(ref, [qr, kr, vr], dout)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(delta, (dout * o1).sum(-1).transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_low_level_out_and_grad_buffers_are_written_in_place():
    q, k, v = rand(2, 4, 2, 16), rand(2, 6, 1, 16), rand(2, 6, 1, 8)
    out = torch.full((2, 4, 2, 8), float("nan"))
    o, lse, p, rng = aiter_mha.mha_fwd(q, k, v, 0.0, 0.25, True, -1, -1, 0, True, False, out=out, backend=REF)
    assert o is out and torch.isfinite(out).all()
    assert p.numel() == 0 and torch.equal(rng, torch.zeros(2, dtype=torch.int64))
    torch.testing.assert_close(out, attention_ref(q, k, v, softmax_scale=0.25, causal=True)[0], atol=1e-5, rtol=1e-5)
    dout = torch.randn_like(out)
    dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
    r = aiter_mha.mha_bwd(dout, q, k, v, out, lse, 0.0, 0.25, True, -1, -1, True, dq=dq, dk=dk, dv=dv, backend=REF)
    assert r[0] is dq and r[1] is dk and r[2] is dv
    assert all(torch.isfinite(x).all() for x in (dq, dk, dv))


# -- varlen -----------------------------------------------------------------------------------


def _varlen_problem(lens_q, lens_k, hq=4, hk=2, d=16, dv=16):
    cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], dtype=torch.int32)
    cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], dtype=torch.int32)
    q = rand(int(cu_q[-1]), hq, d, requires_grad=True)
    k = rand(int(cu_k[-1]), hk, d, requires_grad=True)
    v = rand(int(cu_k[-1]), hk, dv, requires_grad=True)
    return q, k, v, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_matches_per_sequence_reference_with_lse_layout(causal):
    lens_q, lens_k = [3, 1, 6], [5, 4, 6]
    q, k, v, cu_q, cu_k = _varlen_problem(lens_q, lens_k)
    slopes = torch.rand(4)
    out, lse = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 6, causal=causal, alibi_slopes=slopes, return_lse=True, backend=REF)
    assert out.shape == (10, 4, 16) and lse.shape == (4, 10)  # LSE (Hq, total_q)
    g = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, [q, k, v], g)
    for b in range(3):
        q0, q1, k0, k1 = int(cu_q[b]), int(cu_q[b + 1]), int(cu_k[b]), int(cu_k[b + 1])
        o_b, _, lse_b = attention_ref(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal=causal, alibi_slopes=slopes)
        torch.testing.assert_close(out[q0:q1], o_b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, q0:q1], lse_b[0], atol=1e-5, rtol=1e-5)
        gq, gk, gv = torch.autograd.grad(o_b, [q, k, v], g[None, q0:q1])
        torch.testing.assert_close(dq[q0:q1], gq[q0:q1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dk[k0:k1], gk[k0:k1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(dv[k0:k1], gv[k0:k1], atol=1e-5, rtol=1e-5)


def test_varlen_padded_layout_equals_packed():
    lens = [3, 5]
    q, k, v, cu, _ = _varlen_problem(lens, lens)
    # physical layout with a gap of 2 rows after each sequence
    starts = torch.tensor([0, 5, 12], dtype=torch.int32)
    qp = torch.randn(12, 4, 16)
    kp = torch.randn(12, 2, 16)
    vp = torch.randn(12, 2, 16)
    for b in range(2):
        s0, c0, n = int(starts[b]), int(cu[b]), lens[b]
        qp[s0 : s0 + n], kp[s0 : s0 + n], vp[s0 : s0 + n] = q[c0 : c0 + n], k[c0 : c0 + n], v[c0 : c0 + n]
    qp, kp, vp = (x.requires_grad_() for x in (qp, kp, vp))
    packed = aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True, backend=REF)
    padded = aiter_mha.flash_attn_varlen_func(
        qp, kp, vp, cu, cu, 5, 5, causal=True, cu_seqlens_q_padded=starts, cu_seqlens_k_padded=starts, backend=REF
    )
    g = torch.randn_like(padded)
    dqp, dkp, dvp = torch.autograd.grad(padded, [qp, kp, vp], g)
    g_packed = torch.cat([g[0:3], g[5:10]])
    dq, dk, dv = torch.autograd.grad(packed, [q, k, v], g_packed)
    for b in range(2):
        s0, c0, n = int(starts[b]), int(cu[b]), lens[b]
        torch.testing.assert_close(padded[s0 : s0 + n], packed[c0 : c0 + n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dqp[s0 : s0 + n], dq[c0 : c0 + n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dkp[s0 : s0 + n], dk[c0 : c0 + n], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(dvp[s0 : s0 + n], dv[c0 : c0 + n], atol=1e-6, rtol=1e-6)
    assert torch.all(dqp[3:5] == 0) and torch.all(dkp[10:12] == 0)  # gap rows get no gradient


def test_paged_kv_equals_contiguous():
    lens_q, lens_k = [2, 3], [7, 12]
    q, k, v, cu_q, cu_k = _varlen_problem(lens_q, lens_k)
    page, num_blocks = 4, 9
    k_cache = torch.randn(num_blocks, page, 2, 16)
    v_cache = torch.randn(num_blocks, page, 2, 16)
    table = torch.tensor([[5, 1, 8, 0], [2, 7, 3, 6]], dtype=torch.int32)
    for b, n in enumerate(lens_k):
        for j in range(n):
            blk, slot = int(table[b, j // page]), j % page
            k_cache[blk, slot] = k[int(cu_k[b]) + j]
            v_cache[blk, slot] = v[int(cu_k[b]) + j]
    with torch.no_grad():
        want = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 12, causal=True, backend=REF)
        got = aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 3, 12, causal=True, block_table=table, backend=REF)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)


def test_varlen_out_argument_is_written():
    q, k, v, cu_q, cu_k = _varlen_problem([2, 4], [3, 4])
    out = torch.full((6, 4, 16), float("nan"))
    with torch.no_grad():
        res = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 4, out=out, backend=REF)
    assert res is out and torch.isfinite(out).all()


def test_varlen_sink_gradient_and_dropout_mask_layout():
    q, k, v, cu_q, cu_k = _varlen_problem([3, 4], [5, 2])
    sink = rand(4, requires_grad=True)
    out, lse, s_dmask = aiter_mha.flash_attn_varlen_func(
        q, k, v, cu_q, cu_k, 4, 5, dropout_p=0.2, sink_ptr=sink, return_lse=True, return_attn_probs=True, backend=REF
    )
    assert s_dmask.shape == (4, 7, 5)
    assert torch.all(s_dmask[:, 3:, 2:] == 0)  # second sequence has only 2 keys
    (dsink,) = torch.autograd.grad(out.sum(), [sink])
    assert dsink.shape == (4,) and torch.isfinite(dsink).all() and dsink.abs().sum() > 0


# -- fp8 --------------------------------------------------------------------------------------


def _fp8():
    return torch.float8_e4m3fn


def test_fp8_pertensor_matches_dequantized_reference():
    q, k, v = torch.rand(2, 8, 4, 32), torch.rand(2, 8, 2, 32), torch.rand(2, 8, 2, 32)
    descale = torch.tensor([0.5])
    q8, k8, v8 = (x.div(0.5).to(_fp8()) for x in (q, k, v))
    out = aiter_mha.flash_attn_fp8_pertensor_func(q8, k8, v8, descale, descale, descale, causal=True, backend=REF)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 8, 4, 32)
    want = attention_ref(q8.float() * 0.5, k8.float() * 0.5, v8.float() * 0.5, causal=True)[0]
    torch.testing.assert_close(out.float(), want, atol=2e-2, rtol=2e-2)


def test_fp8_varlen_pertensor_with_per_batch_descales():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.rand(8, 4, 32), torch.rand(8, 2, 32), torch.rand(8, 2, 32)
    desc = torch.tensor([[0.25, 0.5], [0.5, 0.125]])
    q8, k8, v8 = (x.to(_fp8()) for x in (q, k, v))
    out = aiter_mha.flash_attn_varlen_fp8_pertensor_func(q8, k8, v8, desc, desc, desc, cu, cu, 5, 5, backend=REF)
    for b in range(2):
        s = slice(int(cu[b]), int(cu[b + 1]))
        dq = desc[b].repeat_interleave(2)[None, :, None]
        dk = desc[b][None, :, None]
        want = attention_ref((q8[s].float() * dq)[None], (k8[s].float() * dk)[None], (v8[s].float() * dk)[None])[0][0]
        torch.testing.assert_close(out[s].float(), want, atol=2e-2, rtol=2e-2)


def test_fp8_func_quantizes_per_batch_and_kv_head():
    from aiter_mha.fp8 import AMAX_FLOOR, quantize_bshd_per_kv_head, quantize_thd_per_kv_head

    x = torch.randn(2, 5, 4, 16)
    x[1, :, 2:] *= 10  # kv head 1 of batch 1 has a larger range
    x8, descale = quantize_bshd_per_kv_head(x, 2, torch.float8_e4m3fn)
    amax = x.reshape(2, 5, 2, 2, 16).abs().amax(dim=(1, 3, 4))
    torch.testing.assert_close(descale, amax / 448.0)
    deq = x8.float().reshape(2, 5, 2, 2, 16) * descale[:, None, :, None, None]
    torch.testing.assert_close(deq.reshape(x.shape), x, atol=0.07 * amax.max().item() / 8, rtol=0.07)
    zeros8, zdesc = quantize_bshd_per_kv_head(torch.zeros(1, 2, 2, 8), 1, torch.float8_e4m3fn)
    assert torch.all(zdesc == AMAX_FLOOR / 448.0) and torch.all(zeros8.float() == 0)
    # varlen: per-sequence scales, no host sync needed
    cu = torch.tensor([0, 2, 5], dtype=torch.int32)
    t = torch.randn(5, 2, 8)
    t[2:] *= 3
    t8, tdesc = quantize_thd_per_kv_head(t, cu, 1, torch.float8_e4m3fn)
    torch.testing.assert_close(tdesc[:, 0], torch.stack([t[:2].abs().max(), t[2:].abs().max()]) / 448.0)


def test_fp8_func_output_dtype_and_accuracy():
    q, k, v = torch.randn(1, 16, 4, 32, dtype=torch.bfloat16), torch.randn(1, 16, 2, 32, dtype=torch.bfloat16), torch.randn(1, 16, 2, 32, dtype=torch.bfloat16)
    out = aiter_mha.flash_attn_fp8_func(q, k, v, causal=True, backend=REF)
    assert out.dtype == torch.bfloat16
    want = attention_ref(q, k, v, causal=True)[0]
    diff = (out.float() - want.float()).abs().max().item()
    cos = torch.nn.functional.cosine_similarity(out.float().flatten(), want.float().flatten(), dim=0).item()
    assert diff < 0.25 and cos > 0.99
    cu = torch.tensor([0, 7, 16], dtype=torch.int32)
    vout = aiter_mha.flash_attn_varlen_fp8_func(q[0], k[0], v[0], cu, cu, 9, 9, causal=True, backend=REF)
    for b in range(2):
        s = slice(int(cu[b]), int(cu[b + 1]))
        ref_b = attention_ref(q[:, s], k[:, s], v[:, s], causal=True)[0][0]
        assert (vout[s].float() - ref_b.float()).abs().max().item() < 0.25


def test_fp8_func_straight_through_gradients():
    q = torch.randn(2, 24, 4, 32, requires_grad=True)
    k = torch.randn(2, 24, 2, 32, requires_grad=True)
    v = torch.randn(2, 24, 2, 32, requires_grad=True)
    out = aiter_mha.flash_attn_fp8_func(q, k, v, causal=True, backend=REF)
    ref = attention_ref(q, k, v, causal=True)[0]
    g = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        assert (got - want).abs().max() <= 0.1 * want.abs().max()
    cu = torch.tensor([0, 20, 48], dtype=torch.int32)
    qv, kv, vv = (x.detach().reshape(48, -1, 32).requires_grad_() for x in (q, k, v))
    out_v = aiter_mha.flash_attn_varlen_fp8_func(qv, kv, vv, cu, cu, 28, 28, causal=True, backend=REF)
    dq, dk, dv = torch.autograd.grad(out_v, [qv, kv, vv], g.reshape(48, 4, 32))
    for b in range(2):
        s = slice(int(cu[b]), int(cu[b + 1]))
        qb, kb, vb = (x.detach()[s][None].requires_grad_() for x in (qv, kv, vv))
        ref_b = attention_ref(qb, kb, vb, causal=True)[0]
        want = torch.autograd.grad(ref_b, [qb, kb, vb], g.reshape(48, 4, 32)[s][None])
        for got, w in zip((dq[s], dk[s], dv[s]), want):
            assert (got - w[0]).abs().max() <= 0.1 * w.abs().max()


# -- KV cache ---------------------------------------------------------------------------------


def _rope_reference(x, cos, sin, pos, interleaved):
    """Per-element rotary in fp64 loops, independent of kvcache.apply_rotary."""
    x = x.double().clone()
    half = cos.shape[1]
    b_, s_, h_, _ = x.shape
    out = x.clone()
    for b in range(b_):
        for s in range(s_):
            p = int(pos[b, s])
            for i in range(half):
                c, sn = float(cos[p, i]), float(sin[p, i])
                i0, i1 = (2 * i, 2 * i + 1) if interleaved else (i, i + half)
                out[b, s, :, i0] = x[b, s, :, i0] * c - x[b, s, :, i1] * sn
                out[b, s, :, i1] = x[b, s, :, i0] * sn + x[b, s, :, i1] * c
    return out


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("interleaved", [False, True])
def test_kvcache_append_rotary_and_attention(paged, interleaved):
    batch, hq, hk, d, s_new, cap = 2, 4, 2, 16, 2, 12
    lens = torch.tensor([3, 7], dtype=torch.int32)
    q = torch.randn(batch, s_new, hq, d)
    k_new, v_new = torch.randn(batch, s_new, hk, d), torch.randn(batch, s_new, hk, d)
    cos_sin = torch.rand(cap, 4) * math.pi
    cos, sin = cos_sin.cos(), cos_sin.sin()
    logical_k = torch.randn(batch, cap, hk, d)
    logical_v = torch.randn(batch, cap, hk, d)
    if paged:
        page = 4
        table = torch.tensor([[4, 0, 2], [1, 5, 3]], dtype=torch.int32)
        k_cache, v_cache = torch.randn(6, page, hk, d), torch.randn(6, page, hk, d)
        for b in range(batch):
            for j in range(cap):
                k_cache[table[b, j // page], j % page] = logical_k[b, j]
                v_cache[table[b, j // page], j % page] = logical_v[b, j]
        kw = dict(block_table=table)
    else:
        k_cache, v_cache = logical_k.clone(), logical_v.clone()
        kw = {}
    out, lse = aiter_mha.flash_attn_with_kvcache(
        q, k_cache, v_cache, k_new, v_new, cache_seqlens=lens, rotary_cos=cos, rotary_sin=sin,
        rotary_interleaved=interleaved, causal=True, return_softmax_lse=True, backend=REF, **kw,
    )
    pos = lens[:, None].long() + torch.arange(s_new)[None]
    k_rot = _rope_reference(k_new, cos, sin, pos, interleaved).float()
    q_rot = _rope_reference(q, cos, sin, pos, interleaved).float()
    for b in range(batch):
        n = int(lens[b])
        keys = torch.cat([logical_k[b, :n], k_rot[b]])
        vals = torch.cat([logical_v[b, :n], v_new[b]])
        for j in range(s_new):  # the cache now holds the appended (rotated) rows
            got_k = k_cache[table[b, (n + j) // 4], (n + j) % 4] if paged else k_cache[b, n + j]
            torch.testing.assert_close(got_k, k_rot[b, j], atol=1e-5, rtol=1e-5)
        o_b, _, lse_b = attention_ref(q_rot[b : b + 1], keys[None], vals[None], causal=True)
        torch.testing.assert_close(out[b], o_b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[b], lse_b[0], atol=1e-5, rtol=1e-5)


def test_kvcache_batch_idx_and_int_seqlens_without_append():
    hq, hk, d = 2, 1, 16
    k_cache, v_cache = torch.randn(3, 9, hk, d), torch.randn(3, 9, hk, d)
    q = torch.randn(2, 1, hq, d)
    idx = torch.tensor([2, 0], dtype=torch.int32)
    out = aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=5, cache_batch_idx=idx, backend=REF)
    for b in range(2):
        r = int(idx[b])
        want = attention_ref(q[b : b + 1], k_cache[r : r + 1, :5], v_cache[r : r + 1, :5], causal=True)[0]
        torch.testing.assert_close(out[b : b + 1], want, atol=1e-5, rtol=1e-5)


def test_non_causal_rotary_puts_every_query_at_cache_seqlens():
    q = torch.randn(1, 3, 2, 8)
    k_cache, v_cache = torch.zeros(1, 8, 2, 8), torch.zeros(1, 8, 2, 8)
    k_new, v_new = torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8)
    ang = torch.rand(8, 2)
    out = aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cache_seqlens=2, rotary_cos=ang.cos(),
                                            rotary_sin=ang.sin(), causal=False, backend=REF)
    pos_q = torch.full((1, 3), 2)
    pos_k = torch.tensor([[2, 3, 4]])
    q_rot = _rope_reference(q, ang.cos(), ang.sin(), pos_q, True).float()
    keys = torch.cat([torch.zeros(2, 2, 8), _rope_reference(k_new, ang.cos(), ang.sin(), pos_k, True).float()[0]])
    vals = torch.cat([torch.zeros(2, 2, 8), v_new[0]])
    want = attention_ref(q_rot, keys[None], vals[None])[0]
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


# -- through the Triton backend (interpreter on CPU, or a GPU) ------------------------------------------

_TRITON_OK = os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available()
_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
interpreter = pytest.mark.skipif(not _TRITON_OK, reason="Triton needs a GPU or TRITON_INTERPRET=1")


def _tol(dtype):
    return dict(atol=2e-3, rtol=2e-3) if dtype == torch.float16 else dict(atol=2e-4, rtol=2e-4)


@pytest.mark.interpreter
@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_dense_forward_with_features(dtype):
    q = torch.randn(1, 20, 4, 40, dtype=dtype, device=_DEVICE)
    k = torch.randn(1, 33, 2, 40, dtype=dtype, device=_DEVICE)
    v = torch.randn(1, 33, 2, 24, dtype=dtype, device=_DEVICE)
    sink = torch.randn(4, device=_DEVICE)
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, window_size=(9, -1, 2), sink_ptr=sink, logits_soft_cap=3.0,
                                         return_lse=True, backend="triton")
    ref_out, _, ref_lse = attention_ref(q, k, v, causal=True, window=(9, 0, 2), sink=sink, softcap=3.0)
    low_out = attention_ref(q, k, v, causal=True, window=(9, 0, 2), sink=sink, softcap=3.0, upcast=False)[0]
    tol = max(2 * (low_out.float() - ref_out.float()).abs().max().item(), _tol(dtype)["atol"])
    torch.testing.assert_close(out.float(), ref_out.float(), atol=tol, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-3, rtol=1e-3)


@pytest.mark.interpreter
@interpreter
def test_triton_varlen_paged_and_padded_batch_forward():
    dtype = torch.float16
    q, k, v, cu_q, cu_k = _varlen_problem([5, 2], [9, 17], hq=2, hk=1, d=32, dv=32)
    q, k, v = (x.detach().to(dtype).to(_DEVICE) for x in (q, k, v))
    cu_q, cu_k = cu_q.to(_DEVICE), cu_k.to(_DEVICE)
    want = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 17, causal=True, backend=REF)
    got = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 17, causal=True, backend="triton")
    torch.testing.assert_close(got, want, **_tol(dtype))
    # batch padding on the dense API goes through the padded-varlen kernel path
    qd, kd, vd = torch.randn(2, 6, 2, 32, dtype=dtype, device=_DEVICE), torch.randn(2, 8, 1, 32, dtype=dtype, device=_DEVICE), torch.randn(2, 8, 1, 32, dtype=dtype, device=_DEVICE)
    cq = torch.tensor([0, 6, 9], dtype=torch.int32, device=_DEVICE)
    ck = torch.tensor([0, 5, 13], dtype=torch.int32, device=_DEVICE)
    a, la = aiter_mha.flash_attn_func(qd, kd, vd, cu_seqlens_q=cq, cu_seqlens_kv=ck, return_lse=True, backend="triton")
    b, lb = aiter_mha.flash_attn_func(qd, kd, vd, cu_seqlens_q=cq, cu_seqlens_kv=ck, return_lse=True, backend=REF)
    torch.testing.assert_close(a, b, **_tol(dtype))
    torch.testing.assert_close(la, lb, atol=1e-3, rtol=1e-3)


@pytest.mark.interpreter
@interpreter
def test_triton_kvcache_decode_paged():
    dtype = torch.float16
    k_cache = torch.randn(5, 16, 1, 32, dtype=dtype, device=_DEVICE)
    v_cache = torch.randn(5, 16, 1, 32, dtype=dtype, device=_DEVICE)
    table = torch.tensor([[3, 1], [0, 4]], dtype=torch.int32, device=_DEVICE)
    q = torch.randn(2, 1, 2, 32, dtype=dtype, device=_DEVICE)
    kn, vn = torch.randn(2, 1, 1, 32, dtype=dtype, device=_DEVICE), torch.randn(2, 1, 1, 32, dtype=dtype, device=_DEVICE)
    lens = torch.tensor([20, 7], dtype=torch.int32, device=_DEVICE)
    kc2, vc2 = k_cache.clone(), v_cache.clone()
    got = aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, kn, vn, cache_seqlens=lens, block_table=table, backend="triton")
    want = aiter_mha.flash_attn_with_kvcache(q, kc2, vc2, kn, vn, cache_seqlens=lens, block_table=table, backend=REF)
    torch.testing.assert_close(got, want, **_tol(dtype))
    assert torch.equal(k_cache, kc2) and torch.equal(v_cache, vc2)


@pytest.mark.interpreter
@interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_triton_dense_backward_with_sink_and_gqa(dtype):
    q = torch.randn(1, 17, 4, 32, dtype=dtype, device=_DEVICE, requires_grad=True)
    k = torch.randn(1, 23, 2, 32, dtype=dtype, device=_DEVICE, requires_grad=True)
    v = torch.randn(1, 23, 2, 32, dtype=dtype, device=_DEVICE, requires_grad=True)
    sink = torch.randn(4, device=_DEVICE, requires_grad=True)
    out = aiter_mha.flash_attn_func(q, k, v, causal=True, sink_ptr=sink, backend="triton")
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [q, k, v, sink], g)
    ref = attention_ref(q, k, v, causal=True, sink=sink)[0]
    low = attention_ref(q, k, v, causal=True, sink=sink, upcast=False)[0]
    want = torch.autograd.grad(ref, [q, k, v, sink], g)
    low_g = torch.autograd.grad(low, [q, k, v, sink], g)
    for name, a, b, c in zip("q k v sink".split(), got, want, low_g):
        tol = max(10 * (c.float() - b.float()).abs().max().item(), 1e-2 if dtype == torch.float16 else 1e-4)
        torch.testing.assert_close(a.float(), b.float(), atol=tol, rtol=0, msg=f"d{name}")


@pytest.mark.interpreter
@interpreter
def test_triton_varlen_and_batch_padding_backward_with_bias_alibi():
    q, k, v, cu_q, cu_k = _varlen_problem([5, 3], [6, 9], hq=2, hk=1, d=16, dv=16)
    q, k, v = (x.detach().to(_DEVICE).requires_grad_() for x in (q, k, v))
    cu_q, cu_k = cu_q.to(_DEVICE), cu_k.to(_DEVICE)
    bias = torch.randn(5, 9, device=_DEVICE, requires_grad=True)
    slopes = torch.rand(2, 2, device=_DEVICE)
    results = {}
    for backend in ("triton", REF):
        out = aiter_mha.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 5, 9, causal=True, bias=bias, alibi_slopes=slopes,
                                               backend=backend)
        g = torch.ones_like(out) * 0.5 + torch.arange(out.numel(), device=_DEVICE).reshape(out.shape) % 3
        results[backend] = (out, *torch.autograd.grad(out, [q, k, v, bias], g))
    for name, a, b in zip(("out", "dq", "dk", "dv", "dbias"), results["triton"], results[REF]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)
    # batch padding on the dense API, backward
    qd = torch.randn(2, 4, 2, 16, device=_DEVICE, requires_grad=True)
    kd = torch.randn(2, 6, 1, 16, device=_DEVICE, requires_grad=True)
    vd = torch.randn(2, 6, 1, 16, device=_DEVICE, requires_grad=True)
    cq = torch.tensor([0, 4, 6], dtype=torch.int32, device=_DEVICE)
    ck = torch.tensor([0, 3, 9], dtype=torch.int32, device=_DEVICE)
    res = {}
    for backend in ("triton", REF):
        out = aiter_mha.flash_attn_func(qd, kd, vd, causal=True, cu_seqlens_q=cq, cu_seqlens_kv=ck, backend=backend)
        res[backend] = (out, *torch.autograd.grad(out, [qd, kd, vd], torch.ones_like(out)))
    for name, a, b in zip(("out", "dq", "dk", "dv"), res["triton"], res[REF]):
        torch.testing.assert_close(a, b, atol=1e-3, rtol=1e-3, msg=name)


@pytest.mark.interpreter
@interpreter
def test_triton_dropout_mask_consistent_with_output_and_grads():
    p = 0.3
    q = torch.randn(1, 9, 2, 16, device=_DEVICE, requires_grad=True)
    k = torch.randn(1, 12, 2, 16, device=_DEVICE, requires_grad=True)
    v = torch.randn(1, 12, 2, 16, device=_DEVICE, requires_grad=True)
    out, s_dmask = aiter_mha.flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, backend="triton")
    keep = dropout_mask_from_s_dmask(s_dmask)
    assert 0.15 < (~keep).float().mean().item() < 0.45
    ref = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep)[0]
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, [q, k, v], g), torch.autograd.grad(ref, [q, k, v], g)):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.interpreter
@interpreter
def test_triton_strided_layouts_bhsd_view_and_kv_packed():
    """Views with other strides (upstream tests BHSD and KV-packed layouts); only the last dim is contiguous."""
    q = torch.randn(2, 2, 11, 16, device=_DEVICE).transpose(1, 2).requires_grad_()  # BHSD storage, bshd view
    kv = torch.randn(2, 13, 2, 2, 16, device=_DEVICE, requires_grad=True)  # (B, S, 2, H, D) packed
    k, v = kv[:, :, 0], kv[:, :, 1]
    results = {}
    for backend in ("triton", REF):
        out = aiter_mha.flash_attn_func(q, k, v, causal=True, backend=backend)
        results[backend] = (out, *torch.autograd.grad(out, [q, kv], torch.ones_like(out)))
    for name, a, b in zip(("out", "dq", "dkv"), results["triton"], results[REF]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
