"""Bad input fails at the API boundary with ValueError/TypeError naming the argument (tier 1)."""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api, triton_api
from aiter_mla.testing import make_paged_case

LORA, ROPE = 32, 16


@pytest.fixture
def case():
    return make_paged_case(batch=2, heads=4, kv_lens=[10, 5], q_lens=1, page_size=4, kv_lora_rank=LORA, rope=ROPE,
                           dtype=torch.float32, seed=0, device="cpu")


def _decode(case, **over):
    args = dict(q=case.q, kv_buffer=case.kv, o=torch.empty(case.q.shape[0], 4, LORA), qo_indptr=case.qo_indptr,
                kv_indptr=case.kv_indptr, kv_indices=case.kv_indices, kv_last_page_lens=case.kv_last_page_lens,
                max_seqlen_q=1, page_size=4, backend="reference")
    args.update(over)
    return api.mla_decode_fwd(**args)


@pytest.mark.parametrize("over,exc,words", [
    (dict(q="not a tensor"), TypeError, "q must be a torch.Tensor"),
    (dict(q=torch.zeros(2, 4, LORA + ROPE, dtype=torch.int32)), TypeError, "q must have dtype"),
    (dict(q=torch.zeros(2, LORA + ROPE)), ValueError, "q must be 3-D"),
    (dict(o=torch.empty(2, 4, LORA + ROPE)), ValueError, "kv_lora_rank"),
    (dict(o=torch.empty(2, 3, LORA)), ValueError, "o must be"),
    (dict(kv_buffer=torch.zeros(7, 4, 1, LORA)), ValueError, "kv_buffer rows must be as wide as q"),
    (dict(kv_buffer=torch.zeros(7, 4, 2, LORA + ROPE)), ValueError, "one latent KV head"),
    (dict(nhead_kv=2), ValueError, "nhead_kv"),
    (dict(page_size=8), ValueError, "page_size=8"),
    (dict(page_size=0), ValueError, "page_size must be >= 1"),
    (dict(kv_indptr=torch.tensor([0, 3], dtype=torch.int32)), ValueError, "kv_indptr must have 3 entries"),
    (dict(kv_indptr=torch.tensor([0, 3, 5])), TypeError, "kv_indptr must have dtype"),
    (dict(kv_last_page_lens=torch.ones(3, dtype=torch.int32)), ValueError, "kv_last_page_lens must have 2 entries"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be >= 1"),
    (dict(max_seqlen_q=1.0), TypeError, "max_seqlen_q must be an int"),
    (dict(num_kv_splits=0), ValueError, "num_kv_splits must be >= 1"),
    (dict(logit_cap=30.0), ValueError, "logit_cap"),
    (dict(q_scale=torch.ones(2)), ValueError, "q_scale must be a float32 tensor with one element"),
    (dict(kv_scale=torch.ones(1, dtype=torch.float16)), TypeError, "kv_scale must have dtype"),
    (dict(cp_world_size=2), ValueError, "context parallelism"),
    (dict(work_meta_data=torch.zeros(2, dtype=torch.int64)), ValueError, "also needs work_indptr"),
])
def test_decode_rejects_bad_input(case, over, exc, words):
    with pytest.raises(exc, match=words):
        _decode(case, **over)


def test_decode_accepts_flat_page_view(case):
    """[pages * page_size, 1, 1, D] (a common caller view) is reinterpreted as [pages, page_size, 1, D]."""
    flat = case.kv.reshape(-1, 1, 1, LORA + ROPE)
    o = torch.empty(case.q.shape[0], 4, LORA)
    _decode(case, kv_buffer=flat, o=o)
    o2 = torch.empty_like(o)
    _decode(case, o=o2)
    torch.testing.assert_close(o, o2)


def test_metadata_rejects_bad_input(case):
    info = api.get_mla_metadata_info_v1(2, 1, 4, torch.float32, torch.float32, is_sparse=False)
    bufs = [torch.empty(s, dtype=d) for s, d in info]
    meta, indptr, work, r_ind, r_final, r_part = bufs
    with pytest.raises(ValueError, match="num_heads_k must be 1"):
        api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, 4, 2, True, meta, work, indptr,
                                r_ind, r_final, r_part, page_size=4, max_seqlen_qo=1)
    with pytest.raises(ValueError, match="is_sparse"):
        api.get_mla_metadata_info_v1(2, 1, 4, torch.float32, torch.float32, is_sparse=True)
    with pytest.raises(ValueError, match="reduce_indptr/reduce_final_map must hold 6 tiles"):
        bigger = make_paged_case(batch=6, heads=4, kv_lens=3, q_lens=1, page_size=4, kv_lora_rank=LORA, rope=ROPE,
                                 dtype=torch.float32, device="cpu")
        api.get_mla_metadata_v1(bigger.qo_indptr, bigger.kv_indptr, bigger.kv_last_page_lens, 4, 1, True, meta, work,
                                indptr, r_ind, r_final, r_part, page_size=4, max_seqlen_qo=1)
    with pytest.raises(TypeError, match="work_info_set must have dtype"):
        api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, 4, 1, True, meta,
                                work.float(), indptr, r_ind, r_final, r_part, page_size=4, max_seqlen_qo=1)


