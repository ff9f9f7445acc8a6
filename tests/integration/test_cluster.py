"""Two Kamailio + tlsbridge nodes in network namespaces of their own, sharing registrations with
Kamailio's DMQ (dmq_usrloc) and reaching each other's TLS phones by Path (docs/cluster.md).

    root namespace: the phones (10.X.0.100)   node A: 10.X.0.1     node B: 10.X.0.2
    one bridge between them; each node's hairpin on its own loopback (127.0.0.11 / .12)
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from tests.integration.test_routing import call, hang_up, uniq
from tests.support.procs import CFG, Daemon, Kamailio, wait_until
from tests.support.sip import TlsUA, UdpUA, build_request
from tests.support.ua import SipUA

pytestmark = pytest.mark.integration


def ip(*args: str, ns: str | None = None) -> None:
    argv = ["ip", *(["-n", ns] if ns else []), *args]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    assert out.returncode == 0, f"{' '.join(argv)}: {out.stderr}"


@dataclass
class Lan:
    """A switch namespace with a bridge, node namespaces, and a leg in the root namespace."""

    suffix: str
    net: str  # "10.X.0"

    @property
    def phones_ip(self) -> str:
        return f"{self.net}.100"

    def ns(self, node: str) -> str:
        return f"tlsb{node}{self.suffix}"


@pytest.fixture(scope="module")
def lan() -> Iterator[Lan]:
    if os.geteuid() != 0:
        pytest.fail("the cluster test makes network namespaces: run it as root (CI does)")
    suffix = f"{os.getpid() % 10000}{random.randrange(100)}"
    lan = Lan(suffix, f"10.{random.randrange(200, 250)}.{random.randrange(1, 250)}")
    sw = lan.ns("sw")
    made = []
    try:
        for node in ("sw", "a", "b"):
            ip("netns", "add", lan.ns(node))
            made.append(lan.ns(node))
        ip("link", "add", "br0", "type", "bridge", ns=sw)
        ip("link", "set", "br0", "up", ns=sw)
        for leg, address in (("r", 100), ("a", 1), ("b", 2)):
            outer, inner = f"tlsb{leg}{lan.suffix}", f"tlsp{leg}{lan.suffix}"
            ip("link", "add", outer, "type", "veth", "peer", "name", inner)
            ip("link", "set", inner, "netns", sw)
            ip("link", "set", inner, "master", "br0", ns=sw)
            ip("link", "set", inner, "up", ns=sw)
            where = None if leg == "r" else lan.ns(leg)
            if where:
                ip("link", "set", outer, "netns", where)
                ip("link", "set", "lo", "up", ns=where)
            ip("addr", "add", f"{lan.net}.{address}/24", "dev", outer, ns=where)
            ip("link", "set", outer, "up", ns=where)
        yield lan
    finally:
        # The veth pairs go with the namespaces that hold one of their ends.
        for name in reversed(made):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=10)


@dataclass
class Node:
    name: str
    ip: str
    kamailio: Kamailio
    daemon: Daemon
    workdir: Path

    @property
    def tls(self) -> tuple[str, int]:
        return (self.ip, 5061)

    @property
    def sip(self) -> tuple[str, int]:
        return (self.ip, 5060)

    def stop(self) -> None:
        for proc in (self.kamailio, self.daemon):
            proc.stop()

    def knows(self, aor_user: str) -> bool:
        out = self.kamailio.kamcmd("ul.lookup", "location", aor_user)
        return "Contact" in out or "Address" in out


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def start_node(lan: Lan, name: str, number: int, peer: int, workdir: Path,
               ca: trustme.CA, routing: str) -> Node:
    address = f"{lan.net}.{number}"
    cert = ca.issue_cert(address)
    cert.cert_chain_pems[0].write_to_path(str(workdir / "server.pem"))
    cert.private_key_pem.write_to_path(str(workdir / "server.key"))
    hairpin = f"127.0.0.1{number}"
    config = workdir / "tlsbridge.toml"
    config.write_text(f"""
