"""Fixtures that run the real Kamailio (Debian's, with app_python3) and the real daemon."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.procs import (
    CFG,
    Daemon,
    EventTap,
    Kamailio,
    free_tcp_udp_port,
    write_bridge_config,
)
from tests.support.requirements import all_engines, engine_param

pytestmark = pytest.mark.integration

# Kamailio is found on PATH or in /usr/sbin (tests/support/requirements.py); a test marked
# `integration` fails without it (tests/conftest.py), unless TLSBRIDGE_TEST_ALLOW_MISSING=1.


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("certs")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    ca.cert_pem.write_to_path(d / "ca.pem")
    server.cert_chain_pems[0].write_to_path(d / "server.pem")
    server.private_key_pem.write_to_path(d / "server.key")
    return {"ca": d / "ca.pem", "cert": d / "server.pem", "key": d / "server.key"}


@dataclass
class Stack:
    kamailio: Kamailio | None
    daemon: Daemon
    events: EventTap
    tls_port: int
    sip_port: int
    hairpin_port: int
    ca: str

    @property
    def tls_addr(self) -> tuple[str, int]:
        return ("127.0.0.1", self.tls_port)


def base_engine(variant: str) -> str:
    """The TLS engine of an engine variant ("openssl-x2", "openssl-native": openssl)."""
    return variant.partition("-x")[0].partition("-native")[0]


def start_stack(
    workdir: Path, certs: dict[str, Path], *, with_kamailio: bool = True, extra: str = "",
    engine: str = "openssl", listener_extra: str = "", daemon_extra: str = "",
    handshake_timeout: float = 5.0,
    kamailio_args: Sequence[str] = (), kamailio_extra: str = "",
) -> Stack:
    tls_port, sip_port, hairpin_port = (free_tcp_udp_port() for _ in range(3))
    engine, native, _ = engine.partition("-native")
    engine, _, workers = engine.partition("-x")
    routing: dict[str, Any] = {}
    if native:  # the native cfg routes of routing-native.cfg, calling the bridge by python_exec
        routing = {"script": CFG / "tlsbridge_native.py",
                   "extra_args": ("-A", "WITH_NATIVE_ROUTING")}
    kam_kw = {**routing, "extra_args": (*routing.get("extra_args", ()), *kamailio_args)}
    config = write_bridge_config(
        workdir / "tlsbridge.toml", tls_port=tls_port, hairpin_port=hairpin_port,
        sip_port=sip_port,
        certs=certs, run_dir=workdir, extra=extra, engine=engine, listener_extra=listener_extra,
        workers=int(workers or 1), daemon_extra=daemon_extra, kamailio_extra=kamailio_extra,
        handshake_timeout=handshake_timeout,
    )
    kamailio = None
    daemon = None
    try:
        if with_kamailio:
            kamailio = Kamailio(workdir, sip_port=sip_port, hairpin_port=hairpin_port,
                                tls_port=tls_port, bridge_config=config, **kam_kw)
        daemon = Daemon(workdir, config)
        daemon.wait_ready()
        if kamailio:
            kamailio.wait_ready()
            daemon.wait_subscribed()  # Kamailio's rtimer takes the outcomes of connects
        events = EventTap(daemon.settings.events_endpoint)
    except BaseException:
        for proc in (daemon, kamailio):
            if proc is not None:
                print(f"--- {proc.name} log ---\n{proc.tail()}")
                proc.stop()
        raise
    return Stack(kamailio, daemon, events, tls_port, sip_port, hairpin_port, str(certs["ca"]))


def stop_stack(stack: Stack) -> None:
    """Stops both, the daemon first; then Kamailio, whose stop fails if its log shows an
    exception escaped from Python (tests/support/procs.py)."""
    stack.events.close()
    try:
        stack.daemon.stop()
    finally:
        if stack.kamailio:
            stack.kamailio.stop()


# Every engine is collected, loadable here or not: one that does not load fails its tests
# (tests/support/requirements.py), instead of silently dropping out of the suite.
ENGINES = [engine_param(name) for name in all_engines()]
# "openssl-x2": the openssl engine with a supervisor and two worker processes;
# "openssl-native": Kamailio routing in native cfg (routing-native.cfg) instead of KEMI.
VARIANTS = [*ENGINES, engine_param("openssl", "openssl-x2", id="openssl-x2"),
            engine_param("openssl", "openssl-native", id="openssl-native")]


@pytest.fixture(scope="module", params=VARIANTS)
def engine(request: pytest.FixtureRequest) -> str:
    """Every integration module runs once per TLS engine available here, and once with
    several worker processes."""
    return request.param


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, certs: dict[str, Path], engine: str
) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp(f"stack-{engine}"), certs, engine=engine)
    yield s
    stop_stack(s)


@pytest.fixture
def logs_on_failure(request: pytest.FixtureRequest, stack: Stack) -> Iterator[None]:
    yield
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        for proc in (stack.daemon, stack.kamailio):
            if proc is not None:
                print(f"--- {proc.name} log ---\n{proc.tail(80)}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep
