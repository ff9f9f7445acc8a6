"""Browsers: SIP over secure WebSocket (RFC 7118) through the bridge.

The daemon terminates the browser's TLS on a `transport = "wss"` listener and joins it to
Kamailio's hairpin like any TLS connection. What reaches Kamailio is a plain HTTP upgrade from
the real peer (PROXY header), which Kamailio's own `xhttp` and `websocket` modules handle; after
the handshake Kamailio calls the connection `ws` (it never sees the TLS). This mixin is what the
routing script needs for that:

- `ws_handshake()`, the xhttp event callback: the upgrade is accepted only on a connection that
  came through a WSS listener of the bridge, and only from an `Origin` the listener allows;
  anything else gets a 403 (a plain HTTP request a 404) and the connection is closed.
- `from_websocket()`: the current message came from a browser over the bridge.
- `ws_address(...)`: the public WSS address browsers know (for Record-Route).

The browser's `.invalid` Contact host is handled the way Kamailio users know: the registrar's
received address (`prepare_register()`), nathelper's `add_contact_alias()` on other requests and
replies from a browser, `handle_ruri_alias()` on in-dialog requests towards it.
"""

from __future__ import annotations

import os
from typing import Any

from tlsbridge.kemi.ksr import ksr as _ksr

# The xhttp event route's answers; a refused upgrade never reaches the websocket module.
_FORBIDDEN = (403, "Forbidden")
_NOT_FOUND = (404, "Not Found")
_WS_PROTOS = ("ws", "wss")



class WebSocketMixin:
    """The WebSocket half of `TlsBridge` (see the module docstring)."""

    wss_public: dict[str, str]
    wss_origins: dict[str, tuple[str, ...] | None]
    config_path: str | None
    _config_mtime: float | None
    stats: dict[str, int]

    def _on_hairpin(self, pv: Any) -> bool: ...  # provided by TlsBridge
    def connection(self) -> Any: ...  # provided by TlsBridge
    def _reread_ws_settings(self) -> None: ...  # provided by TlsBridge

    def from_websocket(self) -> bool:
        """Did the current message (request or reply) come from a browser over the bridge?"""
        pv = _ksr().pv
        return str(pv.get("$pr") or "").lower() in _WS_PROTOS and self._on_hairpin(pv)

    def ws_handshake(self, *_: Any) -> int:
        """The xhttp event callback (`modparam("xhttp", "event_callback", ...)`): answer the
        browser's WebSocket upgrade, or refuse it.

        Accepted only over a WSS listener of the bridge (a GET through a SIP-over-TLS listener,
        or one reaching the hairpin some other way, is refused) and only with an `Origin` that
        listener's `origins` allow. The listener policy is re-read when tlsbridge.toml changes.
        """
        KSR = _ksr()
        # Never connect anywhere to answer, and close after a refusal.
        KSR.set_reply_no_connect()
        found = self.connection()
        listener = found.conn.listener if found is not None else None
        if listener not in self.wss_public:
            self.stats["ws_refused"] = self.stats.get("ws_refused", 0) + 1
            KSR.warn(f"tlsbridge: HTTP request from {KSR.pv.get('$si')}:{KSR.pv.get('$sp')} "
                     "did not come through a WSS listener of the bridge: refused\n")
            return self._http_refuse(*_FORBIDDEN)
        upgrade = str(KSR.pv.get("$hdr(Upgrade)") or "").lower()
        if KSR.pv.get("$rm") != "GET" or "websocket" not in upgrade:
            return self._http_refuse(*_NOT_FOUND)
        self._reread_ws_settings()
        origin = KSR.pv.get("$hdr(Origin)")
        if not origin_allowed(origin, self.wss_origins.get(listener)):
            self.stats["ws_refused"] = self.stats.get("ws_refused", 0) + 1
            KSR.warn(f"tlsbridge: WebSocket from {found.conn.peer} with Origin {origin!r} "
                     f"refused on {listener}\n")
            return self._http_refuse(403, "Origin not allowed")
        # The websocket module answers 101, or the error itself.
        if KSR.websocket.handle_handshake() > 0:
            self.stats["ws_accepted"] = self.stats.get("ws_accepted", 0) + 1
        return 1

    def _http_refuse(self, code: int, reason: str) -> int:
        KSR = _ksr()
        KSR.set_reply_close()
        KSR.xhttp.xhttp_reply(code, reason, "text/plain", f"{reason}\n")
        return 1

    def ws_address(self, listener: str | None = None) -> str | None:
        """The public address of a WSS listener (`advertise`, else its own), as
        `host:port;transport=ws` (RFC 7118 has one transport parameter for WS and WSS), or
        None without WSS listeners. `listener` None: the first one."""
        if not self.wss_public:
            return None
        public = self.wss_public.get(listener or "") or next(iter(self.wss_public.values()))
        return f"{public};transport=ws"


def origin_allowed(origin: str | None, allowed: tuple[str, ...] | None) -> bool:
    """`allowed` None: any Origin (also none). Otherwise the browser's Origin must be one of
    them exactly (scheme, host and port, as browsers send it), or "*" must be listed."""
    if allowed is None or "*" in allowed:
        return True
    return origin is not None and origin.rstrip("/").lower() in \
        {a.rstrip("/").lower() for a in allowed}


def config_mtime(path: str | None) -> float | None:
    try:
        return os.stat(path).st_mtime if path else None
    except OSError:
        return None
