"""Backend registry: which implementations of each op exist, which can run here, which runs.

Packages declare backends in the entry-point group ``aiter.backends``. An entry resolves to a
callable returning :class:`BackendSpec` objects: cheap descriptions (op, backend kind, priority,
an availability check, a ``supports(key)`` check, and the implementation: a function object, or
for a third-party plugin that wants it imported late a ``"module:attr"`` path). Discovery happens
once per process, on first use, never at import; it initialises no device and builds nothing. A
plugin that fails to load (any exception, ``SystemExit`` included) is logged with its
distribution and skipped; :func:`plugin_errors` lists them. Two distributions declaring the same
(op, backend) pair is an error naming both, unless the newcomer sets ``replaces=True``.

The hot path is :func:`run` (``run(op, call)``): ``call`` is the op's validated Call (built by the
family's ``checks`` module), ``call.key`` a hashable description of what decides the backend
(device type, dtypes, head dims, features) and ``call.backend`` the caller's explicit choice. The
backend chosen for ``(op, key, backend, AITER_<OP>_BACKEND, AITER_DISABLE_BACKENDS)`` is cached;
a new registration empties the cache, and a changed environment variable is a new cache key.

Selection for ``select(op, key, backend=None)`` (and ``dispatch``, which also loads the function):
1. an explicit ``backend=`` argument;
2. the environment variable ``AITER_<OP>_BACKEND`` (e.g. ``AITER_MHA_FWD_BACKEND=reference``);
3. otherwise the highest-priority backend that is available and whose ``supports`` returns no
   reasons. ``AITER_DISABLE_BACKENDS`` (comma list of ``op.backend`` or ``backend``) removes
   backends from automatic selection.
An explicit choice that cannot run raises instead of falling back. When nothing fits,
:class:`UnsupportedError` lists every backend with its reasons; :func:`explain` prints the same
table without running anything.

Families (``aiter.families``) describe an installed package for the CLI: its smoke test and
benchmark entry points.
"""

from __future__ import annotations

import importlib
import logging
import os
import threading
from dataclasses import dataclass, replace
from importlib.metadata import entry_points
from types import SimpleNamespace
from typing import Any, Callable, Hashable, Mapping, Sequence

from . import env

log = logging.getLogger("aiter_core")

PLUGIN_API_VERSION = 1
BACKENDS_GROUP = "aiter.backends"
FAMILIES_GROUP = "aiter.families"


class Problem(SimpleNamespace):
    """Attributes describing one call for ``supports``, where no Call key is at hand (``explain``
    from a user, tests). A family's Call key (a NamedTuple) has the same attributes."""


@dataclass(frozen=True)
class BackendSpec:
    op: str  # "mha_fwd"
    backend: str  # "triton" | "cpp" | "asm" | "reference" | a third-party name
    impl: Callable | str  # the function taking the op's Call; or "package.module:function", imported on first use
    priority: int = 0  # higher wins in automatic selection
    available: Callable[[], str | None] | None = None  # None = runs here, else why not
    supports: Callable[[Any], Sequence[str]] | None = None  # reasons it cannot run a call with this key
    api_version: int = PLUGIN_API_VERSION
    cuda_graph: bool = True  # safe to call inside CUDA-graph capture
    description: str = ""
    distribution: str = ""  # "aiter-mha 0.1.0", filled in by discovery
    replaces: bool = False  # take the place of an existing (op, backend) pair of another distribution

    @property
    def name(self) -> str:
        return f"{self.op}.{self.backend}"


@dataclass(frozen=True)
class Family:
    name: str  # "mha"
    distribution: str  # "aiter-mha"
    smoke: str = ""  # "module:function" -> fn() raising on failure, returning a one-line summary
    bench: str = ""  # "module:function" -> fn(argv: list[str]) -> int
    host: str = ""  # "module:function" -> fn(device) -> list[aiter_core.host.HostCase], one per public op
    warmup: str = ""  # "module:function" -> fn(device) -> list[HostCase] compiling the default specialisations
    ops: tuple[str, ...] = ()
    version: str = ""  # filled in by discovery


