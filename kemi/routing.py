"""Transport decisions: TLS targets go over the bridge, Record-Route names the right addresses.

Kamailio only sees TCP hairpins, so a target that says TLS (`sips:` or `;transport=tls`) would
make it look for a TLS socket it does not have, or (with a TCP URI) open a plaintext connection
to the peer. Every TLS target is therefore rewritten to the peer's declared address over TCP,
which Kamailio's alias of that hairpin matches, always with `set_forward_no_connect()`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tlsbridge.kemi.uri import SipUri, parse_uri

if TYPE_CHECKING:
    from tlsbridge.kemi.bridge import BridgeConnection

# Marks a destination this module rewrote (dst URI parameters never reach the wire).
MARK = "tlsb"
RR_XAVP = "$xavp(tlsb=>rr)"


def _ksr() -> Any:
    import KSR

    return KSR


class RoutingMixin:
    """The transport half of `TlsBridge` (see its docstring for how a script uses it)."""

    tls_public: dict[str, str]
    sip_address: str | None
    received_avp: str

    def from_bridge(self) -> bool: ...  # provided by TlsBridge
    def connection(self) -> BridgeConnection | None: ...  # provided by TlsBridge

    # -- request route ----------------------------------------------------------------------

    def prepare_register(self) -> None:
        """Before `registrar.save()`: a REGISTER from the bridge is reached back over its
        hairpin, whatever its Contact says (needs registrar's `received_avp` modparam)."""
        if not self.from_bridge():
            return
        pv = _ksr().pv
        peer = _hostport(str(pv.get("$si")), int(pv.get("$sp")))
        pv.sets(self.received_avp, f"sip:{peer};transport=tls")

    def record_route(self) -> None:
        """Instead of `rr.record_route()` for initial requests: the Record-Route is written per
        branch by `prepare_branch()`, with the address each side can reach."""
        _ksr().pv.sets(RR_XAVP, "1")

    def prepare_relay(self) -> bool:
        """Before `t_relay()` (and in the branch route): True if the target is TLS and the
        request now goes over the bridge. Idempotent."""
        uri = self._target()
        if uri is None:
            return False
        if MARK in uri.params:
            return True
        if not uri.is_tls:
            return False
        KSR = _ksr()
        KSR.setdsturi(f"sip:{uri.hostport};transport=tcp;{MARK}")
        # Without this Kamailio would open a plaintext TCP connection to the TLS peer.
        KSR.set_forward_no_connect()
        return True

    # -- branch route -----------------------------------------------------------------------

    def prepare_branch(self) -> int:
        """Call from the branch route (`KSR.tm.t_on_branch`): decides this branch's transport
        and writes its Record-Route when `record_route()` asked for one."""
        tls_out = self.prepare_relay()
        if _ksr().pv.get(RR_XAVP):
            self._record_route_branch(tls_out)
        return 1

    def _record_route_branch(self, tls_out: bool) -> None:
        # Written as a header of this branch: the rr module allows one Record-Route per
        # message, so a second branch with another transport could not get its own.
        found = self.connection()
        inside = self._tls_address(found) if found else self._sip_in()
        outside = self._tls_address(None) if tls_out else (self._sip_out() or inside)
        if outside is None or inside is None:
            _ksr().err("tlsbridge: no address for Record-Route across transports: "
                       "set [kamailio] sip_address in tlsbridge.toml\n")
            return
        # The top Record-Route is the side the request goes to.
        hops = [outside] if outside == inside else [outside, inside]
        _ksr().hdr.insert(record_route_headers(hops, _ksr().pv.get("$ft")))

    def _target(self) -> SipUri | None:
        pv = _ksr().pv
        target = pv.get("$du") or pv.get("$ru")
        if not target:
            return None
        try:
            return parse_uri(str(target))
        except ValueError:
            return None

    def _tls_address(self, found: BridgeConnection | None) -> str | None:
        public = None
        if found is not None and found.conn.listener:
            public = self.tls_public.get(found.conn.listener)
        if public is None and self.tls_public:
            public = next(iter(self.tls_public.values()))
        return f"{public};transport=tls" if public else None

    def _sip_in(self) -> str:
        pv = _ksr().pv
        addr = _hostport(str(pv.get("$Ri")), int(pv.get("$Rp")))
        proto = str(pv.get("$pr") or "udp").lower()
        return addr if proto == "udp" else f"{addr};transport={proto}"

    def _sip_out(self) -> str | None:
        if self.sip_address is None:
            return None
        uri = self._target()
        transport = uri.transport if uri else "udp"
        if transport == "udp":
            return self.sip_address
        return f"{self.sip_address};transport={transport}"


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"


def record_route_headers(hops: list[str], from_tag: str | None) -> str:
    """Record-Route header lines, top first; `r2=on` marks the double Record-Route."""
    params = ";lr" + (";r2=on" if len(hops) > 1 else "") + (f";ftag={from_tag}" if from_tag else "")
    return "".join(f"Record-Route: <sip:{hop}{params}>\r\n" for hop in hops)
