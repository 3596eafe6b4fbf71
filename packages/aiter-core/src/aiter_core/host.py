"""Host cost of an eager call, and first-call compile time: ``aiter bench host``.

Every family lists, in its ``bench.py``, one :class:`HostCase` per public op at a tiny shape (GPU
work of a few microseconds, so the loop is bound by the host) and, for ``aiter warmup``, the
calls that compile its default kernel specialisations (production-like head dims and dtypes at
small sizes). Its ``Family`` entry names both functions (``host=``, ``warmup=``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence


@dataclass(frozen=True)
class HostCase:
    op: str  # the public function, as a user calls it: "paged_attention_decode"
    call: Callable[[], Any]  # one eager call (inputs made beforehand, outputs preallocated where the API allows)
    like: str = "decode"  # which torch SDPA call it is compared with: "decode" (1 query row) or "prefill"


def per_call_us(fn: Callable[[], Any], calls: int = 200, repeats: int = 5, warmup: int = 20) -> float:
    """Host microseconds per call of ``fn``: ``calls`` calls back to back, then one device sync;
    the best of ``repeats`` such loops (the least disturbed by other processes). With GPU work
    of a few microseconds per call the loop is bound by the host, so this is the host cost."""
    import time

    import torch

    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        sync()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def sdpa_cases(device: Any) -> list[HostCase]:
    """torch SDPA at the host benchmark's tiny shapes (flash backend on a GPU): the yardstick."""
    import torch

    gpu = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    cases = []
    for like, (sq, sk) in (("decode", (1, 256)), ("prefill", (128, 128))):
        q = torch.randn(1, 8, sq, 64, device=device, dtype=dtype)
        k = torch.randn(1, 8, sk, 64, device=device, dtype=dtype)
        v = torch.randn_like(k)

        def call(q=q, k=k, v=v, causal=like == "prefill"):
            if gpu:
                with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                    return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)

        cases.append(HostCase(f"scaled_dot_product_attention ({like})", call, like))
    return cases


def family_cases(kind: str, device: Any, names: Sequence[str] = ()) -> list[tuple[str, HostCase]]:
    """``(distribution, case)`` for every installed family's ``host`` (or ``warmup``) cases."""
    from .registry import families, resolve

    out = []
    for family in families():
        path = getattr(family, kind)
        if not path or (names and family.name not in names):
            continue
        for case in resolve(path)(device):
            out.append((family.distribution, case))
    return out


def host_rows(device: Any, names: Sequence[str] = (), calls: int = 200) -> list[dict[str, Any]]:
    """One row per op (and one per torch SDPA call) with ``us_per_call`` and, for the families'
    ops, ``ratio_to_sdpa`` (over SDPA's call of the same ``like``)."""
    rows = []
    sdpa = {}
    for case in sdpa_cases(device):
        us = per_call_us(case.call, calls)
        sdpa[case.like] = us
        rows.append({"op": case.op, "provider": "torch-sdpa", "like": case.like, "us_per_call": round(us, 2)})
    for distribution, case in family_cases("host", device, names):
        try:
            us = per_call_us(case.call, calls)
        except Exception as exc:  # one broken case is a row with its error, not a lost run
            rows.append({"op": case.op, "provider": distribution, "like": case.like, "us_per_call": None,
                         "error": f"{type(exc).__name__}: {exc}"[:200]})
            continue
        rows.append({"op": case.op, "provider": distribution, "like": case.like, "us_per_call": round(us, 2),
                     "ratio_to_sdpa": round(us / sdpa[case.like], 2)})
    return rows


def first_call_seconds(device: Any, names: Sequence[str] = ()) -> dict[str, float]:
    """Seconds of each op's first call in this process (compiles unless Triton's cache has it)."""
    import time

    import torch

    torch.empty(1, device=device).add_(1)  # the device context, outside the first op's time
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    out = {}
    for distribution, case in family_cases("host", device, names):
        start = time.perf_counter()
        try:
            case.call()
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize()
        except Exception:  # reported by host_rows; a first-call time would mean nothing
            continue
        out[f"{distribution}:{case.op}"] = round(time.perf_counter() - start, 3)
    return out


