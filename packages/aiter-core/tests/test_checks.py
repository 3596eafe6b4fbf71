"""aiter_core.checks: good input passes; bad input raises TypeError (kind, dtype) or ValueError
(value, shape, device, layout) with a message naming the argument, the expectation and what came."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aiter_core import checks as C

CPU, META = torch.device("cpu"), torch.device("meta")


def test_dtype_name_and_describe():
    assert C.dtype_name(torch.bfloat16) == "bfloat16"
    assert C.describe(torch.zeros(2, 3)) == "torch.float32 tensor of shape (2, 3) on cpu"
    assert C.describe([1]) == "list"


def test_check_tensor():
    x = torch.zeros(2, 3, dtype=torch.float16)
    assert C.check_tensor("x", x) is x
    assert C.check_tensor("x", x, ndim=(2, 3), dtypes=(torch.float16,), device=CPU) is x
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got list$"):
        C.check_tensor("x", [1, 2])
    with pytest.raises(ValueError, match=r"^x must be 3-D, got 2-D with shape \(2, 3\)$"):
        C.check_tensor("x", x, ndim=3)
    with pytest.raises(TypeError, match="^x must have dtype float32, got torch.float16$"):
        C.check_tensor("x", x, dtypes=(torch.float32,))
    with pytest.raises(ValueError, match=r"^x must be on meta \(the device of q\), got cpu$"):
        C.check_tensor("x", x, device=META, like="q")


def test_check_optional_tensor():
    assert C.check_optional_tensor("x", None, ndim=1) is None
    x = torch.zeros(4)
    assert C.check_optional_tensor("x", x, ndim=1) is x
    with pytest.raises(TypeError, match="^x must be a torch.Tensor, got int$"):
        C.check_optional_tensor("x", 3)
    with pytest.raises(ValueError, match="^x must be 2-D"):
        C.check_optional_tensor("x", x, ndim=2)


def test_check_dtype():
    C.check_dtype("q", torch.zeros(1, dtype=torch.bfloat16), (torch.bfloat16, torch.float16))
    with pytest.raises(TypeError, match="^q must have dtype bfloat16/float16, got torch.float32$"):
        C.check_dtype("q", torch.zeros(1), [torch.bfloat16, torch.float16])


def test_check_ndim():
    C.check_ndim("q", torch.zeros(1, 2, 3), 3)
    C.check_ndim("q", torch.zeros(1, 2, 3), (3, 4))
    with pytest.raises(ValueError, match=r"^q must be 3-D or 4-D \(B, S, H, D\), got 2-D with shape \(1, 2\)$"):
        C.check_ndim("q", torch.zeros(1, 2), (3, 4), "(B, S, H, D)")


def test_check_shape():
    x = torch.zeros(2, 3, 4)
    C.check_shape("x", x, (2, None, 4))
    C.check_shape("x", x, torch.Size([2, 3, 4]))
    with pytest.raises(ValueError, match=r"^x must have shape \(2, \*, 5\) \(B, S, D\), got \(2, 3, 4\)$"):
        C.check_shape("x", x, (2, None, 5), "(B, S, D)")
    with pytest.raises(ValueError, match=r"^x must have shape \(2, 3\), got \(2, 3, 4\)$"):
        C.check_shape("x", x, (2, 3))
    with pytest.raises(ValueError, match=r"^s must have shape \(4,\), got \(2,\)$"):
        C.check_shape("s", torch.zeros(2), (4,))


def test_check_device_and_same_device():
    q, k = torch.zeros(2), torch.zeros(2)
    C.check_device("k", k, CPU)
    C.check_same_device("q", q, k=k, v=None)
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="^k must be on meta, got cpu$"):
        C.check_device("k", k, META)
    with pytest.raises(ValueError, match=r"^v must be on cpu \(the device of q\), got meta$"):
        C.check_same_device("q", q, k=k, v=meta)


def test_check_last_dim_contiguous():
    x = torch.zeros(4, 6)
    C.check_last_dim_contiguous("x", x)
    C.check_last_dim_contiguous("x", x[:, :1])  # size-1 last dim: any stride
    C.check_last_dim_contiguous("x", torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"^x must be contiguous in its last dimension \(stride 1\), got strides \(1, 6\)$"):
        C.check_last_dim_contiguous("x", x.t())


def test_check_int32_vector():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert C.check_int32_vector("cu", cu) is cu
    assert C.check_int32_vector("cu", cu, 3, device=CPU) is cu
    with pytest.raises(TypeError, match="^cu must be a torch.Tensor, got NoneType$"):
        C.check_int32_vector("cu", None)
    with pytest.raises(TypeError, match="^cu must have dtype int32, got torch.int64$"):
        C.check_int32_vector("cu", cu.long())
    with pytest.raises(ValueError, match=r"^cu must be 1-D, got 2-D with shape \(3, 1\)$"):
        C.check_int32_vector("cu", cu[:, None])
    with pytest.raises(ValueError, match="^cu must have 4 entries, got 3$"):
        C.check_int32_vector("cu", cu, 4)
    with pytest.raises(ValueError, match=r"^cu must be on meta \(the device of q\), got cpu$"):
        C.check_int32_vector("cu", cu, device=META, like="q")
    with pytest.raises(ValueError, match="^cu must be contiguous, got stride 2$"):
        C.check_int32_vector("cu", torch.arange(6, dtype=torch.int32)[::2])


def test_check_int():
    assert C.check_int("n", 3) == 3
    assert type(C.check_int("n", np.int64(3))) is int
    assert C.check_int("n", 0, minimum=0) == 0
    for bad, got in ((1.0, "float"), (True, "bool"), ("3", "str"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"^n must be an int, got {got}$"):
            C.check_int("n", bad)
    with pytest.raises(ValueError, match="^n must be >= 1, got 0$"):
        C.check_int("n", 0, minimum=1)


def test_check_float():
    assert C.check_float("s", 2) == 2.0 and type(C.check_float("s", 2)) is float
    assert C.check_float("s", np.float32(0.5)) == 0.5
    assert C.check_float("p", 0.0, minimum=0.0, below=1.0) == 0.0
    for bad, got in (("x", "str"), (False, "bool"), (None, "NoneType")):
        with pytest.raises(TypeError, match=f"^s must be a float, got {got}$"):
            C.check_float("s", bad)
    with pytest.raises(ValueError, match=r"^p must be >= 0.0, got -0.1$"):
        C.check_float("p", -0.1, minimum=0.0)
    with pytest.raises(ValueError, match=r"^p must be < 1.0, got 1.0$"):
        C.check_float("p", 1.0, below=1.0)
    assert C.check_float("scale", 1e-30, above=0.0) == 1e-30
    for bad in (0.0, -0.5):
        with pytest.raises(ValueError, match=r"^scale must be > 0.0, got "):
            C.check_float("scale", bad, above=0.0)
    for bad in (float("nan"), float("inf"), -float("inf"), np.float32("nan")):
        for bounds in ({}, {"above": 0.0}, {"minimum": 0.0}):
            with pytest.raises(ValueError, match=r"^scale must be a finite number, got "):
                C.check_float("scale", bad, **bounds)
    assert C.check_float("cap", float("inf"), finite=False) == float("inf")


def test_check_bool():
    assert C.check_bool("causal", False) is False
    with pytest.raises(TypeError, match="^causal must be a bool, got int$"):
        C.check_bool("causal", 1)


def test_check_scalar_f32():
    s = torch.ones(1)
    assert C.check_scalar_f32("q_descale", s) is s
    assert C.check_scalar_f32("q_descale", torch.tensor(2.0), device=CPU) is not None
    with pytest.raises(TypeError, match="^q_descale must be a torch.Tensor, got float$"):
        C.check_scalar_f32("q_descale", 1.0)
    with pytest.raises(TypeError, match="^q_descale must have dtype float32, got torch.float16$"):
        C.check_scalar_f32("q_descale", s.half())
    with pytest.raises(ValueError, match=r"^q_descale must be a float32 tensor with one element \(a per-tensor scale\), "
                                         r"got shape \(2,\)$"):
        C.check_scalar_f32("q_descale", torch.ones(2))
    with pytest.raises(ValueError, match=r"^q_descale must be on meta \(the device of q\), got cpu$"):
        C.check_scalar_f32("q_descale", s, device=META, like="q")


def test_fake_tensors_and_symbolic_sizes_pass():
    """Under torch.compile the checks see FakeTensors and SymInt/SymFloat sizes: they must pass them."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import DimDynamic, ShapeEnv, StatelessSymbolicContext

    mode = FakeTensorMode(shape_env=ShapeEnv())
    dynamic = StatelessSymbolicContext(dynamic_sizes=[DimDynamic.DYNAMIC])
    cu = mode.from_tensor(torch.zeros(5, dtype=torch.int32), symbolic_context=dynamic)
    n = cu.shape[0]
    assert type(n).__name__ == "SymInt"
    assert C.check_int("n", n, minimum=1) is n
    half = n * 0.5
    assert type(half).__name__ == "SymFloat"
    assert C.check_float("half", half, minimum=0.0) is half
    with mode:
        q = torch.empty(n, 4, 16, dtype=torch.bfloat16)
    C.check_tensor("q", q, ndim=3, dtypes=(torch.bfloat16,), device=CPU)
    C.check_shape("q", q, (None, 4, 16))
    C.check_shape("q", q, (n, 4, 16))
    C.check_last_dim_contiguous("q", q)
    C.check_int32_vector("cu", cu, n, device=q.device)
    with pytest.raises(ValueError, match="^q must have shape"):
        C.check_shape("q", q, (None, 8, 16))


