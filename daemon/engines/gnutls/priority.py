"""GnuTLS's suite table in OpenSSL's names, both ways: a profile's OpenSSL-style `ciphers`,
`tls13_ciphersuites`, `groups` and versions become a GnuTLS priority string, and a negotiated
suite gets its OpenSSL name back for the facts.

Profile `ciphers` are OpenSSL cipher strings (TLS 1.2 and below). GnuTLS priorities enable
key exchanges, ciphers and MACs separately, so the string is expanded by OpenSSL and
rebuilt as a priority; a string whose suites are no such product is refused, and TLS 1.3
uses the AEAD ciphers the string names (GnuTLS has one cipher list for both versions).
`tls13_ciphersuites` (IANA / OpenSSL names) go into that same list, so with TLS 1.2 on they
need a `ciphers` whose TLS 1.2 suites use exactly the same ciphers. `groups` take OpenSSL's
names (X25519, P-256 / prime256v1 / secp256r1, ffdhe2048...).

A negotiated suite is named by its IANA id through the stdlib ssl module, e.g.
"ECDHE-RSA-AES256-GCM-SHA384"; a suite OpenSSL does not know gets its IANA name from
gnutls_ciphersuite_get (GnuTLS >= 3.7.4), else GnuTLS's own name.
"""

from __future__ import annotations

import ctypes
import ssl
from collections.abc import Sequence
from ctypes import byref, c_int, c_void_p
from functools import cache

from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.checks import listed
from tlsbridge.daemon.engines.gnutls.binding import name_of, need_lib

__all__ = ["Suite", "group_priority", "priority", "suite_name", "tls13_suites", "versions"]


@cache
def suite_table() -> tuple[tuple[str, int, int, int, int, int], ...]:
    """(GnuTLS name, IANA id, kx, cipher, mac, min version) of every suite GnuTLS knows."""
    lib = need_lib()
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


def is_tls13_suite(ident: int) -> bool:
    return 0x1301 <= ident <= 0x13FF


@cache
def openssl_names() -> dict[int, str]:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.set_ciphers("ALL:COMPLEMENTOFALL:@SECLEVEL=0")
    return {c["id"] & 0xFFFF: c["name"] for c in ctx.get_ciphers()}


Suite = tuple[str, int, int, int, int, int]


def _tls12_suites(where: str, ciphers: str) -> list[Suite]:
    """The GnuTLS suites of OpenSSL cipher string `ciphers`, in OpenSSL's order."""
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        probe.set_ciphers(ciphers)
    except ssl.SSLError:
        raise ConfigError(f"{where}: no usable cipher in '{ciphers}'") from None
    tls12 = {s[1]: s for s in suite_table() if not is_tls13_suite(s[1])}
    chosen = [tls12[i] for i in (c["id"] & 0xFFFF for c in probe.get_ciphers()) if i in tls12]
    if not chosen:
        raise ConfigError(f"{where}: GnuTLS supports no cipher suite in '{ciphers}'")
    return chosen


def tls13_suites(where: str, suites: str) -> list[Suite]:
    """The suites of `tls13_ciphersuites`; TLS 1.3 suites have the same name everywhere."""
    known = {s[0]: s for s in suite_table() if is_tls13_suite(s[1])}
    chosen = []
    for name in listed(where, "tls13_ciphersuites", suites):
        if name not in known:
            raise ConfigError(f"{where}: 'tls13_ciphersuites': unknown TLS 1.3 suite {name!r} "
                              f"(GnuTLS knows {', '.join(known)})")
        chosen.append(known[name])
    return chosen


def _suite_names(suites: Sequence[Suite]) -> str:
    return ", ".join(sorted(openssl_names().get(s[1], s[0]) for s in suites))


Profile = ServerProfile | ClientProfile


