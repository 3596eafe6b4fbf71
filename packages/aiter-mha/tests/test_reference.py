"""reference.py against an independent, element-by-element fp64 loop (tier 1, CPU)."""

import math

import pytest
import torch

from aiter_mha.reference import (
    attention_ref,
    attention_ref_varlen,
    construct_mask,
    dropout_mask_from_s_dmask,
    gather_paged_kv,
    make_dropout_mask,
)


def naive_attention(q, k, v, *, scale, causal=False, window=(-1, -1, 0), slopes=None, bias=None,
                    sink=None, softcap=0.0, dropout_p=0.0, keep=None):
    """Plain python loops in fp64 over (b, h, i, j); written independently of reference.py."""
    q, k, v = q.double(), k.double(), v.double()
    B, Sq, Hq, _ = q.shape
    Sk, Hk, Dv = k.shape[1], k.shape[2], v.shape[3]
    left, right, sink_size = window
    if left >= Sk:
        left = -1
    if right >= Sk:
        right = -1
    if causal:
        right = 0
    out = torch.zeros(B, Sq, Hq, Dv, dtype=torch.float64)
    lse = torch.zeros(B, Hq, Sq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // (Hq // Hk)
            for i in range(Sq):
                logits = {}
                for j in range(Sk):
                    shifted = i + Sk - Sq
                    in_right = right < 0 or j <= shifted + right
                    in_left = left < 0 or j >= shifted - left
                    if not (in_right and (in_left or j < sink_size)):
                        continue
                    s = scale * float(q[b, i, h] @ k[b, j, hk])
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if bias is not None:
                        s += float(bias[i, j])
                    if slopes is not None:
                        slope = float(slopes[h] if slopes.dim() == 1 else slopes[b, h])
                        s -= slope * abs(i + Sk - Sq - j)
                    logits[j] = s
                terms = list(logits.values()) + ([float(sink[h])] if sink is not None else [])
                if not terms:
                    lse[b, h, i] = -math.inf
                    continue
                m = max(terms)
                total = sum(math.exp(t - m) for t in terms)
                lse[b, h, i] = m + math.log(total)
                acc = torch.zeros(Dv, dtype=torch.float64)
                for j, s in logits.items():
                    p = math.exp(s - lse[b, h, i])
                    if dropout_p > 0:
                        p = p / (1 - dropout_p) if keep[b, h, i, j] else 0.0
                    acc += p * v[b, j, hk]
                out[b, i, h] = acc
    return out, lse


def _inputs(B, Sq, Sk, Hq, Hk, D, Dv=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    Dv = Dv or D
    q = torch.randn(B, Sq, Hq, D, generator=g)
    k = torch.randn(B, Sk, Hk, D, generator=g)
    v = torch.randn(B, Sk, Hk, Dv, generator=g)
    return q, k, v, g


CASES = [
    dict(),
    dict(causal=True),
    dict(causal=True, Sq=9, Sk=5),  # Sq > Sk: the first rows see nothing
    dict(window=(2, 1, 0)),
    dict(window=(1, 0, 2), Sq=6, Sk=10),
    dict(window=(3, -1, 1), causal=True),
    dict(alibi="h"),
    dict(alibi="bh", causal=True),
    dict(bias=True),
    dict(sink=True, causal=True, Sq=9, Sk=5),
    dict(softcap=2.5),
    dict(dropout=0.3),
    dict(Hq=4, Hk=2, Dv=6),
    dict(window=(20, 30, 0)),  # >= Sk normalizes to -1
]


@pytest.mark.parametrize("case", CASES, ids=[str(c) for c in CASES])
def test_reference_matches_naive_loop(case):
    case = dict(case)
    B, Hq, Hk = 2, case.pop("Hq", 2), case.pop("Hk", 2)
    Sq, Sk, D, Dv = case.pop("Sq", 7), case.pop("Sk", 8), 5, case.pop("Dv", 5)
    q, k, v, g = _inputs(B, Sq, Sk, Hq, Hk, D, Dv)
    scale = 0.37
    kw = dict(causal=case.get("causal", False), window=case.get("window", (-1, -1, 0)),
              softcap=case.get("softcap", 0.0))
    alibi = case.get("alibi")
    if alibi:
        kw["alibi_slopes"] = torch.rand((Hq,) if alibi == "h" else (B, Hq), generator=g)
    if case.get("bias"):
        kw["bias"] = torch.randn(Sq, Sk, generator=g)
    if case.get("sink"):
        kw["sink"] = torch.randn(Hq, generator=g)
    p = case.get("dropout", 0.0)
    keep = make_dropout_mask((B, Hq, Sq, Sk), p, generator=g) if p else None

    out, probs, lse = attention_ref(q, k, v, softmax_scale=scale, dropout_p=p, dropout_mask=keep, **kw)
    out_n, lse_n = naive_attention(q, k, v, scale=scale, slopes=kw.get("alibi_slopes"),
                                   bias=kw.get("bias"), sink=kw.get("sink"), dropout_p=p, keep=keep,
                                   causal=kw["causal"], window=kw["window"], softcap=kw["softcap"])
    torch.testing.assert_close(out.double(), out_n, atol=1e-5, rtol=1e-5)
    finite = torch.isfinite(lse_n)
    assert torch.equal(torch.isfinite(lse), finite)
    torch.testing.assert_close(lse.double()[finite], lse_n[finite], atol=1e-5, rtol=1e-5)
    assert not torch.isnan(probs).any()


def test_fully_masked_rows_are_zero_with_zero_grads():
    q, k, v, _ = _inputs(1, 6, 3, 2, 2, 4)
    q.requires_grad_(True)
    k.requires_grad_(True)
    v.requires_grad_(True)
    out, _, lse = attention_ref(q, k, v, causal=True)
    # rows 0..2 see no key (bottom-right alignment with Sq > Sk)
    assert torch.all(out[:, :3] == 0)
    assert torch.all(torch.isneginf(lse[:, :, :3]))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[:, :3] == 0)


def test_sink_gradient_matches_formula():
    q, k, v, g = _inputs(1, 5, 6, 2, 1, 4)
    sink = torch.randn(2, generator=g, requires_grad=True)
    out, _, lse = attention_ref(q, k, v, sink=sink, causal=True)
    dout = torch.randn(out.shape, generator=g)
    (out * dout).sum().backward()
    delta = (dout * out).sum(-1).permute(0, 2, 1)  # (B, H, Sq)
    expected = -(torch.exp(sink.detach()[None, :, None] - lse) * delta).sum(dim=(0, 2))
    torch.testing.assert_close(sink.grad, expected, atol=1e-5, rtol=1e-5)


def test_mask_with_sink_tokens():
    m = construct_mask(4, 8, window=(1, 0, 2))
    # row 3 (aligned with key 7) sees keys 6, 7 and sinks 0, 1; row 0 (key 4) sees 3, 4, 0, 1
    assert m[3].nonzero().flatten().tolist() == [0, 1, 6, 7]
    assert m[0].nonzero().flatten().tolist() == [0, 1, 3, 4]
    # sinks never beyond the right bound: Sq > Sk causal, row 0 is aligned with key -2
    m2 = construct_mask(4, 2, causal=True, window=(-1, -1, 2))
    assert m2[0].sum() == 0 and m2[2].nonzero().flatten().tolist() == [0]


def test_lowp_and_reorder_are_close():
    q, k, v, _ = _inputs(1, 16, 16, 2, 2, 8)
    ref, _, _ = attention_ref(q, k, v, causal=True)
    lowp, _, _ = attention_ref(q.half(), k.half(), v.half(), causal=True, upcast=False, reorder_ops=True)
    assert lowp.dtype == torch.float16
    err = (lowp.float() - ref).abs().max().item()
    assert 0 < err < 5e-3


def test_fp8_descale():
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("torch without float8_e4m3fn")
    q, k, v, g = _inputs(2, 5, 7, 4, 2, 8)
    qd, kd, vd = (torch.rand(2, 2, generator=g) + 0.5 for _ in range(3))
    q8, k8, v8 = (t.to(torch.float8_e4m3fn) for t in (q, k, v))
    out, _, _ = attention_ref(q8, k8, v8, q_descale=qd, k_descale=kd, v_descale=vd, causal=True)
    assert out.dtype == torch.bfloat16
    rep = lambda d: d.repeat_interleave(2, dim=1)[:, None, :, None]  # noqa: E731
    expected, _, _ = attention_ref(q8.float() * rep(qd), k8.float() * kd[:, None, :, None],
                                   v8.float() * vd[:, None, :, None], causal=True,
                                   softmax_scale=8 ** -0.5)
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)


