"""The ctypes binding of libgnutls.so.30: the constants of gnutls.h we use, the structures and
callback types, the signatures of the functions called, and the library loaded once.

Importing this module never fails: when the library cannot be loaded, `UNAVAILABLE` says why
and `need_lib()` raises `GnuTLSUnavailable`.
"""

from __future__ import annotations

import ctypes
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
from typing import Any

from tlsbridge.daemon.config import ConfigError

LIBRARY = "libgnutls.so.30"
MIN_VERSION = "3.6.5"  # first release with TLS 1.3 on by default

# gnutls.h
SERVER, CLIENT, NONBLOCK, NO_SIGNAL, NO_TICKETS = 1, 2, 1 << 3, 1 << 6, 1 << 10
CRD_CERTIFICATE = 1
X509_FMT_PEM = 1
CRT_X509 = 1
SHUT_WR = 1
NAME_DNS = 1
CERT_IGNORE, CERT_REQUEST, CERT_REQUIRE = 0, 1, 2
ALPN_SERVER_PRECEDENCE = 1 << 1
DT_DNS_HOSTNAME, DT_KEY_PURPOSE_OID, DT_IP_ADDRESS = 1, 2, 4
KP_TLS_WWW_SERVER = b"1.3.6.1.5.5.7.3.1"
KP_TLS_WWW_CLIENT = b"1.3.6.1.5.5.7.3.2"
AL_WARNING, A_NO_RENEGOTIATION = 1, 100
E_UNEXPECTED_PACKET_LENGTH = -9
E_FATAL_ALERT_RECEIVED = -12
E_AGAIN = -28
E_REHANDSHAKE = -37
E_CERTIFICATE_ERROR = -43
E_INTERRUPTED = -52
E_SHORT_MEMORY_BUFFER = -51
E_PULL_ERROR = -54
E_INTERNAL_ERROR = -59
E_PREMATURE_TERMINATION = -110
E_UNRECOGNIZED_NAME = -294
E_CERTIFICATE_VERIFICATION_ERROR = -348
EOF_ERRORS = (E_PREMATURE_TERMINATION, E_UNEXPECTED_PACKET_LENGTH, E_PULL_ERROR)


class Datum(Structure):
    _fields_ = [("data", c_void_p), ("size", c_uint)]


class TypedVData(Structure):
    _fields_ = [("type", c_int), ("data", c_char_p), ("size", c_uint)]


PushFunc = CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
PullFunc = CFUNCTYPE(c_ssize_t, c_void_p, c_void_p, c_size_t)
PullTimeoutFunc = CFUNCTYPE(c_int, c_void_p, c_uint)
VerifyFunc = CFUNCTYPE(c_int, c_void_p)
HelloFunc = CFUNCTYPE(c_int, c_void_p)
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
    "gnutls_certificate_get_peers": (POINTER(Datum), [_P, POINTER(c_uint)]),
    "gnutls_certificate_verify_peers": (c_int, [_P, POINTER(TypedVData), c_uint, POINTER(c_uint)]),
    "gnutls_certificate_verification_status_print": (
        c_int, [c_uint, c_int, POINTER(Datum), c_uint]),
    "gnutls_session_set_verify_function": (None, [_P, VerifyFunc]),
    "gnutls_transport_set_push_function": (None, [_P, PushFunc]),
    "gnutls_transport_set_pull_function": (None, [_P, PullFunc]),
    "gnutls_transport_set_pull_timeout_function": (None, [_P, PullTimeoutFunc]),
    "gnutls_transport_set_errno": (None, [_P, c_int]),
    "gnutls_handshake": (c_int, [_P]),
    "gnutls_handshake_set_timeout": (None, [_P, c_uint]),
    "gnutls_handshake_set_post_client_hello_function": (None, [_P, HelloFunc]),
    "gnutls_record_recv": (c_ssize_t, [_P, c_void_p, c_size_t]),
    "gnutls_record_send": (c_ssize_t, [_P, c_void_p, c_size_t]),
    "gnutls_record_check_pending": (c_size_t, [_P]),
    "gnutls_bye": (c_int, [_P, c_int]),
    "gnutls_alert_get": (c_int, [_P]),
    "gnutls_alert_get_name": (c_char_p, [c_int]),
    "gnutls_alert_send": (c_int, [_P, c_int, c_int]),
    "gnutls_alert_send_appropriate": (c_int, [_P, c_int]),
    "gnutls_server_name_set": (c_int, [_P, c_int, c_char_p, c_size_t]),
    "gnutls_server_name_get": (c_int, [_P, c_void_p, POINTER(c_size_t), POINTER(c_uint), c_uint]),
    "gnutls_alpn_set_protocols": (c_int, [_P, POINTER(Datum), c_uint, c_uint]),
    "gnutls_alpn_get_selected_protocol": (c_int, [_P, POINTER(Datum)]),
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


def load() -> tuple[ctypes.CDLL | None, str | None]:
    """The library with every signature above set, or None and the reason it cannot be used."""
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


LIB, UNAVAILABLE = load()
"""The library, or None; and None when GnuTLS can be used, else the reason it cannot."""


def library_version() -> str | None:
    """The runtime GnuTLS version, e.g. "3.7.9", or None if unavailable."""
    return None if LIB is None else LIB.gnutls_check_version(None).decode()


def need_lib() -> ctypes.CDLL:
    """The library; raises GnuTLSUnavailable saying why there is none."""
    if LIB is None:
        raise GnuTLSUnavailable(f"engine gnutls unavailable: {UNAVAILABLE}")
    return LIB


def strerror(code: int) -> str:
    """GnuTLS's words for error `code`."""
    lib = need_lib()
    text = lib.gnutls_strerror(code)
    return text.decode() if text else f"GnuTLS error {code}"


def free_memory(ptr: int | None) -> None:
    """gnutls_free: release what GnuTLS allocated for us."""
    if ptr:
        # gnutls_free is a variable holding the deallocator, not a function.
        _FreeFunc(c_void_p.in_dll(need_lib(), "gnutls_free").value)(ptr)


def status_text(status: int) -> str:
    """GnuTLS's words for a certificate verification status (a bit set)."""
    lib = need_lib()
    out = Datum()
    if lib.gnutls_certificate_verification_status_print(status, CRT_X509, byref(out), 0) < 0:
        return f"certificate verification status {status:#x}"
    try:
        return ctypes.string_at(out.data, out.size).decode("utf-8", "replace").strip()
    finally:
        free_memory(out.data)


def name_of(lib: ctypes.CDLL, fn: str, value: int) -> str:
    """The name that getter `fn` (gnutls_*_get_name) gives `value`; "" if none."""
    raw = getattr(lib, fn)(value)
    return raw.decode() if raw else ""


def check(rc: int, what: str) -> int:
    """`rc` if it is no error; else raises ValueError naming `what` failed and why."""
    if rc < 0:
        raise ValueError(f"GnuTLS {what}: {strerror(rc)}")
    return rc

