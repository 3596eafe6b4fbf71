"""Every ``AITER_*`` environment variable, in one list, and the fast way to read them.

`aiter info` prints the ones set in the environment. A family that reads a new variable adds it
to :data:`VARIABLES` (a test checks that every ``AITER_`` name in the sources is listed here).

Reads on the hot path of an op (the backend override, say) go through :func:`raw_environ`, the
process environment as a plain dict: ``os.environ.get`` encodes the name on every call and costs
microseconds per op call on a slow host; a dict lookup costs tens of nanoseconds and still sees
every change made through ``os.environ`` (which updates that dict).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Variable:
    name: str  # "AITER_JIT_DIR"; "<OP>" stands for an op name in upper case
    meaning: str
    owner: str = "core"  # the package that reads it


VARIABLES: tuple[Variable, ...] = (
    Variable("AITER_<OP>_BACKEND", "force a backend of one op (triton, cpp, asm, reference, ...); an explicit "
             "backend= argument wins over it"),
    Variable("AITER_DISABLE_BACKENDS", "comma list of 'op.backend' or 'backend' removed from automatic selection"),
    Variable("AITER_<OP>_CONFIG", "override a kernel's launch config: 'NAME=VALUE,...' with the names of that op's "
             "config (BLOCK_N=64,num_warps=4,...); aiter_core.configs parses it"),
    Variable("AITER_ARCH", "pretend to be this arch (sm_90, gfx942, ...) instead of asking the device"),
    Variable("AITER_NUM_CU", "pretend the device has this many SMs / CUs"),
    Variable("AITER_JIT_DIR", "where aiter_core.jit builds and caches C++ extensions"),
    Variable("AITER_JIT_DISABLE", "1: never build a C++ extension (the cpp backends report unavailable)"),
    Variable("AITER_HSA_DIR", "an extra folder of asm code objects (manifest.csv + cubins) searched first"),
    Variable("AITER_COMPILE_NOTICE_S", "seconds a first-call kernel compile may take before it is logged "
             "(default 1.0; 0 logs every compile)"),
    Variable("AITER_PA_NUM_PARTITIONS", "force the split-K partition count of paged decode", "aiter-pa"),
    Variable("AITER_PA_KV_COMPUTE", "'query' or 'fp16': the 16-bit type 8-bit KV tiles meet the query in "
             "(A/B switch for benchmarks)", "aiter-pa"),
    Variable("AITER_MHA_DQ_ATOMIC", "1: the MHA backward accumulates dQ with atomics instead of a separate pass",
             "aiter-mha"),
    Variable("AITER_MHA_COMPILE_FULL", "1: the MHA compile tier builds every config, not a sample", "aiter-mha"),
    Variable("AITER_PA_COMPILE_FULL", "1: the pa compile tier builds every head dim x dtype x form, not a sample",
             "aiter-pa"),
    Variable("AITER_MLA_COMPILE_FULL", "1: the MLA compile tier builds every head dim x rope x dtype x form, not a "
             "sample", "aiter-mla"),
    Variable("AITER_UNIFIED_COMPILE_FULL", "1: the unified compile tier builds every head dim x dtype x mask x form, "
             "not a sample", "aiter-unified"),
    Variable("AITER_TRITON_DIRECT_LAUNCH", "0: every Triton launch goes through Triton's generic launcher "
             "(aiter_core.triton_utils.launch remembers compiled kernels per exact arguments otherwise)"),
    Variable("AITER_TEST_OFFSET", "tests only: element offset of the far-end KV pool test", "tests"),
)


def raw_environ() -> dict:
    """The process environment as a plain dict (keys and values as the OS stores them)."""
    return _RAW


def environ_key(name: str) -> Any:
    """``name`` as a key of :func:`raw_environ` (bytes on POSIX)."""
    return _encode(name)


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)`` at the cost of a dict lookup."""
    value = _RAW.get(_encode(name))
    if value is None:
        return default
    return _decode(value)


def set_variables() -> dict[str, str]:
    """Every ``AITER_*`` variable set in this process, by name."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("AITER_")}


def triton_cache_dir() -> str:
    """Where Triton caches compiled kernels (``TRITON_CACHE_DIR``, else its default)."""
    explicit = os.environ.get("TRITON_CACHE_DIR")
    if explicit:
        return explicit
    home = os.environ.get("TRITON_HOME") or str(Path.home())
    return str(Path(home) / ".triton" / "cache")


def jit_cache_dir() -> str:
    """Where aiter_core.jit builds C++ extensions."""
    from .jit import jit_dir

    return str(jit_dir())


# os.environ keeps its contents in `_data` (a dict, updated by every os.environ write); platforms
# without it fall back to os.environ itself.
_RAW = getattr(os.environ, "_data", os.environ)
if _RAW is os.environ:  # pragma: no cover - not CPython on POSIX/Windows
    def _encode(name: str) -> Any:
        return name

    def _decode(value: Any) -> str:
        return value
else:
    _encode = os.environ.encodekey
    _decode = os.environ.decodevalue
