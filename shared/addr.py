"""One spelling of `host:port` for both sides (IPv6 in brackets), so keys compare as strings."""

from __future__ import annotations

import ipaddress

TLS_DEFAULT_PORT = 5061  # SIP over TLS (RFC 3261), where a target or listener names no port


def format_addr(host: str, port: int) -> str:
    """`192.0.2.1:5061`, `[2001:db8::1]:5061`."""
    if ":" in host and not host.startswith("["):
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def parse_addr(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """Inverse of format_addr; a bare host takes `default_port`. Raises ValueError."""
    text = text.strip()
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        if not sep:
            raise ValueError(f"unclosed '[' in address {text!r}")
        port_text = rest[1:] if rest.startswith(":") else None
        if rest and port_text is None:
            raise ValueError(f"garbage after ']' in address {text!r}")
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
    else:
        host, port_text = text, None
    if not host:
        raise ValueError(f"empty host in address {text!r}")
    if port_text is None:
        if default_port is None:
            raise ValueError(f"address {text!r} has no port")
        return host, default_port
    if not (port_text.isascii() and port_text.isdigit()) or not 0 < int(port_text) < 65536:
        raise ValueError(f"bad port in address {text!r}")
    return host, int(port_text)


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def target_key(host: str, port: int, sni: str | None, profile: str) -> str:
    """Identity of an outbound connection: the same key is reused, another gets its own."""
    return f"{format_addr(host, port)}|{sni or ''}|{profile}"


def default_sni(host: str) -> str | None:
    """RFC 5922: the name sent (and checked) is the SIP domain; an IP address sends none."""
    return None if is_ip(host) else host


def is_plain_target(host: str, sni: str | None, profile: str) -> bool:
    """An outbound target that asks for no identity beyond its address (the default client
    profile, no SNI other than the host): any TLS connection with that peer will do, also one
    it opened to us."""
    return profile == "default" and sni in (None, host)
