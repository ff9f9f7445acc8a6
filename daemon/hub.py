"""The daemon's shared parts: the connection table, the event publisher and the control server."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import resource
import secrets
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import zmq
import zmq.asyncio

from tlsbridge.daemon.admission import Admission
from tlsbridge.daemon.channels import ControlServer, EventSink, unlink
from tlsbridge.daemon.lookup_server import LookupServer
from tlsbridge.daemon.supervisors.note import encode_note
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap
from tlsbridge.shared.addr import default_sni
from tlsbridge.shared.events import ConnRef, EventEncoder
from tlsbridge.shared.facts import TlsFacts
from tlsbridge.shared.settings import lookup_socket_of

if TYPE_CHECKING:
    from tlsbridge.daemon.config import Config
    from tlsbridge.daemon.outbound import Connector

log = logging.getLogger("tlsbridge")


class Connection(Protocol):
    id: int
    hairpin_key: str | None
    facts: TlsFacts | None
    bytes_in: int
    bytes_out: int
    started: float

    @property
    def ref(self) -> ConnRef: ...

    def kill(self, reason: str = "killed") -> None: ...


class Hub:
    """`worker` = (index, count) when a supervisor runs several: events then go to the
    supervisor, control requests come from it, and connection ids stay unique across workers."""

    def __init__(self, config: Config, worker: tuple[int, int] | None = None,
                 generation: int = 0) -> None:
        self.config = config
        self.worker = worker
        # ids of a restarted worker start in a range of their own; (id - 1) % count = index
        self._id_base = generation * (worker[1] if worker else 1) << 32
        self.log = log
        self.started = time.time()
        self.src = secrets.token_hex(8)
        self._encoder = EventEncoder(self.src)
        self._ids = 0
        self.conns: dict[int, Connection] = {}
        self.by_hairpin: dict[str, Connection] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.admission = Admission(effective_max_connections(config.max_connections),
                                   config.max_per_ip)
        self._ctx = zmq.asyncio.Context()
        self._events: EventSink | None = None
        self._control: ControlServer | None = None
        self._lookup: LookupServer | None = None
        self._facts_map: factsmap.FactsMapWriter | None = None
        self._map_slots: dict[int, tuple[int, int]] = {}  # conn id -> (port, index slot)
        self.connector: Connector | None = None
        self.reloader: Callable[[], Awaitable[dict[str, Any]]] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        private_run_dir(self.config.run_dir)
        hwm = self.config.events_hwm
        map_path = factsmap.facts_map_of(self.config.run_dir)
        if self.worker is None:
            factsmap.create(map_path, regions=1)
        self._facts_map = factsmap.FactsMapWriter(map_path, self.worker[0] if self.worker else 0)
        if self.worker is None:
            self._events = EventSink.publisher(self.config.events_endpoint, hwm, self._dropped)
            self._control = ControlServer.router(self._ctx, self.config.control_endpoint,
                                                 self.handle_request)
        else:
            index, _ = self.worker
            self._events = EventSink.pusher(worker_events_endpoint(self.config), hwm,
                                            self._dropped)
            self._control = ControlServer.dealer(self._ctx, worker_control_endpoint(self.config),
                                                 f"w{index}".encode(), self.handle_request)
        if self.worker is None:
            self._lookup = LookupServer(lookup_socket_of(self.config.run_dir), self.lookup_entry)
            self._lookup.start()
            self._events.greet = lambda: self.publish(ev.DAEMON_STARTED, None, pid=os.getpid())
            self._events.greet()

    def lookup_entry(self, hairpin: str) -> bytes | None:
        """The facts entry of a hairpin, as the KEMI module stores it in htable."""
        conn = self.by_hairpin.get(hairpin)
        if conn is None or conn.facts is None:
            return None
        return facts_entry(conn.ref.to_dict(), conn.facts.to_dict())

    def serve_control(self) -> None:
        """Answer control requests from now on: once this answers, the listeners are up."""
        assert self._control is not None
        self._control.start()

    def _dropped(self) -> None:
        self.counters["events_dropped"] += 1

    async def close(self) -> None:
        if self.worker is None:
            self.publish(ev.DAEMON_STOPPING, None, pid=os.getpid())
        if self._control is not None:
            await self._control.close()
        if self._events is not None:
            self._events.close()
        if self._lookup is not None:
            self._lookup.close()
        if self._facts_map is not None:
            self._facts_map.close()
        self._ctx.term()
        if self.worker is None:
            factsmap.remove(factsmap.facts_map_of(self.config.run_dir))
            unlink(self.config.events_endpoint)
            unlink(self.config.control_endpoint)

    # -- connection table -------------------------------------------------------------------

    def next_id(self) -> int:
        self._ids += 1
        if self.worker is None:
            return self._ids
        index, count = self.worker
        return self._id_base + (self._ids - 1) * count + index + 1  # worker = (id - 1) % count

    @property
    def admits_remotely(self) -> bool:
        """Limits across workers are counted by the supervisor, which a worker must ask."""
        return self.worker is not None and bool(
            self.config.max_connections or self.config.max_per_ip)

    def admit(self, ip: str) -> str | None:
        """Why a new inbound connection from `ip` is refused, or None (and counted)."""
        refusal = self.admission.admit(ip)
        if refusal:
            self.counters[f"refused.{refusal}"] += 1
        return refusal

    async def admit_remotely(self, ip: str, conn_id: int) -> str | None:
        assert self._control is not None
        try:
            reply = await self._control.ask("admit", timeout=2.0, ip=ip, id=conn_id)
        except ctl.ControlError as exc:
            log.error("admission: the supervisor did not answer (%s); admitting %s", exc, ip)
            return None
        refusal = reply.get("refused")
        if refusal:
            self.counters[f"refused.{refusal}"] += 1
        return refusal

    def release(self, ip: str) -> None:
        if not self.admits_remotely:  # the supervisor releases on conn.closed
            self.admission.release(ip)

    def register(self, conn: Connection) -> None:
        self.conns[conn.id] = conn
        self.counters["accepted"] += 1

    def index_hairpin(self, conn: Connection, port: int) -> None:
        """Make the facts of `conn`, whose hairpin leaves from `port`, findable: call before
        its PROXY header goes out, since Kamailio's workers may look them up from then on."""
        assert conn.hairpin_key is not None
        self.by_hairpin[conn.hairpin_key] = conn
        if self._facts_map is not None and conn.facts is not None:
            # Our certificate by reference: a worker gets it whole once, by a look-up.
            tls = conn.facts.to_dict(local_by_reference=True)
            slot = self._facts_map.put(port, factsmap.encode_entry(conn.ref, tls))
            if slot:
                self._map_slots[conn.id] = (port, slot)
            else:
                self.counters["facts_map_too_big"] += 1

    def unregister(self, conn: Connection) -> None:
        if self.conns.pop(conn.id, None) is not None:
            self.counters["bytes_in_closed"] += conn.bytes_in
            self.counters["bytes_out_closed"] += conn.bytes_out
        if conn.hairpin_key and self.by_hairpin.get(conn.hairpin_key) is conn:
            del self.by_hairpin[conn.hairpin_key]
        mapped = self._map_slots.pop(conn.id, None)
        if mapped is not None and self._facts_map is not None:
            # Before the hairpin's socket is closed (the loop closes it later), so its port
            # cannot have been taken by a new hairpin whose entry this would clear.
            self._facts_map.clear(*mapped)

    def find(self, *, id: int | None = None, hairpin: str | None = None,
             peer: str | None = None) -> Connection | None:
        if id is not None:
            return self.conns.get(id)
        if hairpin is not None:
            return self.by_hairpin.get(hairpin)
        if peer is not None:
            return next((c for c in self.conns.values() if c.ref.peer == peer), None)
        return None

    # -- events -----------------------------------------------------------------------------

    def publish(self, type_: str, conn: ConnRef | None, **fields: Any) -> None:
        count_event(self.counters, type_, fields)
        log_event(type_, conn, fields)
        events = self._events
        if events is not None and events.wants(ev.topic_of(type_, conn)):
            frames = self._encoder.encode(type_, conn, **fields)[1]
            if self.worker is not None and conn is not None:
                frames.append(encode_note(conn, fields))
            events.send(frames)

    # -- control ----------------------------------------------------------------------------

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
        if self.reloader is None:
            return ctl.encode_error(rid, ctl.UNSUPPORTED, "reload is not available")
        try:
            changes = await self.reloader()
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
        conn = self.find(**{key: value})
        if conn is None or conn.facts is None:
            raise ctl.ControlError(ctl.NOT_FOUND, f"no established connection with {key}={value}")
        return _describe(conn)

    def _op_list(self, args: dict[str, Any]) -> dict[str, Any]:
        return {"conns": [_describe(c) for c in self.conns.values() if c.facts is not None]}

    def _op_kill(self, args: dict[str, Any]) -> dict[str, Any]:
        conn_id = args.get("id")
        if type(conn_id) is not int:  # True is an int, not an id
            raise ctl.ControlError(ctl.BAD_REQUEST, "kill needs an integer 'id'")
        conn = self.conns.get(conn_id)
        if conn is None:
            raise ctl.ControlError(ctl.NOT_FOUND, f"no connection with id={conn_id}")
        conn.kill()
        return {"killed": conn_id}

    def _op_connect(self, args: dict[str, Any]) -> dict[str, Any]:
        from tlsbridge.daemon.outbound import Target

        host, port = args.get("host"), args.get("port", 5061)
        sni, profile = args.get("sni"), args.get("profile") or "default"
        if not isinstance(host, str) or not host:
            raise ctl.ControlError(ctl.BAD_REQUEST, "connect needs a 'host' string")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ctl.ControlError(ctl.BAD_REQUEST, f"connect: bad port {port!r}")
        if sni is not None and not isinstance(sni, str):
            raise ctl.ControlError(ctl.BAD_REQUEST, "connect: 'sni' must be a string")
        if self.connector is None or profile not in self.config.clients:
            raise ctl.ControlError(ctl.NOT_FOUND, f"connect: no client profile {profile!r}")
        sni = sni if sni is not None else default_sni(host)
        if not args.get("profile"):
            profile = self._profile_for(host, port)
        target = Target(host.strip("[]"), port, sni, profile)
        return self.connector.connect(target, args.get("tag"))

    def _profile_for(self, host: str, port: int) -> str:
        """The client profile whose `destinations` name this server (tls.cfg's
        [client:IP:PORT]), else "default"."""
        from tlsbridge.shared.addr import format_addr

        target = format_addr(host.strip("[]"), port)
        for name, profile in self.config.clients.items():
            if target in profile.destinations:
                return name
        return "default"

    def _op_stats(self, args: dict[str, Any]) -> dict[str, Any]:
        conns = list(self.conns.values())
        return {
            "uptime": self._uptime(),
            "open": len(conns),
            "open_in": sum(1 for c in conns if c.ref.direction == "in"),
            "open_out": sum(1 for c in conns if c.ref.direction == "out"),
            "bytes_in": sum(c.bytes_in for c in conns),
            "bytes_out": sum(c.bytes_out for c in conns),
            "counters": dict(self.counters),
            # Who listens: Kamailio's rtimer subscribes to outbound. (and more) once it runs.
            "subscriptions": self._events.subscriptions if self._events else [],
        }

    def _uptime(self) -> float:
        return round(time.time() - self.started, 3)


