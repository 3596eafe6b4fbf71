"""Loader for the ``asm`` backend: precompiled code objects listed in a CSV manifest.

A family ships ``hsa/<arch>/<family>/`` (see ``hsa/README.md`` at the repo root): code
objects (``*.cubin`` on NVIDIA) plus ``manifest.csv`` whose columns are ``knl_name``,
``co_name`` and any number of key columns (dtype, head dim, tile sizes ...). This module

* parses a manifest and selects one row by exact match on its key columns,
* loads a cubin into the current torch device's primary context through the CUDA driver API
  (``cuda.bindings.driver``; the old ``cuda.cuda`` module name of cuda-python < 12.6 too),
  refusing at load time a cubin built for another arch,
* launches a kernel on the current torch stream with explicitly typed arguments,
* caches loaded modules per (file, device).

Nothing here touches CUDA or imports the bindings until something is loaded.
On ROCm or without a CUDA device ``available()`` says why the loader cannot run.
"""

from __future__ import annotations

import csv
import ctypes
import importlib.resources
import os
import re
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

REQUIRED_COLUMNS = ("knl_name", "co_name")
MANIFEST_NAME = "manifest.csv"

# Kernels may use at most 48 KiB of dynamic shared memory unless they opt in per function.
_DEFAULT_DYNAMIC_SMEM_LIMIT = 48 * 1024


class LoaderError(RuntimeError):
    """The asm loader cannot do what was asked (unavailable, wrong arch, driver failure)."""


class CudaDriverError(LoaderError):
    """A CUDA driver call failed; ``name`` is the driver's error name (CUDA_ERROR_...)."""

    def __init__(self, call: str, name: str, description: str):
        self.call = call
        self.name = name
        self.description = description
        super().__init__(f"{call} failed: {name} ({description})")


# --------------------------------------------------------------------------------------------
# manifest
# --------------------------------------------------------------------------------------------


