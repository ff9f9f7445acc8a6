# Bench only (the "bridge alone" configuration, every system of it: haproxy-alone,
# tlsbridge-alone, tlsbridge@REV-alone): kamailio-cfg/routing.py unchanged, except that OPTIONS
# is answered 200 without asking the bridge for the connection's TLS facts, so HAProxy +
# Kamailio and tlsbridge + Kamailio differ only in what sits in front of Kamailio. The rtimer
# route still drains the daemon's events as in production. It loads the routing.py of its own
# tree (../../kamailio-cfg/), which imports tlsbridge from $TLSBRIDGE_VENV: a tlsbridge@REV
# system runs its commit's copy of this file, or this one copied into the commit's tree.

import importlib.util
import os

_REF = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "kamailio-cfg",
                    "routing.py")
_spec = importlib.util.spec_from_file_location("tlsbridge_reference_routing", _REF)
_ref = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ref)

KSR = _ref.KSR


class kamailio(_ref.kamailio):  # the class name app_python3 expects
    def ksr_route_options(self, msg):
        KSR.sl.sl_send_reply(200, "OK")


def mod_init():
    return kamailio()
