"""Outbound TLS: the daemon connects to a TLS server for Kamailio and joins it by a hairpin that
declares the server as its source, so Kamailio can relay to that address without connecting.

`Connector` answers the control op `connect`: it reuses a live connection to the same
(target, SNI, client profile), joins a connect already under way, or opens a new one.
Every requester learns the outcome by an `outbound.ready` / `outbound.failed` event carrying
its opaque `tag` (the KEMI module resumes a suspended transaction with it).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tlsbridge.daemon.engines.base import TlsEngine
from tlsbridge.daemon.engines.registry import ClientFactory, client_engine_factory
from tlsbridge.daemon.relay import Relay, _os_reason
from tlsbridge.daemon.relaycore import Close, Failure, State
from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared import reasons as r
from tlsbridge.shared.addr import (
    TLS_DEFAULT_PORT,
    default_sni,
    format_addr,
    is_ip,
    is_plain_target,
    target_key,
)

if TYPE_CHECKING:
    from tlsbridge.daemon.config import Config
    from tlsbridge.daemon.publisher import FactsPublisher
    from tlsbridge.daemon.table import ConnectionTable

# Kamailio answers a CRLF ping (RFC 5626) once its TCP reader owns the hairpin, which is after
# tcp_main registered the declared source as an alias: then relaying to it cannot miss.
PING, PONG = b"\r\n\r\n", b"\r\n"
PONG_WAIT = 1.0
# Declared source ports for a second identity (SNI / client certificate) to one server.
DECLARED_PORTS = range(40000, 50000)


@dataclass(frozen=True, slots=True)
class Target:
    host: str
    port: int
    sni: str | None
    profile: str

    @property
    def key(self) -> str:
        return target_key(self.host, self.port, self.sni, self.profile)

    @property
    def plain(self) -> bool:
        """No identity asked for beyond the address: any connection with that peer will do."""
        return is_plain_target(self.host, self.sni, self.profile)

    def to_dict(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "sni": self.sni, "profile": self.profile}


@dataclass
class _Attempt:
    target: Target
    tags: list[Any] = field(default_factory=list)
    relay: OutboundRelay | None = None


class OutboundRelay(Relay):
    direction = "out"

    def __init__(self, table: ConnectionTable, publisher: FactsPublisher, config: Config,
                 engine_factory: Callable[[], TlsEngine], connector: Connector,
                 attempt: _Attempt, declared: tuple[str, int]) -> None:
        super().__init__(table, publisher, config, None, engine_factory)
        self.connector = connector
        self.attempt = attempt
        self.declared = declared
        self.remote = declared
        self.keys: set[str] = {attempt.target.key}
        self.ready = False
        self.handshake_limit = config.outbound.connect_timeout
        self._awaiting_pong = False
        self._last_activity = 0.0
        self._idle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # Kamailio knows the server by the declared address, unique per identity (see
        # Connector._declare).
        self.remote, self.peer = self.peer, self.declared

    def _tls_started(self) -> None:
        self._pump_tls()  # a client speaks first

    def _proxy_dst(self) -> tuple[str, int]:
        assert self._tls is not None
        return self._tls.get_extra_info("sockname")[:2]

    def _handshake_timeout(self) -> None:
        self.do(self.core.handshake_timed_out("no TLS handshake in time"))

    def _ready(self) -> None:
        assert self._hairpin is not None
        self._hairpin.write(PING)
        self._awaiting_pong = True
        self._loop.call_later(PONG_WAIT, self._now_ready)

    def data_received(self, data: bytes) -> None:
        # Traffic is plaintext relayed, not TLS records alone (a ticket, a key update).
        before = self.core.bytes_in
        super().data_received(data)
        if self.core.bytes_in != before:
            self._last_activity = self._loop.time()

    def from_hairpin(self, data: bytes) -> None:
        if self._awaiting_pong and data.startswith(PONG):
            data = data[len(PONG):]
            self._now_ready()
        self._last_activity = self._loop.time()
        if data:
            super().from_hairpin(data)

    def _now_ready(self) -> None:
        self._awaiting_pong = False
        if self.ready or self.core.state is not State.OPEN:
            return
        self.ready = True
        self._last_activity = self._loop.time()
        self._arm_idle(self.config.outbound.idle_timeout)
        self.connector.ready(self.attempt, self)

    def _arm_idle(self, delay: float) -> None:
        self._idle = self._loop.call_later(delay, self._check_idle)

    def _check_idle(self) -> None:
        if self.core.state is State.CLOSED:
            return
        idle = self._loop.time() - self._last_activity
        limit = self.config.outbound.idle_timeout
        if idle >= limit:
            self.do(self.core.close(r.IDLE_TIMEOUT, f"no traffic for {limit:g} s"))
        else:
            self._arm_idle(limit - idle)

    def _closing(self, close: Close) -> None:
        if self._idle:
            self._idle.cancel()
        if not self.ready:  # the requesters learn why (once: the connector dedups)
            self.connector.failed(self.attempt, close.reason, close.detail)
        if close.failure is Failure.HAIRPIN:
            self.publisher.publish(ev.HairpinFailed(self.ref, close.reason, close.detail))
        self.connector.forget(self)

    def _keys(self) -> list[str] | None:
        return sorted(self.keys)


class Connector:
    """Opens and reuses outbound connections; reads the connection table, publishes by the
    facts publisher."""

    def __init__(self, table: ConnectionTable, publisher: FactsPublisher, config: Config,
                 clients: dict[str, ClientFactory]) -> None:
        """`clients`: what `check(config)` returned."""
        self.table = table
        self.publisher = publisher
        self.config = config
        self._clients = clients
        self._live: dict[Target, OutboundRelay] = {}
        self._attempts: dict[Target, _Attempt] = {}
        self._opening: set[asyncio.Task[None]] = set()

    @staticmethod
    def check(config: Config) -> dict[str, ClientFactory]:
        """Every client profile's engine factory, its context built once (on any engine, with
        every key of the profile): a broken profile refuses start-up or reload. Raises
        ConfigError."""
        return {name: client_engine_factory(p) for name, p in config.clients.items()}

    def reconfigure(self, config: Config, clients: dict[str, ClientFactory]) -> None:
        """New connects use the new profiles; live connections keep theirs."""
        self._clients = clients
        self.config = config

    def connect_request(self, args: dict[str, Any]) -> dict[str, Any]:
        """The control op `connect`: its arguments checked (ControlError), then `connect`."""
        host, port = args.get("host"), args.get("port", TLS_DEFAULT_PORT)
        sni, profile = args.get("sni"), args.get("profile") or "default"
        if not isinstance(host, str) or not host:
            raise ctl.ControlError(ctl.BAD_REQUEST, "connect needs a 'host' string")
        if not isinstance(port, int) or not 0 < port < 65536:
            raise ctl.ControlError(ctl.BAD_REQUEST, f"connect: bad port {port!r}")
        if sni is not None and not isinstance(sni, str):
            raise ctl.ControlError(ctl.BAD_REQUEST, "connect: 'sni' must be a string")
        if profile not in self.config.clients:
            raise ctl.ControlError(ctl.NOT_FOUND, f"connect: no client profile {profile!r}")
        sni = sni if sni is not None else default_sni(host)
        if not args.get("profile"):
            profile = self._profile_for(host, port)
        return self.connect(Target(host.strip("[]"), port, sni, profile), args.get("tag"))

    def _profile_for(self, host: str, port: int) -> str:
        """The client profile whose `destinations` name this server (tls.cfg's
        [client:IP:PORT]), else "default"."""
        target = format_addr(host.strip("[]"), port)
        for name, profile in self.config.clients.items():
            if target in profile.destinations:
                return name
        return "default"

    def connect(self, target: Target, tag: Any) -> dict[str, Any]:
        """Start or join; the outcome is always published with `tag`."""
        relay = self._live.get(target) or self._inbound_to(target)
        if relay is not None and relay.state is State.OPEN:
            self._publish_ready(relay, target, [tag])
            return {"state": "ready", "conn": relay.ref.to_dict()}
        attempt = self._attempts.get(target)
        if attempt is None:
            attempt = self._attempts[target] = _Attempt(target)
            task = asyncio.get_running_loop().create_task(self._open(attempt))
            self._opening.add(task)
            task.add_done_callback(self._opening.discard)
        attempt.tags.append(tag)
        return {"state": "pending"}

    def _inbound_to(self, target: Target) -> Any:
        # A TLS peer that connected to us from the very address (a UA without NAT, or
        # a server that kept its connection) is reached over its own connection.
        if not is_ip(target.host) or not target.plain:
            return None
        return self.table.find(peer=format_addr(target.host, target.port))

    def _declare(self, host: str, port: int) -> tuple[str, int]:
        """The real address, unless another connection already declares it to Kamailio (two
        hairpins with one source are ambiguous there): then the same IP with a free port."""
        taken = {c.ref.peer for c in self.table.conns.values()}
        taken |= {format_addr(*a.relay.declared) for a in self._attempts.values() if a.relay}
        if format_addr(host, port) not in taken:
            return host, port
        for alt in range(DECLARED_PORTS.start, DECLARED_PORTS.stop):
            if format_addr(host, alt) not in taken:
                return host, alt
        raise OSError("no free declared port for another identity to this server")

    async def _open(self, attempt: _Attempt) -> None:
        target = attempt.target
        loop = asyncio.get_running_loop()
        timeout = self.config.outbound.connect_timeout
        try:
            async with asyncio.timeout(timeout):
                infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
                host, port = infos[0][4][:2]
                relay = OutboundRelay(self.table, self.publisher, self.config,
                                      self._engine_factory(target), self, attempt,
                                      self._declare(host, port))
                attempt.relay = relay
                await loop.create_connection(lambda: relay, host, port)
        except socket.gaierror as exc:
            self.failed(attempt, r.DNS_FAILED, f"{target.host}: {exc.strerror}")
        except TimeoutError:
            self.failed(attempt, r.CONNECT_TIMEOUT, f"no TCP connection in {timeout:g} s")
        except OSError as exc:
            self.failed(attempt, r.CONNECT_FAILED,
                        f"{format_addr(target.host, target.port)}: {_os_reason(exc)}")

    def _engine_factory(self, target: Target) -> Callable[[], TlsEngine]:
        profile = self.config.clients[target.profile]
        # The name checked against the certificate is also the SNI (RFC 5922: the SIP domain).
        name = profile.verify_name or target.sni or target.host
        factory = self._clients[target.profile]
        return lambda: factory(name)

    def ready(self, attempt: _Attempt, relay: OutboundRelay) -> None:
        self._attempts.pop(attempt.target, None)
        self._live[attempt.target] = relay
        self._publish_ready(relay, attempt.target, attempt.tags)
        attempt.tags = []

    def failed(self, attempt: _Attempt, reason: str, detail: str) -> None:
        if self._attempts.get(attempt.target) is not attempt:
            return  # already reported
        del self._attempts[attempt.target]
        self.publisher.publish(ev.OutboundFailed(
            attempt.relay.ref if attempt.relay else None, reason, detail,
            attempt.target.to_dict(), attempt.target.key, attempt.tags))
        attempt.tags = []

    def forget(self, relay: OutboundRelay) -> None:
        for target in [t for t, live in self._live.items() if live is relay]:
            del self._live[target]

    def _publish_ready(self, relay: Relay, target: Target, tags: list[Any]) -> None:
        if isinstance(relay, OutboundRelay):
            relay.keys.add(target.key)
        remote = relay.remote if isinstance(relay, OutboundRelay) else relay.peer
        self.publisher.publish(ev.OutboundReady(relay.ref, relay.facts, format_addr(*remote),
                                                target.to_dict(), target.key, tags))

    def close_all(self) -> None:
        for attempt in list(self._attempts.values()):
            self.failed(attempt, r.SHUTDOWN, "the daemon is stopping")
