"""Bad input fails at the API boundary with ValueError / TypeError that names the argument
(tier 1: nothing here reaches a kernel), plus op registration, fake implementations and the
registry entries."""

from __future__ import annotations

import pytest
import torch

import aiter_pa
from aiter_core.quant import KVQuant
from aiter_pa.testing import make_paged_kv

FP8 = torch.float8_e4m3fn


def _decode(**over):
    kv = make_paged_kv([20, 9], 2, 32, 16, "HND", KVQuant.NONE, torch.float32, seed=1)
    args = dict(output=torch.empty(2, 4, 32), query=torch.randn(2, 4, 32), key_cache=kv.key_cache,
                value_cache=kv.value_cache, seq_lens=kv.context_lens, block_tables=kv.block_tables, attn_scale=0.1,
                max_seq_len=20, compute_type=None, k_scale=None, v_scale=None)
    args.update(over)
    aiter_pa.paged_attention_decode(**args)


def test_block_table_too_short():
    with pytest.raises(ValueError, match="block_tables is too narrow"):
        _decode(max_seq_len=1000)


def test_dtype_and_shape_errors():
    with pytest.raises(TypeError, match="query must be float16, bfloat16 or float32"):
        _decode(query=torch.randn(2, 4, 32).to(FP8))
    with pytest.raises(ValueError, match="query heads .* multiple of the KV heads"):
        _decode(query=torch.randn(2, 3, 32), output=torch.empty(2, 3, 32))
    with pytest.raises(ValueError, match="output must have shape"):
        _decode(output=torch.empty(2, 4, 16))
    with pytest.raises(TypeError, match="block_tables must have dtype int32/int64"):
        _decode(block_tables=torch.zeros(2, 3))
    with pytest.raises(ValueError, match="query must have num_seqs"):
        _decode(query=torch.randn(3, 4, 32), output=torch.empty(3, 4, 32))
    with pytest.raises(ValueError, match="high_precision must be 0, 1 or 2"):
        _decode(high_precision=3)
    with pytest.raises(TypeError, match="must match the query dtype"):
        _decode(query=torch.randn(2, 4, 32).half(), output=torch.empty(2, 4, 32).half())
    with pytest.raises(ValueError, match="alibi_slopes must be float32"):
        _decode(alibi_slopes=torch.rand(3))


def test_quantized_cache_scale_errors():
    kv = make_paged_kv([20, 9], 2, 32, 16, "HND", KVQuant.PER_TOKEN_8BIT, torch.float32, FP8, seed=2)
    base = dict(output=torch.empty(2, 4, 32), query=torch.randn(2, 4, 32), key_cache=kv.key_cache,
                value_cache=kv.value_cache, seq_lens=kv.context_lens, block_tables=kv.block_tables, attn_scale=0.1,
                max_seq_len=20, compute_type=None)
    with pytest.raises(ValueError, match="k_scale for per-token quantization must be"):
        aiter_pa.paged_attention_decode(**base, k_scale=torch.rand(5, 5), v_scale=torch.rand(5, 5))
    with pytest.raises(TypeError, match="needs k_scale/v_scale float32 tensors"):
        aiter_pa.paged_attention_decode(**base, k_scale=None, v_scale=None)
    with pytest.raises(TypeError, match="k_scale must be float32"):
        aiter_pa.paged_attention_decode(**base, k_scale=kv.k_scale.half(), v_scale=kv.v_scale)
    ws = torch.empty(1 << 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match="kv_cache_dtype='auto'"):
        aiter_pa.paged_attention_v1(base["output"], ws, base["query"], kv.key_cache, kv.value_cache, 0.1,
                                    kv.block_tables, None, kv.context_lens, 20, None, "auto", "HND", 0.0, kv.k_scale,
                                    kv.v_scale)


