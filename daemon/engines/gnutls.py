"""The `gnutls` engine: GnuTLS (libgnutls.so.30) through a small ctypes binding.

Ciphertext moves through in-memory push/pull transport callbacks, so the engine is as
sans-IO as the OpenSSL one. Importing this module never fails: when the library cannot be
loaded, `UNAVAILABLE` says why and building a context raises `GnuTLSUnavailable`.

Facts use OpenSSL's names where they differ: the version is "TLSv1.3", and the cipher is the
OpenSSL name of the negotiated suite (found by its IANA id through the stdlib ssl module),
e.g. "ECDHE-RSA-AES256-GCM-SHA384"; a suite OpenSSL does not know gets its IANA name from
gnutls_ciphersuite_get (GnuTLS >= 3.7.4), else GnuTLS's own name.

Profile `ciphers` are OpenSSL cipher strings (TLS 1.2 and below). GnuTLS priorities enable
key exchanges, ciphers and MACs separately, so the string is expanded by OpenSSL and
rebuilt as a priority; a string whose suites are no such product is refused, and TLS 1.3
uses the AEAD ciphers the string names (GnuTLS has one cipher list for both versions).
`tls13_ciphersuites` (IANA / OpenSSL names) go into that same list, so with TLS 1.2 on they
need a `ciphers` whose TLS 1.2 suites use exactly the same ciphers. `groups` take OpenSSL's
names (X25519, P-256 / prime256v1 / secp256r1, ffdhe2048...).

CRLs: GnuTLS checks the CRLs it has against the whole chain; as with the openssl engine
(VERIFY_CRL_CHECK_LEAF), a peer certificate (a client's, or on the client side the server's)
whose issuer has no CRL in `crl` is refused.

Client profiles take the same priority (versions, ciphers, TLS 1.3 suites, groups), trust and
CRL helpers as server profiles.

SNI profiles: each profile has its own credentials and priorities; the post-client-hello
callback reads the name and puts the chosen profile's on the session (certificate, trust,
CRLs, ciphers, groups, certificate request). The TLS version and ALPN are settled before
that callback, so the registry wants them equal across a listener's profiles.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import ipaddress
import os
import ssl
import sys
from collections.abc import Sequence
from ctypes import (
    CFUNCTYPE,
    POINTER,
    Structure,
    byref,
    c_char_p,
    c_int,
    c_size_t,
    c_ssize_t,
    c_uint,
    c_void_p,
)
from functools import cache
from typing import Any

from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.base import TlsEngine, TlsError
from tlsbridge.daemon.engines.registry import listed, pem_crls
from tlsbridge.daemon.sni import SniRouter, refusal
from tlsbridge.shared.addr import is_ip
from tlsbridge.shared.facts import (
    VERIFY_ERROR_NO_PEER_CERT,
    VERIFY_ERROR_NOT_VERIFIED,
    CertInfo,
    TlsFacts,
)

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

LIBRARY = "libgnutls.so.30"
MIN_VERSION = "3.6.5"  # first release with TLS 1.3 on by default
SERVER_VERIFY_MODES = ("off", "optional", "on", "optional_no_ca")

# gnutls.h
_SERVER, _CLIENT, _NONBLOCK, _NO_SIGNAL, _NO_TICKETS = 1, 2, 1 << 3, 1 << 6, 1 << 10
_CRD_CERTIFICATE = 1
_X509_FMT_PEM = 1
_CRT_X509 = 1
_SHUT_WR = 1
_NAME_DNS = 1
_CERT_IGNORE, _CERT_REQUEST, _CERT_REQUIRE = 0, 1, 2
_ALPN_SERVER_PRECEDENCE = 1 << 1
_DT_DNS_HOSTNAME, _DT_KEY_PURPOSE_OID, _DT_IP_ADDRESS = 1, 2, 4
_KP_TLS_WWW_SERVER = b"1.3.6.1.5.5.7.3.1"
_KP_TLS_WWW_CLIENT = b"1.3.6.1.5.5.7.3.2"
_AL_WARNING, _A_NO_RENEGOTIATION = 1, 100
_E_UNEXPECTED_PACKET_LENGTH = -9
_E_FATAL_ALERT_RECEIVED = -12
_E_AGAIN = -28
_E_REHANDSHAKE = -37
_E_CERTIFICATE_ERROR = -43
_E_INTERRUPTED = -52
_E_SHORT_MEMORY_BUFFER = -51
_E_PULL_ERROR = -54
_E_INTERNAL_ERROR = -59
_E_PREMATURE_TERMINATION = -110
_E_UNRECOGNIZED_NAME = -294
_E_CERTIFICATE_VERIFICATION_ERROR = -348
_EOF_ERRORS = (_E_PREMATURE_TERMINATION, _E_UNEXPECTED_PACKET_LENGTH, _E_PULL_ERROR)
_RECORD_SIZE = 16384  # the largest TLS plaintext record
_MAX_NONFATAL = 64  # bound on consecutive warnings before giving up


class _Datum(Structure):
    _fields_ = [("data", c_void_p), ("size", c_uint)]


class _TypedVData(Structure):
    _fields_ = [("type", c_int), ("data", c_char_p), ("size", c_uint)]


_PushFunc = CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
_PullFunc = CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
_PullTimeoutFunc = CFUNCTYPE(c_int, c_void_p, c_uint)
_VerifyFunc = CFUNCTYPE(c_int, c_void_p)
_HelloFunc = CFUNCTYPE(c_int, c_void_p)
_FreeFunc = CFUNCTYPE(None, c_void_p)

_P = c_void_p
_SIGNATURES: dict[str, tuple[Any, list[Any]]] = {
    "gnutls_check_version": (c_char_p, [c_char_p]),
    "gnutls_strerror": (c_char_p, [c_int]),
    "gnutls_strerror_name": (c_char_p, [c_int]),
    "gnutls_error_is_fatal": (c_int, [c_int]),
    "gnutls_init": (c_int, [POINTER(c_void_p), c_uint]),
    "gnutls_deinit": (None, [_P]),
    "gnutls_priority_init": (c_int, [POINTER(c_void_p), c_char_p, POINTER(c_char_p)]),
    "gnutls_priority_deinit": (None, [_P]),
    "gnutls_priority_set": (c_int, [_P, _P]),
    "gnutls_credentials_set": (c_int, [_P, c_int, _P]),
    "gnutls_certificate_allocate_credentials": (c_int, [POINTER(c_void_p)]),
    "gnutls_certificate_free_credentials": (None, [_P]),
    "gnutls_certificate_set_x509_key_file2": (
        c_int, [_P, c_char_p, c_char_p, c_int, c_char_p, c_uint]),
    "gnutls_certificate_set_x509_trust_file": (c_int, [_P, c_char_p, c_int]),
    "gnutls_certificate_set_x509_trust_dir": (c_int, [_P, c_char_p, c_int]),
    "gnutls_certificate_set_x509_crl_file": (c_int, [_P, c_char_p, c_int]),
    "gnutls_certificate_set_x509_system_trust": (c_int, [_P]),
    "gnutls_certificate_set_verify_limits": (None, [_P, c_uint, c_uint]),
    "gnutls_certificate_server_set_request": (None, [_P, c_int]),
    "gnutls_certificate_send_x509_rdn_sequence": (None, [_P, c_int]),
    "gnutls_certificate_get_peers": (POINTER(_Datum), [_P, POINTER(c_uint)]),
    "gnutls_certificate_verify_peers": (c_int, [_P, POINTER(_TypedVData), c_uint, POINTER(c_uint)]),
    "gnutls_certificate_verification_status_print": (
        c_int, [c_uint, c_int, POINTER(_Datum), c_uint]),
    "gnutls_session_set_verify_function": (None, [_P, _VerifyFunc]),
    "gnutls_transport_set_push_function": (None, [_P, _PushFunc]),
    "gnutls_transport_set_pull_function": (None, [_P, _PullFunc]),
    "gnutls_transport_set_pull_timeout_function": (None, [_P, _PullTimeoutFunc]),
    "gnutls_transport_set_errno": (None, [_P, c_int]),
    "gnutls_handshake": (c_int, [_P]),
    "gnutls_handshake_set_timeout": (None, [_P, c_uint]),
    "gnutls_handshake_set_post_client_hello_function": (None, [_P, _HelloFunc]),
    "gnutls_record_recv": (c_ssize_t, [_P, c_void_p, c_size_t]),
    "gnutls_record_check_pending": (c_size_t, [_P]),
    "gnutls_record_send": (c_ssize_t, [_P, c_void_p, c_size_t]),
    "gnutls_bye": (c_int, [_P, c_int]),
    "gnutls_alert_get": (c_int, [_P]),
    "gnutls_alert_get_name": (c_char_p, [c_int]),
    "gnutls_alert_send": (c_int, [_P, c_int, c_int]),
    "gnutls_alert_send_appropriate": (c_int, [_P, c_int]),
    "gnutls_server_name_set": (c_int, [_P, c_int, c_char_p, c_size_t]),
    "gnutls_server_name_get": (c_int, [_P, c_void_p, POINTER(c_size_t), POINTER(c_uint), c_uint]),
    "gnutls_alpn_set_protocols": (c_int, [_P, POINTER(_Datum), c_uint, c_uint]),
    "gnutls_alpn_get_selected_protocol": (c_int, [_P, POINTER(_Datum)]),
    "gnutls_protocol_get_version": (c_int, [_P]),
    "gnutls_protocol_get_name": (c_char_p, [c_int]),
    "gnutls_cipher_get": (c_int, [_P]),
    "gnutls_kx_get": (c_int, [_P]),
    "gnutls_mac_get": (c_int, [_P]),
    "gnutls_cipher_get_key_size": (c_size_t, [c_int]),
    "gnutls_cipher_get_name": (c_char_p, [c_int]),
    "gnutls_kx_get_name": (c_char_p, [c_int]),
    "gnutls_mac_get_name": (c_char_p, [c_int]),
    "gnutls_cipher_suite_info": (
        c_char_p, [c_size_t, c_char_p, POINTER(c_int), POINTER(c_int), POINTER(c_int),
                   POINTER(c_int)]),
    "gnutls_session_is_resumed": (c_int, [_P]),
    "gnutls_group_get_id": (c_int, [c_char_p]),
}


class GnuTLSUnavailable(ConfigError):
    """libgnutls cannot be used on this machine; the message says why."""


def _load() -> tuple[ctypes.CDLL | None, str | None]:
    try:
        lib = ctypes.CDLL(LIBRARY)
    except OSError as exc:
        return None, f"{LIBRARY} cannot be loaded ({exc}); install the libgnutls30 package"
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            return None, f"{LIBRARY} has no {name}; GnuTLS >= {MIN_VERSION} is needed"
        fn.restype, fn.argtypes = restype, argtypes
    # Optional: 3.7.4 and later name the negotiated suite as IANA does.
    suite_name = getattr(lib, "gnutls_ciphersuite_get", None)
    if suite_name is not None:
        suite_name.restype, suite_name.argtypes = c_char_p, [_P]
    if not lib.gnutls_check_version(MIN_VERSION.encode()):
        found = lib.gnutls_check_version(None).decode()
        return None, f"GnuTLS {found} is too old; >= {MIN_VERSION} is needed"
    return lib, None


_lib, UNAVAILABLE = _load()
"""None when GnuTLS can be used, else the reason it cannot."""


def library_version() -> str | None:
    """The runtime GnuTLS version, e.g. "3.7.9", or None if unavailable."""
    return None if _lib is None else _lib.gnutls_check_version(None).decode()


def _need_lib() -> ctypes.CDLL:
    if _lib is None:
        raise GnuTLSUnavailable(f"engine gnutls unavailable: {UNAVAILABLE}")
    return _lib


def _strerror(code: int) -> str:
    lib = _need_lib()
    text = lib.gnutls_strerror(code)
    return text.decode() if text else f"GnuTLS error {code}"


def _gnutls_free(ptr: int | None) -> None:
    if ptr:
        # gnutls_free is a variable holding the deallocator, not a function.
        _FreeFunc(c_void_p.in_dll(_need_lib(), "gnutls_free").value)(ptr)


def _status_text(status: int) -> str:
    lib = _need_lib()
    out = _Datum()
    if lib.gnutls_certificate_verification_status_print(status, _CRT_X509, byref(out), 0) < 0:
        return f"certificate verification status {status:#x}"
    try:
        return ctypes.string_at(out.data, out.size).decode("utf-8", "replace").strip()
    finally:
        _gnutls_free(out.data)


# ---- cipher suites: GnuTLS's table, OpenSSL's names ------------------------------------


@cache
def _suites() -> tuple[tuple[str, int, int, int, int, int], ...]:
    """(GnuTLS name, IANA id, kx, cipher, mac, min version) of every suite GnuTLS knows."""
    lib = _need_lib()
    out = []
    idx = 0
    while True:
        cs_id = ctypes.create_string_buffer(2)
        kx, cipher, mac, version = c_int(), c_int(), c_int(), c_int()
        name = lib.gnutls_cipher_suite_info(
            idx, cs_id, byref(kx), byref(cipher), byref(mac), byref(version)
        )
        if not name:
            break
        ident = int.from_bytes(cs_id.raw, "big")
        out.append((name.decode(), ident, kx.value, cipher.value, mac.value, version.value))
        idx += 1
    return tuple(out)


def _is_tls13_suite(ident: int) -> bool:
    return 0x1301 <= ident <= 0x13FF


@cache
def _openssl_names() -> dict[int, str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return {c["id"] & 0xFFFF: c["name"] for c in ctx.get_ciphers()}


def _name(lib: ctypes.CDLL, fn: str, value: int) -> str:
    raw = getattr(lib, fn)(value)
    return raw.decode() if raw else ""


_Suite = tuple[str, int, int, int, int, int]


def _tls12_suites(where: str, ciphers: str) -> list[_Suite]:
    """The GnuTLS suites of OpenSSL cipher string `ciphers`, in OpenSSL's order."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f"{where}: no usable cipher in '{ciphers}'") from None
    tls12 = {s[1]: s for s in _suites() if not _is_tls13_suite(s[1])}
    chosen = [tls12[i] for i in (c["id"] & 0xFFFF for c in probe.get_ciphers()) if i in tls12]
    if not chosen:
        raise ConfigError(f"{where}: GnuTLS supports no cipher suite in '{ciphers}'")
    return chosen


