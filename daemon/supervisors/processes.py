"""The supervisor's process manager: starts N worker processes, restarts one that dies, and
stops them all. It knows nothing of events or control; a death is reported to `on_death`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger("tlsbridge")

RESTART_DELAY = 1.0
STOP_GRACE = 10.0  # seconds a worker has to close its connections after SIGTERM


class WorkerProcesses:
    def __init__(self, config_path: Path, count: int, on_death: Callable[[int], None]) -> None:
        self.config_path = config_path
        self.count = count
        self.on_death = on_death
        self.restarts = 0
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._generations: dict[int, int] = {}
        self._stopping = False

    def start_all(self) -> None:
        for index in range(self.count):
            self._spawn(index)

    def alive(self, index: int) -> bool:
        return self._procs[index].poll() is None

    def _spawn(self, index: int) -> None:
        # A restarted worker numbers its connections afresh: a new generation keeps the ids
        # unique for the daemon's whole life.
        generation = self._generations[index] = self._generations.get(index, -1) + 1
        argv = [sys.executable, "-m", "tlsbridge.daemon.cli", "worker", "-c",
                str(self.config_path), "--index", str(index), "--count", str(self.count),
                "--generation", str(generation)]
        self._procs[index] = subprocess.Popen(argv)
        log.info("worker %d: pid %d", index, self._procs[index].pid)

    async def watch(self) -> None:
        """Restart a worker that died (after its connections are reported by on_death)."""
        while True:
            await asyncio.sleep(RESTART_DELAY)
            for index, proc in list(self._procs.items()):
                if proc.poll() is not None and not self._stopping:
                    log.error("worker %d (pid %d) exited with %s: restarting", index, proc.pid,
                              proc.returncode)
                    self.restarts += 1
                    self.on_death(index)
                    self._spawn(index)

    async def stop(self) -> None:
        """SIGTERM to each, then SIGKILL to any still there after STOP_GRACE."""
        self._stopping = True
        for proc in self._procs.values():
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for proc in self._procs.values():
            while proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            if proc.poll() is None:
                proc.kill()
