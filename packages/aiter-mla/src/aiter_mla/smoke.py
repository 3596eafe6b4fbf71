"""Family smoke test for ``aiter check mla``: a small decode (split and persistent) and a cache
write through the backend the registry picks here, against the fp32 reference. Raises on a
mismatch; returns one line.

On a GPU: production dims (512 + 64), bf16. On the CPU: small dims in fp32, through the Triton
interpreter when ``TRITON_INTERPRET=1``, else the reference backend.
"""

from __future__ import annotations


def run() -> str:
    import torch

    from aiter_core.registry import select
    from aiter_core.testing import check_max_error

    from . import api, checks
    from .reference import concat_and_cache_mla_ref, mla_decode_ref
    from .testing import make_paged_case

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    lora, rope = (512, 64) if gpu else (64, 16)
    tol = 2e-2 if gpu else 1e-4
    case = make_paged_case(batch=3, heads=16, kv_lens=[300, 21, 130], q_lens=[1, 2, 1], page_size=16,
                           kv_lora_rank=lora, rope=rope, dtype=dtype, seed=0, device=device)
    ref_o, ref_lse = mla_decode_ref(case.q, case.kv, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                    case.kv_last_page_lens, kv_lora_rank=lora, page_size=16, sm_scale=0.1)
    o = torch.full((case.q.shape[0], 16, lora), float("nan"), dtype=dtype, device=device)
    call = checks.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                 case.kv_last_page_lens, 2, 16, 0.1, True, 1, None, None, None, None, None)
    backend = select("mla_decode_fwd", call.key).backend
    _, lse = api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices,
                                case.kv_last_page_lens, 2, page_size=16, sm_scale=0.1, num_kv_splits=3,
                                return_lse=True)
    errs = [check_max_error("aiter-mla smoke: mla_decode_fwd", o, ref_o, tol), check_max_error("aiter-mla smoke: mla_decode_fwd lse", lse, ref_lse, tol)]

    info = api.get_mla_metadata_info_v1(3, 2, 16, dtype, dtype, is_sparse=False)
    bufs = [torch.empty(s, dtype=d, device=device) for s, d in info]
    meta, w_ind, w_info, r_ind, r_final, r_part = bufs
    api.get_mla_metadata_v1(case.qo_indptr, case.kv_indptr, case.kv_last_page_lens, 16, 1, True, meta, w_info, w_ind,
                            r_ind, r_final, r_part, page_size=16, max_seqlen_qo=2)
    o.fill_(float("nan"))
    api.mla_decode_fwd(case.q, case.kv, o, case.qo_indptr, case.kv_indptr, case.kv_indices, case.kv_last_page_lens,
                       2, page_size=16, sm_scale=0.1, work_meta_data=meta, work_indptr=w_ind, work_info_set=w_info,
                       reduce_indptr=r_ind, reduce_final_map=r_final, reduce_partial_map=r_part)
    errs.append(check_max_error("aiter-mla smoke: mla_decode_fwd (persistent)", o, ref_o, tol))

    gen = torch.Generator(device=device).manual_seed(1)
    kv_c = torch.randn(5, lora, generator=gen, device=device).to(dtype)
    k_pe = torch.randn(5, rope, generator=gen, device=device).to(dtype)
    cache = torch.zeros(2, 4, lora + rope, dtype=dtype, device=device)
    slots = torch.tensor([6, -1, 0, 3, 5], device=device)
    want = concat_and_cache_mla_ref(kv_c, k_pe, cache, slots, None)
    api.concat_and_cache_mla(kv_c, k_pe, cache, slots, "auto")
    errs.append(check_max_error("aiter-mla smoke: concat_and_cache_mla", cache, want, 0.0))
    return f"aiter-mla: decode (split, persistent) and cache write match the reference on {device} " \
           f"(backend {backend}, max error {max(errs):.2g})"
