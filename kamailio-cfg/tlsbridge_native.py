# tlsbridge for native cfg routing: kamailio.cfg loads this file with
#   modparam("app_python3", "load", "/etc/kamailio/tlsbridge_native.py")
# (no cfgengine) and its routes call python_exec("tlsb_relay", "RELAY") and the like
# (docs/migration.md, "Native cfg routing").

import os
import site
import sys

# Kamailio embeds Debian's python3: make a virtualenv's packages importable when tlsbridge was
# installed into one (TLSBRIDGE_VENV=/path/to/venv in Kamailio's environment).
if os.environ.get("TLSBRIDGE_VENV"):
    _v = sys.version_info
    site.addsitedir(f"{os.environ['TLSBRIDGE_VENV']}/lib/python{_v.major}.{_v.minor}/site-packages")

from tlsbridge.kemi import native
from tlsbridge.kemi.bridge import default_config_path


def mod_init():
    # tlsbridge.toml beside this file, or $TLSBRIDGE_CONFIG; refuses a cfg that breaks TLS.
    return native.mod_init(default_config_path(__file__))
