"""The control operations of one worker (or of a daemon without supervisor): `ping`,
`lookup`, `list`, `kill`, `stats` over the connection table (and the publisher's
subscriptions), `connect` by the outbound connector, `reload` by the server. The table knows
nothing of them.
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from tlsbridge.shared import control as ctl
from tlsbridge.shared.lookup import encode_json_entry

if TYPE_CHECKING:
    from tlsbridge.daemon.outbound import Connector
    from tlsbridge.daemon.publisher import FactsPublisher
    from tlsbridge.daemon.table import Connection, ConnectionTable

# reload() -> the changes; raises ConfigError or OSError with the reason
Reloader = Callable[[], Awaitable[dict[str, Any]]]


class ControlOps:
    def __init__(self, table: ConnectionTable, publisher: FactsPublisher,
                 counters: collections.Counter[str], src: str, connector: Connector,
                 reload: Reloader) -> None:
        self.table = table
        self.publisher = publisher
        self.counters = counters
        self.src = src
        self.connector = connector
        self.reload = reload
        self.started = time.time()

    def lookup_entry(self, hairpin: str) -> bytes | None:
        """The JSON entry of a hairpin (the datagram look-up's answer)."""
        conn = self.table.by_hairpin.get(hairpin)
        if conn is None or conn.facts is None:
            return None
        return encode_json_entry(conn.ref.to_dict(), conn.facts.to_dict())

    def handle_request(self, body: bytes) -> bytes | Awaitable[bytes] | None:
        try:
            req = ctl.decode_request(body)
        except ctl.ControlError as exc:
            self.counters["control.errors"] += 1
            return ctl.encode_error(ctl.peek_id(body), exc.code, exc.message)
        if req.op == "reload":
            return self._reload(req.rid)
        if req.args.get("noreply"):
            self._handle(req)
            return None
        return self._handle(req)

    async def _reload(self, rid: int) -> bytes:
        from tlsbridge.daemon.config import ConfigError

        self.counters["control.reload"] += 1
        try:
            changes = await self.reload()
        except (ConfigError, OSError) as exc:
            return ctl.encode_error(rid, "reload_failed", str(exc))
        return ctl.encode_reply(rid, **changes)

    def _handle(self, req: ctl.Request) -> bytes:
        self.counters[f"control.{req.op}"] += 1
        handler = getattr(self, f"_op_{req.op}", None)
        if handler is None:
            return ctl.encode_error(req.rid, ctl.UNSUPPORTED, f"op {req.op!r} not available yet")
        try:
            return ctl.encode_reply(req.rid, **handler(req.args))
        except ctl.ControlError as exc:
            return ctl.encode_error(req.rid, exc.code, exc.message)

    def _op_ping(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"pong": True, "pid": os.getpid(), "src": self.src, "uptime": self._uptime()}

    def _op_lookup(self, args: dict[str, Any]) -> dict[str, Any]:
        keys = {k: args.get(k) for k in ("id", "hairpin", "peer") if args.get(k) is not None}
        if len(keys) != 1:
            raise ctl.ControlError(ctl.BAD_REQUEST, "lookup takes exactly one of id, hairpin, peer")
        (key, value), = keys.items()
        if type(value) is not (int if key == "id" else str):  # True is an int, not an id
            raise ctl.ControlError(ctl.BAD_REQUEST, f"lookup: bad {key} {value!r}")
        conn = self.table.find(**{key: value})
        if conn is None or conn.facts is None:
            raise ctl.ControlError(ctl.NOT_FOUND, f"no established connection with {key}={value}")
        return describe(conn)

    def _op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"conns": [describe(c) for c in self.table.conns.values() if c.facts is not None]}

    def _op_kill(self, args: dict[str, Any]) -> dict[str, Any]:
        conn_id = args.get("id")
        if type(conn_id) is not int:  # True is an int, not an id
            raise ctl.ControlError(ctl.BAD_REQUEST, "kill needs an integer 'id'")
        conn = self.table.conns.get(conn_id)
        if conn is None:
            raise ctl.ControlError(ctl.NOT_FOUND, f"no connection with id={conn_id}")
        conn.kill()
        return {"killed": conn_id}

    def _op_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        return self.connector.connect_request(args)

    def _op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        open_in, open_out, bytes_in, bytes_out = self.table.open_counts()
        return {
            "uptime": self._uptime(),
            "open": open_in + open_out,
            "open_in": open_in,
            "open_out": open_out,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            "counters": dict(self.counters),
            # Who listens: Kamailio's rtimer subscribes to outbound. (and more) once it runs.
            "subscriptions": self.publisher.subscriptions,
        }

    def _uptime(self) -> float:
        return round(time.time() - self.started, 3)


def describe(conn: Connection) -> dict[str, Any]:
    """A connection as `lookup` and `list` answer."""
    loop = asyncio.get_running_loop()
    return {
        "conn": conn.ref.to_dict(),
        "tls": conn.facts.to_dict() if conn.facts else None,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "age": round(loop.time() - conn.started, 3),
        "keys": sorted(getattr(conn, "keys", ())),
    }
