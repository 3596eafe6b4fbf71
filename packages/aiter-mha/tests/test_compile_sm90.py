"""Compile-only tier: cross-compile every launch config x main feature combination for sm_90 on
the CPU and check each fits Hopper's shared memory (232448 bytes per block, opt-in).

No GPU needed (Triton ships ptxas). Pointer and stride arguments get the 16-divisibility the
JIT gives aligned tensors at run time, so the software pipeliner (cp.async stages) is modelled
as on the device; without it the shared-memory figure would be too small to mean anything.
"""

from __future__ import annotations

import os

import pytest

triton = pytest.importorskip("triton")
if os.environ.get("TRITON_INTERPRET", "0") == "1":
    pytest.skip("compile-only tier does not run under the interpreter", allow_module_level=True)

from aiter_core.testing import SM90_SMEM_PER_BLOCK, compile_for_sm90  # noqa: E402
from aiter_mha.triton import configs  # noqa: E402
from aiter_mha.triton.bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel  # noqa: E402
from aiter_mha.triton.fwd import flash_fwd_kernel  # noqa: E402

H100_SMEM_PER_BLOCK = SM90_SMEM_PER_BLOCK

FLOAT_ARGS = {"dropout_p", "qk_scale_log2", "softcap_inv_scale", "softcap_log2", "softmax_scale"}
INT_POINTERS = {"cu_seqlens_q": "*i32", "cu_seqlens_k": "*i32", "seqstart_q": "*i32",
                "seqstart_k": "*i32", "seqlens_k": "*i32", "block_table": "*i32",
                "rng_state": "*i64"}
FP32_POINTERS = {"Lse", "Dmask", "alibi", "sink", "q_descale", "k_descale", "v_descale", "Delta",
                 "Sink", "SinkPartial", "DBias", "DQacc"}


def _compile(kernel, constexprs, num_warps, num_stages, elem="bf16", kv_elem=None, aligned=True):
    """triton.compile for sm_90 with a signature built from the kernel's argument names."""
    kv_elem = kv_elem or elem
    out_elem = "bf16" if elem == "fp8e4nv" else elem
    signature = {}
    attrs = {}
    for idx, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in INT_POINTERS:
            signature[name] = INT_POINTERS[name]
        elif name in FP32_POINTERS:
            signature[name] = "*fp32"
        elif name in ("Q",):
            signature[name] = f"*{elem}"
        elif name in ("K", "V"):
            signature[name] = f"*{kv_elem}"
        elif name in ("Out", "dO", "dQ", "dK", "dV", "bias"):
            signature[name] = f"*{out_elem}"
        elif name in FLOAT_ARGS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if signature[name].startswith("*") or (aligned and name.startswith("stride")):
            attrs[(idx,)] = [["tt.divisibility", 16]]
    return compile_for_sm90(kernel, signature, constexprs, num_warps=num_warps, num_stages=num_stages,
                            divisible=[i for (i,) in attrs])


def _blocks(d_qk, d_v):
    return dict(D_QK=d_qk, D_V=d_v, BLOCK_DQK=max(16, triton.next_power_of_2(d_qk)),
                BLOCK_DV=max(16, triton.next_power_of_2(d_v)))


FWD_FLAGS_OFF = dict(IS_VARLEN=False, HAS_SEQSTART=False, K_LEN_MODE=0, PAGED=False, HAS_WINDOW=False, HAS_LEFT=False,
                     HAS_SOFTCAP=False, HAS_BIAS=False, HAS_ALIBI=False, HAS_SINK=False,
                     HAS_DROPOUT=False, RETURN_DMASK=False, STORE_LSE=True, IS_FP8=False,
                     REVERSE_M=False)
FWD_FEATURES = {
    "plain": dict(),
    "causal": dict(HAS_WINDOW=True, REVERSE_M=True),
    "paged_varlen_window_sink_alibi_softcap": dict(IS_VARLEN=True, K_LEN_MODE=1, PAGED=True, HAS_WINDOW=True, HAS_LEFT=True,
                                                   HAS_SINK=True, HAS_ALIBI=True, HAS_SOFTCAP=True),
    "padded_varlen_bias_seqlens": dict(IS_VARLEN=True, HAS_SEQSTART=True, K_LEN_MODE=1, HAS_BIAS=True),
    "dense_q_paged_seqlens_k": dict(K_LEN_MODE=2, PAGED=True, HAS_WINDOW=True),
}
HEAD_DIMS = {"DEFAULT": (96, 96), 32: (32, 32), 64: (64, 64), 128: (128, 128), 256: (256, 256)}
# The default run covers the buckets production uses most (d64, d128) plus d256 where shared
# memory is tightest; AITER_MHA_COMPILE_FULL=1 compiles every bucket of every table.
FULL = os.environ.get("AITER_MHA_COMPILE_FULL", "0") == "1"
BUCKETS = ("DEFAULT", 32, 64, 128, 256) if FULL else (64, 128, 256)


