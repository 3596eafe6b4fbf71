"""Bad input fails at the API boundary with TypeError/ValueError naming the argument (tier 1).

Each case checks the exception type and that the message names the argument, the expectation
and what came. A monkeypatched registry proves no backend ran.
"""

import pytest
import torch

import aiter_mha
from aiter_core.registry import get_registry


@pytest.fixture(autouse=True)
def no_backend_may_run(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a backend was dispatched for invalid input")

    monkeypatch.setattr(get_registry(), "run", forbidden)


def qkv(b=2, sq=4, sk=6, hq=4, hk=2, d=16, dv=16, dtype=torch.float16):
    return (torch.randn(b, sq, hq, d).to(dtype), torch.randn(b, sk, hk, d).to(dtype), torch.randn(b, sk, hk, dv).to(dtype))


def varlen(hq=4, hk=2, d=16, dtype=torch.float16):
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    return torch.randn(7, hq, d).to(dtype), torch.randn(7, hk, d).to(dtype), torch.randn(7, hk, d).to(dtype), cu


def expect(exc, *fragments):
    class _Ctx:
        def __enter__(self):
            self.cm = pytest.raises(exc)
            self.info = self.cm.__enter__()
            return self.info

        def __exit__(self, *a):
            handled = self.cm.__exit__(*a)
            msg = str(self.info.value)
            for f in fragments:
                assert f in msg, f"{f!r} not in message {msg!r}"
            return handled

    return _Ctx()


# -- dense ------------------------------------------------------------------------------------


def test_not_a_tensor():
    q, k, v = qkv()
    with expect(TypeError, "k must", "torch.Tensor", "list"):
        aiter_mha.flash_attn_func(q, [1, 2], v)


def test_wrong_dtype():
    q, k, v = qkv(dtype=torch.float16)
    with expect(TypeError, "q must", "float16/bfloat16/float32", "int32"):
        aiter_mha.flash_attn_func(q.to(torch.int32), k, v)
    with expect(TypeError, "v must", "float16 (the dtype of q)", "bfloat16"):
        aiter_mha.flash_attn_func(q, k, v.to(torch.bfloat16))


def test_fp8_input_points_to_fp8_function():
    q, k, v = qkv()
    with expect(TypeError, "q must", "flash_attn_fp8_pertensor_func", "float8_e4m3fn"):
        aiter_mha.flash_attn_func(*(x.to(torch.float8_e4m3fn) for x in (q, k, v)))


def test_wrong_rank():
    q, k, v = qkv()
    with expect(ValueError, "q must", "4-D", "3-D"):
        aiter_mha.flash_attn_func(q[0], k, v)


def test_batch_and_seqlen_mismatch():
    q, k, v = qkv()
    with expect(ValueError, "k must", "batch size 2", "1"):
        aiter_mha.flash_attn_func(q, k[:1], v)
    with expect(ValueError, "v must", "seqlen 6", "5"):
        aiter_mha.flash_attn_func(q, k, v[:, :5])


def test_head_dim_mismatch_and_range():
    q, k, v = qkv()
    with expect(ValueError, "k must", "head dim 16", "8"):
        aiter_mha.flash_attn_func(q, k[..., :8], v)
    q, k, v = qkv(d=264, dv=264)
    with expect(ValueError, "head dim", "<= 256", "264"):
        aiter_mha.flash_attn_func(q, k, v)
    q, k, v = qkv(d=4, dv=4)
    with expect(ValueError, "8 <= head dim", "4"):
        aiter_mha.flash_attn_func(q, k, v)


def test_gqa_ratio():
    q, k, v = qkv(hq=4, hk=3)
    with expect(ValueError, "k must", "dividing the 4 heads", "3"):
        aiter_mha.flash_attn_func(q, k, v)
    q, k, v = qkv(hq=4, hk=2)
    with expect(ValueError, "v must", "2 heads", "1"):
        aiter_mha.flash_attn_func(q, k, v[:, :, :1])


def test_last_dim_must_be_contiguous():
    q, k, v = qkv()
    strided = torch.randn(2, 4, 4, 32).to(torch.float16)[..., ::2]
    with expect(ValueError, "q must", "contiguous in its last dimension", "strides"):
        aiter_mha.flash_attn_func(strided, k, v)


def test_device_mismatch():
    q, k, v = qkv()
    meta_k = torch.empty(k.shape, dtype=k.dtype, device="meta")
    with expect(ValueError, "k must", "on cpu", "meta"):
        aiter_mha.flash_attn_func(q, meta_k, v)


def test_scalar_arguments():
    q, k, v = qkv()
    with expect(ValueError, "dropout_p must", "< 1.0", "1.0"):
        aiter_mha.flash_attn_func(q, k, v, dropout_p=1.0)
    with expect(ValueError, "dropout_p must", ">= 0.0", "-0.1"):
        aiter_mha.flash_attn_func(q, k, v, dropout_p=-0.1)
    with expect(TypeError, "softmax_scale must", "float", "str"):
        aiter_mha.flash_attn_func(q, k, v, softmax_scale="0.1")
    with expect(TypeError, "causal must", "bool", "int"):
        aiter_mha.flash_attn_func(q, k, v, causal=1)
    with expect(ValueError, "logits_soft_cap must", ">= 0.0", "-1"):
        aiter_mha.flash_attn_func(q, k, v, logits_soft_cap=-1.0)
    with expect(ValueError, "how_v3_bf16_cvt must", "0 (RTNE)", "5"):
        aiter_mha.flash_attn_func(q, k, v, how_v3_bf16_cvt=5)
    with expect(ValueError, "num_splits must", ">= 0", "-1"):
        aiter_mha.flash_attn_func(q, k, v, num_splits=-1)


def test_window_size():
    q, k, v = qkv()
    with expect(ValueError, "window_size must", "(left, right", "(1,)"):
        aiter_mha.flash_attn_func(q, k, v, window_size=(1,))
    with expect(TypeError, "window_size[1] must", "int", "float"):
        aiter_mha.flash_attn_func(q, k, v, window_size=(1, 2.0, 0))
    with expect(ValueError, "sink_size", ">= 0", "-2"):
        aiter_mha.flash_attn_func(q, k, v, window_size=(1, 0, -2))


def test_bias_alibi_sink_shapes_and_dtypes():
    q, k, v = qkv()
    with expect(ValueError, "bias must", "(4, 6)", "(6, 4)"):
        aiter_mha.flash_attn_func(q, k, v, bias=torch.randn(6, 4))
    with expect(TypeError, "bias must", "float32/float16/bfloat16", "int64"):
        aiter_mha.flash_attn_func(q, k, v, bias=torch.zeros(4, 6, dtype=torch.int64))
    with expect(ValueError, "alibi_slopes must", "(4,) or (2, 4)", "(2,)"):
        aiter_mha.flash_attn_func(q, k, v, alibi_slopes=torch.rand(2))
    with expect(TypeError, "alibi_slopes must", "float32", "float16"):
        aiter_mha.flash_attn_func(q, k, v, alibi_slopes=torch.rand(4).half())
    with expect(ValueError, "sink_ptr must", "(4,)", "(2,)"):
        aiter_mha.flash_attn_func(q, k, v, sink_ptr=torch.rand(2))
    with expect(TypeError, "sink_ptr must", "float32", "float16"):
        aiter_mha.flash_attn_func(q, k, v, sink_ptr=torch.rand(4).half())


def test_batch_cu_seqlens():
    q, k, v = qkv()
    with expect(ValueError, "cu_seqlens_q must", "3 entries", "4"):
        aiter_mha.flash_attn_func(q, k, v, cu_seqlens_q=torch.tensor([0, 1, 2, 3], dtype=torch.int32))
    with expect(TypeError, "cu_seqlens_kv must", "int32", "float32"):
        aiter_mha.flash_attn_func(q, k, v, cu_seqlens_kv=torch.tensor([0.0, 1.0, 2.0]))


# -- varlen -----------------------------------------------------------------------------------


def test_varlen_layout_and_seqlens():
    q, k, v, cu = varlen()
    with expect(ValueError, "q must", "3-D", "(total_q", "4-D"):
        aiter_mha.flash_attn_varlen_func(q[None], k, v, cu, cu, 4, 4)
    with expect(TypeError, "cu_seqlens_q must", "int32", "float32"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu.float(), cu, 4, 4)
    with expect(ValueError, "cu_seqlens_k must", "3 entries", "2"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu[:2], 4, 4)
    with expect(ValueError, "cu_seqlens_q must", "1-D", "(3, 1)"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu[:, None], cu, 4, 4)
    with expect(TypeError, "cu_seqlens_k must", "int32", "None"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, None, 4, 4)
    with expect(TypeError, "max_seqlen_q must", "int", "float"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4.0, 4)
    with expect(ValueError, "min_seqlen_q must", ">= 0", "-1"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, min_seqlen_q=-1)
    with expect(ValueError, "bias must", "(4, 4)", "(max_seqlen_q, max_seqlen_k)", "(3, 3)"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, bias=torch.randn(3, 3))
    with expect(ValueError, "cu_seqlens_q_padded must", "3 entries", "2"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, cu_seqlens_q_padded=cu[:2])


def test_varlen_out_buffer():
    q, k, v, cu = varlen()
    with expect(ValueError, "out must", "(7, 4, 16)", "(7, 4, 8)"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, out=torch.empty(7, 4, 8, dtype=q.dtype))
    with expect(TypeError, "out must", "float16", "float32"):
        aiter_mha.flash_attn_varlen_func(q, k, v, cu, cu, 4, 4, out=torch.empty(7, 4, 16))


def test_paged_arguments():
    q, _, _, cu = varlen()
    k_cache, v_cache = torch.randn(5, 4, 2, 16).half(), torch.randn(5, 4, 2, 16).half()
    table = torch.zeros(2, 2, dtype=torch.int32)
    with expect(TypeError, "block_table must", "int32", "int64"):
        aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu, cu, 4, 4, block_table=table.long())
    with expect(ValueError, "block_table must", "2 rows", "3"):
        aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu, cu, 4, 4, block_table=torch.zeros(3, 2, dtype=torch.int32))
    with expect(ValueError, "k must", "4-D", "paged cache", "3-D"):
        aiter_mha.flash_attn_varlen_func(q, k_cache[0], v_cache[0], cu, cu, 4, 4, block_table=table)
    with expect(ValueError, "max_seqlen_k must", "at most 8", "9"):
        aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu, cu, 4, 9, block_table=table)
    with expect(ValueError, "cu_seqlens_q_padded", "block_table"):
        aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu, cu, 4, 4, block_table=table, cu_seqlens_q_padded=cu)
    with expect(ValueError, "block_table must", "forward-only"):
        aiter_mha.flash_attn_varlen_func(q.requires_grad_(), k_cache, v_cache, cu, cu, 4, 4, block_table=table)