@dataclass(frozen=True)
class PluginError:
    group: str
    entry: str
    distribution: str
    error: str


class UnsupportedError(RuntimeError):
    """No backend of ``op`` can run the problem; the message lists each one and why."""

    def __init__(self, op: str, rows: list[tuple[BackendSpec, list[str]]], headline: str | None = None):
        self.op = op
        self.reasons = {spec.backend: reasons for spec, reasons in rows}
        lines = [headline or f"no backend of aiter op '{op}' can run this call:"]
        if not rows:
            lines.append("  (no backend is registered for this op; is its package installed?)")
        for spec, reasons in rows:
            lines.append(f"  {spec.backend} [{spec.distribution or 'local'}]: " + ("; ".join(reasons) or "ok"))
        super().__init__("\n".join(lines))


class DuplicateBackendError(ValueError):
    """Two distributions declared the same (op, backend) pair; neither silently wins."""

    def __init__(self, new: BackendSpec, old: BackendSpec):
        self.new, self.old = new, old
        super().__init__(
            f"backend {new.name!r} is declared by {new.distribution or 'local code'} and already by "
            f"{old.distribution or 'local code'}; the second declaration is ignored (set "
            "BackendSpec(replaces=True, priority=...) to take its place on purpose)")


def _backend_env_key(op: str) -> Any:
    key = _BACKEND_ENV_KEYS.get(op)
    if key is None:
        key = _BACKEND_ENV_KEYS[op] = env.environ_key(f"AITER_{op.upper()}_BACKEND")
    return key


_BACKEND_ENV_KEYS: dict[str, Any] = {}
_DISABLE_ENV_KEY = env.environ_key("AITER_DISABLE_BACKENDS")


def _reasons(value: Any) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [str(r) for r in value]


def _dist_label(ep) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.name} {dist.version}" if dist is not None else "unknown distribution"