def _tls13_suites(where: str, suites: str) -> list[_Suite]:
    """The suites of `tls13_ciphersuites`; TLS 1.3 suites have the same name everywhere."""
    known = {s[0]: s for s in _suites() if _is_tls13_suite(s[1])}
    chosen = []
    for name in listed(where, "tls13_ciphersuites", suites):
        if name not in known:
            raise ConfigError(f"{where}: 'tls13_ciphersuites': unknown TLS 1.3 suite {name!r} "
                              f"(GnuTLS knows {', '.join(known)})")
        chosen.append(known[name])
    return chosen


def _suite_names(suites: Sequence[_Suite]) -> str:
    return ", ".join(sorted(_openssl_names().get(s[1], s[0]) for s in suites))


Profile = ServerProfile | ClientProfile


def _cipher_priority(where: str, profile: Profile) -> str:
    """The priority tokens that enable exactly the TLS 1.2 suites of OpenSSL string `ciphers`
    and the TLS 1.3 suites of `tls13_ciphersuites`, from GnuTLS's one cipher list."""
    # Checked even when their TLS version is off: a typo is a typo.
    tls12 = _tls12_suites(where, profile.ciphers) if profile.ciphers else None
    tls13 = (_tls13_suites(where, profile.tls13_ciphersuites)
             if profile.tls13_ciphersuites else None)
    if profile.min_version == "TLSv1.3":
        tls12 = None  # as with OpenSSL, `ciphers` only concerns TLS 1.2
    if profile.max_version == "TLSv1.2":
        tls13 = None
    if tls12 is None and tls13 is None:
        return ""
    if tls12 is None and profile.min_version == "TLSv1.2":
        raise ConfigError(
            f"{where}: GnuTLS has one cipher list for TLS 1.2 and 1.3, so "
            "'tls13_ciphersuites' alone would restrict TLS 1.2 as well; set 'ciphers' to TLS 1.2 "
            "suites with the same ciphers, or min_version = \"TLSv1.3\"")
    algos = list(dict.fromkeys(s[3] for s in (*(tls13 or ()), *(tls12 or ()))))
    lib = _need_lib()
    # An AEAD cipher comes with the AEAD "MAC" that TLS 1.3 needs too.
    parts = ["-CIPHER-ALL", *(f"+{_name(lib, 'gnutls_cipher_get_name', c)}" for c in algos)]
    if tls12 is not None:
        parts += _tls12_exactly(where, profile.ciphers or "", tls12, algos)
    enabled13 = [s for s in _suites() if _is_tls13_suite(s[1]) and s[3] in algos]
    if tls13 is not None:
        extra = [s for s in enabled13 if s not in tls13]
        if extra:
            raise ConfigError(
                f"{where}: GnuTLS has one cipher list for TLS 1.2 and 1.3, so the ciphers of "
                f"'{profile.ciphers}' would also enable TLS 1.3 {_suite_names(extra)}; list "
                "those in 'tls13_ciphersuites' too or pick another engine")
    elif profile.max_version == "TLSv1.3" and not enabled13:
        raise ConfigError(
            f"{where}: with GnuTLS, TLS 1.3 uses the AEAD ciphers of '{profile.ciphers}', "
            f"and it has none; add one or set max_version = \"TLSv1.2\"")
    return ":".join(parts)


