"""aiter-core's own family entry for the CLI.

``run()`` (``aiter check``): a small Triton kernel (row softmax) against torch on this device
(the CPU interpreter when there is no GPU) and the KV-cache quantization references
round-tripped within their rounding bounds.

``bench(argv)`` (``aiter bench core``): measures the copy and matmul ceilings every family's
benchmarks are judged against, and writes them as table, JSON, Markdown and PNG.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

# Importing Triton here is fine: the CLI imports this module only after choosing the mode.
import triton
import triton.language as tl

from .testing import assert_all_written, interpreter_active, poison, randn, seed_everything
from .triton_utils import autotune, check_interpreter_consistent

_KERNEL: list = []  # decorated on first use, in the mode the process runs Triton


def _row_softmax(x_ptr, out_ptr, n_cols, stride_x, stride_out, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=float("-inf")).to(tl.float32)
    x = x - tl.max(x, axis=0)
    e = tl.exp(x)
    y = e / tl.sum(e, axis=0)
    tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _softmax_kernel():
    """The row-softmax kernel. Two configs, so that on the CPU the interpreter path of
    :func:`aiter_core.triton_utils.autotune` is exercised."""
    if not _KERNEL:
        check_interpreter_consistent()
        configs = [triton.Config({}, num_warps=4), triton.Config({}, num_warps=8)]
        _KERNEL.append(autotune(configs=configs, key=["n_cols"])(triton.jit(_row_softmax)))
    return _KERNEL[0]


def triton_row_softmax(x: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim of a 2-D tensor with the smoke kernel."""
    if x.dim() != 2:
        raise ValueError(f"x must be 2-D [rows, cols], got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"x must be fp32, fp16 or bf16, got {x.dtype}")
    if x.device.type == "cpu" and not interpreter_active():
        raise ValueError("x is on the CPU: Triton runs there only with TRITON_INTERPRET=1 (set before "
                         "importing triton); move x to the GPU or use the interpreter")
    x = x.contiguous()
    out = poison(torch.empty_like(x))
    kernel = _softmax_kernel()
    kernel[(x.shape[0],)](x, out, x.shape[1], x.stride(0), out.stride(0), BLOCK_N=triton.next_power_of_2(x.shape[1]))
    return out


def _check_softmax(device: torch.device, dtype: torch.dtype) -> float:
    x = randn((7, 100), dtype=dtype, device=device, scale=3.0)
    out = triton_row_softmax(x)
    assert_all_written(out, name="row_softmax output")
    ref = torch.softmax(x.float(), dim=-1)
    err = float((out.float() - ref).abs().max().item())
    bound = {torch.float32: 1e-5, torch.float16: 1e-3}[dtype]
    if not err <= bound:
        raise AssertionError(f"Triton row softmax {dtype} on {device}: max error {err:.3g} > {bound:g}")
    return err


def _check_kv_quant(device: torch.device) -> list[str]:
    """Quantize/dequantize with every KV method; each element must come back within the
    rounding bound of its storage type relative to its group's absmax."""
    from .arch import get_arch_info
    from .quant import KVQuant, dequantize_kv, quantize_kv

    fp8 = get_arch_info(device).fp8_dtype or torch.float8_e4m3fn
    x = randn((33, 4, 64), dtype=torch.float32, device=device, scale=2.0)
    cases = [
        (KVQuant.PER_TENSOR_8BIT, fp8),
        (KVQuant.PER_HEAD_8BIT, fp8),
        (KVQuant.PER_TOKEN_8BIT, fp8),
        (KVQuant.PER_TOKEN_8BIT, torch.int8),
        (KVQuant.PER_TOKEN_4BIT, None),
    ]
    done = []
    for method, store in cases:
        stored, scale = quantize_kv(x, method, store)
        back = dequantize_kv(stored, scale, method)
        if back.shape != x.shape:
            raise AssertionError(f"{method.name}: round trip changed the shape {tuple(x.shape)} -> {tuple(back.shape)}")
        if method == KVQuant.PER_TENSOR_8BIT:
            absmax = x.abs().amax().expand_as(x)
        elif method == KVQuant.PER_HEAD_8BIT:
            absmax = x.abs().amax(dim=(0, 2), keepdim=True).expand_as(x)
        else:
            absmax = x.abs().amax(dim=2, keepdim=True).expand_as(x)
        if store is None:  # int4: half a step of absmax / 7
            bound = absmax / 7 / 2
        elif store == torch.int8:
            bound = absmax / 127 / 2
        else:  # fp8: half an ulp relative, plus the subnormal spacing near zero
            info = torch.finfo(store)
            bound = absmax * (info.eps / 2) + absmax / info.max * info.tiny
        excess = ((back - x).abs() - bound * 1.001 - 1e-12)
        if bool((excess > 0).any()):
            worst = float((back - x).abs().max().item())
            raise AssertionError(f"KV quant {method.name} ({store}) round trip: error {worst:.3g} above the rounding bound")
        done.append(f"{method.name}/{str(store).removeprefix('torch.') if store else 'int4'}")
    return done


def run() -> str:
    """Smoke test of aiter-core on this device; raises on failure, returns a one-line summary."""
    seed_everything(0)
    gpu = torch.cuda.is_available() and not interpreter_active()
    device = torch.device("cuda") if gpu else torch.device("cpu")
    dtypes = [torch.float32, torch.float16]
    errors = [f"{str(d).removeprefix('torch.')} {_check_softmax(device, d):.1e}" for d in dtypes]
    quant = _check_kv_quant(device)
    where = "GPU" if gpu else "CPU interpreter"
    return (f"Triton row softmax ({where}) max err {', '.join(errors)}; "
            f"KV quant round trip ok: {', '.join(quant)}")


def _has_gpu() -> bool:
    return torch.cuda.is_available()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name).strip("_").lower() or "device"


