"""Fault tests: the real Kamailio (tests/faults/kemi_faults.py) and the real daemon."""

from __future__ import annotations

# Kamailio is found on PATH or in /usr/sbin (tests/support/requirements.py); a test marked
# `integration` fails without it (tests/conftest.py), unless TLSBRIDGE_TEST_ALLOW_MISSING=1.
