"""SIP across TLS and UDP through the real Kamailio and daemon with the reference routing.py:
registrations, whole dialogs both ways, forking, and never a plaintext connection to a TLS peer."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Stack
from tests.support.sip import TlsUA, UdpUA
from tests.support.ua import Dialog, SipUA

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("logs_on_failure")]


@pytest.fixture
def ua_factory(stack: Stack) -> Iterator:
    made: list[SipUA] = []
    proxy = ("127.0.0.1", stack.sip_port)

    def make(user: str, proto: str) -> SipUA:
        if proto == "tls":
            ua = SipUA(user, domain="localhost", proxy=stack.tls_addr,
                       tls=TlsUA(*stack.tls_addr, ca=stack.ca))
        else:
            ua = SipUA(user, domain="localhost", proxy=proxy, udp=UdpUA())
        made.append(ua)
        return ua

    yield make
    for ua in made:
        ua.close()


def uniq(name: str) -> str:
    return f"{name}{time.monotonic_ns() % 10**9}"


def call(caller: SipUA, callee: SipUA, target: str) -> tuple[Dialog, Dialog, dict]:
    """INVITE, 180, 200, ACK: both sides see the whole dialog set-up."""
    d_caller = caller.invite(target)
    d_callee, invite = callee.answer()
    ok = caller.wait_answer(d_caller)
    assert [m.status for m in d_caller.seen][-2:] == [180, 200]
    ack = callee.expect(method="ACK")
    assert ack.get("Call-ID") == d_caller.call_id
    return d_caller, d_callee, {"invite": invite, "ok": ok}


def hang_up(by: SipUA, d_by: Dialog, other: SipUA) -> None:
    """BYE from `by`, answered by `other`, and the 200 back to `by`."""
    by.bye(d_by)
    bye = other.take_bye()
    assert bye.get("Call-ID") == d_by.call_id
    assert by.expect(status=200).get("CSeq").endswith("BYE")


def tls_rr(stack: Stack) -> str:
    return f"127.0.0.1:{stack.tls_port};transport=tls"


def assert_rr(values: list[str], first: str, second: str | None) -> None:
    rr = [v.strip() for h in values for v in h.split(",")]
    assert rr, "no Record-Route"
    assert f"sip:{first};" in rr[0] or rr[0].startswith(f"<sip:{first};lr"), rr
    if second is None:
        assert len(rr) == 1, rr
    else:
        assert len(rr) == 2 and f"sip:{second};" in rr[1], rr


@pytest.mark.parametrize("bye_from", ["callee", "caller"])
def test_udp_calls_registered_tls_ua(stack: Stack, ua_factory, bye_from: str) -> None:
    alice = ua_factory(uniq("alice"), "tls")
    bob = ua_factory(uniq("bob"), "udp")
    assert alice.register().status == 200
    d_bob, d_alice, msgs = call(bob, alice, f"sip:{alice.user}@127.0.0.1:{stack.sip_port}")
    # The TLS callee sees the public TLS address on top, the UDP caller's side below it.
    assert msgs["invite"].first_line.startswith(f"INVITE {alice.contact} ")
    # Our Via names the public TLS address, as tls.so's would; never the hairpin listener.
    assert msgs["invite"].get("Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{stack.tls_port};")
    assert_rr(msgs["invite"].get_all("Record-Route"), tls_rr(stack),
              f"127.0.0.1:{stack.sip_port}")
    if bye_from == "callee":
        hang_up(alice, d_alice, bob)
    else:
        hang_up(bob, d_bob, alice)


@pytest.mark.parametrize("bye_from", ["callee", "caller"])
def test_tls_calls_registered_udp_ua(stack: Stack, ua_factory, bye_from: str) -> None:
    carol = ua_factory(uniq("carol"), "udp")
    dave = ua_factory(uniq("dave"), "tls")
    assert carol.register().status == 200
    d_dave, d_carol, msgs = call(dave, carol, f"sip:{carol.user}@127.0.0.1:{stack.tls_port}")
    # UDP callee: Kamailio's UDP address on top; the TLS caller learns the public TLS one.
    assert_rr(msgs["invite"].get_all("Record-Route"), f"127.0.0.1:{stack.sip_port}",
              tls_rr(stack))
    rr_seen_by_tls = list(reversed(d_dave.route_set))
    assert tls_rr(stack) in rr_seen_by_tls[1]
    # The TLS UA's own Via is kept in what it receives.
    assert msgs["ok"].get("Via").startswith(f"SIP/2.0/TLS {dave.local[0]}:{dave.local[1]}")
    if bye_from == "callee":
        hang_up(carol, d_carol, dave)
    else:
        hang_up(dave, d_dave, carol)


def test_two_tls_uas_call_each_other(stack: Stack, ua_factory) -> None:
    erin = ua_factory(uniq("erin"), "tls")
    frank = ua_factory(uniq("frank"), "tls")
    assert erin.register().status == 200
    assert frank.register().status == 200
    for caller, callee in ((erin, frank), (frank, erin)):
        _d_caller, d_callee, msgs = call(caller, callee,
                                        f"sip:{callee.user}@127.0.0.1:{stack.tls_port}")
        # Between two TLS peers on one listener: one Record-Route, the public TLS address.
        assert_rr(msgs["invite"].get_all("Record-Route"), tls_rr(stack), None)
        hang_up(callee, d_callee, caller)


def test_forking_to_tls_and_udp_contacts(stack: Stack, ua_factory) -> None:
    user = uniq("gina")
    on_tls = ua_factory(user, "tls")
    on_udp = ua_factory(user, "udp")
    caller = ua_factory(uniq("hank"), "udp")
    assert on_tls.register().status == 200
    assert on_udp.register().status == 200
    d_caller = caller.invite(f"sip:{user}@127.0.0.1:{stack.sip_port}")
    inv_tls, _ = on_tls.ring()
    inv_udp, _ = on_udp.ring()
    # Both 180s are relayed before anyone answers. tm cancels only a branch that has sent a
    # provisional reply, and Kamailio 5.6 sends no CANCEL to a TCP branch whose 180 arrives
    # after the 200 (seen under load: the TLS UA's 180 lost the race to the UDP UA's 200).
    caller.expect(status=180)
    caller.expect(status=180)
    # Each branch has its own transport decision and Record-Route.
    assert_rr(inv_tls.get_all("Record-Route"), tls_rr(stack), f"127.0.0.1:{stack.sip_port}")
    assert_rr(inv_udp.get_all("Record-Route"), f"127.0.0.1:{stack.sip_port}", None)
    # The TLS branch's Via names the public TLS address; the UDP branch keeps Kamailio's own.
    assert inv_tls.get("Via").startswith(f"SIP/2.0/TCP 127.0.0.1:{stack.tls_port};")
    assert inv_udp.get("Via").startswith(f"SIP/2.0/UDP 127.0.0.1:{stack.sip_port};")
    # The UDP contact answers; the TLS one is cancelled.
    d_udp = _answer_ringing(on_udp, inv_udp)
    caller.wait_answer(d_caller)
    on_udp.expect(method="ACK")
    cancel = on_tls.expect(method="CANCEL")
    on_tls.reply(cancel, 200, "OK")
    on_tls.reply(inv_tls, 487, "Request Terminated", to_tag="x")
    on_tls.expect(method="ACK")  # tm acknowledges the 487 hop by hop
    hang_up(caller, d_caller, on_udp)
    del d_udp


def _answer_ringing(ua: SipUA, inv) -> Dialog:
    tag = "ans" + str(time.monotonic_ns())[-6:]
    from tests.support.ua import SDP

    ua.reply(inv, 200, "OK", to_tag=tag, body=SDP)
    return Dialog(call_id=inv.get("Call-ID"), local_uri="", local_tag=tag, remote_uri="",
                  remote_tag="", remote_target="", route_set=[])


def test_tls_ua_gone_fails_cleanly_and_never_in_plaintext(stack: Stack, ua_factory) -> None:
    # From 127.0.0.2: on 127.0.0.1 a hairpin of the daemon may hold the UA's old port by the
    # time the trap below wants it (it once did, for all of the trap's 10 s).
    ivan = SipUA(uniq("ivan"), domain="localhost", proxy=stack.tls_addr,
                 tls=TlsUA(*stack.tls_addr, ca=stack.ca, source="127.0.0.2"))
    caller = ua_factory(uniq("judy"), "udp")
    assert ivan.register().status == 200
    host, port = ivan.local
    ivan.tls.sock.unwrap().close()  # a clean close: close_notify, then FIN
    stack.events.wait_for(lambda e: e.type == "conn.closed" and e.conn.peer == f"{host}:{port}")
    # A plaintext listener on the TLS UA's address: Kamailio must never connect to it.
    trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    for _ in range(100):  # until the old connection has left FIN_WAIT
        try:
            trap.bind((host, port))
            break
        except OSError:
            time.sleep(0.1)
    else:
        trap.close()
        pytest.fail(f"could not bind the trap on {host}:{port}: the test would prove nothing")
    trap.listen(8)
    trap.settimeout(0.5)
    try:
        d = caller.invite(f"sip:{ivan.user}@127.0.0.1:{stack.sip_port}")
        final = caller.expect(status=477, timeout=5)
        assert final.get("Call-ID") == d.call_id
        with pytest.raises(TimeoutError):
            trap.accept()
    finally:
        trap.close()
        ivan.close()


def test_sips_and_transport_tls_are_preserved(stack: Stack, ua_factory) -> None:
    kate = ua_factory(uniq("kate"), "tls")
    host, port = kate.local
    # A UA registering a sips: contact.
    kate_contact = f"sips:{kate.user}@{host}:{port}"
    kate.send(kate.build(f"REGISTER sip:{kate.domain} SIP/2.0", [
        f"Via: {kate.via()}", "Max-Forwards: 70", f"From: <{kate.aor}>;tag=k1",
        f"To: <{kate.aor}>", "Call-ID: sips-reg-1", "CSeq: 1 REGISTER",
        f"Contact: <{kate_contact}>", "Expires: 300",
    ]))
    assert kate.expect(status=200).status == 200
    leo = ua_factory(uniq("leo"), "tls")
    d_leo = leo.invite(f"sips:{kate.user}@127.0.0.1:{stack.tls_port}")
    _d_kate, inv = kate.answer()
    assert inv.first_line == f"INVITE {kate_contact} SIP/2.0"
    ok = leo.wait_answer(d_leo)
    assert ok.get("Via").startswith("SIP/2.0/TLS ")
    kate.expect(method="ACK")
    hang_up(leo, d_leo, kate)
