"""Interop with coturn: our codec reads its RFC 5780 responses, and `meshd netcheck` gives the
same verdict against coturn as against `meshd server`."""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Callable

from meshd.stun.codec import (
    ChangeRequest,
    MessageClass,
    Method,
    OtherAddress,
    ResponseOrigin,
    StunMessage,
    XorMappedAddress,
    encode_message,
    parse_message,
)

MeshdCli = Callable[..., subprocess.CompletedProcess[str]]
VERDICT_KEYS = ("nat", "mapping", "filtering", "nat_type", "hairpin", "port_preserved")


def ask(server: tuple[str, int], *attributes: ChangeRequest) -> tuple[StunMessage,
                                                                      tuple[str, int]]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(5)
        request = StunMessage(MessageClass.REQUEST, Method.BINDING, b"interop-test", attributes,
                              fingerprint=True)
        sock.sendto(encode_message(request), server)
        data, source = sock.recvfrom(2048)
        msg = parse_message(data)
        assert msg.get(XorMappedAddress) == XorMappedAddress(sock.getsockname())
        return msg, source


def test_coturn_speaks_rfc5780_to_our_codec(coturn: tuple[str, int]) -> None:
    msg, source = ask(coturn)
    assert msg.message_class is MessageClass.SUCCESS
    assert msg.fingerprint  # coturn's FINGERPRINT checks out with our CRC
    other = msg.get(OtherAddress)
    assert other is not None, "coturn sent no OTHER-ADDRESS: not in RFC 5780 mode"
    assert other.address[0] == "127.0.0.2"
    assert other.address[1] != coturn[1]
    msg, source = ask(coturn, ChangeRequest(change_ip=True, change_port=True))
    assert source == other.address
    assert msg.get(ResponseOrigin) == ResponseOrigin(other.address)


def test_netcheck_against_coturn_matches_ours(
    coturn: tuple[str, int], meshd_server: tuple[str, int], meshd_cli: MeshdCli
) -> None:
    results = []
    for server in (coturn, meshd_server):
        done = meshd_cli("netcheck", "--server", f"{server[0]}:{server[1]}", "--json")
        assert done.returncode == 0, done.stderr
        results.append(json.loads(done.stdout))
    theirs, ours = results
    assert {k: theirs[k] for k in VERDICT_KEYS} == {k: ours[k] for k in VERDICT_KEYS}
    assert (ours["nat"], ours["mapping"], ours["filtering"], ours["nat_type"]) == (
        False, "endpoint-independent", "endpoint-independent", "public"
    )
    assert theirs["notes"] == []
