"""daemon/tlscfg/: Kamailio's tls.cfg read as Kamailio reads it, converted to a TOML that
load_config accepts, with a warning for everything that does not carry over."""

from __future__ import annotations

import datetime
import io
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from hypothesis import given, settings
from hypothesis import strategies as st

from tlsbridge.daemon.config import Config, ConfigError, load_config
from tlsbridge.daemon.tlscfg import (
    ConversionResult,
    TlsCfgError,
    convert,
    main_import,
    parse_tls_cfg,
    read_tls_cfg,
)

DATA = Path(__file__).resolve().parents[1] / "data" / "tlscfg"
BOTH = ("TLSv1.2", "TLSv1.3")


@pytest.fixture(scope="module")
def pems() -> dict[str, bytes]:
    """One CA, a leaf certificate and key, and an empty CRL, as PEM."""
    ca = trustme.CA()
    leaf = ca.issue_cert("sip.example.com")
    ca_key: Any = serialization.load_pem_private_key(ca.private_key_pem.bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    now = datetime.datetime.now(datetime.UTC)
    crl = (x509.CertificateRevocationListBuilder().issuer_name(ca_cert.subject)
           .last_update(now).next_update(now + datetime.timedelta(days=1))
           .sign(ca_key, hashes.SHA256()))
    return {"cert": leaf.cert_chain_pems[0].bytes(), "key": leaf.private_key_pem.bytes(),
            "ca": ca.cert_pem.bytes(), "crl": crl.public_bytes(serialization.Encoding.PEM)}


def materialize(toml_text: str, base: Path, pems: dict[str, bytes]) -> None:
    """Create every file the converted TOML refers to (a shared path gets every part)."""
    files: dict[Path, list[bytes]] = {}
    data = tomllib.loads(toml_text)
    for table in (*data.get("profile", {}).values(), *data.get("client", {}).values()):
        for key, part in (("certificate", "cert"), ("private_key", "key"), ("ca_list", "ca"),
                          ("crl", "crl")):
            if key in table:
                parts = files.setdefault(base / table[key], [])
                if pems[part] not in parts:
                    parts.append(pems[part])
        if "ca_path" in table:
            files.setdefault(base / table["ca_path"] / "ca.pem", [pems["ca"]])
    for path, parts in files.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"".join(parts))


def load(tmp_path: Path, pems: dict[str, bytes], name: str, text: str | None = None,
         **kw: Any) -> tuple[Config, ConversionResult]:
    """Write the tls.cfg into tmp_path, convert it, create its files, load the TOML there."""
    cfg = tmp_path / name
    if text is None:
        shutil.copy(DATA / name, cfg)
    else:
        cfg.write_text(text)
    site = {"listen_ip": "0.0.0.0", "run_dir": "run", "sip_address": "192.0.2.10:5060"}
    result = convert(cfg.read_text(), source=name, **(site | kw))
    materialize(result.toml, tmp_path, pems)
    toml = tmp_path / "tlsbridge.toml"
    toml.write_text(result.toml)
    return load_config(toml), result


def warned(result: ConversionResult, *fragments: str) -> str:
    """The one warning holding every fragment."""
    found = [w for w in result.warnings if all(f in w for f in fragments)]
    assert len(found) == 1, (fragments, result.warnings)
    return found[0]


def listeners(config: Config) -> list[tuple[str, str, tuple[str, ...]]]:
    return [(lst.address, lst.profile, lst.sni_profiles) for lst in config.listeners]


def convert_toml(text: str, **kw: Any) -> tuple[dict[str, Any], ConversionResult]:
    result = convert(text, **kw)
    return tomllib.loads(result.toml), result


# --- the examples of Kamailio's documentation ---------------------------------------------


