"""Backend specs, entry points, supports() reasons, selection, and how a Call reaches the Triton
kernels (kernels replaced by recorders, vLLM style) - tier 1, no kernel runs."""

import os
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

import aiter_mha
import aiter_mha.checks
import aiter_mha.ops as mha_ops
from aiter_core.registry import Registry, UnsupportedError, resolve
from aiter_mha.backends import OPS, backend_specs, family, triton_supports
from aiter_mha.checks import Key


def fresh_registry():
    reg = Registry(discover=False)
    for spec in backend_specs():
        reg.register(spec)
    return reg


def key(**over):
    base = dict(device=torch.device("cpu"), dtype=torch.float16, fp8=False, head_dim_qk=64, head_dim_v=64,
                backward=False, paged=False, dropout=False, window=False, bias=False)
    base.update(over)
    return Key(**base)


def test_specs_cover_every_op_with_both_backends_as_functions():
    specs = backend_specs()
    assert set(OPS) == set(mha_ops.OPS)
    assert {(s.op, s.backend) for s in specs} == {(op, b) for op in OPS for b in ("triton", "reference")}
    for s in specs:
        assert callable(s.impl) and not isinstance(s.impl, str), s
        if s.backend == "triton":
            assert s.priority > next(r.priority for r in specs if r.op == s.op and r.backend == "reference")


def test_entry_points_are_declared():
    backends = {ep.name: ep.value for ep in entry_points(group="aiter.backends")}
    families = {ep.name: ep.value for ep in entry_points(group="aiter.families")}
    assert backends.get("mha") == "aiter_mha.backends:backend_specs"
    assert families.get("mha") == "aiter_mha.backends:family"
    for path in (family.smoke, family.bench, family.host, family.warmup):
        assert callable(resolve(path)), path
    assert set(family.ops) == set(OPS)


def test_importing_backends_is_cheap():
    import subprocess
    import sys

    code = "import sys, aiter_mha.backends; print('triton' in sys.modules, 'aiter_mha.triton.launch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_triton_supports_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_supports(key()) == []
    assert any("interpreter" in r for r in triton_supports(key(dtype=torch.bfloat16)))
    assert any("head dim 512 > 256" in r for r in triton_supports(key(head_dim_v=512)))
    assert any("e4m3fn" in r for r in triton_supports(key(dtype=torch.float8_e5m2, fp8=True)))
    assert any("fp8 has no backward" in r for r in triton_supports(key(dtype=torch.float8_e4m3fn, fp8=True, backward=True)))
    assert any("paged" in r for r in triton_supports(key(backward=True, paged=True)))
    fp8_cpu = key(dtype=torch.float8_e4m3fn, fp8=True)
    assert any("fp8 is not supported by the Triton interpreter" in r for r in triton_supports(fp8_cpu))
    # the ops that quantize: high-precision inputs, fp8 kernel
    assert any("fp8 is not supported by the Triton interpreter" in r for r in triton_supports(key(fp8=True)))
    cuda = torch.device("cuda")
    assert triton_supports(key(dtype=torch.float8_e4m3fn, fp8=True, device=cuda)) == []
    assert triton_supports(key(device=cuda, dtype=torch.bfloat16)) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("TRITON_INTERPRET=1" in r for r in triton_supports(key()))


