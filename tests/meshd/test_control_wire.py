"""meshd.control.wire: frame layout vectors, round trips, parse errors, every chunking, fuzz."""

from __future__ import annotations

import ipaddress
import json
import re
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.control.wire import (
    BEHAVIOURS,
    CLIENT_MAX_FRAME,
    MAX_PAYLOAD_DEPTH,
    NAT_TYPES,
    ControlProtocolError,
    Credentials,
    Error,
    FrameDecoder,
    Hello,
    Message,
    Nat,
    NatSummary,
    PeerInfo,
    PeerJoined,
    PeerLeft,
    Peers,
    Ping,
    Pong,
    Signal,
    TurnGrant,
    TurnServerAddress,
    Welcome,
    encode_body,
    encode_frame,
    message_type,
    parse_body,
    parse_frame,
)

KEY = bytes(range(32))
KEY_B64 = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8="
GRANT = TurnGrant("1700003600:edge-1", "a4sSlVmxM17LyIhxZIN6voVMbGA=", 1700003600, "edgeweave",
                  (TurnServerAddress("198.51.100.7", 3478, "udp"),
                   TurnServerAddress("turn.example", 443, "tcp")))
PEER = PeerInfo("edge-2", ipaddress.IPv4Address("100.64.3.9"), KEY, True,
                NatSummary("port-restricted", "endpoint-independent",
                           "address-and-port-dependent"), ("beijing",))


def frame(body: bytes) -> bytes:
    return struct.pack("!I", len(body)) + body


def body_of(**doc: Any) -> bytes:
    return json.dumps(doc).encode()


# --- vectors ------------------------------------------------------------------------------------


def test_frame_layout_vectors() -> None:
    # 4-byte big-endian length of the JSON body, then the body: compact, ASCII.
    assert encode_frame(Ping(7)) == b'\x00\x00\x00\x17{"type":"ping","seq":7}'
    assert encode_frame(Hello(KEY, software="meshd 0.1")) == (
        b"\x00\x00\x00\x6e"
        b'{"type":"hello","version":2,"staticKey":"' + KEY_B64.encode() + b'",'
        b'"software":"meshd 0.1"}')
    assert encode_frame(Signal("edge-2", {"v": 1, "cands": ["host 10.0.0.1 4000 1 a"]})) == (
        b'\x00\x00\x00\x56{"type":"signal","peer":"edge-2",'
        b'"payload":{"v":1,"cands":["host 10.0.0.1 4000 1 a"]}}')
    assert encode_frame(Error("peer-offline", "edge-2 is not connected", "edge-2")) == (
        b'\x00\x00\x00\x5a{"type":"error","code":"peer-offline",'
        b'"message":"edge-2 is not connected","peer":"edge-2"}')


def test_welcome_and_peer_documents() -> None:
    welcome = Welcome("edge-1", ipaddress.IPv4Interface("100.64.0.7/16"), 1700000000.5, 5.0,
                      15.0, GRANT)
    assert json.loads(encode_body(welcome)) == {
        "type": "welcome", "version": 2, "node": "edge-1", "overlay": "100.64.0.7/16",
        "serverTime": 1700000000.5, "keepaliveS": 5.0, "idleTimeoutS": 15.0,
        "turn": {"username": "1700003600:edge-1", "password": "a4sSlVmxM17LyIhxZIN6voVMbGA=",
                 "expiresAt": 1700003600, "realm": "edgeweave",
                 "servers": [{"host": "198.51.100.7", "port": 3478, "transport": "udp"},
                             {"host": "turn.example", "port": 443, "transport": "tcp"}]}}
    assert json.loads(encode_body(PeerJoined(PEER))) == {
        "type": "peerJoined",
        "peer": {"node": "edge-2", "overlay": "100.64.3.9", "staticKey": KEY_B64,
                 "online": True, "groups": ["beijing"],
                 "nat": {"natType": "port-restricted", "mapping": "endpoint-independent",
                         "filtering": "address-and-port-dependent"}}}
    assert GRANT.credentials().node == "edge-1"
    assert GRANT.credentials().expires == 1700003600