def _typed(value: Any) -> Any:
    """Manifest cells and asked values compare in one form: int when numeric, else str."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if re.fullmatch(r"[+-]?\d+", text):
        return int(text)
    return text


@dataclass(frozen=True)
class ManifestRow:
    knl_name: str
    co_name: str
    keys: Mapping[str, Any]
    line: int  # line number in the CSV (header is line 1), for error messages

    def describe(self) -> str:
        keys = ", ".join(f"{k}={v!r}" for k, v in self.keys.items())
        return f"{self.knl_name} in {self.co_name} ({keys}) [line {self.line}]"


@dataclass
class Manifest:
    """A parsed ``manifest.csv``. ``directory`` is where the code objects live."""

    path: Path
    key_columns: tuple[str, ...]
    rows: list[ManifestRow] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return self.path.parent

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "Manifest":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"manifest not found: {path}")
        with open(path, newline="", encoding="utf-8") as f:
            return cls.from_lines(f, path)

    @classmethod
    def from_lines(cls, lines: Iterable[str], path: str | os.PathLike = "<memory>") -> "Manifest":
        path = Path(path)
        reader = csv.reader(lines)
        header = next(reader, None)
        if header is None:
            raise ValueError(f"{path}: empty manifest, expected a header with {', '.join(REQUIRED_COLUMNS)}")
        header = [h.strip() for h in header]
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ValueError(
                f"{path}: manifest header must contain columns {list(REQUIRED_COLUMNS)}; "
                f"missing {missing}, got {header}"
            )
        if len(set(header)) != len(header) or any(not h for h in header):
            raise ValueError(f"{path}: manifest header has empty or repeated column names: {header}")
        key_columns = tuple(h for h in header if h not in REQUIRED_COLUMNS)
        rows: list[ManifestRow] = []
        seen: dict[tuple, int] = {}
        for line_no, cells in enumerate(reader, start=2):
            if not cells or all(not c.strip() for c in cells):
                continue  # blank line
            if len(cells) != len(header):
                raise ValueError(
                    f"{path}:{line_no}: expected {len(header)} fields ({', '.join(header)}), got {len(cells)}"
                )
            record = dict(zip(header, (c.strip() for c in cells)))
            for col in REQUIRED_COLUMNS:
                if not record[col]:
                    raise ValueError(f"{path}:{line_no}: empty {col}")
            co_name = record["co_name"]
            co_path = Path(co_name)
            if co_path.is_absolute() or ".." in co_path.parts:
                raise ValueError(
                    f"{path}:{line_no}: co_name must be a path inside the manifest's directory, got {co_name!r}"
                )
            keys = {k: _typed(record[k]) for k in key_columns}
            signature = tuple(keys[k] for k in key_columns)
            if signature in seen:
                raise ValueError(
                    f"{path}:{line_no}: duplicate key {dict(keys)} (same as line {seen[signature]}); "
                    "selection would be ambiguous"
                )
            seen[signature] = line_no
            rows.append(ManifestRow(record["knl_name"], co_name, keys, line_no))
        return cls(path=path, key_columns=key_columns, rows=rows)

    def select(self, **keys: Any) -> ManifestRow:
        """The row whose key columns equal ``keys``; every key column must be given."""
        unknown = sorted(set(keys) - set(self.key_columns))
        if unknown:
            raise ValueError(
                f"{self.path}: unknown key(s) {unknown}; the manifest's key columns are {list(self.key_columns)}"
            )
        absent = [k for k in self.key_columns if k not in keys]
        if absent:
            raise ValueError(
                f"{self.path}: select() needs every key column {list(self.key_columns)}; missing {absent}"
            )
        asked = {k: _typed(v) for k, v in keys.items()}
        for row in self.rows:
            if all(row.keys[k] == asked[k] for k in self.key_columns):
                return row
        raise LookupError(self._no_match_message(asked))

    def _no_match_message(self, asked: Mapping[str, Any], limit: int = 5) -> str:
        def score(row: ManifestRow) -> int:
            return sum(row.keys[k] == asked[k] for k in self.key_columns)

        nearest = sorted(self.rows, key=lambda r: (-score(r), r.line))[:limit]
        wanted = ", ".join(f"{k}={v!r}" for k, v in asked.items())
        if not nearest:
            return f"{self.path}: no kernel for {wanted}: the manifest has no rows"
        lines = "\n".join(
            f"  {score(r)}/{len(self.key_columns)} keys match: {r.describe()}" for r in nearest
        )
        return f"{self.path}: no kernel for {wanted}; nearest of {len(self.rows)} rows:\n{lines}"

    def load_kernel(self, *, device=None, signature: Sequence[str] | None = None, **keys: Any) -> "Kernel":
        """Select a row and return its kernel, loaded on ``device`` (default: current)."""
        row = self.select(**keys)
        code = load_code_object(self.directory / row.co_name, device=device)
        return code.kernel(row.knl_name, signature=signature)


def family_code_object_dir(package: str, arch: str, family: str) -> Path:
    """Where a family's code objects live: ``$AITER_HSA_DIR/<arch>/<family>`` when that
    environment variable is set (a source checkout's ``hsa/``), else the copy its wheel ships
    as ``<package>/hsa/<arch>/<family>`` (found through importlib.resources)."""
    root = os.environ.get("AITER_HSA_DIR")
    if root:
        return Path(root) / arch / family
    resource = importlib.resources.files(package).joinpath("hsa", arch, family)
    # Wheels install as plain directories, so the resource is a real path.
    return Path(str(resource))


def family_manifest(package: str, arch: str, family: str) -> Manifest:
    return Manifest.from_file(family_code_object_dir(package, arch, family) / MANIFEST_NAME)


def code_object_arch_dirs(capability: tuple[int, int]) -> list[str]:
    """Arch directory names whose code objects can run on ``capability``, best first."""
    major, minor = capability
    names = [f"sm_{major}{minor}a", f"sm_{major}{minor}f", f"sm_{major}{minor}"]
    # Plain and family targets of an older minor of the same major also run.
    for older in range(minor - 1, -1, -1):
        names += [f"sm_{major}{older}f", f"sm_{major}{older}"]
    return names


# --------------------------------------------------------------------------------------------
# cubin arch
# --------------------------------------------------------------------------------------------

_EM_CUDA = 190
_EM_AMDGPU = 224


@dataclass(frozen=True)
class CubinTarget:
    major: int
    minor: int
    suffix: str  # "" | "a" (arch-specific: exactly this chip) | "f" (family)

    @property
    def name(self) -> str:
        return f"sm_{self.major}{self.minor}{self.suffix}"

    def runs_on(self, capability: tuple[int, int]) -> bool:
        major, minor = capability
        if self.suffix == "a":
            return (major, minor) == (self.major, self.minor)
        # SASS runs on later minors of the same major (sm_80 on sm_86); family targets too.
        return major == self.major and minor >= self.minor


def cubin_target(image: bytes) -> CubinTarget | None:
    """The SM target of a cubin (ELF) image; None when it is not a CUDA ELF (PTX, fatbin).

    The arch-specific/family suffix is read from the toolkit note (``.note.nv.tkinfo``,
    which records ptxas' ``-arch sm_90a``), the SM number from it or from ``e_flags``.
    """
    if len(image) < 64 or image[:4] != b"\x7fELF":
        return None
    if image[4] != 2:  # ELFCLASS64; device code is always 64-bit
        return None
    machine = struct.unpack_from("<H", image, 18)[0]
    if machine == _EM_AMDGPU:
        raise LoaderError("this is an AMD GPU code object (hsaco), not a CUDA cubin")
    if machine != _EM_CUDA:
        return None
    m = re.search(rb"-arch sm_(\d+)([af]?)\b", image)
    if m:
        digits, suffix = m.group(1).decode(), m.group(2).decode()
        return CubinTarget(int(digits[:-1]), int(digits[-1]), suffix)
    flags = struct.unpack_from("<I", image, 48)[0]
    abi_version = image[8]
    # CUDA 13 (ELF ABI v8) moved the SM number to bits 8..15; older toolkits keep it in 0..7.
    sm = (flags >> 8) & 0xFF if abi_version >= 8 else flags & 0xFF
    if sm < 10:
        return None
    return CubinTarget(sm // 10, sm % 10, "")


# --------------------------------------------------------------------------------------------
# availability and the driver
# --------------------------------------------------------------------------------------------


def _import_driver():
    """cuda.bindings.driver (cuda-python >= 12.6), else the old ``cuda.cuda`` module."""
    try:
        from cuda.bindings import driver  # type: ignore[import-not-found]

        return driver
    except ImportError:
        pass
    try:
        from cuda import cuda as driver  # type: ignore[import-not-found,attr-defined]

        return driver
    except ImportError:
        return None


def _unavailable_reason() -> str | None:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return "torch is not installed"
    if getattr(torch.version, "hip", None):
        return "ROCm build of torch: the asm loader loads CUDA cubins only (hsaco loading is not implemented)"
    if torch.version.cuda is None:
        return "torch is built without CUDA"
    if _import_driver() is None:
        return "cuda-bindings is not installed (pip install 'aiter-core[asm]')"
    if not torch.cuda.is_available():
        return "no CUDA device is visible"
    return None


def available() -> str | None:
    """None when cubins can be loaded and launched here, else the reason they cannot."""
    return _unavailable_reason()


def _check(result, call: str, driver=None):
    """Unpack a cuda-bindings result tuple, raising with the driver's error name on failure."""
    if isinstance(result, tuple):
        err, rest = result[0], result[1:]
    else:
        err, rest = result, ()
    if int(err) != 0:
        name, description = _error_strings(driver or _driver(), err)
        raise CudaDriverError(call, name, description)
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def _error_strings(driver, err) -> tuple[str, str]:
    name, description = f"CUresult {int(err)}", "no description"
    try:
        e, text = driver.cuGetErrorName(err)
        if int(e) == 0 and text:
            name = text.decode() if isinstance(text, bytes) else str(text)
        e, text = driver.cuGetErrorString(err)
        if int(e) == 0 and text:
            description = text.decode() if isinstance(text, bytes) else str(text)
    except Exception:  # the error path must not mask the original failure
        pass
    return name, description


_DRIVER = None


def _driver():
    global _DRIVER
    if _DRIVER is None:
        reason = _unavailable_reason()
        if reason is not None:
            raise LoaderError(f"the asm loader is unavailable: {reason}")
        driver = _import_driver()
        try:
            result = driver.cuInit(0)
        except Exception as e:  # e.g. cuda-bindings cannot find libcuda
            raise LoaderError(f"cannot initialise the CUDA driver through cuda-bindings: {e}") from e
        _check(result, "cuInit", driver)
        _DRIVER = driver
    return _DRIVER


def _device_index(device) -> int:
    import torch

    if device is None:
        return torch.cuda.current_device()
    if isinstance(device, int):
        return device
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"device: expected a CUDA device, got {device}")
    return device.index if device.index is not None else torch.cuda.current_device()


class _PrimaryContext:
    """The device's primary context (the one torch uses), made current around driver calls."""

    _contexts: dict[int, Any] = {}
    _lock = threading.Lock()

    def __init__(self, index: int):
        driver = _driver()
        with self._lock:
            ctx = self._contexts.get(index)
            if ctx is None:
                dev = _check(driver.cuDeviceGet(index), "cuDeviceGet")
                # Retained for the life of the process: cached modules live in it.
                ctx = _check(driver.cuDevicePrimaryCtxRetain(dev), "cuDevicePrimaryCtxRetain")
                self._contexts[index] = ctx
        self.ctx = ctx

    def __enter__(self):
        _check(_driver().cuCtxPushCurrent(self.ctx), "cuCtxPushCurrent")
        return self

    def __exit__(self, *exc):
        _check(_driver().cuCtxPopCurrent(), "cuCtxPopCurrent")
        return False


# --------------------------------------------------------------------------------------------
# arguments
# --------------------------------------------------------------------------------------------

_SCALAR_CTYPES = {
    "i32": ctypes.c_int32,
    "u32": ctypes.c_uint32,
    "i64": ctypes.c_int64,
    "u64": ctypes.c_uint64,
    "f32": ctypes.c_float,
    "f64": ctypes.c_double,
    "ptr": ctypes.c_uint64,  # a raw device address (0 for a null pointer)
}
_INT_RANGES = {
    "i32": (-(2**31), 2**31 - 1),
    "u32": (0, 2**32 - 1),
    "i64": (-(2**63), 2**63 - 1),
    "u64": (0, 2**64 - 1),
    "ptr": (0, 2**64 - 1),
}
ARG_TYPES = ("tensor",) + tuple(_SCALAR_CTYPES)


@dataclass(frozen=True)
class TypedArg:
    """A scalar kernel argument with its C type spelled out (no int/float guessing)."""

    kind: str
    value: int | float

    def __post_init__(self):
        if self.kind not in _SCALAR_CTYPES:
            raise ValueError(f"kind: expected one of {sorted(_SCALAR_CTYPES)}, got {self.kind!r}")


def i32(v: int) -> TypedArg:
    return TypedArg("i32", v)


def u32(v: int) -> TypedArg:
    return TypedArg("u32", v)


def i64(v: int) -> TypedArg:
    return TypedArg("i64", v)


def u64(v: int) -> TypedArg:
    return TypedArg("u64", v)


def f32(v: float) -> TypedArg:
    return TypedArg("f32", v)


def f64(v: float) -> TypedArg:
    return TypedArg("f64", v)


def ptr(address: int) -> TypedArg:
    return TypedArg("ptr", address)


def _scalar(kind: str, value: Any, where: str):
    if kind in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{where}: expected an int for {kind}, got {type(value).__name__}")
        lo, hi = _INT_RANGES[kind]
        if not lo <= value <= hi:
            raise ValueError(f"{where}: {value} does not fit {kind} (range {lo}..{hi})")
        return _SCALAR_CTYPES[kind](value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: expected a float for {kind}, got {type(value).__name__}")
    return _SCALAR_CTYPES[kind](float(value))


def pack_args(args: Sequence[Any], signature: Sequence[str] | None, device_index: int) -> list:
    """Turn launch arguments into ctypes values, one per kernel parameter.

    Without a signature every argument must say its type: a CUDA tensor (passed as its device
    pointer) or a TypedArg (``i32(n)``, ``f32(x)`` ...). With a signature (e.g.
    ``("tensor", "tensor", "f32", "i64")``) bare Python numbers are converted to the declared
    type, and typed arguments must agree with it.
    """
    import torch

    if signature is not None and len(signature) != len(args):
        raise ValueError(f"args: the kernel takes {len(signature)} arguments {tuple(signature)}, got {len(args)}")
    packed = []
    for i, arg in enumerate(args):
        where = f"args[{i}]"
        declared = signature[i] if signature is not None else None
        if isinstance(arg, torch.Tensor):
            if declared not in (None, "tensor", "ptr"):
                raise TypeError(f"{where}: the signature declares {declared}, got a tensor")
            if arg.device.type != "cuda" or arg.device.index != device_index:
                raise ValueError(f"{where}: expected a tensor on cuda:{device_index}, got one on {arg.device}")
            packed.append(ctypes.c_uint64(arg.data_ptr()))
        elif isinstance(arg, TypedArg):
            if declared not in (None, arg.kind) and not (declared == "tensor" and arg.kind == "ptr"):
                raise TypeError(f"{where}: the signature declares {declared}, got {arg.kind}")
            packed.append(_scalar(arg.kind, arg.value, where))
        elif declared is None:
            raise TypeError(
                f"{where}: a bare {type(arg).__name__} has no C type; pass a CUDA tensor or wrap the "
                "value as i32()/i64()/u32()/u64()/f32()/f64()/ptr(), or give the kernel a signature"
            )
        elif declared == "tensor":
            raise TypeError(f"{where}: expected a CUDA tensor, got {type(arg).__name__}")
        else:
            packed.append(_scalar(declared, arg, where))
    return packed


def _as_dim3(value, what: str) -> tuple[int, int, int]:
    dims = (value,) if isinstance(value, int) else tuple(value)
    if not 1 <= len(dims) <= 3 or any(isinstance(d, bool) or not isinstance(d, int) for d in dims):
        raise TypeError(f"{what}: expected an int or 1-3 ints, got {value!r}")
    if any(d < 1 for d in dims):
        raise ValueError(f"{what}: every dimension must be >= 1, got {value!r}")
    return tuple(dims) + (1,) * (3 - len(dims))  # type: ignore[return-value]


# --------------------------------------------------------------------------------------------
# code objects and kernels
# --------------------------------------------------------------------------------------------


class CodeObject:
    """A cubin loaded into one device's primary context. Build with ``load_code_object``."""

    def __init__(self, path: Path, device_index: int, target: CubinTarget | None, module, context):
        self.path = path
        self.device_index = device_index
        self.target = target
        self._module = module
        self._context = context
        self._kernels: dict[str, Any] = {}
        self._lock = threading.Lock()

    def kernel(self, name: str, signature: Sequence[str] | None = None) -> "Kernel":
        if signature is not None:
            bad = [s for s in signature if s not in ARG_TYPES]
            if bad:
                raise ValueError(f"signature: unknown argument types {bad}; expected each of {ARG_TYPES}")
        with self._lock:
            function = self._kernels.get(name)
            if function is None:
                driver = _driver()
                with self._context:
                    try:
                        function = _check(driver.cuModuleGetFunction(self._module, name.encode()), "cuModuleGetFunction")
                    except CudaDriverError as e:
                        if e.name == "CUDA_ERROR_NOT_FOUND":
                            raise LookupError(f"{self.path}: no kernel named {name!r} in this code object") from e
                        raise
                self._kernels[name] = function
        return Kernel(self, name, function, tuple(signature) if signature is not None else None)

    def __repr__(self) -> str:
        target = self.target.name if self.target else "unknown arch"
        return f"CodeObject({str(self.path)!r}, cuda:{self.device_index}, {target})"


class Kernel:
    def __init__(self, code: CodeObject, name: str, function, signature: tuple[str, ...] | None):
        self.code = code
        self.name = name
        self.signature = signature
        self._function = function
        self._smem_opt_in = _DEFAULT_DYNAMIC_SMEM_LIMIT

    def launch(self, grid, block, args: Sequence[Any], shared_mem: int = 0, stream=None) -> None:
        """Launch on ``stream`` (default: torch's current stream of the kernel's device)."""
        import torch

        grid3 = _as_dim3(grid, "grid")
        block3 = _as_dim3(block, "block")
        if isinstance(shared_mem, bool) or not isinstance(shared_mem, int) or shared_mem < 0:
            raise ValueError(f"shared_mem: expected a non-negative int of bytes, got {shared_mem!r}")
        packed = pack_args(args, self.signature, self.code.device_index)
        pointers = (ctypes.c_void_p * max(len(packed), 1))(*[ctypes.addressof(v) for v in packed])
        if stream is None:
            handle = torch.cuda.current_stream(self.code.device_index).cuda_stream
        elif isinstance(stream, torch.cuda.Stream):
            handle = stream.cuda_stream
        elif isinstance(stream, int):
            handle = stream
        else:
            raise TypeError(f"stream: expected None, a torch.cuda.Stream or a raw handle, got {type(stream).__name__}")
        driver = _driver()
        with self.code._context:
            if shared_mem > self._smem_opt_in:
                attr = driver.CUfunction_attribute.CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES
                _check(driver.cuFuncSetAttribute(self._function, attr, shared_mem), "cuFuncSetAttribute")
                self._smem_opt_in = shared_mem
            _check(
                driver.cuLaunchKernel(
                    self._function,
                    *grid3,
                    *block3,
                    shared_mem,
                    driver.CUstream(handle),
                    ctypes.addressof(pointers),
                    0,
                ),
                f"cuLaunchKernel({self.name})",
            )

    __call__ = launch

    def __repr__(self) -> str:
        return f"Kernel({self.name!r} from {self.code!r})"


_MODULES: dict[tuple[str, int], CodeObject] = {}
_MODULES_LOCK = threading.Lock()


def load_code_object(path: str | os.PathLike, device=None) -> CodeObject:
    """Load a cubin on ``device`` (default: torch's current device), cached per (file, device).

    The cubin's arch is checked against the device here, not at first launch.
    """
    reason = available()
    if reason is not None:
        raise LoaderError(f"cannot load {path}: the asm loader is unavailable: {reason}")
    import torch

    index = _device_index(device)
    real = Path(path).resolve()
    cache_key = (str(real), index)
    with _MODULES_LOCK:
        cached = _MODULES.get(cache_key)
        if cached is not None:
            return cached
        if not real.is_file():
            raise FileNotFoundError(f"code object not found: {path}")
        image = real.read_bytes()
        target = cubin_target(image)
        capability = torch.cuda.get_device_capability(index)
        device_name = torch.cuda.get_device_name(index)
        if target is not None and not target.runs_on(capability):
            raise LoaderError(
                f"{path} is built for {target.name}, which cannot run on cuda:{index} "
                f"({device_name}, sm_{capability[0]}{capability[1]}); use code objects from "
                f"hsa/{code_object_arch_dirs(capability)[0]}/ or another backend"
            )
        driver = _driver()
        context = _PrimaryContext(index)
        buffer = ctypes.create_string_buffer(image, len(image))
        with context:
            try:
                module = _check(driver.cuModuleLoadData(ctypes.addressof(buffer)), "cuModuleLoadData")
            except CudaDriverError as e:
                if e.name in ("CUDA_ERROR_NO_BINARY_FOR_GPU", "CUDA_ERROR_INVALID_IMAGE", "CUDA_ERROR_INVALID_PTX"):
                    raise LoaderError(
                        f"{path}: the driver refused the code object for cuda:{index} ({device_name}, "
                        f"sm_{capability[0]}{capability[1]}): {e}"
                    ) from e
                raise
        code = CodeObject(real, index, target, module, context)
        _MODULES[cache_key] = code
        return code


def loaded_code_objects() -> list[CodeObject]:
    """What the module cache holds (for diagnostics and tests)."""
    with _MODULES_LOCK:
        return list(_MODULES.values())
