"""Connection events: the schema, and a sans-IO codec (msgpack) for the ZeroMQ PUB/SUB stream.

Wire form, one ZeroMQ message of two frames: the topic and a msgpack map
`{v, src, seq, ts, type, conn, ...per-type fields}`. The topic is the event type, followed for an
event about a connection by its direction (`conn.closed.out`): subscribers filter by prefix, and
the daemon encodes nothing for a topic no subscriber wants. `seq` counts per topic, so a
subscriber taking some topics only still sees every loss among them as a gap.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from tlsbridge.shared.facts import TlsFacts

EVENTS_VERSION = 2  # 2: seq per topic, topics carry the direction

TLS_ESTABLISHED = "tls.established"
TLS_FAILED = "tls.failed"
HAIRPIN_FAILED = "hairpin.failed"
CONN_CLOSED = "conn.closed"
OUTBOUND_READY = "outbound.ready"
OUTBOUND_FAILED = "outbound.failed"
CONFIG_RELOADED = "config.reloaded"
CONFIG_RELOAD_FAILED = "config.reload_failed"
CERT_EXPIRING = "cert.expiring"
DAEMON_STARTED = "daemon.started"
DAEMON_STOPPING = "daemon.stopping"

EVENT_TYPES = frozenset(
    {
        TLS_ESTABLISHED,
        TLS_FAILED,
        HAIRPIN_FAILED,
        CONN_CLOSED,
        OUTBOUND_READY,
        OUTBOUND_FAILED,
        CONFIG_RELOADED,
        CONFIG_RELOAD_FAILED,
        CERT_EXPIRING,
        DAEMON_STARTED,
        DAEMON_STOPPING,
    }
)


class EventError(ValueError):
    """A message on the event stream that does not follow the schema."""


def topic_of(type_: str, conn: ConnRef | None) -> str:
    return f"{type_}.{conn.direction}" if conn is not None else type_


@dataclass(frozen=True, slots=True)
class ConnRef:
    """Which connection an event is about.

    `hairpin` is the daemon's local address of the hairpin (Kamailio: `$tcp(c_si):$tcp(c_sp)`),
    `peer` the address declared to Kamailio as source, `listener` the public address a TLS peer
    reached (inbound) or None (outbound).
    """

    id: int
    peer: str
    direction: str
    hairpin: str | None = None
    listener: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "peer": self.peer,
            "direction": self.direction,
            "hairpin": self.hairpin,
            "listener": self.listener,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ConnRef:
        try:
            ref = cls(
                id=d["id"],
                peer=d["peer"],
                direction=d["direction"],
                hairpin=d.get("hairpin"),
                listener=d.get("listener"),
            )
        except (KeyError, TypeError) as exc:
            raise EventError(f"bad conn reference: missing {exc}") from None
        if not isinstance(ref.id, int) or ref.direction not in ("in", "out"):
            raise EventError(f"bad conn reference: {dict(d)!r}")
        return ref


@dataclass(frozen=True, slots=True)
class Event:
    type: str
    seq: int
    ts: float
    src: str
    conn: ConnRef | None = None
    fields: Mapping[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        return topic_of(self.type, self.conn)

    @property
    def tls(self) -> TlsFacts | None:
        raw = self.fields.get("tls")
        return TlsFacts.from_dict(raw) if raw is not None else None

    @property
    def reason(self) -> str | None:
        return self.fields.get("reason")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.fields)
        out.update(
            v=EVENTS_VERSION,
            src=self.src,
            seq=self.seq,
            ts=self.ts,
            type=self.type,
            conn=self.conn.to_dict() if self.conn else None,
        )
        return out


class EventEncoder:
    """Numbers (per topic) and serialises the events of one publisher (`src` names the
    publisher's life)."""

    def __init__(self, src: str) -> None:
        self.src = src
        self._seq: dict[str, int] = {}

    def encode(
        self, type_: str, conn: ConnRef | None = None, **fields: Any
    ) -> tuple[Event, list[bytes]]:
        if type_ not in EVENT_TYPES:
            raise EventError(f"unknown event type {type_!r}")
        topic = topic_of(type_, conn)
        seq = self._next_seq(topic)
        tls = fields.get("tls")
        if isinstance(tls, TlsFacts):
            fields["tls"] = tls.to_dict()
        event = Event(type_, seq, time.time(), self.src, conn, fields)
        return event, [topic.encode(), msgpack.packb(event.to_dict(), use_bin_type=True)]

    def renumber(self, topic: str, body: dict[str, Any]) -> list[bytes]:
        """Another publisher's event (its decoded body) as ours: our `src`, the next `seq`
        of its topic."""
        body["seq"] = self._next_seq(topic)
        body["src"] = self.src
        return [topic.encode(), msgpack.packb(body, use_bin_type=True)]

    def _next_seq(self, topic: str) -> int:
        seq = self._seq[topic] = self._seq.get(topic, 0) + 1
        return seq


def decode_event(frames: list[bytes]) -> Event:
    """Parse one message of the stream; raises EventError, never returns a partial event."""
    if len(frames) != 2:
        raise EventError(f"expected 2 frames (topic, body), got {len(frames)}")
    try:
        d = msgpack.unpackb(frames[1], raw=False)
    except Exception as exc:
        raise EventError(f"event body is not msgpack: {exc}") from None
    if not isinstance(d, dict):
        raise EventError("event body is not a map")
    if d.get("v") != EVENTS_VERSION:
        raise EventError(f"unsupported event schema version {d.get('v')!r}")
    try:
        type_, seq, ts, src = d.pop("type"), d.pop("seq"), d.pop("ts"), d.pop("src")
    except KeyError as exc:
        raise EventError(f"event lacks {exc}") from None
    d.pop("v")
    conn = d.pop("conn", None)
    if not isinstance(type_, str) or not isinstance(seq, int):
        raise EventError("event type/seq have wrong types")
    if not isinstance(ts, int | float) or isinstance(ts, bool):
        raise EventError(f"event ts must be a number, got {ts!r}")
    return Event(type_, seq, float(ts), str(src), ConnRef.from_dict(conn) if conn else None, d)


@dataclass
class SeqTracker:
    """Detects lost events: a gap in a topic's `seq`, or a new publisher (daemon restart).
    A topic's first event is where its count starts: a subscriber may join at any time."""

    src: str | None = None
    last: dict[str, int] = field(default_factory=dict)
    lost: int = 0

    def observe(self, event: Event) -> bool:
        """True when the subscriber must resynchronise (first event, restart, or a gap)."""
        topic = event.topic
        if event.src != self.src:
            self.src, self.last = event.src, {topic: event.seq}
            return True
        before = self.last.get(topic)
        self.last[topic] = event.seq
        gap = 0 if before is None else event.seq - before - 1
        if gap > 0:
            self.lost += gap
            return True
        return False
