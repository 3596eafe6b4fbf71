"""Family smoke test for ``aiter check mha``: a few small calls through the backend the registry
picks on this device, compared with the fp32 reference. Raises on a mismatch; returns one line.

On a GPU it runs bf16 (plus fp8 when the device has it); on the CPU it runs fp16 through the
Triton interpreter when ``TRITON_INTERPRET=1``, else through the reference backend.
"""

from __future__ import annotations

import os


def run() -> str:
    import torch

    from aiter_core.registry import select
    from aiter_core.testing import check_max_error

    from . import api, checks
    from .reference import attention_ref

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, grad=False):
        x = torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
        return x.requires_grad_(grad)

    q, k, v = rnd(2, 37, 4, 64, grad=True), rnd(2, 45, 2, 64, grad=True), rnd(2, 45, 2, 64, grad=True)
    backend = select("flash_attn_func", checks.flash_attn_func(q, k, v, causal=True).key).backend
    out = api.flash_attn_func(q, k, v, causal=True)
    ref = attention_ref(q, k, v, causal=True)[0]
    low = attention_ref(q, k, v, causal=True, upcast=False)[0]
    tol = max(2 * (low.float() - ref.float()).abs().max().item(), 1e-2)
    errs = [check_max_error("aiter-mha smoke: flash_attn_func forward", out, ref, tol)]
    g = torch.randn(out.shape, generator=gen, device=device).to(dtype)
    got = torch.autograd.grad(out, [q, k, v], g)
    want = torch.autograd.grad(ref, [q, k, v], g)
    low_g = torch.autograd.grad(low, [q, k, v], g)
    for name, a, b, c in zip(("dq", "dk", "dv"), got, want, low_g):
        errs.append(check_max_error(f"aiter-mha smoke: flash_attn_func {name}", a, b, max(10 * (c.float() - b.float()).abs().max().item(), 2e-2)))

    with torch.no_grad():
        cu = torch.tensor([0, 17, 50], dtype=torch.int32, device=device)
        qv, kv, vv = rnd(50, 4, 64), rnd(50, 2, 64), rnd(50, 2, 64)
        out_v = api.flash_attn_varlen_func(qv, kv, vv, cu, cu, 33, 33, causal=True)
        for b in range(2):
            s = slice(int(cu[b]), int(cu[b + 1]))
            ref_b = attention_ref(qv[None, s], kv[None, s], vv[None, s], causal=True)[0][0]
            errs.append(check_max_error("aiter-mha smoke: flash_attn_varlen_func", out_v[s], ref_b, tol))
        fp8_note = ""
        if gpu and torch.cuda.get_device_capability() >= (8, 9):
            out8 = api.flash_attn_fp8_func(q.detach(), k.detach(), v.detach(), causal=True)
            check_max_error("aiter-mha smoke: flash_attn_fp8_func", out8, ref, 0.25)
            fp8_note = ", fp8 ok"
    where = "GPU" if gpu else ("Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "CPU")
    return (f"mha: {backend} backend on {where}, {str(dtype).replace('torch.', '')} fwd+bwd+varlen "
            f"max err {max(errs):.2e}{fp8_note}")
