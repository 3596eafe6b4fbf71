"""The `aiter` CLI: info, check, bench and its CPU fallback, and aiter-core's own smoke test."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from aiter_core import cli, registry, smoke
from aiter_core.registry import BackendSpec, Family, Registry


@pytest.fixture(autouse=True)
def _keep_triton_interpret():
    """cli.main sets TRITON_INTERPRET on a machine without GPU; keep that out of other tests."""
    before = os.environ.get("TRITON_INTERPRET")
    yield
    if before is None:
        os.environ.pop("TRITON_INTERPRET", None)
    else:
        os.environ["TRITON_INTERPRET"] = before


def _run_cli(*args, env_extra=None, drop=("TRITON_INTERPRET",)):
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-m", "aiter_core", *args], capture_output=True, text=True,
                          env=env, timeout=600)


# ----------------------------------------------------------------------------- real processes


def test_cli_module_does_not_import_triton():
    # the CLI must be able to set TRITON_INTERPRET before Triton is imported
    code = "import sys, aiter_core.cli; print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the fallback is for machines without GPU")
def test_bench_without_gpu_runs_the_correctness_demo():
    # as the README's first command does: no TRITON_INTERPRET in the environment, the CLI sets it
    # (only the core family: the others' smoke tests are theirs to test)
    result = _run_cli("bench", "core")
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == cli.NO_GPU_MESSAGE
    assert any(line.startswith("PASS core (aiter-core") and "CPU interpreter" in line for line in lines)
    assert lines[-1] == "aiter check: all passed"


def test_info_as_an_h100_would_show_it():
    # AITER_ARCH pretends to be the GPU; on the H100 itself the same fields come from the device
    result = _run_cli("info", env_extra={"AITER_ARCH": "sm_90"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "arch:     sm_90 (cuda, compute capability 9.0)" in out
    assert "SMs:      132" in out
    assert "fp8 type: float8_e4m3fn" in out
    assert "core       aiter-core" in out


# ----------------------------------------------------------------------------- in process


@pytest.fixture
def fake_registry(monkeypatch, tmp_path):
    """A registry without entry points, holding three fake families (smoke/bench functions in a
    throw-away module)."""
    module = tmp_path / "fake_family_mod.py"
    module.write_text(textwrap.dedent("""
        CALLS = []

        def good_smoke():
            return "fine: max err 1e-7\\nsecond line is not shown"

        def bad_smoke():
            raise AssertionError("max error 0.5 > 0.01")

        def good_bench(argv):
            CALLS.append(("good", list(argv)))
            return 0

        def bad_bench(argv):
            CALLS.append(("bad", list(argv)))
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry(discover=False)
    reg.register_family(Family("good", "fake-good", smoke="fake_family_mod:good_smoke",
                               bench="fake_family_mod:good_bench", version="1.0"))
    reg.register_family(Family("bad", "fake-bad", smoke="fake_family_mod:bad_smoke",
                               bench="fake_family_mod:bad_bench", version="2.0"))
    reg.register_family(Family("quiet", "fake-quiet", version="0.1"))
    reg.register(BackendSpec(op="fake_op", backend="triton", impl="fake_family_mod:good_bench", priority=10,
                             available=lambda: "no CUDA/ROCm device visible to torch", distribution="fake-good 1.0"))
    reg.register(BackendSpec(op="fake_op", backend="reference", impl="fake_family_mod:good_bench", priority=0,
                             distribution="fake-good 1.0"))
    monkeypatch.setattr(registry, "_REGISTRY", reg)
    import fake_family_mod

    fake_family_mod.CALLS.clear()
    return fake_family_mod


