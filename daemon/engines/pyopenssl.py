"""The `pyopenssl` engine: pyOpenSSL (the OpenSSL bundled with `cryptography`) on memory BIOs.

Unlike the stdlib `ssl` module it can request a client certificate, accept it whatever the
verification says and report the verdict: verify_client = "optional_no_ca"; it also restricts
TLS 1.3 suites and takes a list of groups, on client profiles as well as server ones (the
same helpers build both).

SNI profiles: each profile has its own Context and the connection switches to the chosen one
in the server-name callback. OpenSSL takes the certificate, trust store (CA list, CRLs), TLS 1.2
ciphers and ALPN from the new Context, but keeps the verify mode (set again on the connection
here) and what it fixed before the callback: versions, TLS 1.3 suites, groups and verify depth,
which the registry therefore wants equal across a listener's profiles.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, load_pem_private_key
from OpenSSL import SSL, crypto

from tlsbridge.daemon import keylog
from tlsbridge.daemon.certinfo import cert_info_from_der
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.base import READ_CHUNK, TlsEngine, TlsError, verdict
from tlsbridge.daemon.engines.checks import listed, pem_crls
from tlsbridge.daemon.sni import SniRouter, refusal
from tlsbridge.shared.addr import is_ip
from tlsbridge.shared.facts import CertInfo, TlsFacts

__all__ = ["PyOpenSSLEngine", "client_context", "listener_context", "server_context"]

SERVER_VERIFY_MODES = ("off", "optional", "on", "optional_no_ca")
_VERSIONS = {"TLSv1.2": SSL.TLS1_2_VERSION, "TLSv1.3": SSL.TLS1_3_VERSION}
_VERIFY_FLAGS = {
    "off": SSL.VERIFY_NONE,
    "optional": SSL.VERIFY_PEER,
    "on": SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT,
    "optional_no_ca": SSL.VERIFY_PEER,
}
# A TCP FIN without close_notify ends the peer's half of the stream, as close_notify does:
# OpenSSL 3 would otherwise fail the session, and the replies still due to the peer with it.
# (Python's ssl sets this option by default; pyOpenSSL has no name for it.)
_IGNORE_UNEXPECTED_EOF = (getattr(SSL, "OP_IGNORE_UNEXPECTED_EOF", 0) or (
    1 << 7 if SSL.OPENSSL_VERSION_NUMBER >= 0x30000000 else 0))
# Renegotiation is a DoS vector and SIP has no use for it; tickets cost CPU for clients
# that rarely resume (see the openssl engine's server_context).
_SERVER_OPTIONS = (
    SSL.OP_NO_COMPRESSION
    | SSL.OP_CIPHER_SERVER_PREFERENCE
    | SSL.OP_NO_TICKET
    | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
    | _IGNORE_UNEXPECTED_EOF
)
_ALERT_UNRECOGNIZED_NAME = 112  # RFC 6066


class _ConnState:
    """Per-connection data that the context-wide callbacks reach through app data."""

    __slots__ = ("failure", "hostname", "profile", "rejected", "sni", "verify_error")

    def __init__(self, hostname: str | None) -> None:
        self.hostname = hostname
        self.sni: str | None = None
        self.verify_error: str | None = None  # the first problem found, even if accepted
        self.rejected = False  # the verify callback failed the handshake
        self.profile: str | None = None  # the SNI profile serving this connection
        self.failure: TlsError | None = None  # why the server-name callback refused


def _reasons(exc: Exception) -> str:
    if not isinstance(exc, SSL.Error):
        return str(exc)
    errors = exc.args[0] if exc.args else None
    if isinstance(errors, list) and errors:
        return "; ".join(str(e[-1]) for e in errors if isinstance(e, tuple) and e[-1])
    return str(exc) or type(exc).__name__


def _verify_message(code: int) -> str:
    # pyOpenSSL has no public wrapper for X509_verify_cert_error_string; its private
    # binding has, and the stdlib engine reports the very same strings.
    try:
        from OpenSSL._util import ffi, lib

        return ffi.string(lib.X509_verify_cert_error_string(code)).decode()
    except Exception:
        return f"certificate verify error {code}"


def _hostname_matches(cert: x509.Certificate, host: str) -> bool:
    """RFC 6125 matching against subjectAltName only, as browsers and OpenSSL 3 do."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return False
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None:
        return ip in san.get_values_for_type(x509.IPAddress)
    want = host.rstrip(".").encode("idna").decode("ascii").lower()
    for pattern in san.get_values_for_type(x509.DNSName):
        pat = pattern.rstrip(".").lower()
        if pat == want:
            return True
        # A wildcard covers exactly the whole left-most label, never a public suffix alone.
        if pat.startswith("*.") and "." in pat[2:] and "." in want:
            label, rest = want.split(".", 1)
            if label and rest == pat[2:]:
                return True
    return False


