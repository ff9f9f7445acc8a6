"""SIP over secure WebSocket (RFC 7118) through the bridge, with a WebSocket client written for
the test (the browser tests in tests/browser do the same with Chromium): the daemon terminates
TLS on a `transport = "wss"` listener, Kamailio's xhttp and websocket modules take the upgrade on
the hairpin, and the reference routing.py routes browsers to UDP and TLS phones and back."""

from __future__ import annotations

import re
import socket
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import free_tcp_udp_port
from tests.support.sip import TlsUA, UdpUA
from tests.support.ua import SipUA
from tests.support.ws import HandshakeRefused, WssClient, WsSipUA

pytestmark = [pytest.mark.integration]

ORIGIN = "https://phone.example"


@dataclass
class WssStack:
    stack: Stack
    wss_port: int

    @property
    def wss_rr(self) -> str:
        return f"127.0.0.1:{self.wss_port};transport=ws"

    def client(self, origin: str | None = ORIGIN, **kw: Any) -> WssClient:
        return WssClient("127.0.0.1", self.wss_port, ca=self.stack.ca, origin=origin, **kw)


def wss_listener(port: int, origins: list[str] | None) -> str:
    lines = ["", "[[listener]]", f'address = "127.0.0.1:{port}"', 'transport = "wss"',
             'profile = "default"']
    if origins is not None:
        lines.append("origins = [" + ", ".join(f'"{o}"' for o in origins) + "]")
    return "\n".join(lines) + "\n"


def start_wss_stack(workdir: Path, certs: dict[str, Path], origins: list[str] | None,
                    engine: str = "openssl", routing: str = "kemi") -> WssStack:
    """The stack with a WSS listener; `routing` "kemi" is the reference cfg and routing.py,
    "native" the same cfg with routing-native.cfg calling tlsbridge_native.py."""
    port = free_tcp_udp_port()
    if routing == "native":
        engine += "-native"  # the reference cfg with -A WITH_NATIVE_ROUTING
    # Hairpins from 127.0.0.2: none can hold a browser's old port on 127.0.0.1, where the
    # tests of a gone browser put a plaintext trap.
    stack = start_stack(workdir, certs, extra=wss_listener(port, origins), engine=engine,
                        kamailio_args=["-A", f"WSS_PORT={port}"],
                        kamailio_extra='source_ip = "127.0.0.2"')
    return WssStack(stack, port)


@pytest.fixture(scope="module", params=["kemi", "native"])
def wss(tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path],
        request: pytest.FixtureRequest) -> Iterator[WssStack]:
    """Every test runs with KEMI routing (the reference) and with native cfg routing."""
    s = start_wss_stack(tmp_path_factory.mktemp(f"wss-{request.param}"), certs, [ORIGIN],
                        routing=request.param)
    yield s
    stop_stack(s.stack)


@pytest.fixture
def uas(wss: WssStack, request: pytest.FixtureRequest) -> Iterator:
    made: list[SipUA] = []
    stack = wss.stack

    def make(user: str, proto: str) -> SipUA:
        if proto == "ws":
            ua: SipUA = WsSipUA(user, domain="127.0.0.1", ws=wss.client())
        elif proto == "tls":
            ua = SipUA(user, domain="localhost", proxy=stack.tls_addr,
                       tls=TlsUA(*stack.tls_addr, ca=stack.ca))
        else:
            ua = SipUA(user, domain="localhost", proxy=("127.0.0.1", stack.sip_port),
                       udp=UdpUA())
        made.append(ua)
        return ua

    yield make
    for ua in made:
        ua.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for proc in (stack.daemon, stack.kamailio):
            if proc is not None:
                print(f"--- {proc.name} log ---\n{proc.tail(80)}")


def uniq(name: str) -> str:
    return f"{name}{time.monotonic_ns() % 10**9}"


def rr_of(values: list[str]) -> list[str]:
    return [v.strip() for h in values for v in h.split(",") if v.strip()]