def _tls12_exactly(where: str, ciphers: str, chosen: list[_Suite], algos: list[int]) -> list[str]:
    """The MAC and key exchange tokens for `chosen`; refused if the product of key exchanges,
    `algos` and MACs would enable more TLS 1.2 suites than asked for."""
    kxs = list(dict.fromkeys(s[2] for s in chosen))
    macs = list(dict.fromkeys(s[4] for s in chosen))
    enabled = [s for s in _suites() if not _is_tls13_suite(s[1])
               and s[2] in kxs and s[3] in algos and s[4] in macs]
    extra = [s for s in enabled if s not in chosen]
    if extra:
        raise ConfigError(
            f"{where}: GnuTLS enables key exchanges, ciphers and MACs separately, so "
            f"'{ciphers}' would also enable {_suite_names(extra)}; list those too or pick "
            "another engine"
        )
    lib = _need_lib()
    parts = ["-MAC-ALL", *(f"+{_name(lib, 'gnutls_mac_get_name', m)}" for m in macs)]
    parts += ["-KX-ALL", *(f"+{_name(lib, 'gnutls_kx_get_name', k)}" for k in kxs)]
    return parts


# OpenSSL's names that GnuTLS spells otherwise; case matters to neither.
_GROUP_ALIASES = {"p-256": "SECP256R1", "prime256v1": "SECP256R1", "p-384": "SECP384R1",
                  "p-521": "SECP521R1"}