# -- fp8 --------------------------------------------------------------------------------------


def test_fp8_pertensor_arguments():
    q, k, v = (x.to(torch.float8_e4m3fn) for x in qkv())
    d = torch.ones(1)
    with expect(TypeError, "q must", "float8", "float16"):
        aiter_mha.flash_attn_fp8_pertensor_func(q.half(), k, v, d, d, d)
    with expect(ValueError, "k_descale must", "(1,) or (2, 2)", "(2, 4)"):
        aiter_mha.flash_attn_fp8_pertensor_func(q, k, v, d, torch.ones(2, 4), d)
    with expect(TypeError, "v_descale must", "float32", "float16"):
        aiter_mha.flash_attn_fp8_pertensor_func(q, k, v, d, d, d.half())


def test_fp8_func_unsupported_options():
    q, k, v = qkv()
    with pytest.raises(NotImplementedError, match="num_splits"):
        aiter_mha.flash_attn_fp8_func(q, k, v, num_splits=2)
    with pytest.raises(NotImplementedError, match="qv"):
        aiter_mha.flash_attn_fp8_func(q, k, v, qv=q)
    with expect(TypeError, "q must", "float16/bfloat16/float32", "float8"):
        aiter_mha.flash_attn_fp8_func(q.to(torch.float8_e4m3fn), k, v)


