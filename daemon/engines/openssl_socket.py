"""The `openssl` engine on the connection's own socket: OpenSSL reads and writes the
non-blocking fd itself, and the loop only says when the fd is ready (add_reader/add_writer).

An inbound connection on a memory BIO costs two BIOs, an asyncio transport, and a copy of every
record between them; here one `TlsSocket` is both the relay's TLS engine (handshake, read,
write, close_notify, facts) and the transport of its TLS side (write buffer, reading paused and
resumed, close), so the relay (relay.py) drives it like any engine. Outbound connections and
the other engines keep the sans-IO memory-BIO path (engines/base.py).

One difference from a memory BIO is dealt with here: Python's `shutdown()` calls SSL_shutdown
twice, and the second call reads the socket for the peer's close_notify; application data it
meets there is dropped by OpenSSL with APPLICATION_DATA_AFTER_CLOSE_NOTIFY. So what the socket
holds is read first and handed to the relay, and if data still arrives in between, the
connection closes with that reason instead of losing it silently.
"""

from __future__ import annotations

import _socket
import asyncio
import errno
import socket
import ssl
from typing import Any, Protocol

from tlsbridge.daemon.engines.base import READ_CHUNK, TlsEngine, TlsError
from tlsbridge.daemon.engines.openssl import OpenSSLEngine, SocketConnection, facts_from_ssl
from tlsbridge.shared import reasons as r
from tlsbridge.shared.facts import CertInfo, TlsFacts

__all__ = ["ServerEngines", "TlsSocket"]

# Reads per readiness callback before the loop gets a turn (the fd stays readable, so the rest
# comes with the next callback); OpenSSL's buffered record is always drained.
_READS_PER_WAKE = 16
_WANT = (ssl.SSLWantReadError, ssl.SSLWantWriteError)
_NO_PROFILES: dict[str, CertInfo] = {}
# How long a closed connection's socket waits for the peer's FIN (see _close_gracefully).
LINGER = 2.0
_TCP_CLOSE = 7  # tcpi_state of a reset connection (linux/tcp_states.h)


class TlsSide(Protocol):
    """What a TlsSocket tells its relay (asyncio.Protocol's names, plus the pump)."""

    def _pump_tls(self) -> None: ...

    def connection_lost(self, exc: Exception | None) -> None: ...

    def pause_writing(self) -> None: ...

    def resume_writing(self) -> None: ...

    def tls_failed(self, reason: str, detail: str) -> None: ...


