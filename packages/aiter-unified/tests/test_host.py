"""The family's host-benchmark and warmup cases (``aiter bench host``, ``aiter warmup``): one host
case per public op, each runs on the CPU through the Triton interpreter."""

import os

import pytest

from aiter_core.host import HostCase
from aiter_unified import api
from aiter_unified.bench import WARMUP_FORMS, host_cases, warmup_cases


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernel in the interpreter")
def test_host_cases_run_on_cpu():
    cases = host_cases("cpu")
    assert sorted(c.op for c in cases) == sorted(api.__all__)  # one per public op
    for case in cases:
        assert isinstance(case, HostCase) and case.like in ("decode", "prefill")
        case.call()


def test_warmup_cases_cover_every_form():
    cases = warmup_cases("cpu")  # built, not run: each compiles (GPU) or interprets (CPU) for seconds
    assert len(cases) == 2 * len(WARMUP_FORMS)  # head dims 64 and 128, fp16 off a GPU
    assert {c.op for c in cases} == set(api.__all__) and {c.like for c in cases} == {"decode", "prefill"}
