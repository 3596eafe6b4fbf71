"""Prefill and extend (context_attention_fwd, chunked_prefill_paged_decode, extend_attention_fwd,
prefill_attention) against the PyTorch reference. Tier 2: interpreter (fp32) or GPU (fp16)."""

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
from aiter_pa.reference import attention_rows_ref, paged_attention_ref  # noqa: E402
from aiter_pa.testing import make_paged_kv  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float32 if INTERPRET else torch.float16
TOL = 2e-4 if INTERPRET else 1e-2


def _rand(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(DTYPE).to(DEVICE)


def _check(out, ref, name="o"):
    assert not torch.isnan(out).any(), f"{name}: NaN (unwritten) elements"
    err = (out.float().cpu() - ref.float().cpu()).abs().max().item()
    assert err <= TOL, f"{name}: max error {err:.3e} > {TOL:.1e}"


@pytest.mark.parametrize("quant,store,window,alibi,layout", [
    (KVQuant.NONE, None, 0, False, "vllm"),
    (KVQuant.PER_TENSOR_8BIT, torch.float8_e4m3fn, 0, True, "vllm"),
    (KVQuant.NONE, None, 7, False, "NHD"),
    (KVQuant.PER_TOKEN_8BIT, torch.int8, 12, True, "HND"),
])
def test_context_attention_fwd(quant, store, window, alibi, layout):
    cached, qlens = [20, 0, 37], [5, 9, 1]
    hq, hkv, d, bs = 4, 2, 32, 8
    kv = make_paged_kv(cached, hkv, d, bs, layout, quant, DTYPE, store, DEVICE, seed=3)
    total = sum(qlens)
    q, k, v = _rand(total, hq, d, seed=1), _rand(total, hkv, d, seed=2), _rand(total, hkv, d, seed=3)
    o = poison(torch.empty(total, hq, d, dtype=DTYPE, device=DEVICE))
    starts = [0, 5, 14]
    b_start = torch.tensor(starts + [total], dtype=torch.int32, device=DEVICE)
    b_seq_len = torch.tensor([c + n for c, n in zip(cached, qlens)], dtype=torch.int32, device=DEVICE)
    slopes = torch.rand(hq, device=DEVICE) if alibi else None
    aiter_pa.context_attention_fwd(q, k, v, o, "auto" if store is None else "fp8", kv.key_cache, kv.value_cache,
                                   kv.block_tables, b_start, b_seq_len, max(qlens), kv.k_scale, kv.v_scale, slopes,
                                   window or None, 0.3, kv_cache_layout=kv.layout_arg)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), cached, 0.3,
                              q_starts=starts, q_lens=qlens, new_k=k.cpu().float(), new_v=v.cpu().float(),
                              alibi_slopes=None if slopes is None else slopes.cpu(), sliding_window=window)
    _check(o, ref)


def test_context_attention_skip_decode_and_chunked_prefill():
    cached, qlens = [30, 12, 8], [1, 6, 1]
    hq, hkv, d, bs = 8, 2, 32, 16
    kv = make_paged_kv(cached, hkv, d, bs, "vllm", KVQuant.NONE, DTYPE, None, DEVICE, seed=9)
    total = sum(qlens)
    q, k, v = _rand(total, hq, d, seed=4), _rand(total, hkv, d, seed=5), _rand(total, hkv, d, seed=6)
    b_start = torch.tensor([0, 1, 7, 8], dtype=torch.int32, device=DEVICE)
    seq_lens = torch.tensor([c + n for c, n in zip(cached, qlens)], dtype=torch.int32, device=DEVICE)
    ref = paged_attention_ref(q.cpu().float(), kv.k_deq, kv.v_deq, kv.block_tables.cpu(), cached, d ** -0.5,
                              q_starts=[0, 1, 7], q_lens=qlens, new_k=k.cpu().float(), new_v=v.cpu().float())
    o = poison(torch.empty(total, hq, d, dtype=DTYPE, device=DEVICE))
    aiter_pa.chunked_prefill_paged_decode(q, k, v, o, "auto", kv.key_cache, kv.value_cache, kv.block_tables, b_start,
                                          seq_lens, max(qlens), None, None)
    _check(o, ref)
    o2 = poison(torch.empty(total, hq, d, dtype=DTYPE, device=DEVICE))
    aiter_pa.context_attention_fwd(q, k, v, o2, "auto", kv.key_cache, kv.value_cache, kv.block_tables, b_start,
                                   seq_lens, max(qlens), None, None, skip_decode=True)
    _check(o2[1:7], ref[1:7])
    assert torch.isnan(o2[0]).all() and torch.isnan(o2[7]).all()  # decode rows left alone


@pytest.mark.parametrize("causal,d,dv,cap", [(True, 32, 32, 0.0), (False, 32, 32, 0.0), (True, 32, 16, 5.0),
                                             (True, 80, 32, 0.0), (True, 288, 256, 0.0)])
