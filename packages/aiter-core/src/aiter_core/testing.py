"""Test helpers every family's tests use.

* fresh random inputs (:func:`seed_everything`, :func:`randn`), never zeros;
* output poisoning (:func:`poison`, :func:`assert_all_written`) so an element a kernel forgot
  to write cannot pass by accident;
* FlashAttention-style tolerances (:func:`fa_tolerance`, :func:`assert_close_fa`): the allowed
  error is a multiple of the error the reference itself makes in the low precision, with a
  per-dtype floor (:data:`DTYPE_TOL`);
* where kernels run (:func:`interpreter_active`, :func:`on_gpu`, :func:`default_device`) and
  pytest markers (:func:`requires_gpu`, :func:`requires_triton`);
* :func:`autotune`, the ``triton.autotune`` that pins one config under the interpreter
  (defined in :mod:`aiter_core.triton_utils`, re-exported here);
* upstream's soft check :func:`checkAllclose`.
"""

from __future__ import annotations

import logging
import random
from typing import Any, NamedTuple, Sequence

import torch

from .triton_utils import autotune, check_interpreter_consistent, interpreter_active

__all__ = [
    "Tolerance",
    "DTYPE_TOL",
    "sass_opcode_counts",
    "check_max_error",
    "tolerance_for",
    "seed_everything",
    "randn",
    "poison",
    "assert_all_written",
    "unwritten_mask",
    "fa_tolerance",
    "assert_close_fa",
    "checkAllclose",
    "interpreter_active",
    "on_gpu",
    "default_device",
    "interpret_mode",
    "requires_gpu",
    "requires_triton",
    "autotune",
]

log = logging.getLogger("aiter_core.testing")


# ----------------------------------------------------------------------------- tolerances


class Tolerance(NamedTuple):
    """``atol``/``rtol`` for elementwise checks; ``floor`` is the smallest FA-style tolerance."""

    atol: float
    rtol: float
    floor: float


_FP8_TOL = Tolerance(atol=1.5e-1, rtol=1e-1, floor=1.5e-1)

# Defaults per output dtype. fp16/bf16 floors are FlashAttention's 0.01 / upstream Triton's
# 1.5e-2; fp32 allows for reordered accumulation; fp8 follows upstream's 1.5e-1.
DTYPE_TOL: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(atol=1e-9, rtol=1e-9, floor=1e-9),
    torch.float32: Tolerance(atol=1e-4, rtol=1e-4, floor=1e-4),
    torch.float16: Tolerance(atol=1e-2, rtol=1e-3, floor=1e-2),
    torch.bfloat16: Tolerance(atol=1.5e-2, rtol=1e-2, floor=1.5e-2),
}
for _name in ("float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz"):
    if hasattr(torch, _name):
        DTYPE_TOL[getattr(torch, _name)] = _FP8_TOL


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    """The default :class:`Tolerance` of ``dtype``; TypeError for dtypes without one."""
    try:
        return DTYPE_TOL[dtype]
    except KeyError:
        known = ", ".join(str(d).removeprefix("torch.") for d in DTYPE_TOL)
        raise TypeError(f"no default tolerance for dtype {dtype}; known: {known}") from None


