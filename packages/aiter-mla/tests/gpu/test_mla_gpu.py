"""GPU tier: production MLA dims (kv_lora_rank 512 + rope 64), bf16 and fp8, the sweeps of
upstream's op_tests/test_mla.py and triton_tests/test_mla.py (head counts 16/32/64/128 and odd
ones, MTP 1..4, contexts 21..8192, pages 1/16/64, varlen), LSE checked, persistent mode,
block-table forms, grouped RoPE decode, cache ops with fp8, CUDA-graph capture and
torch.compile. Every output is poisoned with NaN before the call.
"""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api, triton_api
from aiter_mla.reference import (
    concat_and_cache_mla_ref,
    decode_grouped_rope_ref,
    fused_qk_rope_cat_and_cache_mla_ref,
    mla_block_table_ref,
    mla_decode_ref,
    mla_prefill_ps_ref,
)
from aiter_mla.testing import assert_close, make_paged_case, nan_like

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

LORA, ROPE = 512, 64
SCALE = 1.0 / (192 ** 0.5)  # what vLLM passes: 1/sqrt(qk_nope + qk_rope)
BF16 = torch.bfloat16
FP8 = torch.float8_e4m3fn
TOL = dict(o=(1.5e-2, 1e-2), lse=(1e-2, 1e-3))


def _check(o, lse, ref_o, ref_lse, o_tol=TOL["o"]):
    assert_close("o", o.float(), ref_o, *o_tol)
    if lse is not None:
        assert_close("lse", lse, ref_lse, *TOL["lse"])


def _decode(case, heads, *, splits=None, q_scale=None, kv_scale=None, causal=True, out_dtype=BF16):
    o = nan_like((case.q.shape[0], heads, LORA), out_dtype, "cuda")
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, case.max_seqlen_q, page_size=case.page_size, sm_scale=SCALE,
                                num_kv_splits=splits, q_scale=q_scale, kv_scale=kv_scale, causal=causal,
                                return_lse=True)
    return o, lse


def _ref(case, causal=True, q_scale=None, kv_scale=None):
    return mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
                          kv_lora_rank=LORA, page_size=case.page_size, sm_scale=SCALE, causal=causal,
                          q_scale=q_scale, kv_scale=kv_scale)


DECODE_SWEEP = [
    # (batch, heads, qlen, ctx, page)
    (1, 16, 1, 21, 1), (3, 16, 2, 64, 16), (5, 16, 4, 256, 64), (16, 128, 1, 512, 64), (32, 128, 2, 1200, 16),
    (4, 32, 1, 3200, 64), (4, 64, 3, 5200, 64), (2, 8, 1, 8192, 64), (3, 20, 2, 1328, 16), (8, 128, 4, 4371, 64),
    (64, 16, 1, 4096, 64), (128, 16, 1, 1024, 64), (1, 1, 1, 777, 1), (2, 48, 2, 333, 1),
]


@pytest.mark.parametrize("batch,heads,qlen,ctx,page", DECODE_SWEEP,
                         ids=[f"b{b}-h{h}-q{q}-ctx{c}-p{p}" for b, h, q, c, p in DECODE_SWEEP])
def test_decode_bf16(batch, heads, qlen, ctx, page):
    case = make_paged_case(batch=batch, heads=heads, kv_lens=ctx, q_lens=qlen, page_size=page, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=batch + heads + ctx, device="cuda")
    o, lse = _decode(case, heads)
    _check(o, lse, *_ref(case))


@pytest.mark.parametrize("splits", [1, 3, 16])
def test_decode_varlen_with_forced_splits(splits):
    gen = torch.Generator().manual_seed(splits)
    lens = torch.clamp(torch.normal(2000.0, 900.0, (12,), generator=gen), 21, 8192).int().tolist()
    lens[3] = 0  # an empty sequence: output 0, LSE -inf
    q_lens = torch.randint(1, 5, (12,), generator=gen).tolist()
    case = make_paged_case(batch=12, heads=16, kv_lens=lens, q_lens=q_lens, page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=splits, device="cuda")
    o, lse = _decode(case, 16, splits=splits)
    _check(o, lse, *_ref(case))