ALL: list[Message] = [
    Hello(KEY),
    Hello(KEY, 1, NatSummary("symmetric"), "meshd (edgeweave) 0.1.0"),
    Welcome("edge-1", ipaddress.IPv4Interface("100.64.0.7/16"), 1.5, 5.0, 15.0),
    Welcome("edge-1", ipaddress.IPv4Interface("10.0.0.1/8"), 0.0, 0.5, 2.0, GRANT, 1),
    Welcome("edge-1", ipaddress.IPv4Interface("100.64.0.7/16"), 1.5, 5.0, 15.0, None, 2,
            NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")),
    Credentials(GRANT),
    Peers(()),
    Peers((PEER, PeerInfo("a.b", ipaddress.IPv4Address("100.64.0.1"), bytes(32), False))),
    PeerJoined(PEER),
    PeerLeft("edge-2"),
    Signal("edge-2", {}),
    Signal("edge-2", {"v": 1, "gen": 3, "nested": {"a": [1, 2.5, None, True, "é"]}}),
    Nat(NatSummary("unknown")),
    Nat(NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")),
    Nat(NatSummary("unknown", None, "endpoint-independent")),
    Ping(0),
    Pong(2**53),
    Error("protocol", ""),
    Error("rate-limited", "slow down", "edge-3"),
]


@pytest.mark.parametrize("message", ALL, ids=lambda m: message_type(m))
def test_round_trip(message: Message) -> None:
    data = encode_frame(message)
    assert parse_frame(data) == message
    assert parse_body(data[4:]) == message
    assert data[4:].isascii()


def test_unknown_fields_are_ignored_unknown_types_are_not() -> None:
    assert parse_body(body_of(type="ping", seq=1, future="yes")) == Ping(1)
    with pytest.raises(ControlProtocolError, match="unknown message type"):
        parse_body(body_of(type="teleport"))


def test_hello_cannot_name_a_node_or_an_address() -> None:
    # Who the node is comes from its certificate; fields claiming otherwise are just ignored.
    hello = parse_body(body_of(type="hello", version=1, staticKey=KEY_B64, node="edge-9",
                               overlay="100.64.0.1"))
    assert hello == Hello(KEY, 1)


def test_nat_document() -> None:
    nat = Nat(NatSummary("symmetric", "address-and-port-dependent"))
    assert json.loads(encode_body(nat)) == {
        "type": "nat", "natType": "symmetric", "mapping": "address-and-port-dependent"}
    assert parse_body(body_of(type="nat", natType="full-cone", mapping=None,
                              filtering="endpoint-independent", later="ignored")) == Nat(
        NatSummary("full-cone", None, "endpoint-independent"))


@pytest.mark.parametrize(("doc", "error"), [
    ({}, "nat.natType: expected a non-empty string"),
    ({"natType": "fullcone"}, "nat.natType: expected one of full-cone, "),
    ({"natType": "symmetric", "mapping": "random"}, "nat.mapping: expected one of "),
    ({"natType": "symmetric", "filtering": 3}, "nat.filtering: expected a non-empty string"),
    ({"natType": 'unknown"} x{y="1'}, "nat.natType: expected one of"),
])
def test_agents_may_only_name_known_nat_values(doc: dict[str, Any], error: str) -> None:
    # What an agent says about itself ends up in peers' metric labels: known values only.
    with pytest.raises(ControlProtocolError, match=re.escape(error)):
        parse_body(body_of(type="nat", **doc))
    with pytest.raises(ControlProtocolError, match=r"hello\.nat"):
        parse_body(body_of(type="hello", version=2, staticKey=KEY_B64, nat=doc))


WELCOME_DOC: dict[str, Any] = {"type": "welcome", "version": 2, "node": "edge-1",
                               "overlay": "100.64.0.7/16", "serverTime": 1700000000.5,
                               "keepaliveS": 5.0, "idleTimeoutS": 15.0}


def test_welcome_carries_the_stored_nat_in_version_2() -> None:
    stored = NatSummary("symmetric", "address-and-port-dependent")
    welcome = Welcome("edge-1", ipaddress.IPv4Interface("100.64.0.7/16"), 1700000000.5, 5.0,
                      15.0, nat=stored)
    assert json.loads(encode_body(welcome)) == {
        **WELCOME_DOC, "nat": {"natType": "symmetric", "mapping": "address-and-port-dependent"}}
    assert encode_frame(welcome) == (
        b'\x00\x00\x00\xcc{"type":"welcome","version":2,"node":"edge-1",'
        b'"overlay":"100.64.0.7/16","serverTime":1700000000.5,"keepaliveS":5.0,'
        b'"idleTimeoutS":15.0,"nat":{"natType":"symmetric",'
        b'"mapping":"address-and-port-dependent"}}')
    assert parse_body(encode_body(welcome)) == welcome
    # Without the field (a server that stored nothing for this node, or an older one).
    plain = parse_body(body_of(**WELCOME_DOC))
    assert isinstance(plain, Welcome) and plain.nat is None
    assert "nat" not in json.loads(encode_body(plain))


def test_a_version_1_welcome_has_no_nat() -> None:
    # Only version 2 sessions carry it: a v1 agent never sees one, and we read none in v1.
    doc = {**WELCOME_DOC, "version": 1, "nat": {"natType": "symmetric"}}
    welcome = parse_body(body_of(**doc))
    assert isinstance(welcome, Welcome) and welcome.version == 1 and welcome.nat is None
    with pytest.raises(ValueError, match="version 1 carries no nat"):
        Welcome("edge-1", ipaddress.IPv4Interface("100.64.0.7/16"), 0.0, 5.0, 15.0, None, 1,
                NatSummary("symmetric"))


def test_a_stored_nat_with_values_we_do_not_know_reads_as_unknown() -> None:
    doc = {**WELCOME_DOC, "nat": {"natType": "quantum", "filtering": "teleporting",
                                  "mapping": "endpoint-independent", "later": 1}}
    welcome = parse_body(body_of(**doc))
    assert isinstance(welcome, Welcome)
    assert welcome.nat == NatSummary("unknown", "endpoint-independent", None)


@pytest.mark.parametrize(("nat", "error"), [
    ("symmetric", "welcome.nat: expected an object"),
    ([], "welcome.nat: expected an object"),
    ({}, "welcome.nat.natType: expected a non-empty string"),
    ({"natType": 3}, "welcome.nat.natType: expected a non-empty string"),
    ({"natType": "symmetric", "mapping": ["x"]}, "welcome.nat.mapping: expected a non-empty"),
])
def test_a_malformed_stored_nat_is_a_protocol_error_naming_the_field(nat: Any,
                                                                    error: str) -> None:
    with pytest.raises(ControlProtocolError, match=re.escape(error)):
        parse_body(body_of(**WELCOME_DOC, nat=nat))


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 4), st.none() | st.booleans() | st.integers() | st.text(max_size=20)
       | st.lists(st.text(max_size=5), max_size=3)
       | st.dictionaries(st.sampled_from(["natType", "mapping", "filtering", "x"]),
                         st.none() | st.integers() | st.text(max_size=30)
                         | st.sampled_from(sorted(NAT_TYPES | BEHAVIOURS)), max_size=4))
