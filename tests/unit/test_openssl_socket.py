"""The openssl engine on its own socket (engines/openssl_socket.py), on real loopback TCP with
a blocking Python ssl client in a thread: the handshake and facts, reading to the end (close_notify,
FIN, RST told apart), back-pressure both ways, our close_notify after what is buffered, and
data that was on the socket when we sent our close_notify."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
import ssl
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from pathlib import Path
from typing import Any

import pytest
import trustme
import uvloop

from tlsbridge.daemon.config import ServerProfile
from tlsbridge.daemon.engines import openssl
from tlsbridge.daemon.engines.base import TlsError
from tlsbridge.daemon.engines.openssl_socket import TlsSocket


def on_uvloop(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test on uvloop, the daemon's loop."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        uvloop.run(test(*args, **kwargs))

    return run


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[trustme.CA, Path]:
    d = tmp_path_factory.mktemp("sockpki")
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost")
    leaf.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    leaf.private_key_pem.write_to_path(str(d / "key.pem"))
    return ca, d


class Recorder:
    """The relay's side of a TlsSocket: what it was told, and the plaintext it read."""

    def __init__(self, tls: TlsSocket) -> None:
        self.tls = tls
        self.data = bytearray()
        self.events: list[tuple[str, Any]] = []
        self.handshaken = asyncio.Event()
        self.changed = asyncio.Event()

    def _pump_tls(self) -> None:
        try:
            if not self.tls.handshake():
                return
            self.handshaken.set()
            self.data += self.tls.read()
            if self.tls.peer_closed:
                self.note("eof", None)
        except TlsError as exc:
            self.note("tls_error", exc.reason)
        self.changed.set()

    def note(self, what: str, arg: Any) -> None:
        self.events.append((what, arg))
        self.changed.set()

    def connection_lost(self, exc: Exception | None) -> None:
        self.note("lost", type(exc).__name__ if exc else None)

    def pause_writing(self) -> None:
        self.note("pause_writing", None)

    def resume_writing(self) -> None:
        self.note("resume_writing", None)

    def tls_failed(self, reason: str, detail: str) -> None:
        self.note("tls_failed", (reason, detail))

    def saw(self, what: str) -> bool:
        return any(e[0] == what for e in self.events)

    async def until(self, check: Callable[[], bool], what: str) -> None:
        async with asyncio.timeout(5):
            while not check():
                self.changed.clear()
                await self.changed.wait()


@contextlib.asynccontextmanager
async def pair(pki: tuple[trustme.CA, Path]) -> AsyncIterator[tuple[Recorder, ssl.SSLSocket]]:
    """A TlsSocket serving one connection, and the client's blocking SSLSocket."""
    ca, d = pki
    ctx = openssl.server_context(ServerProfile(name="s", certificate=d / "cert.pem",
                                               private_key=d / "key.pem"))
    lsock = socket.create_server(("127.0.0.1", 0))
    cctx = ssl.create_default_context()
    ca.configure_trust(cctx)
    client_box: list[ssl.SSLSocket] = []

    def connect() -> None:
        raw = socket.create_connection(lsock.getsockname(), timeout=5)
        client_box.append(cctx.wrap_socket(raw, server_hostname="localhost"))

    thread = threading.Thread(target=connect)
    thread.start()
    sock, peer = await asyncio.get_running_loop().sock_accept(lsock)
    sock.setblocking(False)
    tls = TlsSocket(ctx, sock, peer)
    rec = Recorder(tls)
    tls.start(rec)
    await rec.until(rec.handshaken.is_set, "handshake")
    await asyncio.to_thread(thread.join, 5)
    client = client_box[0]
    try:
        yield rec, client
    finally:
        client.close()
        tls.abort()
        lsock.close()


