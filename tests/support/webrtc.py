"""WebRTC-style SDP for the SIP phones of browser tests.

Browsers refuse plain `RTP/AVP` offers and answers: a phone that talks to one must offer (and
answer) `UDP/TLS/RTP/SAVPF` with ICE credentials, a DTLS fingerprint, `a=setup`, `a=mid` and
`rtcp-mux`. No media flows (the ICE candidates lead nowhere); signalling completes, which is
what the tests are about. Real deployments put a media relay (rtpengine) in between.
"""

from __future__ import annotations

import os
import re
import secrets


def _fingerprint() -> str:
    return ":".join(f"{b:02X}" for b in os.urandom(32))


def _session(setup: str, mids: list[str], media: list[tuple[str, str, str]]) -> bytes:
    ufrag, pwd = secrets.token_hex(4), secrets.token_hex(12)
    lines = ["v=0", f"o=- {secrets.randbelow(10**9)} 1 IN IP4 127.0.0.1", "s=-", "t=0 0",
             f"a=group:BUNDLE {' '.join(mids)}", "a=msid-semantic: WMS",
             f"a=fingerprint:sha-256 {_fingerprint()}"]
    for mid, kind, pt in media:
        lines += [f"m={kind} 9 UDP/TLS/RTP/SAVPF {pt}", "c=IN IP4 127.0.0.1",
                  "a=rtcp:9 IN IP4 0.0.0.0", f"a=ice-ufrag:{ufrag}", f"a=ice-pwd:{pwd}",
                  f"a=setup:{setup}", f"a=mid:{mid}", "a=sendrecv", "a=rtcp-mux",
                  f"a=rtpmap:{pt} opus/48000/2"]
    return ("\r\n".join(lines) + "\r\n").encode()


def webrtc_offer() -> bytes:
    """An audio offer a browser accepts (opus, payload type 111)."""
    return _session("actpass", ["0"], [("0", "audio", "111")])


def webrtc_answer(offer: bytes) -> bytes:
    """An answer to a browser's offer: the same m-lines and mids, opus, `a=setup:active`.
    Given anything else (an empty offer: we are the caller), a WebRTC offer."""
    text = offer.decode(errors="replace")
    if "UDP/TLS/RTP/SAVPF" not in text:
        return webrtc_offer()
    media = []
    for block in re.split(r"\r?\n(?=m=)", text)[1:]:
        kind = block.split(" ", 1)[0][2:]
        mid = re.search(r"a=mid:(\S+)", block)
        opus = re.search(r"a=rtpmap:(\d+) opus/48000", block)
        media.append((mid.group(1) if mid else str(len(media)), kind,
                      opus.group(1) if opus else block.split()[3]))
    return _session("active", [m[0] for m in media], media)
