"""Compile-only tier for aiter_core.testing's sm_90 helpers: signature from example arguments,
cross-compilation without a GPU, and the SASS opcode histogram the probes compare."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="cross-compilation needs TRITON_INTERPRET unset")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from aiter_core.testing import compile_for_sm90, example_signature, sass_opcode_counts  # noqa: E402


@triton.jit
def _scaled_copy(x_ptr, y_ptr, n, scale, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=mask) * scale, mask=mask)


@triton.jit
def _dot(a_ptr, b_ptr, c_ptr, M: tl.constexpr):
    offs = tl.arange(0, M)
    a = tl.load(a_ptr + offs[:, None] * M + offs[None, :])
    b = tl.load(b_ptr + offs[:, None] * M + offs[None, :])
    tl.store(c_ptr + offs[:, None] * M + offs[None, :], tl.dot(a, b))


def test_signature_and_sass_of_a_copy():
    x = torch.empty(1024, dtype=torch.float16, device="meta")
    args, consts = [x, x, 1024, 0.5], {"BLOCK": 256}
    sig, divisible = example_signature(_scaled_copy, args, consts)
    assert sig == {"x_ptr": "*fp16", "y_ptr": "*fp16", "n": "i32", "scale": "fp32", "BLOCK": "constexpr"}
    assert divisible == [0, 1, 2]  # pointers and the 16-divisible n
    ops = sass_opcode_counts(compile_for_sm90(_scaled_copy, sig, consts, num_warps=4, num_stages=1,
                                              divisible=divisible))
    assert ops["LDG"] >= 1 and ops["STG"] >= 1 and ops["EXIT"] >= 1
    assert ops["HGMMA"] == 0 and ops["HMMA"] == 0


def test_sass_shows_the_tensor_core_instruction():
    a = torch.empty(64 * 64, dtype=torch.bfloat16, device="meta")
    c = torch.empty(64 * 64, dtype=torch.float32, device="meta")
    sig, divisible = example_signature(_dot, [a, a, c], {"M": 64})
    ops = sass_opcode_counts(compile_for_sm90(_dot, sig, {"M": 64}, num_warps=4, num_stages=1, divisible=divisible))
    assert ops["HGMMA"] + ops["HMMA"] >= 1
