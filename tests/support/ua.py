"""SIP user agents for dialog tests: register, call, answer, ACK, BYE, over TLS or UDP."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.support.sip import SipMessage, TlsUA, UdpUA

SDP = (
    b"v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n"
    b"m=audio 40000 RTP/AVP 0\r\n"
)


def _tag() -> str:
    return uuid.uuid4().hex[:10]


def _branch() -> str:
    return "z9hG4bK-" + uuid.uuid4().hex[:16]


@dataclass
class Dialog:
    call_id: str
    local_uri: str
    local_tag: str
    remote_uri: str
    remote_tag: str
    remote_target: str
    route_set: list[str]
    cseq: int = 1
    invite_cseq: int = 1
    invite_via: str = ""
    seen: list[SipMessage] = field(default_factory=list)


class SipUA:
    """One UA. TLS: one connection to the bridge. UDP: a socket, requests sent to the proxy."""

    def __init__(self, user: str, *, domain: str, proxy: tuple[str, int],
                 tls: TlsUA | None = None, udp: UdpUA | None = None) -> None:
        assert (tls is None) != (udp is None)
        self.user, self.domain, self.proxy = user, domain, proxy
        self.tls, self.udp = tls, udp
        self.proto = "TLS" if tls else "UDP"
        self.pending: list[SipMessage] = []
        # The body of our offers and answers; a callable makes the answer from the offer
        # (browsers need a WebRTC answer to their own offer: tests/support/webrtc.py).
        self.sdp: bytes | Callable[[bytes], bytes] = SDP

    @property
    def local(self) -> tuple[str, int]:
        return (self.tls or self.udp).local  # type: ignore[union-attr]

    @property
    def aor(self) -> str:
        return f"sip:{self.user}@{self.domain}"

    @property
    def contact(self) -> str:
        host, port = self.local
        suffix = ";transport=tls" if self.tls else ""
        return f"sip:{self.user}@{host}:{port}{suffix}"

    def via(self, branch: str | None = None) -> str:
        host, port = self.local
        return f"SIP/2.0/{self.proto} {host}:{port};branch={branch or _branch()};rport"

    def _sdp(self, offer: bytes) -> bytes:
        return self.sdp(offer) if callable(self.sdp) else self.sdp

    # -- wire -------------------------------------------------------------------------------

    def send(self, text: str, body: bytes = b"") -> None:
        data = text.encode() + body
        if self.tls:
            self.tls.send(data)
        else:
            self.udp.send(data, self.proxy)  # type: ignore[union-attr]

    def read(self, timeout: float = 5.0) -> SipMessage:
        if self.pending:
            return self.pending.pop(0)
        return self.tls.read(timeout) if self.tls else self.udp.read(timeout)  # type: ignore[union-attr]

    def expect(self, *, method: str | None = None, status: int | None = None,
               timeout: float = 5.0) -> SipMessage:
        """The next message matching; requests of other methods are kept for later."""
        skipped = []
        try:
            while True:
                msg = self.read(timeout)
                if method and not msg.is_reply and msg.method == method:
                    return msg
                if status is not None and msg.is_reply and msg.status == status:
                    return msg
                if msg.is_reply and status is not None and msg.status < 200 and status >= 200:
                    continue  # provisional on the way to the final one
                if msg.is_reply and msg.status >= 200 and status is not None:
                    raise AssertionError(f"expected {status}, got {msg.first_line}")
                skipped.append(msg)
        finally:
            self.pending[:0] = skipped

    @staticmethod
    def build(first: str, headers: list[str], body: bytes = b"") -> str:
        lines = [first, *headers, f"Content-Length: {len(body)}"]
        if body:
            lines.insert(-1, "Content-Type: application/sdp")
        return "\r\n".join(lines) + "\r\n\r\n"

    # -- requests ---------------------------------------------------------------------------

    def register(self, expires: int = 300) -> SipMessage:
        call_id = uuid.uuid4().hex
        self.send(self.build(f"REGISTER sip:{self.domain} SIP/2.0", [
            f"Via: {self.via()}", "Max-Forwards: 70",
            f"From: <{self.aor}>;tag={_tag()}", f"To: <{self.aor}>", f"Call-ID: {call_id}",
            "CSeq: 1 REGISTER", f"Contact: <{self.contact}>", f"Expires: {expires}",
        ]))
        return self.expect(status=200)

    def invite(self, target: str) -> Dialog:
        d = Dialog(call_id=uuid.uuid4().hex, local_uri=self.aor, local_tag=_tag(),
                   remote_uri=target, remote_tag="", remote_target=target, route_set=[])
        d.invite_via = self.via()
        self.send(self.build(f"INVITE {target} SIP/2.0", [
            f"Via: {d.invite_via}", "Max-Forwards: 70",
            f"From: <{d.local_uri}>;tag={d.local_tag}", f"To: <{target}>",
            f"Call-ID: {d.call_id}", "CSeq: 1 INVITE", f"Contact: <{self.contact}>",
        ], self._sdp(b"")), self._sdp(b""))
        return d

    def wait_answer(self, d: Dialog, timeout: float = 5.0) -> SipMessage:
        """Collect provisionals until the 200; learn the dialog from it; send the ACK."""
        while True:
            msg = self.read(timeout)
            if not msg.is_reply:
                self.pending.append(msg)
                continue
            d.seen.append(msg)
            if msg.status >= 200:
                break
        assert msg.status == 200, msg.first_line
        d.remote_tag = _param(msg.get("To"), "tag")
        d.remote_target = _uri(msg.get("Contact"))
        d.route_set = list(reversed(_split_rr(msg.get_all("Record-Route"))))
        self.ack(d)
        return msg

    def ack(self, d: Dialog) -> None:
        self.send(self.build(f"ACK {d.remote_target} SIP/2.0", [
            f"Via: {self.via()}", "Max-Forwards: 70", *self._routes(d),
            f"From: <{d.local_uri}>;tag={d.local_tag}",
            f"To: <{d.remote_uri}>;tag={d.remote_tag}", f"Call-ID: {d.call_id}",
            f"CSeq: {d.invite_cseq} ACK",
        ]))

    def bye(self, d: Dialog) -> None:
        """Send a BYE in the dialog; the caller reads its 200 once the other side answered."""
        d.cseq += 1
        self.send(self.build(f"BYE {d.remote_target} SIP/2.0", [
            f"Via: {self.via()}", "Max-Forwards: 70", *self._routes(d),
            f"From: <{d.local_uri}>;tag={d.local_tag}",
            f"To: <{d.remote_uri}>;tag={d.remote_tag}", f"Call-ID: {d.call_id}",
            f"CSeq: {d.cseq} BYE",
        ]))

    def _routes(self, d: Dialog) -> list[str]:
        return [f"Route: {r}" for r in d.route_set]

    # -- answering --------------------------------------------------------------------------

    def reply(self, req: SipMessage, code: int, reason: str, *, to_tag: str | None = None,
              body: bytes = b"") -> None:
        to = req.get("To")
        if to_tag and "tag=" not in to:
            to = f"{to};tag={to_tag}"
        headers = [f"Via: {v}" for v in req.get_all("Via")]
        headers += [f"Record-Route: {r}" for r in req.get_all("Record-Route")]
        headers += [f"From: {req.get('From')}", f"To: {to}", f"Call-ID: {req.get('Call-ID')}",
                    f"CSeq: {req.get('CSeq')}"]
        if code < 300 and req.method == "INVITE":
            headers.append(f"Contact: <{self.contact}>")
        self.send(self.build(f"SIP/2.0 {code} {reason}", headers, body), body)

    def answer(self, timeout: float = 5.0) -> tuple[Dialog, SipMessage]:
        """Take an INVITE: 180, then 200; return the dialog (UAS side) and the INVITE."""
        inv = self.expect(method="INVITE", timeout=timeout)
        tag = _tag()
        self.reply(inv, 180, "Ringing", to_tag=tag)
        # Kamailio's UDP workers relay replies in parallel: a 200 sent at once could overtake
        # the 180, which tm then rightly drops.
        time.sleep(0.05)
        self.reply(inv, 200, "OK", to_tag=tag, body=self._sdp(inv.body))
        d = Dialog(call_id=inv.get("Call-ID"), local_uri=_uri(inv.get("To")), local_tag=tag,
                   remote_uri=_uri(inv.get("From")), remote_tag=_param(inv.get("From"), "tag"),
                   remote_target=_uri(inv.get("Contact")),
                   route_set=_split_rr(inv.get_all("Record-Route")),
                   cseq=100)
        return d, inv

    def ring(self, timeout: float = 5.0) -> tuple[SipMessage, str]:
        """Take an INVITE and answer 180 only; returns it and our To tag."""
        inv = self.expect(method="INVITE", timeout=timeout)
        tag = _tag()
        self.reply(inv, 180, "Ringing", to_tag=tag)
        return inv, tag

    def take_bye(self, timeout: float = 5.0) -> SipMessage:
        bye = self.expect(method="BYE", timeout=timeout)
        self.reply(bye, 200, "OK")
        return bye

    def close(self) -> None:
        (self.tls or self.udp).close()  # type: ignore[union-attr]


def _uri(value: str) -> str:
    if "<" in value:
        return value[value.index("<") + 1 : value.index(">")]
    return value.split(";")[0].strip()


def _param(value: str, name: str) -> str:
    for part in value.split(";")[1:]:
        key, _, val = part.partition("=")
        if key.strip().lower() == name:
            return val.strip()
    return ""


def _split_rr(values: list[str]) -> list[str]:
    out = []
    for value in values:
        out += [v.strip() for v in value.split(",") if v.strip()]
    return out
