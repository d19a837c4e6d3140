"""meshd.tunnel.fastpath: the native thread and the Python sessions sharing one keypair.

Two `TunnelSession`s with real keys (a handshake), each with a `FastPath` on a real UDP socket
on loopback and an AF_UNIX datagram pair standing in for its TUN device (reads and writes keep
packet boundaries like a TUN device's). The routes come from `TunnelSession.fast_route`, as
the agent installs them; the Python side sends and receives with the same keys at the same
time, as the agent does for everything the thread hands over.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from meshd.tunnel import fastpath
from meshd.tunnel.fastpath import FastRoute, FastStats
from meshd.tunnel.session import (
    DecryptedPackets,
    Rejected,
    RejectReason,
    State,
    Trigger,
    TunnelSession,
)
from meshd.tunnel.throughput import A, B, _handshake, _pair

pytestmark = pytest.mark.skipif(not fastpath.AVAILABLE,
                                reason="meshd.tunnel._fastpath is not built")


def packet(src: bytes, dst: bytes, marker: bytes) -> bytes:
    """An IPv4/UDP packet carrying `marker`."""
    size = 28 + len(marker)
    return struct.pack("!BBHIBBH4s4sHHHH", 0x45, 0, size, 0, 64, 17, 0, src, dst,
                       40000, 7, 8 + len(marker), 0) + marker


@dataclass
class Side:
    session: TunnelSession
    udp: socket.socket
    tun: socket.socket
    """Our end of the fake TUN device (what the kernel's stack would read and write)."""
    device: socket.socket
    """The thread's end (the TUN fd)."""
    fast: Any


@pytest.fixture
def sides() -> Iterator[tuple[Side, Side]]:
    a_session, b_session = _pair()()
    now = time.monotonic()
    _handshake(a_session, b_session, now)
    assert a_session.can_send and b_session.can_send
    made: list[Side] = []
    try:
        for session in (a_session, b_session):
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("127.0.0.1", 0))
            udp.setblocking(False)
            ours, device = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            device.setblocking(False)
            fast = fastpath.NATIVE.FastPath(udp.fileno(), device.fileno(), frames=False,
                                            check_source=True, fragment_part=1406)
            made.append(Side(session, udp, ours, device, fast))
        for side in made:
            side.fast.start()
        yield made[0], made[1]
    finally:
        for side in made:
            side.fast.close()
            side.udp.close()
            side.device.close()
            side.tun.close()


def install(side: Side, peer: Side, key: int = 1, *, until: float | None = None,
            receive_until: float | None = None) -> FastRoute:
    """The session's route as the agent installs it; `until` overrides both deadlines,
    `receive_until` the receive one (the sessions' clock is time.monotonic())."""
    route = side.session.fast_route(time.monotonic(), peer.udp.getsockname())
    assert route is not None
    send_until = route.send_until if until is None else until
    if receive_until is None:
        receive_until = route.receive_until if until is None else until
    side.fast.set_peer(key, overlay=route.overlay, remote_index=route.remote_index,
                       send_key=route.send_key, counter=route.counter,
                       send_limit=route.send_limit, send_fragments=route.send_fragments,
                       local_index=route.local_index, receive_key=route.receive_key,
                       replay=route.replay, endpoint=route.endpoint, send_until=send_until,
                       receive_until=receive_until)
    return route


def read_tun(side: Side, timeout: float = 2.0) -> bytes:
    ready, _, _ = select.select([side.tun], [], [], timeout)
    assert ready, "nothing reached the TUN device"
    return side.tun.recv(65536)


def handed(side: Side, timeout: float = 2.0) -> tuple[list[bytes], list[Any]]:
    """What the thread handed to Python (waits for the eventfd)."""
    ready, _, _ = select.select([side.fast.fileno()], [], [], timeout)
    assert ready, "nothing was handed over"
    result: tuple[list[bytes], list[Any]] = side.fast.drain()
    side.fast.release()
    return result


def test_lone_packets_cross_natively_both_ways(sides: tuple[Side, Side]) -> None:
    a, b = sides
    install(a, b)
    install(b, a)
    there = packet(A.packed, B.packed, b"ping")
    a.tun.send(there)
    assert read_tun(b) == there
    back = packet(B.packed, A.packed, b"pong")
    b.tun.send(back)
    assert read_tun(a) == back
    assert a.fast.counters()["fast_tx"] == 1 and a.fast.counters()["fast_rx"] == 1
    stats = a.fast.take_stats()
    tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx, auth_failed = stats[1]
    assert auth_failed == 0
    assert (tx_packets, tx_bytes, rx_packets, rx_bytes) == (1, len(there), 1, len(back))
    assert 0 < last_tx <= time.monotonic() and 0 < last_rx <= time.monotonic()
    assert a.fast.take_stats() == {}  # deltas: nothing since
    before = a.session.stats()
    a.session.fast_account(FastStats(tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes,
                                     last_rx))
    assert a.session.stats().packets_sent == before.packets_sent + 1