def _verify_callback(accept_any: bool) -> Callable[..., bool]:
    def verify(conn: SSL.Connection, cert: crypto.X509, code: int, depth: int, ok: int) -> bool:
        try:
            state = conn.get_app_data()
            message = None if ok else _verify_message(code)
            if (ok and depth == 0 and state.hostname
                    and not _hostname_matches(cert.to_cryptography(), state.hostname)):
                ok, message = 0, "hostname mismatch"
            if message is not None and state.verify_error is None:
                state.verify_error = message
            if ok or accept_any:
                return True
            state.rejected = True
            return False
        except Exception as exc:  # never let an exception cross into OpenSSL
            with contextlib.suppress(Exception):
                state = conn.get_app_data()
                state.verify_error = f"verify callback failed: {exc!r}"
                state.rejected = True
            return False

    return verify


def _remember_sni(conn: SSL.Connection) -> None:
    # The server name is only visible during the handshake; keep it for the facts.
    try:
        name = conn.get_servername()
        conn.get_app_data().sni = None if name is None else name.decode("ascii", "replace")
    except Exception:
        pass


def _select_alpn(
    ours: Sequence[bytes],
) -> Callable[[SSL.Connection, list[bytes]], Any]:
    def select(_conn: SSL.Connection, offered: list[bytes]) -> Any:
        # Server preference, like OpenSSL's SSL_select_next_proto; no overlap = no ALPN.
        for proto in ours:
            if proto in offered:
                return proto
        return SSL.NO_OVERLAPPING_PROTOCOLS

    return select


def _keylog(ctx: SSL.Context) -> None:
    if keylog.path():
        ctx.set_keylog_callback(lambda _conn, line: keylog.append(line))


def _load_key(ctx: SSL.Context, path: str | os.PathLike[str], password: str | None) -> None:
    """Decrypted by cryptography (OpenSSL alone would prompt on the terminal for a passphrase
    of an encrypted key); raises ValueError saying what is wrong."""
    data = Path(path).read_bytes()
    try:
        key = load_pem_private_key(data, password.encode() if password else None)
    except TypeError:
        raise ValueError("the private key is encrypted: set private_key_password"
                         if not password else "the private key is not encrypted, yet a "
                         "password is set") from None
    except ValueError:
        raise ValueError("wrong password for the encrypted private key, or not a PEM key"
                         ) from None
    ctx.use_privatekey(key)  # type: ignore[arg-type]


class _Served(NamedTuple):
    """One profile's server side: what choosing it by SNI puts on a connection."""

    name: str
    ctx: SSL.Context
    verify_mode: int
    verify_callback: Callable[..., bool] | None


def _served(profile: ServerProfile) -> _Served:
    where = f"profile '{profile.name}'"
    if profile.verify_client not in SERVER_VERIFY_MODES:
        raise ConfigError(f"{where}: verify_client {profile.verify_client!r} is not one of "
                          f"{', '.join(SERVER_VERIFY_MODES)}")
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_options(_SERVER_OPTIONS)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    _settings(where, ctx, profile)
    _identity(where, ctx, profile)
    _trust(where, ctx, profile)
    mode = _VERIFY_FLAGS[profile.verify_client]
    callback = None
    if mode == SSL.VERIFY_NONE:
        ctx.set_verify(mode)
    else:
        callback = _verify_callback(profile.verify_client == "optional_no_ca")
        ctx.set_verify(mode, callback)
    # Even when not verifying: a connection switched by SNI to a profile that verifies keeps
    # the depth of the context it started with.
    ctx.set_verify_depth(profile.verify_depth)
    if profile.alpn:
        ctx.set_alpn_select_callback(_select_alpn([p.encode() for p in profile.alpn]))
    return _Served(profile.name, ctx, mode, callback)


Profile = ServerProfile | ClientProfile


