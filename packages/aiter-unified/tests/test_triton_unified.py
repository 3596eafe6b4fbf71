"""Interpreter tier: the Triton kernels (2D and 3D forced, and the heuristic's choice through the
public API) against the PyTorch reference on random mixes of prefill, extend and decode
sequences, with poisoned outputs. Tiny shapes: each call is about a second in the interpreter."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                reason="needs TRITON_INTERPRET=1 (CPU) or a GPU")

import aiter_unified  # noqa: E402
from aiter_core.triton_attn import splitk_merge_reference  # noqa: E402
from aiter_unified.checks import unified_attention as check_call  # noqa: E402
from aiter_unified.reference import unified_attention_ref  # noqa: E402
from aiter_unified.testing import make_batch, random_seqs, run_triton  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
F16, F32, FP8 = torch.float16, torch.float32, torch.float8_e4m3fn


def _extras(b, *, alibi, qq, sinks, seed):
    gen = torch.Generator().manual_seed(seed + 1)
    hq = b.q.shape[1]
    return dict(
        alibi_slopes=(torch.rand(hq, generator=gen) * 0.2).to(DEV) if alibi else None,
        qq_bias=torch.randn(b.max_seqlen_q + 2, b.max_seqlen_q + 2, generator=gen).to(DEV) if qq else None,
        sinks=(torch.randn(hq, generator=gen) * 2).to(DEV) if sinks else None,
    )


def _run_triton(b, *, force, scale, window, softcap, extras, num_segments=None, descales=(None, None, None),
                output_scale=None, out_dtype=None, tile_n=None):
    out = torch.full(b.q.shape, float("nan"), dtype=out_dtype or b.q.dtype, device=DEV)
    qd, kd, vd = descales
    run_triton(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, scale, window,
               b.block_table, softcap, qd, kd, vd, output_scale=output_scale, force=force, num_segments=num_segments,
               tile_n=tile_n, **extras)
    return out


# (seqs seed, (Hq, Hk), head_dim, block_size, dtype, window_left, softcap, alibi, qq_bias, sinks)
CASES = [
    (0, (2, 2), 32, 16, F32, -1, 0.0, False, False, False),
    (1, (4, 2), 32, 32, F16, -1, 0.0, False, False, True),
    (2, (6, 2), 64, 16, F16, 7, 0.0, False, False, False),   # GQA 3 (not a power of two) + window
    (3, (8, 1), 32, 16, F32, -1, 5.0, True, True, False),    # GQA 8 + softcap + alibi + qq_bias
    (4, (3, 1), 24, 32, F16, 12, 0.0, False, True, True),    # GQA 3, D 24 (padded) + window + qq + sinks
    (5, (8, 8), 32, 16, F32, -1, 3.0, True, True, True),     # everything at once
]


@pytest.mark.parametrize("force", ["2d", "3d"])
@pytest.mark.parametrize("case", CASES, ids=[f"case{c[0]}" for c in CASES])
def test_kernels_match_reference(case, force):
    """16-key tiles: blocks see mask-free interior tiles, window-edge tiles and diagonal tiles."""
    seed, (hq, hk), d, bs, dtype, wl, softcap, alibi, qq, sinks = case
    gen = torch.Generator().manual_seed(100 + seed)
    # (0, 7): no new tokens; (24, 40): an extend whose later query blocks see whole tiles of new keys
    seqs = random_seqs(5, max_q=12, max_ctx=50, gen=gen) + [(0, 7), (1, 1), (24, 40)]
    b = make_batch(seqs, heads_q=hq, heads_kv=hk, head_dim=d, block_size=bs, dtype=dtype, device=DEV, seed=seed)
    extras = _extras(b, alibi=alibi, qq=qq, sinks=sinks, seed=seed)
    scale = d ** -0.5
    out = _run_triton(b, force=force, scale=scale, window=(wl, 0), softcap=softcap, extras=extras, num_segments=3
                      if force == "3d" else None, tile_n=16)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, scale,
                                window_size=(wl, 0), softcap=softcap, **extras)
    tol = 2e-3 if dtype == F16 else 1e-4
    torch.testing.assert_close(out.float(), ref.float(), atol=tol, rtol=tol)


def test_fp8_kv_and_fp8_q_with_descales_and_output_scale():
    b = make_batch([(1, 33), (6, 20), (4, 4)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=F16,
                   kv_dtype=FP8, device=DEV, seed=7)
    kd, vd = torch.tensor([0.7], device=DEV), torch.tensor([1.5], device=DEV)
    for force in ("2d", "3d"):
        out = _run_triton(b, force=force, scale=0.2, window=(-1, -1), softcap=0.0, extras={}, num_segments=2,
                          descales=(None, kd, vd))
        ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2,
                                    k_descale=kd, v_descale=vd)
        torch.testing.assert_close(out.float(), ref.float(), atol=3e-3, rtol=3e-3)
    # fp8 q as well, fp32 output divided by output_scale
    b.q = b.q.to(FP8)
    qd, osc = torch.tensor([0.9], device=DEV), torch.tensor([0.25], device=DEV)
    for force in ("2d", "3d"):
        out = _run_triton(b, force=force, scale=0.2, window=(-1, -1), softcap=0.0, extras={}, num_segments=2,
                          descales=(qd, kd, vd), output_scale=osc, out_dtype=F32)
        ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2, q_descale=qd,
                                    k_descale=kd, v_descale=vd, output_scale=osc, out_dtype=F32)
        torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


def test_mixed_batch_split_at_short_q_boundary():
    """A single-pass mixed batch runs two launches (sequences of <= SHORT_Q new tokens on the small
    tile, the rest on the prefill tile): lengths at SHORT_Q and SHORT_Q + 1, empty and decode
    sequences must each be attended exactly once."""
    from aiter_unified.triton.launch import SHORT_Q, plan

    seqs = [(1, 40), (SHORT_Q, 30), (SHORT_Q + 1, 50), (0, 5), (3, 3), (40, 90), (1, 1)]
    b = make_batch(seqs, heads_q=6, heads_kv=2, head_dim=32, block_size=16, dtype=F16, device=DEV, seed=21)
    call = check_call(b.q, b.k, b.v, torch.empty_like(b.q), b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k,
                      b.max_seqlen_k, 0.2, True, (-1, -1), b.block_table, 0.0, None, None, None)
    assert len(plan(call)) == 2
    out = _run_triton(b, force=None, scale=0.2, window=(-1, -1), softcap=0.0, extras={})
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_public_api_random_mix_matches_reference_backend():
    gen = torch.Generator().manual_seed(11)
    seqs = random_seqs(7, max_q=20, max_ctx=70, gen=gen)
    b = make_batch(seqs, heads_q=10, heads_kv=2, head_dim=32, block_size=16, dtype=F16, device=DEV, seed=11)
    sinks = torch.randn(10, generator=gen).to(DEV)
    outs = {}
    for backend in ("triton", "reference"):
        out = torch.full_like(b.q, float("nan"))
        got = aiter_unified.unified_attention(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k,
                                              b.max_seqlen_k, 0.17, True, (-1, -1), b.block_table, 0.0, None, None,
                                              None, sinks=sinks, backend=backend)
        assert got is out
        outs[backend] = out
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=2e-3, rtol=2e-3)


def test_skip_reduce_returns_mergeable_segment_buffers():
    b = make_batch([(1, 70), (3, 45)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=F32, device=DEV,
                   seed=3)
    sinks = torch.randn(4).to(DEV)
    out = torch.full_like(b.q, float("nan"))
    segm_out, segm_max, segm_sum = aiter_unified.unified_attention(
        b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.2, True, (-1, -1),
        b.block_table, 0.0, None, None, None, sinks=sinks, skip_reduce=True)
    assert segm_out.shape[:2] == b.q.shape[:2] and segm_out.shape[-1] == 32 and segm_out.shape[2] >= 2
    assert segm_max.shape == segm_sum.shape == segm_out.shape[:3]
    assert torch.isnan(out).all(), "skip_reduce must leave out untouched"
    merged, _ = splitk_merge_reference(segm_out, segm_max, segm_sum)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2, sinks=sinks)
    torch.testing.assert_close(merged, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("force", ["2d", "3d"])
def test_all_decode_batch_one_block_per_sequence(force):
    """max_seqlen_q == 1 launches one query block per sequence: every sequence must be covered
    (an idle sequence with no new token included)."""
    seqs = [(1, n) for n in (5, 70, 1, 33, 17, 64, 2, 40, 9)] + [(0, 12), (1, 3)]
    b = make_batch(seqs, heads_q=8, heads_kv=2, head_dim=32, block_size=16, dtype=F16, device=DEV, seed=21)
    extras = _extras(b, alibi=True, qq=False, sinks=True, seed=21)
    out = _run_triton(b, force=force, scale=0.2, window=(-1, -1), softcap=0.0, extras=extras, num_segments=4)
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2, **extras)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)


def test_64_bit_offsets_give_the_same_result():
    """Caches of 2**31 elements or more get int64 address arithmetic (OFFSET_BITS=64), smaller ones
    int32: both on the same small batch, 2D and 3D, against the reference."""
    from aiter_unified.triton.kernel import unified_attn_kernel
    from aiter_unified.triton.launch import kernel_args, plan, segment_buffers

    b = make_batch([(1, 37), (9, 30), (5, 5)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=F16,
                   device=DEV, seed=21)
    scale = 32 ** -0.5
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, scale)
    for force in ("2d", "3d"):
        for bits in (32, 64):
            out = torch.full(b.q.shape, float("nan"), dtype=b.q.dtype, device=DEV)
            call = check_call(b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, scale,
                              True, (-1, -1), b.block_table, 0.0, None, None, None)
            for p in plan(call, force=force, num_segments=2, tile_n=16):
                segs = None if p.grid[2] == 1 else segment_buffers(call, p)
                consts = dict(p.consts)  # a copy: the launch config is shared
                assert consts["OFFSET_BITS"] == 32
                consts["OFFSET_BITS"] = bits
                unified_attn_kernel[p.grid](*kernel_args(call, p, segs), **consts)
                if segs is not None:
                    merged, _ = splitk_merge_reference(segs[0][..., :32], segs[1], segs[2])
                    out = merged.to(out.dtype)
            torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3,
                                       msg=lambda m: f"{force} OFFSET_BITS={bits}: {m}")


@pytest.mark.parametrize("force", ["2d", "3d"])
def test_v_cache_with_its_own_strides(force):
    """K and V share one address vector when their block and token strides agree
    (SAME_KV_OFFSETS); a V cache laid out differently (here: each token's row padded to twice the
    head dim) takes its own offsets."""
    from aiter_unified.triton.launch import plan

    b = make_batch([(1, 37), (9, 30), (5, 5)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=F16,
                   device=DEV, seed=22)
    padded = torch.full((*b.v.shape[:3], 64), float("nan"), dtype=b.v.dtype, device=DEV)
    padded[..., :32] = b.v
    v = padded[..., :32]
    call = check_call(b.q, b.k, v, b.q, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.1, True,
                      (-1, -1), b.block_table, 0.0, None, None, None)
    assert all(p.consts["SAME_KV_OFFSETS"] is False for p in plan(call))
    ref = unified_attention_ref(b.q, b.k, b.v, b.cu_seqlens_q, b.seqused_k, b.block_table, 0.2)
    b.v = v
    out = _run_triton(b, force=force, scale=0.2, window=(-1, -1), softcap=0.0, extras={}, num_segments=2, tile_n=16)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-3, rtol=2e-3)
