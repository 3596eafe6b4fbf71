"""MLA cache ops (Triton) against the PyTorch references: neox and interleaved RoPE, half and
full-width cos/sin tables, fp8 caches with a scale, skipped slots (tier 2)."""

from __future__ import annotations

import pytest
import torch

from aiter_mla import api
from aiter_mla.reference import (
    concat_and_cache_mla_ref,
    fused_qk_rope_cat_and_cache_mla_ref,
    fused_qk_rope_concat_and_cache_mla_ref,
    rope_ref,
)
from aiter_mla.testing import CUDA, DEVICE, INTERPRET, assert_close

pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="Triton kernels need TRITON_INTERPRET=1 or a GPU")

DTYPE = torch.float16 if CUDA else torch.float32
FP8 = torch.float8_e4m3fn
LORA, PE = 48, 16


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen).to(DEVICE, DTYPE)


def _slots(tokens, capacity, gen):
    slots = torch.randperm(capacity, generator=gen)[:tokens]
    slots[1] = -1  # skipped
    return slots.to(DEVICE)


def _needs_fp8_stores(fp8: bool) -> None:
    # Triton 3.9's interpreter converts fp32 -> fp8 wrongly (exact powers of two come out
    # halved: 2.0 -> 1.0), so fp8 *stores* are checked on the GPU tier only.
    if fp8 and INTERPRET:
        pytest.skip("the Triton interpreter's fp32 -> fp8 conversion is wrong; fp8 stores run on the GPU tier")


def _cache_close(name, got, ref):
    if got.dtype == FP8:
        # the same fp32 value is cast on both sides; allow one fp8 ulp for a rounding-mode difference
        assert_close(name, got.float(), ref.float(), 1e-6, 0.13)
    else:
        assert_close(name, got, ref, 1e-3 if CUDA else 1e-6, 1e-3)


@pytest.mark.parametrize("cache_dtype,slot_dtype", [(DTYPE, torch.int64), (DTYPE, torch.int32), (FP8, torch.int32)])
def test_concat_and_cache_mla(cache_dtype, slot_dtype):
    _needs_fp8_stores(cache_dtype == FP8)
    gen = torch.Generator().manual_seed(0)
    tokens, blocks, bs = 9, 4, 4
    kv_c, k_pe = _rand(tokens, LORA, gen=gen), _rand(tokens, 1, PE, gen=gen)
    cache = torch.randn(blocks, bs, LORA + PE, generator=gen).to(DEVICE).to(cache_dtype)
    before = cache.clone()
    slots = _slots(tokens, blocks * bs, gen).to(slot_dtype)
    scale = torch.tensor([0.5], device=DEVICE)
    api.concat_and_cache_mla(kv_c, k_pe, cache, slots, "fp8" if cache_dtype == FP8 else "auto", scale,
                                   backend="triton")
    ref = concat_and_cache_mla_ref(kv_c, k_pe, before, slots, scale)
    _cache_close("kv_cache", cache, ref)
    untouched = torch.ones(blocks * bs, dtype=torch.bool)
    untouched[slots[slots >= 0].cpu()] = False
    assert torch.equal(cache.view(blocks * bs, -1)[untouched.to(DEVICE)].float(),
                       before.view(blocks * bs, -1)[untouched.to(DEVICE)].float())