def _settings(where: str, ctx: SSL.Context, profile: Profile) -> None:
    """What server and client contexts take alike: versions, TLS 1.2 ciphers, TLS 1.3 suites,
    groups, the key log, and idle connections without record buffers."""
    # As Python's ssl module does: an idle connection gives its 16 KiB read and write buffers
    # back (pyOpenSSL leaves them on: 26 KiB more per idle connection, measured).
    ctx.set_mode(SSL.MODE_RELEASE_BUFFERS)
    ctx.set_min_proto_version(_VERSIONS[profile.min_version])
    ctx.set_max_proto_version(_VERSIONS[profile.max_version])
    if profile.ciphers:
        try:
            ctx.set_cipher_list(profile.ciphers.encode("ascii"))
        except (SSL.Error, UnicodeEncodeError):
            raise ConfigError(f"{where}: no usable cipher in '{profile.ciphers}'") from None
    if profile.tls13_ciphersuites:
        _tls13_suites(where, ctx, profile.tls13_ciphersuites)
    if profile.groups:
        _groups(where, ctx, profile.groups)
    _keylog(ctx)


def _identity(where: str, ctx: SSL.Context, profile: Profile) -> None:
    """Our certificate chain and key."""
    assert profile.certificate is not None and profile.private_key is not None
    try:
        ctx.use_certificate_chain_file(str(profile.certificate))
        _load_key(ctx, profile.private_key, profile.private_key_password)
        ctx.check_privatekey()
    except (SSL.Error, ValueError, OSError) as exc:
        raise ConfigError(
            f"{where}: certificate {profile.certificate} and key {profile.private_key} "
            f"cannot be used: {_reasons(exc)}"
        ) from None


def _trust(where: str, ctx: SSL.Context, profile: Profile) -> None:
    for what, cafile, capath in (("CA list", profile.ca_list, None),
                                 ("CA path", None, profile.ca_path)):
        if cafile is None and capath is None:
            continue
        try:
            ctx.load_verify_locations(cafile and os.fspath(cafile), capath and os.fspath(capath))
        except SSL.Error as exc:
            raise ConfigError(f"{where}: {what} {cafile or capath} unusable: "
                              f"{_reasons(exc)}") from None
    if profile.crl is not None:
        store = ctx.get_cert_store()
        assert store is not None  # every SSL_CTX has one
        for crl in pem_crls(where, profile.crl):
            store.add_crl(crl)
        # As the openssl engine (VERIFY_CRL_CHECK_LEAF): the peer's own certificate is checked,
        # and a CRL of its issuer must be there.
        store.set_flags(crypto.X509StoreFlags.CRL_CHECK)


def _tls13_suites(where: str, ctx: SSL.Context, suites: str) -> None:
    names = listed(where, "tls13_ciphersuites", suites)
    # OpenSSL drops the names it does not know as long as one is left: ask it what it kept.
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    try:
        probe.set_tls13_ciphersuites(":".join(names).encode("ascii"))
        kept = set(SSL.Connection(probe, None).get_cipher_list())
    except SSL.Error:
        kept = set()
    unknown = [n for n in names if n not in kept]
    if unknown:
        raise ConfigError(f"{where}: 'tls13_ciphersuites': unknown TLS 1.3 suite "
                          f"{unknown[0]!r}")
    ctx.set_tls13_ciphersuites(":".join(names).encode("ascii"))


def _groups(where: str, ctx: SSL.Context, groups: str) -> None:
    # pyOpenSSL has set_tmp_ecdh for one curve only; cryptography's binding has the list call.
    from OpenSSL._util import lib

    names = listed(where, "groups", groups)
    setter = getattr(lib, "SSL_CTX_set1_curves_list", None)
    if setter is None:
        raise ConfigError(f"{where}: 'groups' needs SSL_CTX_set1_curves_list, which this "
                          "cryptography build does not expose")
    probe = SSL.Context(SSL.TLS_SERVER_METHOD)
    for name in names:
        if setter(probe._context, name.encode("ascii")) != 1:
            lib.ERR_clear_error()  # or pyOpenSSL reports it with the next unrelated error
            raise ConfigError(f"{where}: 'groups': unknown group {name!r}")
    if setter(ctx._context, ":".join(names).encode("ascii")) != 1:
        lib.ERR_clear_error()
        raise ConfigError(f"{where}: 'groups': OpenSSL refuses {groups!r}")


def server_context(profile: ServerProfile) -> SSL.Context:
    """A server context for `profile`; raises ConfigError naming the profile and the file."""
    ctx = _served(profile).ctx
    ctx.set_tlsext_servername_callback(_remember_sni)
    return ctx


