import pytest
import torch

from aiter_core.quant import KVQuant, QuantType, dequantize_kv, kv_scale_shape, quantize_kv


def test_quant_type_values_match_upstream():
    assert [(q.name, q.value) for q in QuantType] == [
        ("No", 0), ("per_Tensor", 1), ("per_Token", 2), ("per_1x32", 3),
        ("per_1x128", 4), ("per_128x128", 5), ("per_256x128", 6), ("per_1024x128", 7),
    ]
    assert QuantType(2) is QuantType.per_Token
    assert [m.value for m in KVQuant] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "method, store, rel_tol",
    [
        (KVQuant.PER_TENSOR_8BIT, torch.float8_e4m3fn, 0.07),
        (KVQuant.PER_HEAD_8BIT, torch.float8_e4m3fn, 0.07),
        (KVQuant.PER_TOKEN_8BIT, torch.float8_e4m3fn, 0.07),
        (KVQuant.PER_TOKEN_8BIT, torch.int8, 0.01),
        (KVQuant.PER_HEAD_8BIT, torch.int8, 0.01),
        (KVQuant.PER_TOKEN_4BIT, None, 0.16),
    ],
)
def test_kv_roundtrip(method, store, rel_tol):
    torch.manual_seed(0)
    T, H, D = 37, 3, 16
    # rows of very different magnitude: per-token/per-head scales must follow them
    x = torch.randn(T, H, D) * torch.logspace(-2, 2, T).reshape(T, 1, 1)
    stored, scale = quantize_kv(x, method, store)
    assert tuple(scale.shape) == kv_scale_shape(method, T, H)
    if method == KVQuant.PER_TOKEN_4BIT:
        assert stored.dtype == torch.uint8 and stored.shape == (T, H, D // 2)
    else:
        assert stored.dtype == store and stored.shape == x.shape
    y = dequantize_kv(stored, scale, method)
    # error relative to each row's absmax (per-tensor: the global one)
    if method in (KVQuant.PER_TENSOR_8BIT,):
        ref = x.abs().amax()
    elif method == KVQuant.PER_HEAD_8BIT:
        ref = x.abs().amax(dim=(0, 2), keepdim=True)
    else:
        ref = x.abs().amax(dim=2, keepdim=True)
    err = ((y - x).abs() / ref).amax().item()
    assert err <= rel_tol, err


def test_int4_packing_layout():
    x = torch.tensor([[[1.0, -2.0, 7.0, -8.0]]])  # absmax 8 -> scale 8/7
    stored, scale = quantize_kv(x, KVQuant.PER_TOKEN_4BIT)
    q = torch.round(x / scale.reshape(1, 1, 1)).clamp(-8, 7).to(torch.int16)
    lo, hi = q[..., 0::2] & 0xF, q[..., 1::2] & 0xF
    assert torch.equal(stored.to(torch.int16), lo | (hi << 4))
    assert torch.allclose(dequantize_kv(stored, scale, KVQuant.PER_TOKEN_4BIT), q.float() * scale.reshape(1, 1, 1))


def test_zero_rows_do_not_divide_by_zero():
    x = torch.zeros(4, 2, 8)
    stored, scale = quantize_kv(x, KVQuant.PER_TOKEN_8BIT, torch.float8_e4m3fn)
    assert torch.isfinite(scale).all() and (scale > 0).all()
    assert torch.equal(dequantize_kv(stored, scale, KVQuant.PER_TOKEN_8BIT), x)


def test_none_is_identity():
    x = torch.randn(2, 2, 4)
    stored, scale = quantize_kv(x, KVQuant.NONE)
    assert stored is x and scale is None and kv_scale_shape(KVQuant.NONE, 2, 2) == ()


def test_errors():
    with pytest.raises(ValueError, match=r"x must be \[num_tokens, num_kv_heads, head_dim\], got shape \(4, 8\)"):
        quantize_kv(torch.randn(4, 8), KVQuant.PER_TOKEN_8BIT)
    with pytest.raises(TypeError, match="8-bit KV cache dtype must be int8 or an fp8 type, got torch.float16"):
        quantize_kv(torch.randn(4, 2, 8), KVQuant.PER_TOKEN_8BIT, torch.float16)
    with pytest.raises(ValueError, match="even head_dim"):
        quantize_kv(torch.randn(4, 2, 7), KVQuant.PER_TOKEN_4BIT)
    stored, scale = quantize_kv(torch.randn(4, 2, 8), KVQuant.PER_TOKEN_8BIT, torch.int8)
    with pytest.raises(ValueError, match=r"scale must have shape \(2, 4\), got \(4, 2\)"):
        dequantize_kv(stored, scale.t(), KVQuant.PER_TOKEN_8BIT)
    with pytest.raises(ValueError, match="needs a dequantization scale"):
        dequantize_kv(stored, None, KVQuant.PER_TOKEN_8BIT)
