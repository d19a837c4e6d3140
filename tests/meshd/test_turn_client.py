"""meshd.turn.client: the sans-I/O TURN client against a scripted server (every answer typed in
here), with a virtual clock."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.stun.codec import (
    PROTOCOL_UDP,
    Attribute,
    ChannelNumber,
    Data,
    ErrorCode,
    Lifetime,
    MessageClass,
    Method,
    Nonce,
    Realm,
    RequestedTransport,
    StunMessage,
    Username,
    XorMappedAddress,
    XorPeerAddress,
    XorRelayedAddress,
    encode_message,
    long_term_key,
    parse_message,
    verify_integrity,
)
from meshd.stun.transaction import RetransmitPolicy
from meshd.turn.client import (
    MAX_QUEUED_SENDS,
    TRANSITIONS,
    Allocated,
    AllocationClosed,
    AllocationFailed,
    AllocationLost,
    AllocationRefreshed,
    ChannelBindFailed,
    ChannelBound,
    ClientState,
    DataReceived,
    PermissionCreated,
    PermissionFailed,
    TurnClient,
    TurnClientConfig,
    TurnClientError,
    TurnEvent,
)
from meshd.turn.credentials import TurnCredentials, mint_credentials
from meshd.turn.framing import encode_channel_data, parse_channel_data
from meshd.turn.server import Transport
from meshd.udp import Address

SERVER: Address = ("198.51.100.1", 3478)
LOCAL: Address = ("10.0.0.2", 40000)
RELAYED: Address = ("198.51.100.1", 50000)
MAPPED: Address = ("203.0.113.7", 40000)
PEER: Address = ("192.0.2.50", 6000)
REALM = "edgeweave"
NONCE = b"nonce-1"
T0 = 1_700_000_000.0
CREDS = mint_credentials(b"secret", "node-a", T0, 3600)
KEY = long_term_key(CREDS.username, REALM, CREDS.password)


class Script:
    """The server side, typed in: read the client's requests, answer them."""

    def __init__(self, config: TurnClientConfig | None = None,
                 credentials: TurnCredentials = CREDS) -> None:
        self.client = TurnClient(SERVER, credentials, local=LOCAL, config=config,
                                 rng=random.Random(3))
        self.now = T0

    def sent(self) -> list[bytes]:
        out = self.client.datagrams_to_send(self.now)
        assert all((t.source, t.destination) == (LOCAL, SERVER) for t in out)
        return [t.data for t in out]

    def requests(self) -> list[StunMessage]:
        return [parse_message(d) for d in self.sent()]

    def one(self) -> StunMessage:
        (request,) = self.requests()
        return request

    def answer(self, request: StunMessage, *attributes: Attribute,
               message_class: MessageClass = MessageClass.SUCCESS,
               key: bytes | None = KEY) -> None:
        response = StunMessage(message_class, request.method, request.transaction_id,
                               attributes)
        self.feed(encode_message(response, key=key))

    def error(self, request: StunMessage, code: int, *attributes: Attribute,
              key: bytes | None = KEY) -> None:
        self.answer(request, ErrorCode(code, "x"), *attributes,
                    message_class=MessageClass.ERROR, key=key)

    def feed(self, data: bytes, source: Address = SERVER) -> None:
        self.client.handle_datagram(data, source, self.now)

    def events(self) -> list[TurnEvent]:
        out = []
        while (event := self.client.next_event()) is not None:
            out.append(event)
        return out

    def tick(self, to: float) -> None:
        self.now = to
        self.client.handle_timer(to)

    def allocated(self, lifetime: int = 600) -> None:
        self.client.allocate(self.now)
        self.error(self.one(), 401, Realm(REALM), Nonce(NONCE), key=None)
        self.answer(self.one(), XorRelayedAddress(RELAYED), Lifetime(lifetime),
                    XorMappedAddress(MAPPED))
        assert self.events() == [Allocated(RELAYED, MAPPED, lifetime)]


def state_of(client: TurnClient) -> ClientState:
    return client.state


def test_transition_table_is_complete_and_enforced() -> None:
    assert {s for s, _ in TRANSITIONS} | set(TRANSITIONS.values()) == set(ClientState)
    script = Script()
    with pytest.raises(TurnClientError):
        script.client.send(b"x", PEER, T0)
    script.client.close(T0)  # nothing to close yet: a no-op
    script.client.allocate(T0)
    with pytest.raises(TurnClientError, match="cannot allocate"):
        script.client.allocate(T0)


