"""The PyTorch reference against an independent dense formulation (SDPA with an explicit additive
mask), plus the sink and descale algebra."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from aiter_unified.reference import gather_paged_kv, unified_attention_ref
from aiter_unified.testing import make_batch


def _dense_expected(b, scale, window_left, alibi, qq):
    """One SDPA call per sequence, the mask and biases built as a dense additive matrix."""
    hq, hk = b.q.shape[1], b.k.shape[2]
    out = torch.empty(b.q.shape, dtype=torch.float32)
    cu = b.cu_seqlens_q.tolist()
    for s in range(len(cu) - 1):
        qlen, kv = cu[s + 1] - cu[s], int(b.seqused_k[s])
        ctx = kv - qlen
        k = gather_paged_kv(b.k, b.block_table[s], kv)
        v = gather_paged_kv(b.v, b.block_table[s], kv)
        bias = torch.zeros(hq, qlen, kv)
        for i in range(qlen):
            for j in range(kv):
                visible = j <= ctx + i and (window_left < 0 or ctx + i - j <= window_left)
                if not visible:
                    bias[:, i, j] = float("-inf")
                    continue
                bias[:, i, j] += alibi * (j - ctx)
                if j >= ctx:
                    bias[:, i, j] += qq[i, j - ctx]
        q = b.q[cu[s]:cu[s + 1]].float().transpose(0, 1)
        kk = k.transpose(0, 1).repeat_interleave(hq // hk, 0)
        vv = v.transpose(0, 1).repeat_interleave(hq // hk, 0)
        out[cu[s]:cu[s + 1]] = F.scaled_dot_product_attention(q, kk, vv, attn_mask=bias, scale=scale).transpose(0, 1)
    return out


def test_reference_matches_dense_sdpa_with_window_alibi_qq_bias():
    b = make_batch([(1, 9), (4, 11), (3, 3)], heads_q=4, heads_kv=2, head_dim=16, block_size=4, dtype=torch.float32,
                   seed=1)
    alibi = torch.rand(4)
    qq = torch.randn(6, 6)
    for window_left in (-1, 2):
        got = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.3,
                                    window_size=(window_left, 0), alibi_slopes=alibi, qq_bias=qq)
        want = _dense_expected(b, 0.3, window_left, alibi, qq)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_reference_sinks_descales_and_output_scale():
    b = make_batch([(2, 7), (1, 5)], heads_q=2, heads_kv=1, head_dim=8, block_size=4, dtype=torch.float32, seed=2)
    plain = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.5)
    # a sink of -inf changes nothing; a huge one takes all the mass (the output goes to 0)
    none = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.5,
                                 sinks=torch.full((2,), float("-inf")))
    torch.testing.assert_close(none, plain)
    huge = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.5,
                                 sinks=torch.full((2,), 80.0))
    assert huge.abs().max() < 1e-20
    # scale * q_descale * k_descale is the effective scale; v_descale / output_scale scale the output
    scaled = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.25,
                                   q_descale=torch.tensor([4.0]), k_descale=torch.tensor([0.5]),
                                   v_descale=torch.tensor([3.0]), output_scale=torch.tensor([2.0]))
    torch.testing.assert_close(scaled, plain * 1.5)
    # softcap after scaling: a tiny cap flattens the scores towards a uniform average of v
    capped = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.5, softcap=1e-6)
    v_seq1 = gather_paged_kv(b.v, b.block_table[1], 5)  # the decode token sees all 5 keys
    torch.testing.assert_close(capped[2], v_seq1.mean(0).expand(2, 8), atol=1e-4, rtol=1e-4)
