"""The host benchmark's machinery (aiter_core.host) on the CPU, with a stand-in family."""

import json
import re
from pathlib import Path

import pytest
import torch

from aiter_core import env, host, registry
from aiter_core.host import HostCase

CALLS = []


def demo_host_cases(device):
    x = torch.ones(4, device=device)
    return [HostCase("demo_decode", lambda: CALLS.append("d") or x.add_(1)),
            HostCase("demo_prefill", lambda: CALLS.append("p") or x.mul_(1), like="prefill")]


def demo_warmup_cases(device):
    return [HostCase("demo_decode", lambda: CALLS.append("w"))]


def broken_host_cases(device):
    def boom():
        raise RuntimeError("kernel exploded")

    return [HostCase("broken_op", boom)]


@pytest.fixture
def demo_family(monkeypatch):
    fam = registry.Family(name="demo", distribution="aiter-demo", host=f"{__name__}:demo_host_cases",
                          warmup=f"{__name__}:demo_warmup_cases")
    broken = registry.Family(name="broken", distribution="aiter-broken", host=f"{__name__}:broken_host_cases")
    monkeypatch.setattr(registry, "families", lambda: [fam, broken])
    CALLS.clear()
    return fam


def test_host_rows_time_every_case_next_to_sdpa(demo_family):
    rows = host.host_rows("cpu", calls=5)
    by_op = {r["op"]: r for r in rows}
    assert {r["provider"] for r in rows} == {"torch-sdpa", "aiter-demo", "aiter-broken"}
    assert by_op["scaled_dot_product_attention (decode)"]["us_per_call"] > 0
    decode, prefill = by_op["demo_decode"], by_op["demo_prefill"]
    sdpa = {r["like"]: r["us_per_call"] for r in rows if r["provider"] == "torch-sdpa"}
    assert decode["ratio_to_sdpa"] == pytest.approx(decode["us_per_call"] / sdpa["decode"], rel=0.05, abs=0.01)
    assert prefill["ratio_to_sdpa"] == pytest.approx(prefill["us_per_call"] / sdpa["prefill"], rel=0.05, abs=0.01)
    assert CALLS.count("d") == 20 + 5 * 5  # warm-up calls, then 5 loops of 5
    assert by_op["broken_op"]["us_per_call"] is None and "kernel exploded" in by_op["broken_op"]["error"]


def test_first_call_and_warmup(demo_family):
    seconds = host.first_call_seconds("cpu", ["demo"])
    assert set(seconds) == {"aiter-demo:demo_decode", "aiter-demo:demo_prefill"}
    assert all(s >= 0 for s in seconds.values())
    assert host.warmup("cpu", ["demo"], quiet=True)[0] == 1 and CALLS[-1] == "w"


def test_main_writes_the_table(demo_family, tmp_path, capsys):
    assert host.main(["--no-first-call", "--calls", "3", "--device", "cpu", "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "host.json").read_text())
    assert data["metadata"]["command"].endswith("-m aiter_core.bench host --no-first-call --calls 3 --device cpu "
                                                f"--out {tmp_path}")
    assert {r["op"] for r in data["rows"]} >= {"demo_decode", "demo_prefill", "scaled_dot_product_attention (decode)"}
    assert (tmp_path / "host.md").exists()


def test_every_aiter_variable_in_the_sources_is_listed():
    root = Path(__file__).resolve().parents[3]
    names = set()
    for path in root.glob("packages/*/src/**/*.py"):
        names.update(re.findall(r"\bAITER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
    patterns = [re.compile("^" + re.escape(v.name).replace(re.escape("<OP>"), "[A-Z0-9_]+") + "$")
                for v in env.VARIABLES]
    missing = sorted(n for n in names if not any(p.match(n) for p in patterns))
    assert not missing, f"AITER_* variables read but not listed in aiter_core.env.VARIABLES: {missing}"


def test_fast_env_reads_follow_os_environ(monkeypatch):
    monkeypatch.setenv("AITER_DEMO_OP_BACKEND", "reference")
    assert env.get("AITER_DEMO_OP_BACKEND") == "reference"
    monkeypatch.delenv("AITER_DEMO_OP_BACKEND")
    assert env.get("AITER_DEMO_OP_BACKEND", "x") == "x"
    monkeypatch.setenv("AITER_NUM_CU", "7")
    assert env.set_variables()["AITER_NUM_CU"] == "7"


def test_warmup_shards_split_the_cases(demo_family):
    CALLS.clear()
    many = [HostCase(f"op{i}", lambda i=i: CALLS.append(i)) for i in range(7)]
    import aiter_core.host as h

    real = h.family_cases
    try:
        h.family_cases = lambda kind, device, names=(): [("aiter-demo", c) for c in many]
        done = [h.warmup("cpu", quiet=True, shard=(i, 3))[0] for i in range(3)]
    finally:
        h.family_cases = real
    assert done == [3, 2, 2] and sorted(CALLS) == list(range(7))