def test_allocate_with_the_401_dance() -> None:
    script = Script()
    script.client.allocate(T0)
    first = script.one()
    assert (first.method, first.message_class) == (Method.ALLOCATE, MessageClass.REQUEST)
    assert first.get(RequestedTransport) == RequestedTransport(PROTOCOL_UDP)
    assert first.get(Lifetime) == Lifetime(600)
    assert first.integrity is None and first.get(Username) is None
    script.error(first, 401, Realm(REALM), Nonce(NONCE), key=None)
    (raw,) = script.sent()
    second = parse_message(raw)
    assert second.transaction_id != first.transaction_id
    assert second.get(Username) == Username(CREDS.username)
    assert (second.get(Realm), second.get(Nonce)) == (Realm(REALM), Nonce(NONCE))
    assert verify_integrity(raw, KEY)
    script.answer(second, XorRelayedAddress(RELAYED), Lifetime(600), XorMappedAddress(MAPPED))
    assert script.events() == [Allocated(RELAYED, MAPPED, 600)]
    assert script.client.state is ClientState.ALLOCATED
    assert (script.client.relayed_address, script.client.mapped_address) == (RELAYED, MAPPED)
    assert script.client.get_timer() == T0 + 540  # refresh a minute before expiry


def test_retransmissions_then_timeout() -> None:
    policy = RetransmitPolicy(initial_rto_s=0.5, transmissions=4, give_up_s=5.0)
    script = Script(TurnClientConfig(retransmit=policy))
    script.client.allocate(T0)
    sent_at = []
    while script.client.state is ClientState.ALLOCATING:
        if script.sent():
            sent_at.append(script.now - T0)
        timer = script.client.get_timer()
        assert timer is not None
        script.tick(timer)
    assert sent_at == [0.0, 0.5, 1.5, 3.5]  # RFC 5389 §7.2.1 doubling
    assert script.events() == [AllocationFailed(None, "no answer")]
    assert script.client.state is ClientState.FAILED


def test_tcp_sends_once_and_pads_channel_data() -> None:
    script = Script(TurnClientConfig(transport=Transport.TCP))
    script.client.allocate(T0)
    assert len(script.sent()) == 1
    script.tick(T0 + 10)
    assert script.sent() == []
    script.tick(T0 + 39.5)
    assert script.events() == [AllocationFailed(None, "no answer")]
    tcp = Script(TurnClientConfig(transport=Transport.TCP))
    tcp.client.allocate(T0)
    challenge = StunMessage(MessageClass.ERROR, Method.ALLOCATE, tcp.one().transaction_id,
                            (ErrorCode(401, "x"), Realm(REALM), Nonce(NONCE)))
    data = encode_message(challenge)
    for i in range(len(data)):
        tcp.client.receive_stream(data[i : i + 1], T0)
    request = tcp.one()
    ok = StunMessage(MessageClass.SUCCESS, Method.ALLOCATE, request.transaction_id,
                     (XorRelayedAddress(RELAYED), Lifetime(600), XorMappedAddress(MAPPED)))
    tcp.client.receive_stream(encode_message(ok, key=KEY), T0)
    assert tcp.events() == [Allocated(RELAYED, MAPPED, 600)]
    tcp.client.bind_channel(PEER, T0)
    bind = tcp.one()
    tcp.client.receive_stream(encode_message(StunMessage(
        MessageClass.SUCCESS, Method.CHANNEL_BIND, bind.transaction_id), key=KEY), T0)
    tcp.client.send(b"abcde", PEER, T0)
    (frame,) = tcp.sent()
    assert frame == encode_channel_data(0x4000, b"abcde", pad=True)
    tcp.client.receive_stream(b"\xff\xff\xff\xff", T0)
    assert tcp.events() == [ChannelBound(PEER, 0x4000),
                            AllocationLost("stream framing lost: stream byte 0xff starts "
                                           "neither STUN nor ChannelData")]
    with pytest.raises(TurnClientError):
        Script().client.receive_stream(b"", T0)


def test_forged_or_unsigned_responses_are_ignored() -> None:
    script = Script()
    script.client.allocate(T0)
    script.error(script.one(), 401, Realm(REALM), Nonce(NONCE), key=None)
    request = script.one()
    ok = (XorRelayedAddress(RELAYED), Lifetime(600), XorMappedAddress(MAPPED))
    script.answer(request, *ok, key=b"forged")
    script.answer(request, *ok, key=None)
    script.error(request, 486, key=b"forged")
    assert script.events() == [] and script.client.dropped == 3
    script.error(request, 486, key=None)  # unsigned errors are believed (cannot do better)
    assert script.events() == [AllocationFailed(486, "x")]


