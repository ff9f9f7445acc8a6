"""The foundation: a TLS client reaches the real Kamailio through the real daemon, and the routing
script sees the TLS facts of its connection."""

from __future__ import annotations

import re
import socket
import ssl
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, base_engine, start_stack, stop_stack
from tests.support.procs import wait_until
from tests.support.sip import TlsUA, build_request
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("logs_on_failure")]

X_TLS = re.compile(
    r"^(?P<version>\S+); (?P<cipher>\S+); sni=(?P<sni>\S+); peer=(?P<peer>\S+); "
    r"verified=(?P<verified>[01])$"
)


def options(ua: TlsUA, stack: Stack) -> tuple[int, dict[str, str]]:
    reply = ua.request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}")
    m = X_TLS.match(reply.get("X-TLS"))
    return reply.status, (m.groupdict() if m else {})


def test_options_over_tls_gets_200_with_the_facts(stack: Stack) -> None:
    ua = TlsUA(*stack.tls_addr, ca=stack.ca)
    try:
        status, xtls = options(ua, stack)
        assert status == 200
        assert xtls == {
            "version": ua.sock.version(),
            "cipher": ua.sock.cipher()[0],
            "sni": "localhost",
            "peer": format_addr(*ua.local),
            "verified": "0",
        }
        # The same connection carries a second transaction.
        status, again = options(ua, stack)
        assert status == 200 and again == xtls
    finally:
        ua.close()


