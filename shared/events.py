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
from typing import Any, NamedTuple

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


# -- typed events: one class per type, over the same wire fields ----------------------------
#
# A publisher builds one (`ConnClosed(conn, reason=..., ...)`) and sends `.TYPE`, `.conn` and
# `.wire_fields()`; a subscriber reads one with `typed(event)` or `ConnClosed.from_event(event)`.
# Optional fields that are None are not on the wire, as before these classes existed.


def _field(event: Event, key: str, kinds: type | tuple[type, ...], default: Any = ...) -> Any:
    value = event.fields.get(key, default)
    if value is ...:
        raise EventError(f"{event.type} lacks {key!r}")
    if value is not default and not isinstance(value, kinds):
        raise EventError(f"{event.type}: {key} {value!r} has the wrong type")
    return value


def _conn(event: Event) -> ConnRef:
    if event.conn is None:
        raise EventError(f"{event.type} lacks its conn")
    return event.conn


def _expect(event: Event, type_: str) -> None:
    if event.type != type_:
        raise EventError(f"a {event.type} event is not {type_}")


_NUMBER = (int, float)


class TlsEstablished(NamedTuple):
    conn: ConnRef
    tls: TlsFacts | Mapping[str, Any]
    TYPE = TLS_ESTABLISHED

    def wire_fields(self) -> dict[str, Any]:
        return {"tls": self.tls}

    @classmethod
    def from_event(cls, event: Event) -> TlsEstablished:
        _expect(event, cls.TYPE)
        return cls(_conn(event), _field(event, "tls", Mapping))


class TlsFailed(NamedTuple):
    """A handshake that failed, timed out, or a connection refused before any TLS."""

    conn: ConnRef
    reason: str
    detail: str
    TYPE = TLS_FAILED

    def wire_fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail}

    @classmethod
    def from_event(cls, event: Event) -> TlsFailed:
        _expect(event, cls.TYPE)
        return cls(_conn(event), _field(event, "reason", str), _field(event, "detail", str, ""))


class HairpinFailed(NamedTuple):
    conn: ConnRef
    reason: str
    detail: str
    TYPE = HAIRPIN_FAILED

    def wire_fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail}

    @classmethod
    def from_event(cls, event: Event) -> HairpinFailed:
        _expect(event, cls.TYPE)
        return cls(_conn(event), _field(event, "reason", str), _field(event, "detail", str, ""))


