"""The warnings of a conversion: each names the file, line, section and key, is reported in
file order, and is also written as a comment above the table it concerns."""

from __future__ import annotations

from tlsbridge.daemon.tlscfg.model import Section, TlsCfg

__all__ = ["Findings"]


class Findings:
    """Collects warnings while the converter runs; `in_order` and `notes` read them after."""

    def __init__(self, cfg: TlsCfg) -> None:
        # What reading the file found (a directory's order) comes before everything else.
        self._found: list[tuple[tuple[int, int], str]] = [((-1, 0), w) for w in cfg.warnings]
        # Files in the order they were read: the first section of each.
        self._sources = {sec.source: i for i, sec in reversed(list(enumerate(cfg.sections)))}
        self._notes: dict[Section, list[str]] = {}

    def warn(self, sec: Section, key: str | None, message: str,
             notes: list[str] | None = None) -> None:
        """Record a warning; it is also written as a comment above the section's table (or
        into `notes`, for what is written elsewhere: a listener)."""
        text = f"{sec.where(key)}: {message}"
        setting = sec.settings.get(key) if key else None
        order = (self._sources.get(sec.source, -1), setting.line if setting else sec.line)
        self._found.append((order, text))
        (self._notes.setdefault(sec, []) if notes is None else notes).append(text)

    def notes(self, sec: Section) -> tuple[str, ...]:
        """The warnings about `sec`, in the order they were found."""
        return tuple(self._notes.get(sec, ()))

    def in_order(self) -> list[str]:
        """Every warning in file order, and in the order found within a line (a stable sort)."""
        return [w for _, w in sorted(self._found, key=lambda w: w[0])]