@pytest.mark.parametrize(
    ("version", "ciphers"),
    [(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256"),
     (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-RSA-CHACHA20-POLY1305"),
     (ssl.TLSVersion.TLSv1_3, None)],
)
def test_facts_follow_what_the_client_negotiated(
    stack: Stack, version: ssl.TLSVersion, ciphers: str | None
) -> None:
    ua = TlsUA(*stack.tls_addr, ca=stack.ca, tls_version=version, ciphers=ciphers,
               server_hostname=None)
    try:
        status, xtls = options(ua, stack)
        assert status == 200
        assert xtls["version"] == ua.sock.version()
        assert xtls["cipher"] == ua.sock.cipher()[0]
        assert xtls["sni"] == "-"  # no server_hostname: no SNI sent
        assert xtls["peer"] == format_addr(*ua.local)
    finally:
        ua.close()


def test_register_over_tls_is_saved_in_usrloc(stack: Stack) -> None:
    ua = TlsUA(*stack.tls_addr, ca=stack.ca)
    try:
        host, port = ua.local
        reply = ua.request(
            "REGISTER", "sip:localhost", from_uri="sip:alice@localhost",
            to_uri="sip:alice@localhost",
            extra=[f"Contact: <sip:alice@{host}:{port};transport=tls>", "Expires: 300"],
        )
        assert reply.status == 200, reply.first_line
        assert f"sip:alice@{host}:{port};transport=tls" in reply.get("Contact")
        assert stack.kamailio is not None
        dump = stack.kamailio.kamcmd("ul.dump")
        assert f"sip:alice@{host}:{port};transport=tls" in dump
        # usrloc files it on the hairpin socket, the connection it came on.
        assert f"tcp:127.0.0.1:{stack.hairpin_port}" in dump
    finally:
        ua.close()


def test_100_sequential_connections_each_get_their_own_facts(stack: Stack) -> None:
    """Every first message gets the facts of its own connection: no mix-up, no miss."""
    variants = [
        (ssl.TLSVersion.TLSv1_3, None, "localhost"),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-RSA-AES128-GCM-SHA256", None),
        (ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-RSA-AES256-GCM-SHA384",
         "localhost"),
    ]
    for i in range(100):
        version, ciphers, sni = variants[i % len(variants)]
        ua = TlsUA(*stack.tls_addr, ca=stack.ca, tls_version=version, ciphers=ciphers,
                   server_hostname=sni)
        try:
            status, xtls = options(ua, stack)
            assert status == 200, f"connection {i}"
            assert xtls == {
                "version": ua.sock.version(),
                "cipher": ua.sock.cipher()[0],
                "sni": sni or "-",
                "peer": format_addr(*ua.local),
                "verified": "0",
            }, f"connection {i}"
        finally:
            ua.close()


@pytest.mark.parametrize("how", ["rst", "fin"])
def test_client_dropping_mid_message_is_published_and_others_are_served(
    stack: Stack, how: str
) -> None:
    ua = TlsUA(*stack.tls_addr, ca=stack.ca)
    peer = format_addr(*ua.local)
    msg = build_request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}", via_proto="TLS",
                        local=ua.local)
    ua.send(msg[: len(msg) // 2])

    def relayed() -> int:  # the half message reached the daemon (an RST would purge it)
        return {c["conn"]["peer"]: c["bytes_in"]
                for c in stack.daemon.request("list")["conns"]}.get(peer, 0)

    wait_until(lambda: relayed() == len(msg) // 2, 5, "the half message to reach the daemon")
    if how == "rst":  # an abortive close, as a crashing client's kernel does
        ua.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")
        ua.sock.close()
    else:  # TCP FIN without close_notify (a close() with unread data would be an RST)
        ua.sock.shutdown(socket.SHUT_WR)
    closed = stack.events.wait_for(
        lambda e: e.type == ev.CONN_CLOSED and e.conn is not None and e.conn.peer == peer
    )
    ua.close()
    assert closed.reason == ("peer_reset" if how == "rst" else "closed")
    assert closed.fields["bytes_in"] == len(msg) // 2
    for _ in range(3):
        ua2 = TlsUA(*stack.tls_addr, ca=stack.ca)
        try:
            assert options(ua2, stack)[0] == 200
        finally:
            ua2.close()


def test_events_carry_the_facts_before_the_hairpin(stack: Stack) -> None:
    ua = TlsUA(*stack.tls_addr, ca=stack.ca)
    try:
        peer = format_addr(*ua.local)
        assert options(ua, stack)[0] == 200
        est = stack.events.wait_for(
            lambda e: e.type == ev.TLS_ESTABLISHED and e.conn is not None and e.conn.peer == peer
        )
        assert est.conn is not None and est.conn.hairpin and est.conn.direction == "in"
        assert est.conn.listener == format_addr(*stack.tls_addr)
        facts = est.tls
        assert facts is not None and facts.version == ua.sock.version()
        assert facts.local is not None and facts.local.san_dns == ("localhost",)
        # The control look-up by the hairpin key answers the same facts.
        reply = stack.daemon.request("lookup", hairpin=est.conn.hairpin)
        assert reply["conn"]["peer"] == peer and reply["tls"]["cipher"] == facts.cipher
        listed = stack.daemon.request("list")["conns"]
        assert any(c["conn"]["id"] == est.conn.id for c in listed)
    finally:
        ua.close()
    closed = stack.events.wait_for(
        lambda e: e.type == ev.CONN_CLOSED and e.conn is not None and e.conn.id == est.conn.id
    )
    assert closed.fields["bytes_in"] > 0 and closed.fields["bytes_out"] > 0
    assert closed.ts >= est.ts  # seq counts per topic: these two are of different topics


def test_kamailio_not_running(tmp_path: Path, certs: dict[str, Path], engine: str) -> None:
    """On every engine variant (the module's `engine`), the daemon alone."""
    stack = start_stack(tmp_path, certs, with_kamailio=False, engine=engine)
    try:
        for _ in range(2):
            ua = TlsUA(*stack.tls_addr, ca=stack.ca)
            peer = format_addr(*ua.local)
            ua.send(build_request("OPTIONS", f"sip:127.0.0.1:{stack.tls_port}",
                                  via_proto="TLS", local=ua.local))
            # A clean close: close_notify, which Python's ssl reads as end of stream.
            ua.sock.settimeout(5)
            assert ua.sock.recv(1024) == b""
            ua.close()
            failed = stack.events.wait_for(
                lambda e, p=peer: e.type == ev.HAIRPIN_FAILED and e.conn.peer == p
            )
            assert "refused" in failed.fields["detail"].lower()
            stack.events.wait_for(
                lambda e, p=peer: e.type == ev.CONN_CLOSED and e.conn.peer == p
                and e.reason == "hairpin_failed"
            )
        assert stack.daemon.alive()
        assert stack.daemon.request("ping")["pong"]
        # It ran the variant asked for: the engine, and one or two workers.
        started = stack.events.wait_for(lambda e: e.type == ev.DAEMON_STARTED)
        assert started.fields.get("workers", 1) == (2 if engine.endswith("-x2") else 1)
        base = base_engine(engine)
        assert f"engine {base})" in stack.daemon.log.read_text(), stack.daemon.tail()
        stats = stack.daemon.request("stats")
        assert stats["counters"]["hairpin.failed.hairpin_failed"] == 2
        assert stats["open"] == 0
    finally:
        stop_stack(stack)


def test_handshake_timeout_closes_silent_clients(tmp_path: Path, certs: dict[str, Path],
                                                 engine: str) -> None:
    """On every engine variant (the module's `engine`): closed at handshake_timeout, not before."""
    stack = start_stack(tmp_path, certs, with_kamailio=False, engine=engine,
                        handshake_timeout=1.0)
    try:
        s = socket.create_connection(stack.tls_addr)
        started = time.monotonic()
        peer = format_addr(*s.getsockname()[:2])
        s.settimeout(5)
        assert s.recv(10) == b""
        took = time.monotonic() - started
        assert 0.9 <= took < 3.0, f"closed after {took:.2f} s"
        failed = stack.events.wait_for(
            lambda e: e.type == ev.TLS_FAILED and e.conn.peer == peer, timeout=10
        )
        assert failed.reason == "handshake_timeout"
        s.close()
    finally:
        stop_stack(stack)
