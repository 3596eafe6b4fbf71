"""CPU tests of the JIT builder with a tiny pybind11-only C++ module (builds in seconds).

Needs a C++ compiler and ninja; skipped with the reason otherwise."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from aiter_core import arch, jit
from aiter_core.jit import JitDisabledError, JitError

DATA = Path(__file__).parent / "data"
TINY = DATA / "jit_tiny.cpp"


def _build_tools_missing() -> str | None:
    try:
        from torch.utils.cpp_extension import is_ninja_available
    except ImportError as e:  # it imports setuptools
        return f"torch.utils.cpp_extension cannot be imported ({e})"
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        return "no C++ compiler on PATH"
    if not is_ninja_available():
        return "ninja is not installed"
    return None


needs_build_tools = pytest.mark.skipif(_build_tools_missing() is not None, reason=str(_build_tools_missing()))


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "jit-cache"
    monkeypatch.setenv("AITER_JIT_DIR", str(root))
    monkeypatch.delenv("AITER_JIT_DISABLE", raising=False)
    return root


def _run_python(code: str, env_updates: dict) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env_updates)
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def test_jit_dir_default_and_env(tmp_path, monkeypatch):
    import platformdirs

    monkeypatch.delenv("AITER_JIT_DIR", raising=False)
    assert jit.jit_dir() == Path(platformdirs.user_cache_dir("aiter")) / "jit"
    monkeypatch.setenv("AITER_JIT_DIR", str(tmp_path / "x"))
    assert jit.jit_dir() == tmp_path / "x"
    spec = jit.jit_spec("jit_tiny", TINY)
    assert spec.directory.parent == tmp_path / "x"
    assert spec.directory.name == f"jit_tiny-{spec.key}"


@needs_build_tools
def test_build_once_then_cache_hits_in_process_and_from_disk(cache, monkeypatch, capfd):
    spec = jit.jit_spec("jit_tiny", TINY)
    # A killed earlier build left a half-filled directory holding torch's baton file; without
    # cleanup torch would wait on that baton forever.
    spec.directory.mkdir(parents=True)
    (spec.directory / "lock").write_text("")

    builds = jit.build_count()
    module = jit.load_module("jit_tiny", TINY)
    assert module.add(2, 3) == 5 and module.offset == 0
    assert jit.build_count() == builds + 1
    err = capfd.readouterr().err
    assert "JIT-building C++ module 'jit_tiny'" in err and "built 'jit_tiny'" in err

    meta = json.loads((spec.directory / "aiter_jit.json").read_text())
    assert (spec.directory / meta["library"]).is_file()
    assert meta["key_fields"] == spec.key_fields

    assert jit.load_module("jit_tiny", TINY) is module  # in-process cache
    monkeypatch.setattr(jit, "_LOADED", {})  # as a fresh process would: import from disk
    again = jit.load_module("jit_tiny", TINY)
    assert again.add(40, 2) == 42
    assert jit.build_count() == builds + 1
    assert "JIT-building" not in capfd.readouterr().err

    # Another process with building forbidden imports the cached build.
    proc = _run_python(
        """
        from aiter_core import jit
        m = jit.load_module("jit_tiny", %r)
        print(m.add(20, 22), jit.build_count())
        """
        % str(TINY),
        {"AITER_JIT_DISABLE": "1"},
    )
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split() == ["42", "0"]


def test_flag_change_gives_a_new_key(cache):
    plain = jit.jit_spec("jit_tiny", TINY)
    flagged = jit.jit_spec("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=100"])
    assert flagged.key != plain.key and flagged.directory != plain.directory
    assert flagged.key_fields["extra_cflags"] == ["-DAITER_TEST_OFFSET=100"]


def test_key_covers_source_headers_flags_and_depends(tmp_path, cache):
    src_dir = tmp_path / "src"
    (src_dir / "detail").mkdir(parents=True)
    source = src_dir / "mod.cpp"
    source.write_text(TINY.read_text())
    header = src_dir / "detail" / "helper.h"
    header.write_text("#pragma once\n")
    extra = tmp_path / "extra.txt"
    extra.write_text("v1")

    def key(**kw):
        return jit.jit_spec("mod", source, **kw).key

    base = key()
    assert key() == base  # deterministic
    header.write_text("#pragma once\n// changed\n")
    assert key() != base
    after_header = key()
    source.write_text(TINY.read_text() + "\n// edited\n")
    assert key() != after_header
    after_source = key()
    assert key(extra_ldflags=["-lm"]) != after_source
    assert key(extra_include_paths=[str(tmp_path)]) != after_source
    with_depends = key(depends=[extra])
    assert with_depends != after_source
    extra.write_text("v2")
    assert key(depends=[extra]) != with_depends
    # contents, not locations: a copy elsewhere has the same key
    moved = tmp_path / "elsewhere"
    shutil.copytree(src_dir, moved)
    assert jit.jit_spec("mod", moved / "mod.cpp").key == after_source


def test_key_records_toolchain_torch_and_versions(cache):
    import torch

    import aiter_core

    fields = jit.jit_spec("jit_tiny", TINY).key_fields
    assert fields["torch"].startswith(torch.__version__)
    assert fields["aiter_core"] == aiter_core.__version__
    assert fields["python"].startswith(f"{sys.version_info[0]}.{sys.version_info[1]}.")
    assert fields["cxx"] and fields["nvcc"] is None and fields["target"] == "host"


def test_disabled_jit_with_cold_cache_names_module_then_prebuild_fills_it(cache, monkeypatch):
    monkeypatch.setenv("AITER_JIT_DISABLE", "1")
    builds = jit.build_count()
    with pytest.raises(JitDisabledError) as info:
        jit.load_module("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=3"])
    msg = str(info.value)
    assert "'jit_tiny'" in msg and "AITER_JIT_DISABLE=1" in msg
    assert "prebuild" in msg and str(cache) in msg
    assert jit.build_count() == builds
    assert not jit.jit_spec("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=3"]).directory.exists()

    if _build_tools_missing() is not None:
        return
    # prebuild() is the sanctioned way to fill the cache and works despite the switch
    directory = jit.prebuild("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=3"])
    assert jit.build_count() == builds + 1
    assert (directory / "aiter_jit.json").is_file() and directory.parent == cache
    module = jit.load_module("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=3"])
    assert module.add(2, 3) == 8
    assert jit.build_count() == builds + 1


def test_disabled_error_explains_how_cached_builds_differ(cache, monkeypatch):
    # A complete-looking cached build of the same module under other flags.
    other = jit.jit_spec("jit_tiny", TINY, extra_cflags=["-O1"])
    other.directory.mkdir(parents=True)
    (other.directory / "jit_tiny.so").write_bytes(b"")
    (other.directory / "aiter_jit.json").write_text(
        json.dumps({"module": "jit_tiny", "library": "jit_tiny.so", "key_fields": other.key_fields})
    )
    monkeypatch.setenv("AITER_JIT_DISABLE", "1")
    with pytest.raises(JitDisabledError, match=r"differs in extra_cflags"):
        jit.load_module("jit_tiny", TINY)


@needs_build_tools
def test_concurrent_builders_build_once(cache):
    code = """
        from aiter_core import jit
        m = jit.load_module("jit_tiny", %r, extra_cflags=["-DAITER_TEST_OFFSET=100"])
        print(m.add(1, 1), jit.build_count())
        """ % str(TINY)
    procs = [_run_python(code, {}) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
    answers = [out.split() for out, _ in results]
    # the flag reached the compiler: 1 + 1 + AITER_TEST_OFFSET
    assert [a[0] for a in answers] == ["102", "102"]
    assert sorted(int(a[1]) for a in answers) == [0, 1]  # exactly one process compiled
    flagged = jit.jit_spec("jit_tiny", TINY, extra_cflags=["-DAITER_TEST_OFFSET=100"])
    assert (flagged.directory / "aiter_jit.json").is_file()
    assert not jit.jit_spec("jit_tiny", TINY).directory.exists()


@needs_build_tools
def test_compile_error_is_reported_with_module_name(tmp_path, cache):
    broken = tmp_path / "broken_mod.cpp"
    broken.write_text("#include <pybind11/pybind11.h>\nthis is not C++;\n")
    with pytest.raises(JitError, match=r"module 'broken_mod': build failed"):
        jit.load_module("broken_mod", broken)
    spec = jit.jit_spec("broken_mod", broken)
    assert not (spec.directory / "aiter_jit.json").exists()  # a failed build is never a cache hit


def test_argument_validation(tmp_path, cache):
    with pytest.raises(ValueError, match="name: expected a Python identifier"):
        jit.jit_spec("bad-name", TINY)
    with pytest.raises(FileNotFoundError, match="missing.cpp"):
        jit.jit_spec("m", tmp_path / "missing.cpp")
    with pytest.raises(ValueError, match="sources: expected at least one"):
        jit.jit_spec("m", [])
    text = tmp_path / "notes.txt"
    text.write_text("x")
    with pytest.raises(ValueError, match=r"sources: expected .cpp"):
        jit.jit_spec("m", text)
    with pytest.raises(TypeError, match="extra_cflags: expected a sequence of str"):
        jit.jit_spec("m", TINY, extra_cflags="-O3")
    with pytest.raises(FileNotFoundError, match="depends"):
        jit.jit_spec("m", TINY, depends=[tmp_path / "nope.h"])


def test_cuda_sources_target_the_device_arch(tmp_path, cache, monkeypatch):
    import torch

    if torch.cuda.is_available():
        pytest.skip("checks the GPU-less behaviour; the GPU tests cover real devices")
    kernel = tmp_path / "k.cu"
    kernel.write_text("__global__ void k() {}\n")
    monkeypatch.delenv("AITER_ARCH", raising=False)
    arch.clear_cache()
    try:
        with pytest.raises(JitError, match="cannot choose a CUDA target"):
            jit.jit_spec("k", kernel)
        monkeypatch.setenv("AITER_ARCH", "sm_90")
        arch.clear_cache()
        spec = jit.jit_spec("k", kernel)
        assert "-gencode=arch=compute_90a,code=sm_90a" in spec.extra_cuda_cflags
        assert spec.key_fields["target"] == "sm_90a" and spec.with_cuda
        assert spec.key_fields["nvcc"] is not None
        monkeypatch.setenv("AITER_ARCH", "sm_86")
        arch.clear_cache()
        spec86 = jit.jit_spec("k", kernel)
        assert "-gencode=arch=compute_86,code=sm_86" in spec86.extra_cuda_cflags
        assert spec86.key != spec.key
        # an explicit arch flag is respected, not doubled
        own = jit.jit_spec("k", kernel, extra_cuda_cflags=["-gencode=arch=compute_80,code=sm_80"])
        assert own.extra_cuda_cflags == ("-gencode=arch=compute_80,code=sm_80",)
    finally:
        arch.clear_cache()


@needs_build_tools
def test_truncated_cached_library_is_rebuilt(cache):
    flags = ["-DAITER_TRUNCATED_TEST"]
    spec = jit.jit_spec("jit_tiny", TINY, extra_cflags=flags)
    jit.load_module("jit_tiny", TINY, extra_cflags=flags)
    meta = json.loads((spec.directory / "aiter_jit.json").read_text())
    library = spec.directory / meta["library"]
    head = library.read_bytes()[:100]
    library.unlink()  # a new file: this process still maps the old one
    library.write_bytes(head)  # a copy cut short
    code = """
        from aiter_core import jit
        m = jit.load_module("jit_tiny", %r, extra_cflags=%r)
        print(m.add(1, 2), jit.build_count())
        """ % (str(TINY), flags)
    # fresh processes (this one has the library loaded already): refused with the fix, then rebuilt
    proc = _run_python(code, {"AITER_JIT_DISABLE": "1"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and "cannot be imported" in err and "delete that directory" in err
    proc = _run_python(code, {})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert out.split() == ["3", "1"] and "rebuilding it" in err
