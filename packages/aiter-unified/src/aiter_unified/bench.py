"""Benchmark CLI: ``python -m aiter_unified.bench [--out DIR] [--shapes ...]`` (also ``aiter bench unified``).

The issue's three shapes on one GPU, bf16, NHD paged KV with block size 16, measured in one run:

* ``decode``: b=64, hq=32, hkv=8, d=128, context 4096 (bytes and the fraction of the measured
  copy ceiling are reported); peer ``aiter-pa`` (its ``paged_attention_decode`` on the same NHD
  cache, ``kv_cache_layout="NHD"``);
* ``prefill``: 8 sequences of 2048 new tokens, hq=32, hkv=8, d=128 (causal TFLOP/s); peer
  ``aiter-mha`` (``flash_attn_varlen_func`` on the same tokens held contiguously);
* ``mixed``: 4 prefills of 1024 plus 64 decodes at context 4096 in one call; peer
  ``aiter-mha+aiter-pa``: mha varlen on the prefills then pa decode on the decodes, back to back.

Every provider is captured in a CUDA graph and timed by replay (``aiter_core.bench.graph_median_ms``,
L2 flushed), so Python launch overhead is excluded. The peers are other aiter families, loaded
only here and only if installed (a row says so when one is missing). ``unified-2d`` /
``unified-3d`` rows force one kernel. ``--sweep`` adds a ``sweep`` row per tile config
(``AITER_UNIFIED_ATTENTION_CONFIG="BLOCK_M=..,TILE_N=..,num_warps=..,num_stages=.."``;
:data:`SWEEP`), each checked against the default config's output first. Writes a table and ``unified.json/.md`` into ``--out``.
Without a GPU it runs the family smoke test instead (``--device cpu --tiny`` runs the machinery
on toy sizes in the interpreter, for the CPU test of this CLI).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

from aiter_core.configs import variable

SHAPES = ("decode", "prefill", "mixed")
CONFIG_VARIABLE = variable("unified_attention")  # AITER_UNIFIED_ATTENTION_CONFIG
H_Q, H_KV, D, BS = 32, 8, 128, 16
# --tiny: the same code on toy sizes (CPU interpreter)
FULL = dict(hq=H_Q, hkv=H_KV, d=D, decodes=64, decode_ctx=4096, prefills=8, prefill_len=2048, mixed_prefills=4,
            mixed_len=1024)
TINY = dict(hq=4, hkv=2, d=32, decodes=2, decode_ctx=40, prefills=2, prefill_len=24, mixed_prefills=1, mixed_len=16)
# --sweep configs (BLOCK_M, TILE_N, num_warps, num_stages): decode keeps few rows per program,
# prefill and mixed batches feed bigger dots
SWEEP = {
    "decode": [(bm, tn, 4, st) for bm in (16, 32) for tn in (32, 64, 128) for st in (2, 3, 4)],
    "prefill": [(bm, tn, w, st) for bm in (64, 128) for tn in (32, 64, 128) for w in (4, 8) for st in (2, 3)],
}
SWEEP["mixed"] = SWEEP["prefill"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m aiter_unified.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./aiter-unified-bench)")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy/matmul ceilings")
    p.add_argument("--sweep", action="store_true", help="also time every tile config of SWEEP per shape")
    p.add_argument("--device", default="cuda", help="cuda (default); cpu runs the machinery in the interpreter")
    p.add_argument("--tiny", action="store_true", help="toy sizes (machinery check)")
    args = p.parse_args(argv)
    args.shape_names = tuple(args.shapes.split(","))
    bad = [s for s in args.shape_names if s not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
    return args


def _time_ms(fn) -> float:
    """Median time of ``fn`` replayed from a CUDA graph, L2 flushed (tests replace this)."""
    from aiter_core import bench as B

    return B.graph_median_ms(fn)


def _seqs(shape, dims=FULL):
    """(new tokens, total KV tokens) per sequence."""
    decodes = [(1, dims["decode_ctx"])] * dims["decodes"]
    if shape == "decode":
        return decodes
    if shape == "prefill":
        return [(dims["prefill_len"], dims["prefill_len"])] * dims["prefills"]
    return [(dims["mixed_len"], dims["mixed_len"])] * dims["mixed_prefills"] + decodes


def _peer(name):
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"{name} not installed ({exc})"


def _providers(shape, b, scale, dims=FULL):
    """name -> callable (or an error string) for one shape."""
    import torch

    from .api import unified_attention
    from .testing import run_triton

    out = torch.empty_like(b.q)
    common = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, scale)
    provs = {"unified": lambda: unified_attention(*common, True, (-1, -1), b.block_table, 0.0, None, None, None,
                                                  backend="triton")}
    for force in ("2d", "3d"):
        provs[f"unified-{force}"] = (lambda f=force: run_triton(
            *common, (-1, -1), b.block_table, 0.0, None, None, None, force=f))
    seqs = _seqs(shape, dims)
    n_pre = sum(1 for q, _ in seqs if q > 1)
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
            kc = torch.randn(pre_tokens, dims["hkv"], dims["d"], device=b.q.device, dtype=b.q.dtype)
            vc = torch.randn_like(kc)
            cu = b.cu_seqlens_q[: n_pre + 1].clone()
            qp = b.q[:pre_tokens]
            max_len = max(q for q, _ in seqs)
            fns.append(lambda: mha.flash_attn_varlen_func(qp, kc, vc, cu, cu, max_len, max_len,
                                                          softmax_scale=scale, causal=True))
    if decode_idx:
        if pa is None:
            fns.append(pa_err)
        else:
            qd = b.q[pre_tokens:].contiguous()
            od = torch.empty_like(qd)
            lens = b.seqused_k[decode_idx[0]:].contiguous()
            table = b.block_table[decode_idx[0]:].contiguous()
            fns.append(lambda: pa.paged_attention_decode(od, qd, b.k, b.v, lens, table, scale, dims["decode_ctx"],
                                                         kv_cache_layout="NHD"))
    errs = [f for f in fns if isinstance(f, str)]
    peer_name = {"decode": "aiter-pa", "prefill": "aiter-mha", "mixed": "aiter-mha+aiter-pa"}[shape]
    if errs:
        provs[peer_name] = "; ".join(errs)
    else:
        provs[peer_name] = lambda: [f() for f in fns]
    return provs


def _sweep_rows(run, shape, b, scale, params, flops, nbytes) -> None:
    """One ``sweep`` row per tile config: checked against the default config's output, then timed."""
    import torch

    from .api import unified_attention

    out = torch.empty_like(b.q)
    args = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, scale, True, (-1, -1),
            b.block_table, 0.0, None, None, None)

    def call():
        unified_attention(*args, backend="triton")

    call()
    expected = out.float().clone()
    previous = os.environ.get(CONFIG_VARIABLE)
    try:
        for cfg in SWEEP[shape]:
            name = "unified bm{} tn{} w{} s{}".format(*cfg)
            os.environ[CONFIG_VARIABLE] = "BLOCK_M={},TILE_N={},num_warps={},num_stages={}".format(*cfg)
            try:
                out.fill_(float("nan"))
                call()
                err = float((out.float() - expected).abs().max())
                if not err <= 2e-2:
                    run.add("sweep", name, None, error=f"differs from the default config by {err:.3g}", **params)
                    continue
                ms = _time_ms(call)  # the graph captures this config's kernel
            except Exception as exc:  # a config that does not compile or fit is reported, not fatal
                run.add("sweep", name, None, error=f"{type(exc).__name__}: {exc}"[:160], **params)
                continue
            run.add("sweep", name, ms, flops=flops, nbytes=nbytes, **params)
    finally:
        if previous is None:
            os.environ.pop(CONFIG_VARIABLE, None)
        else:
            os.environ[CONFIG_VARIABLE] = previous


