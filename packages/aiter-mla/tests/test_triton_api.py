"""Block-table MLA forms, the SGLang grouped decode with in-kernel RoPE, and the non-absorbed
prefill (``mla_prefill_ps_fwd``) against the PyTorch references (tier 2, tiny shapes)."""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api, triton_api
from aiter_mla.reference import (
    decode_grouped_rope_partials_ref,
    decode_grouped_rope_ref,
    mla_block_table_ref,
    mla_prefill_ps_ref,
)
from aiter_mla.testing import CUDA, DEVICE, INTERPRET, assert_close, make_paged_case, nan_like

pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton kernels need TRITON_INTERPRET=1 or a GPU")

LORA, ROPE = 64, 16
DTYPE = torch.float16 if CUDA else torch.float32
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


@pytest.mark.parametrize("decode,q_lens,heads,block", [
    (True, 1, 16, 16), (True, [1, 3, 2], 7, 8), (False, [30, 12, 1], 4, 16),
])
def test_block_table_forms_match_reference(decode, q_lens, heads, block):
    case = make_paged_case(batch=3, heads=heads, kv_lens=[45, 12, 66], q_lens=q_lens, page_size=block,
                           kv_lora_rank=LORA, rope=ROPE, dtype=DTYPE, seed=heads)
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32, device=DEVICE)
    tables = case.block_tables
    out = nan_like((case.q.shape[0], heads, LORA), DTYPE)
    fn = triton_api.mla_decode_fwd if decode else triton_api.mla_prefill_fwd
    extra = dict(num_kv_splits=3) if decode else {}
    result = fn(case.q, case.kv, out, case.qo_indptr, seqused, max(case.kv_lens), tables, 0.2, LORA, ROPE, True, None,
                None, backend="triton", **extra)
    assert result is out
    ref_o, _ = mla_block_table_ref(case.q, case.kv, case.qo_indptr, seqused, tables, kv_lora_rank=LORA, sm_scale=0.2)
    assert_close("out", out, ref_o, TOL[DTYPE], 1e-3)


def _grouped_case(batch, heads, lens, rope, seed):
    gen = torch.Generator().manual_seed(seed)
    tokens = sum(lens) + 5
    dim = LORA + rope
    k_buffer = torch.randn(tokens, 1, dim, generator=gen).to(DEVICE, DTYPE)
    v_buffer = k_buffer[..., :LORA]
    perm = torch.randperm(tokens, generator=gen)[: sum(lens)].to(torch.int32).to(DEVICE)
    kv_indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    q = torch.randn(batch, heads, dim, generator=gen).to(DEVICE, DTYPE)
    return q, k_buffer, v_buffer, kv_indptr, perm


@pytest.mark.parametrize("use_rope,neox,rotary,separate_v,logit_cap", [
    (False, False, 16, False, 0.0), (True, True, 16, False, 0.0), (True, False, 8, True, 0.0),
    (False, False, 16, True, 5.0),
])
def test_grouped_rope_decode_matches_reference(use_rope, neox, rotary, separate_v, logit_cap):
    batch, heads, splits = 3, 5, 3
    q, k_buffer, v_buffer, kv_indptr, kv_indices = _grouped_case(batch, heads, [20, 7, 41], ROPE, seed=rotary)
    if separate_v:  # a V buffer with its own storage: read through its own strides
        v_buffer = (v_buffer * 1.5).contiguous()
    gen = torch.Generator().manual_seed(4)
    cos_sin = torch.randn(64, rotary, generator=gen).to(DEVICE, torch.float32)
    positions = torch.tensor([3, 60, 17], dtype=torch.int64, device=DEVICE)
    k_pe_tokens = nan_like((batch, 1, ROPE), torch.float32)
    attn_logits = nan_like((batch, heads, splits, LORA + 1), torch.float32)
    o = nan_like((batch, heads, LORA), DTYPE)
    k_before = k_buffer.clone()
    api.decode_attention_fwd_grouped_rope(
        q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens if use_rope else None, LORA, rotary,
        cos_sin if use_rope else None, positions if use_rope else None, attn_logits, splits, 0.25, logit_cap=logit_cap,
        use_rope=use_rope, is_neox_style=neox, backend="triton")
    ref_o, ref_lse, ref_kpe = decode_grouped_rope_ref(
        q, k_buffer, v_buffer, kv_indptr, kv_indices, kv_lora_rank=LORA, rotary_dim=rotary, sm_scale=0.25,
        logit_cap=logit_cap, use_rope=use_rope, is_neox_style=neox, cos_sin_cache=cos_sin, positions=positions)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert torch.equal(k_buffer, k_before), "the cache must not be modified"
    # the partials merge back to the LSE of the whole sequence
    lse_parts = attn_logits[..., LORA]
    merged = torch.logsumexp(lse_parts, dim=-1)
    assert_close("lse (merged partials)", merged, ref_lse, 1e-4, 1e-4)
    if use_rope:
        assert_close("k_pe_tokens", k_pe_tokens[:, 0], ref_kpe[:, 0], TOL[DTYPE], 1e-3)