def test_wrong_credentials_fail_after_one_retry() -> None:
    script = Script()
    script.client.allocate(T0)
    script.error(script.one(), 401, Realm(REALM), Nonce(NONCE), key=None)
    script.error(script.one(), 401, Realm(REALM), Nonce(NONCE), key=None)
    assert script.events() == [AllocationFailed(401, "x")]


def test_stale_nonce_is_retried_with_the_new_nonce() -> None:
    script = Script()
    script.allocated()
    script.client.create_permission(PEER[0], script.now)
    script.error(script.one(), 438, Nonce(b"nonce-2"), key=None)
    (raw,) = script.sent()
    assert parse_message(raw).get(Nonce) == Nonce(b"nonce-2")
    assert verify_integrity(raw, KEY)
    script.answer(parse_message(raw))
    assert script.events() == [PermissionCreated(PEER[0])]
    assert script.client.permissions == frozenset({PEER[0]})


def test_allocate_success_without_required_attributes_fails() -> None:
    script = Script()
    script.client.allocate(T0)
    script.error(script.one(), 401, Realm(REALM), Nonce(NONCE), key=None)
    script.answer(script.one(), XorRelayedAddress(RELAYED))
    (event,) = script.events()
    assert isinstance(event, AllocationFailed) and event.code is None


def test_refresh_schedule_and_loss() -> None:
    script = Script()
    script.allocated(lifetime=600)
    script.tick(T0 + 540)
    refresh = script.one()
    assert (refresh.method, refresh.get(Lifetime)) == (Method.REFRESH, Lifetime(600))
    script.answer(refresh, Lifetime(300))
    assert script.events() == [AllocationRefreshed(300)]
    assert script.client.expires == T0 + 840
    assert script.client.get_timer() == T0 + 840 - 60
    script.tick(T0 + 780)
    script.error(script.one(), 437)
    assert script.events() == [AllocationLost("refresh refused: 437 x")]
    assert script.client.state is ClientState.FAILED


def test_unanswered_refresh_is_retried_until_expiry() -> None:
    policy = RetransmitPolicy(initial_rto_s=1, transmissions=1, give_up_s=2)
    script = Script(TurnClientConfig(retransmit=policy, refresh_before_s=20))
    script.allocated(lifetime=100)
    script.tick(T0 + 80)
    assert script.one().method == Method.REFRESH
    script.tick(T0 + 82)  # timed out; next try halfway to expiry
    assert script.client.get_timer() == T0 + 91
    script.tick(T0 + 91)
    assert script.one().method == Method.REFRESH
    script.tick(T0 + 93)
    script.tick(T0 + 100)
    events = script.events()
    assert events[-1] == AllocationLost("allocation expired before a refresh succeeded")


def test_data_paths_and_what_is_dropped() -> None:
    script = Script()
    script.allocated()
    data_ind = StunMessage(MessageClass.INDICATION, Method.DATA, bytes(12),
                           (XorPeerAddress(PEER), Data(b"hi")))
    script.feed(encode_message(data_ind))  # no permission asked for PEER: dropped
    script.feed(encode_message(data_ind), source=("192.0.2.1", 3478))  # not the server
    script.feed(encode_channel_data(0x4000, b"unbound"))
    script.feed(b"\x00\x01garbage")
    assert script.events() == [] and script.client.dropped == 4
    script.client.create_permission(PEER[0], script.now)
    script.feed(encode_message(data_ind))
    assert script.events() == [DataReceived(PEER, b"hi", None)]
    script.requests()
    number = script.client.bind_channel(PEER, script.now)
    assert number == 0x4000 and script.client.bind_channel(PEER, script.now) == number
    bind = script.one()
    assert bind.get(ChannelNumber) == ChannelNumber(0x4000)
    assert bind.get(XorPeerAddress) == XorPeerAddress(PEER)
    script.feed(encode_channel_data(0x4000, b"early"))  # before the success: still accepted
    script.answer(bind)
    assert script.events() == [DataReceived(PEER, b"early", 0x4000), ChannelBound(PEER, 0x4000)]
    assert script.client.channels == {PEER: 0x4000}


def test_sends_wait_for_the_permission() -> None:
    script = Script()
    script.allocated()
    for i in range(MAX_QUEUED_SENDS + 2):
        script.client.send(b"%d" % i, PEER, script.now)
    create = script.one()  # only the CreatePermission goes out
    assert create.method == Method.CREATE_PERMISSION
    assert create.get(XorPeerAddress) == XorPeerAddress((PEER[0], 0))
    script.answer(create)
    sends = script.requests()
    assert len(sends) == MAX_QUEUED_SENDS
    assert [s.get(Data) for s in sends] == [Data(b"%d" % i) for i in range(MAX_QUEUED_SENDS)]
    script.client.send(b"now", PEER, script.now)
    (send,) = script.requests()
    assert (send.method, send.message_class) == (Method.SEND, MessageClass.INDICATION)
    assert send.get(XorPeerAddress) == XorPeerAddress(PEER)


