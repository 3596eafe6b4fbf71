"""Paged decode (v1 / v2 split-K, MTP) through every front end, against the reference on the
dequantized cache. Tier 2: Triton interpreter on the CPU (fp32 / fp16, tiny shapes) or a GPU.

The layout x quantization x block size x GQA x MTP x partition cross product is sampled, not
enumerated: each case below changes several axes at once, and together they cover every value
of every axis.
"""

from __future__ import annotations

import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA device")

import aiter_pa  # noqa: E402
from aiter_core.quant import KVQuant  # noqa: E402
from aiter_core.testing import poison  # noqa: E402
from aiter_pa.reference import paged_attention_ref  # noqa: E402
from aiter_pa.testing import make_paged_kv, scale_in_form  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
FP8 = torch.float8_e4m3fn
N, PT, PH, T4, PTEN = (KVQuant.NONE, KVQuant.PER_TOKEN_8BIT, KVQuant.PER_HEAD_8BIT, KVQuant.PER_TOKEN_4BIT,
                       KVQuant.PER_TENSOR_8BIT)


def _tol(dtype):
    return {torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 2e-2}[dtype]


def _check(out, ref, dtype, name="out", atol=None):
    assert not torch.isnan(out).any(), f"{name}: NaN (unwritten) elements"
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    tol = atol or _tol(dtype)
    assert err <= tol, f"{name}: max error {err:.3e} > {tol:.1e}"


def _query(rows, hq, d, dtype, seed):
    g = torch.Generator().manual_seed(seed + 100)
    # strided inside a wider buffer, as upstream's test does (query out of a qkv projection)
    buf = torch.randn(rows, hq + 3, d, generator=g).to(dtype).to(DEVICE)
    return buf[:, 2:2 + hq]


# (layout, quant, store dtype, block size, hq, hkv, head dim, ctx lens, mtp, partitions, scale form)
DECODE_CASES = [
    ("HND", N, None, 16, 4, 1, 32, [7, 26, 57], 1, 1, "core"),
    ("NHD", N, None, 1, 6, 2, 16, [5, 18], 1, 3, "core"),
    ("vllm", N, None, 8, 8, 1, 32, [33, 9], 2, 2, "core"),
    ("vllm_shuffled", N, None, 16, 5, 5, 32, [40, 1], 1, 0, "core"),
    ("HND", PT, FP8, 32, 8, 2, 32, [66, 13], 1, 2, "asm"),
    ("NHD", PT, torch.int8, 4, 3, 1, 16, [23, 9, 2], 3, 1, "hip"),
    ("vllm", PT, FP8, 16, 4, 2, 32, [57, 30], 1, 4, "hip"),
    ("vllm_shuffled", PT, torch.int8, 16, 10, 2, 32, [31, 17], 4, 2, "asm"),
    ("HND", PH, torch.int8, 16, 4, 4, 32, [20, 41], 1, 1, "core"),
    ("vllm", PH, FP8, 32, 12, 3, 16, [70], 2, 2, "core"),
    ("NHD", PTEN, FP8, 2, 2, 1, 32, [19, 3], 1, 2, "core"),
    ("vllm_shuffled", PTEN, FP8, 16, 16, 2, 32, [48, 12], 1, 1, "core"),
    ("HND", T4, None, 16, 8, 2, 32, [45, 7], 1, 3, "core"),
    ("vllm", T4, None, 16, 3, 3, 32, [29], 2, 1, "hip"),
    ("NHD", T4, None, 64, 4, 1, 64, [100, 64], 1, 2, "asm"),
    ("HND", T4, None, 16, 4, 2, 48, [40, 9], 2, 2, "core"),  # 48 = 32 + 16: two-chunk q/k dots with int4
    ("vllm", PT, FP8, 16, 4, 1, 80, [35], 1, 1, "hip"),
    ("HND", N, None, 256, 2, 2, 16, [300], 1, 2, "core"),
]


@pytest.mark.parametrize("case", DECODE_CASES, ids=[f"{c[0]}-{c[1].name}-bs{c[3]}-g{c[4]}x{c[5]}-mtp{c[8]}-p{c[9]}"
                                                   for c in DECODE_CASES])
