"""CPU tests of the asm loader: manifests, selection, cubin arch parsing, argument packing,
availability reasons. Launching is covered by tests/gpu/test_gpu_loader_jit.py."""

from __future__ import annotations

import ctypes
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from aiter_core import loader
from aiter_core.loader import (
    CubinTarget,
    LoaderError,
    Manifest,
    code_object_arch_dirs,
    cubin_target,
    f32,
    i32,
    i64,
    pack_args,
    ptr,
    u32,
)

DATA = Path(__file__).parent / "data"
CUBIN = DATA / "asm_test_kernels.sm_90a.cubin"


def manifest_from(text: str) -> Manifest:
    return Manifest.from_lines(textwrap.dedent(text).strip().splitlines(), "test.csv")


# ------------------------------------------------------------------ manifest


def test_shipped_manifest_parses_with_typed_keys():
    m = Manifest.from_file(DATA / "manifest.csv")
    assert m.key_columns == ("dtype", "index_bits")
    assert [r.knl_name for r in m.rows] == ["scaled_add_f32_i32", "scaled_add_f32_i64"]
    assert m.rows[0].keys == {"dtype": "fp32", "index_bits": 32}
    assert isinstance(m.rows[1].keys["index_bits"], int)
    assert m.directory == DATA
    for row in m.rows:
        assert (m.directory / row.co_name).is_file()


def test_select_exact_match_and_value_normalisation():
    m = Manifest.from_file(DATA / "manifest.csv")
    assert m.select(dtype="fp32", index_bits=64).knl_name == "scaled_add_f32_i64"
    assert m.select(dtype="fp32", index_bits=32).knl_name == "scaled_add_f32_i32"
    # numeric strings and ints compare equal, on both sides
    assert m.select(dtype="fp32", index_bits="64").knl_name == "scaled_add_f32_i64"


def test_select_no_match_lists_asked_keys_and_nearest_rows():
    m = manifest_from(
        """
        knl_name,co_name,dtype,hdim,causal
        k_bf16_64_0,a.cubin,bf16,64,0
        k_bf16_128_0,a.cubin,bf16,128,0
        k_bf16_128_1,a.cubin,bf16,128,1
        k_fp8_128_1,b.cubin,fp8,128,1
        """
    )
    with pytest.raises(LookupError) as info:
        m.select(dtype="bf16", hdim=256, causal=1)
    msg = str(info.value)
    assert "dtype='bf16'" in msg and "hdim=256" in msg and "causal=1" in msg
    # the nearest row (2 of 3 keys match) comes first
    first = msg.splitlines()[1]
    assert "2/3 keys match" in first and "k_bf16_128_1" in first


def test_select_rejects_unknown_and_missing_keys():
    m = Manifest.from_file(DATA / "manifest.csv")
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['hdim'\].*dtype.*index_bits"):
        m.select(dtype="fp32", index_bits=32, hdim=128)
    with pytest.raises(ValueError, match=r"missing \['index_bits'\]"):
        m.select(dtype="fp32")


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty manifest"),
        ("knl_name,dtype\nk,fp32", r"missing \['co_name'\]"),
        ("knl_name,co_name,dtype,dtype\nk,a.cubin,x,y", "repeated column"),
        ("knl_name,co_name,dtype\nk,a.cubin", r"test.csv:2: expected 3 fields"),
        ("knl_name,co_name,dtype\n,a.cubin,fp32", r"test.csv:2: empty knl_name"),
        ("knl_name,co_name,dtype\nk,,fp32", r"test.csv:2: empty co_name"),
        ("knl_name,co_name,dtype\nk,../x.cubin,fp32", "inside the manifest's directory"),
        ("knl_name,co_name,dtype\nk,/abs/x.cubin,fp32", "inside the manifest's directory"),
        ("knl_name,co_name,dtype\nk1,a.cubin,fp32\nk2,a.cubin,fp32", r"test.csv:3: duplicate key.*line 2"),
    ],
)
def test_malformed_manifests_are_rejected_with_location(text, message):
    with pytest.raises(ValueError, match=message):
        Manifest.from_lines(text.splitlines(), "test.csv")


