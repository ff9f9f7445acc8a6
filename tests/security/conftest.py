"""Security tests: the real daemon, and Kamailio where a test needs one."""

from __future__ import annotations

# Kamailio is found on PATH or in /usr/sbin (tests/support/requirements.py); a test marked
# `integration` fails without it (tests/conftest.py), unless TLSBRIDGE_TEST_ALLOW_MISSING=1.