# -- low-level ops ----------------------------------------------------------------------------


def test_low_level_descales_and_rng_state():
    q, k, v = qkv()
    with expect(TypeError, "q_descale must", "float32 tensor", "None"):
        aiter_mha.mha_fwd(*(x.to(torch.float8_e4m3fn) for x in (q, k, v)), 0.0, 0.25, False, -1, -1, 0, False, False)
    with expect(ValueError, "q_descale/k_descale/v_descale must", "fp8 only"):
        aiter_mha.mha_fwd(q, k, v, 0.0, 0.25, False, -1, -1, 0, False, False, q_descale=torch.ones(1))
    out = torch.randn(2, 4, 4, 16).half()
    lse = torch.randn(2, 4, 4)
    with expect(TypeError, "rng_state must", "(2,) int64", "None"):
        aiter_mha.mha_bwd(out, q, k, v, out, lse, 0.1, 0.25, False, -1, -1, False)
    with expect(ValueError, "softmax_lse must", "(2, 4, 4)", "got (4, 4)"):
        aiter_mha.mha_bwd(out, q, k, v, out, lse[0], 0.0, 0.25, False, -1, -1, False)
    with expect(ValueError, "dq must", "(2, 4, 4, 16)", "(2, 4, 4, 8)"):
        aiter_mha.mha_bwd(out, q, k, v, out, lse, 0.0, 0.25, False, -1, -1, False, dq=torch.empty(2, 4, 4, 8).half())
    with expect(ValueError, "d_sink must", "None when sink is None"):
        aiter_mha.mha_bwd(out, q, k, v, out, lse, 0.0, 0.25, False, -1, -1, False, d_sink=torch.empty(4))


