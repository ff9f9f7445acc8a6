"""The `gnutls` engine: GnuTLS (libgnutls.so.30) through a small ctypes binding.

By layer, each importing only those above it in this list:

- `binding`: the ctypes declarations and the library, loaded once (`UNAVAILABLE` says why not);
- `priority`: profile ciphers, TLS 1.3 suites, groups and versions as a GnuTLS priority
  string, and the negotiated suite's OpenSSL name;
- `context`: `GnuTLSContext`, the credentials and priorities of one profile's side;
- `session`: `GnuTLSEngine`, one session per connection on in-memory transport callbacks.

Importing this package never fails: when the library cannot be loaded, `UNAVAILABLE` says why
and building a context raises `GnuTLSUnavailable`.
"""

from tlsbridge.daemon.engines.gnutls.binding import (
    UNAVAILABLE,
    GnuTLSUnavailable,
    library_version,
)
from tlsbridge.daemon.engines.gnutls.context import (
    SERVER_VERIFY_MODES,
    GnuTLSContext,
    client_context,
    listener_context,
    server_context,
)
from tlsbridge.daemon.engines.gnutls.session import GnuTLSEngine

__all__ = [
    "SERVER_VERIFY_MODES",
    "UNAVAILABLE",
    "GnuTLSContext",
    "GnuTLSEngine",
    "GnuTLSUnavailable",
    "client_context",
    "library_version",
    "listener_context",
    "server_context",
]
