"""The relay's state machine (daemon/relaycore.py), one edge case per test, with no socket."""

from __future__ import annotations

from tlsbridge.daemon.relaycore import (
    FORWARD,
    NOTHING,
    PAUSED_BY_ADMISSION,
    PAUSED_BY_HAIRPIN,
    PAUSED_BY_PENDING,
    Abort,
    Close,
    ConnectHairpin,
    Failure,
    HalfClose,
    PauseReading,
    Ready,
    RelayCore,
    ResumeReading,
    SendToHairpin,
    Side,
    State,
)
from tlsbridge.shared import reasons as r

HEADER = b"PROXY TCP4 198.51.100.7 127.0.0.1 40001 5061\r\n"


def connecting(max_buffer: int = 100) -> RelayCore:
    core = RelayCore(max_buffer)
    assert core.handshake_done() == (ConnectHairpin(),)
    assert core.state is State.CONNECTING
    return core


def opened(max_buffer: int = 100) -> RelayCore:
    core = connecting(max_buffer)
    assert core.first_segment(HEADER) == HEADER
    assert core.hairpin_up() == (Ready(),)
    assert core.state is State.OPEN
    return core


def test_bytes_pass_both_ways_with_no_action_built() -> None:
    core = opened()
    assert core.from_peer(b"INVITE") is FORWARD
    assert core.from_hairpin(b"SIP/2.0 100") is FORWARD
    assert (core.bytes_in, core.bytes_out) == (6, 11)


def test_early_bytes_leave_with_the_proxy_header() -> None:
    core = connecting()
    assert core.from_peer(b"REGISTER ") is NOTHING
    assert core.from_peer(b"sip:x") is NOTHING
    assert core.pending == 14
    assert core.first_segment(HEADER) == HEADER + b"REGISTER sip:x"
    assert core.pending == 0
    assert core.hairpin_up() == (Ready(),)
    assert core.bytes_in == 14


def test_kamailio_may_answer_before_the_hairpin_is_reported_up() -> None:
    core = connecting()
    core.from_peer(b"OPTIONS")
    core.first_segment(HEADER)  # the request left with the header; Kamailio answers at once
    assert core.from_hairpin(b"SIP/2.0 200 OK") is FORWARD
    assert core.hairpin_up() == (Ready(),)


def test_early_bytes_the_socket_did_not_take_go_at_hairpin_up() -> None:
    core = connecting()
    core.from_peer(b"abcdef")
    segment = core.first_segment(HEADER)
    core.unsent(segment[len(HEADER) + 2:])  # the socket took the header and "ab"
    assert core.hairpin_up() == (SendToHairpin(b"cdef"), Ready())


def test_early_bytes_beyond_max_buffer_pause_the_peer_until_the_hairpin_is_up() -> None:
    core = connecting(max_buffer=10)
    assert core.from_peer(b"x" * 10) is NOTHING
    assert core.from_peer(b"y") == (PauseReading(Side.PEER),)
    assert core.from_peer(b"z") is NOTHING  # paused already: asked once
    assert core.paused_by == {PAUSED_BY_PENDING}
    segment = core.first_segment(HEADER)
    core.unsent(segment[-5:])
    assert core.hairpin_up() == (SendToHairpin(b"xxxyz"), ResumeReading(Side.PEER), Ready())
    assert core.paused_by == frozenset()


def test_back_pressure_from_kamailio_pauses_the_peer() -> None:
    core = opened()
    assert core.hairpin_write_paused() == (PauseReading(Side.PEER),)
    assert core.hairpin_write_resumed() == (ResumeReading(Side.PEER),)


def test_back_pressure_from_the_peer_pauses_kamailio() -> None:
    core = opened()
    assert core.peer_write_paused() == (PauseReading(Side.HAIRPIN),)
    assert core.peer_write_resumed() == (ResumeReading(Side.HAIRPIN),)
    core.close(r.KILLED)
    assert core.peer_write_resumed() is NOTHING  # nothing to read any more


