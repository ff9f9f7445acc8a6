"""What the suite needs from the machine, and what happens when it is missing.

A test that cannot run here (Kamailio not installed, a TLS engine that does not load, a TLS
tool missing) FAILS by default, naming what is missing: a CI run that silently tests less is
worse than a red one. A developer who knows the machine lacks something opts out explicitly
with `TLSBRIDGE_TEST_ALLOW_MISSING=1`; those tests are then skipped, each skip recorded with
its reason (`pytest -rs` lists them).
"""

from __future__ import annotations

import functools
import os
import shutil
from pathlib import Path
from typing import Any, NoReturn

import pytest

ALLOW_MISSING_ENV = "TLSBRIDGE_TEST_ALLOW_MISSING"

# Debian installs Kamailio's binaries in /usr/sbin, which a non-root PATH often lacks.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin", "/sbin")


def allow_missing() -> bool:
    return os.environ.get(ALLOW_MISSING_ENV, "") not in ("", "0")


def missing(what: str) -> NoReturn:
    """This test cannot run here: fail, or skip (recorded) when the opt-out is set."""
    if allow_missing():
        pytest.skip(f"{what} ({ALLOW_MISSING_ENV} is set)")
    pytest.fail(f"{what}: the suite would test less than it claims. Install it (make deps), "
                f"or set {ALLOW_MISSING_ENV}=1 to skip such tests knowingly", pytrace=False)


@functools.cache
def find_program(name: str) -> str | None:
    """`name` on PATH, else where Debian puts system binaries."""
    found = shutil.which(name)
    if found:
        return found
    for d in SBIN_DIRS:
        p = Path(d) / name
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    return None


def program(name: str, package: str | None = None) -> str:
    """The path of `name`, or the test fails (or skips with the opt-out)."""
    path = find_program(name)
    if path is None:
        missing(f"{name} is not installed (apt-get install {package or name}; looked on PATH "
                f"and in {', '.join(SBIN_DIRS)})")
    return path


def kamailio() -> str:
    return program("kamailio", "kamailio kamailio-python3-modules")


def kamcmd() -> str:
    return program("kamcmd", "kamailio")


def require_engine(name: str) -> None:
    from tlsbridge.daemon.engines.registry import available

    reason = available().get(name, "not a known engine")
    if reason is not None:
        missing(f"TLS engine {name} cannot run here: {reason}")


def engine_param(name: str, *values: Any, id: str | None = None) -> Any:
    """A pytest parameter for engine `name`, ALWAYS collected: the `needs_engine` mark makes
    the test fail (or skip, with the opt-out) when the engine does not load here."""
    return pytest.param(*(values or (name,)), id=id or name,
                        marks=pytest.mark.needs_engine(name))


def all_engines() -> tuple[str, ...]:
    from tlsbridge.daemon.engines.registry import ENGINES

    return tuple(ENGINES)
