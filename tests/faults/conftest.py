"""Fault tests: the real Kamailio (tests/faults/kemi_faults.py) and the real daemon."""

from __future__ import annotations

import shutil

import pytest

if shutil.which("kamailio") is None:
    pytest.skip("kamailio is not installed (make test installs it)", allow_module_level=True)