class Registry:
    def __init__(self, discover: bool = True):
        self._lock = threading.RLock()
        self._discover = discover
        self._discovered = False
        self._specs: dict[str, list[BackendSpec]] = {}
        self._families: dict[str, Family] = {}
        self._errors: list[PluginError] = []
        self._impls: dict[str, Callable] = {}
        self._availability: dict[str, str | None] = {}
        self._selected: dict[tuple, Callable] = {}  # (op, key, backend, env choice, env disabled) -> impl

    # -- discovery -------------------------------------------------------------------------
    def _ensure(self) -> None:
        if self._discovered or not self._discover:
            return
        with self._lock:
            if self._discovered:
                return
            self._discovered = True  # set first: a plugin that calls back in must not recurse
            for ep in entry_points(group=BACKENDS_GROUP):
                self._load_backends(ep)
            for ep in entry_points(group=FAMILIES_GROUP):
                self._load_family(ep)

    def _record_error(self, group: str, ep, exc: BaseException) -> None:
        err = PluginError(group, ep.name, _dist_label(ep), f"{type(exc).__name__}: {exc}")
        self._errors.append(err)
        log.warning("aiter: plugin %s from %s failed to load and is skipped: %s", ep.name, err.distribution, err.error)

    def _load_backends(self, ep) -> None:
        try:
            obj = ep.load()
            specs = obj() if callable(obj) else obj
            if isinstance(specs, BackendSpec):
                specs = [specs]
            specs = list(specs)
            for spec in specs:
                if not isinstance(spec, BackendSpec):
                    raise TypeError(f"expected BackendSpec objects, got {type(spec).__name__}")
                if spec.api_version != PLUGIN_API_VERSION:
                    raise RuntimeError(
                        f"{spec.name} targets aiter plugin API {spec.api_version}, "
                        f"this aiter-core speaks {PLUGIN_API_VERSION}: upgrade the package"
                    )
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - one broken plugin (even sys.exit()) must not take the others down
            self._record_error(BACKENDS_GROUP, ep, exc)
            return
        for spec in specs:
            spec = replace(spec, distribution=spec.distribution or _dist_label(ep))
            try:
                self._add(spec)
            except DuplicateBackendError as exc:
                self._record_error(BACKENDS_GROUP, ep, exc)

    def _load_family(self, ep) -> None:
        try:
            obj = ep.load()
            family = obj() if callable(obj) and not isinstance(obj, Family) else obj
            if not isinstance(family, Family):
                raise TypeError(f"expected an aiter_core.Family, got {type(family).__name__}")
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - see _load_backends
            self._record_error(FAMILIES_GROUP, ep, exc)
            return
        dist = getattr(ep, "dist", None)
        version = family.version or (dist.version if dist is not None else "")
        self._families[family.name] = replace(family, version=version)

    def _add(self, spec: BackendSpec) -> None:
        with self._lock:
            current = self._specs.get(spec.op, [])
            clash = next((s for s in current if s.backend == spec.backend), None)
            if clash is not None and not spec.replaces and clash.distribution != spec.distribution:
                raise DuplicateBackendError(spec, clash)
            same = [s for s in current if s.backend != spec.backend]
            same.append(spec)
            same.sort(key=lambda s: -s.priority)
            self._specs[spec.op] = same
            self._impls.pop(spec.name, None)
            self._availability.pop(spec.name, None)
            self._selected.clear()

    # -- public API ------------------------------------------------------------------------
    def register(self, spec: BackendSpec) -> None:
        """Add a backend without an entry point. The same (op, backend) pair again replaces the
        earlier one when both come from the same distribution (or ``spec.replaces`` is set);
        otherwise :class:`DuplicateBackendError`."""
        self._ensure()
        self._add(spec)

    def register_family(self, family: Family) -> None:
        self._ensure()
        self._families[family.name] = family

    def specs(self, op: str | None = None) -> list[BackendSpec]:
        self._ensure()
        if op is not None:
            return list(self._specs.get(op, []))
        return [s for op_specs in self._specs.values() for s in op_specs]

    def ops(self) -> list[str]:
        self._ensure()
        return sorted(self._specs)

    def families(self) -> list[Family]:
        self._ensure()
        return [self._families[k] for k in sorted(self._families)]

    def plugin_errors(self) -> list[PluginError]:
        self._ensure()
        return list(self._errors)

    def availability(self, spec: BackendSpec) -> str | None:
        """None when ``spec`` can run on this machine, else the reason. Cached per process."""
        if spec.name not in self._availability:
            try:
                reason = spec.available() if spec.available else None
            except Exception as exc:
                reason = f"availability check failed: {type(exc).__name__}: {exc}"
            self._availability[spec.name] = reason
        return self._availability[spec.name]

    def reasons(self, spec: BackendSpec, problem: Any = None) -> list[str]:
        """Every reason ``spec`` cannot run ``problem`` here (empty: it can)."""
        unavailable = self.availability(spec)
        if unavailable:
            return [unavailable]
        if problem is None or spec.supports is None:
            return []
        try:
            return _reasons(spec.supports(problem))
        except Exception as exc:
            return [f"supports() failed: {type(exc).__name__}: {exc}"]

    def select(self, op: str, problem: Any = None, backend: str | None = None) -> BackendSpec:
        specs = self.specs(op)
        env_name = f"AITER_{op.upper()}_BACKEND"
        chosen = backend or os.environ.get(env_name) or None
        if chosen:
            origin = "backend=" if backend else f"{env_name}="
            matches = [s for s in specs if s.backend == chosen]
            if not matches:
                rows = [(s, self.reasons(s, problem)) for s in specs]
                raise UnsupportedError(
                    op, rows, f"{origin}{chosen!r} names no backend of aiter op '{op}'; registered backends:"
                )
            reasons = self.reasons(matches[0], problem)
            if reasons:
                raise UnsupportedError(op, [(matches[0], reasons)], f"{origin}{chosen!r} cannot run this call of '{op}':")
            return matches[0]
        disabled = {x.strip() for x in os.environ.get("AITER_DISABLE_BACKENDS", "").split(",") if x.strip()}
        rows = []
        for spec in specs:
            if spec.name in disabled or spec.backend in disabled:
                rows.append((spec, ["disabled by AITER_DISABLE_BACKENDS"]))
                continue
            reasons = self.reasons(spec, problem)
            if not reasons:
                return spec
            rows.append((spec, reasons))
        raise UnsupportedError(op, rows)

    def load_impl(self, spec: BackendSpec) -> Callable:
        fn = self._impls.get(spec.name)
        if fn is None:
            fn = resolve(spec.impl) if isinstance(spec.impl, str) else spec.impl
            self._impls[spec.name] = fn
        return fn

    def dispatch(self, op: str, problem: Any = None, backend: str | None = None) -> Callable:
        """The implementation that should run ``problem`` (see the module docstring)."""
        return self.load_impl(self.select(op, problem, backend))

    def impl_for(self, op: str, key: Hashable, backend: str | None = None) -> Callable:
        """:meth:`dispatch` for a hashable Call key, cached (see the module docstring)."""
        environ = env.raw_environ()
        cache_key = (op, key, backend, environ.get(_backend_env_key(op)), environ.get(_DISABLE_ENV_KEY))
        fn = self._selected.get(cache_key)
        if fn is None:
            fn = self.dispatch(op, key, backend)
            self._selected[cache_key] = fn
        return fn

    def run(self, op: str, call: Any) -> Any:
        """Run a validated Call on the backend chosen for its key: the path of every op."""
        return self.impl_for(op, call.key, call.backend)(call)

    def explain(self, op: str, problem: Any = None) -> str:
        """A table of every backend of ``op``: priority, origin, and why it would (not) run."""
        specs = self.specs(op)
        try:
            selected = self.select(op, problem).backend
        except UnsupportedError:
            selected = None
        lines = [f"aiter op '{op}'" + (f" for {problem!r}" if problem is not None else "") + ":"]
        if not specs:
            lines.append("  no backend registered")
        for spec in specs:
            reasons = self.reasons(spec, problem)
            mark = "->" if spec.backend == selected else "  "
            status = "ok" if not reasons else "; ".join(reasons)
            lines.append(f"{mark} {spec.backend:<10} prio {spec.priority:<4} {spec.distribution or 'local':<24} {status}")
        if selected is None and specs:
            lines.append("   (no backend can run this call)")
        return "\n".join(lines)