def test_front_end_specific_errors():
    kv = make_paged_kv([40, 9], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=3)
    q, out = torch.randn(2, 4, 32), torch.empty(2, 4, 32)
    es = torch.empty(2, 4, 1)
    with pytest.raises(ValueError, match="needs 2"):
        aiter_pa.paged_attention_rocm(out, es, es.clone(), torch.empty(2, 4, 1, 32), q, kv.key_cache, kv.value_cache,
                                      2, 0.1, kv.block_tables, kv.context_lens, 16, 40, None, "auto", None, None,
                                      partition_size=32)
    with pytest.raises(ValueError, match="num_kv_heads=3"):
        aiter_pa.paged_attention_rocm(out, es, es.clone(), torch.empty(2, 4, 1, 32), q, kv.key_cache, kv.value_cache,
                                      3, 0.1, kv.block_tables, kv.context_lens, 16, 40, None, "auto", None, None)
    with pytest.raises(ValueError, match="fp8_out_scale"):
        aiter_pa.paged_attention_rocm(out, es, es, es, q, kv.key_cache, kv.value_cache, 2, 0.1, kv.block_tables,
                                      kv.context_lens, 16, 40, None, "auto", None, None, torch.ones(1))
    with pytest.raises(ValueError, match="workspace_buffer holds"):
        nhd = make_paged_kv([40, 9], 2, 32, 16, "NHD", KVQuant.NONE, torch.float32, seed=3)
        aiter_pa.paged_attention_v1(out, torch.empty(8, dtype=torch.uint8), q, nhd.key_cache, nhd.value_cache, 0.1,
                                    nhd.block_tables, None, nhd.context_lens, 40, None, "auto", "NHD", 0.0, None, None,
                                    partition_size=16)
    with pytest.raises(ValueError, match="block_tables_stride0"):
        aiter_pa.pa_fwd_asm(q, kv.key_cache, kv.value_cache, kv.block_tables, kv.context_lens, 99)
    with pytest.raises(TypeError, match="custom_mask must be a flat bool tensor"):
        kb = torch.randn(3, 2, 32)
        aiter_pa.extend_attention_fwd(q, kb[:2], kb[:2], out, kb, kb, torch.tensor([0, 2], dtype=torch.int32),
                                      torch.zeros(2, dtype=torch.int32), torch.zeros(0, dtype=torch.int32),
                                      torch.ones(4, dtype=torch.float32), True, torch.zeros(1, dtype=torch.int32), 2)


def test_cache_write_errors():
    from aiter_pa.layouts import allocate_kv_cache

    kc, vc = allocate_kv_cache(4, 16, 2, 32, torch.float32, "vllm")
    key = torch.randn(5, 2, 32)
    slots = torch.arange(5)
    with pytest.raises(ValueError, match=r"key must be \[num_tokens=5"):
        aiter_pa.reshape_and_cache(key[:, :1], key, kc, vc, slots)
    with pytest.raises(TypeError, match="slot_mapping must have dtype int32/int64"):
        aiter_pa.reshape_and_cache(key, key, kc, vc, slots.float())
    with pytest.raises(ValueError, match="asm_layout=True"):
        aiter_pa.reshape_and_cache(key, key, kc, vc, slots, asm_layout=True)
    f8k, f8v = allocate_kv_cache(4, 16, 2, 32, FP8, "vllm")
    with pytest.raises(ValueError, match="kv_cache_dtype='auto' but the caches are"):
        aiter_pa.reshape_and_cache(key, key, f8k, f8v, slots)
    with pytest.raises(ValueError, match="k_scale must be a float32 tensor with one element"):
        aiter_pa.reshape_and_cache(key, key, f8k, f8v, slots, "fp8", torch.ones(2), torch.ones(1))
    with pytest.raises(ValueError, match=r"k_dequant_scales must be float32 \[Hk, num_blocks\]"):
        aiter_pa.reshape_and_cache_with_block_quant(key, key, f8k, f8v, torch.zeros(4, 2), torch.zeros(2, 4), slots)
    with pytest.raises(ValueError, match="4-D caches need kv_cache_layout"):
        nk, nv = allocate_kv_cache(4, 16, 2, 32, torch.float32, "NHD")
        aiter_pa.reshape_and_cache(key, key, nk, nv, slots)
    with pytest.raises(ValueError, match="destinations must be distinct"):
        aiter_pa.copy_blocks([kc], [vc], torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="block_mapping ids must be in"):
        aiter_pa.copy_blocks([kc], [vc], torch.tensor([[0, 9]]))
    with pytest.raises(ValueError, match="block_mapping ids out of range"):
        aiter_pa.swap_blocks(kc, kc.clone(), torch.tensor([[0, 7]]))