def test_sample_tls_cfg(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, result = load(tmp_path, pems, "sample.cfg")
    base = tmp_path.resolve()
    # [server:5.6.7.8:5061] gets a listener; SNI looks at the newest profile first.
    assert listeners(config) == [
        ("5.6.7.8:5061", "kamailio_org", ("mysipserver_net", "mysipserver_org", "kamailio_org")),
    ]
    # [server:default]'s listener on 0.0.0.0:5061 would collide: left as a template.
    assert "# address = \"192.0.2.1:5061\"" in result.toml
    warned(result, "sample.cfg:8: [server:default]:", "port 5061 is taken")

    p = config.profiles
    assert set(p) == {"default", "kamailio_org", "mysipserver_org", "mysipserver_net"}
    assert p["default"].certificate == base / "kamailio-selfsigned.pem"
    assert p["default"].private_key == base / "kamailio-selfsigned.key"
    assert (p["default"].ca_list, p["default"].crl) == (base / "tls/cacert.pem",
                                                          base / "tls/crl.pem")
    assert p["default"].verify_client == "off"
    assert (p["kamailio_org"].verify_client, p["kamailio_org"].verify_depth) == ("optional", 3)
    assert p["kamailio_org"].server_names == ("kamailio.org",)
    assert p["kamailio_org"].crl == base / "tls/local_crl.pem"
    assert p["mysipserver_org"].server_names == ("mysipserver.org", "*.mysipserver.org")
    assert p["mysipserver_net"].server_names == ("*.mysipserver.net",)
    assert {(x.min_version, x.max_version) for x in p.values()} == {BOTH}

    c = config.clients
    assert set(c) == {"default", "example.sip"}  # named after server_id
    assert c["default"].verify_server is True and c["default"].ca_list is None
    assert c["default"].certificate is None
    ex = c["example.sip"]
    assert ex.destinations == ("1.2.3.4:5061",)
    assert ex.verify_server is False and ex.verify_name is None
    assert (ex.certificate, ex.private_key) == (base / "tls/example_cert.pem",
                                                base / "tls/example_key.pem")
    assert (ex.ca_list, ex.crl) == (base / "tls/example_ca.pem", base / "tls/example_crl.pem")

    warned(result, "sample.cfg:35: [server:5.6.7.8:5061] server_id:", "no effect")
    warned(result, "[server:any] server_name_mode:", "1 matches every subdomain")
    warned(result, "[server:any] server_name_mode:", "2 matches every subdomain")
    warned(result, "sample.cfg:19: [client:default] ca_list:", "system's trust store")
    warned(result, "sample.cfg:20: [client:default] verify_certificate:", "RFC 5922")
    warned(result, "[client:1.2.3.4:5061] server_id:", "with profile 'example.sip'")
    warned(result, "[client:1.2.3.4:5061] server_name:", "every connection to 1.2.3.4:5061")
    # OpenSSL keeps the first context's verification: different CRLs cannot share a listener.
    warned(result, "listener 5.6.7.8:5061: profiles mysipserver_net, mysipserver_org")


def test_documentation_example(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, result = load(tmp_path, pems, "doc_example.cfg", tls_port=5070)
    assert listeners(config) == [
        ("127.0.0.1:5061", "kamailio_org", ("kamailio_net", "kamailio_org")),
        ("0.0.0.0:5070", "default", ("kamailio_net",)),
    ]
    p = config.profiles
    assert (p["default"].verify_client, p["default"].ca_list) == ("on", tmp_path.resolve() /
                                                                  "default_ca.pem")
    assert p["kamailio_org"].verify_client == "optional"
    assert p["kamailio_net"].server_names == ("kamailio.net", "*.kamailio.net")
    assert {(x.min_version, x.max_version) for x in p.values()} == {BOTH}
    for line in (5, 19, 29, 41):  # method = TLSv1 four times
        warned(result, f"doc_example.cfg:{line}: ", "method: TLSv1 (TLS 1.0 only) cannot be")
    client = config.clients["kamailio.org"]
    assert client.destinations == ("127.0.0.1:5061",)
    assert (client.verify_server, client.verify_name) == (True, "kamailio.org")
    assert client.crl == tmp_path.resolve() / "default_crl.pem"
    warned(result, "[client:127.0.0.1:5061] verify_certificate:", "names 'kamailio.org'")
    warned(result, "listener 0.0.0.0:5070: profiles kamailio_net", "'default'")


def test_verify_client_example(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, result = load(tmp_path, pems, "verify_client.cfg")
    assert listeners(config) == [("1.2.3.4:5061", "srv_1_2_3_4_5061", ()),
                                 ("5.6.7.8:5061", "srv_5_6_7_8_5061", ())]
    p = config.profiles
    assert [(x.verify_client, x.min_version, x.max_version, x.engine) for x in p.values()] == [
        ("off", *BOTH, "openssl"),
        ("on", *BOTH, "openssl"),
        ("optional_no_ca", "TLSv1.2", "TLSv1.2", "pyopenssl"),  # Python's ssl cannot
    ]
    warned(result, "verify_client.cfg:11: [server:1.2.3.4:5061] method: TLSv1")
    # No [client:default]: Kamailio's built-in one verifies nothing, and so does the conversion.
    warned(result, "verify_client.cfg: [client:default]:", "verify_server = false")
    assert config.clients["default"].verify_server is False


def test_every_key_and_syntax(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, result = load(tmp_path, pems, "every_key.cfg")
    base = tmp_path.resolve()
    assert listeners(config) == [
        ("[2001:db8::10]:5061", "srv_2001_db8_10_5061", ()),
        ("192.0.2.10:5061", "example_com", ("example_com", "sip_example_com")),
    ]
    d = config.profiles["default"]
    assert (d.certificate, d.private_key) == (base / "certs/server cert.pem",
                                              base / "certs/server key.pem")
    assert d.private_key_password == 'se"cret'
    assert (d.ca_list, d.ca_path, d.crl) == (base / "certs/ca.pem", base / "certs/ca.d",
                                             base / "certs/crl.pem")
    assert (d.verify_client, d.verify_depth) == ("optional", 4)
    assert (d.min_version, d.max_version, d.ciphers) == ("TLSv1.2", "TLSv1.2",
                                                         "ECDHE+AESGCM:!aNULL")
    v6 = config.profiles["srv_2001_db8_10_5061"]
    # With method TLSv1.3 Kamailio gives cipher_list to SSL_CTX_set_ciphersuites().
    assert (v6.min_version, v6.max_version, v6.ciphers) == ("TLSv1.3", "TLSv1.3", None)
    assert v6.tls13_ciphersuites == "TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256"
    warned(result, "every_key.cfg:26: [server:[2001:db8::10]:5061] cipher_list:", "openssl engine")
    sip = config.profiles["sip_example_com"]
    assert (sip.verify_client, sip.server_names, sip.min_version) == (
        "on", ("sip.example.com",), "TLSv1.3")
    assert config.profiles["example_com"].server_names == ("example.com", "*.example.com")

    c = config.clients
    assert set(c) == {"default", "carrier", "ipv6_trunk"}
    assert (c["default"].verify_server, c["default"].ca_path) == (True, base / "certs/ca.d")
    assert (c["carrier"].verify_name, c["carrier"].private_key_password) == (
        "carrier.example", "pw")
    assert c["carrier"].destinations == ()  # [client:any]: chosen by name in tlsbridge
    assert (c["ipv6_trunk"].verify_server, c["ipv6_trunk"].destinations) == (
        False, ("[2001:db8::20]:5061",))

    for key, line in (("certificate2", 18), ("private_key2", 19), ("private_key_password2", 20)):
        warned(result, f"every_key.cfg:{line}: [server:default] {key}:", "not supported")
    # Kamailio takes example.com's subdomain match first; tlsbridge prefers the exact name.
    warned(result, "every_key.cfg:38: [server:192.0.2.10:5061] server_name:",
           "serves sip.example.com with [server:192.0.2.10:5061] (line 41)")
    warned(result, "[client:any] server_name:", "connect with profile 'carrier'")


@pytest.mark.parametrize("name", sorted(p.name for p in DATA.glob("*.cfg")))
def test_warnings_name_section_and_are_in_the_toml(name: str) -> None:
    result = convert((DATA / name).read_text(), source=name)
    assert result.warnings
    for warning in result.warnings:
        assert re.match(rf"{re.escape(name)}(:\d+)?: \[(server|client):[^\]]+\]", warning)
    assert result.toml.count("# warning: ") == len(result.warnings)
    lines = [int(m.group(1)) for w in result.warnings if (m := re.match(r".*?:(\d+):", w))]
    assert lines == sorted(lines)  # in file order


# --- semantics ------------------------------------------------------------------------------

SERVER = """\
[server:default]
certificate = /etc/kamailio/cert.pem
private_key = /etc/kamailio/key.pem
ca_list = /etc/kamailio/ca.pem
{extra}
[client:default]
{extra}
"""


@pytest.mark.parametrize(("keys", "mode", "warning"), [
    ({}, "off", None),
    ({"verify_certificate": "no", "require_certificate": "no"}, "off", None),
    ({"verify_certificate": "yes", "require_certificate": "no"}, "optional", None),
    ({"verify_certificate": "yes", "require_certificate": "yes"}, "on", None),
    ({"verify_certificate": "no", "require_certificate": "yes"}, "on", None),
    ({"verify_client": "optional"}, "optional", None),
    ({"verify_client": "on"}, "on", None),
    ({"verify_client": "optional_no_ca"}, "optional_no_ca", None),
    ({"verify_client": "off", "verify_cert": "1"}, "optional", "Kamailio applies both"),
    ({"verify_client": "optional_no_ca", "require_cert": "true"}, "optional_no_ca",
     "refused clients without a certificate"),
])
def test_verification(keys: dict[str, str], mode: str, warning: str | None) -> None:
    data, result = convert_toml(SERVER.format(extra="\n".join(f"{k} = {v}"
                                                              for k, v in keys.items())))
    assert data["profile"]["default"]["verify_client"] == mode
    # A client verifies for on and optional; optional_no_ca accepts any certificate.
    assert data["client"]["default"]["verify_server"] is (mode in ("on", "optional"))
    if warning:
        warned(result, "[server:default] ", warning)


@pytest.mark.parametrize(("method", "versions", "warning"), [
    ("TLSv1.2+", BOTH, None),
    ("TLSv1.2", ("TLSv1.2", "TLSv1.2"), None),
    ("tlsv1.3", ("TLSv1.3", "TLSv1.3"), None),
    ("TLSv1.3+", ("TLSv1.3", "TLSv1.3"), None),
    ("TLSv1", BOTH, "TLSv1 (TLS 1.0 only) cannot be carried over"),
    ("TLSv1.0", BOTH, "TLSv1 (TLS 1.0 only)"),
    ("TLSv1+", BOTH, "TLSv1+ (TLS 1.0 and later)"),
    ("TLSv1.0+", BOTH, "TLSv1+ (TLS 1.0 and later)"),
    ("TLSv1.1", BOTH, "TLSv1.1 (TLS 1.1 only)"),
    ("TLSv1.1+", BOTH, "TLSv1.1+ (TLS 1.1 and later)"),
    ("SSLv2", BOTH, "SSLv2 (SSLv2 only)"),
    ("SSLv3", BOTH, "SSLv3 (SSLv3 only)"),
    ("SSLv23", BOTH, "SSLv23 (every version the OpenSSL build allows"),
    (None, BOTH, "not set: Kamailio's default is TLSv1+"),
])
def test_method(method: str | None, versions: tuple[str, str], warning: str | None) -> None:
    data, result = convert_toml(SERVER.format(extra=f"method = {method}" if method else ""))
    for table in (data["profile"]["default"], data["client"]["default"]):
        assert (table["min_version"], table["max_version"]) == versions
    server = [w for w in result.warnings if "[server:default] method" in w]
    assert [warning in w for w in server] == ([True] if warning else [])


@pytest.mark.parametrize(("method", "key"), [("TLSv1.2+", "ciphers"), ("TLSv1.2", "ciphers"),
                                             ("TLSv1+", "ciphers"),
                                             ("TLSv1.3", "tls13_ciphersuites"),
                                             ("TLSv1.3+", "tls13_ciphersuites")])
def test_cipher_list(method: str, key: str) -> None:
    data, _ = convert_toml(SERVER.format(extra=f"method = {method}\ncipher_list = HIGH:!aNULL"))
    for table in (data["profile"]["default"], data["client"]["default"]):
        assert table[key] == "HIGH:!aNULL"
        assert {"ciphers", "tls13_ciphersuites"} - {key} - set(table) == {
            "ciphers", "tls13_ciphersuites"} - {key}


def test_without_any_server_profile(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, result = load(tmp_path, pems, "tls.cfg", "[client:192.0.2.7:5061]\nmethod=TLSv1.2\n")
    # Kamailio's built-in default server profile: cert.pem beside kamailio.cfg.
    assert listeners(config) == [("0.0.0.0:5061", "default", ())]
    d = config.profiles["default"]
    assert d.certificate == d.private_key == tmp_path.resolve() / "cert.pem"
    warned(result, "tls.cfg: [server:default]:", "built-in defaults")
    assert config.clients["cli_192_0_2_7_5061"].destinations == ("192.0.2.7:5061",)


def test_profiles_do_not_inherit_from_default() -> None:
    data, result = convert_toml("[server:default]\ncertificate = a.pem\nprivate_key = a.key\n"
                                "[server:192.0.2.1:5061]\nmethod = TLSv1.2+\n")
    table = data["profile"]["srv_192_0_2_1_5061"]
    assert (table["certificate"], table["private_key"]) == ("cert.pem", "cert.pem")
    warned(result, "tls.cfg:4: [server:192.0.2.1:5061] certificate:", "not the value of")


def test_any_profiles_skip_an_address_without_server_name() -> None:
    data, result = convert_toml("[server:192.0.2.1:5061]\n[server:any]\nserver_name = a.example\n",
                                tls_port=5070, listen_ip="0.0.0.0")
    assert [(x["address"], x.get("profiles")) for x in data["listener"]] == [
        ("192.0.2.1:5061", None), ("0.0.0.0:5070", ["a_example"])]
    warned(result, "[server:192.0.2.1:5061]:", "never looks at SNI")


def test_any_profile_on_no_listener() -> None:
    _, result = convert_toml("[server:192.0.2.1:5061]\n[server:any]\nserver_name = a.example\n")
    warned(result, "tls.cfg:2: [server:any]:", "offered on no listener")


def test_client_profiles_of_one_address() -> None:
    data, result = convert_toml("[client:192.0.2.1:5061]\nserver_name = a.example\n"
                                "[client:192.0.2.1:5061]\nserver_name = b.example\n")
    # Without an outbound SNI Kamailio takes the newest profile of the address.
    assert "destinations" not in data["client"]["cli_192_0_2_1_5061"]
    assert data["client"]["cli_192_0_2_1_5061_2"]["destinations"] == ["192.0.2.1:5061"]
    warned(result, "tls.cfg:2: [client:192.0.2.1:5061] server_name:", "another profile has")


def test_port_zero() -> None:
    data, result = convert_toml("[server:192.0.2.1:0]\n[client:192.0.2.2:0]\n", tls_port=5071)
    assert data["listener"][0]["address"] == "192.0.2.1:5071"
    assert data["client"]["cli_192_0_2_2_0"]["destinations"] == ["192.0.2.2:5071"]
    warned(result, "[server:192.0.2.1:0]:", "every port")
    warned(result, "[client:192.0.2.2:0]:", "every port")


def test_hairpin_and_tls_port() -> None:
    data, _ = convert_toml("[server:default]\n", hairpin="[::1]:6000", tls_port=5071,
                           listen_ip="0.0.0.0")
    assert data["kamailio"]["hairpin"] == "[::1]:6000"
    assert data["listener"] == [{"address": "0.0.0.0:5071", "profile": "default"}]
    with pytest.raises(ValueError, match="port"):
        convert("", hairpin="127.0.0.1")
    with pytest.raises(ValueError, match="tls_port"):
        convert("", tls_port=0)


def test_paths() -> None:
    result = convert("[server:default]\ncertificate = /etc/k/cert.pem\nprivate_key = /etc/k/k\n")
    assert "Relative paths" not in result.toml
    data, result = convert_toml("[server:default]\ncertificate = ./cert.pem\n"
                                "private_key = /engine:pkcs11:token=x\n")
    assert "Relative paths are kept as written in tls.cfg" in result.toml
    assert data["profile"]["default"]["certificate"] == "./cert.pem"
    warned(result, "tls.cfg:2: [server:default] certificate:", "working directory")
    warned(result, "tls.cfg:3: [server:default] private_key:", "HSM")


def test_dropped_keys() -> None:
    data, result = convert_toml("[server:default]\nserver_name = x.example\nserver_id = x\n"
                                "[client:default]\nserver_name = y.example\nserver_id = y\n"
                                "[client:any]\nserver_name = z.example\nserver_name_mode = 1\n")
    assert "server_names" not in data["profile"]["default"]
    assert "verify_name" not in data["client"]["default"]
    warned(result, "tls.cfg:2: [server:default] server_name:", "never matches")
    warned(result, "tls.cfg:3: [server:default] server_id:", "no effect")
    warned(result, "tls.cfg:5: [client:default] server_name:", "never matched")
    warned(result, "tls.cfg:9: [client:any] server_name_mode:", "not supported")


def test_values_survive_toml_quoting() -> None:
    data, _ = convert_toml('[server:default]\ncertificate = "a \\"b\\" \\\\ \\t c.pem"\n'
                           'private_key = "k#é.pem"\npkey_password = x\\ y\\#z#c\n')
    table = data["profile"]["default"]
    assert (table["certificate"], table["private_key"]) == ('a "b" \\ \t c.pem', "k#é.pem")
    assert table["private_key_password"] == "x y#z"


def test_a_key_set_twice() -> None:
    data, result = convert_toml("[server:default]\nmethod = TLSv1.2\ntls_method = TLSv1.3\n")
    assert data["profile"]["default"]["min_version"] == "TLSv1.3"
    warned(result, "tls.cfg:3: [server:default] method:", "set again (line 2 is overridden)")


def test_parse_model() -> None:
    cfg = parse_tls_cfg("[C:[::FFFF:0:1]:5061]\nSERVER_ID = a\n[Srv:ALL]\nserver_name=s\n",
                        source="x.cfg")
    assert [(s.role, s.kind, s.host, s.port, s.line, s.title) for s in cfg.sections] == [
        ("client", "address", "::ffff:0:1", 5061, 1, "[client:[::ffff:0:1]:5061]"),
        ("server", "any", None, None, 3, "[server:any]"),
    ]
    setting = cfg.sections[0].settings["server_id"]
    assert (setting.spelling, setting.value, setting.line) == ("SERVER_ID", "a", 2)


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "line", "column", "message"), [
    ("[server:default]\nfoo = bar\n", 2, 1, "unsupported option 'foo'"),
    ("# c\nmethod = TLSv1.2\n", 2, 1, "before the first"),
    ("[proxy:default]\n", 1, 2, "invalid TLS profile type 'proxy'"),
    ("[server default]\n", 1, 9, "':' after the profile type expected"),
    ("[server:default\n", 1, 16, "']' closing the section header expected"),
    ("[server:default] x\n", 1, 18, "end of line expected"),
    ("\n\n[server:sip.example.com:5061]\n", 3, 9, "invalid IPv4 address"),
    ("[server:1.2.3.256:5061]\n", 1, 9, "invalid IPv4 address"),
    ("[server:*]\n", 1, 9, "IP address, 'default' or 'any' expected"),
    ("[server:1.2.3.4]\n", 1, 16, "':' and a port after the address expected"),
    ("[server:1.2.3.4:70000]\n", 1, 17, "invalid port '70000'"),
    ("[server:[2001:db8::zz::1]:5061]\n", 1, 9, "invalid IPv6 address"),
    ("[server:default]\nmethod = TLSv9\n", 2, 10, "invalid method 'TLSv9'"),
    ("[server:default]\nverify_certificate = maybe\n", 2, 22, "invalid boolean 'maybe'"),
    ("[server:default]\nverify_client = sometimes\n", 2, 17, "invalid verify_client"),
    ("[server:default]\nverify_depth = three\n", 2, 16, "invalid integer 'three'"),
    ("[server:default]\nverify_depth = -1\n", 2, 16, "invalid integer value '-'"),
    ("[server:default]\ncertificate = a b\n", 2, 17, "end of line expected, got 'b'"),
    ("[server:default]\ncertificate =\n", 2, 14, "value of 'certificate' missing"),
    ("[server:default]\ncertificate\n", 2, 12, "'=' after 'certificate' expected"),
    ('[server:default]\ncertificate = "a\n\n', 4, 1, "missing closing quote"),
    ("[server:default]\ncertificate = a~b\n", 2, 16, "invalid character '~'"),
    ("[server:default]\ncertificate = a\\q\n", 2, 17, "unsupported escape character 'q'"),
    ('[server:default]\ncertificate = "a\\#"\n', 2, 18, "unsupported escape character '#'"),
    ("[server:default]\ncertificate = " + "a" * 513 + "\n", 2, 15, "longer than 512"),
    ("[server:default]\n[client:default]\n[server:def]\n", 3, 0,
     "[server:default]: duplicate profile (first at tls.cfg:1)"),
    ("[server:any]\nmethod = TLSv1.2\n", 1, 0, "[server:any]: needs a server_name"),
    ("[server:1.2.3.4:5061]\nserver_name = a\n[server:1.2.3.4:5061]\n", 3, 0,
     "duplicate profile for this address (also at tls.cfg:1)"),
])
def test_errors(text: str, line: int, column: int, message: str) -> None:
    with pytest.raises(TlsCfgError) as info:
        convert(text)
    err = info.value
    assert message in err.message
    assert (err.line, err.column) == (line, column)
    where = f"tls.cfg:{line}:{column}: " if column else f"tls.cfg:{line}: "
    assert str(err).startswith(where)


def test_comments_and_continuations() -> None:
    cfg = parse_tls_cfg("# a comment \\\n still the comment\n[server:default] # here too\n"
                        "cipher_list = HIGH:\\\n!aNULL\n\\\n\n\r\n")
    assert cfg.sections[0].line == 3
    assert cfg.sections[0].get("cipher_list") == "HIGH:!aNULL"


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list('[]:=#"\\ \t\n.+-_*serverclntdfaymo0125~é')),
               max_size=60) | st.text(max_size=40))