class ConnClosed(NamedTuple):
    """The one end of a connection. `keys`: the outbound identities it served (outbound)."""

    conn: ConnRef
    reason: str
    bytes_in: int
    bytes_out: int
    duration: float
    detail: str = ""
    keys: list[str] | None = None
    TYPE = CONN_CLOSED

    def wire_fields(self) -> dict[str, Any]:
        out: dict[str, Any] = {"duration": self.duration, "reason": self.reason,
                               "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        if self.detail:
            out["detail"] = self.detail
        if self.keys is not None:
            out["keys"] = self.keys
        return out

    @classmethod
    def from_event(cls, event: Event) -> ConnClosed:
        _expect(event, cls.TYPE)
        return cls(_conn(event), _field(event, "reason", str), _field(event, "bytes_in", int),
                   _field(event, "bytes_out", int), _field(event, "duration", _NUMBER),
                   _field(event, "detail", str, ""), _field(event, "keys", list, None))


class OutboundReady(NamedTuple):
    """A connect's outcome: `remote` is the server's real address, `conn.peer` the one
    declared to Kamailio; `tags` the requesters' opaque tags."""

    conn: ConnRef
    tls: TlsFacts | Mapping[str, Any] | None
    remote: str
    target: Mapping[str, Any]
    key: str
    tags: list[Any]
    TYPE = OUTBOUND_READY

    def wire_fields(self) -> dict[str, Any]:
        return {"tls": self.tls, "remote": self.remote, "target": self.target, "key": self.key,
                "tags": self.tags}

    @classmethod
    def from_event(cls, event: Event) -> OutboundReady:
        _expect(event, cls.TYPE)
        return cls(_conn(event), _field(event, "tls", Mapping, None),
                   _field(event, "remote", str), _field(event, "target", Mapping),
                   _field(event, "key", str), _field(event, "tags", list, []))


class OutboundFailed(NamedTuple):
    conn: ConnRef | None
    reason: str
    detail: str
    target: Mapping[str, Any]
    key: str
    tags: list[Any]
    TYPE = OUTBOUND_FAILED

    def wire_fields(self) -> dict[str, Any]:
        return {"reason": self.reason, "detail": self.detail, "target": self.target,
                "key": self.key, "tags": self.tags}

    @classmethod
    def from_event(cls, event: Event) -> OutboundFailed:
        _expect(event, cls.TYPE)
        return cls(event.conn, _field(event, "reason", str), _field(event, "detail", str, ""),
                   _field(event, "target", Mapping), _field(event, "key", str),
                   _field(event, "tags", list, []))


class ConfigReloaded(NamedTuple):
    changed: list[str]
    restart_needed: list[str]
    conn: None = None
    TYPE = CONFIG_RELOADED

    def wire_fields(self) -> dict[str, Any]:
        return {"changed": self.changed, "restart_needed": self.restart_needed}

    @classmethod
    def from_event(cls, event: Event) -> ConfigReloaded:
        _expect(event, cls.TYPE)
        return cls(_field(event, "changed", list), _field(event, "restart_needed", list))


class ConfigReloadFailed(NamedTuple):
    reason: str
    conn: None = None
    TYPE = CONFIG_RELOAD_FAILED

    def wire_fields(self) -> dict[str, Any]:
        return {"reason": self.reason}

    @classmethod
    def from_event(cls, event: Event) -> ConfigReloadFailed:
        _expect(event, cls.TYPE)
        return cls(_field(event, "reason", str))


class CertExpiring(NamedTuple):
    owner: str
    path: str
    not_after: str
    days_left: float
    conn: None = None
    TYPE = CERT_EXPIRING

    def wire_fields(self) -> dict[str, Any]:
        return {"owner": self.owner, "path": self.path, "not_after": self.not_after,
                "days_left": self.days_left}

    @classmethod
    def from_event(cls, event: Event) -> CertExpiring:
        _expect(event, cls.TYPE)
        return cls(_field(event, "owner", str), _field(event, "path", str),
                   _field(event, "not_after", str), _field(event, "days_left", _NUMBER))


class DaemonStarted(NamedTuple):
    """`workers`: set by a supervisor only."""

    pid: int
    workers: int | None = None
    conn: None = None
    TYPE = DAEMON_STARTED

    def wire_fields(self) -> dict[str, Any]:
        if self.workers is None:
            return {"pid": self.pid}
        return {"pid": self.pid, "workers": self.workers}

    @classmethod
    def from_event(cls, event: Event) -> DaemonStarted:
        _expect(event, cls.TYPE)
        return cls(_field(event, "pid", int), _field(event, "workers", int, None))


class DaemonStopping(NamedTuple):
    pid: int
    conn: None = None
    TYPE = DAEMON_STOPPING

    def wire_fields(self) -> dict[str, Any]:
        return {"pid": self.pid}

    @classmethod
    def from_event(cls, event: Event) -> DaemonStopping:
        _expect(event, cls.TYPE)
        return cls(_field(event, "pid", int))


TypedEvent = (TlsEstablished | TlsFailed | HairpinFailed | ConnClosed | OutboundReady
              | OutboundFailed | ConfigReloaded | ConfigReloadFailed | CertExpiring
              | DaemonStarted | DaemonStopping)

_TYPED: dict[str, Any] = {cls.TYPE: cls for cls in (
    TlsEstablished, TlsFailed, HairpinFailed, ConnClosed, OutboundReady, OutboundFailed,
    ConfigReloaded, ConfigReloadFailed, CertExpiring, DaemonStarted, DaemonStopping)}
assert set(_TYPED) == EVENT_TYPES


def typed(event: Event) -> TypedEvent:
    """The event as its type's class; EventError if its fields do not fit it."""
    cls = _TYPED.get(event.type)
    if cls is None:
        raise EventError(f"unknown event type {event.type!r}")
    result: TypedEvent = cls.from_event(event)
    return result


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
