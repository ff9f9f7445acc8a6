"""The daemon's lifecycle: start (listeners, hub), serve until told to stop, shut down cleanly,
and reload its configuration in between without touching live connections."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from typing import Any

from tlsbridge.daemon import reload as rl
from tlsbridge.daemon.config import Config, ConfigError, Listener, load_config
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.registry import listener_engine_factory
from tlsbridge.daemon.hub import Hub
from tlsbridge.daemon.outbound import Connector
from tlsbridge.daemon.relay import InboundRelay
from tlsbridge.shared import events as ev

log = logging.getLogger("tlsbridge")

WATCH_INTERVAL = 2.0


def build_factories(config: Config) -> dict[str, Callable[[], TlsEngine]]:
    """Every listener's engine factory; raises ConfigError before anything is swapped."""
    out = {}
    for lst in config.listeners:
        profile = config.profiles[lst.profile]
        out[lst.address] = listener_engine_factory(
            lst.engine or profile.engine, profile,
            [config.profiles[n] for n in lst.sni_profiles], strict_sni=lst.strict_sni,
        )
    return out


class Server:
    """One process serving every listener; or, with `worker`, one of a supervisor's workers
    (which then owns events, control, certificate checks and metrics)."""

    def __init__(self, config: Config, worker: tuple[int, int] | None = None,
                 generation: int = 0) -> None:
        self.config = config
        self.worker = worker
        self.hub = Hub(config, worker, generation)
        self.hub.reloader = self.reload
        self._factories: dict[str, Callable[[], TlsEngine]] = {}
        self._servers: dict[str, asyncio.Server] = {}
        self._fingerprints: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._reload_lock = asyncio.Lock()

    def _protocol(self, listener: Listener) -> InboundRelay:
        # Looked up per connection: a reload swaps the factory, live connections keep theirs.
        return InboundRelay(self.hub, self.config, listener, self._factories[listener.address])

    async def _listen(self, lst: Listener) -> None:
        loop = asyncio.get_running_loop()
        self._servers[lst.address] = await loop.create_server(
            lambda: self._protocol(lst), lst.host, lst.port,
            reuse_address=True, reuse_port=True, backlog=4096,
        )
        log.info("listening for %s on %s (profile %s, engine %s)",
                 "TLS" if lst.transport == "tls" else "WSS", lst.address, lst.profile,
                 lst.engine or self.config.profiles[lst.profile].engine)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        # Contexts first: a bad certificate refuses start-up before any port is taken.
        self._factories = build_factories(self.config)
        self._fingerprints = rl.fingerprints(self.config)
        self.hub.connector = Connector(self.hub, self.config)
        self.hub.start()
        for lst in self.config.listeners:
            await self._listen(lst)
        self.hub.serve_control()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.worker is not None:
            return  # the supervisor reloads us, checks certificates and serves metrics
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self._reload_quietly()))
        self._tasks.append(loop.create_task(
            rl.check_expiry_forever(lambda: self.config, self.hub.publish)))
        if self.config.metrics:
            from tlsbridge.daemon import metrics

            metrics.start(*self.config.metrics, loop, self.metrics_snapshot)
        if self.config.watch_files:
            self._tasks.append(loop.create_task(self._watch()))

    async def serve(self) -> None:
        await self._stop.wait()

    # -- reload -----------------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        """Load and check everything first, then swap; on any error nothing changes.

        Raises ConfigError (published as config.reload_failed) with the reason.
        """
        async with self._reload_lock:
            try:
                new = load_config(self.config.path)
                factories = build_factories(new)
                fingerprints = rl.fingerprints(new)
                assert self.hub.connector is not None
                self.hub.connector.check(new)
            except ConfigError as exc:
                log.error("reload failed, nothing changed: %s", exc)
                if self.worker is None:
                    self.hub.publish(ev.CONFIG_RELOAD_FAILED, None, reason=str(exc))
                raise
            changes = rl.diff(self.config, new, self._fingerprints, fingerprints)
            old_addresses = set(self._servers)
            self.config, self._factories, self._fingerprints = new, factories, fingerprints
            self.hub.config = new
            self.hub.connector.reconfigure(new)
            for address in old_addresses - set(factories):
                self._servers.pop(address).close()
            for lst in new.listeners:
                if lst.address not in self._servers:
                    await self._listen(lst)
            logging.getLogger().setLevel(new.log_level.upper())
            log.info("configuration reloaded: %s", changes.to_dict())
            if self.worker is None:
                self.hub.publish(ev.CONFIG_RELOADED, None, **changes.to_dict())
                rl.publish_expiring(new, self.hub.publish)
            return changes.to_dict()

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # logged and published by reload()
        except OSError as exc:  # e.g. a listener address that cannot be bound
            log.error("reload failed: %s", exc)
            self.hub.publish(ev.CONFIG_RELOAD_FAILED, None, reason=str(exc))

    async def _watch(self) -> None:
        seen = rl.watched_mtimes(self.config)
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            now = rl.watched_mtimes(self.config)
            if now != seen:
                log.info("configuration files changed: reloading")
                await self._reload_quietly()
                seen = rl.watched_mtimes(self.config)

    def metrics_snapshot(self) -> dict[str, Any]:
        conns = list(self.hub.conns.values())
        inbound = sum(1 for c in conns if c.ref.direction == "in")
        return rl.metrics_snapshot(
            self.config, dict(self.hub.counters), inbound, len(conns) - inbound,
            (sum(c.bytes_in for c in conns), sum(c.bytes_out for c in conns)))

    # -- the end ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        log.info("shutting down: %d open connections", len(self.hub.conns))
        for task in self._tasks:
            task.cancel()
        for server in self._servers.values():
            server.close()
        if self.hub.connector:
            self.hub.connector.close_all()
        for conn in list(self.hub.conns.values()):
            conn.kill("shutdown")
        # Let close_notify and FINs leave before the loop goes.
        await asyncio.sleep(0.05)
        await self.hub.close()


async def _main(config: Config, worker: tuple[int, int] | None, generation: int) -> None:
    server = Server(config, worker, generation)
    await server.start()
    try:
        await server.serve()
    finally:
        await server.shutdown()


def run(config: Config, worker: tuple[int, int] | None = None, generation: int = 0) -> None:
    """Serve in this process (as worker `worker` of a supervisor when given)."""
    try:
        import uvloop
    except ImportError:
        asyncio.run(_main(config, worker, generation))
    else:
        uvloop.run(_main(config, worker, generation))
