"""One TLS connection joined to its hairpin: handshake, hairpin, byte pump, close.

A relay is the TLS side's asyncio protocol; `_HairpinSide` forwards the hairpin's callbacks to
it. Bytes are never dropped: what the peer sent before the hairpin is up waits in `_pending`
(reading paused beyond `max_buffer`), and every close publishes one `conn.closed`.
`InboundRelay` serves a listener; `OutboundRelay` (outbound.py) originates TLS.
"""

from __future__ import annotations

import asyncio
import enum
import errno
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.events import ConnRef
from tlsbridge.shared.facts import TlsFacts
from tlsbridge.shared.proxy import encode_v1, encode_v2

if TYPE_CHECKING:
    from tlsbridge.daemon.config import Config, Listener
    from tlsbridge.daemon.hub import Hub


_NOT_PAUSED: frozenset[str] = frozenset()  # one for every relay that reads


class State(enum.Enum):
    HANDSHAKE = "handshake"
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


class _HairpinSide(asyncio.Protocol):
    __slots__ = ("relay",)

    def __init__(self, relay: Relay) -> None:
        self.relay = relay

    def data_received(self, data: bytes) -> None:
        self.relay.from_hairpin(data)

    def eof_received(self) -> bool:
        self.relay.hairpin_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.relay.hairpin_lost(exc)

    def pause_writing(self) -> None:
        self.relay.pause_tls_reading("hairpin")

    def resume_writing(self) -> None:
        self.relay.resume_tls_reading("hairpin")


