import pytest
import torch

from aiter_core.ops import register_op, registered_ops


def _scaled_add_impl(x: torch.Tensor, y: torch.Tensor, alpha: float, out: torch.Tensor) -> None:
    out.copy_(x + alpha * y)


def _scaled_add_fake(x, y, alpha, out):
    return None


def _softplus_impl(x: torch.Tensor, beta: float) -> torch.Tensor:
    return torch.nn.functional.softplus(x, beta)


def _softplus_fake(x, beta):
    return torch.empty_like(x)


def _softplus_setup(ctx, inputs, output):
    x, beta = inputs
    ctx.save_for_backward(x)
    ctx.beta = beta


def _softplus_backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * torch.sigmoid(ctx.beta * x), None


scaled_add = register_op("test_scaled_add", _scaled_add_impl, mutates_args=("out",), fake=_scaled_add_fake)
softplus = register_op("test_softplus", _softplus_impl, mutates_args=(), fake=_softplus_fake, autograd=(_softplus_backward, _softplus_setup))


def test_registered_under_aiter_namespace():
    assert torch.ops.aiter.test_scaled_add is scaled_add
    assert "test_softplus" in registered_ops()
    assert "Tensor(a3!) out" in str(scaled_add._schemas[""]) if hasattr(scaled_add, "_schemas") else True
    # re-registration is harmless and returns the same op
    assert register_op("test_scaled_add", _scaled_add_impl, mutates_args=("out",), fake=_scaled_add_fake) is scaled_add


def test_opcheck_mutating_op():
    x, y = torch.randn(5), torch.randn(5)
    out = torch.full((5,), float("nan"))
    scaled_add(x, y, 0.5, out)
    torch.testing.assert_close(out, x + 0.5 * y)
    torch.library.opcheck(scaled_add, (x, y, 0.5, torch.empty(5)))


def test_opcheck_autograd_op():
    x = torch.randn(6, requires_grad=True)
    torch.library.opcheck(softplus, (x, 2.0))


def test_fullgraph_compile_with_mutation_and_backward():
    def fn(x, y):
        out = torch.empty_like(x)
        scaled_add(x, y, 2.0, out)
        return softplus(out, 1.0).sum()

    x = torch.randn(8, requires_grad=False)
    y = torch.randn(8)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x, y), fn(x, y))

    xg = torch.randn(8, requires_grad=True)
    torch.compile(lambda t: softplus(t, 3.0).sum(), fullgraph=True)(xg).backward()
    torch.testing.assert_close(xg.grad, torch.sigmoid(3.0 * xg.detach()))


def test_bad_name():
    with pytest.raises(ValueError, match="op name must be a Python identifier"):
        register_op("bad-name", _softplus_impl, mutates_args=(), fake=_softplus_fake)


# -- declare_op: the one way a family declares an op ---------------------------------------------

from typing import NamedTuple, Optional  # noqa: E402

from aiter_core import registry as _registry  # noqa: E402
from aiter_core.ops import declare_op  # noqa: E402


class _Key(NamedTuple):
    device_type: str


class _ScaleCall(NamedTuple):
    out: torch.Tensor
    x: torch.Tensor
    scale: float
    key: _Key
    backend: Optional[str]


def _check_scale(out: torch.Tensor, x: torch.Tensor, scale: float, backend: Optional[str] = None) -> _ScaleCall:
    if not scale > 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    return _ScaleCall(out, x, scale, _Key(x.device.type), backend)


def _scale_impl(call: _ScaleCall) -> None:
    call.out.copy_(call.x * call.scale)


_registry.register(_registry.BackendSpec(op="test_declared_scale", backend="reference", impl=_scale_impl))
_SCALE = declare_op("test_declared_scale", _check_scale, mutates_args=("out",))


def test_declared_op_validates_on_every_path():
    x = torch.randn(5)
    out = torch.empty(5)
    _SCALE(out, x, 2.0)
    torch.testing.assert_close(out, x * 2)
    for call in (_SCALE, torch.ops.aiter.test_declared_scale):
        with pytest.raises(ValueError, match="scale must be > 0, got -1.0"):
            call(out, x, -1.0)
    assert "Tensor(a0!) out" in str(torch.ops.aiter.test_declared_scale.default._schema)


