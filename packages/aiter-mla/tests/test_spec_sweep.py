"""The sweep of upstream's op_tests/test_mla.py and triton_tests/test_mla.py (spec 9.4 / 9.5),
scaled to the interpreter (on a GPU the fp32 cases run in fp16): head counts 16/32/64/128 and odd ones (1, 8, 20, 48), MTP 1..4,
contexts 21..100 (the kernel tiles make every context length a mix of full and partial tiles),
pages 1/16/64, varlen batches, fp32 and fp16, LSE checked; each case on the split, single-split
and persistent paths. Production dims run on the GPU tier (tests/gpu/)."""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api
from aiter_mla.reference import mla_decode_ref
from aiter_mla.testing import CUDA, DEVICE, INTERPRET, assert_close, make_paged_case, nan_like

pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton kernels need TRITON_INTERPRET=1 or a GPU")

LORA, ROPE = 64, 16
TOL = {torch.float32: (2e-5, 1e-3), torch.float16: (5e-3, 1e-2)}

# (heads, qlen, page, kv_lens, dtype)
SWEEP = [
    (16, 1, 1, [21, 64, 100], torch.float32),
    (16, 2, 16, [64, 21], torch.float32),
    (16, 4, 64, [100, 5], torch.float16),
    (128, 1, 64, [100, 21], torch.float32),
    (128, 2, 16, [64], torch.float32),
    (32, 1, 16, [21, 99, 3, 64], torch.float32),
    (64, 3, 1, [40, 77], torch.float16),
    (8, 1, 64, [100, 1], torch.float32),
    (20, 2, 1, [33, 64], torch.float32),
    (1, 4, 16, [21, 50], torch.float32),
    (48, 1, 16, [70], torch.float16),
]


# fp32 cases on every path; fp16 cases on the split path (keeps the CPU tier short)
CASES = [(*c, path) for c in SWEEP for path in (("split", "single", "persistent") if c[4] == torch.float32 else ("split",))]


@pytest.mark.parametrize("heads,qlen,page,kv_lens,dtype,path", CASES,
                         ids=[f"h{h}-q{q}-p{p}-{len(k)}seq-{str(d)[6:]}-{path}" for h, q, p, k, d, path in CASES])
def test_decode_sweep(heads, qlen, page, kv_lens, dtype, path):
    if CUDA and dtype == torch.float32:
        dtype = torch.float16  # fp32 dots run as TF32 on GPUs: the interpreter's fp32 cases run in fp16 there
    batch = len(kv_lens)
    q_lens = [max(1, qlen - (b % 2)) for b in range(batch)]  # varlen MTP within the batch
    case = make_paged_case(batch=batch, heads=heads, kv_lens=kv_lens, q_lens=q_lens, page_size=page,
                           kv_lora_rank=LORA, rope=ROPE, dtype=dtype, seed=heads * 7 + qlen + page)
    out_dtype = dtype
    o = nan_like((case.q.shape[0], heads, LORA), out_dtype)
    kwargs = dict(page_size=page, sm_scale=(LORA + ROPE) ** -0.5, return_lse=True, backend="triton")
    if path == "persistent":
        info = api.get_mla_metadata_info_v1(batch, qlen, heads, dtype, dtype, is_sparse=False, max_split_per_batch=4)
        meta, w_ind, w_info, r_ind, r_final, r_part = [torch.empty(s, dtype=d, device=DEVICE) for s, d in info]
        api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, heads, 1, True, meta, w_info,
                                w_ind, r_ind, r_final, r_part, page_size=page, max_seqlen_qo=qlen,
                                max_split_per_batch=4)
        kwargs.update(work_meta_data=meta, work_indptr=w_ind, work_info_set=w_info, reduce_indptr=r_ind,
                      reduce_final_map=r_final, reduce_partial_map=r_part)
    else:
        kwargs["num_kv_splits"] = 3 if path == "split" else 1
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, qlen, **kwargs)
    ref_o, ref_lse = mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                    case.kv_last_page_lens, kv_lora_rank=LORA, page_size=page,
                                    sm_scale=(LORA + ROPE) ** -0.5)
    atol, rtol = TOL[dtype]
    assert_close("o", o, ref_o, atol, rtol)
    assert_close("lse", lse, ref_lse, atol, 1e-4)