def test_python_and_native_senders_share_the_counter(sides: tuple[Side, Side]) -> None:
    """Interleaved sends from both sides of one keypair never reuse a counter: the receiver's
    replay window (shared with its own thread) accepts every one of them."""
    a, b = sides
    install(a, b)
    install(b, a)
    peer = b.udp.getsockname()
    sent: list[bytes] = []
    for i in range(50):
        p = packet(A.packed, B.packed, b"n%03d" % i)
        sent.append(p)
        if i % 2:
            a.tun.send(p)  # the thread seals it
        else:
            for d in a.session.encrypt([p], time.monotonic()):
                a.udp.sendto(d, peer)
    got = [read_tun(b) for _ in sent]
    assert sorted(got) == sorted(sent)
    assert b.fast.counters()["fast_rx"] == 50


def test_a_replay_is_delivered_once_whichever_side_sees_it(sides: tuple[Side, Side]) -> None:
    a, b = sides
    install(b, a)
    p = packet(A.packed, B.packed, b"once")
    (datagram,) = a.session.encrypt([p], time.monotonic())
    a.udp.sendto(datagram, b.udp.getsockname())
    assert read_tun(b) == p
    a.udp.sendto(datagram, b.udp.getsockname())  # the replay: the thread hands it over
    _, reads = handed(b)
    assert [r[0] for r in reads] == [datagram]
    assert reads[0][2] == a.udp.getsockname()
    events = b.session.receive(datagram, time.monotonic())
    assert any(isinstance(e, Rejected) and e.reason is RejectReason.REPLAYED for e in events)
    assert not any(isinstance(e, DecryptedPackets) for e in events)


def test_python_receives_what_the_thread_sent_and_the_window_is_shared(
        sides: tuple[Side, Side]) -> None:
    """Without a route on b, b's thread hands everything over; b's Python session opens the
    natively sealed datagram; then a route on b refuses the same counter (marked by Python)."""
    a, b = sides
    install(a, b)
    p = packet(A.packed, B.packed, b"to python")
    a.tun.send(p)
    _, reads = handed(b)
    (datagram, segment, source) = reads[0]
    assert segment == 0 and source == a.udp.getsockname()
    events = b.session.receive(datagram, time.monotonic())
    assert [e.packets for e in events if isinstance(e, DecryptedPackets)] == [(p,)]
    install(b, a)
    a.udp.sendto(datagram, b.udp.getsockname())
    handed(b)  # refused natively (Python marked it), handed over, nothing written
    assert b.fast.counters()["fast_rx"] == 0


def test_past_until_and_a_used_up_counter_hand_packets_to_python(
        sides: tuple[Side, Side]) -> None:
    """From `until` on (rekey due, keys expiring) or at the send limit, the thread only hands
    over: Python starts the rekey and carries the packets meanwhile."""
    a, b = sides
    install(a, b, until=time.monotonic() - 1)
    p = packet(A.packed, B.packed, b"late")
    a.tun.send(p)
    packets, _ = handed(a)
    assert packets == [p]
    route = install(a, b)
    a.fast.set_peer(1, overlay=route.overlay, remote_index=route.remote_index,
                    send_key=route.send_key, counter=route.counter,
                    send_limit=route.counter.value, send_fragments=False,
                    local_index=route.local_index, receive_key=route.receive_key,
                    replay=route.replay, endpoint=route.endpoint,
                    send_until=route.send_until, receive_until=route.receive_until)
    a.tun.send(p)
    packets, _ = handed(a)
    assert packets == [p]
    assert a.fast.counters()["fast_tx"] == 0


def test_spoofed_inner_source_and_unknown_keys_are_handed_over(
        sides: tuple[Side, Side]) -> None:
    a, b = sides
    install(b, a)
    spoofed = packet(b"\x0a\x00\x00\x09", B.packed, b"spoof")
    (datagram,) = a.session.encrypt([spoofed], time.monotonic())
    a.udp.sendto(datagram, b.udp.getsockname())
    _, reads = handed(b)
    assert reads[0][0] == datagram
    events = b.session.receive(datagram, time.monotonic())
    assert any(isinstance(e, Rejected) and e.reason is RejectReason.SPOOFED_SOURCE
               for e in events)
    b.fast.remove_peer(1)
    b.fast.remove_peer(1)  # absent: no error
    fresh = packet(A.packed, B.packed, b"no route")
    (datagram,) = a.session.encrypt([fresh], time.monotonic())
    a.udp.sendto(datagram, b.udp.getsockname())
    _, reads = handed(b)
    assert reads[0][0] == datagram


