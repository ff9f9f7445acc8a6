"""daemon/config.py load_config and daemon/engines/openssl.py server_context."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest
import trustme

from tlsbridge.daemon import kamcheck
from tlsbridge.daemon.config import ConfigError, ServerProfile, load_config
from tlsbridge.daemon.engines.openssl import server_context

VALID = """\
[daemon]
run_dir = "run"
log_level = "debug"

[kamailio]
hairpin = "127.0.0.1:5062"
proxy_protocol = 2

[zmq]
events_hwm = 5000

[profile.default]
certificate = "certs/server.pem"
private_key = "certs/server.key"
ca_list = "certs/ca.pem"
verify_client = "optional"
min_version = "TLSv1.3"
alpn = ["sip"]

[profile.strict]
certificate = "certs/server.pem"
private_key = "certs/server.key"
ca_list = "certs/ca.pem"
verify_client = "on"

[[listener]]
address = "0.0.0.0:5061"

[[listener]]
address = "[::]:5062"
profile = "strict"
"""


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def etc(tmp_path: Path, ca: trustme.CA) -> Path:
    """A configuration directory with certs/ beside where the TOML file goes."""
    d = tmp_path / "etc"
    certs = d / "certs"
    certs.mkdir(parents=True)
    cert = ca.issue_cert("localhost")
    cert.cert_chain_pems[0].write_to_path(str(certs / "server.pem"))
    cert.private_key_pem.write_to_path(str(certs / "server.key"))
    ca.cert_pem.write_to_path(str(certs / "ca.pem"))
    return d


def write(etc: Path, text: str) -> Path:
    path = etc / "tlsbridge.toml"
    path.write_text(text)
    return path


def edit(text: str, old: str, new: str) -> str:
    assert old in text, old
    return text.replace(old, new, 1)


def test_valid_config(etc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(etc, VALID)
    # Relative paths are relative to the file, not to the working directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(Path("..") / "etc" / "tlsbridge.toml")
    base = etc.resolve()
    assert cfg.path == path.resolve()
    assert cfg.run_dir == base / "run"
    assert (cfg.hairpin.host, cfg.hairpin.port, cfg.hairpin.proxy_protocol) == (
        "127.0.0.1", 5062, 2,
    )
    assert cfg.hairpin.source_ip == "127.0.0.1"
    assert cfg.events_endpoint == f"ipc://{base / 'run'}/events.sock"
    assert cfg.control_endpoint == f"ipc://{base / 'run'}/control.sock"
    assert cfg.events_hwm == 5000
    assert cfg.log_level == "debug"
    assert [(li.address, li.profile) for li in cfg.listeners] == [
        ("0.0.0.0:5061", "default"),
        ("[::]:5062", "strict"),
    ]
    default = cfg.profiles["default"]
    assert default.certificate == base / "certs" / "server.pem"
    assert default.private_key == base / "certs" / "server.key"
    assert default.ca_list == base / "certs" / "ca.pem"
    assert default.verify_client == "optional"
    assert (default.min_version, default.max_version) == ("TLSv1.3", "TLSv1.3")
    assert default.alpn == ("sip",)
    assert cfg.profiles["strict"].verify_client == "on"

    ctx = server_context(default)
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    assert ctx.minimum_version == ssl.TLSVersion.TLSv1_3
    assert server_context(cfg.profiles["strict"]).verify_mode == ssl.CERT_REQUIRED


def test_minimal_config_defaults(etc: Path) -> None:
    text = """\