def test_any_stored_nat_parses_to_known_values_or_raises_protocol_error(version: int,
                                                                        nat: Any) -> None:
    try:
        welcome = parse_body(body_of(**{**WELCOME_DOC, "version": version, "nat": nat}))
    except ControlProtocolError:
        return
    assert isinstance(welcome, Welcome)
    if welcome.nat is not None:
        assert version >= 2 and welcome.nat.nat_type in NAT_TYPES
        assert {welcome.nat.mapping, welcome.nat.filtering} <= BEHAVIOURS | {None}
    assert parse_body(encode_body(welcome)) == welcome


def test_peer_nat_values_a_newer_server_invents_read_as_unknown() -> None:
    doc = {"node": "edge-2", "overlay": "100.64.3.9", "staticKey": KEY_B64, "online": True,
           "nat": {"natType": "quantum", "mapping": "endpoint-independent",
                   "filtering": "teleporting"}}
    assert parse_body(body_of(type="peerJoined", peer=doc)) == PeerJoined(PeerInfo(
        "edge-2", ipaddress.IPv4Address("100.64.3.9"), KEY, True,
        NatSummary("unknown", "endpoint-independent", None)))


@pytest.mark.parametrize(("body", "error"), [
    (b"", "not a JSON object"),
    (b"\xff\xfe", "not a JSON object"),
    (b"[1, 2]", "expected an object"),
    (b'{"seq": 1}', "type"),
    (b'{"type": 5}', "type"),
    (b'{"type": "ping", "seq": true}', "seq"),
    (b'{"type": "ping", "seq": -1}', "seq"),
    (b'{"type": "ping", "seq": 1.5}', "seq"),
    (b'{"type": "ping", "seq": NaN}', "not a JSON object"),
    (b'{"type": "ping", "seq": 1e400}', "not a JSON object"),
    (b'{"type": "ping", "seq": ' + b"9" * 5000 + b"}", "not a JSON object"),
    (b"[" * 100_000 + b"]" * 100_000, "nested too deeply|not a JSON object"),
    (b'{"type": "hello", "version": 1, "staticKey": "AAEC"}', "staticKey"),
    (b'{"type": "hello", "version": 1, "staticKey": "%%%"}', "staticKey"),
    (b'{"type": "hello", "version": 1, "staticKey": "\xc3\xa9"}', "staticKey"),
    (b'{"type": "hello", "staticKey": "' + KEY_B64.encode() + b'"}', "version"),
    (b'{"type": "peerLeft", "node": "Not_A_Node"}', "node"),
    (b'{"type": "signal", "peer": "edge-2", "payload": [1]}', "payload"),
    (b'{"type": "signal", "peer": "edge-2"}', "payload"),
    (b'{"type": "welcome", "version": 1, "node": "a", "overlay": "100.64.0.7", '
     b'"serverTime": 1, "keepaliveS": 1, "idleTimeoutS": 3}', "overlay"),
    (b'{"type": "welcome", "version": 1, "node": "a", "overlay": "100.64.0.7/16", '
     b'"serverTime": 1, "keepaliveS": 0, "idleTimeoutS": 3}', "keepaliveS"),
    (b'{"type": "welcome", "version": 1, "node": "a", "overlay": "100.64.0.7/16", '
     b'"serverTime": 1e300, "keepaliveS": 1, "idleTimeoutS": 3}', "serverTime"),
    (b'{"type": "credentials", "turn": {"username": "u", "password": "p", "expiresAt": 1, '
     b'"realm": "r", "servers": [{"host": "h", "port": 1, "transport": "sctp"}]}}', "transport"),
    (b'{"type": "credentials", "turn": {"username": "u", "password": "p", "expiresAt": 1, '
     b'"realm": "r", "servers": [{"host": "h", "port": 0, "transport": "udp"}]}}', "port"),
    (b'{"type": "peers", "peers": [{"node": "a", "overlay": "::1", "staticKey": "'
     + KEY_B64.encode() + b'", "online": true}]}', "overlay"),
    (b'{"type": "peers", "peers": [{"node": "a", "overlay": "1.2.3.4", "staticKey": "'
     + KEY_B64.encode() + b'", "online": 1}]}', "online"),
    (b'{"type": "peers", "peers": [{"node": "a", "overlay": "1.2.3.4", "staticKey": "'
     + KEY_B64.encode() + b'", "online": true, "groups": [""]}]}', "groups"),
])
def test_parse_errors(body: bytes, error: str) -> None:
    with pytest.raises(ControlProtocolError, match=error):
        parse_body(body)