class TlsSocket(TlsEngine):
    """One accepted connection's TLS on its socket; `start(relay)` begins reading."""

    name = "openssl"
    writes_itself = True

    def __init__(self, ctx: ssl.SSLContext, sock: socket.socket, peer: Any, *,
                 local_cert: CertInfo | None = None,
                 local_by_profile: dict[str, CertInfo] | None = None,
                 verifying: bool | None = None) -> None:
        """`sock` is non-blocking and connected; `ctx` is an openssl server context."""
        self._ssl: SocketConnection = ctx.wrap_socket(  # type: ignore[assignment]
            sock, server_side=True, do_handshake_on_connect=False)
        self._c = self._ssl._sslobj  # type: ignore[attr-defined]  # the C object: a call less
        self._fd = self._ssl.fileno()
        self._peer = peer
        self._local_cert = local_cert
        self._local_by_profile = local_by_profile or _NO_PROFILES
        # openssl's SNI profiles share the verify mode (registry.FIXED_BEFORE_SNI)
        self._verifying = verifying
        self._loop = asyncio.get_running_loop()
        self._relay: TlsSide | None = None
        self._reading = False
        self._paused = False
        # Containers an idle connection does without (None until needed): what was read ahead
        # of our close_notify and not yet handed over; what waits behind `_retry`.
        self._early: list[bytes] | None = None
        # Writing: OpenSSL must be given the same buffer again after it said "want write".
        self._retry: bytes | None = None
        self._queue: list[bytes] | None = None
        self._buffered = 0
        self._high = 64 * 1024
        self._writing_paused = False
        self._writer = False
        self._close_when_flushed = False
        self._shutdown_when_flushed = False
        self._shut = False  # our close_notify went
        self._closed = False
        self._linger: asyncio.TimerHandle | None = None
        self.peer_closed = False
        self.handshake_done = False

    # -- the transport side -----------------------------------------------------------------

    def start(self, relay: TlsSide) -> None:
        self._relay = relay
        if not self._paused:
            self.resume_reading()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peer
        if name == "sockname":
            return self._ssl.getsockname()
        return default

    def set_write_buffer_limits(self, high: int) -> None:
        self._high = high

    def pause_reading(self) -> None:
        self._paused = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def resume_reading(self) -> None:
        self._paused = False
        if self._reading or self._closed or self.peer_closed or self._relay is None:
            return
        self._loop.add_reader(self._fd, self._readable)
        self._reading = True
        if self._early or self._c.pending():  # already off the socket: no readiness for it
            self._loop.call_soon(self._readable)

    def close(self) -> None:
        """Stop reading; the socket closes once what is buffered has been written."""
        self.pause_reading()
        if self._buffered and not self._closed:
            self._close_when_flushed = True
        else:
            self._close_gracefully()

    def _close_gracefully(self) -> None:
        """Close once the peer has ended too. Closing a socket with unread data sends an RST,
        and the peer's kernel may then drop what we sent last (an alert, a close_notify) before
        the peer reads it: so a FIN goes first, and what the peer still sends is read and
        dropped until its FIN, for LINGER seconds at most."""
        if self._closed:
            return
        if self.peer_closed:
            self._close_fd()
            return
        try:
            _socket.socket.shutdown(self._ssl, socket.SHUT_WR)
        except OSError:
            self._close_fd()
            return
        self._close_fd(keep_fd=True)
        loop = self._loop
        loop.add_reader(self._fd, self._discard)
        self._linger = loop.call_later(LINGER, self._end_linger)

    def _discard(self) -> None:
        try:
            while _socket.socket.recv(self._ssl, 65536):
                pass
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._end_linger()  # its FIN (recv returned b""), or it is gone

    def _end_linger(self) -> None:
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
            self._loop.remove_reader(self._fd)
            self._ssl.close()

    def abort(self) -> None:
        self._close_fd()

    def _readable(self) -> None:
        if self._closed or self._relay is None:
            return
        try:
            self._relay._pump_tls()
        except OSError as exc:  # the peer's TCP connection failed under OpenSSL
            self._lost(exc)

    def _lost(self, exc: Exception) -> None:
        if self._closed:
            return
        self._close_fd()
        if self._relay is not None:
            # Later, as asyncio transports do: the caller may be in the middle of a write.
            self._loop.call_soon(self._relay.connection_lost, exc)

    def _fail(self, reason: str, detail: str) -> None:
        if self._relay is not None and not self._closed:
            self._loop.call_soon(self._relay.tls_failed, reason, detail)

    def _close_fd(self, keep_fd: bool = False) -> None:
        """Done with the relay; the fd is closed too unless the caller lingers on it."""
        if self._closed:
            return
        self._closed = True
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False
        if self._writer:
            self._loop.remove_writer(self._fd)
            self._writer = False
        self._retry, self._queue, self._buffered = None, None, 0
        if not keep_fd:
            self._ssl.close()

    # -- the engine side --------------------------------------------------------------------

    def receive(self, ciphertext: bytes) -> None:
        raise TypeError("a TlsSocket reads its own socket")

    def receive_eof(self) -> None:
        raise TypeError("a TlsSocket reads its own socket")

    def outgoing(self) -> bytes:
        return b""  # OpenSSL has written it to the socket already

    def handshake(self) -> bool:
        if self.handshake_done:
            return True
        try:
            self._c.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLWantWriteError:
            self._want_writable()  # the flight did not fit in the socket: go on when it does
            return False
        except ssl.SSLCertVerificationError as exc:
            raise TlsError(r.VERIFY_FAILED, exc.verify_message or str(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise TlsError(r.EOF_IN_HANDSHAKE, "peer closed during the handshake") from None
        except ssl.SSLSyscallError as exc:
            raise ConnectionResetError(exc.errno or errno.ECONNRESET, str(exc)) from None
        except ssl.SSLError as exc:
            if self._ssl.refused:
                raise TlsError(r.SNI_REFUSED, self._ssl.refused) from None
            raise TlsError(r.HANDSHAKE_FAILED, exc.reason or str(exc)) from None
        self.handshake_done = True
        return True

    def read(self) -> bytes:
        chunks = self._early or []
        self._early = None
        c = self._c
        reads = 0
        while not self.peer_closed:
            try:
                chunk = c.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLWantWriteError:
                self._want_writable()  # a key update's answer did not fit: read on after
                break
            except ssl.SSLZeroReturnError:
                self._peer_ended()  # close_notify
                break
            except ssl.SSLEOFError:
                if self._reset():
                    raise ConnectionResetError(errno.ECONNRESET, "connection reset") from None
                self._peer_ended()  # a FIN without close_notify: the stream ends here too
                break
            except ssl.SSLSyscallError as exc:
                raise ConnectionResetError(exc.errno or errno.ECONNRESET, str(exc)) from None
            except ssl.SSLError as exc:
                raise TlsError(r.TLS_ERROR, exc.reason or str(exc)) from None
            if not chunk:
                self._peer_ended()
                break
            chunks.append(chunk)
            reads += 1
            if reads >= _READS_PER_WAKE and not c.pending():
                break  # the fd is still readable: the loop calls again
        return b"".join(chunks) if len(chunks) != 1 else chunks[0]

    def _reset(self) -> bool:
        """The connection was reset, not ended: Python's ssl reports both as an EOF, and only
        the socket's TCP state tells them apart (CLOSE after an RST, CLOSE_WAIT after a FIN)."""
        try:
            info = self._ssl.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        except OSError:
            return False
        return info[0] == _TCP_CLOSE

    def _peer_ended(self) -> None:
        self.peer_closed = True
        if self._reading:  # a FIN leaves the fd readable for ever
            self._loop.remove_reader(self._fd)
            self._reading = False

    def write(self, plaintext: bytes) -> None:
        if self._closed:
            return
        if self._retry is not None:
            if self._queue is None:
                self._queue = []
            self._queue.append(plaintext)
            self._buffered += len(plaintext)
            self._check_high()
            return
        try:
            self._c.write(plaintext)
        except _WANT:
            self._retry = plaintext
            self._buffered += len(plaintext)
            self._want_writable()
            self._check_high()
        except ssl.SSLError as exc:
            if isinstance(exc, ssl.SSLSyscallError):
                self._lost(exc)
                return
            raise TlsError(r.TLS_ERROR, exc.reason or str(exc)) from None
        except OSError as exc:
            self._lost(exc)

    def close_notify(self) -> None:
        """Queue our close_notify (after what is buffered): reading may go on."""
        if self._closed or self._shut:
            return
        if self._buffered:
            self._shutdown_when_flushed = True
            return
        self._shut = True
        self._read_ahead()
        try:
            self._c.shutdown()
        except _WANT:
            pass  # sent; the peer's close_notify may come later
        except ssl.SSLError as exc:
            if not self.peer_closed:
                self._fail(r.TLS_ERROR, f"data the peer sent after our close_notify could not "
                                        f"be read: {exc.reason}")
        except OSError:
            pass  # the connection is gone; reading says so
        if self._early and self._reading:
            self._loop.call_soon(self._readable)

    def _read_ahead(self) -> None:
        """What the socket holds now, kept for the next read(): SSL_shutdown would drop it."""
        if self.peer_closed or not self.handshake_done:
            return
        try:
            data = self.read()
        except (TlsError, OSError):
            return  # reading reports it at its next turn
        if data:
            self._early = [data]

    def facts(self) -> TlsFacts:
        conn = self._ssl
        local = self._local_by_profile.get(conn.profile, self._local_cert)
        return facts_from_ssl(conn, sni=conn.sni, local=local, engine=self.name,
                              verifying=self._verifying)

    # -- writing when the socket is full ----------------------------------------------------

    def _want_writable(self) -> None:
        if not self._writer and not self._closed:
            self._loop.add_writer(self._fd, self._writable)
            self._writer = True

    def _check_high(self) -> None:
        if not self._writing_paused and self._buffered > self._high and self._relay:
            self._writing_paused = True
            self._relay.pause_writing()

    def _writable(self) -> None:
        if not self.handshake_done:
            self._loop.remove_writer(self._fd)
            self._writer = False
            self._readable()
            return
        try:
            self._flush()
        except OSError as exc:
            self._lost(exc)
            return
        except TlsError as exc:
            self._fail(exc.reason, exc.detail)
            return
        if self._closed:
            return
        if self._retry is None:
            self._loop.remove_writer(self._fd)
            self._writer = False
            self._flushed()
        if self._writing_paused and self._buffered <= self._high // 4 and self._relay:
            self._writing_paused = False
            self._relay.resume_writing()

    def _flush(self) -> None:
        """Write what is buffered until the socket is full again."""
        while self._retry is not None:
            try:
                self._c.write(self._retry)
            except _WANT:
                return
            except ssl.SSLSyscallError as exc:
                raise ConnectionResetError(exc.errno or errno.ECONNRESET, str(exc)) from None
            except ssl.SSLError as exc:
                raise TlsError(r.TLS_ERROR, exc.reason or str(exc)) from None
            self._buffered -= len(self._retry)
            self._retry = None
            if self._queue:
                self._retry = b"".join(self._queue)
                self._queue = None

    def _flushed(self) -> None:
        if self._shutdown_when_flushed:
            self._shutdown_when_flushed = False
            self.close_notify()
        if self._close_when_flushed:
            self._close_gracefully()


class ServerEngines:
    """The engines of one openssl server context: on memory BIOs (`factory()`, the interface
    every engine has) or, for a connection the daemon accepted itself, on its socket."""

    def __init__(self, ctx: ssl.SSLContext, *, local_cert: CertInfo | None,
                 local_by_profile: dict[str, CertInfo] | None = None) -> None:
        self.ctx = ctx
        self._local_cert = local_cert
        self._local_by_profile = local_by_profile
        self._verifying = ctx.verify_mode != ssl.CERT_NONE

    def __call__(self) -> OpenSSLEngine:
        return OpenSSLEngine(self.ctx, server_side=True, local_cert=self._local_cert,
                             local_by_profile=self._local_by_profile)

    def on_socket(self, sock: socket.socket, peer: Any) -> TlsSocket:
        return TlsSocket(self.ctx, sock, peer, local_cert=self._local_cert,
                         local_by_profile=self._local_by_profile, verifying=self._verifying)