class Relay(asyncio.Protocol):
    direction = "in"

    def __init__(
        self,
        hub: Hub,
        config: Config,
        listener: Listener | None,
        engine_factory: Callable[[], TlsEngine],
    ) -> None:
        self.hub = hub
        self.config = config
        self.listener = listener
        self._engine_factory = engine_factory
        self.state = State.HANDSHAKE
        self.id = hub.next_id()
        self.peer = ("", 0)
        self.hairpin_key: str | None = None
        self.facts: TlsFacts | None = None
        self.bytes_in = 0
        self.bytes_out = 0
        self.started = 0.0
        self._tls: asyncio.Transport | None = None
        self._hairpin: asyncio.Transport | None = None
        self._pending: list[bytes] = []
        self._pending_size = 0
        self._paused_by = _NOT_PAUSED
        self._tls_done = False
        self._hairpin_done = False
        self._timer: asyncio.TimerHandle | None = None
        self._held: list[bytes | None] | None = None
        self._ref: ConnRef | None = None
        self._loop = asyncio.get_running_loop()
        self._connecting: socket.socket | None = None

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

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        loop = self._loop
        self._tls = transport
        self.started = loop.time()
        peername = transport.get_extra_info("peername")
        if peername is None:  # reset before we saw it: nothing was read, nobody to tell
            self.state = State.CLOSED
            self.hub.counters["reset_before_accept"] += 1
            transport.abort()
            return
        self.peer = peername[:2]
        transport.set_write_buffer_limits(high=self.config.max_buffer)
        refusal = self._admit()
        if refusal is not None:
            self._refuse(refusal)
            return
        try:
            self.engine = self._engine_factory()
        except Exception as exc:  # a broken profile must not take the listener down
            self.hub.log.error("conn %d: cannot create TLS engine: %s", self.id, exc)
            self.state = State.CLOSED
            if self.direction == "in":
                self.hub.release(self.peer[0])
            self.hub.publish(ev.CONN_CLOSED, self.ref, reason="engine_failed", detail=str(exc),
                             bytes_in=0, bytes_out=0, duration=0.0)
            transport.abort()
            return
        self._timer = loop.call_later(self._handshake_limit(), self._handshake_timeout)
        self.hub.register(self)
        if self.direction == "out":  # a client speaks first; a server waits for its hello
            self._pump_tls()

    def data_received(self, data: bytes) -> None:
        if self.state is State.CLOSED:
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
        if self.state is not State.CLOSED:
            self.engine.receive_eof()
            self._pump_tls()
        return True  # keep our sending half: Kamailio may still answer

    def connection_lost(self, exc: Exception | None) -> None:
        if self.state is State.CONNECTING:
            # Deliver what the peer sent once the hairpin is up, then close (see _hairpin_up).
            self._tls_done = True
            self._tls = None
            return
        if self.state is State.HANDSHAKE:
            self._tls = None
            self._handshake_failed("eof_in_handshake", "peer closed during the handshake")
        elif self.state is not State.CLOSED:
            self._close("peer_reset" if exc else "peer_closed")

    def pause_writing(self) -> None:
        if self._hairpin is not None:
            self._hairpin.pause_reading()

    def resume_writing(self) -> None:
        if self._hairpin is not None and self.state is State.OPEN:
            self._hairpin.resume_reading()

    def _pump_tls(self) -> None:
        try:
            if not self.engine.handshake_done:
                done = self.engine.handshake()
                self._flush_tls()
                if not done:
                    return
                self._handshake_complete()
                if self.state is State.CLOSED:
                    return
            data = self.engine.read()
            if data:
                self._to_hairpin(data)
            if self.engine.peer_closed and not self._tls_done:
                self._tls_ended()
        except TlsError as exc:
            self._flush_tls()
            if self.engine.handshake_done:
                self._close(exc.reason, detail=exc.detail)
            else:
                self._handshake_failed(exc.reason, exc.detail)
            return
        self._flush_tls()

    def _flush_tls(self) -> None:
        out = self.engine.outgoing()
        if out and self._tls is not None:
            self._tls.write(out)

    def _handshake_timeout(self) -> None:
        if self.state is State.HANDSHAKE:
            self._handshake_failed("handshake_timeout", f"{self.config.handshake_timeout:g} s")

    def _handshake_failed(self, reason: str, detail: str) -> None:
        self.hub.publish(ev.TLS_FAILED, self.ref, reason=reason, detail=detail)
        self._close(reason, detail=detail)

    def _handshake_complete(self) -> None:
        if self._timer:
            self._timer.cancel()
        self.facts = self.engine.facts()
        try:
            sock = self._hairpin_socket()
        except OSError as exc:
            self._hairpin_failed(f"cannot bind hairpin source: {_os_reason(exc)}")
            return
        self.state = State.CONNECTING
        self._connect_hairpin(sock)

    def _hairpin_socket(self) -> socket.socket:
        hp = self.config.hairpin
        family = socket.AF_INET6 if ":" in hp.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
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

    def _announce(self, sock: socket.socket) -> None:
        """The hairpin's local address is the correlation key Kamailio sees as
        $tcp(c_si):$tcp(c_sp): publish the facts under it before the PROXY header, i.e. before
        Kamailio (tcp_defer_accept) can see a single message of this connection."""
        host, port = sock.getsockname()[:2]
        self.hairpin_key = format_addr(host, port)
        self.hub.index_hairpin(self, port)
        self.hub.publish(ev.TLS_ESTABLISHED, self.ref, tls=self.facts)

    def _handshake_limit(self) -> float:
        return self.config.handshake_timeout

    def _admit(self) -> str | None:
        """Why this connection is refused, or None."""
        return None

    def _refuse(self, reason: str) -> None:
        """Closed at once, before any TLS: one tls.failed, no conn.closed (never admitted)."""
        self.state = State.CLOSED
        if self._timer:
            self._timer.cancel()
        self.hub.unregister(self)
        self.hub.publish(ev.TLS_FAILED, self.ref, reason=reason,
                         detail=f"limit reached; refused {self.peer[0]}")
        if self._tls is not None:
            self._tls.abort()

    def _proxy_dst(self) -> tuple[str, int]:
        """The PROXY header's destination: where the TLS peer reached us."""
        raise NotImplementedError

    def _on_hairpin_ready(self) -> None:
        """The hairpin is up and what was pending has been written."""

    def _proxy_header(self) -> bytes:
        dst = self._proxy_dst()
        if self.config.hairpin.proxy_protocol == 2:
            return encode_v2(self.peer, dst)
        return encode_v1(self.peer, dst)

    # -- hairpin side -----------------------------------------------------------------------

    def _connect_hairpin(self, sock: socket.socket) -> None:
        # A non-blocking connect watched by the loop, not loop.sock_connect(): uvloop resolves
        # its address in a thread pool, a thread hand-off per connection.
        hp = self.config.hairpin
        err = sock.connect_ex((hp.host, hp.port))
        if err == 0:
            self._hairpin_connected(sock)
        elif err == errno.EINPROGRESS:
            self._connecting = sock
            self._loop.add_writer(sock.fileno(), self._hairpin_connect_done, sock)
            self._timer = self._loop.call_later(hp.connect_timeout, self._hairpin_connect_done,
                                                sock, "timeout")
        else:
            self._hairpin_connect_failed(sock, os.strerror(err))

    def _hairpin_connect_done(self, sock: socket.socket, why: str = "") -> None:
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

    def _hairpin_connect_failed(self, sock: socket.socket, why: str) -> None:
        sock.close()
        if self.state is not State.CLOSED:
            hp = self.config.hairpin
            self._hairpin_failed(f"{format_addr(hp.host, hp.port)}: {why}")

    def _hairpin_connected(self, sock: socket.socket) -> None:
        if self.state is State.CLOSED:  # killed meanwhile
            sock.close()
            return
        try:
            self._announce(sock)
            self._send_header(sock)
        except OSError as exc:
            self._hairpin_connect_failed(sock, _os_reason(exc))
            return
        self._loop.create_task(self._wrap_hairpin(sock))

    async def _wrap_hairpin(self, sock: socket.socket) -> None:
        try:
            transport, _ = await self._loop.create_connection(lambda: _HairpinSide(self),
                                                              sock=sock)
        except OSError as exc:
            self._hairpin_connect_failed(sock, _os_reason(exc))
            return
        self._hairpin_up(transport)

    def _send_header(self, sock: socket.socket) -> None:
        """The PROXY header, with what the peer has sent so far, in one segment: Kamailio
        needs the whole header in its first read, and each segment on the hairpin costs it
        (and us) a wake-up."""
        header = self._proxy_header()
        data = b"".join((header, *self._pending))
        sent = sock.send(data)
        if sent < len(header):
            raise OSError("short write of the PROXY header")
        self._pending = [data[sent:]] if sent < len(data) else []
        self._pending_size = len(data) - sent

    def _hairpin_up(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        if self.state is State.CLOSED:
            transport.abort()
            return
        self._hairpin = transport
        transport.set_write_buffer_limits(high=self.config.max_buffer)
        self.state = State.OPEN
        if self._pending:
            transport.write(b"".join(self._pending))
            self._pending.clear()
            self._pending_size = 0
            self.resume_tls_reading("pending")
        if self._tls is None:  # the peer left while we were connecting
            self._close("peer_closed")
        elif self._tls_done:
            self._tls_ended()
        if self.state is State.OPEN:
            self._on_hairpin_ready()

    def _hairpin_failed(self, detail: str) -> None:
        self.hub.publish(ev.HAIRPIN_FAILED, self.ref, reason="hairpin_failed", detail=detail)
        self._close("hairpin_failed", detail=detail)

    def _to_hairpin(self, data: bytes) -> None:
        self.bytes_in += len(data)
        if self._hairpin is not None:
            self._hairpin.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self.config.max_buffer:
            self.pause_tls_reading("pending")

    def from_hairpin(self, data: bytes) -> None:
        if self.state is State.CLOSED:
            return
        self.bytes_out += len(data)
        try:
            self.engine.write(data)
        except TlsError as exc:
            self._close(exc.reason, detail=exc.detail)
            return
        self._flush_tls()

    def hairpin_eof(self) -> None:
        if self.state is State.CLOSED:
            return
        self._hairpin_done = True
        self.engine.close()
        self._flush_tls()
        if self._tls_done:
            self._close("closed")

    def hairpin_lost(self, exc: Exception | None) -> None:
        if self.state is not State.CLOSED:
            self._close("kamailio_reset" if exc else "kamailio_closed")

    def _tls_ended(self) -> None:
        self._tls_done = True
        if self._hairpin is None:
            return  # _hairpin_up passes the end on
        if self._hairpin.can_write_eof():
            self._hairpin.write_eof()
        if self._hairpin_done:
            self._close("closed")

    # -- flow control -----------------------------------------------------------------------

    def pause_tls_reading(self, why: str) -> None:
        if not self._paused_by and self._tls is not None:
            self._tls.pause_reading()
        self._paused_by |= {why}

    def resume_tls_reading(self, why: str) -> None:
        if why in self._paused_by:
            self._paused_by -= {why}
        if not self._paused_by and self._tls is not None and self.state is not State.CLOSED:
            self._tls.resume_reading()

    # -- the end ----------------------------------------------------------------------------

    def kill(self, reason: str = "killed") -> None:
        self._close(reason)

    def _close(self, reason: str, *, detail: str = "") -> None:
        if self.state is State.CLOSED:
            return
        self.state = State.CLOSED
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
                self.engine.close()
                self._flush_tls()
            self._tls.close()
        duration = self._loop.time() - self.started
        self.hub.unregister(self)
        fields = {"reason": reason, "bytes_in": self.bytes_in, "bytes_out": self.bytes_out}
        if detail:
            fields["detail"] = detail
        fields.update(self._closed_fields())
        self.hub.publish(ev.CONN_CLOSED, self.ref, duration=round(duration, 6), **fields)

    def _closed_fields(self) -> dict[str, object]:
        return {}


class InboundRelay(Relay):
    """A TLS peer that reached one of our listeners."""

    def _admit(self) -> str | None:
        if self.hub.admits_remotely:
            # Nothing is processed until the supervisor, which counts for all workers, says
            # yes. (uvloop starts reading after connection_made whatever it was told there.)
            self._held = []
            loop = asyncio.get_running_loop()
            loop.call_soon(self.pause_tls_reading, "admission")
            self._admission = loop.create_task(self._admit_remotely())
            return None
        return self.hub.admit(self.peer[0])

    async def _admit_remotely(self) -> None:
        refusal = await self.hub.admit_remotely(self.peer[0], self.id)
        if self.state is State.CLOSED:
            return
        if refusal is not None:
            self._refuse(refusal)
            return
        held, self._held = self._held or [], None
        self.resume_tls_reading("admission")
        for data in held:
            if data is None:  # the peer's FIN came meanwhile
                self.eof_received()
            else:
                self.data_received(data)

    def _close(self, reason: str, *, detail: str = "") -> None:
        if self.state is not State.CLOSED:
            self.hub.release(self.peer[0])
        super()._close(reason, detail=detail)

    def _proxy_dst(self) -> tuple[str, int]:
        assert self.listener is not None
        return (self.listener.host, self.listener.port)


_IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)  # Linux


def _os_reason(exc: OSError) -> str:
    # uvloop's messages ("Connect call failed (...)") hide the errno an operator needs.
    return os.strerror(exc.errno) if exc.errno else str(exc)
