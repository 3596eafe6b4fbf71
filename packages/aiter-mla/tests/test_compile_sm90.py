"""Compile-only tier: cross-compile the MLA kernels for sm_90 on the CPU with the production
dims (kv_lora_rank 512 + rope 64; non-absorbed 128 + 64 / 128) and the configs the launcher
picks for every head-count / MTP / dtype bucket, and check shared memory fits Hopper's
232448 bytes per block. Pointer and stride arguments get the 16-divisibility the JIT gives
aligned tensors, so the cp.async pipeline is modelled as on the device.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("compile-only tier does not run under the interpreter", allow_module_level=True)

import torch  # noqa: E402

from aiter_core.testing import SM90_SMEM_PER_BLOCK, compile_for_sm90, sass_opcode_counts  # noqa: E402
from aiter_mla.triton import attention, cache, rope  # noqa: E402
from aiter_mla.triton.launch import compute_code, decode_config, tiling  # noqa: E402

H100_SMEM_PER_BLOCK = SM90_SMEM_PER_BLOCK
FLOAT_ARGS = {"sm_scale", "softcap", "scale"}
INDEX_NAMES = {"qo_indptr", "kv_indptr", "kv_indices", "kv_last_page_lens", "seqused_k", "block_tables",
               "work_indptr", "work_info", "reduce_indptr", "reduce_final_map", "reduce_partial_map", "slots",
               "positions", "pos"}
FP32_NAMES = {"L", "PO", "PL", "q_scale", "kv_scale", "v_scale", "k_scale", "last_rope", "cos", "sin", "cos_sin"}


def _compile(kernel, constexprs, num_warps, num_stages, types):
    """``types``: element type per pointer argument name (default bf16)."""
    signature, attrs = {}, {}
    params = {p.name: p for p in kernel.params}
    missing = [n for n, p in params.items() if p.is_constexpr and n not in constexprs]
    assert not missing, f"{kernel.__name__}: constexprs not given: {missing}"
    for idx, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in types:
            signature[name] = types[name]
        elif name in INDEX_NAMES:
            signature[name] = "*i32"
        elif name in FP32_NAMES:
            signature[name] = "*fp32"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        elif name[:1].isupper():
            signature[name] = "*bf16"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or name.startswith("stride") or name.startswith("s_"):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return compile_for_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                            divisible=[i for (i,) in attrs])


def _decode_constexprs(cfg, *, causal=True, compute=0, table_mode=0, page=64, kv_scale=False,
                       separate_v=False, d_nope=512, d_rope=64, d_v=512, offset_bits=32):
    # every constexpr spelled out, defaulted ones included: _compile would type a missing one as a
    # runtime pointer and compile both sides of its branches
    return dict(D_NOPE=d_nope, D_ROPE=d_rope, D_V=d_v, BLOCK_DN=d_nope, BLOCK_DR=d_rope, BLOCK_DV=d_v,
                SEPARATE_V=separate_v, BLOCK_H=cfg.BLOCK_H, BLOCK_Q=cfg.BLOCK_Q, BLOCK_N=cfg.BLOCK_N,
                PAGE_SIZE=page, TABLE_MODE=table_mode, CAUSAL=causal,
                COMPUTE=compute, WRITE_LSE=True, HAS_Q_SCALE=kv_scale, HAS_KV_SCALE=kv_scale, HAS_V_SCALE=False,
                SOFTCAP=False, LAST_ROPE=False, PREFETCH=bool(cfg.prefetch), OFFSET_BITS=offset_bits)


FP8 = torch.float8_e4m3fn
DECODE_CASES = [(h, q, kv) for h in (8, 16, 20, 32, 64, 128) for q in (1, 2, 4) for kv in ("bf16", "fp8")
                if not (kv == "fp8" and h in (20, 32) and q > 1)]


@pytest.mark.parametrize("heads,qlen,kv", DECODE_CASES, ids=[f"h{h}-q{q}-{kv}" for h, q, kv in DECODE_CASES])
def test_decode_configs_compile_and_fit(heads, qlen, kv):
    kv_dtype = FP8 if kv == "fp8" else torch.bfloat16
    cfg = decode_config(heads, qlen, kv_dtype)
    assert cfg.BLOCK_H * cfg.BLOCK_Q >= 16, "tl.dot needs at least 16 rows"
    assert cfg.BLOCK_H * cfg.BLOCK_Q <= 64
    compute = compute_code(torch.bfloat16, kv_dtype)
    types = {"Q": "*bf16", "KV": "*fp8e4nv" if kv == "fp8" else "*bf16", "V": "*bf16", "O": "*fp32"}
    kernel = _compile(attention.mla_attn_kernel, _decode_constexprs(cfg, compute=compute, kv_scale=kv == "fp8"),
                      cfg.num_warps, cfg.num_stages, types)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK, (heads, qlen, kv, kernel.metadata.shared)
    if (heads, qlen) == (16, 1):
        # the memory-bound shape: no heavy register spilling (Triton 3.6: none for bf16,
        # 1 spill store for fp8; 3.9 spills about a dozen)
        spills = sass_opcode_counts(kernel)["STL"]
        assert spills <= 32, f"{kv}: {spills} spill stores with {cfg}"


@pytest.mark.parametrize("block_h,block_n,warps,kv", [(16, 32, 4, "bf16"), (16, 32, 8, "bf16"), (16, 64, 4, "fp8"),
                                                      (64, 32, 8, "bf16")])
def test_register_prefetch_variant_compiles(block_h, block_n, warps, kv):
    from aiter_mla.triton.launch import TileConfig

    cfg = TileConfig(block_h, 1, block_n, warps, 1, 1, 1)
    constexprs = dict(_decode_constexprs(cfg, compute=1 if kv == "fp8" else 0, kv_scale=kv == "fp8"), PREFETCH=True)
    types = {"KV": "*fp8e4nv" if kv == "fp8" else "*bf16", "O": "*fp32"}
    kernel = _compile(attention.mla_attn_kernel, constexprs, warps, 1, types)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


def test_single_split_bf16_output_and_fp8_q_compile():
    cfg = decode_config(16, 1, FP8)
    types = {"Q": "*fp8e4nv", "KV": "*fp8e4nv", "V": "*fp8e4nv", "O": "*bf16"}
    kernel = _compile(attention.mla_attn_kernel,
                      _decode_constexprs(cfg, compute=1, kv_scale=True, offset_bits=64), cfg.num_warps,
                      cfg.num_stages, types)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


@pytest.mark.parametrize("heads", [16, 128])
def test_block_table_and_grouped_rope_forms_compile(heads):
    cfg = decode_config(heads, 1, torch.bfloat16)
    for mode, page, extra in ((1, 64, {}), (2, 1, dict(LAST_ROPE=True, SOFTCAP=True))):
        constexprs = dict(_decode_constexprs(cfg, table_mode=mode, page=page, causal=mode == 1), **extra)
        kernel = _compile(attention.mla_attn_kernel, constexprs, cfg.num_warps, cfg.num_stages, {"O": "*fp32"})
        assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


def test_sglang_gqa_decode_compiles():
    """decode_attention_fwd on a GQA cache: D 128 = 64 + 64 tiles, separate V 128, 4 heads per KV head."""
    cfg = decode_config(32, 1, torch.bfloat16)
    constexprs = _decode_constexprs(cfg, table_mode=1, page=16, causal=False, separate_v=True, d_nope=64, d_rope=64,
                                    d_v=128)
    constexprs.update(BLOCK_H=4, BLOCK_Q=4)
    kernel = _compile(attention.mla_attn_kernel, constexprs, cfg.num_warps, cfg.num_stages, {"O": "*fp32"})
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


def test_prefill_ps_non_absorbed_compiles():
    """q/k 192 (tiles 128 + 64), v 128, one head per CTA, 64 query tokens per CTA."""
    block_h, block_q = 1, 64
    cfg = decode_config(1, 1024, torch.bfloat16)
    constexprs = _decode_constexprs(cfg, table_mode=2, page=1, separate_v=True, d_nope=128, d_rope=64, d_v=128)
    constexprs.update(BLOCK_H=block_h, BLOCK_Q=block_q)
    kernel = _compile(attention.mla_attn_kernel, constexprs, cfg.num_warps, cfg.num_stages, {})
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK
    assert "wgmma" in kernel.asm["ptx"]


@pytest.mark.parametrize("heads,qlen,offset_bits", [(16, 1, 32), (128, 1, 32), (16, 4, 64)])
def test_persistent_kernel_compiles(heads, qlen, offset_bits):
    cfg = decode_config(heads, qlen, torch.bfloat16)
    block_h, block_q = tiling(heads, qlen)
    constexprs = dict(D_NOPE=512, D_ROPE=64, BLOCK_DN=512, BLOCK_DR=64, BLOCK_H=block_h, BLOCK_Q=block_q,
                      BLOCK_N=cfg.BLOCK_N, PAGE_SIZE=64, MAX_Q=qlen, CAUSAL=True, COMPUTE=0, WRITE_LSE=True,
                      HAS_Q_SCALE=False, HAS_KV_SCALE=False, OFFSET_BITS=offset_bits)
    kernel = _compile(attention.mla_attn_persistent_kernel, constexprs, cfg.num_warps, cfg.num_stages, {})
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


def test_reduce_rope_and_cache_kernels_compile():
    red = _compile(attention.mla_reduce_kernel, dict(MAX_Q=4, D_V=512, BLOCK_D=512, BLOCK_HM=8, WRITE_LSE=True), 4, 1,
                   {"PO": "*fp32", "PL": "*fp32", "O": "*bf16"})
    rot = _compile(rope._rope_decode_kernel, dict(LORA=512, ROPE=64, ROT=64, BLOCK_R=64, BLOCK_HQ=16, IS_NEOX=False),
                   4, 1, {"cos_sin": "*fp32", "KPe": "*fp32"})
    cat = _compile(cache._concat_cache_kernel, dict(LORA=512, PE=64, BLOCK_L=512, BLOCK_P=64, FP8=True, FP8_MAX=448.0),
                   4, 1, {"Cache": "*fp8e4nv", "scale": "*fp32"})
    fused = _compile(cache._fused_rope_cache_kernel,
                     dict(D1=512, D2=64, B1=512, B2=64, BLOCK_HQ=16, IS_NEOX=True, COS_FULL=False, NOPE_FIRST=True,
                          Q_FP8=False, K_FP8=True, Q_FP8_MAX=0.0, K_FP8_MAX=448.0, HAS_KPE_OUT=True, HAS_DQP=True),
                     4, 1, {"Cache": "*fp8e4nv"})
    for kernel in (red, rot, cat, fused):
        assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


# -- every specialisation the API accepts (issue 18): head dims, dtypes, mask kinds, table forms ------
# A representative grid by default; AITER_MLA_COMPILE_FULL=1 compiles the full product.
FULL = os.environ.get("AITER_MLA_COMPILE_FULL", "0") == "1"
HEAD_DIMS = (32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256, 512)
ROPE_DIMS = (16, 64, 127)
DTYPES = {"bf16": (torch.bfloat16, "*bf16"), "fp16": (torch.float16, "*fp16"), "fp32": (torch.float32, "*fp32"),
          "fp8": (FP8, "*fp8e4nv")}
FORMS = ("paged-causal", "paged", "block-table", "grouped-rope")
if FULL:
    GRID = [(d, r, dt, f) for d in HEAD_DIMS for r in ROPE_DIMS for dt in DTYPES for f in FORMS]
else:  # every head dim, rope width, dtype and form at least once
    GRID = [(d, ROPE_DIMS[i % 3], list(DTYPES)[i % 4], FORMS[i % 4]) for i, d in enumerate(HEAD_DIMS)]
    GRID += [(512, 127, "bf16", "grouped-rope"), (512, 64, "fp8", "paged-causal"), (512, 64, "fp16", "block-table")]


@pytest.mark.parametrize("d_nope,d_rope,dtype,form", GRID, ids=[f"{a}+{b}-{c}-{d}" for a, b, c, d in GRID])
def test_accepted_head_dims_compile(d_nope, d_rope, dtype, form):
    """kv_lora_rank (= V width) x rope width x dtype x mask/table form: every one the checks accept
    compiles for sm_90 and fits its shared memory (the rope width 127 of issue 18 included)."""
    from aiter_core.triton_utils import next_pow2

    torch_dtype, ptr = DTYPES[dtype]
    cfg = decode_config(16, 1, torch_dtype)
    mode, page, causal, extra = {"paged-causal": (0, 16, True, {}), "paged": (0, 1, False, {}),
                                 "block-table": (1, 64, True, {}),
                                 "grouped-rope": (2, 1, False, dict(LAST_ROPE=True, SOFTCAP=True))}[form]
    constexprs = dict(_decode_constexprs(cfg, compute=compute_code(torch.bfloat16 if dtype == "fp8" else torch_dtype,
                                                                   torch_dtype),
                                         table_mode=mode, page=page, causal=causal, kv_scale=dtype == "fp8",
                                         d_nope=d_nope, d_rope=d_rope, d_v=d_nope), **extra)
    constexprs.update(BLOCK_DN=max(16, next_pow2(d_nope)), BLOCK_DR=max(16, next_pow2(d_rope)),
                      BLOCK_DV=max(16, next_pow2(d_nope)))
    types = {"Q": "*bf16" if dtype == "fp8" else ptr, "KV": ptr, "V": ptr, "O": "*fp32"}
    kernel = _compile(attention.mla_attn_kernel, constexprs, cfg.num_warps, cfg.num_stages, types)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK, (d_nope, d_rope, dtype, form, kernel.metadata.shared)


@pytest.mark.parametrize("rope_w,rot", [(127, 64), (64, 64), (16, 8)] + ([(59, 32), (111, 110)] if FULL else []))
def test_rope_decode_kernel_compiles_for_odd_rope_widths(rope_w, rot):
    from aiter_core.triton_utils import next_pow2

    kernel = _compile(rope._rope_decode_kernel,
                      dict(LORA=512, ROPE=rope_w, ROT=rot, BLOCK_R=max(16, next_pow2(rope_w)), BLOCK_HQ=16,
                           IS_NEOX=True), 4, 1, {"cos_sin": "*bf16", "KPe": "*bf16"})
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK
