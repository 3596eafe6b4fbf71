"""The aiter:: ops (registration, fake implementations), the backend registry entries, the Call,
the 2D/3D heuristic and the launch config (cached per key, AITER_UNIFIED_ATTENTION_CONFIG)."""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import aiter_unified  # noqa: F401
from aiter_core.registry import UnsupportedError, explain, families, select, specs
from aiter_unified import checks, ops
from aiter_unified.backends import OPS
from aiter_unified.testing import sized_call
from aiter_unified.triton.launch import SHORT_Q, plan

CONFIG = "AITER_UNIFIED_ATTENTION_CONFIG"


def _plans(skip_reduce=False, force=None, sliding_window=0, **kw):
    base = dict(num_tokens=64, num_seqs=64, heads_q=32, heads_kv=8, head_dim=128, max_seqlen_q=1, max_seqlen_k=4096)
    base.update(kw)
    call = sized_call(**base, window_left=sliding_window - 1 if sliding_window else -1)
    return plan(call, skip_reduce=skip_reduce, force=force)


def _plan(**kw):
    """The (last) launch of a call: grid (query blocks, Hk, segments) and constexprs."""
    return _plans(**kw)[-1]


def _single_pass(launch) -> bool:
    return launch.grid[2] == 1


def test_heuristic_thresholds(monkeypatch):
    monkeypatch.setenv("AITER_NUM_CU", "132")
    monkeypatch.delenv(CONFIG, raising=False)
    import aiter_unified.triton.launch as launch

    monkeypatch.setattr(launch, "_sm_count", lambda device: 132)
    assert _single_pass(_plan(num_seqs=66))  # 66 seqs x 8 KV heads = 528 programs >= 4 x 132: single pass
    decode = _plan()  # 512 programs < 528: split KV
    segments = decode.grid[2]
    assert not _single_pass(decode) and segments >= 2
    assert segments & (segments - 1) == 0
    assert decode.consts["BLOCK_M"] == 16 and decode.consts["BLOCK_Q"] == 4
    assert decode.consts["BLOCKS_PER_SEQ"] == 1 and decode.grid[0] == 64  # one query block per sequence
    assert _single_pass(_plan(sliding_window=128))
    assert _single_pass(_plan(max_seqlen_k=512))
    assert _single_pass(_plan(num_seqs=128))  # 1024 programs >= 528
    prefill = _plan(num_tokens=8 * 2048, num_seqs=8, max_seqlen_q=2048, max_seqlen_k=2048)
    c = prefill.consts
    assert _single_pass(prefill) and (c["BLOCK_M"], c["BLOCK_Q"], c["num_warps"], c["num_stages"]) == (64, 16, 4, 2)
    # non power of two GQA: the group is padded to 8 rows
    odd = _plan(heads_q=40, heads_kv=8).consts
    assert odd["GROUP_P2"] == 8 and odd["GROUP"] == 5 and odd["BLOCK_M"] == 16 and odd["BLOCK_Q"] == 2
    # big groups get one token per block
    assert _plan(heads_q=64, heads_kv=1).consts["BLOCK_M"] == 64
    assert _plan(skip_reduce=True, max_seqlen_k=100).grid[2] >= 2
    assert _single_pass(_plan(force="2d")) and not _single_pass(_plan(force="3d", max_seqlen_k=100))
    # skip_reduce always splits, even where the heuristic would not (and even forced "2d")
    assert not _single_pass(_plan(skip_reduce=True, force="2d", max_seqlen_k=100))


