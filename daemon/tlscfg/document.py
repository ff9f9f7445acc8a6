"""The converter's result before it is TOML: the tables of a tlsbridge configuration with the
comments and warnings that go with each. The renderer writes it as it is, deciding nothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from tlsbridge.daemon.tlscfg.model import Section

__all__ = ["Document", "Entry", "Listener", "Table"]


@dataclass(frozen=True, slots=True)
class Entry:
    """`key = value`, and where the value comes from (a comment, "" for none)."""

    key: str
    value: Any  # str, int, bool, or a list of them
    comment: str = ""


@dataclass(frozen=True, slots=True)
class Table:
    """A [profile.NAME] (kind "profile") or [client.NAME] table made from one section."""

    kind: Literal["profile", "client"]
    name: str
    section: Section
    entries: tuple[Entry, ...]
    notes: tuple[str, ...] = ()  # warnings about the section, written above the table

    def get(self, key: str) -> Any:
        """The value of `key`, None if the table does not set it."""
        return next((e.value for e in self.entries if e.key == key), None)


@dataclass(frozen=True, slots=True)
class Listener:
    """A [[listener]]."""

    address: str
    profile: str
    sni: tuple[str, ...]  # the profiles chosen by SNI, in Kamailio's order
    section: Section  # the profile that made it: warnings name it
    origin: str  # a comment line: where it comes from
    commented: bool = False  # written as a template the operator completes
    notes: tuple[str, ...] = ()  # warnings about the listener, written above it
    engine: str | None = None  # when the profiles chosen by SNI need one
    engine_why: str = ""


@dataclass(frozen=True, slots=True)
class Document:
    """A whole tlsbridge configuration converted from `source`."""

    source: str
    run_dir: str
    hairpin: str
    sip_address: str
    listeners: tuple[Listener, ...]
    profiles: tuple[Table, ...]
    clients: tuple[Table, ...]
    notes: tuple[str, ...] = ()  # warnings about no section: written at the top
    relative_paths: bool = False  # some path is relative: say relative to what
    warnings: tuple[str, ...] = ()  # every warning, in file order
