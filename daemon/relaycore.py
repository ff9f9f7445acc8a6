"""The relay's state machine, sans-IO (in the h11 style): what one TLS connection joined to its
hairpin does next, with no socket, engine or loop in sight.

Inputs are the TLS side's plaintext and end, the hairpin's connect, bytes, end and loss, the
write-buffer signals of either side, and timers. Each input returns the actions the caller
(relay.py) must carry out, in order. The byte pump is the hot path, so its two inputs
(`from_peer`, `from_hairpin`) return the constant `FORWARD` in the common case: "pass these
bytes on", with no action built. Everything else is rare and returns a tuple of actions.

    HANDSHAKE --handshake_done--> CONNECTING --hairpin_up--> OPEN --close--> CLOSED
        any state --close / a failure--> CLOSED (exactly once, with one reason)

Bytes are never dropped: what the peer sends before the hairpin is up waits in the core
(reading paused beyond `max_buffer`) and leaves with the PROXY header or at `hairpin_up`.
"""

from __future__ import annotations

import enum
from typing import NamedTuple

from tlsbridge.shared import reasons as r


class State(enum.Enum):
    HANDSHAKE = "handshake"
    CONNECTING = "connecting"
    OPEN = "open"
    CLOSED = "closed"


class Side(enum.Enum):
    PEER = "peer"  # the TLS connection
    HAIRPIN = "hairpin"  # the plain TCP connection to Kamailio


class Failure(enum.Enum):
    """Which failure event a close carries, besides conn.closed."""

    TLS = "tls"  # tls.failed
    HAIRPIN = "hairpin"  # hairpin.failed


# -- actions ----------------------------------------------------------------------------------


class SendToHairpin(NamedTuple):
    data: bytes


class HalfClose(NamedTuple):
    """Pass an end on: a FIN to Kamailio (HAIRPIN), a close_notify to the peer (PEER)."""

    side: Side


class PauseReading(NamedTuple):
    side: Side


class ResumeReading(NamedTuple):
    side: Side


class Abort(NamedTuple):
    """Drop a transport that came too late (the relay closed meanwhile)."""

    side: Side


class ConnectHairpin(NamedTuple):
    """The handshake is done: open the hairpin (then `hairpin_connected`, or `hairpin_failed`)."""


class Ready(NamedTuple):
    """The hairpin is up and what was pending has been written to it."""


class Close(NamedTuple):
    """Close both sides (the hairpin after its buffer drains) and publish the end once."""

    reason: str
    detail: str = ""
    failure: Failure | None = None


Action = (SendToHairpin | HalfClose | PauseReading | ResumeReading | Abort | ConnectHairpin
          | Ready | Close)
Actions = tuple[Action, ...]

NOTHING: Actions = ()
# The byte pump's answer: "pass the bytes on" (identity-compared; never carries an action).
_READY = Ready()
FORWARD: Actions = (_READY,)

_PAUSE_PEER = (PauseReading(Side.PEER),)
_RESUME_PEER = (ResumeReading(Side.PEER),)
_PAUSE_HAIRPIN = (PauseReading(Side.HAIRPIN),)
_RESUME_HAIRPIN = (ResumeReading(Side.HAIRPIN),)
_CONNECT = (ConnectHairpin(),)
_FIN_TO_HAIRPIN = HalfClose(Side.HAIRPIN)
_CLOSE_NOTIFY_TO_PEER = HalfClose(Side.PEER)
_ABORT_HAIRPIN = (Abort(Side.HAIRPIN),)
_NOT_PAUSED: frozenset[str] = frozenset()  # one for every relay that reads

# Why reading from the peer is paused; reading resumes once no reason is left.
PAUSED_BY_HAIRPIN = "hairpin"  # Kamailio does not take what we write
PAUSED_BY_PENDING = "pending"  # the hairpin is not up and max_buffer bytes wait for it
PAUSED_BY_ADMISSION = "admission"  # a worker waits for its supervisor's yes


