"""The family's smoke test (``aiter check unified``) runs and reports the backend it used."""

import os

import pytest


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="exercises the Triton backend in the interpreter")
def test_smoke_runs_triton_backend():
    from aiter_unified.smoke import run

    line = run()
    assert line.startswith("unified: triton backend"), line