def test_declared_op_under_compile_and_opcheck():
    x = torch.randn(5)
    out = torch.empty(5)
    torch.library.opcheck(torch.ops.aiter.test_declared_scale.default, (out, x, 3.0))

    @torch.compile(fullgraph=True, backend="eager")
    def f(out, x):
        _SCALE(out, x, 3.0)
        return out + 1

    torch.testing.assert_close(f(out, x), x * 3 + 1)


def test_declare_op_needs_a_backend_argument():
    def no_backend(x: torch.Tensor) -> None:
        return None

    with pytest.raises(TypeError, match="backend"):
        declare_op("test_no_backend", no_backend, mutates_args=())


def test_compile_notice_hooks_chain_and_log(monkeypatch, caplog):
    from types import SimpleNamespace

    triton = pytest.importorskip("triton")
    from aiter_core import triton_utils

    seen = []
    monkeypatch.setattr(triton.knobs.runtime, "jit_cache_hook", lambda **kw: seen.append("theirs-start"))
    monkeypatch.setattr(triton.knobs.runtime, "jit_post_compile_hook", lambda **kw: seen.append("theirs-end"))
    monkeypatch.setattr(triton_utils, "_hooks_installed", {"done": False})
    monkeypatch.setattr(triton_utils, "_compile_notices", {"count": 0})
    monkeypatch.setattr(triton_utils, "interpreter_active", lambda: False)
    monkeypatch.setenv("AITER_COMPILE_NOTICE_S", "0")
    caplog.set_level("INFO", logger="aiter_core.compile")
    triton_utils.install_compile_notice()
    ours = SimpleNamespace(module="aiter_demo.triton.kernels", name="demo_kernel")
    other = SimpleNamespace(module="someone_else", name="k")
    for fn in (ours, other, ours):
        key = object()
        triton.knobs.runtime.jit_cache_hook(key=key, fn=fn)
        triton.knobs.runtime.jit_post_compile_hook(key=key, fn=fn)
    assert seen == ["theirs-start", "theirs-end"] * 3
    records = [r for r in caplog.records if r.name == "aiter_core.compile"]
    assert [r.levelname for r in records] == ["WARNING", "INFO"]  # ours twice, the other kernel never
    assert "aiter_demo.triton.kernels.demo_kernel" in records[0].getMessage()
    assert "aiter warmup" in records[0].getMessage()


class _MulCall(NamedTuple):
    x: torch.Tensor
    factor: float
    key: _Key
    backend: Optional[str]


def _check_mul(x: torch.Tensor, factor: float = 2.0, backend: Optional[str] = None) -> _MulCall:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    return _MulCall(x, factor, _Key(x.device.type), backend)


_MUL_RUNS = []


def _mul_impl(call: _MulCall) -> torch.Tensor:
    _MUL_RUNS.append(call.factor)
    return call.x * call.factor


def _mul_setup(ctx, inputs, output):
    ctx.factor = inputs[1]


def _mul_backward(ctx, grad):
    return grad * ctx.factor, None, None


_registry.register(_registry.BackendSpec(op="test_declared_mul", backend="reference", impl=_mul_impl))
_MUL = declare_op("test_declared_mul", _check_mul, mutates_args=(), fake=lambda x, factor=2.0, backend=None: x * factor,
                  returns=torch.Tensor, autograd=(_mul_backward, _mul_setup))


def test_autograd_op_eager_paths_match_the_torch_op():
    x = torch.randn(4, requires_grad=True)
    eager = _MUL(x, factor=3.0)  # keywords and defaults are completed for autograd.Function.apply
    eager.sum().backward()
    grad_eager, x.grad = x.grad.clone(), None
    torch.ops.aiter.test_declared_mul(x, 3.0).sum().backward()
    torch.testing.assert_close(grad_eager, x.grad)
    torch.testing.assert_close(grad_eager, torch.full((4,), 3.0))
    with torch.no_grad():
        assert not _MUL(x).requires_grad  # no grad needed: the body itself
    _MUL_RUNS.clear()
    _MUL(torch.ones(2))
    assert _MUL_RUNS == [2.0]
    for bad in ((torch.ones(2), 1.0, None, "extra"),):
        with pytest.raises(TypeError):
            _MUL(*bad)
    with pytest.raises(TypeError, match="unexpected or repeated keyword argument 'bogus'"):
        _MUL(x, bogus=1)
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got list$"):
        _MUL([1.0], 2.0)
    assert "autograd" in repr(_MUL)
