"""One TLS connection joined to its hairpin: the I/O around the sans-IO relay core.

`Relay` is the TLS side's asyncio protocol and `_HairpinSide` the hairpin's; both feed what
happens into `RelayCore` (relaycore.py), which decides, and carry out the actions it returns.
The byte pump asks the core one question per chunk (`from_peer` / `from_hairpin`) and writes
when told `FORWARD`. `InboundRelay` serves a listener; `OutboundRelay` (outbound.py)
originates TLS. A relay reaches the rest of the worker only through the connection table and
the facts publisher it is given (plus the admission gate or the connector).
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING

from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.daemon.relaycore import (
    FORWARD,
    PAUSED_BY_ADMISSION,
    Abort,
    Actions,
    Close,
    ConnectHairpin,
    Failure,
    HalfClose,
    PauseReading,
    Ready,
    RelayCore,
    ResumeReading,
    SendToHairpin,
    Side,
    State,
)
from tlsbridge.shared import events as ev
from tlsbridge.shared import reasons as r
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.events import ConnRef
from tlsbridge.shared.facts import TlsFacts
from tlsbridge.shared.proxy import encode_v1, encode_v2

if TYPE_CHECKING:
    from tlsbridge.daemon.admission import Gate
    from tlsbridge.daemon.config import Config, Listener
    from tlsbridge.daemon.publisher import FactsPublisher
    from tlsbridge.daemon.table import ConnectionTable

__all__ = ["InboundRelay", "Relay", "SocketInboundRelay", "State"]

log = logging.getLogger("tlsbridge")


class _HairpinSide(asyncio.Protocol):
    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.from_hairpin(data)

    def eof_received(self) -> bool:
        relay = self.relay
        relay.do(relay.core.hairpin_eof())
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        relay = self.relay
        relay.do(relay.core.hairpin_lost(exc is not None))

    def pause_writing(self) -> None:
        relay = self.relay
        relay.do(relay.core.hairpin_write_paused())

    def resume_writing(self) -> None:
        relay = self.relay
        relay.do(relay.core.hairpin_write_resumed())


class Relay(asyncio.Protocol):
    direction = "in"

    def __init__(self, table: ConnectionTable, publisher: FactsPublisher, config: Config,
                 listener: Listener | None, engine_factory: Callable[[], TlsEngine]) -> None:
        self.table = table
        self.publisher = publisher
        self.config = config
        self.listener = listener
        self._engine_factory = engine_factory
        self.core = RelayCore(config.max_buffer)
        self.id = table.next_id()
        self.peer = ("", 0)
        self.hairpin_key: str | None = None
        self.facts: TlsFacts | None = None
        self.started = 0.0
        self.handshake_limit = config.handshake_timeout
        self._tls: asyncio.Transport | None = None
        self._hairpin: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._ref: ConnRef | None = None
        self._loop = asyncio.get_running_loop()
        self._connecting: _socket.socket | None = None
        self._wrapping: asyncio.Task[None] | None = None
        # What the peer sent while its admission is asked for (inbound; a FIN is None). Here,
        # not in InboundRelay: an override of data_received would cost a call per chunk.
        self._held: list[bytes | None] | None = None

    @property
    def state(self) -> State:
        return self.core.state

    @property
    def bytes_in(self) -> int:
        return self.core.bytes_in

    @property
    def bytes_out(self) -> int:
        return self.core.bytes_out

    # -- the reference events and look-ups carry -------------------------------------------

    @property
    def ref(self) -> ConnRef:
        ref = self._ref
        if ref is None or ref.hairpin != self.hairpin_key:
            ref = self._ref = ConnRef(
                id=self.id,
                peer=format_addr(*self.peer),
                direction=self.direction,
                hairpin=self.hairpin_key,
                listener=self.listener.address if self.listener else None,
            )
        return ref

    # -- TLS side ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # (uvloop's transports are not asyncio.Transport subclasses, but have its methods)
        loop = self._loop
        self._tls = transport
        self.started = loop.time()
        peername = transport.get_extra_info("peername")
        if peername is None:  # reset before we saw it: nothing was read, nobody to tell
            self.core.close(r.PEER_RESET)  # its Close is not carried out: there is no one
            self.table.counters["reset_before_accept"] += 1
            transport.abort()
            return
        self.peer = peername[:2]
        transport.set_write_buffer_limits(high=self.config.max_buffer)
        if not self._admitted():
            return
        try:
            self.engine = self._new_engine(transport)
        except Exception as exc:  # a broken profile must not take the listener down
            log.error("conn %d: cannot create TLS engine: %s", self.id, exc)
            self.core.close(r.ENGINE_FAILED)  # never registered: published here, not torn down
            self._released()
            self.publisher.publish(ev.ConnClosed(self.ref, r.ENGINE_FAILED, 0, 0, 0.0,
                                                 detail=str(exc)))
            transport.abort()
            return
        self._timer = loop.call_later(self.handshake_limit, self._handshake_timeout)
        self.table.register(self)
        self._tls_started()

    def data_received(self, data: bytes) -> None:
        if self.core.state is State.CLOSED:
            return
        if self._held is not None:  # not admitted yet: keep it, do not touch it
            self._held.append(data)
            return
        self.engine.receive(data)
        self._pump_tls()

    def eof_received(self) -> bool:
        if self._held is not None:
            self._held.append(None)  # in its place, after the data held before it
            return True
        if self.core.state is not State.CLOSED:
            self.engine.receive_eof()
            self._pump_tls()
        return True  # keep our sending half: Kamailio may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        core = self.core
        if core.state is State.HANDSHAKE or core.state is State.CONNECTING:
            self._tls = None  # nothing more can be written to it
        self.do(core.peer_lost(exc is not None))

    def pause_writing(self) -> None:
        self.do(self.core.peer_write_paused())

    def resume_writing(self) -> None:
        self.do(self.core.peer_write_resumed())

    def _pump_tls(self) -> None:
        engine = self.engine
        core = self.core
        try:
            if not engine.handshake_done:
                done = engine.handshake()
                if not engine.writes_itself:
                    self._flush_tls()
                if not done:
                    return
                self._handshake_complete()
                if core.state is State.CLOSED:
                    return
            data = engine.read()
            if data:
                actions = core.from_peer(data)
                if actions is FORWARD:
                    self._hairpin.write(data)  # type: ignore[union-attr]  # OPEN: it is up
                elif actions:
                    self.do(actions)
            if engine.peer_closed and not core.peer_done:
                self.do(core.peer_eof())
        except TlsError as exc:
            if not engine.writes_itself:
                self._flush_tls()
            if engine.handshake_done:
                self.do(core.close(exc.reason, exc.detail))
            else:
                self.do(core.handshake_failed(exc.reason, exc.detail))
            return
        if engine.writes_itself:
            return
        out = engine.outgoing()
        if out and self._tls is not None:
            self._tls.write(out)

    def _flush_tls(self) -> None:
        out = self.engine.outgoing()
        if out and self._tls is not None:
            self._tls.write(out)

    def _handshake_timeout(self) -> None:
        self.do(self.core.handshake_timed_out(f"{self.config.handshake_timeout:g} s"))

    def _handshake_complete(self) -> None:
        if self._timer:
            self._timer.cancel()
            self._timer = None  # an idle connection keeps no cancelled timer
        self.facts = self.engine.facts()
        self.do(self.core.handshake_done())

    # -- hairpin side -----------------------------------------------------------------------

    def from_hairpin(self, data: bytes) -> None:
        if self.core.from_hairpin(data) is not FORWARD:
            return
        engine = self.engine
        try:
            engine.write(data)
        except TlsError as exc:
            self.do(self.core.close(exc.reason, exc.detail))
            return
        if engine.writes_itself:
            return
        out = engine.outgoing()
        if out and self._tls is not None:
            self._tls.write(out)

    def _open_hairpin(self) -> None:
        try:
            sock = self._hairpin_socket()
        except OSError as exc:
            self.do(self.core.hairpin_failed(f"cannot bind hairpin source: {_os_reason(exc)}"))
            return
        # A non-blocking connect, not loop.sock_connect(): uvloop resolves its address in a
        # thread pool, a thread hand-off per connection. On loopback the connection is up
        # when connect() returns, EINPROGRESS or not: the header is tried at once, and the
        # loop watches the connect only when the socket says it is not up yet.
        hp = self.config.hairpin
        err = sock.connect_ex((hp.host, hp.port))
        if err == 0 or err == errno.EINPROGRESS:
            self._hairpin_connected(sock)
        else:
            self._hairpin_connect_failed(sock, os.strerror(err))

    def _watch_connect(self, sock: _socket.socket) -> None:
        self._connecting = sock
        self._loop.add_writer(sock.fileno(), self._hairpin_connect_done, sock)
        self._timer = self._loop.call_later(self.config.hairpin.connect_timeout,
                                            self._hairpin_connect_done, sock, "timeout")

    def _hairpin_socket(self) -> _socket.socket:
        hp = self.config.hairpin
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        # The C socket type: socket.socket's Python __init__ and its family and type enums
        # (which uvloop reads when it wraps the socket) cost ten calls per connection.
        sock = _socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            # The port is chosen by connect(), per destination and past TIME_WAIT, not by
            # bind(): with bind(port 0) a busy daemon ran out of ports at ~8,000 hairpins.
            sock.setsockopt(socket.IPPROTO_IP, _IP_BIND_ADDRESS_NO_PORT, 1)
            sock.bind((hp.source_ip, 0))
        except OSError:
            sock.close()
            raise
        return sock

    def _hairpin_connect_done(self, sock: _socket.socket, why: str = "") -> None:
        self._connecting = None
        self._loop.remove_writer(sock.fileno())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not why:
            err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            why = os.strerror(err) if err else ""
        if why:
            self._hairpin_connect_failed(sock, why)
        else:
            self._hairpin_connected(sock)

    def _hairpin_connect_failed(self, sock: _socket.socket, why: str) -> None:
        sock.close()
        hp = self.config.hairpin
        self.do(self.core.hairpin_failed(f"{format_addr(hp.host, hp.port)}: {why}"))

    def _hairpin_connected(self, sock: _socket.socket) -> None:
        if self.core.state is State.CLOSED:  # killed meanwhile
            sock.close()
            return
        try:
            if self.hairpin_key is None:
                self._announce(sock)
            self._send_header(sock)
        except BlockingIOError:  # still connecting: the header goes once it is up
            self._watch_connect(sock)
            return
        except OSError as exc:
            self._hairpin_connect_failed(sock, _os_reason(exc))
            return
        self._wrapping = self._loop.create_task(self._wrap_hairpin(sock))

    def _announce(self, sock: _socket.socket) -> None:
        """The hairpin's local address is the correlation key Kamailio sees as
        $tcp(c_si):$tcp(c_sp): publish the facts under it before the PROXY header, i.e. before
        Kamailio (tcp_defer_accept) can see a single message of this connection."""
        host, port = sock.getsockname()[:2]
        self.hairpin_key = format_addr(host, port)
        self.table.index_hairpin(self)
        assert self.facts is not None
        ref = self.ref
        self.publisher.map_facts(ref, self.facts, port)
        self.publisher.publish(ev.TlsEstablished(ref, self.facts))

    def _send_header(self, sock: _socket.socket) -> None:
        """The PROXY header, with what the peer has sent so far, in one segment: Kamailio
        needs the whole header in its first read, and each segment on the hairpin costs it
        (and us) a wake-up."""
        header = self._proxy_header()
        data = self.core.first_segment(header)
        try:
            sent = sock.send(data)
        except BlockingIOError:
            self.core.unsent(data[len(header):])  # all of it waits for the next try
            raise
        if sent < len(header):
            raise OSError("short write of the PROXY header")
        if sent < len(data):
            self.core.unsent(data[sent:])

    def _proxy_header(self) -> bytes:
        dst = self._proxy_dst()
        if self.config.hairpin.proxy_protocol == 2:
            return encode_v2(self.peer, dst)
        return encode_v1(self.peer, dst)

    async def _wrap_hairpin(self, sock: _socket.socket) -> None:
        try:
            transport, _ = await self._loop.create_connection(lambda: _HairpinSide(self),
                                                              sock=sock)
        except OSError as exc:
            self._hairpin_connect_failed(sock, _os_reason(exc))
            return
        self._hairpin = transport  # type: ignore[assignment]  # uvloop's: no subclass
        self._wrapping = None  # done: an idle connection keeps no finished task
        transport.set_write_buffer_limits(high=self.config.max_buffer)  # type: ignore[attr-defined]
        self.do(self.core.hairpin_up())

    # -- carrying out what the core decided -------------------------------------------------

    def do(self, actions: Actions) -> None:
        # Dispatch on the exact type (no typing.cast: it is a call per action at run time).
        for action in actions:
            kind = type(action)
            if kind is Close:
                self._teardown(action)  # type: ignore[arg-type]
            elif kind is SendToHairpin:
                self._hairpin.write(action.data)  # type: ignore[union-attr]
            elif kind is HalfClose:
                self._half_close(action.side)  # type: ignore[union-attr]
            elif kind is PauseReading or kind is ResumeReading:
                side = action.side  # type: ignore[union-attr]
                transport = self._tls if side is Side.PEER else self._hairpin
                if transport is not None:
                    if kind is PauseReading:
                        transport.pause_reading()
                    else:
                        transport.resume_reading()
            elif kind is ConnectHairpin:
                self._open_hairpin()
            elif kind is Ready:
                self._ready()
            elif kind is Abort and self._hairpin is not None:
                self._hairpin.abort()

    def _half_close(self, side: Side) -> None:
        if side is Side.PEER:
            self._close_notify()
        elif self._hairpin is not None and self._hairpin.can_write_eof():
            self._hairpin.write_eof()

    def _close_notify(self) -> None:
        engine = self.engine
        engine.close_notify()
        if not engine.writes_itself:
            self._flush_tls()

    def kill(self, reason: str = r.KILLED) -> None:
        self.do(self.core.close(reason))

    def tls_failed(self, reason: str, detail: str) -> None:
        """The TLS side failed outside the pump (a TlsSocket writing, or closing)."""
        self.do(self.core.close(reason, detail))

    def _teardown(self, close: Close) -> None:
        self._closing(close)
        if self._timer:
            self._timer.cancel()
        if self._connecting is not None:  # killed while its hairpin was connecting
            self._loop.remove_writer(self._connecting.fileno())
            self._connecting.close()
            self._connecting = None
        if self._hairpin is not None:
            self._hairpin.close()  # flushes what is buffered first
        if self._tls is not None:
            if self.engine.handshake_done:
                self._close_notify()
            self._tls.close()
        duration = self._loop.time() - self.started
        self.table.unregister(self)
        self.publisher.unmap(self.id)
        self.publisher.publish(ev.ConnClosed(self.ref, close.reason, self.core.bytes_in,
                                             self.core.bytes_out, round(duration, 6),
                                             close.detail, self._keys()))

    # -- what inbound and outbound relays add -----------------------------------------------

    def _new_engine(self, transport: asyncio.Transport) -> TlsEngine:
        return self._engine_factory()

    def _admitted(self) -> bool:
        """False: the connection was refused (and closed) before any TLS."""
        return True

    def _tls_started(self) -> None:
        """The engine exists and the handshake timer runs."""

    def _proxy_dst(self) -> tuple[str, int]:
        """The PROXY header's destination: where the TLS peer reached us."""
        raise NotImplementedError

    def _ready(self) -> None:
        """The hairpin is up and what was pending has been written."""

    def _closing(self, close: Close) -> None:
        """The relay is closing: before its sockets go and conn.closed is published."""

    def _released(self) -> None:
        """The relay ends without having been torn down (no engine)."""

    def _keys(self) -> list[str] | None:
        """What conn.closed says this connection served (outbound identities), if anything."""
        return None


