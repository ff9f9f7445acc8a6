"""The run directory: its permissions, and the endpoints a supervisor and its workers share
in it."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tlsbridge.daemon.config import Config

log = logging.getLogger("tlsbridge")


def private_run_dir(path: Path) -> None:
    """The run directory guards the control socket: whoever can write there can kill
    connections. Create it 0750, or tighten one that others may write to."""
    os.makedirs(path, mode=0o750, exist_ok=True)
    mode = os.stat(path).st_mode & 0o777
    if mode & 0o027:
        try:
            os.chmod(path, mode & ~0o027)
        except OSError as exc:
            raise OSError(f"run directory {path} is open to others (mode {mode:o}) "
                          f"and cannot be tightened: {exc.strerror}") from None
        log.warning("run directory %s was mode %o: tightened to %o", path, mode, mode & ~0o027)


def worker_events_endpoint(config: Config) -> str:
    return f"ipc://{config.run_dir}/workers-events.sock"


def worker_control_endpoint(config: Config) -> str:
    return f"ipc://{config.run_dir}/workers-control.sock"
