"""Host cost of the pieces of an eager call on this machine (GPU needed): torch SDPA per call,
Triton's generic launch of a kernel with ~50 arguments (kernel[grid](...)) against calling the
compiled kernel's launcher directly, Triton's argument binder alone, the torch dispatcher for a
Python op with 21 arguments, os.environ.get. Prints microseconds per call.

    python packages/aiter-core/benchmarks/probes/launch_cost.py
"""

import os
import time

import torch
import triton
import triton.language as tl
from triton.runtime import driver


@triton.jit
def many_args(out, a0, a1, a2, a3, a4, a5, a6, a7, a8, a9,
              s0, s1, s2, s3, s4, s5, s6, s7, s8, s9, s10, s11, s12, s13, s14, s15, s16, s17, s18, s19,
              s20, s21, s22, s23, s24, s25, s26, s27, s28, s29, f0, f1, f2,
              C0: tl.constexpr, C1: tl.constexpr, C2: tl.constexpr, C3: tl.constexpr):
    pid = tl.program_id(0)
    tl.store(out + pid, tl.load(a0 + pid) + s0 + f0 + C0)


def per_call_us(fn, n=2000, warmup=50):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        torch.cuda.synchronize()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main():
    dev = "cuda"
    rows = []
    for like, (sq, sk) in (("decode", (1, 256)), ("prefill", (128, 128))):
        q = torch.randn(1, 8, sq, 64, device=dev, dtype=torch.bfloat16)
        k = torch.randn(1, 8, sk, 64, device=dev, dtype=torch.bfloat16)
        v = torch.randn_like(k)
        with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
            rows.append((f"torch sdpa flash ({like})", per_call_us(
                lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=like == "prefill"))))

    bufs = [torch.randn(1024, device=dev) for _ in range(11)]
    ints = list(range(16, 16 * 31, 16))
    args = (*bufs, *ints, 1.0, 2.0, 3.0)
    const = dict(C0=1, C1=2, C2=3, C3=4)
    many_args[(1,)](*args, **const)
    torch.cuda.synchronize()
    rows.append(("triton kernel[grid](...) 44 args + 4 constexpr", per_call_us(lambda: many_args[(1,)](*args, **const))))

    device = driver.active.get_current_device()
    kernel_cache, _, _, _, binder = many_args.device_caches[device]
    compiled = next(iter(kernel_cache.values()))
    stream = driver.active.get_current_stream(device)
    bound, _, _ = binder(*args, **const)
    values = list(bound.values())
    launch_md = compiled.launch_metadata((1, 1, 1), stream, *values)

    def direct():
        compiled.run(1, 1, 1, torch.cuda.current_stream().cuda_stream, compiled.function, compiled.packed_metadata,
                     launch_md, None, None, *values)

    rows.append(("compiled.run(...) direct, args prepared", per_call_us(direct)))
    rows.append(("binder(...) alone", per_call_us(lambda: binder(*args, **const))))
    rows.append(("torch.cuda.current_stream().cuda_stream", per_call_us(lambda: torch.cuda.current_stream().cuda_stream)))
    rows.append(("driver get_current_device+stream", per_call_us(
        lambda: driver.active.get_current_stream(driver.active.get_current_device()))))

    lib = torch.library.Library("probe", "FRAGMENT")
    T = torch.Tensor
    from typing import Optional

    def f(o: T, q: T, k: T, v: T, s: T, b: T, sc: float, m: int, ks: Optional[T], vs: Optional[T], p: int,
          al: Optional[T], lay: str, hp: int, mtp: int, cap: float, win: int, p1: Optional[T], p2: Optional[T],
          p3: Optional[T], backend: Optional[str] = None) -> None:
        return None

    lib.define("f" + torch.library.infer_schema(f, mutates_args=("o",)))
    lib.impl("f", f, "CUDA")
    t = bufs[0]
    fargs = (t, t, t, t, t, t, 1.0, 16, None, None, 0, None, "HND", 1, 1, 0.0, 0, None, None, None, None)
    rows.append(("torch.ops python op, 21 args", per_call_us(lambda: torch.ops.probe.f(*fargs))))
    rows.append(("same python function called directly", per_call_us(lambda: f(*fargs))))
    rows.append(("os.environ.get", per_call_us(lambda: os.environ.get("AITER_X_BACKEND"))))
    rows.append(("t.shape, t.dtype, t.device, t.stride(0), t.dim()", per_call_us(
        lambda: (t.shape, t.dtype, t.device, t.stride(0), t.dim()))))
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    for name, us in rows:
        print(f"{us:8.2f} us  {name}")


if __name__ == "__main__":
    main()
