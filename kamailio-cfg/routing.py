# tlsbridge reference routing script for Kamailio's app_python3 (KEMI).
#
# A registrar and proxy for any domain, without authentication (a development default: add
# auth before exposing it). TLS is done by the tlsbridge daemon; this script only asks the bridge
# for the TLS facts of a message. Route names mirror Kamailio's native cfg (ksr_route_*).

import os
import site
import sys

# Kamailio embeds Debian's python3: make a virtualenv's packages importable when tlsbridge was
# installed into one (TLSBRIDGE_VENV=/path/to/venv in Kamailio's environment).
if os.environ.get("TLSBRIDGE_VENV"):
    _v = sys.version_info
    site.addsitedir(f"{os.environ['TLSBRIDGE_VENV']}/lib/python{_v.major}.{_v.minor}/site-packages")

import KSR

from tlsbridge.kemi import TlsBridge
from tlsbridge.kemi.bridge import default_config_path

# Reads the daemon's tlsbridge.toml (beside this script, or $TLSBRIDGE_CONFIG) for the hairpin
# address and the ZeroMQ endpoints. Sockets are created later, in each process.
bridge = TlsBridge(default_config_path(__file__))
RR_PRELOADED = -3  # rr's loose_route(): the next hop came from a Route the request arrived with


def mod_init():
    # Reviews the cfg Kamailio runs: an error (no hairpin listener, tls.so, native routes
    # beside cfgengine, ...) is logged and Kamailio does not start.
    bridge.check_kamailio()
    return kamailio()


