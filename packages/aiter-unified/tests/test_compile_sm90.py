"""Compile-only tier: cross-compile the unified kernel for sm_90 on the CPU for every configuration
family the launcher picks (2D/3D, decode/prefill tiles, head dims 64-512, GQA 1/3/8/16, KV block
sizes 16-128, bf16 / fp8 KV / fp8 q+KV, fp8 output, every optional feature) and check each fits
the H100's shared memory (232448 bytes per block, opt-in). Arguments are built from meta tensors
through the checks' Call and the launcher's own ``plan`` and ``kernel_args``."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="cross-compilation needs TRITON_INTERPRET unset")


from aiter_core.testing import SM90_SMEM_PER_BLOCK, compile_for_sm90, example_signature  # noqa: E402
from aiter_unified.checks import unified_attention as check_call  # noqa: E402
from aiter_unified.triton.kernel import unified_attn_kernel  # noqa: E402
from aiter_unified.triton.launch import kernel_args, plan  # noqa: E402

H100_SMEM = SM90_SMEM_PER_BLOCK
META = "meta"
BF16, FP8 = torch.bfloat16, torch.float8_e4m3fn


def compile_sm90(fn, args, constexprs, num_warps, num_stages):
    sig, divisible = example_signature(fn, args, constexprs)
    kernel = compile_for_sm90(fn, sig, constexprs, num_warps=num_warps, num_stages=num_stages, divisible=divisible)
    shared = kernel.metadata.shared
    assert shared <= H100_SMEM, f"{constexprs}: {shared} bytes of shared memory > {H100_SMEM}"
    return kernel


# (q dtype, kv dtype, out dtype, Hq, Hk, D, block, max_seqlen_q, max_seqlen_k, window, features, kernel)
CONFIGS = [
    (BF16, BF16, BF16, 32, 8, 128, 16, 1, 4096, -1, "", "3d"),          # decode, split KV
    (BF16, BF16, BF16, 32, 8, 128, 16, 2048, 2048, -1, "", "2d"),       # prefill
    (BF16, BF16, BF16, 32, 8, 128, 64, 1024, 4096, -1, "", "2d"),       # mixed batch
    (BF16, FP8, BF16, 32, 8, 128, 16, 1, 4096, -1, "kv", "3d"),         # fp8 KV decode
    (BF16, FP8, BF16, 32, 8, 128, 32, 512, 4096, 255, "kv", "2d"),      # fp8 KV prefill + window
    (FP8, FP8, BF16, 8, 1, 128, 16, 512, 512, -1, "qkv", "2d"),         # fp8 q + KV
    (FP8, FP8, FP8, 64, 8, 64, 64, 1, 8192, -1, "qkv,oscale", "3d"),    # fp8 out, 3D
    (FP8, FP8, FP8, 64, 8, 64, 64, 777, 8192, -1, "qkv,oscale", "2d"),  # fp8 out, 2D
    (BF16, BF16, BF16, 8, 8, 64, 16, 777, 777, 255, "all", "2d"),       # every feature
    (BF16, BF16, BF16, 8, 1, 64, 128, 1, 8192, -1, "all", "3d"),
    (BF16, BF16, BF16, 24, 8, 128, 16, 300, 4096, -1, "sinks", "2d"),   # GQA 3
    (BF16, BF16, BF16, 48, 8, 128, 16, 1, 4096, -1, "sinks", "3d"),     # GQA 6
    (BF16, BF16, BF16, 128, 8, 128, 16, 64, 4096, -1, "", "2d"),        # GQA 16
    (BF16, BF16, BF16, 8, 1, 256, 16, 512, 512, 255, "all", "2d"),      # D 256
    (BF16, BF16, BF16, 8, 1, 256, 64, 1, 8192, -1, "sinks", "3d"),
    (BF16, FP8, BF16, 8, 1, 512, 16, 512, 512, -1, "kv,sinks", "2d"),   # D 512
    (BF16, BF16, BF16, 8, 8, 512, 64, 1, 8192, -1, "sinks", "3d"),
    (torch.float16, torch.float16, torch.float16, 8, 1, 96, 16, 128, 2048, -1, "", "2d"),  # D 96, padded
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=[f"{i}-{c[5]}-{c[11]}" for i, c in enumerate(CONFIGS)])
@pytest.mark.parametrize("offset_bits", [32, 64])
def test_config_compiles_and_fits_sm90(cfg, offset_bits):
    qdt, kvdt, odt, hq, hk, d, bs, mq, mk, wl, feats, kind = cfg
    feats = set(feats.replace("all", "alibi,qq,sinks,softcap").split(",")) - {""}
    num_seqs, tokens = 8, max(8 * mq // 2, 8)
    q = torch.empty(tokens, hq, d, dtype=qdt, device=META)
    k = torch.empty(4096, bs, hk, d, dtype=kvdt, device=META)
    out = torch.empty(tokens, hq, d, dtype=odt, device=META)
    i32 = dict(dtype=torch.int32, device=META)
    cu, used, table = torch.empty(num_seqs + 1, **i32), torch.empty(num_seqs, **i32), torch.empty(num_seqs, 512, **i32)
    scalar = torch.empty(1, device=META)
    window = 1 + wl if wl >= 0 else 0
    call = check_call(
        q, k, k, out, cu, mq, used, mk, 0.1, True, (wl, 0), table, 30.0 if "softcap" in feats else 0.0,
        scalar if "qkv" in feats else None, scalar if feats & {"kv", "qkv"} else None,
        scalar if feats & {"kv", "qkv"} else None,
        sinks=torch.empty(hq, device=META) if "sinks" in feats else None,
        alibi_slopes=torch.empty(hq, device=META) if "alibi" in feats else None,
        qq_bias=torch.empty(mq, mq, device=META) if "qq" in feats else None,
        output_scale=scalar if "oscale" in feats else None)
    assert call.sliding_window == window
    launches = plan(call, force=kind)
    # every launch of the call: a 2D mixed batch runs a small-tile and a prefill-tile launch
    assert len(launches) == (2 if kind == "2d" and mq > 16 and d <= 128 else 1)
    for p in launches:
        segs = None
        segments = p.grid[2]
        if segments > 1:
            block_d = p.consts["BLOCK_D"]
            segs = (torch.empty(tokens, hq, segments, block_d, device=META),
                    torch.empty(tokens, hq, segments, device=META), torch.empty(tokens, hq, segments, device=META))
        args = kernel_args(call, p, segs)
        consts = {n: v for n, v in p.consts.items() if n not in p.config.options}  # a copy: the config is shared
        assert consts["OFFSET_BITS"] == 32  # these caches are small
        consts["OFFSET_BITS"] = offset_bits  # what a cache past 2**31 elements gets
        kernel = compile_sm90(unified_attn_kernel, args, consts, p.config.options["num_warps"],
                              p.config.options["num_stages"])
        c = p.consts
        print(f"{cfg}: BLOCK_M {c['BLOCK_M']} TILE_N {c['TILE_N']} segs {segments} blocks/seq {c['BLOCKS_PER_SEQ']} "
              f"warps {c['num_warps']} stages {c['num_stages']}: {kernel.metadata.shared} bytes shared")


# ----------------------------------------------------------------------------- every accepted specialisation
# Every head dim the checks accept compiles, with each dtype combination and both mask kinds (all
# optional features off, and all on: window, soft cap, ALiBi, qq_bias, sinks), in the decode
# (split-KV) and mixed prefill (two one-pass launches) forms. The default run compiles a
# representative grid (the odd head dims, each dtype, each mask kind, each form at least once);
# AITER_UNIFIED_COMPILE_FULL=1 compiles the full product (several hundred kernels).
FULL = os.environ.get("AITER_UNIFIED_COMPILE_FULL", "0") == "1"
F16, F32 = torch.float16, torch.float32
HEAD_DIMS = (16, 24, 32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256, 320, 384, 512)
DTYPES = {"fp16": (F16, F16, F16), "bf16": (BF16, BF16, BF16), "fp32": (F32, F32, F32),
          "bf16-fp8kv": (BF16, FP8, BF16), "fp16-fp8kv": (F16, FP8, F16), "fp8": (FP8, FP8, BF16)}
MASKS = {"plain": "", "every-feature": "window,alibi,qq,sinks,softcap"}
FORMS = {"decode-3d": (1, 1024, "3d"), "short-2d": (7, 512, "2d"), "prefill-2d": (96, 768, "2d")}
REPRESENTATIVE = [
    (40, "fp16", "every-feature", "prefill-2d"), (59, "bf16", "plain", "decode-3d"),
    (59, "fp32", "every-feature", "short-2d"), (80, "bf16-fp8kv", "every-feature", "decode-3d"),
    (111, "fp16", "every-feature", "prefill-2d"), (111, "fp8", "plain", "short-2d"),
    (128, "fp32", "plain", "prefill-2d"), (128, "fp32", "every-feature", "decode-3d"),
    (160, "bf16", "every-feature", "prefill-2d"), (192, "fp16-fp8kv", "plain", "decode-3d"),
    (224, "bf16", "every-feature", "short-2d"), (256, "fp32", "every-feature", "prefill-2d"),
    (512, "fp32", "plain", "decode-3d"), (24, "bf16", "every-feature", "decode-3d"),
]
GRID = [(d, dt, m, f) for d in HEAD_DIMS for dt in DTYPES for m in MASKS for f in FORMS] if FULL else REPRESENTATIVE


def compile_call(d, dtypes, features, form, *, hq=8, hk=2, bs=16):
    qdt, kvdt, odt = dtypes
    mq, mk, kind = form
    feats = set(features.split(",")) - {""}
    num_seqs, tokens = 4, max(4 * mq, 4)
    q = torch.empty(tokens, hq, d, dtype=qdt, device=META)
    k = torch.empty(256, bs, hk, d, dtype=kvdt, device=META)
    i32 = dict(dtype=torch.int32, device=META)
    scalar = torch.empty(1, device=META)
    fp8_kv = kvdt == FP8
    call = check_call(
        q, k, k, torch.empty(tokens, hq, d, dtype=odt, device=META), torch.empty(num_seqs + 1, **i32), mq,
        torch.empty(num_seqs, **i32), mk, 0.1, True, (127 if "window" in feats else -1, 0),
        torch.empty(num_seqs, -(-mk // bs), **i32), 30.0 if "softcap" in feats else 0.0,
        scalar if qdt == FP8 else None, scalar if fp8_kv else None, scalar if fp8_kv else None,
        sinks=torch.empty(hq, device=META) if "sinks" in feats else None,
        alibi_slopes=torch.empty(hq, device=META) if "alibi" in feats else None,
        qq_bias=torch.empty(mq, mq, device=META) if "qq" in feats else None)
    compiled = []
    for p in plan(call, force=kind):
        segs = None
        if p.grid[2] > 1:
            s, block_d = p.grid[2], p.consts["BLOCK_D"]
            segs = (torch.empty(tokens, hq, s, block_d, device=META), torch.empty(tokens, hq, s, device=META),
                    torch.empty(tokens, hq, s, device=META))
        consts = {n: v for n, v in p.consts.items() if n not in p.config.options}
        compiled.append(compile_sm90(unified_attn_kernel, kernel_args(call, p, segs), consts,
                                     p.config.options["num_warps"], p.config.options["num_stages"]))
    return compiled


@pytest.mark.parametrize("d,dtypes,mask,form", GRID, ids=["-".join(map(str, c)) for c in GRID])
def test_every_accepted_specialisation_compiles(d, dtypes, mask, form):
    compiled = compile_call(d, DTYPES[dtypes], MASKS[mask], FORMS[form])
    assert len(compiled) == (2 if form == "prefill-2d" and d <= 128 else 1)


def test_representative_grid_covers_each_axis():
    assert {c[0] for c in REPRESENTATIVE} >= {40, 59, 111, 160, 192, 224}
    assert {c[1] for c in REPRESENTATIVE} == set(DTYPES)
    assert {c[2] for c in REPRESENTATIVE} == set(MASKS) and {c[3] for c in REPRESENTATIVE} == set(FORMS)