def test_paged_attention_decode_matches_reference(case):
    layout, quant, store, bs, hq, hkv, d, ctx, mtp, parts, form = case
    dtype = torch.float32 if INTERPRET else torch.float16
    seed = hash(case[:4]) % 1000
    kv = make_paged_kv(ctx, hkv, d, bs, layout, quant, dtype, store, DEVICE, seed=seed)
    q = _query(len(ctx) * mtp, hq, d, dtype, seed)
    out = poison(torch.empty(len(ctx) * mtp, hq, d, dtype=dtype, device=DEVICE))
    ks = scale_in_form(kv.k_scale, form, kv.num_blocks, bs)
    vs = scale_in_form(kv.v_scale, form, kv.num_blocks, bs)
    scale = d ** -0.5
    aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, scale,
                                    max(ctx), None, ks, vs, parts, kv_cache_layout=kv.layout_arg or "HND", mtp=mtp)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, scale,
                              q_lens=[mtp] * len(ctx))
    _check(out, ref, dtype)


@pytest.mark.parametrize("feature", ["alibi", "softcap", "window", "all"])
def test_decode_features(feature):
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, hq, hkv, d, bs, mtp = [37, 64, 5], 4, 2, 32, 16, 2
    kv = make_paged_kv(ctx, hkv, d, bs, "NHD", PT, dtype, FP8, DEVICE, seed=11)
    q = _query(len(ctx) * mtp, hq, d, dtype, 11)
    alibi = torch.rand(hq, dtype=torch.float32, device=DEVICE) if feature in ("alibi", "all") else None
    cap = 2.5 if feature in ("softcap", "all") else 0.0
    win = 20 if feature in ("window", "all") else 0
    for parts in (1, 3):
        out = poison(torch.empty(len(ctx) * mtp, hq, d, dtype=dtype, device=DEVICE))
        aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, 0.3,
                                        max(ctx), None, kv.k_scale, kv.v_scale, parts, alibi, kv_cache_layout="NHD",
                                        mtp=mtp, logits_soft_cap=cap, sliding_window=win)
        ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.3,
                                  q_lens=[mtp] * len(ctx), alibi_slopes=None if alibi is None else alibi.cpu(),
                                  softcap=cap, sliding_window=win)
        _check(out, ref, dtype, f"{feature} partitions={parts}")


@pytest.mark.parametrize("hp", [0, 1, 2])
def test_high_precision_levels(hp):
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx = [50, 21]
    kv = make_paged_kv(ctx, 2, 32, 16, "vllm_shuffled", PT, dtype, FP8, DEVICE, seed=5)
    q = _query(2, 8, 32, dtype, 5)
    out = poison(torch.empty(2, 8, 32, dtype=dtype, device=DEVICE))
    aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, 32 ** -0.5,
                                    max(ctx), None, kv.k_scale, kv.v_scale, 2, high_precision=hp)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 32 ** -0.5)
    if hp == 0:
        # probabilities rounded to fp8 (3 mantissa bits): a few percent of error, but the same direction
        err = (out.float().cpu() - ref).abs().max().item()
        cos = torch.nn.functional.cosine_similarity(out.float().cpu().flatten(), ref.flatten(), dim=0).item()
        assert not torch.isnan(out).any() and err < 0.25 and cos > 0.99, (err, cos)
    else:
        _check(out, ref, dtype)


@pytest.mark.parametrize("quant,store,mtp", [(PT, FP8, 1), (PT, torch.int8, 2), (T4, None, 1), (PTEN, FP8, 3),
                                              (PH, torch.int8, 1)])
def test_fp16_dots_for_8bit_cache(monkeypatch, quant, store, mtp):
    """The fp16 dots an 8-bit cache gets by default under bf16 queries (a GPU-only dtype here),
    forced for this query dtype. V is scaled down to ~1e-6 so that ``p * v_scale`` without the
    per-tile normalisation would sink into fp16 subnormals and lose the output."""
    monkeypatch.setenv("AITER_PA_KV_COMPUTE", "fp16")
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    ctx = [45, 70, 3]
    kv = make_paged_kv(ctx, 2, 32, 16, "HND", quant, dtype, store, DEVICE, seed=23)
    kv.v_scale.mul_(1e-6)
    kv.v_deq = kv.v_deq * 1e-6
    q = _query(len(ctx) * mtp, 8, 32, dtype, 23) * 3.0
    for parts in (1, 2):
        out = poison(torch.empty(len(ctx) * mtp, 8, 32, dtype=dtype, device=DEVICE))
        aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables,
                                        32 ** -0.5, max(ctx), None, kv.k_scale, kv.v_scale, parts, mtp=mtp)
        ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 32 ** -0.5,
                                  q_lens=[mtp] * len(ctx))
        assert not torch.isnan(out).any()
        rel = ((out.float().cpu() - ref).abs().max() / ref.abs().max()).item()
        assert rel <= 1e-2, f"partitions={parts}: relative error {rel:.2e}"


