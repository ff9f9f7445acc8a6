"""The connection table of one worker: every live relay by id and by hairpin, and the ids.

It knows connections only by the narrow `Connection` protocol; the control operations and the
outbound connector read it, and it depends on neither.
"""

from __future__ import annotations

import collections
from typing import Protocol

from tlsbridge.shared.events import ConnRef
from tlsbridge.shared.facts import TlsFacts


class Connection(Protocol):
    id: int
    hairpin_key: str | None
    facts: TlsFacts | None
    started: float

    @property
    def ref(self) -> ConnRef: ...

    @property
    def bytes_in(self) -> int: ...

    @property
    def bytes_out(self) -> int: ...

    def kill(self, reason: str = ...) -> None: ...


class ConnectionTable:
    """`worker` = (index, count) when a supervisor runs several: connection ids then stay
    unique across workers, and across a worker's restarts by its `generation`."""

    def __init__(self, counters: collections.Counter[str],
                 worker: tuple[int, int] | None = None, generation: int = 0) -> None:
        self.counters = counters
        self.worker = worker
        # ids of a restarted worker start in a range of their own; (id - 1) % count = index
        self._id_base = generation * (worker[1] if worker else 1) << 32
        self._ids = 0
        self.conns: dict[int, Connection] = {}
        self.by_hairpin: dict[str, Connection] = {}

    def next_id(self) -> int:
        self._ids += 1
        if self.worker is None:
            return self._ids
        index, count = self.worker
        return self._id_base + (self._ids - 1) * count + index + 1  # worker = (id - 1) % count

    def register(self, conn: Connection) -> None:
        self.conns[conn.id] = conn
        self.counters["accepted"] += 1

    def index_hairpin(self, conn: Connection) -> None:
        """Findable by its hairpin from now on (look-ups, `lookup`)."""
        assert conn.hairpin_key is not None
        self.by_hairpin[conn.hairpin_key] = conn

    def unregister(self, conn: Connection) -> None:
        if self.conns.pop(conn.id, None) is not None:
            self.counters["bytes_in_closed"] += conn.bytes_in
            self.counters["bytes_out_closed"] += conn.bytes_out
        if conn.hairpin_key and self.by_hairpin.get(conn.hairpin_key) is conn:
            del self.by_hairpin[conn.hairpin_key]

    def find(self, *, id: int | None = None, hairpin: str | None = None,
             peer: str | None = None) -> Connection | None:
        if id is not None:
            return self.conns.get(id)
        if hairpin is not None:
            return self.by_hairpin.get(hairpin)
        if peer is not None:
            return next((c for c in self.conns.values() if c.ref.peer == peer), None)
        return None

    def open_counts(self) -> tuple[int, int, int, int]:
        """(inbound, outbound, bytes in, bytes out) of the open connections."""
        conns = list(self.conns.values())
        inbound = sum(1 for c in conns if c.ref.direction == "in")
        return (inbound, len(conns) - inbound, sum(c.bytes_in for c in conns),
                sum(c.bytes_out for c in conns))
