"""Turn a Python function into an ``aiter::<name>`` torch custom op.

Every public op of every family goes through :func:`register_op`, so that it has a fake
(meta) implementation and exact ``mutates_args``, runs under ``torch.compile(fullgraph=True)``
and inside CUDA-graph capture, and can carry an autograd formula.

We define ops with ``Library.define`` + ``Library.impl`` rather than ``torch.library.custom_op``:
the result is the same operator, but the call path skips ``custom_op``'s Python wrapper, which
costs several microseconds per call on the decode hot path (vLLM made the same choice). The
implementation is registered for the CPU and CUDA dispatch keys (CUDA covers ROCm builds too);
the function itself decides what runs, usually through the backend registry.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "aiter"
_LIB = torch.library.Library(NAMESPACE, "FRAGMENT")  # kept alive for the life of the process
_DEVICE_KEYS = ("CPU", "CUDA")
_REGISTERED: dict[str, object] = {}


def register_op(
    name: str,
    fn: Callable | None = None,
    *,
    mutates_args: Iterable[str],
    fake: Callable,
    schema: str | None = None,
    autograd: tuple[Callable, Callable] | None = None,
    tags: Iterable[torch.Tag] = (),
):
    """Register ``fn`` as ``torch.ops.aiter.<name>`` and return that op.

    - ``mutates_args``: names of the tensor arguments the op writes in place (exactly those).
    - ``fake``: same signature as ``fn``; returns outputs of the right shape, dtype and device
      without computing anything (used by torch.compile and meta tracing).
    - ``schema``: inferred from ``fn``'s type annotations when not given.
    - ``autograd``: ``(backward, setup_context)`` as for ``torch.library.register_autograd``.

    Usable as a decorator: ``@register_op("foo", mutates_args=(), fake=foo_fake)``.
    Registering the same name again returns the existing op (re-imports are harmless).
    """
    if fn is None:
        return lambda f: register_op(name, f, mutates_args=mutates_args, fake=fake, schema=schema, autograd=autograd, tags=tags)
    if not name.isidentifier():
        raise ValueError(f"op name must be a Python identifier, got {name!r}")
    if name in _REGISTERED:
        return _REGISTERED[name]
    mutates_args = tuple(mutates_args)
    if schema is None:
        schema = torch.library.infer_schema(fn, mutates_args=mutates_args)
    qualname = f"{NAMESPACE}::{name}"
    _LIB.define(name + schema, tags=tuple(tags))
    for key in _DEVICE_KEYS:
        _LIB.impl(name, fn, key)
    torch.library.register_fake(qualname, fake, lib=_LIB)
    if autograd is not None:
        backward, setup_context = autograd
        torch.library.register_autograd(qualname, backward, setup_context=setup_context, lib=_LIB)
    op = getattr(torch.ops.aiter, name)
    _REGISTERED[name] = op
    return op


def registered_ops() -> dict[str, object]:
    """Every op registered through :func:`register_op` in this process, by name."""
    return dict(_REGISTERED)
