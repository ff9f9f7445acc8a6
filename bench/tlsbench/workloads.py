"""Runs the generator against a started system and turns what it says into measurements.

W1/W2: the generator prints {"event":"start"} and {"event":"stop"} at the edges of its measured
window; the system's CPU time (utime + stime of all its processes) and context switches are read
right there, so warm-up and shutdown are not counted.
W3: PSS of all the system's processes (and Kamailio's shared memory) with 0 connections, then
with N idle ones; the generator holds them until told to let go.
"""

from __future__ import annotations

import contextlib
import json
import selectors
import subprocess
import time
from pathlib import Path
from typing import Any

from tlsbench.procs import (
    Proc,
    cpu_seconds,
    cpu_user_sys,
    ctx_switches,
    pss_kib,
    time_wait_count,
)
from tlsbench.systems import System


class GenError(RuntimeError):
    pass


class Generator:
    """One run of siptls_gen with its stdout read line by line, each read bounded in time."""

    def __init__(self, binary: Path, system: System, args: list[str], log: Path,
                 cpus: set[int] | None, stdin: int | None = subprocess.DEVNULL) -> None:
        argv = [str(binary), "-h", "127.0.0.1", "-p", str(system.tls_port), "-s", "localhost"]
        if system.s.verify:
            # The client's cost, not the server's: off by default so that one core of
            # generator can keep one core of system busy with full handshakes (W2).
            argv += ["-a", str(system.s.certs["ca"])]
        argv += args
        self.proc = Proc("siptls_gen", argv, log, cpus=cpus, stdin=stdin,
                         stdout=subprocess.PIPE)
        assert self.proc.popen.stdout is not None
        self._out = self.proc.popen.stdout
        self._sel = selectors.DefaultSelector()
        self._sel.register(self._out, selectors.EVENT_READ)
        self._buf = b""
        self.finished = False  # its result line was read: it is exiting by itself

    def next_event(self, timeout: float) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = end - time.monotonic()
            if left <= 0:
                raise GenError(f"generator said nothing for {timeout:g} s")
            if not self._sel.select(left):
                continue
            chunk = self._out.read1(65536)  # type: ignore[attr-defined]
            if not chunk:
                raise GenError(f"generator exited early:\n{self.proc.tail()}")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def expect(self, event: str, timeout: float) -> dict[str, Any]:
        msg = self.next_event(timeout)
        if msg.get("event") != event:
            raise GenError(f"expected {event!r} from the generator, got {msg}")
        self.finished = event == "result"
        return msg

    def release(self) -> None:
        stdin = self.proc.popen.stdin
        if stdin is not None:
            stdin.write(b"release\n")
            stdin.flush()

    def close(self) -> None:
        self._sel.close()
        if self.finished:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.popen.wait(10.0)
        self.proc.stop(timeout=2.0)  # SIGTERM (it stops and reports), then SIGKILL


def _cpu_by_component(system: System) -> dict[str, tuple[float, float]]:
    return {name: cpu_user_sys(pids) for name, pids in system.component_pids().items()}


def wait_time_wait(limit: int = 12000, timeout: float = 60.0) -> int:
    """Let TIME_WAIT sockets from earlier runs expire so W2 does not run out of ports."""
    end = time.monotonic() + timeout
    n = time_wait_count()
    while n > limit and time.monotonic() < end:
        time.sleep(2)
        n = time_wait_count()
    return n