# ----------------------------------------------------------------------------- inputs


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy (when installed) and torch on every device."""
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % (2**32))
    except ImportError:
        pass
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def randn(shape: Sequence[int] | int, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
          scale: float = 1.0, mean: float = 0.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Fresh normal random values ``mean + scale * N(0, 1)`` in ``dtype`` on ``device``.

    Drawn in fp32 and cast, so every dtype (bf16, fp8 included) gets the same distribution;
    fp8 values are clamped to the type's finite range. Integer dtypes get uniform values in
    ``[-scale, scale]`` (``[0, scale]`` for unsigned), with ``scale`` at least 1.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"dtype must be a torch.dtype, got {type(dtype).__name__}")
    if dtype.is_floating_point:
        values = torch.randn(shape, dtype=torch.float32, device=device, generator=generator) * scale + mean
        if dtype.itemsize == 1:
            limit = float(torch.finfo(dtype).max)
            values = values.clamp(-limit, limit)
        return values.to(dtype)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, device=device, generator=generator).bool()
    if dtype.is_complex:
        raise TypeError(f"randn does not make {dtype} tensors")
    info = torch.iinfo(dtype)
    bound = max(1, int(scale))
    low, high = max(info.min, -bound), min(info.max, bound)
    return torch.randint(low, high + 1, shape, dtype=torch.int64, device=device, generator=generator).to(dtype)


# ----------------------------------------------------------------------------- poisoning

# fnuz fp8 types have no 0xFF NaN: their only NaN is 0x80 (negative zero's encoding)
_FNUZ = {getattr(torch, n) for n in ("float8_e4m3fnuz", "float8_e5m2fnuz") if hasattr(torch, n)}


def _byte_pattern(dtype: torch.dtype) -> int | None:
    """Byte used to poison 1-byte float types (fp8, e8m0, packed fp4), None for NaN-fill."""
    if dtype.itemsize != 1 or dtype in (torch.int8, torch.uint8, torch.bool):
        return None
    return 0x80 if dtype in _FNUZ else 0xFF


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with a value a correct kernel overwrites, and return it.

    fp16/bf16/fp32/fp64: NaN. 1-byte float types (fp8, e8m0, packed fp4): the NaN byte (0xFF;
    0x80 for the fnuz types). Integer types: all bits set (-1 signed, max unsigned).
    """
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"poison expects a torch.Tensor, got {type(t).__name__}")
    pattern = _byte_pattern(t.dtype)
    if pattern is not None:
        t.view(torch.uint8).fill_(pattern)
    elif t.dtype.is_floating_point:
        t.fill_(float("nan"))
    elif t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"poison does not support {t.dtype} tensors")
    else:
        info = torch.iinfo(t.dtype)
        t.fill_(-1 if info.min < 0 else info.max)
    return t


def unwritten_mask(t: torch.Tensor) -> torch.Tensor:
    """Bool mask of the elements of ``t`` still holding :func:`poison`'s value."""
    pattern = _byte_pattern(t.dtype)
    if pattern is not None:
        return t.view(torch.uint8) == pattern
    if t.dtype.is_floating_point:
        return torch.isnan(t)
    info = torch.iinfo(t.dtype)
    return t == (-1 if info.min < 0 else info.max)


def assert_all_written(t: torch.Tensor, ref: torch.Tensor | None = None, name: str = "output") -> None:
    """Fail when an element of ``t`` still holds the poison value.

    For integer and fp8 outputs the poison value can also be a legitimate result; pass the
    expected ``ref`` (same dtype and shape) and only elements whose expected value is not the
    poison value are checked. For float outputs a NaN in ``ref`` excuses the same element.
    """
    left = unwritten_mask(t)
    if ref is not None:
        if ref.shape != t.shape:
            raise ValueError(f"ref must have the shape of {name} {tuple(t.shape)}, got {tuple(ref.shape)}")
        left = left & ~unwritten_mask(ref.to(t.dtype) if ref.dtype != t.dtype else ref)
    count = int(left.sum().item())
    if count:
        where = tuple(int(i) for i in left.nonzero()[0].tolist())
        raise AssertionError(f"{name}: {count} of {t.numel()} elements were never written "
                             f"(still poisoned), first at index {where}")


# ----------------------------------------------------------------------------- FA-style checks


def _max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> tuple[float, torch.Tensor]:
    """Max |a - b| in fp64 (equal infinities count as 0), and the diff tensor."""
    a64, b64 = a.detach().to(torch.float64), b.detach().to(torch.float64)
    diff = torch.where(a64 == b64, torch.zeros_like(a64), (a64 - b64).abs())
    both_nan = torch.isnan(a64) & torch.isnan(b64)
    diff = torch.where(both_nan, torch.zeros_like(diff), diff)
    diff = torch.where(torch.isnan(diff), torch.full_like(diff, float("inf")), diff)
    return (float(diff.max().item()) if diff.numel() else 0.0), diff


def fa_tolerance(out: torch.Tensor, out_ref_lowp: torch.Tensor, out_ref_fp32: torch.Tensor,
                 mult: float = 2.0, floor: float | None = None) -> float:
    """``max(mult * max|out_ref_lowp - out_ref_fp32|, floor)``, FlashAttention's rule.

    ``out_ref_lowp`` is the reference run in ``out``'s precision, ``out_ref_fp32`` the one in
    fp32 (upcast inputs). ``floor`` defaults to :data:`DTYPE_TOL` of ``out.dtype``.
    """
    if floor is None:
        floor = tolerance_for(out.dtype).floor
    if out_ref_lowp.shape != out_ref_fp32.shape:
        raise ValueError(f"out_ref_lowp {tuple(out_ref_lowp.shape)} and out_ref_fp32 "
                         f"{tuple(out_ref_fp32.shape)} must have the same shape")
    ref_err, _ = _max_abs_diff(out_ref_lowp, out_ref_fp32)
    return max(mult * ref_err, floor)