def test_ops_registered_with_fake_and_mutates():
    import re

    import aiter_pa.ops  # noqa: F401

    schema = str(torch.ops.aiter.paged_attention_rocm.default._schema)
    mutated = set(re.findall(r"Tensor\(a\d+!\)\?? (\w+)", schema))
    assert mutated == {"out", "exp_sums", "max_logits", "tmp_out"}, schema
    schema = str(torch.ops.aiter.pa_reshape_and_cache_pertoken.default._schema)
    assert set(re.findall(r"Tensor\(a\d+!\)\?? (\w+)", schema)) == {
        "key_cache", "value_cache", "k_dequant_scales", "v_dequant_scales"}, schema
    for op in ("pa_reshape_and_cache", "pa_reshape_and_cache_pertoken", "pa_reshape_and_cache_block_quant",
               "pa_swap_blocks", "pa_copy_blocks", "paged_attention_decode", "paged_attention_v1",
               "paged_attention_ragged", "pa_fwd_asm", "pa_context_attention_fwd", "extend_attention_fwd",
               "prefill_attention"):
        assert hasattr(torch.ops.aiter, op), op
    # the fake implementation runs on meta tensors without computing anything
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        kv_k = torch.empty(4, 2, 16, 32)
        torch.ops.aiter.paged_attention_decode(torch.empty(2, 4, 32), torch.empty(2, 4, 32), kv_k, kv_k,
                                               torch.empty(2, dtype=torch.int32), torch.empty(2, 3, dtype=torch.int32),
                                               0.1, 20, None, None, 0, None, "HND", 1, 1, 0.0, 0, None, None, None,
                                               None)


def test_registry_entries():
    from aiter_core.registry import explain, specs
    from aiter_pa.backends import OPS

    assert len(OPS) == 13
    for op in OPS:
        backends = {s.backend for s in specs(op)}
        want = {"torch", "reference"} if op == "pa_swap_blocks" else {"triton", "reference"}
        assert backends == want, (op, backends)
        assert all(callable(s.impl) for s in specs(op)), op  # function objects, not "module:attr" strings
    assert "triton" in explain("paged_attention_decode")


# -- a direct torch.ops.aiter.<op> call is validated exactly like the public function -------------------


