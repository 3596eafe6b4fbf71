"""Small Triton helpers that kernel modules of every family import.

The module imports Triton only when a helper actually needs it, so importing it is cheap and
does not fix the interpreter mode before the caller (the `aiter` CLI, a test's conftest) had
the chance to set ``TRITON_INTERPRET``.

``autotune`` is the switch that lets autotuned kernels run under the Triton interpreter: the
interpreter cannot benchmark (there is no driver to time on), so there it pins one config
instead of tuning.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable, Sequence

__all__ = ["cdiv", "next_pow2", "max_element_offset", "interpreter_active", "triton_imported_as_interpreter", "check_interpreter_consistent", "autotune",
           "pinned_config", "install_compile_notice", "compile_notice",
           "launch", "direct_launch_key", "LAUNCH_OPTIONS"]

# Triton reads booleans from the environment with these spellings (triton.knobs.env_bool).
_TRUE_SPELLINGS = frozenset({"1", "true", "yes", "on", "y"})


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host integers. ``triton.cdiv`` is a constexpr function: on the host each
    call costs microseconds (4 us under Triton 3.6), which launch heuristics pay per call."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (1 for ``n <= 1``), for host integers: like ``cdiv``,
    ``triton.next_power_of_2`` costs microseconds per host call."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def max_element_offset(shape, stride) -> int:
    """The largest element offset from a tensor's data pointer that indexing it can reach
    (``sum((size - 1) * stride)``; -1 for an empty tensor): under ``2**31`` a kernel may address
    it with int32 offsets. Takes the shape and strides a caller already read (no Triton import)."""
    if 0 in shape:
        return -1
    return sum((size - 1) * st for size, st in zip(shape, stride))


def interpreter_active() -> bool:
    """True when Triton kernels run in the CPU interpreter (``TRITON_INTERPRET`` set true).

    Reads the environment, not ``triton.knobs``, so it never imports Triton; Triton itself
    reads the same variable when a kernel is decorated.
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE_SPELLINGS


def triton_imported_as_interpreter() -> bool | None:
    """Whether Triton's own library (``tl.max``, ``tl.sum`` ...) was decorated for the
    interpreter; None when Triton is not imported yet.

    Triton decorates its library when it is first imported, so a process that imported Triton
    before ``TRITON_INTERPRET=1`` was set cannot run interpreted kernels that use it.
    """
    if "triton" not in sys.modules:
        return None
    try:
        import triton.language.standard as standard
        from triton.runtime.interpreter import InterpretedFunction
    except Exception:  # pragma: no cover - a Triton without these modules
        return None
    return isinstance(standard.max, InterpretedFunction)


def check_interpreter_consistent() -> None:
    """Raise RuntimeError when ``TRITON_INTERPRET`` and the mode Triton was imported in
    disagree (then Triton kernels would fail with confusing errors)."""
    imported = triton_imported_as_interpreter()
    if imported is None or imported == interpreter_active():
        return
    if interpreter_active():
        raise RuntimeError("TRITON_INTERPRET=1 is set but Triton was imported before it was: set it before "
                           "the first `import triton` (in conftest.py, the environment, or use the `aiter` CLI)")
    raise RuntimeError("Triton was imported with TRITON_INTERPRET=1 but it is unset now: keep it set for "
                       "the whole process")


_PINNED_CLASS = None


def _pinned_class():
    """Build (once) the launcher class; it subclasses Triton's KernelInterface, so it needs
    Triton, which this module only imports on demand."""
    global _PINNED_CLASS
    if _PINNED_CLASS is None:
        from triton.runtime.jit import KernelInterface

        class InterpreterPinnedConfig(KernelInterface):
            """Launches ``fn`` with one fixed config: the stand-in for ``triton.autotune``
            under the interpreter. Keeps ``configs``, ``keys`` and ``best_config`` like an
            Autotuner so code that inspects a kernel's configs keeps working."""

            def __init__(self, fn, configs, key, pinned, early_config_prune):
                self.fn = fn
                self.arg_names = fn.arg_names
                self.configs = list(configs)
                self.keys = list(key)
                self.pinned = pinned
                self.early_config_prune = early_config_prune
                self.best_config = None
                self.base_fn = getattr(fn, "base_fn", fn)

            def _choose(self, args, kwargs):
                if self.pinned is not None:
                    return self.pinned
                candidates = self.configs
                if self.early_config_prune is not None:
                    nargs = dict(zip(self.arg_names, args))
                    candidates = self.early_config_prune(self.configs, nargs, **kwargs)
                    if not candidates:
                        raise RuntimeError(
                            f"early_config_prune of kernel {self.base_fn.__name__!r} returned no config"
                        )
                return candidates[0]

            def run(self, *args, **kwargs):
                config = self._choose(args, kwargs)
                self.best_config = config
                if config.pre_hook is not None:
                    config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
                return self.fn.run(*args, **kwargs, **config.all_kwargs())

            def warmup(self, *args, **kwargs):
                config = self._choose(args, kwargs)
                return [self.fn.warmup(*args, **kwargs, **config.all_kwargs())]

        _PINNED_CLASS = InterpreterPinnedConfig
    return _PINNED_CLASS


