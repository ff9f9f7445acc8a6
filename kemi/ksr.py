"""Kamailio's `KSR` module, imported when first needed: it exists only inside Kamailio (or once
`tlsbridge.kemi.testing` has installed its fake), never at import time of this package."""

from __future__ import annotations

from typing import Any


def ksr() -> Any:
    import KSR

    return KSR
