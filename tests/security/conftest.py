"""Security tests: the real daemon, and Kamailio where a test needs one."""

from __future__ import annotations

import shutil

import pytest

if shutil.which("kamailio") is None:
    pytest.skip("kamailio is not installed (make test installs it)", allow_module_level=True)
