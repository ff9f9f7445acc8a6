"""Builds stdlib ssl contexts from profiles; every failure names the profile and the file."""

from __future__ import annotations

import ssl
from collections.abc import Sequence
from pathlib import Path

from tlsbridge.daemon import keylog
from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile
from tlsbridge.daemon.sni import SniTable

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "on": ssl.CERT_REQUIRED}


def _base(where: str, profile: ServerProfile | ClientProfile, protocol: int) -> ssl.SSLContext:
    ctx = ssl.SSLContext(protocol)
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
    from tlsbridge.daemon.engines.registry import usable_certificate

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
    from tlsbridge.daemon.engines.registry import pem_crls

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
    where = f"profile '{profile.name}'"
    ctx = _base(where, profile, ssl.PROTOCOL_TLS_SERVER)
    # Tickets cost ~70 us per handshake and SIP clients rarely resume (DESIGN section 9).
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 tickets too
    _identity(where, ctx, profile)
    _trust(where, ctx, profile)
    if profile.verify_client == "optional_no_ca":
        raise ConfigError(f"{where}: engine openssl cannot do verify_client = 'optional_no_ca' "
                          "(use pyopenssl or gnutls)")
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


def _remember_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
    # The server name is only visible during the handshake; keep it for the facts.
    obj.tlsb_sni = name  # type: ignore[attr-defined]


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

    def choose(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> int | None:
        obj.tlsb_sni = name  # type: ignore[attr-defined]
        chosen = table.match(name)
        if chosen is not None:
            obj.tlsb_profile, obj.context = chosen  # type: ignore[attr-defined]
            return None
        if strict:
            obj.tlsb_refused = f"no profile serves the name {name!r}"  # type: ignore[attr-defined]
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    base.sni_callback = choose
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
