"""`TlsBridge`: what a KEMI routing script uses to see the TLS facts of the current message.

Where the facts come from, fastest first: this worker's cache (by Kamailio's `$conid`), the
daemon's facts map in shared memory (written before the connection's first byte reaches
Kamailio), htable if the rtimer process is told to fill it, and a look-up by datagram (or
control request) bounded by a short timeout. Every process creates its own sockets and
mappings lazily, after fork; no threads are started (Kamailio holds the GIL while a worker idles).
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import zmq

from tlsbridge.kemi.connection import BridgeConnection, parse_entry
from tlsbridge.kemi.ksr import ksr as _ksr
from tlsbridge.kemi.routing import FAILED, RELAY, SUSPENDED, Outcome, RoutingMixin
from tlsbridge.kemi.websocket import WebSocketMixin, config_mtime
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.client import ControlClient
from tlsbridge.shared.events import ConnRef, Event, SeqTracker, decode_event
from tlsbridge.shared.facts import CertInfo, TlsFacts
from tlsbridge.shared.factsmap import FactsMapReader, decode_entry, decode_tls
from tlsbridge.shared.kamcfg import CfgError, KamailioCfg, kamailio_argv_cfg, load_cfg, udp_address
from tlsbridge.shared.kamreview import Finding, errors, review_cfg
from tlsbridge.shared.lookup import (
    LookupClient,
    LookupUnavailable,
    decode_json_entry,
    encode_json_entry,
)
from tlsbridge.shared.settings import DEFAULT_RUN_DIR, BridgeSettings, Trunk, load_settings

DEFAULT_CONFIG = "/etc/tlsbridge/tlsbridge.toml"
HTABLE = "tlsb"
# Facts of this worker's most recent connections (by $conid): a dialog's next requests skip the
# map. Small, because every entry stays in the worker's heap (a client certificate is 1-3 KiB)
# and the map is cheap.
_CACHE_SIZE = 256
_LOCAL_CERTS = 64  # our own certificates, parsed once each (profiles x reloads)
_TLS_MEMO = 64  # distinct TLS facts of map entries, parsed once each (no client certificate)
RESUME_RETRY_FOR = 2.0  # seconds to keep trying t_continue for a transaction not yet suspended



class KamailioCfgRefused(RuntimeError):
    """Kamailio's cfg would break TLS through the bridge; the message says what to change."""


