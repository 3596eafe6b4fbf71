"""Tuned-config store: keys, nearest-bucket lookup, search path, writing, validation, warnings."""

import json
import os
import warnings
from importlib import metadata

import numpy as np
import pytest
import torch

from aiter_core import configs
from aiter_core.configs import ConfigFileError, lookup, make_key, parse_key, save


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    monkeypatch.delenv(configs.ENV_DIRS, raising=False)
    configs.clear_cache()
    yield
    configs.clear_cache()


def _write(directory, arch, op, buckets, **top):
    data = {"schema_version": 1, "op": op, "arch": arch, "triton_version": metadata.version("triton"),
            "torch_version": "x", "device_name": "dev", "tuned_at": "2026-01-01T00:00:00+00:00",
            "command": "tune", "buckets": buckets}
    data.update(top)
    path = directory / arch / f"{op}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_make_key_is_canonical_and_parse_key_inverts_it():
    key = make_key(seqlen_q=4096, head_dim=128, causal=True, dtype=torch.bfloat16)
    assert key == "causal=true,dtype=bf16,head_dim=128,seqlen_q=4096"
    assert parse_key(key) == {"causal": "true", "dtype": "bf16", "head_dim": 128, "seqlen_q": 4096}
    assert make_key(**parse_key("b=2, a=1")) == "a=1,b=2"
    assert make_key(dtype=torch.float8_e4m3fn) == "dtype=fp8e4m3fn"
    assert make_key(n=np.int64(7), scale=np.float32(0.5)) == "n=7,scale=0.5"


@pytest.mark.parametrize("bad", ["", "head_dim", "head_dim=", "=3", "a=1,a=2", "1x=2"])
def test_parse_key_rejects_malformed_keys(bad):
    with pytest.raises(ValueError, match="config bucket key"):
        parse_key(bad)


def test_make_key_rejects_bad_values():
    with pytest.raises(ValueError, match="at least one dim"):
        make_key()
    with pytest.raises(ValueError, match="unusable value"):
        make_key(name="a,b")
    with pytest.raises(TypeError, match="must be int, float, bool, str or torch.dtype"):
        make_key(shape=(1, 2))


def test_lookup_picks_nearest_bucket_by_log_distance(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "mha_fwd", {
        "DEFAULT": {"BLOCK_M": 0},
        "head_dim=128,seqlen_q=2048": {"BLOCK_M": 1},
        "head_dim=128,seqlen_q=4096": {"BLOCK_M": 2},
        "head_dim=64,seqlen_q=4096": {"BLOCK_M": 3},
    })
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    assert lookup("mha_fwd", "sm_90", head_dim=128, seqlen_q=2048) == {"BLOCK_M": 1}
    # 3000: log2(3000/2048) = 0.55 > log2(4096/3000) = 0.45
    assert lookup("mha_fwd", "sm_90", head_dim=128, seqlen_q=3000) == {"BLOCK_M": 2}
    assert lookup("mha_fwd", "sm_90", head_dim=128, seqlen_q=2800) == {"BLOCK_M": 1}
    # head_dim 80 is closer to 64 than to 128 in log2, seqlen equal to 4096
    assert lookup("mha_fwd", "sm_90", head_dim=80, seqlen_q=4096) == {"BLOCK_M": 3}
    # a dim no bucket names does not matter; a missing dim makes buckets ineligible
    assert lookup("mha_fwd", "sm_90", head_dim=128, seqlen_q=4096, batch=7) == {"BLOCK_M": 2}
    assert lookup("mha_fwd", "sm_90", head_dim=128) == {"BLOCK_M": 0}


def test_lookup_categorical_dims_must_match_exactly(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "op", {
        "DEFAULT": {"v": "default"},
        "causal=true,dtype=bf16,n=1024": {"v": "bf16 causal"},
        "causal=false,dtype=bf16,n=1024": {"v": "bf16 full"},
    })
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    assert lookup("op", "sm_90", dtype=torch.bfloat16, causal=True, n=100000)["v"] == "bf16 causal"
    assert lookup("op", "sm_90", dtype="bf16", causal=False, n=1)["v"] == "bf16 full"
    assert lookup("op", "sm_90", dtype=torch.float16, causal=True, n=1024)["v"] == "default"
    # a number never matches a category
    assert lookup("op", "sm_90", dtype=16, causal=True, n=1024)["v"] == "default"