@pytest.mark.parametrize("is_neox,nope_first,full_width,fp8", [
    (True, True, False, False), (False, True, True, False), (False, False, False, False), (True, False, True, False),
    (False, False, False, True), (True, False, True, True),
])
def test_fused_qk_rope_concat_and_cache_mla(is_neox, nope_first, full_width, fp8):
    _needs_fp8_stores(fp8)
    gen = torch.Generator().manual_seed(1)
    tokens, heads, blocks, bs = 7, 5, 3, 4
    q_nope, q_pe = _rand(tokens, heads, LORA, gen=gen), _rand(tokens, heads, PE, gen=gen)
    kv_c, k_pe = _rand(tokens, LORA, gen=gen), _rand(tokens, PE, gen=gen)
    width = PE if full_width else PE // 2
    cos = torch.randn(32, width, generator=gen).to(DEVICE)
    sin = torch.randn(32, width, generator=gen).to(DEVICE)
    if full_width:  # a real full-width table repeats each frequency (halves for neox, pairs otherwise)
        half_c, half_s = cos[:, : PE // 2], sin[:, : PE // 2]
        cos = torch.cat([half_c, half_c], -1) if is_neox else half_c.repeat_interleave(2, -1)
        sin = torch.cat([half_s, half_s], -1) if is_neox else half_s.repeat_interleave(2, -1)
    positions = torch.randint(0, 32, (tokens,), generator=gen).to(DEVICE)
    cache_dtype = FP8 if fp8 else DTYPE
    cache = torch.randn(blocks, bs, 1, LORA + PE, generator=gen).to(DEVICE).to(cache_dtype)
    before = cache.clone()
    q_out = torch.full((tokens, heads, LORA + PE), float("nan"), device=DEVICE).to(cache_dtype)
    slots = _slots(tokens, blocks * bs, gen)
    k_scale = torch.tensor([0.7], device=DEVICE)
    q_scale = torch.tensor([1.3], device=DEVICE)
    api.fused_qk_rope_concat_and_cache_mla(q_nope, q_pe, kv_c, k_pe, cache, q_out, slots, k_scale, q_scale,
                                                 positions, cos, sin, is_neox, nope_first, backend="triton")
    ref_q, ref_cache = fused_qk_rope_concat_and_cache_mla_ref(q_nope, q_pe, kv_c, k_pe, before, q_out, slots,
                                                              k_scale, q_scale, positions, cos, sin, is_neox,
                                                              nope_first)
    _cache_close("q_out", q_out, ref_q)
    _cache_close("kv_cache", cache, ref_cache)


@pytest.mark.parametrize("is_neox,fp8,n_dec", [(True, False, 0), (False, False, 2), (False, True, 2)])
def test_fused_qk_rope_cat_and_cache_mla(is_neox, fp8, n_dec):
    _needs_fp8_stores(fp8)
    gen = torch.Generator().manual_seed(2)
    batch, q_heads, n_slot, k_heads, rows = 4, 6, 6, 1, 10
    q_nope, q_pe = _rand(batch, q_heads, LORA, gen=gen), _rand(batch, q_heads, PE, gen=gen)
    k_nope, k_pe = _rand(n_slot, k_heads, LORA, gen=gen), _rand(n_slot, k_heads, PE, gen=gen)
    cos = torch.randn(16, PE // 2, generator=gen).to(DEVICE)
    sin = torch.randn(16, PE // 2, generator=gen).to(DEVICE)
    pos = torch.randint(0, 16, (n_slot,), generator=gen).to(DEVICE)
    cache = torch.randn(rows, k_heads, LORA + PE, generator=gen).to(DEVICE).to(FP8 if fp8 else DTYPE)
    before = cache.clone()
    slots = _slots(n_slot, rows, gen)
    k_scale = torch.tensor([0.6], device=DEVICE)
    dq = torch.full((n_dec, q_heads, PE), float("nan"), device=DEVICE, dtype=DTYPE) if n_dec else None
    q_out, dq_out, k_pe_out, zeros = api.fused_qk_rope_cat_and_cache_mla(
        q_nope, q_pe, k_nope, k_pe, cache, slots, pos, cos, sin, k_scale, is_neox, num_decode_toks_for_zeros=n_dec,
        decode_q_pe_out=dq, backend="triton")
    ref_q, ref_kpe, ref_cache = fused_qk_rope_cat_and_cache_mla_ref(q_nope, q_pe, k_nope, k_pe, before, slots, pos,
                                                                   cos, sin, k_scale, is_neox)
    _cache_close("q_out", q_out, ref_q)
    _cache_close("k_pe_out", k_pe_out, ref_kpe)
    _cache_close("kv_cache", cache, ref_cache)
    if n_dec:
        assert dq_out is dq
        _cache_close("decode_q_pe_out", dq, rope_ref(q_pe[:n_dec], cos, sin, pos[:n_dec], is_neox))
        assert zeros.shape == (n_dec, q_heads, LORA) and (zeros == 0).all()
    else:
        assert dq_out is None and zeros is None