def resolve(path: str) -> Callable:
    """'package.module:attr' -> the object, with an error that names the path."""
    module_name, _, attr = path.partition(":")
    if not attr:
        raise ValueError(f"implementation path must look like 'module:attr', got {path!r}")
    module = importlib.import_module(module_name)
    try:
        obj = module
        for part in attr.split("."):
            obj = getattr(obj, part)
    except AttributeError:
        raise ImportError(f"{module_name} has no attribute {attr!r} (from implementation path {path!r})") from None
    return obj


# aiter-core's own entry for the CLI: its smoke test checks Triton and the quant references on
# this device; its benchmark measures the copy and matmul ceilings every family compares against.
CORE_FAMILY = Family(name="core", distribution="aiter-core", smoke="aiter_core.smoke:run", bench="aiter_core.smoke:bench")

_REGISTRY = Registry()


def get_registry() -> Registry:
    return _REGISTRY


def register(spec: BackendSpec) -> None:
    _REGISTRY.register(spec)


def specs(op: str | None = None) -> list[BackendSpec]:
    return _REGISTRY.specs(op)


def ops() -> list[str]:
    return _REGISTRY.ops()


def families() -> list[Family]:
    return _REGISTRY.families()


def plugin_errors() -> list[PluginError]:
    return _REGISTRY.plugin_errors()


