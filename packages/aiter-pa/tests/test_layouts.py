"""KV-cache layouts: shapes, conversions, addressing, scale forms (pure PyTorch, tier 1)."""

from __future__ import annotations

import pytest
import torch

from aiter_core.quant import KVQuant
from aiter_pa.layouts import (
    LAYOUTS,
    allocate_kv_cache,
    asm_V_shuffle,
    convert_kv_cache,
    describe_kv_cache,
    from_nhd,
    kv_cache_shapes,
    normalize_layout,
    scale_addressing,
    to_nhd,
)
from aiter_pa.reference import scale_per_slot


def _nhd(nb=3, bs=16, H=2, C=16, dtype=torch.float16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(nb, bs, H, C, generator=g).to(dtype), torch.randn(nb, bs, H, C, generator=g).to(dtype)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_round_trip_and_addressing(layout):
    k, v = _nhd()
    kc, vc = from_nhd(k, v, layout)
    assert tuple(kc.shape), tuple(vc.shape) == kv_cache_shapes(3, 16, 2, 16, torch.float16, layout)
    info = describe_kv_cache(kc, vc, layout if layout in ("NHD", "HND") else None)
    assert (info.layout, info.num_blocks, info.block_size, info.num_kv_heads, info.cols) == (layout, 3, 16, 2, 16)
    k2, v2 = to_nhd(kc, vc, layout if layout in ("NHD", "HND") else None)
    assert torch.equal(k2, k) and torch.equal(v2, v)
    # the address formula of aiter_core.triton_attn reaches the same element as the NHD index
    for cache, src, a in ((kc, k, info.k), (vc, v, info.v)):
        flat = cache.contiguous().view(-1)
        for blk, off, h, d in ((0, 0, 0, 0), (2, 15, 1, 9), (1, 7, 0, 15)):
            addr = blk * a.s_blk + h * a.s_head + (off // a.TX) * a.s_t_hi + (off % a.TX) * a.s_t_lo \
                + (d // a.CX) * a.s_c_hi + (d % a.CX) * a.s_c_lo
            assert flat[addr] == src[blk, off, h, d]


def test_convert_between_layouts_and_asm_shuffle():
    k, v = _nhd(dtype=torch.bfloat16)
    kv, vv = from_nhd(k, v, "vllm")
    ks, vs = convert_kv_cache(kv, vv, "vllm_shuffled")
    assert torch.equal(ks, kv) and torch.equal(vs, asm_V_shuffle(vv))
    kh, vh = convert_kv_cache(ks, vs, "HND")
    assert torch.equal(kh, k.transpose(1, 2)) and torch.equal(vh, v.transpose(1, 2))
    assert kv.shape[-1] == 8  # x = 16 bytes / 2


def test_allocate_quantized_and_int4_shapes():
    k, v = allocate_kv_cache(4, 16, 2, 64, torch.float8_e4m3fn, "vllm", quant=KVQuant.PER_TOKEN_8BIT)
    assert k.shape == (4, 2, 4, 16, 16) and v.shape == (4, 2, 64, 16) and k.dtype == torch.float8_e4m3fn
    k, v = allocate_kv_cache(4, 16, 2, 64, torch.bfloat16, "NHD", quant=KVQuant.PER_TOKEN_4BIT)
    assert k.dtype == torch.uint8 and k.shape == (4, 16, 2, 32)


def test_layout_errors():
    with pytest.raises(ValueError, match="layout must be one of"):
        normalize_layout("XYZ")
    k, v = _nhd()
    with pytest.raises(ValueError, match="value_cache must have the key_cache's shape"):
        describe_kv_cache(k, v[:, :8], "NHD")
    kc, vc = from_nhd(k, v, "vllm")
    with pytest.raises(ValueError, match="value_cache for the vllm layout"):
        describe_kv_cache(kc, vc[:, :, :8])
    with pytest.raises(ValueError, match="does not match 5-D caches"):
        describe_kv_cache(kc, vc, "HND")
    with pytest.raises(ValueError, match="block_size divisible by x"):
        kv_cache_shapes(2, 4, 1, 16, torch.float8_e4m3fn, "vllm_shuffled")


@pytest.mark.parametrize("form", ["core", "hip", "asm"])
def test_scale_forms_agree(form):
    nb, bs, H = 3, 4, 2
    core = torch.rand(H, nb * bs)
    scale = {"core": core, "hip": core.T.contiguous(), "asm": core.reshape(H, nb, bs).permute(1, 0, 2).contiguous()}[form]
    assert torch.equal(scale_per_slot(scale, KVQuant.PER_TOKEN_8BIT, nb, bs, H), core)
    sa = scale_addressing(scale, KVQuant.PER_TOKEN_8BIT, nb, bs, H, "k_scale")
    for blk, h, off in ((0, 0, 0), (2, 1, 3), (1, 0, 2)):
        assert scale.reshape(-1)[blk * sa.s_blk + h * sa.s_head + off * sa.s_tok] == core[h, blk * bs + off]


def test_scale_errors():
    with pytest.raises(ValueError, match="per-token quantization must be"):
        scale_addressing(torch.rand(5, 7), KVQuant.PER_TOKEN_8BIT, 3, 4, 2, "k_scale")
    with pytest.raises(TypeError, match="k_scale must be float32"):
        scale_addressing(torch.rand(1).half(), KVQuant.PER_TENSOR_8BIT, 3, 4, 2, "k_scale")
    with pytest.raises(ValueError, match="per-head"):
        scale_addressing(torch.rand(3), KVQuant.PER_HEAD_8BIT, 3, 4, 2, "v_scale")
    with pytest.raises(TypeError, match="must be a float32 tensor"):
        scale_addressing(None, KVQuant.PER_TENSOR_8BIT, 3, 4, 2, "v_scale")