class RelayCore:
    """One connection's state; `bytes_in` counts plaintext from the peer, `bytes_out` to it."""

    __slots__ = ("_paused_by", "_pending", "_pending_size", "bytes_in", "bytes_out",
                 "forwarding", "hairpin_done", "max_buffer", "peer_done", "peer_gone", "state")

    def __init__(self, max_buffer: int) -> None:
        self.state = State.HANDSHAKE
        # state is OPEN: the byte pump's one test (a flag is cheaper than comparing states)
        self.forwarding = False
        self.max_buffer = max_buffer
        self.bytes_in = 0
        self.bytes_out = 0
        # What waits for the hairpin; None once it has gone (an open connection keeps no list).
        self._pending: list[bytes] | None = []
        self._pending_size = 0
        self._paused_by = _NOT_PAUSED
        self.peer_done = False  # the peer ended its sending (close_notify or FIN)
        self.peer_gone = False  # its TCP connection is gone (while the hairpin was connecting)
        self.hairpin_done = False  # Kamailio ended its sending (FIN)

    @property
    def pending(self) -> int:
        """Bytes waiting for the hairpin."""
        return self._pending_size

    # -- the byte pump (hot) ----------------------------------------------------------------

    def from_peer(self, data: bytes) -> Actions:
        """Plaintext the peer sent: FORWARD (write it to the hairpin) once the hairpin is up;
        before, the core keeps it (and may ask to pause reading)."""
        self.bytes_in += len(data)
        if self.forwarding:
            return FORWARD
        pending = self._pending
        if pending is None:
            pending = self._pending = []
        pending.append(data)
        self._pending_size += len(data)
        if self._pending_size > self.max_buffer:
            return self.pause_peer(PAUSED_BY_PENDING)
        return NOTHING

    def from_hairpin(self, data: bytes) -> Actions:
        """Bytes from Kamailio: FORWARD (encrypt and send them to the peer), or NOTHING once
        closed."""
        # Not only when OPEN: Kamailio can answer what went with the PROXY header before the
        # loop has told us the hairpin is up.
        if self.state is State.CLOSED:
            return NOTHING
        self.bytes_out += len(data)
        return FORWARD

    # -- the TLS side -----------------------------------------------------------------------

    def handshake_done(self) -> Actions:
        if self.state is not State.HANDSHAKE:
            return NOTHING
        self.state = State.CONNECTING
        return _CONNECT

    def handshake_failed(self, reason: str, detail: str) -> Actions:
        return self.close(reason, detail, Failure.TLS)

    def handshake_timed_out(self, detail: str) -> Actions:
        """The handshake timer fired; nothing once the handshake is done."""
        if self.state is not State.HANDSHAKE:
            return NOTHING
        return self.close(r.HANDSHAKE_TIMEOUT, detail, Failure.TLS)

    def peer_eof(self) -> Actions:
        """The peer will send no more (close_notify, or FIN): a FIN to Kamailio, which may
        still answer; closed once both ends are done."""
        self.peer_done = True
        if self.state is not State.OPEN:
            return NOTHING  # hairpin_up passes the end on
        if self.hairpin_done:
            return (_FIN_TO_HAIRPIN, *self.close(r.CLOSED))
        return (_FIN_TO_HAIRPIN,)

    def peer_lost(self, reset: bool) -> Actions:
        """The peer's TCP connection is gone."""
        state = self.state
        if state is State.CONNECTING:
            # What it sent is delivered once the hairpin is up, then the relay closes.
            self.peer_done = self.peer_gone = True
            return NOTHING
        if state is State.HANDSHAKE:
            self.peer_gone = True
            return self.close(r.EOF_IN_HANDSHAKE, "peer closed during the handshake",
                              Failure.TLS)
        return self.close(r.PEER_RESET if reset else r.PEER_CLOSED)

    def peer_write_paused(self) -> Actions:
        """The peer does not take what we send: stop reading Kamailio."""
        return _PAUSE_HAIRPIN

    def peer_write_resumed(self) -> Actions:
        return _RESUME_HAIRPIN if self.state is State.OPEN else NOTHING

    # -- the hairpin ------------------------------------------------------------------------

    def first_segment(self, header: bytes) -> bytes:
        """The PROXY header with what the peer has sent so far: one segment, since Kamailio
        needs the whole header in its first read. Call `unsent` with what did not go."""
        data = b"".join((header, *self._pending)) if self._pending else header
        self._pending = None
        self._pending_size = 0
        return data

    def unsent(self, data: bytes) -> None:
        """The tail of the first segment the socket did not take: it goes at `hairpin_up`."""
        if data:
            self._pending = [data]
            self._pending_size = len(data)

    def hairpin_up(self) -> Actions:
        """The hairpin's transport is ready: what is pending goes, then any end the peer
        already sent."""
        if self.state is not State.CONNECTING:  # closed meanwhile (killed, timed out)
            return _ABORT_HAIRPIN
        self.state = State.OPEN
        self.forwarding = True
        actions: list[Action] = []
        if self._pending:
            actions.append(SendToHairpin(b"".join(self._pending)))
        self._pending = None
        self._pending_size = 0
        if PAUSED_BY_PENDING in self._paused_by:
            actions += self.resume_peer(PAUSED_BY_PENDING)
        if self.peer_gone:
            actions += self.close(r.PEER_CLOSED)
        elif self.peer_done:
            actions += self.peer_eof()
        if self.state is State.OPEN:
            actions.append(_READY)
        return tuple(actions)

    def hairpin_failed(self, detail: str) -> Actions:
        """The hairpin could not be bound, connected or written its header."""
        return self.close(r.HAIRPIN_FAILED, detail, Failure.HAIRPIN)

    def hairpin_eof(self) -> Actions:
        """Kamailio will send no more: a close_notify to the peer; closed once both are done."""
        if self.state is State.CLOSED:
            return NOTHING
        self.hairpin_done = True
        if self.peer_done:
            return (_CLOSE_NOTIFY_TO_PEER, *self.close(r.CLOSED))
        return (_CLOSE_NOTIFY_TO_PEER,)

    def hairpin_lost(self, reset: bool) -> Actions:
        return self.close(r.KAMAILIO_RESET if reset else r.KAMAILIO_CLOSED)

    def hairpin_write_paused(self) -> Actions:
        """Kamailio does not take what we write: stop reading the peer."""
        return self.pause_peer(PAUSED_BY_HAIRPIN)

    def hairpin_write_resumed(self) -> Actions:
        return self.resume_peer(PAUSED_BY_HAIRPIN)

    # -- flow control and the end -----------------------------------------------------------

    def pause_peer(self, why: str) -> Actions:
        """Stop reading the peer for `why`; reading resumes once every reason is gone."""
        first = not self._paused_by
        self._paused_by |= {why}
        return _PAUSE_PEER if first else NOTHING

    def resume_peer(self, why: str) -> Actions:
        if why in self._paused_by:
            self._paused_by -= {why}
        if self._paused_by or self.state is State.CLOSED:
            return NOTHING
        return _RESUME_PEER

    @property
    def paused_by(self) -> frozenset[str]:
        return self._paused_by

    def close(self, reason: str, detail: str = "", failure: Failure | None = None) -> Actions:
        """The one end of the connection: later closes are no-ops."""
        if self.state is State.CLOSED:
            return NOTHING
        self.state = State.CLOSED
        self.forwarding = False
        return (Close(reason, detail, failure),)