def test_mixed_batches_run_two_launches(monkeypatch):
    monkeypatch.setenv("AITER_NUM_CU", "132")
    monkeypatch.delenv(CONFIG, raising=False)
    base = dict(num_tokens=4 * 1024 + 64, num_seqs=68, heads_q=32, heads_kv=8, head_dim=128, max_seqlen_q=1024,
                max_seqlen_k=4096)
    short, long = _plans(**base)
    # sequences of <= SHORT_Q new tokens: 16-row tiles, a fixed SHORT_Q / BLOCK_Q blocks each
    s = short.consts
    assert (s["BLOCK_M"], s["BLOCK_Q"], s["BLOCKS_PER_SEQ"]) == (16, 4, SHORT_Q // 4)
    assert short.grid[0] == 68 * (SHORT_Q // 4) and (short.qlen_lo, short.qlen_hi) == (0, SHORT_Q)
    assert _single_pass(short) and _single_pass(long)
    assert (long.consts["BLOCK_M"], long.consts["BLOCKS_PER_SEQ"], long.qlen_lo) == (64, 0, SHORT_Q)
    assert long.qlen_hi >= 2**31 - 1 and long.grid[0] == (4 * 1024 + 64) // 16 + 68
    # one launch: decode-only batches, split KV, head dims above 128, segment output
    assert len(_plans(**{**base, "max_seqlen_q": SHORT_Q})) == 1
    assert len(_plans(**{**base, "force": "3d"})) == 1
    assert len(_plans(**{**base, "head_dim": 256})) == 1
    assert len(_plans(**{**base, "skip_reduce": True})) == 1
    # the tuning override sets the prefill tile only
    monkeypatch.setenv(CONFIG, "BLOCK_M=64,TILE_N=32,num_warps=4,num_stages=3")
    short, long = _plans(**base)
    c = long.consts
    assert short.consts["BLOCK_M"] == 16 and short.consts["TILE_N"] == 64
    assert (c["BLOCK_M"], c["TILE_N"], c["num_warps"], c["num_stages"]) == (64, 32, 4, 3)


def test_config_override(monkeypatch):
    prefill = dict(num_tokens=8 * 2048, num_seqs=8, max_seqlen_q=2048, max_seqlen_k=2048)
    monkeypatch.delenv(CONFIG, raising=False)
    default = _plan(**prefill)
    monkeypatch.setenv(CONFIG, "BLOCK_M=128,TILE_N=32,num_warps=8,num_stages=4")
    p = _plan(**prefill)
    c = p.consts
    assert (c["BLOCK_M"], c["BLOCK_Q"], c["TILE_N"], c["num_warps"], c["num_stages"]) == (128, 32, 32, 8, 4)
    assert p.config.options == dict(num_warps=8, num_stages=4)
    assert p.grid[0] == 8 * 2048 // 32 + 8
    # a partial override keeps the other fields
    monkeypatch.setenv(CONFIG, "num_stages=3")
    c = _plan(**prefill).consts
    assert (c["BLOCK_M"], c["TILE_N"], c["num_warps"], c["num_stages"]) == (64, 64, 4, 3)
    monkeypatch.setenv(CONFIG, "BLOCK_M=4,TILE_N=16")  # raised to tl.dot's 16 rows and the padded group
    assert _plan().consts["BLOCK_M"] == 16 and _plan(heads_q=256, heads_kv=8).consts["BLOCK_M"] == 32
    for bad in ("BLOCK_M=128,TILE_N=64,warps=8", "BLOCK_M=96", "TILE_N=8", "BLOCK_M=64,TILE_N"):
        monkeypatch.setenv(CONFIG, bad)
        with pytest.raises(ValueError, match=CONFIG):
            _plan()
    # unset again: the default tile (the cached plan follows the variable)
    monkeypatch.delenv(CONFIG)
    assert _plan(**prefill).consts == default.consts


def test_tile_config_cached_per_key():
    """The launch config of a key is built once: two calls of the same key share the KernelConfig."""
    a = _plan(num_seqs=8, max_seqlen_k=300)
    b = _plan(num_seqs=9, max_seqlen_k=200)
    assert a.config is b.config and a.grid != b.grid


def test_constexprs_in_kernel_order():
    """Launches pass the runtime arguments then the constexprs positionally, in the kernel's order."""
    from aiter_unified.triton.kernel import unified_attn_kernel
    from aiter_unified.triton.launch import kernel_args

    launch = _plan(num_seqs=8, max_seqlen_k=300)
    call = sized_call(num_tokens=64, num_seqs=8, heads_q=32, heads_kv=8, head_dim=128, max_seqlen_q=1,
                      max_seqlen_k=300)
    names = unified_attn_kernel.arg_names
    args = kernel_args(call, launch)
    config = launch.config
    assert len(args) + len(config.constexpr_args) == len(names)
    assert tuple(config.consts)[:len(config.constexpr_args)] == tuple(names[len(args):])
    assert config.constexpr_args == tuple(config.consts[n] for n in names[len(args):])


def test_call_and_key_fields():
    """Call and Key are built positionally (tuple.__new__): every field lands where its name says."""
    call = sized_call(num_tokens=12, num_seqs=3, heads_q=8, heads_kv=2, head_dim=96, max_seqlen_q=7,
                      max_seqlen_k=300, window_left=31, block_size=32)
    assert len(call) == len(checks.Call._fields) and len(call.key) == len(checks.Key._fields)
    assert (call.num_tokens, call.num_seqs, call.max_seqlen_q, call.max_seqlen_k) == (12, 3, 7, 300)
    assert (call.num_blocks, call.max_blocks, call.sliding_window, call.backend) == (30, 10, 32, None)
    assert call.q_stride == call.q.stride() and call.k_stride == call.k.stride()
    assert call.block_table_stride == call.block_table.stride() and call.device == call.q.device
    key = call.key
    assert (key.device_type, key.dtype, key.head_dim, key.heads_q, key.heads_kv, key.block_size) == \
        ("meta", torch.float16, 96, 8, 2, 32)
    assert (key.decode, key.short_q, key.window, key.softcap, key.sinks, key.offset_bits, key.same_kv_offsets) == \
        (False, True, True, False, False, 32, True)


def test_registry_and_family():
    fam = next(f for f in families() if f.name == "unified")
    assert fam.host == "aiter_unified.bench:host_cases" and fam.warmup == "aiter_unified.bench:warmup_cases"
    key = sized_call(num_tokens=2, num_seqs=1, heads_q=4, heads_kv=2, head_dim=32, max_seqlen_q=2, max_seqlen_k=40,
                     device="cpu").key
    assert select("unified_attention", key, backend="reference").backend == "reference"
    # the reference has no segment buffers: skip_reduce has the Triton backend only
    assert [s.backend for s in specs("unified_attention_segments")] == ["triton"]
    with pytest.raises(UnsupportedError, match="unified_attention_segments"):
        select("unified_attention_segments", key, backend="reference")
    assert "triton" in explain("unified_attention", key)
    # implementations are function objects (an editor can follow them)
    assert all(callable(s.impl) for op in OPS for s in specs(op))


def test_ops_registered_with_fakes():
    assert torch.ops.aiter.unified_attention is ops.unified_attention.op
    assert torch.ops.aiter.unified_attention_segments is ops.unified_attention_segments.op
    with FakeTensorMode():
        q = torch.empty(10, 8, 64, dtype=torch.float16)
        k = torch.empty(20, 16, 2, 64, dtype=torch.float16)
        cu = torch.empty(4, dtype=torch.int32)
        used = torch.empty(3, dtype=torch.int32)
        table = torch.empty(3, 40, dtype=torch.int32)
        args = (q, k, k, torch.empty_like(q), cu, 4, used, 600, 0.1, True, [-1, -1], table, 0.0, None, None, None,
                None, None, None, None, None, False, None)
        segs = torch.ops.aiter.unified_attention_segments(*args)
        assert torch.ops.aiter.unified_attention(*args) is None
    expected = plan(sized_call(num_tokens=10, num_seqs=3, heads_q=8, heads_kv=2, head_dim=64, max_seqlen_q=4,
                               max_seqlen_k=600), skip_reduce=True)[-1].grid[2]
    assert expected >= 2
    assert tuple(segs[0].shape) == (10, 8, expected, 64)
    assert tuple(segs[1].shape) == tuple(segs[2].shape) == (10, 8, expected)
    assert all(s.dtype == torch.float32 for s in segs)
    schema = str(torch.ops.aiter.unified_attention.default._schema)
    assert "Tensor(a3!) out" in schema and schema.count("!") == 1
    assert "str? backend=None" in schema and "bool causal" in schema
    assert str(torch.ops.aiter.unified_attention_segments.default._schema).count("!") == 0


def test_bench_cli_rejects_unknown_shapes():
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
            True, [-1, -1], b.block_table, 0.0, None, None, None, None, None, None, None, torch.randn(4), False,
            "reference")
    result = torch.library.opcheck(torch.ops.aiter.unified_attention.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_opcheck_unified_attention_segments_op():
    """The segments op through the Triton interpreter: its fake's shapes match the real buffers."""
    import os

    if os.environ.get("TRITON_INTERPRET", "0") != "1":
        pytest.skip("runs the Triton kernel: needs TRITON_INTERPRET=1 on the CPU")
    from aiter_unified.testing import make_batch

    b = make_batch([(1, 20), (4, 9)], heads_q=4, heads_kv=2, head_dim=32, block_size=16, dtype=torch.float32,
                   seed=0)
    args = (b.q, b.k, b.v, torch.empty_like(b.q), b.cu_seqlens_q, b.max_seqlen_q, b.seqused_k, b.max_seqlen_k, 0.1,
            True, [-1, -1], b.block_table, 0.0, None, None, None, None, None, None, None, None, False, None)
    result = torch.library.opcheck(torch.ops.aiter.unified_attention_segments.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_bench_machinery_with_sweep(tmp_path, monkeypatch):
    """The benchmark CLI end to end on toy sizes in the interpreter, timing stubbed: every shape
    builds, every config of the sweep runs and matches the default config, the files are written."""
    import json
    import os

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
    monkeypatch.delenv(CONFIG, raising=False)
    rc = bench.main(["--device", "cpu", "--tiny", "--no-ceilings", "--sweep", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "unified.json").read_text())["rows"]
    sweep = [r for r in rows if r["op"] == "sweep"]
    assert len(sweep) == 4 and all(r.get("ms") == 0.25 and not r.get("error") for r in sweep), sweep
    ours = [r for r in rows if r["op"] == "unified_attention" and r["provider"].startswith("unified")]
    assert len(ours) == 9 and all(r.get("ms") == 0.25 for r in ours)
    assert CONFIG not in os.environ
    assert (tmp_path / "unified.md").exists()