@on_uvloop
async def test_handshake_facts_and_plaintext_both_ways(pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        facts = rec.tls.facts()
        assert facts.version == client.version() and facts.engine == "openssl"
        assert facts.local is None and facts.peer_cert_present is False
        client.sendall(b"REGISTER")
        await rec.until(lambda: bytes(rec.data) == b"REGISTER", "plaintext")
        rec.tls.write(b"SIP/2.0 200 OK")
        assert await asyncio.to_thread(client.recv, 100) == b"SIP/2.0 200 OK"


@on_uvloop
async def test_close_notify_and_fin_end_the_stream_and_reading(
        pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        client.sendall(b"last words")
        client.settimeout(0.2)
        with contextlib.suppress(TimeoutError):  # it waits for ours, which is not coming
            client.unwrap()  # our close_notify...
        socket.socket.shutdown(client, socket.SHUT_WR)  # ...then a FIN
        await rec.until(lambda: rec.saw("eof"), "the end")
        assert bytes(rec.data) == b"last words" and rec.tls.peer_closed
        assert not rec.saw("lost")
        assert not rec.tls._reading  # a FIN leaves the fd readable: no busy loop


@on_uvloop
async def test_fin_without_close_notify_is_an_end_not_a_reset(
        pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        client.sendall(b"abrupt")
        socket.socket.shutdown(client, socket.SHUT_WR)  # TCP FIN, no close_notify
        await rec.until(lambda: rec.saw("eof"), "the end")
        assert bytes(rec.data) == b"abrupt" and not rec.saw("lost")


@on_uvloop
async def test_rst_is_a_reset(pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        client.sendall(b"x")
        await rec.until(lambda: bytes(rec.data) == b"x", "plaintext")
        client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        client.close()
        await rec.until(lambda: rec.saw("lost"), "the loss")
        assert ("lost", "ConnectionResetError") in rec.events and not rec.saw("eof")


@on_uvloop
async def test_back_pressure_pauses_then_resumes_and_loses_nothing(
        pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        rec.tls.set_write_buffer_limits(high=64 * 1024)
        chunk = bytes(range(256)) * 256  # 64 KiB
        sent = 0
        while not rec.saw("pause_writing") and sent < 64 * 1024 * 1024:
            rec.tls.write(chunk)
            sent += len(chunk)
        assert rec.saw("pause_writing"), "the client never stopped taking data"

        def drain() -> int:
            got = 0
            while got < sent:
                part = client.recv(1 << 20)
                assert part, "the stream ended early"
                got += len(part)
            return got

        assert await asyncio.to_thread(drain) == sent
        await rec.until(lambda: rec.saw("resume_writing"), "resume")


@on_uvloop
async def test_close_notify_waits_for_the_buffer_then_the_socket_closes(
        pki: tuple[trustme.CA, Path]) -> None:
    async with pair(pki) as (rec, client):
        rec.tls.set_write_buffer_limits(high=1 << 30)
        payload = b"y" * (8 * 1024 * 1024)  # more than the socket takes at once
        rec.tls.write(payload)
        assert rec.tls._buffered, "the socket took it all: the test proves nothing"
        rec.tls.close_notify()  # after the buffer
        rec.tls.close()

        def read_all() -> bytes:
            out = bytearray()
            while part := client.recv(1 << 20):
                out += part
            return bytes(out)

        assert await asyncio.to_thread(read_all) == payload  # then close_notify: recv b""


@on_uvloop
async def test_data_on_the_socket_at_our_close_notify_is_delivered(
        pki: tuple[trustme.CA, Path]) -> None:
    """SSL_shutdown would read and drop it (APPLICATION_DATA_AFTER_CLOSE_NOTIFY)."""
    async with pair(pki) as (rec, client):
        rec.tls.pause_reading()  # so that the data waits on the socket
        client.sendall(b"INVITE in flight")
        await asyncio.sleep(0.1)
        rec.tls.close_notify()
        rec.tls.resume_reading()
        await rec.until(lambda: bytes(rec.data) == b"INVITE in flight", "the data")
        assert not rec.saw("tls_failed")
        client.sendall(b" and more")  # reading goes on after our close_notify
        await rec.until(lambda: bytes(rec.data) == b"INVITE in flight and more", "more")


@on_uvloop
async def test_closing_with_unread_data_is_a_fin_not_a_reset(
        pki: tuple[trustme.CA, Path]) -> None:
    """A close with unread data would be an RST: a peer still writing then fails before it has
    read what we sent last (a TLS 1.3 client refused by mutual TLS sends its request before it
    reads the alert)."""
    async with pair(pki) as (rec, client):
        rec.tls.pause_reading()
        client.sendall(b"never read")
        await asyncio.sleep(0.1)
        rec.tls.write(b"last words")
        rec.tls.close_notify()
        rec.tls.close()
        await asyncio.sleep(0.1)
        client.sendall(b"sent before it read ours")  # after an RST: EPIPE, or EOF in ssl

        def read_to_the_end() -> bytes:
            out = bytearray()
            while part := client.recv(1024):
                out += part
            return bytes(out)

        assert await asyncio.to_thread(read_to_the_end) == b"last words"
        socket.socket.shutdown(client, socket.SHUT_WR)
        await asyncio.sleep(0.1)
        assert rec.tls._linger is None  # its FIN ended the wait
