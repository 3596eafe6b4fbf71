"""mla_decode_fwd / mla_prefill_fwd / persistent mode against the PyTorch reference.

Tier 2: under TRITON_INTERPRET=1 on tiny shapes (kv_lora_rank 64 + rope 16) in fp32/fp16; on a
GPU (without the interpreter) the same cases run in fp16. The production dims (512 + 64, bf16,
fp8) are in tests/gpu/.
"""

from __future__ import annotations

import pytest
import torch

import aiter_mla
from aiter_mla import api
from aiter_mla.reference import mla_decode_ref
from aiter_mla.testing import CUDA, DEVICE, INTERPRET, assert_close, make_paged_case, nan_like

pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton kernels need TRITON_INTERPRET=1 or a GPU")

LORA, ROPE = 64, 16
DTYPE = torch.float16 if CUDA else torch.float32
TOL = {torch.float32: 2e-5, torch.float16: 4e-3}


def _run_decode(case, heads, dtype, *, num_kv_splits=None, causal=True, return_lse=True, q_scale=None,
                kv_scale=None, backend="triton"):
    o = nan_like((case.q.shape[0], heads, LORA), torch.float32 if dtype not in (torch.float16,) else dtype)
    logits, lse = api.mla_decode_fwd(
        case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
        case.max_seqlen_q, page_size=case.page_size, sm_scale=0.3, num_kv_splits=num_kv_splits, causal=causal,
        return_lse=return_lse, q_scale=q_scale, kv_scale=kv_scale, backend=backend)
    return o, logits, lse


def _reference(case, causal=True, q_scale=None, kv_scale=None):
    return mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices,
                          case.kv_last_page_lens, kv_lora_rank=LORA, page_size=case.page_size, sm_scale=0.3,
                          causal=causal, q_scale=q_scale, kv_scale=kv_scale)


@pytest.mark.parametrize("heads,qlen,page,splits", [
    (16, 1, 1, None), (8, 1, 16, 2), (20, 2, 4, 3), (5, 4, 16, 1), (3, 3, 1, 4), (32, 1, 64, 2),
])
def test_decode_matches_reference(heads, qlen, page, splits):
    case = make_paged_case(batch=3, heads=heads, kv_lens=[21, 70, 5], q_lens=qlen, page_size=page,
                           kv_lora_rank=LORA, rope=ROPE, dtype=DTYPE, seed=heads * 10 + qlen)
    o, logits, lse = _run_decode(case, heads, DTYPE, num_kv_splits=splits)
    ref_o, ref_lse = _reference(case)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)
    if splits and splits > 1:
        assert logits.shape == (case.q.shape[0], splits, heads, LORA)
    else:
        assert logits.data_ptr() == o.data_ptr()


def test_decode_varlen_noncausal_and_empty_sequence():
    """Varlen MTP queries (1..4 tokens), a sequence with no KV (output 0, LSE -inf), causal off."""
    case = make_paged_case(batch=4, heads=6, kv_lens=[33, 0, 9, 60], q_lens=[1, 3, 4, 2], page_size=8,
                           kv_lora_rank=LORA, rope=ROPE, dtype=DTYPE, seed=7)
    for causal in (True, False):
        o, _, lse = _run_decode(case, 6, DTYPE, num_kv_splits=3, causal=causal)
        ref_o, ref_lse = _reference(case, causal=causal)
        assert_close(f"o causal={causal}", o, ref_o, TOL[DTYPE], 1e-3)
        assert_close(f"lse causal={causal}", lse, ref_lse, TOL[DTYPE], 1e-4)
    assert torch.isneginf(lse[1:4]).all() and (o[1:4] == 0).all()


def test_decode_causal_mtp_query_sees_fewer_keys_than_kv():
    """qlen > kv_len - ...: the first MTP tokens see only the first keys (bottom-right diagonal)."""
    case = make_paged_case(batch=2, heads=4, kv_lens=[3, 2], q_lens=[4, 4], page_size=1, kv_lora_rank=LORA,
                           rope=ROPE, dtype=DTYPE, seed=3)
    o, _, lse = _run_decode(case, 4, DTYPE, num_kv_splits=2)
    ref_o, ref_lse = _reference(case)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)


