"""Probe: what a plain Triton FA forward reaches on this GPU, by config and load style."""
import itertools
import json
import os

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except Exception:
    TensorDescriptor = None


@triton.jit
def _fwd_ptr(Q, K, V, O, sm_scale, S, H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
             CAUSAL: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    base = bh.to(tl.int64) * S * D
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_d = tl.arange(0, D)
    q = tl.load(Q + base + offs_m[:, None] * D + offs_d[None, :])
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.44269504
    hi = (pid_m + 1) * BM if CAUSAL else S
    hi_nomask = pid_m * BM if CAUSAL else S
    for start in tl.range(0, hi_nomask, BN, warp_specialize=WS):
        offs_n = start + tl.arange(0, BN)
        k = tl.load(K + base + offs_n[None, :] * D + offs_d[:, None])
        s = tl.dot(q, k) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if CAUSAL:
        for start in tl.range(hi_nomask, hi, BN):
            offs_n = start + tl.arange(0, BN)
            k = tl.load(K + base + offs_n[None, :] * D + offs_d[:, None])
            s = tl.dot(q, k) * qk_scale
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = tl.load(V + base + offs_n[:, None] * D + offs_d[None, :])
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(O + base + offs_m[:, None] * D + offs_d[None, :], acc.to(O.dtype.element_ty))


@triton.jit
def _fwd_desc(q_desc, k_desc, v_desc, o_desc, sm_scale, S, H: tl.constexpr, D: tl.constexpr, BM: tl.constexpr,
              BN: tl.constexpr, CAUSAL: tl.constexpr, WS: tl.constexpr):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    row0 = bh * S
    q = q_desc.load([row0 + pid_m * BM, 0])
    offs_m = pid_m * BM + tl.arange(0, BM)
    m_i = tl.full([BM], float("-inf"), tl.float32)
    l_i = tl.zeros([BM], tl.float32)
    acc = tl.zeros([BM, D], tl.float32)
    qk_scale = sm_scale * 1.44269504
    hi = (pid_m + 1) * BM if CAUSAL else S
    hi_nomask = pid_m * BM if CAUSAL else S
    for start in tl.range(0, hi_nomask, BN, warp_specialize=WS):
        k = k_desc.load([row0 + start, 0])
        s = tl.dot(q, k.T) * qk_scale
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = v_desc.load([row0 + start, 0])
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if CAUSAL:
        for start in tl.range(hi_nomask, hi, BN):
            offs_n = start + tl.arange(0, BN)
            k = k_desc.load([row0 + start, 0])
            s = tl.dot(q, k.T) * qk_scale
            s = tl.where(offs_m[:, None] >= offs_n[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            p = tl.math.exp2(s - m_new[:, None])
            alpha = tl.math.exp2(m_i - m_new)
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None]
            v = v_desc.load([row0 + start, 0])
            acc = tl.dot(p.to(v.dtype), v, acc)
            m_i = m_new
    acc = acc / l_i[:, None]
    o_desc.store([row0 + pid_m * BM, 0], acc.to(tl.bfloat16))


def run(B, H, S, D, causal, style, BM, BN, warps, stages, ws):
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    o = torch.empty_like(q)
    scale = D ** -0.5
    grid = (S // BM, B * H)
    if style == "ptr":
        fn = lambda: _fwd_ptr[grid](q, k, v, o, scale, S, H, D, BM, BN, causal, ws, num_warps=warps, num_stages=stages)
    else:
        mk = lambda t, bs: TensorDescriptor(t.view(-1, D), shape=[B * H * S, D], strides=[D, 1], block_shape=bs)
        qd, kd, vd, od = mk(q, [BM, D]), mk(k, [BN, D]), mk(v, [BN, D]), mk(o, [BM, D])
        fn = lambda: _fwd_desc[grid](qd, kd, vd, od, scale, S, H, D, BM, BN, causal, ws, num_warps=warps, num_stages=stages)
    fn()
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    err = (o.float() - ref.float()).abs().max().item()
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    flops = 4 * B * H * S * S * D * (0.5 if causal else 1)
    return ms, flops / ms / 1e9, err


def sdpa(B, H, S, D, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    q, k, v = (torch.randn(B, H, S, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]
    def fn():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    fn()
    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
    return ms, 4 * B * H * S * S * D * (0.5 if causal else 1) / ms / 1e9


if __name__ == "__main__":
    torch.manual_seed(0)
    out = []
    print("triton", triton.__version__, "torch", torch.__version__, torch.cuda.get_device_name())
    for D in (128,):
        B, H, S = 2, 16, 8192
        for causal in (False, True):
            for be in ("cudnn", "flash"):
                ms, tf = sdpa(B, H, S, D, causal, be)
                print(f"SDPA {be:6s} D={D} causal={causal}: {tf:.0f} TF/s")
                out.append(dict(kind="sdpa", be=be, D=D, causal=causal, tf=tf))
            for style, BM, BN, warps, stages, ws in itertools.product(
                ("ptr", "desc"), (128,), (64, 128), (4, 8), (2, 3), (False, True)):
                if style == "desc" and TensorDescriptor is None:
                    continue
                try:
                    ms, tf, err = run(B, H, S, D, causal, style, BM, BN, warps, stages, ws)
                    msg = f"{tf:.0f} TF/s err {err:.3f}"
                except Exception as e:
                    tf, msg = 0, f"FAIL {type(e).__name__}: {str(e)[:100]}"
                print(f"D={D} causal={causal} {style} BM={BM} BN={BN} w={warps} s={stages} ws={ws}: {msg}", flush=True)
                out.append(dict(kind="triton", D=D, causal=causal, style=style, BN=BN, warps=warps, stages=stages, ws=ws, tf=tf, msg=msg))
    json.dump(out, open(os.path.join(os.environ.get("OUT", "."), "fa_probe.json"), "w"), indent=1)