def count_event(counters: collections.Counter[str], type_: str, fields: dict[str, Any]) -> None:
    """The counters `stats` and the metrics read: per type, and per reason for failures."""
    counters[f"events.{type_}"] += 1
    if type_ in (ev.TLS_FAILED, ev.HAIRPIN_FAILED, ev.CONN_CLOSED):
        counters[f"{type_}.{fields.get('reason')}"] += 1


def effective_max_connections(configured: int) -> int:
    """The configured limit, capped below the open-files limit (two descriptors per
    connection and a reserve) so a flood is refused with an event, not by a failing accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    cap = max(1, (soft - 64) // 2) if soft != resource.RLIM_INFINITY else 1 << 30
    return min(configured, cap) if configured > 0 else cap


def _describe(conn: Connection) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    return {
        "conn": conn.ref.to_dict(),
        "tls": conn.facts.to_dict() if conn.facts else None,
        "bytes_in": conn.bytes_in,
        "bytes_out": conn.bytes_out,
        "age": round(loop.time() - conn.started, 3),
        "keys": sorted(getattr(conn, "keys", ())),
    }


def private_run_dir(path: Path) -> None:
    """The run directory guards the control socket: whoever can write there can kill
    connections. Create it 0750, or tighten one that others may write to."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o027:
        try:
            os.chmod(path, mode & ~0o027)
        except OSError as exc:
            raise OSError(f"run directory {path} is open to others (mode {mode:o}) "
                          f"and cannot be tightened: {exc.strerror}") from None
        log.warning("run directory %s was mode %o: tightened to %o", path, mode, mode & ~0o027)


def facts_entry(conn: dict[str, Any], tls: dict[str, Any]) -> bytes:
    return json.dumps({"conn": conn, "tls": tls}, separators=(",", ":")).encode()


def worker_events_endpoint(config: Config) -> str:
    return f"ipc://{config.run_dir}/workers-events.sock"


def worker_control_endpoint(config: Config) -> str:
    return f"ipc://{config.run_dir}/workers-control.sock"


def log_event(type_: str, conn: ConnRef | None, fields: dict[str, Any]) -> None:
    level = logging.WARNING if type_ in (ev.TLS_FAILED, ev.HAIRPIN_FAILED) else logging.INFO
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