def run_bench(args) -> int:
    import torch

    from aiter_core import bench as B

    from .testing import make_batch

    dims = TINY if args.tiny else FULL
    run = B.BenchRun.start("unified_attention")
    if not args.no_ceilings:
        run.ceilings = B.measure_ceilings(args.device)
    scale = dims["d"] ** -0.5
    # the interpreter has no bf16 arithmetic: fp32 on the CPU
    dtype = torch.bfloat16 if args.device != "cpu" else torch.float32
    for shape in args.shape_names:
        seqs = _seqs(shape, dims)
        b = make_batch(seqs, heads_q=dims["hq"], heads_kv=dims["hkv"], head_dim=dims["d"], block_size=BS,
                       dtype=dtype, device=args.device, seed=0)
        flops = sum(B.attn_fwd_flops(1, dims["hq"], q, kv, dims["d"], causal=True) for q, kv in seqs)
        nbytes = (B.decode_bytes(len(seqs), dims["hq"], dims["hkv"], 1, [kv for _, kv in seqs], dims["d"])
                  if shape == "decode" else None)
        if nbytes:
            flops = None
        params = dict(shape=shape, seqs=len(seqs), hq=dims["hq"], hkv=dims["hkv"], d=dims["d"], block=BS)
        for name, fn in _providers(shape, b, scale, dims).items():
            if isinstance(fn, str):
                run.add("unified_attention", name, None, error=fn, **params)
                continue
            try:
                ms = _time_ms(fn)
            except Exception as exc:  # report and go on: one provider failing must not hide the rest
                run.add("unified_attention", name, None, error=f"{type(exc).__name__}: {exc}"[:200], **params)
                continue
            run.add("unified_attention", name, ms, flops=flops, nbytes=nbytes, **params)
        if args.sweep:
            _sweep_rows(run, shape, b, scale, params, flops, nbytes)
    run.finalize()
    run.print_table()
    out = args.out or Path("aiter-unified-bench")
    run.write_json(out / "unified.json")
    run.write_markdown(out / "unified.md")
    print(f"wrote {out / 'unified.json'} and {out / 'unified.md'}")
    return 0