[daemon]
run_dir = "{workdir}"
log_level = "debug"

[kamailio]
hairpin = "{hairpin}:5062"
source_ip = "{hairpin}"
sip_address = "{address}:5060"
cluster = true

[[listener]]
address = "{address}:5061"
profile = "default"

[profile.default]
certificate = "{workdir / 'server.pem'}"
private_key = "{workdir / 'server.key'}"
""")
    prefix = ("ip", "netns", "exec", lan.ns(name))
    daemon = Daemon(workdir, config, prefix=prefix)
    native = ("-A", "WITH_NATIVE_ROUTING") if routing == "native" else ()
    kamailio = Kamailio(
        workdir, sip_port=5060, hairpin_port=5062, tls_port=5061, bridge_config=config,
        prefix=prefix, script=CFG / ("tlsbridge_native.py" if native else "routing.py"),
        extra_args=(
            "-A", f"SIP_IP={address}", "-A", f"HAIRPIN_IP={hairpin}", "-A", f"TLS_IP={address}",
            "-A", "WITH_CLUSTER", "-A", f'DMQ_ADDRESS="sip:{address}:5060"',
            "-A", f'DMQ_NOTIFY="sip:{lan.net}.{peer}:5060"', *native))
    node = Node(name, address, kamailio, daemon, workdir)
    try:
        daemon.wait_ready()
        ua = UdpUA(lan.phones_ip)
        try:
            def answers() -> bool:
                if not kamailio.alive():
                    raise RuntimeError(f"kamailio {name} exited:\n{kamailio.tail()}")
                ua.send(build_request("OPTIONS", f"sip:{address}:5060", via_proto="UDP",
                                      local=ua.local), node.sip)
                try:
                    return ua.read(0.3).status == 200
                except OSError:
                    return False
            wait_until(answers, 20, f"node {name} to answer OPTIONS")
        finally:
            ua.close()
    except BaseException:
        node.stop()
        raise
    return node


@dataclass
class Cluster:
    a: Node
    b: Node
    ca: Path


@pytest.fixture(scope="module", params=["kemi", "native"])
def cluster(lan: Lan, ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory,
            request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """Both nodes route with the reference KEMI script, or its native cfg twin."""
    ca_file = tmp_path_factory.mktemp("cluster-ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    made: list[Node] = []
    try:
        for name, number, peer in (("a", 1, 2), ("b", 2, 1)):
            made.append(start_node(lan, name, number, peer,
                                   tmp_path_factory.mktemp(f"node-{name}"), ca, request.param))
        yield Cluster(made[0], made[1], ca_file)
    finally:
        for node in made:
            print(f"--- node {node.name} kamailio ---\n{node.kamailio.tail(30)}")
            node.stop()


class TlsPhone(SipUA):
    """Its Contact's user part is not its AOR's, as many phones do: another node cannot
    find it by the Contact alone, only by the Path of its registration."""

    @property
    def contact(self) -> str:
        host, port = self.local
        return f"sip:c{self.user[::-1]}@{host}:{port};transport=tls"


def tls_phone(lan: Lan, cluster: Cluster, node: Node, user: str) -> SipUA:
    return TlsPhone(user, domain=f"{node.ip}:5060", proxy=node.tls,
                    tls=TlsUA(*node.tls, ca=str(cluster.ca), server_hostname=node.ip,
                              source=lan.phones_ip))


def udp_phone(lan: Lan, node: Node, user: str) -> SipUA:
    return SipUA(user, domain=f"{node.ip}:5060", proxy=node.sip, udp=UdpUA(lan.phones_ip))


def test_calls_reach_a_tls_phone_over_the_node_that_holds_its_connection(
        lan: Lan, cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    tls = tls_phone(lan, cluster, a, uniq("tina"))
    udp = udp_phone(lan, b, uniq("ugo"))
    try:
        assert tls.register().status == 200
        assert udp.register().status == 200
        wait_until(lambda: b.knows(tls.user) and a.knows(udp.user), 10,
                   "both nodes to know both registrations (DMQ)")
        # The UDP phone calls through B: B routes to A (Path), A over its hairpin.
        d_udp, d_tls, msgs = call(udp, tls, f"sip:{tls.user}@{b.ip}:5060")
        rr = " ".join(msgs["invite"].get_all("Record-Route"))
        assert f"sip:{a.ip}:5061;transport=tls;" in rr and f"sip:{b.ip}:5060;" in rr, rr
        assert "received=" not in " ".join(msgs["invite"].get_all("Route") or []), msgs["invite"]
        hang_up(tls, d_tls, udp)
        d_udp, d_tls, _ = call(udp, tls, f"sip:{tls.user}@{b.ip}:5060")
        hang_up(udp, d_udp, tls)
        # The reverse: the TLS phone calls the UDP phone registered at B, through A.
        d_tls, d_udp, _ = call(tls, udp, f"sip:{udp.user}@{a.ip}:5060")
        hang_up(udp, d_udp, tls)
        d_tls, d_udp, _ = call(tls, udp, f"sip:{udp.user}@{a.ip}:5060")
        hang_up(tls, d_tls, udp)
    finally:
        tls.close()
        udp.close()


def test_a_phone_whose_connection_is_gone_is_dialled_by_neither_node(
        lan: Lan, cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    gone = tls_phone(lan, cluster, a, uniq("gus"))
    caller = udp_phone(lan, b, uniq("cleo"))
    try:
        assert gone.register().status == 200
        wait_until(lambda: b.knows(gone.user), 10, "B to learn the registration (DMQ)")
        host, port = gone.local
        gone.tls.sock.unwrap().close()  # type: ignore[union-attr]
        peer = f"{host}:{port}"
        wait_until(lambda: not any(c["conn"]["peer"] == peer
                                   for c in a.daemon.request("list")["conns"]),
                   5, "A's daemon to close the phone's connection")
        # And A's Kamailio has dropped the hairpin: nothing of the phone is left to use.
        wait_until(lambda: f"src_port: {port}\n" not in a.kamailio.kamcmd("core.tcp_list"),
                   5, "A's Kamailio to close the hairpin")
        trap = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        trap.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        wait_until(lambda: _bind(trap, host, port), 10, "the phone's address to be free")
        trap.listen(8)
        trap.setblocking(False)
        try:
            d = caller.invite(f"sip:{gone.user}@{b.ip}:5060")
            final = caller.expect(status=477, timeout=8)
            assert final.get("Call-ID") == d.call_id
            with pytest.raises(BlockingIOError):
                trap.accept()  # neither node connected to it, in plaintext or over TLS
        finally:
            trap.close()
    finally:
        gone.close()
        caller.close()


def _bind(sock: socket.socket, host: str, port: int) -> bool:
    try:
        sock.bind((host, port))
    except OSError:
        return False
    return True


def test_when_a_node_stops_its_phone_re_registers_at_the_other(
        lan: Lan, cluster: Cluster) -> None:
    a, b = cluster.a, cluster.b
    tls = tls_phone(lan, cluster, a, uniq("remy"))
    udp = udp_phone(lan, b, uniq("vera"))
    try:
        assert tls.register().status == 200
        wait_until(lambda: b.knows(tls.user), 10, "B to learn the registration (DMQ)")
        a.stop()
        tls.close()
        # Its client retries: a new connection to B, the same AOR.
        tls = tls_phone(lan, cluster, b, tls.user)
        assert tls.register().status == 200
        d_udp, _, _ = call(udp, tls, f"sip:{tls.user}@{b.ip}:5060")
        hang_up(udp, d_udp, tls)
    finally:
        tls.close()
        udp.close()
