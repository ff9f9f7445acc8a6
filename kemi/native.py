"""The bridge for Kamailio's native cfg routing: methods that `python_exec` calls.

Load it with `modparam("app_python3", "load", ".../tlsbridge_native.py")` and no `cfgengine`;
native routes then call `python_exec("tlsb_relay", "RELAY")` and the like. Each method returns
1 (true in the cfg) or -1 (false), never 0 (which would end the route).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from tlsbridge.kemi.bridge import BridgeConnection, TlsBridge
from tlsbridge.kemi.ksr import ksr as _ksr
from tlsbridge.shared.facts import CertInfo, DistinguishedName

XAVP = "tls"  # the facts as $xavp(tls=>version), $xavp(tls=>peer_subject_cn), ...

_DN_FIELDS = (("cn", "cn"), ("organization", "o"), ("unit", "ou"), ("country", "c"),
              ("state", "st"), ("locality", "l"), ("uid", "uid"), ("email", "email"))
_SAN_FIELDS = (("email", "san_email"), ("hostname", "san_dns"), ("uri", "san_uri"),
               ("ip", "san_ip"))


def _dn(prefix: str, dn: DistinguishedName) -> Iterator[tuple[str, str | int]]:
    yield prefix, dn.line
    for name, attr in _DN_FIELDS:
        value = getattr(dn, attr)
        if value is not None:
            yield f"{prefix}_{name}", value


def _cert(who: str, cert: CertInfo) -> Iterator[tuple[str, str | int]]:
    yield from _dn(f"{who}_subject", cert.subject)
    yield from _dn(f"{who}_issuer", cert.issuer)
    yield f"{who}_version", cert.version
    yield f"{who}_serial", cert.serial
    yield f"{who}_notBefore", cert.not_before
    yield f"{who}_notAfter", cert.not_after
    yield f"{who}_selfsigned", int(cert.self_signed)
    yield f"{who}_raw_cert", cert.pem
    yield f"{who}_fingerprint", cert.fingerprint_sha256
    for name, attr in _SAN_FIELDS:
        for value in getattr(cert, attr):
            yield f"{who}_san_{name}", value


def facts_vars(found: BridgeConnection) -> list[tuple[str, str | int]]:
    """The facts under the names of Kamailio's `$tls_*` variables, without `tls_`; a
    certificate's SANs repeat their name (`$xavp(tls=>peer_san_hostname[1])` is the second)."""
    t = found.tls
    out: list[tuple[str, str | int]] = [
        ("version", t.version), ("description", f"{t.version} {t.cipher}"),
        ("cipher_info", t.cipher), ("cipher_bits", t.cipher_bits),
        ("peer_server_name", t.sni or ""), ("alpn", t.alpn or ""), ("resumed", int(t.resumed)),
        ("peer_cert", int(t.peer_cert_present)), ("peer_verified", int(t.peer_verified)),
        ("peer_verify_error", t.verify_error or ""), ("engine", t.engine),
        ("conn_id", found.conn.id), ("conn_peer", found.conn.peer),
        ("conn_listener", found.conn.listener or ""), ("conn_direction", found.conn.direction),
    ]
    if t.peer is not None:
        out += _cert("peer", t.peer)
    if t.local is not None:
        out += _cert("my", t.local)
    return out


