"""The bridge's view of the connection a message arrived on, and how a facts entry becomes one.

Its own module so that routing.py can name it without importing bridge.py, which imports
routing.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tlsbridge.shared.events import ConnRef
from tlsbridge.shared.facts import CertInfo, TlsFacts


@dataclass(frozen=True, slots=True)
class BridgeConnection:
    """The bridge's view of the connection a message arrived on."""

    conn: ConnRef
    tls: TlsFacts


def parse_entry(d: dict[str, Any],
                known_local: dict[str, CertInfo] | None = None) -> BridgeConnection:
    """A look-up or htable entry (shared/lookup.py: decode_json_entry) as a BridgeConnection;
    ValueError (or EventError) if it is not one."""
    conn, tls = d.get("conn"), d.get("tls")
    if not isinstance(conn, dict) or not isinstance(tls, dict):
        raise ValueError("entry lacks conn or tls")
    return BridgeConnection(ConnRef.from_dict(conn), TlsFacts.from_dict(tls, known_local))