def _group_priority(where: str, groups: str) -> str:
    lib = _need_lib()
    parts = ["-GROUP-ALL"]
    for name in listed(where, "groups", groups):
        group = _GROUP_ALIASES.get(name.lower(), name.upper())
        if lib.gnutls_group_get_id(group.encode("ascii")) <= 0:
            raise ConfigError(f"{where}: 'groups': GnuTLS knows no group {name!r}")
        parts.append(f"+GROUP-{group}")
    return ":".join(parts)


def _versions(min_version: str, max_version: str) -> str:
    order = ("TLSv1.2", "TLSv1.3")
    keep = order[order.index(min_version) : order.index(max_version) + 1]
    return "-VERS-ALL:" + ":".join(f"+VERS-TLS{v[4:]}" for v in reversed(keep))


def _priority(where: str, profile: Profile) -> str:
    """The priority string of a server or client profile: versions, ciphers, TLS 1.3 suites,
    groups; a server prefers its own order."""
    prio = ["NORMAL", _versions(profile.min_version, profile.max_version),
            _cipher_priority(where, profile),
            _group_priority(where, profile.groups) if profile.groups else "",
            "%SERVER_PRECEDENCE" if isinstance(profile, ServerProfile) else ""]
    return ":".join(p for p in prio if p)