def bench(argv: list[str] | None = None) -> int:
    """Measure the copy and matmul ceilings on this GPU and write them out."""
    from . import bench as b
    from .dtypes import str2Dtype

    parser = argparse.ArgumentParser(prog="aiter bench core", description=bench.__doc__)
    parser.add_argument("--copy-bytes", type=int, default=1 << 30, help="bytes per copy (read once, written once)")
    parser.add_argument("--matmul-n", type=int, default=8192, help="square matmul size")
    parser.add_argument("--dtype", default="bf16", help="matmul dtype (bf16, fp16, fp32)")
    parser.add_argument("--output-dir", default=None,
                        help="where to write JSON/Markdown/PNG (default: aiter-bench-results/<gpu>)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    args = parser.parse_args(argv or [])
    if not _has_gpu():
        print("aiter bench core: no GPU found; the ceilings can only be measured on a GPU", file=sys.stderr)
        return 2
    dtype = str2Dtype(args.dtype)
    run = b.BenchRun.start("core_ceilings")
    print(f"measuring a {args.copy_bytes / 2**30:.2f} GiB device copy and a {args.matmul_n}^3 "
          f"{args.dtype} matmul ...", file=sys.stderr)
    copy_tbps = b.measure_copy_tbps("cuda", args.copy_bytes)
    matmul_tflops = b.measure_matmul_tflops("cuda", args.matmul_n, dtype)
    run.ceilings = b.Ceilings(copy_tbps, matmul_tflops, args.dtype)
    # rows carry the times back-computed from the rates, so table and JSON show both
    moved = 2 * (args.copy_bytes // 4) * 4
    matmul_flops = 2.0 * args.matmul_n**3
    run.add("copy", "torch", moved / (copy_tbps * 1e12) * 1e3, nbytes=moved, size_bytes=moved // 2)
    run.add("matmul", "torch", matmul_flops / (matmul_tflops * 1e12) * 1e3, flops=matmul_flops,
            n=args.matmul_n, dtype=args.dtype)
    run.print_table()
    out_dir = Path(args.output_dir or Path("aiter-bench-results") / _slug(run.metadata["device_name"]))
    written = run.write_all(out_dir, plot=not args.no_plot)
    print("wrote " + ", ".join(str(p) for p in written.values()), file=sys.stderr)
    return 0
