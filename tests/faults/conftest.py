"""Fixtures for the fault tests: real Kamailio (with tests/faults/kemi_faults.py), real daemon."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.faults.lab import make_certs

pytestmark = pytest.mark.integration

if shutil.which("kamailio") is None:
    pytest.skip("kamailio is not installed (make test installs it)", allow_module_level=True)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "long: minutes-long load/soak test (make test-long)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`long` tests run only when asked for (-m long); without any -m they are deselected."""
    if config.option.markexpr:
        return
    here = Path(__file__).parent
    keep, drop = [], []
    for item in items:
        inside = here in Path(str(item.path)).parents
        (drop if inside and item.get_closest_marker("long") else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


@pytest.fixture(scope="session")
def fault_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_certs(tmp_path_factory.mktemp("fault-certs"))
