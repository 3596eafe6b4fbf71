"""JIT builder for the ``cpp`` backend: pybind11 modules compiled on first use and cached.

``load_module(name, sources, ...)`` compiles C++/CUDA sources with torch's extension machinery
(``torch.utils.cpp_extension.load``, ninja) into its own directory under ``jit_dir()``, one
directory per cache key, and imports the result. The key covers everything that changes the
binary: source and sibling-header contents, flags, target GPU arch, compiler versions, torch,
aiter-core and Python. A later call with the same key, in this process or another, imports the
cached build without invoking any compiler.

Environment:

* ``AITER_JIT_DIR``: cache root (default ``platformdirs.user_cache_dir("aiter")/jit``).
* ``AITER_JIT_DISABLE=1``: never build; a cache miss raises ``JitDisabledError`` naming the
  module and how to prebuild it (production images ship a prebuilt cache directory).

Concurrent builders of one key (processes or threads) are serialised by a file lock beside the
key's directory, with a double-checked load, so only one builds and the rest import its result.
A build announces itself before it starts (log + a status line on stderr): it can take a while.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Iterable, Sequence

log = logging.getLogger("aiter_core.jit")

_METADATA = "aiter_jit.json"  # written last: its presence marks a complete build
_HEADER_SUFFIXES = (".h", ".hh", ".hpp", ".hxx", ".cuh", ".inl", ".inc")
_CUDA_SUFFIXES = (".cu",)


class JitError(RuntimeError):
    """A JIT module could not be built or loaded."""


class JitDisabledError(JitError):
    """AITER_JIT_DISABLE forbids building and the cache has no build for this key."""


def jit_dir() -> Path:
    """The cache root: ``$AITER_JIT_DIR`` or ``platformdirs.user_cache_dir("aiter")/jit``."""
    env = os.environ.get("AITER_JIT_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("aiter")) / "jit"


def jit_disabled() -> bool:
    return os.environ.get("AITER_JIT_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


# --------------------------------------------------------------------------------------------
# cache key
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _tool_version(executable: str) -> str:
    """``<tool> --version`` condensed to its informative lines; a marker when it cannot run."""
    try:
        out = subprocess.run(
            [executable, "--version"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"<{executable} unavailable: {type(e).__name__}>"
    lines = [line.strip() for line in (out.stdout or out.stderr).splitlines() if line.strip()]
    # nvcc: "Cuda compilation tools, release 13.0, V13.0.88" + build line; gcc/clang: first line
    informative = [line for line in lines if "release" in line or line.startswith("Build")]
    return " | ".join(informative or lines[:1]) or f"<{executable}: no version output>"


def _cpp_extension():
    """torch.utils.cpp_extension, which needs setuptools (absent from bare Python 3.12 venvs)."""
    try:
        from torch.utils import cpp_extension
    except ImportError as e:
        raise JitError(
            f"JIT builds use torch.utils.cpp_extension, which cannot be imported here ({e}); "
            "pip install setuptools ninja"
        ) from e
    return cpp_extension


def _cxx() -> str:
    return os.environ.get("CXX", "c++")


def _nvcc() -> str:
    override = os.environ.get("PYTORCH_NVCC")
    if override:
        return override
    cuda_home = _cpp_extension().CUDA_HOME
    if cuda_home:
        return os.path.join(cuda_home, "bin", "nvcc")
    return shutil.which("nvcc") or "nvcc"


def _has_arch_flag(flags: Iterable[str]) -> bool:
    return any(re.search(r"(^|-)(gencode|arch|code)[= ]|--gpu-architecture|-arch\b", f) for f in flags)


def cuda_target_flags() -> tuple[str, list[str]]:
    """The target name and the ``-gencode`` flag for the current device (or ``AITER_ARCH``).

    Arch-specific targets where the chip has them (sm_90a on H100/H200: wgmma, TMA), since a
    JIT build only has to run on the device it was built for.
    """
    from .arch import get_arch_info

    info = get_arch_info()
    if info.vendor != "cuda" or info.capability is None:
        raise JitError(
            f"cannot choose a CUDA target for a JIT build on {info.device_name} ({info.vendor} {info.name}); "
            "run on an NVIDIA GPU, set AITER_ARCH (e.g. sm_90) to cross-build, or pass -gencode in extra_cuda_cflags"
        )
    target = info.arch_specific_target or f"sm_{info.capability[0]}{info.capability[1]}"
    virtual = "compute_" + target[len("sm_"):]
    return target, [f"-gencode=arch={virtual},code={target}"]


def _sibling_headers(sources: Sequence[Path]) -> list[Path]:
    """Headers under the sources' directories: editing one must invalidate the build."""
    headers: set[Path] = set()
    for directory in {s.parent for s in sources}:
        for path in directory.rglob("*"):
            if path.suffix in _HEADER_SUFFIXES and path.is_file():
                headers.add(path)
    return sorted(headers)