class kamailio:
    def child_init(self, rank):
        return bridge.child_init(rank)

    # app_python3 5.6 looks these up on every message and leaves a Python error set when they
    # are missing, which then surfaces in the next KSR call: keep them defined.
    def ksr_reply_route(self, msg):
        if bridge.from_websocket():
            # A browser's answer: its .invalid Contact gets the address of its WebSocket.
            KSR.nathelper.add_contact_alias()
        return 1

    def ksr_onsend_route(self, msg):
        return 1

    # -- the rtimer process (kamailio.cfg: rtimer "tlsb") ---------------------------------

    def ksr_tlsb_timer(self, msg, evname=None):
        return bridge.drain_events()

    # -- browsers: the WebSocket upgrade (kamailio.cfg: xhttp event_callback) ----------------

    def ksr_xhttp_event(self, msg, evname=None):
        # Only through a WSS listener of the bridge, only from an Origin it allows.
        return bridge.ws_handshake()

    # -- SIP requests -----------------------------------------------------------------------

    def ksr_request_route(self, msg):
        if bridge.cluster and KSR.pv.get("$rm") == "KDMQ":
            KSR.dmq.handle_message()  # registrations shared between the nodes
            return 1
        bridge.protect_replies()
        if self.ksr_route_reqinit(msg) == -255:
            return 1

        if bridge.from_websocket() and not KSR.is_REGISTER():
            # A browser's Contact host is .invalid: reach it over its WebSocket instead.
            KSR.nathelper.add_contact_alias()

        if KSR.is_CANCEL():
            if KSR.tm.t_check_trans() > 0:
                self.ksr_route_relay(msg)
            return 1

        if self.ksr_route_withindlg(msg) == -255:
            return 1

        if KSR.tmx.t_precheck_trans() > 0:
            KSR.tm.t_check_trans()
            return 1
        if KSR.tm.t_check_trans() == 0:
            return 1

        if bridge.cluster and KSR.dmq.is_from_node() and KSR.rr.loose_route() == RR_PRELOADED:
            # Another node routes a call here by the Path of a phone registered here; path's
            # use_received made its received address the destination.
            if KSR.is_method_in("IS"):
                bridge.record_route()
            self.ksr_route_relay(msg)
            return 1
        KSR.hdr.remove("Route")
        if KSR.is_method_in("IS"):
            # Per branch: TLS peers see the public TLS address, others Kamailio's own.
            bridge.record_route()

        if KSR.is_OPTIONS() and KSR.is_myself_ruri() and KSR.corex.has_ruri_user() < 0:
            self.ksr_route_options(msg)
            return 1

        if KSR.is_REGISTER():
            self.ksr_route_registrar(msg)
            return 1

        if KSR.corex.has_ruri_user() < 0:
            KSR.sl.sl_send_reply(484, "Address Incomplete")
            return 1

        self.ksr_route_location(msg)
        return 1

    def ksr_route_reqinit(self, msg):
        if KSR.maxfwd.process_maxfwd(10) < 0:
            KSR.sl.sl_send_reply(483, "Too Many Hops")
            return -255
        if KSR.sanity.sanity_check(17895, 7) < 0:
            KSR.err(f"malformed SIP request from {KSR.pv.get('$si')}:{KSR.pv.get('$sp')}\n")
            return -255
        return 1

    def ksr_route_withindlg(self, msg):
        if KSR.siputils.has_totag() < 0:
            return 1
        if KSR.rr.loose_route() > 0:
            if ";alias=" in str(KSR.pv.get("$ru") or ""):
                KSR.nathelper.handle_ruri_alias()  # towards a browser: over its WebSocket
            self.ksr_route_relay(msg)
            return -255
        if KSR.is_ACK():
            if KSR.tm.t_check_trans() > 0:
                self.ksr_route_relay(msg)
            return -255
        KSR.sl.sl_send_reply(404, "Not here")
        return -255

    def ksr_route_options(self, msg):
        """OPTIONS to this server: 200, with the TLS facts for traffic through the bridge."""
        found = bridge.connection()
        if found is not None:
            t = found.tls
            KSR.hdr.append_to_reply(
                f"X-TLS: {t.version}; {t.cipher}; sni={t.sni or '-'}; "
                f"peer={found.conn.peer}; verified={int(t.peer_verified)}\r\n"
            )
            if t.peer is not None:  # the client's certificate (mutual TLS)
                KSR.hdr.append_to_reply(
                    f"X-TLS-Client: subject={t.peer.subject.line}; "
                    f"san={','.join(t.peer.san_dns + t.peer.san_uri)}; "
                    f"fingerprint={t.peer.fingerprint_sha256}\r\n"
                )
        KSR.sl.sl_send_reply(200, "OK")

    def ksr_route_registrar(self, msg):
        bridge.prepare_register()
        KSR.registrar.save("location", 0)

    def ksr_route_location(self, msg):
        # Dialled prefixes and domains of [trunk.*] in tlsbridge.toml go to that TLS trunk.
        trunk = bridge.find_trunk()
        if trunk is not None:
            bridge.route_to_trunk(trunk)
            self.ksr_route_relay(msg)
            return
        rc = KSR.registrar.lookup("location")
        if rc < 0 and not KSR.is_myself_ruri():
            # Not one of ours: proxy it to where its R-URI says (sips: over the bridge).
            self.ksr_route_relay(msg)
            return
        if rc < 0:
            KSR.tm.t_newtran()
            if rc in (-1, -3):
                KSR.sl.send_reply(404, "Not Found")
            elif rc == -2:
                KSR.sl.send_reply(405, "Method Not Allowed")
            return
        self.ksr_route_relay(msg)

    def ksr_route_relay(self, msg):
        # TLS targets (sips:, ;transport=tls) go over the bridge, never in plaintext. One with
        # no connection yet: the daemon connects while the transaction waits (no worker
        # blocks), then this route runs again in the rtimer process and relays.
        # It also runs as the resumed transaction's route: return an int (app_python3).
        if bridge.prepare_relay(resume_route="ksr_route_relay") != bridge.RELAY:
            return 1
        KSR.tm.t_on_branch("ksr_branch_manage")
        if KSR.tm.t_relay() < 0:
            # tm has already replied (e.g. 477 when a TLS peer has no connection)
            KSR.err(f"relaying {KSR.pv.get('$rm')} to {KSR.pv.get('$ru')} failed\n")
        return 1

    def ksr_branch_manage(self, msg):
        """Each branch decides its own transport and Record-Route (forking to TLS and UDP)."""
        return bridge.prepare_branch()
