"""The `openssl` engine: Python's ssl module (OpenSSL) on memory BIOs."""

from __future__ import annotations

import ssl

from tlsbridge.daemon.engines.base import READ_CHUNK, TlsEngine, TlsError
from tlsbridge.shared.facts import CertInfo, TlsFacts


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
        local_by_profile: dict[str, CertInfo] | None = None,
    ) -> None:
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        # The C object behind ssl.SSLObject, whose methods only forward to it: one Python
        # call less per read, write and handshake step (the wrapper where it is missing).
        self._c = getattr(self._obj, "_sslobj", self._obj)
        # The same for the two BIO calls the relay makes per message: the BIOs' own methods,
        # bound here, stand in for receive() and outgoing() below.
        self.receive = self._in.write  # type: ignore[method-assign,assignment]
        self.outgoing = self._out.read  # type: ignore[method-assign]
        self._local_cert = local_cert
        self._local_by_profile = local_by_profile or {}
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
            self._c.do_handshake()
        except ssl.SSLWantReadError:
            return False
        except ssl.SSLCertVerificationError as exc:
            raise TlsError("verify_failed", exc.verify_message or str(exc)) from None
        except (ssl.SSLEOFError, ssl.SSLZeroReturnError):
            raise TlsError("eof_in_handshake", "peer closed during the handshake") from None
        except ssl.SSLError as exc:
            refused = getattr(self._obj, "tlsb_refused", None)
            if refused:
                raise TlsError("sni_refused", refused) from None
            raise TlsError("handshake_failed", exc.reason or str(exc)) from None
        self.handshake_done = True
        return True

    def read(self) -> bytes:
        chunks = []
        while not self.peer_closed:
            try:
                chunk = self._c.read(READ_CHUNK)
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
            if not (self._in.pending or self._in.eof or self._c.pending()):
                break  # all of it: spare the exception the next read() would raise
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        try:
            self._c.write(plaintext)
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
        local = self._local_by_profile.get(getattr(self._obj, "tlsb_profile", ""), self._local_cert)
        return facts_from_ssl(self._obj, sni=sni, local=local, engine=self.name)
