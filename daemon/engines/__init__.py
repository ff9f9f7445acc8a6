"""TLS engines behind one sans-IO interface.

Each module imports only those listed before it (tests/unit/test_import_graph.py checks that
no import cycle runs through them):

- `base`: the interface (`TlsEngine`, `TlsError`) and the verify verdict every engine reports;
- `checks`: what every engine checks alike in a profile (name lists, CRL files, our
  certificate), with errors naming the profile;
- `openssl`, `pyopenssl`, `gnutls` (a package, by layer): one engine each, with the contexts
  it builds from profiles and the facts of its handshakes;
- `registry`: chooses an engine by name and builds its factories; no engine imports it.
"""

from tlsbridge.daemon.engines.base import TlsEngine, TlsError

__all__ = ["TlsEngine", "TlsError"]