class TlsBridge(RoutingMixin, WebSocketMixin):
    """Create once at module level in the routing script; call `child_init` from yours.

    Facts: `tls()`, `connection()`. Transport: `prepare_register()` before `registrar.save()`,
    `record_route()` instead of `rr.record_route()`, `prepare_relay()` before `t_relay()`, and
    `prepare_branch()` in the branch route set with `KSR.tm.t_on_branch()`. Events:
    `drain_events()` as the rtimer method, `on(type, handler)` for callbacks there.
    Browsers (WSS): `ws_handshake()` as the xhttp event callback, `from_websocket()`.
    """

    RELAY, SUSPENDED, FAILED = RELAY, SUSPENDED, FAILED

    def __init__(
        self,
        config: str | os.PathLike[str] | None = None,
        *,
        hairpin: tuple[str, int] | None = None,
        control: str | None = None,
        events: str | None = None,
        htable: str = HTABLE,
        lookup_timeout_ms: int = 250,
        max_drain: int = 20_000,
        tls_public: dict[str, str] | None = None,
        sip_address: str | None = None,
        received_avp: str = "$avp(RECEIVED)",
        trunks: dict[str, Trunk] | None = None,
        lookup_socket: str | None = None,
        facts_map: str | None = None,
        facts_in_htable: bool = False,
        wss_public: dict[str, str] | None = None,
        wss_origins: dict[str, tuple[str, ...] | None] | None = None,
        cluster: bool | None = None,
    ) -> None:
        settings_trunks: dict[str, Trunk] = {}
        self.cfg_review = "refuse"
        self.config_path: str | None = None
        self.run_dir = Path(DEFAULT_RUN_DIR)
        if hairpin is None or control is None or events is None:
            settings = load_settings(
                config or os.environ.get("TLSBRIDGE_CONFIG") or DEFAULT_CONFIG
            )
            hairpin = hairpin or settings.hairpin
            control = control or settings.control_endpoint
            events = events or settings.events_endpoint
            tls_public = tls_public if tls_public is not None else settings.tls_public
            sip_address = sip_address or settings.sip_address
            cluster = settings.cluster if cluster is None else cluster
            self.cfg_review = settings.cfg_review
            settings_trunks = settings.trunks
            self.run_dir = settings.run_dir
            lookup_socket = lookup_socket if lookup_socket is not None else settings.lookup_socket
            facts_map = facts_map if facts_map is not None else settings.facts_map
            if wss_public is None:
                wss_public, wss_origins = settings.wss_public, settings.wss_origins
                # The origin policy follows the file without a Kamailio restart.
                self.config_path = str(config or os.environ.get("TLSBRIDGE_CONFIG")
                                       or DEFAULT_CONFIG)
        self._config_mtime = config_mtime(self.config_path)
        self.wss_public = dict(wss_public or {})
        self.wss_origins = dict(wss_origins or {})
        self.trunks = dict(trunks if trunks is not None else settings_trunks)
        self.lookup_socket = lookup_socket or ""
        self.facts_map = facts_map or ""
        # Off: each worker reads a connection's facts from the facts map (or asks the daemon)
        # and caches them by $conid. On: the rtimer process also copies every connection's
        # facts into htable, which costs Kamailio ~0.1 ms per connection whether or not used.
        self.facts_in_htable = facts_in_htable
        # Routing in native cfg: suspended transactions resume in a route[] block.
        self.native_routes = False
        self._outcomes: dict[tuple[int, int], Outcome] = {}
        self._waiting: list[tuple[float, dict[str, Any], Outcome]] = []
        self._due: list[tuple[float, dict[str, Any], Outcome]] = []
        self._continuing: tuple[float, dict[str, Any], Outcome] | None = None
        self.tls_public = dict(tls_public or {})
        self.sip_address = sip_address
        # One node of several sharing registrations: see RoutingMixin.prepare_register.
        self.cluster = bool(cluster)
        self.received_avp = received_avp
        self.hairpin = hairpin
        self.control_endpoint = control
        self.events_endpoint = events
        self.htable = htable
        self.lookup_timeout_ms = lookup_timeout_ms
        self.max_drain = max_drain
        self._client: ControlClient | None = None
        self._lookup: LookupClient | None = None
        self._map: FactsMapReader | None = None
        self._local_certs: dict[str, CertInfo] = {}
        self._tls_memo: dict[bytes, TlsFacts] = {}
        self._cache: OrderedDict[int, BridgeConnection] = OrderedDict()
        self._sub: zmq.Socket | None = None
        self._sub_pid = 0
        self._tracker = SeqTracker()
        self._handlers: dict[str, list[Callable[[Event], None]]] = {}
        self.stats: dict[str, int] = {
            "cache_hits": 0, "map_hits": 0, "htable_hits": 0, "lookups": 0, "lookup_failures": 0,
            "events": 0, "events_lost": 0, "resyncs": 0, "bad_events": 0,
        }

    # -- process lifecycle ------------------------------------------------------------------

    def child_init(self, rank: int) -> int:
        """Call from the script's child_init: drops sockets inherited across fork."""
        self._client = None
        self._lookup = None
        self._map = None
        self._sub = None
        self._cache.clear()
        return 0

    def check_kamailio(self, cfg: KamailioCfg | None = None) -> list[Finding]:
        """Call at start-up (mod_init) inside Kamailio: reviews the cfg Kamailio runs, as it
        evaluates it. Logs what it finds and raises KamailioCfgRefused on an error, so that
        Kamailio does not start with a cfg that would break TLS ([kamailio] cfg_review =
        "warn": only logs). Without [kamailio]
        sip_address, Kamailio's one UDP listener is taken."""
        KSR = _ksr()
        if cfg is None:
            try:
                path, defines = kamailio_argv_cfg(
                    Path("/proc/self/cmdline").read_bytes().decode().split("\0")[:-1])
                cfg = load_cfg(path, defines)
            except (OSError, CfgError) as exc:
                KSR.warn(f"tlsbridge: kamailio.cfg not reviewed: {exc}\n")
                return []
        settings = BridgeSettings(self.run_dir, self.hairpin, self.events_endpoint,
                                  self.control_endpoint, tls_public=self.tls_public,
                                  sip_address=self.sip_address, wss_public=self.wss_public)
        findings = review_cfg(cfg, settings, self.received_avp)
        if self.sip_address is None:
            self.sip_address = udp_address(cfg)
            if self.sip_address is None:
                findings.append(("error", "no [kamailio] sip_address in tlsbridge.toml, and no "
                                 "single UDP listener with an address to take instead: set it "
                                 "to where UDP peers reach Kamailio (Record-Route)"))
        for level, message in findings:
            if level == "error":
                KSR.err(f"tlsbridge: {cfg.path}: {message}\n")
            elif level == "warning":
                KSR.warn(f"tlsbridge: {cfg.path}: {message}\n")
        bad = errors(findings)
        if bad and self.cfg_review != "warn":
            raise KamailioCfgRefused(f"{cfg.path}: " + "; ".join(bad))
        return findings

    # -- the current message ----------------------------------------------------------------

    def from_bridge(self) -> bool:
        """Did the current message arrive over a hairpin from the daemon?"""
        return self._on_hairpin(_ksr().pv)

    def _on_hairpin(self, pv: Any) -> bool:
        # After a WebSocket upgrade Kamailio calls the hairpin "ws".
        if (pv.get("$pr") or "").lower() not in ("tcp", "ws"):
            return False
        host, port = self.hairpin
        return pv.get("$Ri") == host and pv.get("$Rp") == port

    def connection(self) -> BridgeConnection | None:
        """The bridge's connection of the current message, or None if it is not from the bridge."""
        pv = _ksr().pv
        conid = pv.get("$conid")
        # Kamailio never reuses a connection id, and only bridge connections are cached: a hit
        # needs no from_bridge() (three variable reads on every message of a dialog).
        found = self._cache.get(conid)
        if found is not None:
            self.stats["cache_hits"] += 1
            return found
        if not self._on_hairpin(pv):
            return None
        port = int(pv.get("$tcp(c_sp)"))
        key = format_addr(str(pv.get("$tcp(c_si)")), port)
        peer = format_addr(str(pv.get("$si")), int(pv.get("$sp")))
        found = self._from_map(port, key, peer) or \
            (self.facts_in_htable and self._from_htable(key, peer)) or \
            self._from_daemon(key, peer)
        if found is not None:
            self._cache[conid] = found
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        return found

    def tls(self) -> TlsFacts | None:
        """The TLS facts of the current message's connection (None: not from the bridge)."""
        found = self.connection()
        return found.tls if found else None

    def _from_map(self, port: int, key: str, peer: str) -> BridgeConnection | None:
        if not self.facts_map:
            return None
        if self._map is None:
            self._map = FactsMapReader(self.facts_map)
        raw = self._map.get(port)
        if raw is None:
            return None
        try:
            conn, tls_raw = decode_entry(raw)
            # The port's newest entry may be of an earlier hairpin from that port.
            if conn.hairpin != key or conn.peer != peer:
                return None
            tls = self._tls_memo.get(tls_raw) or self._parse_tls(tls_raw)
        except (ValueError, ev.EventError):
            return None  # the look-up will say what is wrong
        self.stats["map_hits"] += 1
        return BridgeConnection(conn, tls)

    def _parse_tls(self, raw: bytes) -> TlsFacts:
        if len(self._tls_memo) >= _TLS_MEMO:
            self._tls_memo.clear()
        tls = self._tls_memo[raw] = TlsFacts.from_dict(decode_tls(raw), self._known_local())
        return tls

    def _parse(self, entry: dict[str, Any]) -> BridgeConnection:
        return parse_entry(entry, self._known_local())

    def _known_local(self) -> dict[str, CertInfo]:
        if len(self._local_certs) > _LOCAL_CERTS:
            self._local_certs.clear()
        return self._local_certs

    def _from_htable(self, key: str, peer: str) -> BridgeConnection | None:
        raw = _ksr().htable.sht_get(self.htable, key)
        if not raw:
            return None
        try:
            found = self._parse(decode_json_entry(raw))
        except (ValueError, ev.EventError) as exc:
            _ksr().warn(f"tlsbridge: bad htable entry for {key}: {exc}\n")
            return None
        # A hairpin port can be reused by a later connection: the peer must match as well.
        if found.conn.peer != peer:
            return None
        self.stats["htable_hits"] += 1
        return found

    def _from_daemon(self, key: str, peer: str) -> BridgeConnection | None:
        self.stats["lookups"] += 1
        try:
            found = self._parse(self._ask_daemon(key))
        except (ctl.ControlError, LookupUnavailable, ValueError, ev.EventError) as exc:
            self.stats["lookup_failures"] += 1
            _ksr().err(f"tlsbridge: no TLS facts for hairpin {key} (peer {peer}): {exc}\n")
            return None
        if found.conn.peer != peer:
            self.stats["lookup_failures"] += 1
            _ksr().err(f"tlsbridge: hairpin {key} belongs to {found.conn.peer}, not {peer}\n")
            return None
        return found

    def _ask_daemon(self, key: str) -> dict[str, Any]:
        """The fast datagram look-up; the control socket when the daemon has no such socket."""
        if self.lookup_socket:
            if self._lookup is None:
                self._lookup = LookupClient(self.lookup_socket, self.lookup_timeout_ms)
            try:
                entry = self._lookup.lookup(key)
            except LookupUnavailable:
                if os.path.exists(self.lookup_socket):
                    raise  # it is there and did not answer in time: do not wait twice
            else:
                if entry is None:
                    raise ValueError("the daemon has no such connection")
                return entry
        return self.control.request("lookup", timeout_ms=self.lookup_timeout_ms, hairpin=key)

    def _reread_ws_settings(self) -> None:
        """Pick up changed WSS listeners and origins from tlsbridge.toml (one stat() per
        WebSocket handshake)."""
        mtime = config_mtime(self.config_path)
        if mtime is None or mtime == self._config_mtime or self.config_path is None:
            return
        try:
            settings = load_settings(self.config_path)
        except (OSError, ValueError) as exc:
            _ksr().err(f"tlsbridge: {self.config_path} not re-read, keeping the old origins: "
                       f"{exc}\n")
            return
        self._config_mtime = mtime
        self.wss_public, self.wss_origins = dict(settings.wss_public), \
            dict(settings.wss_origins)

    @property
    def control(self) -> ControlClient:
        if self._client is None:
            self._client = ControlClient(self.control_endpoint, self.lookup_timeout_ms)
        return self._client

    # -- the rtimer process -----------------------------------------------------------------

    def on(self, event_type: str, handler: Callable[[Event], None]) -> None:
        """Call `handler(event)` in the rtimer process for each event of that type."""
        self._handlers.setdefault(event_type, []).append(handler)
        if self._sub is not None and self._sub_pid == os.getpid():
            self._sub.setsockopt_string(zmq.SUBSCRIBE, event_type)

    def _topics(self) -> set[str]:
        """What the rtimer takes from the daemon: the outcomes of connects (suspended
        transactions, `o:` keys), closes of outbound connections (their `o:` keys) and daemon
        restarts. Not one event per inbound connection: each would cost the daemon its
        encoding and this process its decoding, for nothing."""
        topics = {"outbound.", f"{ev.CONN_CLOSED}.out", "daemon."}
        if self.facts_in_htable:
            topics |= {ev.TLS_ESTABLISHED, ev.CONN_CLOSED}
        return topics | set(self._handlers)

    def drain_events(self, *_: Any) -> int:
        """The rtimer method: move pending events into htable. Never blocks."""
        sub = self._events_socket()
        resync = False
        src = self._tracker.src
        for _ in range(self.max_drain):
            try:
                frames = sub.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            try:
                event = decode_event(frames)
            except ev.EventError as exc:
                self.stats["bad_events"] += 1
                _ksr().warn(f"tlsbridge: dropped a bad event: {exc}\n")
                continue
            self.stats["events"] += 1
            lost_before = self._tracker.lost
            if self._tracker.observe(event):
                resync = True
            self.stats["events_lost"] += self._tracker.lost - lost_before
            self._apply(event)
        if resync:
            if self._tracker.src != src and src is not None:
                # A restarted daemon: the connections of the one before are gone.
                _ksr().htable.sht_reset(self.htable)
            self.resync()
        # Continued now; one that is not suspended yet is tried again at the next tick.
        self._due, self._waiting = self._waiting, []
        if not self.native_routes:
            while (job := self.next_resume()) is not None:
                self.resumed(self._continue(*job))
        return 1

    def _continue(self, index: int, label: int, route: str) -> int:
        try:
            return _ksr().tmx.t_continue(index, label, route)
        except (SystemError, TypeError) as exc:
            # The route ran but did not return an int (app_python3 wants one): the
            # transaction went on; the other transactions must not be lost with it.
            _ksr().err(f"tlsbridge: {route} must return an int (it resumed transaction "
                       f"{index}:{label}): {exc}\n")
            return 1

    def _events_socket(self) -> zmq.Socket:
        if self._sub is None or self._sub_pid != os.getpid():
            sock = zmq.Context.instance().socket(zmq.SUB)
            sock.setsockopt(zmq.RCVHWM, 200_000)
            sock.setsockopt(zmq.LINGER, 0)
            for topic in sorted(self._topics()):
                sock.setsockopt_string(zmq.SUBSCRIBE, topic)
            sock.connect(self.events_endpoint)
            self._sub, self._sub_pid = sock, os.getpid()
        return self._sub

    def _apply(self, event: Event) -> None:
        KSR = _ksr()
        conn = event.conn
        if event.type == ev.TLS_ESTABLISHED and conn and conn.hairpin and self.facts_in_htable:
            self._remember(conn.to_dict(), event.fields.get("tls"))
        elif event.type == ev.OUTBOUND_READY and conn:
            self._remember(conn.to_dict(), event.fields.get("tls"), [event.fields.get("key")])
            self._resume(event.fields.get("tags") or (), Outcome(conn.peer))
        elif event.type == ev.OUTBOUND_FAILED:
            reason = f"{event.fields.get('reason')}: {event.fields.get('detail', '')}"
            self._resume(event.fields.get("tags") or (), Outcome(None, reason.strip(": ")))
        elif event.type == ev.CONN_CLOSED and conn:
            self._forget(conn, event.fields.get("keys") or ())
        for handler in self._handlers.get(event.type, ()):
            try:
                handler(event)
            except Exception as exc:  # a user callback must not stop the event stream
                KSR.err(f"tlsbridge: handler for {event.type} failed: {exc!r}\n")

    def _remember(self, conn: dict[str, Any], tls: Any, keys: Any = ()) -> None:
        sht = _ksr().htable
        if self.facts_in_htable and conn.get("hairpin") and tls:
            sht.sht_sets(self.htable, conn["hairpin"], encode_json_entry(conn, tls).decode())
        for key in keys:
            if key:
                sht.sht_sets(self.htable, f"o:{key}", conn["peer"])

    def _forget(self, conn: ConnRef, keys: Any) -> None:
        # Only entries still naming this connection: ports and addresses get reused.
        sht = _ksr().htable
        if self.facts_in_htable and conn.hairpin:
            raw = sht.sht_get(self.htable, conn.hairpin)
            if raw and decode_json_entry(raw).get("conn", {}).get("id") == conn.id:
                sht.sht_rm(self.htable, conn.hairpin)
        for key in keys:
            if sht.sht_get(self.htable, f"o:{key}") == conn.peer:
                sht.sht_rm(self.htable, f"o:{key}")

    def _resume(self, tags: Any, outcome: Outcome) -> None:
        """Queue the transactions suspended for this connect (see prepare_relay)."""
        now = time.monotonic()
        for tag in tags:
            if isinstance(tag, dict) and {"i", "l", "r"} <= tag.keys():
                self._waiting.append((now + RESUME_RETRY_FOR, tag, outcome))

    def next_resume(self) -> tuple[int, int, str] | None:
        """The next transaction to continue: (index, label, route), its connect's outcome
        made current for prepare_relay() in that route; then call `resumed()`. KEMI's
        t_continue runs a function of the script, the cfg's a route[] block: the rtimer
        route of native routing calls t_continue itself (kemi/native.py)."""
        if not self._due:
            return None
        deadline, tag, outcome = self._due.pop(0)
        ident = (int(tag["i"]), int(tag["l"]))
        self._outcomes[ident] = outcome
        self._continuing = (deadline, tag, outcome)
        return ident[0], ident[1], str(tag["r"])

    def resumed(self, rc: int) -> None:
        """What t_continue returned for the transaction `next_resume()` gave."""
        if self._continuing is None:
            return
        deadline, tag, outcome = self._continuing
        self._continuing = None
        ident = (int(tag["i"]), int(tag["l"]))
        self._outcomes.pop(ident, None)
        # A worker publishes its connect before it suspends: the outcome can be first.
        if rc < 0 and time.monotonic() < deadline:
            self._waiting.append((deadline, tag, outcome))
        elif rc < 0:
            _ksr().err(f"tlsbridge: transaction {ident} could not be continued\n")

    def resync(self) -> bool:
        """Refill htable from the daemon's connection list (after a gap or a daemon restart)."""
        try:
            reply = self.control.request("list", timeout_ms=max(self.lookup_timeout_ms, 1000))
        except ctl.ControlError as exc:
            _ksr().warn(f"tlsbridge: resync failed: {exc}\n")
            return False
        self.stats["resyncs"] += 1
        KSR = _ksr()
        del KSR
        for item in reply.get("conns", ()):
            if isinstance(item.get("conn"), dict):
                self._remember(item["conn"], item.get("tls"), item.get("keys") or ())
        return True


def default_config_path(script_file: str) -> Path:
    """`tlsbridge.toml` beside the routing script, unless $TLSBRIDGE_CONFIG says otherwise."""
    return Path(os.environ.get("TLSBRIDGE_CONFIG") or Path(script_file).with_name("tlsbridge.toml"))