@pytest.mark.parametrize("heads,qlen", [(16, 1), (16, 2), (128, 1), (128, 2), (20, 1)])
def test_decode_fp8_q_and_kv(heads, qlen):
    case = make_paged_case(batch=8, heads=heads, kv_lens=[21, 64, 256, 512, 1200, 3200, 5200, 8192], q_lens=qlen,
                           page_size=64, kv_lora_rank=LORA, rope=ROPE, dtype=torch.float32, seed=heads, device="cuda")
    q_scale = (case.q.abs().max() / 448.0).reshape(1)
    kv_scale = (case.kv.abs().max() / 448.0).reshape(1)
    case.q = (case.q / q_scale).to(FP8)
    case.kv = (case.kv / kv_scale).to(FP8)
    o, lse = _decode(case, heads, q_scale=q_scale, kv_scale=kv_scale)
    # the reference dequantises the same fp8 values: only the bf16 arithmetic differs
    _check(o, lse, *_ref(case, q_scale=q_scale, kv_scale=kv_scale), o_tol=(3e-2, 2e-2))


def test_decode_bf16_q_fp8_kv():
    case = make_paged_case(batch=4, heads=16, kv_lens=[100, 2000, 4096, 33], q_lens=1, page_size=16,
                           kv_lora_rank=LORA, rope=ROPE, dtype=BF16, kv_dtype=torch.float32, seed=9, device="cuda")
    kv_scale = (case.kv.abs().max() / 448.0).reshape(1)
    case.kv = (case.kv / kv_scale).to(FP8)
    o, lse = _decode(case, 16, kv_scale=kv_scale)
    _check(o, lse, *_ref(case, kv_scale=kv_scale), o_tol=(3e-2, 2e-2))


def test_decode_non_causal_mtp():
    case = make_paged_case(batch=4, heads=16, kv_lens=[50, 700, 3000, 9], q_lens=4, page_size=16, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=4, device="cuda")
    o, lse = _decode(case, 16, causal=False)
    _check(o, lse, *_ref(case, causal=False))


@pytest.mark.parametrize("heads,qlen,dtype", [(16, 1, BF16), (128, 1, BF16), (16, 4, BF16), (32, 2, FP8)])
def test_persistent_decode(heads, qlen, dtype):
    batch = 16
    gen = torch.Generator().manual_seed(heads)
    lens = torch.randint(21, 8192, (batch,), generator=gen).tolist()
    case = make_paged_case(batch=batch, heads=heads, kv_lens=lens, q_lens=qlen, page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16 if dtype == BF16 else torch.float32, seed=heads, device="cuda")
    q_scale = kv_scale = None
    if dtype == FP8:  # scales from the absolute maxima: no value outside fp8's range (a cast would give NaN)
        q_scale = (case.q.abs().max() / 448.0).reshape(1)
        kv_scale = (case.kv.abs().max() / 448.0).reshape(1)
        case.q, case.kv = (case.q / q_scale).to(FP8), (case.kv / kv_scale).to(FP8)
    info = api.get_mla_metadata_info_v1(batch, qlen, heads, case.q.dtype, case.kv.dtype, is_sparse=False)
    meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(s, dtype=d, device="cuda") for s, d in info]
    api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info,
                            w_ind, r_ind, r_final, r_part, page_size=64, max_seqlen_qo=qlen)
    o = nan_like((case.q.shape[0], heads, LORA), BF16, "cuda")
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, qlen, page_size=64, sm_scale=SCALE, work_meta_data=meta,
                                work_indptr=w_ind, work_info_set=w_info, reduce_indptr=r_ind, reduce_final_map=r_final,
                                reduce_partial_map=r_part, q_scale=q_scale, kv_scale=kv_scale, return_lse=True)
    _check(o, lse, *_ref(case, q_scale=q_scale, kv_scale=kv_scale), o_tol=(3e-2, 2e-2))


def test_decode_cuda_graph_replay_with_new_inputs():
    heads = 16
    case = make_paged_case(batch=32, heads=heads, kv_lens=2048, q_lens=1, page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=5, device="cuda")
    o = nan_like((case.q.shape[0], heads, LORA), BF16, "cuda")
    lse_box = {}

    def step():
        _, lse_box["lse"] = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                               case.kv_last_page_lens, 1, page_size=64, sm_scale=SCALE,
                                               return_lse=True)

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for seed in (11, 12):
        gen = torch.Generator(device="cuda").manual_seed(seed)
        case.q.copy_(torch.randn(case.q.shape, generator=gen, device="cuda"))
        case.kv.copy_(torch.randn(case.kv.shape, generator=gen, device="cuda"))
        o.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        _check(o, lse_box["lse"], *_ref(case))