@pytest.mark.skipif(not CUDA and not INTERPRET, reason="needs Triton")
def test_decode_fp8_kv_and_q_with_scales():
    case = make_paged_case(batch=2, heads=16, kv_lens=[40, 17], q_lens=1, page_size=16, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=11)
    fp8 = torch.float8_e4m3fn
    q8, kv8 = (case.q / 0.5).to(fp8), (case.kv / 0.25).to(fp8)
    q_scale = torch.tensor([0.5], device=DEVICE)
    kv_scale = torch.tensor([0.25], device=DEVICE)
    case.q, case.kv = q8, kv8
    o = nan_like((case.q.shape[0], 16, LORA), torch.float16 if CUDA else torch.float32)
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, 1, page_size=16, sm_scale=0.3, num_kv_splits=2,
                                q_scale=q_scale, kv_scale=kv_scale, return_lse=True, backend="triton")
    ref_o, ref_lse = _reference(case, q_scale=q_scale, kv_scale=kv_scale)
    # the kernel sees the same fp8 values as the reference: only accumulation order differs
    assert_close("o", o, ref_o, 1.5e-2 if CUDA else 2e-5, 1e-2 if CUDA else 1e-3)
    assert_close("lse", lse, ref_lse, 1e-2 if CUDA else 2e-5, 1e-3 if CUDA else 1e-4)


def test_auto_split_count_is_deterministic_and_bounded():
    for batch, kv, heads in ((1, 8192, 16), (128, 4096, 16), (128, 4096, 128), (3, 21, 8)):
        s = aiter_mla.choose_num_kv_splits(batch, batch * kv, heads, 1, torch.bfloat16)
        assert 1 <= s <= 16
        assert s == aiter_mla.choose_num_kv_splits(batch, batch * kv, heads, 1, torch.bfloat16)
    # a single long sequence must be split to use the machine; a short one must not
    assert aiter_mla.choose_num_kv_splits(1, 8192, 16, 1, torch.bfloat16) > 1
    assert aiter_mla.choose_num_kv_splits(1, 16, 16, 1, torch.bfloat16) == 1


def test_prefill_absorbed_matches_reference():
    case = make_paged_case(batch=2, heads=4, kv_lens=[50, 23], q_lens=[50, 9], page_size=16, kv_lora_rank=LORA,
                           rope=ROPE, dtype=DTYPE, seed=5)
    o = nan_like((case.q.shape[0], 4, LORA), DTYPE)
    out, lse = api.mla_prefill_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                   case.kv_last_page_lens, case.max_seqlen_q, sm_scale=0.3, backend="triton")
    ref_o, ref_lse = _reference(case)
    assert out is o
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)


