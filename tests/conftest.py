"""Fixtures shared by the fault and security suites, and the suite's policy on what is missing
(tests/support/requirements.py): a test that needs an engine, Kamailio or a tool this machine
lacks fails, unless TLSBRIDGE_TEST_ALLOW_MISSING=1 turns it into a recorded skip."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support.requirements import kamailio, program, require_engine


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "needs_engine(name): fails (or skips, with TLSBRIDGE_TEST_ALLOW_MISSING=1) "
        "when TLS engine `name` does not load here")
    config.addinivalue_line(
        "markers", "needs_kamailio: fails (or skips, with the opt-out) without Kamailio")
    config.addinivalue_line(
        "markers", "needs_program(name, package): fails (or skips, with the opt-out) when "
        "the program is not installed")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for mark in item.iter_markers("needs_engine"):
        require_engine(mark.args[0])
    if item.get_closest_marker("needs_kamailio") is not None:
        kamailio()
    for mark in item.iter_markers("needs_program"):
        program(*mark.args)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    # Every real-stack suite needs Kamailio (and kamcmd), wherever Debian put them.
    for item in items:
        if item.get_closest_marker("integration") is not None:
            item.add_marker(pytest.mark.needs_kamailio)


@pytest.fixture(scope="session")
def fault_certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.faults.lab import make_certs

    return make_certs(tmp_path_factory.mktemp("fault-certs"))