@pytest.mark.parametrize("layout,quant,store", [("NHD", N, None), ("HND", N, None), ("HND", PT, FP8),
                                                 ("NHD", PTEN, FP8)])
def test_unused_cache_slots_never_reach_the_output(layout, quant, store):
    """The kernel loads K/V tiles without a token mask (addresses stay in the pool): every slot no
    sequence owns, the tail of each last block and the unreferenced blocks, is NaN here and must
    not reach the output, with padded block-table entries (-1) and split partitions."""
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, bs = [37, 70, 5], 16
    kv = make_paged_kv(ctx, 2, 32, bs, layout, quant, dtype, store, DEVICE, seed=41, extra_blocks=3)
    used = torch.zeros(kv.num_blocks, bs, dtype=torch.bool)
    for i, c in enumerate(ctx):
        for t in range(c):
            used[int(kv.block_tables[i, t // bs]), t % bs] = True
    unused = ~used.to(DEVICE)
    for cache in (kv.key_cache, kv.value_cache):
        fp8 = cache.dtype == FP8
        raw = cache.view(torch.uint8) if fp8 else cache  # 0x7F is e4m3fn's NaN
        view = raw if layout == "NHD" else raw.transpose(1, 2)  # [nb, bs, H, D]
        view[unused] = 0x7F if fp8 else float("nan")
    assert (kv.block_tables == -1).any()  # padded entries are exercised too
    q = _query(len(ctx), 8, 32, dtype, 41)
    for parts in (1, 3):
        out = poison(torch.empty(len(ctx), 8, 32, dtype=dtype, device=DEVICE))
        aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables,
                                        32 ** -0.5, max(ctx), None, kv.k_scale, kv.v_scale, parts,
                                        kv_cache_layout=layout)
        ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 32 ** -0.5)
        _check(out, ref, dtype, f"partitions={parts}")


@pytest.mark.parametrize("layout,quant,store", [("vllm", PT, FP8), ("HND", N, None), ("vllm_shuffled", T4, None)])
def test_64_bit_offsets_give_the_same_result(layout, quant, store):
    """Caches of 2**31 elements or more get int64 address arithmetic (OFFSET_BITS=64); smaller ones
    int32. Both on the same small cache, against the reference."""
    from aiter_pa import checks
    from aiter_pa.triton.attention import _paged_attn_kernel
    from aiter_pa.triton.launch import prepare_launch

    dtype = torch.float32 if INTERPRET else torch.float16
    ctx = [45, 20]
    kv = make_paged_kv(ctx, 2, 32, 16, layout, quant, dtype, store, DEVICE, seed=77)
    q = _query(2, 4, 32, dtype, 77)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.2)
    for bits in (32, 64):
        out = poison(torch.empty_like(q))
        call = checks.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables,
                                             0.2, max(ctx), kv.k_scale, kv.v_scale, 1, None, kv.layout_arg or "HND",
                                             1, 1, 0.0, 0, None, None, None)
        launch = prepare_launch(call)
        assert launch.constexprs["OFFSET_BITS"] == 32
        launch.constexprs["OFFSET_BITS"] = bits
        _paged_attn_kernel[launch.grid](*launch.args, **launch.constexprs, num_warps=launch.num_warps,
                                        num_stages=launch.num_stages)
        _check(out, ref, dtype, f"OFFSET_BITS={bits}")


def test_relocated_pool_plumbing():
    """The CPU check of the helper behind the GPU tier's pool-past-2**31 test: blocks moved to the
    end of a larger pool, tables remapped, same output."""
    from aiter_pa.testing import relocate_to_pool_end

    dtype = torch.float32 if INTERPRET else torch.float16
    ctx = [30, 9]
    kv = make_paged_kv(ctx, 2, 32, 16, "HND", PTEN, dtype, FP8, DEVICE, seed=3)
    k, v, tables = relocate_to_pool_end(kv, kv.num_blocks + 7)
    assert k.shape[0] == kv.num_blocks + 7 and int(tables.max()) >= 7 and (tables == -1).sum() == (kv.block_tables == -1).sum()
    q = _query(2, 4, 32, dtype, 3)
    out = poison(torch.empty_like(q))
    aiter_pa.paged_attention_decode(out, q, k, v, kv.context_lens, tables, 0.2, max(ctx), None, kv.k_scale, kv.v_scale)
    _check(out, paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.2), dtype)
    with pytest.raises(ValueError, match="per-slot scales"):
        relocate_to_pool_end(make_paged_kv(ctx, 2, 32, 16, "HND", PT, dtype, FP8, DEVICE), 100)
    with pytest.raises(ValueError, match=f"total_blocks must be >= {kv.num_blocks}, got 1"):
        relocate_to_pool_end(kv, 1)


