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
