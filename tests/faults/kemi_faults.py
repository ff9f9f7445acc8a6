# Test-only KEMI routing script for the fault and security tests (never a reference config).
#
# OPTIONS to this server: 200 with X-TLS (the facts the bridge gives, as the reference script)
#   and X-Facts-From (which of the bridge's sources gave them: map_hits, lookups, ...).
# MESSAGE: 200 whose body is the request's body, with X-Body-SHA256 computed here, in Kamailio,
#   over the body it received (the client checks both directions).
# MESSAGE to user "flood" with "X-Flood: N": N replies, each carrying the request's body.
# MESSAGE to user "sink": no reply; htable tlsb counts sink_ok (the body's sha256 equals its
#   X-Body-SHA256 header) or sink_bad.
# OPTIONS to user "close": 200, then Kamailio closes the hairpin (tcpops).
# With TLSB_FAULTS_NO_EVENTS=1 in Kamailio's environment, the rtimer never subscribes to events.

import hashlib
import os
import site
import sys

if os.environ.get("TLSBRIDGE_VENV"):
    _v = sys.version_info
    site.addsitedir(f"{os.environ['TLSBRIDGE_VENV']}/lib/python{_v.major}.{_v.minor}/site-packages")

import KSR

from tlsbridge.kemi import TlsBridge

bridge = TlsBridge(os.environ["TLSBRIDGE_CONFIG"])
NO_EVENTS = os.environ.get("TLSB_FAULTS_NO_EVENTS") == "1"
FACTS_SOURCES = ("cache_hits", "map_hits", "htable_hits", "lookups", "lookup_failures")


def mod_init():
    return kamailio()


class kamailio:
    def child_init(self, rank):
        return bridge.child_init(rank)

    def ksr_reply_route(self, msg):
        return 1

    def ksr_onsend_route(self, msg):
        return 1

    def ksr_tlsb_timer(self, msg, evname=None):
        if NO_EVENTS:
            return 1
        return bridge.drain_events()

    def ksr_request_route(self, msg):
        if KSR.is_ACK():
            return 1
        user = KSR.pv.get("$rU") or ""
        if KSR.is_MESSAGE():
            body = KSR.pv.get("$rb") or ""
            digest = hashlib.sha256(body.encode("utf-8", "surrogateescape")).hexdigest()
            if user == "sink":  # no reply: count in htable whether the body arrived intact
                intact = digest == (KSR.pv.get("$hdr(X-Body-SHA256)") or "")
                KSR.htable.sht_inc("tlsb", "sink_ok" if intact else "sink_bad")
                return 1
            KSR.hdr.append_to_reply(f"X-Body-SHA256: {digest}\r\n")
            KSR.hdr.append_to_reply(f"X-Body-Length: {len(body)}\r\n")
            if body:
                KSR.textops.set_reply_body(body, "application/octet-stream")
            count = 1
            if user == "flood":
                count = int(KSR.pv.get("$hdr(X-Flood)") or "1")
            for _ in range(count):
                KSR.sl.sl_send_reply(200, "OK")
            return 1
        if KSR.is_OPTIONS():
            before = dict(bridge.stats)
            found = bridge.connection()
            # Where this message's facts came from: the worker's cache, the facts map, or the
            # look-up (a miss, or an entry refused as stale), as the bridge counted it.
            took = [k for k in FACTS_SOURCES if bridge.stats.get(k) != before.get(k)]
            KSR.hdr.append_to_reply(f"X-Facts-From: {','.join(took) or 'none'}\r\n")
            KSR.hdr.append_to_reply(f"X-Worker: {os.getpid()}\r\n")
            if found is not None:
                t = found.tls
                KSR.hdr.append_to_reply(
                    f"X-TLS: {t.version}; {t.cipher}; sni={t.sni or '-'}; "
                    f"peer={found.conn.peer}; verified={int(t.peer_verified)}\r\n"
                )
            KSR.hdr.append_to_reply(f"X-Source: {KSR.pv.get('$si')}:{KSR.pv.get('$sp')}\r\n")
            KSR.sl.sl_send_reply(200, "OK")
            if user == "close":
                KSR.tcpops.tcp_close_connection()
            return 1
        KSR.sl.sl_send_reply(200, "OK")
        return 1
