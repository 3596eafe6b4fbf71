"""Test helpers: inputs, poisoning, FA-style tolerances, checkAllclose, the interpreter switch."""

import logging
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aiter_core import testing
from aiter_core.testing import (
    DTYPE_TOL,
    assert_all_written,
    assert_close_fa,
    checkAllclose,
    fa_tolerance,
    poison,
    randn,
    seed_everything,
    tolerance_for,
    unwritten_mask,
)

FP8_TYPES = [torch.float8_e4m3fn, torch.float8_e4m3fnuz, torch.float8_e5m2]


def test_seed_everything_reproduces_and_randn_is_fresh():
    seed_everything(123)
    a = randn((4, 5), torch.float32)
    b = randn((4, 5), torch.float32)
    seed_everything(123)
    assert torch.equal(randn((4, 5), torch.float32), a)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, *FP8_TYPES])
def test_randn_floats(dtype):
    x = randn((64, 33), dtype, scale=1000.0)
    assert x.shape == (64, 33) and x.dtype == dtype
    xf = x.float()
    assert torch.isfinite(xf).all()
    assert (xf != 0).float().mean() > 0.9
    assert xf.std() > 100  # scale applied (fp8 values clamp to the finite range)


def test_randn_scale_and_mean():
    x = randn(100_000, torch.float32, scale=0.5, mean=3.0)
    assert abs(x.mean().item() - 3.0) < 0.01 and abs(x.std().item() - 0.5) < 0.01


@pytest.mark.parametrize("dtype", [torch.int8, torch.int32, torch.uint8])
def test_randn_integers_stay_in_range(dtype):
    x = randn((1000,), dtype, scale=5)
    assert x.dtype == dtype
    low = 0 if dtype == torch.uint8 else -5
    assert int(x.min()) >= low and int(x.max()) <= 5 and len(torch.unique(x)) > 3


def test_randn_rejects_non_dtype():
    with pytest.raises(TypeError, match="dtype must be a torch.dtype"):
        randn((2,), "float32")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, *FP8_TYPES,
                                   torch.int8, torch.int32, torch.uint8])
def test_poison_then_partial_write_is_caught(dtype):
    out = poison(torch.empty((3, 4), dtype=dtype))
    assert unwritten_mask(out).all()
    if dtype.is_floating_point:
        assert torch.isnan(out.float()).all()  # every poison of a float type is NaN
    src = randn((3, 4), dtype, scale=3)
    src = torch.where(unwritten_mask(src), torch.ones_like(src.float()).to(dtype), src)
    out[:, :3] = src[:, :3]
    with pytest.raises(AssertionError, match=r"3 of 12 elements were never written.*\(0, 3\)"):
        assert_all_written(out, name="out")
    out[:, 3] = src[:, 3]
    assert_all_written(out)


def test_assert_all_written_ref_excuses_legitimate_poison_values():
    out = poison(torch.empty(4, dtype=torch.int32))
    out[:2] = torch.tensor([5, 6], dtype=torch.int32)
    ref = torch.tensor([5, 6, -1, 7], dtype=torch.int32)
    with pytest.raises(AssertionError, match="1 of 4 elements"):
        assert_all_written(out, ref=ref)
    out[3] = 7
    assert_all_written(out, ref=ref)  # element 2 should be -1, the poison value
    with pytest.raises(ValueError, match="ref must have the shape"):
        assert_all_written(out, ref=ref[:2])


def test_poison_rejects_bool():
    with pytest.raises(TypeError, match="does not support"):
        poison(torch.empty(2, dtype=torch.bool))


def test_dtype_tol_covers_the_dtypes_we_test():
    for dtype in (torch.float32, torch.float16, torch.bfloat16, *FP8_TYPES):
        tol = tolerance_for(dtype)
        assert tol.atol > 0 and tol.rtol > 0 and tol.floor > 0
    assert DTYPE_TOL[torch.float16].floor == 1e-2
    assert tolerance_for(torch.bfloat16).atol > tolerance_for(torch.float16).atol > tolerance_for(torch.float32).atol
    with pytest.raises(TypeError, match="no default tolerance for dtype torch.int32"):
        tolerance_for(torch.int32)


def test_fa_tolerance_is_multiple_of_reference_error_with_floor():
    ref32 = torch.tensor([1.0, 2.0, 3.0])
    lowp = torch.tensor([1.0, 2.25, 3.0])
    out = torch.zeros(3, dtype=torch.float16)
    assert fa_tolerance(out, lowp, ref32) == pytest.approx(0.5)
    assert fa_tolerance(out, lowp, ref32, mult=4) == pytest.approx(1.0)
    assert fa_tolerance(out, ref32, ref32) == DTYPE_TOL[torch.float16].floor
    assert fa_tolerance(out, ref32, ref32, floor=0.3) == 0.3


def test_assert_close_fa_passes_and_fails_with_a_useful_message():
    ref32 = torch.linspace(-1, 1, 24).reshape(2, 3, 4)
    lowp = ref32 + 0.01
    good = (ref32 + 0.015).half()
    err = assert_close_fa(good, ref32, lowp)
    assert 0.014 < err < 0.016
    bad = good.clone()
    bad[1, 2, 3] += 0.5
    with pytest.raises(AssertionError) as info:
        assert_close_fa(bad, ref32, lowp, name="o")
    message = str(info.value)
    assert "o: max abs error" in message and "tolerance 0.02" in message
    assert "(1, 2, 3)" in message and "1 of 24 elements" in message and "floor 0.01" in message