def test_any_text_parses_or_fails_cleanly(text: str) -> None:
    try:
        cfg = parse_tls_cfg(text)
    except TlsCfgError as exc:
        assert exc.line >= 1
        return
    convert(text)  # whatever parses converts
    assert all(s.line >= 1 for s in cfg.sections)


# --- the CLI hook -----------------------------------------------------------------------------


def test_main_import(tmp_path: Path) -> None:
    path = tmp_path / "tls.cfg"
    shutil.copy(DATA / "sample.cfg", path)
    out, err = io.StringIO(), io.StringIO()
    assert main_import(str(path), out, err) == 0
    assert tomllib.loads(out.getvalue())["listener"][0]["address"] == "5.6.7.8:5061"
    lines = err.getvalue().splitlines()
    assert lines and all(x.startswith(f"warning: {path}:") for x in lines)


def test_main_import_errors(tmp_path: Path) -> None:
    path = tmp_path / "tls.cfg"
    path.write_text("[server:default]\nmethod = TLSv1.2\nverify_cert = perhaps\n")
    out, err = io.StringIO(), io.StringIO()
    assert main_import(str(path), out, err) == 2
    assert out.getvalue() == ""
    assert err.getvalue() == (f"error: {path}:3:15: invalid boolean 'perhaps' for "
                              "'verify_cert'; one of: yes, true, enable, enabled, 1, on, no, "
                              "false, disable, disabled, 0, off\n")
    err = io.StringIO()
    assert main_import(str(tmp_path / "missing.cfg"), out, err) == 2
    assert err.getvalue().startswith("error: cannot read ") and "No such file" in err.getvalue()