def warmup(device: Any, names: Sequence[str] = (), quiet: bool = False, jobs: int = 1,
           shard: tuple[int, int] = (0, 1)) -> tuple[int, float]:
    """Run every family's warmup cases once, compiling their kernel specialisations into Triton's
    disk cache; returns (calls, seconds). ``jobs > 1`` spreads the cases over that many processes
    sharing the cache (compiles are CPU-bound; Triton's cache takes concurrent writers); ``shard``
    ``(i, n)`` runs every n-th case from the i-th (what each of those processes does)."""
    import time

    import torch

    start = time.perf_counter()
    if jobs > 1:
        import concurrent.futures

        fam = ["--families", *names] if names else []
        args = [["--warmup-json", "--device", str(device), "--shard", f"{i}/{jobs}", *fam] for i in range(jobs)]
        with concurrent.futures.ThreadPoolExecutor(jobs) as pool:
            results = list(pool.map(lambda a: _subprocess_json(a, None)[0], args))
        return sum(r["calls"] for r in results), time.perf_counter() - start

    from .bench import progress

    index, count = shard
    cases = family_cases("warmup", device, names)[index::count]
    for _, case in progress(cases, "aiter warmup: compiling", quiet=quiet):
        case.call()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
    return len(cases), time.perf_counter() - start


def default_jobs() -> int:
    """Warmup processes by default: the cores, at most 8 (each holds a CUDA context)."""
    import os

    return max(1, min(8, os.cpu_count() or 1))


def _subprocess_json(args: list[str], cache_dir: str | None) -> tuple[Any, float]:
    """Run ``python -m aiter_core.host ARGS`` (with its own Triton cache when ``cache_dir`` is
    given); (its last JSON line, seconds)."""
    import json
    import os
    import subprocess
    import sys
    import time

    env = dict(os.environ) if cache_dir is None else dict(os.environ, TRITON_CACHE_DIR=cache_dir)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "aiter_core.host", *args], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"`python -m aiter_core.host {' '.join(args)}` failed:\n{proc.stderr[-2000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return (json.loads(lines[-1]) if lines else None), seconds


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m aiter_core.bench host`` / ``aiter bench host``: the host-cost table."""
    import argparse
    import json
    import tempfile

    import torch

    parser = argparse.ArgumentParser(prog="aiter bench host", description=main.__doc__)
    parser.add_argument("--families", nargs="*", default=[], help="only these families (default: all installed)")
    parser.add_argument("--calls", type=int, default=200, help="calls per timing loop")
    parser.add_argument("--no-first-call", action="store_true", help="skip the first-call compile times (subprocesses)")
    parser.add_argument("--out", help="write host.json / host.md into this folder")
    parser.add_argument("--stem", default="host")
    parser.add_argument("--device", default=None)
    parser.add_argument("--first-call-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--warmup-json", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=default_jobs(), help="processes for the warmup compiles")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.first_call_json:
        print(json.dumps(first_call_seconds(device, args.families)))
        return 0
    if args.warmup_json and args.jobs > 1 and args.shard == "0/1":  # the parent of the warmup shards
        calls, seconds = warmup(device, args.families, jobs=args.jobs)
        print(json.dumps({"calls": calls, "seconds": round(seconds, 2), "jobs": args.jobs}))
        return 0
    if args.warmup_json:
        index, count = (int(x) for x in args.shard.split("/"))
        calls, seconds = warmup(device, args.families, quiet=True, shard=(index, count))
        print(json.dumps({"calls": calls, "seconds": round(seconds, 2)}))
        return 0

    from .bench import BenchRun

    run = BenchRun.start("host", argv=["-m", "aiter_core.bench", "host", *(argv if argv is not None else [])])
    run.rows = host_rows(device, args.families, args.calls)
    if not args.no_first_call:
        fam = ["--families", *args.families] if args.families else []
        with tempfile.TemporaryDirectory() as cold, tempfile.TemporaryDirectory() as warmed:
            cold_s, _ = _subprocess_json(["--first-call-json", "--device", device, *fam], cold)
            warm_info, warm_s = _subprocess_json(["--warmup-json", "--device", device, "--jobs", str(args.jobs), *fam],
                                                 warmed)
            after_s, _ = _subprocess_json(["--first-call-json", "--device", device, *fam], warmed)
        run.metadata["warmup"] = {**(warm_info or {}), "process_seconds": round(warm_s, 2)}
        for row in run.rows:
            name = f"{row['provider']}:{row['op']}"
            if name in cold_s:
                row["first_call_s"] = cold_s[name]
                row["first_call_after_warmup_s"] = after_s.get(name)
    run.print_table()
    if args.out:
        for path in run.write_all(args.out, args.stem, plot=False).values():
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