@pytest.mark.parametrize("heads,qlen,page", [(16, 1, 4), (20, 2, 1), (130, 1, 16)])
def test_persistent_decode_matches_reference(heads, qlen, page):
    batch = 3
    kv_lens = [600, 7, 90]
    case = make_paged_case(batch=batch, heads=heads, kv_lens=kv_lens, q_lens=qlen, page_size=page,
                           kv_lora_rank=LORA, rope=ROPE, dtype=DTYPE, seed=heads + qlen)
    info = api.get_mla_metadata_info_v1(batch, qlen, heads, DTYPE, DTYPE, is_sparse=False, max_split_per_batch=8)
    bufs = [torch.empty(shape, dtype=dt, device=DEVICE) for shape, dt in info]
    work_meta, work_indptr, work_info, reduce_indptr, reduce_final, reduce_partial = bufs
    api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, work_meta,
                            work_info, work_indptr, reduce_indptr, reduce_final, reduce_partial, page_size=page,
                            max_seqlen_qo=qlen, max_split_per_batch=8)
    # the long sequence is split (its partials go through the reduce), and every item is in range
    assert int(reduce_indptr[-1]) > 0
    used = work_info[: int(work_indptr[-1])]
    assert (used[:, 0] >= 0).all() and (used[:, 0] < batch).all()
    o = nan_like((case.q.shape[0], heads, LORA), DTYPE)
    logits, lse = api.mla_decode_fwd(
        case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens, qlen,
        page_size=page, sm_scale=0.3, work_meta_data=work_meta, work_indptr=work_indptr, work_info_set=work_info,
        reduce_indptr=reduce_indptr, reduce_final_map=reduce_final, reduce_partial_map=reduce_partial,
        return_lse=True, backend="triton")
    ref_o, ref_lse = _reference(case)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)
    assert logits.shape == (reduce_partial.numel() * qlen, 1, heads, LORA)
    # the reference backend runs the same work list
    o_ref_backend = nan_like(o.shape, DTYPE)
    api.mla_decode_fwd(
        case.q, case.kv, o_ref_backend, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
        qlen, page_size=page, sm_scale=0.3, work_meta_data=work_meta, work_indptr=work_indptr,
        work_info_set=work_info, reduce_indptr=reduce_indptr, reduce_final_map=reduce_final,
        reduce_partial_map=reduce_partial, backend="reference")
    assert_close("o (reference backend, persistent)", o_ref_backend, ref_o, TOL[DTYPE], 1e-3)


def test_mla_reduce_v1_standalone():
    """Two tiles: one merging three partial slots, one with no partials (left untouched)."""
    gen = torch.Generator().manual_seed(1)
    heads, d_v, max_q = 3, 32, 2
    slots = 3
    po = torch.randn(slots * max_q, 1, heads, d_v, generator=gen).to(DEVICE)
    pl = torch.randn(slots * max_q, 1, heads, 1, generator=gen).to(DEVICE)
    pl[2 * max_q] = float("-inf")  # a split that saw no keys
    reduce_indptr = torch.tensor([0, 3, 3], dtype=torch.int32, device=DEVICE)
    final_map = torch.tensor([[0, 2], [2, 3]], dtype=torch.int32, device=DEVICE)
    partial_map = torch.tensor([2, 0, 1], dtype=torch.int32, device=DEVICE)
    out = nan_like((3, heads, d_v), torch.float32)
    lse = nan_like((3, heads), torch.float32)
    api.mla_reduce_v1(po, pl, reduce_indptr, final_map, partial_map, max_q, 3, out, lse, backend="triton")
    ref_out = nan_like((3, heads, d_v), torch.float32)
    ref_lse = nan_like((3, heads), torch.float32)
    from aiter_mla.reference import mla_reduce_ref

    mla_reduce_ref(po, pl, reduce_indptr, final_map, partial_map, max_q, ref_out, ref_lse)
    assert_close("out", out[:2], ref_out[:2], 1e-5, 1e-5)
    assert_close("lse", lse[:2], ref_lse[:2], 1e-5, 1e-5)
    assert torch.isnan(out[2]).all(), "a tile without partials must not be written"


@pytest.mark.parametrize("override", ["prefetch=1,num_stages=1", "BLOCK_H=32,BLOCK_N=32", "prefetch=1,BLOCK_H=64"])
def test_config_override_variants_match_reference(monkeypatch, override):
    """AITER_MLA_DECODE_FWD_CONFIG variants the benchmark sweep tries: register prefetch, padded head groups."""
    monkeypatch.setenv("AITER_MLA_DECODE_FWD_CONFIG", override)
    case = make_paged_case(batch=3, heads=12, kv_lens=[50, 3, 77], q_lens=1, page_size=16, kv_lora_rank=LORA,
                           rope=ROPE, dtype=DTYPE, seed=21)
    o, _, lse = _run_decode(case, 12, DTYPE, num_kv_splits=2)
    ref_o, ref_lse = _reference(case)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)


