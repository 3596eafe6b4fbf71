"""Static probe (no GPU): what the prefill shape's unified kernel compiles to under different tile
configs (``AITER_UNIFIED_CONFIG`` = block_m, tile_n, warps, stages).

The issue's prefill (8 x 2048 new tokens, hq=32, hkv=8, d=128, bf16, NHD block 16), launched as
``plan``/``kernel_args`` configure it, cross-compiled for sm_90: shared memory, SASS total,
tensor-core instructions (HGMMA = wgmma, HMMA = mma.sync), cp.async loads (LDGSTS) and
local-memory spills (STL/LDL). Run from the repository root with TRITON_INTERPRET unset:

    python3 packages/aiter-unified/benchmarks/probes/sass_prefill_tiles.py
"""

from __future__ import annotations

import os

import torch

from aiter_core.testing import compile_for_sm90, example_signature, sass_opcode_counts
from aiter_unified.triton.kernel import unified_attn_kernel
from aiter_unified.triton.launch import kernel_args, plan

CONFIGS = [None, "128,64,8,3", "64,64,4,3", "128,128,8,2", "128,64,4,3", "64,128,4,2"]


def main() -> None:
    hq, hk, d, bs, seqs, length = 32, 8, 128, 16, 8, 2048
    meta = dict(device="meta")
    q = torch.empty(seqs * length, hq, d, dtype=torch.bfloat16, **meta)
    k = torch.empty(4096, bs, hk, d, dtype=torch.bfloat16, **meta)
    cu, used = torch.empty(seqs + 1, dtype=torch.int32, **meta), torch.empty(seqs, dtype=torch.int32, **meta)
    table = torch.empty(seqs, length // bs, dtype=torch.int32, **meta)
    for cfg in CONFIGS:
        if cfg:
            os.environ["AITER_UNIFIED_CONFIG"] = cfg
        else:
            os.environ.pop("AITER_UNIFIED_CONFIG", None)
        p = plan(num_tokens=q.shape[0], num_seqs=seqs, heads_q=hq, heads_kv=hk, head_dim=d, max_seqlen_q=length,
                 max_seqlen_k=length, sliding_window=0, device=torch.device("cpu"))
        args, consts = kernel_args(q, k, k, q, cu, used, table, softmax_scale=0.1, softcap=0.0, sliding_window=0,
                                   sinks=None, alibi_slopes=None, qq_bias=None, q_descale=None, k_descale=None,
                                   v_descale=None, output_scale=None, p=p)
        sig, divisible = example_signature(unified_attn_kernel, args, consts)
        kernel = compile_for_sm90(unified_attn_kernel, sig, consts, num_warps=p.num_warps, num_stages=p.num_stages,
                                  divisible=divisible)
        ops = sass_opcode_counts(kernel)
        name = cfg or f"default ({p.block_m},{p.tile_n},{p.num_warps},{p.num_stages})"
        print(f"{name:22s} shared {kernel.metadata.shared:6d} B, {sum(ops.values()):5d} SASS, HGMMA {ops['HGMMA']}, "
              f"HMMA {ops['HMMA']}, LDGSTS {ops['LDGSTS']}, spills STL {ops['STL']} / LDL {ops['LDL']}")


if __name__ == "__main__":
    main()