def select(op: str, problem: Any = None, backend: str | None = None) -> BackendSpec:
    return _REGISTRY.select(op, problem, backend)


def dispatch(op: str, problem: Any = None, backend: str | None = None) -> Callable:
    return _REGISTRY.dispatch(op, problem, backend)


def run(op: str, call: Any) -> Any:
    """Run a family's validated Call on its cached backend (``call.key``, ``call.backend``)."""
    return _REGISTRY.run(op, call)


def explain(op: str, problem: Any = None) -> str:
    return _REGISTRY.explain(op, problem)


def specs_for(impls: Mapping[str, Callable], **fields) -> list[BackendSpec]:
    """One spec per ``op: implementation`` pair of ``impls``, all with the same other fields."""
    return [BackendSpec(op=op, impl=impl, **fields) for op, impl in impls.items()]


def reference_specs(impls: Mapping[str, Callable], *, priority: int = 0,
                    supports: Callable[[Any], Sequence[str]] | None = None) -> list[BackendSpec]:
    """The ``reference`` backend of each ``op: implementation`` pair, available everywhere, never
    under CUDA-graph capture (a PyTorch reference syncs with the host). ``supports=None`` accepts
    every call."""
    return specs_for(impls, backend="reference", priority=priority, available=always_available, supports=supports,
                     cuda_graph=False, description="PyTorch reference (any device; syncs with the host, not for CUDA graphs)")


# -- availability checks shared by the families' specs ----------------------------------------


def gpu_available() -> str | None:
    """None when torch sees a CUDA or ROCm device."""
    import torch

    if not torch.cuda.is_available():
        return "no CUDA/ROCm device visible to torch"
    return None


def triton_available() -> str | None:
    """None when Triton kernels can run: a GPU is present, or the CPU interpreter is on."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - depends on the install
        return f"triton cannot be imported ({exc})"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return gpu_available()


def triton_device_reasons(device) -> list[str]:
    """Why a Triton kernel cannot run on ``device`` (a CPU tensor needs the interpreter)."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return []
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return []
    if device.type == "cpu":
        return ["tensors are on the CPU (Triton runs there only with TRITON_INTERPRET=1)"]
    return [f"device type {device.type!r} is not supported by the Triton kernels"]


def triton_dtype_reasons(device, dtypes) -> list[str]:
    """Why Triton kernels cannot compute with ``dtypes`` on ``device``: the CPU interpreter has
    no bf16 arithmetic (and its bf16 ``tl.dot`` is silently wrong); fp8 needs sm_89 or newer."""
    import torch

    device = torch.device(device)
    dtypes = [d for d in dtypes if d is not None]
    reasons = []
    if device.type == "cpu" and torch.bfloat16 in dtypes:
        reasons.append("bf16 arithmetic is not supported by the Triton interpreter")
    has_fp8 = any(d.is_floating_point and d.itemsize == 1 for d in dtypes)
    if has_fp8 and device.type == "cuda" and torch.cuda.is_available() and torch.version.hip is None:
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            reasons.append(f"fp8 needs sm_89 or newer, this device is sm_{cap[0]}{cap[1]}")
    return reasons


def always_available() -> str | None:
    """Availability check of backends that run anywhere (the PyTorch references)."""
    return None


__all__ = [
    "PLUGIN_API_VERSION",
    "BackendSpec",
    "Family",
    "PluginError",
    "Problem",
    "Registry",
    "UnsupportedError",
    "DuplicateBackendError",
    "always_available",
    "dispatch",
    "explain",
    "families",
    "get_registry",
    "gpu_available",
    "ops",
    "plugin_errors",
    "register",
    "resolve",
    "run",
    "select",
    "specs",
    "specs_for",
    "reference_specs",
    "triton_available",
    "triton_device_reasons",
    "triton_dtype_reasons",
]
