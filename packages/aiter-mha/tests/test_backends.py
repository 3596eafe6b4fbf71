"""Backend specs, entry points, supports() reasons, selection and the Triton adaptors' argument
mapping (kernels replaced by recorders, vLLM style) - tier 1, no kernel runs."""

import os
from importlib.metadata import entry_points
from types import SimpleNamespace

import pytest
import torch

import aiter_mha
import aiter_mha.ops as mha_ops
from aiter_core.registry import Problem, Registry, UnsupportedError, resolve
from aiter_mha.backends import OPS, backend_specs, family, triton_supports


def fresh_registry():
    reg = Registry(discover=False)
    for spec in backend_specs():
        reg.register(spec)
    return reg


def problem(**over):
    base = dict(op="mha_fwd", device=torch.device("cpu"), device_type="cpu", dtype=torch.float16, fp8=False,
                head_dim_qk=64, head_dim_v=64, heads_q=8, heads_kv=2, backward=False, varlen=False,
                batch_padding=False, paged=False, padded=False, dropout=False, bias=False, alibi=False, sink=False,
                softcap=False, window=(-1, -1, 0), deterministic=False, page_size=None)
    base.update(over)
    return Problem(**base)


def test_specs_cover_every_op_with_both_backends_and_resolve():
    specs = backend_specs()
    assert {(s.op, s.backend) for s in specs} == {(op, b) for op in OPS for b in ("triton", "reference")}
    for s in specs:
        assert callable(resolve(s.impl)), s.impl
        if s.backend == "triton":
            assert s.priority > next(r.priority for r in specs if r.op == s.op and r.backend == "reference")


def test_entry_points_are_declared():
    backends = {ep.name: ep.value for ep in entry_points(group="aiter.backends")}
    families = {ep.name: ep.value for ep in entry_points(group="aiter.families")}
    assert backends.get("mha") == "aiter_mha.backends:backend_specs"
    assert families.get("mha") == "aiter_mha.backends:family"
    assert callable(resolve(family.smoke)) and callable(resolve(family.bench)) and set(family.ops) == set(OPS)


