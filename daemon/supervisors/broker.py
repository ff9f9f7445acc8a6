"""The supervisor's broker: what clients see as one daemon, in front of N workers.

It republishes the workers' events with its own sequence numbers, keeps its books from the
notes beside them (daemon/note.py: open connections by id and hairpin, admission counts,
counters), answers look-ups and control requests from those books or forwards them to the
worker that owns the connection (or to all, merging the answers), and admits inbound
connections for all workers. The table keeps each connection's tls.established as the worker
encoded it; an event is decoded only for a subscriber or a question. It knows workers by
index only: starting and restarting them is processes.py's job.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import secrets
import time
import zlib
from typing import Any

import msgpack
import zmq
import zmq.asyncio

from tlsbridge.daemon import reload as rl
from tlsbridge.daemon.admission import Admission, effective_max_connections
from tlsbridge.daemon.channels import ControlServer, EventSink, bind, unlink
from tlsbridge.daemon.config import Config, ConfigError, load_config
from tlsbridge.daemon.lookup_server import LookupServer
from tlsbridge.daemon.note import decode_note
from tlsbridge.daemon.publisher import count_event
from tlsbridge.daemon.rundir import private_run_dir, worker_control_endpoint, worker_events_endpoint
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap
from tlsbridge.shared import reasons as r
from tlsbridge.shared.addr import TLS_DEFAULT_PORT
from tlsbridge.shared.events import EventEncoder
from tlsbridge.shared.lookup import encode_json_entry
from tlsbridge.shared.settings import lookup_socket_of

log = logging.getLogger("tlsbridge")

FORWARD_TIMEOUT = 5.0
EVENT_BATCH = 500  # worker events handled per turn of the loop
_COUNTED_HERE = ("events", "tls.failed.", "hairpin.failed.", "conn.closed.", "bytes_")
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: pyzmq's flags are enums
# Events the supervisor keeps its books by from their note alone (outbound.ready needs its key).
_BY_NOTE = frozenset(f"{t}.{d}".encode() for t in (ev.TLS_ESTABLISHED, ev.CONN_CLOSED,
                                                   ev.TLS_FAILED, ev.HAIRPIN_FAILED)
                     for d in ("in", "out"))


class _Open:
    """An open connection of a worker: its tls.established as the worker encoded it."""

    __slots__ = ("body", "direction", "hairpin", "keys", "since")

    def __init__(self, body: bytes, direction: str, hairpin: str | None) -> None:
        self.body = body
        self.direction = direction
        self.hairpin = hairpin
        self.since = time.time()
        self.keys: list[str] = []

    def facts(self) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """Its `conn` and `tls` maps; ValueError if the worker's event was not one."""
        try:
            d = msgpack.unpackb(self.body)
            return dict(d["conn"]), d.get("tls")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise ValueError(f"bad tls.established from a worker: {exc}") from None


