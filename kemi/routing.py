"""Transport decisions: TLS targets go over the bridge, Record-Route names the right addresses.

Kamailio only sees TCP hairpins, so a target that says TLS (`sips:` or `;transport=tls`) would
make it look for a TLS socket it does not have, or (with a TCP URI) open a plaintext connection
to the peer. Every TLS target is therefore rewritten to the peer's declared address over TCP,
which Kamailio's alias of that hairpin matches, always with `set_forward_no_connect()`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING
from urllib.parse import quote

from tlsbridge.kemi.ksr import ksr as _ksr
from tlsbridge.kemi.uri import SipUri, parse_uri
from tlsbridge.shared import control as ctl
from tlsbridge.shared.addr import (
    TLS_DEFAULT_PORT,
    default_sni,
    format_addr,
    is_ip,
    is_plain_target,
    parse_addr,
    target_key,
)
from tlsbridge.shared.settings import Trunk

if TYPE_CHECKING:
    from tlsbridge.kemi.connection import BridgeConnection
    from tlsbridge.shared.client import ControlClient

# Marks a destination rewritten to a hairpin (`tlsb=ok`): dst URI parameters never reach the wire.
MARK = "tlsb"
RR_XAVP = "$xavp(tlsb=>rr)"
ADV_XAVP = "$xavp(tlsb_adv=>on)"  # a branch advertised the public TLS address
# Record-Route parameters naming the TLS connection in-dialog requests take: `tls-dn` towards
# the callee, `tls-up` towards the caller. With `ftag` they need nothing of rr's own direction
# (is_direction wants append_fromtag=1, which Debian's stock cfg leaves off).
PIN_DOWN, PIN_UP = "tls-dn", "tls-up"
_ROUTE = re.compile(r"<([^>]*)>")

# prepare_relay() results
RELAY, SUSPENDED, FAILED = 1, 0, -1


@dataclass(frozen=True, slots=True)
class Outcome:
    """What the daemon answered for a connect: the declared peer, or why not."""

    peer: str | None
    reason: str = ""



class RoutingMixin:
    """The transport half of `TlsBridge` (see its docstring for how a script uses it)."""

    tls_public: dict[str, str]
    hairpin: tuple[str, int]
    sip_address: str | None
    cluster: bool
    received_avp: str
    trunks: dict[str, Trunk]
    htable: str
    _outcomes: dict[tuple[int, int], Outcome]
    _in_branch = False  # prepare_branch() is running: no replies from here

    wss_public: dict[str, str]

    def from_bridge(self) -> bool: ...  # provided by TlsBridge
    if TYPE_CHECKING:  # WebSocketMixin's, later in TlsBridge's MRO: no stubs to shadow them
        def from_websocket(self) -> bool: ...
        def ws_address(self, listener: str | None = None) -> str | None: ...
    def connection(self) -> BridgeConnection | None: ...  # provided by TlsBridge
    @property
    def control(self) -> ControlClient: ...  # provided by TlsBridge

    # -- request route ----------------------------------------------------------------------

    def protect_replies(self) -> None:
        """First thing in the request route: replies to a request from the bridge go back
        over its hairpin or nowhere; with the hairpin gone Kamailio would otherwise connect to
        the TLS peer's address in plaintext to send them."""
        if self.from_bridge():
            _ksr().set_reply_no_connect()

    def prepare_register(self) -> None:
        """Before `registrar.save()`: a REGISTER from the bridge is reached back over its
        hairpin, whatever its Contact says (needs registrar's `received_avp` modparam). In a
        cluster every registration also gets a Path naming this node (see `_add_path`)."""
        KSR = _ksr()
        from_bridge = self.from_bridge()
        if not from_bridge and not self.cluster:
            return
        peer = _hostport(str(KSR.pv.get("$si")), int(KSR.pv.get("$sp")))
        if from_bridge:
            # A browser: Kamailio finds its WebSocket by this address (fix_nated_register).
            transport = "ws" if self.from_websocket() else "tls"
            received = f"sip:{peer};transport={transport}"
            KSR.pv.sets(self.received_avp, received)
        else:
            proto = str(KSR.pv.get("$pr") or "udp").lower()
            received = f"sip:{peer}" + ("" if proto == "udp" else f";transport={proto}")
        if self.cluster and self.sip_address:
            self._add_path(received)

    def _add_path(self, received: str) -> None:
        """The other nodes learn the registration from DMQ and must route its requests here,
        where the phone's connection (or NAT binding) is: registrar stores this Path with it
        (use_path); lookup() on this node skips it for the received address
        (path_check_local), on the others it sends to this node, which relays to `received`
        (path's use_received)."""
        KSR = _ksr()
        KSR.hdr.insert(f"Path: <sip:{self.sip_address};lr;received="
                       f"{quote(received, safe='')}>\r\n")
        KSR.textopsx.msg_apply_changes()  # save() reads the Path from the message

    def record_route(self) -> None:
        """Instead of `rr.record_route()` for initial requests: the Record-Route is written per
        branch by `prepare_branch()`, with the address each side can reach."""
        _ksr().pv.sets(RR_XAVP, "1")

    def find_trunk(self) -> Trunk | None:
        """The trunk whose `domains` hold the R-URI's domain or whose `prefixes` start its user
        (the longest prefix wins)."""
        pv = _ksr().pv
        domain = str(pv.get("$rd") or "").lower()
        user = str(pv.get("$rU") or "")
        for trunk in self.trunks.values():
            if domain in trunk.domains:
                return trunk
        best = max(((len(p), t) for t in self.trunks.values() for p in t.prefixes
                    if user.startswith(p)), default=None, key=lambda x: x[0])
        return best[1] if best else None

    def route_to_trunk(self, trunk: Trunk | str) -> None:
        """Send the request to a TLS trunk (the R-URI is kept); then `prepare_relay()`."""
        t = self.trunks[trunk] if isinstance(trunk, str) else trunk
        host = f"[{t.host}]" if ":" in t.host else t.host
        params = f";tlsb_profile={t.profile}" + (f";tlsb_sni={t.sni}" if t.sni else "")
        _ksr().setdsturi(f"sip:{host}:{t.port};transport=tls{params}")

    def prepare_relay(self, resume_route: str | None = None) -> int:
        """Before `t_relay()`: a TLS target goes over the bridge. Returns RELAY (go on and
        relay), SUSPENDED (the daemon is connecting; the transaction continues in
        `resume_route`, which should call this again) or FAILED (a reply was sent).

        Without `resume_route` a TLS target with no live connection is not dialled: tm
        answers 477. Registered TLS UAs are never dialled (they are reached over their own
        connection or not at all). Idempotent; also call it from the branch route."""
        KSR = _ksr()
        uri = self._target()
        # A browser, before any pin: its WebSocket must never be written to as plain TCP.
        if uri is not None and uri.transport in ("ws", "wss"):
            return self._to_browser(uri)
        if uri is None or uri.params.get(MARK) == "ok":
            return RELAY
        # A dialog's TLS side stays on its connection, whatever the Contact's transport says.
        pinned = self._dialog_peer()
        if pinned is not None:
            self._over_hairpin(pinned)
            if KSR.is_ACK():  # forwarded statelessly: no branch route will advertise
                self._advertise_tls()
            return RELAY
        if not uri.is_tls:
            return RELAY
        outcome = self._current_outcome()
        if outcome is not None:
            if outcome.peer is None:
                KSR.tm.t_reply(503, f"TLS connect failed: {outcome.reason}"[:120])
                return FAILED
            self._over_hairpin(outcome.peer)
            return RELAY
        if KSR.is_method_in("AC"):
            resume_route = None  # ACK and CANCEL follow their INVITE; they never dial
        if resume_route is None or self._registered_here():
            self._over_hairpin(uri.hostport)
            return RELAY
        sni = uri.params.get("tlsb_sni") or default_sni(uri.host)
        profile = uri.params.get("tlsb_profile") or "default"
        port = uri.port or TLS_DEFAULT_PORT
        key = target_key(uri.host, port, sni, profile)
        peer = self._known_peer(key, uri, plain=is_plain_target(uri.host, sni, profile))
        if peer is not None:
            self._over_hairpin(peer)
            return RELAY
        return self._connect_and_suspend(uri.host, port, sni, profile, resume_route)

    def _to_browser(self, uri: SipUri) -> int:
        """A browser is reached over its own WebSocket or not at all: never dialled. Without
        its connection tm could not even build the Via (it would answer 500); say 480."""
        KSR = _ksr()
        KSR.set_forward_no_connect()
        # In the branch route, or with other branches to try, tm fails this branch alone.
        if self._in_branch or int(KSR.pv.get("$branch(count)") or 0) > 0 or \
                KSR.x.modf("tcp_get_conid", uri.hostport, "$var(tlsb_conid)") > 0:
            return RELAY
        KSR.sl.send_reply(480, "Temporarily Unavailable (WebSocket gone)")
        return FAILED

    def _dialog_peer(self) -> str | None:
        """In a dialog set up over the bridge, requests stay on the connections its initial
        request took: our Record-Route names them (the callee's Contact alone does not say
        which of two identities to one server, nor a phone's source port)."""
        KSR = _ksr()
        if KSR.siputils.has_totag() < 0:
            return None
        routes = str(KSR.pv.get("$(hdr(Route)[*])") or "")
        for route in _ROUTE.findall(routes):
            # Only our own entries: another proxy's (another node's) pins name its hairpins.
            if (PIN_DOWN not in route and PIN_UP not in route) or not KSR.is_myself(route):
                continue
            params = parse_uri(route).params
            downstream = params.get("ftag") == str(KSR.pv.get("$ft") or "")
            return params.get(PIN_DOWN if downstream else PIN_UP) or None
        return None

    def _registered_here(self) -> bool:
        """A phone registered over the bridge is reached over its own connection, never
        dialled. After lookup() its destination keeps the hairpin listener as send socket;
        routed here by another node of a cluster, it came as the `received` of our Path."""
        KSR = _ksr()
        if str(KSR.pv.get("$fs") or "") == f"tcp:{format_addr(*self.hairpin)}":
            return True
        return self.cluster and "received=" in str(KSR.pv.get("$(hdr(Route)[0])") or "")

    def _over_hairpin(self, peer: str) -> None:
        KSR = _ksr()
        KSR.setdsturi(f"sip:{peer};transport=tcp;{MARK}=ok")
        # Without this Kamailio would open a plaintext TCP connection to the TLS peer.
        KSR.set_forward_no_connect()

    def _known_peer(self, key: str, uri: SipUri, *, plain: bool) -> str | None:
        KSR = _ksr()
        peer = KSR.htable.sht_get(self.htable, f"o:{key}")
        if peer:
            return str(peer)
        # A TLS peer connected to us (or we to it) is a hairpin Kamailio files under its
        # address; tcp_get_conid is cfg-only in 5.6, hence modf.
        if plain and is_ip(uri.host) and \
                KSR.x.modf("tcp_get_conid", uri.hostport, "$var(tlsb_conid)") > 0:
            return uri.hostport
        return None

    def _connect_and_suspend(self, host: str, port: int, sni: str | None, profile: str,
                             resume_route: str) -> int:
        KSR = _ksr()
        if KSR.tm.t_newtran() < 0:
            return FAILED
        tindex, tlabel = int(KSR.pv.get("$T(id_index)")), int(KSR.pv.get("$T(id_label)"))
        try:
            self.control.send("connect", host=host, port=port, sni=sni, profile=profile,
                              tag={"i": tindex, "l": tlabel, "r": resume_route})
        except ctl.ControlError as exc:
            KSR.err(f"tlsbridge: cannot ask for a TLS connection to {host}:{port}: {exc}\n")
            KSR.tm.t_reply(503, "TLS bridge unavailable")
            return FAILED
        # The rtimer process continues the transaction when the outcome is published.
        if KSR.tmx.t_suspend() < 0:
            KSR.tm.t_reply(500, "Cannot suspend the transaction")
            return FAILED
        return SUSPENDED

    def _current_outcome(self) -> Outcome | None:
        if not self._outcomes:
            return None
        pv = _ksr().pv
        try:
            current = (int(pv.get("$T(id_index)")), int(pv.get("$T(id_label)")))
        except (TypeError, ValueError):
            return None
        return self._outcomes.get(current)

    # -- branch route -----------------------------------------------------------------------

    def prepare_branch(self) -> int:
        """Call from the branch route (`KSR.tm.t_on_branch`): decides this branch's transport
        and writes its Record-Route when `record_route()` asked for one."""
        self._in_branch = True
        try:
            self.prepare_relay()
        finally:
            self._in_branch = False
        uri = self._target()
        tls_out = uri is not None and uri.params.get(MARK) == "ok"
        if tls_out:
            self._advertise_tls()
        elif _ksr().pv.get(ADV_XAVP):
            self._advertise_none()
        if _ksr().pv.get(RR_XAVP):
            self._record_route_branch(tls_out)
        return 1

    def _advertise_tls(self) -> None:
        """Our Via towards a TLS peer names the public TLS address, as tls.so's would, not
        the hairpin listener (Kamailio still writes TCP: it sees no TLS)."""
        address = self._tls_address(None)  # as the Record-Route towards it
        if address is None:
            return
        host, port = parse_addr(address.split(";", 1)[0])
        KSR = _ksr()
        KSR.set_advertised_address(host)
        KSR.set_advertised_port(str(port))  # KEMI takes it as a string
        KSR.pv.sets(ADV_XAVP, "1")

    def _advertise_none(self) -> None:
        """The advertised address outlives a branch: the next, non-TLS, one drops it."""
        KSR = _ksr()
        KSR.set_advertised_address("")
        KSR.set_advertised_port("")
        KSR.pv.unset(ADV_XAVP)

    def _record_route_branch(self, tls_out: bool) -> None:
        # Written as a header of this branch: the rr module allows one Record-Route per
        # message, so a second branch with another transport could not get its own.
        found = self.connection()
        inside = self._tls_address(found) if found else self._sip_in()
        outside = self._tls_address(None) if tls_out else (self._sip_out() or inside)
        # Browsers see the public WSS address (never the hairpin), on either side.
        ws_in = self._ws_side(found.conn.listener if found else None)
        if ws_in is not None:
            inside = ws_in
        target = self._target()
        if not tls_out and target is not None and target.transport in ("ws", "wss"):
            outside = self.ws_address() or outside
        if outside is None or inside is None:
            _ksr().err("tlsbridge: no address for Record-Route across transports: "
                       "set [kamailio] sip_address in tlsbridge.toml\n")
            return
        # The top Record-Route is the side the request goes to.
        hops = [outside] if outside == inside else [outside, inside]
        target = self._target() if tls_out else None
        down = target.hostport if target else None
        # Never pin a browser's side: a pinned peer is sent to as plain TCP, and its
        # connection is a WebSocket (frames); it is found by its alias instead.
        up = found.conn.peer if found and ws_in is None else None
        _ksr().hdr.insert(record_route_headers(hops, _ksr().pv.get("$ft"), down, up))

    def _ws_side(self, listener: str | None) -> str | None:
        """The Record-Route address of a browser's side: the public WSS address of the
        listener it came through (None: it did not come through a WSS listener)."""
        if listener is None or listener not in self.wss_public:
            return None
        return self.ws_address(listener)

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


def record_route_headers(hops: list[str], from_tag: str | None, down: str | None = None,
                         up: str | None = None) -> str:
    """Record-Route header lines, top first; `r2=on` marks the double Record-Route, `tls-dn`
    and `tls-up` the TLS connections of the callee's and the caller's side."""
    params = ";lr" + (";r2=on" if len(hops) > 1 else "") + (f";ftag={from_tag}" if from_tag else "")
    if down:
        params += f";{PIN_DOWN}={down}"
    if up:
        params += f";{PIN_UP}={up}"
    return "".join(f"Record-Route: <sip:{hop}{params}>\r\n" for hop in hops)
