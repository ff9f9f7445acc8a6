"""Why a connection closed or failed: the `reason` of `tls.failed`, `hairpin.failed`,
`conn.closed` and `outbound.failed` events, one constant per value on the wire.

The KEMI side and `tlsbridge events` read these strings; a new value is a new constant here.
"""

from __future__ import annotations

# -- the end of an established connection (conn.closed) -------------------------------------
CLOSED = "closed"  # both sides ended cleanly
PEER_CLOSED = "peer_closed"
PEER_RESET = "peer_reset"
KAMAILIO_CLOSED = "kamailio_closed"
KAMAILIO_RESET = "kamailio_reset"
KILLED = "killed"  # the control op `kill`
SHUTDOWN = "shutdown"
IDLE_TIMEOUT = "idle_timeout"  # an outbound connection without traffic
WORKER_DIED = "worker_died"  # published by the supervisor for its dead worker's connections
ENGINE_FAILED = "engine_failed"  # no TLS engine could be created for the listener

# -- TLS and hairpin failures (tls.failed, hairpin.failed; then conn.closed) ---------------
HANDSHAKE_FAILED = "handshake_failed"
# The one name of a TLS handshake not done in time, whichever side started it.
HANDSHAKE_TIMEOUT = "handshake_timeout"
EOF_IN_HANDSHAKE = "eof_in_handshake"
VERIFY_FAILED = "verify_failed"
SNI_REFUSED = "sni_refused"
TLS_ERROR = "tls_error"  # a broken record or alert after the handshake
HAIRPIN_FAILED = "hairpin_failed"

# -- admission (tls.failed before any TLS) --------------------------------------------------
TOO_MANY_CONNECTIONS = "too_many_connections"
TOO_MANY_FROM_IP = "too_many_from_ip"
# The supervisor's answer for a connection whose close came before its admission request.
CLOSED_BEFORE_ADMISSION = CLOSED

# -- outbound connects (outbound.failed) ----------------------------------------------------
DNS_FAILED = "dns_failed"
CONNECT_FAILED = "connect_failed"
# No TCP connection to the server in time (its TLS handshake late is HANDSHAKE_TIMEOUT).
CONNECT_TIMEOUT = "timeout"
