"""Control protocol: msgpack request/reply over ZeroMQ (the daemon binds ROUTER).

Request `{v, rid, op, ...args}`; reply `{v, rid, ok: true, ...}` or
`{v, rid, ok: false, error: {code, message}}`. Clients send `[b"", body]` (REQ framing) so both
REQ and DEALER sockets can talk to the daemon; the request id `rid` lets a DEALER drop late
replies (`id` is left to the ops: it names a connection).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

CONTROL_VERSION = 1
MAX_REQUEST_BYTES = 64 * 1024

# "admit" is between a supervisor and its workers only.
OPS = frozenset({"ping", "lookup", "list", "stats", "kill", "connect", "reload", "admit"})

# error codes
BAD_REQUEST = "bad_request"
UNKNOWN_OP = "unknown_op"
NOT_FOUND = "not_found"
UNSUPPORTED = "unsupported"
INTERNAL = "internal"


class ControlError(Exception):
    """A request the daemon refuses, or a reply that reports failure."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    rid: int = 0
    args: Mapping[str, Any] = field(default_factory=dict)


def encode_request(op: str, rid: int = 0, **args: Any) -> bytes:
    body = dict(args)
    body.update(v=CONTROL_VERSION, rid=rid, op=op)
    return msgpack.packb(body, use_bin_type=True)


def decode_request(data: bytes) -> Request:
    """Strict: anything that is not a well-formed request raises ControlError."""
    if len(data) > MAX_REQUEST_BYTES:
        raise ControlError(BAD_REQUEST, f"request of {len(data)} bytes exceeds {MAX_REQUEST_BYTES}")
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ControlError(BAD_REQUEST, f"request is not msgpack: {exc}") from None
    if not isinstance(body, dict):
        raise ControlError(BAD_REQUEST, "request is not a map")
    if body.get("v", CONTROL_VERSION) != CONTROL_VERSION:
        raise ControlError(UNSUPPORTED, f"control protocol version {body.get('v')!r} unsupported")
    op, rid = body.pop("op", None), body.pop("rid", 0)
    body.pop("v", None)
    if not isinstance(op, str):
        raise ControlError(BAD_REQUEST, "request has no 'op' string")
    if not isinstance(rid, int):
        raise ControlError(BAD_REQUEST, "request 'rid' must be an integer")
    if op not in OPS:
        raise ControlError(UNKNOWN_OP, f"unknown op {op!r}; known: {', '.join(sorted(OPS))}")
    return Request(op, rid, body)


def encode_reply(rid: int, **fields: Any) -> bytes:
    body = dict(fields)
    body.update(v=CONTROL_VERSION, rid=rid, ok=True)
    return msgpack.packb(body, use_bin_type=True)


def encode_error(rid: int, code: str, message: str) -> bytes:
    return msgpack.packb(
        {"v": CONTROL_VERSION, "rid": rid, "ok": False,
         "error": {"code": code, "message": message}},
        use_bin_type=True,
    )


def peek_id(data: bytes) -> int:
    """The request id of a message that failed to decode, or 0: lets the error reply match."""
    try:
        body = msgpack.unpackb(data, raw=False)
        rid = body.get("rid", 0) if isinstance(body, dict) else 0
    except Exception:
        return 0
    return rid if isinstance(rid, int) else 0


def is_reply(data: bytes) -> bool:
    """A reply map (it has `ok`), as opposed to a request (it has `op`)."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception:
        return False
    return isinstance(body, dict) and "ok" in body and "op" not in body


def decode_reply(data: bytes) -> dict[str, Any]:
    """The reply map of a successful request; raises ControlError for an error reply."""
    try:
        body = msgpack.unpackb(data, raw=False)
    except Exception as exc:
        raise ControlError(BAD_REQUEST, f"reply is not msgpack: {exc}") from None
    if not isinstance(body, dict) or "ok" not in body:
        raise ControlError(BAD_REQUEST, "reply is not a control reply map")
    if not body["ok"]:
        err = body.get("error")
        if not isinstance(err, dict):
            raise ControlError(INTERNAL, f"malformed error reply: {err!r}")
        raise ControlError(str(err.get("code", INTERNAL)), str(err.get("message", "")))
    return body
