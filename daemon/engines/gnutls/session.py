"""GnuTLS sessions: one `GnuTLSEngine` per connection, on in-memory transport callbacks.

Ciphertext moves through in-memory push/pull callbacks, so the engine is as sans-IO as the
OpenSSL one. Facts use OpenSSL's names where they differ: the version is "TLSv1.3", and the
cipher is the OpenSSL name of the negotiated suite (priority.suite_name).

SNI profiles: each profile has its own credentials and priorities; the post-client-hello
callback reads the name and puts the chosen profile's on the session (certificate, trust,
CRLs, ciphers, groups, certificate request). The TLS version and ALPN are settled before
that callback, so the registry wants them equal across a listener's profiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import ipaddress
import sys
import threading
from ctypes import byref, c_size_t, c_uint, c_void_p
from typing import Any

from cryptography import x509

from tlsbridge.daemon.certinfo import cert_info_from_der
from tlsbridge.daemon.engines.base import READ_CHUNK, TlsEngine, TlsError, verdict
from tlsbridge.daemon.engines.gnutls import binding
from tlsbridge.daemon.engines.gnutls.binding import (
    A_NO_RENEGOTIATION,
    AL_WARNING,
    ALPN_SERVER_PRECEDENCE,
    CERT_IGNORE,
    CERT_REQUEST,
    CERT_REQUIRE,
    CLIENT,
    CRD_CERTIFICATE,
    DT_DNS_HOSTNAME,
    DT_IP_ADDRESS,
    DT_KEY_PURPOSE_OID,
    E_AGAIN,
    E_CERTIFICATE_ERROR,
    E_CERTIFICATE_VERIFICATION_ERROR,
    E_FATAL_ALERT_RECEIVED,
    E_INTERNAL_ERROR,
    E_INTERRUPTED,
    E_REHANDSHAKE,
    E_SHORT_MEMORY_BUFFER,
    E_UNRECOGNIZED_NAME,
    EOF_ERRORS,
    KP_TLS_WWW_CLIENT,
    KP_TLS_WWW_SERVER,
    NAME_DNS,
    NO_SIGNAL,
    NO_TICKETS,
    NONBLOCK,
    SERVER,
    SHUT_WR,
    Datum,
    HelloFunc,
    PullFunc,
    PullTimeoutFunc,
    PushFunc,
    TypedVData,
    VerifyFunc,
    check,
    name_of,
    need_lib,
    status_text,
    strerror,
)
from tlsbridge.daemon.engines.gnutls.context import GnuTLSContext
from tlsbridge.daemon.engines.gnutls.priority import suite_name
from tlsbridge.daemon.sni import SniRouter, refusal
from tlsbridge.shared.addr import is_ip
from tlsbridge.shared.facts import CertInfo, TlsFacts

__all__ = ["GnuTLSEngine"]

_MAX_NONFATAL = 64  # bound on consecutive warnings before giving up

# Plaintext is read into one buffer per thread (the engines of a thread never read at once),
# READ_CHUNK bytes: records land in it one after the other and leave it as one bytes object
# of the right length, with no buffer allocated per read() nor copied per record.
_reading = threading.local()


def _read_buffer() -> tuple[ctypes.Array[ctypes.c_char], int]:
    buf = ctypes.create_string_buffer(READ_CHUNK)
    _reading.buffer = buf, ctypes.addressof(buf)
    return _reading.buffer


class _State:
    """What the C callbacks touch; they hold this, not the engine, so no cycle keeps it."""

    __slots__ = (
        "callback_error", "crl_issuers", "eof", "hostname", "inbuf", "out", "profile", "refused",
        "server_side", "session", "verified", "verify", "verify_error",
    )

    def __init__(self, server_side: bool, verify: str, hostname: str | None) -> None:
        self.inbuf = bytearray()
        self.out = bytearray()
        self.eof = False
        self.session = c_void_p()
        self.server_side = server_side
        self.verify = verify
        self.hostname = hostname
        self.verified = False
        self.verify_error: str | None = None
        self.callback_error: str | None = None
        self.crl_issuers: frozenset[bytes] = frozenset()
        self.profile = ""  # the name of the profile serving this session
        self.refused: str | None = None  # why the SNI was refused


def _callbacks(st: _State, sni: SniRouter[GnuTLSContext] | None) -> tuple[Any, ...]:
    lib = need_lib()

    def fail(where: str, exc: BaseException) -> int:
        st.callback_error = f"{where} callback failed: {exc!r}"
        with contextlib.suppress(BaseException):
            lib.gnutls_transport_set_errno(st.session, errno.EIO)
        return -1

    def push(_ptr: Any, data: int, size: int) -> int:
        try:
            st.out += ctypes.string_at(data, size)
            return size
        except BaseException as exc:
            return fail("push", exc)

    def pull(_ptr: Any, data: int, size: int) -> int:
        try:
            n = min(size, len(st.inbuf))
            if n:
                ctypes.memmove(data, bytes(st.inbuf[:n]), n)
                del st.inbuf[:n]
                return n
            if st.eof:
                return 0
            lib.gnutls_transport_set_errno(st.session, errno.EAGAIN)
            return -1
        except BaseException as exc:
            return fail("pull", exc)

    def pull_timeout(_ptr: Any, _ms: int) -> int:
        # Never wait: the default would select() on the transport pointer as an fd.
        try:
            if st.inbuf or st.eof:
                return 1
            lib.gnutls_transport_set_errno(st.session, errno.EAGAIN)
            return -1
        except BaseException as exc:
            return fail("pull timeout", exc)

    def verify(_session: Any) -> int:
        try:
            return _verify_peer(lib, st)
        except BaseException as exc:
            st.verify_error = f"verify callback failed: {exc!r}"
            return -1

    def hello(_session: Any) -> int:
        # Called again for the second ClientHello after a HelloRetryRequest: same answer.
        try:
            assert sni is not None
            name = _server_name(lib, st.session)
            chosen = sni.choose(name)
            if chosen is None:
                st.refused = refusal(name)
                return E_UNRECOGNIZED_NAME
            _serve_with(lib, st, chosen)
            return 0
        except BaseException as exc:
            st.callback_error = f"SNI callback failed: {exc!r}"
            return E_INTERNAL_ERROR

    return (PushFunc(push), PullFunc(pull), PullTimeoutFunc(pull_timeout),
            VerifyFunc(verify), HelloFunc(hello))


def _serve_with(lib: ctypes.CDLL, st: _State, ctx: GnuTLSContext) -> None:
    """Put a server profile's priorities, credentials and certificate request on a session."""
    s = st.session
    check(lib.gnutls_priority_set(s, ctx.prio), "priority")
    check(lib.gnutls_credentials_set(s, CRD_CERTIFICATE, ctx.cred), "credentials")
    request = {"off": CERT_IGNORE, "on": CERT_REQUIRE}.get(ctx.verify, CERT_REQUEST)
    lib.gnutls_certificate_server_set_request(s, request)
    st.verify = ctx.verify
    st.crl_issuers = ctx.crl_issuers
    st.profile = ctx.name


