"""Tuned-config store: per arch and op, a JSON file of bucketed kernel configs.

Layout: ``<dir>/<arch>/<op>.json``, for example ``sm_90/mha_fwd.json``::

    {
      "schema_version": 1,
      "op": "mha_fwd", "arch": "sm_90",
      "triton_version": "3.6.0", "torch_version": "2.11.0+cu130",
      "device_name": "NVIDIA H100 80GB HBM3",
      "tuned_at": "2026-11-24T06:00:00+00:00",
      "command": "python -m aiter_mha.tune --op mha_fwd",
      "buckets": {
        "DEFAULT": {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8, "num_stages": 2},
        "causal=true,dtype=bf16,head_dim=128,seqlen_q=4096": {"BLOCK_M": 128, ...}
      }
    }

Bucket keys
    A key is ``name=value`` pairs joined by ``,`` in name order (:func:`make_key` writes the
    canonical form, :func:`parse_key` reads it). A value that reads as a number (``128``,
    ``-1``, ``0.5``) is a *numeric* dim; anything else (``bf16``, ``true``) is *categorical*.
    Python ``bool`` becomes ``true``/``false`` and a ``torch.dtype`` its short name (``bf16``,
    ``fp16``, ``fp32``, ``fp8e4m3fn`` ...), so callers can pass their arguments directly.

Nearest bucket (:func:`lookup`)
    1. A bucket is eligible when every dim it names is also given to ``lookup`` and its
       categorical dims are equal to the given ones. Dims given to ``lookup`` that a bucket
       does not name do not matter to that bucket (wildcards).
    2. Among eligible buckets, the smallest distance wins: the sum over the bucket's numeric
       dims of ``|log2(max(given, 1) / max(bucket, 1))|`` (values below 1 count as 1). So 4096
       is as far from 2048 as from 8192.
    3. Ties go to the bucket naming more dims (more specific), then to the smaller key in
       canonical order, so the answer never depends on file order.
    4. No eligible bucket: ``DEFAULT``. Every file must have one.

Search path (the first file found wins; files are not merged)
    1. each directory in ``AITER_TUNED_CONFIG_DIR`` (an ``os.pathsep`` separated list),
    2. ``<package>/configs`` of the family passed as ``package=`` (through importlib.resources),
    3. ``aiter_core/configs``.

A missing file is not an error: :func:`lookup` returns ``None`` and the kernel falls back to
its built-in default. A file that exists but is malformed raises :class:`ConfigFileError`.
Parsed files are cached by path, modification time and size. A file tuned with another Triton
version is used anyway, with one warning per file.
"""

from __future__ import annotations

import datetime as _dt
import importlib.resources
import json
import math
import numbers
import os
import re
import tempfile
import threading
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

__all__ = [
    "SCHEMA_VERSION",
    "ENV_DIRS",
    "ConfigFileError",
    "TunedConfigFile",
    "make_key",
    "parse_key",
    "search_dirs",
    "find_file",
    "load",
    "load_file",
    "lookup",
    "save",
    "clear_cache",
]

SCHEMA_VERSION = 1
ENV_DIRS = "AITER_TUNED_CONFIG_DIR"
DEFAULT_KEY = "DEFAULT"
_REQUIRED_FIELDS = ("schema_version", "op", "arch", "triton_version", "buckets")
_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# op and arch become file and directory names
_PATH_PART_RE = re.compile(r"^[A-Za-z0-9_.\-]+$")


class ConfigFileError(ValueError):
    """A tuned-config file exists but is malformed (bad JSON, missing fields, bad keys)."""


# ----------------------------------------------------------------------------- keys


def _format_value(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, numbers.Integral):  # int, numpy integers
        return str(int(value))
    if isinstance(value, numbers.Real):
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"config key dim {name!r} must be finite, got {value!r}")
        return repr(value)
    try:
        import torch

        if isinstance(value, torch.dtype):
            return _dtype_name(value)
    except ImportError:  # pragma: no cover - torch is a dependency
        pass
    if isinstance(value, str):
        if not value or any(c in value for c in ",= "):
            raise ValueError(f"config key dim {name!r} has an unusable value {value!r} "
                             "(empty, or contains ',', '=' or a space)")
        return value
    raise TypeError(f"config key dim {name!r} must be int, float, bool, str or torch.dtype, "
                    f"got {type(value).__name__}")