def listener_context(
    default: ServerProfile, sni_profiles: Sequence[ServerProfile], *, strict: bool
) -> SSL.Context:
    """The default profile's context; its server-name callback switches each connection to
    the profile serving the name (daemon/sni.py), or refuses it with unrecognized_name when
    `strict` and none does. Raises ConfigError naming the profile."""
    base = _served(default)
    router = SniRouter(base, ((p.server_names, _served(p)) for p in sni_profiles),
                       strict=strict)
    _on_server_name(base.ctx, functools.partial(_switch, router))
    return base.ctx


def _switch(router: SniRouter[_Served], conn: SSL.Connection) -> bool:
    """Serve `conn` with the profile its SNI names; False refuses the handshake."""
    state: _ConnState = conn.get_app_data()
    _remember_sni(conn)
    chosen = router.choose(state.sni)
    if chosen is None:
        state.failure = TlsError("sni_refused", refusal(state.sni))
        return False
    state.profile = chosen.name
    if chosen is not router.default:
        conn.set_context(chosen.ctx)
        # SSL_set_SSL_CTX leaves the verify mode the connection was created with.
        conn.set_verify(chosen.verify_mode, chosen.verify_callback)
    return True


def _on_server_name(ctx: SSL.Context, choose: Callable[[SSL.Connection], bool]) -> None:
    """Context.set_tlsext_servername_callback, able to refuse: pyOpenSSL's own wrapper only
    refuses when the callback raises, and then prints a traceback for every such handshake."""
    from OpenSSL._util import ffi, lib

    def callback(ssl: Any, alert: Any, _arg: Any) -> int:
        try:
            if choose(SSL.Connection._reverse_mapping[ssl]):
                return int(lib.SSL_TLSEXT_ERR_OK)
        except Exception as exc:  # never let an exception cross into OpenSSL
            with contextlib.suppress(Exception):
                state = SSL.Connection._reverse_mapping[ssl].get_app_data()
                state.failure = TlsError("handshake_failed", f"SNI callback failed: {exc!r}")
        alert[0] = _ALERT_UNRECOGNIZED_NAME
        return int(lib.SSL_TLSEXT_ERR_ALERT_FATAL)

    # Kept where pyOpenSSL keeps its own, so the callback lives as long as the context.
    ctx._tlsext_servername_callback = ffi.callback("int (*)(SSL *, int *, void *)", callback)
    lib.SSL_CTX_set_tlsext_servername_callback(ctx._context, ctx._tlsext_servername_callback)


def client_context(profile: ClientProfile, *, alpn: Sequence[str] = ()) -> SSL.Context:
    """A client context for `profile`, with the server-side helpers: versions, ciphers, TLS 1.3
    suites, groups, CA list / path and CRL (the server's own certificate is checked, and its
    issuer must have a CRL in `crl`). Neither `ca_list` nor `ca_path`: the system's CAs. The
    server's name is checked by the engine (server_hostname). Raises ConfigError naming the
    client profile."""
    where = f"client profile '{profile.name}'"
    ctx = SSL.Context(SSL.TLS_CLIENT_METHOD)
    ctx.set_options(SSL.OP_NO_COMPRESSION | getattr(SSL, "OP_NO_RENEGOTIATION", 0)
                    | _IGNORE_UNEXPECTED_EOF)
    _settings(where, ctx, profile)
    if profile.certificate is not None:
        _identity(where, ctx, profile)
    if profile.verify_server:
        if profile.ca_list is None and profile.ca_path is None:
            ctx.set_default_verify_paths()
        _trust(where, ctx, profile)
        ctx.set_verify(SSL.VERIFY_PEER, _verify_callback(accept_any=False))
    else:
        ctx.set_verify(SSL.VERIFY_NONE)
    ctx.set_verify_depth(profile.verify_depth)
    if alpn:
        ctx.set_alpn_protos([p.encode() for p in alpn])
    return ctx