def run_rate(binary: Path, system: System, mode: str, *, conns: int, concurrency: int,
             duration: float, warmup: float, log: Path, gen_cpus: set[int] | None
             ) -> dict[str, Any]:
    """W1 (mode "w1") or W2 (mode "w2"): rate, latency, and the system's CPU per transaction."""
    args = ["-m", mode, "-n", str(conns), "-c", str(concurrency), "-d", str(duration),
            "-w", str(warmup), "-t", "5", "-T", str(duration + warmup + 60)]
    counters0 = system.counters()
    gen = Generator(binary, system, args, log, gen_cpus)
    try:
        gen.expect("start", warmup + 30)
        pids = system.pids()
        cpu0, cs0, comp0 = cpu_seconds(pids), ctx_switches(pids), _cpu_by_component(system)
        gcpu0 = cpu_seconds([gen.proc.pid])
        t0 = time.monotonic()
        gen.expect("stop", duration + 30)
        cpu1, cs1, comp1 = cpu_seconds(pids), ctx_switches(pids), _cpu_by_component(system)
        gcpu1 = cpu_seconds([gen.proc.pid])
        t1 = time.monotonic()
        result = gen.expect("result", 30)
    finally:
        gen.close()
    counters1 = system.counters()
    tx = result["transactions"]
    out: dict[str, Any] = {
        "rate": result["rate"],
        "p50_ms": result["p50_us"] / 1000,
        "p99_ms": result["p99_us"] / 1000,
        "transactions": tx,
        "errors": sum(result[k] for k in ("non200", "connect_errors", "tls_errors", "timeouts",
                                          "eofs", "errors")),
        "last_error": result["last_error"],
        "sut_cpu_util": (cpu1 - cpu0) / max(t1 - t0, 1e-9),
        # near 1.0 pinned, the generator (not the system) would be the limit
        "gen_cpu_util": (gcpu1 - gcpu0) / max(t1 - t0, 1e-9),
        "sut_processes": len(pids),
    }
    if tx:
        out["cpu_us"] = (cpu1 - cpu0) / tx * 1e6
        # what one fully busy core of the system would do at this cost
        out["capacity"] = 1e6 / out["cpu_us"] if out["cpu_us"] else None
        out["cs_per_tx"] = (cs1 - cs0) / tx
        out["cpu_us_by"] = {}
        out["sys_share_by"] = {}
        for k, (u1, s1) in comp1.items():
            u0, s0 = comp0.get(k, (0.0, 0.0))
            out["cpu_us_by"][k] = (u1 - u0 + s1 - s0) / tx * 1e6
            if u1 - u0 + s1 - s0 > 0:
                out["sys_share_by"][k] = (s1 - s0) / (u1 - u0 + s1 - s0)
    total = result["total_transactions"]
    if counters1 and total:
        # e.g. the daemon's control look-ups from Kamailio (a first message that beat its event)
        out["per_tx_counters"] = {k: (counters1.get(k, 0) - counters0.get(k, 0)) / total
                                  for k in counters1 if k.startswith(("control.", "events."))}
    if out["errors"]:
        out["raw"] = result
    return out


def run_idle(binary: Path, system: System, n: int, *, log: Path, gen_cpus: set[int] | None,
             settle: float = 2.0) -> dict[str, Any]:
    """W3: PSS (KiB) per idle connection, and Kamailio's shared memory per connection."""
    time.sleep(settle)
    pids = system.pids()
    pss0, shm0 = pss_kib(pids), system.shmmem()
    by0 = {k: pss_kib(v) for k, v in system.component_pids().items()}
    args = ["-m", "w3", "-n", str(n), "-c", "50", "-t", "10", "-H", "300",
            "-T", str(400 + n / 20)]
    gen = Generator(binary, system, args, log, gen_cpus, stdin=subprocess.PIPE)
    try:
        ready = gen.expect("ready", 120 + n / 20)
        time.sleep(settle)
        pids = system.pids()
        pss1, shm1 = pss_kib(pids), system.shmmem()
        by1 = {k: pss_kib(v) for k, v in system.component_pids().items()}
        crash = system.crash_report()
        if crash or len(system.pids()) < len(pids):
            raise RuntimeError(f"the system lost processes while opening: {crash}")
        gen.release()
        result = gen.expect("result", 60)
    finally:
        gen.close()
    opened = ready["opened"]
    if opened < 0.98 * n:
        raise RuntimeError(f"only {opened} of {n} connections opened: {ready['last_error']}")
    out: dict[str, Any] = {
        "requested": n,
        "opened": opened,
        "alive_at_release": result["alive_at_release"],
        "open_seconds": ready["seconds"],
        "pss0_kib": pss0,
        "pss_kib": pss1,
        "kib_per_conn": (pss1 - pss0) / opened if opened else None,
        "kib_per_conn_by": {k: (by1[k] - by0.get(k, 0)) / opened for k in by1} if opened else {},
        "last_error": result["last_error"],
    }
    if shm0 and shm1 and opened:
        out["shm_kib_per_conn"] = (shm1["real_used"] - shm0["real_used"]) / 1024 / opened
    return out