[kamailio]
hairpin = "127.0.0.1:5062"
[profile.default]
certificate = "certs/server.pem"
private_key = "certs/server.key"
[[listener]]
address = "192.0.2.1:5061"
"""
    cfg = load_config(write(etc, text))
    assert cfg.run_dir == Path("/run/tlsbridge")
    assert cfg.events_endpoint == "ipc:///run/tlsbridge/events.sock"
    assert cfg.hairpin.proxy_protocol == 1
    p = cfg.profiles["default"]
    assert (p.verify_client, p.ca_list, p.min_version, p.max_version) == (
        "off", None, "TLSv1.2", "TLSv1.3",
    )
    assert server_context(p).verify_mode == ssl.CERT_NONE


def test_endpoint_template(etc: Path) -> None:
    text = VALID.replace("events_hwm = 5000", 'events = "ipc://{run_dir}/ev.sock"')
    cfg = load_config(write(etc, text))
    assert cfg.events_endpoint == f"ipc://{etc.resolve() / 'run'}/ev.sock"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such configuration file") as info:
        load_config(path)
    assert str(path.resolve()) in str(info.value)


def test_invalid_toml(etc: Path) -> None:
    path = write(etc, VALID + "\n[kamailio\n")
    with pytest.raises(ConfigError, match="not valid TOML") as info:
        load_config(path)
    assert str(path.resolve()) in str(info.value)


BAD = [
    pytest.param(('[kamailio]\nhairpin = "127.0.0.1:5062"\nproxy_protocol = 2\n', ""), "kamailio",
                 "required",
                 id="no-kamailio-table"),
    pytest.param(('hairpin = "127.0.0.1:5062"\n', ""), "kamailio.hairpin", "required",
                 id="no-hairpin"),
    pytest.param(('"127.0.0.1:5062"', '"127.0.0.1"'), "kamailio.hairpin", "no port",
                 id="hairpin-no-port"),
    pytest.param(('"127.0.0.1:5062"', '"127.0.0.1:70000"'), "kamailio.hairpin", "bad port",
                 id="hairpin-bad-port"),
    pytest.param(('"127.0.0.1:5062"', "5062"), "kamailio.hairpin", "must be a str",
                 id="hairpin-not-str"),
    pytest.param(('"0.0.0.0:5061"', '"[::1:5061"'), "listener[0].address", "unclosed",
                 id="listener-bad-address"),
    pytest.param(("proxy_protocol = 2", "proxy_protocol = 3"), "kamailio.proxy_protocol",
                 "one of 1, 2", id="proxy-protocol-3"),
    pytest.param(('min_version = "TLSv1.3"', 'min_version = "TLSv1.3"\nmax_version = "TLSv1.2"'),
                 "profile.default.min_version", "above max_version", id="min-above-max"),
    pytest.param(('min_version = "TLSv1.3"', 'min_version = "SSLv3"'),
                 "profile.default.min_version", "one of", id="unknown-version"),
    pytest.param(('ca_list = "certs/ca.pem"\nverify_client = "optional"',
                  'verify_client = "on"'),
                 "profile.default.ca_list", "required when verify_client = 'on'",
                 id="verify-on-without-ca"),
    pytest.param(('verify_client = "optional"', 'verify_client = "yes"'),
                 "profile.default.verify_client", "one of off, optional, on",
                 id="verify-bad-mode"),
    pytest.param(('certificate = "certs/server.pem"', 'certificate = "certs/missing.pem"'),
                 "profile.default.certificate", "does not exist", id="certificate-missing"),
    pytest.param(('private_key = "certs/server.key"', ""),
                 "profile.default.private_key", "required", id="no-private-key"),
    pytest.param(('ca_list = "certs/ca.pem"', 'ca_list = "certs"'),
                 "profile.default.ca_list", "not a regular file", id="ca-list-is-dir"),
    pytest.param(('[[listener]]\naddress = "0.0.0.0:5061"\n\n[[listener]]\naddress = "[::]:5062"\n'
                  'profile = "strict"\n', ""),
                 "listener", "required", id="no-listeners"),
    pytest.param([('[[listener]]\naddress = "0.0.0.0:5061"\n\n[[listener]]\naddress = "[::]:5062"\n'
                   'profile = "strict"\n', ""), ("[daemon]\n", "listener = []\n[daemon]\n")],
                 "listener", "at least one", id="empty-listeners"),
    pytest.param(('profile = "strict"', 'profile = "lax"'), "listener[1].profile",
                 "no [profile.lax]", id="listener-unknown-profile"),
    pytest.param(("events_hwm = 5000", 'events = "tcp://127.0.0.1:5555"'), "zmq.events",
                 "tcp:// endpoints need CURVE", id="zmq-tcp"),
    pytest.param(("events_hwm = 5000", 'control = "tcp://*:5556"'), "zmq.control",
                 "tcp:// endpoints need CURVE", id="zmq-control-tcp"),
    pytest.param(("events_hwm = 5000", 'events = "udp://x"'), "zmq.events", "ipc://",
                 id="zmq-other-scheme"),
    pytest.param(("events_hwm = 5000", "events_hwm = 0"), "zmq.events_hwm", "> 0",
                 id="hwm-zero"),
    pytest.param(('log_level = "debug"', 'log_level = "loud"'), "daemon.log_level", "one of",
                 id="bad-log-level"),
    pytest.param(('[daemon]\n', 'daemon = 5\n[x]\n'), "daemon", "must be a dict",
                 id="daemon-not-table"),
]


@pytest.mark.parametrize(("change", "key", "message"), BAD)
def test_bad_config(
    etc: Path, change: tuple[str, str] | list[tuple[str, str]], key: str, message: str
) -> None:
    text = VALID
    for old, new in change if isinstance(change, list) else [change]:
        text = edit(text, old, new)
    path = write(etc, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = str(info.value)
    assert text.startswith(f"{path.resolve()}: "), text
    assert f"'{key}'" in text, text
    assert message in text, text


def test_no_profiles(etc: Path) -> None:
    text = VALID.split("[profile.default]")[0] + '[[listener]]\naddress = "0.0.0.0:5061"\n'
    path = write(etc, text)
    with pytest.raises(ConfigError, match=r"key 'profile': is required") as info:
        load_config(path)
    assert str(path.resolve()) in str(info.value)


def test_key_not_matching_certificate(etc: Path, ca: trustme.CA) -> None:
    ca.issue_cert("other.example").private_key_pem.write_to_path(str(etc / "other.key"))
    profile = ServerProfile(
        name="mismatch", certificate=etc / "certs" / "server.pem", private_key=etc / "other.key"
    )
    with pytest.raises(ConfigError, match=r"profile 'mismatch'") as info:
        server_context(profile)
    assert "other.key" in str(info.value)


def test_unusable_ca_list(etc: Path) -> None:
    (etc / "junk.pem").write_text("not a certificate\n")
    profile = ServerProfile(
        name="junk-ca",
        certificate=etc / "certs" / "server.pem",
        private_key=etc / "certs" / "server.key",
        ca_list=etc / "junk.pem",
        verify_client="on",
    )
    with pytest.raises(ConfigError, match=r"profile 'junk-ca': CA list .*junk.pem"):
        server_context(profile)


def test_bad_ciphers(etc: Path) -> None:
    profile = ServerProfile(
        name="ciphers",
        certificate=etc / "certs" / "server.pem",
        private_key=etc / "certs" / "server.key",
        ciphers="NO-SUCH-CIPHER",
    )
    with pytest.raises(ConfigError, match=r"profile 'ciphers': no usable cipher"):
        server_context(profile)
@pytest.mark.parametrize("value", ["true", "2.0"])
def test_proxy_protocol_must_be_an_integer(etc: Path, value: str) -> None:
    path = write(etc, edit(VALID, "proxy_protocol = 2", f"proxy_protocol = {value}"))
    with pytest.raises(ConfigError, match=r"kamailio\.proxy_protocol"):
        load_config(path)


def _check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tlsbridge.daemon.cli", "check", "--offline",
                           "-c", str(path)], capture_output=True, text=True, timeout=60)


def test_check_refuses_what_start_up_would(etc: Path) -> None:
    """`tlsbridge check` builds what the daemon builds: listeners with their SNI profiles and
    the client profiles, not only each server profile alone."""
    ok = _check(write(etc, VALID + '\n[client.out]\nca_list = "certs/ca.pem"\n'))
    assert ok.returncode == 0, ok.stderr
    assert "client profile out: ok" in ok.stdout
    sni = VALID.replace('address = "0.0.0.0:5061"\n',
                        'address = "0.0.0.0:5061"\nprofiles = ["strict"]\n', 1)
    sni = sni.replace('verify_client = "on"\n', 'verify_client = "on"\nserver_names = ["a.test"]\n')
    bad_sni = _check(write(etc, sni))  # openssl: SNI profiles must verify as the default does
    assert bad_sni.returncode == 2 and "verify_client" in bad_sni.stderr
    bad_client = _check(write(etc, VALID + '\n[client.out]\ngroups = "no-such-group"\n'))
    assert bad_client.returncode == 2 and "client profile 'out'" in bad_client.stderr


MOUNTS = """\
/dev/vda / ext4 rw,relatime 0 0
tmpfs /run tmpfs rw,nosuid 0 0
tmpfs /run/user/1000 tmpfs rw 0 0
/dev/vdb /srv/my\\040data xfs rw 0 0
"""


@pytest.mark.parametrize(("path", "fstype"), [
    ("/run/tlsbridge", "tmpfs"), ("/run", "tmpfs"), ("/running", "ext4"),
    ("/var/run-x/tlsbridge", "ext4"), ("/srv/my data/run", "xfs"),
])
def test_filesystem_of_a_run_dir(path: str, fstype: str) -> None:
    assert kamcheck.filesystem_of(Path(path), MOUNTS) == fstype


def test_check_warns_when_the_facts_map_would_live_on_a_disk(etc: Path) -> None:
    config = load_config(write(etc, VALID.replace('run_dir = "run"', 'run_dir = "/run/tb"')))
    assert kamcheck.check_run_dir(config, MOUNTS)[0] == "ok"
    on_disk = load_config(write(etc, VALID.replace('run_dir = "run"', 'run_dir = "/srv/tb"')))
    level, message = kamcheck.check_run_dir(on_disk, MOUNTS)
    assert level == "warning" and "ext4" in message and "/run" in message


FULL = VALID + """
[limits]
max_connections = 10