class NativeBridge:
    """What `mod_init()` returns to app_python3 for native routing (see docs/migration.md)."""

    def __init__(self, bridge: TlsBridge) -> None:
        self.bridge = bridge
        bridge.native_routes = True

    def child_init(self, rank: int) -> int:
        return self.bridge.child_init(rank)

    def tlsb_protect_replies(self, msg: Any, arg: str | None = None) -> int:
        """First in request_route: replies to a TLS peer go over its hairpin or nowhere."""
        self.bridge.protect_replies()
        return 1

    def tlsb_tls(self, msg: Any, arg: str | None = None) -> int:
        """The facts of the message's connection as $xavp(tls=>...); false when the message
        did not come through the bridge."""
        found = self.bridge.connection()
        if found is None:
            return -1
        pv = _ksr().pv
        pv.unset(f"$xavp({XAVP})")
        # `$xavp(tls=>x)` makes a new tls item each time; `tls[0]=>x` adds to the first one,
        # in front: set in reverse so that index 0 is a field's first value.
        root = f"$xavp({XAVP}=>"
        for name, value in reversed(facts_vars(found)):
            if isinstance(value, int):
                pv.seti(f"{root}{name})", value)
            else:
                pv.sets(f"{root}{name})", value)
            root = f"$xavp({XAVP}[0]=>"
        return 1

    def tlsb_register(self, msg: Any, arg: str | None = None) -> int:
        """Before save("location"): a phone registered over TLS is reached over its connection."""
        self.bridge.prepare_register()
        return 1

    def tlsb_record_route(self, msg: Any, arg: str | None = None) -> int:
        """Instead of record_route(): each branch writes the Record-Route its side can reach."""
        self.bridge.record_route()
        return 1

    def tlsb_trunk(self, msg: Any, arg: str | None = None) -> int:
        """Send to the [trunk.*] whose prefixes or domains match the R-URI; false if none."""
        trunk = self.bridge.find_trunk()
        if trunk is None:
            return -1
        self.bridge.route_to_trunk(trunk)
        return 1

    def tlsb_relay(self, msg: Any, arg: str | None = None) -> int:
        """Before t_relay(), with the name of the route to resume in: true to relay now;
        false when a reply was sent or the transaction waits for a TLS connect (then `exit`)."""
        rc = self.bridge.prepare_relay(resume_route=arg or None)
        return 1 if rc == self.bridge.RELAY else -1

    def tlsb_branch(self, msg: Any, arg: str | None = None) -> int:
        """In the branch route: this branch's transport and Record-Route."""
        self.bridge.prepare_branch()
        return 1

    def tlsb_ws_handshake(self, msg: Any, arg: str | None = None) -> int:
        """In event_route[xhttp:request]: a browser's WebSocket upgrade is accepted (through a
        WSS listener of the bridge, from an Origin it allows) or refused (403; 404 for plain
        HTTP). Follow it with `exit`."""
        self.bridge.ws_handshake()
        return 1

    def tlsb_websocket(self, msg: Any, arg: str | None = None) -> int:
        """True when the request or reply came from a browser over the bridge (Kamailio's
        $proto says "ws", never "wss": it sees no TLS)."""
        return 1 if self.bridge.from_websocket() else -1

    def tlsb_timer(self, msg: Any, arg: str | None = None) -> int:
        """The rtimer route: the daemon's events; then continue what `tlsb_next_resume`
        gives (see routing-native.cfg's route[TLSB_TIMER])."""
        self.bridge.drain_events()
        return 1

    def tlsb_next_resume(self, msg: Any, arg: str | None = None) -> int:
        """True with $var(tlsb_index), $var(tlsb_label), $var(tlsb_route) set: a transaction
        to t_continue() (its TLS connect is done); then python_exec("tlsb_resumed")."""
        job = self.bridge.next_resume()
        if job is None:
            return -1
        pv = _ksr().pv
        pv.seti("$var(tlsb_index)", job[0])
        pv.seti("$var(tlsb_label)", job[1])
        pv.sets("$var(tlsb_route)", job[2])
        return 1

    def tlsb_resumed(self, msg: Any, arg: str | None = None) -> int:
        """After t_continue(), with its result in $var(tlsb_rc)."""
        self.bridge.resumed(int(_ksr().pv.get("$var(tlsb_rc)") or -1))
        return 1


def mod_init(config: str | os.PathLike[str] | None = None) -> NativeBridge:
    """app_python3's entry point: reviews Kamailio's cfg (refusing to start on an error)."""
    bridge = TlsBridge(config)
    bridge.check_kamailio()
    return NativeBridge(bridge)