def pinned_config(configs: Sequence[Any], interpreter_config: Any = None) -> Any:
    """The config the interpreter runs: ``interpreter_config`` when given, else the first."""
    if interpreter_config is not None:
        return interpreter_config
    if not configs:
        raise ValueError("autotune: configs must hold at least one triton.Config, got an empty list")
    return configs[0]


def autotune(
    configs: Sequence[Any],
    key: Sequence[str],
    *,
    interpreter_config: Any = None,
    prune_configs_by: dict | None = None,
    **kwargs: Any,
) -> Callable[[Any], Any]:
    """Drop-in for ``triton.autotune`` that also works under ``TRITON_INTERPRET=1``.

    On a GPU it is exactly ``triton.autotune(configs, key, prune_configs_by=..., **kwargs)``.
    Under the interpreter (which cannot time kernels, so tuning over two or more configs fails
    with "0 active drivers") it launches one config: ``interpreter_config`` if given, else the
    first config that ``prune_configs_by["early_config_prune"]`` keeps (or the first config).
    ``perf_model``/``top_k``, ``reset_to_zero`` and ``restore_value`` only matter while
    benchmarking, so they are ignored there.

    The decision is taken when the decorator is applied, i.e. when the kernel module is
    imported, which is also when Triton decides between compiled and interpreted kernels.
    """
    configs = list(configs)
    if not configs:
        raise ValueError("autotune: configs must hold at least one triton.Config, got an empty list")
    if isinstance(key, str):
        raise TypeError(f"autotune: key must be a list of argument names, got the string {key!r}")

    def decorator(fn):
        if interpreter_active():
            prune = (prune_configs_by or {}).get("early_config_prune")
            cls = _pinned_class()
            return cls(fn, configs, key, interpreter_config, prune)
        import triton

        return triton.autotune(configs, key, prune_configs_by=prune_configs_by, **kwargs)(fn)

    return decorator


# -- first-call compile notice ----------------------------------------------------------------
# A kernel specialisation compiles on its first call, for seconds, and Triton prints nothing. The
# hooks below (Triton calls them around every compile it does in this process) log one line when
# an aiter kernel's compile passes AITER_COMPILE_NOTICE_S (default 1 s): the first such line of a
# process is a warning that names `aiter warmup`, later ones are info. Hooks that someone else set
# keep running: ours calls them.

_NOTICE_LOG = "aiter_core.compile"
_compile_started: dict[Any, float] = {}
_compile_notices = {"count": 0}
_hooks_installed = {"done": False}


def _notice_threshold() -> float:
    from . import env

    try:
        return float(env.get("AITER_COMPILE_NOTICE_S") or 1.0)
    except ValueError:
        return 1.0


def _is_ours(fn: Any) -> bool:
    return str(getattr(fn, "module", "")).startswith("aiter_")


def compile_notice(name: str, seconds: float) -> None:
    """Log that ``name`` compiled for ``seconds`` (the first notice of a process as a warning)."""
    import logging

    log = logging.getLogger(_NOTICE_LOG)
    _compile_notices["count"] += 1
    if _compile_notices["count"] == 1:
        log.warning("aiter: compiling %s took %.1f s (first call of this kernel specialisation in this process; "
                    "later compiles are logged at INFO). `aiter warmup` compiles the default specialisations "
                    "ahead of serving; Triton's disk cache keeps them for the next process.", name, seconds)
    else:
        log.info("aiter: compiled %s in %.1f s", name, seconds)