def _cipher_priority(where: str, profile: Profile) -> str:
    """The priority tokens that enable exactly the TLS 1.2 suites of OpenSSL string `ciphers`
    and the TLS 1.3 suites of `tls13_ciphersuites`, from GnuTLS's one cipher list."""
    # Checked even when their TLS version is off: a typo is a typo.
    tls12 = _tls12_suites(where, profile.ciphers) if profile.ciphers else None
    tls13 = (tls13_suites(where, profile.tls13_ciphersuites)
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
    lib = need_lib()
    # An AEAD cipher comes with the AEAD "MAC" that TLS 1.3 needs too.
    parts = ["-CIPHER-ALL", *(f"+{name_of(lib, 'gnutls_cipher_get_name', c)}" for c in algos)]
    if tls12 is not None:
        parts += _tls12_exactly(where, profile.ciphers or "", tls12, algos)
    enabled13 = [s for s in suite_table() if is_tls13_suite(s[1]) and s[3] in algos]
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


def _tls12_exactly(where: str, ciphers: str, chosen: list[Suite], algos: list[int]) -> list[str]:
    """The MAC and key exchange tokens for `chosen`; refused if the product of key exchanges,
    `algos` and MACs would enable more TLS 1.2 suites than asked for."""
    kxs = list(dict.fromkeys(s[2] for s in chosen))
    macs = list(dict.fromkeys(s[4] for s in chosen))
    enabled = [s for s in suite_table() if not is_tls13_suite(s[1])
               and s[2] in kxs and s[3] in algos and s[4] in macs]
    extra = [s for s in enabled if s not in chosen]
    if extra:
        raise ConfigError(
            f"{where}: GnuTLS enables key exchanges, ciphers and MACs separately, so "
            f"'{ciphers}' would also enable {_suite_names(extra)}; list those too or pick "
            "another engine"
        )
    lib = need_lib()
    parts = ["-MAC-ALL", *(f"+{name_of(lib, 'gnutls_mac_get_name', m)}" for m in macs)]
    parts += ["-KX-ALL", *(f"+{name_of(lib, 'gnutls_kx_get_name', k)}" for k in kxs)]
    return parts


# OpenSSL's names that GnuTLS spells otherwise; case matters to neither.
_GROUP_ALIASES = {"p-256": "SECP256R1", "prime256v1": "SECP256R1", "p-384": "SECP384R1",
                  "p-521": "SECP521R1"}


def group_priority(where: str, groups: str) -> str:
    lib = need_lib()
    parts = ["-GROUP-ALL"]
    for name in listed(where, "groups", groups):
        group = _GROUP_ALIASES.get(name.lower(), name.upper())
        if lib.gnutls_group_get_id(group.encode("ascii")) <= 0:
            raise ConfigError(f"{where}: 'groups': GnuTLS knows no group {name!r}")
        parts.append(f"+GROUP-{group}")
    return ":".join(parts)


def versions(min_version: str, max_version: str) -> str:
    order = ("TLSv1.2", "TLSv1.3")
    keep = order[order.index(min_version) : order.index(max_version) + 1]
    return "-VERS-ALL:" + ":".join(f"+VERS-TLS{v[4:]}" for v in reversed(keep))


def priority(where: str, profile: Profile) -> str:
    """The priority string of a server or client profile: versions, ciphers, TLS 1.3 suites,
    groups; a server prefers its own order."""
    prio = ["NORMAL", versions(profile.min_version, profile.max_version),
            _cipher_priority(where, profile),
            group_priority(where, profile.groups) if profile.groups else "",
            "%SERVER_PRECEDENCE" if isinstance(profile, ServerProfile) else ""]
    return ":".join(p for p in prio if p)


def suite_name(lib: ctypes.CDLL, s: c_void_p, cipher: int, tls13: bool) -> str:
    """The OpenSSL name of session `s`'s negotiated suite, whose cipher is `cipher`."""
    kx, mac = lib.gnutls_kx_get(s), lib.gnutls_mac_get(s)
    fallback = name_of(lib, "gnutls_cipher_get_name", cipher)
    for name, ident, skx, scipher, smac, _ in suite_table():
        if is_tls13_suite(ident) != tls13 or scipher != cipher:
            continue
        if tls13 or (skx == kx and smac == mac):
            if ident in openssl_names():
                return openssl_names()[ident]
            fallback = name
            break
    # A suite OpenSSL does not know: IANA's name where GnuTLS can tell, else GnuTLS's.
    iana = getattr(lib, "gnutls_ciphersuite_get", None)
    raw = iana(s) if iana is not None else None
    return raw.decode() if raw else fallback
