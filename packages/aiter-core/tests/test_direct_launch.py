"""aiter_core.triton_utils.launch: the remembered-launch key is at least as fine as Triton's own
specialisation (checked on the CPU with Triton's binder for sm_90), and the fallbacks."""

from __future__ import annotations

import os
import random

import pytest
import torch

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("binds arguments for the sm_90 backend: not under the interpreter", allow_module_level=True)

import triton.language as tl  # noqa: E402

from aiter_core import triton_utils  # noqa: E402
from aiter_core.triton_utils import direct_launch_key  # noqa: E402


@triton.jit
def _probe_kernel(out, x, n, stride, scale, maybe, flag, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(out + pid, tl.load(x + pid) * scale + n + stride)


def _binder():
    from triton.backends.compiler import GPUTarget
    from triton.compiler.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    return create_function_from_signature(_probe_kernel.signature, _probe_kernel.params,
                                          make_backend(GPUTarget("cuda", 90, 32)))


def _random_args(rng: random.Random, pool: list[torch.Tensor]):
    def tensor():
        base = rng.choice(pool)
        return base[rng.choice([0, 0, 1, 4])]  # offset views: some pointers lose 16-byte alignment

    def integer():
        return rng.choice([0, 1, 2, 15, 16, 17, 32, 48, 64, 2**31 - 16, 2**31, 2**32 + 16, -16, -1])

    return (tensor(), tensor(), integer(), integer(), rng.choice([1.0, 0.5, 2.0]), rng.choice([None, tensor()]),
            rng.choice([True, False]), rng.choice([16, 32]))


def test_equal_keys_mean_equal_specialisations():
    binder = _binder()
    rng = random.Random(0)
    pool = [torch.zeros(64, 64, dtype=dt).view(-1) for dt in (torch.float16, torch.float32, torch.bfloat16)]
    seen: dict = {}
    distinct = set()
    for _ in range(3000):
        args = _random_args(rng, pool)
        _, specialization, _ = binder(*args)
        spec = tuple(specialization)
        key = direct_launch_key(args, (("num_warps", 4),))
        distinct.add(spec)
        assert seen.setdefault(key, spec) == spec, f"one key, two specialisations: {args}"
    assert len(distinct) > 50  # the random arguments did exercise many specialisations


def test_key_tells_apart_values_that_compare_equal():
    x = torch.zeros(8)
    base = (x, x, 1, 16, 1.0, None, True, 16)
    assert direct_launch_key(base, ()) != direct_launch_key((x, x, True, 16, 1.0, None, True, 16), ())
    assert direct_launch_key(base, ()) != direct_launch_key((x, x, 1.0, 16, 1.0, None, True, 16), ())
    assert direct_launch_key(base, ()) != direct_launch_key((x, x[1:], 1, 16, 1.0, None, True, 16), ())
    assert direct_launch_key(base, ()) != direct_launch_key((x, x.half(), 1, 16, 1.0, None, True, 16), ())
    assert direct_launch_key(base, ()) != direct_launch_key(base, (("num_warps", 8),))
    assert direct_launch_key(base, ()) == direct_launch_key((torch.ones(8), torch.ones(8), 1, 16, 1.0, None, True, 16), ())


class _Recorder:
    """Stands in for a JITFunction: records how it was launched."""

    params = list(range(8))

    def __init__(self):
        self.calls = []

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.calls.append((grid, args, kwargs))
        return run


@pytest.mark.parametrize("why", ["env off", "keyword constexpr", "missing argument"])
def test_fallbacks_go_through_triton(monkeypatch, why):
    kernel = _Recorder()
    args = (1, 2, 3, 4, 5, 6, 7, 8)
    kwargs = {"num_warps": 4}
    if why == "env off":
        monkeypatch.setenv("AITER_TRITON_DIRECT_LAUNCH", "0")
    elif why == "keyword constexpr":
        args, kwargs = args[:-1], {"BLOCK": 8, "num_warps": 4}
    else:
        args = args[:-1]
    triton_utils.launch(kernel, (3,), *args, **kwargs)
    assert kernel.calls == [((3,), args, kwargs)]


def test_second_identical_call_launches_the_remembered_kernel(monkeypatch):
    from types import SimpleNamespace

    import triton.runtime as runtime

    launched = []
    compiled = SimpleNamespace(run=lambda *a: launched.append(a), function="fn-handle", packed_metadata=(4, 1, 0))

    class Kernel(_Recorder):
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                self.calls.append((grid, args, kwargs))
                return compiled
            return run

    fake_driver = SimpleNamespace(get_current_device=lambda: 0, get_current_stream=lambda device: 1234)
    monkeypatch.setattr(runtime.driver, "_active", fake_driver, raising=False)
    monkeypatch.setattr(type(runtime.driver), "active", property(lambda self: fake_driver), raising=False)
    monkeypatch.delenv("AITER_TRITON_DIRECT_LAUNCH", raising=False)
    monkeypatch.setattr(triton_utils, "_direct", {})
    kernel = Kernel()
    x = torch.zeros(16)
    args = (x, x, 16, 32, 0.5, None, True, 16)
    triton_utils.launch(kernel, (5, 2), *args, num_warps=4)  # first: through Triton, remembered
    assert len(kernel.calls) == 1 and launched == []
    y = torch.ones(16)  # other tensors, same dtype and alignment: the remembered kernel, directly
    triton_utils.launch(kernel, (7,), y, y, 16, 32, 0.5, None, True, 16, num_warps=4)
    assert len(kernel.calls) == 1
    assert launched == [(7, 1, 1, 1234, "fn-handle", (4, 1, 0), None, None, None, y, y, 16, 32, 0.5, None, True, 16)]
    triton_utils.launch(kernel, (7,), y, y, 17, 32, 0.5, None, True, 16, num_warps=4)  # another int: Triton again
    assert len(kernel.calls) == 2
