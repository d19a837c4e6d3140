"""meshd.stun.server: the sans-I/O Binding server core."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.stun.codec import (
    Attribute,
    AttrType,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    Method,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    StunMessage,
    UnknownAttribute,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.stun.server import ServerAddresses, StunServer
from meshd.udp import Address, Transmit

P, A = "198.51.100.1", "198.51.100.2"
FULL = ServerAddresses(P, 3478, 3479, A)
SINGLE = ServerAddresses(P, 3478, 3479)
CLIENT: Address = ("203.0.113.7", 40001)
TXID = bytes(range(12))


def request(*attributes: Attribute, method: int = Method.BINDING,
            message_class: MessageClass = MessageClass.REQUEST) -> bytes:
    return encode_message(StunMessage(message_class, method, TXID, attributes))


def one(transmits: list[Transmit]) -> tuple[Transmit, StunMessage]:
    assert len(transmits) == 1
    msg = parse_message(transmits[0].data)
    assert msg.transaction_id == TXID
    assert msg.fingerprint  # every response carries FINGERPRINT
    return transmits[0], msg


def test_server_addresses() -> None:
    assert FULL.sockets == ((P, 3478), (P, 3479), (A, 3478), (A, 3479))
    assert SINGLE.sockets == ((P, 3478), (P, 3479))
    assert FULL.changed((P, 3478), True, True) == (A, 3479)
    assert FULL.changed((A, 3479), True, False) == (P, 3479)
    assert FULL.changed((A, 3478), False, True) == (A, 3479)
    assert FULL.changed((P, 3479), False, False) == (P, 3479)


@pytest.mark.parametrize(
    "args",
    [
        ("not-ip", 1, 2, None),
        (P, 3478, 3478, None),
        (P, 0, 3479, None),
        (P, 3478, 3479, P),
        (P, 3478, 3479, "2001:db8::1"),
        ("0.0.0.0", 3478, 3479, A),
    ],
)
def test_server_addresses_validation(args: tuple[str, int, int, str | None]) -> None:
    with pytest.raises(ValueError):
        ServerAddresses(*args)


def test_binding_response() -> None:
    server = StunServer(FULL, software="test 1.0")
    t, msg = one(server.handle_datagram(request(), CLIENT, (P, 3478)))
    assert (t.source, t.destination) == ((P, 3478), CLIENT)
    assert (msg.message_class, msg.method) == (MessageClass.SUCCESS, Method.BINDING)
    assert msg.attributes == (
        XorMappedAddress(CLIENT),
        MappedAddress(CLIENT),
        ResponseOrigin((P, 3478)),
        OtherAddress((A, 3479)),
        Software("test 1.0"),
    )
    assert (server.requests, server.responses, server.errors, server.dropped) == (1, 1, 0, 0)


@pytest.mark.parametrize("local", FULL.sockets)
@pytest.mark.parametrize("change_ip", [False, True])
@pytest.mark.parametrize("change_port", [False, True])
def test_change_request_routing(local: Address, change_ip: bool, change_port: bool) -> None:
    # RFC 5780 §6.1: answer from the socket differing as asked; OTHER-ADDRESS is relative to
    # where the request arrived.
    server = StunServer(FULL)
    t, msg = one(server.handle_datagram(request(ChangeRequest(change_ip, change_port)),
                                        CLIENT, local))
    ip = ({P, A} - {local[0]}).pop() if change_ip else local[0]
    port = ({3478, 3479} - {local[1]}).pop() if change_port else local[1]
    assert t.source == (ip, port)
    assert t.destination == CLIENT
    assert msg.get(ResponseOrigin) == ResponseOrigin((ip, port))
    other = (({P, A} - {local[0]}).pop(), ({3478, 3479} - {local[1]}).pop())
    assert msg.get(OtherAddress) == OtherAddress(other)


def test_single_address_server_has_no_other_address() -> None:
    _, msg = one(StunServer(SINGLE).handle_datagram(request(), CLIENT, (P, 3479)))
    assert msg.get(OtherAddress) is None
    assert msg.get(ResponseOrigin) == ResponseOrigin((P, 3479))


@pytest.mark.parametrize("change", [ChangeRequest(True, True), ChangeRequest(False, True),
                                    ChangeRequest(False, False)])
def test_change_request_without_alternate_is_420(change: ChangeRequest) -> None:
    server = StunServer(SINGLE)
    t, msg = one(server.handle_datagram(request(change), CLIENT, (P, 3478)))
    assert (t.source, t.destination) == ((P, 3478), CLIENT)
    assert msg.message_class is MessageClass.ERROR
    assert msg.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert msg.get(UnknownAttributes) == UnknownAttributes((AttrType.CHANGE_REQUEST,))
    assert (server.requests, server.responses, server.errors) == (1, 0, 1)


def test_unknown_comprehension_required_is_420() -> None:
    server = StunServer(FULL)
    data = request(UnknownAttribute(0x0024, b"\x00" * 4), UnknownAttribute(0x7FFF, b""))
    _, msg = one(server.handle_datagram(data, CLIENT, (P, 3478)))
    assert msg.get(ErrorCode) == ErrorCode(420, "Unknown Attribute")
    assert msg.get(UnknownAttributes) == UnknownAttributes((0x0024, 0x7FFF))


def test_unknown_comprehension_optional_is_ignored() -> None:
    data = request(UnknownAttribute(0x8029, b"12345678"))
    _, msg = one(StunServer(FULL).handle_datagram(data, CLIENT, (P, 3478)))
    assert msg.message_class is MessageClass.SUCCESS


def test_response_port() -> None:
    data = request(ResponsePort(5555), ChangeRequest(False, True))
    t, msg = one(StunServer(FULL).handle_datagram(data, CLIENT, (P, 3478)))
    assert t.destination == (CLIENT[0], 5555)
    assert t.source == (P, 3479)
    assert msg.get(XorMappedAddress) == XorMappedAddress(CLIENT)  # still the real source


@pytest.mark.parametrize(
    ("attributes", "reason"),
    [
        ((ResponsePort(5555), Padding(8)), "PADDING with RESPONSE-PORT"),
        ((ResponsePort(0),), "RESPONSE-PORT 0"),
    ],
)
def test_bad_requests_are_400(attributes: tuple[Attribute, ...], reason: str) -> None:
    t, msg = one(StunServer(FULL).handle_datagram(request(*attributes), CLIENT, (P, 3478)))
    assert t.destination == CLIENT
    assert msg.get(ErrorCode) == ErrorCode(400, reason)


def test_padding_is_mirrored() -> None:
    _, msg = one(StunServer(FULL).handle_datagram(request(Padding(64)), CLIENT, (P, 3478)))
    assert msg.get(Padding) == Padding(64)


def test_other_methods_are_400() -> None:
    _, msg = one(StunServer(FULL).handle_datagram(request(method=0x003), CLIENT, (P, 3478)))
    assert msg.method == 0x003
    assert msg.get(ErrorCode) is not None
    assert msg.get(ErrorCode) == ErrorCode(400, "only Binding is supported")


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GET / HTTP/1.1\r\n\r\n",
        request(message_class=MessageClass.INDICATION),
        request(message_class=MessageClass.SUCCESS),
        request(message_class=MessageClass.ERROR),
    ],
)
def test_non_requests_are_dropped(data: bytes) -> None:
    server = StunServer(FULL)
    assert server.handle_datagram(data, CLIENT, (P, 3478)) == []
    assert (server.requests, server.dropped) == (0, 1)


def test_datagram_on_unknown_socket_is_dropped() -> None:
    server = StunServer(FULL)
    assert server.handle_datagram(request(), CLIENT, ("192.0.2.9", 3478)) == []
    assert server.dropped == 1


def test_wildcard_server_omits_response_origin() -> None:
    server = StunServer(ServerAddresses("0.0.0.0", 3478, 3479))
    _, msg = one(server.handle_datagram(request(), CLIENT, ("0.0.0.0", 3478)))
    assert msg.get(ResponseOrigin) is None


def test_ipv6_server() -> None:
    server = StunServer(ServerAddresses("2001:db8::1", 3478, 3479, "2001:db8::2"))
    client = ("2001:db8:ffff::7", 50000)
    t, msg = one(server.handle_datagram(request(ChangeRequest(True, False)), client,
                                        ("2001:db8::1", 3478)))
    assert t.source == ("2001:db8::2", 3478)
    assert msg.get(XorMappedAddress) == XorMappedAddress(client)
    assert msg.get(OtherAddress) == OtherAddress(("2001:db8::2", 3479))


@given(st.binary(max_size=120), st.sampled_from((*FULL.sockets, (P, 1))))
def test_fuzz_never_raises(data: bytes, local: Address) -> None:
    server = StunServer(FULL)
    out = server.handle_datagram(data, CLIENT, local)
    assert len(out) <= 1
    assert server.requests + server.dropped == 1


@given(st.binary(max_size=24), st.integers(0, 0xFFFF))
def test_fuzz_attribute_values_never_raise(value: bytes, attr_type: int) -> None:
    body = attr_type.to_bytes(2, "big") + len(value).to_bytes(2, "big") + value
    body += bytes(-len(value) % 4)
    data = b"\x00\x01" + len(body).to_bytes(2, "big") + b"\x21\x12\xa4\x42" + TXID + body
    server = StunServer(FULL)
    server.handle_datagram(data, CLIENT, (P, 3478))
    assert server.requests + server.dropped == 1
