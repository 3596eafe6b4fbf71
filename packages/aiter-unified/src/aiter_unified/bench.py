"""Benchmark CLI: ``python -m aiter_unified.bench [--out DIR] [--shapes ...]`` (also ``aiter bench unified``).

The issue's three shapes on one GPU, bf16, NHD paged KV with block size 16, measured in one run:

* ``decode``: b=64, hq=32, hkv=8, d=128, context 4096 (bytes and the fraction of the measured
  copy ceiling are reported); peer ``aiter-pa`` (its ``paged_attention_decode`` on the same NHD
  cache, ``kv_cache_layout="NHD"``);
* ``prefill``: 8 sequences of 2048 new tokens, hq=32, hkv=8, d=128 (causal TFLOP/s); peer
  ``aiter-mha`` (``flash_attn_varlen_func`` on the same tokens held contiguously);
* ``mixed``: 4 prefills of 1024 plus 64 decodes at context 4096 in one call; peer
  ``aiter-mha+aiter-pa``: mha varlen on the prefills then pa decode on the decodes, back to back.

Every provider is captured in a CUDA graph and timed by replay (``aiter_core.bench.median_ms``,
L2 flushed), so Python launch overhead is excluded. The peers are other aiter families, loaded
only here and only if installed (a row says so when one is missing). ``unified-2d`` /
``unified-3d`` rows force one kernel. Writes a table and ``unified.json/.md`` into ``--out``.
Without a GPU it runs the family smoke test instead.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

SHAPES = ("decode", "prefill", "mixed")
H_Q, H_KV, D, BS = 32, 8, 128, 16


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m aiter_unified.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./aiter-unified-bench)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy/matmul ceilings")
    args = p.parse_args(argv)
    args.shape_names = tuple(args.shapes.split(","))
    bad = [s for s in args.shape_names if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
    return args


def _graphed(fn):
    import torch

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _seqs(shape):
    if shape == "decode":
        return [(1, 4096)] * 64
    if shape == "prefill":
        return [(2048, 2048)] * 8
    return [(1024, 1024)] * 4 + [(1, 4096)] * 64


def _peer(name):
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} not installed ({exc})"


def _providers(shape, b, scale):
    """name -> callable (or an error string) for one shape."""
    import torch

    from .api import unified_attention
    from .triton.launch import unified_attention_triton

    out = torch.empty_like(b.q)
    common = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, scale)
    provs = {"unified": lambda: unified_attention(*common, True, (-1, -1), b.block_table, 0.0, None, None, None,
                                                  backend="triton")}
    for force in ("2d", "3d"):
        provs[f"unified-{force}"] = (lambda f=force: unified_attention_triton(
            *common, (-1, -1), b.block_table, 0.0, None, None, None, force=f))
    n_pre = {"decode": 0, "prefill": 8, "mixed": 4}[shape]
    seqs = _seqs(shape)
    pre_tokens = sum(q for q, _ in seqs[:n_pre])
    decode_idx = list(range(n_pre, len(seqs)))
    mha, mha_err = _peer("aiter_mha")
    pa, pa_err = _peer("aiter_pa")
    # contiguous K/V of the prefills (fresh prefills: the keys are exactly the new tokens)
    fns = []
    if n_pre:
        if mha is None:
            fns.append(mha_err)
        else:
            kc = torch.randn(pre_tokens, H_KV, D, device="cuda", dtype=b.q.dtype)
            vc = torch.randn_like(kc)
            cu = b.cu_seqlens_q[: n_pre + 1].clone()
            qp = b.q[:pre_tokens]
            fns.append(lambda: mha.flash_attn_varlen_func(qp, kc, vc, cu, cu, 2048 if shape == "prefill" else 1024,
                                                          2048 if shape == "prefill" else 1024,
                                                          softmax_scale=scale, causal=True))
    if decode_idx:
        if pa is None:
            fns.append(pa_err)
        else:
            qd = b.q[pre_tokens:].contiguous()
            od = torch.empty_like(qd)
            lens = b.seqused_k[decode_idx[0]:].contiguous()
            table = b.block_table[decode_idx[0]:].contiguous()
            fns.append(lambda: pa.paged_attention_decode(od, qd, b.k, b.v, lens, table, scale, 4096,
                                                         kv_cache_layout="NHD"))
    errs = [f for f in fns if isinstance(f, str)]
    peer_name = {"decode": "aiter-pa", "prefill": "aiter-mha", "mixed": "aiter-mha+aiter-pa"}[shape]
    if errs:
        provs[peer_name] = "; ".join(errs)
    else:
        provs[peer_name] = lambda: [f() for f in fns]
    return provs


def run_bench(args) -> int:
    import torch

    from aiter_core import bench as B

    from .testing import make_batch

    run = B.BenchRun.start("unified_attention")
    if not args.no_ceilings:
        run.ceilings = B.measure_ceilings("cuda")
    scale = D ** -0.5
    for shape in args.shape_names:
        seqs = _seqs(shape)
        b = make_batch(seqs, heads_q=H_Q, heads_kv=H_KV, head_dim=D, block_size=BS, dtype=torch.bfloat16,
                       device="cuda", seed=0)
        flops = sum(B.attn_fwd_flops(1, H_Q, q, kv, D, causal=True) for q, kv in seqs)
        nbytes = B.decode_bytes(len(seqs), H_Q, H_KV, 1, [kv for _, kv in seqs], D) if shape == "decode" else None
        for name, fn in _providers(shape, b, scale).items():
            params = dict(shape=shape, seqs=len(seqs), hq=H_Q, hkv=H_KV, d=D, block=BS)
            if isinstance(fn, str):
                run.add("unified_attention", name, None, error=fn, **params)
                continue
            try:
                ms = B.median_ms(_graphed(fn))
            except Exception as exc:  # report and go on: one provider failing must not hide the rest
                run.add("unified_attention", name, None, error=f"{type(exc).__name__}: {exc}"[:200], **params)
                continue
            run.add("unified_attention", name, ms, flops=None if nbytes else flops, nbytes=nbytes, **params)
    run.finalize()
    run.print_table()
    out = args.out or Path("aiter-unified-bench")
    run.write_json(out / "unified.json")
    run.write_markdown(out / "unified.md")
    print(f"wrote {out / 'unified.json'} and {out / 'unified.md'}")
    return 0


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        from .smoke import run

        print("no GPU: timing needs a device; running the correctness smoke test instead")
        print(run())
        return 0
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
