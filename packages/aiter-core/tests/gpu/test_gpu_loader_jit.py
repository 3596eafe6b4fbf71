"""GPU tests of the asm loader (cubin launch through cuda.bindings) and the JIT builder (a tiny
CUDA module). They run only where torch sees a CUDA device; the kernels sit in ../data:
asm_test_kernels.cu beside its sm_90a cubin and manifest.csv, jit_vector_add{.cu,_bind.cpp}.

Run: pytest -s -m gpu packages/aiter-core/tests/gpu/test_gpu_loader_jit.py
A summary of what ran is written at the end of the module."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from aiter_core import jit, loader
from aiter_core.loader import LoaderError, Manifest, f32, i32, i64

DATA = Path(__file__).resolve().parent.parent / "data"
CUBIN = DATA / "asm_test_kernels.sm_90a.cubin"

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (torch.cuda.is_available() is False)"),
]

SUMMARY: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    lines = ["aiter GPU loader/JIT summary:"] + [f"  {s}" for s in SUMMARY]
    for line in lines:
        if reporter is not None:
            reporter.write_line(line)
        else:  # pragma: no cover
            print(line)


def _device_desc() -> str:
    major, minor = torch.cuda.get_device_capability()
    return f"{torch.cuda.get_device_name()} (sm_{major}{minor})"


def _require_loader():
    reason = loader.available()
    if reason is not None:
        pytest.skip(f"asm loader unavailable: {reason}")


def _require_hopper():
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip(f"the test cubin is sm_90a; this device is {_device_desc()}")


def _scaled_add_ref(x, y, alpha):
    return (alpha * x.double() + y.double()).float()


def _nan_like(x):
    return torch.full_like(x, float("nan"))


@pytest.mark.parametrize("index_bits", [32, 64])
def test_loader_launches_manifest_kernel_with_signature(index_bits):
    _require_loader()
    _require_hopper()
    manifest = Manifest.from_file(DATA / "manifest.csv")
    count_type = "i32" if index_bits == 32 else "i64"
    kernel = manifest.load_kernel(
        signature=("tensor", "tensor", "tensor", "f32", count_type), dtype="fp32", index_bits=index_bits
    )
    n = 1_000_003  # not a multiple of the block: the tail guard matters
    x = torch.randn(n, device="cuda")
    y = torch.randn(n, device="cuda")
    out = _nan_like(x)
    alpha = 0.37
    kernel.launch(math.ceil(n / 256), 256, [x, y, out, alpha, n])
    torch.cuda.synchronize()
    assert torch.isfinite(out).all(), "some outputs were not written"
    torch.testing.assert_close(out, _scaled_add_ref(x, y, alpha), rtol=1e-6, atol=1e-6)
    SUMMARY.append(f"loader: {kernel.name} (manifest index_bits={index_bits}) n={n} OK on {_device_desc()}")


def test_loader_typed_args_cache_and_errors():
    _require_loader()
    _require_hopper()
    code = loader.load_code_object(CUBIN)
    assert loader.load_code_object(CUBIN) is code  # module cache: path + device
    assert code.target is not None and code.target.name == "sm_90a"
    kernel = code.kernel("scaled_add_f32_i64")
    n = 4099
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = _nan_like(x)
    kernel.launch((math.ceil(n / 128), 1, 1), (128,), [x, y, out, f32(-1.25), i64(n)])
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _scaled_add_ref(x, y, -1.25), rtol=1e-6, atol=1e-6)
    # Launch only part of the range: elements past n stay untouched (NaN).
    part = _nan_like(x)
    code.kernel("scaled_add_f32_i32").launch(math.ceil(n / 128), 128, [x, y, part, f32(2.0), i32(1000)])
    torch.cuda.synchronize()
    torch.testing.assert_close(part[:1000], _scaled_add_ref(x[:1000], y[:1000], 2.0), rtol=1e-6, atol=1e-6)
    assert torch.isnan(part[1000:]).all()
    with pytest.raises(LookupError, match="no kernel named 'missing_kernel'"):
        code.kernel("missing_kernel")
    with pytest.raises(TypeError, match=r"args\[4\]: a bare int"):
        kernel.launch(1, 128, [x, y, out, f32(1.0), n])
    with pytest.raises(ValueError, match=r"args\[0\]: expected a tensor on cuda:"):
        kernel.launch(1, 128, [x.cpu(), y, out, f32(1.0), i64(n)])
    SUMMARY.append("loader: typed args (f32/i32/i64), partial range, module cache, error paths OK")


def test_loader_dynamic_shared_memory_above_48k():
    _require_loader()
    _require_hopper()
    smem = 96 * 1024
    chunk = smem // 4
    kernel = loader.load_code_object(CUBIN).kernel("reverse_chunks_f32", signature=("tensor", "tensor", "i32", "i64"))
    n = 3 * chunk + 1001  # last chunk is partial
    x = torch.randn(n, device="cuda")
    out = _nan_like(x)
    kernel.launch(math.ceil(n / chunk), 1024, [x, out, chunk, n], shared_mem=smem)
    torch.cuda.synchronize()
    expected = torch.cat([piece.flip(0) for piece in x.split(chunk)])
    assert torch.equal(out, expected)
    SUMMARY.append(f"loader: reverse_chunks_f32 with {smem // 1024} KiB dynamic shared memory OK")


def test_loader_side_stream_and_cuda_graph_replay():
    _require_loader()
    _require_hopper()
    kernel = loader.load_code_object(CUBIN).kernel(
        "scaled_add_f32_i32", signature=("tensor", "tensor", "tensor", "f32", "i32")
    )
    n = 65_537
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = _nan_like(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # launches go to torch's current stream
        kernel.launch(math.ceil(n / 256), 256, [x, y, out, 3.0, n])
    side.synchronize()
    torch.testing.assert_close(out, _scaled_add_ref(x, y, 3.0), rtol=1e-6, atol=1e-6)

    graph = torch.cuda.CUDAGraph()
    out.fill_(float("nan"))
    with torch.cuda.graph(graph):
        kernel.launch(math.ceil(n / 256), 256, [x, y, out, 0.5, n])
    x.copy_(torch.randn(n, device="cuda"))
    y.copy_(torch.randn(n, device="cuda"))
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, _scaled_add_ref(x, y, 0.5), rtol=1e-6, atol=1e-6)
    SUMMARY.append("loader: launch on a side stream and inside CUDA-graph capture + replay OK")


def test_loader_refuses_a_cubin_for_another_arch_at_load_time(tmp_path, monkeypatch):
    _require_loader()
    copy = tmp_path / "copy.sm_90a.cubin"  # a fresh path: not in the module cache
    shutil.copyfile(CUBIN, copy)
    if torch.cuda.get_device_capability() != (9, 0):
        with pytest.raises(LoaderError, match="built for sm_90a"):
            loader.load_code_object(copy)
        SUMMARY.append(f"loader: sm_90a cubin refused at load on {_device_desc()} OK")
        return
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (8, 0))
    with pytest.raises(LoaderError, match=r"built for sm_90a, which cannot run on cuda:\d+ \(.*sm_80\)"):
        loader.load_code_object(copy)
    SUMMARY.append("loader: arch check refuses sm_90a cubin for a (simulated) sm_80 device at load time OK")


def _jit_tools_missing() -> str | None:
    try:
        from torch.utils.cpp_extension import CUDA_HOME, is_ninja_available
    except ImportError as e:  # it imports setuptools
        return f"torch.utils.cpp_extension cannot be imported ({e}); pip install setuptools"
    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    if CUDA_HOME is None and shutil.which("nvcc") is None:
        return "no CUDA toolkit (nvcc) found"
    return None


def test_jit_builds_and_runs_a_cuda_module(tmp_path, monkeypatch):
    missing = _jit_tools_missing()
    if missing:
        pytest.skip(f"JIT CUDA build impossible here: {missing}")
    monkeypatch.setenv("AITER_JIT_DIR", str(tmp_path / "jit"))
    monkeypatch.delenv("AITER_JIT_DISABLE", raising=False)
    sources = [DATA / "jit_vector_add.cu", DATA / "jit_vector_add_bind.cpp"]
    builds = jit.build_count()
    module = jit.load_module("aiter_test_vector_add", sources)
    assert jit.build_count() == builds + 1
    spec = jit.jit_spec("aiter_test_vector_add", sources)
    assert spec.directory.parent == tmp_path / "jit"

    n = 1_000_003
    x, y = torch.randn(n, device="cuda"), torch.randn(n, device="cuda")
    out = _nan_like(x)
    stream = torch.cuda.current_stream().cuda_stream
    module.vector_add(x.data_ptr(), y.data_ptr(), out.data_ptr(), n, stream)
    torch.cuda.synchronize()
    assert torch.equal(out, x + y)

    probe = torch.full((2,), -1, dtype=torch.int32, device="cuda")
    module.arch_probe(probe.data_ptr(), stream)
    torch.cuda.synchronize()
    major, minor = torch.cuda.get_device_capability()
    cuda_arch, sm90a_features = probe.tolist()
    assert cuda_arch == major * 100 + minor * 10
    assert sm90a_features == (1 if (major, minor) == (9, 0) else 0)

    assert jit.load_module("aiter_test_vector_add", sources) is module
    monkeypatch.setattr(jit, "_LOADED", {})
    monkeypatch.setenv("AITER_JIT_DISABLE", "1")  # the disk cache must serve it now
    again = jit.load_module("aiter_test_vector_add", sources)
    out.fill_(float("nan"))
    again.vector_add(x.data_ptr(), y.data_ptr(), out.data_ptr(), n, stream)
    torch.cuda.synchronize()
    assert torch.equal(out, x + y)
    assert jit.build_count() == builds + 1
    meta = (spec.directory / "aiter_jit.json").read_text()
    SUMMARY.append(
        f"jit: built aiter_test_vector_add for {spec.key_fields['target']} "
        f"(__CUDA_ARCH__={cuda_arch}, sm90a features={sm90a_features}), vector add n={n} exact, "
        f"cache hit from disk under AITER_JIT_DISABLE=1; build_seconds={_build_seconds(meta)}"
    )


def _build_seconds(meta_text: str) -> float:
    import json

    return json.loads(meta_text)["build_seconds"]
