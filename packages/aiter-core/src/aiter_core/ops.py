"""Turn a Python function into an ``aiter::<name>`` torch custom op.

Every public op of every family goes through :func:`register_op`, so that it has a fake
(meta) implementation and exact ``mutates_args``, runs under ``torch.compile(fullgraph=True)``
and inside CUDA-graph capture, and can carry an autograd formula.

We define ops with ``Library.define`` + ``Library.impl`` rather than ``torch.library.custom_op``:
the result is the same operator, but the call path skips ``custom_op``'s Python wrapper, which
costs several microseconds per call on the decode hot path (vLLM made the same choice). The
implementation is registered for the CPU and CUDA dispatch keys (CUDA covers ROCm builds too);
the function itself decides what runs, usually through the backend registry.

Families declare their ops with :func:`declare_op`: one line per op names its checks function
(whose signature is the op's schema and which returns the validated Call), the arguments it
writes and its fake. The op's body is always ``registry.run(name, check(*args))``, so a direct
``torch.ops.aiter.<name>(...)`` call is validated exactly like the public function.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Iterable, Optional

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

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


def _no_outputs(*args, **kwargs) -> None:
    return None


class Op:
    """An ``aiter::<name>`` op declared by :func:`declare_op`; call it like the torch op.

    An eager call outside any tracing skips the torch dispatcher and runs the op's body directly
    (the dispatcher boxes every argument and unboxes it again for a Python kernel: ~10 us for
    twenty arguments on a slow host, more than the rest of a decode call's host path). For an op
    with an autograd formula, the dispatcher's generated autograd kernel also re-reads the schema
    per call (``torch._library.utils.fill_defaults``: ~190 us for 19 arguments on a slow host), so
    an eager call takes the same formula (``setup_context``, ``backward``) through a plain
    ``torch.autograd.Function`` when an input requires grad, and the body directly when none does.
    Under ``torch.compile``, inside any dispatch mode (FakeTensor, make_fx, functionalization) or a
    functorch transform, every call goes through ``torch.ops.aiter.<name>``. All paths run the
    same validation.
    """

    __slots__ = ("name", "op", "body", "check", "_function", "_defaults", "_index", "_tensors")

    def __init__(self, name: str, op: Any, body: Callable, check: Callable, signature: inspect.Signature,
                 autograd: tuple[Callable, Callable] | None = None):
        self.name, self.op, self.body, self.check = name, op, body, check
        self._function = None
        if autograd is None:
            return
        params = signature.parameters
        self._defaults = tuple(p.default for p in params.values())
        self._index = {pname: i for i, pname in enumerate(params)}
        self._tensors = tuple(i for i, p in enumerate(params.values())
                              if p.annotation in (torch.Tensor, Optional[torch.Tensor]))
        backward, setup_context = autograd
        from .registry import get_registry

        registry = get_registry()

        def forward(ctx, *inputs):  # inputs: the op's arguments, then their Call
            output = registry.run(name, inputs[-1])
            setup_context(ctx, inputs[:-1], output)
            return output

        def function_backward(ctx, *grads):
            needs = ctx.needs_input_grad
            ctx.needs_input_grad = needs[:-1]  # the formula sees the op's inputs only
            try:
                return (*backward(ctx, *grads), None)
            finally:
                ctx.needs_input_grad = needs

        self._function = type(f"{name}_autograd", (torch.autograd.Function,),
                              {"forward": staticmethod(forward), "backward": staticmethod(function_backward)})

    def __call__(self, *args, **kwargs):
        if (torch.compiler.is_compiling() or _get_current_dispatch_mode() is not None
                or torch._C._are_functorch_transforms_active()):
            return self.op(*args, **kwargs)
        if self._function is None:
            return self.body(*args, **kwargs)
        if kwargs or len(args) < len(self._defaults):
            args = self._complete(args, kwargs)
        if torch.is_grad_enabled():
            for i in self._tensors:
                a = args[i]
                if a is not None and getattr(a, "requires_grad", False):  # not a tensor: the check says so
                    return self._function.apply(*args, self.check(*args))
        return self.body(*args)

    def _complete(self, args: tuple, kwargs: dict) -> tuple:
        """Positional arguments with the defaults and keywords filled in (autograd.Function.apply
        takes positional arguments only)."""
        full = list(args) + list(self._defaults[len(args):])
        for key, value in kwargs.items():
            index = self._index.get(key)
            if index is None or index < len(args):
                raise TypeError(f"{self.name}() got an unexpected or repeated keyword argument {key!r}")
            full[index] = value
        missing = [key for key, value in zip(self._index, full) if value is inspect.Parameter.empty]
        if missing:
            raise TypeError(f"{self.name}() missing required argument(s): {', '.join(missing)}")
        return tuple(full)

    def __repr__(self) -> str:
        return f"<aiter op {self.name}{' (autograd)' if self._function is not None else ''}>"


def declare_op(name: str, check: Callable, *, mutates_args: Iterable[str], fake: Callable | None = None,
               returns: Any = None, autograd: tuple[Callable, Callable] | None = None,
               tags: Iterable[torch.Tag] = ()) -> Op:
    """Declare ``aiter::<name>``: ``check(*args) -> Call`` validates, the registry runs the Call.

    ``check``'s signature (annotated, ending in ``backend: Optional[str] = None``) is the op's
    schema; ``returns`` its return annotation (None for ops that write their outputs in place).
    ``fake`` defaults to "returns nothing" and must be given for ops that return tensors.
    """
    from .registry import get_registry

    signature = inspect.signature(check, eval_str=True).replace(return_annotation=returns)
    if "backend" not in signature.parameters:
        raise TypeError(f"{check.__qualname__} must take a trailing backend: Optional[str] = None argument")
    registry = get_registry()

    def body(*args, **kwargs):
        return registry.run(name, check(*args, **kwargs))

    body.__signature__ = signature
    body.__name__ = body.__qualname__ = name
    body.__module__ = check.__module__
    schema = torch.library.infer_schema(body, mutates_args=tuple(mutates_args))
    op = register_op(name, body, mutates_args=mutates_args, fake=fake or _no_outputs, schema=schema,
                     autograd=autograd, tags=tags)
    return Op(name, op, body, check, signature, autograd)
