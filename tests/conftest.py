"""Fixtures shared by the fault and security suites."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def fault_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.faults.lab import make_certs

    return make_certs(tmp_path_factory.mktemp("fault-certs"))
