from typing import NamedTuple

import pytest

from aiter_core import configs


class Tile(NamedTuple):
    BLOCK_N: int
    num_warps: int
    num_stages: int


DEFAULT = Tile(64, 4, 3)


def test_no_override_returns_the_default(monkeypatch):
    monkeypatch.delenv("AITER_DEMO_OP_CONFIG", raising=False)
    assert configs.override("demo_op", DEFAULT) is DEFAULT
    monkeypatch.setenv("AITER_DEMO_OP_CONFIG", "  ")
    assert configs.override("demo_op", DEFAULT) is DEFAULT


def test_override_replaces_named_fields(monkeypatch):
    monkeypatch.setenv("AITER_DEMO_OP_CONFIG", "BLOCK_N=32, num_stages=2")
    assert configs.override("demo_op", DEFAULT) == Tile(32, 4, 2)
    assert configs.variable("demo_op") == "AITER_DEMO_OP_CONFIG"


@pytest.mark.parametrize("spec, match", [
    ("BLOCK_M=32", r"unknown field\(s\) BLOCK_M; known: BLOCK_N, num_warps, num_stages"),
    ("BLOCK_N=x", r"must be 'NAME=INT,...'"),
    ("BLOCK_N", r"must be 'NAME=INT,...'"),
])
def test_bad_override_names_the_variable(monkeypatch, spec, match):
    monkeypatch.setenv("AITER_DEMO_OP_CONFIG", spec)
    with pytest.raises(ValueError, match="AITER_DEMO_OP_CONFIG") as info:
        configs.override("demo_op", DEFAULT)
    assert info.match(match)