def test_kv_compute_env_is_checked(monkeypatch):
    from aiter_pa.triton.launch import _kv_in_fp16

    assert _kv_in_fp16(torch.bfloat16, 1, False) and not _kv_in_fp16(torch.float16, 1, False)
    assert not _kv_in_fp16(torch.bfloat16, 2, False) and not _kv_in_fp16(torch.bfloat16, 1, True)
    monkeypatch.setenv("AITER_PA_KV_COMPUTE", "query")
    assert not _kv_in_fp16(torch.bfloat16, 1, False)
    monkeypatch.setenv("AITER_PA_KV_COMPUTE", "fp32")
    with pytest.raises(ValueError, match="AITER_PA_KV_COMPUTE"):
        _kv_in_fp16(torch.bfloat16, 1, False)


def test_paged_attention_rocm_two_phase_buffers():
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, hq, hkv, d, bs, mtp, part = [70, 33, 5], 8, 2, 32, 16, 1, 32
    kv = make_paged_kv(ctx, hkv, d, bs, "vllm", PT, dtype, FP8, DEVICE, seed=21)
    q = _query(len(ctx) * mtp, hq, d, dtype, 21)
    P = -(-max(ctx) // part)
    exp_sums = poison(torch.empty(len(ctx), hq, P, dtype=torch.float32, device=DEVICE))
    max_logits = poison(torch.empty_like(exp_sums))
    tmp_out = poison(torch.empty(len(ctx), hq, P, d, dtype=dtype, device=DEVICE))
    out = poison(torch.empty(len(ctx), hq, d, dtype=dtype, device=DEVICE))
    ks = scale_in_form(kv.k_scale, "hip", kv.num_blocks, bs)
    vs = scale_in_form(kv.v_scale, "hip", kv.num_blocks, bs)
    res = aiter_pa.paged_attention_rocm(out, exp_sums, max_logits, tmp_out, q, kv.key_cache, kv.value_cache, hkv, 0.25,
                                        kv.block_tables, kv.context_lens, bs, max(ctx), None, "fp8", ks, vs,
                                        partition_size=part)
    assert res is out
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.25)
    _check(out, ref, dtype)
    # upstream semantics of the buffers: per partition max logit and exp-sum (natural log)
    assert not torch.isnan(exp_sums).any() and not torch.isnan(max_logits).any()
    lse = max_logits + torch.log(exp_sums)
    s0 = kv.context_lens[1].item()
    assert torch.all(exp_sums[1, :, -(-s0 // part):] == 0)  # partitions past the context are empty
    assert torch.isfinite(lse[0]).all()


def test_paged_attention_v1_nhd_softcap_window_cu_query_lens():
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, hq, hkv, d, bs = [40, 90, 12], 4, 1, 32, 16
    qlens = [2, 1, 3]
    kv = make_paged_kv(ctx, hkv, d, bs, "NHD", N, dtype, None, DEVICE, seed=31)
    q = _query(sum(qlens), hq, d, dtype, 31)
    cu = torch.tensor([0, 2, 3, 6], dtype=torch.int32, device=DEVICE)
    part = 32
    P = -(-max(ctx) // part)
    ws = torch.empty(aiter_pa.paged_attention_workspace_size(len(ctx), hq, d, P, dtype, mtp=2), dtype=torch.uint8,
                     device=DEVICE)
    out = poison(torch.empty(sum(qlens), hq, d, dtype=dtype, device=DEVICE))
    aiter_pa.paged_attention_v1(out, ws, q, kv.key_cache, kv.value_cache, 0.2, kv.block_tables, cu, kv.context_lens,
                                max(ctx), None, "auto", "NHD", 3.0, None, None, partition_size=part, mtp=3,
                                sliding_window=25)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.2, q_starts=[0, 2, 3],
                              q_lens=qlens, softcap=3.0, sliding_window=25)
    _check(out, ref, dtype)


def test_paged_attention_ragged():
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, hq, hkv, d, bs = [35, 16, 3], 6, 3, 32, 16
    kv = make_paged_kv(ctx, hkv, d, bs, "HND", PH, dtype, torch.int8, DEVICE, seed=41)
    pages, indptr, last = [], [0], []
    for s, c in enumerate(ctx):
        n = -(-c // bs)
        pages += kv.block_tables[s, :n].tolist()
        indptr.append(len(pages))
        last.append(c - (n - 1) * bs)
    to = lambda x: torch.tensor(x, dtype=torch.int32, device=DEVICE)  # noqa: E731
    q = _query(len(ctx), hq, d, dtype, 41)
    part, P = 16, 3
    ws = torch.empty(aiter_pa.paged_attention_workspace_size(len(ctx), hq, d, P, dtype), dtype=torch.uint8,
                     device=DEVICE)
    out = poison(torch.empty(len(ctx), hq, d, dtype=dtype, device=DEVICE))
    aiter_pa.paged_attention_ragged(out, ws, q, kv.key_cache, kv.value_cache, 0.2, to(indptr), to(pages), to(last), bs,
                                    P, None, "int8", "HND", 0.0, kv.k_scale, kv.v_scale, partition_size=part)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, 0.2)
    _check(out, ref, dtype)


@pytest.mark.parametrize("quant,store", [(N, None), (PT, FP8), (PTEN, torch.int8)])
def test_pa_fwd_asm_mtp_qo_indptr(quant, store):
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx, hq, hkv, d, bs = [45, 20, 33], 8, 1, 32, 16
    qlens = [3, 1, 2]
    kv = make_paged_kv(ctx, hkv, d, bs, "vllm_shuffled", quant, dtype, store, DEVICE, seed=51)
    q = _query(sum(qlens), hq, d, dtype, 51).contiguous()
    qo = torch.tensor([0, 3, 4, 6], dtype=torch.int32, device=DEVICE)
    ks = scale_in_form(kv.k_scale, "asm", kv.num_blocks, bs)
    vs = scale_in_form(kv.v_scale, "asm", kv.num_blocks, bs)
    out = aiter_pa.pa_fwd_asm(q, kv.key_cache, kv.value_cache, kv.block_tables, kv.context_lens,
                              kv.block_tables.stride(0), 3, ks, vs, None, qo, 1)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, d ** -0.5,
                              q_starts=[0, 3, 4], q_lens=qlens)
    _check(out, ref, dtype)


@pytest.mark.parametrize("num_seqs,hd", [(2, 32), (80, 128)])
def test_paged_attention_common_both_paths(num_seqs, hd):
    from aiter_pa.api import should_use_asm_kernel

    dtype = torch.float32 if INTERPRET else torch.float16
    ctx = [(7 * i + 5) % 40 + 1 for i in range(num_seqs)]
    hq, hkv, bs = 2, 1, 16
    kv = make_paged_kv(ctx, hkv, hd, bs, "vllm_shuffled", N, dtype, None, DEVICE, seed=61)
    q = _query(num_seqs, hq, hd, dtype, 61)
    P = -(-max(ctx) // 256)
    es = torch.empty(num_seqs, hq, P, dtype=torch.float32, device=DEVICE)
    out = poison(torch.empty(num_seqs, hq, hd, dtype=dtype, device=DEVICE))
    res = aiter_pa.paged_attention_common(q, kv.key_cache, kv.value_cache, es, torch.empty_like(es),
                                          torch.empty(num_seqs, hq, P, hd, dtype=dtype, device=DEVICE),
                                          kv.block_tables, kv.context_lens, kv.block_tables.stride(0), hd ** -0.5,
                                          max_seq_len=max(ctx), out_=out)
    assert res is out
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), ctx, hd ** -0.5)
    _check(out, ref, dtype)
    if hd == 128:
        assert should_use_asm_kernel(num_seqs, hq, hd, dtype, 1) == (num_seqs * hq > 2 * __import__(
            "aiter_core").get_arch_info().num_cu)
    assert not should_use_asm_kernel(num_seqs, hq, 64, dtype, 2)
    assert should_use_asm_kernel(1, 1, 128, torch.int8, 1) and should_use_asm_kernel(1, 1, 128, dtype, 2)


def test_reference_backend_agrees_and_workspace_reuse():
    dtype = torch.float32 if INTERPRET else torch.float16
    ctx = [30, 11]
    kv = make_paged_kv(ctx, 2, 32, 8, "HND", T4, dtype, None, DEVICE, seed=71)
    q = _query(2, 4, 32, dtype, 71)
    outs = []
    ws = aiter_pa.decode_partials(2, 4, 32, 3, device=DEVICE)
    for backend, workspace in (("triton", ws), ("reference", None)):
        out = poison(torch.empty(2, 4, 32, dtype=dtype, device=DEVICE))
        aiter_pa.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, 0.2,
                                        max(ctx), None, kv.k_scale, kv.v_scale, workspace=workspace, backend=backend)
        outs.append(out)
    _check(outs[0], outs[1], dtype)