def _dtype_name(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
             "half": "fp16", "float": "fp32"}
    if name in short:
        return short[name]
    if name.startswith("float8_"):
        return "fp8" + name[len("float8_"):]
    return name


def _parse_value(text: str) -> int | float | str:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        return text
    return number if math.isfinite(number) else text


def make_key(**dims: Any) -> str:
    """Canonical bucket key for ``dims``: ``name=value`` pairs sorted by name, joined by ','."""
    if not dims:
        raise ValueError("make_key needs at least one dim; the catch-all bucket is 'DEFAULT'")
    parts = []
    for name in sorted(dims):
        if not _NAME_RE.match(name):
            raise ValueError(f"config key dim name must be an identifier, got {name!r}")
        parts.append(f"{name}={_format_value(name, dims[name])}")
    return ",".join(parts)


def parse_key(key: str) -> dict[str, int | float | str]:
    """Inverse of :func:`make_key`: ``"head_dim=128,dtype=bf16"`` -> ``{"head_dim": 128, "dtype": "bf16"}``."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"config bucket key must be a non-empty string, got {key!r}")
    dims: dict[str, int | float | str] = {}
    for part in key.split(","):
        name, sep, text = part.strip().partition("=")
        name = name.strip()
        text = text.strip()
        if not sep or not _NAME_RE.match(name) or not text:
            raise ValueError(f"config bucket key {key!r}: expected 'name=value' pairs separated by ',', "
                             f"got the part {part!r}")
        if name in dims:
            raise ValueError(f"config bucket key {key!r} names the dim {name!r} twice")
        dims[name] = _parse_value(text)
    return dims


def _normalise_query(dims: Mapping[str, Any]) -> dict[str, int | float | str]:
    return {name: _parse_value(_format_value(name, value)) for name, value in dims.items()}


def _is_numeric(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _distance(bucket: Mapping[str, Any], query: Mapping[str, Any]) -> float | None:
    """Distance of a bucket from the query, or None when the bucket is not eligible."""
    total = 0.0
    for name, want in bucket.items():
        if name not in query:
            return None
        got = query[name]
        if _is_numeric(want) and _is_numeric(got):
            total += abs(math.log2(max(float(got), 1.0)) - math.log2(max(float(want), 1.0)))
        elif _is_numeric(want) or _is_numeric(got):
            return None  # a number never matches a category
        elif want != got:
            return None
    return total


# ----------------------------------------------------------------------------- files


@dataclass
class TunedConfigFile:
    """One parsed tuned-config file."""

    path: Path
    op: str
    arch: str
    triton_version: str
    torch_version: str | None
    device_name: str | None
    tuned_at: str | None
    command: str | None
    buckets: dict[str, dict[str, Any]]
    schema_version: int = SCHEMA_VERSION
    _parsed_keys: list[tuple[str, dict[str, Any]]] = field(default_factory=list, repr=False)

    def nearest_key(self, **dims: Any) -> str:
        """The bucket key :meth:`lookup` picks for ``dims`` (``'DEFAULT'`` when none is eligible)."""
        query = _normalise_query(dims)
        best: tuple[float, int, str] | None = None
        for key, bucket_dims in self._parsed_keys:
            distance = _distance(bucket_dims, query)
            if distance is None:
                continue
            rank = (distance, -len(bucket_dims), key)
            if best is None or rank < best:
                best = rank
        return DEFAULT_KEY if best is None else best[2]

    def lookup(self, **dims: Any) -> dict[str, Any]:
        """A copy of the config of the nearest bucket (see the module doc)."""
        return dict(self.buckets[self.nearest_key(**dims)])


def _validate(data: Any, path: Path) -> TunedConfigFile:
    def bad(message: str) -> ConfigFileError:
        return ConfigFileError(f"tuned-config file {path}: {message}")

    if not isinstance(data, dict):
        raise bad(f"top level must be a JSON object, got {type(data).__name__}")
    missing = [name for name in _REQUIRED_FIELDS if name not in data]
    if missing:
        raise bad(f"missing field(s) {', '.join(missing)}")
    if data["schema_version"] != SCHEMA_VERSION:
        raise bad(f"schema_version must be {SCHEMA_VERSION}, got {data['schema_version']!r}")
    for name in ("op", "arch", "triton_version"):
        if not isinstance(data[name], str) or not data[name]:
            raise bad(f"{name} must be a non-empty string, got {data[name]!r}")
    buckets = data["buckets"]
    if not isinstance(buckets, dict):
        raise bad(f"buckets must be an object, got {type(buckets).__name__}")
    if DEFAULT_KEY not in buckets:
        raise bad("buckets has no 'DEFAULT' entry")
    parsed = []
    for key, config in buckets.items():
        if not isinstance(config, dict):
            raise bad(f"bucket {key!r} must map to an object, got {type(config).__name__}")
        if key == DEFAULT_KEY:
            continue
        try:
            dims = parse_key(key)
        except ValueError as err:
            raise bad(str(err)) from None
        parsed.append((make_key(**dims), dims))
    parsed.sort(key=lambda item: item[0])
    # re-key the buckets by canonical form so nearest_key's answer indexes them
    canonical = {DEFAULT_KEY: buckets[DEFAULT_KEY]}
    for key, config in buckets.items():
        if key != DEFAULT_KEY:
            ckey = make_key(**parse_key(key))
            if ckey in canonical:
                raise bad(f"bucket {key!r} duplicates {ckey!r}")
            canonical[ckey] = config
    if path.parent.name != data["arch"] or path.stem != data["op"]:
        raise bad(f"file says op {data['op']!r} arch {data['arch']!r} but lies at <dir>/"
                  f"{path.parent.name}/{path.name} (expected <dir>/{data['arch']}/{data['op']}.json)")
    return TunedConfigFile(
        path=path,
        op=data["op"],
        arch=data["arch"],
        triton_version=data["triton_version"],
        torch_version=data.get("torch_version"),
        device_name=data.get("device_name"),
        tuned_at=data.get("tuned_at"),
        command=data.get("command"),
        buckets=canonical,
        schema_version=data["schema_version"],
        _parsed_keys=parsed,
    )


_cache_lock = threading.Lock()
_file_cache: dict[Path, tuple[tuple[int, int], TunedConfigFile]] = {}
_warned_version: set[Path] = set()


def clear_cache() -> None:
    """Forget parsed files and version warnings (tests; after rewriting a file in place)."""
    with _cache_lock:
        _file_cache.clear()
        _warned_version.clear()


def _running_triton_version() -> str | None:
    # metadata, not `import triton`: looking up a config must not import Triton
    from importlib import metadata

    for dist in ("triton", "pytorch-triton", "pytorch-triton-rocm", "triton-rocm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return None


def _release(version: str) -> str:
    return version.split("+", 1)[0].strip()


def load_file(path: str | os.PathLike) -> TunedConfigFile:
    """Parse and validate one file (cached). Raises FileNotFoundError or ConfigFileError."""
    path = Path(path).resolve()
    stat = path.stat()
    stamp = (stat.st_mtime_ns, stat.st_size)
    with _cache_lock:
        hit = _file_cache.get(path)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigFileError(f"tuned-config file {path}: not valid JSON ({err})") from None
    parsed = _validate(data, path)
    running = _running_triton_version()
    with _cache_lock:
        _file_cache[path] = (stamp, parsed)
        warn = (running is not None and _release(running) != _release(parsed.triton_version)
                and path not in _warned_version)
        if warn:
            _warned_version.add(path)
    if warn:
        warnings.warn(
            f"tuned configs in {path} were tuned with Triton {parsed.triton_version} on "
            f"{parsed.device_name or 'an unnamed device'}, this is Triton {running}; they are used "
            "anyway but may no longer be the fastest (re-tune to refresh them)",
            RuntimeWarning,
            stacklevel=3,
        )
    return parsed


def _package_dir(package: str) -> Path | None:
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise ValueError(f"package={package!r}: no importable package of that name") from None
    candidate = root / "configs"
    # importlib.resources gives a Path for packages installed as directories (always so for
    # our wheels and editable installs); zipped packages are not supported here
    return Path(str(candidate)) if candidate.is_dir() else None


def search_dirs(package: str | None = None) -> list[Path]:
    """Directories searched, in order (see the module doc)."""
    dirs = [Path(entry) for entry in os.environ.get(ENV_DIRS, "").split(os.pathsep) if entry.strip()]
    if package is not None and package != "aiter_core":
        family_dir = _package_dir(package)
        if family_dir is not None:
            dirs.append(family_dir)
    core_dir = _package_dir("aiter_core")
    if core_dir is not None:
        dirs.append(core_dir)
    return dirs


def _check_part(what: str, value: Any) -> str:
    if not isinstance(value, str) or not _PATH_PART_RE.match(value) or value in (".", ".."):
        raise ValueError(f"{what} must be a name made of letters, digits, '_', '-', '.', got {value!r}")
    return value


def _current_arch() -> str:
    from aiter_core.arch import get_arch_info

    return get_arch_info().name


def find_file(op: str, arch: str | None = None, *, package: str | None = None) -> Path | None:
    """Path of the file that serves ``op`` on ``arch`` (default: this machine), or None."""
    _check_part("op", op)
    arch = _check_part("arch", arch if arch is not None else _current_arch())
    for directory in search_dirs(package):
        candidate = directory / arch / f"{op}.json"
        if candidate.is_file():
            return candidate
    return None


def load(op: str, arch: str | None = None, *, package: str | None = None) -> TunedConfigFile | None:
    """The parsed file for ``op`` on ``arch`` from the search path, or None when there is none."""
    path = find_file(op, arch, package=package)
    return None if path is None else load_file(path)


def lookup(op: str, arch: str | None = None, *, package: str | None = None,
           **dims: Any) -> dict[str, Any] | None:
    """Config of the bucket nearest to ``dims`` for ``op`` on ``arch`` (default: this machine).

    Returns None when no file exists for (arch, op) anywhere on the search path, so the caller
    uses its built-in default; ``DEFAULT`` when the file has no eligible bucket.
    """
    tuned = load(op, arch, package=package)
    return None if tuned is None else tuned.lookup(**dims)


# ----------------------------------------------------------------------------- writing


def save(
    op: str,
    buckets: Mapping[str, Mapping[str, Any]],
    *,
    directory: str | os.PathLike,
    arch: str | None = None,
    device_name: str | None = None,
    command: str | None = None,
    triton_version: str | None = None,
    torch_version: str | None = None,
    tuned_at: str | None = None,
) -> Path:
    """Write ``<directory>/<arch>/<op>.json`` atomically and return its path.

    Bucket keys may be given in any order of dims; they are stored in canonical form. Stamps
    the running Triton and torch versions, the device name, the UTC time and the command line
    unless they are given.
    """
    _check_part("op", op)
    arch = _check_part("arch", arch if arch is not None else _current_arch())
    if not isinstance(buckets, Mapping):
        raise TypeError(f"buckets must be a mapping of key -> config, got {type(buckets).__name__}")
    if DEFAULT_KEY not in buckets:
        raise ValueError("buckets must contain a 'DEFAULT' entry (the config used when no bucket fits)")
    stored: dict[str, dict[str, Any]] = {}
    for key, config in buckets.items():
        if not isinstance(config, Mapping):
            raise TypeError(f"bucket {key!r} must map to a dict of config values, got {type(config).__name__}")
        ckey = key if key == DEFAULT_KEY else make_key(**parse_key(key))
        if ckey in stored:
            raise ValueError(f"bucket {key!r} duplicates {ckey!r}")
        stored[ckey] = dict(config)
    ordered = {DEFAULT_KEY: stored.pop(DEFAULT_KEY)}
    ordered.update(sorted(stored.items()))

    from aiter_core import bench as _bench  # lazily: bench pulls in torch

    env = _bench.environment_info(include_families=False)
    data = {
        "schema_version": SCHEMA_VERSION,
        "op": op,
        "arch": arch,
        "triton_version": triton_version or env["triton_version"] or "unknown",
        "torch_version": torch_version or env["torch_version"],
        "device_name": device_name or env["device_name"],
        "tuned_at": tuned_at or _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": command if command is not None else _bench.command_line(),
        "buckets": ordered,
    }
    target_dir = Path(directory) / arch
    target_dir.mkdir(parents=True, exist_ok=True)
    target = target_dir / f"{op}.json"
    text = json.dumps(data, indent=2, sort_keys=False) + "\n"
    # validate what we are about to write with the reader's rules
    _validate(json.loads(text), target)
    fd, tmp = tempfile.mkstemp(prefix=f".{op}.", suffix=".json.tmp", dir=target_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target
