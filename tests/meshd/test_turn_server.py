"""meshd.turn.server: the sans-I/O TURN core, driven message by message with a virtual clock."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshd.stun.codec import (
    FAMILY_IPV6,
    PROTOCOL_UDP,
    Attribute,
    ChannelNumber,
    Data,
    DontFragment,
    ErrorCode,
    EvenPort,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedAddressFamily,
    RequestedTransport,
    ReservationToken,
    StunMessage,
    UnknownAttribute,
    UnknownAttributes,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_integrity,
)
from meshd.stun.server import ServerAddresses, StunServer
from meshd.turn.credentials import TurnCredentials, mint_credentials
from meshd.turn.framing import ChannelData, encode_channel_data, parse_channel_data
from meshd.turn.ports import MemoryRelayPorts
from meshd.turn.server import (
    FiveTuple,
    Output,
    StreamClose,
    StreamWrite,
    Transport,
    TurnServer,
    TurnServerConfig,
)
from meshd.udp import Address, Transmit

EPOCH = 1_700_000_000.0
P = "198.51.100.1"
LISTEN: Address = (P, 3478)
CLIENT: Address = ("203.0.113.7", 40001)
PEER: Address = ("192.0.2.50", 6000)
SECRET = b"s3cret"
REALM = "edgeweave"
CONFIG = TurnServerConfig(realm=REALM, secrets=(SECRET,), relay_ip=P, min_port=50000,
                          max_port=50099)


def make_server(config: TurnServerConfig = CONFIG,
                taken: set[Address] | None = None) -> tuple[TurnServer, MemoryRelayPorts]:
    ports = MemoryRelayPorts(taken=taken)
    stun = StunServer(ServerAddresses(P, 3478, 3479))
    return TurnServer(config, ports, stun=stun, rng=random.Random(7), nonce_key=b"k"), ports


class Agent:
    """A hand-driven TURN client speaking raw messages to the core."""

    def __init__(self, server: TurnServer, *, client: Address = CLIENT, node: str = "node-a",
                 transport: Transport = Transport.UDP,
                 credentials: TurnCredentials | None = None) -> None:
        self.server = server
        self.flow = FiveTuple(transport, client, LISTEN)
        self.now = EPOCH
        self.credentials = credentials or mint_credentials(SECRET, node, EPOCH, 3600)
        self.nonce: bytes | None = None
        self.realm = REALM
        self.relayed: Address | None = None
        self._txid = 0

    @property
    def key(self) -> bytes:
        return long_term_key(self.credentials.username, self.realm, self.credentials.password)

    def txid(self) -> bytes:
        self._txid += 1
        return self._txid.to_bytes(12, "big")

    def feed(self, data: bytes) -> list[Output]:
        if self.flow.transport is Transport.UDP:
            return self.server.handle_datagram(data, self.flow.client, LISTEN, self.now)
        return self.server.stream_received(self.flow, data, self.now)

    def to_client(self, outputs: list[Output]) -> list[bytes]:
        """Payloads addressed to this client (padding stripped for TCP)."""
        out = []
        for o in outputs:
            if isinstance(o, Transmit):
                assert (o.source, o.destination) == (LISTEN, self.flow.client)
                out.append(o.data)
            elif isinstance(o, StreamWrite):
                assert o.flow == self.flow and len(o.data) % 4 == 0
                out.append(o.data)
        return out

    def request(self, method: int, *attributes: Attribute, auth: bool = True,
                txid: bytes | None = None, retry_stale: bool = True) -> StunMessage:
        """Send a request, return the parsed response (signed ones are verified); a 438 is
        answered with the new nonce once, unless `retry_stale` is off."""
        response = self._request(method, attributes, auth, txid)
        nonce = response.get(Nonce)
        if retry_stale and code(response) == 438 and nonce is not None:
            self.nonce = nonce.value
            response = self._request(method, attributes, auth, None)
        return response

    def _request(self, method: int, attributes: tuple[Attribute, ...], auth: bool,
                 txid: bytes | None) -> StunMessage:
        if auth and self.nonce is None:
            self.challenge()
        body = attributes
        if auth:
            assert self.nonce is not None
            body += (Username(self.credentials.username), Realm(self.realm), Nonce(self.nonce))
        txid = txid or self.txid()
        data = encode_message(StunMessage(MessageClass.REQUEST, method, txid, body),
                              key=self.key if auth else None)
        (raw,) = self.to_client(self.feed(data))
        response = parse_message(raw)
        assert response.transaction_id == txid
        if response.integrity is not None:
            assert verify_integrity(raw, self.key)
        return response

    def challenge(self) -> StunMessage:
        response = self.request(Method.ALLOCATE, RequestedTransport(PROTOCOL_UDP), auth=False)
        assert code(response) == 401
        nonce = response.get(Nonce)
        assert nonce is not None
        self.nonce = nonce.value
        return response

    def allocate(self, *attributes: Attribute) -> StunMessage:
        response = self.request(Method.ALLOCATE, RequestedTransport(PROTOCOL_UDP), *attributes)
        relayed = response.get(XorRelayedAddress)
        if relayed is not None:
            self.relayed = relayed.address
        return response

    def send_indication(self, peer: Address, data: bytes) -> list[Output]:
        message = StunMessage(MessageClass.INDICATION, Method.SEND, self.txid(),
                              (XorPeerAddress(peer), Data(data)))
        return self.feed(encode_message(message))

    def from_peer(self, data: bytes, peer: Address = PEER) -> list[bytes]:
        assert self.relayed is not None
        return self.to_client(self.server.handle_datagram(data, peer, self.relayed, self.now))


def code(response: StunMessage) -> int | None:
    error = response.get(ErrorCode)
    return error.code if response.message_class is MessageClass.ERROR and error else None


def allocated(server: TurnServer | None = None, **kw: object) -> Agent:
    agent = Agent(server or make_server()[0], **kw)  # type: ignore[arg-type]
    assert agent.allocate().message_class is MessageClass.SUCCESS
    return agent


# --- authentication --------------------------------------------------------------------------


def test_unauthenticated_request_gets_401_with_realm_and_nonce() -> None:
    server, ports = make_server()
    response = Agent(server).challenge()
    assert response.get(Realm) == Realm(REALM)
    assert response.integrity is None
    assert server.metrics.auth_challenges == 1 and server.metrics.auth_failures == 0
    assert server.allocations == 0 and not ports.opened


def test_allocate_success() -> None:
    server, ports = make_server()
    agent = Agent(server)
    response = agent.allocate(Lifetime(1200))
    assert response.message_class is MessageClass.SUCCESS
    assert response.integrity is not None  # verified against the key by Agent.request
    relayed = response.get(XorRelayedAddress)
    assert relayed is not None and relayed.address[0] == P
    assert 50000 <= relayed.address[1] <= 50099
    assert response.get(Lifetime) == Lifetime(1200)
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    assert ports.opened == {relayed.address}
    assert server.get_timer() == EPOCH + 1200
    assert server.allocation_for(agent.flow) == relayed.address
    assert server.metrics.allocations_total == 1


def test_request_with_integrity_but_no_nonce_is_400() -> None:
    server, _ = make_server()
    agent = Agent(server)
    data = encode_message(StunMessage(MessageClass.REQUEST, Method.ALLOCATE, agent.txid(),
                                      (RequestedTransport(PROTOCOL_UDP),
                                       Username(agent.credentials.username), Realm(REALM))),
                          key=agent.key)
    (raw,) = agent.to_client(agent.feed(data))
    assert code(parse_message(raw)) == 400


@pytest.mark.parametrize(
    "credentials",
    [
        TurnCredentials(mint_credentials(SECRET, "node-a", EPOCH, 60).username, "wrong"),
        mint_credentials(b"other-secret", "node-a", EPOCH, 60),
        TurnCredentials("1699999990:node-a", "signed-by-someone-else"),
        TurnCredentials("node-a", "pw"),
    ],
    ids=["wrong-password", "other-secret", "expired", "not-rest"],
)
def test_bad_credentials_get_401(credentials: TurnCredentials) -> None:
    server, _ = make_server()
    agent = Agent(server, credentials=credentials)
    response = agent.allocate()
    assert code(response) == 401
    assert response.get(Nonce) is not None and response.get(Realm) == Realm(REALM)
    assert server.metrics.auth_failures == 1
    assert server.allocations == 0


def test_expired_but_correctly_signed_credential_is_refused() -> None:
    server, _ = make_server()
    expired = mint_credentials(SECRET, "node-a", EPOCH - 100, 50)
    assert code(Agent(server, credentials=expired).allocate()) == 401


def test_wrong_realm_is_refused_and_rotated_secret_accepted() -> None:
    server, _ = make_server()
    agent = Agent(server)
    agent.challenge()
    agent.realm = "other"
    assert code(agent.allocate()) == 401
    rotated, _ = make_server(replace(CONFIG, secrets=(b"new", SECRET)))
    assert allocated(rotated).relayed is not None


def test_stale_nonce_gets_438_then_works_with_the_new_one() -> None:
    server, _ = make_server()
    agent = Agent(server)
    agent.challenge()
    agent.now += CONFIG.nonce_lifetime_s + 1
    response = agent.request(Method.ALLOCATE, RequestedTransport(PROTOCOL_UDP),
                             retry_stale=False)
    assert code(response) == 438
    assert response.get(Realm) == Realm(REALM) and response.integrity is None
    new_nonce = response.get(Nonce)
    assert new_nonce is not None and new_nonce.value != agent.nonce
    agent.nonce = new_nonce.value
    assert agent.allocate().message_class is MessageClass.SUCCESS
    assert server.metrics.stale_nonces == 1


def test_nonce_is_bound_to_the_client_ip() -> None:
    server, _ = make_server()
    first = Agent(server)
    first.challenge()
    other = Agent(server, client=("203.0.113.99", 40001))
    other.nonce = first.nonce
    transport = RequestedTransport(PROTOCOL_UDP)
    assert code(other.request(Method.ALLOCATE, transport, retry_stale=False)) == 438
    garbage = Agent(server)
    garbage.nonce = b"\xff\xfe not a nonce"
    assert code(garbage.request(Method.ALLOCATE, transport, retry_stale=False)) == 438


# --- Allocate ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attributes", "expected"),
    [
        ((), 400),  # no REQUESTED-TRANSPORT
        ((RequestedTransport(6),), 442),  # TCP relaying (RFC 6062) is not offered
        ((RequestedTransport(PROTOCOL_UDP), RequestedAddressFamily(FAMILY_IPV6)), 440),
        ((RequestedTransport(PROTOCOL_UDP), RequestedAddressFamily(7)), 440),
        ((RequestedTransport(PROTOCOL_UDP), ReservationToken(b"12345678"), EvenPort()), 400),
        ((RequestedTransport(PROTOCOL_UDP), ReservationToken(b"12345678")), 508),
        ((RequestedTransport(PROTOCOL_UDP), UnknownAttribute(0x7F00, b"")), 420),
    ],
)
def test_allocate_errors(attributes: tuple[Attribute, ...], expected: int) -> None:
    server, ports = make_server()
    response = Agent(server).request(Method.ALLOCATE, *attributes)
    assert code(response) == expected
    assert response.integrity is not None  # errors after authentication are signed
    if expected == 420:
        assert response.get(UnknownAttributes) == UnknownAttributes((0x7F00,))
    assert server.allocations == 0 and not ports.opened
    assert server.metrics.errors[expected] == 1


def test_second_allocate_is_437_but_a_retransmission_gets_the_same_answer() -> None:
    server, _ = make_server()
    agent = Agent(server)
    agent.challenge()
    txid = agent.txid()
    first = agent.request(Method.ALLOCATE, RequestedTransport(PROTOCOL_UDP), txid=txid)
    again = agent.request(Method.ALLOCATE, RequestedTransport(PROTOCOL_UDP), txid=txid)
    assert first == again and first.message_class is MessageClass.SUCCESS
    assert code(agent.allocate()) == 437
    assert server.allocations == 1


@pytest.mark.parametrize(("requested", "granted"),
                         [(None, 600), (10, 600), (1800, 1800), (100_000, 3600)])
def test_lifetime_is_clamped(requested: int | None, granted: int) -> None:
    extra = () if requested is None else (Lifetime(requested),)
    response = Agent(make_server()[0]).allocate(*extra)
    assert response.get(Lifetime) == Lifetime(granted)


def test_quota_per_node() -> None:
    server, _ = make_server(replace(CONFIG, quota_per_node=2))
    agents = [Agent(server, client=("203.0.113.7", 40001 + i)) for i in range(3)]
    assert [code(a.allocate()) for a in agents] == [None, None, 486]
    assert allocated(server, client=("203.0.113.8", 1), node="node-b").relayed is not None
    agents[0].request(Method.REFRESH, Lifetime(0))
    assert code(agents[2].allocate()) is None
    assert ("meshd_relay_node_allocations", {"node": "node-a"}, 2) in server.samples()


def test_out_of_ports_is_508() -> None:
    server, ports = make_server(replace(CONFIG, min_port=50000, max_port=50002),
                                taken={(P, 50001)})
    agents = [Agent(server, client=("203.0.113.7", 40001 + i)) for i in range(3)]
    assert [code(a.allocate()) for a in agents] == [None, None, 508]
    assert ports.opened == {(P, 50000), (P, 50002)}


def test_even_port_reservation_token() -> None:
    server, ports = make_server()
    first = Agent(server)
    response = first.allocate(EvenPort(reserve=True))
    assert first.relayed is not None and first.relayed[1] % 2 == 0
    token = response.get(ReservationToken)
    assert token is not None
    reserved = (P, first.relayed[1] + 1)
    assert reserved in ports.opened
    second = Agent(server, client=("203.0.113.9", 5000))
    second.allocate(token)
    assert second.relayed == reserved
    third = Agent(server, client=("203.0.113.10", 5000))
    assert code(third.allocate(token)) == 508  # used up


def test_unused_reservation_expires() -> None:
    server, ports = make_server()
    agent = Agent(server)
    agent.allocate(EvenPort(reserve=True))
    assert len(ports.opened) == 2
    server.handle_timer(EPOCH + CONFIG.reservation_lifetime_s)
    assert len(ports.opened) == 1


def test_even_port_and_dont_fragment() -> None:
    server, ports = make_server()
    agent = allocated(server)
    other = Agent(server, client=("203.0.113.9", 5000))
    other.allocate(EvenPort(), DontFragment())
    assert other.relayed is not None and other.relayed[1] % 2 == 0
    assert ports.dont_fragment == {other.relayed}
    assert agent.relayed not in ports.dont_fragment


# --- Refresh -----------------------------------------------------------------------------------


def test_refresh_extends_and_lifetime_zero_deletes() -> None:
    server, ports = make_server()
    agent = allocated(server)
    agent.now += 500
    response = agent.request(Method.REFRESH, Lifetime(900))
    assert response.get(Lifetime) == Lifetime(900)
    server.handle_timer(EPOCH + 700)
    assert server.allocations == 1  # would have expired at 600 without the refresh
    response = agent.request(Method.REFRESH, Lifetime(0))
    assert response.message_class is MessageClass.SUCCESS
    assert response.get(Lifetime) == Lifetime(0)
    assert server.allocations == 0 and not ports.opened
    assert code(agent.request(Method.REFRESH, Lifetime(0))) == 437
    assert server.metrics.allocations_deleted == 1


def test_refresh_without_allocation_or_with_wrong_family() -> None:
    server, _ = make_server()
    assert code(Agent(server).request(Method.REFRESH)) == 437
    agent = allocated(server, client=("203.0.113.1", 1))
    assert code(agent.request(Method.REFRESH, RequestedAddressFamily(FAMILY_IPV6))) == 443


def test_allocation_expires() -> None:
    server, ports = make_server()
    allocated(server)
    assert server.get_timer() == EPOCH + 600
    server.handle_timer(EPOCH + 599.9)
    assert server.allocations == 1
    server.handle_timer(EPOCH + 600)
    assert server.allocations == 0 and not ports.opened
    assert server.get_timer() is None
    assert server.metrics.allocations_expired == 1


def test_another_node_cannot_touch_an_allocation_but_fresh_credentials_can() -> None:
    server, _ = make_server()
    agent = allocated(server)
    intruder = Agent(server, node="node-b")
    assert code(intruder.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER))) == 441
    assert code(intruder.request(Method.REFRESH, Lifetime(0))) == 441
    assert server.allocations == 1
    agent.credentials = mint_credentials(SECRET, "node-a", EPOCH + 60, 3600)  # REST rotation
    assert agent.request(Method.REFRESH).message_class is MessageClass.SUCCESS


# --- permissions and data ----------------------------------------------------------------------


def data_indication(raw: bytes) -> tuple[Address, bytes]:
    msg = parse_message(raw)
    assert (msg.method, msg.message_class) == (Method.DATA, MessageClass.INDICATION)
    peer, data = msg.get(XorPeerAddress), msg.get(Data)
    assert peer is not None and data is not None
    return peer.address, data.value


def test_nothing_is_relayed_without_permission() -> None:
    server, _ = make_server()
    agent = allocated(server)
    assert agent.from_peer(b"unsolicited") == []
    assert agent.send_indication(PEER, b"out") == []
    assert server.metrics.dropped_no_permission == 2


def test_permission_opens_both_directions_for_the_peer_ip() -> None:
    server, _ = make_server()
    agent = allocated(server)
    assert agent.request(Method.CREATE_PERMISSION,
                         XorPeerAddress(PEER)).message_class is MessageClass.SUCCESS
    assert agent.send_indication(PEER, b"out") == [Transmit(agent.relayed, PEER, b"out")]  # type: ignore[arg-type]
    (raw,) = agent.from_peer(b"in")
    assert data_indication(raw) == (PEER, b"in")
    (raw,) = agent.from_peer(b"other port", peer=(PEER[0], 7777))  # permissions ignore ports
    assert data_indication(raw) == ((PEER[0], 7777), b"other port")
    assert agent.from_peer(b"x", peer=("192.0.2.51", 6000)) == []
    m = server.metrics
    assert (m.bytes_out, m.datagrams_out, m.bytes_in, m.datagrams_in) == (3, 1, 12, 2)


def test_create_permission_with_several_peers() -> None:
    server, _ = make_server()
    agent = allocated(server)
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER),
                  XorPeerAddress(("192.0.2.51", 1)))
    assert agent.from_peer(b"a", ("192.0.2.51", 9)) != []
    assert code(agent.request(Method.CREATE_PERMISSION)) == 400


def test_permission_expires_after_300_s_unless_refreshed() -> None:
    server, _ = make_server()
    agent = allocated(server)
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER))
    assert server.get_timer() == EPOCH + 300
    agent.now = EPOCH + 250
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER))  # refresh: now +300
    agent.now = EPOCH + 400
    assert agent.from_peer(b"still") != []
    agent.now = EPOCH + 550
    assert agent.from_peer(b"expired") == []
    assert ("meshd_relay_permissions", {}, 0) in server.samples()


@pytest.mark.parametrize(
    ("peer", "config", "expected"),
    [
        (("127.0.0.1", 22), CONFIG, 403),
        (("::ffff:127.0.0.1", 22), CONFIG, 443),  # an IPv6 peer on an IPv4 relay
        (("224.0.0.1", 5), CONFIG, 403),
        (("0.0.0.0", 5), CONFIG, 403),
        (("255.255.255.255", 5), CONFIG, 403),
        (("10.1.2.3", 80), replace(CONFIG, denied_peers=("10.0.0.0/8",)), 403),
        (("2001:db8::1", 80), CONFIG, 443),
        (("127.0.0.1", 22), replace(CONFIG, allow_loopback_peers=True), None),
    ],
)
def test_peer_policy(peer: Address, config: TurnServerConfig, expected: int | None) -> None:
    server, _ = make_server(config)
    agent = allocated(server)
    assert code(agent.request(Method.CREATE_PERMISSION, XorPeerAddress(peer))) == expected
    assert code(agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4000),
                              XorPeerAddress(peer))) == expected


def test_permission_limit() -> None:
    server, _ = make_server(replace(CONFIG, max_permissions=2))
    agent = allocated(server)
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(("192.0.2.1", 1)),
                  XorPeerAddress(("192.0.2.2", 1)))
    assert code(agent.request(Method.CREATE_PERMISSION,
                              XorPeerAddress(("192.0.2.3", 1)))) == 508
    assert code(agent.request(Method.CREATE_PERMISSION,
                              XorPeerAddress(("192.0.2.2", 1)))) is None  # a refresh


# --- channels ----------------------------------------------------------------------------------


def test_channel_data_both_ways() -> None:
    server, _ = make_server()
    agent = allocated(server)
    assert agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001),
                         XorPeerAddress(PEER)).message_class is MessageClass.SUCCESS
    (raw,) = agent.from_peer(b"in")
    assert raw == encode_channel_data(0x4001, b"in")
    out = agent.feed(encode_channel_data(0x4001, b"out"))
    assert out == [Transmit(agent.relayed, PEER, b"out")]  # type: ignore[arg-type]
    # The channel also installed a permission for the IP: other ports get Data indications.
    (raw,) = agent.from_peer(b"in2", peer=(PEER[0], 1))
    assert data_indication(raw) == ((PEER[0], 1), b"in2")
    assert agent.feed(encode_channel_data(0x4002, b"unbound")) == []
    assert agent.feed(b"\x40\x01\x00\x09short") == []  # malformed ChannelData
    assert server.metrics.dropped_malformed == 1


@pytest.mark.parametrize(
    ("number", "peer", "expected"),
    [
        (0x4001, PEER, None),  # refresh of the same binding
        (0x4001, ("192.0.2.99", 1), 400),  # channel bound to another peer
        (0x4002, PEER, 400),  # peer bound to another channel
        (0x3FFF, ("192.0.2.99", 1), 400),
        (0x8000, ("192.0.2.99", 1), 400),
        (0x7FFF, ("192.0.2.99", 1), None),  # RFC 5766 range, still used by old clients
    ],
)
def test_channel_bind_rules(number: int, peer: Address, expected: int | None) -> None:
    server, _ = make_server()
    agent = allocated(server)
    agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(PEER))
    assert code(agent.request(Method.CHANNEL_BIND, ChannelNumber(number),
                              XorPeerAddress(peer))) == expected
    assert code(agent.request(Method.CHANNEL_BIND, XorPeerAddress(peer))) == 400


def test_channel_and_its_permission_expire() -> None:
    server, _ = make_server()
    agent = allocated(server, client=("203.0.113.3", 3))
    agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(PEER))
    agent.request(Method.REFRESH, Lifetime(3600))
    agent.now = EPOCH + 350
    assert agent.feed(encode_channel_data(0x4001, b"x")) == []  # permission gone at 300 s
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER))  # until 650 s
    assert agent.feed(encode_channel_data(0x4001, b"x")) != []
    agent.now = EPOCH + 601
    server.handle_timer(agent.now)
    assert agent.feed(encode_channel_data(0x4001, b"x")) == []  # channel gone at 600 s
    (raw,) = agent.from_peer(b"y")
    assert data_indication(raw) == (PEER, b"y")
    # The number is free again, for any peer.
    assert code(agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001),
                              XorPeerAddress(("192.0.2.60", 1)))) is None


def test_rate_limit_per_node() -> None:
    server, _ = make_server(replace(CONFIG, bytes_per_s_per_node=1000))
    agent = allocated(server)
    agent.request(Method.CREATE_PERMISSION, XorPeerAddress(PEER))
    assert agent.send_indication(PEER, bytes(600)) != []
    assert agent.from_peer(bytes(600)) == []  # both directions share the budget
    agent.now += 0.5
    assert agent.from_peer(bytes(600)) != []
    assert server.metrics.dropped_rate_limited == 1


# --- composition, TCP, misc --------------------------------------------------------------------


def test_binding_goes_to_the_stun_server() -> None:
    server, _ = make_server()
    agent = Agent(server)
    response = agent.request(Method.BINDING, auth=False)
    assert response.get(XorMappedAddress) == XorMappedAddress(CLIENT)
    tcp = Agent(server, transport=Transport.TCP)
    assert tcp.request(Method.BINDING, auth=False).get(XorMappedAddress) == XorMappedAddress(
        CLIENT)
    # Binding on the alternate port too (every STUN socket listens for TURN as well).
    data = encode_message(StunMessage(MessageClass.REQUEST, Method.BINDING, bytes(12)))
    (t,) = server.handle_datagram(data, CLIENT, (P, 3479), EPOCH)
    assert isinstance(t, Transmit) and t.source == (P, 3479)


def test_tcp_allocation_pads_and_dies_with_the_connection() -> None:
    server, ports = make_server()
    agent = Agent(server, transport=Transport.TCP)
    agent.challenge()
    request = encode_message(StunMessage(
        MessageClass.REQUEST, Method.ALLOCATE, agent.txid(),
        (RequestedTransport(PROTOCOL_UDP), Username(agent.credentials.username), Realm(REALM),
         Nonce(agent.nonce or b""))), key=agent.key)
    outputs: list[Output] = []
    for i in range(len(request)):  # byte by byte
        outputs += agent.feed(request[i : i + 1])
    (raw,) = agent.to_client(outputs)
    relayed = parse_message(raw).get(XorRelayedAddress)
    assert relayed is not None
    agent.relayed = relayed.address
    agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(PEER))
    (raw,) = agent.from_peer(b"abcde")
    assert raw == encode_channel_data(0x4001, b"abcde", pad=True)  # 4 + 5 + 3 padding
    assert parse_channel_data(raw) == ChannelData(0x4001, b"abcde")
    out = agent.feed(encode_channel_data(0x4001, b"xyz", pad=True)
                     + encode_channel_data(0x4001, b"12345678", pad=True))
    assert [o.data for o in out if isinstance(o, Transmit)] == [b"xyz", b"12345678"]
    server.connection_lost(agent.flow, agent.now)
    assert server.allocations == 0 and not ports.opened
    server.connection_lost(agent.flow, agent.now)  # idempotent


def test_udp_and_tcp_allocations_of_one_address_pair_are_separate() -> None:
    server, _ = make_server()
    udp = allocated(server)
    tcp = allocated(server, transport=Transport.TCP)  # same client address and port, over TCP
    assert udp.relayed != tcp.relayed and server.allocations == 2
    for agent in (udp, tcp):
        agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(PEER))
    server.connection_lost(tcp.flow, EPOCH)
    assert server.allocations == 1
    assert udp.feed(encode_channel_data(0x4001, b"x")) == [Transmit(udp.relayed, PEER, b"x")]  # type: ignore[arg-type]


def test_tcp_garbage_closes_the_connection() -> None:
    server, _ = make_server()
    agent = allocated(server, transport=Transport.TCP)
    out = agent.feed(b"\xff\x00\x00\x00garbage")
    assert out == [StreamClose(agent.flow, "stream byte 0xff starts neither STUN nor "
                                           "ChannelData")]
    assert server.allocations == 0


def test_unknown_methods_and_classes() -> None:
    server, _ = make_server()
    agent = Agent(server)
    assert code(agent.request(0x00A, auth=False)) == 400  # 0x00A: CONNECT (RFC 6062), absent
    for message_class, method in [(MessageClass.SUCCESS, Method.ALLOCATE),
                                  (MessageClass.INDICATION, Method.DATA),
                                  (MessageClass.INDICATION, Method.SEND)]:
        data = encode_message(StunMessage(message_class, method, bytes(12)))
        assert agent.feed(data) == []
    assert server.handle_datagram(b"x", CLIENT, ("192.0.2.1", 9), EPOCH) == []


def test_samples_name_every_counter() -> None:
    server, _ = make_server()
    allocated(server)
    names = {name for name, _, _ in server.samples()}
    assert {"meshd_relay_allocations", "meshd_relay_bytes_total",
            "meshd_relay_auth_failures_total", "meshd_relay_errors_total",
            "meshd_relay_dropped_total"} <= names


@pytest.mark.parametrize(
    "change",
    [
        {"secrets": ()}, {"secrets": (b"",)}, {"relay_ip": "nope"},
        {"relay_ip": "0.0.0.0"}, {"external_ip": "2001:db8::1"}, {"min_port": 0},
        {"min_port": 6000, "max_port": 5000}, {"quota_per_node": 0},
        {"bytes_per_s_per_node": -1}, {"default_lifetime_s": 4000},
        {"permission_lifetime_s": 0}, {"max_permissions": 0}, {"denied_peers": ("x",)},
    ],
)
def test_config_validation(change: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        replace(CONFIG, **change)  # type: ignore[arg-type]


def test_wildcard_relay_ip_with_external_ip() -> None:
    config = replace(CONFIG, relay_ip="0.0.0.0", external_ip="203.0.113.200")
    server, ports = make_server(config)
    agent = allocated(server)
    assert agent.relayed is not None and agent.relayed[0] == "203.0.113.200"
    assert ports.opened == {("0.0.0.0", agent.relayed[1])}


# --- fuzz: peer and client garbage never raises ------------------------------------------------

garbage = st.one_of(
    st.binary(max_size=120),
    st.binary(max_size=60).map(lambda b: b"\x40\x01" + b),
    st.binary(max_size=60).map(lambda b: b"\x00\x16" + len(b).to_bytes(2, "big")
                               + b"\x21\x12\xa4\x42" + bytes(12) + b),
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.sampled_from(["client", "peer", "tcp"]), garbage), max_size=12))
def test_garbage_never_raises(inputs: list[tuple[str, bytes]]) -> None:
    server, _ = make_server(replace(CONFIG, allow_loopback_peers=True))
    agent = allocated(server)
    tcp = allocated(server, client=("203.0.113.5", 5), transport=Transport.TCP)
    agent.request(Method.CHANNEL_BIND, ChannelNumber(0x4001), XorPeerAddress(PEER))
    assert agent.relayed is not None
    for where, data in inputs:
        if where == "client":
            server.handle_datagram(data, CLIENT, LISTEN, EPOCH + 1)
        elif where == "peer":
            server.handle_datagram(data, PEER, agent.relayed, EPOCH + 1)
        else:
            server.stream_received(tcp.flow, data, EPOCH + 1)
