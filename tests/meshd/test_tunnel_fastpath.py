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
from meshd.tunnel.session import DecryptedPackets, Rejected, RejectReason, TunnelSession
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


def install(side: Side, peer: Side, key: int = 1, *, until: float | None = None) -> FastRoute:
    route = side.session.fast_route(time.monotonic(), peer.udp.getsockname())
    assert route is not None
    side.fast.set_peer(key, overlay=route.overlay, remote_index=route.remote_index,
                       send_key=route.send_key, counter=route.counter,
                       send_limit=route.send_limit, send_fragments=route.send_fragments,
                       local_index=route.local_index, receive_key=route.receive_key,
                       replay=route.replay, endpoint=route.endpoint,
                       until=route.until if until is None else until)
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
    tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx = stats[1]
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
                    replay=route.replay, endpoint=route.endpoint, until=route.until)
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
