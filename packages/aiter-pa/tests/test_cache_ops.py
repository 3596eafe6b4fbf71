"""KV-cache writes and block copies against reference.py (which converts whole layouts, so it is
independent of the kernels' address arithmetic). Tier 2: interpreter or GPU.

Caches start filled with random bytes, so a slot the kernel must not touch (negative slot) is
checked to keep its old value, and a slot it must write cannot pass by accident.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA device")

import aiter_pa  # noqa: E402
from aiter_pa.layouts import allocate_kv_cache  # noqa: E402
from aiter_pa.reference import (  # noqa: E402
    copy_blocks_ref,
    reshape_and_cache_block_quant_ref,
    reshape_and_cache_pertoken_ref,
    reshape_and_cache_ref,
)

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32 if INTERPRET else torch.float16
FP8 = torch.float8_e4m3fn


def _random_fill(t: torch.Tensor, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if t.dtype.is_floating_point and t.element_size() >= 2:
        t.copy_(torch.randn(t.shape, generator=g).to(t.dtype))
    else:  # random bytes that are not NaN for fp8 (0x7f/0xff are NaN in e4m3fn)
        b = torch.randint(0, 126, t.shape, generator=g, dtype=torch.uint8)
        t.view(torch.uint8).copy_(b)
    return t


def _kv(T, H, D, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return ((torch.randn(T, H, D, generator=g) * scale).to(DTYPE).to(DEVICE),
            (torch.randn(T, H, D, generator=g) * scale).to(DTYPE).to(DEVICE))


def _slots(T, nb, bs, seed, skip=(1, 4)):
    g = torch.Generator().manual_seed(seed)
    s = torch.randperm(nb * bs, generator=g)[:T].to(torch.int64)
    for i in skip:
        if i < T:
            s[i] = -1  # padding tokens
    if T > 6:
        s[6] = nb * bs + 3  # past the end of the cache: skipped, never written
    return s.to(DEVICE)


def _same(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.element_size() == 1:
        ok = a.view(torch.uint8) == b.view(torch.uint8)
        if a.dtype == torch.int8:  # round-half-up ties may differ by one code after fp reordering
            ok = ok | ((a.to(torch.int16) - b.to(torch.int16)).abs() <= 1)
        if a.dtype == FP8 and INTERPRET:
            # Triton 3.9's interpreter casts fp32 -> fp8 without carrying a mantissa round-up into
            # the exponent: a value that rounds up to a power of two comes out as half of it (the
            # GPU's cvt.rn is right). Accept exactly that case, nothing else.
            af, bf = a.float().cpu(), b.float().cpu()
            pow2 = torch.frexp(bf.abs())[0] == 0.5
            ok = ok.cpu() | (pow2 & (af * 2 == bf))
        bad = int((~ok).sum())
        assert bad == 0, f"{name}: {bad} of {a.numel()} bytes differ"
    else:
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("layout,asm,cache_dtype", [
    ("vllm", False, None), ("vllm_shuffled", True, None), ("vllm", False, FP8), ("vllm_shuffled", True, FP8),
])
def test_reshape_and_cache(layout, asm, cache_dtype):
    nb, bs, H, D, T = 6, 16, 2, 32, 20
    kc, vc = allocate_kv_cache(nb, bs, H, D, cache_dtype or DTYPE, layout, DEVICE)
    _random_fill(kc, 1), _random_fill(vc, 2)
    rk, rv = kc.clone(), vc.clone()
    key, value = _kv(T, H, D, 3, scale=3.0)
    slots = _slots(T, nb, bs, 4)
    ks = torch.tensor([0.05], device=DEVICE) if cache_dtype else None
    vs = torch.tensor([0.03], device=DEVICE) if cache_dtype else None
    aiter_pa.reshape_and_cache(key, value, kc, vc, slots, "fp8" if cache_dtype else "auto", ks, vs, asm)
    reshape_and_cache_ref(key, value, rk, rv, slots, None, ks, vs)
    _same(kc, rk, "key_cache")
    _same(vc, rv, "value_cache")


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_reshape_and_cache_flash_and_4d(layout):
    nb, bs, H, D, T = 5, 8, 3, 16, 15
    kc, vc = allocate_kv_cache(nb, bs, H, D, DTYPE, layout, DEVICE)
    _random_fill(kc, 5), _random_fill(vc, 6)
    rk, rv = kc.clone(), vc.clone()
    key, value = _kv(T, H, D, 7)
    slots = _slots(T, nb, bs, 8).to(torch.int32)
    if layout == "NHD":
        aiter_pa.reshape_and_cache_flash(key, value, kc, vc, slots, "auto", None, None)
    else:
        aiter_pa.reshape_and_cache(key, value, kc, vc, slots, "auto", kv_cache_layout="HND")
    reshape_and_cache_ref(key, value, rk, rv, slots, layout)
    _same(kc, rk, "key_cache")
    _same(vc, rv, "value_cache")


@pytest.mark.parametrize("layout,cache_dtype,scale_form", [
    ("vllm", FP8, "hip"), ("vllm_shuffled", torch.int8, "asm"), ("NHD", torch.uint8, "hip"), ("HND", FP8, "asm"),
])
def test_reshape_and_cache_with_pertoken_quant(layout, cache_dtype, scale_form):
    nb, bs, H, D, T = 4, 16, 2, 32, 24
    int4 = cache_dtype == torch.uint8
    kc, vc = allocate_kv_cache(nb, bs, H, D // 2 if int4 else D, cache_dtype, layout, DEVICE) if int4 else \
        allocate_kv_cache(nb, bs, H, D, cache_dtype, layout, DEVICE)
    _random_fill(kc, 9), _random_fill(vc, 10)
    shape = (H, nb * bs) if scale_form == "hip" else (nb, H, bs)
    ksc = torch.rand(shape, device=DEVICE)
    vsc = torch.rand(shape, device=DEVICE)
    rk, rv, rks, rvs = kc.clone(), vc.clone(), ksc.clone(), vsc.clone()
    key, value = _kv(T, H, D, 11, scale=2.0)
    slots = _slots(T, nb, bs, 12)
    layout_arg = layout if layout in ("NHD", "HND") else None
    aiter_pa.reshape_and_cache_with_pertoken_quant(key, value, kc, vc, ksc, vsc, slots, scale_form == "asm",
                                                   kv_cache_layout=layout_arg)
    reshape_and_cache_pertoken_ref(key, value, rk, rv, rks, rvs, slots, layout_arg, int4=int4)
    _same(kc, rk, "key_cache")
    _same(vc, rv, "value_cache")
    torch.testing.assert_close(ksc, rks, rtol=1e-6, atol=0)
    torch.testing.assert_close(vsc, rvs, rtol=1e-6, atol=0)


@pytest.mark.parametrize("layout,cache_dtype,asm", [("vllm", FP8, False), ("vllm_shuffled", torch.int8, True),
                                                    ("NHD", torch.int8, False)])
def test_reshape_and_cache_with_block_quant_scale_only_grows(layout, cache_dtype, asm):
    nb, bs, H, D = 4, 16, 2, 32
    kc, vc = allocate_kv_cache(nb, bs, H, D, cache_dtype, layout, DEVICE)
    kc.view(torch.uint8).zero_(), vc.view(torch.uint8).zero_()
    shape = (nb, H) if asm else (H, nb)
    ksc = torch.zeros(shape, device=DEVICE)
    vsc = torch.zeros(shape, device=DEVICE)
    rk, rv, rks, rvs = kc.clone(), vc.clone(), ksc.clone(), vsc.clone()
    layout_arg = layout if layout in ("NHD", "HND") else None
    # round 1: 2 requests x 5 tokens into blocks 1 and 2; round 2: larger values into the same blocks
    for rnd, mag in ((0, 1.0), (1, 4.0)):
        key, value = _kv(10, H, D, 20 + rnd, scale=mag)
        key, value = key.reshape(2, 5, H, D), value.reshape(2, 5, H, D)
        slots = torch.tensor([bs + 5 * rnd + i for i in range(5)] + [2 * bs + 5 * rnd + i for i in range(5)],
                             device=DEVICE)
        if rnd == 1:
            slots[3] = -1
            slots[7] = nb * bs  # past the end: skipped
        before = ksc.clone()
        aiter_pa.reshape_and_cache_with_block_quant(key, value, kc, vc, ksc, vsc, slots, asm,
                                                    kv_cache_layout=layout_arg)
        reshape_and_cache_block_quant_ref(key, value, rk, rv, rks, rvs, slots, layout_arg)
        assert torch.all(ksc >= before), "block scales must only grow"
        torch.testing.assert_close(ksc, rks, rtol=1e-6, atol=0)
        torch.testing.assert_close(vsc, rvs, rtol=1e-6, atol=0)
        _same(kc, rk, f"key_cache round {rnd}")
        _same(vc, rv, f"value_cache round {rnd}")
        rk.copy_(kc), rv.copy_(vc)  # next round starts from the same bytes (see _same's fp8 note)
    assert torch.all((ksc > 0) == torch.tensor([[b in (1, 2) for b in range(nb)]] * H, device=DEVICE).reshape(
        H, nb).T.reshape(shape) if asm else (ksc > 0) == torch.tensor([[b in (1, 2) for b in range(nb)]] * H,
                                                                      device=DEVICE))


def test_copy_and_swap_blocks():
    nb = 6
    kcs = [_random_fill(torch.empty(nb, 2, 8, 4, dtype=DTYPE, device=DEVICE), s) for s in (1, 2)]
    vcs = [_random_fill(torch.empty(nb, 2, 4, 8, dtype=torch.int8, device=DEVICE), s) for s in (3, 4)]
    refs_k, refs_v = [c.clone() for c in kcs], [c.clone() for c in vcs]
    mapping = torch.tensor([[0, 3], [2, 5], [2, 4]], dtype=torch.int64)
    aiter_pa.copy_blocks(kcs, vcs, mapping)
    copy_blocks_ref(refs_k, refs_v, mapping)
    # a mapping already on the device is not range-checked on the host: bad pairs copy nothing
    from aiter_pa.triton.launch import copy_blocks_launch

    copy_blocks_launch(kcs[0], torch.tensor([[1, 99], [-5, 0]], dtype=torch.int64, device=DEVICE))
    for a, b in zip(kcs + vcs, refs_k + refs_v):
        _same(a, b, "copy_blocks")
    src = _random_fill(torch.empty(4, 2, 8, 4, dtype=DTYPE), 7)
    dst = _random_fill(torch.empty(nb, 2, 8, 4, dtype=DTYPE, device=DEVICE), 8)
    expect = dst.clone()
    expect[5], expect[0] = src[1].to(DEVICE), src[3].to(DEVICE)
    aiter_pa.swap_blocks(src, dst, torch.tensor([[1, 5], [3, 0]]))
    _same(dst, expect, "swap_blocks")


def test_reference_backend_of_cache_write_agrees():
    nb, bs, H, D, T = 4, 16, 2, 32, 12
    caches = {}
    for backend in ("triton", "reference"):
        kc, vc = allocate_kv_cache(nb, bs, H, D, FP8, "vllm", DEVICE)
        _random_fill(kc, 1), _random_fill(vc, 2)
        g = torch.Generator().manual_seed(0)
        ksc, vsc = torch.rand(H, nb * bs, generator=g).to(DEVICE), torch.rand(H, nb * bs, generator=g).to(DEVICE)
        key, value = _kv(T, H, D, 3)
        aiter_pa.reshape_and_cache_with_pertoken_quant(key, value, kc, vc, ksc, vsc, _slots(T, nb, bs, 4), False,
                                                       backend=backend)
        caches[backend] = (kc, vc, ksc, vsc)
    for a, b in zip(caches["triton"], caches["reference"]):
        _same(a, b, "triton vs reference") if a.element_size() == 1 else torch.testing.assert_close(a, b, rtol=1e-6,
                                                                                                      atol=0)