def test_config_override_rejects_unknown_fields(monkeypatch):
    monkeypatch.setenv("AITER_MLA_DECODE_FWD_CONFIG", "BLOCK_X=4")
    case = make_paged_case(batch=1, heads=4, kv_lens=5, q_lens=1, page_size=1, kv_lora_rank=LORA, rope=ROPE,
                           dtype=DTYPE, seed=0)
    with pytest.raises(ValueError, match=r"AITER_MLA_DECODE_FWD_CONFIG: unknown field\(s\) BLOCK_X"):
        _run_decode(case, 4, DTYPE, num_kv_splits=1)


def test_bad_page_ids_and_short_kv_indices_are_skipped_not_read():
    """A page id outside the cache (negative or too large) and a kv_indptr running past the end
    of kv_indices (a caller's inconsistent metadata) drop those keys instead of reading out of
    bounds; with one query token per sequence that equals attention over the remaining pages."""
    page = 4
    case = make_paged_case(batch=2, heads=4, kv_lens=[16, 16], q_lens=1, page_size=page, kv_lora_rank=LORA,
                           rope=ROPE, dtype=DTYPE, seed=8)
    bad = case.kv_indices.clone()
    bad[1] = -1  # sequence 0, page 1
    bad[2] = 10_000  # sequence 0, page 2
    short = bad[:-1]  # sequence 1 loses its last page
    o = nan_like((2, 4, LORA), DTYPE)
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, short, case.kv_last_page_lens, 1,
                                page_size=page, sm_scale=0.3, num_kv_splits=2, return_lse=True, backend="triton")
    kept = torch.tensor([0, 3, 4, 5, 6], device=DEVICE)  # the valid pages, in order
    indptr = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)
    full = torch.full((2,), page, dtype=torch.int32, device=DEVICE)
    ref_o, ref_lse = mla_decode_ref(case.q, case.kv, case.qo_indptr, indptr, case.kv_indices[kept].contiguous(), full,
                                    kv_lora_rank=LORA, page_size=page, sm_scale=0.3)
    assert_close("o", o, ref_o, TOL[DTYPE], 1e-3)
    assert_close("lse", lse, ref_lse, TOL[DTYPE], 1e-4)


@pytest.mark.parametrize("bits", [32, 64])
def test_both_address_widths_match_reference(monkeypatch, bits):
    """Caches with every offset under 2**31 get int32 address arithmetic, larger ones int64: both
    forced on the same small cases (split decode, single pass, the persistent form)."""
    from aiter_mla.triton import launch

    seen = []

    def forced(*caches):
        seen.append(launch.max_element_offset(caches[0]) < 2**31)
        return bits

    monkeypatch.setattr(launch, "offset_bits", forced)
    test_decode_matches_reference(8, 1, 16, 2)
    test_decode_matches_reference(5, 4, 16, 1)
    test_persistent_decode_matches_reference(20, 2, 1)
    assert len(seen) >= 3 and all(seen)


def test_offset_bits_from_cache_extent():
    from aiter_mla.triton.launch import offset_bits

    small = torch.empty(64, 64, 1, 576, device="meta")
    big = torch.empty(4096, 64, 1, 8192 + 1, device="meta")  # 2**31 + 2**18 elements
    assert offset_bits(small) == 32 and offset_bits(small, big) == 64


def test_config_override_is_per_op(monkeypatch):
    """AITER_<OP>_CONFIG changes the launch config of its own op only."""
    from aiter_mla.checks import AttnKey
    from aiter_mla.triton.launch import attention_config

    key = AttnKey(torch.device("cpu"), torch.float32, torch.float32, None, torch.float32, 16, 1, 1, 64, 16, 64)
    base = attention_config("mla_prefill_fwd", key)
    monkeypatch.setenv("AITER_MLA_DECODE_FWD_CONFIG", "BLOCK_N=64,num_warps=8")
    assert attention_config("mla_prefill_fwd", key) == base
    assert attention_config("mla_decode_fwd", key) == base._replace(BLOCK_N=64, num_warps=8)
