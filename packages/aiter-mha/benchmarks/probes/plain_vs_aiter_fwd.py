"""Probe 4: is the gap between the plain probe kernel and aiter_mha's kernel the BSHD layout?

(The launcher always stores the LSE now, so the earlier "aiter-nolse" column of FINDINGS.md is not
re-measured here.)"""
import torch
import triton
import triton.language as tl
from triton.testing import do_bench

from aiter_mha import checks
from aiter_mha.triton import launch
from aiter_mha.triton.configs import TileConfig


@triton.jit
def _fwd_strided(Q, K, V, O, sm_scale, S, stride_s, stride_h, stride_b, H: tl.constexpr, D: tl.constexpr,
                 BM: tl.constexpr, BN: tl.constexpr):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    base = b.to(tl.int64) * stride_b + h * stride_h
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = tl.arange(0, BN)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * stride_s + offs_d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.44269504
    for start in range(0, S, BN):
        k = tl.load(K + base + (start + offs_n)[None, :] * stride_s + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + base + (start + offs_n)[:, None] * stride_s + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * stride_s + offs_d[None, :], acc.to(O.dtype.element_ty))


def main():
    B, H, S, D = 2, 16, 8192, 128
    flops = 4 * B * H * S * S * D
    for layout in ("bshd", "bhsd"):
        if layout == "bshd":
            q, k, v = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        else:  # bshd view of a bhsd tensor
            q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
        o = torch.empty_like(q)
        for BN, w, st in ((64, 4, 2), (128, 8, 3), (64, 8, 3)):
            grid = (S // 128, H, B)
            fn = lambda: _fwd_strided[grid](q, k, v, o, D ** -0.5, S, q.stride(1), q.stride(2), q.stride(0), H, D, 128, BN,
                                            num_warps=w, num_stages=st)
            fn()
            ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
            cfg = TileConfig(BLOCK_M=128, BLOCK_N=BN, num_warps=w, num_stages=st)
            call = checks.mha_fwd(q, k, v, 0.0, D ** -0.5, False, -1, -1, 0, True, False)
            fn2 = lambda: launch.fwd(call, cfg)
            fn2()
            ms2 = do_bench(fn2, warmup=25, rep=100, return_mode="median")
            print(f"{layout} BN={BN} w={w} s={st}: plain {flops/ms/1e9:.0f}  aiter {flops/ms2/1e9:.0f} TF/s", flush=True)


main()