def test_blank_lines_are_skipped_and_missing_file_is_named(tmp_path):
    m = Manifest.from_lines(["knl_name,co_name,n", "k1,a.cubin,1", "", "k2,a.cubin,2"], "x.csv")
    assert [r.line for r in m.rows] == [2, 4]
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        Manifest.from_file(tmp_path / "nope.csv")


def test_family_dir_from_env_and_from_package_resources(tmp_path, monkeypatch):
    # A family package shipping hsa/<arch>/<family>/manifest.csv inside itself, as its wheel would.
    pkg = tmp_path / "site" / "aiter_fakefam"
    target = pkg / "hsa" / "sm_90a" / "fakefam"
    target.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (target / "manifest.csv").write_text("knl_name,co_name,hdim\nk64,k.cubin,64\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.delenv("AITER_HSA_DIR", raising=False)
    m = loader.family_manifest("aiter_fakefam", "sm_90a", "fakefam")
    assert m.select(hdim=64).knl_name == "k64"
    assert m.directory == target

    checkout = tmp_path / "checkout_hsa"
    (checkout / "sm_90a" / "fakefam").mkdir(parents=True)
    monkeypatch.setenv("AITER_HSA_DIR", str(checkout))
    assert loader.family_code_object_dir("aiter_fakefam", "sm_90a", "fakefam") == checkout / "sm_90a" / "fakefam"


def test_arch_dir_candidates():
    assert code_object_arch_dirs((9, 0)) == ["sm_90a", "sm_90f", "sm_90"]
    assert code_object_arch_dirs((8, 6))[:3] == ["sm_86a", "sm_86f", "sm_86"]
    assert "sm_80" in code_object_arch_dirs((8, 6))


# ------------------------------------------------------------------ cubin arch


def test_shipped_cubin_is_sm_90a_and_runs_only_on_hopper():
    target = cubin_target(CUBIN.read_bytes())
    assert target == CubinTarget(9, 0, "a")
    assert target.name == "sm_90a"
    assert target.runs_on((9, 0))
    assert not target.runs_on((8, 0))
    assert not target.runs_on((10, 0))


def test_cubin_sm_number_falls_back_to_elf_flags_without_the_toolkit_note():
    image = CUBIN.read_bytes()
    assert b"-arch sm_90a" in image
    stripped = image.replace(b"-arch sm_90a", b"-xxxx xxxxxx")
    # CUDA 13 cubins (ELF ABI v8) keep the SM number in e_flags bits 8..15
    assert image[8] >= 8
    assert cubin_target(stripped) == CubinTarget(9, 0, "")


def test_target_compatibility_rules():
    assert CubinTarget(8, 0, "").runs_on((8, 6))  # SASS runs on later minors of one major
    assert not CubinTarget(8, 6, "").runs_on((8, 0))
    assert not CubinTarget(8, 0, "").runs_on((9, 0))
    assert CubinTarget(10, 0, "f").runs_on((10, 3))
    assert not CubinTarget(10, 0, "a").runs_on((10, 3))


def test_non_cubin_images():
    assert cubin_target(b"// PTX .version 8.0\n" * 8) is None
    hsaco = bytearray(64)
    hsaco[:4] = b"\x7fELF"
    hsaco[4] = 2
    struct.pack_into("<H", hsaco, 18, 224)  # EM_AMDGPU
    with pytest.raises(LoaderError, match="hsaco"):
        cubin_target(bytes(hsaco))


# ------------------------------------------------------------------ arguments


def test_typed_args_pack_to_exact_c_types():
    packed = pack_args([i32(-5), u32(2**32 - 1), i64(2**40 + 3), f32(1.5), ptr(0x1000)], None, 0)
    assert [type(v) for v in packed] == [
        ctypes.c_int32,
        ctypes.c_uint32,
        ctypes.c_int64,
        ctypes.c_float,
        ctypes.c_uint64,
    ]
    assert [v.value for v in packed] == [-5, 2**32 - 1, 2**40 + 3, 1.5, 0x1000]
    assert [ctypes.sizeof(v) for v in packed] == [4, 4, 8, 4, 8]


def test_signature_converts_bare_numbers():
    packed = pack_args([0.25, 7, 2**33], ("f32", "i32", "i64"), 0)
    assert [type(v) for v in packed] == [ctypes.c_float, ctypes.c_int32, ctypes.c_int64]
    assert [v.value for v in packed] == [0.25, 7, 2**33]


def test_bare_numbers_without_signature_are_refused():
    with pytest.raises(TypeError, match=r"args\[1\]: a bare int has no C type"):
        pack_args([i32(1), 3], None, 0)
    with pytest.raises(TypeError, match=r"args\[0\]: a bare float"):
        pack_args([3.0], None, 0)


@pytest.mark.parametrize(
    "args, signature, error, message",
    [
        ([i32(2**31)], None, ValueError, r"args\[0\]: 2147483648 does not fit i32"),
        ([i64(-1)], ("u64",), TypeError, r"args\[0\]: the signature declares u64, got i64"),
        ([-1], ("u32",), ValueError, r"args\[0\]: -1 does not fit u32"),
        ([1.5], ("i32",), TypeError, r"args\[0\]: expected an int for i32, got float"),
        ([True], ("i32",), TypeError, r"expected an int for i32, got bool"),
        (["x"], ("f32",), TypeError, r"expected a float for f32, got str"),
        ([1, 2], ("i32",), ValueError, r"args: the kernel takes 1 arguments"),
        ([5], ("tensor",), TypeError, r"args\[0\]: expected a CUDA tensor, got int"),
    ],
)
def test_bad_scalar_args(args, signature, error, message):
    with pytest.raises(error, match=message):
        pack_args(args, signature, 0)


def test_tensor_args_must_live_on_the_kernels_device():
    x = torch.randn(8)
    with pytest.raises(ValueError, match=r"args\[0\]: expected a tensor on cuda:0, got one on cpu"):
        pack_args([x], None, 0)
    with pytest.raises(TypeError, match=r"signature declares i32, got a tensor"):
        pack_args([x], ("i32",), 0)


def test_typed_arg_kind_is_checked():
    with pytest.raises(ValueError, match="kind: expected one of"):
        loader.TypedArg("int", 3)


@pytest.mark.parametrize(
    "value, error",
    [((0, 1), ValueError), ((1, 2, 3, 4), TypeError), ("8", TypeError), ((2.0,), TypeError)],
)
def test_grid_and_block_validation(value, error):
    with pytest.raises(error, match="grid"):
        loader._as_dim3(value, "grid")


def test_dim3_padding():
    assert loader._as_dim3(7, "grid") == (7, 1, 1)
    assert loader._as_dim3((2, 3), "block") == (2, 3, 1)


# ------------------------------------------------------------------ availability


def test_available_reports_a_reason_here():
    reason = loader.available()
    if torch.cuda.is_available() and loader._import_driver() is not None:
        assert reason is None
    else:
        assert isinstance(reason, str) and reason
        with pytest.raises(LoaderError, match="unavailable"):
            loader.load_code_object(CUBIN)


def test_available_reasons(monkeypatch):
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert "ROCm" in loader.available()
    monkeypatch.setattr(torch.version, "hip", None, raising=False)

    monkeypatch.setattr(torch.version, "cuda", None)
    assert loader.available() == "torch is built without CUDA"

    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(loader, "_import_driver", lambda: None)
    assert "cuda-bindings is not installed" in loader.available()

    monkeypatch.setattr(loader, "_import_driver", lambda: object())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert loader.available() == "no CUDA device is visible"
    with pytest.raises(LoaderError, match="no CUDA device is visible"):
        loader.load_code_object(CUBIN)


def test_import_is_lazy_and_old_module_name_is_found(tmp_path):
    """Importing aiter_core.loader must not import the CUDA bindings; the old ``cuda.cuda``
    module name is used when ``cuda.bindings`` is absent."""
    fake = tmp_path / "fake"
    (fake / "cuda").mkdir(parents=True)
    (fake / "cuda" / "__init__.py").write_text("")
    marker = tmp_path / "imported"
    (fake / "cuda" / "cuda.py").write_text(f"open({str(marker)!r}, 'w').write('old-name')\nOLD = True\n")
    code = textwrap.dedent(
        f"""
        import os, sys
        import aiter_core.loader as L
        assert not os.path.exists({str(marker)!r}), "bindings imported at module import"
        assert "cuda.cuda" not in sys.modules and "cuda.bindings" not in sys.modules
        driver = L._import_driver()
        assert getattr(driver, "OLD", False), driver
        assert open({str(marker)!r}).read() == "old-name"
        print("ok")
        """
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake), *sys.path]))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# ------------------------------------------------------------------ launch path, fake driver


