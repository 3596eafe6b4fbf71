"""The bad-input sweep (issue 11) of the family's public entry point, ``unified_attention``, in
both its forms (``skip_reduce=False`` / ``True``: the two aiter:: ops).

* Host-checkable inputs (dtype, rank, shape, device, strides, scalars): a clear error naming the
  argument, raised by the checks before any kernel runs, for both ops; the reference and Triton
  backends refuse the same inputs.
* Index contents (cu_seqlens_q, seqused_k, block ids, too-small length bounds, NaN in masked keys,
  empty batches): the documented rule of README.md ("Index metadata and NaN"), checked against
  the PyTorch reference, which implements the same rule, with guard regions around every tensor;
  each category in its own process (:mod:`bad_index_cases`), so a crash fails one test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import aiter_unified
from aiter_unified.testing import make_batch

HERE = Path(__file__).parent
I32 = torch.int32


@pytest.fixture(scope="module")
def batch():
    return make_batch([(1, 20), (4, 9)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=torch.float16,
                      seed=0)


def _args(b, **over):
    args = dict(q=b.q, k=b.k, v=b.v, out=torch.empty_like(b.q), cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k, softmax_scale=0.1,
                causal=True, window_size=(-1, -1), block_table=b.block_table, softcap=0.0, q_descale=None,
                k_descale=None, v_descale=None)
    args.update(over)
    return args


def _meta(x):
    return torch.empty(x.shape, dtype=x.dtype, device="meta")


def _col_strided(x):
    """``x`` with the same values and a non-unit stride along its last dimension."""
    wide = torch.zeros(*x.shape[:-1], 2 * x.shape[-1], dtype=x.dtype)
    wide[..., ::2] = x
    return wide[..., ::2]


def _strided_vector(x):
    wide = torch.zeros(2 * x.shape[0], dtype=x.dtype)
    wide[::2] = x
    return wide[::2]


# (id, overrides built from the batch, exception, the argument the message must name)
HOST_CASES = [
    # dtype
    ("q-int", lambda b: dict(q=b.q.int()), TypeError, "q must be"),
    ("q-float64", lambda b: dict(q=b.q.double(), out=b.q.double()), TypeError, "q must be"),
    ("k-dtype", lambda b: dict(k=b.k.float(), v=b.v.float()), TypeError, "k/v must"),
    ("v-dtype", lambda b: dict(v=b.v.float()), TypeError, "k and v"),
    ("out-dtype", lambda b: dict(out=torch.empty(b.q.shape, dtype=torch.int8)), TypeError, "out must be"),
    ("cu-int64", lambda b: dict(cu_seqlens_q=b.cu_seqlens_q.long()), TypeError, "cu_seqlens_q must have dtype"),
    ("seqused-int64", lambda b: dict(seqused_k=b.seqused_k.long()), TypeError, "seqused_k must have dtype"),
    ("table-int64", lambda b: dict(block_table=b.block_table.long()), TypeError, "block_table must have dtype"),
    ("alibi-f16", lambda b: dict(alibi_slopes=torch.ones(4, dtype=torch.float16)), ValueError, "alibi_slopes"),
    ("qq-int", lambda b: dict(qq_bias=torch.ones(4, 4, dtype=I32)), TypeError, "qq_bias"),
    ("q_descale-f16", lambda b: dict(q_descale=torch.ones(1, dtype=torch.float16)), TypeError, "q_descale"),
    # rank
    ("q-2d", lambda b: dict(q=b.q[:, 0]), ValueError, "q must be 3-D"),
    ("k-3d", lambda b: dict(k=b.k[:, 0]), ValueError, "k must be 4-D"),
    ("out-4d", lambda b: dict(out=b.q[None].clone()), ValueError, "out must be 3-D"),
    ("cu-2d", lambda b: dict(cu_seqlens_q=b.cu_seqlens_q[None]), ValueError, "cu_seqlens_q must be 1-D"),
    ("seqused-0d", lambda b: dict(seqused_k=b.seqused_k[0]), ValueError, "seqused_k must be 1-D"),
    ("table-1d", lambda b: dict(block_table=b.block_table[0]), ValueError, "block_table must be 2-D"),
    ("sinks-2d", lambda b: dict(sinks=torch.ones(4, 1)), ValueError, "sinks must be 1-D"),
    # shape
    ("v-shape", lambda b: dict(v=b.v[:-1]), ValueError, "v must have k's shape"),
    ("k-head-dim", lambda b: dict(k=b.k[..., :16], v=b.v[..., :16]), ValueError, "k's head dim"),
    ("q-head-dim-8", lambda b: dict(q=b.q[..., :8], out=b.q[..., :8].clone(), k=b.k[..., :8], v=b.v[..., :8]),
     ValueError, r"q\.shape\[2\]"),
    ("gqa", lambda b: dict(q=b.q[:, :3], out=b.q[:, :3].clone()), ValueError, r"k\.shape\[2\]"),
    ("out-shape", lambda b: dict(out=b.q[:-1].clone()), ValueError, "out must have q's shape"),
    ("cu-short", lambda b: dict(cu_seqlens_q=b.cu_seqlens_q[:1]), ValueError, "cu_seqlens_q must have"),
    ("cu-seqused-mismatch", lambda b: dict(cu_seqlens_q=b.cu_seqlens_q[:2]), ValueError, "seqused_k must have"),
    ("table-rows", lambda b: dict(block_table=b.block_table[:1]), ValueError, "block_table must have at least"),
    ("alibi-len", lambda b: dict(alibi_slopes=torch.ones(3)), ValueError, "alibi_slopes"),
    ("sinks-len", lambda b: dict(sinks=torch.ones(5)), ValueError, "sinks"),
    ("qq-small", lambda b: dict(qq_bias=torch.zeros(2, 2)), ValueError, "qq_bias"),
    ("descale-numel", lambda b: dict(k_descale=torch.ones(2), v_descale=torch.ones(1)), ValueError, "k_descale"),
    ("block-size-0", lambda b: dict(k=b.k[:, :0], v=b.v[:, :0]), ValueError, "block_size"),
    # device ('meta' stands for another device)
    ("k-device", lambda b: dict(k=_meta(b.k)), ValueError, "k must be on cpu"),
    ("out-device", lambda b: dict(out=_meta(b.q)), ValueError, "out must be on cpu"),
    ("cu-device", lambda b: dict(cu_seqlens_q=_meta(b.cu_seqlens_q)), ValueError, "cu_seqlens_q must be on cpu"),
    ("seqused-device", lambda b: dict(seqused_k=_meta(b.seqused_k)), ValueError, "seqused_k must be on cpu"),
    ("table-device", lambda b: dict(block_table=_meta(b.block_table)), ValueError, "block_table must be on cpu"),
    ("q_descale-device", lambda b: dict(q_descale=torch.ones(1, device="meta")), ValueError, "q_descale"),
    ("sinks-device", lambda b: dict(sinks=torch.ones(4, device="meta")), ValueError, "sinks must be on cpu"),
    ("qq-device", lambda b: dict(qq_bias=torch.ones(4, 4, device="meta")), ValueError, "qq_bias must be on cpu"),
    # strides
    ("q-strided", lambda b: dict(q=_col_strided(b.q)), ValueError, "q must be contiguous in its last"),
    ("k-strided", lambda b: dict(k=_col_strided(b.k), v=_col_strided(b.v)), ValueError, "must be contiguous"),
    ("out-strided", lambda b: dict(out=_col_strided(b.q)), ValueError, "out must be contiguous"),
    ("table-col-strided", lambda b: dict(block_table=_col_strided(b.block_table)), ValueError,
     "block_table must have unit stride"),
    ("table-transposed", lambda b: dict(block_table=b.block_table.t().contiguous().t()), ValueError,
     "block_table must have unit stride"),
    ("cu-strided", lambda b: dict(cu_seqlens_q=_strided_vector(b.cu_seqlens_q)), ValueError,
     "cu_seqlens_q must be contiguous"),
    ("seqused-strided", lambda b: dict(seqused_k=_strided_vector(b.seqused_k)), ValueError,
     "seqused_k must be contiguous"),
    ("sinks-strided", lambda b: dict(sinks=_strided_vector(torch.ones(4))), ValueError, "sinks must be contiguous"),
    ("alibi-strided", lambda b: dict(alibi_slopes=_strided_vector(torch.ones(4))), ValueError,
     "alibi_slopes must be contiguous"),
    ("qq-strided", lambda b: dict(qq_bias=_col_strided(torch.ones(4, 4))), ValueError, "qq_bias"),
    # scalars: NaN / inf / zero / negative
    ("scale-nan", lambda b: dict(softmax_scale=float("nan")), ValueError, "softmax_scale"),
    ("scale-inf", lambda b: dict(softmax_scale=float("inf")), ValueError, "softmax_scale must be a finite"),
    ("scale-neg-inf", lambda b: dict(softmax_scale=float("-inf")), ValueError, "softmax_scale"),
    ("scale-zero", lambda b: dict(softmax_scale=0.0), ValueError, "softmax_scale"),
    ("scale-negative", lambda b: dict(softmax_scale=-0.5), ValueError, "softmax_scale"),
    ("softcap-nan", lambda b: dict(softcap=float("nan")), ValueError, "softcap must be a finite"),
    ("softcap-inf", lambda b: dict(softcap=float("inf")), ValueError, "softcap must be a finite"),
    ("softcap-negative", lambda b: dict(softcap=-1.0), ValueError, "softcap"),
    ("max_q-zero", lambda b: dict(max_seqlen_q=0), ValueError, "max_seqlen_q"),
    ("max_q-negative", lambda b: dict(max_seqlen_q=-3), ValueError, "max_seqlen_q"),
    ("max_k-zero", lambda b: dict(max_seqlen_k=0), ValueError, "max_seqlen_k"),
    ("max_k-past-table", lambda b: dict(max_seqlen_k=10**6), ValueError, "block_table has"),
    ("max_q-past-max_k", lambda b: dict(max_seqlen_q=b.max_seqlen_k + 1), ValueError, "max_seqlen_q"),
    ("window-rank", lambda b: dict(window_size=[3]), ValueError, "window_size"),
    ("window-float", lambda b: dict(window_size=[3.0, 0]), ValueError, "window_size"),
    ("causal", lambda b: dict(causal=False), ValueError, "causal"),
]


@pytest.mark.parametrize("skip_reduce", [False, True], ids=["out", "segments"])
@pytest.mark.parametrize("name,make,exc,match", HOST_CASES, ids=[c[0] for c in HOST_CASES])
def test_host_checkable_input_raises_naming_the_argument(batch, name, make, exc, match, skip_reduce):
    with pytest.raises(exc, match=match):
        aiter_unified.unified_attention(**_args(batch, **make(batch)), skip_reduce=skip_reduce)


@pytest.mark.parametrize("name,make,exc,match", HOST_CASES[::4], ids=[c[0] for c in HOST_CASES[::4]])
def test_reference_backend_refuses_the_same_input(batch, name, make, exc, match):
    with pytest.raises(exc, match=match):
        aiter_unified.unified_attention(**_args(batch, **make(batch)), backend="reference")


def test_torch_op_refuses_nan_scale_like_the_public_function(batch):
    args = _args(batch, softmax_scale=float("nan"))
    args["window_size"] = list(args["window_size"])
    for op in ("unified_attention", "unified_attention_segments"):
        with pytest.raises(ValueError, match="softmax_scale"):
            getattr(torch.ops.aiter, op)(**args)


def test_single_column_block_table_any_stride_is_accepted():
    """A one-column table's column stride is never used: accepted (a column slice of a wider table)."""
    b = make_batch([(2, 7), (1, 3)], heads_q=2, heads_kv=1, head_dim=16, block_size=8, dtype=torch.float32, seed=1)
    table = torch.cat([b.block_table, b.block_table], 1)[:, ::2]
    assert table.stride(1) != 1 and table.shape[1] == 1
    out = aiter_unified.unified_attention(**_args(b, block_table=table), backend="reference")
    assert torch.isfinite(out).all()


