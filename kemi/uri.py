"""Just enough SIP URI parsing to decide a transport: scheme, host, port, parameters."""

from __future__ import annotations

from dataclasses import dataclass, field

from tlsbridge.shared.addr import TLS_DEFAULT_PORT

__all__ = ["TLS_DEFAULT_PORT", "SipUri", "parse_uri"]


@dataclass(frozen=True, slots=True)
class SipUri:
    scheme: str
    host: str
    port: int | None
    params: dict[str, str | None] = field(default_factory=dict)
    user: str | None = None

    @property
    def transport(self) -> str:
        value = self.params.get("transport")
        if value:
            return value.lower()
        return "tls" if self.scheme == "sips" else "udp"

    @property
    def is_tls(self) -> bool:
        return self.scheme == "sips" or self.transport == "tls"

    @property
    def hostport(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = self.port or (TLS_DEFAULT_PORT if self.is_tls else 5060)
        return f"{host}:{port}"


def parse_uri(text: str) -> SipUri:
    """Parse `sip:`/`sips:` URIs (a name-addr's <...> is stripped). Raises ValueError."""
    text = text.strip()
    if "<" in text:
        start, end = text.find("<"), text.find(">")
        if end < start:
            raise ValueError(f"unbalanced <> in {text!r}")
        text = text[start + 1 : end]
    scheme, sep, rest = text.partition(":")
    scheme = scheme.lower()
    if not sep or scheme not in ("sip", "sips"):
        raise ValueError(f"not a sip/sips URI: {text!r}")
    rest = rest.split("?", 1)[0]
    user = None
    if "@" in rest:
        user, _, rest = rest.rpartition("@")
    hostport, *param_parts = rest.split(";")
    params: dict[str, str | None] = {}
    for part in param_parts:
        if part:
            key, eq, value = part.partition("=")
            params[key.lower()] = value if eq else None
    if hostport.startswith("["):
        host, _, tail = hostport[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    else:
        host, _, port_text = hostport.partition(":")
    if not host:
        raise ValueError(f"URI without host: {text!r}")
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"bad port in URI {text!r}")
    return SipUri(scheme, host, int(port_text) if port_text else None, params, user)
