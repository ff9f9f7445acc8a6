"""TLS key logging (NSS key log format, for Wireshark): off unless `[daemon] keylog_file`.

The engines read `path()`; GnuTLS reads SSLKEYLOGFILE from the environment by itself, so the
variable is removed unless key logging is asked for.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

log = logging.getLogger("tlsbridge")

_path: str | None = None


def configure(path: Path | None) -> None:
    """Call before any TLS library is loaded (GnuTLS reads its environment at load time)."""
    global _path
    inherited = os.environ.pop("SSLKEYLOGFILE", None)
    if inherited and path is None:
        log.warning("ignoring SSLKEYLOGFILE from the environment: TLS secrets are recorded "
                    "only with [daemon] keylog_file")
    if path is None:
        _path = None
        return
    # The secrets decrypt every session: readable by the daemon's user only.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.fchmod(fd, 0o600)
    os.close(fd)
    _path = str(path)
    os.environ["SSLKEYLOGFILE"] = _path
    log.warning("TLS key logging to %s is on: anyone reading it can decrypt traffic", path)


def path() -> str | None:
    return _path


def append(line: bytes) -> None:
    """For engines that hand over key log lines one by one (pyOpenSSL)."""
    if _path is not None:
        with open(_path, "ab") as f:
            f.write(line + b"\n")
