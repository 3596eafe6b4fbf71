import sys
import textwrap
from typing import NamedTuple

import pytest

from aiter_core import registry
from aiter_core.registry import BackendSpec, Problem, Registry, UnsupportedError


def _impl_fast(x):
    return ("fast", x)


def _impl_slow(x):
    return ("slow", x)


HERE = __name__


def spec(backend, priority, *, available=None, supports=None, op="demo_op", impl=_impl_slow):
    return BackendSpec(op=op, backend=backend, impl=impl, priority=priority, available=available, supports=supports)


def only_fp16(problem):
    return [] if problem.dtype == "fp16" else [f"dtype {problem.dtype} not supported (fp16 only)"]


@pytest.fixture
def reg(monkeypatch):
    monkeypatch.delenv("AITER_DEMO_OP_BACKEND", raising=False)
    monkeypatch.delenv("AITER_DISABLE_BACKENDS", raising=False)
    r = Registry(discover=False)
    r.register(spec("fast", 10, supports=only_fp16, impl=_impl_fast))
    r.register(spec("reference", 0))
    return r


def test_priority_and_supports(reg):
    assert reg.select("demo_op", Problem(dtype="fp16")).backend == "fast"
    assert reg.select("demo_op", Problem(dtype="bf16")).backend == "reference"
    assert reg.dispatch("demo_op", Problem(dtype="fp16"))(1) == ("fast", 1)


def test_unavailable_backend_is_skipped_with_reason(reg):
    reg.register(spec("gpu", 20, available=lambda: "no CUDA device"))
    assert reg.select("demo_op", Problem(dtype="fp16")).backend == "fast"
    assert "no CUDA device" in reg.explain("demo_op", Problem(dtype="fp16"))


def test_explicit_backend_wins_and_never_falls_back(reg):
    assert reg.select("demo_op", Problem(dtype="fp16"), backend="reference").backend == "reference"
    with pytest.raises(UnsupportedError, match=r"(?s)backend='fast' cannot run.*dtype bf16 not supported"):
        reg.select("demo_op", Problem(dtype="bf16"), backend="fast")


def test_env_override(reg, monkeypatch):
    monkeypatch.setenv("AITER_DEMO_OP_BACKEND", "reference")
    assert reg.select("demo_op", Problem(dtype="fp16")).backend == "reference"
    monkeypatch.setenv("AITER_DEMO_OP_BACKEND", "cuda_magic")
    with pytest.raises(UnsupportedError, match=r"(?s)AITER_DEMO_OP_BACKEND='cuda_magic' names no backend.*fast.*reference"):
        reg.select("demo_op", Problem(dtype="fp16"))


def test_disable_list(reg, monkeypatch):
    monkeypatch.setenv("AITER_DISABLE_BACKENDS", "demo_op.fast")
    assert reg.select("demo_op", Problem(dtype="fp16")).backend == "reference"


def test_unsupported_error_lists_every_backend(reg):
    reg.register(spec("reference", 0, supports=lambda p: ["head_dim 999 > 256"]))
    with pytest.raises(UnsupportedError) as info:
        reg.select("demo_op", Problem(dtype="bf16"))
    text = str(info.value)
    assert "fast [local]: dtype bf16 not supported" in text
    assert "reference [local]: head_dim 999 > 256" in text
    assert info.value.reasons == {"fast": ["dtype bf16 not supported (fp16 only)"], "reference": ["head_dim 999 > 256"]}


def test_unknown_op(reg):
    with pytest.raises(UnsupportedError, match="no backend is registered"):
        reg.select("nope")


def test_failing_supports_is_a_reason_not_a_crash(reg):
    reg.register(spec("fast", 10, supports=lambda p: 1 / 0))
    assert reg.select("demo_op", Problem()).backend == "reference"
    assert "ZeroDivisionError" in reg.explain("demo_op", Problem())


def test_explain_marks_selection(reg):
    text = reg.explain("demo_op", Problem(dtype="fp16"))
    lines = text.splitlines()
    assert lines[1].startswith("-> fast") and "ok" in lines[1]
    assert lines[2].startswith("   reference")