class FakeDriver:
    """Stands in for cuda.bindings.driver: records calls and decodes the kernel parameters the
    loader packs, so the whole load/launch path runs (and can fail) without a GPU."""

    ERRORS = {1: b"CUDA_ERROR_INVALID_VALUE", 209: b"CUDA_ERROR_NO_BINARY_FOR_GPU", 500: b"CUDA_ERROR_NOT_FOUND"}

    class CUfunction_attribute:
        CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8

    def __init__(self, param_types=()):
        self.calls: list[tuple] = []
        self.param_types = param_types
        self.launch_result = 0
        self.load_result = 0
        self.context_depth = 0
        self.init_result = 0

    def CUstream(self, handle):
        return ("stream", handle)

    def cuInit(self, flags):
        self.calls.append(("cuInit", flags))
        return (self.init_result,)

    def cuDeviceGet(self, ordinal):
        return (0, f"dev{ordinal}")

    def cuDevicePrimaryCtxRetain(self, dev):
        self.calls.append(("retain", dev))
        return (0, f"ctx-{dev}")

    def cuCtxPushCurrent(self, ctx):
        self.context_depth += 1
        return (0,)

    def cuCtxPopCurrent(self):
        self.context_depth -= 1
        return (0, "ctx")

    def cuModuleLoadData(self, address):
        assert self.context_depth == 1, "module loaded outside the primary context"
        self.calls.append(("load", ctypes.string_at(address, 4)))
        return (self.load_result, "module" if self.load_result == 0 else None)

    def cuModuleGetFunction(self, module, name):
        if name == b"missing":
            return (500, None)
        return (0, ("function", name))

    def cuFuncSetAttribute(self, function, attribute, value):
        self.calls.append(("smem", attribute, value))
        return (0,)

    def cuLaunchKernel(self, f, gx, gy, gz, bx, by, bz, smem, stream, params, extra):
        assert self.context_depth == 1, "launch outside the primary context"
        addresses = ctypes.cast(params, ctypes.POINTER(ctypes.c_void_p))
        values = [t.from_address(addresses[i]).value for i, t in enumerate(self.param_types)]
        self.calls.append(("launch", f, (gx, gy, gz), (bx, by, bz), smem, stream, values, extra))
        return (self.launch_result,)

    def cuGetErrorName(self, err):
        return (0, self.ERRORS[int(err)])

    def cuGetErrorString(self, err):
        return (0, b"fake description")


