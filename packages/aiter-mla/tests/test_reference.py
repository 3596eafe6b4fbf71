"""The references against independent naive fp64 computations (tier 1: any machine, no Triton)."""

from __future__ import annotations

import math

import torch

from aiter_mla.reference import (
    kv_lengths,
    merge_splits_ref,
    mla_decode_ref,
    mla_prefill_ps_ref,
    mla_reduce_ref,
    rope_ref,
)
from aiter_mla.testing import make_paged_case


def _naive_mla(case, scale, causal):
    """Explicit loops: per sequence, query token, head; keys gathered token by token."""
    q = case.q.double()
    kv = case.kv.double()
    qo = case.qo_indptr.tolist()
    kp = case.kv_indptr.tolist()
    pages = case.kv_indices.tolist()
    lora = case.kv_lora_rank
    out = torch.zeros(q.shape[0], q.shape[1], lora, dtype=torch.float64)
    lse = torch.full((q.shape[0], q.shape[1]), -math.inf, dtype=torch.float64)
    for b, kv_len in enumerate(case.kv_lens):
        rows = [kv[pages[kp[b] + j // case.page_size], j % case.page_size, 0] for j in range(kv_len)]
        qlen = qo[b + 1] - qo[b]
        for i in range(qlen):
            visible = [j for j in range(kv_len) if not causal or j <= i + kv_len - qlen]
            for h in range(q.shape[1]):
                if not visible:
                    continue
                s = torch.stack([q[qo[b] + i, h] @ rows[j] * scale for j in visible])
                m = s.max()
                w = torch.exp(s - m)
                out[qo[b] + i, h] = sum(w[n] * rows[j][:lora] for n, j in enumerate(visible)) / w.sum()
                lse[qo[b] + i, h] = m + torch.log(w.sum())
    return out, lse


def test_mla_decode_ref_matches_naive_loops():
    case = make_paged_case(batch=3, heads=3, kv_lens=[9, 0, 14], q_lens=[2, 1, 4], page_size=4, kv_lora_rank=8,
                           rope=4, dtype=torch.float32, seed=2, device="cpu")
    for causal in (True, False):
        o, lse = mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, kv_lora_rank=8, page_size=4, sm_scale=0.4, causal=causal,
                                acc_dtype=torch.float64)
        ref_o, ref_lse = _naive_mla(case, 0.4, causal)
        torch.testing.assert_close(o.double(), ref_o, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(lse.double(), ref_lse, atol=1e-6, rtol=1e-6)


def test_kv_lengths_formula():
    indptr = torch.tensor([0, 3, 3, 4], dtype=torch.int32)
    last = torch.tensor([5, 1, 16], dtype=torch.int32)
    assert kv_lengths(indptr, last, 16).tolist() == [2 * 16 + 5, 0, 16]


def test_fp8_scales_are_dequantisation_factors():
    case = make_paged_case(batch=1, heads=2, kv_lens=5, q_lens=1, page_size=1, kv_lora_rank=8, rope=8,
                           dtype=torch.float32, seed=4, device="cpu")
    q_scale, kv_scale = torch.tensor([0.5]), torch.tensor([2.0])
    o1, l1 = mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
                            kv_lora_rank=8, sm_scale=0.3, q_scale=q_scale, kv_scale=kv_scale)
    o2, l2 = mla_decode_ref(case.q * 0.5, case.kv * 2.0, case.qo_indptr, case.kv_indptr, case.kv_indices,
                            case.kv_last_page_lens, kv_lora_rank=8, sm_scale=0.3)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


def test_prefill_ps_ref_gqa_matches_repeat():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(6, 4, 12, generator=gen)
    k = torch.randn(10, 2, 12, generator=gen)
    v = torch.randn(10, 2, 8, generator=gen)
    qo = torch.tensor([0, 6], dtype=torch.int32)
    kvp = torch.tensor([0, 7], dtype=torch.int32)
    idx = torch.tensor([9, 2, 4, 0, 1, 7, 3], dtype=torch.int32)
    o, lse = mla_prefill_ps_ref(q, k, v, qo, kvp, idx, is_causal=True, softmax_scale=0.3)
    kk, vv = k[idx.long()].repeat_interleave(2, 1), v[idx.long()].repeat_interleave(2, 1)
    s = torch.einsum("qhd,khd->hqk", q, kk) * 0.3
    mask = torch.arange(7)[None, :] > torch.arange(6)[:, None] + 1
    s = s.masked_fill(mask, -math.inf)
    torch.testing.assert_close(o, torch.einsum("hqk,khd->qhd", s.softmax(-1), vv), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, s.logsumexp(-1).T, atol=1e-5, rtol=1e-5)


def test_merge_of_splits_equals_whole_softmax():
    gen = torch.Generator().manual_seed(1)
    s = torch.randn(3, 20, generator=gen, dtype=torch.float64)
    v = torch.randn(20, 5, generator=gen, dtype=torch.float64)
    parts = [(0, 7), (7, 7), (7, 20)]  # the middle split is empty
    po, pl = [], []
    for a, b in parts:
        if b > a:
            p = torch.softmax(s[:, a:b], -1)
            po.append(p @ v[a:b])
            pl.append(torch.logsumexp(s[:, a:b], -1))
        else:
            po.append(torch.zeros(3, 5, dtype=torch.float64))
            pl.append(torch.full((3,), -math.inf, dtype=torch.float64))
    o, lse = merge_splits_ref(torch.stack(po), torch.stack(pl))
    torch.testing.assert_close(o, torch.softmax(s, -1) @ v)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))


def test_reduce_ref_maps_slots_to_tokens():
    heads, d_v, max_q = 2, 4, 2
    po = torch.randn(3 * max_q, 1, heads, d_v)
    pl = torch.randn(3 * max_q, 1, heads, 1)
    out = torch.full((2, heads, d_v), math.nan)
    mla_reduce_ref(po, pl, torch.tensor([0, 2]), torch.tensor([[0, 2]]), torch.tensor([2, 0]), max_q, out)
    for t in range(2):
        rows = [2 * max_q + t, t]
        o, _ = merge_splits_ref(po[rows, 0], pl[rows, 0, :, 0])
        torch.testing.assert_close(out[t], o)


def test_rope_ref_matches_complex_rotation():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 2, 8, generator=gen, dtype=torch.float64)
    theta = torch.randn(10, 4, generator=gen, dtype=torch.float64)
    pos = torch.tensor([0, 3, 9, 3])
    rot = torch.polar(torch.ones_like(theta), theta)[pos][:, None, :]
    # interleaved: pairs (2i, 2i+1) are complex numbers
    want = torch.view_as_real(torch.view_as_complex(x.reshape(4, 2, 4, 2).contiguous()) * rot).reshape(4, 2, 8)
    torch.testing.assert_close(rope_ref(x, theta.cos(), theta.sin(), pos, is_neox=False).double(), want)
    # neox: (x[i], x[i + 4]) are complex numbers
    z = torch.complex(x[..., :4], x[..., 4:]) * rot
    torch.testing.assert_close(rope_ref(x, theta.cos(), theta.sin(), pos, is_neox=True).double(),
                               torch.cat([z.real, z.imag], -1))
