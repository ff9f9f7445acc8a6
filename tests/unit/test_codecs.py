"""The wire codecs: events, control requests/replies and addresses (shared/)."""

from __future__ import annotations

import ipaddress
from dataclasses import replace
from typing import Any

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from tlsbridge.shared import control as ctl
from tlsbridge.shared import events as ev
from tlsbridge.shared.addr import format_addr, is_ip, parse_addr
from tlsbridge.shared.events import ConnRef, Event, EventEncoder, SeqTracker, decode_event
from tlsbridge.shared.facts import TlsFacts

FACTS = TlsFacts.from_dict(
    {
        "version": "TLSv1.3",
        "cipher": "TLS_AES_256_GCM_SHA384",
        "cipher_bits": 256,
        "sni": "sip.example.com",
        "alpn": None,
        "resumed": False,
        "peer_cert_present": False,
        "peer_verified": False,
        "verify_error": "no peer certificate",
        "peer": None,
        "local": None,
        "engine": "openssl",
    }
)
CONN = ConnRef(
    id=42,
    peer="198.51.100.7:40001",
    direction="in",
    hairpin="127.0.0.1:41001",
    listener="192.0.2.1:5061",
)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def event_body(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "v": ev.EVENTS_VERSION,
        "src": "abc",
        "seq": 1,
        "ts": 1.5,
        "type": ev.TLS_ESTABLISHED,
        "conn": CONN.to_dict(),
    }
    body.update(overrides)
    return {k: v for k, v in body.items() if v is not ...}


# ---------------------------------------------------------------- events


class TestEvents:
    def test_round_trip_with_tls_facts(self) -> None:
        enc = EventEncoder("src-1")
        event, frames = enc.encode(ev.TLS_ESTABLISHED, CONN, tls=FACTS, note="x")
        assert frames[0] == b"tls.established.in"  # the direction: subscribe to what you need
        decoded = decode_event(frames)
        assert decoded == event
        assert decoded.conn == CONN
        assert decoded.tls == FACTS
        assert decoded.fields["note"] == "x"
        assert decoded.src == "src-1" and decoded.seq == 1

    def test_round_trip_without_conn(self) -> None:
        event, frames = EventEncoder("s").encode(ev.DAEMON_STARTED, None, pid=1234)
        assert frames[0] == b"daemon.started"
        decoded = decode_event(frames)
        assert decoded == event
        assert decoded.conn is None
        assert decoded.tls is None
        assert decoded.fields == {"pid": 1234}

    def test_reason(self) -> None:
        _, frames = EventEncoder("s").encode(ev.TLS_FAILED, CONN, reason="verify_failed")
        assert decode_event(frames).reason == "verify_failed"

    def test_encoder_numbers_events_from_one(self) -> None:
        enc = EventEncoder("s")
        seqs = [enc.encode(ev.CONN_CLOSED, CONN)[0].seq for _ in range(3)]
        assert seqs == [1, 2, 3]

    def test_each_topic_counts_on_its_own(self) -> None:
        enc = EventEncoder("s")
        out = replace(CONN, direction="out")
        seqs = [(e.topic, e.seq) for e in (enc.encode(t, c)[0] for t, c in [
            (ev.CONN_CLOSED, CONN), (ev.CONN_CLOSED, out), (ev.TLS_FAILED, CONN),
            (ev.CONN_CLOSED, CONN), (ev.DAEMON_STOPPING, None)])]
        assert seqs == [("conn.closed.in", 1), ("conn.closed.out", 1), ("tls.failed.in", 1),
                        ("conn.closed.in", 2), ("daemon.stopping", 1)]

    def test_encoder_refuses_unknown_type(self) -> None:
        enc = EventEncoder("s")
        with pytest.raises(ev.EventError, match="unknown event type"):
            enc.encode("tls.exploded", CONN)
        # A refused event does not use up a sequence number (it would look like a gap).
        assert enc.encode(ev.CONN_CLOSED, CONN)[0].seq == 1

    def test_all_types_encode(self) -> None:
        enc = EventEncoder("s")
        for type_ in sorted(ev.EVENT_TYPES):
            assert decode_event(enc.encode(type_, None)[1]).type == type_

    @pytest.mark.parametrize(
        ("frames", "match"),
        [
            pytest.param([pack(event_body())], "expected 2 frames", id="one-frame"),
            pytest.param([b"t", pack(event_body()), b"x"], "expected 2 frames", id="three-frames"),
            pytest.param([b"t", b"\xc1"], "not msgpack", id="not-msgpack"),
            pytest.param([b"t", pack(event_body())[:-3]], "not msgpack", id="truncated"),
            pytest.param([b"t", pack([1, 2])], "not a map", id="list"),
            pytest.param([b"t", pack("hello")], "not a map", id="string"),
            pytest.param([b"t", pack(event_body(v=1))], "version 1", id="version-1"),
            pytest.param([b"t", pack(event_body(v=3))], "version 3", id="version-3"),
            pytest.param([b"t", pack(event_body(v=...))], "version None", id="no-version"),
            pytest.param([b"t", pack(event_body(type=...))], "lacks 'type'", id="no-type"),
            pytest.param([b"t", pack(event_body(seq=...))], "lacks 'seq'", id="no-seq"),
            pytest.param([b"t", pack(event_body(ts=...))], "lacks 'ts'", id="no-ts"),
            pytest.param([b"t", pack(event_body(src=...))], "lacks 'src'", id="no-src"),
            pytest.param([b"t", pack(event_body(type=7))], "wrong types", id="type-int"),
            pytest.param([b"t", pack(event_body(seq="1"))], "wrong types", id="seq-str"),
            pytest.param(
                [b"t", pack(event_body(conn={"id": 1, "direction": "in"}))],
                "missing 'peer'",
                id="conn-no-peer",
            ),
            pytest.param(
                [b"t", pack(event_body(conn={**CONN.to_dict(), "direction": "up"}))],
                "bad conn reference",
                id="conn-bad-direction",
            ),
            pytest.param(
                [b"t", pack(event_body(conn={**CONN.to_dict(), "id": "42"}))],
                "bad conn reference",
                id="conn-id-str",
            ),
            pytest.param([b"t", pack(event_body(conn="x"))], "bad conn", id="conn-not-map"),
        ],
    )
    def test_strict_decoding(self, frames: list[bytes], match: str) -> None:
        with pytest.raises(ev.EventError, match=match):
            decode_event(frames)
    @pytest.mark.parametrize("ts", ["soon", None, [1]])
    def test_bad_ts_is_an_event_error(self, ts: Any) -> None:
        with pytest.raises(ev.EventError):
            decode_event([b"t", pack(event_body(ts=ts))])

    def test_unknown_type_is_passed_on(self) -> None:
        # Newer daemons may publish types this reader does not know: not an error.
        event = decode_event([b"x.new", pack(event_body(type="x.new", extra=1))])
        assert event.type == "x.new"
        assert event.fields == {"extra": 1}


