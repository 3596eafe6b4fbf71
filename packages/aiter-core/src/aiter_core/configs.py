"""Launch configs: one override syntax for every kernel of every family.

Each family chooses its tile configs in code, in its ``triton/launch.py``, as a small immutable
record (a NamedTuple: ``BLOCK_N``, ``num_warps``, ``num_stages``, ...) computed from the Call key
and cached per key. :func:`override` lets a user or a tuning sweep replace any of its fields for
one op through the environment, with one syntax everywhere::

    AITER_PAGED_ATTENTION_DECODE_CONFIG="BLOCK_N=32,num_warps=8,num_stages=2"

(``AITER_<OP>_CONFIG``, the op name in upper case; values are integers.) Unknown names are a
``ValueError`` that lists the known ones.

This replaces the JSON tuned-config store the design card describes: no family had tuned
buckets to put in it, every family's choice depends on more than bucketed shapes (head dim, KV
element size, query rows per tile, occupancy), and four families had grown four override
syntaxes around it. When a family gains real tuning data, the store can return as the source of
the defaults behind this same override.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, TypeVar

from . import env

T = TypeVar("T")


def variable(op: str) -> str:
    """The environment variable that overrides ``op``'s launch config."""
    return f"AITER_{op.upper()}_CONFIG"


@lru_cache(maxsize=256)
def parse(name: str, spec: str) -> tuple[tuple[str, int], ...]:
    """``"A=1,B=2"`` -> ``(("A", 1), ("B", 2))``; ``name`` is the variable, for the error."""
    fields = []
    for item in spec.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        key = key.strip()
        try:
            number = int(value)
        except ValueError:
            number = None
        if not sep or not key or number is None:
            raise ValueError(f"{name} must be 'NAME=INT,...', got {spec!r}")
        fields.append((key, number))
    return tuple(fields)


def override(op: str, default: T) -> T:
    """``default`` (a NamedTuple of launch parameters) with the fields that ``AITER_<OP>_CONFIG``
    names replaced; ``default`` itself when the variable is unset or empty."""
    name = variable(op)
    spec = env.get(name)
    if not spec or not spec.strip():
        return default
    fields = dict(parse(name, spec))
    known: tuple[str, ...] = getattr(default, "_fields", ())
    unknown = sorted(set(fields) - set(known))
    if unknown:
        raise ValueError(f"{name}: unknown field(s) {', '.join(unknown)}; known: {', '.join(known)}")
    replace: Any = getattr(default, "_replace")
    return replace(**fields)


__all__ = ["override", "parse", "variable"]
