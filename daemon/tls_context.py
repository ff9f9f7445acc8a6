"""Builds stdlib ssl contexts from profiles; every failure names the profile and the file."""

from __future__ import annotations

import ssl

from tlsbridge.daemon.config import ClientProfile, ConfigError, ServerProfile

_VERSIONS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
_VERIFY = {"off": ssl.CERT_NONE, "optional": ssl.CERT_OPTIONAL, "on": ssl.CERT_REQUIRED}


def _remember_sni(obj: ssl.SSLObject, name: str | None, _ctx: ssl.SSLContext) -> None:
    # The server name is only visible during the handshake; keep it for the facts.
    obj.tlsb_sni = name  # type: ignore[attr-defined]


def server_context(profile: ServerProfile) -> ssl.SSLContext:
    where = f"profile '{profile.name}'"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = _VERSIONS[profile.min_version]
    ctx.maximum_version = _VERSIONS[profile.max_version]
    # Renegotiation is a DoS vector and SIP has no use for it.
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # Tickets cost ~70 us per handshake and SIP clients rarely resume (DESIGN section 9).
    ctx.num_tickets = 0
    ctx.options |= ssl.OP_NO_TICKET  # TLS 1.2 tickets too
    try:
        ctx.load_cert_chain(str(profile.certificate), str(profile.private_key))
    except ssl.SSLError as exc:
        raise ConfigError(
            f"{where}: certificate {profile.certificate} and key {profile.private_key} "
            f"cannot be used: {exc.reason or exc}"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read certificate or key: {exc}") from None
    if profile.ca_list is not None:
        try:
            ctx.load_verify_locations(cafile=str(profile.ca_list))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}: CA list {profile.ca_list} unusable: {exc}") from None
    ctx.verify_mode = _VERIFY[profile.verify_client]
    if profile.ciphers:
        try:
            ctx.set_ciphers(profile.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{where}: no usable cipher in '{profile.ciphers}'") from None
    if profile.alpn:
        ctx.set_alpn_protocols(list(profile.alpn))
    ctx.sni_callback = _remember_sni
    return ctx


def client_context(profile: ClientProfile) -> ssl.SSLContext:
    """Host names are checked by the caller's engine (server_hostname), not here."""
    where = f"client profile '{profile.name}'"
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = _VERSIONS[profile.min_version]
    ctx.maximum_version = _VERSIONS[profile.max_version]
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if profile.verify_server:
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.check_hostname = True
        try:
            if profile.ca_list is not None:
                ctx.load_verify_locations(cafile=str(profile.ca_list))
            else:
                ctx.load_default_certs()
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{where}: CA list {profile.ca_list} unusable: {exc}") from None
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if profile.certificate is not None:
        try:
            ctx.load_cert_chain(str(profile.certificate), str(profile.private_key))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(
                f"{where}: certificate {profile.certificate} and key {profile.private_key} "
                f"cannot be used: {exc}"
            ) from None
    if profile.ciphers:
        try:
            ctx.set_ciphers(profile.ciphers)
        except ssl.SSLError:
            raise ConfigError(f"{where}: no usable cipher in '{profile.ciphers}'") from None
    return ctx