def _verify_peer(lib: ctypes.CDLL, st: _State) -> int:
    """Called by GnuTLS once the peer's certificate arrived; non-zero aborts the handshake."""
    count = c_uint()
    certs = lib.gnutls_certificate_get_peers(st.session, byref(count))
    if st.verify == "off" or not certs or not count.value:
        return 0  # nothing sent: GNUTLS_CERT_REQUIRE already refuses that when it must
    data = [TypedVData(
        DT_KEY_PURPOSE_OID,
        KP_TLS_WWW_CLIENT if st.server_side else KP_TLS_WWW_SERVER,
        0,
    )]
    if st.hostname:
        try:
            ip = ipaddress.ip_address(st.hostname)
        except ValueError:
            data.append(TypedVData(DT_DNS_HOSTNAME, st.hostname.encode("idna"), 0))
        else:
            data.append(TypedVData(DT_IP_ADDRESS, ip.packed, len(ip.packed)))
    vdata = (TypedVData * len(data))(*data)
    status = c_uint()
    rc = lib.gnutls_certificate_verify_peers(st.session, vdata, len(data), byref(status))
    if rc < 0:
        st.verify_error = strerror(rc)
    elif status.value:
        st.verify_error = status_text(status.value)
    elif st.crl_issuers and _issuer(certs[0]) not in st.crl_issuers:
        st.verify_error = "unable to get certificate CRL"  # OpenSSL's words for it
    else:
        st.verified = True
        return 0
    return 0 if st.verify == "optional_no_ca" else -1


