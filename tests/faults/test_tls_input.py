"""Bad input on the TLS side, on every engine: each offender is refused (or closed with an event
that says why), every other connection keeps working, nothing is lost, the daemon keeps running.
"""

from __future__ import annotations

import contextlib
import random
import re
import socket
import ssl
import struct
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from OpenSSL import SSL

from tests.faults.lab import (
    Bystander,
    Lab,
    RawTls,
    check_echo,
    daemon_healthy,
    lab_stack,
    message_request,
    random_body,
    wait_closed_event,
    wait_until,
)
from tests.integration.conftest import ENGINES
from tests.support.sip import build_request
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.control import ControlError

pytestmark = [pytest.mark.integration]

HANDSHAKE_TIMEOUT = 1.0


@pytest.fixture(scope="module", params=ENGINES)
def lab(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
        fault_certs: dict[str, Path]) -> Iterator[Lab]:
    with lab_stack(tmp_path_factory.mktemp(f"tls-input-{request.param}"), fault_certs,
                   engine=request.param, handshake_timeout=HANDSHAKE_TIMEOUT) as lab:
        yield lab


@pytest.fixture
def bystander(lab: Lab) -> Iterator[Bystander]:
    b = Bystander(lab)
    yield b
    b.close()


def options_bytes(lab: Lab, local: tuple[str, int]) -> bytes:
    return build_request("OPTIONS", f"sip:127.0.0.1:{lab.tls_port}", via_proto="TLS", local=local)


def read_until_closed(sock: socket.socket, timeout: float) -> bytes:
    end, got = time.monotonic() + timeout, b""
    while True:
        left = end - time.monotonic()
        if left <= 0:
            raise AssertionError(f"the daemon kept the connection open {timeout} s ({got[:40]!r})")
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return got
        if not chunk:
            return got
        got += chunk


def failed_and_closed(lab: Lab, peer: str, timeout: float = 5.0) -> tuple[ev.Event, ev.Event]:
    failed = lab.events.wait_for(
        lambda e: e.type == ev.TLS_FAILED and e.conn is not None and e.conn.peer == peer,
        timeout=timeout)
    closed = wait_closed_event(lab, peer, timeout)
    assert not lab.events_for(
        lambda e: e.type == ev.TLS_ESTABLISHED and e.conn is not None and e.conn.peer == peer)
    return failed, closed


def test_plaintext_sip_on_the_tls_port(lab: Lab, bystander: Bystander) -> None:
    s = socket.create_connection(lab.tls_addr, timeout=5)
    peer = format_addr(*s.getsockname()[:2])
    try:
        s.sendall(options_bytes(lab, s.getsockname()[:2]))
        answer = read_until_closed(s, 5)
    finally:
        s.close()
    assert b"SIP/2.0" not in answer  # never relayed: no SIP answer in clear
    failed, closed = failed_and_closed(lab, peer)
    assert failed.reason == "handshake_failed" and failed.fields.get("detail"), failed.fields
    assert closed.reason == "handshake_failed" and closed.fields["bytes_in"] == 0
    bystander.check()
    daemon_healthy(lab)


@pytest.mark.parametrize("when", ["before_handshake", "after_handshake"])
def test_random_bytes(lab: Lab, bystander: Bystander, when: str) -> None:
    rng = random.Random(20240611)
    junk = bytearray(rng.randbytes(8192))
    junk[0] = 0xEE  # not a TLS content type: no chance of a plausible record header
    if when == "before_handshake":
        s = socket.create_connection(lab.tls_addr, timeout=5)
        peer = format_addr(*s.getsockname()[:2])
        try:
            s.sendall(bytes(junk))
            read_until_closed(s, 5)
        finally:
            s.close()
        failed, closed = failed_and_closed(lab, peer)
        assert failed.reason == "handshake_failed" and failed.fields.get("detail")
        assert closed.fields["bytes_in"] == 0
    else:
        raw = RawTls(lab.tls_addr, lab.ca)
        peer = format_addr(*raw.local)
        try:
            raw.handshake()
            request = options_bytes(lab, raw.local)
            raw.send(request)
            assert raw.read_message().status == 200
            raw.raw_send(bytes(junk))
            raw.read_raw_until_closed(5)
        finally:
            raw.close()
        closed = wait_closed_event(lab, peer)
        assert closed.reason == "tls_error" and closed.fields.get("detail"), closed.fields
        # What came before the junk was relayed whole, and nothing of the junk.
        assert closed.fields["bytes_in"] == len(request)
    bystander.check()
    daemon_healthy(lab)


