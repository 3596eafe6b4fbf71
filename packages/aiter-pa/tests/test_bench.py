"""The benchmark CLI's machinery on the CPU (interpreter, toy sizes, timing stubbed): it must build
every case, pass its refcheck, fill every row kind and write JSON / Markdown / PNG. The GPU run
itself is `python -m aiter_pa.bench` on the device."""

from __future__ import annotations

import json
import os

import pytest

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") != "1",
                                reason="the CPU run of the bench machinery needs TRITON_INTERPRET=1")


def test_bench_machinery_writes_every_row_kind(tmp_path, monkeypatch, capsys):
    from aiter_pa import bench

    times = {"n": 0}

    def fake_ms(fn):
        fn()  # the timed callable must run
        times["n"] += 1
        return 0.5

    monkeypatch.setattr(bench, "_graph_ms", fake_ms)
    monkeypatch.setattr(bench, "_eager_ms", fake_ms)
    rc = bench.main(["--device", "cpu", "--tiny", "--providers", "aiter", "--no-ceilings", "--out", str(tmp_path),
                     "--shapes", "bf16-ctx4k,fp8-token-ctx4k", "--quiet"])
    assert rc == 0
    assert "building" not in capsys.readouterr().err, "--quiet must silence the progress lines"
    data = json.loads((tmp_path / "pa_decode.json").read_text())
    ops = {(r["op"], r["provider"]) for r in data["rows"]}
    assert ("decode", "aiter") in ops and ("decode-eager", "aiter") in ops
    assert {("decode-partitions", f"aiter P={p}") for p in (1, 2, 4, 8)} <= ops
    hp = {r["provider"]: r["max_err"] for r in data["rows"] if r["op"] == "high-precision"}
    assert set(hp) == {"aiter hp=0", "aiter hp=1", "aiter hp=2"} and hp["aiter hp=1"] < 1e-4
    assert all(r["tbps"] and r["tbps"] > 0 for r in data["rows"] if r.get("ms"))
    assert data["metadata"]["speedup_fp8-token-ctx4k_over_bf16"] == 1.0
    assert (tmp_path / "pa_decode.md").exists() and (tmp_path / "pa_decode.png").exists()
    assert times["n"] >= 12


def test_bench_status_lines_follow_quiet(capsys):
    from aiter_pa import bench

    bench._status(bench.parse_args([]), "building a cache ...")
    assert "building a cache" in capsys.readouterr().err
    bench._status(bench.parse_args(["--quiet"]), "building a cache ...")
    assert capsys.readouterr().err == ""


def test_flex_peer_attends_to_each_sequence_own_blocks():
    """The FlexAttention peer's block mask over the shared block pool (eager FlexAttention on the
    CPU): each decode query must see exactly its own sequence's cached tokens."""
    from aiter_pa.bench import _case, _flex, _max_err

    shape = dict(b=3, hq=4, hkv=2, d=32, ctx=40, bs=16, quant="none")
    kv, q = _case(shape, "HND", device="cpu")
    out = _flex(kv, q, shape, compile=False)()
    assert out.shape == q.shape
    assert _max_err(out, kv, q) < 1e-4


# public functions that launch no work (sizes, buffers, a routing rule)
NO_LAUNCH = {"paged_attention_workspace_size", "decode_partials", "should_use_asm_kernel"}


def test_host_cases_cover_every_public_op_and_run_on_cpu():
    """``aiter bench host``'s cases: one per public function that launches work, in ``api.__all__``
    order; each runs once here (interpreter, fp16) without error."""
    from aiter_core.host import HostCase
    from aiter_pa import api
    from aiter_pa.bench import host_cases

    cases = host_cases("cpu")
    assert all(isinstance(c, HostCase) and c.like in ("decode", "prefill") for c in cases)
    assert [c.op for c in cases] == [name for name in api.__all__ if name not in NO_LAUNCH]
    for case in cases:
        case.call()


def test_warmup_cases_cover_the_default_specialisations():
    from aiter_core.host import HostCase
    from aiter_pa.bench import warmup_cases

    cases = warmup_cases("cpu")
    assert all(isinstance(c, HostCase) for c in cases)
    names = [c.op for c in cases]
    for dtype in ("bfloat16", "float16"):
        for d in (64, 128):
            tag = f"{dtype} d{d}"
            for form in ("none", "none, split", "per_tensor_8bit", "per_token_8bit"):
                assert f"paged_attention_decode ({tag}, {form})" in names
            assert f"context_attention_fwd ({tag})" in names and f"reshape_and_cache fp8 ({tag})" in names
    # one of each kind runs here (fp16: the interpreter has no bf16)
    seen = set()
    for case in cases:
        kind = case.op.split(" (")[0] + ("-fp8" if "8bit" in case.op or "fp8" in case.op else "")
        if "float16 d64" in case.op and "bfloat16" not in case.op and kind not in seen:
            seen.add(kind)
            case.call()
    assert len(seen) >= 6
