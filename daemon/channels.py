"""The daemon's ZeroMQ channels: where events leave and control requests arrive.

Single process: an XPUB for events (it tells us which topics have subscribers) and a ROUTER for
control, bound on the configured endpoints.
Worker of a supervisor: events are PUSHed to the supervisor and control requests arrive on a
DEALER from it. The control loop is the same for both; only the socket differs.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Awaitable, Callable
from typing import Any

import zmq
import zmq.asyncio

from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev

log = logging.getLogger("tlsbridge")

# handler(body) -> reply, None (no reply), or an awaitable reply (slow ops such as reload)
Handler = Callable[[bytes], "bytes | Awaitable[bytes] | None"]


def bind(sock: zmq.Socket, endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from a crashed run
    sock.bind(endpoint)
    if endpoint.startswith("ipc://"):
        os.chmod(endpoint[len("ipc://") :], 0o660)


def unlink(endpoint: str) -> None:
    if endpoint.startswith("ipc://"):
        with contextlib.suppress(OSError):
            os.unlink(endpoint[len("ipc://") :])


class EventSink:
    """Sends event frames without ever blocking; counts what it had to drop.

    A publisher's events wait up to FLUSH_DELAY and leave together: each send to an idle
    ZeroMQ pipe wakes its I/O thread, which on a busy core costs more than the event itself.
    Kamailio's rtimer reads events every 50 ms, so the delay is invisible to it. A worker's
    events go to its supervisor at once: the supervisor counts connections across workers by
    them, and a late close would refuse a connection there is room for.
    """

    FLUSH_DELAY = 0.002
    MAX_QUEUED = 4096

    def __init__(self, sock: zmq.Socket, on_drop: Callable[[], None],
                 delay: float = 0.0) -> None:
        self.sock = sock
        self.on_drop = on_drop
        self.delay = delay
        self._queued: list[list[bytes]] = []
        self._flush_at: asyncio.TimerHandle | None = None
        # None: every topic is wanted (a supervisor takes all of a worker's events)
        self._prefixes: set[str] | None = None
        self._wanted: dict[str, bool] = {}
        # Publishes daemon.started: a subscriber that outlived a daemon (Kamailio's rtimer)
        # learns of the restart from it, however few events it takes otherwise.
        self.greet: Callable[[], None] | None = None

    @classmethod
    def publisher(cls, endpoint: str, hwm: int, on_drop: Callable[[], None]) -> EventSink:
        """Call in the running loop. XPUB drops for a subscriber `hwm` events behind, for that
        one only: a stuck `tlsbridge events` must never cost Kamailio's rtimer its events (as
        NODROP would, for every subscriber at once). Subscribers see the loss as a gap in `seq`.
        """
        sock = zmq.Context.instance().socket(zmq.XPUB)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 0)
        # Every subscription, not only a prefix's first: each new subscriber of
        # daemon.started is greeted, the second of a prefix as much as the first.
        sock.setsockopt(zmq.XPUB_VERBOSE, 1)
        bind(sock, endpoint)
        sink = cls(sock, on_drop, cls.FLUSH_DELAY)
        sink._prefixes = set()
        asyncio.get_running_loop().add_reader(sock.getsockopt(zmq.FD), sink._read_subscriptions)
        return sink

    @classmethod
    def pusher(cls, endpoint: str, hwm: int, on_drop: Callable[[], None]) -> EventSink:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, hwm)
        sock.setsockopt(zmq.LINGER, 1000)  # the last events (conn.closed at shutdown) get out
        sock.connect(endpoint)
        return cls(sock, on_drop)

    def wants(self, topic: str) -> bool:
        """Does any subscriber take `topic`? If not, its events need not even be encoded."""
        wanted = self._wanted.get(topic)
        if wanted is None:
            prefixes = self._prefixes
            wanted = prefixes is None or any(topic.startswith(p) for p in prefixes)
            self._wanted[topic] = wanted
        return wanted

    def _read_subscriptions(self) -> None:
        # XPUB (verbose) passes on every subscription, and a prefix's last unsubscription (also
        # when a subscriber goes away). Its descriptor signals an edge: read until there is none.
        assert self._prefixes is not None
        while True:
            try:
                msg = self.sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed meanwhile
                return
            if not msg or msg[0] not in (0, 1):
                continue
            prefix = msg[1:].decode(errors="replace")
            self._wanted.clear()
            if not msg[0]:
                self._prefixes.discard(prefix)
                continue
            self._prefixes.add(prefix)
            if self.greet is not None and ev.DAEMON_STARTED.startswith(prefix):
                self.greet()

    @property
    def subscriptions(self) -> list[str]:
        """The topic prefixes someone subscribes to now (a publisher; [] for a pusher)."""
        return sorted(self._prefixes or ())

    def send(self, frames: list[bytes]) -> None:
        self._queued.append(frames)
        if not self.delay:
            self.flush()
            return
        if self._flush_at is not None:
            if len(self._queued) >= self.MAX_QUEUED:
                self.flush()
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # outside the loop (start-up, shutdown): at once
            self.flush()
            return
        self._flush_at = loop.call_later(self.delay, self.flush)

    def flush(self) -> None:
        if self._flush_at is not None:
            self._flush_at.cancel()
            self._flush_at = None
        queued, self._queued = self._queued, []
        for frames in queued:
            try:
                self.sock.send_multipart(frames, flags=zmq.NOBLOCK)
            except zmq.Again:
                self.on_drop()
        if self._prefixes is not None:
            self._read_subscriptions()  # a send can take the descriptor's edge

    def close(self) -> None:
        self.flush()
        if self._prefixes is not None:
            with contextlib.suppress(RuntimeError):  # no loop any more
                asyncio.get_running_loop().remove_reader(self.sock.getsockopt(zmq.FD))
        self.sock.close()


class ControlServer:
    """Receives requests on `sock` (ROUTER bound, or DEALER connected to a supervisor) and
    answers with `handler`; a broken request or handler never stops the loop."""

    def __init__(self, sock: zmq.asyncio.Socket, handler: Handler) -> None:
        self.sock = sock
        self.handler = handler
        self._task: asyncio.Task[None] | None = None
        self._answering: set[asyncio.Task[None]] = set()  # the requests being answered
        self._asked: dict[int, asyncio.Future[bytes]] = {}
        self._rids = itertools.count(1)

    @classmethod
    def router(cls, ctx: zmq.asyncio.Context, endpoint: str, handler: Handler) -> ControlServer:
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, 1 << 20)  # a peer sending more is disconnected
        bind(sock, endpoint)
        return cls(sock, handler)

    @classmethod
    def dealer(cls, ctx: zmq.asyncio.Context, endpoint: str, identity: bytes,
               handler: Handler) -> ControlServer:
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.IDENTITY, identity)
        sock.connect(endpoint)
        return cls(sock, handler)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        while True:
            frames = await self.sock.recv_multipart()
            if not frames:
                continue
            envelope, body = frames[:-1], frames[-1]
            asked = self._asked.pop(ctl.peek_id(body), None) if ctl.is_reply(body) else None
            if asked is not None:
                if not asked.done():
                    asked.set_result(body)
                continue
            task = asyncio.get_running_loop().create_task(self._answer(envelope, body))
            self._answering.add(task)
            task.add_done_callback(self._answering.discard)

    async def ask(self, op: str, timeout: float, **args: Any) -> dict[str, Any]:
        """A request the other way (a worker asking its supervisor over the same DEALER)."""
        rid = next(self._rids)
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._asked[rid] = fut
        try:
            await self.sock.send_multipart([b"", ctl.encode_request(op, rid, **args)],
                                           flags=zmq.NOBLOCK)
            return ctl.decode_reply(await asyncio.wait_for(fut, timeout))
        except (zmq.ZMQError, TimeoutError) as exc:
            raise ctl.ControlError("unavailable", f"no answer to {op}: {exc!r}") from None
        finally:
            self._asked.pop(rid, None)

    async def _answer(self, envelope: list[bytes], body: bytes) -> None:
        try:
            reply: Any = self.handler(body)
            if reply is not None and not isinstance(reply, bytes):
                reply = await reply
        except Exception as exc:  # a bug in one op must not stop the control loop
            log.exception("control request failed")
            reply = ctl.encode_error(ctl.peek_id(body), ctl.INTERNAL, str(exc))
        if reply is None:
            return  # the client asked for no reply (it learns the outcome by events)
        try:
            await self.sock.send_multipart([*envelope, reply], flags=zmq.NOBLOCK)
        except zmq.Again:
            log.warning("control reply dropped: the client is not reading")

    async def close(self) -> None:
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self.sock.close(linger=0)