def test_lookup_ties_prefer_more_specific_then_smaller_key(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "op", {
        "DEFAULT": {"v": 0},
        "n=1024": {"v": "n only"},
        "d=64,n=1024": {"v": "n and d"},
        "m=8": {"v": "m=8"},
        "m=32": {"v": "m=32"},
    })
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    assert lookup("op", "sm_90", n=1024, d=64)["v"] == "n and d"
    assert lookup("op", "sm_90", n=1024, d=65)["v"] == "n only"  # distance 0 beats d's 0.02
    # m=16 is exactly between 8 and 32 in log2: the smaller key in canonical order wins
    assert lookup("op", "sm_90", m=16)["v"] == "m=32"
    assert make_key(m=32) < make_key(m=8)
    # values below 1 count as 1
    assert lookup("op", "sm_90", m=0)["v"] == "m=8"


def test_lookup_returns_copies(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": 1}})
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    lookup("op", "sm_90")["v"] = 2
    assert lookup("op", "sm_90") == {"v": 1}


def test_missing_file_gives_none(tmp_path, monkeypatch):
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    assert lookup("no_such_op", "sm_90", n=1) is None
    assert configs.find_file("no_such_op", "sm_90") is None


def test_arch_defaults_to_this_machine(tmp_path, monkeypatch):
    from aiter_core import arch

    _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": "h100"}})
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    monkeypatch.setenv("AITER_ARCH", "sm_90")
    arch.clear_cache()
    try:
        assert lookup("op", n=1) == {"v": "h100"}
    finally:
        monkeypatch.delenv("AITER_ARCH")
        arch.clear_cache()


def test_search_order_env_dirs_then_family_package_then_core(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    pkg_root = tmp_path / "site"
    family = pkg_root / "fake_family_pkg"
    (family / "configs").mkdir(parents=True)
    (family / "__init__.py").write_text("")
    _write(family / "configs", "sm_90", "op", {"DEFAULT": {"from": "package"}})
    _write(family / "configs", "sm_90", "only_pkg", {"DEFAULT": {"from": "package"}})
    _write(second, "sm_90", "op", {"DEFAULT": {"from": "second"}})
    monkeypatch.syspath_prepend(str(pkg_root))

    assert lookup("op", "sm_90", package="fake_family_pkg") == {"from": "package"}
    monkeypatch.setenv(configs.ENV_DIRS, os.pathsep.join([str(first), str(second)]))
    assert lookup("op", "sm_90", package="fake_family_pkg") == {"from": "second"}
    _write(first, "sm_90", "op", {"DEFAULT": {"from": "first"}})
    assert lookup("op", "sm_90", package="fake_family_pkg") == {"from": "first"}
    assert lookup("only_pkg", "sm_90", package="fake_family_pkg") == {"from": "package"}
    # without package= the family's directory is not searched
    assert lookup("only_pkg", "sm_90") is None
    dirs = configs.search_dirs("fake_family_pkg")
    assert dirs[:3] == [first, second, family / "configs"]
    assert dirs[-1].name == "configs" and dirs[-1].parent.name == "aiter_core"
    with pytest.raises(ValueError, match="no importable package"):
        lookup("op", "sm_90", package="no_such_package_xyz")


def test_save_stamps_metadata_and_roundtrips(tmp_path, monkeypatch):
    path = save("mha_fwd", {"DEFAULT": {"BLOCK_M": 64}, "seqlen_q=4096,head_dim=128": {"BLOCK_M": 128}},
                directory=tmp_path, arch="sm_90", device_name="NVIDIA H100 80GB HBM3", command="tune --all")
    assert path == tmp_path / "sm_90" / "mha_fwd.json"
    data = json.loads(path.read_text())
    assert data["schema_version"] == 1 and data["op"] == "mha_fwd" and data["arch"] == "sm_90"
    assert data["triton_version"] == metadata.version("triton")
    assert data["torch_version"] == torch.__version__
    assert data["device_name"] == "NVIDIA H100 80GB HBM3"
    assert data["command"] == "tune --all"
    assert data["tuned_at"].endswith("+00:00")
    assert list(data["buckets"]) == ["DEFAULT", "head_dim=128,seqlen_q=4096"]
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    assert lookup("mha_fwd", "sm_90", head_dim=128, seqlen_q=5000) == {"BLOCK_M": 128}
    assert not list((tmp_path / "sm_90").glob("*.tmp"))


def test_save_default_command_is_this_process(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["tune.py", "--op", "a b"])
    path = save("op", {"DEFAULT": {}}, directory=tmp_path, arch="sm_90")
    assert json.loads(path.read_text())["command"] == "python tune.py --op 'a b'"


def test_save_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match="DEFAULT"):
        save("op", {"n=1": {}}, directory=tmp_path, arch="sm_90")
    with pytest.raises(TypeError, match="bucket 'DEFAULT' must map to a dict"):
        save("op", {"DEFAULT": 3}, directory=tmp_path, arch="sm_90")
    with pytest.raises(ValueError, match="duplicates"):
        save("op", {"DEFAULT": {}, "a=1,b=2": {}, "b=2,a=1": {}}, directory=tmp_path, arch="sm_90")
    with pytest.raises(ValueError, match="op must be a name"):
        save("../evil", {"DEFAULT": {}}, directory=tmp_path, arch="sm_90")
    with pytest.raises(ValueError, match="arch must be a name"):
        lookup("op", "sm/90")


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["buckets"].pop("DEFAULT"), "no 'DEFAULT'"),
    (lambda d: d.pop("triton_version"), "missing field"),
    (lambda d: d.update(schema_version=2), "schema_version must be 1"),
    (lambda d: d["buckets"].update({"n=": {}}), "expected 'name=value'"),
    (lambda d: d["buckets"].update({"n=1": 5}), "must map to an object"),
    (lambda d: d.update(op="other"), "expected <dir>/sm_90/other.json"),
])
def test_malformed_files_raise(tmp_path, monkeypatch, mutate, message):
    data = {"DEFAULT": {"v": 1}}
    path = _write(tmp_path, "sm_90", "op", data)
    content = json.loads(path.read_text())
    mutate(content)
    path.write_text(json.dumps(content))
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    with pytest.raises(ConfigFileError, match=message):
        lookup("op", "sm_90")