# aiter warmup: the launch forms a server hits (every one compiles its own kernel specialisation):
# (name, (new tokens, total KV tokens) per sequence, like)
WARMUP_FORMS = (
    ("decode", [(1, 64)] * 8, "decode"),  # single pass, one query block per sequence
    ("decode-split", [(1, 2048)] * 8, "decode"),  # split KV (3D) and the merge
    ("extend", [(4, 68)] * 8, "prefill"),  # <= 16 new tokens (MTP, short extends): the small tile
    ("mixed", [(64, 64)] * 2 + [(1, 64)] * 4, "prefill"),  # small-tile and prefill-tile launches
)


def _call_case(device, seqs, *, heads_q, heads_kv, head_dim, dtype, kv_dtype=None, like="decode"):
    """A HostCase of one ``unified_attention`` call, its inputs and output made here."""
    import torch

    from aiter_core.host import HostCase

    from .api import unified_attention
    from .testing import make_batch

    b = make_batch(seqs, heads_q=heads_q, heads_kv=heads_kv, head_dim=head_dim, block_size=BS, dtype=dtype,
                   kv_dtype=kv_dtype, device=device, seed=0)
    out = torch.empty_like(b.q)
    args = (b.q, b.k, b.v, out, b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, head_dim ** -0.5, True,
            (-1, -1), b.block_table, 0.0, None, None, None)
    return HostCase("unified_attention", lambda: unified_attention(*args), like=like)


def host_cases(device) -> list:
    """``aiter bench host``: one eager ``unified_attention`` call at a tiny shape (a decode batch of
    4 sequences at context 64, hq=32, hkv=8, d=128: a few microseconds of GPU work), bf16 on a GPU,
    fp16 elsewhere (the Triton interpreter has no bf16)."""
    import torch

    dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16
    return [_call_case(device, [(1, 64)] * 4, heads_q=H_Q, heads_kv=H_KV, head_dim=D, dtype=dtype)]


def warmup_cases(device) -> list:
    """``aiter warmup``: the default kernel specialisations at small sizes (hq=32, hkv=8, block 16):
    bf16, fp16 and bf16 q over an fp8 KV cache, head dims 64 and 128, every launch form of
    :data:`WARMUP_FORMS`. Off a GPU, fp16 only (the interpreter has no bf16)."""
    import torch

    bf16, fp16, fp8 = torch.bfloat16, torch.float16, torch.float8_e4m3fn
    pairs = [(bf16, None), (fp16, None), (bf16, fp8)] if torch.device(device).type == "cuda" else [(fp16, None)]
    return [_call_case(device, seqs, heads_q=H_Q, heads_kv=H_KV, head_dim=d, dtype=dtype, kv_dtype=kv, like=like)
            for dtype, kv in pairs for d in (64, 128) for _, seqs, like in WARMUP_FORMS]


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        from aiter_core.bench import smoke_instead

        from .smoke import run

        return smoke_instead("aiter-unified", run)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