def test_selection_order(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = fresh_registry()
    assert reg.select("mha_fwd", key()).backend == "triton"
    assert reg.select("flash_attn_func", key(dtype=torch.bfloat16)).backend == "reference"  # falls back, with reason
    assert reg.select("mha_fwd", key(), backend="reference").backend == "reference"
    with pytest.raises(UnsupportedError, match="interpreter"):
        reg.select("mha_fwd", key(dtype=torch.bfloat16), backend="triton")
    monkeypatch.setenv("AITER_MHA_BWD_BACKEND", "reference")
    assert reg.select("mha_bwd", key(backward=True)).backend == "reference"
    assert "interpreter" in reg.explain("flash_attn_func", key(dtype=torch.bfloat16))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fresh_registry().select("mha_fwd", key()).backend == "reference"  # CPU without the interpreter


def test_op_runs_the_selected_backend_with_the_validated_call(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    seen = []

    def recording_fwd(call):
        seen.append(call)
        out = torch.full((*call.q.shape[:-1], call.v.shape[-1]), 7.0, dtype=call.q.dtype)
        lse = torch.full((call.q.shape[0], call.q.shape[2], call.q.shape[1]), 3.0)
        return mha_ops.fwd_result(call, out, lse, None, torch.zeros(2, dtype=torch.int64))

    monkeypatch.setattr("aiter_mha.triton.launch.fwd", recording_fwd)
    q, k, v = torch.randn(1, 3, 4, 16).half(), torch.randn(1, 5, 2, 16).half(), torch.randn(1, 5, 2, 8).half()
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, return_lse=True, backend="triton")
    call = seen[-1]
    assert torch.all(out == 7) and torch.all(lse == 3)
    assert call.causal and call.window_right == 0 and call.window_left == -1 and call.return_lse
    assert call.softmax_scale == 16 ** -0.5 and call.key.window and not call.key.backward
    seen.clear()
    ref = aiter_mha.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16())  # bf16 on the CPU: the reference
    assert seen == [] and ref.dtype == torch.bfloat16


def test_direct_torch_ops_call_goes_through_the_same_check(monkeypatch):
    seen = []
    monkeypatch.setattr("aiter_mha.triton.launch.fwd", lambda call: seen.append(call) or mha_ops.fwd_result(
        call, torch.zeros(2, 3, 4, 16), torch.zeros(2, 4, 3), None, torch.zeros(2, dtype=torch.int64)))
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    q, k, v = torch.randn(2, 3, 4, 16), torch.randn(2, 5, 2, 16), torch.randn(2, 5, 2, 16)
    torch.ops.aiter.flash_attn_func(q, k, v, 0.0, None, True, [4, -1, 1], backend="triton")
    call = seen[-1]
    assert (call.window_left, call.window_right, call.sink_size) == (4, 0, 1)


# -- Call -> kernel launch (kernels replaced by recorders) ----------------------------------------------


