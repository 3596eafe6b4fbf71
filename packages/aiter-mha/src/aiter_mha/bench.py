"""Benchmark CLI: ``python -m aiter_mha.bench [--quick] [--out DIR]`` (also ``aiter bench mha``).

Compares our Triton flash attention (forward and backward, bf16) with torch SDPA's flash (FA2)
and cuDNN backends and with FlexAttention (``torch.compile``'d), all measured in the same run.
Sweep: head dims 64/128/256, seqlen 1k..16k with the token count fixed (``b = 16384 // s``),
``h = 2048 // d`` heads, causal and not. Each case is checked against SDPA once (refcheck)
before anything is timed. Figures: median ms, TFLOP/s counted as in spec/anchors.md, the ratio
to the best peer and to the measured bf16 matmul ceiling. Writes a terminal table and
``<stem>.json`` / ``.md`` / ``.png`` into ``--out`` (stem ``mha`` unless ``--stem``).

Without a GPU it runs the family's correctness smoke test instead (timing needs a device).

``host_cases`` / ``warmup_cases`` feed ``aiter bench host`` (host microseconds per eager call of
every public function, next to torch SDPA) and ``aiter warmup`` (compiling the default kernel
specialisations ahead of serving).
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

PROVIDERS = ("aiter-triton", "sdpa-flash", "sdpa-cudnn", "flex")
FULL_SEQLENS = (1024, 2048, 4096, 8192, 16384)
FULL_DIMS = (64, 128, 256)


def _csv_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _csv_names(text: str) -> tuple[str, ...]:
    names = tuple(x.strip() for x in text.split(",") if x.strip())
    bad = [n for n in names if n not in PROVIDERS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown provider(s) {bad}; choose from {', '.join(PROVIDERS)}")
    return names


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aiter_mha.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small subset: d=128, s=1024,4096")
    p.add_argument("--dims", type=_csv_ints, default=None, help="head dims (default 64,128,256)")
    p.add_argument("--seqlens", type=_csv_ints, default=None, help="sequence lengths (default 1024..16384)")
    p.add_argument("--total-tokens", type=int, default=16384, help="batch = total_tokens // seqlen (default 16384)")
    p.add_argument("--hidden", type=int, default=2048, help="heads = hidden // head_dim (default 2048)")
    p.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    p.add_argument("--modes", type=lambda s: tuple(x for x in s.split(",") if x), default=("fwd", "bwd"),
                   help="fwd,bwd (default both)")
    p.add_argument("--providers", type=_csv_names, default=PROVIDERS, help=f"subset of {','.join(PROVIDERS)}")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy/matmul ceilings")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./aiter-mha-bench/<gpu>)")
    p.add_argument("--stem", default="mha", help="output file stem: <out>/<stem>.json/.md/.png (default mha)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    # for exercising the sweep machinery off-GPU (tests): CPU tensors need TRITON_INTERPRET=1 and fp16
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    bad_modes = [m for m in args.modes if m not in ("fwd", "bwd")]
    if bad_modes:
        p.error(f"--modes: unknown mode(s) {bad_modes}; use fwd,bwd")
    if args.quick:
        args.dims = args.dims or (128,)
        args.seqlens = args.seqlens or (1024, 4096)
    args.dims = args.dims or FULL_DIMS
    args.seqlens = args.seqlens or FULL_SEQLENS
    return args


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


# -- providers ----------------------------------------------------------------------------------


def _make_providers(names, causal: bool):
    """name -> fn(q, k, v) over bshd tensors (peers get contiguous bhsd copies made once)."""
    import torch
    import torch.nn.functional as F

    from .api import flash_attn_func

    providers = {}
    if "aiter-triton" in names:
        providers["aiter-triton"] = ("bshd", lambda q, k, v: flash_attn_func(q, k, v, causal=causal, backend="triton"))
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # very old torch
        SDPBackend = sdpa_kernel = None
    for name, kind in (("sdpa-flash", "FLASH_ATTENTION"), ("sdpa-cudnn", "CUDNN_ATTENTION")):
        if name in names and SDPBackend is not None and hasattr(SDPBackend, kind):
            backend = getattr(SDPBackend, kind)

            def run(q, k, v, backend=backend):
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

            providers[name] = ("bhsd", run)
    if "flex" in names:
        try:
            import torch._dynamo
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention

            # one compile per shape: past dynamo's recompile limit (8) flex_attention silently
            # falls back to eager, which materialises the whole score matrix (and times that)
            for limit in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, limit):
                    setattr(torch._dynamo.config, limit, max(getattr(torch._dynamo.config, limit), 1024))
            compiled = torch.compile(flex_attention, dynamic=False)
            masks = {}

            def run_flex(q, k, v):
                if not causal:
                    return compiled(q, k, v)
                key = (q.shape[2], k.shape[2], q.device)
                if key not in masks:
                    masks[key] = create_block_mask(lambda b, h, i, j: i >= j, None, None, q.shape[2], k.shape[2],
                                                   device=q.device)
                return compiled(q, k, v, block_mask=masks[key])

            providers["flex"] = ("bhsd", run_flex)
        except Exception as exc:  # flex_attention needs a recent torch
            print(f"FlexAttention unavailable, skipped: {type(exc).__name__}: {exc}", file=sys.stderr)
    return providers


def _refcheck(name, out, want, grads=None, want_grads=None):
    """Relative max error vs SDPA; None when within tolerance, else the message."""
    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-6)).item()

    err = rel(out, want)
    if not err <= 2e-2:
        return f"{name} forward differs from SDPA: max rel err {err:.3g}"
    for g_name, a, b in zip(("dq", "dk", "dv"), grads or (), want_grads or ()):
        e = rel(a, b)
        if not e <= 5e-2:
            return f"{name} {g_name} differs from SDPA: max rel err {e:.3g}"
    return None


# -- host cost and warmup (aiter_core.host) -----------------------------------------------------------


def _host_dtype(device):
    import torch

    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float16


def host_cases(device):
    """One eager call per public function at a tiny shape (a few microseconds of GPU work), inputs
    built once, outputs preallocated where the API writes them. On the CPU (Triton interpreter)
    fp16, with fewer rows; the fp8 functions run there through the reference backend."""
    import torch

    from aiter_core.host import HostCase

    from . import api

    device = torch.device(device)
    dtype = _host_dtype(device)
    seqlen = 128 if device.type == "cuda" else 16
    heads, dim, batch = 8, 64, 1
    gen = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape, dt=dtype):
        return torch.randn(*shape, generator=gen, device=device, dtype=torch.float32).to(dt)

    q, k, v = (rnd(batch, seqlen, heads, dim) for _ in range(3))
    qp, kp, vp = (x[0] for x in (q, k, v))
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device=device)
    out = torch.empty_like(q)
    out_p = torch.empty_like(qp)
    _, lse, _, _ = api.mha_fwd(q, k, v, 0.0, dim ** -0.5, True, -1, -1, 0, True, False, out=out)
    _, lse_p, _, _ = api.mha_varlen_fwd(qp, kp, vp, cu, cu, seqlen, seqlen, 0, 0.0, dim ** -0.5, 0.0, False, True,
                                        -1, -1, 0, True, False, out=out_p)
    dout, dout_p = rnd(*q.shape), rnd(*qp.shape)
    dq, dk, dv = (torch.empty_like(x) for x in (q, k, v))
    dq_p, dk_p, dv_p = (torch.empty_like(x) for x in (qp, kp, vp))
    fp8 = torch.float8_e4m3fn
    q8, k8, v8 = (x.to(fp8) for x in (q, k, v))
    descale = torch.ones(1, dtype=torch.float32, device=device)
    page, cache_len = 16, 4 * seqlen
    k_cache, v_cache = rnd(cache_len // page, page, heads, dim), rnd(cache_len // page, page, heads, dim)
    table = torch.arange(cache_len // page, dtype=torch.int32, device=device)[None]
    cache_seqlens = torch.tensor([cache_len - 3], dtype=torch.int32, device=device)
    q1 = rnd(batch, 1, heads, dim)
    scale = dim ** -0.5
    return [
        HostCase("flash_attn_func", lambda: api.flash_attn_func(q, k, v, causal=True), "prefill"),
        HostCase("flash_attn_varlen_func",
                 lambda: api.flash_attn_varlen_func(qp, kp, vp, cu, cu, seqlen, seqlen, causal=True), "prefill"),
        HostCase("flash_attn_fp8_pertensor_func",
                 lambda: api.flash_attn_fp8_pertensor_func(q8, k8, v8, descale, descale, descale, causal=True),
                 "prefill"),
        HostCase("flash_attn_varlen_fp8_pertensor_func",
                 lambda: api.flash_attn_varlen_fp8_pertensor_func(q8[0], k8[0], v8[0], descale, descale, descale, cu,
                                                                  cu, seqlen, seqlen, causal=True), "prefill"),
        HostCase("flash_attn_fp8_func", lambda: api.flash_attn_fp8_func(q, k, v, causal=True), "prefill"),
        HostCase("flash_attn_varlen_fp8_func",
                 lambda: api.flash_attn_varlen_fp8_func(qp, kp, vp, cu, cu, seqlen, seqlen, causal=True), "prefill"),
        HostCase("flash_attn_with_kvcache",
                 lambda: api.flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=cache_seqlens,
                                                     block_table=table), "decode"),
        HostCase("mha_fwd", lambda: api.mha_fwd(q, k, v, 0.0, scale, True, -1, -1, 0, True, False, out=out), "prefill"),
        HostCase("mha_varlen_fwd",
                 lambda: api.mha_varlen_fwd(qp, kp, vp, cu, cu, seqlen, seqlen, 0, 0.0, scale, 0.0, False, True, -1,
                                            -1, 0, True, False, out=out_p), "prefill"),
        HostCase("mha_bwd", lambda: api.mha_bwd(dout, q, k, v, out, lse, 0.0, scale, True, -1, -1, True, dq=dq, dk=dk,
                                                dv=dv), "prefill"),
        HostCase("mha_varlen_bwd",
                 lambda: api.mha_varlen_bwd(dout_p, qp, kp, vp, out_p, lse_p, cu, cu, seqlen, seqlen, 0.0, scale, False,
                                            True, -1, -1, True, dq=dq_p, dk=dk_p, dv=dv_p), "prefill"),
    ]


def warmup_cases(device):
    """Calls that compile the kernel specialisations users hit first: bf16 and fp16, head dims 64 and
    128, causal and not; dense training (forward + the three backward kernels), packed varlen
    training, paged KV-cache decode (16-token blocks), and the fp8 forward."""
    import torch

    from aiter_core.host import HostCase

    from . import api

    device = torch.device(device)
    dtypes = (torch.bfloat16, torch.float16) if device.type == "cuda" else (torch.float16,)
    heads, seqlen, page = 8, 256, 16
    cases = []

    def training(fn, *tensors):
        def call():
            leaves = [t.detach().requires_grad_() for t in tensors]
            out = fn(*leaves)
            out.backward(torch.ones_like(out))
        return call

    for dtype in dtypes:
        for dim in (64, 128):
            def rnd(*shape, dtype=dtype):
                return torch.randn(*shape, device=device, dtype=torch.float32).to(dtype)

            q, k, v = (rnd(2, seqlen, heads, dim) for _ in range(3))
            cu = torch.tensor([0, seqlen - 16, 2 * seqlen], dtype=torch.int32, device=device)
            for causal in (False, True):
                cases.append(HostCase("flash_attn_func", training(
                    lambda q, k, v, causal=causal: api.flash_attn_func(q, k, v, causal=causal), q, k, v), "prefill"))
                cases.append(HostCase("flash_attn_varlen_func", training(
                    lambda q, k, v, causal=causal, cu=cu: api.flash_attn_varlen_func(
                        q, k, v, cu, cu, seqlen + 16, seqlen + 16, causal=causal), q[0].repeat(2, 1, 1),
                    k[0].repeat(2, 1, 1), v[0].repeat(2, 1, 1)), "prefill"))
                if device.type == "cuda" and dtype == torch.bfloat16:
                    cases.append(HostCase("flash_attn_fp8_func",
                                          lambda q=q, k=k, v=v, causal=causal: api.flash_attn_fp8_func(
                                              q, k, v, causal=causal), "prefill"))
            k_cache, v_cache = rnd(64, page, heads, dim), rnd(64, page, heads, dim)
            table = torch.arange(64, dtype=torch.int32, device=device).reshape(2, 32)
            lens = torch.tensor([300, 511], dtype=torch.int32, device=device)
            q1 = rnd(2, 1, heads, dim)
            cases.append(HostCase("flash_attn_with_kvcache",
                                  lambda q1=q1, k_cache=k_cache, v_cache=v_cache, table=table, lens=lens:
                                  api.flash_attn_with_kvcache(q1, k_cache, v_cache, cache_seqlens=lens,
                                                              block_table=table), "decode"))
    return cases


# -- main ---------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    device = torch.device(args.device)
    from aiter_core import bench as core_bench

    if device.type == "cuda" and not torch.cuda.is_available():
        from .smoke import run

        return core_bench.smoke_instead("aiter-mha", run)

    BenchRun, progress = core_bench.BenchRun, core_bench.progress
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    run = BenchRun.start("mha", argv=None if argv is None else ["python", "-m", "aiter_mha.bench", *argv])
    gpu_name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    out_dir = args.out or Path("aiter-mha-bench") / _slug(gpu_name)
    if not args.no_ceilings:
        print("measuring the copy and bf16 matmul ceilings ...", file=sys.stderr)
        run.ceilings = core_bench.measure_ceilings(device)
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]
    cases = [(d, s, c) for d in args.dims for s in args.seqlens for c in causals]
    if "flex" in args.providers:
        print("FlexAttention compiles once per shape: the first case of each shape is slow.", file=sys.stderr)
    for d, s, causal in progress(cases, "mha bench", quiet=args.quiet):
        b = max(1, args.total_tokens // s)
        h = max(1, args.hidden // d)
        gen = torch.Generator(device=device).manual_seed(s * 1000 + d)
        q, k, v = (torch.randn(b, s, h, d, device=device, generator=gen, dtype=dtype) for _ in range(3))
        bhsd = [x.transpose(1, 2).contiguous() for x in (q, k, v)]
        params = dict(b=b, h=h, s=s, d=d, causal=causal)
        fwd_flops = core_bench.attn_fwd_flops(b, h, s, s, d, d, causal=causal)
        bwd_flops = core_bench.attn_bwd_flops(b, h, s, s, d, d, causal=causal)
        providers = _make_providers(args.providers, causal)
        # the refcheck oracle: SDPA's default choice on the same inputs, fwd and grads
        ref_in = [x.detach().clone().requires_grad_() for x in bhsd]
        ref_out = torch.nn.functional.scaled_dot_product_attention(*ref_in, is_causal=causal)
        dout_bhsd = torch.randn(ref_out.shape, device=device, generator=gen, dtype=dtype)
        ref_grads = torch.autograd.grad(ref_out, ref_in, dout_bhsd) if "bwd" in args.modes else None
        for name, (layout, fn) in providers.items():
            inputs = [x.detach().clone().requires_grad_() for x in ((q, k, v) if layout == "bshd" else bhsd)]
            dout = dout_bhsd.transpose(1, 2).contiguous() if layout == "bshd" else dout_bhsd
            try:
                out = fn(*inputs)
                grads = torch.autograd.grad(out, inputs, dout, retain_graph=True) if "bwd" in args.modes else None
                to_bhsd = (lambda x: x.transpose(1, 2)) if layout == "bshd" else (lambda x: x)
                problem = _refcheck(name, to_bhsd(out), ref_out, grads and [to_bhsd(g) for g in grads], ref_grads)
            except Exception as exc:  # a peer that cannot run this case (e.g. cuDNN on an old torch)
                problem = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
            if problem:
                for mode in args.modes:
                    run.add(mode, name, None, error=problem, **params)
                print(f"[{name} d={d} s={s} causal={causal}] not timed: {problem}", file=sys.stderr)
                continue
            if "fwd" in args.modes:
                with torch.no_grad():
                    ms = core_bench.median_ms(lambda: fn(*inputs))
                run.add("fwd", name, ms, flops=fwd_flops, **params)
            if "bwd" in args.modes:
                out = fn(*inputs)
                ms = core_bench.median_ms(lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True))
                run.add("bwd", name, ms, flops=bwd_flops, **params)
        del q, k, v, bhsd, ref_in, ref_out, ref_grads
        if device.type == "cuda":
            torch.cuda.empty_cache()
    run.finalize()
    run.print_table()
    written = run.write_all(out_dir, stem=args.stem)
    print("wrote " + ", ".join(str(p) for p in written.values()))
    failed = [r for r in run.rows if r["provider"] == "aiter-triton" and r.get("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
