"""The `openssl` engine: Python's ssl module (OpenSSL) on memory BIOs.

Three parts, in the order a connection meets them: the contexts built from profiles (once per
profile), the engine (one per connection), and the facts of its finished handshake. What the
server-name callback learns during the handshake (the SNI, the profile chosen, a refusal) is
kept on the connection's own `ssl.SSLObject` subclass, `_Connection`, which the engine reads
back.
"""

from __future__ import annotations

import logging
import ssl
import sys
from collections.abc import Sequence
from pathlib import Path

from tlsbridge.daemon import keylog
from tlsbridge.daemon.certinfo import cert_info_from_der
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.base import READ_CHUNK, TlsEngine, TlsError, verdict
from tlsbridge.daemon.engines.checks import pem_crls, usable_certificate
from tlsbridge.daemon.sni import SniTable
from tlsbridge.shared.addr import is_ip
from tlsbridge.shared.facts import CertInfo, TlsFacts

__all__ = [
    "SERVER_VERIFY_MODES", "OpenSSLEngine", "SocketConnection", "client_context", "facts_from_ssl",
    "listener_context", "server_context",
]

log = logging.getLogger(__name__)

# The stdlib ssl module cannot accept a certificate that failed verification.
SERVER_VERIFY_MODES = ("off", "optional", "on")
_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "on": ssl.CERT_REQUIRED}


class _Connection(ssl.SSLObject):
    """The SSLObject of every connection of our contexts, with what the server-name callback
    learns during the handshake and the facts need afterwards."""

    sni: str | None = None  # the name the client sent (server side)
    profile = ""  # the SNI profile serving the connection; "" for the context's own
    refused: str | None = None  # why the server-name callback refused the name


class SocketConnection(ssl.SSLSocket):
    """The same for a connection on its own socket (engines/openssl_socket.py)."""

    sni: str | None = None
    profile = ""
    refused: str | None = None


# ---- contexts ---------------------------------------------------------------------------