def _fwd_cases():
    cases = []
    for bucket in BUCKETS:
        cases.append((f"fwd-{bucket}-plain", configs.FWD_CONFIGS[bucket], HEAD_DIMS[bucket],
                      FWD_FEATURES["plain"], "bf16"))
        cases.append((f"fwd-{bucket}-causal", configs.FWD_MASKED_CONFIGS[bucket], HEAD_DIMS[bucket],
                      FWD_FEATURES["causal"], "bf16"))
    for feat in ("paged_varlen_window_sink_alibi_softcap", "padded_varlen_bias_seqlens", "dense_q_paged_seqlens_k"):
        # the config the launcher picks for these features (bias lowers the stage count)
        cfg = configs.fwd_config(128, 128, causal=True, has_bias=FWD_FEATURES[feat].get("HAS_BIAS", False))
        cases.append((f"fwd-128-{feat}", cfg, HEAD_DIMS[128], FWD_FEATURES[feat], "bf16"))
    for bucket in (BUCKETS if FULL else (128,)):
        cases.append((f"fwd-dropout-{bucket}", configs.FWD_DROPOUT_CONFIGS[bucket], HEAD_DIMS[bucket],
                      dict(HAS_DROPOUT=True, RETURN_DMASK=True, HAS_WINDOW=True), "bf16"))
        cases.append((f"fwd-fp8-{bucket}", configs.FWD_FP8_CONFIGS[bucket], HEAD_DIMS[bucket],
                      dict(IS_FP8=True, HAS_WINDOW=True), "fp8e4nv"))
    cases.append(("fwd-192x128-causal", configs.FWD_MASKED_CONFIGS[256], (192, 128),
                  dict(HAS_WINDOW=True), "bf16"))
    return cases


@pytest.mark.parametrize("name,cfg,dims,features,elem", _fwd_cases(), ids=[c[0] for c in _fwd_cases()])
def test_forward_compiles_for_sm90(name, cfg, dims, features, elem):
    constexprs = dict(FWD_FLAGS_OFF, **features, **_blocks(*dims),
                      BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N)
    kernel = _compile(flash_fwd_kernel, constexprs, cfg.num_warps, cfg.num_stages, elem=elem)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK, (name, kernel.metadata.shared)
    assert "wgmma" in kernel.asm["ptx"], f"{name}: expected Hopper wgmma instructions"


BWD_FLAGS_OFF = dict(IS_VARLEN=False, HAS_SEQSTART=False, HAS_WINDOW=False, HAS_LEFT=False, HAS_SOFTCAP=False,
                     HAS_BIAS=False, HAS_ALIBI=False, HAS_DROPOUT=False)
BWD_FEATURES = {
    "causal": dict(HAS_WINDOW=True),
    "dq_atomic": dict(HAS_WINDOW=True, DQ_ATOMIC=True),
    "all": dict(IS_VARLEN=True, HAS_SEQSTART=True, HAS_WINDOW=True, HAS_LEFT=True, HAS_SOFTCAP=True, HAS_BIAS=True,
                SPLIT_GROUP=True,
                HAS_ALIBI=True, HAS_DROPOUT=True),
}


def _bwd_cases():
    cases = []
    for bucket in BUCKETS:
        for feat in ("causal",) if bucket != 128 else tuple(BWD_FEATURES):
            cases.append((f"bwd-{bucket}-{feat}", bucket, HEAD_DIMS[bucket], BWD_FEATURES[feat]))
    return cases


@pytest.mark.parametrize("name,bucket,dims,features", _bwd_cases(), ids=[c[0] for c in _bwd_cases()])
def test_backward_compiles_for_sm90(name, bucket, dims, features):
    # the configs the launcher picks (masked problems may take their own dK/dV config)
    cfg_kv, cfg_q = configs.bwd_configs(*dims, masked=features.get("HAS_WINDOW", False))
    features = dict(features)
    split_group = features.pop("SPLIT_GROUP", False)
    dq_atomic = features.pop("DQ_ATOMIC", False)
    base = dict(BWD_FLAGS_OFF, **features, **_blocks(*dims))
    dkdv = _compile(bwd_dkdv_kernel, dict(base, BLOCK_M=cfg_kv.BLOCK_M, BLOCK_N=cfg_kv.BLOCK_N,
                                          DBIAS_MODE=1 if features.get("HAS_BIAS") else 0,
                                          SPLIT_GROUP=split_group,
                                          TAIL_Q=features.get("IS_VARLEN", False), DQ_ATOMIC=dq_atomic),
                    cfg_kv.num_warps, cfg_kv.num_stages)
    dq = _compile(bwd_dq_kernel, dict(base, BLOCK_M=cfg_q.BLOCK_M, BLOCK_N=cfg_q.BLOCK_N,
                                      REVERSE_M=features.get("HAS_WINDOW", False)),
                  cfg_q.num_warps, cfg_q.num_stages)
    for kernel in (dkdv, dq):
        assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK, (name, kernel.metadata.shared)


def test_preprocess_compiles_for_sm90():
    kernel = _compile(bwd_preprocess_kernel, dict(D_V=128, BLOCK_M=64, BLOCK_DV=128, IS_VARLEN=True,
                                                  HAS_SEQSTART=True, HAS_SINK=True), 4, 1)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK


def test_unaligned_head_dim_compiles():
    """Head dim 40 (padded to 64 with masks) with strides the JIT cannot mark 16-divisible."""
    constexprs = dict(FWD_FLAGS_OFF, HAS_WINDOW=True, **_blocks(40, 40), BLOCK_M=128, BLOCK_N=64)
    kernel = _compile(flash_fwd_kernel, constexprs, 8, 2, aligned=False)
    assert kernel.metadata.shared <= H100_SMEM_PER_BLOCK
