"""The TLS engines by name: which can run here, and how to build them from profiles.

Engines other than `openssl` are imported on first use, so a missing pyOpenSSL or libgnutls
only matters to the listeners that ask for it.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptography import x509

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.openssl import OpenSSLEngine
from tlsbridge.shared.facts import CertInfo

__all__ = [
    "ENGINES", "available", "client_engine", "listener_engine_factory", "server_engine_factory",
]

ENGINES = ("openssl", "pyopenssl", "gnutls")
# The stdlib ssl module cannot accept a certificate that failed verification.
_OPENSSL_VERIFY_MODES = ("off", "optional", "on")

PathLike = str | os.PathLike[str]


# Profile keys an engine does not implement yet: refused, never silently ignored (a CRL that
# is not checked would let revoked certificates in). Client profiles of these engines go
# through client_engine(), which takes none of these keys.
_NOT_YET_CLIENT = {
    "pyopenssl": ("crl", "ca_path", "tls13_ciphersuites"),
    "gnutls": ("crl", "ca_path", "tls13_ciphersuites"),
}
_NOT_YET_SERVER: dict[str, tuple[str, ...]] = {}

# What an engine fixes before it learns the SNI, so a listener's SNI profiles must agree with
# its default profile on it (the pyopenssl and gnutls modules say why). openssl: as pyopenssl,
# and Python's ssl cannot set the verify mode of a connection (OpenSSL keeps the first one).
_FIXED_BEFORE_SNI = {
    "openssl": ("verify_client", "crl", "min_version", "max_version", "groups"),
    "pyopenssl": ("min_version", "max_version", "tls13_ciphersuites", "groups", "verify_depth"),
    "gnutls": ("min_version", "max_version", "alpn"),
}


def refuse_unsupported(name: str, profile: ServerProfile | ClientProfile, where: str) -> None:
    """Raise ConfigError if `profile` sets a key engine `name` cannot honour."""
    not_yet = _NOT_YET_CLIENT if isinstance(profile, ClientProfile) else _NOT_YET_SERVER
    for key in not_yet.get(name, ()):
        if getattr(profile, key, None):
            raise ConfigError(f"{where}: engine {name} does not support '{key}' yet; "
                              "use engine openssl for this profile")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def listed(where: str, key: str, value: str) -> list[str]:
    """The names of an OpenSSL-style list ("A:B"); each must be a plain name (no OpenSSL
    operators such as `?name`, which would ignore an unknown one). Raises ConfigError."""
    names = [n.strip() for n in value.split(":")]
    for n in names:
        if not _NAME.fullmatch(n):
            raise ConfigError(f"{where}: '{key}': {n!r} is not a name (in {value!r})")
    return names


_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)


def pem_crls(where: str, path: PathLike) -> list[x509.CertificateRevocationList]:
    """Every CRL of a PEM file; none at all is an error. Raises ConfigError."""
    try:
        blocks = _PEM_CRL.findall(Path(path).read_bytes())
        crls = [x509.load_pem_x509_crl(b) for b in blocks]
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: CRL {os.fspath(path)} unusable: {exc}") from None
    if not crls:
        raise ConfigError(f"{where}: CRL {os.fspath(path)} unusable: no PEM CRL in it")
    return crls


def usable_certificate(where: str, path: PathLike) -> CertInfo:
    """Our own certificate, parsed; one that has expired refuses start-up and reload (every
    engine would serve it otherwise). Raises ConfigError."""
    try:
        info = cert_info_from_pem_file(path)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{where}: certificate {os.fspath(path)}: {exc}") from None
    if info.not_after_ts < time.time():
        raise ConfigError(f"{where}: certificate {os.fspath(path)} expired on {info.not_after}")
    return info


def _reason(name: str) -> str | None:
    if name == "openssl":
        return None
    if name == "pyopenssl":
        try:
            from tlsbridge.daemon.engines import pyopenssl  # noqa: F401
        except Exception as exc:  # ImportError, or a pyOpenSSL/cryptography mismatch
            return f"pyOpenSSL cannot be imported: {exc}"
        return None
    if name == "gnutls":
        try:
            from tlsbridge.daemon.engines import gnutls
        except Exception as exc:
            return f"the GnuTLS binding cannot be imported: {exc}"
        return gnutls.UNAVAILABLE
    return f"unknown engine; known: {', '.join(ENGINES)}"


def available() -> dict[str, str | None]:
    """Every engine by name: None if it can run here, else the reason it cannot."""
    return {name: _reason(name) for name in ENGINES}


def _require(name: str, where: str) -> None:
    if name not in ENGINES:
        raise ConfigError(f"{where}: unknown TLS engine {name!r}; one of {', '.join(ENGINES)}")
    reason = _reason(name)
    if reason is not None:
        raise ConfigError(f"{where}: TLS engine {name} is unavailable: {reason}")


def server_engine_factory(name: str, profile: ServerProfile) -> Callable[[], TlsEngine]:
    """Build engine `name`'s server context for `profile` once; the factory makes one
    engine per connection. Raises ConfigError naming the profile."""
    where = f"profile '{profile.name}'"
    _require(name, where)
    refuse_unsupported(name, profile, where)
    local = usable_certificate(where, profile.certificate)
    if name == "openssl":
        from tlsbridge.daemon.tls_context import server_context

        if profile.verify_client not in _OPENSSL_VERIFY_MODES:
            raise ConfigError(
                f"{where}: engine openssl cannot do verify_client = {profile.verify_client!r} "
                f"(use pyopenssl or gnutls)"
            )
        return functools.partial(
            OpenSSLEngine, server_context(profile), server_side=True, local_cert=local
        )
    if name == "pyopenssl":
        from tlsbridge.daemon.engines import pyopenssl

        return functools.partial(
            pyopenssl.PyOpenSSLEngine,
            pyopenssl.server_context(profile),
            server_side=True,
            local_cert=local,
        )
    from tlsbridge.daemon.engines import gnutls

    return functools.partial(gnutls.GnuTLSEngine, gnutls.server_context(profile), local_cert=local)


def listener_engine_factory(
    name: str, default: ServerProfile, sni_profiles: Sequence[ServerProfile] = (), *,
    strict_sni: bool = False,
) -> Callable[[], TlsEngine]:
    """Like server_engine_factory, for a listener that picks a profile by SNI."""
    if not sni_profiles and not strict_sni:
        return server_engine_factory(name, default)
    _require(name, f"profile '{default.name}'")
    _same_before_sni(name, default, sni_profiles)
    for p in (default, *sni_profiles):
        refuse_unsupported(name, p, f"profile '{p.name}'")
    local = {p.name: usable_certificate(f"profile '{p.name}'", p.certificate)
             for p in (default, *sni_profiles)}
    if name == "openssl":
        from tlsbridge.daemon.tls_context import listener_context

        return functools.partial(
            OpenSSLEngine, listener_context(default, sni_profiles, strict=strict_sni),
            server_side=True, local_cert=local[default.name], local_by_profile=local)
    if name == "pyopenssl":
        from tlsbridge.daemon.engines import pyopenssl

        return functools.partial(
            pyopenssl.PyOpenSSLEngine,
            pyopenssl.listener_context(default, sni_profiles, strict=strict_sni),
            server_side=True, local_cert=local[default.name], local_by_profile=local)
    from tlsbridge.daemon.engines import gnutls

    return functools.partial(
        gnutls.GnuTLSEngine, gnutls.listener_context(default, sni_profiles, strict=strict_sni),
        local_cert=local[default.name], local_by_profile=local)


def _same_before_sni(name: str, default: ServerProfile,
                     sni_profiles: Sequence[ServerProfile]) -> None:
    for p in sni_profiles:
        for key in _FIXED_BEFORE_SNI[name]:
            if getattr(p, key) != getattr(default, key):
                raise ConfigError(
                    f"profile '{p.name}': engine {name} settles '{key}' before it sees the SNI, "
                    f"so it must be the same as in the listener's default profile "
                    f"'{default.name}' (or use one listener each)")


def _openssl_client(
    *,
    ca_file: PathLike | None,
    cert: PathLike | None,
    key: PathLike | None,
    verify: bool,
    server_hostname: str | None,
    sni: str | None,
    alpn: Sequence[str],
    local: CertInfo | None,
) -> TlsEngine:
    # The ssl module sends server_hostname as SNI and checks the certificate against it:
    # the two can differ only when no name is checked.
    if sni is None or sni == server_hostname:
        wrap_name = server_hostname
    elif server_hostname is None:
        wrap_name = sni or None
    else:
        raise ValueError("engine openssl cannot send an SNI other than server_hostname")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        if verify:
            ctx.check_hostname = server_hostname is not None
            if ca_file is None:
                ctx.load_default_certs()
            else:
                ctx.load_verify_locations(cafile=os.fspath(ca_file))
        else:
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        if cert is not None:
            ctx.load_cert_chain(os.fspath(cert), None if key is None else os.fspath(key))
    except (ssl.SSLError, OSError) as exc:
        raise ValueError(f"client certificate, key or CA file unusable: {exc}") from None
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return OpenSSLEngine(ctx, server_side=False, server_hostname=wrap_name, local_cert=local)


def client_engine(
    name: str,
    *,
    ca_file: PathLike | None,
    cert: PathLike | None = None,
    key: PathLike | None = None,
    verify: bool = True,
    server_hostname: str | None = None,
    sni: str | None = None,
    alpn: Sequence[str] = (),
    password: str | None = None,
) -> TlsEngine:
    """A client engine with a context of its own (tests, health checks, outbound links).

    `ca_file` None trusts the system's CAs. `server_hostname` is checked against the server's
    certificate and is the SNI sent, unless it is an IP literal; `sni` sends another name
    ("" none). Raises ValueError on unusable files, ConfigError if the engine is unavailable.
    """
    _require(name, "client")
    local = None
    if cert is not None:
        try:
            local = cert_info_from_pem_file(cert)
        except (OSError, ValueError) as exc:
            raise ValueError(f"client certificate {cert}: {exc}") from None
    if name == "openssl":
        return _openssl_client(
            ca_file=ca_file, cert=cert, key=key, verify=verify,
            server_hostname=server_hostname, sni=sni, alpn=alpn, local=local,
        )
    if name == "pyopenssl":
        from tlsbridge.daemon.engines import pyopenssl

        ctx = pyopenssl.client_context(ca_file=ca_file, cert=cert, key=key, verify=verify,
                                       alpn=alpn, password=password)
        return pyopenssl.PyOpenSSLEngine(ctx, server_side=False, server_hostname=server_hostname,
                                         sni=sni, local_cert=local)
    from tlsbridge.daemon.engines import gnutls

    gctx = gnutls.client_context(ca_file=ca_file, cert=cert, key=key, verify=verify, alpn=alpn,
                                 password=password)
    return gnutls.GnuTLSEngine(gctx, server_hostname=server_hostname, sni=sni, local_cert=local)
