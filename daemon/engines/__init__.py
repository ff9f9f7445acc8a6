"""TLS engines behind one sans-IO interface."""

from tlsbridge.daemon.engines.base import TlsEngine, TlsError

__all__ = ["TlsEngine", "TlsError"]
