"""A browser phone (SIP.js in headless Chromium) registers over WSS through the bridge, is called
by a UDP phone and answers, calls a UDP and a TLS phone, hangs up and is hung up on, and a call
to it after its tab closed fails at once, never in plaintext."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.browser.conftest import Tab, WebPhone
from tests.integration.test_websocket import WssStack, rr_of, tcp_connects
from tests.support.sip import TlsUA, UdpUA
from tests.support.ua import SipUA
from tests.support.webrtc import webrtc_answer, webrtc_offer

pytestmark = [pytest.mark.integration, pytest.mark.browser]


def uniq(name: str) -> str:
    return f"{name}{time.monotonic_ns() % 10**9}"


@pytest.fixture
def phones(wss: WssStack, chrome, webphone: WebPhone,  # type: ignore[no-untyped-def]
           request: pytest.FixtureRequest) -> Iterator:
    """Makes browser tabs and SIP phones (WebRTC SDP); closes all and prints logs on failure."""
    tabs: list[Tab] = []
    uas: list[SipUA] = []
    stack = wss.stack

    def browser(user: str) -> Tab:
        tab = Tab(chrome, f"{webphone.url}?server=wss://127.0.0.1:{wss.wss_port}/")
        tabs.append(tab)
        tab.run(f"window.phone.register('wss://127.0.0.1:{wss.wss_port}/',"
                f" 'sip:{user}@127.0.0.1')")
        tab.wait_event("registration Registered")
        return tab

    def phone(user: str, proto: str) -> SipUA:
        if proto == "tls":
            ua = SipUA(user, domain="localhost", proxy=stack.tls_addr,
                       tls=TlsUA(*stack.tls_addr, ca=stack.ca))
        else:
            ua = SipUA(user, domain="localhost", proxy=("127.0.0.1", stack.sip_port),
                       udp=UdpUA())
        ua.sdp = webrtc_answer  # an offer when calling, an answer to a browser's offer
        uas.append(ua)
        return ua

    yield browser, phone
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for tab in tabs:
            if tab.handle in chrome.window_handles:  # a test may have closed it
                print(f"--- page log ---\n{tab.events()}")
        for proc in (stack.daemon, stack.kamailio):
            if proc is not None:
                print(f"--- {proc.name} log ---\n{proc.tail(60)}")
    for tab in tabs:
        if tab.handle in chrome.window_handles:
            tab.close()
    for ua in uas:
        ua.close()


def test_browser_registers_over_wss(wss: WssStack, phones) -> None:
    browser, _ = phones
    listener = f"127.0.0.1:{wss.wss_port}"

    def on_wss() -> list:
        return [e for e in wss.stack.events.of("tls.established") if e.conn.listener == listener]

    before = len(on_wss())
    browser(uniq("reg"))
    # The daemon saw one more TLS connection on the WSS listener, as for any TLS peer.
    wss.stack.events.wait_for(lambda e: len(on_wss()) > before)
    assert on_wss()[-1].fields["tls"]["version"] in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("bye_from", ["browser", "phone"])
def test_udp_phone_calls_browser_and_it_answers(wss: WssStack, phones, bye_from: str) -> None:
    browser, phone = phones
    user = uniq("web")
    tab = browser(user)
    caller = phone(uniq("udp"), "udp")
    caller.sdp = webrtc_offer()
    d = caller.invite(f"sip:{user}@127.0.0.1:{wss.stack.sip_port}")
    tab.wait_event(f"incoming sip:{caller.user}@localhost")
    tab.run("window.phone.answer()")
    ok = caller.wait_answer(d)
    assert b"UDP/TLS/RTP/SAVPF" in ok.body  # the browser's own answer
    tab.wait_event("in Established")
    # The browser saw the public WSS address on top of the Record-Route, not the hairpin.
    rr = rr_of(tab.driver.execute_script("return window.phone.lastRecordRoute"))
    assert rr[0].startswith(f"<sip:{wss.wss_rr};lr;r2=on"), rr
    if bye_from == "browser":
        tab.run("window.phone.hangup()")
        bye = caller.take_bye()
        assert bye.get("Call-ID") == d.call_id
        tab.wait_event("in Terminated")
    else:
        caller.bye(d)
        tab.wait_event("in Terminated")
        assert caller.expect(status=200).get("CSeq").endswith("BYE")


@pytest.mark.parametrize(("proto", "bye_from"), [("udp", "browser"), ("tls", "phone"),
                                                 ("tls", "browser")])
def test_browser_calls_phone(wss: WssStack, phones, proto: str, bye_from: str) -> None:
    browser, phone = phones
    tab = browser(uniq("web"))
    callee = phone(uniq(proto), proto)
    assert callee.register().status == 200
    tab.run(f"window.phone.call('sip:{callee.user}@127.0.0.1')")
    d, inv = callee.answer()
    assert b"UDP/TLS/RTP/SAVPF" in inv.body  # the browser's WebRTC offer
    # The phone sees its own side on top, the browser's public WSS address below.
    rr = rr_of(inv.get_all("Record-Route"))
    assert len(rr) == 2 and rr[1].startswith(f"<sip:{wss.wss_rr};"), rr
    callee.expect(method="ACK")
    tab.wait_event("out Established")
    if bye_from == "browser":
        tab.run("window.phone.hangup()")
        callee.take_bye()
        tab.wait_event("out Terminated")
    else:
        callee.bye(d)
        tab.wait_event("out Terminated")
        assert callee.expect(status=200).get("CSeq").endswith("BYE")


def test_call_after_tab_closed_fails_cleanly(wss: WssStack, phones) -> None:
    browser, phone = phones
    user = uniq("gone")
    tab = browser(user)
    est = [e for e in wss.stack.events.of("tls.established")
           if e.conn.listener == f"127.0.0.1:{wss.wss_port}"][-1]
    tab.close()
    wss.stack.events.wait_for(lambda e: e.type == "conn.closed" and e.conn.id == est.conn.id)
    # No plaintext trap on the browser's address here: Chromium's closed socket may hold that
    # port in TIME_WAIT (test_websocket.py has traps, from a source address of its own). Any
    # connect by Kamailio itself, to anywhere, would show in its TCP statistics instead.
    connects = tcp_connects(wss.stack)
    caller = phone(uniq("udp"), "udp")
    caller.sdp = webrtc_offer()
    started = time.monotonic()
    d = caller.invite(f"sip:{user}@127.0.0.1:{wss.stack.sip_port}")
    final = caller.expect(status=480, timeout=5)
    assert final.get("Call-ID") == d.call_id
    assert time.monotonic() - started < 2.0  # at once, not after a timer
    assert tcp_connects(wss.stack) == connects


def test_page_from_an_origin_not_allowed_is_refused(wss: WssStack, chrome,  # type: ignore[no-untyped-def]
                                                    foreign_webphone: WebPhone) -> None:
    tab = Tab(chrome, foreign_webphone.url)
    try:
        result = chrome.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"window.phone.register('wss://127.0.0.1:{wss.wss_port}/', 'sip:x@127.0.0.1')"
            ".then(() => done('ok'), (e) => done('error: ' + e));")
        # The upgrade is answered 403: the browser sees its WebSocket fail.
        assert str(result).startswith("error:") and "WebSocket" in str(result), result
        assert "registration Registered" not in tab.events()
    finally:
        tab.close()


def test_two_browsers_call_each_other(wss: WssStack, phones) -> None:
    browser, _ = phones
    alice_user, bob_user = uniq("alice"), uniq("bob")
    alice, bob = browser(alice_user), browser(bob_user)
    bob.run(f"window.phone.call('sip:{alice_user}@127.0.0.1')")
    alice.wait_event(f"incoming sip:{bob_user}@127.0.0.1")
    # Both on one WSS listener: one Record-Route, its public address.
    rr = rr_of(alice.driver.execute_script("return window.phone.lastRecordRoute"))
    assert len(rr) == 1 and rr[0].startswith(f"<sip:{wss.wss_rr};lr"), rr
    alice.run("window.phone.answer()")
    bob.wait_event("out Established")
    alice.wait_event("in Established")
    alice.run("window.phone.hangup()")
    bob.wait_event("out Terminated")
    alice.wait_event("in Terminated")


def test_browser_cancels_a_ringing_call(wss: WssStack, phones) -> None:
    browser, phone = phones
    tab = browser(uniq("web"))
    callee = phone(uniq("udp"), "udp")
    assert callee.register().status == 200
    tab.run(f"window.phone.call('sip:{callee.user}@127.0.0.1')")
    inv, tag = callee.ring()
    tab.wait_event("out Establishing")
    tab.run("window.phone.hangup()")  # CANCEL while it rings
    cancel = callee.expect(method="CANCEL")
    assert cancel.get("Call-ID") == inv.get("Call-ID")
    callee.reply(cancel, 200, "OK")
    callee.reply(inv, 487, "Request Terminated", to_tag=tag)
    callee.expect(method="ACK")  # tm acknowledges the 487 hop by hop
    tab.wait_event("out Terminated")