def test_decode_under_torch_compile():
    case = make_paged_case(batch=4, heads=16, kv_lens=300, q_lens=2, page_size=16, kv_lora_rank=LORA, rope=ROPE,
                           dtype=BF16, seed=6, device="cuda")

    def step(q, kv, o):
        _, lse = api.mla_decode_fwd(q, kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                    case.kv_last_page_lens, 2, page_size=16, sm_scale=SCALE, return_lse=True)
        return lse

    o = nan_like((case.q.shape[0], 16, LORA), BF16, "cuda")
    lse = torch.compile(step, fullgraph=True)(case.q, case.kv, o)
    _check(o, lse, *_ref(case))


def test_prefill_absorbed_and_block_table_forms():
    case = make_paged_case(batch=2, heads=16, kv_lens=[200, 1500], q_lens=[200, 64], page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=7, device="cuda")
    o = nan_like((case.q.shape[0], 16, LORA), BF16, "cuda")
    _, lse = api.mla_prefill_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                 case.kv_last_page_lens, case.max_seqlen_q, sm_scale=SCALE)
    _check(o, lse, *_ref(case))
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32, device="cuda")
    out = nan_like(o.shape, BF16, "cuda")
    triton_api.mla_prefill_fwd(case.q, case.kv, out, case.qo_indptr, seqused, 1500, case.block_tables, SCALE, LORA,
                               ROPE, True, None, None)
    ref_o, _ = mla_block_table_ref(case.q, case.kv, case.qo_indptr, seqused, case.block_tables, kv_lora_rank=LORA,
                                   sm_scale=SCALE)
    assert_close("out", out.float(), ref_o, *TOL["o"])


@pytest.mark.parametrize("batch,qlen,ctx,heads", [(1, 1, 1328, 16), (4, 3, 4371, 128), (32, 1, 1328, 16)])
def test_block_table_decode(batch, qlen, ctx, heads):
    case = make_paged_case(batch=batch, heads=heads, kv_lens=ctx, q_lens=qlen, page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=batch, device="cuda")
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32, device="cuda")
    out = nan_like((case.q.shape[0], heads, LORA), BF16, "cuda")
    triton_api.mla_decode_fwd(case.q, case.kv, out, case.qo_indptr, seqused, ctx, case.block_tables, SCALE, LORA, ROPE,
                              True, None, None, max_seqlen_q=qlen)
    ref_o, _ = mla_block_table_ref(case.q, case.kv, case.qo_indptr, seqused, case.block_tables, kv_lora_rank=LORA,
                                   sm_scale=SCALE)
    assert_close("out", out.float(), ref_o, *TOL["o"])


def test_prefill_ps_non_absorbed_bf16():
    gen = torch.Generator(device="cuda").manual_seed(0)
    heads, q_lens, kv_lens = 16, [512, 100], [512, 900]
    q = torch.randn(sum(q_lens), heads, 192, generator=gen, device="cuda").to(BF16)
    k = torch.randn(sum(kv_lens), heads, 192, generator=gen, device="cuda").to(BF16)
    v = torch.randn(sum(kv_lens), heads, 128, generator=gen, device="cuda").to(BF16)
    qo = torch.tensor([0, 512, 612], dtype=torch.int32, device="cuda")
    kvp = torch.tensor([0, 512, 1412], dtype=torch.int32, device="cuda")
    idx = torch.arange(sum(kv_lens), dtype=torch.int32, device="cuda")
    out = nan_like((sum(q_lens), heads, 128), BF16, "cuda")
    _, lse = api.mla_prefill_ps_fwd(q, k, v, out, qo, kvp, idx, None, None, 512, True)
    _check(out, lse, *mla_prefill_ps_ref(q, k, v, qo, kvp, idx, is_causal=True))


@pytest.mark.parametrize("use_rope,neox", [(False, False), (True, False), (True, True)])
def test_grouped_rope_decode(use_rope, neox):
    batch, heads, splits = 8, 128, 4
    gen = torch.Generator(device="cuda").manual_seed(1)
    lens = [2048] * batch
    tokens = sum(lens) + 7
    k_buffer = torch.randn(tokens, 1, LORA + ROPE, generator=gen, device="cuda").to(BF16)
    kv_indptr = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    kv_indices = torch.randperm(tokens, device="cuda")[: sum(lens)].int()
    q = torch.randn(batch, heads, LORA + ROPE, generator=gen, device="cuda").to(BF16)
    cos_sin = torch.randn(4096, 64, generator=gen, device="cuda")
    positions = torch.randint(0, 4096, (batch,), device="cuda")
    o = nan_like((batch, heads, LORA), BF16, "cuda")
    logits = nan_like((batch, heads, splits, LORA + 1), torch.float32, "cuda")
    k_pe = nan_like((batch, 1, ROPE), BF16, "cuda")
    api.decode_attention_fwd_grouped_rope(q, k_buffer, k_buffer[..., :LORA], o, kv_indptr, kv_indices, k_pe,
                                                 LORA, 64, cos_sin, positions, logits, splits, SCALE,
                                                 use_rope=use_rope, is_neox_style=neox)
    ref_o, _, ref_kpe = decode_grouped_rope_ref(q, k_buffer, k_buffer[..., :LORA], kv_indptr, kv_indices,
                                                kv_lora_rank=LORA, rotary_dim=64, sm_scale=SCALE, use_rope=use_rope,
                                                is_neox_style=neox, cos_sin_cache=cos_sin, positions=positions)
    assert_close("o", o.float(), ref_o, *TOL["o"])
    if use_rope:
        assert_close("k_pe", k_pe.float()[:, 0], ref_kpe[:, 0], 1e-2, 1e-2)


