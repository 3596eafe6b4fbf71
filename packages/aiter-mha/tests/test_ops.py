"""torch.library registration: opcheck on the four aiter:: ops and torch.compile(fullgraph=True)
of the autograd-wrapped public functions, on the CPU through the reference backend (tier 1)."""

import re

import pytest
import torch
from torch.library import opcheck

import aiter_mha
import aiter_mha.ops  # noqa: F401  (registers the ops)
from aiter_mha.reference import attention_ref

REF = "reference"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def dense(b=2, sq=5, sk=7, hq=4, hk=2, d=16, dv=16, dtype=torch.float32):
    return torch.randn(b, sq, hq, d, dtype=dtype), torch.randn(b, sk, hk, d, dtype=dtype), torch.randn(b, sk, hk, dv, dtype=dtype)


def _mutated_args(schema: str) -> set[str]:
    return set(re.findall(r"Tensor\(a\d+!\)\? (\w+)", schema))


def test_ops_are_registered_with_exact_mutations():
    schemas = {name: str(getattr(torch.ops.aiter, name).default._schema) for name in ("mha_fwd", "mha_varlen_fwd", "mha_bwd", "mha_varlen_bwd")}
    assert _mutated_args(schemas["mha_fwd"]) == {"out"}
    assert _mutated_args(schemas["mha_varlen_fwd"]) == {"out"}
    assert _mutated_args(schemas["mha_bwd"]) == {"dq", "dk", "dv", "dbias", "d_sink"}
    assert _mutated_args(schemas["mha_varlen_bwd"]) == {"dq", "dk", "dv", "dbias", "d_sink"}
    for schema in schemas.values():  # nothing else is declared mutable, and gen became rng_state
        assert schema.count("!") == len(_mutated_args(schema)) and "Tensor? rng_state" in schema


def test_opcheck_mha_fwd():
    q, k, v = dense()
    opcheck(torch.ops.aiter.mha_fwd.default, (q, k, v, 0.0, 0.25, True, -1, -1, 0, True, False), {"backend": REF})
    sink, bias = torch.randn(4), torch.randn(5, 7)
    opcheck(torch.ops.aiter.mha_fwd.default, (q, k, v, 0.0, 0.25, False, 3, 1, 1, True, False),
            {"bias": bias, "sink_ptr": sink, "logits_soft_cap": 5.0, "backend": REF})
    out = torch.empty(2, 5, 4, 16)
    opcheck(torch.ops.aiter.mha_fwd.default, (q, k, v, 0.0, 0.25, True, -1, -1, 0, False, False), {"out": out, "backend": REF})


def test_opcheck_mha_fwd_dropout_with_given_rng_state():
    q, k, v = dense()
    rng = torch.tensor([123, 0], dtype=torch.int64)
    opcheck(torch.ops.aiter.mha_fwd.default, (q, k, v, 0.2, 0.25, False, -1, -1, 0, True, True), {"rng_state": rng, "backend": REF})


def test_opcheck_mha_varlen_fwd_and_paged():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    args = (q, k, v, cu, cu, 5, 5, 0, 0.0, 0.25, 0.0, False, True, -1, -1, 0, True, False)
    opcheck(torch.ops.aiter.mha_varlen_fwd.default, args, {"backend": REF})
    k_cache, v_cache = torch.randn(4, 4, 2, 16), torch.randn(4, 4, 2, 16)
    table = torch.tensor([[2, 0], [1, 3]], dtype=torch.int32)
    args = (q, k_cache, v_cache, cu, cu, 5, 8, 0, 0.0, 0.25, 0.0, False, True, -1, -1, 0, True, False)
    opcheck(torch.ops.aiter.mha_varlen_fwd.default, args, {"block_table": table, "backend": REF})


def test_opcheck_mha_bwd():
    q, k, v = dense()
    sink = torch.randn(4)
    out, lse, _, _ = torch.ops.aiter.mha_fwd(q, k, v, 0.0, 0.25, True, -1, -1, 0, True, False, sink_ptr=sink, backend=REF)
    dout = torch.randn_like(out)
    opcheck(torch.ops.aiter.mha_bwd.default, (dout, q, k, v, out, lse, 0.0, 0.25, True, -1, -1, False),
            {"sink": sink, "d_sink": torch.zeros(4), "backend": REF})
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    opcheck(torch.ops.aiter.mha_bwd.default, (dout, q, k, v, out, lse, 0.0, 0.25, True, -1, -1, False),
            {"dq": dq, "dk": dk, "dv": dv, "sink": sink, "backend": REF})