def test_resolve_errors():
    with pytest.raises(ValueError, match="module:attr"):
        registry.resolve("no_colon")
    with pytest.raises(ImportError, match="has no attribute 'missing'"):
        registry.resolve(f"{HERE}:missing")


def _write_dist(root, name, version, entry_points, module_name=None, module_src=None):
    dist = root / f"{name.replace('-', '_')}-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    (dist / "entry_points.txt").write_text(textwrap.dedent(entry_points))
    if module_name:
        (root / f"{module_name}.py").write_text(textwrap.dedent(module_src))


def test_entry_point_discovery_isolates_broken_plugins(tmp_path, monkeypatch, caplog):
    _write_dist(
        tmp_path, "demo-good", "1.2.3",
        """
        [aiter.backends]
        good = demo_good_mod:specs
        [aiter.families]
        good = demo_good_mod:FAMILY
        """,
        "demo_good_mod",
        """
        from aiter_core.registry import BackendSpec, Family
        def impl(x):
            return x + 1
        def specs():
            return [BackendSpec(op="plug_op", backend="triton", impl="demo_good_mod:impl", priority=5)]
        FAMILY = Family(name="good", distribution="demo-good", smoke="demo_good_mod:impl")
        """,
    )
    _write_dist(tmp_path, "demo-broken", "0.0.1", "[aiter.backends]\nbroken = demo_broken_mod:specs\n", "demo_broken_mod", "raise RuntimeError('boom at import')\n")
    _write_dist(
        tmp_path, "demo-future", "9.0", "[aiter.backends]\nfuture = demo_future_mod:specs\n", "demo_future_mod",
        """
        from aiter_core.registry import BackendSpec
        def specs():
            return [BackendSpec(op="plug_op", backend="asm", impl="x:y", api_version=99)]
        """,
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    assert [s.backend for s in reg.specs("plug_op")] == ["triton"]
    (good,) = reg.specs("plug_op")
    assert good.distribution == "demo-good 1.2.3"
    assert reg.dispatch("plug_op")(1) == 2
    errors = {e.entry: e for e in reg.plugin_errors()}
    assert errors["broken"].distribution == "demo-broken 0.0.1" and "boom at import" in errors["broken"].error
    assert "plugin API 99" in errors["future"].error
    assert "demo-broken 0.0.1" in caplog.text
    fam = {f.name: f for f in reg.families()}["good"]
    assert fam.version == "1.2.3" and fam.distribution == "demo-good"
    sys.modules.pop("demo_good_mod", None)


def test_discovery_is_lazy_and_cached(monkeypatch):
    calls = []
    real = registry.entry_points

    def counting(group):
        calls.append(group)
        return real(group=group)

    monkeypatch.setattr(registry, "entry_points", counting)
    reg = Registry()
    assert calls == []  # constructing discovers nothing
    reg.ops()
    reg.specs()
    reg.families()
    assert calls == [registry.BACKENDS_GROUP, registry.FAMILIES_GROUP]


def test_core_family_is_installed():
    # aiter-core registers itself through its own entry point (installed or editable)
    names = [f.name for f in registry.families()]
    assert "core" in names


def test_device_reasons(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert "TRITON_INTERPRET=1" in registry.triton_device_reasons("cpu")[0]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert registry.triton_device_reasons("cpu") == []
    assert registry.triton_available() is None
    assert registry.triton_device_reasons("meta")


def test_dtype_reasons():
    import torch

    assert "interpreter" in registry.triton_dtype_reasons("cpu", [torch.bfloat16, None])[0]
    assert registry.triton_dtype_reasons("cpu", [torch.float16, torch.float8_e4m3fn]) == []
    assert registry.always_available() is None


def test_reference_specs_helper():
    from aiter_core.registry import always_available, reference_specs

    out = reference_specs({"op_a": _impl_fast, "op_b": _impl_slow}, priority=3)
    assert [(s.op, s.backend, s.impl, s.priority, s.cuda_graph) for s in out] == [
        ("op_a", "reference", _impl_fast, 3, False),
        ("op_b", "reference", _impl_slow, 3, False)]
    assert all(s.available is always_available and s.supports is None for s in out)
    picky = reference_specs({"op_a": _impl_fast}, supports=lambda p: ["no"])
    assert picky[0].supports(None) == ["no"]


def test_string_impl_is_resolved_once():
    r = Registry(discover=False)
    r.register(BackendSpec(op="demo_op", backend="plugin", impl=f"{HERE}:_impl_fast"))
    assert r.dispatch("demo_op")(3) == ("fast", 3)


class _Key(NamedTuple):
    dtype: str


class _Call(NamedTuple):
    x: int
    key: _Key
    backend: str | None = None


def test_run_caches_the_choice_per_key(reg):
    seen = []

    def counting_supports(problem):
        seen.append(problem.dtype)
        return only_fp16(problem)

    reg.register(spec("fast", 10, supports=counting_supports, impl=_impl_fast))
    for _ in range(3):
        assert reg.run("demo_op", _Call(1, _Key("fp16"))) == ("fast", _Call(1, _Key("fp16")))
        assert reg.run("demo_op", _Call(2, _Key("bf16"))) == ("slow", _Call(2, _Key("bf16")))
    assert seen == ["fp16", "bf16"]  # supports() ran once per key
    call = _Call(3, _Key("fp16"), backend="reference")  # an explicit backend= is its own cache entry
    assert reg.run("demo_op", call) == ("slow", call)


def test_run_cache_sees_backend_env_and_new_registrations(reg, monkeypatch):
    key = _Key("fp16")
    assert reg.impl_for("demo_op", key) is _impl_fast
    monkeypatch.setenv("AITER_DEMO_OP_BACKEND", "reference")
    assert reg.impl_for("demo_op", key) is _impl_slow
    monkeypatch.delenv("AITER_DEMO_OP_BACKEND")
    monkeypatch.setenv("AITER_DISABLE_BACKENDS", "demo_op.fast")
    assert reg.impl_for("demo_op", key) is _impl_slow
    monkeypatch.delenv("AITER_DISABLE_BACKENDS")
    assert reg.impl_for("demo_op", key) is _impl_fast

    def newest(x):
        return ("newest", x)

    reg.register(spec("newer", 50, impl=newest))
    assert reg.impl_for("demo_op", key) is newest


def test_same_pair_from_two_distributions_is_an_error(reg):
    from dataclasses import replace

    from aiter_core.registry import DuplicateBackendError

    ours = replace(spec("triton", 5, op="other_op"), distribution="aiter-demo 1.0")
    reg.register(ours)
    theirs = replace(spec("triton", 99, op="other_op", impl=_impl_fast), distribution="evil-plugin 6.6")
    with pytest.raises(DuplicateBackendError, match="evil-plugin 6.6.*aiter-demo 1.0"):
        reg.register(theirs)
    assert reg.select("other_op").distribution == "aiter-demo 1.0"
    reg.register(replace(theirs, replaces=True))  # asked for on purpose
    assert reg.select("other_op").distribution == "evil-plugin 6.6"
    reg.register(replace(theirs, priority=7, replaces=False))  # the same distribution updates its own entry
    assert reg.select("other_op").priority == 7



def test_plugin_calling_sys_exit_is_isolated(tmp_path, monkeypatch):
    _write_dist(tmp_path, "demo-exit", "0.1", "[aiter.backends]\nexits = demo_exit_mod:specs\n"
                "[aiter.families]\nexits = demo_exit_mod:FAMILY\n", "demo_exit_mod", "import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry()
    reg.ops()
    errors = [e for e in reg.plugin_errors() if e.distribution == "demo-exit 0.1"]
    assert len(errors) == 2 and all("SystemExit" in e.error for e in errors)
    assert "core" in [f.name for f in reg.families()]  # the others still load
    sys.modules.pop("demo_exit_mod", None)