@pytest.fixture
def fake_gpu(monkeypatch):
    fake = FakeDriver()
    monkeypatch.setattr(loader, "_import_driver", lambda: fake)
    monkeypatch.setattr(loader, "_DRIVER", None)
    monkeypatch.setattr(loader, "_MODULES", {})
    monkeypatch.setattr(loader._PrimaryContext, "_contexts", {})
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "Fake H100")

    class Stream:
        cuda_stream = 0x1234

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    return fake


def test_launch_packs_exact_values_on_the_current_stream(fake_gpu):
    fake_gpu.param_types = (ctypes.c_uint64, ctypes.c_float, ctypes.c_int32, ctypes.c_int64)
    code = loader.load_code_object(CUBIN)
    assert loader.load_code_object(CUBIN) is code
    assert [c for c in fake_gpu.calls if c[0] == "load"] == [("load", b"\x7fELF")]  # loaded once
    kernel = code.kernel("scaled_add_f32_i32")
    args = [ptr(0xDEAD0000), f32(0.5), i32(-7), i64(2**40)]
    kernel.launch((3, 2), 128, args, shared_mem=64 * 1024)
    kernel.launch((3, 2), 128, args, shared_mem=64 * 1024)
    launches = [c for c in fake_gpu.calls if c[0] == "launch"]
    assert len(launches) == 2
    _, function, grid, block, smem, stream, values, extra = launches[0]
    assert function == ("function", b"scaled_add_f32_i32")
    assert (grid, block, smem, stream, extra) == ((3, 2, 1), (128, 1, 1), 65536, ("stream", 0x1234), 0)
    assert values == [0xDEAD0000, 0.5, -7, 2**40]
    # >48 KiB of dynamic shared memory needs the per-function opt-in, set once
    assert [c for c in fake_gpu.calls if c[0] == "smem"] == [("smem", 8, 65536)]
    assert fake_gpu.context_depth == 0
    assert [c for c in fake_gpu.calls if c[0] == "retain"] == [("retain", "dev0")]