class Broker:
    def __init__(self, config: Config, workers: int) -> None:
        self.config = config
        self.count = workers
        self.started = time.time()
        self.src = secrets.token_hex(8)
        self._encoder = EventEncoder(self.src)
        self.counters: collections.Counter[str] = collections.Counter()
        self.table: dict[int, _Open] = {}
        # Limits count across all workers here; workers ask before they read a byte.
        self.admission = Admission(effective_max_connections(config.max_connections),
                                   config.max_per_ip)
        self.admits = bool(config.max_connections or config.max_per_ip)
        self._admitted: dict[int, str] = {}
        self._closed_early: collections.OrderedDict[int, bool] = collections.OrderedDict()
        self.by_hairpin: dict[str, int] = {}
        self._ctx = zmq.asyncio.Context()
        self._rids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[bytes]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # -- lifecycle --------------------------------------------------------------------------

    def open(self) -> None:
        """Bind the workers' endpoints and create the facts map: before any worker starts."""
        private_run_dir(self.config.run_dir)
        self._events = EventSink.publisher(self.config.events_endpoint, self.config.events_hwm,
                                           self._dropped)
        # A plain socket drained from the loop's reader callback: an asyncio receive per event
        # cost more than the event's own handling under connection churn.
        self._pull = zmq.Context.instance().socket(zmq.PULL)
        self._pull.setsockopt(zmq.RCVHWM, 0)  # never push back on a worker's events
        bind(self._pull, worker_events_endpoint(self.config))
        self._wctl = self._ctx.socket(zmq.ROUTER)
        self._wctl.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a dead worker is an error, not a drop
        self._wctl.setsockopt(zmq.LINGER, 0)
        bind(self._wctl, worker_control_endpoint(self.config))
        self._control = ControlServer.router(self._ctx, self.config.control_endpoint,
                                             self.handle_request)
        self._lookup = LookupServer(lookup_socket_of(self.config.run_dir), self.lookup_entry)
        factsmap.create(factsmap.facts_map_of(self.config.run_dir), regions=self.count)
        loop = asyncio.get_running_loop()
        loop.add_reader(self._pull.getsockopt(zmq.FD), self._drain_events)
        loop.call_soon(self._drain_events)  # what came before the reader was watched
        task = loop.create_task(self._pump_replies())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def serve(self) -> None:
        """Answer clients from now on (every worker listens) and greet subscribers."""
        self._control.start()
        self._lookup.start()
        self._events.greet = lambda: self.publish(ev.DaemonStarted(os.getpid(), self.count))
        self._events.greet()

    async def close(self) -> None:
        """After the workers are gone (their last events are in)."""
        self.publish(ev.DaemonStopping(os.getpid()))
        for task in list(self._tasks):
            task.cancel()
        await self._control.close()
        self._lookup.close()
        factsmap.remove(factsmap.facts_map_of(self.config.run_dir))
        asyncio.get_running_loop().remove_reader(self._pull.getsockopt(zmq.FD))
        for sock in (self._pull, self._wctl):
            sock.close(linger=0)
        self._events.close()
        self._ctx.term()
        for endpoint in (self.config.events_endpoint, self.config.control_endpoint,
                         worker_events_endpoint(self.config),
                         worker_control_endpoint(self.config)):
            unlink(endpoint)

    async def ping(self, index: int) -> None:
        """ControlError unless worker `index` answers within half a second."""
        await self._ask(index, "ping", {}, timeout=0.5)

    def forget_worker(self, index: int) -> None:
        """Its connections died with it: say so, as their worker no longer can."""
        for conn_id in [i for i in self._admitted if (i - 1) % self.count == index]:
            self.admission.release(self._admitted.pop(conn_id))
        for conn_id in [i for i in self._closed_early if (i - 1) % self.count == index]:
            del self._closed_early[conn_id]
        for conn_id in [i for i in self.table if (i - 1) % self.count == index]:
            entry = self.table.pop(conn_id)
            self.by_hairpin.pop(entry.hairpin or "", None)
            try:
                conn = ev.ConnRef.from_dict(entry.facts()[0])
            except (ValueError, ev.EventError) as exc:
                log.error("conn %d of worker %d: %s", conn_id, index, exc)
                continue
            self.publish(ev.ConnClosed(conn, r.WORKER_DIED, 0, 0, 0.0, keys=entry.keys))

    # -- admission across workers -------------------------------------------------------------

    def _admit(self, ip: str, conn_id: int) -> str | None:
        if conn_id in self._closed_early:  # it closed before its admission was asked for
            del self._closed_early[conn_id]
            return r.CLOSED_BEFORE_ADMISSION
        refused = self.admission.admit(ip)
        if refused:
            self.counters[f"refused.{refused}"] += 1
        else:
            self._admitted[conn_id] = ip
        return refused

    def _release(self, conn_id: int, direction: str) -> None:
        """Give back what this connection's admission took; its close can come first (the
        events and the admission requests travel on different sockets)."""
        if direction != "in" or not self.admits:
            return
        ip = self._admitted.pop(conn_id, None)
        if ip is not None:
            self.admission.release(ip)
            return
        self._closed_early[conn_id] = True
        while len(self._closed_early) > 10_000:
            self._closed_early.popitem(last=False)

    # -- events -----------------------------------------------------------------------------

    def _dropped(self) -> None:
        self.counters["events_dropped"] += 1

    def publish(self, event: ev.TypedEvent) -> None:
        self._publish_fields(event.TYPE, event.conn, event.wire_fields())

    def _publish_fields(self, type_: str, conn: ev.ConnRef | None,
                        fields: dict[str, Any]) -> None:
        count_event(self.counters, type_, fields)
        if self._events.wants(ev.topic_of(type_, conn)):
            self._events.send(self._encoder.encode(type_, conn, **fields)[1])

    def _drain_events(self) -> None:
        # ZeroMQ's descriptor signals an edge: take everything queued, in bounded turns.
        if self._pull.closed:  # a turn scheduled before shutdown
            return
        for _ in range(EVENT_BATCH):
            if not self._pull.get(_EVENTS) & _POLLIN:
                return
            self._republish(self._pull.recv_multipart(zmq.NOBLOCK))
        asyncio.get_running_loop().call_soon(self._drain_events)

    def _republish(self, frames: list[bytes]) -> None:
        if len(frames) == 3 and frames[0] in _BY_NOTE:
            self._take_noted(frames)
            return
        try:
            event = ev.decode_event(frames[:2])
        except ev.EventError as exc:
            log.error("bad event from a worker: %s", exc)
            return
        if event.type == ev.OUTBOUND_READY and event.conn is not None:
            self._add_key(event.conn.id, event.fields.get("key"))
        self._publish_fields(event.type, event.conn, dict(event.fields))

    def _take_noted(self, frames: list[bytes]) -> None:
        topic_b, body, raw_note = frames
        try:
            note = decode_note(raw_note)
        except ValueError as exc:
            log.error("bad event from a worker: %s", exc)
            return
        topic = topic_b.decode()
        type_, direction = topic.rsplit(".", 1)
        count_event(self.counters, type_, {"reason": note.reason})
        if type_ == ev.TLS_ESTABLISHED:
            self._opened(note.id, body, direction, note.hairpin)
        elif type_ == ev.CONN_CLOSED:
            self._closed(note.id, direction, note.bytes_in, note.bytes_out)
        if self._events.wants(topic):
            try:
                decoded = msgpack.unpackb(body)
            except (ValueError, msgpack.UnpackException) as exc:
                log.error("bad event from a worker: %s", exc)
                return
            self._events.send(self._encoder.renumber(topic, decoded))

    def _opened(self, conn_id: int, body: bytes, direction: str, hairpin: str | None) -> None:
        self.table[conn_id] = _Open(body, direction, hairpin)
        if hairpin:
            self.by_hairpin[hairpin] = conn_id

    def _closed(self, conn_id: int, direction: str, bytes_in: int, bytes_out: int) -> None:
        self._release(conn_id, direction)
        entry = self.table.pop(conn_id, None)
        if entry is not None and entry.hairpin and self.by_hairpin.get(entry.hairpin) == conn_id:
            del self.by_hairpin[entry.hairpin]
        self.counters["bytes_in_closed"] += bytes_in
        self.counters["bytes_out_closed"] += bytes_out

    def _add_key(self, conn_id: int, key: Any) -> None:
        entry = self.table.get(conn_id)
        if entry is not None and key not in entry.keys:
            entry.keys.append(key)

    def metrics_snapshot(self) -> dict[str, Any]:
        """From the events (bytes of open connections count once they close)."""
        directions = collections.Counter(e.direction for e in self.table.values())
        return rl.metrics_snapshot(self.config, dict(self.counters), directions["in"],
                                   directions["out"])

    # -- control ----------------------------------------------------------------------------

    def handle_request(self, body: bytes) -> Any:
        try:
            req = ctl.decode_request(body)
        except ctl.ControlError as exc:
            self.counters["control.errors"] += 1
            return ctl.encode_error(ctl.peek_id(body), exc.code, exc.message)
        self.counters[f"control.{req.op}"] += 1
        if req.op == "ping":
            return ctl.encode_reply(req.rid, pong=True, pid=os.getpid(), src=self.src,
                                    uptime=round(time.time() - self.started, 3),
                                    workers=self.count)
        if req.op == "lookup":
            found = self._lookup_local(req.args)
            if found is not None:
                return ctl.encode_reply(req.rid, **found)
        return self._forwarded(req)

    def lookup_entry(self, hairpin: str) -> Any:
        found = self._facts_of(self.by_hairpin.get(hairpin))
        if found is not None:
            return encode_json_entry(*found)
        return self._lookup_in_workers(hairpin)  # its event is still on the way

    def _facts_of(self, conn_id: Any) -> tuple[dict[str, Any], dict[str, Any]] | None:
        entry = self.table.get(conn_id) if type(conn_id) is int else None
        if entry is None:
            return None
        try:
            conn, tls = entry.facts()
        except ValueError as exc:
            log.error("conn %d: %s", conn_id, exc)
            return None
        return (conn, tls) if tls is not None else None

    async def _lookup_in_workers(self, hairpin: str) -> bytes | None:
        try:
            found = await self._dispatch(ctl.Request("lookup", 0, {"hairpin": hairpin}))
        except ctl.ControlError:
            return None
        return encode_json_entry(found["conn"], found["tls"])

    def _lookup_local(self, args: dict[str, Any]) -> dict[str, Any] | None:
        conn_id = args.get("id")
        if isinstance(args.get("hairpin"), str):
            conn_id = self.by_hairpin.get(args["hairpin"])
        found = self._facts_of(conn_id)
        if found is None:
            return None  # not seen yet (or by peer): the workers know
        entry = self.table[conn_id]
        return {"conn": found[0], "tls": found[1], "bytes_in": 0, "bytes_out": 0,
                "age": round(time.time() - entry.since, 3), "keys": entry.keys}

    async def _forwarded(self, req: ctl.Request) -> bytes | None:
        try:
            result = await self._dispatch(req)
        except ctl.ControlError as exc:
            return ctl.encode_error(req.rid, exc.code, exc.message)
        return None if req.args.get("noreply") else ctl.encode_reply(req.rid, **result)

    async def _dispatch(self, req: ctl.Request) -> dict[str, Any]:
        op, args = req.op, dict(req.args)
        if op == "kill":
            if type(args.get("id")) is not int or args["id"] < 1:
                raise ctl.ControlError(ctl.BAD_REQUEST, "kill needs an integer 'id'")
            return await self._ask((args["id"] - 1) % self.count, op, args)
        if op == "connect":
            return await self._ask(self._worker_for_target(args), op, args)
        replies = await asyncio.gather(*(self._ask(i, op, args) for i in range(self.count)),
                                       return_exceptions=True)
        ok = [r for r in replies if isinstance(r, dict)]
        errors = [r for r in replies if isinstance(r, ctl.ControlError)]
        if op == "lookup":
            if ok:
                return ok[0]
            raise errors[0] if errors else ctl.ControlError(ctl.NOT_FOUND, "no such connection")
        if errors:
            if op == "reload":
                self.publish(ev.ConfigReloadFailed(errors[0].message))
            raise errors[0]
        if op == "list":
            return {"conns": [c for r in ok for c in r.get("conns", [])]}
        if op == "stats":
            return self._merge_stats(ok)
        if op == "reload":
            await self._reload_own()
            changes = {k: ok[0].get(k, []) for k in ("changed", "restart_needed")}
            self.publish(ev.ConfigReloaded(changes["changed"], changes["restart_needed"]))
            rl.publish_expiring(self.config, self.publish)
            return changes
        raise ctl.ControlError(ctl.UNSUPPORTED, f"op {op!r} not available")

    def _worker_for_target(self, args: dict[str, Any]) -> int:
        # One server, one worker: its connections are reused, and each identity (SNI, client
        # certificate) to it gets a declared source of its own, which only one process can
        # hand out without clashes.
        server = f"{args.get('host', '')}:{args.get('port', TLS_DEFAULT_PORT)}"
        return zlib.crc32(server.encode()) % self.count

    def _merge_stats(self, replies: list[dict[str, Any]]) -> dict[str, Any]:
        merged: dict[str, Any] = {"uptime": round(time.time() - self.started, 3),
                                  "workers": self.count}
        counters: collections.Counter[str] = collections.Counter(self.counters)
        for reply in replies:
            for key in ("open", "open_in", "open_out", "bytes_in", "bytes_out"):
                merged[key] = merged.get(key, 0) + reply.get(key, 0)
            # What the supervisor counts from the events itself is not added twice.
            counters.update({k: v for k, v in reply.get("counters", {}).items()
                             if not k.startswith(_COUNTED_HERE)})
        merged["counters"] = dict(counters)
        merged["subscriptions"] = self._events.subscriptions
        return merged

    async def _ask(self, index: int, op: str, args: dict[str, Any],
                   timeout: float = FORWARD_TIMEOUT) -> dict[str, Any]:
        rid = next(self._rids)
        noreply = bool(args.get("noreply"))
        body = ctl.encode_request(op, rid, **args)
        try:
            await self._wctl.send_multipart([f"w{index}".encode(), b"", body],
                                            flags=zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            raise ctl.ControlError("unavailable", f"worker {index} unreachable: {exc}") from None
        if noreply:
            return {}
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._waiting[rid] = fut
        try:
            reply = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise ctl.ControlError("timeout", f"worker {index} did not answer") from None
        finally:
            self._waiting.pop(rid, None)
        result = ctl.decode_reply(reply)
        for key in ("v", "rid", "ok"):
            result.pop(key, None)
        return result

    async def _pump_replies(self) -> None:
        while True:
            frames = await self._wctl.recv_multipart()
            body = frames[-1]
            if not ctl.is_reply(body):  # a worker asking us (admission)
                await self._answer_worker(frames[0], body)
                continue
            fut = self._waiting.get(ctl.peek_id(body))
            if fut is not None and not fut.done():
                fut.set_result(body)

    async def _answer_worker(self, identity: bytes, body: bytes) -> None:
        try:
            req = ctl.decode_request(body)
        except ctl.ControlError as exc:
            reply = ctl.encode_error(ctl.peek_id(body), exc.code, exc.message)
        else:
            ip, conn_id = req.args.get("ip"), req.args.get("id")
            if req.op == "admit" and isinstance(ip, str) and type(conn_id) is int:
                reply = ctl.encode_reply(req.rid, refused=self._admit(ip, conn_id))
            else:
                reply = ctl.encode_error(req.rid, ctl.UNSUPPORTED, f"{req.op} from a worker")
        with contextlib.suppress(zmq.ZMQError):
            await self._wctl.send_multipart([identity, b"", reply], flags=zmq.NOBLOCK)

    # -- reload and certificates --------------------------------------------------------------

    async def _reload_own(self) -> None:
        try:
            self.config = load_config(self.config.path)
        except ConfigError as exc:  # the workers refused it too
            log.error("supervisor kept its configuration: %s", exc)

    async def reload_quietly(self) -> None:
        """SIGHUP: a reload of every worker, then of our own configuration."""
        req = ctl.Request("reload", 0, {})
        try:
            await self._dispatch(req)
        except ctl.ControlError as exc:
            log.error("reload failed: %s", exc.message)


