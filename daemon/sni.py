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