def _header_label(header: Path, sources: Sequence[Path]) -> str:
    for source in sources:
        if header.is_relative_to(source.parent):
            return str(header.relative_to(source.parent))
    return header.name


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class JitSpec:
    """One module configuration: what to build and where its cached build lives."""

    name: str
    sources: tuple[Path, ...]
    extra_cflags: tuple[str, ...]
    extra_cuda_cflags: tuple[str, ...]  # includes the -gencode chosen for the device
    extra_include_paths: tuple[str, ...]
    extra_ldflags: tuple[str, ...]
    with_cuda: bool
    key_fields: dict
    key: str

    @property
    def directory(self) -> Path:
        return jit_dir() / f"{self.name}-{self.key}"

    @property
    def lock_path(self) -> Path:
        return jit_dir() / f"{self.name}-{self.key}.lock"


def jit_spec(
    name: str,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_include_paths: Sequence[str | os.PathLike] = (),
    extra_ldflags: Sequence[str] = (),
    depends: Sequence[str | os.PathLike] = (),
) -> JitSpec:
    """Validate the arguments and compute the cache key (no compiling, no imports of the result)."""
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name: expected a Python identifier (it becomes the module name), got {name!r}")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    paths = tuple(Path(s).resolve() for s in sources)
    if not paths:
        raise ValueError("sources: expected at least one .cpp/.cu file, got none")
    for given, path in zip(sources, paths):
        if not path.is_file():
            raise FileNotFoundError(f"sources: {given} does not exist")
        if path.suffix not in (".cpp", ".cc", ".cxx", ".c", ".cu"):
            raise ValueError(f"sources: expected .cpp/.cc/.cxx/.c/.cu files, got {given}")
    for flag_name, flags in (
        ("extra_cflags", extra_cflags),
        ("extra_cuda_cflags", extra_cuda_cflags),
        ("extra_ldflags", extra_ldflags),
    ):
        if isinstance(flags, str) or not all(isinstance(f, str) for f in flags):
            raise TypeError(f"{flag_name}: expected a sequence of str flags, got {flags!r}")

    import torch

    from . import __version__ as core_version

    with_cuda = any(p.suffix in _CUDA_SUFFIXES for p in paths)
    cuda_flags = list(extra_cuda_cflags)
    target = "host"
    if with_cuda:
        if getattr(torch.version, "hip", None):
            raise JitError(f"module {name!r}: CUDA sources on ROCm are not supported by aiter_core.jit")
        if _has_arch_flag(cuda_flags):
            target = "from extra_cuda_cflags"
        else:
            target, gencode = cuda_target_flags()
            cuda_flags += gencode

    extra_files = [Path(d).resolve() for d in depends]
    for given, path in zip(depends, extra_files):
        if not path.is_file():
            raise FileNotFoundError(f"depends: {given} does not exist")
    headers = [h for h in _sibling_headers(paths) if h not in extra_files] + extra_files
    # Contents, not install locations, identify the sources (a venv move must not rebuild).
    key_fields = {
        "name": name,
        "sources": [[p.name, _digest(p)] for p in paths],
        "headers": sorted([_header_label(h, paths), _digest(h)] for h in headers),
        "extra_cflags": list(extra_cflags),
        "extra_cuda_cflags": cuda_flags,
        "extra_include_paths": [str(Path(p).resolve()) for p in extra_include_paths],
        "extra_ldflags": list(extra_ldflags),
        "target": target,
        "cxx": f"{_cxx()}: {_tool_version(_cxx())}",
        "nvcc": f"{_nvcc()}: {_tool_version(_nvcc())}" if with_cuda else None,
        "torch": f"{torch.__version__} cuda={torch.version.cuda} cxx11abi={torch.compiled_with_cxx11_abi()}",
        "aiter_core": core_version,
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}.{sys.version_info[2]} "
        f"{sysconfig.get_config_var('EXT_SUFFIX')}",
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:20]
    return JitSpec(
        name=name,
        sources=paths,
        extra_cflags=tuple(extra_cflags),
        extra_cuda_cflags=tuple(cuda_flags),
        extra_include_paths=tuple(str(p) for p in extra_include_paths),
        extra_ldflags=tuple(extra_ldflags),
        with_cuda=with_cuda,
        key_fields=key_fields,
        key=key,
    )