def test_varlen_and_padded_match_dense_per_sequence():
    g = torch.Generator().manual_seed(3)
    lens_q, lens_k = [3, 0, 5], [4, 2, 6]
    Hq, Hk, D = 2, 1, 4
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 12], dtype=torch.int32)
    start_q = torch.tensor([0, 4, 6, 13], dtype=torch.int32)  # physical, with gaps
    start_k = torch.tensor([1, 6, 9, 16], dtype=torch.int32)
    q = torch.randn(14, Hq, D, generator=g)
    k = torch.randn(17, Hk, D, generator=g)
    v = torch.randn(17, Hk, D, generator=g)
    slopes = torch.rand(3, Hq, generator=g)
    for padded in (False, True):
        sq_, sk_ = (start_q, start_k) if padded else (cu_q, cu_k)
        out, lse = attention_ref_varlen(q, k, v, cu_q, cu_k, seqstart_q=start_q if padded else None,
                                        seqstart_k=start_k if padded else None, causal=True,
                                        alibi_slopes=slopes)
        for b in range(3):
            q0, k0 = int(sq_[b]), int(sk_[b])
            if lens_q[b] == 0:
                continue
            o_b, _, l_b = attention_ref(q[None, q0:q0 + lens_q[b]], k[None, k0:k0 + lens_k[b]],
                                        v[None, k0:k0 + lens_k[b]], causal=True, alibi_slopes=slopes[b])
            torch.testing.assert_close(out[q0:q0 + lens_q[b]], o_b[0])
            torch.testing.assert_close(lse[:, q0:q0 + lens_q[b]], l_b[0])
        if padded:
            assert torch.all(out[3:4] == 0) and torch.isneginf(lse[:, 3]).all()