def test_payload_nesting_is_bounded() -> None:
    ok: Any = {}
    for _ in range(MAX_PAYLOAD_DEPTH - 1):
        ok = {"a": ok}
    assert parse_body(encode_body(Signal("p", ok))) == Signal("p", ok)
    deep = [ok]
    with pytest.raises(ControlProtocolError, match="nesting"):
        parse_body(body_of(type="signal", peer="p", payload={"x": deep}))


@pytest.mark.parametrize("make", [
    lambda: Hello(b"short"),
    lambda: PeerInfo("edge-1", ipaddress.IPv4Address("1.2.3.4"), b"", True),
    lambda: Signal("UPPER", {}),
    lambda: PeerLeft(""),
    lambda: TurnServerAddress("", 1),
    lambda: TurnServerAddress("h", 70000),
    lambda: Welcome("a", ipaddress.IPv4Interface("1.2.3.4/8"), 0, 0, 1),
    lambda: encode_frame(Signal("p", {"x": float("nan")})),
    lambda: encode_frame(Signal("p", {"x": object()})),
    lambda: encode_frame(Signal("p", {"x": "y" * 100}), max_frame=50),
])
def test_local_misuse_is_value_error(make: Any) -> None:
    with pytest.raises(ValueError):
        make()


# --- framing ------------------------------------------------------------------------------------


