"""shared/kamcfg.py (kamailio.cfg as Kamailio evaluates it) and shared/kamreview.py (what the
bridge needs of it): text in, findings out; plus `--cfg-print` through the real Kamailio."""

from __future__ import annotations

from pathlib import Path

import pytest

from tlsbridge.shared.kamcfg import (
    Listen,
    find_kamailio,
    kamailio_argv_cfg,
    load_cfg,
    parse_cfg,
    udp_address,
)
from tlsbridge.shared.kamreview import errors, review_cfg
from tlsbridge.shared.settings import BridgeSettings

BRIDGE = BridgeSettings(Path("/run/tlsbridge"), ("127.0.0.1", 5062), "ipc://e", "ipc://c",
                        tls_public={"0.0.0.0:5061": "203.0.113.10:5061"},
                        sip_address="203.0.113.10:5060")

GOOD_TOP = """\
#!define HAIRPIN "127.0.0.1:5062"
listen=udp:203.0.113.10:5060
listen=tcp:HAIRPIN   # the hairpin
alias=tls:203.0.113.10:5061
tcp_accept_haproxy=yes
tcp_defer_accept=3
tcp_wait_data=500
tcp_no_connect=yes
loadmodule "tm.so"
loadmodule "rr.so"
loadmodule "registrar.so"
loadmodule "rtimer.so"
loadmodule "app_python3.so"
modparam("registrar", "received_avp", "$avp(RECEIVED)")
modparam("rr", "enable_socket_mismatch_warning", 0)
modparam("rtimer", "exec", "timer=tlsb;route=TLSB_TIMER")
modparam("app_python3", "load", "/etc/kamailio/tlsbridge_native.py")
"""

GOOD_ROUTES = """\
request_route {
    python_exec("tlsb_protect_replies");
    if (is_method("REGISTER")) { python_exec("tlsb_register"); save("location"); exit; }
    python_exec("tlsb_record_route");
    route(RELAY);
}
route[RELAY] {
    if (!python_exec("tlsb_relay", "RELAY")) exit;
    t_on_branch("B");
    t_relay();
}
branch_route[B] { python_exec("tlsb_branch"); }
route[TLSB_TIMER] { python_exec("tlsb_timer"); }
"""


def review(text: str) -> list[tuple[str, str]]:
    return review_cfg(parse_cfg(text), BRIDGE)


def test_a_migrated_native_cfg_has_no_error_nor_warning() -> None:
    findings = review(GOOD_TOP + GOOD_ROUTES)
    assert [f for f in findings if f[0] != "ok"] == []


def test_comments_strings_and_defines_are_read_as_kamailio_reads_them() -> None:
    cfg = parse_cfg("""\
#!define PORT 5070
#!trydef PORT 9999
/* listen=tcp:192.0.2.1:5060 in a block comment
   loadmodule "tls.so" */
# loadmodule "tls.so"
// listen=tcp:192.0.2.2:5060
listen=udp:127.0.0.1:PORT   # trailing comment with "quotes"
modparam("acc", "log_extra",
    "src_user=$fU;src_domain=$fd;"
    "dst_user=$rU")  # several strings, several lines
request_route { xlog("L_INFO", "PORT # not a comment // nor this\\n"); }
""")
    assert cfg.listens == (Listen("udp", "127.0.0.1", 5070),)
    assert cfg.modules == ()
    assert cfg.modparam("acc", "log_extra") == "src_user=$fU;src_domain=$fd;dst_user=$rU"
    assert cfg.routes() == ["request_route"]
    assert cfg.calls("xlog")


@pytest.mark.parametrize(("change", "error"), [
    (("listen=tcp:HAIRPIN   # the hairpin\n", ""), "no hairpin listener"),
    (("listen=udp:203.0.113.10:5060\n", ""), "no UDP listener"),
    (("listen=udp:203.0.113.10:5060\n", "listen=203.0.113.10:5060\n"),
     "other plain TCP listeners (203.0.113.10:5060)"),
    (("tcp_accept_haproxy=yes", "tcp_accept_haproxy=no"), "tcp_accept_haproxy is not yes"),
    (('loadmodule "rr.so"', 'loadmodule "rr.so"\nloadmodule "tls.so"'), "tls.so is loaded"),
    (("tcp_no_connect=yes", "enable_tls=yes\ntcp_no_connect=yes"), "enable_tls = yes"),
    (('modparam("registrar", "received_avp", "$avp(RECEIVED)")\n', ""),
     "registrar has no received_avp"),
    (("$avp(RECEIVED)", "$avp(rcv)"), "registrar received_avp is $avp(rcv)"),
    (('loadmodule "app_python3.so"', ""), "app_python3 is not loaded"),
    (("listen=udp:203.0.113.10:5060\n", "listen=udp:203.0.113.10:5060\nlisten=tls:0.0.0.0:5061\n"),
     "listen=tls:... remains"),
])
def test_each_thing_that_breaks_the_bridge_is_an_error(change: tuple[str, str],
                                                        error: str) -> None:
    old, new = change
    assert old in GOOD_TOP
    found = errors(review(GOOD_TOP.replace(old, new, 1) + GOOD_ROUTES))
    assert any(e.startswith(error) for e in found), found