def assert_close_fa(out: torch.Tensor, ref_fp32: torch.Tensor, ref_lowp: torch.Tensor, mult: float = 2.0,
                    floor: float | None = None, name: str = "output") -> float:
    """Assert ``max|out - ref_fp32| <= max(mult * max|ref_lowp - ref_fp32|, floor)``.

    NaN in ``out`` where ``ref_fp32`` has none (an unwritten poisoned element) fails. Returns
    the max error; the failure message gives the error, the tolerance, how it was made, the
    first worst index and the values there, and how many elements exceed it.
    """
    if out.shape != ref_fp32.shape:
        raise AssertionError(f"{name}: shape {tuple(out.shape)} differs from the reference's {tuple(ref_fp32.shape)}")
    if floor is None:
        floor = tolerance_for(out.dtype).floor
    ref_err, _ = _max_abs_diff(ref_lowp, ref_fp32)
    tol = max(mult * ref_err, floor)
    err, diff = _max_abs_diff(out, ref_fp32)
    if not err <= tol:
        flat = int(torch.argmax(diff.flatten()).item())
        index = tuple(int(i) for i in torch.unravel_index(torch.tensor(flat), out.shape))
        bad = int((diff > tol).sum().item())
        raise AssertionError(
            f"{name}: max abs error {err:.4g} > tolerance {tol:.4g} "
            f"(= max({mult:g} x reference low-precision error {ref_err:.4g}, floor {floor:.3g})) "
            f"at index {index}: got {float(out.flatten()[flat]):.6g}, expected {float(ref_fp32.flatten()[flat]):.6g}; "
            f"{bad} of {out.numel()} elements exceed the tolerance")
    return err


def checkAllclose(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-2, atol: float = 1e-2,
                  tol_err_ratio: float = 0.05, msg: str = "", printNum: int = 8, printLog: bool = True,
                  max_abs_delta: float | None = None) -> float:  # noqa: N802,N803 (upstream names)
    """Upstream AITER's soft comparison.

    Returns the fraction of elements outside ``|a - b| <= atol + rtol * |b|`` (0.0 when all are
    inside). It does not raise on a mismatch: it logs "passed", "warning" (fraction at most
    ``tol_err_ratio``) or "failed" with the ``printNum`` worst elements. It raises
    AssertionError only when ``max_abs_delta`` is given and some ``|a - b|`` exceeds it.
    """
    if a.shape != b.shape:
        raise ValueError(f"checkAllclose: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")
    a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
    close = torch.isclose(a64, b64, rtol=rtol, atol=atol, equal_nan=True)
    emit = log.info if printLog else log.debug
    if bool(close.all()):
        emit("%s[checkAllclose atol=%g rtol=%g passed~]", msg, atol, rtol)
        mismatch = 0.0
    else:
        bad = ~close
        mismatch = float(bad.sum().item()) / max(a64.numel(), 1)
        delta = (a64 - b64).abs()
        delta = torch.where(torch.isnan(delta), torch.full_like(delta, float("inf")), delta)
        worst = torch.topk(torch.where(bad, delta, torch.zeros_like(delta)).flatten(),
                           min(printNum, int(bad.sum().item()))).indices
        detail = ", ".join(
            f"{tuple(int(i) for i in torch.unravel_index(idx, a.shape))}: {a64.flatten()[idx].item():.6g} vs "
            f"{b64.flatten()[idx].item():.6g}" for idx in worst)
        verdict = "failed!" if mismatch > tol_err_ratio else "warning!"
        level = logging.WARNING if printLog else logging.DEBUG
        log.log(level, "%s[checkAllclose atol=%g rtol=%g %s] a and b mismatch on %.2f%% of elements "
                "(max delta %.4g); worst: %s", msg, atol, rtol, verdict, 100 * mismatch,
                float(delta.max().item()), detail)
    if max_abs_delta is not None:
        worst_delta, _ = _max_abs_diff(a64, b64)
        if worst_delta > max_abs_delta:
            raise AssertionError(f"{msg}checkAllclose: max |a - b| = {worst_delta:.4g} exceeds "
                                 f"max_abs_delta={max_abs_delta:g}")
    return mismatch