def _bad_calls(op: str):
    """(public call, direct op call) with the same bad argument, for ``op``."""
    from aiter_pa.layouts import allocate_kv_cache

    ops = torch.ops.aiter
    i32 = dict(dtype=torch.int32)
    kc, vc = allocate_kv_cache(4, 16, 2, 32, torch.float32, "vllm")
    f8k, f8v = allocate_kv_cache(4, 16, 2, 32, FP8, "vllm")
    key, slots = torch.randn(5, 2, 32), torch.arange(5)
    kv = make_paged_kv([40, 9], 2, 32, 16, "vllm_shuffled", KVQuant.NONE, torch.float32, seed=3)
    nhd = make_paged_kv([40, 9], 2, 32, 16, "NHD", KVQuant.NONE, torch.float32, seed=3)
    q, out = torch.randn(2, 4, 32), torch.empty(2, 4, 32)
    es, tmp = torch.empty(2, 4, 3), torch.empty(2, 4, 3, 32)
    if op == "pa_reshape_and_cache":
        return (lambda: aiter_pa.reshape_and_cache(key[:, :1], key, kc, vc, slots),
                lambda: ops.pa_reshape_and_cache(key[:, :1], key, kc, vc, slots, "auto", None, None, False, None))
    if op == "pa_reshape_and_cache_pertoken":
        bad = torch.rand(5, 5)
        return (lambda: aiter_pa.reshape_and_cache_with_pertoken_quant(key, key, f8k, f8v, bad, bad, slots),
                lambda: ops.pa_reshape_and_cache_pertoken(key, key, f8k, f8v, bad, bad, slots, False, None))
    if op == "pa_reshape_and_cache_block_quant":
        bad = torch.zeros(4, 2)
        return (lambda: aiter_pa.reshape_and_cache_with_block_quant(key, key, f8k, f8v, bad, bad, slots),
                lambda: ops.pa_reshape_and_cache_block_quant(key, key, f8k, f8v, bad, bad, slots, False, None))
    if op == "pa_swap_blocks":
        m = torch.tensor([[0, 7]])
        return (lambda: aiter_pa.swap_blocks(kc, kc.clone(), m), lambda: ops.pa_swap_blocks(kc, kc.clone(), m))
    if op == "pa_copy_blocks":
        m = torch.tensor([[0, 1], [1, 2]])
        return (lambda: aiter_pa.copy_blocks([kc], [vc], m), lambda: ops.pa_copy_blocks([kc], [vc], m))
    if op == "paged_attention_decode":
        bad = q.to(FP8)
        return (lambda: aiter_pa.paged_attention_decode(out, bad, nhd.key_cache, nhd.value_cache, nhd.context_lens,
                                                        nhd.block_tables, 0.1, 40, None, None, None,
                                                        kv_cache_layout="NHD"),
                lambda: ops.paged_attention_decode(out, bad, nhd.key_cache, nhd.value_cache, nhd.context_lens,
                                                   nhd.block_tables, 0.1, 40, None, None, 0, None, "NHD", 1, 1, 0.0,
                                                   0, None, None, None))
    if op == "paged_attention_rocm":
        vllm = make_paged_kv([40, 9], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=3)
        args = (out, es, es.clone(), tmp, q, vllm.key_cache, vllm.value_cache, 3, 0.1, vllm.block_tables,
                vllm.context_lens, 16, 40, None, "auto", None, None)
        return (lambda: aiter_pa.paged_attention_rocm(*args),
                lambda: ops.paged_attention_rocm(*args, None, 256, 1, None, 1))
    if op == "paged_attention_v1":
        ws = torch.empty(8, dtype=torch.uint8)
        args = (out, ws, q, nhd.key_cache, nhd.value_cache, 0.1, nhd.block_tables, None, nhd.context_lens, 40, None,
                "auto", "NHD", 0.0, None, None)
        return (lambda: aiter_pa.paged_attention_v1(*args, partition_size=16),
                lambda: ops.paged_attention_v1(*args, None, 16, 1, 0, 1))
    if op == "paged_attention_ragged":
        ws = torch.empty(1 << 16, dtype=torch.uint8)
        args = (out, ws, q, nhd.key_cache, nhd.value_cache, 0.1, torch.tensor([0, 2, 3], **i32),
                torch.tensor([0, 1, 2], **i32), torch.tensor([5], **i32), 16, 1, None, "auto", "NHD", 0.0, None,
                None)
        return (lambda: aiter_pa.paged_attention_ragged(*args), lambda: ops.paged_attention_ragged(*args, None, 256, 1, 1))
    if op == "pa_fwd_asm":
        return (lambda: aiter_pa.pa_fwd_asm(q, kv.key_cache, kv.value_cache, kv.block_tables, kv.context_lens, 99),
                lambda: ops.pa_fwd_asm(out, q, kv.key_cache, kv.value_cache, kv.block_tables, kv.context_lens, 99, 1,
                                       None, None, None, 1))
    if op == "pa_context_attention_fwd":
        vllm = make_paged_kv([40, 9], 2, 32, 16, "vllm", KVQuant.NONE, torch.float32, seed=3)
        k = torch.randn(2, 2, 32)
        args = (q, k, k, out, "auto", vllm.key_cache, vllm.value_cache, vllm.block_tables,
                torch.tensor([0, 1], **i32), torch.tensor([41, 10], **i32), 1)
        return (lambda: aiter_pa.context_attention_fwd(*args),
                lambda: ops.pa_context_attention_fwd(*args, None, None, None, None, None, False, None, None))
    if op == "extend_attention_fwd":
        kb = torch.randn(3, 2, 32)
        args = (q, kb[:2], kb[:2], out, kb, kb, torch.tensor([0, 2], **i32), torch.zeros(2, **i32),
                torch.zeros(0, **i32), torch.ones(4, dtype=torch.float32), True, torch.zeros(1, **i32), 2)
        return (lambda: aiter_pa.extend_attention_fwd(*args),
                lambda: ops.extend_attention_fwd(*args, None, 0.0, True))
    if op == "prefill_attention":
        k = torch.randn(2, 2, 32)
        args = (q, k, k, out, torch.tensor([0], **i32), torch.tensor([1, 1], **i32), 1)
        return (lambda: aiter_pa.prefill_attention(*args), lambda: ops.prefill_attention(*args, True))
    raise AssertionError(f"no bad call for {op}")


def _error(fn) -> BaseException:
    with pytest.raises((TypeError, ValueError)) as info:
        fn()
    return info.value


@pytest.mark.parametrize("op", __import__("aiter_pa.backends", fromlist=["OPS"]).OPS)
def test_direct_op_call_validates_like_the_public_function(op):
    import aiter_pa.ops  # noqa: F401

    public, direct = _bad_calls(op)
    want, got = _error(public), _error(direct)
    assert type(got) is type(want) and str(got) == str(want), (op, want, got)
    assert str(want), op


