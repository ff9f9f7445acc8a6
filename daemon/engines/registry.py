"""The TLS engines by name: which can run here, and how to build them from profiles.

The registry chooses; no engine imports it back (the checks the engines share are in
`checks.py`, below both). Engines other than `openssl` are imported on first use, so a
missing pyOpenSSL or libgnutls only matters to the listeners that ask for it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path

from tlsbridge.daemon.certinfo import cert_info_from_pem_file
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.engines import openssl
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.checks import PathLike, usable_certificate
from tlsbridge.daemon.engines.openssl_socket import ServerEngines
from tlsbridge.shared.facts import CertInfo

__all__ = [
    "ENGINES", "available", "client_engine", "client_engine_factory", "listener_engine_factory",
    "server_engine_factory",
]

ENGINES = ("openssl", "pyopenssl", "gnutls")


# What an engine fixes before it learns the SNI, so a listener's SNI profiles must agree with
# its default profile on it (engines/pyopenssl.py and engines/gnutls/session.py say why).
# openssl: as pyopenssl, and Python's ssl cannot set the verify mode of a connection (OpenSSL
# keeps the first one).
FIXED_BEFORE_SNI = {
    "openssl": ("verify_client", "crl", "min_version", "max_version", "groups"),
    "pyopenssl": ("min_version", "max_version", "tls13_ciphersuites", "groups", "verify_depth"),
    "gnutls": ("min_version", "max_version", "alpn"),
}


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
    local = usable_certificate(where, profile.certificate)
    if name == "openssl":
        return ServerEngines(openssl.server_context(profile), local_cert=local)
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
    local = {p.name: usable_certificate(f"profile '{p.name}'", p.certificate)
             for p in (default, *sni_profiles)}
    if name == "openssl":
        return ServerEngines(openssl.listener_context(default, sni_profiles, strict=strict_sni),
                             local_cert=local[default.name], local_by_profile=local)
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
        for key in FIXED_BEFORE_SNI[name]:
            if getattr(p, key) != getattr(default, key):
                raise ConfigError(
                    f"profile '{p.name}': engine {name} settles '{key}' before it sees the SNI, "
                    f"so it must be the same as in the listener's default profile "
                    f"'{default.name}' (or use one listener each)")


ClientFactory = Callable[..., TlsEngine]


def client_engine_factory(profile: ClientProfile) -> ClientFactory:
    """Build the client context of `profile` (engine `profile.engine`) once; the factory makes
    one engine per connection: `factory(server_hostname, sni=None)`, where `server_hostname`
    is checked against the server's certificate and is the SNI sent unless it is an IP literal
    (`sni` sends another name, "" none; engine openssl cannot). Every key of the profile is
    honoured or refused: raises ConfigError naming the client profile (and the key or file)."""
    where = f"client profile '{profile.name}'"
    _require(profile.engine, where)
    local = (usable_certificate(where, profile.certificate)
             if profile.certificate is not None else None)
    return _client_factory(profile.engine, profile, local)


def _client_factory(name: str, profile: ClientProfile, local: CertInfo | None, *,
                    alpn: Sequence[str] = (), check_hostname: bool = True) -> ClientFactory:
    if name == "openssl":
        ctx = openssl.client_context(profile)
        if alpn:
            ctx.set_alpn_protocols(list(alpn))
        if not check_hostname:
            ctx.check_hostname = False

        def openssl_engine(server_hostname: str | None, sni: str | None = None) -> TlsEngine:
            return openssl.OpenSSLEngine(ctx, server_side=False,
                                 server_hostname=_openssl_name(server_hostname, sni),
                                 local_cert=local)

        return openssl_engine
    if name == "pyopenssl":
        from tlsbridge.daemon.engines import pyopenssl

        pctx = pyopenssl.client_context(profile, alpn=alpn)

        def pyopenssl_engine(server_hostname: str | None, sni: str | None = None) -> TlsEngine:
            return pyopenssl.PyOpenSSLEngine(pctx, server_side=False,
                                             server_hostname=server_hostname, sni=sni,
                                             local_cert=local)

        return pyopenssl_engine
    from tlsbridge.daemon.engines import gnutls

    gctx = gnutls.client_context(profile, alpn=alpn)

    def gnutls_engine(server_hostname: str | None, sni: str | None = None) -> TlsEngine:
        return gnutls.GnuTLSEngine(gctx, server_hostname=server_hostname, sni=sni,
                                   local_cert=local)

    return gnutls_engine


def _openssl_name(server_hostname: str | None, sni: str | None) -> str | None:
    # The ssl module sends server_hostname as SNI and checks the certificate against it:
    # the two can differ only when no name is checked.
    if sni is None or sni == server_hostname:
        return server_hostname
    if server_hostname is None:
        return sni or None
    raise ValueError("engine openssl cannot send an SNI other than server_hostname")


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
    """A client engine with a context of its own (tests, health checks), built as a client
    profile's would be (client_engine_factory), from a few keys.

    `ca_file` None trusts the system's CAs. `server_hostname` is checked against the server's
    certificate and is the SNI sent, unless it is an IP literal; `sni` sends another name
    ("" none); None checks no name. Raises ValueError on unusable files, ConfigError if the
    engine is unavailable.
    """
    _require(name, "client")
    profile = ClientProfile(
        name="client", engine=name, ca_list=None if ca_file is None else Path(ca_file),
        certificate=None if cert is None else Path(cert),
        private_key=None if cert is None else Path(key if key is not None else cert),
        verify_server=verify, private_key_password=password)
    try:
        local = None if cert is None else cert_info_from_pem_file(cert)
        factory = _client_factory(name, profile, local, alpn=alpn,
                                  check_hostname=server_hostname is not None)
    except (OSError, ValueError, ConfigError) as exc:
        raise ValueError(str(exc)) from None
    return factory(server_hostname, sni)
