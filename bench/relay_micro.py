"""Micro-benchmark of the byte pump: N chunks each way through one open relay, with a
pass-through engine and transports that only count, so that what is timed is the relay's own
Python. Runs against whichever relay is importable (the hub-era `Relay(hub, ...)` or the relay
core's), so the same script measures before and after:

    .venv/bin/python bench/relay_micro.py [N]

Prints ns per chunk (best of 5) and Python calls per chunk (cProfile) for each direction.
"""

from __future__ import annotations

import asyncio
import collections
import cProfile
import inspect
import pstats
import sys
import time
from types import SimpleNamespace

from tlsbridge.daemon import relay as relay_mod


class Engine:
    handshake_done = True
    peer_closed = False

    def __init__(self) -> None:
        self._in = b""
        self._out = b""

    def receive(self, data: bytes) -> None:
        self._in = data

    def read(self) -> bytes:
        data, self._in = self._in, b""
        return data

    def write(self, data: bytes) -> None:
        self._out = data

    def outgoing(self) -> bytes:
        data, self._out = self._out, b""
        return data


class Transport:
    """What the loop's transport costs us: one C-level call per write."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.write = self.written.append


def _open_relay() -> tuple[object, object]:
    config = SimpleNamespace(max_buffer=262144, handshake_timeout=10.0)
    listener = SimpleNamespace(address="127.0.0.1:5061", host="127.0.0.1", port=5061)
    params = inspect.signature(relay_mod.InboundRelay).parameters
    if "hub" in params:  # before the relay core
        hub = SimpleNamespace(next_id=lambda: 1, counters=collections.Counter())
        relay = relay_mod.InboundRelay(hub, config, listener, Engine)
        relay.state = relay_mod.State.OPEN
    else:
        table = SimpleNamespace(next_id=lambda: 1, counters=collections.Counter())
        relay = relay_mod.InboundRelay(table, None, None, config, listener, Engine)
        core = relay.core
        core.handshake_done()
        core.first_segment(b"PROXY ...\r\n")
        core.hairpin_up()
        assert core.state is relay_mod.State.OPEN
    relay.engine = Engine()
    relay._tls = Transport()
    relay._hairpin = Transport()
    return relay, relay_mod._HairpinSide(relay)


def _run(n: int, chunk: bytes) -> tuple[float, float, float, float]:
    relay, hairpin = _open_relay()
    to_hairpin, to_peer = relay.data_received, hairpin.data_received

    def pump_in() -> None:
        for _ in range(n):
            to_hairpin(chunk)

    def pump_out() -> None:
        for _ in range(n):
            to_peer(chunk)

    results = []
    for pump in (pump_in, pump_out):
        best = min(_timed(pump) for _ in range(5))
        prof = cProfile.Profile()
        prof.runcall(pump)
        calls = pstats.Stats(prof).total_calls - 1  # not pump itself
        results += [best / n * 1e9, calls / n]
        relay._tls.written.clear()
        relay._hairpin.written.clear()
    return results[0], results[1], results[2], results[3]


def _timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


async def main(n: int) -> None:
    in_ns, in_calls, out_ns, out_calls = _run(n, b"x" * 1024)
    print(f"{relay_mod.__file__}")
    print(f"peer -> hairpin: {in_ns:7.1f} ns/chunk  {in_calls:.1f} Python calls/chunk")
    print(f"hairpin -> peer: {out_ns:7.1f} ns/chunk  {out_calls:.1f} Python calls/chunk")


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
