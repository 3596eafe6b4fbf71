"""Compile-only tier: cross-compile every kernel configuration aiter-pa launches for sm_90 on the
CPU and check it fits the H100's shared memory (232448 bytes per block, opt-in).

The paged-attention configurations are exactly what the public ops launch on the GPU: each is built
by the op's checks (on meta tensors) and ``prepare_launch`` (the interpreter must be off: nox's
compile session does not set TRITON_INTERPRET).
"""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="cross-compilation needs TRITON_INTERPRET unset")


from aiter_core import triton_attn as ta  # noqa: E402
from aiter_core.quant import KVQuant  # noqa: E402
from aiter_core.testing import SM90_SMEM_PER_BLOCK, compile_for_sm90, example_signature  # noqa: E402
from aiter_pa import checks  # noqa: E402
from aiter_pa.layouts import allocate_kv_cache  # noqa: E402
from aiter_pa.triton import cache as tc  # noqa: E402
from aiter_pa.triton.attention import _paged_attn_kernel  # noqa: E402
from aiter_pa.triton.launch import prepare_launch  # noqa: E402

H100_SMEM = SM90_SMEM_PER_BLOCK
META = "meta"
FP8 = torch.float8_e4m3fn


def compile_sm90(fn, args, constexprs, num_warps=4, num_stages=2):
    sig, divisible = example_signature(fn, args, constexprs)
    kernel = compile_for_sm90(fn, sig, constexprs, num_warps=num_warps, num_stages=num_stages, divisible=divisible)
    shared = kernel.metadata.shared
    assert shared <= H100_SMEM, f"{fn.__name__} {constexprs}: {shared} bytes of shared memory > {H100_SMEM}"
    print(f"{fn.__name__}: {shared} bytes shared, {kernel.metadata.num_warps} warps")
    return kernel


