"""Sessions for the aiter monorepo. `nox -t ci` runs every CPU tier; see README.md.

Each package is tested in its own environment holding only aiter-core and that package, so
"pip install aiter-mla" alone is what gets tested.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import nox
import tomllib

ROOT = Path(__file__).parent
PACKAGES = sorted(p.parent.name for p in ROOT.glob("packages/*/pyproject.toml"))
# A CPU build of torch: a bare `torch` requirement would pull a CUDA build of several GB.
TORCH = os.environ.get("AITER_TORCH_SPEC", "torch==2.13.0")
CPU_ENV = {"TRITON_INTERPRET": "1", "PYTHONUNBUFFERED": "1"}

nox.options.default_venv_backend = "venv"
# Every session's venv sees the base interpreter's site-packages: where that interpreter already
# has the pinned torch and a Triton (.ci/run installs them there once), a session reuses them
# instead of copying ~1.8 GB into each of its 13 venvs. A session still installs its own pinned
# torch or Triton whenever the base's do not satisfy the pin (the compile(3.6.0) session does).
# Tools therefore run as `python -m tool`: a console script found on PATH could belong to the base.
SHARED_SITE = ["--system-site-packages"]
nox.options.sessions = ["tests", "compile", "wheels", "lint"]


def _siblings(package: str) -> list[str]:
    """aiter-* packages `package` depends on, itself last (install order)."""
    meta = tomllib.loads((ROOT / "packages" / package / "pyproject.toml").read_text())
    deps = [re.split(r"[<>=!~;\[ ]", d, maxsplit=1)[0] for d in meta["project"].get("dependencies", [])]
    return [d for d in deps if d in PACKAGES] + [package]


def _install_editable(session: nox.Session, packages: list[str]) -> None:
    session.install(TORCH)
    # aiter-core's bench extra (matplotlib): the families' tests check their PNG plots too
    specs = [f"-e{ROOT / 'packages' / p}" + ("[bench]" if p == "aiter-core" else "") for p in packages]
    session.install("pytest>=8", *specs)


# The oldest Triton we support (what the lent H100 runs) and the newest: compilers of different
# versions reject different code, and 3.6 crashed on kernels that 3.9 compiled. The interpreter
# tiers run on both too: Triton 3.6's interpreter fails on NumPy 2.4 ("only 0-dimensional arrays
# can be converted to Python scalars"), which an unpinned install pulls in.
TRITON_VERSIONS = ["3.6.0", "latest"]
# What each pinned Triton needs beside it.
TRITON_COMPANIONS = {"3.6.0": ["numpy<2.4"]}


def _install_triton(session: nox.Session, triton: str) -> None:
    if triton != "latest":
        session.install(f"triton=={triton}", *TRITON_COMPANIONS.get(triton, []))


@nox.session(tags=["ci"], venv_params=SHARED_SITE)
@nox.parametrize("triton", TRITON_VERSIONS, ids=TRITON_VERSIONS)
@nox.parametrize("package", PACKAGES, ids=PACKAGES)
def tests(session: nox.Session, package: str, triton: str) -> None:
    """Tiers 1-2: references, dispatch, API checks, and the Triton kernels in the interpreter."""
    _install_editable(session, _siblings(package))
    _install_triton(session, triton)
    session.run(
        "python", "-m", "pytest", "-q", "-m", "not gpu and not compile", f"packages/{package}/tests", *session.posargs, env=CPU_ENV
    )


@nox.session(tags=["ci"], venv_params=SHARED_SITE)
@nox.parametrize("triton", TRITON_VERSIONS, ids=TRITON_VERSIONS)
def compile(session: nox.Session, triton: str) -> None:
    """Tier 3: cross-compile every Triton kernel config for sm_90 and check shared memory."""
    _install_editable(session, PACKAGES)
    _install_triton(session, triton)
    tests_dirs = [f"packages/{p}/tests" for p in PACKAGES if list((ROOT / "packages" / p / "tests").glob("test_compile*.py"))]
    if not tests_dirs:
        session.skip("no package has compile-only tests")
    session.run("python", "-m", "pytest", "-q", "-m", "compile", *tests_dirs, *session.posargs, env={"PYTHONUNBUFFERED": "1"})


@nox.session(tags=["ci"], venv_params=SHARED_SITE)
@nox.parametrize("package", [p for p in PACKAGES], ids=PACKAGES)
def wheels(session: nox.Session, package: str) -> None:
    """Build the wheels, install one family alone from them, import it and run its smoke test."""
    dist = Path(session.create_tmp()) / "dist"
    session.install(TORCH, "build")
    for p in _siblings(package):
        session.run("python", "-m", "build", "--wheel", "--outdir", str(dist), f"packages/{p}", silent=True)
    wheels_ = [str(w) for w in sorted(dist.glob("*.whl"))]
    session.install(*wheels_)
    family = package.removeprefix("aiter-")
    module = "aiter_" + family
    session.run("python", "-c", f"import {module}; print({module}.__name__, {module}.__version__)")
    with session.chdir(session.create_tmp()):  # away from the source tree: import the wheel
        session.run("aiter", "check", family, env=CPU_ENV)


@nox.session(tags=["ci"], venv_params=SHARED_SITE)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("python", "-m", "ruff", "check", ".")


@nox.session(venv_params=SHARED_SITE)
def bench(session: nox.Session) -> None:
    """The main job: every installed family's benchmark on a GPU; the correctness demo without one."""
    _install_editable(session, PACKAGES)
    env = {"PYTHONUNBUFFERED": "1"}
    session.run("aiter", "info", env=env)
    session.run("aiter", "bench", *session.posargs, env=env)


@nox.session(venv_params=SHARED_SITE)
def gpu(session: nox.Session) -> None:
    """Tier 4 on a GPU machine: every package's GPU tests (bf16, fp8, compile, CUDA graphs)."""
    _install_editable(session, PACKAGES)
    session.run("python", "-m", "pytest", "-q", "-m", "gpu", *[f"packages/{p}/tests" for p in PACKAGES], *session.posargs)