def test_shared_attention_checks():
    C.check_gqa(32, 8)
    with pytest.raises(ValueError, match=r"^query heads \(12\) must be a multiple of the KV heads \(8\)$"):
        C.check_gqa(12, 8)
    with pytest.raises(ValueError, match="multiple of the KV heads"):
        C.check_gqa(8, 0)
    slopes = torch.ones(8)
    assert C.check_per_head_f32("alibi_slopes", slopes, 8) is slopes
    with pytest.raises(ValueError, match=r"^alibi_slopes must be float32 \[num_heads=4\]"):
        C.check_per_head_f32("alibi_slopes", slopes, 4)
    with pytest.raises(TypeError, match="^sinks must have dtype float32, got torch.float16$"):
        C.check_per_head_f32("sinks", slopes.half(), 8)
    with pytest.raises(ValueError, match="^sinks must be on meta"):
        C.check_per_head_f32("sinks", slopes, 8, device=torch.device("meta"))
    out = torch.empty(2, 3)
    assert C.check_output("out", out, (2, None)) is out
    with pytest.raises(ValueError, match=r"^out must have shape \(2, 4\)"):
        C.check_output("out", out, (2, 4))
    with pytest.raises(TypeError, match="^out must have dtype"):
        C.check_output("out", out.int(), (2, 3))
    C.check_paired("k_descale", None, "v_descale", None)
    with pytest.raises(ValueError, match="^k_descale and v_descale must be given together, got only v_descale$"):
        C.check_paired("k_descale", None, "v_descale", torch.ones(1))
    with pytest.raises(TypeError, match="^slot_mapping must have dtype int32/int64"):
        C.check_index_tensor("slot_mapping", torch.ones(3))
    slots = torch.arange(6)
    assert C.check_index_vector("slot_mapping", slots) is slots
    with pytest.raises(ValueError, match=r"^positions must be contiguous \(stride 1\), got stride 2$"):
        C.check_index_vector("positions", slots[::2])