def test_drained_reads_are_not_overtaken(sides: tuple[Side, Side]) -> None:
    """While Python still holds what `drain()` gave it, later packets of that kind follow it
    through Python (a small packet must not overtake a bulk frame Python is still sending)."""
    a, b = sides
    install(a, b, until=time.monotonic() - 1)
    first = packet(A.packed, B.packed, b"first")
    a.tun.send(first)
    ready, _, _ = select.select([a.fast.fileno()], [], [], 2.0)
    assert ready
    assert a.fast.drain()[0] == [first]  # held: not released yet
    install(a, b)  # now sendable natively ...
    second = packet(A.packed, B.packed, b"second")
    a.tun.send(second)
    packets, _ = handed(a)  # ... but it waits behind the held one
    assert packets == [second] and a.fast.counters()["fast_tx"] == 0
    third = packet(A.packed, B.packed, b"third")
    a.tun.send(third)  # released by `handed`: native again
    deadline = time.monotonic() + 2
    while a.fast.counters()["fast_tx"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert a.fast.counters()["fast_tx"] == 1


def test_an_initiator_past_rekey_at_still_receives_natively(sides: tuple[Side, Side]) -> None:
    """The route's two deadlines are exactly when the session needs the packets: the
    initiator's sends from `rekey_at` (it rekeys on send), what it receives only from the
    later of `rekey_at` and `reject_at` − margin (it rekeys on receive then); the responder's
    both at `reject_at`. Between the two, a one-way inbound flow stays native."""
    a, b = sides
    now = time.monotonic()
    route = a.session.fast_route(now, b.udp.getsockname())
    back = b.session.fast_route(now, a.udp.getsockname())
    assert route is not None and back is not None
    assert route.receive_until > route.send_until  # a initiated the handshake
    assert back.send_until == back.receive_until > route.receive_until  # b's reject_at
    install(a, b, until=now - 1, receive_until=route.receive_until)
    install(b, a)
    inbound = packet(B.packed, A.packed, b"one-way")
    b.tun.send(inbound)
    assert read_tun(a) == inbound  # opened natively although a's send deadline passed
    out = packet(A.packed, B.packed, b"rekey")
    a.tun.send(out)
    packets, _ = handed(a)  # a's sends go to Python: it starts the rekey
    assert packets == [out]
    install(a, b, until=now - 1)  # past the receive deadline too
    b.tun.send(inbound)
    _, reads = handed(a)
    assert len(reads) == 1
    # Python acts at that deadline, not before: a rekey on receive starts there.
    (datagram, _, _), = reads
    fresh, = b.session.encrypt([inbound], now)
    a.session.receive(fresh, route.receive_until - 0.001)
    assert a.session.state is State.ESTABLISHED
    a.session.receive(datagram, route.receive_until)
    assert a.session.history[-1][1:] == (Trigger.REKEY, State.REKEYING)


def test_forged_datagrams_are_dropped_and_counted_as_python_counts_them(
        sides: tuple[Side, Side]) -> None:
    """A forged datagram under the current keys is dropped by the thread and reaches the
    session's rejections as `auth-failed`, as it would through Python; a datagram under the
    previous keypair (another receiver index) still goes to Python, which opens it."""
    a, b = sides
    now = time.monotonic()
    old_packet = packet(A.packed, B.packed, b"old keys")
    (old,) = a.session.encrypt([old_packet], now)  # sealed before the rekey, sent after
    later = now + a.session.config.rekey_after_time + 1
    a.session.encrypt([packet(A.packed, B.packed, b"starts the rekey")], later)
    for d in a.session.datagrams_to_send(later):
        b.session.receive(d, later)
    for d in b.session.datagrams_to_send(later):
        a.session.receive(d, later)
    for d in a.session.encrypt([packet(A.packed, B.packed, b"confirms")], later):
        b.session.receive(d, later)
    route = install(b, a)
    assert struct.unpack_from("!I", old, 1)[0] != route.local_index  # the previous keys
    a.udp.sendto(old, b.udp.getsockname())
    _, reads = handed(b)
    assert [r[0] for r in reads] == [old]
    events = b.session.receive(old, later)
    assert [e.packets for e in events if isinstance(e, DecryptedPackets)] == [(old_packet,)]

    (genuine,) = a.session.encrypt([packet(A.packed, B.packed, b"forged")], later)
    forged = genuine[:-1] + bytes([genuine[-1] ^ 1])
    a.udp.sendto(forged, b.udp.getsockname())
    deadline = time.monotonic() + 2
    while b.fast.counters()["auth_failed"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.fast.counters()["auth_failed"] == 1 and b.fast.counters()["handed_udp"] == 1
    *_, auth_failed = b.fast.take_stats()[1]
    b.session.fast_account(FastStats(0, 0, None, 0, 0, None, auth_failed))
    assert b.session.stats().rejected == {"auth-failed": 1}
    events = b.session.receive(forged, later)  # what Python does with the same datagram
    assert [e.reason for e in events if isinstance(e, Rejected)] == [RejectReason.AUTH_FAILED]
    assert b.session.stats().rejected == {"auth-failed": 2}
    a.udp.sendto(genuine, b.udp.getsockname())  # the genuine one was not marked: delivered
    assert read_tun(b) == packet(A.packed, B.packed, b"forged")