# ---- contexts ---------------------------------------------------------------------------


class GnuTLSContext:
    """Credentials and priorities shared by all sessions of one side; build with
    `server_context` or `client_context`. Sessions keep it alive; `free()` is idempotent."""

    def __init__(
        self,
        *,
        server_side: bool,
        priority: str,
        verify: str,
        alpn: Sequence[str] = (),
        verify_depth: int = 9,
        local_cert: CertInfo | None = None,
        name: str = "",
    ) -> None:
        lib = _need_lib()
        self.server_side = server_side
        self.verify = verify
        self.priority_string = priority
        self.local_cert = local_cert
        self.name = name  # the profile's
        # Issuers (DER names) that `crl` has a CRL of; a peer from another issuer is refused.
        self.crl_issuers: frozenset[bytes] = frozenset()
        # The profiles a listener chooses from by SNI; None: this context serves every name.
        self.sni: SniRouter[GnuTLSContext] | None = None
        self._cred: c_void_p | None = None
        self._prio: c_void_p | None = None
        cred = c_void_p()
        _check(lib.gnutls_certificate_allocate_credentials(byref(cred)), "credentials")
        self._cred = cred
        # GnuTLS counts every certificate of the chain; OpenSSL's depth counts intermediates.
        lib.gnutls_certificate_set_verify_limits(cred, 16384, verify_depth + 2)
        prio, err_pos = c_void_p(), c_char_p()
        rc = lib.gnutls_priority_init(byref(prio), priority.encode(), byref(err_pos))
        if rc < 0:
            at = f" at '{err_pos.value.decode()}'" if err_pos.value else ""
            raise ValueError(f"GnuTLS priority '{priority}' refused{at}: {_strerror(rc)}")
        self._prio = prio
        # GnuTLS copies the protocols into each session; the buffers live as long as we do.
        self._alpn_bufs = [ctypes.create_string_buffer(p.encode(), len(p.encode())) for p in alpn]
        self._alpn = (_Datum * len(alpn))(
            *(_Datum(ctypes.cast(b, c_void_p), len(b)) for b in self._alpn_bufs)
        )

    def load_key_pair(self, cert: str | os.PathLike[str], key: str | os.PathLike[str],
                      password: str | None = None) -> None:
        """Our certificate chain and key (PEM, encrypted with `password`); raises ValueError
        with GnuTLS's reason."""
        rc = _need_lib().gnutls_certificate_set_x509_key_file2(
            self._cred, os.fsencode(cert), os.fsencode(key), _X509_FMT_PEM,
            password.encode() if password is not None else None, 0
        )
        if rc < 0:
            raise ValueError(_strerror(rc))

    def load_trust(self, ca_file: str | os.PathLike[str] | None) -> None:
        """Trust the CAs of a PEM file (None: the system's); raises ValueError."""
        lib = _need_lib()
        if ca_file is None:
            rc = lib.gnutls_certificate_set_x509_system_trust(self._cred)
        else:
            rc = lib.gnutls_certificate_set_x509_trust_file(
                self._cred, os.fsencode(ca_file), _X509_FMT_PEM
            )
        if rc < 0:
            raise ValueError(_strerror(rc))
        if rc == 0 and ca_file is not None:
            raise ValueError("no certificate in the file")

    def load_trust_dir(self, ca_path: str | os.PathLike[str]) -> None:
        """Trust every PEM certificate in a directory (hashed or not); raises ValueError."""
        rc = _need_lib().gnutls_certificate_set_x509_trust_dir(
            self._cred, os.fsencode(ca_path), _X509_FMT_PEM)
        if rc < 0:
            raise ValueError(_strerror(rc))

    def load_crl(self, crl: str | os.PathLike[str], issuers: frozenset[bytes]) -> None:
        """Check peers against the CRLs of a PEM file, whose issuers are `issuers`; raises
        ValueError."""
        rc = _need_lib().gnutls_certificate_set_x509_crl_file(
            self._cred, os.fsencode(crl), _X509_FMT_PEM)
        if rc < 0:
            raise ValueError(_strerror(rc))
        if rc == 0:
            raise ValueError("no CRL in the file")
        self.crl_issuers = issuers

    def free(self) -> None:
        """Release the GnuTLS objects; only once no session uses them."""
        lib = _lib
        if lib is None:
            return
        if self._prio is not None:
            lib.gnutls_priority_deinit(self._prio)
            self._prio = None
        if self._cred is not None:
            lib.gnutls_certificate_free_credentials(self._cred)
            self._cred = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn ctypes down
            self.free()


