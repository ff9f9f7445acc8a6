"""Prometheus metrics (off by default; loopback when on), read from the server or the supervisor
at scrape time.

prometheus_client serves from its own thread; the snapshot is taken on the event loop so the
scrape never races the counters it reads.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import start_http_server
from prometheus_client.core import REGISTRY, CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("tlsbridge")


class HubCollector(Collector):
    def __init__(self, loop: asyncio.AbstractEventLoop, snapshot: Callable[[], dict[str, Any]]):
        self.loop = loop
        self.snapshot = snapshot

    def describe(self) -> list[Any]:
        # Without it, register() would collect() on the event loop's own thread: deadlock.
        return []

    def _take(self) -> dict[str, Any]:
        fut: concurrent.futures.Future[dict[str, Any]] = concurrent.futures.Future()

        def run() -> None:
            try:
                fut.set_result(self.snapshot())
            except Exception as exc:
                fut.set_exception(exc)

        self.loop.call_soon_threadsafe(run)
        return fut.result(timeout=5)

    def collect(self) -> Iterator[Any]:
        s = self._take()
        counters: dict[str, int] = s["counters"]
        yield _counter("tlsbridge_handshakes", "Completed TLS handshakes",
                       counters.get("events.tls.established", 0))
        failures = CounterMetricFamily("tlsbridge_handshake_failures",
                                       "Failed or refused TLS handshakes", labels=["reason"])
        for key, value in counters.items():
            if key.startswith("tls.failed."):
                failures.add_metric([key.removeprefix("tls.failed.")], value)
        yield failures
        yield _counter("tlsbridge_hairpin_failures", "Hairpins to Kamailio that failed",
                       counters.get("events.hairpin.failed", 0))
        outbound = CounterMetricFamily("tlsbridge_outbound_connects",
                                       "Outbound connect outcomes", labels=["result"])
        outbound.add_metric(["ready"], counters.get("events.outbound.ready", 0))
        outbound.add_metric(["failed"], counters.get("events.outbound.failed", 0))
        yield outbound
        open_conns = GaugeMetricFamily("tlsbridge_connections_open", "Open TLS connections",
                                       labels=["direction"])
        open_conns.add_metric(["in"], s["open_in"])
        open_conns.add_metric(["out"], s["open_out"])
        yield open_conns
        plain = CounterMetricFamily("tlsbridge_plaintext_bytes",
                                    "Plaintext bytes relayed (in: from TLS peers to Kamailio)",
                                    labels=["direction"])
        plain.add_metric(["in"], s["bytes_in_total"])
        plain.add_metric(["out"], s["bytes_out_total"])
        yield plain
        yield _counter("tlsbridge_events_dropped", "Events dropped for slow subscribers",
                       counters.get("events_dropped", 0))
        reloads = CounterMetricFamily("tlsbridge_reloads", "Configuration reloads",
                                      labels=["result"])
        reloads.add_metric(["ok"], counters.get("events.config.reloaded", 0))
        reloads.add_metric(["failed"], counters.get("events.config.reload_failed", 0))
        yield reloads
        expiry = GaugeMetricFamily("tlsbridge_certificate_expiry_seconds",
                                   "Seconds until each configured certificate expires",
                                   labels=["owner", "path"])
        now = time.time()
        for owner, path, not_after in s["certificates"]:
            expiry.add_metric([owner, path], not_after - now)
        yield expiry


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def start(host: str, port: int, loop: asyncio.AbstractEventLoop,
          snapshot: Callable[[], dict[str, Any]]) -> None:
    REGISTRY.register(HubCollector(loop, snapshot))
    start_http_server(port, addr=host)
    log.info("metrics on http://%s:%d/metrics", host, port)
