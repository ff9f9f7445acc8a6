"""Connection limits: how many inbound connections in all, and from one IP address."""

from __future__ import annotations

import collections
import contextlib
import resource
from collections.abc import Awaitable, Callable


class Admission:
    """Counts admitted connections until they are released; sans-IO."""

    def __init__(self, max_connections: int, max_per_ip: int) -> None:
        self.max_connections = max_connections
        self.max_per_ip = max_per_ip  # 0: unlimited
        self.active = 0
        self.per_ip: dict[str, int] = {}

    def admit(self, ip: str) -> str | None:
        """None and counted, or why not: too_many_connections / too_many_from_ip."""
        if self.active >= self.max_connections:
            return "too_many_connections"
        per_ip = self.per_ip
        held = per_ip.get(ip, 0)
        if self.max_per_ip and held >= self.max_per_ip:
            return "too_many_from_ip"
        self.active += 1
        per_ip[ip] = held + 1
        return None

    def release(self, ip: str) -> None:
        per_ip = self.per_ip
        held = per_ip.get(ip, 0)
        if held <= 0:
            return  # not admitted here (e.g. before a restart): nothing to give back
        self.active -= 1
        if held == 1:
            del per_ip[ip]
        else:
            per_ip[ip] = held - 1


def effective_max_connections(configured: int) -> int:
    """The configured limit, capped below the open-files limit (two descriptors per
    connection and a reserve) so a flood is refused with an event, not by a failing accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and hard != resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    cap = max(1, (soft - 64) // 2) if soft != resource.RLIM_INFINITY else 1 << 30
    return min(configured, cap) if configured > 0 else cap


# ask(ip, conn_id) -> the supervisor's refusal or None (daemon/channels.py: ControlServer.ask)
AskSupervisor = Callable[[str, int], Awaitable["str | None"]]


class Gate:
    """A worker's admission of inbound connections: counted here (one process), or asked of
    the supervisor, which counts for all workers (`ask`)."""

    def __init__(self, max_connections: int, max_per_ip: int,
                 counters: collections.Counter[str], ask: AskSupervisor | None = None) -> None:
        self.admission = Admission(effective_max_connections(max_connections), max_per_ip)
        self.counters = counters
        self._ask = ask
        # Limits across workers are counted by the supervisor, which a worker must ask.
        self.remote = ask is not None and bool(max_connections or max_per_ip)

    def admit(self, ip: str) -> str | None:
        """Why a new inbound connection from `ip` is refused, or None (and counted)."""
        refusal = self.admission.admit(ip)
        if refusal:
            self.counters[f"refused.{refusal}"] += 1
        return refusal

    async def admit_remotely(self, ip: str, conn_id: int) -> str | None:
        assert self._ask is not None
        refusal = await self._ask(ip, conn_id)
        if refusal:
            self.counters[f"refused.{refusal}"] += 1
        return refusal

    def release(self, ip: str) -> None:
        if not self.remote:  # the supervisor releases on conn.closed
            self.admission.release(ip)