def test_extend_attention_fwd(causal, d, dv, cap):
    # d=80 and d=288 run as two chunks (64 + 16, 256 + 32), as MLA's 576 = 512 + 64
    prefix, extend = [0, 13, 7], [6, 4, 9]
    hq, hkv = 4, 2
    ntok = 40
    g = torch.Generator().manual_seed(7)
    k_buf, v_buf = _rand(ntok, hkv, d, seed=7), _rand(ntok, hkv, dv, seed=8)
    idx = [torch.randperm(ntok, generator=g)[:p] for p in prefix]
    kv_indices = torch.cat(idx).to(torch.int32).to(DEVICE)
    kv_indptr = torch.tensor([0, 0, 13, 20], dtype=torch.int32, device=DEVICE)
    qo = torch.tensor([0, 6, 10, 19], dtype=torch.int32, device=DEVICE)
    total = sum(extend)
    q, k, v = _rand(total, hq, d, seed=9), _rand(total, hkv, d, seed=10), _rand(total, hkv, dv, seed=11)
    o = poison(torch.empty(total, hq, dv, dtype=DTYPE, device=DEVICE))
    aiter_pa.extend_attention_fwd(q, k, v, o, k_buf, v_buf, qo, kv_indptr, kv_indices, None, causal, None, max(extend),
                                  0.25, cap)
    for s in range(3):
        a, b = int(qo[s]), int(qo[s + 1])
        kk = torch.cat([k_buf[idx[s].to(DEVICE)].cpu().float(), k[a:b].cpu().float()])
        vv = torch.cat([v_buf[idx[s].to(DEVICE)].cpu().float(), v[a:b].cpu().float()])
        kpos = torch.arange(prefix[s] + extend[s])
        qpos = prefix[s] + torch.arange(extend[s])
        ref, _ = attention_rows_ref(q[a:b].cpu().float(), kk, vv, qpos, kpos, torch.ones(len(kpos), dtype=torch.bool),
                                    0.25, causal=causal, softcap=cap)
        _check(o[a:b], ref, f"seq {s}")


@pytest.mark.parametrize("causal", [True, False])
def test_prefill_attention(causal):
    lens = [7, 1, 12]
    hq, hkv, d = 4, 4, 32
    total = sum(lens)
    q, k, v = _rand(total, hq, d, seed=12), _rand(total, hkv, d, seed=13), _rand(total, hkv, d, seed=14)
    o = poison(torch.empty(total, hq, d, dtype=DTYPE, device=DEVICE))
    starts = torch.tensor([0, 7, 8], dtype=torch.int32, device=DEVICE)
    aiter_pa.prefill_attention(q, k, v, o, starts, torch.tensor(lens, dtype=torch.int32, device=DEVICE), max(lens),
                               causal)
    for a, n in zip([0, 7, 8], lens):
        pos = torch.arange(n)
        ref, _ = attention_rows_ref(q[a:a + n].cpu().float(), k[a:a + n].cpu().float(), v[a:a + n].cpu().float(), pos,
                                    pos, torch.ones(n, dtype=torch.bool), d ** -0.5, causal=causal)
        _check(o[a:a + n], ref)


@pytest.mark.parametrize("skip_prefix", [True, False])
def test_extend_attention_custom_mask(skip_prefix):
    prefix, extend = [5, 0, 9], [4, 3, 6]
    hq, hkv, d, ntok = 4, 2, 32, 30
    g = torch.Generator().manual_seed(21)
    k_buf, v_buf = _rand(ntok, hkv, d, seed=21), _rand(ntok, hkv, d, seed=22)
    idx = [torch.randperm(ntok, generator=g)[:p] for p in prefix]
    kv_indices = torch.cat(idx).to(torch.int32).to(DEVICE)
    kv_indptr = torch.tensor([0, 5, 5, 14], dtype=torch.int32, device=DEVICE)
    qo = torch.tensor([0, 4, 7, 13], dtype=torch.int32, device=DEVICE)
    total = sum(extend)
    q, k, v = _rand(total, hq, d, seed=23), _rand(total, hkv, d, seed=24), _rand(total, hkv, d, seed=25)
    flags, mask_indptr = [], [0]
    for p, e in zip(prefix, extend):
        f = torch.rand(e, p + e, generator=g) < 0.6
        flags.append(f)
        mask_indptr.append(mask_indptr[-1] + f.numel())
    custom = torch.cat([f.flatten() for f in flags]).to(DEVICE)
    o = poison(torch.empty(total, hq, d, dtype=DTYPE, device=DEVICE))
    aiter_pa.extend_attention_fwd(q, k, v, o, k_buf, v_buf, qo, kv_indptr, kv_indices, custom, True,
                                  torch.tensor(mask_indptr[:-1], dtype=torch.int32, device=DEVICE), max(extend), 0.3,
                                  0.0, skip_prefix)
    o_ref_backend = poison(torch.empty_like(o))
    aiter_pa.extend_attention_fwd(q, k, v, o_ref_backend, k_buf, v_buf, qo, kv_indptr, kv_indices, custom, True,
                                  torch.tensor(mask_indptr[:-1], dtype=torch.int32, device=DEVICE), max(extend), 0.3,
                                  0.0, skip_prefix, backend="reference")
    _check(o_ref_backend, o, "reference backend")
    for s in range(3):
        a, b = int(qo[s]), int(qo[s + 1])
        kk = torch.cat([k_buf[idx[s].to(DEVICE)].cpu().float(), k[a:b].cpu().float()])
        vv = torch.cat([v_buf[idx[s].to(DEVICE)].cpu().float(), v[a:b].cpu().float()])
        m = flags[s].clone()
        if skip_prefix:
            m[:, :prefix[s]] = True
        kpos = torch.arange(prefix[s] + extend[s])
        ref, _ = attention_rows_ref(q[a:b].cpu().float(), kk, vv, prefix[s] + torch.arange(extend[s]), kpos,
                                    torch.ones(len(kpos), dtype=torch.bool), 0.3, causal=False, extra_mask=m)
        _check(o[a:b], ref, f"seq {s}")
