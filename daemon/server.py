"""The daemon's lifecycle: start (listeners, hub), serve until told to stop, shut down cleanly."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from collections.abc import Callable

from tlsbridge.daemon.config import Config, Listener
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.registry import listener_engine_factory
from tlsbridge.daemon.hub import Hub
from tlsbridge.daemon.outbound import Connector
from tlsbridge.daemon.relay import InboundRelay

log = logging.getLogger("tlsbridge")


class Server:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.hub = Hub(config)
        self._servers: list[asyncio.Server] = []
        self._stop = asyncio.Event()

    def _engine_factory(self, listener: Listener) -> Callable[[], TlsEngine]:
        profile = self.config.profiles[listener.profile]
        return listener_engine_factory(
            listener.engine or profile.engine, profile,
            [self.config.profiles[n] for n in listener.sni_profiles],
            strict_sni=listener.strict_sni,
        )

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Contexts first: a bad certificate refuses start-up before any port is taken.
        factories = {lst: self._engine_factory(lst) for lst in self.config.listeners}
        self.hub.connector = Connector(self.hub, self.config)
        self.hub.start()
        for lst, factory in factories.items():
            server = await loop.create_server(
                functools.partial(InboundRelay, self.hub, self.config, lst, factory),
                lst.host,
                lst.port,
                reuse_address=True,
                reuse_port=True,
                backlog=4096,
            )
            self._servers.append(server)
            log.info("listening for TLS on %s (profile %s, engine %s)", lst.address, lst.profile,
                     lst.engine or self.config.profiles[lst.profile].engine)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)

    async def serve(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()

    async def shutdown(self) -> None:
        log.info("shutting down: %d open connections", len(self.hub.conns))
        for server in self._servers:
            server.close()
        if self.hub.connector:
            self.hub.connector.close_all()
        for conn in list(self.hub.conns.values()):
            conn.kill("shutdown")
        # Let close_notify and FINs leave before the loop goes.
        await asyncio.sleep(0.05)
        await self.hub.close()


async def _main(config: Config) -> None:
    server = Server(config)
    await server.start()
    try:
        await server.serve()
    finally:
        await server.shutdown()


def run(config: Config) -> None:
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(config))
    else:
        uvloop.run(_main(config))