def test_opcheck_mha_varlen_bwd():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = torch.randn(8, 4, 16), torch.randn(8, 2, 16), torch.randn(8, 2, 16)
    out, lse, _, _ = torch.ops.aiter.mha_varlen_fwd(q, k, v, cu, cu, 5, 5, 0, 0.0, 0.25, 0.0, False, True, -1, -1, 0, True,
                                                    False, backend=REF)
    args = (torch.randn_like(out), q, k, v, out, lse, cu, cu, 5, 5, 0.0, 0.25, False, True, -1, -1, False)
    bias = torch.randn(5, 5)
    opcheck(torch.ops.aiter.mha_varlen_bwd.default, args, {"bias": bias, "dbias": torch.zeros(5, 5), "backend": REF})


def test_fake_shapes_match_real_outputs():
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v = dense(dv=8)
    real = torch.ops.aiter.mha_fwd(q, k, v, 0.1, 0.25, False, -1, -1, 0, True, True, backend=REF)
    with FakeTensorMode() as mode:
        fq, fk, fv = (mode.from_tensor(x) for x in (q, k, v))
        fake = torch.ops.aiter.mha_fwd(fq, fk, fv, 0.1, 0.25, False, -1, -1, 0, True, True, backend=REF)
    for r, f in zip(real, fake):
        assert r.shape == f.shape and r.dtype == f.dtype and r.stride() == f.stride()


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_flash_attn_func_compiles_fullgraph_forward_backward(compile_backend):
    q, k, v = dense()
    sink = torch.randn(4)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, sink)]

    def f(q, k, v, sink):
        out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, sink_ptr=sink, return_lse=True, backend=REF)
        return out, lse

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend=compile_backend)
    out, lse = compiled(*leaves)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, leaves, g)
    refs = [x.clone().requires_grad_() for x in (q, k, v, sink)]
    ref_out, _, ref_lse = attention_ref(*refs[:3], causal=True, sink=refs[3])
    want = torch.autograd.grad(ref_out, refs, g)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_flash_attn_varlen_func_compiles_fullgraph_with_dropout():
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    q, k, v = (torch.randn(8, h, 16, requires_grad=True) for h in (4, 2, 2))

    def f(q, k, v):
        return aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, dropout_p=0.25, causal=True, return_attn_probs=True, backend=REF)

    torch._dynamo.reset()
    out, s_dmask = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    (dq,) = torch.autograd.grad(out.sum(), [q])
    assert torch.isfinite(dq).all() and dq.abs().sum() > 0
    # the compiled forward's dropout mask agrees with its output
    from aiter_mha.reference import dropout_mask_from_s_dmask

    keep = dropout_mask_from_s_dmask(s_dmask)
    for b in range(2):
        s = slice(int(cu[b]), int(cu[b + 1]))
        n = s.stop - s.start
        ref = attention_ref(q[None, s], k[None, s], v[None, s], causal=True, dropout_p=0.25, dropout_mask=keep[None, :, s, :n])[0]
        torch.testing.assert_close(out[s], ref[0], atol=1e-5, rtol=1e-5)


def test_kvcache_compiles_fullgraph():
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    kn, vn = torch.randn(2, 1, 2, 16), torch.randn(2, 1, 2, 16)
    lens = torch.tensor([3, 5], dtype=torch.int32)
    k2, v2 = k_cache.clone(), v_cache.clone()

    def f(q, kc, vc, kn, vn, lens):
        return aiter_mha.flash_attn_with_kvcache(q, kc, vc, kn, vn, cache_seqlens=lens, backend=REF)

    torch._dynamo.reset()
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k_cache, v_cache, kn, vn, lens)
    want = f(q, k2, v2, kn, vn, lens)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache, k2, atol=0, rtol=0)  # the in-place append survived compilation


def test_self_attention_with_one_tensor_for_q_k_v_compiles():
    x = torch.randn(1, 6, 2, 16, requires_grad=True)

    def f(x):
        return aiter_mha.flash_attn_func(x, x, x, causal=True, backend=REF)

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(x)
    (dx,) = torch.autograd.grad(out.sum(), [x])
    xr = x.detach().clone().requires_grad_()
    ref = attention_ref(xr, xr, xr, causal=True)[0]
    (want,) = torch.autograd.grad(ref.sum(), [xr])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, want, atol=1e-5, rtol=1e-5)


def test_family_smoke_passes_on_this_device():
    from aiter_mha.smoke import run

    summary = run()
    assert summary.startswith("mha: ") and "max err" in summary