def _decode_launch(*, layout="HND", quant=KVQuant.NONE, store=None, dtype=torch.bfloat16, hq=32, hkv=8, d=128,
                   bs=16, mtp=1, parts=1, hp=1, prefill=False, alibi=False, softcap=0.0, window=0, dv=None,
                   custom_mask=False):
    """The launch the public op builds for this configuration (its checks run on meta tensors):
    decode through paged_attention_decode, prefill through pa_context_attention_fwd, extend (page
    size 1, NHD) through extend_attention_fwd."""
    nb, B, max_ctx = 64, 4, 4096
    dv = dv or d
    rows = B * mtp
    q = torch.empty(rows, hq, d, dtype=dtype, device=META)
    out = torch.empty(rows, hq, dv, dtype=dtype, device=META)
    i32 = dict(dtype=torch.int32, device=META)
    if prefill and bs == 1:  # extend: a page-size-1 token pool
        assert layout == "NHD" and quant == KVQuant.NONE
        buf_k = torch.empty(nb, hkv, d, dtype=dtype, device=META)
        buf_v = torch.empty(nb, hkv, dv, dtype=dtype, device=META)
        new_k = torch.empty(rows, hkv, d, dtype=dtype, device=META)
        new_v = torch.empty(rows, hkv, dv, dtype=dtype, device=META)
        mask = torch.empty(1 << 20, dtype=torch.bool, device=META) if custom_mask else None
        call = checks.extend_attention_fwd(q, new_k, new_v, out, buf_k, buf_v, torch.empty(B + 1, **i32),
                                           torch.empty(B + 1, **i32), torch.empty(nb, **i32), mask, True,
                                           torch.empty(B, **i32) if custom_mask else None, mtp, None, softcap,
                                           not custom_mask)
        return prepare_launch(call)
    kc, vc = allocate_kv_cache(nb, bs, hkv, d, store if quant != KVQuant.NONE else dtype, layout, META, quant)
    if quant == KVQuant.NONE:
        ks = vs = None
    elif quant == KVQuant.PER_TENSOR_8BIT:
        ks = vs = torch.empty(1, device=META)
    elif quant == KVQuant.PER_HEAD_8BIT:
        ks = vs = torch.empty(hkv, device=META)
    else:
        ks = vs = torch.empty(nb, hkv, bs, device=META)
    bt = torch.empty(B, max(300, -(-max_ctx // bs)), **i32)
    ctx = torch.empty(B, **i32)
    layout_arg = layout if layout in ("NHD", "HND") else None
    if prefill:  # prefix prefill over the cache
        kv_dtype = "auto" if quant == KVQuant.NONE else "fp8"
        new_k = torch.empty(rows, hkv, d, dtype=dtype, device=META)
        new_v = torch.empty(rows, hkv, dv, dtype=dtype, device=META)
        call = checks.pa_context_attention_fwd(q, new_k, new_v, out, kv_dtype, kc, vc, bt, torch.empty(B + 1, **i32),
                                               ctx, mtp, ks, vs, torch.empty(hq, device=META) if alibi else None,
                                               window, None, False, max_ctx, layout_arg)
        return prepare_launch(call)
    call = checks.paged_attention_decode(out, q, kc, vc, ctx, bt, 0.1, max_ctx, ks, vs, parts,
                                         torch.empty(hq, device=META) if alibi else None, layout_arg or "HND", hp,
                                         mtp, softcap, window, None, None, None)
    return prepare_launch(call)


PT, PH, PTEN, T4 = KVQuant.PER_TOKEN_8BIT, KVQuant.PER_HEAD_8BIT, KVQuant.PER_TENSOR_8BIT, KVQuant.PER_TOKEN_4BIT
DECODE_CONFIGS = {
    "bf16-hnd-d128-g4": dict(),
    "bf16-hnd-d128-g4-split": dict(parts=4),
    "fp8-pertensor-vllm": dict(layout="vllm", quant=PTEN, store=FP8),
    "fp8-pertensor-shuffled-split": dict(layout="vllm_shuffled", quant=PTEN, store=FP8, parts=3),
    "fp8-pertoken-hnd-hp0": dict(quant=PT, store=FP8, hp=0),
    "fp8-pertoken-hnd-hp1": dict(quant=PT, store=FP8, hp=1),
    "fp8-pertoken-hnd-hp2": dict(quant=PT, store=FP8, hp=2),
    "fp8-perhead-nhd-hp0": dict(layout="NHD", quant=PH, store=FP8, hp=0),
    "int8-pertoken-vllm": dict(layout="vllm", quant=PT, store=torch.int8),
    "int8-perhead-shuffled": dict(layout="vllm_shuffled", quant=PH, store=torch.int8),
    "int4-pertoken-nhd": dict(layout="NHD", quant=T4),
    # what pa_fwd_asm and the hp tests launch (Triton 3.6 once failed to compile these:
    # TritonGPURemoveLayoutConversions on the block-id select; see _group_block_lookup)
    "fp8-pertensor-shuffled-hp2-g4": dict(layout="vllm_shuffled", quant=PTEN, store=FP8, hp=2, hq=4, hkv=1),
    "int8-pertoken-shuffled-hp2": dict(layout="vllm_shuffled", quant=PT, store=torch.int8, hp=2),
    "fp8-pertoken-shuffled-hp0-split": dict(layout="vllm_shuffled", quant=PT, store=FP8, hp=0, parts=4),
    "int4-pertoken-hnd-mtp2-bs1": dict(quant=T4, bs=1, hq=12, hkv=2, d=64, mtp=2),
    "int4-pertoken-vllm-hp2": dict(layout="vllm", quant=T4, hp=2),
    "fp16-d64-bs1-g1": dict(dtype=torch.float16, d=64, bs=1, hq=8, hkv=8),
    "bf16-d256-bs256": dict(d=256, bs=256),
    "bf16-d256-fp8-split": dict(d=256, quant=PT, store=FP8, parts=2),
    "bf16-d80-g5": dict(d=80, hq=10, hkv=2),
    "bf16-mtp4-g16": dict(hq=16, hkv=1, mtp=4),
    "bf16-d256-mtp4-g16": dict(hq=16, hkv=1, mtp=4, d=256, bs=256),
    "bf16-alibi-softcap-window": dict(layout="NHD", alibi=True, softcap=30.0, window=128, mtp=2),
    "prefill-bf16": dict(layout="vllm", prefill=True, mtp=128, hq=32, hkv=8),
    "prefill-fp8-window": dict(layout="vllm", prefill=True, mtp=64, quant=PTEN, store=FP8, window=256),
    "extend-dqk192-dv128": dict(layout="NHD", prefill=True, d=192, dv=128, mtp=64, hq=16, hkv=16, bs=1),
    "extend-mla-576-512": dict(layout="NHD", prefill=True, d=576, dv=512, mtp=64, hq=16, hkv=1, bs=1),
    "extend-custom-mask": dict(layout="NHD", prefill=True, mtp=64, hq=16, hkv=16, bs=1, custom_mask=True),
}


VECTOR_CHECKED = ("bf16-hnd-d128-g4", "bf16-hnd-d128-g4-split", "fp8-pertensor-vllm", "fp8-pertensor-shuffled-split",
                  "fp8-pertoken-hnd-hp1", "int8-pertoken-vllm", "int8-perhead-shuffled")


@pytest.mark.parametrize("name", list(DECODE_CONFIGS))
@pytest.mark.parametrize("offset_bits", [32, 64])
def test_paged_attention_kernel_compiles_for_sm90(name, offset_bits):
    launch = _decode_launch(**DECODE_CONFIGS[name])
    assert launch.constexprs["OFFSET_BITS"] == 32  # these caches are small
    launch.constexprs["OFFSET_BITS"] = offset_bits  # what a cache past 2**31 elements gets
    kernel = compile_sm90(_paged_attn_kernel, launch.args, launch.constexprs, launch.num_warps, launch.num_stages)
    ptx = kernel.asm["ptx"]
    if name in VECTOR_CHECKED:
        # the K and V tiles must move in 16-byte pieces (cp.async.cg copies only 16 bytes), and no
        # fp8/int8 tile may fall back to byte loads (the token-contiguous V layouts did, once)
        assert "cp.async.cg.shared.global" in ptx or "ld.global.v4" in ptx, "no 16-byte loads of the KV tiles"
        assert "ld.global.b8" not in ptx and "ld.global.u8" not in ptx, "byte loads of an 8-bit KV tile"


def test_splitk_merge_compiles_for_sm90():
    args = [torch.empty(8, 4, 16, 128, device=META), torch.empty(8, 4, 16, device=META),
            torch.empty(8, 4, 16, device=META), torch.empty(8, 4, 128, dtype=torch.bfloat16, device=META),
            torch.empty(8, 4, device=META)] + [4, 16, 128] + [1] * 15
    for has_sum, write_lse in ((True, False), (False, True)):
        compile_sm90(ta._splitk_merge_kernel, args, dict(BLOCK_K=16, BLOCK_D=128, HAS_SUM=has_sum,
                                                         WRITE_LSE=write_lse))


@pytest.mark.parametrize("mode,cache_dtype", [(checks.MODE_CAST, torch.bfloat16), (checks.MODE_PER_TENSOR, FP8),
                                              (checks.MODE_PER_TOKEN, torch.int8), (checks.MODE_INT4, torch.uint8),
                                              (checks.MODE_BLOCK, FP8)])
def test_cache_write_kernels_compile_for_sm90(mode, cache_dtype):
    src = torch.empty(16, 8, 128, dtype=torch.bfloat16, device=META)
    args = [src, torch.empty(16, dtype=torch.int64, device=META), torch.empty(64, 8, 16, 128, dtype=cache_dtype,
                                                                                 device=META),
            torch.empty(8, 1024, device=META)] + [1] * 8 + [8, 128, 448.0, 1024]
    compile_sm90(tc._cache_write_kernel, args, dict(KV_BLOCK=16, TX=16, CX=128, s_t_hi=0, s_t_lo=1024, s_c_hi=0,
                                                    s_c_lo=1, MODE=mode,
                                                    IS_INT=cache_dtype == torch.int8, BLOCK_H=8,
                                                    BLOCK_D=64 if mode == checks.MODE_INT4 else 128))
    if mode == checks.MODE_BLOCK:
        compile_sm90(tc._block_absmax_kernel, [src, args[1], args[3]] + [1] * 5 + [8, 128, 448.0, 1024],
                     dict(KV_BLOCK=16, BLOCK_H=8, BLOCK_D=128))
        compile_sm90(tc._block_requant_kernel, [args[2], args[3], args[3]] + [1] * 8 + [128, 448.0],
                     dict(KV_BLOCK=16, TX=16, CX=128, IS_INT=False, BLOCK_T=16, BLOCK_D=128))


def test_copy_blocks_kernel_compiles_for_sm90():
    compile_sm90(tc._copy_blocks_kernel, [torch.empty(64, 4096, dtype=torch.bfloat16, device=META),
                                          torch.empty(8, 2, dtype=torch.int64, device=META), 4096, 64],
                 dict(BLOCK=1024))


# -- issue 18: what upstream's tests pass (int64 index tensors), and the accepted head dims / dtypes ----

FULL = os.environ.get("AITER_PA_COMPILE_FULL", "0") == "1"


def compile_as_launched(fn, args, constexprs, num_warps, num_stages):
    """:func:`compile_sm90` with the launcher's runtime specialisation: Triton 3.6 turns every int
    argument equal to 1 into a constexpr (unit strides, one-block tables), as a real launch does."""
    spec = dict(constexprs)
    for name, a in zip(fn.arg_names, args):
        if type(a) is int and a == 1 and name not in spec:
            spec[name] = 1
    return compile_sm90(fn, args, spec, num_warps, num_stages)


def _upstream_prefill_launch(hkv, window, kv_cache_dtype, index_dtype, d=128, hq=64, dtype=torch.float16):
    """AITER's test_pa_prefill / test_chunked_pa_prefill::test_contexted_kv_attention: 5-D K cache
    (x = 8), V [nb, Hk, D, bs], block size 32, int64 block table, start locations and lengths."""
    nb, bs, B, T = 640, 32, 10, 4000
    cdt = dtype if kv_cache_dtype == "auto" else FP8
    kc = torch.empty(nb, hkv, d // 8, bs, 8, dtype=cdt, device=META)
    vc = torch.empty(nb, hkv, d, bs, dtype=cdt, device=META)
    q, o = (torch.empty(T, hq, d, dtype=dtype, device=META) for _ in range(2))
    k, v = (torch.empty(T, hkv, d, dtype=dtype, device=META) for _ in range(2))
    ix = dict(dtype=index_dtype, device=META)
    sc = torch.empty((), dtype=torch.float32, device=META)
    call = checks.pa_context_attention_fwd(q, k, v, o, kv_cache_dtype, kc, vc, torch.empty(B, 64, **ix),
                                           torch.empty(B + 1, **ix), torch.empty(B, **ix), 1024, sc, sc, None,
                                           window, None, False, None, None)
    return prepare_launch(call)


_UPSTREAM_PREFILL = [(hkv, w, kv) for hkv in (64, 8, 1) for w in (0, 128) for kv in ("auto", "fp8")]


@pytest.mark.parametrize("hkv,window,kv_cache_dtype",
                         _UPSTREAM_PREFILL if FULL else [(8, 0, "auto"), (64, 128, "fp8"), (1, 128, "auto")])
@pytest.mark.parametrize("index_dtype", [torch.int64, torch.int32])
def test_upstream_prefill_compiles_for_sm90(hkv, window, kv_cache_dtype, index_dtype):
    # issue 18: int64 b_start_loc made the new-key loop's bound int64 while its start was int32
    # ("initial value for `n0` is of type int32, but the then block redefines it as int64")
    launch = _upstream_prefill_launch(hkv, window, kv_cache_dtype, index_dtype)
    compile_as_launched(_paged_attn_kernel, launch.args, launch.constexprs, launch.num_warps, launch.num_stages)


HEAD_DIMS = (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256)
_DEFAULT_GRID = {(59, torch.float16, "decode"), (111, torch.bfloat16, "prefill"), (160, torch.float32, "decode"),
                 (224, torch.bfloat16, "decode-fp8"), (40, torch.float16, "prefill"), (256, torch.float16, "extend")}


@pytest.mark.parametrize("form", ["decode", "decode-fp8", "prefill", "extend"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("d", HEAD_DIMS)
def test_accepted_head_dims_compile_for_sm90(d, dtype, form):
    """Every head dim the checks accept compiles, per form and dtype (a representative grid by
    default, the whole product with AITER_PA_COMPILE_FULL=1)."""
    if not FULL and (d, dtype, form) not in _DEFAULT_GRID:
        pytest.skip("representative grid (AITER_PA_COMPILE_FULL=1 for all)")
    assert checks.head_dim_supported(d)
    if form == "decode":
        launch = _decode_launch(dtype=dtype, d=d, hq=8, hkv=2, mtp=2, window=64)
    elif form == "decode-fp8":
        launch = _decode_launch(dtype=dtype, d=d, hq=8, hkv=2, quant=PT, store=FP8, alibi=True, softcap=20.0)
    elif form == "prefill":
        launch = _decode_launch(dtype=dtype, d=d, layout="NHD", prefill=True, mtp=32, hq=8, hkv=2, window=16)
    else:
        launch = _decode_launch(dtype=dtype, d=d, layout="NHD", prefill=True, mtp=32, hq=8, hkv=8, bs=1)
    compile_as_launched(_paged_attn_kernel, launch.args, launch.constexprs, launch.num_warps, launch.num_stages)
