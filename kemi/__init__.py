"""The KEMI module: TLS facts and transport decisions for a Kamailio app_python3 routing script.

    from tlsbridge.kemi import TlsBridge
    bridge = TlsBridge("/etc/tlsbridge/tlsbridge.toml")
"""

from tlsbridge.kemi.bridge import BridgeConnection, TlsBridge
from tlsbridge.shared.facts import CertInfo, DistinguishedName, TlsFacts

__all__ = ["BridgeConnection", "CertInfo", "DistinguishedName", "TlsBridge", "TlsFacts"]
