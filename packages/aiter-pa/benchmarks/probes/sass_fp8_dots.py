"""Static probe (no GPU): the SASS instruction mix of the fp8 decode kernel with its KV tiles
converted to bf16 (the query's dtype) or to fp16 before the dots.

Cross-compiles the issue's fp8 decode shape (b=64 hq=32 hkv=8 d=128, HND, block 16) for sm_90
exactly as ``prepare_launch`` configures it and counts its SASS opcodes
(``aiter_core.testing.sass_opcode_counts``). Run from the repository root with aiter-pa installed and TRITON_INTERPRET unset:

    python3 packages/aiter-pa/benchmarks/probes/sass_fp8_dots.py [partitions]
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))
from aiter_core.testing import sass_opcode_counts  # noqa: E402
from aiter_pa.triton.attention import _paged_attn_kernel  # noqa: E402
from test_compile_sm90 import FP8, PT, PTEN, _decode_launch, compile_sm90  # noqa: E402


def main() -> None:
    parts = int(sys.argv[1]) if len(sys.argv) > 1 else 1
    for quant, name in ((PTEN, "fp8 per tensor"), (PT, "fp8 per token")):
        for mode in ("query", "fp16"):
            os.environ["AITER_PA_KV_COMPUTE"] = mode
            launch = _decode_launch(quant=quant, store=FP8, parts=parts)
            kernel = compile_sm90(_paged_attn_kernel, launch.args, launch.constexprs, launch.num_warps,
                                  launch.num_stages)
            ops = sass_opcode_counts(kernel)
            print(f"{name}, dots in {'bf16' if mode == 'query' else 'fp16'}: {sum(ops.values())} SASS instructions")
            print("   ", ", ".join(f"{op} {n}" for op, n in ops.most_common(16)))


if __name__ == "__main__":
    main()