# --------------------------------------------------------------------------------------------
# building and loading
# --------------------------------------------------------------------------------------------

_LOADED: dict[str, ModuleType] = {}
_LOADED_LOCK = threading.Lock()
_BUILD_COUNT = 0


def build_count() -> int:
    """How many builds this process ran (tests use it to tell a cache hit from a rebuild)."""
    return _BUILD_COUNT


def _read_metadata(directory: Path) -> dict | None:
    try:
        meta = json.loads((directory / _METADATA).read_text())
    except (OSError, ValueError):
        return None
    if not (directory / meta.get("library", "")).is_file():
        return None
    return meta


def _import_library(spec: JitSpec, meta: dict) -> ModuleType:
    import torch  # noqa: F401  # the library links libtorch/libc10, which torch's import loads

    path = spec.directory / meta["library"]
    module_name = meta["module"]
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise JitError(f"module {spec.name!r}: cannot import the cached build {path}")
    module = importlib.util.module_from_spec(loader_spec)
    loader_spec.loader.exec_module(module)
    return module


def _other_builds(spec: JitSpec, limit: int = 3) -> str:
    """How cached builds of the same module differ from what was asked (for the disabled error)."""
    notes = []
    root = jit_dir()
    if root.is_dir():
        for directory in sorted(root.glob(f"{spec.name}-*")):
            meta = _read_metadata(directory) if directory.is_dir() else None
            if meta is None or meta.get("key_fields", {}).get("name") != spec.name:
                continue
            theirs = meta["key_fields"]
            differ = sorted(k for k in spec.key_fields if theirs.get(k) != spec.key_fields[k])
            notes.append(f"  {directory.name}: differs in {', '.join(differ) or 'nothing (corrupt?)'}")
            if len(notes) >= limit:
                break
    if not notes:
        return ""
    return "\nCached builds of this module for other configurations:\n" + "\n".join(notes)


def _announce(spec: JitSpec):
    """Say before a slow step starts: a log record plus a status line/spinner on stderr."""
    from rich.console import Console

    kind = "C++/CUDA" if spec.with_cuda else "C++"
    target = spec.key_fields["target"]
    message = f"aiter: JIT-building {kind} module '{spec.name}' for {target} (first use; can take a minute)"
    log.info("%s in %s", message, spec.directory)
    console = Console(stderr=True, soft_wrap=True)
    console.print(message, highlight=False, markup=False)
    if console.is_terminal:
        return console, console.status(f"building '{spec.name}' ...")
    return console, contextlib.nullcontext()


def _build(spec: JitSpec, verbose: bool) -> dict:
    """Compile into spec.directory (fresh) and write the metadata file last."""
    global _BUILD_COUNT
    cpp_extension = _cpp_extension()
    if not cpp_extension.is_ninja_available():
        raise JitError(f"module {spec.name!r}: building needs ninja on PATH (pip install ninja)")
    directory = spec.directory
    if directory.exists():
        # A half-finished build (killed process): start clean, which also drops torch's stale baton.
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    started = time.perf_counter()
    console, status = _announce(spec)
    with status:
        try:
            module = cpp_extension.load(
                name=spec.name,
                sources=[str(s) for s in spec.sources],
                extra_cflags=list(spec.extra_cflags),
                extra_cuda_cflags=list(spec.extra_cuda_cflags),
                extra_ldflags=list(spec.extra_ldflags),
                extra_include_paths=list(spec.extra_include_paths),
                build_directory=str(directory),
                verbose=verbose,
                with_cuda=spec.with_cuda,
            )
        except Exception as e:
            raise JitError(
                f"module {spec.name!r}: build failed in {directory} ({type(e).__name__}: {e}); "
                "rerun with verbose=True for the compiler output"
            ) from e
    _BUILD_COUNT += 1
    library = Path(module.__file__).resolve()
    meta = {
        "module": module.__name__,  # torch may rename it (<name>_v1) when rebuilt in one process
        "library": library.name,
        "key_fields": spec.key_fields,
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "build_seconds": round(time.perf_counter() - started, 2),
    }
    tmp = directory / (_METADATA + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, directory / _METADATA)
    done = f"aiter: built '{spec.name}' in {meta['build_seconds']:.1f} s ({directory})"
    log.info(done)
    console.print(done, highlight=False, markup=False)
    return meta


