"""The sans-IO TLS engine interface: ciphertext in, plaintext out and back, no sockets; and
the verify verdict every engine reports alike.

The relay only speaks to `TlsEngine`, so the TLS library behind it can change per listener.
Every engine runs the same test suite (tests/unit/test_engines.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from tlsbridge.shared.facts import VERIFY_ERROR_NO_PEER_CERT, VERIFY_ERROR_NOT_VERIFIED, TlsFacts

READ_CHUNK = 64 * 1024


class TlsError(Exception):
    """The TLS conversation failed; `reason` is short and stable enough for events."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class TlsEngine(ABC):
    name: str

    @abstractmethod
    def receive(self, ciphertext: bytes) -> None:
        """Ciphertext that arrived from the peer."""

    @abstractmethod
    def receive_eof(self) -> None:
        """The peer's TCP stream ended."""

    @abstractmethod
    def handshake(self) -> bool:
        """Advance the handshake; True once complete. Raises TlsError."""

    @abstractmethod
    def read(self) -> bytes:
        """All plaintext available now (b"" if none). Sets `peer_closed` at close_notify."""

    @abstractmethod
    def write(self, plaintext: bytes) -> None:
        """Encrypt; the records appear in `outgoing()`."""

    @abstractmethod
    def close_notify(self) -> None:
        """Queue our close_notify."""

    @abstractmethod
    def outgoing(self) -> bytes:
        """Ciphertext to send to the peer (b"" if none)."""

    @abstractmethod
    def facts(self) -> TlsFacts:
        """The facts of the completed handshake."""

    peer_closed: bool = False
    handshake_done: bool = False
    # The engine writes its own socket: outgoing() is always empty and need not be asked.
    writes_itself: bool = False


def verdict(*, peer_cert: bool, verifying: bool, error: str | None) -> tuple[bool, str | None]:
    """`(peer_verified, verify_error)` of a finished handshake, the same for every engine: no
    peer certificate, or none asked to be verified, is unverified whatever the library says;
    otherwise the certificate is verified exactly when verification found no `error`."""
    if not peer_cert:
        return False, VERIFY_ERROR_NO_PEER_CERT
    if not verifying:
        return False, VERIFY_ERROR_NOT_VERIFIED
    return error is None, error
