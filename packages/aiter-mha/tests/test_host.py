"""The host-cost and warmup cases of ``aiter bench host`` / ``aiter warmup`` (aiter_mha.bench): one
case per public function, each running on the CPU through the Triton interpreter (fp16) or, for
the fp8 functions, the reference backend."""

import os

import pytest
import torch

import aiter_mha.api as api
from aiter_mha.bench import host_cases, warmup_cases

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _tensors(result):
    return [result] if isinstance(result, torch.Tensor) else [t for t in result if isinstance(t, torch.Tensor)]


@pytest.fixture(scope="module")
def cpu_cases():
    return host_cases("cpu")


def test_one_host_case_per_public_function(cpu_cases):
    cases = cpu_cases
    assert set(c.op for c in cases) == set(api.__all__) and len(cases) == len(api.__all__)
    assert {c.like for c in cases} <= {"decode", "prefill"}
    assert next(c.like for c in cases if c.op == "flash_attn_with_kvcache") == "decode"


@pytest.mark.interpreter
@pytest.mark.skipif(not INTERPRET, reason="runs the Triton kernels on the CPU: needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("index", range(len(api.__all__)))
def test_host_case_runs_on_the_cpu(cpu_cases, index):
    case = cpu_cases[index]
    for t in _tensors(case.call()):
        if t.is_floating_point() and t.numel():
            assert torch.isfinite(t.float()).all(), case.op


def test_warmup_cases_cover_training_decode_and_both_head_dims():
    cases = warmup_cases("cpu")
    ops = {c.op for c in cases}
    assert {"flash_attn_func", "flash_attn_varlen_func", "flash_attn_with_kvcache"} <= ops
    assert all(callable(c.call) for c in cases)