def install_compile_notice() -> None:
    """Install the compile-notice hooks once per process (kernel modules call this on import)."""
    if _hooks_installed["done"] or interpreter_active():
        return
    import time

    from triton import knobs

    runtime = knobs.runtime
    previous_start, previous_end = runtime.jit_cache_hook, runtime.jit_post_compile_hook

    def on_start(*args, **kwargs):
        if _is_ours(kwargs.get("fn")):
            _compile_started[id(kwargs.get("key"))] = time.perf_counter()
        return previous_start(*args, **kwargs) if previous_start else None

    def on_end(*args, **kwargs):
        started = _compile_started.pop(id(kwargs.get("key")), None)
        if started is not None:
            seconds = time.perf_counter() - started
            if seconds >= _notice_threshold():
                fn = kwargs.get("fn")
                compile_notice(f"{getattr(fn, 'module', '?')}.{getattr(fn, 'name', '?')}", seconds)
        return previous_end(*args, **kwargs) if previous_end else None

    runtime.jit_cache_hook, runtime.jit_post_compile_hook = on_start, on_end
    _hooks_installed["done"] = True


# -- launching a compiled kernel without Triton's generic launcher ------------------------------
# `kernel[grid](*args)` binds every argument through Triton's specialisation (dtype and 16-byte
# alignment of each pointer, int width and divisibility of each int), builds a cache key from it
# and its options, and only then launches: on the H100 host ~70 us for the MHA forward's ~100
# arguments, more than the whole eager call of torch SDPA. `launch` remembers, per kernel, which
# compiled kernel a call with the same *exact* arguments got - the same non-tensor values, and per
# tensor the same dtype and 16-byte alignment, i.e. a key at least as fine as Triton's own
# specialisation - and launches it directly, the way Triton's run() does. A miss (new values, a
# first call) goes through Triton (compiling if needed) and is remembered; any keyword argument
# that is not a launch option, a launch hook someone installed, or the interpreter sends every
# call through Triton. AITER_TRITON_DIRECT_LAUNCH=0 turns the direct path off.

LAUNCH_OPTIONS = frozenset({"num_warps", "num_stages", "num_ctas", "maxnreg", "enable_fp_fusion",
                            "launch_cooperative_grid", "launch_pdl"})
_DIRECT_CACHE_SIZE = 256  # remembered argument sets per kernel (a decode loop needs a handful)
_direct: dict[Any, dict] = {}  # kernel -> {key: (run, function, packed_metadata)}
_tensor_positions: dict[tuple, tuple[int, ...]] = {}  # argument types -> positions of the tensors


def direct_launch_key(args: tuple, options: tuple) -> tuple:
    """The remembered-launch key of ``args``: non-tensor arguments as they are (with their
    types, so 1, 1.0 and True differ), tensors as (dtype, data pointer 16-byte aligned)."""
    types = tuple(map(type, args))
    positions = _tensor_positions.get(types)
    if positions is None:
        import torch

        positions = _tensor_positions[types] = tuple(i for i, t in enumerate(types) if issubclass(t, torch.Tensor))
    values = list(args)
    for i in positions:
        a = values[i]
        values[i] = (a.dtype, a.data_ptr() & 15 == 0)
    return types, tuple(values), options


def _direct_enabled() -> bool:
    from . import env

    return env.get("AITER_TRITON_DIRECT_LAUNCH", "1") != "0" and not interpreter_active()


def launch(kernel: Any, grid: tuple, *args: Any, **options: Any) -> None:
    """``kernel[grid](*args, **options)``, with every kernel parameter given positionally in
    ``args`` and only launch options (num_warps, num_stages, ...) as keywords; see above."""
    if not _direct_enabled() or len(args) != len(kernel.params) or not LAUNCH_OPTIONS.issuperset(options):
        kernel[grid](*args, **options)
        return
    from triton import knobs
    from triton.runtime import driver

    enter, leave = knobs.runtime.launch_enter_hook, knobs.runtime.launch_exit_hook
    if getattr(enter, "calls", True) or getattr(leave, "calls", True):  # a profiler's hooks: Triton's path
        kernel[grid](*args, **options)
        return
    device = driver.active.get_current_device()
    remembered = _direct.get(kernel)
    if remembered is None:
        remembered = _direct[kernel] = {}
    key = (device, direct_launch_key(args, tuple(sorted(options.items()))))
    hit = remembered.get(key)
    if hit is None:
        compiled = kernel[grid](*args, **options)  # Triton's path: compiles or finds it, then launches
        if compiled is not None and not hasattr(compiled, "result"):  # not an async compile's future
            if len(remembered) >= _DIRECT_CACHE_SIZE:
                remembered.pop(next(iter(remembered)))
            remembered[key] = (compiled.run, compiled.function, compiled.packed_metadata)
        return
    run, function, packed_metadata = hit
    grid_1 = grid[1] if len(grid) > 1 else 1
    grid_2 = grid[2] if len(grid) > 2 else 1
    run(grid[0], grid_1, grid_2, driver.active.get_current_stream(device), function, packed_metadata, None, None, None,
        *args)