def test_main_import_directory(tmp_path: Path) -> None:
    (tmp_path / "tls.d").mkdir()
    (tmp_path / "tls.d/10-server.cfg").write_text("[server:default]\nmethod = TLSv1.2+\n")
    (tmp_path / "tls.d/20-client.cfg").write_text("[client:default]\nverify_cert = yes\n"
                                                   "[server:def]\n")
    with pytest.raises(TlsCfgError, match=r"20-client\.cfg:3: \[server:default\]: duplicate"):
        read_tls_cfg(tmp_path / "tls.d")
    (tmp_path / "tls.d/20-client.cfg").write_text("[client:default]\nverify_cert = yes\n")
    out, err = io.StringIO(), io.StringIO()
    assert main_import(str(tmp_path / "tls.d"), out, err) == 0
    data = tomllib.loads(out.getvalue())
    assert data["client"]["default"]["verify_server"] is True
    assert "directory order" in err.getvalue()
    assert f"{tmp_path}/tls.d/20-client.cfg:2: [client:default]" in err.getvalue()


def test_what_tls_cfg_does_not_say_is_a_placeholder_check_refuses(
        tmp_path: Path, pems: dict[str, bytes]) -> None:
    text = "[server:default]\ncertificate = certs/server.pem\nprivate_key = certs/server.key\n"
    toml = convert(text).toml
    materialize(toml, tmp_path, pems)
    path = tmp_path / "tlsbridge.toml"
    # Refused one by one, in the order the loader reads them, until each is set.
    for key, value in (("daemon.run_dir", "run"), ("listener[0].address", "127.0.0.1:5061"),
                       ("kamailio.sip_address", "192.0.2.10:5060")):
        path.write_text(toml)
        with pytest.raises(ConfigError, match=rf"key '{re.escape(key)}': a placeholder"):
            load_config(path)
        name = key.rpartition(".")[2]
        toml = re.sub(rf'^{name} = "<set me:[^"]*"', f'{name} = "{value}"', toml, flags=re.M)
    path.write_text(toml)
    load_config(path)