def test_check_block_table():
    table = torch.zeros(4, 8, dtype=torch.int32)
    assert C.check_block_table("block_table", table, num_seqs=4, max_len=128, block_size=16) is table
    with pytest.raises(ValueError, match=r"^block_table must have a row per sequence \(5\), got 4$"):
        C.check_block_table("block_table", table, num_seqs=5, max_len=16, block_size=16)
    with pytest.raises(ValueError, match="^block_table is too narrow: 129 tokens in blocks of 16 need 9 entries"):
        C.check_block_table("block_table", table, num_seqs=4, max_len=129, block_size=16)
    with pytest.raises(ValueError, match="^block_table rows must be contiguous"):
        C.check_block_table("block_table", torch.zeros(8, 4, dtype=torch.int32).t(), num_seqs=4, max_len=16,
                            block_size=16)
    with pytest.raises(TypeError, match="^block_table must have dtype int32, got torch.int64$"):
        C.check_block_table("block_table", table.long(), num_seqs=4, max_len=16, block_size=16, dtypes=(torch.int32,))


def test_fast_paths_accept_exactly_what_the_full_checks_accept():
    x = torch.zeros(3, 4, dtype=torch.float16)
    assert C.check_tensor("x", x, ndim=(2, 3), dtypes=(torch.float16,), device=x.device) is x
    with pytest.raises(ValueError, match="^x must be 3-D"):
        C.check_tensor("x", x, ndim=3)
    assert C.check_int32_vector("cu", torch.arange(3, dtype=torch.int32), 3) is not None
    with pytest.raises(ValueError, match="^cu must be contiguous"):
        C.check_int32_vector("cu", torch.arange(6, dtype=torch.int32)[::2])
    with pytest.raises(ValueError, match="^cu must have 4 entries, got 3$"):
        C.check_int32_vector("cu", torch.arange(3, dtype=torch.int32), 4)
    assert C.check_int("n", 5, minimum=5) == 5
    with pytest.raises(ValueError, match="^n must be >= 6, got 5$"):
        C.check_int("n", 5, minimum=6)
    assert C.check_scalar_f32("s", torch.ones(1)) is not None
    with pytest.raises(ValueError, match="one element"):
        C.check_scalar_f32("s", torch.ones(2))
    C.check_last_dim_contiguous("q", x)
    with pytest.raises(ValueError, match="^q must be contiguous in its last dimension"):
        C.check_last_dim_contiguous("q", x.t())