# ----------------------------------------------------------------------------- index contents
INDEX_CASES = ["cu_past_tokens", "cu_negative_and_reversed", "cu_non_monotonic", "block_ids_out_of_range",
               "seqused_past_table", "max_seqlen_q_too_small", "max_seqlen_k_too_small", "nan_in_masked_keys",
               "empty_batches"]


def test_index_case_list_is_complete():
    sys.path.insert(0, str(HERE))
    try:
        import bad_index_cases
    finally:
        sys.path.remove(str(HERE))
    assert sorted(bad_index_cases.CASES) == sorted(INDEX_CASES)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                    reason="needs TRITON_INTERPRET=1 (CPU) or a GPU")
@pytest.mark.parametrize("case", INDEX_CASES)
def test_index_content_follows_the_documented_rule(case):
    """Each category in a fresh process: a crash (or a hang) fails this test only."""
    env = dict(os.environ, PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, str(HERE / "bad_index_cases.py"), case], capture_output=True, text=True,
                          env=env, timeout=600)
    tail = (proc.stdout + proc.stderr)[-3000:]
    assert proc.returncode == 0, f"{case} exited with {proc.returncode}:\n{tail}"
    assert proc.stdout.strip().splitlines()[-1].startswith("OK"), tail
    assert int(proc.stdout.split()[-1]) > 0
    print(f"{case}: {proc.stdout.strip().splitlines()[-1]} checks")  # shown with pytest -s