def test_upgrade_options_facts_and_register(wss: WssStack) -> None:
    ws = wss.client()
    try:
        host, port = ws.local
        ok = ws.request(
            f"OPTIONS sip:127.0.0.1:{wss.wss_port};transport=ws SIP/2.0\r\n"
            "Via: SIP/2.0/WSS abc.invalid;branch=z9hG4bK-ws1\r\nMax-Forwards: 70\r\n"
            "From: <sip:probe@127.0.0.1>;tag=1\r\nTo: <sip:127.0.0.1>\r\nCall-ID: ws-opt-1\r\n"
            "CSeq: 1 OPTIONS\r\nContent-Length: 0\r\n\r\n")
        assert ok.status == 200
        # The facts of the WSS connection reach the script: the real peer, the TLS version.
        x_tls = ok.get("X-TLS")
        assert x_tls.startswith("TLSv1.3; "), ok
        assert f"peer={host}:{port}" in x_tls
        ua = WsSipUA(uniq("wsreg"), domain="127.0.0.1", ws=ws)
        assert ua.register().status == 200
    finally:
        ws.close()
    # Same daemon events as any TLS connection, naming the WSS listener.
    est = wss.stack.events.wait_for(
        lambda e: e.type == "tls.established" and e.conn.peer == f"{host}:{port}")
    assert est.conn.listener == f"127.0.0.1:{wss.wss_port}"
    wss.stack.events.wait_for(
        lambda e: e.type == "conn.closed" and e.conn.peer == f"{host}:{port}")


@pytest.mark.parametrize("origin", ["https://evil.example", None])
def test_origin_not_allowed_is_refused(wss: WssStack, origin: str | None) -> None:
    with pytest.raises(HandshakeRefused) as refused:
        wss.client(origin=origin)
    assert refused.value.status == 403


def test_upgrade_on_a_sip_tls_listener_is_refused(wss: WssStack) -> None:
    # Kamailio would take the upgrade on any hairpin: the script checks the listener.
    with pytest.raises(HandshakeRefused) as refused:
        WssClient("127.0.0.1", wss.stack.tls_port, ca=wss.stack.ca, origin=ORIGIN)
    assert refused.value.status == 403


