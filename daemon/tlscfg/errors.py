"""The error every layer of the tls.cfg import raises for a tls.cfg it cannot take."""

from __future__ import annotations

__all__ = ["TlsCfgError"]


class TlsCfgError(ValueError):
    """A tls.cfg that Kamailio would refuse; the message starts with `file:line:column:`."""

    def __init__(self, source: str, line: int, column: int, message: str) -> None:
        where = f"{source}:{line}:{column}" if column else f"{source}:{line}"
        super().__init__(f"{where}: {message}")
        self.source, self.line, self.column, self.message = source, line, column, message