def _load(spec: JitSpec, *, verbose: bool, allow_build: bool) -> ModuleType:
    with _LOADED_LOCK:
        module = _LOADED.get(str(spec.directory))
        if module is not None:
            return module
        meta = _read_metadata(spec.directory)
        if meta is None:
            if not allow_build:
                raise JitDisabledError(
                    f"JIT build of module '{spec.name}' is disabled (AITER_JIT_DISABLE="
                    f"{os.environ.get('AITER_JIT_DISABLE')}) and the JIT cache {jit_dir()} has no build for "
                    f"this configuration (key {spec.key}). Prebuild it on a machine with the same compilers, "
                    f"torch and GPU arch: with AITER_JIT_DISABLE unset and AITER_JIT_DIR pointing at the cache "
                    f"you deploy, run the same code once or call aiter_core.jit.prebuild('{spec.name}', ...) "
                    f"with the same arguments, then ship that directory." + _other_builds(spec)
                )
            meta = _build_locked(spec, verbose)
        try:
            module = _import_library(spec, meta)
        except (ImportError, OSError) as exc:
            # A truncated or corrupt cached library (a killed copy, a full disk): rebuild it once
            # rather than fail with the same ImportError in every process from now on.
            if not allow_build:
                raise JitDisabledError(
                    f"the cached build of module '{spec.name}' in {spec.directory} cannot be imported "
                    f"({type(exc).__name__}: {exc}) and JIT builds are disabled (AITER_JIT_DISABLE): delete that "
                    "directory and prebuild it again") from exc
            log.warning("aiter: the cached build of '%s' in %s cannot be imported (%s: %s); rebuilding it",
                        spec.name, spec.directory, type(exc).__name__, exc)
            meta = _build_locked(spec, verbose, force=True)
            module = _import_library(spec, meta)
        _LOADED[str(spec.directory)] = module
        return module


def _build_locked(spec: JitSpec, verbose: bool, force: bool = False) -> dict:
    """Build under the per-build file lock (one builder across processes); without ``force``, a
    build another process finished while we waited is taken as it is."""
    from filelock import FileLock, Timeout

    spec.lock_path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(spec.lock_path))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        log.warning("aiter: waiting for another process building '%s' (%s)", spec.name, spec.lock_path)
        lock.acquire()
    try:
        meta = None if force else _read_metadata(spec.directory)  # someone may have finished while we waited
        return meta if meta is not None else _build(spec, verbose)
    finally:
        lock.release()


def load_module(
    name: str,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_include_paths: Sequence[str | os.PathLike] = (),
    extra_ldflags: Sequence[str] = (),
    depends: Sequence[str | os.PathLike] = (),
    verbose: bool = False,
) -> ModuleType:
    """Import the pybind11 module built from ``sources``, building it first on a cache miss.

    The sources define the module with ``PYBIND11_MODULE(TORCH_EXTENSION_NAME, m)``. Headers
    next to the sources (recursively) and the files in ``depends`` enter the cache key; headers
    reached through ``extra_include_paths`` enter it by path only (version them by package).
    CUDA sources (``.cu``) are compiled for the current device (``-gencode`` for sm_90a on
    H100/H200) unless ``extra_cuda_cflags`` names an arch.
    """
    spec = jit_spec(
        name,
        sources,
        extra_cflags=extra_cflags,
        extra_cuda_cflags=extra_cuda_cflags,
        extra_include_paths=extra_include_paths,
        extra_ldflags=extra_ldflags,
        depends=depends,
    )
    return _load(spec, verbose=verbose, allow_build=not jit_disabled())


def prebuild(
    name: str,
    sources: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    extra_cflags: Sequence[str] = (),
    extra_cuda_cflags: Sequence[str] = (),
    extra_include_paths: Sequence[str | os.PathLike] = (),
    extra_ldflags: Sequence[str] = (),
    depends: Sequence[str | os.PathLike] = (),
    verbose: bool = False,
) -> Path:
    """Build (if not cached) and return the module's cache directory, even under
    AITER_JIT_DISABLE: this is how a deployable cache is prepared."""
    spec = jit_spec(
        name,
        sources,
        extra_cflags=extra_cflags,
        extra_cuda_cflags=extra_cuda_cflags,
        extra_include_paths=extra_include_paths,
        extra_ldflags=extra_ldflags,
        depends=depends,
    )
    _load(spec, verbose=verbose, allow_build=True)
    return spec.directory