# -- KV cache ---------------------------------------------------------------------------------


def test_kvcache_arguments():
    q = torch.randn(2, 1, 4, 16)
    k_cache, v_cache = torch.randn(2, 8, 2, 16), torch.randn(2, 8, 2, 16)
    kn = torch.randn(2, 1, 2, 16)
    with expect(TypeError, "cache_seqlens must", "int32", "int64"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=torch.tensor([1, 2]))
    with expect(ValueError, "k and v must be given together"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, k=kn, cache_seqlens=1)
    with expect(TypeError, "cache_seqlens must", "appending", "None"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, k=kn, v=kn)
    with expect(ValueError, "rotary_cos must", "no new k/v are appended"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, rotary_cos=torch.ones(8, 4), rotary_sin=torch.ones(8, 4))
    with expect(ValueError, "rotary_cos must", "at least 8 positions", "4"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, kn, kn, cache_seqlens=1, rotary_cos=torch.ones(4, 4), rotary_sin=torch.ones(4, 4))
    with expect(ValueError, "k_cache must", "dividing the 4 heads", "3"):
        aiter_mha.flash_attn_with_kvcache(q, torch.randn(2, 8, 3, 16), torch.randn(2, 8, 3, 16), cache_seqlens=1)
    with expect(ValueError, "cache_batch_idx must", "paged"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, block_table=torch.zeros(2, 4, dtype=torch.int32),
                                          cache_batch_idx=torch.zeros(2, dtype=torch.int32))
    with pytest.raises(NotImplementedError, match="cache_leftpad"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=1, cache_leftpad=torch.zeros(2, dtype=torch.int32))
    with expect(TypeError, "cache_seqlens must", "paged cache", "None"):
        aiter_mha.flash_attn_with_kvcache(q, k_cache, v_cache, block_table=torch.zeros(2, 4, dtype=torch.int32))


# -- torch.ops.aiter.<op> called directly validates like the public function ---------------------------