def stream() -> tuple[bytes, list[Message]]:
    return b"".join(encode_frame(m) for m in ALL), list(ALL)


def decode(chunks: list[bytes], max_frame: int = 1 << 24) -> list[Message]:
    decoder = FrameDecoder(max_frame)
    out: list[Message] = []
    for chunk in chunks:
        out += decoder.feed(chunk)
    assert decoder.buffered == 0
    return out


def test_stream_whole_byte_by_byte_and_split_everywhere() -> None:
    data, messages = stream()
    assert decode([data]) == messages
    assert decode([data[i:i + 1] for i in range(len(data))]) == messages
    for cut in range(len(data) + 1):
        assert decode([data[:cut], data[cut:]]) == messages, cut


def test_oversized_frame_is_refused_from_its_header() -> None:
    decoder = FrameDecoder(CLIENT_MAX_FRAME)
    with pytest.raises(ControlProtocolError, match="outside"):
        decoder.feed(struct.pack("!I", CLIENT_MAX_FRAME + 1))  # no body needed to refuse
    with pytest.raises(ControlProtocolError, match="lost earlier"):
        decoder.feed(encode_frame(Ping(1)))


def test_zero_length_frame_is_garbage() -> None:
    with pytest.raises(ControlProtocolError):
        FrameDecoder().feed(b"\x00\x00\x00\x00")


def test_messages_before_garbage_travel_with_the_error() -> None:
    data = encode_frame(Ping(1)) + encode_frame(Ping(2)) + frame(b"nope")
    with pytest.raises(ControlProtocolError) as info:
        FrameDecoder().feed(data)
    assert info.value.messages == (Ping(1), Ping(2))


def test_parse_frame_wants_exactly_one() -> None:
    with pytest.raises(ControlProtocolError):
        parse_frame(encode_frame(Ping(1)) * 2)
    with pytest.raises(ControlProtocolError):
        parse_frame(encode_frame(Ping(1))[:-1])


# --- fuzz ---------------------------------------------------------------------------------------