def test_prefill_ps_rejects_bad_input():
    q = torch.zeros(5, 4, 48)
    k = torch.zeros(9, 2, 48)
    v = torch.zeros(9, 2, 32)
    ind = torch.tensor([0, 5], dtype=torch.int32)
    idx = torch.arange(5, dtype=torch.int32)
    out = torch.empty(5, 4, 32)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        api.mla_prefill_ps_fwd(q, torch.zeros(9, 3, 48), torch.zeros(9, 3, 32), out, ind, ind, idx, None, None, 5,
                               True)
    with pytest.raises(ValueError, match="K head dim must equal Q's"):
        api.mla_prefill_ps_fwd(q, torch.zeros(9, 2, 40), v, out, ind, ind, idx, None, None, 5, True)
    with pytest.raises(ValueError, match=r"output must have shape \(5, 4, 32\)"):
        api.mla_prefill_ps_fwd(q, k, v, torch.empty(5, 4, 48), ind, ind, idx, None, None, 5, True)
    with pytest.raises(ValueError, match="kv_indptr must have 2 entries"):
        api.mla_prefill_ps_fwd(q, k, v, out, ind, torch.tensor([0, 2, 5], dtype=torch.int32), idx, None, None, 5, True)


def test_triton_api_rejects_bad_input(case):
    out = torch.empty(case.q.shape[0], 4, LORA)
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32)
    tables = case.block_tables
    common = (case.q, case.kv, out, case.qo_indptr, seqused, 16, tables, 0.1, LORA, ROPE, True, None, None)
    with pytest.raises(ValueError, match="shuffled_kv_cache"):
        triton_api.mla_decode_fwd(*common, shuffled_kv_cache=True)
    with pytest.raises(ValueError, match="kv_lora_rank \\+ qk_rope_head_dim"):
        triton_api.mla_decode_fwd(case.q, case.kv, out, case.qo_indptr, seqused, 16, tables, 0.1, LORA, ROPE + 2, True,
                                  None, None)
    with pytest.raises(ValueError, match="block_tables must be"):
        triton_api.mla_prefill_fwd(case.q, case.kv, out, case.qo_indptr, seqused, 16, tables[:1], 0.1, LORA, ROPE,
                                   True, None, None)
    with pytest.raises(ValueError, match="skip_reduce"):
        triton_api.mla_decode_fwd(*common, skip_reduce=True)


def test_grouped_rope_rejects_bad_input():
    q = torch.zeros(2, 4, LORA + ROPE)
    k = torch.zeros(10, 1, LORA + ROPE)
    o = torch.empty(2, 4, LORA)
    logits = torch.empty(2, 4, 3, LORA + 1)
    ind = torch.tensor([0, 4, 9], dtype=torch.int32)
    idx = torch.arange(9, dtype=torch.int32)
    with pytest.raises(ValueError, match="attn_logits must be"):
        api.decode_attention_fwd_grouped_rope(q, k, k[..., :LORA], o, ind, idx, None, LORA, 16, None, None,
                                                     logits, 2, 0.1)
    with pytest.raises(ValueError, match="use_rope=True needs"):
        api.decode_attention_fwd_grouped_rope(q, k, k[..., :LORA], o, ind, idx, None, LORA, 16, None, None,
                                                     logits, 3, 0.1, use_rope=True)
    with pytest.raises(ValueError, match="rotary_dim must be even"):
        api.decode_attention_fwd_grouped_rope(q, k, k[..., :LORA], o, ind, idx, torch.zeros(2, 16), LORA, 15,
                                                     torch.zeros(8, 15), torch.zeros(2, dtype=torch.int64), logits, 3,
                                                     0.1, use_rope=True)


def test_cache_ops_reject_bad_input():
    kv_c, k_pe = torch.zeros(3, LORA), torch.zeros(3, ROPE)
    cache = torch.zeros(2, 4, LORA + ROPE)
    slots = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="slot_mapping must have one entry per token"):
        api.concat_and_cache_mla(kv_c, k_pe, cache, slots[:2], "auto")
    with pytest.raises(TypeError, match="slot_mapping must have dtype"):
        api.concat_and_cache_mla(kv_c, k_pe, cache, slots.float(), "auto")
    with pytest.raises(ValueError, match="rows must be 48 wide"):
        api.concat_and_cache_mla(kv_c, k_pe, torch.zeros(2, 4, 40), slots, "auto")
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        api.concat_and_cache_mla(kv_c, k_pe, cache, slots, "int4")
    q_nope, q_pe = torch.zeros(3, 2, LORA), torch.zeros(3, 2, ROPE)
    q_out = torch.zeros(3, 2, LORA + ROPE)
    pos = torch.zeros(3, dtype=torch.int64)
    with pytest.raises(ValueError, match="cos_cache must be"):
        api.fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, cache, q_out, slots, None, None, pos,
                                                     torch.zeros(8, 5), torch.zeros(8, 5), True, True)
    with pytest.raises(ValueError, match="shuffled_kv_cache"):
        api.fused_qk_rope_cat_and_cache_mla(q_nope, q_pe, kv_c[:, None], k_pe[:, None], torch.zeros(3, 1, 48),
                                                  slots, pos, torch.zeros(8, 8), torch.zeros(8, 8), None, True,
                                                  shuffled_kv_cache=True)
    with pytest.raises(ValueError, match="pos must have at least"):
        api.fused_qk_rope_cat_and_cache_mla(q_nope, q_pe, kv_c[:, None], k_pe[:, None], torch.zeros(3, 1, 48),
                                                  slots, pos[:2], torch.zeros(8, 8), torch.zeros(8, 8), None, True)