class TestSeqTracker:
    @staticmethod
    def event(seq: int, src: str = "a", type_: str = ev.CONN_CLOSED) -> Event:
        return Event(type_, seq, 0.0, src)

    def test_first_event_asks_for_resync(self) -> None:
        t = SeqTracker()
        assert t.observe(self.event(17)) is True
        assert (t.src, t.last, t.lost) == ("a", {"conn.closed": 17}, 0)

    def test_consecutive_events_need_nothing(self) -> None:
        t = SeqTracker()
        t.observe(self.event(1))
        assert [t.observe(self.event(n)) for n in (2, 3, 4)] == [False, False, False]
        assert (t.last, t.lost) == ({"conn.closed": 4}, 0)

    def test_gap_counts_lost_events(self) -> None:
        t = SeqTracker()
        t.observe(self.event(1))
        assert t.observe(self.event(4)) is True
        assert (t.last, t.lost) == ({"conn.closed": 4}, 2)
        assert t.observe(self.event(5)) is False
        assert t.observe(self.event(7)) is True
        assert t.lost == 3

    def test_gaps_are_per_topic(self) -> None:
        t = SeqTracker()
        t.observe(self.event(1))
        # Another topic starts where this subscriber first sees it: no loss, no resync.
        assert t.observe(self.event(9, type_=ev.DAEMON_STARTED)) is False
        assert t.observe(self.event(2)) is False
        assert t.observe(self.event(11, type_=ev.DAEMON_STARTED)) is True
        assert t.lost == 1

    def test_new_src_is_a_restart(self) -> None:
        t = SeqTracker()
        t.observe(self.event(1))
        t.observe(self.event(2))
        # The restarted publisher counts from 1 again: not a gap, but a resync all the same.
        assert t.observe(self.event(1, src="b")) is True
        assert (t.src, t.last, t.lost) == ("b", {"conn.closed": 1}, 0)
        assert t.observe(self.event(2, src="b")) is False


# ---------------------------------------------------------------- control