def test_reading_resumes_only_once_every_reason_is_gone() -> None:
    core = opened()
    assert core.pause_peer(PAUSED_BY_ADMISSION) == (PauseReading(Side.PEER),)
    assert core.hairpin_write_paused() is NOTHING
    assert core.resume_peer(PAUSED_BY_ADMISSION) is NOTHING  # Kamailio still does not read
    assert core.hairpin_write_resumed() == (ResumeReading(Side.PEER),)
    assert core.paused_by == frozenset()


def test_half_close_by_the_peer_then_kamailio() -> None:
    core = opened()
    assert core.peer_eof() == (HalfClose(Side.HAIRPIN),)
    assert core.from_hairpin(b"SIP/2.0 200 OK") is FORWARD  # Kamailio may still answer
    assert core.hairpin_eof() == (HalfClose(Side.PEER), Close(r.CLOSED))
    assert core.state is State.CLOSED


def test_half_close_by_kamailio_then_the_peer() -> None:
    core = opened()
    assert core.hairpin_eof() == (HalfClose(Side.PEER),)
    assert core.from_peer(b"BYE") is FORWARD
    assert core.peer_eof() == (HalfClose(Side.HAIRPIN), Close(r.CLOSED))


def test_an_end_before_the_hairpin_is_up_is_passed_on_after_the_bytes() -> None:
    core = connecting()
    core.from_peer(b"OPTIONS")
    assert core.peer_eof() is NOTHING
    core.unsent(core.first_segment(HEADER)[len(HEADER):])
    assert core.hairpin_up() == (SendToHairpin(b"OPTIONS"), HalfClose(Side.HAIRPIN), Ready())


def test_a_peer_gone_while_connecting_gets_its_bytes_delivered_then_closes() -> None:
    core = connecting()
    core.from_peer(b"MESSAGE")
    assert core.peer_lost(reset=False) is NOTHING
    core.unsent(core.first_segment(HEADER)[len(HEADER):])
    assert core.hairpin_up() == (SendToHairpin(b"MESSAGE"), Close(r.PEER_CLOSED))


def test_a_hairpin_lost_mid_stream_closes_once() -> None:
    core = opened()
    core.from_peer(b"INVITE")
    assert core.hairpin_lost(reset=True) == (Close(r.KAMAILIO_RESET),)
    assert core.from_hairpin(b"late") is NOTHING
    assert core.hairpin_lost(reset=False) is NOTHING
    assert core.peer_lost(reset=False) is NOTHING
    assert core.bytes_in == 6


def test_a_hairpin_closed_by_kamailio() -> None:
    assert opened().hairpin_lost(reset=False) == (Close(r.KAMAILIO_CLOSED),)


def test_the_peer_lost_mid_stream() -> None:
    assert opened().peer_lost(reset=True) == (Close(r.PEER_RESET),)
    assert opened().peer_lost(reset=False) == (Close(r.PEER_CLOSED),)


def test_a_hairpin_that_cannot_connect_is_a_hairpin_failure() -> None:
    core = connecting()
    assert core.hairpin_failed("127.0.0.1:5062: Connection refused") == (
        Close(r.HAIRPIN_FAILED, "127.0.0.1:5062: Connection refused", Failure.HAIRPIN),)


def test_a_hairpin_up_after_the_relay_closed_is_dropped() -> None:
    core = connecting()
    core.close(r.KILLED)
    assert core.hairpin_up() == (Abort(Side.HAIRPIN),)


def test_handshake_timer_and_failures() -> None:
    core = RelayCore(100)
    assert core.handshake_timed_out("10 s") == (
        Close(r.HANDSHAKE_TIMEOUT, "10 s", Failure.TLS),)
    assert opened().handshake_timed_out("10 s") is NOTHING  # done in time: the timer is late
    assert RelayCore(100).peer_lost(reset=False) == (
        Close(r.EOF_IN_HANDSHAKE, "peer closed during the handshake", Failure.TLS),)
    assert RelayCore(100).handshake_failed(r.VERIFY_FAILED, "bad chain") == (
        Close(r.VERIFY_FAILED, "bad chain", Failure.TLS),)


def test_close_happens_once() -> None:
    core = opened()
    assert core.close(r.KILLED) == (Close(r.KILLED),)
    assert core.close(r.SHUTDOWN) is NOTHING
    assert core.hairpin_eof() is NOTHING
    assert core.resume_peer(PAUSED_BY_HAIRPIN) is NOTHING
