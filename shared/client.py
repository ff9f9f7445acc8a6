"""A synchronous control client with a hard timeout, for the CLI and for Kamailio workers.

It uses a DEALER socket (not REQ) so that a timed-out request never wedges the socket: a late
reply is recognised by its id and thrown away. Create it after fork (child_init or lazily).
"""

from __future__ import annotations

import itertools
import os
import time
from typing import Any

import zmq

from tlsbridge.shared import control as ctl

TIMEOUT = "timeout"
UNAVAILABLE = "unavailable"


class ControlClient:
    def __init__(self, endpoint: str, timeout_ms: int = 1000) -> None:
        self.endpoint = endpoint
        self.timeout_ms = timeout_ms
        self._sock: zmq.Socket | None = None
        self._pid = 0
        self._ids = itertools.count(1)

    def _socket(self) -> zmq.Socket:
        if self._sock is None or self._pid != os.getpid():
            sock = zmq.Context.instance().socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            # Fail at once when the daemon is not there instead of queueing for later.
            sock.setsockopt(zmq.IMMEDIATE, 1)
            sock.setsockopt(zmq.SNDHWM, 100)
            sock.connect(self.endpoint)
            self._sock, self._pid = sock, os.getpid()
        return self._sock

    def request(self, op: str, timeout_ms: int | None = None, **args: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; raises ControlError (also on timeout)."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        end = time.monotonic() + timeout / 1000
        sock = self._socket()
        rid = next(self._ids)
        frames = [b"", ctl.encode_request(op, rid, **args)]
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        except zmq.Again:
            # One deadline for both waits: connecting, then the reply.
            if not sock.poll(_left_ms(end), zmq.POLLOUT):
                msg = f"daemon not reachable at {self.endpoint}"
                raise ctl.ControlError(UNAVAILABLE, msg) from None
            sock.send_multipart(frames, flags=zmq.NOBLOCK)
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        while True:
            left = _left_ms(end)
            if left <= 0 or not poller.poll(left):
                raise ctl.ControlError(TIMEOUT, f"no reply from {self.endpoint} in {timeout} ms")
            body = sock.recv_multipart()[-1]
            if ctl.peek_id(body) == rid:
                return ctl.decode_reply(body)

    def send(self, op: str, **args: Any) -> None:
        """Fire and forget (the daemon sends no reply); raises ControlError if unreachable."""
        sock = self._socket()
        frames = [b"", ctl.encode_request(op, next(self._ids), noreply=True, **args)]
        # A fresh socket may still be connecting: wait for it, within the usual timeout.
        if not sock.poll(self.timeout_ms, zmq.POLLOUT):
            raise ctl.ControlError(UNAVAILABLE, f"daemon not reachable at {self.endpoint}")
        sock.send_multipart(frames, flags=zmq.NOBLOCK)

    def close(self) -> None:
        if self._sock is not None and self._pid == os.getpid():
            self._sock.close(linger=0)
        self._sock = None


def _left_ms(end: float) -> int:
    return max(0, int((end - time.monotonic()) * 1000))