class TestControl:
    def test_request_round_trip(self) -> None:
        data = ctl.encode_request("lookup", 7, hairpin="127.0.0.1:41001")
        req = ctl.decode_request(data)
        assert req == ctl.Request("lookup", 7, {"hairpin": "127.0.0.1:41001"})

    def test_request_defaults(self) -> None:
        # id defaults to 0, and a request without "v" is read as the current version.
        req = ctl.decode_request(pack({"op": "ping"}))
        assert (req.op, req.rid, dict(req.args)) == ("ping", 0, {})

    def test_all_ops_decode(self) -> None:
        for op in sorted(ctl.OPS):
            assert ctl.decode_request(ctl.encode_request(op, 1)).op == op

    def test_reply_round_trip(self) -> None:
        reply = ctl.decode_reply(ctl.encode_reply(9, conn=CONN.to_dict(), tls=FACTS.to_dict()))
        assert reply["ok"] is True and reply["rid"] == 9 and reply["v"] == ctl.CONTROL_VERSION
        assert ConnRef.from_dict(reply["conn"]) == CONN
        assert TlsFacts.from_dict(reply["tls"]) == FACTS

    def test_error_reply_raises(self) -> None:
        with pytest.raises(ctl.ControlError) as info:
            ctl.decode_reply(ctl.encode_error(3, ctl.NOT_FOUND, "no such connection"))
        assert (info.value.code, info.value.message) == (ctl.NOT_FOUND, "no such connection")
        assert str(info.value) == "not_found: no such connection"

    def test_error_reply_without_details(self) -> None:
        with pytest.raises(ctl.ControlError) as info:
            ctl.decode_reply(pack({"v": 1, "id": 3, "ok": False}))
        assert info.value.code == ctl.INTERNAL
    def test_error_reply_with_malformed_error(self) -> None:
        with pytest.raises(ctl.ControlError):
            ctl.decode_reply(pack({"v": 1, "id": 3, "ok": False, "error": "boom"}))

    @pytest.mark.parametrize(
        ("data", "match"),
        [
            pytest.param(b"\xc1", "not msgpack", id="not-msgpack"),
            pytest.param(pack([1, 2]), "not a control reply", id="list"),
            pytest.param(pack({"v": 1, "id": 1}), "not a control reply", id="no-ok"),
        ],
    )
    def test_bad_reply(self, data: bytes, match: str) -> None:
        with pytest.raises(ctl.ControlError, match=match) as info:
            ctl.decode_reply(data)
        assert info.value.code == ctl.BAD_REQUEST

    @pytest.mark.parametrize(
        ("data", "code", "match"),
        [
            pytest.param(b"\xc1", ctl.BAD_REQUEST, "not msgpack", id="not-msgpack"),
            pytest.param(b"", ctl.BAD_REQUEST, "not msgpack", id="empty"),
            pytest.param(pack(["ping"]), ctl.BAD_REQUEST, "not a map", id="list"),
            pytest.param(pack(None), ctl.BAD_REQUEST, "not a map", id="nil"),
            pytest.param(pack({"v": 2, "op": "ping"}), ctl.UNSUPPORTED, "version 2", id="v2"),
            pytest.param(pack({"v": 1, "id": 1}), ctl.BAD_REQUEST, "no 'op'", id="no-op"),
            pytest.param(pack({"v": 1, "op": 5}), ctl.BAD_REQUEST, "no 'op'", id="op-int"),
            pytest.param(
                pack({"v": 1, "op": "ping", "rid": "1"}), ctl.BAD_REQUEST, "'rid'", id="id-str"
            ),
            pytest.param(
                ctl.encode_request("reboot", 1), ctl.UNKNOWN_OP, "unknown op 'reboot'",
                id="unknown-op",
            ),
            pytest.param(
                ctl.encode_request("ping", 1, pad="x" * ctl.MAX_REQUEST_BYTES),
                ctl.BAD_REQUEST,
                "exceeds",
                id="oversized",
            ),
        ],
    )
    def test_strict_request_decoding(self, data: bytes, code: str, match: str) -> None:
        with pytest.raises(ctl.ControlError, match=match) as info:
            ctl.decode_request(data)
        assert info.value.code == code

    def test_size_limit_is_inclusive(self) -> None:
        def padded(n: int) -> bytes:
            return ctl.encode_request("ping", 1, pad="x" * n)

        n = ctl.MAX_REQUEST_BYTES - (len(padded(1000)) - 1000)
        assert len(padded(n)) == ctl.MAX_REQUEST_BYTES
        assert ctl.decode_request(padded(n)).op == "ping"
        with pytest.raises(ctl.ControlError, match="exceeds"):
            ctl.decode_request(padded(n + 1))

    def test_unknown_op_error_lists_known_ops(self) -> None:
        with pytest.raises(ctl.ControlError) as info:
            ctl.decode_request(ctl.encode_request("reboot"))
        for op in ctl.OPS:
            assert op in info.value.message

    @pytest.mark.parametrize(
        ("data", "expected"),
        [
            pytest.param(ctl.encode_request("lookup", 77), 77, id="request"),
            pytest.param(ctl.encode_request("reboot", 12), 12, id="unknown-op"),
            pytest.param(pack({"v": 9, "rid": 5}), 5, id="wrong-version"),
            pytest.param(pack({"op": "ping"}), 0, id="no-id"),
            pytest.param(pack({"rid": "5"}), 0, id="id-str"),
            pytest.param(pack([5]), 0, id="list"),
            pytest.param(b"\xc1", 0, id="not-msgpack"),
            pytest.param(b"", 0, id="empty"),
        ],
    )
    def test_peek_id(self, data: bytes, expected: int) -> None:
        assert ctl.peek_id(data) == expected


