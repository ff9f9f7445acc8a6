"""The note a worker adds to each event about a connection, for its supervisor.

The supervisor keeps its connection table, the admission counts and the counters from the
workers' events. Under connection churn, decoding every event (with the full TLS facts) was
most of its work, so each worker event about a connection carries a third frame: this note,
with what the supervisor needs. It decodes the event itself only when someone subscribed to
it, or when asked about the connection (`list`, a look-up the facts map missed, a worker's
death).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import msgpack

from tlsbridge.shared.events import ConnRef


class Note(NamedTuple):
    id: int
    hairpin: str | None
    reason: str | None
    bytes_in: int
    bytes_out: int


def encode_note(conn: ConnRef, fields: dict[str, Any]) -> bytes:
    return msgpack.packb([conn.id, conn.hairpin, fields.get("reason"),
                          fields.get("bytes_in", 0), fields.get("bytes_out", 0)])


def decode_note(frame: bytes) -> Note:
    """ValueError if `frame` is not a note."""
    try:
        note = Note(*msgpack.unpackb(frame))
    except (ValueError, TypeError, msgpack.UnpackException) as exc:
        raise ValueError(f"not a worker's note: {exc}") from None
    if type(note.id) is not int or type(note.bytes_in) is not int \
            or type(note.bytes_out) is not int:
        raise ValueError(f"not a worker's note: {note!r}")
    return note
