"""The daemon's lifecycle: start (its parts, then the listeners), serve until told to stop,
shut down cleanly, and reload its configuration in between without touching live
connections."""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import secrets
import signal
import socket
from collections.abc import Callable, Coroutine
from typing import Any

import zmq.asyncio

from tlsbridge.daemon import reload as rl
from tlsbridge.daemon.admission import Gate
from tlsbridge.daemon.channels import ControlServer, EventSink, unlink
from tlsbridge.daemon.config import Config, ConfigError, Listener, load_config
from tlsbridge.daemon.control_ops import ControlOps
from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.registry import ClientFactory, listener_engine_factory
from tlsbridge.daemon.listener import SocketListener
from tlsbridge.daemon.lookup_server import LookupServer
from tlsbridge.daemon.outbound import Connector
from tlsbridge.daemon.publisher import FactsPublisher
from tlsbridge.daemon.relay import InboundRelay, SocketInboundRelay
from tlsbridge.daemon.rundir import private_run_dir, worker_control_endpoint, worker_events_endpoint
from tlsbridge.daemon.table import ConnectionTable
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared import factsmap
from tlsbridge.shared import reasons as r
from tlsbridge.shared.addr import format_addr
from tlsbridge.shared.settings import lookup_socket_of

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
    (which then owns events, control, certificate checks and metrics).

    It builds the worker's parts at `start`, each from the ones below it: the publisher (events
    and facts map), the connection table, the admission gate, the outbound connector, the
    control operations; relays get the table, the publisher and the gate or connector.
    """

    table: ConnectionTable
    publisher: FactsPublisher
    connector: Connector
    ops: ControlOps
    gate: Gate

    def __init__(self, config: Config, worker: tuple[int, int] | None = None,
                 generation: int = 0) -> None:
        self.config = config
        self.worker = worker
        self.generation = generation
        self.src = secrets.token_hex(8)
        self.counters: collections.Counter[str] = collections.Counter()
        self._factories: dict[str, Callable[[], TlsEngine]] = {}
        self._servers: dict[str, asyncio.Server | SocketListener] = {}
        self._fingerprints: dict[str, str] = {}
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()
        self._ctx = zmq.asyncio.Context()
        self._control: ControlServer | None = None
        self._lookup: LookupServer | None = None

    def _protocol(self, listener: Listener) -> InboundRelay:
        # Looked up per connection: a reload swaps the factory, live connections keep theirs.
        return InboundRelay(self.table, self.publisher, self.gate, self.config, listener,
                            self._factories[listener.address])

    def _accepted(self, listener: Listener, sock: socket.socket, peer: Any) -> None:
        factory = self._factories[listener.address]
        try:
            tls = factory.on_socket(sock, peer)  # type: ignore[attr-defined]
        except Exception as exc:  # a broken profile must not take the listener down
            log.error("cannot start TLS with %s: %s", format_addr(*peer[:2]), exc)
            self.counters["tls_start_failed"] += 1
            sock.close()
            return
        relay = SocketInboundRelay(self.table, self.publisher, self.gate, self.config,
                                   listener, factory)
        relay.connection_made(tls)  # type: ignore[arg-type]  # its own transport
        tls.start(relay)

    async def _listen(self, lst: Listener) -> None:
        if _on_socket(self._factories[lst.address]):
            # OpenSSL on each connection's own socket (engines/openssl_socket.py).
            self._servers[lst.address] = SocketListener.bind(
                lst.host, lst.port, functools.partial(self._accepted, lst))
        else:
            self._servers[lst.address] = await asyncio.get_running_loop().create_server(
                lambda: self._protocol(lst), lst.host, lst.port,
                reuse_address=True, reuse_port=True, backlog=4096,
            )
        log.info("listening for %s on %s (profile %s, engine %s)",
                 "TLS" if lst.transport == "tls" else "WSS", lst.address, lst.profile,
                 lst.engine or self.config.profiles[lst.profile].engine)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        config = self.config
        # Contexts first: a bad certificate refuses start-up before any port is taken.
        self._factories = build_factories(config)
        self._fingerprints = rl.fingerprints(config)
        clients = Connector.check(config)
        self._start_parts(clients)
        for lst in config.listeners:
            await self._listen(lst)
        assert self._control is not None
        self._control.start()  # once this answers, the listeners are up
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        if self.worker is not None:
            return  # the supervisor reloads us, checks certificates and serves metrics
        loop.add_signal_handler(signal.SIGHUP, lambda: self._own(self._reload_quietly()))
        self._own(rl.check_expiry_forever(lambda: self.config, self.publisher.publish))
        if config.metrics:
            from tlsbridge.daemon import metrics

            metrics.start(*config.metrics, loop, self.metrics_snapshot)
        if config.watch_files:
            self._own(self._watch())

    def _start_parts(self, clients: dict[str, ClientFactory]) -> None:
        config, worker, counters = self.config, self.worker, self.counters
        private_run_dir(config.run_dir)
        map_path = factsmap.facts_map_of(config.run_dir)
        if worker is None:
            factsmap.create(map_path, regions=1)
        facts_map = factsmap.FactsMapWriter(map_path, worker[0] if worker else 0)

        def dropped() -> None:
            counters["events_dropped"] += 1

        if worker is None:
            sink = EventSink.publisher(config.events_endpoint, config.events_hwm, dropped)
        else:
            sink = EventSink.pusher(worker_events_endpoint(config), config.events_hwm, dropped)
        self.publisher = FactsPublisher(self.src, counters, sink=sink, facts_map=facts_map,
                                        noted=worker is not None)
        self.table = ConnectionTable(counters, worker, self.generation)
        self.connector = Connector(self.table, self.publisher, config, clients)
        self.ops = ControlOps(self.table, self.publisher, counters, self.src, self.connector,
                              self.reload)
        if worker is None:
            self._control = ControlServer.router(self._ctx, config.control_endpoint,
                                                 self.ops.handle_request)
        else:
            self._control = ControlServer.dealer(self._ctx, worker_control_endpoint(config),
                                                 f"w{worker[0]}".encode(),
                                                 self.ops.handle_request)
        self.gate = Gate(config.max_connections, config.max_per_ip, counters,
                         self._ask_supervisor if worker is not None else None)
        if worker is None:
            self._lookup = LookupServer(lookup_socket_of(config.run_dir), self.ops.lookup_entry)
            self._lookup.start()
            sink.greet = lambda: self.publisher.publish(ev.DaemonStarted(os.getpid()))
            sink.greet()

    async def _ask_supervisor(self, ip: str, conn_id: int) -> str | None:
        assert self._control is not None
        try:
            reply = await self._control.ask("admit", timeout=2.0, ip=ip, id=conn_id)
        except ctl.ControlError as exc:
            log.error("admission: the supervisor did not answer (%s); admitting %s", exc, ip)
            return None
        return reply.get("refused")

    def _own(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` as a task this server keeps (and cancels at shutdown)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

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
                clients = Connector.check(new)
            except ConfigError as exc:
                log.error("reload failed, nothing changed: %s", exc)
                if self.worker is None:
                    self.publisher.publish(ev.ConfigReloadFailed(str(exc)))
                raise
            changes = rl.diff(self.config, new, self._fingerprints, fingerprints)
            # Gone, or switching between an accept of our own and asyncio's (the engine).
            dropped = {a for a in self._servers if a not in factories
                       or _on_socket(factories[a]) != _on_socket(self._factories[a])}
            self.config, self._factories, self._fingerprints = new, factories, fingerprints
            self.connector.reconfigure(new, clients)
            for address in dropped:
                self._servers.pop(address).close()
            for lst in new.listeners:
                if lst.address not in self._servers:
                    await self._listen(lst)
            logging.getLogger().setLevel(new.log_level.upper())
            log.info("configuration reloaded: %s", changes.to_dict())
            if self.worker is None:
                self.publisher.publish(ev.ConfigReloaded(changes.changed, changes.restart_needed))
                rl.publish_expiring(new, self.publisher.publish)
            return changes.to_dict()

    async def _reload_quietly(self) -> None:
        try:
            await self.reload()
        except ConfigError:
            pass  # logged and published by reload()
        except OSError as exc:  # e.g. a listener address that cannot be bound
            log.error("reload failed: %s", exc)
            self.publisher.publish(ev.ConfigReloadFailed(str(exc)))

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
        open_in, open_out, bytes_in, bytes_out = self.table.open_counts()
        return rl.metrics_snapshot(self.config, dict(self.counters), open_in, open_out,
                                   (bytes_in, bytes_out))

    # -- the end ----------------------------------------------------------------------------

    async def shutdown(self) -> None:
        log.info("shutting down: %d open connections", len(self.table.conns))
        for task in list(self._tasks):
            task.cancel()
        for server in self._servers.values():
            server.close()
        self.connector.close_all()
        for conn in list(self.table.conns.values()):
            conn.kill(r.SHUTDOWN)
        # Let close_notify and FINs leave before the loop goes.
        await asyncio.sleep(0.05)
        await self._close_parts()

    async def _close_parts(self) -> None:
        if self.worker is None:
            self.publisher.publish(ev.DaemonStopping(os.getpid()))
        if self._control is not None:
            await self._control.close()
        self.publisher.close()
        if self._lookup is not None:
            self._lookup.close()
        self._ctx.term()
        if self.worker is None:
            factsmap.remove(factsmap.facts_map_of(self.config.run_dir))
            unlink(self.config.events_endpoint)
            unlink(self.config.control_endpoint)


def _on_socket(factory: Callable[[], TlsEngine]) -> bool:
    """The engine can run on an accepted socket of its own (engines/openssl_socket.py)."""
    return hasattr(factory, "on_socket")


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