def _base(where: str, profile: ServerProfile | ClientProfile, protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
    ctx.sslobject_class = _Connection
    ctx.sslsocket_class = SocketConnection
    if keylog.path():
        ctx.keylog_filename = keylog.path()
    ctx.minimum_version = _VERSIONS[profile.min_version]
    ctx.maximum_version = _VERSIONS[profile.max_version]
    # Renegotiation is a DoS vector and SIP has no use for it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if profile.ciphers:
        try:
            ctx.set_ciphers(profile.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{where}: no usable cipher in '{profile.ciphers}'") from None
    if profile.tls13_ciphersuites:
        raise ConfigError(f"{where}: engine openssl cannot restrict TLS 1.3 suites "
                          "(Python's ssl has no API for it): use engine pyopenssl or gnutls")
    return ctx


def _identity(where: str, ctx: ssl.SSLContext, profile: ServerProfile | ClientProfile) -> None:
    assert profile.certificate is not None
    usable_certificate(where, profile.certificate)
    try:
        ctx.load_cert_chain(str(profile.certificate), str(profile.private_key),
                            password=profile.private_key_password or "")
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if _encrypted(profile.private_key):
            reason = ("the private key is encrypted: set private_key_password"
                      if profile.private_key_password is None
                      else "wrong password for the encrypted private key")
        raise ConfigError(
            f"{where}: certificate {profile.certificate} and key {profile.private_key} "
            f"cannot be used: {reason}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read certificate or key: {exc}") from None


def _encrypted(key: object) -> bool:
    try:
        return b"ENCRYPTED" in Path(str(key)).read_bytes()[:4096]
    except OSError:
        return False


def _trust(where: str, ctx: ssl.SSLContext, profile: ServerProfile | ClientProfile) -> None:
    if profile.crl is not None:
        pem_crls(where, profile.crl)  # OpenSSL would take a file of CA certificates alone
    sources = [("CA list", profile.ca_list, {"cafile": str(profile.ca_list)}),
               ("CA path", profile.ca_path, {"capath": str(profile.ca_path)}),
               ("CRL", profile.crl, {"cafile": str(profile.crl)})]
    for what, path, kw in sources:
        if path is None:
            continue
        try:
            ctx.load_verify_locations(**kw)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}: {what} {path} unusable: {exc}") from None
    if profile.crl is not None:
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def server_context(profile: ServerProfile) -> ssl.SSLContext:
    """A server context for `profile`; raises ConfigError naming the profile and the file."""
    where = f"profile '{profile.name}'"
    if profile.verify_client not in SERVER_VERIFY_MODES:
        raise ConfigError(f"{where}: engine openssl cannot do verify_client = "
                          f"{profile.verify_client!r} (use pyopenssl or gnutls)")
    ctx = _base(where, profile, ssl.PROTOCOL_TLS_SERVER)
    # Tickets cost ~70 us per handshake and SIP clients rarely resume.
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 tickets too
    _identity(where, ctx, profile)
    _trust(where, ctx, profile)
    ctx.verify_mode = _VERIFY[profile.verify_client]
    _groups(where, ctx, profile)
    if profile.alpn:
        ctx.set_alpn_protocols(list(profile.alpn))
    ctx.sni_callback = _remember_sni
    return ctx


def _groups(where: str, ctx: ssl.SSLContext, profile: ServerProfile | ClientProfile) -> None:
    if not profile.groups:
        return
    if ":" in profile.groups:
        raise ConfigError(f"{where}: 'groups': engine openssl takes one group "
                          "(Python's ssl has set_ecdh_curve only)")
    try:
        # OpenSSL 3: SSL_CTX_set1_groups, which restricts what a client offers too.
        ctx.set_ecdh_curve(profile.groups)
    except ValueError:
        raise ConfigError(f"{where}: 'groups': unknown group '{profile.groups}'") from None


def _remember_sni(conn: _Connection, name: str | None, _ctx: ssl.SSLContext) -> None:
    # The server name is only visible during the handshake; keep it for the facts.
    conn.sni = name


def listener_context(
    default: ServerProfile, sni_profiles: Sequence[ServerProfile], *, strict: bool
) -> ssl.SSLContext:
    """The default profile's context, switching to an SNI profile's during the handshake.

    Strict: a name no profile serves (or none at all) is refused with unrecognized_name.
    """
    base = server_context(default)
    table = SniTable((p.server_names, (p.name, server_context(p))) for p in sni_profiles)
    if not table and not strict:
        return base

    def choose(conn: _Connection, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        conn.sni = name
        chosen = table.match(name)
        if chosen is not None:
            conn.profile, conn.context = chosen
            return None
        if strict:
            conn.refused = f"no profile serves the name {name!r}"
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    base.sni_callback = choose  # type: ignore[assignment]
    return base


def client_context(profile: ClientProfile) -> ssl.SSLContext:
    """Host names are checked by the caller's engine (server_hostname), not here."""
    where = f"client profile '{profile.name}'"
    ctx = _base(where, profile, ssl.PROTOCOL_TLS_CLIENT)
    if profile.verify_server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        if profile.ca_list is None and profile.ca_path is None:
            ctx.load_default_certs()
        _trust(where, ctx, profile)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if profile.certificate is not None:
        _identity(where, ctx, profile)
    _groups(where, ctx, profile)
    return ctx


# ---- the engine -------------------------------------------------------------------------


class OpenSSLEngine(TlsEngine):
    """Python's ssl module (OpenSSL) on memory BIOs."""

    name = "openssl"

    # receive() and outgoing() are the memory BIOs' own write and read, bound per engine in
    # __init__: the relay calls them once per message, and a method forwarding to them would
    # cost a Python call each time. None here only tells the interface they are provided.
    receive = outgoing = None  # type: ignore[assignment]

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        local_cert: CertInfo | None = None,
        local_by_profile: dict[str, CertInfo] | None = None,
    ) -> None:
        """`ctx` is one of this module's contexts (its connections are `_Connection`s)."""
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self._obj = ctx.wrap_bio(
            self._in, self._out, server_side=server_side, server_hostname=server_hostname
        )
        # The C object behind ssl.SSLObject, whose methods only forward to it: one Python
        # call less per read, write and handshake step (the wrapper where it is missing).
        self._c = getattr(self._obj, "_sslobj", self._obj)
        self.receive = self._in.write  # type: ignore[assignment]
        self.outgoing = self._out.read  # type: ignore[assignment]
        self._local_cert = local_cert
        self._local_by_profile = local_by_profile or {}
        self.peer_closed = False
        self.handshake_done = False

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
            if self._obj.refused:
                raise TlsError("sni_refused", self._obj.refused) from None
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

    def close_notify(self) -> None:
        try:
            self._obj.unwrap()
        except ssl.SSLWantReadError:
            pass  # our close_notify is queued; the peer's may come later
        except ssl.SSLError:
            pass  # nothing more can be said on a broken session

    def facts(self) -> TlsFacts:
        obj = self._obj
        local = self._local_by_profile.get(obj.profile, self._local_cert)
        return facts_from_ssl(obj, sni=obj.sni, local=local, engine=self.name)


# ---- facts ------------------------------------------------------------------------------


def facts_from_ssl(
    obj: ssl.SSLObject | ssl.SSLSocket,
    *,
    sni: str | None,
    local: CertInfo | None,
    engine: str = "openssl",
    verifying: bool | None = None,
) -> TlsFacts:
    """Collect the TLS facts of a connection whose handshake has completed.

    ``sni`` is what the server side saw in its sni_callback; on the client side pass None
    to use ``obj.server_hostname``. ``local`` is the certificate we presented. ``verifying``:
    whether the peer's certificate was to be verified (None: read from the context).
    Raises ValueError if the handshake has not completed.
    """
    # The C object behind SSLObject/SSLSocket where there is one: their methods only check
    # and forward, five calls per connection.
    c = getattr(obj, "_sslobj", None) or obj
    version = c.version()
    cipher = c.cipher()
    if version is None or cipher is None:
        raise ValueError("TLS handshake has not completed")
    name, _proto, bits = cipher

    if sni is None and not obj.server_side:
        host = obj.server_hostname
        # The ssl module never sends an IP literal as SNI (RFC 6066 forbids it).
        if host and not is_ip(host):
            sni = host

    der = c.getpeercert(True)
    peer: CertInfo | None = None
    if der is not None:
        try:
            peer = cert_info_from_der(der)
        except ValueError:
            # OpenSSL accepted a certificate that cryptography refuses to parse; the
            # connection is still up, so report presence without details.
            log.warning("cannot parse peer certificate", exc_info=True)

    # The ssl module aborts the handshake when verification fails, so a finished handshake
    # with verification on means the peer certificate was verified: no error to report.
    if verifying is None:
        verifying = obj.context.verify_mode != ssl.CERT_NONE
    verified, verify_error = verdict(peer_cert=der is not None, verifying=verifying, error=None)
    return TlsFacts(
        # OpenSSL's few names, shared by every connection's facts (not the peer's SNI: a peer
        # must not grow the interned strings).
        version=sys.intern(version),
        cipher=sys.intern(name),
        cipher_bits=bits,
        sni=sni,
        alpn=c.selected_alpn_protocol(),
        resumed=c.session_reused,
        peer_cert_present=der is not None,
        peer_verified=verified,
        verify_error=verify_error,
        peer=peer,
        local=local,
        engine=engine,
    )