def test_info_lists_backends_and_why_not(fake_registry, capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "good       fake-good 1.0" in out
    assert "fake_op" in out
    assert "triton     prio 10   fake-good 1.0          not available: no CUDA/ROCm device visible to torch" in out
    assert "-> reference  prio 0" in out and "available" in out


def test_info_json(fake_registry, capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["device"]["arch"] and info["versions"]["torch_version"] == torch.__version__
    assert [f["name"] for f in info["families"]] == ["bad", "good", "quiet"]
    rows = {r["backend"]: r for r in info["ops"]["fake_op"]}
    assert rows["triton"]["available"] is False and "no CUDA" in rows["triton"]["why_not"]
    assert rows["reference"]["default"] is True


def test_check_reports_each_family_and_fails_on_any_failure(fake_registry, capsys):
    assert cli.main(["check"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAIL bad (fake-bad 2.0)") and "AssertionError: max error 0.5 > 0.01" in line
               for line in out)
    assert any(line.startswith("PASS good (fake-good 1.0)") and line.endswith("fine: max err 1e-7") for line in out)
    assert "SKIP quiet (fake-quiet 0.1): declares no smoke test" in out
    assert out[-1] == "aiter check: 1 failed"
    assert cli.main(["check", "good", "quiet"]) == 0


def test_check_unknown_family_is_a_usage_error(fake_registry, capsys):
    assert cli.main(["check", "good", "nope"]) == 2
    assert "unknown family nope; installed: bad, good, quiet" in capsys.readouterr().err


def test_bench_on_gpu_runs_family_benchmarks_with_extra_args(fake_registry, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_gpu_present", lambda: True)
    monkeypatch.setattr(cli, "_interpreting", lambda: False)
    assert cli.main(["bench", "good", "--", "--batch", "4"]) == 0
    assert fake_registry.CALLS == [("good", ["--batch", "4"])]
    assert cli.main(["bench"]) == 1  # bad returns 3
    out = capsys.readouterr().out
    assert "== bad (fake-bad 2.0): exit code 3" in out and "quiet (fake-quiet 0.1): declares no benchmark" in out


def test_bench_without_gpu_falls_back_in_process(fake_registry, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_gpu_present", lambda: False)
    assert cli.main(["bench", "good", "--", "--batch", "4"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == cli.NO_GPU_MESSAGE and "(ignoring benchmark arguments: --batch 4)" in out
    assert fake_registry.CALLS == []  # no benchmark ran
    assert any(line.startswith("PASS good") for line in out)


def test_bench_with_interpreter_forced_on_a_gpu_falls_back(fake_registry, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_gpu_present", lambda: True)
    monkeypatch.setattr(cli, "_interpreting", lambda: True)
    assert cli.main(["bench", "good"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("TRITON_INTERPRET=1: Triton kernels run in the CPU interpreter and cannot be timed")
    assert fake_registry.CALLS == []


def test_extra_args_only_for_bench_and_no_command(fake_registry, capsys):
    assert cli.main(["check", "--", "x"]) == 2
    assert "only passed to `aiter bench`" in capsys.readouterr().err
    assert cli.main([]) == 2


def test_plugin_errors_fail_check_and_show_in_info(fake_registry, capsys):
    fake_registry_errors = [registry.PluginError("aiter.backends", "broken", "aiter-broken 0.0.1", "ImportError: x")]
    registry._REGISTRY._errors.extend(fake_registry_errors)
    assert cli.main(["check", "good"]) == 0  # a named subset is not judged by unrelated plugins
    assert cli.main(["check", "good", "quiet"]) == 0
    capsys.readouterr()
    registry._REGISTRY._families.pop("bad")
    assert cli.main(["check"]) == 1
    assert "FAIL plugin broken (aiter.backends) from aiter-broken 0.0.1: ImportError: x" in capsys.readouterr().out
    assert cli.main(["info"]) == 0
    assert "plugins that failed to load:" in capsys.readouterr().out


# ----------------------------------------------------------------------------- aiter-core's smoke


def test_core_smoke_catches_a_wrong_kernel(monkeypatch):
    monkeypatch.setattr(smoke, "triton_row_softmax", lambda x: torch.softmax(x.float(), -1).to(x.dtype) * 1.01)
    with pytest.raises(AssertionError, match="Triton row softmax torch.float32 on cpu: max error"):
        smoke._check_softmax(torch.device("cpu"), torch.float32)


def test_core_smoke_catches_an_unwritten_element(monkeypatch):
    def forgetful(x):
        out = torch.softmax(x.float(), -1).to(x.dtype)
        out[3, 99] = float("nan")
        return out

    monkeypatch.setattr(smoke, "triton_row_softmax", forgetful)
    with pytest.raises(AssertionError, match=r"row_softmax output: 1 of 700 elements were never written.*\(3, 99\)"):
        smoke._check_softmax(torch.device("cpu"), torch.float32)


def test_core_smoke_kv_quant_roundtrip_and_its_bound(monkeypatch):
    done = smoke._check_kv_quant(torch.device("cpu"))
    assert len(done) == 5 and "PER_TOKEN_4BIT/int4" in done
    from aiter_core import quant

    real = quant.dequantize_kv
    monkeypatch.setattr(quant, "dequantize_kv", lambda *a, **k: real(*a, **k) * 1.05)
    with pytest.raises(AssertionError, match="above the rounding bound"):
        smoke._check_kv_quant(torch.device("cpu"))


def test_triton_row_softmax_argument_checks(monkeypatch):
    with pytest.raises(ValueError, match="x must be 2-D"):
        smoke.triton_row_softmax(torch.ones(3))
    with pytest.raises(TypeError, match="x must be fp32, fp16 or bf16, got torch.int32"):
        smoke.triton_row_softmax(torch.ones(2, 2, dtype=torch.int32))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="x is on the CPU"):
        smoke.triton_row_softmax(torch.ones(2, 2))


def test_core_bench_wiring_with_stubbed_measurements(monkeypatch, tmp_path, capsys):
    # the GPU measurements are stubbed; everything after them (rows, table, files) runs for real
    from aiter_core import bench as bench_mod

    monkeypatch.setattr(smoke, "_has_gpu", lambda: True)
    monkeypatch.setattr(bench_mod, "measure_copy_tbps", lambda device, nbytes: 2.5)
    monkeypatch.setattr(bench_mod, "measure_matmul_tflops", lambda device, n, dtype: 700.0)
    assert smoke.bench(["--copy-bytes", str(1 << 30), "--matmul-n", "8192", "--output-dir", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "core_ceilings.json").read_text())
    assert data["ceilings"] == {"copy_tbps": 2.5, "matmul_tflops": 700.0, "matmul_dtype": "bf16"}
    copy, matmul = data["rows"]
    assert copy["tbps"] == pytest.approx(2.5) and copy["ms"] == pytest.approx(2 * 2**30 / 2.5e12 * 1e3)
    assert matmul["tflops"] == pytest.approx(700.0) and matmul["ratio_to_ceiling"] == pytest.approx(1.0)
    assert (tmp_path / "core_ceilings.md").exists()
    assert "core_ceilings" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
def test_core_bench_refuses_without_gpu(capsys):
    assert smoke.bench([]) == 2
    assert "no GPU found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- GPU tier


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_info_on_the_gpu():
    result = _run_cli("info", drop=("TRITON_INTERPRET", "AITER_ARCH", "AITER_NUM_CU"))
    assert result.returncode == 0, result.stderr[-3000:]
    props = torch.cuda.get_device_properties(0)
    out = result.stdout
    assert f"device:   {props.name}" in out
    if not torch.version.hip:
        assert f"arch:     sm_{props.major}{props.minor} (cuda, compute capability {props.major}.{props.minor})" in out
        assert f"SMs:      {props.multi_processor_count}" in out
    assert "triton:   compiled for the GPU" in out
    if (props.major, props.minor) == (9, 0):  # the H100/H200 this project targets
        assert "SMs:      132" in out and "fp8 type: float8_e4m3fn" in out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_core_smoke_and_bench_on_the_gpu(tmp_path, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "(GPU)" in smoke.run()
    code = smoke.bench(["--copy-bytes", str(1 << 26), "--matmul-n", "2048", "--output-dir", str(tmp_path),
                        "--no-plot"])
    assert code == 0
    data = json.loads((tmp_path / "core_ceilings.json").read_text())
    assert data["ceilings"]["copy_tbps"] > 0.05 and data["ceilings"]["matmul_tflops"] > 1
    assert {r["op"] for r in data["rows"]} == {"copy", "matmul"}


def test_info_shows_caches_and_set_variables(fake_registry, monkeypatch, capsys):
    monkeypatch.setenv("AITER_NUM_CU", "132")
    monkeypatch.setenv("TRITON_CACHE_DIR", "/tmp/some-triton-cache")
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "triton /tmp/some-triton-cache" in out and "C++ JIT" in out
    assert "AITER_NUM_CU=132" in out


def test_warmup_and_bench_host_need_a_gpu(fake_registry, monkeypatch, capsys):
    monkeypatch.setattr(cli, "_gpu_present", lambda: False)
    assert cli.main(["warmup"]) == 2
    assert "needs a GPU" in capsys.readouterr().err
    assert cli.main(["bench", "host"]) == 2
