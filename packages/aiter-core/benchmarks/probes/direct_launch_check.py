"""GPU check of aiter_core.triton_utils.launch on real kernels: the remembered (direct) launches
give the reference's result, and what they save per eager call.

    python packages/aiter-core/benchmarks/probes/direct_launch_check.py

For a unified-attention decode batch and a mixed prefill batch (bf16): three calls each (the first
through Triton, the next two direct), each on a NaN-poisoned output, each compared with the PyTorch
reference; then host microseconds per call with the direct path on and off, next to torch SDPA's.
"""

import os

import torch

from aiter_core import triton_utils
from aiter_core.host import per_call_us, sdpa_cases
from aiter_unified.api import unified_attention
from aiter_unified.reference import unified_attention_ref
from aiter_unified.testing import make_batch


def main():
    dev = "cuda"
    for name, seqs in (("decode", [(1, 64)] * 4), ("mixed", [(1, 300), (37, 200), (5, 17), (128, 128)])):
        b = make_batch(seqs, heads_q=32, heads_kv=8, head_dim=128, block_size=16, dtype=torch.bfloat16, device=dev)
        ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 128 ** -0.5,
                                    out_dtype=torch.float32)
        out = torch.empty_like(b.q)
        args = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 128 ** -0.5, True,
                (-1, -1), b.block_table, 0.0, None, None, None)
        errors = []
        for _ in range(3):
            out.fill_(float("nan"))
            unified_attention(*args)
            torch.cuda.synchronize()
            errors.append(float((out.float() - ref.to(dev)).abs().max()))
        remembered = sum(len(v) for v in triton_utils._direct.values())
        print(f"{name}: max |out - ref| per call {errors} (remembered launches: {remembered})")
        assert all(e < 2e-2 for e in errors), errors
        for flag in ("1", "0"):
            os.environ["AITER_TRITON_DIRECT_LAUNCH"] = flag
            print(f"  direct launch {flag}: {per_call_us(lambda: unified_attention(*args)):.1f} us per eager call")
        os.environ.pop("AITER_TRITON_DIRECT_LAUNCH", None)
    for case in sdpa_cases(dev):
        print(f"{case.op}: {per_call_us(case.call):.1f} us per call")


if __name__ == "__main__":
    main()
