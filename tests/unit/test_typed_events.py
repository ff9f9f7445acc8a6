"""Typed events (shared/events.py) over the unchanged wire: each type goes out as the same
msgpack map the untyped `encode(type, conn, **fields)` wrote, and reads back as its class."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from tlsbridge.shared import events as ev
from tlsbridge.shared.events import ConnRef, EventEncoder

IN = ConnRef(id=3, peer="198.51.100.7:40001", direction="in", hairpin="127.0.0.1:41001",
             listener="127.0.0.1:5061")
OUT = ConnRef(id=5, peer="203.0.113.9:5061", direction="out", hairpin="127.0.0.1:41002")
TLS = {"version": "TLSv1.3", "cipher": "TLS_AES_128_GCM_SHA256"}
TARGET = {"host": "203.0.113.9", "port": 5061, "sni": None, "profile": "default"}

CASES: list[tuple[ev.TypedEvent, dict[str, Any]]] = [
    (ev.TlsEstablished(IN, TLS), {"tls": TLS}),
    (ev.TlsFailed(IN, "handshake_timeout", "10 s"),
     {"reason": "handshake_timeout", "detail": "10 s"}),
    (ev.HairpinFailed(IN, "hairpin_failed", "refused"),
     {"reason": "hairpin_failed", "detail": "refused"}),
    (ev.ConnClosed(IN, "peer_closed", 10, 20, 1.5),
     {"duration": 1.5, "reason": "peer_closed", "bytes_in": 10, "bytes_out": 20}),
    (ev.ConnClosed(OUT, "idle_timeout", 1, 2, 3.0, "no traffic for 60 s", ["k"]),
     {"duration": 3.0, "reason": "idle_timeout", "bytes_in": 1, "bytes_out": 2,
      "detail": "no traffic for 60 s", "keys": ["k"]}),
    (ev.OutboundReady(OUT, TLS, "203.0.113.9:5061", TARGET, "k", [{"i": 1}]),
     {"tls": TLS, "remote": "203.0.113.9:5061", "target": TARGET, "key": "k",
      "tags": [{"i": 1}]}),
    (ev.OutboundFailed(None, "timeout", "no TCP connection in 5 s", TARGET, "k", []),
     {"reason": "timeout", "detail": "no TCP connection in 5 s", "target": TARGET,
      "key": "k", "tags": []}),
    (ev.ConfigReloaded(["profile.default"], []),
     {"changed": ["profile.default"], "restart_needed": []}),
    (ev.ConfigReloadFailed("bad key"), {"reason": "bad key"}),
    (ev.CertExpiring("profile.default", "/c.pem", "2030-01-01", 3.5),
     {"owner": "profile.default", "path": "/c.pem", "not_after": "2030-01-01",
      "days_left": 3.5}),
    (ev.DaemonStarted(42), {"pid": 42}),
    (ev.DaemonStarted(42, 2), {"pid": 42, "workers": 2}),
    (ev.DaemonStopping(42), {"pid": 42}),
]


@pytest.mark.parametrize(("event", "fields"), CASES, ids=lambda c: getattr(c, "TYPE", ""))
def test_same_wire_as_untyped_and_back(event: ev.TypedEvent, fields: dict[str, Any]) -> None:
    typed = EventEncoder("s").encode(event.TYPE, event.conn, **event.wire_fields())[1]
    untyped = EventEncoder("s").encode(event.TYPE, event.conn, **fields)[1]
    assert typed[0] == untyped[0]
    a, b = msgpack.unpackb(typed[1]), msgpack.unpackb(untyped[1])
    a.pop("ts"), b.pop("ts")
    assert a == b
    assert ev.typed(ev.decode_event(typed)) == event


def test_every_type_has_its_class() -> None:
    assert {type(e).TYPE for e, _ in CASES} == ev.EVENT_TYPES


def test_a_field_of_the_wrong_type_is_an_event_error() -> None:
    frames = EventEncoder("s").encode(ev.CONN_CLOSED, IN, reason="closed", bytes_in="x",
                                      bytes_out=0, duration=0.0)[1]
    with pytest.raises(ev.EventError, match="bytes_in"):
        ev.typed(ev.decode_event(frames))
    with pytest.raises(ev.EventError, match="is not"):
        ev.TlsFailed.from_event(ev.decode_event(frames))
