"""The facts publisher: what the rest of the world learns of a worker's connections, by the
facts map (read by Kamailio's workers) and by events (ZeroMQ, or the supervisor's PUSH).

It counts every event (`stats`, metrics), logs it, and encodes nothing for a topic no
subscriber wants. A worker of a supervisor adds a note beside each event about a connection
(daemon/note.py), so that the supervisor keeps its books without decoding the event.
"""

from __future__ import annotations

import collections
import logging
from typing import Any

from tlsbridge.daemon.channels import EventSink
from tlsbridge.daemon.note import encode_note
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap
from tlsbridge.shared.events import ConnRef, EventEncoder
from tlsbridge.shared.facts import TlsFacts

log = logging.getLogger("tlsbridge")


class FactsPublisher:
    """`sink` is None in tests and until the channels are up; `facts_map` None without a map.
    `noted`: a supervisor's worker (events carry its note)."""

    def __init__(self, src: str, counters: collections.Counter[str], *,
                 sink: EventSink | None = None,
                 facts_map: factsmap.FactsMapWriter | None = None,
                 noted: bool = False) -> None:
        self.src = src
        self.counters = counters
        self.sink = sink
        self.facts_map = facts_map
        self._encoder = EventEncoder(src)
        self._noted = noted
        # conn id -> index slot << 16 | port (one int per connection, not a tuple)
        self._map_slots: dict[int, int] = {}

    # -- events -----------------------------------------------------------------------------

    def publish(self, event: ev.TypedEvent) -> None:
        type_, conn, fields = event.TYPE, event.conn, event.wire_fields()
        count_event(self.counters, type_, fields)
        if type_ in _WARNINGS or log.isEnabledFor(logging.INFO):  # a call less per event
            log_event(type_, conn, fields)
        sink = self.sink
        if sink is not None and sink.wants(ev.topic_of(type_, conn)):
            frames = self._encoder.encode(type_, conn, **fields)[1]
            if self._noted and conn is not None:
                frames.append(encode_note(conn, fields))
            sink.send(frames)

    @property
    def subscriptions(self) -> list[str]:
        """The topic prefixes someone subscribes to now ([] for a worker's PUSH)."""
        return self.sink.subscriptions if self.sink is not None else []

    # -- the facts map ----------------------------------------------------------------------

    def map_facts(self, ref: ConnRef, facts: TlsFacts, port: int) -> None:
        """Write the entry of a connection whose hairpin leaves from `port`: before its PROXY
        header goes out, since Kamailio's workers may look it up from then on."""
        if self.facts_map is None:
            return
        # Our certificate by reference: a worker gets it whole once, by a look-up.
        tls = facts.to_dict(local_by_reference=True)
        slot = self.facts_map.put(port, factsmap.encode_entry(ref, tls))
        if slot:
            self._map_slots[ref.id] = slot << 16 | port
        else:
            self.counters["facts_map_too_big"] += 1

    def unmap(self, conn_id: int) -> None:
        """Clear a closing connection's entry: before its hairpin's socket is closed (the loop
        closes it later), so that its port cannot have been taken by a new hairpin whose entry
        this would clear."""
        mapped = self._map_slots.pop(conn_id, None)
        if mapped is not None and self.facts_map is not None:
            self.facts_map.clear(mapped & 0xFFFF, mapped >> 16)

    def close(self) -> None:
        if self.sink is not None:
            self.sink.close()
        if self.facts_map is not None:
            self.facts_map.close()


_WARNINGS = (ev.TLS_FAILED, ev.HAIRPIN_FAILED)


def count_event(counters: collections.Counter[str], type_: str, fields: dict[str, Any]) -> None:
    """The counters `stats` and the metrics read: per type, and per reason for failures."""
    counters[f"events.{type_}"] += 1
    if type_ in (ev.TLS_FAILED, ev.HAIRPIN_FAILED, ev.CONN_CLOSED):
        counters[f"{type_}.{fields.get('reason')}"] += 1


def log_event(type_: str, conn: ConnRef | None, fields: dict[str, Any]) -> None:
    level = logging.WARNING if type_ in _WARNINGS else logging.INFO
    if not log.isEnabledFor(level):
        return
    parts = [f"event={type_}"]
    if conn:
        parts += [f"id={conn.id}", f"dir={conn.direction}", f"peer={conn.peer}",
                  f"hairpin={conn.hairpin}"]
    for key in ("reason", "detail", "bytes_in", "bytes_out", "duration", "pid"):
        if key in fields:
            parts.append(f"{key}={fields[key]!r}" if key == "detail" else f"{key}={fields[key]}")
    tls = fields.get("tls")
    if tls:
        parts += [f"version={tls.version}", f"cipher={tls.cipher}", f"sni={tls.sni or '-'}"]
    log.log(level, " ".join(parts))
