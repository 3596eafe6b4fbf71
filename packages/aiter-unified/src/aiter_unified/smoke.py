"""Family smoke test for ``aiter check unified``: one mixed prefill/decode batch through the backend
the registry picks on this device, compared with the reference. Raises on a mismatch; returns one
line. GPU: bf16; CPU: fp16 through the Triton interpreter when TRITON_INTERPRET=1, else the
reference backend."""

from __future__ import annotations

import os


def run() -> str:
    import torch

    from aiter_core.registry import select
    from aiter_core.testing import check_max_error

    from . import checks
    from .api import unified_attention
    from .reference import unified_attention_ref
    from .testing import make_batch

    gpu = torch.cuda.is_available()
    device = "cuda" if gpu else "cpu"
    dtype = torch.bfloat16 if gpu else torch.float16
    b = make_batch([(1, 40), (9, 30), (5, 5)], heads_q=6, heads_kv=2, head_dim=64, block_size=16, dtype=dtype,
                   device=device, seed=0)
    out = torch.full_like(b.q, float("nan"))
    args = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.125, True, (-1, -1),
            b.block_table, 0.0, None, None, None)
    backend = select("unified_attention", checks.unified_attention(*args).key).backend
    unified_attention(*args)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.125)
    err = check_max_error("aiter-unified smoke: unified_attention", out, ref, 2e-2)
    where = "GPU" if gpu else ("Triton interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else "CPU")
    return f"unified: {backend} backend on {where}, {str(dtype).replace('torch.', '')} mixed batch max err {err:.2e}"