def test_invalid_json_raises(tmp_path, monkeypatch):
    (tmp_path / "sm_90").mkdir()
    (tmp_path / "sm_90" / "op.json").write_text("{not json")
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    with pytest.raises(ConfigFileError, match="not valid JSON"):
        lookup("op", "sm_90")


def test_other_triton_version_warns_once(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": 1}}, triton_version="0.0.1")
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    with pytest.warns(RuntimeWarning, match="tuned with Triton 0.0.1"):
        assert lookup("op", "sm_90") == {"v": 1}
    configs._file_cache.clear()  # even when the file is parsed again, the warning is not repeated
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup("op", "sm_90") == {"v": 1}


def test_same_triton_version_does_not_warn(tmp_path, monkeypatch):
    _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": 1}})
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert lookup("op", "sm_90") == {"v": 1}


def test_cache_reparses_a_changed_file(tmp_path, monkeypatch):
    path = _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": 1}})
    monkeypatch.setenv(configs.ENV_DIRS, str(tmp_path))
    first = configs.load("op", "sm_90")
    assert configs.load("op", "sm_90") is first  # cached
    _write(tmp_path, "sm_90", "op", {"DEFAULT": {"v": 22}})
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10_000_000))
    assert lookup("op", "sm_90") == {"v": 22}


def test_packaged_core_dir_exists():
    core_dirs = [d for d in configs.search_dirs() if d.parent.name == "aiter_core"]
    assert len(core_dirs) == 1 and core_dirs[0].is_dir()
