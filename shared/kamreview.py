"""What the bridge needs of Kamailio's cfg, and what breaks it: findings an operator can act on.

Used by `tlsbridge check --kamailio-cfg`, by the daemon at start, and by the KEMI and native
helpers inside Kamailio at start-up (which refuse to start on an error). A finding is
(level, message), level "ok", "warning" or "error".
"""

from __future__ import annotations

from tlsbridge.shared.addr import format_addr, parse_addr
from tlsbridge.shared.kamcfg import KamailioCfg, Listen
from tlsbridge.shared.settings import BridgeSettings

Finding = tuple[str, str]
ROUTE_BLOCKS = ("request_route", "route[", "branch_route", "failure_route", "reply_route",
                "onreply_route", "onsend_route")
DEFAULT_RECEIVED_AVP = "$avp(RECEIVED)"


def _where(listen: Listen) -> str:
    host = format_addr(listen.host, listen.port) if listen.port else listen.host
    return f"{listen.proto}:{host}" if listen.proto else host


def review_cfg(cfg: KamailioCfg, bridge: BridgeSettings,
               received_avp: str = DEFAULT_RECEIVED_AVP) -> list[Finding]:
    out: list[Finding] = []
    out += _sockets(cfg, bridge)
    out += _tcp_settings(cfg)
    out += _modules(cfg, received_avp)
    out += _routing(cfg)
    if bridge.wss_public:
        out += _websocket(cfg, bridge)
    return out


def errors(findings: list[Finding]) -> list[str]:
    return [message for level, message in findings if level == "error"]


def _is_hairpin(listen: Listen, bridge: BridgeSettings) -> bool:
    host, port = bridge.hairpin
    return listen.serves("tcp") and listen.port == port and listen.host.strip("[]") == host


def _sockets(cfg: KamailioCfg, bridge: BridgeSettings) -> list[Finding]:
    out: list[Finding] = []
    hairpin = format_addr(*bridge.hairpin)
    if not cfg.listens:
        out.append(("error", "no listen= lines: Kamailio listens on every local address, TCP "
                    f"included; add listen=udp:<ip>:5060 and the hairpin listen=tcp:{hairpin}"))
        return out
    if any(_is_hairpin(li, bridge) for li in cfg.listens):
        out.append(("ok", f"hairpin listener tcp:{hairpin}"))
    else:
        out.append(("error", f"no hairpin listener: add listen=tcp:{hairpin} (tlsbridge.toml "
                    "[kamailio] hairpin)"))
    others = [_where(li) for li in cfg.listens
              if li.serves("tcp") and not _is_hairpin(li, bridge)]
    if others:
        # tcp_accept_haproxy is global: every TCP listener believes PROXY headers.
        out.append(("error", f"other plain TCP listeners ({', '.join(others)}) would believe "
                    "PROXY headers: anyone reaching them can claim any source address; give "
                    "them a protocol (listen=udp:...) or remove them"))
    if any(li.serves("udp") for li in cfg.listens):
        out.append(("ok", "UDP listener: " + ", ".join(_where(li) for li in cfg.listens
                                                       if li.serves("udp"))))
    else:
        out.append(("error", "no UDP listener: with listen= lines Kamailio binds only those; "
                    "add listen=udp:<ip>:5060 for UDP phones and trunks"))
    if any(li.proto == "tls" for li in cfg.listens):
        out.append(("error", "listen=tls:... remains: TLS is the bridge's job; remove it"))
    tls_aliases = {a.split(":", 1)[1] for a in cfg.aliases if a.lower().startswith("tls:")}
    for public in sorted(set(bridge.tls_public.values())):
        host, port = parse_addr(public)
        wanted = format_addr(host, port)
        if wanted in tls_aliases or (host in ("0.0.0.0", "::") and
                                     any(a.endswith(f":{port}") for a in tls_aliases)):
            out.append(("ok", f"alias=tls:{wanted}"))
        else:
            out.append(("warning", f"no alias=tls:{wanted}: Route headers naming the "
                        "bridge's TLS address would not be Kamailio's own (in-dialog requests "
                        "from TLS peers of that listener fail)"))
    return out


def _tcp_settings(cfg: KamailioCfg) -> list[Finding]:
    out: list[Finding] = []
    if cfg.flag("tcp_accept_haproxy"):
        out.append(("ok", "tcp_accept_haproxy = yes"))
    else:
        out.append(("error", "tcp_accept_haproxy is not yes: Kamailio would see the daemon, "
                    "not the TLS peer, and the PROXY header as garbage"))
    if cfg.flag("enable_tls"):
        out.append(("error", "enable_tls = yes: TLS is the bridge's job; remove it"))
    defer = cfg.setting("tcp_defer_accept")
    if defer in (None, "0", "no"):
        out.append(("warning", "tcp_defer_accept is not set: one silent connection stalls new "
                    "TCP connections for tcp_wait_data; set tcp_defer_accept=3"))
    wait = cfg.setting("tcp_wait_data")
    if wait is None or not wait.isdigit() or int(wait) > 1000:
        out.append(("warning", f"tcp_wait_data = {wait or '5000 (default)'}: set 500 so that "
                    "a connection without data costs tcp_main at most that"))
    if cfg.flag("tcp_no_connect"):
        out.append(("ok", "tcp_no_connect = yes"))
    else:
        out.append(("warning", "tcp_no_connect is not yes: with it, nothing can ever leave in "
                    "plaintext towards a TLS peer whose connection is gone"))
    return out


