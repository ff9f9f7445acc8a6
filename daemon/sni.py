"""Which profile serves a TLS server name: exact names first, then one-label wildcards."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Generic, TypeVar

T = TypeVar("T")


class SniTable(Generic[T]):
    """`sip.example.com` matches itself; `*.example.com` matches `a.example.com` but neither
    `example.com` nor `a.b.example.com` (RFC 6125's one label). Case does not matter."""

    def __init__(self, entries: Iterable[tuple[Iterable[str], T]]) -> None:
        self._exact: dict[str, T] = {}
        self._wild: dict[str, T] = {}
        for names, value in entries:
            for name in names:
                name = name.lower().rstrip(".")
                if name.startswith("*."):
                    self._wild.setdefault(name[2:], value)
                else:
                    self._exact.setdefault(name, value)

    def match(self, server_name: str | None) -> T | None:
        if not server_name:
            return None
        name = server_name.lower().rstrip(".")
        found = self._exact.get(name)
        if found is not None:
            return found
        _, dot, parent = name.partition(".")
        return self._wild.get(parent) if dot else None

    def __bool__(self) -> bool:
        return bool(self._exact or self._wild)


class SniRouter(Generic[T]):
    """A listener's choice by SNI, the same for every engine: the profile serving the name, else
    the listener's default; with `strict`, a name no profile serves (or none) is refused."""

    def __init__(self, default: T, entries: Iterable[tuple[Iterable[str], T]], *,
                 strict: bool) -> None:
        self.default = default
        self.strict = strict
        self._table = SniTable(entries)

    def choose(self, server_name: str | None) -> T | None:
        """The value that serves `server_name`; None if the handshake must be refused."""
        found = self._table.match(server_name)
        if found is not None:
            return found
        return None if self.strict else self.default


def refusal(server_name: str | None) -> str:
    """The detail of an `sni_refused` failure (the openssl engine's wording)."""
    return f"no profile serves the name {server_name!r}"
