"""A supervisor and N worker processes sharing the listeners (SO_REUSEPORT).

Each TLS connection lives and dies in one worker: no TLS state is ever shared or moved. The
supervisor is two parts: the process manager (processes.py) starts and restarts the workers,
and the broker (broker.py) is what clients see as one daemon (events, control, look-ups,
admission across workers). This module runs them together.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from collections.abc import Coroutine
from typing import Any

from tlsbridge.daemon import reload as rl
from tlsbridge.daemon.config import Config
from tlsbridge.daemon.supervisors.broker import Broker
from tlsbridge.daemon.supervisors.processes import WorkerProcesses
from tlsbridge.shared import control as ctl

log = logging.getLogger("tlsbridge")


class Supervisor:
    def __init__(self, config: Config, workers: int) -> None:
        self.count = workers
        self.broker = Broker(config, workers)
        self.processes = WorkerProcesses(config.path, workers, self._worker_died)
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()

    def _worker_died(self, index: int) -> None:
        self.broker.counters["worker_restarts"] += 1
        self.broker.forget_worker(index)

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        broker = self.broker
        broker.open()
        self.processes.start_all()
        self._own(self.processes.watch())
        self._own(rl.check_expiry_forever(lambda: broker.config, broker.publish))
        await self._wait_for_workers()
        broker.serve()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, lambda: self._own(broker.reload_quietly()))
        if broker.config.metrics:
            from tlsbridge.daemon import metrics

            metrics.start(*broker.config.metrics, loop, broker.metrics_snapshot)
        log.info("supervisor %d started %d workers", os.getpid(), self.count)

    async def _wait_for_workers(self, timeout: float = 30.0) -> None:
        """Our control endpoint answers only once every worker listens."""
        end = time.monotonic() + timeout
        for index in range(self.count):
            while True:
                try:
                    await self.broker.ping(index)
                    break
                except ctl.ControlError:
                    if not self.processes.alive(index) or time.monotonic() > end:
                        raise RuntimeError(f"worker {index} did not start") from None

    async def serve(self) -> None:
        await self._stop.wait()

    async def shutdown(self) -> None:
        await self.processes.stop()
        await asyncio.sleep(0.1)  # the workers' last events
        for task in list(self._tasks):
            task.cancel()
        await self.broker.close()


def run_supervised(config: Config, workers: int) -> None:
    async def main() -> None:
        sup = Supervisor(config, workers)
        await sup.start()
        try:
            await sup.serve()
        finally:
            await sup.shutdown()

    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
