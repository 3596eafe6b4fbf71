"""The benchmark CLI end to end as a CPU dry run (interpreter, tiny dims, a fake timer): every
provider passes its reference check, the targets are computed and JSON/Markdown are written.
Timing itself needs a GPU; this catches a broken bench before it costs GPU time."""

from __future__ import annotations

import json

import pytest

from aiter_mla import bench
from aiter_mla.testing import INTERPRET

pytestmark = pytest.mark.skipif(not INTERPRET, reason="the dry run drives the Triton kernels on the CPU interpreter")


def test_parse_args_rejects_unknown_shapes_and_providers():
    with pytest.raises(SystemExit):
        bench.parse_args(["--shapes", "mem,huge"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--providers", "flashmla"])
    args = bench.parse_args(["--shapes", "fp8", "--providers", "torch-sdpa"])
    assert args.shapes == ("fp8",) and args.providers == ("torch-sdpa",)


def test_sweep_configs_cover_padding_and_wgmma_rows():
    configs = list(bench._sweep_configs(16))
    assert {c.BLOCK_H for c in configs} == {16, 32, 64}
    assert all(c.num_warps == 8 for c in configs if c.BLOCK_H == 64)


def test_cpu_dry_run_writes_results(monkeypatch, tmp_path):
    import aiter_core.bench as core_bench
    from aiter_core.bench import Ceilings
    from aiter_mla.triton.launch import TileConfig

    monkeypatch.setattr(bench, "DEVICE", "cpu")
    monkeypatch.setattr(bench, "ACT", "float32")
    monkeypatch.setattr(bench, "LORA", 64)
    monkeypatch.setattr(bench, "ROPE", 16)
    monkeypatch.setattr(bench, "PAGE", 16)
    monkeypatch.setattr(bench, "SHAPES", {"mem": dict(batch=2, heads=16, ctx=20, kv="bf16"),
                                          "compute": dict(batch=2, heads=64, ctx=20, kv="bf16"),
                                          "fp8": dict(batch=2, heads=16, ctx=20, kv="fp8")})
    monkeypatch.setattr(bench, "_sweep_configs", lambda heads: [TileConfig(16, 1, 16, 4, 1, 1)])
    calls = []

    def fake_median_ms(fn, warmup=25, rep=100):
        fn()
        calls.append(fn)
        return 1.0 + 0.25 * len(calls)

    monkeypatch.setattr(core_bench, "median_ms", fake_median_ms)
    monkeypatch.setattr(core_bench, "graph_median_ms", fake_median_ms)
    monkeypatch.setattr(core_bench, "measure_ceilings", lambda device: Ceilings(3.0, 700.0))
    assert bench.main(["--out", str(tmp_path), "--quiet", "--sweep"]) == 0
    result = json.loads((tmp_path / "mla.json").read_text())
    rows = result["rows"]
    errors = [r for r in rows if r.get("error")]
    assert not errors, errors
    for shape in ("mem", "compute", "fp8"):
        providers = {r["provider"] for r in rows if r["shape"] == shape}
        assert set(bench.PROVIDERS) <= providers, (shape, providers)
        assert any(p.startswith("best-sweep") for p in providers)
    assert set(result["metadata"]["targets"]) == {"mem_tbps", "compute_tflops", "fp8_speedup_over_bf16"}
    assert (tmp_path / "mla.md").exists()


def test_host_cases_cover_every_public_function_and_run_on_the_cpu():
    """One host case per public function that launches work (``aiter bench host``), each run once
    on CPU tensors (fp16, small dims) through the Triton interpreter."""
    from aiter_mla import api, triton_api

    cases = bench.host_cases("cpu")
    planning_only = {"get_mla_metadata_info_v1", "get_mla_decode_fwd_max_splits"}
    expected = (set(api.__all__) - planning_only) | {f"triton_api.{name}" for name in triton_api.__all__}
    assert sorted(c.op for c in cases) == sorted(expected)
    assert {c.like for c in cases} == {"decode", "prefill"}
    for case in cases:
        case.call()


def test_warmup_cases_include_the_host_cases():
    """``aiter warmup`` compiles what the host benchmark's first calls hit, and more (built here
    on the CPU, not run: the interpreter would take minutes for the 576-wide ones)."""
    cases = bench.warmup_cases("cpu")
    ops = [c.op for c in cases]
    assert set(c.op for c in bench.host_cases("cpu")) <= set(ops)
    assert ops.count("mla_decode_fwd") > 8 and "decode_attention_fwd" in ops
