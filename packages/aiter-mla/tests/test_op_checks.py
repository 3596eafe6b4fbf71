"""A direct ``torch.ops.aiter.<op>(...)`` call is validated exactly like the public function: for
every op, a public call with one bad argument raises an error naming it, and the arguments that
call hands to the op, passed to ``torch.ops.aiter.<op>`` directly (through the dispatcher),
raise the same error (tier 1)."""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api, ops, triton_api
from aiter_mla.testing import make_paged_case

LORA, ROPE = 32, 16
I64 = torch.int64


def _case(q_lens=1):
    return make_paged_case(batch=2, heads=4, kv_lens=[10, 5], q_lens=q_lens, page_size=4, kv_lora_rank=LORA,
                           rope=ROPE, dtype=torch.float32, seed=0, device="cpu")


def _decode_args(case):
    return (case.q, case.kv, torch.empty(case.q.shape[0], 4, LORA), case.qo_indptr, case.kv_indptr, case.kv_indices,
            case.kv_last_page_lens, 1)


def _decode():
    case = _case()
    args = list(_decode_args(case))
    args[4] = case.kv_indptr.long()
    return api.mla_decode_fwd(*args, page_size=4, num_kv_splits=2)


def _prefill():
    case = _case(2)
    args = list(_decode_args(case))
    args[0], args[7] = case.q.double(), 2
    return api.mla_prefill_fwd(*args)


def _persistent(bad_work_info: bool):
    case = _case()
    info = api.get_mla_metadata_info_v1(2, 1, 4, torch.float32, torch.float32, is_sparse=False)
    meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(s, dtype=d) for s, d in info]
    api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, 4, 1, True, meta, w_info, w_ind,
                            r_ind, r_final, r_part, page_size=4, max_seqlen_qo=1)
    if bad_work_info:
        w_info = w_info[:, :7]
    return api.mla_decode_fwd(*_decode_args(case), page_size=4, work_meta_data=meta, work_indptr=w_ind,
                              work_info_set=w_info, reduce_indptr=r_ind, reduce_final_map=r_final,
                              reduce_partial_map=r_part)


def _reduce():
    po, pl = torch.zeros(6, 1, 4, LORA), torch.zeros(6, 1, 4, 1)
    indptr = torch.tensor([0, 3, 3], dtype=torch.int32)
    final_map = torch.tensor([[0, 2]], dtype=torch.int32)  # one row for two tiles
    return api.mla_reduce_v1(po, pl, indptr, final_map, torch.arange(3, dtype=torch.int32), 2, 3,
                             torch.empty(3, 4, LORA))


def _prefill_ps():
    ind = torch.tensor([0, 5], dtype=torch.int32)
    return api.mla_prefill_ps_fwd(torch.zeros(5, 4, 48), torch.zeros(9, 3, 48), torch.zeros(9, 3, 32),
                                  torch.empty(5, 4, 32), ind, ind, torch.arange(5, dtype=torch.int32), None, None, 5,
                                  True)


def _block_table():
    case = _case()
    seqused = torch.tensor(case.kv_lens, dtype=torch.int32)
    out = torch.empty(case.q.shape[0], 4, LORA)
    return triton_api.mla_decode_fwd(case.q, case.kv, out, case.qo_indptr, seqused, 16, case.block_tables[:1], 0.1,
                                     LORA, ROPE, True, None, None, num_kv_splits=2)


def _grouped_rope():
    k = torch.zeros(10, 1, LORA + ROPE)
    return api.decode_attention_fwd_grouped_rope(torch.zeros(2, 4, LORA + ROPE), k, k[..., :LORA],
                                                 torch.empty(2, 4, LORA), torch.tensor([0, 4, 9], dtype=torch.int32),
                                                 torch.arange(9, dtype=torch.int32), None, LORA, 16, None, None,
                                                 torch.empty(2, 4, 3, LORA + 1), 2, 0.1)


def _sglang_decode():
    k = torch.zeros(8, 2, 48)
    return api.decode_attention_fwd(torch.zeros(2, 4, 48), k, torch.zeros(8, 2, 32), torch.empty(2, 4, 32), None,
                                    torch.zeros(2, 4, dtype=torch.int32), torch.ones(3, dtype=torch.int32),
                                    torch.empty(2, 4, 2, 33), 2, 0.1)


def _concat():
    return api.concat_and_cache_mla(torch.zeros(3, LORA), torch.zeros(3, ROPE), torch.zeros(2, 4, LORA + ROPE),
                                    torch.zeros(3), "auto")


def _rope_concat():
    return api.fused_qk_rope_concat_and_cache_mla(
        torch.zeros(3, 2, LORA), torch.zeros(3, 2, ROPE), torch.zeros(3, LORA), torch.zeros(3, ROPE),
        torch.zeros(2, 4, LORA + ROPE), torch.zeros(3, 2, LORA + ROPE), torch.arange(3), None, None,
        torch.zeros(3, dtype=I64), torch.zeros(8, 5), torch.zeros(8, 5), True, True)


def _rope_cat():
    return api.fused_qk_rope_cat_and_cache_mla(
        torch.zeros(3, 2, LORA), torch.zeros(3, 2, ROPE), torch.zeros(3, 1, LORA), torch.zeros(3, 1, ROPE),
        torch.zeros(3, 1, LORA + ROPE), torch.arange(3), torch.zeros(2, dtype=I64), torch.zeros(8, 8),
        torch.zeros(8, 8), None, True)


# op -> (a public call with one bad argument, words its error must contain)
BAD_CALLS = {
    "mla_decode_fwd": (_decode, "kv_indptr must have dtype int32"),
    "mla_decode_fwd_persistent": (lambda: _persistent(bad_work_info=True), "work_info_set must be \\[max_work, 8\\]"),
    "mla_reduce_v1": (_reduce, "reduce_final_map must have 2 rows"),
    "mla_prefill_fwd": (_prefill, "q must have dtype"),
    "mla_prefill_ps_fwd": (_prefill_ps, "multiple of KV heads"),
    "mla_attention_block_table": (_block_table, "block_tables must be \\[batch=2"),
    "decode_attention_fwd_grouped_rope": (_grouped_rope, "attn_logits must be"),
    "decode_attention_fwd": (_sglang_decode, "b_seq_len must have 2 entries"),
    "concat_and_cache_mla": (_concat, "slot_mapping must have dtype"),
    "fused_qk_rope_concat_and_cache_mla": (_rope_concat, "cos_cache must be"),
    "fused_qk_rope_cat_and_cache_mla": (_rope_cat, "pos must have at least"),
}


def test_every_op_has_a_bad_call():
    assert set(BAD_CALLS) == set(ops.OPS)


@pytest.mark.parametrize("op", sorted(BAD_CALLS))
def test_direct_op_call_raises_the_public_functions_error(op, monkeypatch):
    bad_call, words = BAD_CALLS[op]
    with pytest.raises((TypeError, ValueError), match=words) as via_public:
        bad_call()
    handed = []
    monkeypatch.setattr(ops, op, lambda *args: handed.append(args))
    bad_call()  # the public function hands the op its arguments (the recorder validates nothing)
    monkeypatch.undo()
    assert len(handed) == 1
    with pytest.raises(via_public.type) as direct:
        getattr(torch.ops.aiter, op)(*handed[0])
    assert str(direct.value) == str(via_public.value)