def test_manifest_load_kernel_and_signature_coercion(fake_gpu):
    fake_gpu.param_types = (ctypes.c_uint64, ctypes.c_uint64, ctypes.c_uint64, ctypes.c_float, ctypes.c_int64)
    manifest = Manifest.from_file(DATA / "manifest.csv")
    kernel = manifest.load_kernel(signature=("ptr", "ptr", "ptr", "f32", "i64"), dtype="fp32", index_bits=64)
    assert kernel.name == "scaled_add_f32_i64"
    kernel.launch(4, 256, [16, 32, 48, 2.0, 1000], stream=0x99)
    launch = [c for c in fake_gpu.calls if c[0] == "launch"][-1]
    assert launch[5] == ("stream", 0x99) and launch[6] == [16, 32, 48, 2.0, 1000]


def test_driver_failures_raise_with_the_error_name(fake_gpu):
    code = loader.load_code_object(CUBIN)
    with pytest.raises(LookupError, match="no kernel named 'missing'"):
        code.kernel("missing")
    fake_gpu.launch_result = 1
    with pytest.raises(loader.CudaDriverError, match=r"cuLaunchKernel\(scaled_add_f32_i32\) failed: CUDA_ERROR_INVALID_VALUE"):
        code.kernel("scaled_add_f32_i32").launch(1, 1, [])
    assert fake_gpu.context_depth == 0  # popped even on failure


def test_wrong_arch_is_refused_at_load_before_the_driver_sees_it(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (8, 0))
    with pytest.raises(LoaderError, match=r"built for sm_90a, which cannot run on cuda:0 \(Fake H100, sm_80\)"):
        loader.load_code_object(CUBIN)
    assert not [c for c in fake_gpu.calls if c[0] == "load"]


def test_driver_refusal_of_an_image_is_explained(fake_gpu, tmp_path):
    blob = tmp_path / "kernels.fatbin"  # not an ELF cubin: only the driver can judge it
    blob.write_bytes(b"FATB" + bytes(60))
    fake_gpu.load_result = 209
    with pytest.raises(LoaderError, match=r"driver refused the code object for cuda:0.*CUDA_ERROR_NO_BINARY_FOR_GPU"):
        loader.load_code_object(blob)
    with pytest.raises(FileNotFoundError, match="absent.cubin"):
        loader.load_code_object(tmp_path / "absent.cubin")


def test_failed_driver_init_is_reported_and_retried(fake_gpu):
    fake_gpu.init_result = 1
    with pytest.raises(loader.CudaDriverError, match="cuInit failed: CUDA_ERROR_INVALID_VALUE"):
        loader.load_code_object(CUBIN)
    assert loader._DRIVER is None  # a failed init is not remembered as a working driver
    fake_gpu.init_result = 0
    assert loader.load_code_object(CUBIN).target.name == "sm_90a"
    assert [c for c in fake_gpu.calls if c[0] == "cuInit"] == [("cuInit", 0), ("cuInit", 0)]