def outcome(chunks: list[bytes]) -> tuple[list[Message], bool]:
    """(messages decoded, whether the stream was refused) for one chunking."""
    decoder = FrameDecoder(4096)
    out: list[Message] = []
    for chunk in chunks:
        try:
            out += decoder.feed(chunk)
        except ControlProtocolError as exc:
            return out + list(exc.messages), True
    return out, False


def chunkings(data: bytes, cuts: list[int]) -> list[list[bytes]]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in points:
        pieces.append(data[last:p])
        last = p
    pieces.append(data[last:])
    return [[data], [data[i:i + 1] for i in range(len(data))], pieces]


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 400), max_size=6))
def test_any_bytes_parse_or_raise_protocol_error_in_every_chunking(
        data: bytes, cuts: list[int]) -> None:
    results = [outcome(c) for c in chunkings(data, cuts)]
    assert all(r == results[0] for r in results)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=8)
    | st.floats(allow_nan=True, allow_infinity=True),
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=12)
fields = st.sampled_from(["type", "seq", "version", "staticKey", "node", "peer", "payload",
                          "overlay", "turn", "peers", "peer", "code", "message", "online",
                          "serverTime", "keepaliveS", "idleTimeoutS", "nat", "groups",
                          "natType", "mapping", "filtering"])
types = st.sampled_from(["hello", "welcome", "credentials", "peers", "peerJoined", "peerLeft",
                         "signal", "nat", "ping", "pong", "error", "x"])


@settings(max_examples=600, deadline=None)
@given(types, st.dictionaries(fields, json_values | st.just(KEY_B64), max_size=8))
def test_json_shaped_garbage_parses_or_raises_protocol_error(kind: str,
                                                              doc: dict[str, Any]) -> None:
    doc["type"] = kind
    try:
        body = json.dumps(doc).encode()
    except ValueError:
        return
    try:
        message = parse_body(body)
    except ControlProtocolError:
        return
    assert parse_body(encode_body(message)) == message


names = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
keys = st.binary(min_size=32, max_size=32)
behaviours = st.none() | st.sampled_from(sorted(BEHAVIOURS))
summaries = st.builds(NatSummary, st.sampled_from(sorted(NAT_TYPES)), behaviours, behaviours)
nats = st.none() | summaries
peers = st.builds(PeerInfo, names, st.ip_addresses(v=4), keys, st.booleans(), nats,
                  st.lists(st.text(min_size=1, max_size=5), max_size=2).map(tuple))
payloads = st.dictionaries(st.text(max_size=5), json_values.filter(
    lambda v: "nan" not in json.dumps(v).lower() and "infinity" not in json.dumps(v).lower()),
    max_size=4)
messages: st.SearchStrategy[Message] = st.one_of(
    st.builds(Hello, keys, st.integers(0, 9), nats, st.text(max_size=10)),
    st.builds(PeerJoined, peers),
    st.builds(Peers, st.lists(peers, max_size=3).map(tuple)),
    st.builds(PeerLeft, names),
    st.builds(Signal, names, payloads),
    st.builds(Nat, summaries),
    st.builds(Welcome, names, st.builds(ipaddress.IPv4Interface, st.ip_addresses(v=4)),
              st.floats(0, 2e9), st.floats(0.1, 60), st.floats(0.1, 60), st.none(),
              st.integers(2, 9), nats),
    st.builds(Ping, st.integers(0, 2**63 - 1)),
    st.builds(Pong, st.integers(0, 2**63 - 1)),
    st.builds(Error, st.text(min_size=1, max_size=10), st.text(max_size=10),
              st.just("") | names),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(messages, min_size=1, max_size=5), st.lists(st.integers(0, 4000), max_size=5))
def test_generated_messages_round_trip_in_every_chunking(batch: list[Message],
                                                         cuts: list[int]) -> None:
    data = b"".join(encode_frame(m) for m in batch)
    for chunks in chunkings(data, cuts):
        assert decode(chunks) == batch