def test_plain_http_get_is_not_found(wss: WssStack) -> None:
    ctx = ssl.create_default_context(cafile=wss.stack.ca)
    with socket.create_connection(("127.0.0.1", wss.wss_port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize("bye_from", ["browser", "phone"])
@pytest.mark.parametrize("phone_proto", ["udp", "tls"])
def test_phone_calls_browser(wss: WssStack, uas, phone_proto: str, bye_from: str) -> None:
    browser = uas(uniq("web"), "ws")
    phone = uas(uniq("phone"), phone_proto)
    assert browser.register().status == 200
    port = wss.stack.sip_port if phone_proto == "udp" else wss.stack.tls_port
    d_phone = phone.invite(f"sip:{browser.user}@127.0.0.1:{port}")
    d_browser, inv = browser.answer()
    phone.wait_answer(d_phone)
    browser.expect(method="ACK")
    # The browser sees the public WSS address on top, never the hairpin.
    rr = rr_of(inv.get_all("Record-Route"))
    assert rr[0].startswith(f"<sip:{wss.wss_rr};lr;r2=on"), rr
    assert str(wss.stack.hairpin_port) not in " ".join(rr)
    # Kamailio's own Via towards the browser: WS, naming the hairpin (it sees no TLS).
    # (Kamailio pads the transport to three characters: "WS  ".)
    assert re.match(rf"SIP/2.0/WS\s+127\.0\.0\.1:{wss.stack.hairpin_port};",
                    inv.get("Via")), inv.get("Via")
    # Its Contact (an .invalid host) is reached over its WebSocket in the dialog.
    assert "alias=" in d_phone.remote_target
    if bye_from == "browser":
        browser.bye(d_browser)
        phone.take_bye()
        assert browser.expect(status=200).get("CSeq").endswith("BYE")
    else:
        phone.bye(d_phone)
        browser.take_bye()
        assert phone.expect(status=200).get("CSeq").endswith("BYE")


@pytest.mark.parametrize("bye_from", ["browser", "phone"])
@pytest.mark.parametrize("phone_proto", ["udp", "tls"])
def test_browser_calls_phone(wss: WssStack, uas, phone_proto: str, bye_from: str) -> None:
    browser = uas(uniq("web"), "ws")
    phone = uas(uniq("phone"), phone_proto)
    assert browser.register().status == 200
    assert phone.register().status == 200
    d_browser = browser.invite(f"sip:{phone.user}@127.0.0.1")
    d_phone, inv = phone.answer()
    browser.wait_answer(d_browser)
    phone.expect(method="ACK")
    # Crossing transports: the phone's side on top, the browser's public WSS address below.
    rr = rr_of(inv.get_all("Record-Route"))
    assert len(rr) == 2 and rr[1].startswith(f"<sip:{wss.wss_rr};"), rr
    # The browser's route set starts with the WSS address (it sends to its WebSocket anyway).
    assert d_browser.route_set[0].startswith(f"<sip:{wss.wss_rr};"), d_browser.route_set
    if bye_from == "browser":
        browser.bye(d_browser)
        phone.take_bye()
        assert browser.expect(status=200).get("CSeq").endswith("BYE")
    else:
        phone.bye(d_phone)
        browser.take_bye()
        assert phone.expect(status=200).get("CSeq").endswith("BYE")


def test_browser_gone_fails_and_never_in_plaintext(wss: WssStack, uas) -> None:
    # From 127.0.0.3, where nothing else of the test binds: the trap below can have its port.
    browser = WsSipUA(uniq("gone"), domain="127.0.0.1", ws=wss.client(source="127.0.0.3"))
    caller = uas(uniq("caller"), "udp")
    assert browser.register().status == 200
    host, port = browser.local
    browser.close()
    wss.stack.events.wait_for(
        lambda e: e.type == "conn.closed" and e.conn.peer == f"{host}:{port}")
    trap = Trap(host, port)
    try:
        d = caller.invite(f"sip:{browser.user}@127.0.0.1:{wss.stack.sip_port}")
        final = caller.expect(status=480, timeout=5)
        assert final.get("Call-ID") == d.call_id
        trap.assert_untouched()
    finally:
        trap.close()


def tcp_connects(stack: Stack) -> dict[str, int]:
    """Kamailio's own outgoing TCP connects (kex statistics): any, successful or not, would be
    a plaintext connection attempt (every hairpin is the daemon's)."""
    assert stack.kamailio is not None
    out = stack.kamailio.kamcmd("stats.get_statistics", "tcp:")
    found = dict(re.findall(r"tcp:(connect_(?:success|failed)) = (\d+)", out))
    assert len(found) == 2, out
    return {k: int(v) for k, v in found.items()}


class Trap:
    """A plaintext TCP listener on a gone browser's address: Kamailio must never connect."""

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        for _ in range(100):  # until the old connection has left FIN_WAIT
            try:
                self.sock.bind((host, port))
                break
            except OSError:
                time.sleep(0.1)
        else:
            self.sock.close()
            pytest.fail(f"could not bind the trap on {host}:{port}: the test would prove nothing")
        self.sock.listen(8)
        self.sock.settimeout(0.5)

    def assert_untouched(self) -> None:
        with pytest.raises(TimeoutError):
            self.sock.accept()

    def close(self) -> None:
        self.sock.close()


def test_gone_browser_mid_call_requests_and_replies_fail(wss: WssStack, uas) -> None:
    """In a dialog: the phone's BYE to a browser whose WebSocket is gone gets 480 at once;
    the phone's answer to a browser that left after inviting is not delivered; never is
    anything sent to the browser's address in plaintext."""
    browser = WsSipUA(uniq("midcall"), domain="127.0.0.1", ws=wss.client(source="127.0.0.3"))
    phone = uas(uniq("phone"), "udp")
    assert browser.register().status == 200
    d_phone = phone.invite(f"sip:{browser.user}@127.0.0.1:{wss.stack.sip_port}")
    browser.answer()
    phone.wait_answer(d_phone)
    browser.expect(method="ACK")
    host, port = browser.local
    browser.close()
    wss.stack.events.wait_for(
        lambda e: e.type == "conn.closed" and e.conn.peer == f"{host}:{port}")
    trap = Trap(host, port)
    connects = tcp_connects(wss.stack)
    try:
        started = time.monotonic()
        phone.bye(d_phone)
        assert phone.expect(status=480, timeout=5).get("CSeq").endswith("BYE")
        assert time.monotonic() - started < 2.0
        trap.assert_untouched()
    finally:
        trap.close()

    # A browser that invites and leaves: the phone's answer has nowhere to go.
    browser = WsSipUA(uniq("leaver"), domain="127.0.0.1", ws=wss.client(source="127.0.0.3"))
    callee = uas(uniq("callee"), "udp")
    assert callee.register().status == 200
    browser.invite(f"sip:{callee.user}@127.0.0.1")
    inv, tag = callee.ring()
    host, port = browser.local
    browser.close()
    wss.stack.events.wait_for(
        lambda e: e.type == "conn.closed" and e.conn.peer == f"{host}:{port}")
    trap = Trap(host, port)
    try:
        callee.reply(inv, 200, "OK", to_tag=tag, body=inv.body)
        trap.assert_untouched()
        time.sleep(0.5)
        trap.assert_untouched()
    finally:
        trap.close()
    assert tcp_connects(wss.stack) == connects
    # Kamailio goes on serving.
    assert uas(uniq("after"), "udp").register().status == 200