@pytest.mark.parametrize("cache_dtype", [BF16, FP8])
def test_cache_ops_production_dims(cache_dtype):
    gen = torch.Generator(device="cuda").manual_seed(2)
    tokens, blocks, bs = 300, 16, 64
    kv_c = torch.randn(tokens, LORA, generator=gen, device="cuda").to(BF16)
    k_pe = torch.randn(tokens, ROPE, generator=gen, device="cuda").to(BF16)
    cache = torch.randn(blocks, bs, LORA + ROPE, generator=gen, device="cuda").to(cache_dtype)
    before = cache.clone()
    slots = torch.randperm(blocks * bs, device="cuda")[:tokens]
    slots[::7] = -1
    scale = torch.tensor([0.05], device="cuda")
    api.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8" if cache_dtype == FP8 else "auto", scale)
    ref = concat_and_cache_mla_ref(kv_c, k_pe, before, slots, scale)
    fp8 = cache_dtype == FP8
    # fp8: one ulp for a rounding-boundary flip (12.5% relative, 2^-9 absolute among subnormals)
    assert_close("kv_cache", cache.float(), ref.float(), 2e-3 if fp8 else 0.0, 0.13 if fp8 else 0.0)

    q_nope = torch.randn(tokens, 16, LORA, generator=gen, device="cuda").to(BF16)
    q_pe = torch.randn(tokens, 16, ROPE, generator=gen, device="cuda").to(BF16)
    cos = torch.randn(8192, ROPE // 2, generator=gen, device="cuda")
    sin = torch.randn(8192, ROPE // 2, generator=gen, device="cuda")
    pos = torch.randint(0, 8192, (tokens,), device="cuda")
    cache2 = torch.randn(blocks * bs, 1, LORA + ROPE, generator=gen, device="cuda").to(cache_dtype)
    before2 = cache2.clone()
    q_out, _, k_pe_out, _ = api.fused_qk_rope_cat_and_cache_mla(
        q_nope, q_pe, kv_c[:, None], k_pe[:, None], cache2, slots, pos, cos, sin, scale, is_neox=False)
    ref_q, ref_kpe, ref_cache = fused_qk_rope_cat_and_cache_mla_ref(q_nope, q_pe, kv_c[:, None], k_pe[:, None],
                                                                   before2, slots, pos, cos, sin, scale, False)
    assert_close("q_out", q_out.float(), ref_q.float(), 2e-2, 1e-2)
    assert_close("k_pe_out", k_pe_out.float(), ref_kpe.float(), 2e-2, 1e-2)
    assert_close("kv_cache (fused)", cache2.float(), ref_cache.float(), 2e-2, 0.13 if fp8 else 1e-2)


@pytest.mark.parametrize("mla,heads,kv_heads,d_k,d_v,page", [(True, 128, 1, 576, 512, 1), (True, 16, 1, 576, 512, 64),
                                                             (False, 32, 8, 128, 128, 16)])
def test_sglang_decode_attention_fwd(mla, heads, kv_heads, d_k, d_v, page):
    from aiter_mla.reference import decode_paged_ref

    gen = torch.Generator(device="cuda").manual_seed(heads)
    lens = [1, 57, 1024, 4097]
    pages_per_req = -(-max(lens) // page)
    tokens = page * (pages_per_req * len(lens) + 3)
    k_buffer = torch.randn(tokens, kv_heads, d_k, generator=gen, device="cuda").to(BF16)
    v_buffer = k_buffer[..., :d_v] if mla else torch.randn(tokens, kv_heads, d_v, generator=gen, device="cuda").to(BF16)
    req_to_token = torch.randperm(tokens // page, device="cuda")[: len(lens) * pages_per_req].view(len(lens), -1).int()
    b_seq_len = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(len(lens), heads, d_k, generator=gen, device="cuda").to(BF16)
    o = nan_like((len(lens), heads, d_v), BF16, "cuda")
    lse = nan_like((len(lens), heads), torch.float32, "cuda")
    logits = nan_like((len(lens), heads, 8, d_v + 1), torch.float32, "cuda")
    api.decode_attention_fwd(q, k_buffer, v_buffer, o, lse, req_to_token, b_seq_len, logits, 8, d_k ** -0.5,
                                    page_size=page)
    ref_o, ref_lse = decode_paged_ref(q, k_buffer, v_buffer, req_to_token, b_seq_len, page_size=page,
                                      sm_scale=d_k ** -0.5)
    _check(o, lse, ref_o, ref_lse)


@pytest.mark.parametrize("splits", [1, 4])
def test_decode_on_a_pool_past_2_31_elements(splits):
    """A KV pool of more than 2**31 elements (4.3 GB bf16) gets int64 address arithmetic; the
    sequences' pages sit at its far end, where int32 offsets would wrap."""
    from dataclasses import replace

    from aiter_core.triton_attn import max_element_offset

    case = make_paged_case(batch=3, heads=16, kv_lens=[700, 64, 5], q_lens=1, page_size=64, kv_lora_rank=LORA,
                           rope=ROPE, dtype=BF16, seed=4)
    ref_o, ref_lse = _ref(case)
    per_page = case.kv[0].numel()
    shift = (2**31 + per_page - 1) // per_page
    pool = torch.empty((shift + case.kv.shape[0],) + tuple(case.kv.shape[1:]), dtype=BF16, device="cuda")
    pool[shift:] = case.kv
    assert max_element_offset(pool) >= 2**31
    far = replace(case, kv=pool, kv_indices=case.kv_indices + shift)
    o, lse = _decode(far, 16, splits=splits)
    _check(o, lse, ref_o, ref_lse)
    del pool, far
    torch.cuda.empty_cache()


@pytest.mark.parametrize("seq_len", [2048, 2050, 2049, 1000])
@pytest.mark.parametrize("neox", [True, False])
def test_grouped_rope_partials_upstream_shape_bf16(seq_len, neox):
    """Issue 18: AITER's test_op_fwd_rope at its shape (B=1, H=128, kv_lora_rank 512, rope 127,
    rotary 64, 2 splits, sm_scale 1.0, bf16, position S): ``attn_logits`` holds upstream's split
    partition (cdiv(len, 2)), so its partials match a reference split the same way."""
    from aiter_mla.reference import decode_grouped_rope_partials_ref

    torch.manual_seed(seq_len)
    heads, lora, rope, rotary, splits = 128, 512, 127, 64, 2
    q = torch.randn(1, heads, lora + rope, device="cuda", dtype=BF16)
    k_buffer = torch.randn(seq_len, 1, lora + rope, device="cuda", dtype=BF16)
    kv_indptr = torch.tensor([0, seq_len], dtype=torch.int32, device="cuda")
    kv_indices = torch.arange(seq_len, dtype=torch.int32, device="cuda")
    inv = 1.0 / (10 ** (torch.arange(0, rotary, 2, device="cuda").float() / rotary))
    freqs = torch.arange(16324, device="cuda").float()[:, None] * inv[None, :]
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(BF16)
    positions = torch.tensor([seq_len], device="cuda")
    attn_logits = nan_like((1, heads, splits, lora + 1), torch.float32, "cuda")
    k_pe_tokens = nan_like((1, rope), BF16, "cuda")
    o = nan_like((1, heads, lora), BF16, "cuda")
    api.decode_attention_fwd_grouped_rope(q, k_buffer, k_buffer[..., :lora], o, kv_indptr, kv_indices, k_pe_tokens,
                                          lora, rotary, cos_sin, positions, attn_logits, splits, 1.0, use_rope=True,
                                          is_neox_style=neox)
    ref_po, ref_pl = decode_grouped_rope_partials_ref(
        q, k_buffer, k_buffer[..., :lora], kv_indptr, kv_indices, kv_lora_rank=lora, rotary_dim=rotary, splits=splits,
        sm_scale=1.0, cos_sin_cache=cos_sin, positions=positions, is_neox_style=neox, round_to=BF16)
    bad = ((attn_logits[..., :lora].float() - ref_po).abs() > 1e-2 + 1e-2 * ref_po.abs()).float().mean().item()
    assert bad < 1e-3, f"{bad:.2%} of the partial outputs differ (upstream's tolerance 1e-2)"
    assert_close("partial lse", attn_logits[..., lora].float(), ref_pl, 0.5, 1e-2)