def test_client_hello_cut_in_half_then_silence(lab: Lab, bystander: Bystander) -> None:
    raw = RawTls(lab.tls_addr, lab.ca)
    peer = format_addr(*raw.local)
    try:
        hello = raw.client_hello()
        raw.raw_send(hello[: len(hello) // 2])
        started = time.monotonic()
        raw.read_raw_until_closed(HANDSHAKE_TIMEOUT + 4)
        took = time.monotonic() - started
    finally:
        raw.close()
    assert took >= HANDSHAKE_TIMEOUT * 0.9, f"closed after {took:.2f} s, before the timeout"
    failed, closed = failed_and_closed(lab, peer)
    assert failed.reason == "handshake_timeout", failed.fields
    assert closed.reason == "handshake_timeout" and closed.fields["bytes_in"] == 0
    bystander.check()
    daemon_healthy(lab)


def test_renegotiation_is_refused(lab: Lab, bystander: Bystander) -> None:
    """A TLS 1.2 client asks to renegotiate (Python's ssl cannot: pyOpenSSL does)."""
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    ctx.load_verify_locations(lab.ca)
    ctx.set_verify(SSL.VERIFY_PEER, lambda *_: True)
    sock = socket.create_connection(lab.tls_addr)
    # pyOpenSSL needs a blocking socket; SO_RCVTIMEO still bounds every wait.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, struct.pack("ll", 5, 0))
    peer = format_addr(*sock.getsockname()[:2])
    conn = SSL.Connection(ctx, sock)
    conn.set_connect_state()
    conn.set_tlsext_host_name(b"localhost")
    refusal: SSL.Error | None = None
    try:
        conn.do_handshake()
        request = options_bytes(lab, sock.getsockname()[:2])
        conn.sendall(request)
        first = conn.recv(65536)
        assert first.startswith(b"SIP/2.0 200 "), first[:60]
        assert conn.renegotiate()
        try:
            conn.do_handshake()
            # Some servers ignore the request: the next read shows what happened.
            conn.sendall(request)
            conn.recv(65536)
        except SSL.Error as exc:
            refusal = exc
    finally:
        sock.close()
    assert refusal is not None, "renegotiation was neither refused nor did the daemon close"
    assert "renegotiation" in str(refusal).lower(), refusal
    closed = wait_closed_event(lab, peer)
    assert closed.reason and closed.reason != "closed", closed.fields
    assert closed.fields["bytes_in"] == len(request)
    assert closed.fields["bytes_out"] == len(first)
    bystander.check()
    daemon_healthy(lab)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
def test_oversized_record_after_the_handshake(
    lab: Lab, bystander: Bystander, version: ssl.TLSVersion
) -> None:
    raw = RawTls(lab.tls_addr, lab.ca, version=version)
    peer = format_addr(*raw.local)
    try:
        raw.handshake()
        request = options_bytes(lab, raw.local)
        raw.send(request)
        assert raw.read_message().status == 200
        length = 2**14 + 2048 + 1  # one more than any TLS version allows
        raw.raw_send(bytes([23, 3, 3]) + length.to_bytes(2, "big") + random.randbytes(length))
        answer = raw.read_raw_until_closed(5)
    finally:
        raw.close()
    # The refusal is an alert (encrypted): decrypt it with the client's session.
    raw.incoming.write(answer)
    try:
        seen = f"a clean end of stream (close_notify), then {raw.obj.read(1024)!r}"
    except ssl.SSLError as exc:
        seen = str(exc)
    # A record too long is a fatal protocol error (RFC 8446 6.2, RFC 5246 7.2.2): the peer must
    # be told so with a record_overflow alert, not see a graceful close_notify.
    assert "RECORD_OVERFLOW" in seen.upper(), f"the client saw {seen}"
    closed = wait_closed_event(lab, peer)
    assert closed.reason == "tls_error" and closed.fields.get("detail"), closed.fields
    assert closed.fields["bytes_in"] == len(request)
    bystander.check()
    daemon_healthy(lab)


def test_proxy_header_inside_tls_is_not_believed(lab: Lab, bystander: Bystander) -> None:
    """A client writes a PROXY line inside TLS, then a request. Kamailio has already read the
    daemon's header: the client's line is the start of a SIP message to it, which it cannot
    parse. It answers nothing, logs the failure under the REAL peer's address and closes; a
    believed spoof would get a 200 (with X-Source 6.6.6.6:1) or be logged under 6.6.6.6."""
    assert lab.kamailio is not None
    ua = lab.ua()
    real = format_addr(*ua.local)
    spoof = b"PROXY TCP4 6.6.6.6 7.7.7.7 1 2\r\n"
    sent = spoof + options_bytes(lab, ua.local)
    parse_failed = re.compile(r"core parsing of SIP message failed \((\S+?)/\d+\)")
    try:
        ua.send(sent)
        # No answer, whatever comes: Kamailio closes the connection. (A reply raises here.)
        with pytest.raises(ConnectionError):
            reply = ua.read(5)
            pytest.fail(f"Kamailio answered a request behind a PROXY line: {reply.first_line} "
                        f"X-Source {reply.get('X-Source')} X-TLS {reply.get('X-TLS')}")
    finally:
        ua.close()
    # Kamailio's own account of the garbage names the real peer, never the spoofed one.
    wait_until(lambda: any(a == real for a in parse_failed.findall(lab.kamailio.log.read_text(
        errors="replace"))), 5, f"Kamailio to log the garbage from {real}")
    sources = set(parse_failed.findall(lab.kamailio.log.read_text(errors="replace")))
    assert not any(s.startswith("6.6.6.6") for s in sources), sources
    closed = wait_closed_event(lab, real)
    # Kamailio closed first (its FIN became our close_notify, then the client left): it
    # took every byte and sent none back.
    assert closed.reason in ("closed", "kamailio_closed"), closed.fields
    assert closed.fields["bytes_in"] == len(sent) and closed.fields["bytes_out"] == 0
    with pytest.raises(ControlError) as missing:
        lab.daemon.request("lookup", peer="6.6.6.6:1")
    assert missing.value.code == "not_found"
    assert not lab.events_for(lambda e: e.conn is not None and "6.6.6.6" in e.conn.peer)
    # The same client, next connection: Kamailio sees its real address.
    ua = lab.ua()
    try:
        reply = lab.options(ua)
        assert reply.status == 200
        assert lab.x_tls(reply).get("peer") == format_addr(*ua.local)
        assert reply.get("X-Source") == format_addr(*ua.local)
    finally:
        ua.close()
    bystander.check()
    daemon_healthy(lab)


FLOOD = 20


@pytest.mark.parametrize("how", ["close_notify", "fin"])
def test_half_close_from_the_client(lab: Lab, bystander: Bystander, how: str) -> None:
    """README: a client's close_notify or FIN becomes a FIN to Kamailio while Kamailio's
    replies still reach the client. The client asks for 20 replies and half-closes at once;
    it must read all 20, whole, and then the end: Kamailio closes only because of the FIN it
    got (without it the connection would stay open and the last read time out)."""
    raw = RawTls(lab.tls_addr, lab.ca)
    peer = format_addr(*raw.local)
    try:
        raw.handshake()
        body = random_body(4096)
        request = message_request(raw.local, f"sip:flood@127.0.0.1:{lab.tls_port}", body,
                                  call_id=uuid.uuid4().hex, extra=[f"X-Flood: {FLOOD}"])
        raw.send(request)
        if how == "close_notify":
            with contextlib.suppress(ssl.SSLWantReadError):
                raw.obj.unwrap()  # writes our close_notify; we go on reading
            raw.flush()
        else:
            raw.sock.shutdown(socket.SHUT_WR)  # a TCP FIN, no close_notify
        replies = []
        with pytest.raises(ConnectionError):
            while True:
                replies.append(raw.read_message(5))
    finally:
        raw.close()
    assert len(replies) == FLOOD, f"{len(replies)} of {FLOOD} replies reached the client"
    for reply in replies:
        check_echo(reply, body)
    closed = wait_closed_event(lab, peer)
    assert closed.reason == "closed", closed.fields
    assert closed.fields["bytes_in"] == len(request)
    assert closed.fields["bytes_out"] == raw.plaintext_in
    bystander.check()
    daemon_healthy(lab)
