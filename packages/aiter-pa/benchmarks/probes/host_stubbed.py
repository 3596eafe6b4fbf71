"""Python host cost per eager call of every aiter-pa public op, the Triton launches stubbed out.

    TRITON_INTERPRET=1 python packages/aiter-pa/benchmarks/probes/host_stubbed.py [op ...]

Runs ``aiter_pa.bench.host_cases("cpu")`` (fp16 CPU tensors) once through the interpreter, then
replaces every kernel object the launcher calls with a no-op and times 2000 calls of each case
(CPU time of this process, best of 5: other processes on the machine inflate it less than wall
time). What is left is our Python: argument checks, the Call, backend dispatch, launch
preparation; ``aiter bench host`` times the whole call, Triton's launch included, on a GPU.
"""

from __future__ import annotations

import os
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")


class _NoLaunch:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def _stub_launches() -> None:
    import aiter_core.triton_attn as ta
    from aiter_pa.triton import launch

    for name in list(vars(launch)):
        if name.startswith("_") and name.endswith("_kernel"):
            setattr(launch, name, _NoLaunch())
    ta.splitk_merge = lambda *args, **kwargs: None


def _us_per_call(fn, calls: int = 2000, repeats: int = 5) -> float:
    for _ in range(50):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in range(calls):
            fn()
        best = min(best, (time.process_time() - start) / calls * 1e6)
    return best


def main(only: list[str]) -> None:
    from aiter_pa.bench import host_cases

    cases = [c for c in host_cases("cpu") if not only or c.op in only]
    for case in cases:  # through the interpreter once: every cache below is warm
        case.call()
    _stub_launches()
    for case in cases:
        print(f"{case.op:40s} {_us_per_call(case.call):7.1f} us")


if __name__ == "__main__":
    main(sys.argv[1:])
