"""Sans-IO TLS engines: ciphertext in, plaintext out and back, no sockets.

The relay only speaks to `TlsEngine`, so the TLS library behind it can change per listener.
"""

from __future__ import annotations

import ssl
from abc import ABC, abstractmethod

from tlsbridge.shared.facts import CertInfo, TlsFacts

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
    def close(self) -> None:
        """Queue our close_notify."""

    @abstractmethod
    def outgoing(self) -> bytes:
        """Ciphertext to send to the peer (b"" if none)."""

    @abstractmethod
    def facts(self) -> TlsFacts:
        """The facts of the completed handshake."""

    peer_closed: bool = False
    handshake_done: bool = False


class OpenSSLEngine(TlsEngine):
    """Python's ssl module (OpenSSL) on memory BIOs."""

    name = "openssl"

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        local_cert: CertInfo | None = None,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        self._local_cert = local_cert
        self.peer_closed = False
        self.handshake_done = False

    def receive(self, ciphertext: bytes) -> None:
        self._in.write(ciphertext)

    def receive_eof(self) -> None:
        self._in.write_eof()

    def handshake(self) -> bool:
        if self.handshake_done:
            return True
        try:
            self._obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:
            raise TlsError("verify_failed", exc.verify_message or str(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise TlsError("eof_in_handshake", "peer closed during the handshake") from None
        except ssl.SSLError as exc:
            raise TlsError("handshake_failed", exc.reason or str(exc)) from None
        self.handshake_done = True
        return True

    def read(self) -> bytes:
        chunks = []
        while not self.peer_closed:
            try:
                chunk = self._obj.read(READ_CHUNK)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                self.peer_closed = True
                break
            except ssl.SSLEOFError:
                # TCP FIN without close_notify: the stream still ends here.
                self.peer_closed = True
                break
            except ssl.SSLError as exc:
                raise TlsError("tls_error", exc.reason or str(exc)) from None
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        try:
            self._obj.write(plaintext)
        except ssl.SSLError as exc:
            raise TlsError("tls_error", exc.reason or str(exc)) from None

    def close(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is queued; the peer's may come later
        except ssl.SSLError:
            pass  # nothing more can be said on a broken session

    def outgoing(self) -> bytes:
        return self._out.read()

    def facts(self) -> TlsFacts:
        from tlsbridge.daemon.certinfo import facts_from_ssl

        sni = getattr(self._obj, "tlsb_sni", None)
        return facts_from_ssl(self._obj, sni=sni, local=self._local_cert, engine=self.name)
