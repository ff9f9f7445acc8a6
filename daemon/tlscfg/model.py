"""What a tls.cfg says, as the parser read it: its sections (TLS profiles) and their settings.

Frozen: the converter reads the model and never changes it. A `Section` is compared and hashed
by identity, so that two identical profiles in one file stay two profiles.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Literal

from tlsbridge.shared.addr import format_addr

__all__ = ["DOMAIN_AND_SUBDOMAINS", "SUBDOMAINS", "Kind", "Role", "Section", "Setting", "TlsCfg"]

Role = Literal["server", "client"]
Kind = Literal["default", "any", "address"]
# server_name_mode: the name and its subdomains, or the subdomains only; any other value
# (0 included) the name only.
DOMAIN_AND_SUBDOMAINS, SUBDOMAINS = 1, 2


@dataclass(frozen=True, slots=True)
class Setting:
    """One `key = value` line: `key` is the canonical name, `spelling` what the file wrote."""

    key: str
    spelling: str
    value: Any  # bool, int, str; methods and verify_client in their canonical spelling
    text: str  # the value as written (after unquoting)
    line: int


def _no_settings() -> Mapping[str, Setting]:
    return MappingProxyType({})


@dataclass(frozen=True, eq=False, slots=True)
class Section:
    """A TLS profile: `[server:default]`, `[client:any]`, `[server:192.0.2.1:5061]`..."""

    role: Role
    kind: Kind
    line: int  # 0: not in the file (Kamailio's built-in default profile)
    source: str = "tls.cfg"
    host: str | None = None  # normalised IP address, for kind "address"
    port: int | None = None  # 0 matches every port of `host`
    settings: Mapping[str, Setting] = field(default_factory=_no_settings)
    replaced: tuple[Setting, ...] = ()  # set again further down

    @property
    def title(self) -> str:
        if self.kind != "address":
            return f"[{self.role}:{self.kind}]"
        return f"[{self.role}:{format_addr(self.host or '', self.port or 0)}]"

    def get(self, key: str) -> Any:
        setting = self.settings.get(key)
        return None if setting is None else setting.value

    @property
    def server_name(self) -> str | None:
        # An empty server_name is no server_name: Kamailio tests its length.
        return self.get("server_name") or None

    def where(self, key: str | None = None) -> str:
        """`tls.cfg:12: [server:any] server_name` for messages."""
        setting = self.settings.get(key) if key else None
        line = setting.line if setting else self.line
        prefix = f"{self.source}:{line}: " if line else f"{self.source}: "
        return prefix + self.title + (f" {key}" if key else "")


@dataclass(frozen=True, slots=True)
class TlsCfg:
    """The sections of a tls.cfg in file order, and what reading it had to say."""

    source: str
    sections: tuple[Section, ...]
    warnings: tuple[str, ...] = ()
