"""Launch configs per head-dim bucket (no autotuning: one fixed config per shape class keeps the
first call cheap and CUDA-graph capture deterministic).

Buckets are keyed by the padded head dim max(BLOCK_DQK, BLOCK_DV). ``launch.py`` picks from these
tables per Call key (cached) and applies the one override syntax of ``aiter_core.configs``:
``AITER_MHA_FWD_CONFIG`` for the forward kernel, ``AITER_MHA_BWD_DKDV_CONFIG`` and
``AITER_MHA_BWD_DQ_CONFIG`` for the backward's two kernels, e.g.
``AITER_MHA_FWD_CONFIG="BLOCK_M=128,BLOCK_N=64,num_warps=8,num_stages=3"``. Every entry here is
cross-compiled for sm_90 by tests/test_compile_sm90.py, which checks the shared-memory budget
(232448 bytes per block).
"""

from __future__ import annotations

from typing import NamedTuple

from aiter_core.triton_utils import next_pow2


class TileConfig(NamedTuple):
    """One kernel's launch config: query rows and keys per tile, warps, pipeline stages."""

    BLOCK_M: int
    BLOCK_N: int
    num_warps: int
    num_stages: int


# First chosen from sm_90 cross-compiles (ptxas register / spill report, shared-memory size), then
# the d=128 entries re-picked from a timed sweep on the H100 (Triton 3.6, b2 h16 d128 bf16,
# s=4k/8k/16k; tests/gpu/test_gpu_kernels.py --bench --sweep; /work notes in the README's
# benchmark section): BLOCK_N 128 / 8 warps / 3 stages won both non-causal (453 vs 416 TFLOP/s
# at s=8k) and causal (417 vs 369) although it spills a little on the masked diagonal.
# Forward: BLOCK_M 128 with 8 warps = two Hopper warpgroups of 64 query rows each (wgmma M=64).
# Non-causal d<=128 takes BLOCK_N 128 (no spills, <=164 KB smem at 2 stages for d128; 3 stages
# would need 224 KB, too close to the 227 KB limit to be safe across Triton versions).
FWD_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    64: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    128: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    256: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}
# Causal / windowed: the masked diagonal blocks raise register pressure (BLOCK_N 128 spills at d128).
FWD_MASKED_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    64: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    128: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    256: TileConfig(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
}
# Philox dropout adds ~60 registers per tile element group: BLOCK_N 64 (128 spills kilobytes).
FWD_DROPOUT_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    64: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    128: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    256: TileConfig(BLOCK_M=128, BLOCK_N=32, num_warps=8, num_stages=2),
}
FWD_FP8_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    64: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    128: TileConfig(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=2),
    256: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
}

# Backward. dK/dV kernel: BLOCK_N keys are the wgmma M side (128 rows = two warpgroups), BLOCK_M
# queries per step; dK and dV accumulators (2 x 128 x D fp32) dominate the registers, so the
# query step stays small (32; d256 needs 16 and still spills a little). dQ kernel: 128 query
# rows, 64 keys per step (no spills up to d128).
# d=128 timed on the H100: dK/dV 3 stages 347 vs 299 TFLOP/s (non-causal s=8k); dQ 3 stages
# 318-334 vs 287-307.
BWD_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    64: TileConfig(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=2),
    128: TileConfig(BLOCK_M=32, BLOCK_N=128, num_warps=8, num_stages=3),
    256: TileConfig(BLOCK_M=16, BLOCK_N=64, num_warps=8, num_stages=2),
}
BWD_DQ_CONFIGS = {
    "DEFAULT": TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    32: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    64: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=2),
    128: TileConfig(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3),
    256: TileConfig(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2),
}


def _bucket(d_qk: int, d_v: int) -> int:
    d = max(16, next_pow2(max(int(d_qk), int(d_v))))
    return 32 if d <= 32 else d


def _pick(table: dict, d_qk: int, d_v: int) -> TileConfig:
    return table.get(_bucket(d_qk, d_v), table["DEFAULT"])


def fwd_config(d_qk: int, d_v: int, *, is_fp8: bool = False, dropout: bool = False,
               causal: bool = False, has_bias: bool = False) -> TileConfig:
    """The forward kernel's default config (``causal``: any causal or windowed mask)."""
    if is_fp8:
        cfg = _pick(FWD_FP8_CONFIGS, d_qk, d_v)
    elif dropout:
        cfg = _pick(FWD_DROPOUT_CONFIGS, d_qk, d_v)
    elif causal:
        cfg = _pick(FWD_MASKED_CONFIGS, d_qk, d_v)
    else:
        cfg = _pick(FWD_CONFIGS, d_qk, d_v)
    if has_bias:
        # the bias tile (BLOCK_M x BLOCK_N) is pipelined through shared memory too: a third stage
        # of it no longer fits at d128 / BLOCK_N 128 (262144 > 232448 bytes)
        cfg = cfg._replace(num_stages=min(cfg.num_stages, 2))
    return cfg


# Causal / windowed dK/dV at d=128: 64 query rows per step beat 32 on the H100 (320 vs 301
# TFLOP/s at s=16k, 301 vs 278 at s=8k): the masked diagonal blocks amortize better over taller steps.
BWD_MASKED_CONFIGS = {128: TileConfig(BLOCK_M=64, BLOCK_N=128, num_warps=8, num_stages=2)}


def bwd_configs(d_qk: int, d_v: int, *, masked: bool = False) -> tuple[TileConfig, TileConfig]:
    """(dK/dV kernel config, dQ kernel config), the defaults."""
    cfg_kv, cfg_q = _pick(BWD_CONFIGS, d_qk, d_v), _pick(BWD_DQ_CONFIGS, d_qk, d_v)
    if masked and _bucket(d_qk, d_v) in BWD_MASKED_CONFIGS:
        cfg_kv = BWD_MASKED_CONFIGS[_bucket(d_qk, d_v)]
    return cfg_kv, cfg_q