def _server_name(lib: ctypes.CDLL, s: c_void_p) -> str | None:
    """The DNS name the client sent as SNI (server side), or None."""
    size = c_size_t(256)
    for _ in range(2):
        buf = ctypes.create_string_buffer(size.value + 1)
        kind = c_uint()
        rc = lib.gnutls_server_name_get(s, buf, byref(size), byref(kind), 0)
        if rc == E_SHORT_MEMORY_BUFFER:
            continue
        if rc < 0 or kind.value != NAME_DNS:
            return None
        return buf.raw[: size.value].decode("ascii", "replace")
    return None


def _issuer(cert: Datum) -> bytes:
    der = ctypes.string_at(cert.data, cert.size)
    return x509.load_der_x509_certificate(der).issuer.public_bytes()


class GnuTLSEngine(TlsEngine):
    """One GnuTLS session on in-memory transport callbacks."""

    name = "gnutls"

    def __init__(
        self,
        ctx: GnuTLSContext,
        *,
        server_hostname: str | None = None,
        sni: str | None = None,
        local_cert: CertInfo | None = None,
        local_by_profile: dict[str, CertInfo] | None = None,
    ) -> None:
        """The side comes from `ctx`. `server_hostname` is checked against the server's
        certificate and is the default SNI (never for an IP literal); `sni` overrides the
        name sent, "" sends none. `local_by_profile`: our certificate by profile name, for
        a context that chooses profiles by SNI."""
        self._session: c_void_p | None = None
        lib = self._lib = need_lib()
        self._ctx = ctx  # the credentials must outlive the session
        self._local_cert = local_cert if local_cert is not None else ctx.local_cert
        self._local_by_profile = local_by_profile or {}
        self._failure: TlsError | None = None
        self._sni: str | None = None
        server = ctx.server_side
        st = self._st = _State(server, ctx.verify, None if server else server_hostname)
        flags = (SERVER if server else CLIENT) | NONBLOCK | NO_SIGNAL | NO_TICKETS
        check(lib.gnutls_init(byref(st.session), flags), "session")
        self._session = st.session
        # ctypes frees a callback with its last reference
        self._callbacks = _callbacks(st, ctx.sni if server else None)
        push, pull, pull_timeout, verify, hello = self._callbacks
        s = st.session
        lib.gnutls_handshake_set_timeout(s, 0)  # the relay times handshakes out itself
        lib.gnutls_transport_set_push_function(s, push)
        lib.gnutls_transport_set_pull_function(s, pull)
        lib.gnutls_transport_set_pull_timeout_function(s, pull_timeout)
        if ctx.verify != "off" or ctx.sni is not None:  # an SNI profile may verify
            lib.gnutls_session_set_verify_function(s, verify)
        if server:
            _serve_with(lib, st, ctx)
            if ctx.sni is not None:
                lib.gnutls_handshake_set_post_client_hello_function(s, hello)
            # OpenSSL servers send no CA names either; with them a GnuTLS client withholds
            # a certificate from another CA, which optional_no_ca exists to accept.
            lib.gnutls_certificate_send_x509_rdn_sequence(s, 1)
        else:
            check(lib.gnutls_priority_set(s, ctx.prio), "priority")
            check(lib.gnutls_credentials_set(s, CRD_CERTIFICATE, ctx.cred), "credentials")
            st.crl_issuers = ctx.crl_issuers
            if sni is None and server_hostname and not is_ip(server_hostname):
                sni = server_hostname
            if sni:
                raw = sni.encode("idna")
                check(lib.gnutls_server_name_set(s, NAME_DNS, raw, len(raw)), "server name")
                self._sni = sni
        if ctx.alpn:
            flags = ALPN_SERVER_PRECEDENCE if server else 0
            check(lib.gnutls_alpn_set_protocols(s, ctx.alpn, len(ctx.alpn), flags), "ALPN")
        self.peer_closed = False
        self.handshake_done = False

    # -- helpers

    def _live_session(self) -> c_void_p:
        if self._session is None:
            raise TlsError("tls_error", "session already freed")
        return self._session

    def _at_eof(self) -> bool:
        return self._st.eof and not self._st.inbuf

    def _made_progress(self, before: int) -> bool:
        # GnuTLS also answers E_AGAIN after a post-handshake message (a TLS 1.3 ticket,
        # a key update) or a short read: go on while it consumes input that is there, or
        # until it meets the EOF. A partial record without EOF leaves no input: wait.
        left = len(self._st.inbuf)
        return left < before and (left > 0 or self._st.eof)

    def _alert_text(self) -> str:
        lib = self._lib
        name = lib.gnutls_alert_get_name(lib.gnutls_alert_get(self._live_session()))
        return f"received alert: {name.decode() if name else 'unknown'}"

    def _handshake_error(self, rc: int) -> TlsError:
        st = self._st
        if rc == E_FATAL_ALERT_RECEIVED:
            return TlsError("handshake_failed", self._alert_text())
        if rc in EOF_ERRORS and self._at_eof():
            return TlsError("eof_in_handshake", "peer closed during the handshake")
        # Tell the peer why, as OpenSSL does; GnuTLS leaves that to the caller.
        self._lib.gnutls_alert_send_appropriate(self._live_session(), rc)
        if st.refused:
            return TlsError("sni_refused", st.refused)
        if st.callback_error:
            return TlsError("handshake_failed", st.callback_error)
        if st.verify_error and rc in (E_CERTIFICATE_ERROR, E_CERTIFICATE_VERIFICATION_ERROR):
            return TlsError("verify_failed", st.verify_error)
        return TlsError("handshake_failed", strerror(rc))

    # -- TlsEngine

    def receive(self, ciphertext: bytes) -> None:
        self._st.inbuf += ciphertext

    def receive_eof(self) -> None:
        self._st.eof = True

    def handshake(self) -> bool:
        if self.handshake_done:
            return True
        if self._failure is not None:
            raise self._failure
        lib = self._lib
        session = self._live_session()
        for _ in range(_MAX_NONFATAL):
            before = len(self._st.inbuf)
            rc = lib.gnutls_handshake(session)
            if rc == 0:
                self.handshake_done = True
                return True
            if rc in (E_AGAIN, E_INTERRUPTED) and not self._st.callback_error:
                if not self._made_progress(before):
                    return False
                continue
            if not lib.gnutls_error_is_fatal(rc) and not self._st.callback_error:
                continue  # a warning alert: carry on
            break
        self._failure = self._handshake_error(rc)
        raise self._failure

    def read(self) -> bytes:
        if not self.handshake_done:
            return b""
        session = self._session
        if session is None:
            raise TlsError("tls_error", "session already freed")
        lib, st = self._lib, self._st
        try:
            buf, base = _reading.buffer
        except AttributeError:
            buf, base = _read_buffer()
        chunks = []
        got = nonfatal = 0  # bytes in buf; warnings in a row
        while not self.peer_closed:
            if st.eof and not st.inbuf and not lib.gnutls_record_check_pending(session):
                # TCP FIN without close_notify after the last whole record: the stream ends
                # here. (Asked for more, GnuTLS would invalidate the session, and with it the
                # replies still due to the peer.)
                self.peer_closed = True
                break
            before = len(st.inbuf)
            n = lib.gnutls_record_recv(session, base + got, READ_CHUNK - got)
            if n > 0:
                got += n
                nonfatal = 0
                if got == READ_CHUNK:
                    chunks.append(buf.raw)
                    got = 0
                if not (st.inbuf or st.eof or lib.gnutls_record_check_pending(session)):
                    # All of it (GnuTLS pulls a record exactly, header then body): spare the
                    # pull callback and the E_AGAIN that the next recv would come back with.
                    break
            elif n == 0:
                self.peer_closed = True
            elif n in (E_AGAIN, E_INTERRUPTED) and not st.callback_error:
                if not self._made_progress(before):
                    break
            elif n in EOF_ERRORS and self._at_eof():
                # TCP FIN without close_notify: the stream still ends here.
                self.peer_closed = True
            elif n == E_REHANDSHAKE:
                lib.gnutls_alert_send(session, AL_WARNING, A_NO_RENEGOTIATION)
            elif st.callback_error:
                raise self._broken(TlsError("tls_error", st.callback_error))
            elif n == E_FATAL_ALERT_RECEIVED:
                raise self._broken(TlsError("tls_error", self._alert_text()))
            elif lib.gnutls_error_is_fatal(n) or nonfatal >= _MAX_NONFATAL:
                # The peer learns why with a fatal alert, not a clean close_notify.
                lib.gnutls_alert_send_appropriate(session, n)
                raise self._broken(TlsError("tls_error", strerror(n)))
            else:
                nonfatal += 1  # a warning alert: carry on
        if chunks:
            chunks.append(buf[:got])
            return b"".join(chunks)
        return buf[:got]

    def write(self, plaintext: bytes) -> None:
        if not plaintext:
            return
        session = self._session
        if session is None:
            raise TlsError("tls_error", "session already freed")
        send, st = self._lib.gnutls_record_send, self._st
        total = len(plaintext)
        # The bytes object's own buffer goes to GnuTLS (c_void_p takes bytes): no copy, and
        # one call for a message that fits in a record.
        n = send(session, plaintext, total)
        if n == total:
            return
        base, off = ctypes.cast(plaintext, c_void_p).value or 0, 0  # valid while plaintext is
        while True:
            if n > 0:
                off += n
                if off >= total:
                    return
            elif not (n in (E_AGAIN, E_INTERRUPTED) and not st.callback_error):
                raise TlsError("tls_error", st.callback_error or strerror(n))
            # E_AGAIN: the push callback never blocks; GnuTLS retries with the rest.
            n = send(session, base + off, total - off)

    def _broken(self, error: TlsError) -> TlsError:
        self._failure = error
        return error

    def close_notify(self) -> None:
        if self._session is not None and self.handshake_done and self._failure is None:
            # SHUT_WR: queue our close_notify without waiting for the peer's.
            self._lib.gnutls_bye(self._session, SHUT_WR)

    def outgoing(self) -> bytes:
        out = bytes(self._st.out)
        self._st.out.clear()
        return out

    def facts(self) -> TlsFacts:
        if not self.handshake_done:
            raise ValueError("TLS handshake has not completed")
        lib = self._lib
        s = self._live_session()
        peer_der = self._peer_der(lib, s)
        peer: CertInfo | None = None
        if peer_der is not None:
            # GnuTLS accepted what cryptography cannot parse: report presence only.
            with contextlib.suppress(ValueError):
                peer = cert_info_from_der(peer_der)
        st = self._st
        # Only the verify callback verifies (st.verified); should it never have seen the
        # certificate, the certificate is still not verified.
        verified, verify_error = verdict(
            peer_cert=peer_der is not None, verifying=st.verify != "off",
            error=None if st.verified else st.verify_error or "certificate not verified")
        version = name_of(lib, "gnutls_protocol_get_name", lib.gnutls_protocol_get_version(s))
        cipher = lib.gnutls_cipher_get(s)
        tls13 = version == "TLS1.3"
        return TlsFacts(
            version=sys.intern(version.replace("TLS1.", "TLSv1.", 1)),  # shared, as in
            cipher=sys.intern(suite_name(lib, s, cipher, tls13)),  # openssl.facts_from_ssl
            cipher_bits=int(lib.gnutls_cipher_get_key_size(cipher)) * 8,
            sni=_server_name(lib, s) if self._ctx.server_side else self._sni,
            alpn=self._alpn(lib, s),
            resumed=bool(lib.gnutls_session_is_resumed(s)),
            peer_cert_present=peer_der is not None,
            peer_verified=verified,
            verify_error=verify_error,
            peer=peer,
            local=self._local_by_profile.get(self._st.profile, self._local_cert),
            engine=self.name,
        )

    @staticmethod
    def _peer_der(lib: ctypes.CDLL, s: c_void_p) -> bytes | None:
        count = c_uint()
        certs = lib.gnutls_certificate_get_peers(s, byref(count))
        if not certs or not count.value:
            return None
        return ctypes.string_at(certs[0].data, certs[0].size)

    @staticmethod
    def _alpn(lib: ctypes.CDLL, s: c_void_p) -> str | None:
        proto = Datum()
        if lib.gnutls_alpn_get_selected_protocol(s, byref(proto)) < 0 or not proto.size:
            return None
        return ctypes.string_at(proto.data, proto.size).decode("ascii", "replace")

    def free(self) -> None:
        """Release the session now; the engine is unusable afterwards. Idempotent."""
        if self._session is not None and binding.LIB is not None:
            binding.LIB.gnutls_deinit(self._session)
        self._session = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn ctypes down
            self.free()