[outbound]
idle_timeout = 60.0

[metrics]
listen = "127.0.0.1:9461"

[client.default]
ca_list = "certs/ca.pem"

[trunk.carrier]
address = "127.0.0.1:5071"
"""


@pytest.mark.parametrize(("table", "after"), [
    ("daemon", 'log_level = "debug"\n'),
    ("kamailio", "proxy_protocol = 2\n"),
    ("zmq", "events_hwm = 5000\n"),
    ("profile.default", 'alpn = ["sip"]\n'),
    ("listener[0]", 'address = "0.0.0.0:5061"\n'),
    ("limits", "max_connections = 10\n"),
    ("outbound", "idle_timeout = 60.0\n"),
    ("metrics", 'listen = "127.0.0.1:9461"\n'),
    ("client.default", 'ca_list = "certs/ca.pem"\n\n[trunk'),
    ("trunk.carrier", 'address = "127.0.0.1:5071"\n'),
])
def test_a_misspelt_key_is_refused_in_every_table(etc: Path, table: str, after: str) -> None:
    load_config(write(etc, FULL))  # the file is valid without the typo
    typo = "handshake_timeot = 3.0\n"
    text = edit(FULL, after, after.replace("\n", "\n" + typo, 1))
    with pytest.raises(ConfigError) as err:
        load_config(write(etc, text))
    assert str(etc / "tlsbridge.toml") in str(err.value)
    assert f"'{table}.handshake_timeot'" in str(err.value)


def test_an_unknown_table_is_refused(etc: Path) -> None:
    with pytest.raises(ConfigError, match=r"key 'kamalio': unknown key"):
        load_config(write(etc, VALID + "\n[kamalio]\nhairpin = '127.0.0.1:5062'\n"))
