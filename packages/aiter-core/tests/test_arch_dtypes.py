import pytest
import torch

from aiter_core import arch, dtypes
from aiter_core.arch import get_arch_info, normalize_arch_name


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    for var in ("AITER_ARCH", "AITER_NUM_CU", "CU_NUM"):
        monkeypatch.delenv(var, raising=False)
    arch.clear_cache()
    yield
    arch.clear_cache()


@pytest.mark.parametrize(
    "raw, expected",
    [("sm90", "sm_90"), ("SM_90a", "sm_90"), ("9.0", "sm_90"), ("sm_100", "sm_100"), ("gfx942:sramecc+:xnack-", "gfx942")],
)
def test_normalize_arch_name(raw, expected):
    assert normalize_arch_name(raw) == expected


def test_env_override_h100(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "sm_90a")
    info = get_arch_info()
    assert (info.vendor, info.name, info.capability, info.num_cu) == ("cuda", "sm_90", (9, 0), 132)
    assert info.fp8_dtype == torch.float8_e4m3fn
    assert info.arch_specific_target == "sm_90a"
    assert info.known and info.source == "env"
    assert info.warp_size == 32 and info.smem_per_block == 232448


def test_env_override_gfx942_uses_fnuz_and_cu_override(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "gfx942")
    monkeypatch.setenv("AITER_NUM_CU", "80")
    info = get_arch_info()
    assert info.vendor == "rocm" and info.warp_size == 64 and info.num_cu == 80
    assert info.fp8_dtype == torch.float8_e4m3fnuz
    assert arch.get_num_xcds() == 8


def test_gfx950_uses_ocp_fp8(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "gfx950")
    assert get_arch_info().fp8_dtype == torch.float8_e4m3fn


def test_unknown_arch_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setenv("AITER_ARCH", "gfx1151")
    info = get_arch_info()
    assert not info.known and info.triton_only
    assert "Triton" in info.describe()
    assert "gfx1151" in caplog.text


def test_bad_num_cu_override(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "sm_90")
    monkeypatch.setenv("AITER_NUM_CU", "many")
    with pytest.raises(ValueError, match="AITER_NUM_CU must be a positive integer, got 'many'"):
        get_arch_info()


def test_cpu_without_gpu():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    info = get_arch_info()
    assert info.vendor == "cpu" and info.name == "cpu"
    assert arch.get_gfx() == "cpu" and arch.get_cu_num() >= 1


def test_cached_and_compile_safe(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "sm_90")
    assert get_arch_info() is get_arch_info()

    def scaled(x):
        return x * get_arch_info().num_cu

    out = torch.compile(scaled, fullgraph=True, backend="aot_eager")(torch.ones(3))
    assert torch.equal(out, torch.full((3,), 132.0))


def test_dtypes_names(monkeypatch):
    monkeypatch.setenv("AITER_ARCH", "gfx942")
    assert dtypes.fp8 == torch.float8_e4m3fnuz
    arch.clear_cache()
    monkeypatch.setenv("AITER_ARCH", "sm_90")
    assert dtypes.fp8 == torch.float8_e4m3fn
    assert dtypes.d_dtypes["bf16"] is torch.bfloat16 and dtypes.d_dtypes["fp8"] == torch.float8_e4m3fn
    assert dtypes.str2Dtype("torch.float16") is torch.float16
    assert dtypes.str2Dtype("fp8") == torch.float8_e4m3fn
    assert dtypes.fp8_e8m0 == getattr(torch, "float8_e8m0fnu", torch.uint8)
    assert dtypes.str2tuple("1, 2,3") == (1, 2, 3)
    assert dtypes.str2bool("yes") and not dtypes.str2bool("0")
    assert dtypes.dtype_max(torch.float8_e4m3fn) == 448.0


def test_dtype_parse_errors():
    with pytest.raises(ValueError, match="unknown dtype name 'fp7'"):
        dtypes.str2Dtype("fp7")
    with pytest.raises(ValueError, match="comma-separated integers"):
        dtypes.str2tuple("1,x")
    with pytest.raises(ValueError, match="boolean"):
        dtypes.str2bool("maybe")
    with pytest.raises(AttributeError):
        dtypes.fp9
