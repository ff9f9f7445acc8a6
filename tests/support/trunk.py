"""A TLS SIP server standing in for a trunk: records what reached it, byte for byte."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

from tests.support.sip import TlsUA


class TrunkConn(TlsUA):
    """One accepted TLS connection, and the SNI it asked for."""

    sni: str | None


class TlsTrunk:
    def __init__(self, cert: Path, key: Path, *, client_ca: Path | None = None) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(str(cert), str(key))
        self.seen_sni: list[str | None] = []
        self.ctx.sni_callback = lambda obj, name, ctx: self.seen_sni.append(name)
        if client_ca is not None:
            self.ctx.load_verify_locations(str(client_ca))
            self.ctx.verify_mode = ssl.CERT_OPTIONAL
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.tcp_accepted = 0
        self.handshake_errors: list[str] = []
        self.app_bytes_before_close: list[int] = []
        self.conns: list[TrunkConn] = []
        self.client_subjects: list[object] = []
        self._cond = threading.Condition()
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                raw, _ = self.listener.accept()
            except (TimeoutError, OSError):
                continue
            self.tcp_accepted += 1
            threading.Thread(target=self._handshake, args=(raw,), daemon=True).start()

    def _handshake(self, raw: socket.socket) -> None:
        raw.settimeout(5)
        try:
            tls = self.ctx.wrap_socket(raw, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            with self._cond:
                self.handshake_errors.append(str(exc))
                self._cond.notify_all()
            # Whatever the client sends after a failed handshake would count as leaked SIP.
            try:
                raw.settimeout(1)
                self.app_bytes_before_close.append(len(raw.recv(65536)))
            except OSError:
                self.app_bytes_before_close.append(0)
            raw.close()
            return
        conn = TrunkConn.accepted(tls)
        conn.sni = self.seen_sni[-1] if self.seen_sni else None
        with self._cond:
            self.client_subjects.append(tls.getpeercert())
            self.conns.append(conn)
            self._cond.notify_all()

    def wait_conn(self, n: int = 1, timeout: float = 5.0) -> TrunkConn:
        with self._cond:
            if not self._cond.wait_for(lambda: len(self.conns) >= n, timeout):
                raise TimeoutError(f"the trunk has {len(self.conns)} connections, wanted {n}")
            return self.conns[n - 1]

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for c in self.conns:
            c.close()


class SilentServer:
    """Accepts TCP and never says a word: a TLS peer that hangs in the handshake."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        self.listener.settimeout(0.2)
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
                self.held.append(conn)
            except (TimeoutError, OSError):
                continue

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for c in self.held:
            c.close()
