"""aiter_core.triton_attn: split-K merge, online softmax, paged addressing and KV dequantization.

Runs the device functions through tiny test kernels under TRITON_INTERPRET=1 (CPU) or on a GPU,
against PyTorch references (aiter_core.quant.dequantize_kv for the dequantization).
"""

from __future__ import annotations

import math
import os

import pytest
import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CUDA = torch.cuda.is_available() and not INTERPRET
pytestmark = pytest.mark.skipif(not (INTERPRET or CUDA), reason="needs TRITON_INTERPRET=1 or a CUDA device")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from aiter_core import triton_attn as ta  # noqa: E402
from aiter_core.quant import KVQuant, dequantize_kv, quantize_kv  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"


# ----------------------------------------------------------------------------- split-K merge


@pytest.mark.parametrize("rows", [(5,), (3, 4)])
@pytest.mark.parametrize("splits", [1, 3, 40])
@pytest.mark.parametrize("with_sum", [False, True])
def test_splitk_merge_matches_reference(rows, splits, with_sum):
    g = torch.Generator().manual_seed(splits + len(rows))
    D = 24
    po = torch.randn(*rows, splits, D, generator=g)
    plse = torch.randn(*rows, splits, generator=g) * 3
    psum = torch.rand(*rows, splits, generator=g) + 0.5 if with_sum else None
    if splits > 1:
        # empty splits: -inf LSE (or zero sum) with garbage outputs that must never be read
        plse.view(-1, splits)[0, 1] = float("-inf")
        po.view(-1, splits, D)[0, 1] = float("nan")
        if with_sum:
            psum.view(-1, splits)[1 % psum.view(-1, splits).shape[0], 0] = 0.0
            po.view(-1, splits, D)[1 % po.view(-1, splits, D).shape[0], 0] = float("nan")
    # a row whose splits are all empty
    plse.view(-1, splits)[-1, :] = float("-inf")
    po.view(-1, splits, D)[-1] = float("nan")
    ref_out, ref_lse = ta.splitk_merge_reference(po, plse, psum)
    out = torch.full((*rows, D), float("nan"))
    lse = torch.full(rows, float("nan"))
    ta.splitk_merge(po.to(DEVICE), plse.to(DEVICE), out_dev := out.to(DEVICE), lse_dev := lse.to(DEVICE),
                    partial_sum=None if psum is None else psum.to(DEVICE))
    out, lse = out_dev.cpu(), lse_dev.cpu()
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    assert torch.all(out.view(-1, D)[-1] == 0) and lse.view(-1)[-1] == float("-inf")


