"""The ``aiter`` command.

    aiter info                       device, arch, versions, installed families, and per op which
                                     backends run here (and why the others do not)
    aiter check [family ...]         every (or the named) family's smoke test against its reference
    aiter bench [family ...] [-- args]
                                     the families' benchmarks; without a GPU, the correctness demo
                                     (the smoke tests, Triton kernels in the CPU interpreter)
    aiter bench host [-- args]       host microseconds per eager call of every op next to torch
                                     SDPA's, and first-call compile times (aiter_core.host)
    aiter warmup [family ...]        compile the families' default kernel specialisations into
                                     Triton's disk cache ahead of serving

This module imports neither Triton nor anything that does at module level: on a machine without
GPU, :func:`main` must set ``TRITON_INTERPRET=1`` before the first Triton kernel is defined.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from typing import Any, Sequence

NO_GPU_MESSAGE = "no GPU found: running the correctness demo instead"


def _gpu_present() -> bool:
    import torch  # importing torch does not import Triton

    return torch.cuda.is_available()


def _choose_triton_mode() -> str:
    """Decide, before any Triton import, whether Triton kernels run compiled or interpreted.

    A GPU: compiled (unless the user set TRITON_INTERPRET). No GPU: the interpreter, because
    that is the only way Triton kernels run on a CPU.
    """
    if "TRITON_INTERPRET" not in os.environ and not _gpu_present():
        os.environ["TRITON_INTERPRET"] = "1"
    from .triton_utils import interpreter_active

    return "interpreter" if interpreter_active() else "gpu"


# ----------------------------------------------------------------------------- info


def _fmt_dtype(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.") if dtype is not None else "none"


def _collect_info() -> dict[str, Any]:
    import aiter_core

    from . import env as _env
    from . import registry
    from .arch import get_arch_info
    from .bench import environment_info

    arch = get_arch_info()
    env = environment_info(include_families=False)
    reg = registry.get_registry()
    families = [
        {"name": f.name, "distribution": f.distribution, "version": f.version, "ops": list(f.ops),
         "smoke": f.smoke, "bench": f.bench}
        for f in reg.families()
    ]
    ops = {}
    for op in reg.ops():
        rows = []
        try:
            selected = reg.select(op).backend
        except registry.UnsupportedError:
            selected = None
        for spec in reg.specs(op):
            reason = reg.availability(spec)
            rows.append({"backend": spec.backend, "priority": spec.priority, "distribution": spec.distribution,
                         "available": reason is None, "why_not": reason, "default": spec.backend == selected,
                         "description": spec.description})
        ops[op] = rows
    errors = [{"group": e.group, "entry": e.entry, "distribution": e.distribution, "error": e.error}
              for e in reg.plugin_errors()]
    return {
        "aiter_core_version": aiter_core.__version__,
        "plugin_api_version": registry.PLUGIN_API_VERSION,
        "device": {
            "name": arch.device_name,
            "vendor": arch.vendor,
            "arch": arch.name,
            "capability": list(arch.capability) if arch.capability else None,
            "num_sms": arch.num_cu,
            "smem_per_block": arch.smem_per_block,
            "warp_size": arch.warp_size,
            "fp8_dtype": _fmt_dtype(arch.fp8_dtype),
            "arch_specific_target": arch.arch_specific_target,
            "known": arch.known,
            "source": arch.source,
        },
        "versions": {k: env[k] for k in ("torch_version", "triton_version", "cuda_version", "hip_version",
                                           "python_version")},
        "triton_mode": "CPU interpreter (TRITON_INTERPRET=1)" if env["interpreter"] else "compiled for the GPU",
        "families": families,
        "ops": ops,
        "plugin_errors": errors,
        "environment": _env.set_variables(),
        "caches": {"triton": _env.triton_cache_dir(), "jit": _env.jit_cache_dir()},
    }


def _print_info(info: dict[str, Any]) -> None:
    d = info["device"]
    v = info["versions"]
    unit = "CUs" if d["vendor"] == "rocm" else ("cores" if d["vendor"] == "cpu" else "SMs")
    print(f"aiter-core {info['aiter_core_version']} (plugin API {info['plugin_api_version']})")
    print(f"device:   {d['name']}")
    cap = f", compute capability {d['capability'][0]}.{d['capability'][1]}" if d["capability"] else ""
    extra = "" if d["known"] else "  (unknown arch: Triton backends only)"
    print(f"arch:     {d['arch']} ({d['vendor']}{cap}){extra}  [detected from {d['source']}]")
    print(f"{unit + ':':<10}{d['num_sms']}")
    if d["vendor"] != "cpu":
        print(f"smem:     {d['smem_per_block']} bytes per block (opt-in), warp size {d['warp_size']}")
    print(f"fp8 type: {d['fp8_dtype']}")
    if d["arch_specific_target"]:
        print(f"target:   {d['arch_specific_target']} (arch-specific: wgmma/TMA)")
    gpu_stack = f"CUDA {v['cuda_version']}" if v["cuda_version"] else (f"HIP {v['hip_version']}" if v["hip_version"]
                                                                       else "no CUDA")
    print(f"versions: torch {v['torch_version']} ({gpu_stack}), triton {v['triton_version'] or 'not installed'}, "
          f"python {v['python_version']}")
    print(f"triton:   {info['triton_mode']}")
    print(f"caches:   triton {info['caches']['triton']}, C++ JIT {info['caches']['jit']}")
    set_vars = info["environment"]
    print("AITER_*:  " + (", ".join(f"{k}={v}" for k, v in set_vars.items()) if set_vars else
                          "none set (every variable: aiter_core.env.VARIABLES)"))
    print()
    print("families:")
    if not info["families"]:
        print("  (none installed)")
    for f in info["families"]:
        ops = f"  ops: {', '.join(f['ops'])}" if f["ops"] else ""
        print(f"  {f['name']:<10} {f['distribution']} {f['version']}{ops}")
    print()
    print("ops (-> = chosen by default here):")
    if not info["ops"]:
        print("  (no backend registered)")
    for op, rows in info["ops"].items():
        print(f"  {op}")
        for r in rows:
            mark = "->" if r["default"] else "  "
            status = "available" if r["available"] else f"not available: {r['why_not']}"
            print(f"    {mark} {r['backend']:<10} prio {r['priority']:<4} {r['distribution'] or 'local':<22} {status}")
    if info["plugin_errors"]:
        print()
        print("plugins that failed to load:")
        for e in info["plugin_errors"]:
            print(f"  {e['group']} {e['entry']} from {e['distribution']}: {e['error']}")


def cmd_info(args: argparse.Namespace) -> int:
    info = _collect_info()
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


# ----------------------------------------------------------------------------- check / bench


def _select_families(names: Sequence[str]):
    from .registry import families

    installed = families()
    if not names:
        return installed
    by_name = {f.name: f for f in installed}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        raise SystemExit(_usage_error(f"unknown famil{'y' if len(unknown) == 1 else 'ies'} "
                                      f"{', '.join(unknown)}; installed: {', '.join(by_name) or 'none'}"))
    return [by_name[n] for n in names]


def _usage_error(message: str) -> int:
    print(f"aiter: error: {message}", file=sys.stderr)
    return 2


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def cmd_check(args: argparse.Namespace) -> int:
    from .registry import plugin_errors, resolve

    selected = _select_families(args.families)
    mode = "GPU" if not _interpreting() else "CPU, Triton interpreter"
    print(f"aiter check: {len(selected)} famil{'y' if len(selected) == 1 else 'ies'} on this device ({mode})")
    failures = 0
    for family in selected:
        label = f"{family.name} ({family.distribution} {family.version})".strip()
        if not family.smoke:
            print(f"SKIP {label}: declares no smoke test")
            continue
        start = time.perf_counter()
        try:
            detail = resolve(family.smoke)()
        except Exception as exc:  # report and go on with the next family
            failures += 1
            print(f"FAIL {label} [{time.perf_counter() - start:.1f} s]: {_first_line(exc)}")
            if args.verbose:
                traceback.print_exc()
            continue
        summary = str(detail).strip().splitlines()[0] if detail else "ok"
        print(f"PASS {label} [{time.perf_counter() - start:.1f} s]: {summary}")
    if not args.families:
        for err in plugin_errors():
            failures += 1
            print(f"FAIL plugin {err.entry} ({err.group}) from {err.distribution}: {err.error}")
    print(f"aiter check: {'all passed' if not failures else f'{failures} failed'}")
    return 1 if failures else 0


def _interpreting() -> bool:
    from .triton_utils import interpreter_active

    return interpreter_active()


def cmd_bench(args: argparse.Namespace) -> int:
    from .registry import resolve

    if args.families == ["host"]:
        if not _gpu_present():
            print("aiter bench host: no GPU, host cost per launch needs one", file=sys.stderr)
            return 2
        from .host import main as host_main

        return host_main(list(args.extra))
    fallback = None
    if not _gpu_present():
        fallback = NO_GPU_MESSAGE
    elif _interpreting():
        fallback = ("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter and cannot be timed; "
                    "running the correctness demo instead")
    if fallback:
        print(fallback)
        if args.extra:
            print(f"(ignoring benchmark arguments: {' '.join(args.extra)})")
        return cmd_check(args)
    selected = _select_families(args.families)
    failures = 0
    for family in selected:
        label = f"{family.name} ({family.distribution} {family.version})"
        if not family.bench:
            print(f"== {label}: declares no benchmark, skipped")
            continue
        print(f"== {label}: {family.bench} {' '.join(args.extra)}".rstrip())
        try:
            code = resolve(family.bench)(list(args.extra))
        except SystemExit as exc:  # a family's argparse error
            code = exc.code if isinstance(exc.code, int) else 1
        except Exception as exc:
            print(f"FAIL {label}: {_first_line(exc)}")
            if args.verbose:
                traceback.print_exc()
            code = 1
        if code:
            failures += 1
            print(f"== {label}: exit code {code}")
    return 1 if failures else 0


def cmd_warmup(args: argparse.Namespace) -> int:
    if not _gpu_present() or _interpreting():
        print("aiter warmup: compiles GPU kernels and needs a GPU (none found, or TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from .env import triton_cache_dir
    from .host import warmup

    names = [f.name for f in _select_families(args.families)]
    calls, seconds = warmup("cuda", names, jobs=args.jobs)
    print(f"aiter warmup: {calls} calls compiled or loaded in {seconds:.1f} s by {args.jobs} process"
          f"{'es' if args.jobs > 1 else ''} into {triton_cache_dir()}")
    return 0


# ----------------------------------------------------------------------------- main


def _parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(prog="aiter", description="aiter attention kernels: device info, checks, benchmarks")
    parser.add_argument("--version", action="version", version=f"aiter-core {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="{info,check,bench,warmup}")
    p_info = sub.add_parser("info", help="device, arch, versions, families and backends available here")
    p_info.add_argument("--json", action="store_true", help="machine-readable output")
    p_info.set_defaults(func=cmd_info)
    for name, func, text in (
        ("check", cmd_check, "run the families' smoke tests against their references on this device"),
        ("bench", cmd_bench, "run the families' benchmarks (arguments after -- go to each family's benchmark); "
                             "without a GPU, runs the correctness demo; `aiter bench host` times each op's host cost"),
        ("warmup", cmd_warmup, "compile the families' default kernel specialisations ahead of serving"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("families", nargs="*", help="family names (default: all installed)")
        p.add_argument("-v", "--verbose", action="store_true", help="print tracebacks of failures")
        if name == "warmup":
            import os

            p.add_argument("-j", "--jobs", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                           help="compile in this many processes (default: the cores, at most 8)")
        p.set_defaults(func=func)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _choose_triton_mode()  # first: before anything can import Triton
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1:]
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if extra and args.command != "bench":
        return _usage_error(f"arguments after -- are only passed to `aiter bench`, got: {' '.join(extra)}")
    args.extra = extra
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:  # _select_families' usage errors
        return exc.code if isinstance(exc.code, int) else 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