def _modules(cfg: KamailioCfg, received_avp: str) -> list[Finding]:
    out: list[Finding] = []
    if "tls" in cfg.modules:
        out.append(("error", "tls.so is loaded: TLS is the bridge's job; remove it"))
    if "registrar" in cfg.modules:
        avp = cfg.modparam("registrar", "received_avp")
        if avp is None:
            out.append(("error", 'registrar has no received_avp: add modparam("registrar", '
                        f'"received_avp", "{received_avp}"), or phones registered over TLS '
                        "are sought at their Contact address"))
        elif avp != received_avp:
            out.append(("error", f"registrar received_avp is {avp}; the bridge sets "
                        f"{received_avp}: make them the same"))
    fromtag = cfg.modparam("rr", "append_fromtag")
    if fromtag is not None:
        out.append(("ok", f"rr append_fromtag = {fromtag}: either works (the bridge reads the "
                    "direction from its own Record-Route)"))
    if "rr" in cfg.modules and cfg.modparam("rr", "enable_socket_mismatch_warning") != "0":
        out.append(("warning", 'rr logs "no socket found to match second RR" for every '
                    "in-dialog request across TLS: add "
                    'modparam("rr", "enable_socket_mismatch_warning", 0)'))
    if "app_python3" not in cfg.modules:
        out.append(("error", "app_python3 is not loaded: the bridge's helpers run in it"))
    return out


def _routing(cfg: KamailioCfg) -> list[Finding]:
    routes = [name for name in cfg.routes() if name.startswith(ROUTE_BLOCKS)]
    if cfg.cfgengine:
        if routes:
            return [("error", f'cfgengine "{cfg.cfgengine}" with native route blocks '
                     f"({', '.join(routes)}): Kamailio runs one or the other; remove the "
                     "native routes, or cfgengine for native routing with python_exec")]
        return [("ok", f'KEMI routing (cfgengine "{cfg.cfgengine}")')]
    return _native_routing(cfg)


def _native_routing(cfg: KamailioCfg) -> list[Finding]:
    out: list[Finding] = []
    if not cfg.calls("python_exec"):
        return [("error", "native routing that never calls the bridge: add its python_exec "
                 "calls (docs/migration.md, native cfg)")]

    def need(call: str, where: str, why: str) -> None:
        if not cfg.calls("python_exec", call):
            out.append(("error", f'no python_exec("{call}") {where}: {why}'))

    if cfg.calls("t_relay"):
        need("tlsb_relay", "before t_relay()",
             'a TLS target fails with "no corresponding socket", or leaves in plaintext')
    if cfg.calls("save"):
        need("tlsb_register", 'before save("location")',
             "a phone registered over TLS would be sought at its Contact address")
    if cfg.calls("record_route"):
        out.append(("error", "record_route() names the hairpin to TLS peers: use "
                    'python_exec("tlsb_record_route") instead'))
    if cfg.calls("python_exec", "tlsb_record_route"):
        need("tlsb_branch", "in the branch route",
             "Record-Route is written per branch, with the address each side can reach")
    if not any(key == "exec" for mod, key, _ in cfg.modparams if mod == "rtimer"):
        out.append(("warning", "no rtimer exec route calling python_exec(\"tlsb_timer\"): "
                    "outbound TLS connects never continue their transaction"))
    else:
        need("tlsb_timer", "in the rtimer route", "outbound TLS connects never continue")
    if not out:
        out.append(("ok", "native routing calls the bridge's helpers"))
    return out


def _websocket(cfg: KamailioCfg, bridge: BridgeSettings) -> list[Finding]:
    """With WSS listeners ([[listener]] transport = "wss"): Kamailio takes the browsers'
    upgrade on the hairpin, so it needs xhttp and websocket, and a handshake that goes through
    the bridge's policy (the listener it came through, its Origin)."""
    out: list[Finding] = []
    missing = [m for m in ("xhttp", "websocket") if m not in cfg.modules]
    if missing:
        out.append(("error", f"WSS listeners, but {' and '.join(missing)} not loaded: browsers' "
                    "WebSocket upgrade arrives on the hairpin (kamailio-websocket-modules)"))
    if not cfg.flag("tcp_accept_no_cl"):
        out.append(("error", "WSS listeners, but tcp_accept_no_cl is not yes: Kamailio refuses "
                    "the WebSocket upgrade (an HTTP request without Content-Length)"))
    if "nathelper" not in cfg.modules:
        out.append(("warning", "WSS listeners, but nathelper is not loaded: browsers' .invalid "
                    "Contacts need add_contact_alias() and handle_ruri_alias()"))
    if cfg.cfgengine:
        if not cfg.modparam("xhttp", "event_callback"):
            out.append(("error", 'WSS listeners, but no modparam("xhttp", "event_callback", '
                        '...) whose method returns bridge.ws_handshake()'))
    elif not cfg.calls("python_exec", "tlsb_ws_handshake"):
        out.append(("error", 'WSS listeners, but no python_exec("tlsb_ws_handshake") in '
                    "event_route[xhttp:request]: the upgrade would skip the listener and Origin "
                    "checks"))
    # alias= knows no "ws" protocol: only an alias for every protocol matches ws Routes.
    aliases = {a for a in cfg.aliases
               if a.partition(":")[0].lower() not in ("udp", "tcp", "tls", "sctp")}
    for public in sorted(set(bridge.wss_public.values())):
        wanted = format_addr(*parse_addr(public))
        if wanted not in aliases:
            out.append(("error", f"no alias={wanted}: Route headers naming the bridge's WSS "
                        "address would not be Kamailio's own (in-dialog requests from browsers "
                        "fail)"))
    if not any(level == "error" for level, _ in out):
        out.append(("ok", "WebSocket on the hairpin: xhttp, websocket, the bridge's handshake"))
    return out