def test_direct_op_call_runs_the_checks_not_a_second_copy():
    """The eager fast path (aiter_core.ops.Op) and the dispatcher run the same checks function."""
    from aiter_pa import checks, ops

    for op in ops.OPS:
        assert op.check is getattr(checks, op.name), op.name


def test_launch_config_override(monkeypatch):
    """AITER_<OP>_CONFIG replaces fields of the op's tile config (aiter_core.configs); other ops and
    the constexprs the override does not name keep their values."""
    from aiter_pa import checks
    from aiter_pa.triton.launch import prepare_launch

    kv = make_paged_kv([20, 9], 2, 32, 16, "HND", KVQuant.NONE, torch.float32, seed=1)
    q = torch.randn(2, 4, 32)
    call = checks.paged_attention_decode(torch.empty(2, 4, 32), q, kv.key_cache, kv.value_cache, kv.context_lens,
                                         kv.block_tables, 0.1, 20, None, None, 0, None, "HND", 1, 1, 0.0, 0, None,
                                         None, None)
    base = prepare_launch(call)
    monkeypatch.setenv("AITER_PAGED_ATTENTION_DECODE_CONFIG", "BLOCK_N=32,num_warps=8")
    tuned = prepare_launch(call)
    assert (tuned.constexprs["BLOCK_N"], tuned.num_warps, tuned.num_stages) == (32, 8, base.num_stages)
    assert {k: v for k, v in tuned.constexprs.items() if k != "BLOCK_N"} == \
        {k: v for k, v in base.constexprs.items() if k != "BLOCK_N"}
    assert prepare_launch(call._replace(op="paged_attention_v1")).constexprs["BLOCK_N"] == base.constexprs["BLOCK_N"]
    monkeypatch.setenv("AITER_PAGED_ATTENTION_DECODE_CONFIG", "block_n=32")
    with pytest.raises(ValueError, match="unknown field"):
        prepare_launch(call)


FNUZ = getattr(torch, "float8_e4m3fnuz", None)


@pytest.mark.skipif(FNUZ is None, reason="no float8_e4m3fnuz in this torch")
def test_fnuz_cache_refused_where_the_gpu_lacks_it(monkeypatch):
    """Issue 18: a float8_e4m3fnuz KV cache on an NVIDIA GPU is refused up front with the fp8 types it
    supports (not a CompilationError at launch), by every op taking an 8-bit cache. The CPU stands in
    for an NVIDIA device through supported_fp8_dtypes."""
    from aiter_pa import checks

    assert checks.supported_fp8_dtypes(torch.device("cpu")) == checks.FP8_DTYPES  # the interpreter runs all
    monkeypatch.setattr(checks, "supported_fp8_dtypes", lambda device: checks.NVIDIA_FP8_DTYPES)
    kv = make_paged_kv([20, 9], 2, 32, 16, "HND", KVQuant.PER_TENSOR_8BIT, torch.float32, FP8, seed=2)
    kc, vc = kv.key_cache.view(torch.uint8).view(FNUZ), kv.value_cache.view(torch.uint8).view(FNUZ)
    match = "key_cache is float8_e4m3fnuz, which this GPU does not support; supported fp8 cache dtypes: float8_e4m3fn"
    with pytest.raises(TypeError, match=match):
        _decode(key_cache=kc, value_cache=vc, k_scale=kv.k_scale, v_scale=kv.v_scale)
    with pytest.raises(TypeError, match=match):
        aiter_pa.paged_attention_v1(torch.empty(2, 4, 32), torch.empty(0, dtype=torch.uint8), torch.randn(2, 4, 32),
                                    kc, vc, 0.1, kv.block_tables, None, kv.context_lens, 20, None, "fp8", "HND", 0.0,
                                    kv.k_scale, kv.v_scale, None, 64)
    rows = torch.randn(3, 2, 32)
    for fn, extra in ((aiter_pa.reshape_and_cache_flash, ("fp8", kv.k_scale, kv.v_scale)),):
        with pytest.raises(TypeError, match=match):
            fn(rows, rows, kc.permute(0, 2, 1, 3), vc.permute(0, 2, 1, 3), torch.arange(3), *extra)


def test_strided_index_vectors_refused():
    kv = make_paged_kv([20, 9], 2, 32, 16, "HND", KVQuant.NONE, torch.float32, seed=1)
    strided = torch.stack([kv.context_lens, kv.context_lens], 1)[:, 0]
    with pytest.raises(ValueError, match="seq_lens must be contiguous"):
        _decode(seq_lens=strided)