class PyOpenSSLEngine(TlsEngine):
    """pyOpenSSL's `SSL.Connection(ctx, None)`: OpenSSL on memory BIOs."""

    name = "pyopenssl"

    def __init__(
        self,
        ctx: SSL.Context,
        *,
        server_side: bool,
        server_hostname: str | None = None,
        sni: str | None = None,
        local_cert: CertInfo | None = None,
        local_by_profile: dict[str, CertInfo] | None = None,
    ) -> None:
        """`server_hostname` is checked against the server's certificate and is the default
        SNI (never for an IP literal); `sni` overrides the name sent, "" sends none.
        `local_by_profile`: our certificate by profile name, for contexts that switch by SNI."""
        self._conn = SSL.Connection(ctx, None)
        self._state = _ConnState(None if server_side else server_hostname)
        self._conn.set_app_data(self._state)
        self._local_cert = local_cert
        self._local_by_profile = local_by_profile or {}
        self._eof = False
        self._failure: TlsError | None = None
        if server_side:
            self._conn.set_accept_state()
        else:
            if sni is None and server_hostname and not is_ip(server_hostname):
                sni = server_hostname
            if sni:
                self._conn.set_tlsext_host_name(sni.encode("idna"))
                self._state.sni = sni
            self._conn.set_connect_state()
        self.peer_closed = False
        self.handshake_done = False

    def receive(self, ciphertext: bytes) -> None:
        if ciphertext:  # BIO_write of nothing is an error
            self._conn.bio_write(ciphertext)

    def receive_eof(self) -> None:
        self._eof = True
        self._conn.bio_shutdown()

    def _is_eof(self, exc: Exception) -> bool:
        if isinstance(exc, SSL.ZeroReturnError | SSL.SysCallError):
            return True
        # OpenSSL 3 reports a FIN without close_notify as an error, or as none at all.
        errors = exc.args[0] if exc.args else None
        return self._eof and (not errors or "unexpected eof" in _reasons(exc).lower())

    def handshake(self) -> bool:
        if self.handshake_done:
            return True
        if self._failure is not None:
            raise self._failure
        try:
            self._conn.do_handshake()
        except SSL.WantReadError:
            return False
        except SSL.Error as exc:
            if self._state.failure is not None:
                failure = self._state.failure
            elif self._state.rejected:
                failure = TlsError("verify_failed", self._state.verify_error or _reasons(exc))
            elif self._is_eof(exc):
                failure = TlsError("eof_in_handshake", "peer closed during the handshake")
            else:
                failure = TlsError("handshake_failed", _reasons(exc))
            self._failure = failure
            raise failure from None
        self.handshake_done = True
        return True

    def read(self) -> bytes:
        if not self.handshake_done:
            return b""
        chunks = []
        while not self.peer_closed:
            try:
                chunk = self._conn.recv(READ_CHUNK)
            except SSL.WantReadError:
                break
            except SSL.ZeroReturnError:
                self.peer_closed = True
                break
            except SSL.Error as exc:
                if self._is_eof(exc):
                    # TCP FIN without close_notify: the stream still ends here.
                    self.peer_closed = True
                    break
                raise TlsError("tls_error", _reasons(exc)) from None
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        view = memoryview(plaintext)
        try:
            while view:
                view = view[self._conn.send(view) :]
        except SSL.Error as exc:
            raise TlsError("tls_error", _reasons(exc)) from None

    def close_notify(self) -> None:
        with contextlib.suppress(SSL.Error):  # nothing more can be said on a broken session
            self._conn.shutdown()

    def outgoing(self) -> bytes:
        chunks = []
        while True:
            try:
                chunks.append(self._conn.bio_read(READ_CHUNK))
            except SSL.WantReadError:
                break
        return b"".join(chunks)

    def _resumed(self) -> bool:
        # pyOpenSSL has no wrapper for SSL_session_reused; our server contexts never resume.
        try:
            from OpenSSL._util import lib

            return bool(lib.SSL_session_reused(self._conn._ssl))  # type: ignore[attr-defined]
        except Exception:
            return False

    def facts(self) -> TlsFacts:
        if not self.handshake_done:
            raise ValueError("TLS handshake has not completed")
        cert = self._conn.get_peer_certificate()
        peer: CertInfo | None = None
        if cert is not None:
            # OpenSSL accepted what cryptography cannot parse: report presence only.
            with contextlib.suppress(ValueError):
                peer = cert_info_from_der(cert.to_cryptography().public_bytes(Encoding.DER))
        verified, verify_error = verdict(
            peer_cert=cert is not None, verifying=self._conn.get_verify_mode() != SSL.VERIFY_NONE,
            error=self._state.verify_error)
        alpn = self._conn.get_alpn_proto_negotiated()
        return TlsFacts(
            version=sys.intern(self._conn.get_protocol_version_name()),  # shared, as in
            cipher=sys.intern(self._conn.get_cipher_name() or ""),  # openssl.facts_from_ssl
            cipher_bits=self._conn.get_cipher_bits() or 0,
            sni=self._state.sni,
            alpn=alpn.decode("ascii", "replace") if alpn else None,
            resumed=self._resumed(),
            peer_cert_present=cert is not None,
            peer_verified=verified,
            verify_error=verify_error,
            peer=peer,
            local=self._local_by_profile.get(self._state.profile or "", self._local_cert),
            engine=self.name,
        )