def test_options_fill_the_site(tmp_path: Path, pems: dict[str, bytes]) -> None:
    config, _ = load(tmp_path, pems, "x.cfg", "[server:default]\ncertificate = certs/server.pem\n"
                     "private_key = certs/server.key\n", listen_ip="127.0.0.1", tls_port=5071,
                     run_dir="rundir", sip_address="127.0.0.1:5070")
    assert [lst.address for lst in config.listeners] == ["127.0.0.1:5071"]
    assert config.run_dir == (tmp_path / "rundir").resolve()


def test_missing_certificate_files_are_warned(tmp_path: Path) -> None:
    cfg = tmp_path / "tls.cfg"
    cfg.write_text("[server:default]\nprivate_key = /etc/kamailio/none.key\n"
                   "certificate = missing.pem\n")
    out, err = io.StringIO(), io.StringIO()
    assert main_import(str(cfg), out, err) == 0
    assert f"certificate: file {tmp_path / 'missing.pem'} does not exist" in err.getvalue()
    assert "private_key: file /etc/kamailio/none.key does not exist" in err.getvalue()


SNI_VERIFY = """\
[server:default]
certificate = certs/server.pem
private_key = certs/server.key
[server:127.0.0.1:5061]
certificate = certs/server.pem
private_key = certs/server.key
ca_list = certs/ca.pem
verify_certificate = yes
require_certificate = yes
server_name = secure.example.com
[server:127.0.0.1:5061]
certificate = certs/server.pem
private_key = certs/server.key
server_name = www.example.com
"""


def test_profiles_that_verify_by_sni_get_an_engine_that_can(
        tmp_path: Path, pems: dict[str, bytes]) -> None:
    from tlsbridge.daemon.server import build_factories

    config, _ = load(tmp_path, pems, "sni.cfg", SNI_VERIFY)
    (lst,) = [x for x in config.listeners if x.sni_profiles]
    assert lst.engine == "pyopenssl"
    build_factories(config)  # what `tlsbridge check` and start-up build: accepted


def test_profiles_no_engine_can_switch_by_sni_are_refused_with_the_reason() -> None:
    text = SNI_VERIFY.replace("server_name = secure", "method = TLSv1.3\nserver_name = secure")
    assert text != SNI_VERIFY
    with pytest.raises(TlsCfgError, match=r"no engine can switch the profiles of 127.0.0.1:5061 "
                       r"by SNI.*\(openssl min_version, verify_client; pyopenssl min_version; "
                       r"gnutls min_version\)"):
        convert(text)