def test_assert_close_fa_catches_nan_and_shape():
    ref32 = torch.ones(2, 2)
    out = ref32.clone()
    out[0, 1] = float("nan")
    with pytest.raises(AssertionError, match=r"max abs error inf.*\(0, 1\)"):
        assert_close_fa(out, ref32, ref32)
    both = ref32.clone()
    both[1, 1] = float("-inf")
    assert assert_close_fa(both.clone(), both, both) == 0.0  # equal infinities (empty rows' LSE) agree
    with pytest.raises(AssertionError, match="shape"):
        assert_close_fa(torch.ones(3), ref32, ref32)


def test_checkallclose_semantics(caplog):
    a = torch.zeros(10)
    with caplog.at_level(logging.INFO, logger="aiter_core.testing"):
        assert checkAllclose(a, a + 0.005, msg="same ") == 0.0
    assert "passed~" in caplog.text
    caplog.clear()
    b = a.clone()
    b[:3] = 1.0
    with caplog.at_level(logging.INFO, logger="aiter_core.testing"):
        assert checkAllclose(a, b, msg="bad ") == pytest.approx(0.3)
    assert "failed!" in caplog.text and "30.00%" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="aiter_core.testing"):
        assert checkAllclose(a, b, tol_err_ratio=0.5) == pytest.approx(0.3)
    assert "warning!" in caplog.text
    with pytest.raises(AssertionError, match="max_abs_delta=0.5"):
        checkAllclose(a, b, max_abs_delta=0.5)
    with pytest.raises(ValueError, match="shapes differ"):
        checkAllclose(a, b[:3])
    # rtol is relative to b, as in torch.isclose
    assert checkAllclose(torch.tensor([100.0]), torch.tensor([101.0]), rtol=0.02, atol=0) == 0.0


def test_where_we_run_helpers(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert testing.interpreter_active()
    assert testing.default_device() == torch.device("cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not testing.interpreter_active()
    assert testing.on_gpu() == torch.cuda.is_available()
    marker = testing.requires_gpu()
    assert marker.name == "skipif" and marker.args[0] == (not torch.cuda.is_available())
    monkeypatch.setenv("TRITON_INTERPRET", "true")
    assert testing.requires_triton().args[0] is False


def test_autotune_is_triton_autotune_without_the_interpreter(monkeypatch):
    import triton
    from triton.runtime.autotuner import Autotuner

    def body(x, n):
        pass

    class FakeKernel:  # what triton.autotune reads of a JITFunction
        arg_names = ["x", "n"]
        fn = staticmethod(body)

    configs = [triton.Config({"B": 1}), triton.Config({"B": 2})]
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    tuned = testing.autotune(configs, key=["n"])(FakeKernel())
    assert isinstance(tuned, Autotuner) and tuned.configs == configs
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    pinned = testing.autotune(configs, key=["n"])(FakeKernel())
    assert not isinstance(pinned, Autotuner) and pinned.configs == configs
    with pytest.raises(ValueError, match="at least one"):
        testing.autotune([], key=["n"])
    with pytest.raises(TypeError, match="list of argument names"):
        testing.autotune(configs, key="n")


def _run_python(code: str, interpret: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=env, timeout=300)


def test_autotune_pins_a_config_in_the_interpreter():
    # a fresh process: TRITON_INTERPRET must be set before Triton is imported
    result = _run_python("""
        import torch, triton, triton.language as tl
        from aiter_core.triton_utils import autotune
        configs = [triton.Config({"VAL": 3}, num_warps=4), triton.Config({"VAL": 5}, num_warps=8),
                   triton.Config({"VAL": 7}, num_warps=2)]

        def body(out_ptr, n, VAL: tl.constexpr):
            offs = tl.arange(0, 8)
            tl.store(out_ptr + offs, tl.full((8,), VAL, tl.int32) + tl.sum(offs, axis=0) * 0, mask=offs < n)

        def launch(kernel):
            out = torch.zeros(8, dtype=torch.int32)
            kernel[(1,)](out, 8)
            return int(out[0]), kernel.best_config.kwargs["VAL"]

        first = autotune(configs, key=["n"])(triton.jit(body))
        chosen = autotune(configs, key=["n"], interpreter_config=configs[1])(triton.jit(body))
        pruned = autotune(configs, key=["n"], prune_configs_by={
            "early_config_prune": lambda cfgs, nargs, **kw: [c for c in cfgs if c.kwargs["VAL"] > 5]})(triton.jit(body))
        print(launch(first), launch(chosen), launch(pruned))
    """)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["(3,", "3)", "(5,", "5)", "(7,", "7)"]


def test_interpret_mode_detects_triton_imported_too_early():
    result = _run_python("""
        import os, triton.language
        os.environ["TRITON_INTERPRET"] = "1"
        from aiter_core.testing import interpret_mode
        try:
            interpret_mode()
        except RuntimeError as exc:
            print("raised:", exc)
    """, interpret=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "raised: TRITON_INTERPRET=1 is set but Triton was imported before it was" in result.stdout
    ok = _run_python("from aiter_core.testing import interpret_mode; import triton.language; print(interpret_mode())")
    assert ok.returncode == 0 and ok.stdout.strip() == "True", ok.stderr[-3000:]


def test_check_max_error_raises_on_excess_and_nan():
    import pytest
    import torch

    from aiter_core.testing import check_max_error

    a = torch.zeros(3)
    assert check_max_error("x", a + 1e-3, a, 1e-2) == pytest.approx(1e-3)
    with pytest.raises(AssertionError, match="fam smoke: op differs from the reference by 0.5"):
        check_max_error("fam smoke: op", a + 0.5, a, 1e-2)
    with pytest.raises(AssertionError, match="nan"):
        check_max_error("x", torch.tensor([float("nan")]), torch.zeros(1), 1.0)