def _direct_cases():
    """op -> (public call, the same call through torch.ops.aiter.<op>), each with a v of the wrong dtype."""
    q, k, v = qkv()
    v_bad = v.to(torch.bfloat16)
    qp, kp, vp, cu = varlen()
    vp_bad = vp.to(torch.bfloat16)
    fp8 = torch.float8_e4m3fn
    q8, k8 = q.to(fp8), k.to(fp8)
    d = torch.ones(1)
    out, lse = torch.randn(2, 4, 4, 16).half(), torch.randn(2, 4, 4)
    out_p, lse_p = torch.randn(7, 4, 16).half(), torch.randn(4, 7)
    kc, vc = torch.randn(2, 8, 2, 16).half(), torch.randn(2, 8, 2, 16).bfloat16()
    q1 = torch.randn(2, 1, 4, 16).half()
    lens = torch.tensor([3, 5], dtype=torch.int32)
    ops = torch.ops.aiter
    return {
        "mha_fwd": (lambda: aiter_mha.mha_fwd(q, k, v_bad, 0.0, 0.25, False, -1, -1, 0, True, False),
                    lambda: ops.mha_fwd(q, k, v_bad, 0.0, 0.25, False, -1, -1, 0, True, False)),
        "mha_varlen_fwd": (
            lambda: aiter_mha.mha_varlen_fwd(qp, kp, vp_bad, cu, cu, 4, 4, 0, 0.0, 0.25, 0.0, False, False, -1, -1, 0,
                                             True, False),
            lambda: ops.mha_varlen_fwd(qp, kp, vp_bad, cu, cu, 4, 4, 0, 0.0, 0.25, 0.0, False, False, -1, -1, 0, True,
                                       False)),
        "mha_bwd": (lambda: aiter_mha.mha_bwd(out, q, k, v_bad, out, lse, 0.0, 0.25, False, -1, -1, False),
                    lambda: ops.mha_bwd(out, q, k, v_bad, out, lse, 0.0, 0.25, False, -1, -1, False)),
        "mha_varlen_bwd": (
            lambda: aiter_mha.mha_varlen_bwd(out_p, qp, kp, vp_bad, out_p, lse_p, cu, cu, 4, 4, 0.0, 0.25, False,
                                             False, -1, -1, False),
            lambda: ops.mha_varlen_bwd(out_p, qp, kp, vp_bad, out_p, lse_p, cu, cu, 4, 4, 0.0, 0.25, False, False, -1,
                                       -1, False)),
        "flash_attn_func": (lambda: aiter_mha.flash_attn_func(q, k, v_bad),
                            lambda: ops.flash_attn_func(q, k, v_bad)),
        "flash_attn_varlen_func": (lambda: aiter_mha.flash_attn_varlen_func(qp, kp, vp_bad, cu, cu, 4, 4),
                                   lambda: ops.flash_attn_varlen_func(qp, kp, vp_bad, cu, cu, 4, 4)),
        "flash_attn_fp8_pertensor_func": (
            lambda: aiter_mha.flash_attn_fp8_pertensor_func(q8, k8, v_bad, d, d, d),
            lambda: ops.flash_attn_fp8_pertensor_func(q8, k8, v_bad, d, d, d)),
        "flash_attn_varlen_fp8_pertensor_func": (
            lambda: aiter_mha.flash_attn_varlen_fp8_pertensor_func(qp.to(fp8), kp.to(fp8), vp_bad, d, d, d, cu, cu, 4,
                                                                   4),
            lambda: ops.flash_attn_varlen_fp8_pertensor_func(qp.to(fp8), kp.to(fp8), vp_bad, d, d, d, cu, cu, 4, 4)),
        "flash_attn_fp8_func": (lambda: aiter_mha.flash_attn_fp8_func(q, k, v_bad),
                                lambda: ops.flash_attn_fp8_func(q, k, v_bad)),
        "flash_attn_varlen_fp8_func": (lambda: aiter_mha.flash_attn_varlen_fp8_func(qp, kp, vp_bad, cu, cu, 4, 4),
                                       lambda: ops.flash_attn_varlen_fp8_func(qp, kp, vp_bad, cu, cu, 4, 4)),
        "flash_attn_with_kvcache": (lambda: aiter_mha.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens),
                                    lambda: ops.flash_attn_with_kvcache(q1, kc, vc, cache_seqlens=lens)),
    }


def test_every_op_has_a_direct_call_case():
    from aiter_mha.ops import OPS

    assert set(_direct_cases()) == set(OPS)


@pytest.mark.parametrize("op", sorted(_direct_cases()))
def test_direct_torch_ops_call_validates_like_the_public_function(op):
    public, direct = _direct_cases()[op]
    with pytest.raises((TypeError, ValueError)) as via_api:
        public()
    with pytest.raises((TypeError, ValueError)) as via_torch_ops:
        direct()
    assert type(via_torch_ops.value) is type(via_api.value)
    assert str(via_torch_ops.value) == str(via_api.value)
    assert "must have dtype" in str(via_api.value) and "bfloat16" in str(via_api.value)


def test_direct_torch_ops_call_checks_values_the_schema_lets_through():
    q, k, v = qkv()
    with expect(ValueError, "alibi_slopes must", "(4,) or (2, 4)", "(3,)"):
        torch.ops.aiter.flash_attn_func(q, k, v, alibi_slopes=torch.rand(3))
    with expect(ValueError, "dropout_p must", "< 1.0"):
        torch.ops.aiter.mha_fwd(q, k, v, 1.5, 0.25, False, -1, -1, 0, True, False)
    with expect(ValueError, "window_size[2] (sink_size)", ">= 0", "-1"):
        torch.ops.aiter.mha_fwd(q, k, v, 0.0, 0.25, False, 3, -1, -1, True, False)