def test_paged_gather_and_dmask_helpers():
    g = torch.Generator().manual_seed(5)
    cache_k = torch.randn(6, 4, 1, 3, generator=g)
    cache_v = torch.randn(6, 4, 1, 3, generator=g)
    table = torch.tensor([[5, 2, 0], [1, 3, 4]], dtype=torch.int32)
    k, v, cu = gather_paged_kv(cache_k, cache_v, table, torch.tensor([6, 9], dtype=torch.int32))
    assert cu.tolist() == [0, 6, 15]
    torch.testing.assert_close(k[4:6], cache_k[2, :2])
    torch.testing.assert_close(v[14], cache_v[4, 0])
    s = torch.tensor([0.5, -0.25, 0.0, -0.0])
    assert dropout_mask_from_s_dmask(s).tolist() == [True, False, True, False]


def test_dropout_requires_mask():
    q, k, v, _ = _inputs(1, 2, 2, 1, 1, 4)
    with pytest.raises(ValueError, match="dropout_mask"):
        attention_ref(q, k, v, dropout_p=0.1)


def test_varlen_window_normalised_against_longest_key_sequence():
    # right = 3 >= Sk of sequence 0 (2) but < max Sk (10): it stays a bound, so with Sq = 6 > Sk
    # row 0 of sequence 0 (aligned with key -4) sees nothing
    g = torch.Generator().manual_seed(9)
    cu_q = torch.tensor([0, 6, 9], dtype=torch.int32)
    cu_k = torch.tensor([0, 2, 12], dtype=torch.int32)
    q, k, v = torch.randn(9, 1, 4, generator=g), torch.randn(12, 1, 4, generator=g), torch.randn(12, 1, 4, generator=g)
    out, lse = attention_ref_varlen(q, k, v, cu_q, cu_k, window=(-1, 3, 0))
    assert torch.all(out[0] == 0) and torch.isneginf(lse[0, 0])
    mask = construct_mask(6, 2, window=(-1, 3, 0), window_norm_len=10)
    assert mask.tolist() == [[False, False], [True, False]] + [[True, True]] * 4
    torch.testing.assert_close(out[1], v[0])  # row 1 sees key 0 only
    full, _ = naive_attention(q[None, :6], k[None, :2], v[None, :2], scale=0.5)
    torch.testing.assert_close(out[2:6].double(), full[0, 2:6], atol=1e-6, rtol=1e-6)
