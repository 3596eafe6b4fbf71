"""Repo-wide pytest setup: test tiers are assigned by location so no test can forget its marker."""

from pathlib import Path

import pytest


def pytest_collection_modifyitems(config, items):
    for item in items:
        path = Path(str(item.fspath))
        if "gpu" in path.parts[:-1]:
            item.add_marker(pytest.mark.gpu)
        if path.name.startswith("test_compile"):
            item.add_marker(pytest.mark.compile)
