"""Builds stdlib ssl contexts from profiles; every failure names the profile and the file."""

from __future__ import annotations

import ssl

from tlsbridge.daemon.config import ConfigError, ServerProfile

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
