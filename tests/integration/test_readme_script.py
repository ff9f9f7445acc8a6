"""The routing script README shows under "Writing your own routing script" works as printed."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import Stack, start_stack, stop_stack
from tests.support.procs import ROOT, Kamailio
from tests.support.sip import TlsUA, UdpUA
from tests.support.ua import SipUA

pytestmark = [pytest.mark.integration]


def readme_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Writing your own routing script"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)  # type: ignore[union-attr]


@pytest.fixture(scope="module")
def readme_stack(tmp_path_factory: pytest.TempPathFactory,
                 certs: dict[str, Path]) -> Iterator[Stack]:
    d = tmp_path_factory.mktemp("readme")
    stack = start_stack(d, certs, with_kamailio=False)
    script = readme_script().replace("/etc/tlsbridge/tlsbridge.toml", str(stack.daemon.config))
    # Where a package install would put tlsbridge, the test's venv has it.
    prelude = (f"import site\nsite.addsitedir({sys.prefix!r} + "
               f"'/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages')\n")
    (d / "readme_routing.py").write_text(prelude + script)
    stack.kamailio = Kamailio(d, sip_port=stack.sip_port, hairpin_port=stack.hairpin_port,
                              tls_port=stack.tls_port, bridge_config=stack.daemon.config,
                              script=d / "readme_routing.py")
    try:
        stack.kamailio.wait_ready_registrar()
    except BaseException:
        print(stack.kamailio.tail())
        stop_stack(stack)
        raise
    yield stack
    stop_stack(stack)


def test_readme_script_serves_a_call_from_udp_to_tls(readme_stack: Stack) -> None:
    stack = readme_stack
    alice = SipUA("readme-alice", domain="localhost", proxy=stack.tls_addr,
                  tls=TlsUA(*stack.tls_addr, ca=stack.ca))
    bob = SipUA("readme-bob", domain="localhost", proxy=("127.0.0.1", stack.sip_port),
                udp=UdpUA())
    try:
        assert alice.register().status == 200
        d_bob = bob.invite(f"sip:readme-alice@127.0.0.1:{stack.sip_port}")
        d_alice, invite = alice.answer()
        assert any("transport=tls" in rr for rr in invite.get_all("Record-Route"))
        bob.wait_answer(d_bob)
        alice.expect(method="ACK")
        alice.bye(d_alice)
        bob.take_bye()
        assert alice.expect(status=200).get("CSeq").endswith("BYE")
    finally:
        alice.close()
        bob.close()
