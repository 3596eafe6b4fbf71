"""Family smoke test for ``aiter check pa``: a cache write, a split-K decode over an fp8 cache and
a prefix prefill through the backend the registry picks here, against the fp32 reference.
Raises on a mismatch; returns one line.

GPU: bf16 queries. CPU: fp32 through the Triton interpreter when ``TRITON_INTERPRET=1``, else
through the reference backend.
"""

from __future__ import annotations


def run() -> str:
    import torch

    from aiter_core.quant import KVQuant
    from aiter_core.registry import select
    from aiter_core.testing import check_max_error, poison

    from . import api
    from .layouts import allocate_kv_cache
    from .reference import paged_attention_ref, reshape_and_cache_ref
    from .testing import make_paged_kv

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float32
    tol = 2e-2 if gpu else 1e-4
    g = torch.Generator().manual_seed(0)

    # cache write (vLLM layout, negative slot skipped)
    kc, vc = allocate_kv_cache(4, 16, 2, 64, dtype, "vllm", device)
    kc.copy_(torch.randn(kc.shape, generator=g).to(dtype)), vc.copy_(torch.randn(vc.shape, generator=g).to(dtype))
    rk, rv = kc.clone(), vc.clone()
    key = torch.randn(9, 2, 64, generator=g).to(dtype).to(device)
    value = torch.randn(9, 2, 64, generator=g).to(dtype).to(device)
    slots = torch.tensor([3, 17, -1, 40, 41, 63, 0, 22, 5], device=device)
    api.reshape_and_cache(key, value, kc, vc, slots)
    reshape_and_cache_ref(key, value, rk, rv, slots)
    errs = [check_max_error("aiter-pa smoke: reshape_and_cache", kc, rk, 0.0), check_max_error("aiter-pa smoke: reshape_and_cache V", vc, rv, 0.0)]

    # decode, fp8 per-token cache, two partitions, GQA 4, MTP 2
    ctx = [70, 33]
    kv = make_paged_kv(ctx, 2, 64, 16, "vllm_shuffled", KVQuant.PER_TOKEN_8BIT, dtype, torch.float8_e4m3fn, device)
    q = torch.randn(4, 8, 64, generator=g).to(dtype).to(device)
    out = poison(torch.empty(4, 8, 64, dtype=dtype, device=device))
    problem_backend = select("paged_attention_decode", None).backend
    api.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, 0.125,
                               max(ctx), None, kv.k_scale, kv.v_scale, 2, mtp=2)
    ref = paged_attention_ref(q.float().cpu(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.125, q_lens=[2, 2])
    errs.append(check_max_error("aiter-pa smoke: paged_attention_decode", out, ref, tol))

    # prefix prefill: 2 sequences with cached context plus new tokens
    kvp = make_paged_kv([20, 5], 2, 64, 16, "vllm", KVQuant.NONE, dtype, None, device, seed=1)
    qp = torch.randn(7, 8, 64, generator=g).to(dtype).to(device)
    kp = torch.randn(7, 2, 64, generator=g).to(dtype).to(device)
    vp = torch.randn(7, 2, 64, generator=g).to(dtype).to(device)
    op = poison(torch.empty(7, 8, 64, dtype=dtype, device=device))
    starts = torch.tensor([0, 4, 7], dtype=torch.int32, device=device)
    seq_lens = torch.tensor([24, 8], dtype=torch.int32, device=device)
    api.context_attention_fwd(qp, kp, vp, op, "auto", kvp.key_cache, kvp.value_cache, kvp.block_tables, starts,
                              seq_lens, 4)
    refp = paged_attention_ref(qp.float().cpu(), kvp.k_deq, kvp.v_deq, kvp.block_tables.cpu(), [20, 5], 64 ** -0.5,
                               q_starts=[0, 4], q_lens=[4, 3], new_k=kp.float().cpu(), new_v=vp.float().cpu())
    errs.append(check_max_error("aiter-pa smoke: context_attention_fwd", op, refp, tol))
    return (f"aiter-pa ok on {device} ({dtype}, backend {problem_backend}): cache write, fp8 split-K decode, "
            f"prefix prefill; max error {max(errs):.2g}")