@pytest.mark.parametrize("where", ["lse", "sum"])
def test_splitk_merge_keeps_a_nan_split(where):
    # the NaN rule: a split whose max or sum is NaN reaches its row's output and LSE; other rows and
    # empty splits stay as they were
    g = torch.Generator().manual_seed(7)
    po = torch.randn(3, 4, 16, generator=g)
    plse = torch.randn(3, 4, generator=g)
    psum = torch.rand(3, 4, generator=g) + 0.5
    (plse if where == "lse" else psum)[1, 2] = float("nan")
    plse[2, 1] = float("-inf")  # an empty split beside a NaN-free row
    po[2, 1] = float("nan")
    ref_out, ref_lse = ta.splitk_merge_reference(po, plse, psum)
    out, lse = torch.zeros(3, 16, device=DEVICE), torch.zeros(3, device=DEVICE)
    ta.splitk_merge(po.to(DEVICE), plse.to(DEVICE), out, lse, partial_sum=psum.to(DEVICE))
    out, lse = out.cpu(), lse.cpu()
    assert out[1].isnan().all() and lse[1].isnan() and ref_out[1].isnan().all() and ref_lse[1].isnan()
    assert not out[[0, 2]].isnan().any() and not lse[[0, 2]].isnan().any()
    torch.testing.assert_close(out[[0, 2]], ref_out[[0, 2]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[[0, 2]], ref_lse[[0, 2]], atol=1e-5, rtol=1e-5)


def test_splitk_merge_strided_out_and_fp16():
    g = torch.Generator().manual_seed(7)
    po = torch.randn(2, 6, 5, 16, generator=g)  # [b, h, splits, d]
    plse = torch.randn(2, 6, 5, generator=g)
    big = torch.full((2, 6, 32), float("nan"), dtype=torch.float16)
    out = big[:, :, 8:24]  # strided view: only these columns may be written
    ta.splitk_merge(po.to(DEVICE), plse.to(DEVICE), out_dev := out.to(DEVICE) if CUDA else out)
    if CUDA:
        out = out_dev.cpu()
    ref, _ = ta.splitk_merge_reference(po, plse)
    torch.testing.assert_close(out.float(), ref, atol=2e-3, rtol=2e-3)
    if not CUDA:
        assert torch.isnan(big[:, :, :8]).all() and torch.isnan(big[:, :, 24:]).all()


def test_splitk_merge_rejects_bad_shapes():
    po = torch.randn(3, 4, 8)
    with pytest.raises(ValueError, match="partial_lse"):
        ta.splitk_merge(po, torch.randn(3, 5), torch.empty(3, 8))
    with pytest.raises(ValueError, match="out must have shape"):
        ta.splitk_merge(po, torch.randn(3, 4), torch.empty(3, 9))
    with pytest.raises(TypeError, match="lse_out must be float32"):
        ta.splitk_merge(po, torch.randn(3, 4), torch.empty(3, 8), torch.empty(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="row dims"):
        ta.splitk_merge(torch.randn(2, 2, 2, 4, 8), torch.randn(2, 2, 2, 4), torch.empty(2, 2, 2, 8))


# ----------------------------------------------------------------------------- online softmax


@triton.jit
def _attn_rows_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, n_keys, scale, softcap,
                      M: tl.constexpr, D: tl.constexpr, BLOCK_N: tl.constexpr, USE_CAP: tl.constexpr):
    offs_m = tl.arange(0, M)
    offs_d = tl.arange(0, D)
    q = tl.load(q_ptr + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([M], float("-inf"), tl.float32)
    l_i = tl.zeros([M], tl.float32)
    acc = tl.zeros([M, D], tl.float32)
    for n0 in range(0, n_keys, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        nm = offs_n < n_keys
        k = tl.load(k_ptr + offs_n[None, :] * D + offs_d[:, None], mask=nm[None, :], other=0.0)
        v = tl.load(v_ptr + offs_n[:, None] * D + offs_d[None, :], mask=nm[:, None], other=0.0)
        s = tl.dot(q, k) * scale
        if USE_CAP:
            s = ta.softcap_scores(s, softcap)
        # row r sees keys < r * 3 (row 0 sees nothing: the empty-row path)
        visible = nm[None, :] & (offs_n[None, :] < offs_m[:, None] * 3)
        s = tl.where(visible, s * 1.4426950408889634, float("-inf"))
        m_i, alpha, p, l_i = ta.online_softmax_step(m_i, l_i, s)
        acc = acc * alpha[:, None] + tl.dot(p, v)
    out, lse = ta.online_softmax_finalize(acc, m_i, l_i)
    tl.store(out_ptr + offs_m[:, None] * D + offs_d[None, :], out)
    tl.store(lse_ptr + offs_m, lse)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_online_softmax_step_and_finalize(softcap):
    g = torch.Generator().manual_seed(3)
    M, D, N = 16, 16, 40
    q, k, v = (torch.randn(r, D, generator=g) for r in (M, N, N))
    out = torch.full((M, D), float("nan"))
    lse = torch.full((M,), float("nan"))
    args = [t.to(DEVICE) for t in (q, k, v, out, lse)]
    _attn_rows_kernel[(1,)](*args, N, 0.5, softcap if softcap else 1.0, M=M, D=D, BLOCK_N=16,
                            USE_CAP=softcap > 0)
    out, lse = args[3].cpu(), args[4].cpu()
    s = (q.double() @ k.double().T) * 0.5
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    visible = torch.arange(N)[None, :] < torch.arange(M)[:, None] * 3
    s = s.masked_fill(~visible, float("-inf"))
    ref_lse = torch.logsumexp(s, -1)
    p = torch.softmax(s, -1).nan_to_num(0.0)
    ref_out = p @ v.double()
    torch.testing.assert_close(out, ref_out.float(), atol=2e-5, rtol=1e-4)
    assert lse[0] == float("-inf") and torch.all(out[0] == 0)
    torch.testing.assert_close(lse[1:], ref_lse[1:].float(), atol=2e-5, rtol=1e-5)


@triton.jit
def _merge_two_kernel(oa_ptr, la_ptr, ob_ptr, lb_ptr, o_ptr, l_ptr, M: tl.constexpr, D: tl.constexpr):
    r = tl.arange(0, M)
    d = tl.arange(0, D)
    oa = tl.load(oa_ptr + r[:, None] * D + d[None, :])
    ob = tl.load(ob_ptr + r[:, None] * D + d[None, :])
    o, lse = ta.merge_two_partials(oa, tl.load(la_ptr + r), ob, tl.load(lb_ptr + r))
    tl.store(o_ptr + r[:, None] * D + d[None, :], o)
    tl.store(l_ptr + r, lse)


def test_merge_two_partials():
    g = torch.Generator().manual_seed(5)
    oa, ob = torch.randn(4, 8, generator=g), torch.randn(4, 8, generator=g)
    la, lb = torch.randn(4, generator=g), torch.randn(4, generator=g)
    la[1] = float("-inf")
    oa[1] = float("nan")
    la[3] = lb[3] = float("-inf")
    oa[3] = ob[3] = float("nan")
    o, lse = torch.full((4, 8), float("nan")), torch.full((4,), float("nan"))
    args = [t.to(DEVICE) for t in (oa, la, ob, lb, o, lse)]
    _merge_two_kernel[(1,)](*args, M=4, D=8)
    o, lse = args[4].cpu(), args[5].cpu()
    ref_o, ref_l = ta.splitk_merge_reference(torch.stack([oa, ob], 1), torch.stack([la, lb], 1))
    torch.testing.assert_close(o, ref_o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, ref_l, atol=1e-6, rtol=1e-5)


# ----------------------------------------------------------------------------- paged gather + dequant


@triton.jit
def _gather_kernel(cache_ptr, scale_ptr, bt_ptr, out_ptr, same_ptr, seq_len, num_logical, num_phys, head,
                   s_blk, s_head, s_t_hi, s_t_lo, s_c_hi, s_c_lo, s_sblk, s_shead, s_stok,
                   BLOCK_SIZE: tl.constexpr, TX: tl.constexpr, CX: tl.constexpr, QUANT: tl.constexpr,
                   D: tl.constexpr, BLOCK_N: tl.constexpr):
    tok = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    phys, off, valid = ta.paged_block_lookup(bt_ptr, tok, BLOCK_SIZE, num_logical, num_phys, tok < seq_len)
    col, shift = ta.kv_storage_col(d, QUANT)
    ptrs = (cache_ptr + head * s_head + ta.paged_token_offset(phys, off, s_blk, TX, s_t_hi, s_t_lo)[:, None]
            + ta.packed_col_offset(col, CX, s_c_hi, s_c_lo)[None, :])
    # the from-token form, in int64 and in int32, must address the same elements
    a = ta.paged_token_offset(phys, off, s_blk, TX, s_t_hi, s_t_lo)
    b = ta.paged_token_offset_from_tok(phys, tok, s_blk, BLOCK_SIZE, TX, s_t_hi, s_t_lo, 64)
    b32 = ta.paged_token_offset_from_tok(phys, tok, s_blk, BLOCK_SIZE, TX, s_t_hi, s_t_lo, 32)
    differ = tl.where(valid, tl.abs(a - b) + tl.abs(a - b32.to(tl.int64)), 0)
    tl.store(same_ptr + tl.program_id(0), tl.sum(differ, 0).to(tl.int32))
    x = tl.load(ptrs, mask=valid[:, None])
    sc = ta.load_kv_scale(scale_ptr, QUANT, head, phys, off, s_sblk, s_shead, s_stok, valid)
    v = ta.dequant_kv_tile(x, sc, QUANT, shift[None, :], 0)
    v = tl.where(valid[:, None], v, -7777.0)
    tl.store(out_ptr + tok[:, None] * D + d[None, :], v, mask=(tok < seq_len)[:, None])


def _layout(c: torch.Tensor, layout: str, x: int):
    """NHD storage [nb, bs, H, C] -> (tensor, address params) for the named layout."""
    nb, bs, H, C = c.shape
    if layout == "NHD":
        t = c.contiguous()
        return t, dict(s_blk=t.stride(0), s_head=t.stride(2), TX=bs, s_t_hi=0, s_t_lo=t.stride(1), CX=C,
                       s_c_hi=0, s_c_lo=1)
    if layout == "HND":
        t = c.permute(0, 2, 1, 3).contiguous()
        return t, dict(s_blk=t.stride(0), s_head=t.stride(1), TX=bs, s_t_hi=0, s_t_lo=t.stride(2), CX=C,
                       s_c_hi=0, s_c_lo=1)
    if layout == "K5":  # [nb, H, C/x, bs, x]
        t = c.reshape(nb, bs, H, C // x, x).permute(0, 2, 3, 1, 4).contiguous()
        return t, dict(s_blk=t.stride(0), s_head=t.stride(1), TX=bs, s_t_hi=0, s_t_lo=t.stride(3), CX=x,
                       s_c_hi=t.stride(2), s_c_lo=1)
    if layout == "V4":  # [nb, H, C, bs]
        t = c.permute(0, 2, 3, 1).contiguous()
        return t, dict(s_blk=t.stride(0), s_head=t.stride(1), TX=bs, s_t_hi=0, s_t_lo=1, CX=C, s_c_hi=0,
                       s_c_lo=t.stride(2))
    if layout == "VSHUF":  # [nb, H, bs/x, C, x]
        t = c.reshape(nb, bs // x, x, H, C).permute(0, 3, 1, 4, 2).contiguous()
        return t, dict(s_blk=t.stride(0), s_head=t.stride(1), TX=x, s_t_hi=t.stride(2), s_t_lo=1, CX=C,
                       s_c_hi=0, s_c_lo=t.stride(3))
    raise AssertionError(layout)


CASES = [
    ("NHD", KVQuant.NONE, torch.float32),
    ("HND", KVQuant.PER_TENSOR_8BIT, torch.float8_e4m3fn),
    ("K5", KVQuant.PER_TOKEN_8BIT, torch.int8),
    ("V4", KVQuant.PER_HEAD_8BIT, torch.float8_e4m3fn),
    ("VSHUF", KVQuant.PER_TOKEN_8BIT, torch.float8_e4m3fn),
    ("NHD", KVQuant.PER_TOKEN_4BIT, None),
    ("K5", KVQuant.PER_TOKEN_4BIT, None),
    ("HND", KVQuant.PER_HEAD_8BIT, torch.int8),
]


@pytest.mark.parametrize("layout,method,dtype", CASES)
def test_paged_gather_dequant(layout, method, dtype):
    g = torch.Generator().manual_seed(int(method) * 10 + len(layout))
    nb, bs, H, D = 7, 16, 3, 32
    T = nb * bs
    kv = torch.randn(T, H, D, generator=g)
    stored, scale = quantize_kv(kv, method, dtype)
    deq = dequantize_kv(stored, scale, method)  # [T, H, D] fp32
    C = stored.shape[-1]
    x = 16 // stored.element_size()
    cache, p = _layout(stored.reshape(nb, bs, H, C), layout, x)
    if method in (KVQuant.PER_TOKEN_8BIT, KVQuant.PER_TOKEN_4BIT):
        s_sblk, s_shead, s_stok = bs * scale.stride(1), scale.stride(0), scale.stride(1)  # [H, T] by slot
    elif method == KVQuant.PER_HEAD_8BIT:
        s_sblk, s_shead, s_stok = 0, 1, 0
    else:
        s_sblk = s_shead = s_stok = 0
    scale_t = scale if scale is not None else torch.ones(1)
    # the sequence: blocks 5, 2, -1 (padding), 99 (out of range), 0; 70 tokens
    bt = torch.tensor([5, 2, -1, 99, 0], dtype=torch.int32)
    seq_len, head = 70, 1
    out = torch.full((seq_len, D), float("nan"))
    same = torch.full((triton.cdiv(seq_len, 32),), -1, dtype=torch.int32)
    dev = [t.to(DEVICE) for t in (cache, scale_t, bt, out, same)]
    _gather_kernel[(triton.cdiv(seq_len, 32),)](
        *dev, seq_len, bt.numel(), nb, head, p["s_blk"], p["s_head"], p["s_t_hi"], p["s_t_lo"], p["s_c_hi"],
        p["s_c_lo"], s_sblk, s_shead, s_stok, BLOCK_SIZE=bs, TX=p["TX"], CX=p["CX"], QUANT=int(method), D=D,
        BLOCK_N=32)
    out = dev[3].cpu()
    assert torch.all(dev[4].cpu() == 0), "paged_token_offset_from_tok and paged_token_offset disagree"
    expect = torch.full((seq_len, D), -7777.0)
    for t in range(seq_len):
        blk = int(bt[t // bs])
        if 0 <= blk < nb:
            expect[t] = deq[blk * bs + t % bs, head]
    torch.testing.assert_close(out, expect, atol=1e-6, rtol=1e-6)


def test_constants_match_kvquant():
    assert (ta.KV_NONE, ta.KV_PER_HEAD, ta.KV_PER_TOKEN, ta.KV_INT4_PER_TOKEN, ta.KV_PER_TENSOR) == tuple(
        int(m) for m in (KVQuant.NONE, KVQuant.PER_HEAD_8BIT, KVQuant.PER_TOKEN_8BIT, KVQuant.PER_TOKEN_4BIT,
                         KVQuant.PER_TENSOR_8BIT))
    assert math.isclose(ta.LOG2E * ta.LN2, 1.0)


def test_max_element_offset():
    t = torch.empty(4, 16, 8, 32)
    assert ta.max_element_offset(t) == t.numel() - 1
    assert ta.max_element_offset(t.transpose(1, 2)) == t.numel() - 1
    assert ta.max_element_offset(t[:, :, 2]) == 3 * 4096 + 15 * 256 + 31  # from the view's own start
    assert ta.max_element_offset(torch.empty(0, 3)) == -1
    assert ta.max_element_offset(torch.empty(1, 1).expand(2**20, 2**12)) == 0  # broadcast: stride 0



def test_host_integer_helpers_match_triton():
    from aiter_core.triton_utils import max_element_offset as from_shape
    from aiter_core.triton_utils import next_pow2

    assert [next_pow2(n) for n in (0, 1, 2, 3, 5, 64, 65, 1000)] == [1, 1, 2, 4, 8, 64, 128, 1024]
    assert all(next_pow2(n) == triton.next_power_of_2(n) for n in range(1, 3000))
    t = torch.empty(4, 6, 8)[:, ::2, 1:]
    assert from_shape(t.shape, t.stride()) == ta.max_element_offset(t) == 3 * 48 + 2 * 16 + 6
    assert from_shape((0, 5), (5, 1)) == -1