def test_choose_num_partitions_heuristic(monkeypatch):
    from aiter_pa.triton.launch import CTAS_PER_SM, MIN_PART_TOKENS, choose_num_partitions

    monkeypatch.delenv("AITER_PA_NUM_PARTITIONS", raising=False)
    assert choose_num_partitions(64, 8, 1, 4096, num_sms=132) == 2  # 512 CTAs < 4 x 132
    assert choose_num_partitions(256, 8, 1, 4096, num_sms=132) == 1  # enough CTAs: v1
    assert choose_num_partitions(1, 8, 1, 65536, num_sms=132) == min(-(-CTAS_PER_SM * 132 // 8), 65536 // MIN_PART_TOKENS)
    assert choose_num_partitions(1, 1, 1, MIN_PART_TOKENS, num_sms=132) == 1  # short context: one pass
    # 8-bit caches aim at 2 CTAs per SM: the fp8 shape runs in one pass, small batches split less
    assert choose_num_partitions(64, 8, 1, 4096, num_sms=132, kv_elem_bytes=1) == 1
    assert choose_num_partitions(8, 8, 1, 4096, num_sms=132, kv_elem_bytes=1) == 5  # ceil(264 / 64)
    assert choose_num_partitions(8, 8, 1, 4096, num_sms=132, kv_elem_bytes=0.5) == 5  # int4
    assert choose_num_partitions(8, 8, 1, 4096, num_sms=132) == 8  # 16-bit: ceil(528 / 64) = 9, capped at 8
    monkeypatch.setenv("AITER_PA_NUM_PARTITIONS", "5")
    assert choose_num_partitions(256, 8, 1, 4096, num_sms=132) == 5


def test_paged_attention_shim_write_then_decode():
    from aiter_pa.paged_attn import PagedAttention

    dtype = torch.float32 if INTERPRET else torch.float16
    nb, bs, hkv, hq, d = 6, 16, 2, 4, 32
    kv_cache = torch.empty(PagedAttention.get_kv_cache_shape(nb, bs, hkv, d), dtype=dtype, device=DEVICE)
    kc, vc = PagedAttention.split_kv_cache(kv_cache, hkv, d)
    g = torch.Generator().manual_seed(81)
    ctx = [37, 20]
    bt = torch.tensor([[3, 0, 5], [1, 4, -1]], dtype=torch.int32, device=DEVICE)
    slots = torch.cat([bt[s, torch.arange(c) // bs].long() * bs + torch.arange(c, device=DEVICE) % bs
                       for s, c in enumerate(ctx)])
    key = torch.randn(sum(ctx), hkv, d, generator=g).to(dtype).to(DEVICE)
    value = torch.randn(sum(ctx), hkv, d, generator=g).to(dtype).to(DEVICE)
    PagedAttention.write_to_paged_cache(key, value, kc, vc, slots, "auto")
    q = _query(2, hq, d, dtype, 81)
    out = PagedAttention.forward_decode(q, kc, vc, bt, torch.tensor(ctx, dtype=torch.int32, device=DEVICE), max(ctx),
                                        "auto", hkv, 0.2, None, None, None)
    for s, (a, c) in enumerate(((0, 37), (37, 20))):
        from aiter_pa.reference import attention_rows_ref

        pos = torch.arange(c)
        ref, _ = attention_rows_ref(q[s:s + 1].cpu().float(), key[a:a + c].cpu().float(), value[a:a + c].cpu().float(),
                                    torch.tensor([c - 1]), pos, torch.ones(c, dtype=torch.bool), 0.2)
        _check(out[s:s + 1], ref, dtype)