@pytest.mark.parametrize("heads,kv_heads,causal,dims", [(4, 4, True, (48, 32)), (6, 2, False, (40, 24)),
                                                        (3, 1, True, (96, 64))])
def test_prefill_ps_non_absorbed_matches_reference(heads, kv_heads, causal, dims):
    gen = torch.Generator().manual_seed(heads)
    d_qk, d_v = dims
    q_lens, kv_lens = [17, 5, 33], [17, 40, 33]
    tokens = sum(kv_lens) + 4
    q = torch.randn(sum(q_lens), heads, d_qk, generator=gen).to(DEVICE, DTYPE)
    k = torch.randn(tokens, kv_heads, d_qk, generator=gen).to(DEVICE, DTYPE)
    v = torch.randn(tokens, kv_heads, d_v, generator=gen).to(DEVICE, DTYPE)
    qo = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    kvp = torch.tensor([0] + torch.tensor(kv_lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    idx = torch.randperm(tokens, generator=gen)[: sum(kv_lens)].to(torch.int32).to(DEVICE)
    out = nan_like((sum(q_lens), heads, d_v), DTYPE)
    _, lse = api.mla_prefill_ps_fwd(q, k, v, out, qo, kvp, idx, None, None, max(q_lens), causal, softmax_scale=0.15,
                                    backend="triton")
    ref_o, ref_lse = mla_prefill_ps_ref(q, k, v, qo, kvp, idx, is_causal=causal, softmax_scale=0.15)
    assert_close("output", out, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)


@pytest.mark.parametrize("mla,heads,kv_heads,dims,page,lse_channel,logit_cap,fp8", [
    (True, 5, 1, (80, 64), 1, True, 0.0, False),
    (False, 6, 2, (48, 32), 4, False, 7.0, False),
    (False, 4, 4, (64, 40), 2, True, 0.0, True),
])
def test_sglang_decode_attention_fwd(mla, heads, kv_heads, dims, page, lse_channel, logit_cap, fp8):
    from aiter_mla.reference import decode_paged_ref

    gen = torch.Generator().manual_seed(heads)
    d_k, d_v = dims
    lens = [37, 0, 22]
    pages_per_req = -(-max(lens) // page) + 1
    tokens = page * (pages_per_req * len(lens) + 2)
    k_buffer = torch.randn(tokens, kv_heads, d_k, generator=gen).to(DEVICE, DTYPE)
    v_buffer = k_buffer[..., :d_v] if mla else torch.randn(tokens, kv_heads, d_v, generator=gen).to(DEVICE, DTYPE)
    k_scale = v_scale = None
    if fp8:
        k_scale, v_scale = torch.tensor([0.05], device=DEVICE), torch.tensor([0.03], device=DEVICE)
        k_buffer = (k_buffer.float() / k_scale).to(torch.float8_e4m3fn)
        v_buffer = (v_buffer.float() / v_scale).to(torch.float8_e4m3fn)
    req_to_token = torch.randperm(tokens // page, generator=gen)[: len(lens) * pages_per_req].view(len(lens), -1)
    req_to_token = req_to_token.to(torch.int32).to(DEVICE)
    b_seq_len = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    q = torch.randn(len(lens), heads, d_k, generator=gen).to(DEVICE, DTYPE)
    splits = 3
    o = nan_like((len(lens), heads, d_v), DTYPE)
    lse = nan_like((len(lens), heads), torch.float32)
    logits = nan_like((len(lens), heads, splits, d_v + (1 if lse_channel else 0)), torch.float32)
    api.decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, logits, splits, 0.2,
                                    page_size=page, logit_cap=logit_cap, k_scale=k_scale, v_scale=v_scale,
                                    backend="triton")
    ref_o, ref_lse = decode_paged_ref(q, k_buffer, v_buffer, req_to_token, b_seq_len, page_size=page, sm_scale=0.2,
                                      logit_cap=logit_cap, k_scale=k_scale, v_scale=v_scale)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)
    if lse_channel:
        assert_close("merged split LSEs", torch.logsumexp(logits[..., d_v], -1), ref_lse, 1e-4, 1e-4)


@pytest.mark.parametrize("neox", [True, False])
def test_grouped_rope_decode_split_partials_match_upstream_partition(neox):
    """Issue 18: AITER's test_op_fwd_rope (rope width 127, rotary 64, S=2050) compares the split
    partials ``attn_logits`` themselves. Upstream splits a sequence at ``cdiv(len, splits)``;
    splits aligned to the key tile gave other partials whenever that was not a multiple of the
    tile (the ragged tail). Rope width 127 (not a power of two), lengths not multiples of any tile."""
    lora, rope, rotary, splits, heads = 32, 127, 64, 2, 4
    lens = [37, 50, 5]
    q, k_buffer, v_buffer, kv_indptr, kv_indices = _grouped_case(len(lens), heads, lens, rope, seed=127)
    gen = torch.Generator().manual_seed(5)
    k_buffer = torch.randn(k_buffer.shape[0], 1, lora + rope, generator=gen).to(DEVICE, DTYPE)
    v_buffer = k_buffer[..., :lora]
    q = torch.randn(len(lens), heads, lora + rope, generator=gen).to(DEVICE, DTYPE)
    cos_sin = torch.randn(64, rotary, generator=gen).to(DEVICE, DTYPE)
    positions = torch.tensor([50, 37, 3], dtype=torch.int64, device=DEVICE)
    attn_logits = nan_like((len(lens), heads, splits, lora + 1), torch.float32)
    k_pe_tokens = nan_like((len(lens), rope), DTYPE)
    o = nan_like((len(lens), heads, lora), DTYPE)
    api.decode_attention_fwd_grouped_rope(q, k_buffer, v_buffer, o, kv_indptr, kv_indices, k_pe_tokens, lora, rotary,
                                          cos_sin, positions, attn_logits, splits, 0.3, use_rope=True,
                                          is_neox_style=neox, backend="triton")
    ref_po, ref_pl = decode_grouped_rope_partials_ref(
        q.cpu(), k_buffer.cpu(), v_buffer.cpu(), kv_indptr.cpu(), kv_indices.cpu(), kv_lora_rank=lora,
        rotary_dim=rotary, splits=splits, sm_scale=0.3, cos_sin_cache=cos_sin.cpu(), positions=positions.cpu(),
        is_neox_style=neox)
    filled = ~torch.isnan(ref_pl)
    assert bool(filled.all()), "every split of these lengths holds keys"
    assert_close("attn_logits partial o", attn_logits[..., :lora].cpu(), ref_po, TOL[DTYPE], 1e-3)
    assert_close("attn_logits partial lse", attn_logits[..., lora].cpu(), ref_pl, TOL[DTYPE], 1e-3)