class InboundRelay(Relay):
    """A TLS peer that reached one of our listeners."""

    def __init__(self, table: ConnectionTable, publisher: FactsPublisher, gate: Gate,
                 config: Config, listener: Listener,
                 engine_factory: Callable[[], TlsEngine]) -> None:
        super().__init__(table, publisher, config, listener, engine_factory)
        self.gate = gate
        self._admission: asyncio.Task[None] | None = None

    def _admitted(self) -> bool:
        gate = self.gate
        if gate.remote:
            # Nothing is processed until the supervisor, which counts for all workers, says
            # yes.
            self._hold_for_admission()
            self._admission = self._loop.create_task(self._admit_remotely())
            return True
        refusal = gate.admit(self.peer[0])
        if refusal is not None:
            self._refuse(refusal)
            return False
        return True

    def _hold_for_admission(self) -> None:
        # uvloop starts reading after connection_made whatever it was told there: keep what
        # comes meanwhile, and pause once it has.
        self._held = []
        self._loop.call_soon(self._pause_for_admission)

    def _pause_for_admission(self) -> None:
        self.do(self.core.pause_peer(PAUSED_BY_ADMISSION))

    async def _admit_remotely(self) -> None:
        refusal = await self.gate.admit_remotely(self.peer[0], self.id)
        if self.core.state is State.CLOSED:
            return
        if refusal is not None:
            self._refuse(refusal)
            return
        held, self._held = self._held or [], None
        self.do(self.core.resume_peer(PAUSED_BY_ADMISSION))
        for data in held:
            if data is None:  # the peer's FIN came meanwhile
                self.eof_received()
            else:
                self.data_received(data)

    def _refuse(self, reason: str) -> None:
        """Closed at once, before any TLS: one tls.failed, no conn.closed (never admitted)."""
        self.core.close(reason)  # not torn down: nothing of it was published or opened
        if self._timer:
            self._timer.cancel()
        self.table.unregister(self)
        self.publisher.publish(ev.TlsFailed(self.ref, reason,
                                            f"limit reached; refused {self.peer[0]}"))
        if self._tls is not None:
            self._tls.abort()

    def _closing(self, close: Close) -> None:
        if close.failure is Failure.TLS:
            self.publisher.publish(ev.TlsFailed(self.ref, close.reason, close.detail))
        elif close.failure is Failure.HAIRPIN:
            self.publisher.publish(ev.HairpinFailed(self.ref, close.reason, close.detail))
        self.gate.release(self.peer[0])

    def _released(self) -> None:
        self.gate.release(self.peer[0])

    def _proxy_dst(self) -> tuple[str, int]:
        assert self.listener is not None
        return (self.listener.host, self.listener.port)


class SocketInboundRelay(InboundRelay):
    """An inbound relay whose TLS runs on the connection's own socket: its transport is the
    engine's: a TlsSocket (engines/openssl_socket.py), which reads only once started."""

    def _new_engine(self, transport: asyncio.Transport) -> TlsEngine:
        return transport  # type: ignore[return-value]  # a TlsSocket: its own transport

    def _hold_for_admission(self) -> None:
        self._pause_for_admission()  # nothing has been read: the TlsSocket is not started


_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


def _os_reason(exc: OSError) -> str:
    # uvloop's messages ("Connect call failed (...)") hide the errno an operator needs.
    return os.strerror(exc.errno) if exc.errno else str(exc)