# ---------------------------------------------------------------- addresses


class TestAddr:
    @pytest.mark.parametrize(
        ("host", "port", "text"),
        [
            ("192.0.2.1", 5061, "192.0.2.1:5061"),
            ("2001:db8::1", 5061, "[2001:db8::1]:5061"),
            ("::1", 1, "[::1]:1"),
            ("[2001:db8::1]", 5061, "[2001:db8::1]:5061"),
            ("sip.example.com", 65535, "sip.example.com:65535"),
        ],
    )
    def test_format(self, host: str, port: int, text: str) -> None:
        assert format_addr(host, port) == text

    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("192.0.2.1:5061", ("192.0.2.1", 5061)),
            ("  192.0.2.1:5061\n", ("192.0.2.1", 5061)),
            ("[2001:db8::1]:5061", ("2001:db8::1", 5061)),
            ("[::1]:65535", ("::1", 65535)),
            ("localhost:1", ("localhost", 1)),
        ],
    )
    def test_parse(self, text: str, expected: tuple[str, int]) -> None:
        assert parse_addr(text) == expected
        assert parse_addr(text, default_port=9) == expected

    @pytest.mark.parametrize(
        "text",
        ["192.0.2.1:0", "192.0.2.1:65536", "192.0.2.1:", "192.0.2.1:x", "192.0.2.1:-1",
         "192.0.2.1:+5", "192.0.2.1: 5", "[::1]:", "[::1]:99999", "[::1]:0x10"],
    )
    def test_bad_port(self, text: str) -> None:
        with pytest.raises(ValueError, match="bad port"):
            parse_addr(text)

    @pytest.mark.parametrize(
        ("text", "match"),
        [
            ("[::1", "unclosed"),
            ("[::1]5061", "garbage"),
            ("[::1]x:5061", "garbage"),
            (":5061", "empty host"),
            ("[]:5061", "empty host"),
            ("", "empty host"),
        ],
    )
    def test_bad_address(self, text: str, match: str) -> None:
        with pytest.raises(ValueError, match=match):
            parse_addr(text, default_port=5061)

    @pytest.mark.parametrize(
        ("text", "host"),
        [("192.0.2.1", "192.0.2.1"), ("[2001:db8::1]", "2001:db8::1"),
         ("2001:db8::1", "2001:db8::1"), ("sip.example.com", "sip.example.com")],
    )
    def test_missing_port(self, text: str, host: str) -> None:
        assert parse_addr(text, default_port=5061) == (host, 5061)
        with pytest.raises(ValueError, match="has no port"):
            parse_addr(text)
    def test_non_ascii_digits_are_a_bad_port(self) -> None:
        with pytest.raises(ValueError):
            parse_addr("192.0.2.1:\uff15\uff10\uff16\uff10")

    def test_is_ip(self) -> None:
        assert is_ip("192.0.2.1") and is_ip("::1")
        assert not is_ip("sip.example.com") and not is_ip("[::1]")


_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
hosts = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.ip_addresses(v=6).map(str),
    st.lists(_label, min_size=1, max_size=4).map(".".join),
)
ports = st.integers(min_value=1, max_value=65535)


@given(hosts, ports)
def test_format_parse_round_trip(host: str, port: int) -> None:
    text = format_addr(host, port)
    assert parse_addr(text) == (host, port)
    # The spelling is canonical: formatting what was parsed gives the same text back.
    assert format_addr(*parse_addr(text)) == text


@given(st.ip_addresses(v=6), ports)
def test_ipv6_is_bracketed(ip: ipaddress.IPv6Address, port: int) -> None:
    text = format_addr(str(ip), port)
    assert text.startswith("[") and text.endswith(f"]:{port}")