def test_permission_and_channel_refreshes() -> None:
    script = Script()
    script.allocated(lifetime=3600)
    script.client.create_permission(PEER[0], script.now)
    script.answer(script.one())
    script.client.bind_channel(("192.0.2.60", 1), script.now)
    script.answer(script.one())
    script.events()
    script.tick(T0 + 240)
    methods = sorted(r.method for r in script.requests())
    assert methods == [Method.CREATE_PERMISSION, Method.CHANNEL_BIND]
    script.client.remove_permission(PEER[0])
    script.tick(T0 + 480)
    assert [r.method for r in script.requests()] == []  # the channel's refresh is in flight


def test_refused_permission_and_channel() -> None:
    script = Script()
    script.allocated()
    script.client.create_permission("127.0.0.1", script.now)
    script.error(script.one(), 403)
    script.client.bind_channel(PEER, script.now)
    script.error(script.one(), 400)
    assert script.events() == [PermissionFailed("127.0.0.1", 403, "x"),
                               ChannelBindFailed(PEER, 0x4000, 400, "x")]
    assert script.client.bind_channel(PEER, script.now) == 0x4001  # numbers are not reused


def test_requests_made_before_the_allocation_wait_for_it() -> None:
    script = Script()
    script.client.create_permission(PEER[0], T0)
    script.client.bind_channel(("192.0.2.60", 1), T0)
    script.allocated()
    methods = sorted(r.method for r in script.requests())
    assert methods == [Method.CREATE_PERMISSION, Method.CHANNEL_BIND]


@pytest.mark.parametrize("outcome", ["success", "437", "timeout"])
def test_close(outcome: str) -> None:
    policy = RetransmitPolicy(initial_rto_s=1, transmissions=1, give_up_s=2)
    script = Script(TurnClientConfig(retransmit=policy))
    script.allocated()
    script.client.close(script.now)
    delete = script.one()
    assert (delete.method, delete.get(Lifetime)) == (Method.REFRESH, Lifetime(0))
    assert state_of(script.client) is ClientState.DELETING
    if outcome == "success":
        script.answer(delete, Lifetime(0))
    elif outcome == "437":
        script.error(delete, 437)
    else:
        script.tick(script.now + 2)
    assert script.events() == [AllocationClosed()]
    assert state_of(script.client) is ClientState.CLOSED
    with pytest.raises(TurnClientError):
        script.client.create_permission(PEER[0], script.now)


def test_close_while_allocating() -> None:
    script = Script()
    script.client.allocate(T0)
    script.client.close(T0)
    assert script.events() == [AllocationClosed()]
    assert script.client.get_timer() is None


def test_update_credentials() -> None:
    script = Script()
    script.allocated()
    fresh = mint_credentials(b"secret", "node-a", T0 + 3000, 3600)
    script.client.update_credentials(fresh)
    script.client.create_permission(PEER[0], script.now)
    (raw,) = script.sent()
    assert parse_message(raw).get(Username) == Username(fresh.username)
    assert verify_integrity(raw, long_term_key(fresh.username, REALM, fresh.password))


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        TurnClientConfig(lifetime_s=0)
    with pytest.raises(ValueError):
        TurnClientConfig(family=9)
    assert replace(TurnClientConfig(), transport=Transport.TCP).policy().transmissions == 1


@given(st.lists(st.binary(max_size=80), max_size=10), st.sampled_from(["idle", "allocating",
                                                                      "allocated"]))
def test_garbage_never_raises(datagrams: list[bytes], state: str) -> None:
    script = Script()
    if state == "allocating":
        script.client.allocate(T0)
    elif state == "allocated":
        script.allocated()
        script.client.bind_channel(PEER, T0)
    for data in datagrams:
        script.feed(data)
        script.feed(b"\x40\x00" + data)
    tcp = Script(TurnClientConfig(transport=Transport.TCP))
    for data in datagrams:
        tcp.client.receive_stream(data, T0)


def test_parse_channel_data_of_client_frames() -> None:
    script = Script()
    script.allocated()
    script.client.bind_channel(PEER, T0)
    script.answer(script.one())
    script.client.send(b"x", PEER, T0)
    (frame,) = script.sent()
    assert parse_channel_data(frame).channel == 0x4000