def test_a_missing_tls_alias_is_a_warning() -> None:
    findings = review(GOOD_TOP.replace("alias=tls:203.0.113.10:5061\n", "") + GOOD_ROUTES)
    assert errors(findings) == []
    assert any(level == "warning" and m.startswith("no alias=tls:203.0.113.10:5061")
               for level, m in findings), findings


def test_no_listen_lines_means_every_address() -> None:
    top = "\n".join(ln for ln in GOOD_TOP.splitlines() if not ln.startswith("listen="))
    assert any(e.startswith("no listen= lines") for e in errors(review(top + GOOD_ROUTES)))


@pytest.mark.parametrize(("old", "new", "error"), [
    ('    if (!python_exec("tlsb_relay", "RELAY")) exit;\n', "",
     'no python_exec("tlsb_relay") before t_relay()'),
    ('python_exec("tlsb_register"); ', "", 'no python_exec("tlsb_register")'),
    ('python_exec("tlsb_record_route")', "record_route()", "record_route() names the hairpin"),
    ('python_exec("tlsb_branch");', "", 'no python_exec("tlsb_branch")'),
    ('python_exec("tlsb_timer");', "", 'no python_exec("tlsb_timer")'),
])
def test_native_routes_that_skip_the_bridge_are_errors(old: str, new: str, error: str) -> None:
    assert old in GOOD_ROUTES
    found = errors(review(GOOD_TOP + GOOD_ROUTES.replace(old, new, 1)))
    assert any(e.startswith(error) for e in found), found


def test_cfgengine_beside_native_routes_is_an_error_and_alone_is_kemi() -> None:
    kemi = GOOD_TOP + 'cfgengine "python"\n'
    assert errors(review(kemi)) == []
    found = errors(review(kemi + GOOD_ROUTES))
    assert any('cfgengine "python" with native route blocks' in e for e in found), found


def test_append_fromtag_either_way_is_fine() -> None:
    for value in (0, 1):
        text = GOOD_TOP + f'modparam("rr", "append_fromtag", {value})\n' + GOOD_ROUTES
        assert errors(review(text)) == []


def test_the_udp_listener_stands_in_for_sip_address() -> None:
    assert udp_address(parse_cfg("listen=udp:192.0.2.5:5070\n")) == "192.0.2.5:5070"
    assert udp_address(parse_cfg(
        "listen=udp:0.0.0.0:5060 advertise 198.51.100.1:5060\n")) == "198.51.100.1:5060"
    assert udp_address(parse_cfg("listen=udp:0.0.0.0:5060\n")) is None
    assert udp_address(parse_cfg("listen=udp:192.0.2.5:5060\nlisten=udp:192.0.2.6:5060\n")) \
        is None


def test_kamailio_command_line() -> None:
    argv = ["kamailio", "-f", "/etc/k.cfg", "-DD", "-A", "WITH_TLS", "-AX=1", "-E"]
    assert kamailio_argv_cfg(argv) == ("/etc/k.cfg", ["WITH_TLS", "X=1"])
    assert kamailio_argv_cfg(["kamailio"]) == ("/etc/kamailio/kamailio.cfg", [])


@pytest.mark.skipif(find_kamailio() is None, reason="needs Kamailio's --cfg-print")
def test_ifdef_and_import_file_through_kamailio(tmp_path: Path) -> None:
    (tmp_path / "local.cfg").write_text("listen=udp:127.0.0.1:5999\n")
    (tmp_path / "k.cfg").write_text("""\
import_file "local.cfg"
#!ifdef WITH_TLS
loadmodule "tls.so"
#!endif
request_route { drop; }
""")
    assert load_cfg(tmp_path / "k.cfg").modules == ()
    assert load_cfg(tmp_path / "k.cfg", ["WITH_TLS"]).modules == ("tls",)
    assert load_cfg(tmp_path / "k.cfg").listens == (Listen("udp", "127.0.0.1", 5999),)
