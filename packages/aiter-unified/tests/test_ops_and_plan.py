"""The aiter:: ops (registration, fake implementations), the backend registry entries and the
2D/3D heuristic."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import aiter_unified  # noqa: F401
from aiter_core.registry import explain, families, select, specs
from aiter_unified import ops
from aiter_unified.backends import make_problem, reference_supports
from aiter_unified.triton.launch import SHORT_Q, plan, plans

CPU = torch.device("cpu")


def _plan(**kw):
    base = dict(num_tokens=64, num_seqs=64, heads_q=32, heads_kv=8, head_dim=128, max_seqlen_q=1,
                max_seqlen_k=4096, sliding_window=0, device=CPU)
    base.update(kw)
    return plan(**base)


def test_heuristic_thresholds(monkeypatch):
    monkeypatch.setenv("AITER_NUM_CU", "132")
    import aiter_unified.triton.launch as launch

    monkeypatch.setattr(launch, "_sm_count", lambda device: 132)
    assert _plan(num_seqs=66).use_2d  # 66 seqs x 8 KV heads = 528 programs >= 4 x 132: single pass
    decode = _plan()  # 512 programs < 528: split KV
    assert not decode.use_2d and decode.num_segments >= 2
    assert decode.num_segments & (decode.num_segments - 1) == 0
    assert decode.block_m == 16 and decode.block_q == 4
    assert _plan(sliding_window=128).use_2d
    assert _plan(max_seqlen_k=512).use_2d
    assert _plan(num_seqs=128).use_2d  # 1024 programs >= 528
    prefill = _plan(num_tokens=8 * 2048, num_seqs=8, max_seqlen_q=2048, max_seqlen_k=2048)
    assert prefill.use_2d and (prefill.block_m, prefill.block_q, prefill.num_warps, prefill.num_stages) == (64, 16, 4, 2)
    # non power of two GQA: the group is padded to 8 rows
    odd = _plan(heads_q=40, heads_kv=8)
    assert odd.group_p2 == 8 and odd.block_m == 16 and odd.block_q == 2
    # big groups get one token per block
    assert _plan(heads_q=64, heads_kv=1).block_m == 64
    assert _plan(skip_reduce=True, max_seqlen_k=100).num_segments >= 2
    assert _plan(force="2d").use_2d and not _plan(force="3d", max_seqlen_k=100).use_2d


def test_mixed_batches_run_two_launches(monkeypatch):
    monkeypatch.setenv("AITER_NUM_CU", "132")
    monkeypatch.delenv("AITER_UNIFIED_CONFIG", raising=False)
    base = dict(num_tokens=4 * 1024 + 64, num_seqs=68, heads_q=32, heads_kv=8, head_dim=128, max_seqlen_q=1024,
                max_seqlen_k=4096, sliding_window=0, device=CPU)
    short, long = plans(**base)
    # sequences of <= SHORT_Q new tokens: 16-row tiles, a fixed SHORT_Q / BLOCK_Q blocks each
    assert (short.block_m, short.block_q, short.blocks_per_seq) == (16, 4, SHORT_Q // 4)
    assert short.query_blocks == 68 * (SHORT_Q // 4) and (short.qlen_lo, short.qlen_hi) == (0, SHORT_Q)
    assert short.use_2d and long.use_2d
    assert (long.block_m, long.blocks_per_seq, long.qlen_lo) == (64, 0, SHORT_Q) and long.qlen_hi >= 2**31 - 1
    # one launch: decode-only batches, split KV, head dims above 128, segment output
    assert len(plans(**{**base, "max_seqlen_q": SHORT_Q})) == 1
    assert len(plans(**{**base, "force": "3d"})) == 1
    assert len(plans(**{**base, "head_dim": 256})) == 1
    assert len(plans(**{**base, "skip_reduce": True})) == 1
    # the tuning override sets the prefill tile only
    monkeypatch.setenv("AITER_UNIFIED_CONFIG", "64,32,4,3")
    short, long = plans(**base)
    assert short.block_m == 16 and (long.block_m, long.tile_n, long.num_warps, long.num_stages) == (64, 32, 4, 3)


def test_config_override(monkeypatch):
    import pytest

    monkeypatch.setenv("AITER_UNIFIED_CONFIG", "128,32,8,4")
    p = _plan(num_tokens=8 * 2048, num_seqs=8, max_seqlen_q=2048, max_seqlen_k=2048)
    assert (p.block_m, p.block_q, p.tile_n, p.num_warps, p.num_stages) == (128, 32, 32, 8, 4)
    assert p.query_blocks == 8 * 2048 // 32 + 8
    monkeypatch.setenv("AITER_UNIFIED_CONFIG", "4,16,4,2")  # raised to tl.dot's 16 rows and the padded group
    assert _plan().block_m == 16 and _plan(heads_q=256, heads_kv=8).block_m == 32
    for bad in ("128,64,8", "96,64,4,2", "64,8,4,2"):
        monkeypatch.setenv("AITER_UNIFIED_CONFIG", bad)
        with pytest.raises(ValueError, match="AITER_UNIFIED_CONFIG"):
            _plan()


def test_registry_and_family():
    assert any(f.name == "unified" for f in families())
    q = torch.zeros(2, 4, 32, dtype=torch.float16)
    k = torch.zeros(3, 16, 2, 32, dtype=torch.float16)
    assert select("unified_attention", make_problem(q, k), backend="reference").backend == "reference"
    # the reference has no segment buffers: skip_reduce has the Triton backend only
    assert [s.backend for s in specs("unified_attention_segments")] == ["triton"]
    assert "skip_reduce" in " ".join(reference_supports(make_problem(q, k, skip_reduce=True)))
    assert "triton" in explain("unified_attention", make_problem(q, k))


def test_ops_registered_with_fakes():
    assert torch.ops.aiter.unified_attention is ops.unified_attention_op
    with FakeTensorMode():
        q = torch.empty(10, 8, 64, dtype=torch.float16)
        k = torch.empty(20, 16, 2, 64, dtype=torch.float16)
        cu = torch.empty(4, dtype=torch.int32)
        used = torch.empty(3, dtype=torch.int32)
        table = torch.empty(3, 40, dtype=torch.int32)
        args = (q, k, k, torch.empty_like(q), cu, 4, used, 600, 0.1, [-1, -1], table, 0.0, None, None, None, None,
                None, None, None, "")
        segs = torch.ops.aiter.unified_attention_segments(*args)
        p = plan(num_tokens=10, num_seqs=3, heads_q=8, heads_kv=2, head_dim=64, max_seqlen_q=4, max_seqlen_k=600,
                 sliding_window=0, device=q.device, skip_reduce=True)
        assert tuple(segs[0].shape) == (10, 8, p.num_segments, 64)
        assert tuple(segs[1].shape) == tuple(segs[2].shape) == (10, 8, p.num_segments)
        assert torch.ops.aiter.unified_attention(*args) is None
    schema = str(torch.ops.aiter.unified_attention.default._schema)
    assert "Tensor(a3!) out" in schema and schema.count("!") == 1


def test_bench_cli_rejects_unknown_shapes():
    import pytest

    from aiter_unified.bench import parse_args

    assert parse_args(["--shapes", "decode,mixed"]).shape_names == ("decode", "mixed")
    with pytest.raises(SystemExit):
        parse_args(["--shapes", "decode,huge"])


def test_opcheck_unified_attention_op():
    """Schema (exact mutation of out), fake tensor and AOT dispatch checks of the aiter:: op."""
    from aiter_unified.testing import make_batch

    b = make_batch([(1, 20), (4, 9)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=torch.float32,
                   seed=0)
    args = (b.q, b.k, b.v, torch.empty_like(b.q), b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.1,
            [-1, -1], b.block_table, 0.0, None, None, None, None, None, None, torch.randn(4), "reference")
    result = torch.library.opcheck(torch.ops.aiter.unified_attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_bench_machinery_with_sweep(tmp_path, monkeypatch):
    """The benchmark CLI end to end on toy sizes in the interpreter, timing stubbed: every shape
    builds, every config of the sweep runs and matches the default config, the files are written."""
    import json
    import os

    import pytest

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("the CPU run of the bench machinery needs TRITON_INTERPRET=1")
    from aiter_unified import bench

    calls = {"n": 0}

    def fake_ms(fn):
        fn()  # the timed callable must run
        calls["n"] += 1
        return 0.25

    monkeypatch.setattr(bench, "_time_ms", fake_ms)
    monkeypatch.setattr(bench, "SWEEP", {"decode": [(16, 16, 4, 1), (32, 32, 4, 1)],
                                         "prefill": [(64, 16, 4, 1)], "mixed": [(32, 16, 4, 1)]})
    monkeypatch.delenv("AITER_UNIFIED_CONFIG", raising=False)
    rc = bench.main(["--device", "cpu", "--tiny", "--no-ceilings", "--sweep", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "unified.json").read_text())["rows"]
    sweep = [r for r in rows if r["op"] == "sweep"]
    assert len(sweep) == 4 and all(r.get("ms") == 0.25 and not r.get("error") for r in sweep), sweep
    ours = [r for r in rows if r["op"] == "unified_attention" and r["provider"].startswith("unified")]
    assert len(ours) == 9 and all(r.get("ms") == 0.25 for r in ours)
    assert "AITER_UNIFIED_CONFIG" not in os.environ
    assert (tmp_path / "unified.md").exists()