@pytest.fixture
def launches(monkeypatch):
    """Replaces the Triton kernels by recorders: each launch is recorded as name -> argument."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    from aiter_mha.triton import launch

    calls = SimpleNamespace(fwd=[], dkdv=[], dq=[], pre=[])

    class Recorder:
        def __init__(self, kernel, sink):
            self.arg_names, self.sink = kernel.arg_names, sink

        def __getitem__(self, grid):
            def record(*args, **kwargs):
                self.sink.append(SimpleNamespace(grid=grid, **dict(zip(self.arg_names, args)), **kwargs))

            return record

    for name, sink in (("flash_fwd_kernel", calls.fwd), ("bwd_dkdv_kernel", calls.dkdv), ("bwd_dq_kernel", calls.dq),
                       ("bwd_preprocess_kernel", calls.pre)):
        monkeypatch.setattr(launch, name, Recorder(getattr(launch, name), sink))
    return calls


def test_dense_forward_and_backward_reach_the_kernels(launches):
    q = torch.randn(2, 4, 4, 16, requires_grad=True)
    k = torch.randn(2, 6, 2, 16, requires_grad=True)
    v = torch.randn(2, 6, 2, 16, requires_grad=True)
    sink = torch.randn(4, requires_grad=True)
    bias = torch.randn(4, 6, requires_grad=True)
    slopes = torch.rand(4)
    out = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.1, softmax_scale=0.5, causal=True, window_size=(3, -1, 1),
                                    bias=bias, alibi_slopes=slopes, sink_ptr=sink, logits_soft_cap=4.0,
                                    deterministic=True, backend="triton")
    f = launches.fwd[-1]
    assert f.HAS_WINDOW and f.HAS_LEFT and (f.win_left, f.win_right, f.sink_size) == (3, 0, 1)
    assert f.HAS_SOFTCAP and f.softcap_inv_scale == 0.5 / 4.0 and f.HAS_BIAS and f.bias is bias
    assert f.HAS_ALIBI and f.HAS_SINK and f.sink is sink and f.HAS_DROPOUT and f.dropout_p == 0.1
    assert f.rng_state.dtype == torch.int64 and f.rng_state.shape == (2,) and f.STORE_LSE
    assert not f.IS_VARLEN and not f.PAGED and f.Out is not None and f.grid == (1, 4, 2)
    out.sum().backward()
    b = launches.dkdv[-1]
    assert b.DBIAS_MODE == 2  # deterministic: a per-(batch, head) buffer reduced in a fixed order
    assert (b.win_left, b.win_right, b.sink_size) == (3, 0, 1) and b.HAS_SOFTCAP and b.HAS_DROPOUT
    assert torch.equal(b.rng_state, f.rng_state)  # the backward replays the forward's dropout
    assert launches.pre[-1].HAS_SINK and launches.dq[-1].REVERSE_M
    assert q.grad is not None and sink.grad is not None and bias.grad is not None


def test_batch_padding_becomes_padded_varlen(launches):
    q, k, v = torch.randn(2, 4, 2, 16), torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    cu_q = torch.tensor([0, 4, 7], dtype=torch.int32)
    out, lse = aiter_mha.flash_attn_func(q, k, v, cu_seqlens_q=cu_q, return_lse=True, backend="triton")
    f = launches.fwd[-1]
    assert f.Q.shape == (8, 2, 16) and f.K.shape == (12, 2, 16) and f.IS_VARLEN and f.HAS_SEQSTART
    assert torch.equal(f.seqstart_q, torch.tensor([0, 4, 8], dtype=torch.int32))
    assert torch.equal(f.seqstart_k, torch.tensor([0, 6, 12], dtype=torch.int32))
    assert f.cu_seqlens_q is cu_q and torch.equal(f.cu_seqlens_k, f.seqstart_k)  # full key lengths
    assert f.grid == (1, 2, 2) and f.dmask_cols == 6 and f.K_LEN_MODE == 1
    assert out.shape == (2, 4, 2, 16) and lse.shape == (2, 2, 4)
    assert torch.isneginf(lse[1, :, 3]).all()  # row past length 3


def test_paged_varlen_and_kvcache_reach_the_kernel(launches):
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(3, 4, 16)
    k_cache, v_cache = torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    with torch.no_grad():
        aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 2, 12, causal=True, block_table=table,
                                         backend="triton")
    f = launches.fwd[-1]
    assert f.block_table is table and f.cu_seqlens_k is cu_k and f.PAGED and f.K_LEN_MODE == 1
    assert (f.page_size, f.num_logical_blocks, f.num_physical_blocks) == (4, 3, 6) and not f.HAS_SEQSTART
    assert f.grid == (1, 4, 2) and f.win_right == 0 and not f.HAS_LEFT
    lens = torch.tensor([5, 7], dtype=torch.int32)
    aiter_mha.flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), k_cache, v_cache, cache_seqlens=lens,
                                      block_table=table[:, :2], backend="triton")
    f = launches.fwd[-1]
    assert f.PAGED and not f.IS_VARLEN and f.K_LEN_MODE == 2 and f.seqlens_k is lens and f.dmask_cols == 8
    # a contiguous cache: one page of the whole capacity per sequence, row b for sequence b
    aiter_mha.flash_attn_with_kvcache(torch.randn(2, 1, 4, 16), k_cache.reshape(3, 8, 2, 16),
                                      v_cache.reshape(3, 8, 2, 16), cache_seqlens=3, backend="triton")
    f = launches.fwd[-1]
    assert f.PAGED and f.page_size == 8 and f.num_physical_blocks == 3 and f.block_table.tolist() == [[0], [1]]
    assert f.seqlens_k.tolist() == [3, 3]


@pytest.mark.interpreter
@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="runs the Triton kernels: needs TRITON_INTERPRET=1")
def test_bench_sweep_machinery_on_cpu(monkeypatch, tmp_path):
    """The benchmark's sweep, refcheck, peer handling and writers, with a fake timer (no GPU)."""
    import json

    import aiter_core.bench as core_bench
    from aiter_mha.bench import main

    monkeypatch.setattr(core_bench, "median_ms", lambda fn, **kw: (fn(), 0.5)[1])
    code = main(["--device", "cpu", "--dtype", "fp16", "--dims", "16", "--seqlens", "32", "--total-tokens", "64",
                 "--hidden", "32", "--causal", "yes", "--providers", "aiter-triton,sdpa-flash,sdpa-cudnn",
                 "--no-ceilings", "--quiet", "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "mha.json").read_text())
    ours = [r for r in data["rows"] if r["provider"] == "aiter-triton"]
    assert {r["op"] for r in ours} == {"fwd", "bwd"} and all(r["tflops"] > 0 and not r.get("error") for r in ours)
    assert all(r["b"] == 2 and r["h"] == 2 and r["s"] == 32 and r["causal"] for r in ours)
    assert (tmp_path / "mha.md").exists()


def test_config_overrides_reach_their_kernel(launches, monkeypatch):
    """AITER_MHA_FWD_CONFIG, AITER_MHA_BWD_DKDV_CONFIG and AITER_MHA_BWD_DQ_CONFIG each replace the
    fields they name of one kernel's config (aiter_core.configs' syntax), nothing else."""
    from aiter_mha.triton.launch import bwd_tiles, fwd_tiles

    q = torch.randn(1, 40, 2, 64, requires_grad=True)
    k, v = torch.randn(1, 40, 2, 64, requires_grad=True), torch.randn(1, 40, 2, 64, requires_grad=True)
    call_key = aiter_mha.checks.flash_attn_func(q, k, v).key
    default_fwd, (default_kv, default_q) = fwd_tiles(call_key), bwd_tiles(call_key._replace(backward=True))
    monkeypatch.setenv("AITER_MHA_FWD_CONFIG", "BLOCK_N=16,num_stages=1")
    monkeypatch.setenv("AITER_MHA_BWD_DQ_CONFIG", "BLOCK_M=32")
    out = aiter_mha.flash_attn_func(q, k, v, backend="triton")
    out.sum().backward()
    f, kv, dq = launches.fwd[-1], launches.dkdv[-1], launches.dq[-1]
    assert (f.BLOCK_M, f.BLOCK_N, f.num_stages, f.num_warps) == (default_fwd.BLOCK_M, 16, 1, default_fwd.num_warps)
    assert (kv.BLOCK_M, kv.BLOCK_N, kv.num_stages) == (default_kv.BLOCK_M, default_kv.BLOCK_N, default_kv.num_stages)
    assert (dq.BLOCK_M, dq.BLOCK_N) == (32, default_q.BLOCK_N)
    monkeypatch.setenv("AITER_MHA_BWD_DKDV_CONFIG", "BLOCK_M=64,num_warps=4")
    monkeypatch.setenv("AITER_MHA_FWD_CONFIG", "BLOCK_Q=16")
    with pytest.raises(ValueError, match="AITER_MHA_FWD_CONFIG: unknown field"):
        aiter_mha.flash_attn_func(q, k, v, backend="triton")
    monkeypatch.delenv("AITER_MHA_FWD_CONFIG")
    aiter_mha.flash_attn_func(q, k, v, backend="triton").sum().backward()
    assert (launches.dkdv[-1].BLOCK_M, launches.dkdv[-1].num_warps) == (64, 4)


def test_dq_atomic_switch(launches, monkeypatch):
    q, k, v = (torch.randn(1, 40, 2, 64, requires_grad=True) for _ in range(3))
    monkeypatch.setenv("AITER_MHA_DQ_ATOMIC", "1")
    launches.dq.clear()
    aiter_mha.flash_attn_func(q, k, v, deterministic=False, backend="triton").sum().backward()
    assert launches.dkdv[-1].DQ_ATOMIC and launches.dq == []  # dQ accumulated by the dK/dV kernel
    aiter_mha.flash_attn_func(q, k, v, deterministic=True, backend="triton").sum().backward()
    assert not launches.dkdv[-1].DQ_ATOMIC and len(launches.dq) == 1  # never with deterministic=True
