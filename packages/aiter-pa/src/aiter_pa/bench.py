"""Benchmark CLI: ``python -m aiter_pa.bench [--quick] [--quiet] [--out DIR]`` (also ``aiter bench pa``).

Paged decode bandwidth on one GPU, everything measured in the same run:

* ``aiter`` (ours, ``paged_attention_decode`` with the automatic v1/v2 choice) against
  ``sdpa-cudnn`` (torch SDPA's cuDNN backend on the same KV made contiguous, GQA through
  ``enable_gqa``) and ``flex`` (FlexAttention over the physical block pool with a paged block
  mask built from the block table; skipped with the reason when it cannot run);
* the issue's shapes: bf16 KV b=64 hq=32 hkv=8 d=128 ctx=4096 block 16; the same with fp8 KV
  (per tensor and per token); ctx 1024;
* ``decode-partitions`` rows: ours with the partition count forced (1 = v1, 2, 4, 8);
* ``high-precision`` rows: fp8 per-token KV at levels 0/1/2 with their max error against the
  fp32 reference on the dequantized cache;
* ``--sweep``: tile configs (BLOCK_N x warps x stages) for the headline shapes, best first (each
  through ``AITER_PAGED_ATTENTION_DECODE_CONFIG``, the op's launch-config override).

Bytes per call are counted as ``spec/anchors.md`` says (Q + K and V of every attended token +
scales + O) by ``aiter_core.bench.decode_bytes``; the ceiling is a device-to-device copy measured
at the start. Times are medians of ``triton.testing.do_bench`` (L2 flushed before each call)
over a CUDA-graph replay of the call, so Python launch overhead is excluded (``decode-eager``
rows show ours without the graph). Writes a terminal table and ``<stem>.json/.md/.png`` into
``--out``.

Without a GPU it runs the family's correctness smoke test instead (timing needs a device).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from contextlib import contextmanager
from pathlib import Path

SHAPES = {
    "bf16-ctx4k": dict(b=64, hq=32, hkv=8, d=128, ctx=4096, bs=16, quant="none"),
    "fp8-tensor-ctx4k": dict(b=64, hq=32, hkv=8, d=128, ctx=4096, bs=16, quant="fp8-tensor"),
    "fp8-token-ctx4k": dict(b=64, hq=32, hkv=8, d=128, ctx=4096, bs=16, quant="fp8-token"),
    "bf16-ctx1k": dict(b=64, hq=32, hkv=8, d=128, ctx=1024, bs=16, quant="none"),
}
QUICK = ("bf16-ctx4k", "fp8-tensor-ctx4k")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aiter_pa.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"only {', '.join(QUICK)}, no extra rows")
    p.add_argument("--shapes", default=None, help=f"comma list of {', '.join(SHAPES)}")
    p.add_argument("--layout", default="HND", help="KV layout of our cache (HND, NHD, vllm, vllm_shuffled)")
    p.add_argument("--providers", default="aiter,sdpa-cudnn,flex", help="subset of aiter,sdpa-cudnn,flex")
    p.add_argument("--sweep", action="store_true", help="also sweep tile configs for each shape")
    p.add_argument("--no-ceilings", action="store_true", help="skip measuring the copy/matmul ceilings")
    p.add_argument("--out", type=Path, default=None, help="output directory (default ./aiter-pa-bench/<gpu>)")
    p.add_argument("--stem", default="pa_decode", help="output file stem (default pa_decode)")
    p.add_argument("--quiet", action="store_true", help="no progress output (status lines, progress bar)")
    # for exercising the machinery off-GPU (tests): CPU tensors need TRITON_INTERPRET=1
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    names = QUICK if args.quick and not args.shapes else tuple((args.shapes or ",".join(SHAPES)).split(","))
    bad = [n for n in names if n not in SHAPES]
    if bad:
        p.error(f"--shapes: unknown {bad}; choose from {', '.join(SHAPES)}")
    args.shape_names = names
    args.provider_names = tuple(x for x in args.providers.split(",") if x)
    return args


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "gpu"


def _graph_ms(fn) -> float:
    """Timing seam (the CPU test stubs it): median ms of a CUDA-graph replay of ``fn``."""
    from aiter_core.bench import graph_median_ms

    return graph_median_ms(fn, rep=200)


def _eager_ms(fn) -> float:
    """Timing seam: median ms of ``fn`` called eagerly (Python launch overhead included)."""
    from aiter_core.bench import median_ms

    return median_ms(fn)


def _case(shape: dict, layout: str, seed: int = 0, device: str = "cuda"):
    import torch

    from aiter_core.quant import KVQuant

    from .testing import make_paged_kv

    quant = {"none": KVQuant.NONE, "fp8-tensor": KVQuant.PER_TENSOR_8BIT, "fp8-token": KVQuant.PER_TOKEN_8BIT}[
        shape["quant"]]
    ctx = [shape["ctx"]] * shape["b"]
    dtype = torch.bfloat16 if device != "cpu" else torch.float32  # the interpreter has no bf16 math
    kv = make_paged_kv(ctx, shape["hkv"], shape["d"], shape["bs"], layout, quant, dtype,
                       torch.float8_e4m3fn if quant != KVQuant.NONE else None, device, extra_blocks=8,
                       pad_entries=False, seed=seed)
    g = torch.Generator(device=device).manual_seed(seed + 1)
    q = torch.randn(shape["b"], shape["hq"], shape["d"], generator=g, device=device).to(dtype)
    return kv, q


def _nbytes(shape: dict, kv) -> float:
    from aiter_core.bench import decode_bytes

    kv_bytes = kv.key_cache.element_size()
    scale_bytes = 8 if kv.k_scale is not None and kv.k_scale.dim() == 2 else 0  # K + V fp32 per token and head
    return decode_bytes(shape["b"], shape["hq"], shape["hkv"], 1, shape["ctx"], shape["d"], q_bytes=2,
                        kv_bytes=kv_bytes, o_bytes=2, kv_scale_bytes=scale_bytes)


def _ours(kv, q, out, *, parts=0, hp=1):
    from . import api

    max_ctx = int(kv.context_lens.max())  # read once here: a host sync inside graph capture would fail
    ws = None
    if parts and parts > 1:
        ws = api.decode_partials(q.shape[0], q.shape[1], q.shape[2], parts, device=q.device)

    def fn():
        api.paged_attention_decode(out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables,
                                   q.shape[2] ** -0.5, max_ctx, None, kv.k_scale, kv.v_scale,
                                   parts, kv_cache_layout=kv.layout_arg or "HND", high_precision=hp, workspace=ws)
    return fn


@contextmanager
def tile_config(config):
    """``AITER_PAGED_ATTENTION_DECODE_CONFIG`` set to ``config`` (a launch ``KernelConfig``) inside
    the block: the public decode then launches with that tile config (the sweep's seam)."""
    from aiter_core.configs import variable

    name = variable("paged_attention_decode")
    before = os.environ.get(name)
    os.environ[name] = ",".join(f"{k}={v}" for k, v in config._asdict().items())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _contiguous_kv(kv, shape):
    """The same KV, dequantized to bf16 and made contiguous per sequence: [b, hkv, ctx, d]."""
    import torch

    ctx = shape["ctx"]
    t = torch.arange(ctx, device=kv.k_deq.device)
    blocks = kv.block_tables[:, (t // kv.block_size)].long()  # [b, ctx]
    k = kv.k_deq[blocks, (t % kv.block_size)[None, :]]  # [b, ctx, hkv, d]
    v = kv.v_deq[blocks, (t % kv.block_size)[None, :]]
    return (k.transpose(1, 2).contiguous().to(torch.bfloat16), v.transpose(1, 2).contiguous().to(torch.bfloat16))


def _sdpa_cudnn(q, k, v):
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    qq = q.unsqueeze(2)  # [b, hq, 1, d]

    def fn():
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return torch.nn.functional.scaled_dot_product_attention(qq, k, v, enable_gqa=True)
    return fn


def _flex(kv, q, shape, compile: bool = True, kernel_options: dict | None = None):
    """FlexAttention over the whole physical block pool with a mask that keeps, for query ``b``,
    the pool rows of sequence ``b``'s blocks (positions < its context). The ``b`` decode queries
    are the rows of one "sequence" ``[1, hq, b, d]``; returns a function giving ``[b, hq, d]``.
    ``compile=False`` runs FlexAttention eagerly (the CPU test of this mask)."""
    import torch
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    dev = q.device
    nb, bs = kv.num_blocks, kv.block_size
    owner = torch.full((nb,), -1, dtype=torch.int32, device=dev)
    pos0 = torch.zeros(nb, dtype=torch.int32, device=dev)
    nblk = -(-shape["ctx"] // bs)
    used = kv.block_tables[:, :nblk].reshape(-1).long()
    owner[used] = torch.arange(shape["b"], device=dev, dtype=torch.int32).repeat_interleave(nblk)
    pos0[used] = (torch.arange(nblk, device=dev, dtype=torch.int32) * bs).repeat(shape["b"])
    ctx = kv.context_lens

    def mask_mod(b, h, q_idx, kv_idx):
        blk = kv_idx // bs
        return (owner[blk] == q_idx) & (pos0[blk] + kv_idx % bs < ctx[q_idx])

    N = nb * bs
    k = kv.k_deq.reshape(N, shape["hkv"], shape["d"]).transpose(0, 1).unsqueeze(0).to(q.dtype).contiguous()
    v = kv.v_deq.reshape(N, shape["hkv"], shape["d"]).transpose(0, 1).unsqueeze(0).to(q.dtype).contiguous()
    qq = q.transpose(0, 1).unsqueeze(0).contiguous()  # [1, hq, b, d]
    block_mask = create_block_mask(mask_mod, 1, None, shape["b"], N, device=str(dev))
    attn = torch.compile(flex_attention, dynamic=False) if compile else flex_attention

    def fn():
        return attn(qq, k, v, block_mask=block_mask, enable_gqa=True, kernel_options=kernel_options)[0].transpose(0, 1)
    return fn


def _max_err(out, kv, q) -> float:
    import torch

    from .reference import paged_attention_ref

    ref = paged_attention_ref(q.float(), kv.k_deq, kv.v_deq, kv.block_tables, kv.context_lens, q.shape[2] ** -0.5,
                              dtype=torch.float32)
    return float((out.float() - ref.float()).abs().max().item())


def _status(args, message: str) -> None:
    """A progress line on stderr, unless ``--quiet`` (errors are printed regardless)."""
    if not getattr(args, "quiet", False):
        print(message, file=sys.stderr)


def run_bench(args) -> int:
    import torch

    from aiter_core.bench import BenchRun, measure_ceilings, progress
    from aiter_core.testing import poison

    from .triton.launch import KernelConfig

    run = BenchRun.start("aiter-pa decode", argv=None)
    if not args.no_ceilings:
        _status(args, "measuring the copy and matmul ceilings ...")
        run.ceilings = measure_ceilings()
    failures = 0
    summary = {}
    for name in progress(args.shape_names, "pa shapes", quiet=args.quiet):
        shape = SHAPES[name]
        if args.tiny:  # machinery check: same code, toy sizes
            shape = dict(shape, b=2, hq=4, hkv=2, d=32, ctx=40)
        _status(args, f"[{name}] building a {shape['b']} x {shape['ctx']}-token cache ...")
        kv, q = _case(shape, args.layout, device=args.device)
        nbytes = _nbytes(shape, kv)
        params = dict(shape=name, b=shape["b"], hq=shape["hq"], hkv=shape["hkv"], d=shape["d"], ctx=shape["ctx"],
                      block=shape["bs"], kv=shape["quant"], layout=args.layout)
        out = poison(torch.empty_like(q))
        fn = _ours(kv, q, out)
        fn()
        err = _max_err(out, kv, q)
        if not err <= 2e-2:
            print(f"[{name}] aiter refcheck FAILED: max error {err:.3g}", file=sys.stderr)
            failures += 1
            run.add("decode", "aiter", None, nbytes=nbytes, **params, error=f"refcheck max error {err:.3g}")
            continue
        if "aiter" in args.provider_names:
            ms = _graph_ms(fn)
            run.add("decode", "aiter", ms, nbytes=nbytes, **params)
            summary[name] = ms
            run.add("decode-eager", "aiter", _eager_ms(fn), nbytes=nbytes, **params)
        if "sdpa-cudnn" in args.provider_names:
            try:
                k, v = _contiguous_kv(kv, shape)
                # peers are credited with our byte count: their TB/s is our bytes over their time
                run.add("decode", "sdpa-cudnn", _graph_ms(_sdpa_cudnn(q, k, v)), nbytes=nbytes, **params)
                del k, v
            except Exception as exc:  # a peer that cannot run is reported, not fatal
                run.add("decode", "sdpa-cudnn", None, nbytes=nbytes, **params, error=f"{type(exc).__name__}: {exc}"[:200])
        if "flex" in args.provider_names and shape["quant"] == "none":
            # torch 2.11's flex-decoding template finds no config for this pool (NoValidChoicesError,
            # H100 run of 2026-11-24): fall back to the general FlexAttention kernel, and say so
            for name, options in (("flex", None), ("flex (FORCE_USE_FLEX_ATTENTION)", {"FORCE_USE_FLEX_ATTENTION": True})):
                try:
                    run.add("decode", name, _graph_ms(_flex(kv, q, shape, kernel_options=options)), nbytes=nbytes,
                            **params)
                    break
                except Exception as exc:
                    run.add("decode", name, None, nbytes=nbytes, **params, error=f"{type(exc).__name__}: {exc}"[:200])
        if not args.quick:
            for parts in (1, 2, 4, 8):
                o = torch.empty_like(q)
                run.add("decode-partitions", f"aiter P={parts}", _graph_ms(_ours(kv, q, o, parts=parts)),
                        nbytes=nbytes, **params)
            if shape["quant"] == "fp8-token":
                for hp in (0, 1, 2):
                    o = poison(torch.empty_like(q))
                    f = _ours(kv, q, o, hp=hp)
                    f()
                    run.add("high-precision", f"aiter hp={hp}", _graph_ms(f), nbytes=nbytes, **params,
                            max_err=round(_max_err(o, kv, q), 5))
        if args.sweep:
            for bn in (32, 64, 128):
                for warps in (4, 8):
                    for stages in (2, 3, 4):
                        o = torch.empty_like(q)
                        try:
                            with tile_config(KernelConfig(bn, warps, stages)):
                                ms = _graph_ms(_ours(kv, q, o))
                            run.add("sweep", f"aiter bn{bn} w{warps} s{stages}", ms, nbytes=nbytes, **params)
                        except Exception as exc:
                            run.add("sweep", f"aiter bn{bn} w{warps} s{stages}", None, **params,
                                    error=f"{type(exc).__name__}: {exc}"[:120])
        del kv, q
        if args.device != "cpu":
            torch.cuda.empty_cache()
    if "bf16-ctx4k" in summary:
        for fp8 in ("fp8-tensor-ctx4k", "fp8-token-ctx4k"):
            if fp8 in summary:
                run.metadata[f"speedup_{fp8}_over_bf16"] = round(summary["bf16-ctx4k"] / summary[fp8], 3)
    gpu_name = torch.cuda.get_device_name() if args.device != "cpu" else "cpu"
    out_dir = args.out or Path("aiter-pa-bench") / _slug(gpu_name)
    run.print_table()
    run.write_json(out_dir / f"{args.stem}.json")
    run.write_markdown(out_dir / f"{args.stem}.md")
    run.plot(out_dir / f"{args.stem}.png", metric="tbps")
    for k, val in run.metadata.items():
        if k.startswith("speedup_"):
            print(f"{k}: {val}x")
    print(f"wrote {out_dir}/{args.stem}.json, .md, .png")
    return 1 if failures else 0


# -- host cost and warmup (aiter bench host, aiter warmup) -----------------------------------------


def _host_dtype(device: str):
    import torch

    # the interpreter has no bf16 arithmetic: CPU cases run in fp16
    return torch.float16 if str(device).startswith("cpu") else torch.bfloat16


def host_cases(device: str = "cuda") -> list:
    """One eager call of every public function that launches work, at a tiny shape (a few us of
    GPU work: the loop timing it is bound by the host), inputs and outputs made here once.
    ``aiter bench host`` times them next to torch SDPA; the CPU test runs each once under the
    interpreter (fp16)."""
    import torch

    from aiter_core.host import HostCase
    from aiter_core.quant import KVQuant

    from . import api
    from .layouts import allocate_kv_cache
    from .testing import make_paged_kv

    dt = _host_dtype(device)
    fp8 = torch.float8_e4m3fn
    S, hq, hkv, d, bs, ctx = 2, 8, 2, 64, 16, [30, 17]
    i32 = dict(dtype=torch.int32, device=device)
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, dtype=dt):
        return torch.randn(*shape, generator=g, device=device).to(dtype)

    hnd = make_paged_kv(ctx, hkv, d, bs, "HND", KVQuant.NONE, dt, device=device, pad_entries=False)
    nhd = make_paged_kv(ctx, hkv, d, bs, "NHD", KVQuant.NONE, dt, device=device, pad_entries=False)
    vllm = make_paged_kv(ctx, hkv, d, bs, "vllm", KVQuant.NONE, dt, device=device, pad_entries=False)
    asm = make_paged_kv(ctx, hkv, d, bs, "vllm_shuffled", KVQuant.NONE, dt, device=device, pad_entries=False)
    max_ctx = max(ctx)
    q, out = rand(S, hq, d), torch.empty(S, hq, d, dtype=dt, device=device)
    # cache writes: one new token per sequence, into a cache of its own
    key, value = rand(S, hkv, d), rand(S, hkv, d)
    slots = torch.tensor([5, 40], dtype=torch.int64, device=device)
    wk, wv = allocate_kv_cache(4, bs, hkv, d, dt, "vllm", device)
    fk, fv = allocate_kv_cache(4, bs, hkv, d, dt, "NHD", device)
    qk, qv = allocate_kv_cache(4, bs, hkv, d, fp8, "vllm", device)
    tok_scales = [torch.ones(hkv, 4 * bs, device=device) for _ in range(2)]
    blk_scales = [torch.zeros(hkv, 4, device=device) for _ in range(2)]
    swap_src = allocate_kv_cache(4, bs, hkv, d, dt, "NHD", device)[0]
    swap_dst = torch.zeros(4, bs, hkv, d, dtype=dt, device="cpu")
    swap_map = torch.tensor([[0, 1]])
    copy_map = torch.tensor([[0, 3]], device=device)
    # decode front ends' buffers
    P = -(-max_ctx // 256)
    exp_sums = torch.empty(S, hq, P, dtype=torch.float32, device=device)
    max_logits, tmp_out = torch.empty_like(exp_sums), torch.empty(S, hq, P, d, dtype=dt, device=device)
    ws = torch.empty(api.paged_attention_workspace_size(S, hq, d, P, dt), dtype=torch.uint8, device=device)
    kv_indptr = torch.tensor([0, 2, 4], **i32)
    pages = nhd.block_tables[:, :2].reshape(-1).contiguous()
    last = torch.tensor([14, 1], **i32)
    # prefill / extend: sequences of 3 and 2 new tokens after the cached context
    T = 5
    qp, kp, vp, op = rand(T, hq, d), rand(T, hkv, d), rand(T, hkv, d), torch.empty(T, hq, d, dtype=dt, device=device)
    starts = torch.tensor([0, 3, 5], **i32)
    seq_lens = torch.tensor([ctx[0] + 3, ctx[1] + 2], **i32)
    tokens = rand(48, hkv, d), rand(48, hkv, d)
    kv_idx = torch.arange(40, **i32)
    kv_ptr = torch.tensor([0, 30, 40], **i32)

    return [
        HostCase("reshape_and_cache", lambda: api.reshape_and_cache(key, value, wk, wv, slots)),
        HostCase("reshape_and_cache_flash", lambda: api.reshape_and_cache_flash(key, value, fk, fv, slots)),
        HostCase("reshape_and_cache_with_pertoken_quant", lambda: api.reshape_and_cache_with_pertoken_quant(
            key, value, qk, qv, *tok_scales, slots)),
        HostCase("reshape_and_cache_with_block_quant", lambda: api.reshape_and_cache_with_block_quant(
            key, value, qk, qv, *blk_scales, slots)),
        HostCase("swap_blocks", lambda: api.swap_blocks(swap_src, swap_dst, swap_map)),
        HostCase("copy_blocks", lambda: api.copy_blocks([wk], [wv], copy_map)),
        HostCase("paged_attention_decode", lambda: api.paged_attention_decode(
            out, q, hnd.key_cache, hnd.value_cache, hnd.context_lens, hnd.block_tables, d ** -0.5, max_ctx)),
        HostCase("paged_attention_rocm", lambda: api.paged_attention_rocm(
            out, exp_sums, max_logits, tmp_out, q, vllm.key_cache, vllm.value_cache, hkv, d ** -0.5,
            vllm.block_tables, vllm.context_lens, bs, max_ctx, None, "auto", None, None)),
        HostCase("paged_attention_v1", lambda: api.paged_attention_v1(
            out, ws, q, nhd.key_cache, nhd.value_cache, d ** -0.5, nhd.block_tables, None, nhd.context_lens, max_ctx,
            None, "auto", "NHD", 0.0, None, None)),
        HostCase("paged_attention_ragged", lambda: api.paged_attention_ragged(
            out, ws, q, nhd.key_cache, nhd.value_cache, d ** -0.5, kv_indptr, pages, last, bs, P, None, "auto",
            "NHD", 0.0, None, None)),
        HostCase("pa_fwd_asm", lambda: api.pa_fwd_asm(
            q, asm.key_cache, asm.value_cache, asm.block_tables, asm.context_lens, asm.block_tables.stride(0),
            out_=out)),
        HostCase("paged_attention_common", lambda: api.paged_attention_common(
            q, asm.key_cache, asm.value_cache, exp_sums, max_logits, tmp_out, asm.block_tables, asm.context_lens,
            asm.block_tables.stride(0), d ** -0.5, max_seq_len=max_ctx, out_=out)),
        HostCase("context_attention_fwd", lambda: api.context_attention_fwd(
            qp, kp, vp, op, "auto", vllm.key_cache, vllm.value_cache, vllm.block_tables, starts, seq_lens, 3),
            like="prefill"),
        HostCase("chunked_prefill_paged_decode", lambda: api.chunked_prefill_paged_decode(
            qp, kp, vp, op, "auto", vllm.key_cache, vllm.value_cache, vllm.block_tables, starts, seq_lens, 3),
            like="prefill"),
        HostCase("extend_attention_fwd", lambda: api.extend_attention_fwd(
            qp, kp, vp, op, *tokens, starts, kv_ptr, kv_idx, None, True, None, 3), like="prefill"),
        HostCase("prefill_attention", lambda: api.prefill_attention(
            qp, kp, vp, op, starts[:2], starts[1:] - starts[:2], 3), like="prefill"),
    ]


def warmup_cases(device: str = "cuda") -> list:
    """Calls that compile the kernel specialisations a serving process hits first: paged decode
    (one pass and split-K) over HND caches in bf16 and fp16, head dims 64 and 128, 16-bit, fp8
    per-tensor and fp8 per-token KV; prefix prefill over vLLM caches; the cache writes (vLLM, NHD,
    fp8 per-tensor and per-token). 32 query heads over 8 KV heads, block size 16, small contexts."""
    import torch

    from aiter_core.host import HostCase
    from aiter_core.quant import KVQuant

    from . import api
    from .layouts import allocate_kv_cache
    from .testing import make_paged_kv

    fp8 = torch.float8_e4m3fn
    S, hq, hkv, bs, ctx = 2, 32, 8, 16, [40, 17]
    i32 = dict(dtype=torch.int32, device=device)
    cases = []
    for dt in (torch.bfloat16, torch.float16):
        for d in (64, 128):
            tag = f"{str(dt).replace('torch.', '')} d{d}"
            q = torch.randn(S, hq, d, device=device).to(dt)
            out = torch.empty_like(q)
            for quant, store in ((KVQuant.NONE, None), (KVQuant.PER_TENSOR_8BIT, fp8), (KVQuant.PER_TOKEN_8BIT, fp8)):
                kv = make_paged_kv(ctx, hkv, d, bs, "HND", quant, dt, store, device, pad_entries=False)
                forms = (0, 2) if quant == KVQuant.NONE else (0,)  # split-K: 16-bit caches split first
                for parts in forms:
                    args = (out, q, kv.key_cache, kv.value_cache, kv.context_lens, kv.block_tables, d ** -0.5, max(ctx),
                            None, kv.k_scale, kv.v_scale, parts)
                    cases.append(HostCase(
                        f"paged_attention_decode ({tag}, {quant.name.lower()}{', split' if parts else ''})",
                        lambda a=args: api.paged_attention_decode(*a)))
            vllm = make_paged_kv(ctx, hkv, d, bs, "vllm", KVQuant.NONE, dt, None, device, pad_entries=False)
            T = 6
            qp, kp, vp = (torch.randn(T, h, d, device=device).to(dt) for h in (hq, hkv, hkv))
            op = torch.empty_like(qp)
            starts = torch.tensor([0, 4, 6], **i32)
            seq_lens = torch.tensor([ctx[0] + 4, ctx[1] + 2], **i32)
            prefill = (qp, kp, vp, op, "auto", vllm.key_cache, vllm.value_cache, vllm.block_tables, starts, seq_lens, 4)
            cases.append(HostCase(f"context_attention_fwd ({tag})", lambda a=prefill: api.context_attention_fwd(*a),
                                  like="prefill"))
            key, value = torch.randn(S, hkv, d, device=device).to(dt), torch.randn(S, hkv, d, device=device).to(dt)
            slots = torch.tensor([3, 20], device=device)
            wk, wv = allocate_kv_cache(4, bs, hkv, d, dt, "vllm", device)
            fk, fv = allocate_kv_cache(4, bs, hkv, d, dt, "NHD", device)
            qk, qv = allocate_kv_cache(4, bs, hkv, d, fp8, "vllm", device)
            scales = [torch.ones(hkv, 4 * bs, device=device) for _ in range(2)]
            cases += [
                HostCase(f"reshape_and_cache ({tag})", lambda a=(key, value, wk, wv, slots): api.reshape_and_cache(*a)),
                HostCase(f"reshape_and_cache fp8 ({tag})", lambda a=(key, value, qk, qv, slots): api.reshape_and_cache(
                    *a, "fp8")),
                HostCase(f"reshape_and_cache_flash ({tag})",
                         lambda a=(key, value, fk, fv, slots): api.reshape_and_cache_flash(*a)),
                HostCase(f"reshape_and_cache_with_pertoken_quant ({tag})",
                         lambda a=(key, value, qk, qv, *scales, slots): api.reshape_and_cache_with_pertoken_quant(*a)),
            ]
    return cases


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    if not torch.cuda.is_available() and args.device != "cpu":
        from aiter_core.bench import smoke_instead

        from .smoke import run

        return smoke_instead("aiter-pa", run)
    return run_bench(args)


if __name__ == "__main__":
    sys.exit(main())