# ----------------------------------------------------------------------------- where we run


def on_gpu() -> bool:
    """True when torch sees a CUDA or ROCm GPU."""
    return torch.cuda.is_available()


def default_device() -> torch.device:
    """Where tests put tensors: the GPU when there is one and the interpreter is off, else CPU."""
    return torch.device("cuda") if on_gpu() and not interpreter_active() else torch.device("cpu")


def interpret_mode() -> bool:
    """True when this process runs Triton kernels in the CPU interpreter (tests then use small
    shapes and fp32/fp16). Raises RuntimeError when ``TRITON_INTERPRET`` was set after Triton
    was imported, which would make interpreted kernels fail confusingly."""
    check_interpreter_consistent()
    return interpreter_active()


def requires_gpu(reason: str = "needs a CUDA/ROCm GPU") -> Any:
    """``pytest.mark.skipif`` that skips when torch sees no GPU."""
    import pytest

    return pytest.mark.skipif(not on_gpu(), reason=reason)


def requires_triton(reason: str = "Triton kernels need a GPU or TRITON_INTERPRET=1") -> Any:
    """``pytest.mark.skipif`` that skips unless Triton kernels can run: on a GPU or in the
    interpreter."""
    import pytest

    return pytest.mark.skipif(not (on_gpu() or interpreter_active()), reason=reason)


# -- compile-only tier: cross-compile Triton kernels for Hopper on any machine ------------------

SM90_SMEM_PER_BLOCK = 232448  # H100/H200 opt-in shared memory per block, bytes

_TRITON_PTR_TYPES = {
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5", torch.int8: "i8", torch.uint8: "u8", torch.int16: "i16", torch.int32: "i32",
    torch.int64: "i64",
}


def example_signature(kernel, args, constexprs) -> tuple[dict, list[int]]:
    """Triton signature of ``kernel`` for example ``args`` (tensors may be on the meta device), plus
    the argument indices the launcher would specialise as 16-divisible: tensor pointers (aligned)
    and integers divisible by 16. Without those hints Triton skips vectorised and pipelined loads,
    and the compiled shared-memory size means nothing."""
    signature, divisible = {}, []
    for idx, (name, value) in enumerate(zip(kernel.arg_names, args)):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_PTR_TYPES[value.dtype]
            divisible.append(idx)
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                divisible.append(idx)
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"argument {name!r}: no Triton type for {type(value).__name__}")
    for name in constexprs:
        signature[name] = "constexpr"
    return signature, divisible


def compile_for_sm90(kernel, signature: dict, constexprs: dict, *, num_warps: int, num_stages: int,
                     divisible=()):
    """``triton.compile`` of a ``@triton.jit`` kernel for sm_90 without a GPU; ``divisible`` lists the
    argument indices given ``tt.divisibility=16`` (see :func:`example_signature`). Returns the
    compiled kernel (``.metadata.shared`` is its shared memory, ``.asm["ptx"]`` its PTX)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(i,): [["tt.divisibility", 16]] for i in divisible}
    src = ASTSource(kernel, signature=signature, constexprs=dict(constexprs), attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages))


def sass_opcode_counts(compiled) -> dict[str, int]:
    """SASS opcode histogram (a ``Counter``) of a kernel from :func:`compile_for_sm90` (static counts, not
    executed ones), disassembled by the ``cuobjdump`` that ships with Triton. For probes that
    compare variants of a kernel without a GPU (conversion or address instructions, HGMMA vs
    HMMA, local-memory spills as STL/LDL)."""
    import collections
    import re
    import subprocess
    import tempfile
    from pathlib import Path

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run([str(tool), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    # "/*0a30*/  @!P0 HGMMA.64x64x16.F32.BF16 ..." -> HGMMA
    opcode = re.compile(r"\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)")
    return collections.Counter(m.group(1) for m in map(opcode.match, sass.splitlines()) if m)


def check_max_error(label: str, got: torch.Tensor, want: torch.Tensor, atol: float) -> float:
    """The largest absolute difference of ``got`` and ``want`` (any devices, compared in fp32);
    raises ``AssertionError`` naming ``label`` when it exceeds ``atol`` or is NaN. For the
    families' smoke tests, which must fail loudly without pytest."""
    err = (got.float().cpu() - want.float().cpu()).abs().max().item()
    if not err <= atol:  # also catches NaN
        raise AssertionError(f"{label} differs from the reference by {err:.3g} (tolerance {atol:.3g})")
    return err

