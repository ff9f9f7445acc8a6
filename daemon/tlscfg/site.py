"""What a tls.cfg does not say, given on the command line, and the placeholder for what is not
given at all."""

from __future__ import annotations

from dataclasses import dataclass

from tlsbridge.daemon.config import PLACEHOLDER

__all__ = ["Site", "placeholder"]


def placeholder(what: str) -> str:
    """A value the operator must set: `tlsbridge check` refuses it until then."""
    return f"{PLACEHOLDER} {what}>"


@dataclass(frozen=True, slots=True)
class Site:
    """What a tls.cfg does not say: where the daemon listens and meets Kamailio."""

    tls_port: int = 5061
    hairpin: str = "127.0.0.1:5062"
    listen_ip: str | None = None  # the address of the [server:default] listener
    run_dir: str | None = None
    sip_address: str | None = None