def _check(rc: int, what: str) -> int:
    if rc < 0:
        raise ValueError(f"GnuTLS {what}: {_strerror(rc)}")
    return rc


def server_context(profile: ServerProfile) -> GnuTLSContext:
    """A server context for `profile`; raises ConfigError naming the profile and the file."""
    where = f"profile '{profile.name}'"
    _need_lib()
    if profile.verify_client not in SERVER_VERIFY_MODES:
        raise ConfigError(f"{where}: verify_client {profile.verify_client!r} is not one of "
                          f"{', '.join(SERVER_VERIFY_MODES)}")
    try:
        ctx = GnuTLSContext(
            server_side=True,
            priority=_priority(where, profile),
            verify=profile.verify_client,
            alpn=profile.alpn,
            verify_depth=profile.verify_depth,
            name=profile.name,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    _identity(where, ctx, profile)
    _trust(where, ctx, profile)
    return ctx


def _identity(where: str, ctx: GnuTLSContext, profile: Profile) -> None:
    """Our certificate chain and key, and the facts' `local`."""
    from tlsbridge.daemon.certinfo import cert_info_from_pem_file

    assert profile.certificate is not None and profile.private_key is not None
    try:
        ctx.load_key_pair(profile.certificate, profile.private_key,
                          profile.private_key_password)
    except ValueError as exc:
        raise ConfigError(
            f"{where}: certificate {profile.certificate} and key {profile.private_key} "
            f"cannot be used: {exc}"
        ) from None
    try:
        ctx.local_cert = cert_info_from_pem_file(profile.certificate)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: certificate {profile.certificate}: {exc}") from None


def _trust(where: str, ctx: GnuTLSContext, profile: Profile) -> None:
    steps = [("CA list", profile.ca_list, ctx.load_trust),
             ("CA path", profile.ca_path, ctx.load_trust_dir)]
    if profile.crl is not None:
        issuers = frozenset(c.issuer.public_bytes() for c in pem_crls(where, profile.crl))
        steps.append(("CRL", profile.crl, functools.partial(ctx.load_crl, issuers=issuers)))
    for what, path, load in steps:
        if path is None:
            continue
        try:
            load(path)
        except ValueError as exc:
            raise ConfigError(f"{where}: {what} {path} unusable: {exc}") from None


def listener_context(
    default: ServerProfile, sni_profiles: Sequence[ServerProfile], *, strict: bool
) -> GnuTLSContext:
    """The default profile's context, with the profiles sessions choose from by SNI (daemon/
    sni.py); with `strict`, a name none serves is refused with unrecognized_name."""
    base = server_context(default)
    base.sni = SniRouter(base, ((p.server_names, server_context(p)) for p in sni_profiles),
                         strict=strict)
    return base


def client_context(profile: ClientProfile, *, alpn: Sequence[str] = ()) -> GnuTLSContext:
    """A client context for `profile`, with the server-side helpers: priority (versions,
    ciphers, TLS 1.3 suites, groups), CA list / path and CRL (the server's own certificate is
    checked, and its issuer must have a CRL in `crl`). Neither `ca_list` nor `ca_path`: the
    system's CAs. Raises ConfigError naming the client profile."""
    where = f"client profile '{profile.name}'"
    _need_lib()
    try:
        ctx = GnuTLSContext(
            server_side=False,
            priority=_priority(where, profile),
            verify="on" if profile.verify_server else "off",
            alpn=alpn,
            verify_depth=profile.verify_depth,
            name=profile.name,
        )
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    if profile.certificate is not None:
        _identity(where, ctx, profile)
    if profile.verify_server:
        if profile.ca_list is None and profile.ca_path is None:
            try:
                ctx.load_trust(None)
            except ValueError as exc:
                raise ConfigError(f"{where}: the system's CAs are unusable: {exc}") from None
        _trust(where, ctx, profile)
    return ctx


# ---- sessions ---------------------------------------------------------------------------


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
    lib = _need_lib()

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
                return _E_UNRECOGNIZED_NAME
            _serve_with(lib, st, chosen)
            return 0
        except BaseException as exc:
            st.callback_error = f"SNI callback failed: {exc!r}"
            return _E_INTERNAL_ERROR

    return (_PushFunc(push), _PullFunc(pull), _PullTimeoutFunc(pull_timeout),
            _VerifyFunc(verify), _HelloFunc(hello))


def _serve_with(lib: ctypes.CDLL, st: _State, ctx: GnuTLSContext) -> None:
    """Put a server profile's priorities, credentials and certificate request on a session."""
    s = st.session
    _check(lib.gnutls_priority_set(s, ctx._prio), "priority")
    _check(lib.gnutls_credentials_set(s, _CRD_CERTIFICATE, ctx._cred), "credentials")
    request = {"off": _CERT_IGNORE, "on": _CERT_REQUIRE}.get(ctx.verify, _CERT_REQUEST)
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
    data = [_TypedVData(
        _DT_KEY_PURPOSE_OID,
        _KP_TLS_WWW_CLIENT if st.server_side else _KP_TLS_WWW_SERVER,
        0,
    )]
    if st.hostname:
        try:
            ip = ipaddress.ip_address(st.hostname)
        except ValueError:
            data.append(_TypedVData(_DT_DNS_HOSTNAME, st.hostname.encode("idna"), 0))
        else:
            data.append(_TypedVData(_DT_IP_ADDRESS, ip.packed, len(ip.packed)))
    vdata = (_TypedVData * len(data))(*data)
    status = c_uint()
    rc = lib.gnutls_certificate_verify_peers(st.session, vdata, len(data), byref(status))
    if rc < 0:
        st.verify_error = _strerror(rc)
    elif status.value:
        st.verify_error = _status_text(status.value)
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
        if rc == _E_SHORT_MEMORY_BUFFER:
            continue
        if rc < 0 or kind.value != _NAME_DNS:
            return None
        return buf.raw[: size.value].decode("ascii", "replace")
    return None


def _issuer(cert: _Datum) -> bytes:
    from cryptography import x509

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
        lib = _need_lib()
        self._ctx = ctx  # the credentials must outlive the session
        self._local_cert = local_cert if local_cert is not None else ctx.local_cert
        self._local_by_profile = local_by_profile or {}
        self._failure: TlsError | None = None
        self._sni: str | None = None
        server = ctx.server_side
        st = self._st = _State(server, ctx.verify, None if server else server_hostname)
        flags = (_SERVER if server else _CLIENT) | _NONBLOCK | _NO_SIGNAL | _NO_TICKETS
        _check(lib.gnutls_init(byref(st.session), flags), "session")
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
            _check(lib.gnutls_priority_set(s, ctx._prio), "priority")
            _check(lib.gnutls_credentials_set(s, _CRD_CERTIFICATE, ctx._cred), "credentials")
            st.crl_issuers = ctx.crl_issuers
            if sni is None and server_hostname and not is_ip(server_hostname):
                sni = server_hostname
            if sni:
                raw = sni.encode("idna")
                _check(lib.gnutls_server_name_set(s, _NAME_DNS, raw, len(raw)), "server name")
                self._sni = sni
        if ctx._alpn:
            flags = _ALPN_SERVER_PRECEDENCE if server else 0
            _check(lib.gnutls_alpn_set_protocols(s, ctx._alpn, len(ctx._alpn), flags), "ALPN")
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
        lib = _need_lib()
        name = lib.gnutls_alert_get_name(lib.gnutls_alert_get(self._live_session()))
        return f"received alert: {name.decode() if name else 'unknown'}"

    def _handshake_error(self, rc: int) -> TlsError:
        st = self._st
        if rc == _E_FATAL_ALERT_RECEIVED:
            return TlsError("handshake_failed", self._alert_text())
        if rc in _EOF_ERRORS and self._at_eof():
            return TlsError("eof_in_handshake", "peer closed during the handshake")
        # Tell the peer why, as OpenSSL does; GnuTLS leaves that to the caller.
        _need_lib().gnutls_alert_send_appropriate(self._live_session(), rc)
        if st.refused:
            return TlsError("sni_refused", st.refused)
        if st.callback_error:
            return TlsError("handshake_failed", st.callback_error)
        if st.verify_error and rc in (_E_CERTIFICATE_ERROR, _E_CERTIFICATE_VERIFICATION_ERROR):
            return TlsError("verify_failed", st.verify_error)
        return TlsError("handshake_failed", _strerror(rc))

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
        lib = _need_lib()
        session = self._live_session()
        for _ in range(_MAX_NONFATAL):
            before = len(self._st.inbuf)
            rc = lib.gnutls_handshake(session)
            if rc == 0:
                self.handshake_done = True
                return True
            if rc in (_E_AGAIN, _E_INTERRUPTED) and not self._st.callback_error:
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
        lib = _need_lib()
        session = self._live_session()
        buf = ctypes.create_string_buffer(_RECORD_SIZE)
        chunks = []
        nonfatal = 0
        while not self.peer_closed:
            if self._at_eof() and not lib.gnutls_record_check_pending(session):
                # TCP FIN without close_notify after the last whole record: the stream ends
                # here. (Asked for more, GnuTLS would invalidate the session, and with it the
                # replies still due to the peer.)
                self.peer_closed = True
                break
            before = len(self._st.inbuf)
            n = lib.gnutls_record_recv(session, buf, _RECORD_SIZE)
            if n > 0:
                chunks.append(buf.raw[:n])
                nonfatal = 0
            elif n == 0:
                self.peer_closed = True
            elif n in (_E_AGAIN, _E_INTERRUPTED) and not self._st.callback_error:
                if not self._made_progress(before):
                    break
            elif n in _EOF_ERRORS and self._at_eof():
                # TCP FIN without close_notify: the stream still ends here.
                self.peer_closed = True
            elif n == _E_REHANDSHAKE:
                lib.gnutls_alert_send(session, _AL_WARNING, _A_NO_RENEGOTIATION)
            elif self._st.callback_error:
                raise self._broken(TlsError("tls_error", self._st.callback_error))
            elif n == _E_FATAL_ALERT_RECEIVED:
                raise self._broken(TlsError("tls_error", self._alert_text()))
            elif lib.gnutls_error_is_fatal(n) or nonfatal >= _MAX_NONFATAL:
                # The peer learns why with a fatal alert, not a clean close_notify.
                lib.gnutls_alert_send_appropriate(session, n)
                raise self._broken(TlsError("tls_error", _strerror(n)))
            else:
                nonfatal += 1  # a warning alert: carry on
        return b"".join(chunks)

    def write(self, plaintext: bytes) -> None:
        if not plaintext:
            return
        lib = _need_lib()
        session = self._live_session()
        buf = ctypes.create_string_buffer(plaintext, len(plaintext))
        base, off = ctypes.addressof(buf), 0
        while off < len(plaintext):
            n = lib.gnutls_record_send(session, base + off, len(plaintext) - off)
            if n > 0:
                off += n
            elif n in (_E_AGAIN, _E_INTERRUPTED) and not self._st.callback_error:
                continue  # the push callback never blocks; GnuTLS retries with the rest
            else:
                raise TlsError("tls_error", self._st.callback_error or _strerror(n))

    def _broken(self, error: TlsError) -> TlsError:
        self._failure = error
        return error

    def close(self) -> None:
        if self._session is not None and self.handshake_done and self._failure is None:
            # SHUT_WR: queue our close_notify without waiting for the peer's.
            _need_lib().gnutls_bye(self._session, _SHUT_WR)

    def outgoing(self) -> bytes:
        out = bytes(self._st.out)
        self._st.out.clear()
        return out

    def facts(self) -> TlsFacts:
        if not self.handshake_done:
            raise ValueError("TLS handshake has not completed")
        lib = _need_lib()
        s = self._live_session()
        peer_der = self._peer_der(lib, s)
        peer: CertInfo | None = None
        if peer_der is not None:
            from tlsbridge.daemon.certinfo import cert_info_from_der

            # GnuTLS accepted what cryptography cannot parse: report presence only.
            with contextlib.suppress(ValueError):
                peer = cert_info_from_der(peer_der)
        if peer_der is None:
            verified, verify_error = False, VERIFY_ERROR_NO_PEER_CERT
        elif self._st.verify == "off":
            verified, verify_error = False, VERIFY_ERROR_NOT_VERIFIED
        else:
            verified, verify_error = self._st.verified, self._st.verify_error
        version = _name(lib, "gnutls_protocol_get_name", lib.gnutls_protocol_get_version(s))
        cipher = lib.gnutls_cipher_get(s)
        tls13 = version == "TLS1.3"
        return TlsFacts(
            version=sys.intern(version.replace("TLS1.", "TLSv1.", 1)),  # shared, as in
            cipher=sys.intern(self._cipher_name(lib, s, cipher, tls13)),  # facts_from_ssl
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
    def _cipher_name(lib: ctypes.CDLL, s: c_void_p, cipher: int, tls13: bool) -> str:
        kx, mac = lib.gnutls_kx_get(s), lib.gnutls_mac_get(s)
        fallback = _name(lib, "gnutls_cipher_get_name", cipher)
        for name, ident, skx, scipher, smac, _ in _suites():
            if _is_tls13_suite(ident) != tls13 or scipher != cipher:
                continue
            if tls13 or (skx == kx and smac == mac):
                if ident in _openssl_names():
                    return _openssl_names()[ident]
                fallback = name
                break
        # A suite OpenSSL does not know: IANA's name where GnuTLS can tell, else GnuTLS's.
        iana = getattr(lib, "gnutls_ciphersuite_get", None)
        raw = iana(s) if iana is not None else None
        return raw.decode() if raw else fallback

    @staticmethod
    def _alpn(lib: ctypes.CDLL, s: c_void_p) -> str | None:
        proto = _Datum()
        if lib.gnutls_alpn_get_selected_protocol(s, byref(proto)) < 0 or not proto.size:
            return None
        return ctypes.string_at(proto.data, proto.size).decode("ascii", "replace")

    def free(self) -> None:
        """Release the session now; the engine is unusable afterwards. Idempotent."""
        if self._session is not None and _lib is not None:
            _lib.gnutls_deinit(self._session)
        self._session = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn ctypes down
            self.free()

