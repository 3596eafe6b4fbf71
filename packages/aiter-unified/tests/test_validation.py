"""Bad input raises ValueError/TypeError naming the argument; unsupported upstream modes (causal
False, the shuffled cache, nvfp4 q) are rejected with what is supported; ``torch.ops.aiter.*``
called directly raises the same errors. No kernel runs here."""

from __future__ import annotations

import pytest
import torch

import aiter_unified
from aiter_unified.testing import make_batch


@pytest.fixture(scope="module")
def batch():
    return make_batch([(1, 20), (4, 9)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=torch.float16,
                      seed=0)


def _call(b, **over):
    args = dict(q=b.q, k=b.k, v=b.v, out=torch.empty_like(b.q), cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k, softmax_scale=0.1,
                causal=True, window_size=(-1, -1), block_table=b.block_table, softcap=0.0, q_descale=None,
                k_descale=None, v_descale=None)
    args.update(over)
    return aiter_unified.unified_attention(**args, backend="reference")


def test_valid_call_runs(batch):
    out = _call(batch)
    assert torch.isfinite(out).all()


BAD = [
    ("causal", dict(causal=False), ValueError, "causal must be True"),
    ("shuffled", dict(shuffled_kv_cache=True), ValueError, "shuffled_kv_cache"),
    ("nvfp4", dict(q_scales=torch.ones(1)), ValueError, "q_scales"),
    ("q_dtype", dict(q=torch.zeros(5, 4, 32, dtype=torch.int32)), TypeError, "q must be"),
    ("q_not_tensor", dict(q=[1, 2]), TypeError, "q must be a torch.Tensor"),
    ("kv_mismatch", dict(v=torch.zeros(5, 16, 2, 32, dtype=torch.float32)), TypeError, "k and v"),
    ("kv_dtype", "kv32", TypeError, "k/v must have q's dtype"),
    ("fp8_q_16bit_kv", "fp8q", TypeError, "an fp8 q needs an fp8"),
    ("gqa", "gqa3", ValueError, "multiple of the KV heads"),
    ("head_dim", "d8", ValueError, "head dim must be in"),
    ("out_shape", dict(out=torch.empty(5, 4, 16, dtype=torch.float16)), ValueError, "out must have q's shape"),
    ("cu_dtype", "cu64", TypeError, "cu_seqlens_q must have dtype int32"),
    ("seqused_len", dict(seqused_k=torch.tensor([20], dtype=torch.int32)), ValueError, "seqused_k must have"),
    ("max_q_type", dict(max_seqlen_q=4.0), TypeError, "max_seqlen_q must be an int"),
    ("max_q_gt_k", dict(max_seqlen_q=30, max_seqlen_k=20), ValueError, "cannot exceed max_seqlen_k"),
    ("table_short", dict(max_seqlen_k=100), ValueError, "block_table has"),
    ("window", dict(window_size=(3,)), ValueError, "window_size must be a pair"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap must be"),
    ("scale_zero", dict(softmax_scale=0.0), ValueError, r"softmax_scale must be > 0.0, got 0.0"),
    ("descale_shape", dict(q_descale=torch.ones(2)), ValueError, "q_descale must be a float32 tensor"),
    ("kv_descale_pair", dict(k_descale=torch.ones(1)), ValueError, "given together"),
    ("alibi", dict(alibi_slopes=torch.ones(3)), ValueError, r"alibi_slopes must be float32 \[4\]"),
    ("sinks_dtype", dict(sinks=torch.ones(4, dtype=torch.float16)), ValueError, "sinks must be float32"),
    ("qq_small", dict(qq_bias=torch.zeros(2, 2)), ValueError, "qq_bias must be"),
    ("skip_type", dict(skip_reduce=1), TypeError, "skip_reduce must be a bool"),
]


def _resolve(b, over):
    """The overrides of a BAD row (named ones are built from the batch)."""
    if over == "kv32":
        over = dict(k=b.k.float(), v=b.v.float())
    elif over == "fp8q":
        over = dict(q=b.q.to(torch.float8_e4m3fn), out=torch.empty_like(b.q))
    elif over == "gqa3":
        over = dict(k=b.k[:, :, :1].expand(-1, -1, 3, -1).contiguous(), v=b.v[:, :, :1].expand(-1, -1, 3, -1)
                    .contiguous())
    elif over == "d8":
        over = dict(q=b.q[..., :8].contiguous(), k=b.k[..., :8].contiguous(), v=b.v[..., :8].contiguous(),
                    out=torch.empty_like(b.q[..., :8]))
    elif over == "cu64":
        over = dict(cu_seqlens_q=b.cu_seqlens_q.long())
    return over


@pytest.mark.parametrize("name,over,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises(batch, name, over, exc, match):
    with pytest.raises(exc, match=match):
        _call(batch, **_resolve(batch, over))


# Bad arguments of the right types for the op schema (a list for a Tensor, a float for an int are
# refused by torch's own argument parsing before the op's checks run).
NOT_SCHEMA_TYPED = {"q_not_tensor", "max_q_type", "skip_type"}
DIRECT = [b for b in BAD if b[0] not in NOT_SCHEMA_TYPED]


@pytest.mark.parametrize("op", ["unified_attention", "unified_attention_segments"])
@pytest.mark.parametrize("name,over,exc,match", DIRECT, ids=[b[0] for b in DIRECT])
def test_torch_op_validates_like_the_public_function(batch, op, name, over, exc, match):
    """``torch.ops.aiter.<op>(...)`` called directly runs the same checks: same error, same message."""
    b = batch
    over = _resolve(b, over)
    args = dict(q=b.q, k=b.k, v=b.v, out=torch.empty_like(b.q), cu_seqlens_q=b.cu_seqlens_q,
                max_seqlen_q=b.max_seqlen_q, seqused_k=b.seqused_k, max_seqlen_k=b.max_seqlen_k, softmax_scale=0.1,
                causal=True, window_size=(-1, -1), block_table=b.block_table, softcap=0.0, q_descale=None,
                k_descale=None, v_descale=None)
    args.update(over)
    args["window_size"] = list(args["window_size"])  # what the dispatcher hands the op for an int[]
    with pytest.raises(exc, match=match) as public:
        aiter_unified.unified_attention(**args, skip_reduce=op == "unified_attention_segments")
    with pytest.raises(exc, match=match) as direct:
        getattr(torch.ops.aiter, op)(**args)
    assert str(direct.value) == str(public.value)


def test_skip_reduce_has_no_reference_backend(batch):
    from aiter_core.registry import UnsupportedError

    with pytest.raises(UnsupportedError, match="unified_attention_segments"):
        _call(batch, skip_reduce=True)  # backend="reference"
