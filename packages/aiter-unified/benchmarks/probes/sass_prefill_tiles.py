"""Static probe (no GPU): what the prefill shape's unified kernel compiles to under different tile
configs (``AITER_UNIFIED_ATTENTION_CONFIG="BLOCK_M=..,TILE_N=..,num_warps=..,num_stages=.."``).

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
from aiter_unified.checks import unified_attention
from aiter_unified.triton.kernel import unified_attn_kernel
from aiter_unified.triton.launch import CONFIG_OP, kernel_args, plan

VARIABLE = f"AITER_{CONFIG_OP.upper()}_CONFIG"
CONFIGS = [None, (128, 64, 8, 3), (64, 64, 4, 3), (128, 128, 8, 2), (128, 64, 4, 3), (64, 128, 4, 2)]


def main() -> None:
    hq, hk, d, bs, seqs, length = 32, 8, 128, 16, 8, 2048
    meta = dict(device="meta")
    q = torch.empty(seqs * length, hq, d, dtype=torch.bfloat16, **meta)
    k = torch.empty(4096, bs, hk, d, dtype=torch.bfloat16, **meta)
    cu, used = torch.empty(seqs + 1, dtype=torch.int32, **meta), torch.empty(seqs, dtype=torch.int32, **meta)
    table = torch.empty(seqs, length // bs, dtype=torch.int32, **meta)
    call = unified_attention(q, k, k, torch.empty_like(q), cu, length, used, length, 0.1, True, (-1, -1), table, 0.0,
                             None, None, None)
    for cfg in CONFIGS:
        if cfg:
            os.environ[VARIABLE] = "BLOCK_M={},TILE_N={},num_warps={},num_stages={}".format(*cfg)
        else:
            os.environ.pop(VARIABLE, None)
        launch = plan(call)[-1]
        args = kernel_args(call, launch)
        consts = {n: v for n, v in launch.consts.items() if n not in launch.config.options}
        sig, divisible = example_signature(unified_attn_kernel, args, consts)
        kernel = compile_for_sm90(unified_attn_kernel, sig, consts, divisible=divisible, **launch.config.options)
        ops = sass_opcode_counts(kernel)
        c = launch.consts
        name = ",".join(map(str, cfg)) if cfg else \
            f"default ({c['BLOCK_M']},{c['TILE_N']},{c['num_warps']},{c['num_stages']})"
        print(f"{name:22s} shared {kernel.metadata.shared:6d} B, {sum(ops.values()):5d} SASS, HGMMA {ops['HGMMA']}, "
              f"HMMA {ops['HMMA']}, LDGSTS {ops['LDGSTS']}, spills STL {ops['STL']} / LDL {ops['LDL']}")


if __name__ == "__main__":
    main()