def test_triton_supports_reasons(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert triton_supports(problem()) == []
    assert any("interpreter" in r for r in triton_supports(problem(dtype=torch.bfloat16)))
    assert any("head dim 512 > 256" in r for r in triton_supports(problem(head_dim_v=512)))
    assert any("e4m3fn" in r for r in triton_supports(problem(dtype=torch.float8_e5m2, fp8=True)))
    assert any("fp8 has no backward" in r for r in triton_supports(problem(dtype=torch.float8_e4m3fn, fp8=True, backward=True)))
    assert any("paged" in r for r in triton_supports(problem(backward=True, paged=True)))
    fp8_cpu = problem(dtype=torch.float8_e4m3fn, fp8=True)
    assert any("fp8 is not supported by the Triton interpreter" in r for r in triton_supports(fp8_cpu))
    assert triton_supports(problem(dtype=torch.float8_e4m3fn, fp8=True, device=torch.device("cuda"), device_type="cuda")) == []
    assert triton_supports(problem(device=torch.device("cuda"), device_type="cuda", dtype=torch.bfloat16)) == []
    monkeypatch.delenv("TRITON_INTERPRET")
    assert any("TRITON_INTERPRET=1" in r for r in triton_supports(problem()))


def test_selection_order(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = fresh_registry()
    assert reg.select("mha_fwd", problem()).backend == "triton"
    assert reg.select("mha_fwd", problem(dtype=torch.bfloat16)).backend == "reference"  # falls back, with reason
    assert reg.select("mha_fwd", problem(), backend="reference").backend == "reference"
    with pytest.raises(UnsupportedError, match="interpreter"):
        reg.select("mha_fwd", problem(dtype=torch.bfloat16), backend="triton")
    monkeypatch.setenv("AITER_MHA_BWD_BACKEND", "reference")
    assert reg.select("mha_bwd", problem(op="mha_bwd", backward=True)).backend == "reference"
    assert "interpreter" in reg.explain("mha_fwd", problem(dtype=torch.bfloat16))
    monkeypatch.delenv("TRITON_INTERPRET")
    assert fresh_registry().select("mha_fwd", problem()).backend == "reference"  # CPU without the interpreter


def test_op_body_runs_the_selected_implementation_and_returns_its_result(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = fresh_registry()
    seen = []

    def fake_triton(**kw):
        seen.append(kw)
        q, v = kw["q"], kw["v"]
        out = torch.full((*q.shape[:-1], v.shape[-1]), 7.0, dtype=q.dtype)
        return out, torch.full((q.shape[0], q.shape[2], q.shape[1]), 3.0), None

    def recording_dispatch(op, problem=None, backend=None):
        spec = reg.select(op, problem, backend)
        seen.append(spec.backend)
        return fake_triton if spec.backend == "triton" else reg.load_impl(spec)

    monkeypatch.setattr(mha_ops, "dispatch", recording_dispatch)
    q, k, v = torch.randn(1, 3, 4, 16).half(), torch.randn(1, 5, 2, 16).half(), torch.randn(1, 5, 2, 8).half()
    out, lse = aiter_mha.flash_attn_func(q, k, v, causal=True, return_lse=True)
    assert seen[0] == "triton" and torch.all(out == 7) and torch.all(lse == 3)
    assert seen[1]["is_causal"] and seen[1]["window_size_right"] == 0 and seen[1]["return_softmax_lse"]
    seen.clear()
    aiter_mha.flash_attn_func(q.bfloat16(), k.bfloat16(), v.bfloat16())
    assert seen == ["reference"]


# -- adaptors: contract mapping (kernels replaced by recorders) -------------------------------------


@pytest.fixture
def fake_kernels(monkeypatch):
    calls = SimpleNamespace(fwd=[], bwd=[])

    def flash_fwd(q, k, v, **kw):
        calls.fwd.append(SimpleNamespace(q=q, k=k, v=v, **kw))
        varlen = kw.get("cu_seqlens_q") is not None
        hq = q.shape[-2]
        out = kw.get("out")
        if out is None:
            out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
        out.fill_(1.0)
        lse = torch.zeros(hq, q.shape[0]) if varlen else torch.zeros(q.shape[0], hq, q.shape[1])
        return out, lse, None

    def flash_bwd(do, q, k, v, out, lse, **kw):
        calls.bwd.append(SimpleNamespace(do=do, q=q, k=k, v=v, out=out, lse=lse, **kw))
        dq = kw.get("dq") if kw.get("dq") is not None else torch.empty_like(q)
        dk = kw.get("dk") if kw.get("dk") is not None else torch.empty_like(k)
        dv = kw.get("dv") if kw.get("dv") is not None else torch.empty_like(v)
        for t in (dq, dk, dv):
            t.fill_(2.0)
        hq = q.shape[-2]
        delta = torch.zeros_like(lse)
        dsink = torch.full((hq,), 5.0) if kw.get("sink") is not None else None
        dbias = torch.full(kw["bias"].shape, 6.0) if kw.get("compute_dbias") else None
        return dq, dk, dv, delta, dsink, dbias

    monkeypatch.setattr("aiter_mha.triton.fwd.flash_fwd", flash_fwd)
    monkeypatch.setattr("aiter_mha.triton.bwd.flash_bwd", flash_bwd)
    # a private registry so triton counts as available here whatever this process saw first
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reg = fresh_registry()
    monkeypatch.setattr(mha_ops, "dispatch", reg.dispatch)
    return calls


def test_triton_adaptor_dense_forward_and_backward_mapping(fake_kernels):
    q = torch.randn(2, 4, 4, 16, requires_grad=True)
    k = torch.randn(2, 6, 2, 16, requires_grad=True)
    v = torch.randn(2, 6, 2, 16, requires_grad=True)
    sink = torch.randn(4, requires_grad=True)
    bias = torch.randn(4, 6, requires_grad=True)
    slopes = torch.rand(4)
    out = aiter_mha.flash_attn_func(q, k, v, dropout_p=0.1, softmax_scale=0.5, causal=True, window_size=(3, -1, 1),
                                    bias=bias, alibi_slopes=slopes, sink_ptr=sink, logits_soft_cap=4.0,
                                    deterministic=True, backend="triton")
    f = fake_kernels.fwd[-1]
    assert f.softmax_scale == 0.5 and f.causal and f.window == (3, 0, 1) and f.softcap == 4.0
    assert f.sink is sink and f.bias is bias and f.alibi_slopes is slopes and f.dropout_p == 0.1
    assert f.rng_state.dtype == torch.int64 and f.rng_state.shape == (2,) and f.return_lse
    assert getattr(f, "cu_seqlens_q", None) is None and torch.all(out == 1)
    out.sum().backward()
    b = fake_kernels.bwd[-1]
    assert b.deterministic and b.compute_dbias and b.window == (3, 0, 1) and b.softcap == 4.0
    assert torch.equal(b.rng_state, f.rng_state)  # the backward replays the forward's dropout
    assert torch.all(q.grad == 2) and torch.all(sink.grad == 5) and torch.all(bias.grad == 6)


def test_triton_adaptor_batch_padding_becomes_padded_varlen(fake_kernels):
    q, k, v = torch.randn(2, 4, 2, 16), torch.randn(2, 6, 2, 16), torch.randn(2, 6, 2, 16)
    cu_q = torch.tensor([0, 4, 7], dtype=torch.int32)
    out, lse = aiter_mha.flash_attn_func(q, k, v, cu_seqlens_q=cu_q, return_lse=True, backend="triton")
    f = fake_kernels.fwd[-1]
    assert f.q.shape == (8, 2, 16) and f.k.shape == (12, 2, 16)
    assert torch.equal(f.seqstart_q, torch.tensor([0, 4, 8], dtype=torch.int32))
    assert torch.equal(f.seqstart_k, torch.tensor([0, 6, 12], dtype=torch.int32))
    assert f.cu_seqlens_q is cu_q and torch.equal(f.cu_seqlens_k, f.seqstart_k)  # full key lengths
    assert f.max_seqlen_q == 4 and f.max_seqlen_k == 6
    assert out.shape == (2, 4, 2, 16) and lse.shape == (2, 2, 4)
    assert torch.isneginf(lse[1, :, 3]).all() and (lse[1, :, :3] == 0).all()  # row past length 3


def test_triton_adaptor_varlen_paged_mapping(fake_kernels):
    cu_q = torch.tensor([0, 1, 3], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 12], dtype=torch.int32)
    q = torch.randn(3, 4, 16)
    k_cache, v_cache = torch.randn(6, 4, 2, 16), torch.randn(6, 4, 2, 16)
    table = torch.tensor([[0, 1, 2], [3, 4, 5]], dtype=torch.int32)
    aiter_mha.flash_attn_varlen_func(q, k_cache, v_cache, cu_q, cu_k, 2, 12, causal=True, block_table=table, backend="triton")
    f = fake_kernels.fwd[-1]
    assert f.block_table is table and f.cu_seqlens_k is cu_k and f.max_seqlen_q == 2 and f.max_seqlen_k == 12
    assert getattr(f, "seqstart_q", None) is None and f.window == (-1, 0, 0)


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
