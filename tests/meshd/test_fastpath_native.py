"""meshd.tunnel._fastpath: the native fast path against the wire format and the Python classes.

The TUN device is played by a datagram socketpair (reads and writes keep packet boundaries as
TUN's do): the test writes "kernel" packets into one end and reads what the fast path delivers
from it. The peer is a UDP socket on loopback that seals and opens with `cryptography`'s
ChaCha20Poly1305 and the nonce rule of meshd.tunnel.wire, so every byte the C code puts on the
wire or takes from it is checked against an independent implementation. No root needed.
"""

from __future__ import annotations

import contextlib
import errno
import random
import select
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from meshd.tunnel import replay as py_replay
from meshd.tunnel._fastpath import Counter, FastPath, ReplayWindow
from meshd.tunnel.offload import (
    F_DATA_VALID,
    F_NEEDS_CSUM,
    GSO_TCPV4,
    VNET_HDR,
    OffloadError,
    check_frame,
)
from meshd.tunnel.wire import (
    DATA_HEADER,
    DATA_OVERHEAD,
    FRAGMENT_HEADER,
    FRAGMENT_PART,
    TYPE_DATA,
    TYPE_FRAGMENT,
)

TIMEOUT = 5.0
NONCE = struct.Struct("<4xQ")
LOOPBACK = "127.0.0.1"
PEER_OVERLAY = bytes([10, 99, 0, 2])
OWN_OVERLAY = bytes([10, 99, 0, 1])
REMOTE_INDEX = 0x0A0B0C0D
LOCAL_INDEX = 0x01020304
KEY = 7
SOL_UDP = 17
UDP_SEGMENT = 103
UDP_GRO = 104


def ipv4(src: bytes, dst: bytes, payload: bytes = b"payload!", version: int = 4) -> bytes:
    """A UDP-in-IPv4 packet (checksums are not the fast path's business)."""
    total = 20 + 8 + len(payload)
    header = struct.pack("!BBHHHBBH4s4s", version << 4 | 5, 0, total, 1, 0, 64, 17, 0, src, dst)
    return header + struct.pack("!HHHH", 1000, 2000, 8 + len(payload), 0) + payload


def frame(packet: bytes, flags: int = 0, gso: int = 0, start: int = 20, offset: int = 6) -> bytes:
    return VNET_HDR.pack(flags, gso, 0, 0, start, offset) + packet


def seal(key: bytes, counter: int, plain: bytes) -> bytes:
    return ChaCha20Poly1305(key).encrypt(NONCE.pack(counter), plain, None)


def data_datagram(key: bytes, index: int, counter: int, packet: bytes) -> bytes:
    return DATA_HEADER.pack(TYPE_DATA, index, counter) + seal(key, counter, packet)


def fragment_datagram(key: bytes, index: int, counter: int, message: bytes) -> bytes:
    return FRAGMENT_HEADER.pack(TYPE_FRAGMENT, index, counter, 0, 1) + seal(key, counter, message)


def message_datagrams(key: bytes, index: int, counter: int, message: bytes,
                      part: int) -> list[bytes]:
    """The 0xE4 fragments of one message, as TunnelSession._seal_frames cuts it."""
    sealed = seal(key, counter, message)
    count = -(-len(sealed) // part)
    return [FRAGMENT_HEADER.pack(TYPE_FRAGMENT, index, counter, k, count)
            + sealed[k * part:(k + 1) * part] for k in range(count)]


def join_message(key: bytes, datagrams: list[bytes]) -> tuple[int, bytes]:
    """(counter, opened message) of the fragments of one message, checking their headers."""
    _, index, counter, _, count = FRAGMENT_HEADER.unpack_from(datagrams[0])
    assert len(datagrams) == count
    for k, d in enumerate(datagrams):
        assert FRAGMENT_HEADER.unpack_from(d) == (TYPE_FRAGMENT, index, counter, k, count)
    sealed = b"".join(d[FRAGMENT_HEADER.size:] for d in datagrams)
    return counter, ChaCha20Poly1305(key).decrypt(NONCE.pack(counter), sealed, None)


def gso_frame(packet: bytes, gso: int = GSO_TCPV4, gso_size: int = 1340) -> bytes:
    """A super-packet's frame as the kernel's TCP hands it to mesh0 (partial checksum)."""
    return VNET_HDR.pack(F_NEEDS_CSUM, gso, 40, gso_size, 20, 16) + packet


@dataclass
class Rig:
    """A started FastPath between a fake TUN and a loopback UDP socket, and the peer's socket."""

    frames: bool = False
    check_source: bool = True
    fragment_part: int = FRAGMENT_PART
    queue_bytes: int = 8 << 20
    seed: int = 1
    family: int = socket.AF_INET
    gro: bool = False
    busy_poll_us: int = 0
    sock: socket.socket = field(init=False)
    peer: socket.socket = field(init=False)
    kernel: socket.socket = field(init=False)
    tun: socket.socket = field(init=False)
    fp: FastPath = field(init=False)
    send_key: bytes = field(init=False)
    receive_key: bytes = field(init=False)
    counter: Counter = field(init=False)
    replay: ReplayWindow = field(init=False)

    def __post_init__(self) -> None:
        rng = random.Random(self.seed)
        self.send_key, self.receive_key = rng.randbytes(32), rng.randbytes(32)
        host = LOOPBACK if self.family == socket.AF_INET else "::1"
        self.sock = socket.socket(self.family, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        if self.gro:  # as the agent's tunnel socket: coalesced reads
            self.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        self.peer = socket.socket(self.family, socket.SOCK_DGRAM)
        self.peer.bind((host, 0))
        self.peer.settimeout(TIMEOUT)
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.settimeout(TIMEOUT)
        self.tun.setblocking(False)  # as meshd opens /dev/net/tun
        self.fp = FastPath(self.sock.fileno(), self.tun.fileno(), frames=self.frames,
                           check_source=self.check_source, fragment_part=self.fragment_part,
                           queue_bytes=self.queue_bytes, busy_poll_us=self.busy_poll_us)
        self.counter = Counter()
        self.replay = ReplayWindow(2048, limit=2**60)
        self.install()
        self.fp.start()

    def install(self, *, send_limit: int = 2**60, send_fragments: bool = False,
                endpoint: tuple[Any, ...] | bool | None = True, until: float = 1e9,
                receive_until: float | None = None) -> None:
        """`until`: both deadlines, unless `receive_until` is given."""
        self.fp.set_peer(
            KEY, overlay=PEER_OVERLAY, remote_index=REMOTE_INDEX, send_key=self.send_key,
            counter=self.counter, send_limit=send_limit, send_fragments=send_fragments,
            local_index=LOCAL_INDEX, receive_key=self.receive_key, replay=self.replay,
            endpoint=self.peer.getsockname() if endpoint is True else endpoint or None,
            send_until=until, receive_until=until if receive_until is None else receive_until)

    @property
    def address(self) -> tuple[Any, ...]:
        name: tuple[Any, ...] = self.sock.getsockname()
        return name

    @property
    def peer_address(self) -> tuple[Any, ...]:
        name: tuple[Any, ...] = self.peer.getsockname()
        return name

    def from_peer(self, datagram: bytes) -> None:
        self.peer.sendto(datagram, self.address)

    def sent(self) -> bytes:
        """The next datagram the fast path sent to the peer."""
        data, source = self.peer.recvfrom(70000)
        assert source == self.address
        return data

    def delivered(self) -> bytes:
        """The next packet the fast path wrote to the (fake) TUN device."""
        return self.kernel.recv(70000)

    def handed(self, tun: int = 0, udp: int = 0) -> tuple[list[bytes],
                                                          list[tuple[bytes, int, Any]]]:
        """Drain until `tun` TUN reads and `udp` socket reads were handed off (waiting on the
        eventfd), and check nothing more came."""
        tun_reads: list[bytes] = []
        udp_reads: list[tuple[bytes, int, Any]] = []
        deadline = time.monotonic() + TIMEOUT
        while len(tun_reads) < tun or len(udp_reads) < udp:
            left = deadline - time.monotonic()
            assert left > 0, f"handed off {len(tun_reads)}/{tun} TUN, {len(udp_reads)}/{udp} UDP"
            select.select([self.fp.fileno()], [], [], left)
            more_tun, more_udp = self.fp.drain()
            self.fp.release()  # as the agent does once it has sent / written them
            tun_reads += more_tun
            udp_reads += more_udp
        assert (len(tun_reads), len(udp_reads)) == (tun, udp)
        return tun_reads, udp_reads

    def close(self) -> None:
        self.fp.close()
        for s in (self.sock, self.peer, self.kernel, self.tun):
            s.close()


def wait_for(condition: Callable[[], bool]) -> None:
    """Until the fast path thread got somewhere (a real thread: no virtual clock to move)."""
    deadline = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < deadline, "the fast path thread did not get there"
        time.sleep(0.001)


@pytest.fixture
def rigs() -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for rig in made:
        rig.close()


def make(rigs: list[Rig], **kwargs: int | bool) -> Rig:
    rig = Rig(**kwargs)  # type: ignore[arg-type]
    rigs.append(rig)
    return rig


# -- ReplayWindow against meshd.tunnel.replay ---------------------------------------------------

COUNTER_VALUES = st.one_of(
    st.integers(0, 300),
    st.integers(0, 5000),
    st.integers(2**64 - 300, 2**64 - 1),
    st.integers(0, 2**64 - 1),
)


@given(
    bits=st.sampled_from([128, 256, 512, 2048]),
    limit=st.one_of(st.just(2**64), st.integers(-5, 400), st.integers(2**64 - 200, 2**66)),
    ops=st.lists(st.tuples(st.sampled_from(["check", "mark", "accept"]), COUNTER_VALUES),
                 max_size=200),
)
@settings(max_examples=300, deadline=None)
def test_replay_window_agrees_with_the_python_window(
    bits: int, limit: int, ops: list[tuple[str, int]]
) -> None:
    native = ReplayWindow(bits, limit=limit)
    model = py_replay.ReplayWindow(bits, limit=limit)
    assert (native.window, native.limit, native.highest) == (model.window, model.limit, -1)
    base = 0
    for op, raw in ops:
        # Counters near the highest seen reach the window's edges, not just random spots.
        counter = raw if raw > 5000 else min(base + raw - 2500 if raw > 300 else raw, 2**64 - 1)
        counter = max(counter, 0)
        if op == "check":
            assert native.check(counter) == model.check(counter)
        else:  # native mark/accept == Python check-then-mark
            expected = model.accept(counter)
            assert getattr(native, op)(counter) == expected
        assert native.highest == model.highest
        base = max(model.highest, 0)


def test_replay_window_edges() -> None:
    w = ReplayWindow(128)
    assert w.window == 64 and w.limit == 2**64 and w.highest == -1
    assert w.mark(1000) and not w.mark(1000) and not w.accept(1000)
    assert not w.check(1000 - 64) and w.check(1000 - 63)
    assert w.mark(2**64 - 1) and w.highest == 2**64 - 1
    assert not w.check(1000)  # far behind now
    limited = ReplayWindow(128, limit=10)
    assert limited.check(9) and not limited.check(10) and not limited.mark(10)
    assert ReplayWindow(256, limit=-3).check(0) is False
    for bad in (-1, 2**64):
        with pytest.raises(ValueError, match="counter"):
            w.check(bad)


@given(st.one_of(st.integers(-300, 5000), st.sampled_from([2**16, 2**16 + 64, 3 * 2**12])))
@settings(max_examples=300, deadline=None)
def test_replay_window_refuses_the_same_sizes(bits: int) -> None:
    try:
        py_replay.ReplayWindow(bits)
    except ValueError:
        with pytest.raises(ValueError, match="power of two"):
            ReplayWindow(bits)
    else:
        assert ReplayWindow(bits).window == bits - 64


def test_replay_window_mark_is_atomic_across_threads() -> None:
    """Several threads marking the same counters: each counter is accepted exactly once."""
    w = ReplayWindow(2048)
    wins: list[list[int]] = [[] for _ in range(4)]

    def run(mine: list[int]) -> None:
        for c in range(3000):
            if w.mark(c):
                mine.append(c)

    threads = [threading.Thread(target=run, args=(mine,)) for mine in wins]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(c for mine in wins for c in mine) == list(range(3000))


# -- Counter -----------------------------------------------------------------------------------


def test_counter_take_and_value() -> None:
    c = Counter(5)
    assert c.value == 5 and c.take() == 5 and c.take(3) == 6 and c.value == 9
    assert c.take(0) == 9 and c.value == 9
    with pytest.raises(ValueError):
        Counter(-1)
    with pytest.raises(ValueError):
        c.take(-1)
    near_end = Counter(2**64 - 2)
    assert near_end.take() == 2**64 - 2
    with pytest.raises(OverflowError):
        near_end.take(2)


def test_counter_never_hands_out_a_value_twice(rigs: list[Rig]) -> None:
    """Python threads take counters while the fast path thread seals with the same counter."""
    rig = make(rigs)
    taken: list[list[tuple[int, int]]] = [[] for _ in range(3)]
    packets = 400

    def take(mine: list[tuple[int, int]], seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            n = rng.choice((1, 1, 3))
            mine.append((rig.counter.take(n), n))

    threads = [threading.Thread(target=take, args=(mine, i)) for i, mine in enumerate(taken)]
    for t in threads:
        t.start()
    native: list[int] = []
    for _ in range(packets):
        rig.kernel.send(ipv4(OWN_OVERLAY, PEER_OVERLAY))
        native.append(DATA_HEADER.unpack_from(rig.sent())[2])
    for t in threads:
        t.join()
    used = native + [first + k for mine in taken for first, n in mine for k in range(n)]
    assert len(used) == len(set(used)) == rig.counter.value
    assert rig.fp.counters()["fast_tx"] == packets


# -- sending: TUN → UDP -------------------------------------------------------------------------


def test_packet_from_tun_goes_out_as_a_data_datagram(rigs: list[Rig]) -> None:
    rig = make(rigs)
    for counter, size in enumerate((1, 100, 1300)):
        packet = ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(range(256)) * 6)[: 28 + size]
        rig.kernel.send(packet)
        datagram = rig.sent()
        assert datagram[:DATA_HEADER.size] == DATA_HEADER.pack(TYPE_DATA, REMOTE_INDEX, counter)
        assert len(datagram) == len(packet) + DATA_OVERHEAD
        opened = ChaCha20Poly1305(rig.send_key).decrypt(
            NONCE.pack(counter), datagram[DATA_HEADER.size:], None)
        assert opened == packet
    assert rig.counter.value == 3
    counts = rig.fp.counters()
    assert (counts["tun_reads"], counts["fast_tx"], counts["handed_tun"]) == (3, 3, 0)


def test_frame_from_tun_goes_out_as_one_fragment(rigs: list[Rig]) -> None:
    rig = make(rigs, frames=True)
    rig.install(send_fragments=True)
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    for counter, flags in enumerate((0, F_NEEDS_CSUM, F_DATA_VALID, F_NEEDS_CSUM | F_DATA_VALID)):
        f = frame(packet, flags)
        rig.kernel.send(f)
        datagram = rig.sent()
        assert datagram[:FRAGMENT_HEADER.size] == FRAGMENT_HEADER.pack(
            TYPE_FRAGMENT, REMOTE_INDEX, counter, 0, 1)
        opened = ChaCha20Poly1305(rig.send_key).decrypt(
            NONCE.pack(counter), datagram[FRAGMENT_HEADER.size:], None)
        assert opened == f  # the whole frame, virtio header included
    assert rig.fp.take_stats()[KEY][:2] == (4, 4 * len(packet))


def test_fragment_size_limit_is_exact(rigs: list[Rig]) -> None:
    """A sealed frame of exactly fragment_part bytes goes as one part; one byte more as two."""
    rig = make(rigs, frames=True, fragment_part=1406)
    rig.install(send_fragments=True)
    fits = frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(1406 - 16 - 10 - 28)))
    assert len(fits) + 16 == 1406
    rig.kernel.send(fits)
    assert len(rig.sent()) == FRAGMENT_HEADER.size + 1406
    two = frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(1406 - 16 - 10 - 28 + 1)))
    rig.kernel.send(two)
    sent = [rig.sent(), rig.sent()]
    assert [len(d) for d in sent] == [FRAGMENT_HEADER.size + 1406, FRAGMENT_HEADER.size + 1]
    assert join_message(rig.send_key, sent) == (1, two)


def test_a_super_packet_goes_out_as_one_message_in_one_gso_send(rigs: list[Rig]) -> None:
    """A 64 KB GSO frame: sealed once, cut into parts of fragment_part bytes and sent with one
    sendmsg (UDP_SEGMENT), which a GRO socket reads back as one coalesced read."""
    rig = make(rigs, frames=True)
    rig.install(send_fragments=True)
    try:
        rig.peer.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        pytest.skip("no UDP GRO on this kernel")
    big = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(range(256)) * 240))
    assert len(big) > 60_000
    rig.kernel.send(big)
    data, control, _, source = rig.peer.recvmsg(70000, socket.CMSG_SPACE(4))
    assert source == rig.address
    segment = next(int.from_bytes(d, sys.byteorder) for level, kind, d in control
                   if (level, kind) == (SOL_UDP, UDP_GRO))
    assert segment == FRAGMENT_HEADER.size + FRAGMENT_PART
    datagrams = [data[k:k + segment] for k in range(0, len(data), segment)]
    assert len(datagrams) == -(-(len(big) + 16) // FRAGMENT_PART)
    assert join_message(rig.send_key, datagrams) == (0, big)
    wait_for(lambda: rig.fp.counters()["gso_sends"] == 1)  # counted once sendmsg returned
    counts = rig.fp.counters()
    assert (counts["fast_tx"], counts["gso_sends"], counts["handed_tun"]) == (1, 1, 0)
    assert rig.fp.take_stats()[KEY][:2] == (1, len(big) - 10)


def test_frames_too_large_for_one_gso_send_go_to_python(rigs: list[Rig]) -> None:
    """More than 64 parts, or more than one GSO send's 65,000 bytes: Python's business."""
    rig = make(rigs, frames=True, fragment_part=900)
    rig.install(send_fragments=True)
    ok = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(64 * 900 - 16 - 10 - 28)))
    rig.kernel.send(ok)
    assert len([rig.sent() for _ in range(64)]) == 64
    parts_65 = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(64 * 900 - 16 - 10 - 28 + 1)))
    rig.kernel.send(parts_65)
    assert rig.handed(tun=1)[0] == [parts_65]
    wide = make(rigs, frames=True, fragment_part=FRAGMENT_PART)
    wide.install(send_fragments=True)
    def total(sealed: int) -> int:  # the GSO send's bytes: parts and their headers
        return sealed + -(-sealed // FRAGMENT_PART) * FRAGMENT_HEADER.size

    sealed = max(n for n in range(60_000, 65_000) if total(n) <= 65_000)
    parts = -(-sealed // FRAGMENT_PART)
    largest = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(sealed - 16 - 10 - 28)))
    wide.kernel.send(largest)
    assert len([wide.sent() for _ in range(parts)]) == parts
    over = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(sealed - 16 - 10 - 28 + 1)))
    wide.kernel.send(over)
    assert wide.handed(tun=1)[0] == [over]


def test_frames_without_fragments_go_out_stripped_or_to_python(rigs: list[Rig]) -> None:
    rig = make(rigs, frames=True)
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(frame(packet))
    datagram = rig.sent()
    assert datagram[0] == TYPE_DATA
    assert ChaCha20Poly1305(rig.send_key).decrypt(NONCE.pack(0), datagram[13:], None) == packet
    # A partial checksum or a GSO super-packet: Python finishes it (offload.to_packets).
    odd = [frame(packet, F_NEEDS_CSUM), frame(packet, F_DATA_VALID),
           frame(packet, F_NEEDS_CSUM, GSO_TCPV4)]
    for f in odd:
        rig.kernel.send(f)
    assert rig.handed(tun=3)[0] == odd
    rig.install(send_fragments=True)  # with fragments, a one-part GSO frame goes to Python
    gso = frame(packet, F_NEEDS_CSUM, GSO_TCPV4)
    rig.kernel.send(gso)
    assert rig.handed(tun=1)[0] == [gso]
    assert rig.counter.value == 1


def test_what_the_fast_path_does_not_send_goes_to_python_in_order(rigs: list[Rig]) -> None:
    rig = make(rigs)
    other = ipv4(OWN_OVERLAY, bytes([10, 99, 0, 3]))
    ipv6 = ipv4(OWN_OVERLAY, PEER_OVERLAY, version=6)
    short = b"\x45" + bytes(18)
    for p in (other, ipv6, short):
        rig.kernel.send(p)
    assert rig.handed(tun=3)[0] == [other, ipv6, short]
    assert rig.counter.value == 0
    counts = rig.fp.counters()
    assert (counts["tun_reads"], counts["handed_tun"], counts["fast_tx"]) == (3, 3, 0)


def test_a_sendable_packet_waits_behind_handed_off_ones(rigs: list[Rig]) -> None:
    """While earlier TUN reads wait for Python, later ones follow them (packet order)."""
    rig = make(rigs)
    other = ipv4(OWN_OVERLAY, bytes([10, 99, 0, 3]))
    good = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(other)
    rig.kernel.send(good)
    wait_for(lambda: rig.fp.counters()["tun_reads"] == 2)  # nothing drained meanwhile
    assert rig.fp.counters()["handed_tun"] == 2
    tun_reads, _ = rig.handed(tun=2)
    assert tun_reads == [other, good]
    rig.kernel.send(good)  # the queue is empty again: native
    assert rig.sent()[0] == TYPE_DATA


def test_counter_at_send_limit_goes_to_python(rigs: list[Rig]) -> None:
    rig = make(rigs)
    rig.counter.take(10)
    rig.install(send_limit=11)
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(packet)
    assert DATA_HEADER.unpack_from(rig.sent())[2] == 10
    rig.kernel.send(packet)  # counter.value == send_limit: Python starts the rekey
    assert rig.handed(tun=1)[0] == [packet]
    assert rig.counter.value == 11


def test_expired_route_and_no_endpoint_go_to_python(rigs: list[Rig]) -> None:
    rig = make(rigs)
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.install(until=time.monotonic() - 1)
    rig.kernel.send(packet)
    datagram = data_datagram(rig.receive_key, LOCAL_INDEX, 0, ipv4(PEER_OVERLAY, OWN_OVERLAY))
    rig.from_peer(datagram)
    tun_reads, udp_reads = rig.handed(tun=1, udp=1)
    assert tun_reads == [packet] and udp_reads == [(datagram, 0, rig.peer_address)]
    assert rig.replay.highest == -1
    rig.install(endpoint=None)  # receive natively, never send
    rig.kernel.send(packet)
    assert rig.handed(tun=1)[0] == [packet]
    rig.from_peer(datagram)
    assert rig.delivered() == ipv4(PEER_OVERLAY, OWN_OVERLAY)
    rig.fp.remove_peer(KEY)
    rig.fp.remove_peer(KEY)  # absent: no error
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 1, b"x"))
    assert rig.handed(udp=1)


def test_send_and_receive_deadlines_are_separate(rigs: list[Rig]) -> None:
    """An initiator past `rekey_at` (its send deadline) hands what it sends to Python, which
    starts the rekey, but keeps opening what it receives natively until the receive deadline
    (when Python would rekey on receive): a one-way inbound flow stays native."""
    rig = make(rigs)
    now = time.monotonic()
    rig.install(until=now - 1, receive_until=now + 60)
    out = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(out)
    assert rig.handed(tun=1)[0] == [out]
    inbound = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"inbound")
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 0, inbound))
    assert rig.delivered() == inbound
    # The other way round (no such route comes from a session, but the checks are separate).
    rig.install(until=now + 60, receive_until=now - 1)
    late = data_datagram(rig.receive_key, LOCAL_INDEX, 1, inbound)
    rig.from_peer(late)
    assert rig.handed(udp=1)[1] == [(late, 0, rig.peer_address)]
    assert rig.replay.check(1)  # not marked: Python decides
    rig.kernel.send(out)
    assert DATA_HEADER.unpack_from(rig.sent())[2] == 0
    counts = rig.fp.counters()
    assert (counts["fast_tx"], counts["fast_rx"]) == (1, 1)


def test_busy_polling_carries_round_trips_both_ways(rigs: list[Rig]) -> None:
    """With `busy_poll_us` the thread polls between close events instead of sleeping: round
    trips (a packet out, the answer in, the next packet out...) go through it as without, and
    it still sleeps (and stops) when traffic stops."""
    rig = make(rigs, busy_poll_us=2000)
    for n in range(50):
        packet = ipv4(OWN_OVERLAY, PEER_OVERLAY, b"ping %d" % n)
        rig.kernel.send(packet)
        datagram = rig.sent()
        assert ChaCha20Poly1305(rig.send_key).decrypt(
            NONCE.pack(n), datagram[DATA_HEADER.size:], None) == packet
        answer = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"pong %d" % n)
        rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, n, answer))
        assert rig.delivered() == answer
    counts = rig.fp.counters()
    assert (counts["fast_tx"], counts["fast_rx"], counts["handed_tun"],
            counts["handed_udp"]) == (50, 50, 0, 0)
    time.sleep(0.05)  # past the budget: the thread sleeps in poll again
    rig.fp.close()


# -- receiving: UDP → TUN -----------------------------------------------------------------------


@pytest.mark.parametrize("frames", [False, True])
def test_data_datagram_comes_out_of_tun(rigs: list[Rig], frames: bool) -> None:
    rig = make(rigs, frames=frames)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"hello from the peer")
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 5, packet))
    assert rig.delivered() == (bytes(10) + packet if frames else packet)
    assert rig.replay.highest == 5 and not rig.replay.check(5)
    counts = rig.fp.counters()
    assert (counts["udp_reads"], counts["fast_rx"], counts["handed_udp"]) == (1, 1, 0)


@pytest.mark.parametrize("frames", [False, True])
def test_fragment_comes_out_of_tun(rigs: list[Rig], frames: bool) -> None:
    rig = make(rigs, frames=frames)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"a frame")
    plain = frame(packet)
    rig.from_peer(fragment_datagram(rig.receive_key, LOCAL_INDEX, 0, plain))
    assert rig.delivered() == (plain if frames else packet)
    # A partial checksum: as is with frames; without, Python completes it.
    partial = frame(packet, F_NEEDS_CSUM, start=20, offset=6)
    datagram = fragment_datagram(rig.receive_key, LOCAL_INDEX, 1, partial)
    rig.from_peer(datagram)
    if frames:
        assert rig.delivered() == partial
    else:
        assert rig.handed(udp=1)[1] == [(datagram, 0, rig.peer_address)]
        assert rig.replay.check(1)  # not marked: Python decides
    assert rig.fp.take_stats()[KEY][3:5] == (
        (2, 2 * len(packet)) if frames else (1, len(packet)))


def test_bad_frames_go_to_python_unmarked(rigs: list[Rig]) -> None:
    rig = make(rigs, frames=True)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY)
    bad = [
        frame(packet, gso=GSO_TCPV4, flags=F_NEEDS_CSUM),  # GSO: not the fast path's
        frame(packet, flags=0x04),  # unknown flag
        frame(ipv4(PEER_OVERLAY, OWN_OVERLAY, version=5)),  # not IP
        frame(packet, F_NEEDS_CSUM, start=19),  # checksum field before the L4 header
        frame(packet, F_NEEDS_CSUM, start=20, offset=len(packet) - 21),  # past the end
        frame(packet)[:29],  # too short for a frame
        b"",  # empty: a keepalive
    ]
    datagrams = [fragment_datagram(rig.receive_key, LOCAL_INDEX, i, f) for i, f in enumerate(bad)]
    for d in datagrams:
        rig.from_peer(d)
    assert rig.handed(udp=len(bad))[1] == [(d, 0, rig.peer_address) for d in datagrams]
    assert rig.replay.highest == -1
    ok = frame(packet, F_NEEDS_CSUM, start=20, offset=len(packet) - 22)  # the last two bytes
    rig.from_peer(fragment_datagram(rig.receive_key, LOCAL_INDEX, 100, ok))
    assert rig.delivered() == ok


def test_replays_are_not_delivered_twice(rigs: list[Rig]) -> None:
    rig = make(rigs)
    first = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"first")
    datagram = data_datagram(rig.receive_key, LOCAL_INDEX, 3, first)
    rig.from_peer(datagram)
    assert rig.delivered() == first
    rig.from_peer(datagram)  # the replay: Python counts it as one
    assert rig.handed(udp=1)[1] == [(datagram, 0, rig.peer_address)]
    assert rig.replay.mark(4)  # Python opened counter 4 from another copy (a relay, say)
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 4, b"dup"))
    assert rig.handed(udp=1)
    second = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"second")
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 5, second))
    assert rig.delivered() == second  # the next thing on TUN: no duplicate came before it
    counts = rig.fp.counters()
    assert (counts["fast_rx"], counts["handed_udp"], counts["replay_races"]) == (2, 2, 0)


def test_what_the_fast_path_does_not_open_goes_to_python_unchanged(rigs: list[Rig]) -> None:
    rig = make(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY)
    key = rig.receive_key
    stun = bytes.fromhex("000100002112a442") + bytes(12)
    bad = [
        data_datagram(key, LOCAL_INDEX, 1, ipv4(bytes([10, 99, 0, 9]), OWN_OVERLAY)),  # spoofed
        data_datagram(key, LOCAL_INDEX, 2, ipv4(PEER_OVERLAY, OWN_OVERLAY, version=6)),
        data_datagram(key, LOCAL_INDEX, 3, packet[:15]),  # too short to have a source
        data_datagram(key, LOCAL_INDEX + 1, 4, packet),  # unknown index
        data_datagram(key, LOCAL_INDEX, 6, b""),  # keepalive
        FRAGMENT_HEADER.pack(TYPE_FRAGMENT, LOCAL_INDEX, 7, 0, 2) + seal(key, 7, frame(packet)),
        stun,
        b"\xe1" + bytes(100),  # a handshake initiation's first byte
        b"",
    ]
    for d in bad:
        rig.from_peer(d)
    assert rig.handed(udp=len(bad))[1] == [(d, 0, rig.peer_address) for d in bad]
    assert rig.replay.highest == -1
    counts = rig.fp.counters()
    assert (counts["fast_rx"], counts["handed_udp"], counts["tun_write_errors"],
            counts["auth_failed"]) == (0, len(bad), 0, 0)


def test_forged_datagrams_under_a_live_index_are_dropped_and_counted(rigs: list[Rig]) -> None:
    """A datagram for the route's receiver index, fresh for its window, that does not
    authenticate is dropped in C (Python would only reach the same verdict): counted overall
    and per peer, nothing marked. Other indexes (a previous or next keypair of the peer, which
    Python still holds) and datagrams past the receive deadline still go to Python."""
    rig = make(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY)
    key = rig.receive_key
    flipped = bytearray(data_datagram(key, LOCAL_INDEX, 0, packet))
    flipped[-1] ^= 1  # the tag
    body = bytearray(data_datagram(key, LOCAL_INDEX, 1, packet))
    body[DATA_HEADER.size] ^= 0x80  # the ciphertext
    counter = bytearray(data_datagram(key, LOCAL_INDEX, 2, packet))
    counter[12] ^= 1  # the counter: another nonce
    forged = [
        bytes(flipped), bytes(body), bytes(counter),
        data_datagram(bytes(32), LOCAL_INDEX, 3, packet),  # other keys
        fragment_datagram(bytes(32), LOCAL_INDEX, 4, frame(packet)),  # a one-part 0xE4
    ]
    for i, d in enumerate(forged, 1):
        rig.from_peer(d)
        wait_for(lambda i=i: rig.fp.counters()["auth_failed"] == i)  # type: ignore[misc]
    counts = rig.fp.counters()
    assert (counts["udp_reads"], counts["handed_udp"], counts["fast_rx"]) == (5, 0, 0)
    assert rig.replay.highest == -1  # nothing marked: the genuine counters stay good
    genuine = data_datagram(key, LOCAL_INDEX, 2, packet)
    rig.from_peer(genuine)
    assert rig.delivered() == packet
    # Per peer, as deltas (the agent adds them to the session's and the node's rejections).
    stats = rig.fp.take_stats()[KEY]
    assert stats[3:5] == (1, len(packet)) and stats[6] == 5
    assert rig.fp.take_stats() == {}
    # A removed route's last count is still reported once.
    rig.from_peer(bytes(flipped))
    wait_for(lambda: rig.fp.counters()["auth_failed"] == 6)
    rig.fp.remove_peer(KEY)
    assert rig.fp.take_stats()[KEY][6] == 1
    rig.install()
    # Another keypair's index (the previous one, say): Python opens it with those keys.
    previous = data_datagram(bytes(range(32)), LOCAL_INDEX + 1, 0, packet)
    rig.from_peer(previous)
    assert rig.handed(udp=1)[1] == [(previous, 0, rig.peer_address)]
    # Past the receive deadline even a forged one goes to Python (which rekeys, or expires).
    rig.install(until=time.monotonic() - 1)
    rig.from_peer(bytes(flipped))
    assert rig.handed(udp=1)[1] == [(bytes(flipped), 0, rig.peer_address)]
    assert rig.fp.counters()["auth_failed"] == 6


def test_source_check_off_delivers_any_source(rigs: list[Rig]) -> None:
    rig = make(rigs, check_source=False)
    spoofed = ipv4(bytes([192, 0, 2, 1]), OWN_OVERLAY)
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 0, spoofed))
    assert rig.delivered() == spoofed


def test_coalesced_reads_go_to_python_with_their_segment(rigs: list[Rig]) -> None:
    rig = make(rigs)
    try:
        rig.sock.setsockopt(SOL_UDP, UDP_GRO, 1)
    except OSError:
        pytest.skip("no UDP GRO on this kernel")
    parts = [data_datagram(rig.receive_key, LOCAL_INDEX, i, bytes(300)) for i in range(3)]
    try:
        rig.peer.sendmsg([b"".join(parts)], [(SOL_UDP, UDP_SEGMENT,
                                              len(parts[0]).to_bytes(2, sys.byteorder))],
                         0, rig.address)
    except OSError:
        pytest.skip("no UDP GSO on this kernel")
    _, udp_reads = rig.handed(udp=1)  # not from the peer's overlay address: Python decides
    assert udp_reads == [(b"".join(parts), len(parts[0]), rig.peer_address)]
    assert rig.replay.highest == -1


@pytest.mark.parametrize("good", [4, 3, 1])
def test_coalesced_whole_datagrams_are_taken_one_by_one(rigs: list[Rig], good: int) -> None:
    """A coalesced read of datagrams that are each a whole message (a relay's batch of TCP
    ACKs): the thread takes them in order while they go natively, and hands Python the rest of
    the read after them (still coalesced when more than one datagram is left)."""
    rig = make(rigs, gro=True)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(52))
    odd = ipv4(OWN_OVERLAY, OWN_OVERLAY, bytes(52))  # not from the peer: Python's verdict
    plain = [packet] * good + [odd] * (4 - good)
    datagrams = [data_datagram(rig.receive_key, LOCAL_INDEX, i, p) for i, p in enumerate(plain)]
    send_coalesced(rig, datagrams)
    assert [rig.delivered() for _ in range(good)] == [packet] * good
    if good < 4:
        rest = datagrams[good:]
        segment = len(rest[0]) if len(rest) > 1 else 0
        assert rig.handed(udp=1)[1] == [(b"".join(rest), segment, rig.peer_address)]
    assert [rig.replay.check(i) for i in range(4)] == [i >= good for i in range(4)]


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    prefix=st.sampled_from([b"", b"\xe3", b"\xe4", b"\xe3\x01\x02\x03\x04",
                            b"\xe4\x01\x02\x03\x04", b"\x00\x01", b"\x40\x00"]),
    body=st.binary(max_size=1500),
    padding=st.sampled_from([0, 0, 0, 16, 29, 31, 9000, 65507 - 1600]),
)
def test_garbage_datagrams_of_any_length_go_to_python_or_fail_authentication(
        rigs: list[Rig], prefix: bytes, body: bytes, padding: int) -> None:
    """Garbage goes to Python unchanged, except what claims the installed index with a fresh
    counter and room for a tag (a data datagram, or part 0 of 1): the AEAD is tried, fails,
    and the datagram is dropped and counted. Nothing is ever delivered."""
    if not rigs:
        make(rigs, frames=True)
    rig = rigs[0]
    live = prefix.startswith((b"\xe3", b"\xe4")) and len(prefix) == 5
    if live:
        body = bytes(8) + body  # counter 0 of the installed index: the AEAD is tried
    datagram = prefix + body + bytes(padding)
    dropped = live and (len(datagram) > DATA_OVERHEAD if datagram[0] == TYPE_DATA else
                        len(datagram) > FRAGMENT_HEADER.size + 16
                        and datagram[13:15] == b"\x00\x01")
    event("authentication tried" if dropped else "to Python")
    before = rig.fp.counters()
    rig.from_peer(datagram)
    if dropped:
        wait_for(lambda: rig.fp.counters()["auth_failed"] > before["auth_failed"])
    else:
        assert rig.handed(udp=1)[1] == [(datagram, 0, rig.peer_address)]
    after = rig.fp.counters()
    assert after["handed_udp"] - before["handed_udp"] == (not dropped)
    assert after["auth_failed"] - before["auth_failed"] == dropped
    assert after["fast_rx"] == 0


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(min_size=1, max_size=3000))
def test_garbage_from_tun_is_sent_or_handed_off_unchanged(rigs: list[Rig], data: bytes) -> None:
    if not rigs:
        make(rigs, frames=True).install(send_fragments=True)
    rig = rigs[0]
    before = rig.fp.counters()
    rig.kernel.send(data)
    if (30 <= len(data) <= FRAGMENT_PART - 16 and data[10] >> 4 == 4
            and data[26:30] == PEER_OVERLAY and data[1] == 0 and not data[0] & ~3):
        sent = rig.sent()
        counter = FRAGMENT_HEADER.unpack_from(sent)[2]
        assert ChaCha20Poly1305(rig.send_key).decrypt(NONCE.pack(counter), sent[15:], None) == data
    else:
        assert rig.handed(tun=1)[0] == [data]
    after = rig.fp.counters()
    assert after["tun_reads"] - before["tun_reads"] == 1


# Structured plaintexts that reach every check after the AEAD: virtio header fields, IP
# version, source and destination, lengths around the minimums.
HEADERS = st.builds(
    VNET_HDR.pack, st.sampled_from([0, 0, 0, 0, F_NEEDS_CSUM, F_DATA_VALID, 3, 4, 0x81]),
    st.sampled_from([0, 0, 0, 0, 0, GSO_TCPV4, 0x80, 3]), st.integers(0, 60),
    st.integers(0, 1400), st.sampled_from([0, 19, 20, 20, 28, 40]),
    st.sampled_from([0, 6, 6, 16, 30, 1000]))
ADDRESSES = st.sampled_from([PEER_OVERLAY, PEER_OVERLAY, PEER_OVERLAY, OWN_OVERLAY,
                             bytes([10, 99, 0, 9])])
PACKETS = st.builds(
    lambda version, src, dst, payload, cut: ipv4(src, dst, payload, version)[:cut],
    st.sampled_from([4, 4, 4, 4, 6, 5]), ADDRESSES, ADDRESSES, st.binary(max_size=60),
    st.sampled_from([10_000, 10_000, 10_000, 10_000, 0, 12, 15, 16, 19, 20, 29]))


def frame_ok(f: bytes) -> bool:
    try:
        check_frame(f)
    except OffloadError:
        return False
    return True


def from_peer_ok(packet: bytes) -> bool:
    return packet[12:16] == PEER_OVERLAY and len(packet) > 0 and packet[0] >> 4 == 4


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.booleans(), fragment=st.booleans(), header=HEADERS, packet=PACKETS)
def test_authentic_datagrams_follow_the_python_rules(
    rigs: list[Rig], frames: bool, fragment: bool, header: bytes, packet: bytes
) -> None:
    """Whatever an authentic datagram holds, the fast path delivers it exactly when
    TunnelSession would deliver it the short way (check_frame, no GSO, source, and without
    frames no partial checksum); otherwise Python gets it unchanged and unmarked."""
    if not rigs:
        make(rigs, frames=False)
        make(rigs, frames=True)
    rig = rigs[frames]
    counter = rig.replay.highest + 1 + len(packet)  # fresh, in the window
    plain = header + packet if fragment else packet
    if fragment:
        datagram = fragment_datagram(rig.receive_key, LOCAL_INDEX, counter, plain)
        native = (bool(plain) and frame_ok(plain) and plain[1] == 0
                  and from_peer_ok(plain[10:]) and (frames or plain[0] == 0))
        expected = plain if frames else plain[10:]
    else:
        datagram = data_datagram(rig.receive_key, LOCAL_INDEX, counter, plain)
        native = bool(plain) and from_peer_ok(plain)
        expected = bytes(10) + plain if frames else plain
    event("native" if native else "to Python")
    rig.from_peer(datagram)
    if native:
        assert rig.delivered() == expected
        assert not rig.replay.check(counter)
    else:
        assert rig.handed(udp=1)[1] == [(datagram, 0, rig.peer_address)]
        assert rig.replay.check(counter)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(frames=st.booleans(), fragments=st.booleans(), header=HEADERS, packet=PACKETS,
       pad=st.sampled_from([0, 0, 100]))
def test_tun_reads_follow_the_sending_rules(
    rigs: list[Rig], frames: bool, fragments: bool, header: bytes, packet: bytes, pad: int
) -> None:
    if not rigs:
        make(rigs, frames=False)
        make(rigs, frames=True, fragment_part=64)
    rig = rigs[frames]
    rig.install(send_fragments=fragments)
    packet += bytes(pad if packet else 0)  # with pad, most frames take several parts
    read = header + packet if frames else packet
    if not read:
        return  # a TUN device never reads nothing
    inner = read[10:] if frames else read
    flags, gso = (read[0], read[1]) if frames else (0, 0)
    native = len(inner) >= 20 and inner[0] >> 4 == 4 and inner[16:20] == PEER_OVERLAY
    parts = 1
    if frames and fragments:
        parts = -(-(len(read) + 16) // 64)
        if parts == 1:  # one part: no GSO, known flags (what the peer's thread opens)
            native = native and gso == 0 and not flags & ~3
        expected = FRAGMENT_HEADER.size, read
    else:
        native = native and flags == 0 and gso == 0
        expected = DATA_HEADER.size, inner
    before = rig.counter.value
    event(("native" if native else "to Python") + (" (several parts)" if parts > 1 else ""))
    rig.kernel.send(read)
    if native and parts > 1:
        assert join_message(rig.send_key, [rig.sent() for _ in range(parts)]) == (before, read)
        assert rig.counter.value == before + 1
    elif native:
        sent = rig.sent()
        size, plain = expected
        assert sent[0] == (TYPE_FRAGMENT if size == 15 else TYPE_DATA)
        assert DATA_HEADER.unpack_from(sent)[1:] == (REMOTE_INDEX, before)
        assert ChaCha20Poly1305(rig.send_key).decrypt(NONCE.pack(before), sent[size:], None) \
            == plain
        assert rig.counter.value == before + 1
    else:
        assert rig.handed(tun=1)[0] == [read]
        assert rig.counter.value == before


# -- whole messages in one coalesced read --------------------------------------------------------


def gro_rig(rigs: list[Rig], **kwargs: int | bool) -> Rig:
    try:
        return make(rigs, frames=True, gro=True, **kwargs)
    except OSError:
        pytest.skip("no UDP GRO on this kernel")


def send_coalesced(rig: Rig, datagrams: list[bytes], segment: int | None = None) -> bytes:
    """One GSO send of `datagrams` (all of `segment` bytes but the last): the tunnel socket
    reads them as one coalesced read, as the peer agent's GSO sends arrive."""
    data = b"".join(datagrams)
    size = segment or len(datagrams[0])
    try:
        rig.peer.sendmsg([data], [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))], 0,
                         rig.address)
    except OSError:
        pytest.skip("no UDP GSO on this kernel")
    return data


@pytest.mark.parametrize("last", [1, 5, 15, 16, 17, 700, FRAGMENT_PART])
def test_a_whole_message_in_one_coalesced_read_goes_to_tun(rigs: list[Rig], last: int) -> None:
    """Opened from its parts where they lie, including a tag cut across the last two."""
    rig = gro_rig(rigs)
    sealed = 20 * FRAGMENT_PART + last
    big = gso_frame(ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(range(256)) * 200)[:sealed - 16 - 10])
    datagrams = message_datagrams(rig.receive_key, LOCAL_INDEX, 5, big, FRAGMENT_PART)
    assert len(datagrams) == 21 and len(datagrams[-1]) == FRAGMENT_HEADER.size + last
    data = send_coalesced(rig, datagrams)
    assert rig.delivered() == big
    assert not rig.replay.check(5)
    counts = rig.fp.counters()
    assert (counts["fast_rx"], counts["gro_reads"], counts["handed_udp"]) == (1, 1, 0)
    assert rig.fp.take_stats()[KEY][3:5] == (1, len(big) - 10)
    # The same read again is a replay: Python gets it (and drops it as replayed).
    send_coalesced(rig, datagrams)
    assert rig.handed(udp=1)[1] == [(data, FRAGMENT_HEADER.size + FRAGMENT_PART,
                                     rig.peer_address)]


def test_any_part_size_the_sender_chose_is_taken(rigs: list[Rig]) -> None:
    rig = gro_rig(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(5000))
    for counter, part in enumerate((100, 1025, 1400)):
        f = gso_frame(packet)
        send_coalesced(rig, message_datagrams(rig.receive_key, LOCAL_INDEX, counter, f, part))
        assert rig.delivered() == f


def test_coalesced_reads_that_are_not_one_whole_message_go_to_python(rigs: list[Rig]) -> None:
    rig = gro_rig(rigs)
    key, part = rig.receive_key, 1000
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(2 * part - 16 - 10 - 28))  # two full parts

    def msg(counter: int, index: int = LOCAL_INDEX) -> list[bytes]:
        datagrams = message_datagrams(key, index, counter, gso_frame(packet), part)
        assert len(datagrams) == 2 and len(datagrams[1]) == len(datagrams[0])
        return datagrams

    three = message_datagrams(key, LOCAL_INDEX, 4, gso_frame(packet + bytes(10)), part)
    forged_header = msg(5)
    forged_header[1] = forged_header[1][:5] + (6).to_bytes(8, "big") + forged_header[1][13:]
    reads = [
        msg(1) + msg(2),  # two messages
        msg(3)[::-1],  # out of order
        three[:2],  # the last fragment is missing (it comes in a read of its own)
        forged_header,  # the parts name two counters
        msg(7, index=0x0BADBEEF),  # keys the thread does not hold
    ]
    sent = [send_coalesced(rig, r) for r in reads]
    handed = rig.handed(udp=len(reads))[1]
    assert handed == [(d, part + FRAGMENT_HEADER.size, rig.peer_address) for d in sent]
    assert rig.replay.highest == -1
    assert rig.fp.counters()["gro_reads"] == 0
    plain = make(rigs, frames=False, gro=True)  # no offloads: Python cuts frames into packets
    data = send_coalesced(plain, message_datagrams(plain.receive_key, LOCAL_INDEX, 0,
                                                   gso_frame(packet), part))
    assert plain.handed(udp=1)[1] == [(data, part + FRAGMENT_HEADER.size, plain.peer_address)]


def test_a_forged_whole_message_is_dropped_and_counted(rigs: list[Rig]) -> None:
    rig = gro_rig(rigs)
    f = gso_frame(ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(9000)))
    datagrams = message_datagrams(rig.receive_key, LOCAL_INDEX, 3, f, FRAGMENT_PART)
    for k, at in ((1, 100), (len(datagrams) - 1, -1)):  # a body byte, a tag byte
        forged = list(datagrams)
        d = bytearray(forged[k])
        d[at] ^= 1
        forged[k] = bytes(d)
        send_coalesced(rig, forged, len(datagrams[0]))
    wait_for(lambda: rig.fp.counters()["auth_failed"] == 2)
    assert rig.fp.take_stats()[KEY][6] == 2
    assert rig.replay.check(3)  # nothing marked: the real message still gets in
    send_coalesced(rig, datagrams)
    assert rig.delivered() == f


def test_bad_whole_messages_go_to_python_unmarked(rigs: list[Rig]) -> None:
    rig = gro_rig(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(4000))
    bad = [
        VNET_HDR.pack(0x04, 0, 0, 0, 0, 0) + packet,  # unknown flag
        gso_frame(packet, gso=4),  # TCPV6 over IPv4
        gso_frame(packet, gso_size=0),  # no segment size
        VNET_HDR.pack(0, GSO_TCPV4, 40, 1340, 20, 16) + packet,  # GSO without a partial sum
        gso_frame(ipv4(OWN_OVERLAY, OWN_OVERLAY, bytes(4000))),  # not from the peer
    ]
    sent = [send_coalesced(rig, message_datagrams(rig.receive_key, LOCAL_INDEX, i, f, 1000))
            for i, f in enumerate(bad)]
    assert rig.handed(udp=len(bad))[1] == [(d, 1015, rig.peer_address) for d in sent]
    assert rig.replay.highest == -1


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(header=HEADERS, packet=PACKETS, padding=st.integers(0, 3000))
def test_authentic_whole_messages_follow_the_python_rules(
    rigs: list[Rig], header: bytes, packet: bytes, padding: int
) -> None:
    """A whole message is delivered exactly when TunnelSession.receive_message would deliver
    it (check_frame, GSO allowed, inner source); otherwise Python gets it unchanged."""
    if not rigs:
        gro_rig(rigs)
    rig = rigs[0]
    plain = header + packet + bytes(padding)
    counter = rig.replay.highest + 1 + len(plain)
    datagrams = message_datagrams(rig.receive_key, LOCAL_INDEX, counter, plain, 100)
    if len(datagrams) < 2 or len(datagrams) > 64:
        return
    native = frame_ok(plain) and from_peer_ok(plain[10:])
    event("native" if native else "to Python")
    data = send_coalesced(rig, datagrams)
    if native:
        assert rig.delivered() == plain
        assert not rig.replay.check(counter)
    else:
        assert rig.handed(udp=1)[1] == [(data, 115, rig.peer_address)]
        assert rig.replay.check(counter)


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_a_whole_message_with_any_byte_changed_is_never_delivered(
    rigs: list[Rig], data: st.DataObject
) -> None:
    if not rigs:
        gro_rig(rigs)
    rig = rigs[0]
    f = gso_frame(ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(1500)))
    counter = rig.replay.highest + 1
    datagrams = message_datagrams(rig.receive_key, LOCAL_INDEX, counter, f, 400)
    k = data.draw(st.integers(0, len(datagrams) - 1))
    at = data.draw(st.integers(0, len(datagrams[k]) - 1))
    changed = bytearray(datagrams[k])
    changed[at] ^= data.draw(st.integers(1, 255))
    datagrams[k] = bytes(changed)
    before = rig.fp.counters()["auth_failed"]
    read = send_coalesced(rig, datagrams, 400 + FRAGMENT_HEADER.size)
    deadline = time.monotonic() + TIMEOUT
    while rig.fp.counters()["auth_failed"] == before:
        assert time.monotonic() < deadline, "neither dropped nor handed off"
        if select.select([rig.fp.fileno()], [], [], 0.01)[0]:
            _, udp = rig.fp.drain()
            rig.fp.release()
            assert udp == [(read, 415, rig.peer_address)]
            event("to Python")
            break
    else:
        event("dropped as forged")
    assert rig.replay.check(counter)
    rig.replay.mark(counter)  # the next example uses the next counter


# -- relayed paths: ChannelData through our TURN server -------------------------------------------

CHANNEL = 0x4001


def channel_data(data: bytes, channel: int = CHANNEL, pad: int = 0) -> bytes:
    """RFC 8656 §12.4 ChannelData (the peer socket plays our TURN server)."""
    return channel.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data + bytes(pad)


def relay_rig(rigs: list[Rig], **kwargs: int | bool) -> Rig:
    rig = make(rigs, **kwargs)
    rig.fp.set_peer(
        KEY, overlay=PEER_OVERLAY, remote_index=REMOTE_INDEX, send_key=rig.send_key,
        counter=rig.counter, send_limit=2**60, send_fragments=bool(kwargs.get("frames")),
        local_index=LOCAL_INDEX, receive_key=rig.receive_key, replay=rig.replay,
        endpoint=rig.peer_address, send_until=1e9, receive_until=1e9, channel=CHANNEL)
    return rig


def test_a_relayed_route_sends_in_channel_data_to_the_relay(rigs: list[Rig]) -> None:
    rig = relay_rig(rigs)
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY, b"through the relay")
    rig.kernel.send(packet)
    sent = rig.sent()
    assert sent[:4] == CHANNEL.to_bytes(2, "big") + (len(sent) - 4).to_bytes(2, "big")
    assert sent[4:] != b"" and DATA_HEADER.unpack_from(sent, 4) == (TYPE_DATA, REMOTE_INDEX, 0)
    assert ChaCha20Poly1305(rig.send_key).decrypt(NONCE.pack(0), sent[4 + 13:], None) == packet
    framed = relay_rig(rigs, frames=True)
    small = frame(packet, F_NEEDS_CSUM)
    framed.kernel.send(small)  # one part
    one = framed.sent()
    assert one[:4] == channel_data(one[4:])[:4]
    assert join_message(framed.send_key, [one[4:]]) == (0, small)
    big = gso_frame(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(range(256)) * 40))
    framed.kernel.send(big)  # several parts, one GSO send of ChannelData-wrapped fragments
    parts = -(-(len(big) + 16) // FRAGMENT_PART)
    datagrams = [framed.sent() for _ in range(parts)]
    for d in datagrams:
        assert d[:4] == CHANNEL.to_bytes(2, "big") + (len(d) - 4).to_bytes(2, "big")
    assert len(datagrams[0]) == 4 + FRAGMENT_HEADER.size + FRAGMENT_PART
    assert join_message(framed.send_key, [d[4:] for d in datagrams]) == (1, big)
    wait_for(lambda: framed.fp.counters()["gso_sends"] == 1)  # counted once sendmsg returned


@pytest.mark.parametrize("pad", [0, 3])
def test_channel_data_from_the_relay_is_opened_natively(rigs: list[Rig], pad: int) -> None:
    """Padding after the data (optional over UDP, RFC 8656 §12.5) is ignored."""
    rig = relay_rig(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, b"relayed in")
    rig.from_peer(channel_data(data_datagram(rig.receive_key, LOCAL_INDEX, 0, packet), pad=pad))
    assert rig.delivered() == packet
    # The same keys on a direct datagram (the path is moving): taken as well.
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 1, packet))
    assert rig.delivered() == packet
    assert rig.fp.counters()["handed_udp"] == 0


def test_channel_data_that_is_not_the_routes_goes_to_python(rigs: list[Rig]) -> None:
    rig = relay_rig(rigs)
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other.bind((LOOPBACK, 0))
    try:
        wrong_channel = channel_data(data_datagram(rig.receive_key, LOCAL_INDEX, 0, packet),
                                     channel=CHANNEL + 1)
        too_long = channel_data(data_datagram(rig.receive_key, LOCAL_INDEX, 1, packet), pad=4)
        short = channel_data(data_datagram(rig.receive_key, LOCAL_INDEX, 2, packet))[:-1]
        for d in (wrong_channel, too_long, short):
            rig.from_peer(d)
        not_the_relay = channel_data(data_datagram(rig.receive_key, LOCAL_INDEX, 3, packet))
        other.sendto(not_the_relay, rig.address)
        handed = rig.handed(udp=4)[1]
        assert [d for d, _, _ in handed] == [wrong_channel, too_long, short, not_the_relay]
        assert handed[3][2] == other.getsockname()
    finally:
        other.close()
    assert rig.replay.highest == -1
    # A direct route takes no ChannelData at all.
    direct = make(rigs)
    wrapped = channel_data(data_datagram(direct.receive_key, LOCAL_INDEX, 0, packet))
    direct.from_peer(wrapped)
    assert direct.handed(udp=1)[1] == [(wrapped, 0, direct.peer_address)]


def test_a_whole_relayed_message_in_one_coalesced_read_goes_to_tun(rigs: list[Rig]) -> None:
    try:
        rig = relay_rig(rigs, frames=True, gro=True)
    except OSError:
        pytest.skip("no UDP GRO on this kernel")
    big = gso_frame(ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(range(256)) * 100))
    datagrams = [channel_data(d) for d in
                 message_datagrams(rig.receive_key, LOCAL_INDEX, 0, big, FRAGMENT_PART)]
    send_coalesced(rig, datagrams)
    assert rig.delivered() == big
    assert rig.fp.counters()["gro_reads"] == 1
    mixed = [channel_data(d, channel=CHANNEL + (k == 1)) for k, d in enumerate(
        message_datagrams(rig.receive_key, LOCAL_INDEX, 1, big, FRAGMENT_PART))]
    data = send_coalesced(rig, mixed)
    assert rig.handed(udp=1)[1] == [(data, len(mixed[0]), rig.peer_address)]


# -- IPv6 -----------------------------------------------------------------------------------------


def have_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not have_ipv6_loopback(), reason="no ::1 on this machine")
def test_ipv6_sources_come_as_the_socket_module_gives_them(rigs: list[Rig]) -> None:
    """On an AF_INET6 socket a handed-off datagram's source is the 4-tuple recvmsg gives
    (host, port, flowinfo, scope_id), so the core sees the same address either way; routes
    take such endpoints (and 2-tuples) and the thread carries packets both ways."""
    rig = make(rigs, family=socket.AF_INET6)
    junk = b"\x00\x01 over IPv6"
    rig.from_peer(junk)
    (_, _, source), = rig.handed(udp=1)[1]
    assert len(source) == 4 and source == rig.peer_address
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(packet)
    assert DATA_HEADER.unpack_from(rig.sent())[2] == 0  # to the 4-tuple endpoint
    rig.install(endpoint=rig.peer_address[:2])
    rig.kernel.send(packet)
    assert DATA_HEADER.unpack_from(rig.sent())[2] == 1
    inbound = ipv4(PEER_OVERLAY, OWN_OVERLAY)
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 0, inbound))
    assert rig.delivered() == inbound
    for bad, error in [((LOOPBACK, 9, 0), TypeError), (("::1", 9, 1 << 20, 0), ValueError),
                       (("::1", 9, 0, 2**32), ValueError)]:
        with pytest.raises(error, match="endpoint"):
            rig.install(endpoint=bad)
    # What Python itself reads from the same socket for the same sender, once the thread is
    # gone: the same tuple.
    rig.fp.close()
    rig.from_peer(junk)
    rig.sock.settimeout(TIMEOUT)
    assert rig.sock.recvfrom(100) == (junk, source)


# -- queue, stats, lifecycle --------------------------------------------------------------------


def test_full_queue_pauses_reads_until_drained(rigs: list[Rig]) -> None:
    rig = make(rigs, queue_bytes=1)
    junk = [b"\x00\x01" + bytes([i]) * 20 for i in range(3)]
    for d in junk:
        rig.from_peer(d)
    select.select([rig.fp.fileno()], [], [], TIMEOUT)
    counts = rig.fp.counters()  # paused after the first: the other two wait in the socket
    assert (counts["udp_reads"], counts["handed_udp"], counts["paused"]) == (1, 1, 1)
    _, udp_reads = rig.handed(udp=3)  # each drain lets the thread read on
    assert [d for d, _, _ in udp_reads] == junk
    assert rig.fp.counters()["paused"] == 3


def test_stats_are_deltas_per_peer(rigs: list[Rig]) -> None:
    rig = make(rigs)
    assert rig.fp.take_stats() == {}
    start = time.monotonic()
    sizes = (40, 50, 60)
    for size in sizes:
        rig.kernel.send(ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(size - 28)))
        rig.sent()
    stats = rig.fp.take_stats()
    tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx, auth_failed = stats[KEY]
    assert (tx_packets, tx_bytes, rx_packets, rx_bytes, last_rx, auth_failed) == (
        3, sum(sizes), 0, 0, 0.0, 0)
    assert start <= last_tx <= time.monotonic()
    assert rig.fp.take_stats() == {}
    packet = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(72))
    rig.from_peer(data_datagram(rig.receive_key, LOCAL_INDEX, 0, packet))
    rig.delivered()
    # A removed peer's last stats are still reported once; a replaced route keeps them.
    rig.install(until=2e9)
    rig.fp.remove_peer(KEY)
    stats = rig.fp.take_stats()
    assert stats[KEY][:2] == (0, 0) and stats[KEY][3:5] == (1, len(packet))
    assert start <= stats[KEY][5] <= time.monotonic()
    assert rig.fp.take_stats() == {}


def test_close_joins_promptly_and_is_idempotent(rigs: list[Rig]) -> None:
    rig = make(rigs)
    rig.kernel.send(ipv4(OWN_OVERLAY, PEER_OVERLAY))
    rig.sent()
    rig.from_peer(b"\x00\x01 left in the queue")  # not drained: close frees it
    select.select([rig.fp.fileno()], [], [], TIMEOUT)
    started = time.monotonic()
    rig.fp.close()
    assert time.monotonic() - started < 1.0
    rig.fp.close()
    assert rig.fp.drain() == ([], [])
    assert rig.fp.take_stats()[KEY][0] == 1  # taken stats survive close
    with pytest.raises(ValueError, match="closed"):
        rig.fp.fileno()
    with pytest.raises(ValueError, match="closed"):
        rig.install()
    with pytest.raises(ValueError, match="closed"):
        rig.fp.start()
    rig.fp.remove_peer(KEY)
    # The fds are the caller's: still open.
    rig.kernel.send(b"x")
    assert rig.tun.recv(10) == b"x"


def test_the_thread_works_on_its_own_fds(rigs: list[Rig]) -> None:
    """The constructor dup()s both fds: the caller may close (and the process reuse) its
    numbers without the thread reading or writing another file; close() closes the dups."""
    rig = make(rigs)
    address = rig.address
    rig.tun.close()  # the caller's fd numbers are free now ...
    rig.sock.close()
    reused = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
    try:  # ... and taken by these: the thread must not care
        packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
        rig.kernel.send(packet)
        sent, source = rig.peer.recvfrom(2048)
        assert source == address and DATA_HEADER.unpack_from(sent)[2] == 0
        inbound = ipv4(PEER_OVERLAY, OWN_OVERLAY)
        rig.peer.sendto(data_datagram(rig.receive_key, LOCAL_INDEX, 0, inbound), address)
        assert rig.delivered() == inbound
        assert rig.fp.error is None
        rig.fp.close()
        # The last reference to the fake device's end was the thread's dup: gone now.
        with pytest.raises(ConnectionRefusedError):
            rig.kernel.send(packet)
    finally:
        for s in reused:
            s.close()


def thread_error(fp: FastPath) -> OSError | None:
    """`fp.error`, read afresh (it changes under a running thread)."""
    return fp.error


def wait_for_error(rig: Rig) -> OSError:
    """The thread's failure, after it woke Python through the eventfd (which may have been
    readable already, for reads waiting)."""
    ready, _, _ = select.select([rig.fp.fileno()], [], [], TIMEOUT)
    assert ready, "the thread did not wake Python"
    wait_for(lambda: thread_error(rig.fp) is not None)
    error = thread_error(rig.fp)
    assert isinstance(error, OSError)
    return error


def test_a_failing_poll_stops_the_thread_and_keeps_its_queue(rigs: list[Rig]) -> None:
    """A poll() error other than EINTR (injected: `_fail_for_test`) ends the thread: it records
    the errno and wakes Python, and everything it had queued is still there to drain. What
    comes later stays in the socket and the device for Python to read."""
    rig = make(rigs)
    rig.fp._fail_for_test(errno.EINTR)  # retried: the thread goes on
    packet = ipv4(OWN_OVERLAY, PEER_OVERLAY)
    rig.kernel.send(packet)
    assert DATA_HEADER.unpack_from(rig.sent())[2] == 0
    assert thread_error(rig.fp) is None
    queued = [b"\x00\x01queued %d" % i for i in range(3)]
    for d in queued:
        rig.from_peer(d)
    wait_for(lambda: rig.fp.counters()["handed_udp"] == 3)  # not drained
    rig.fp._fail_for_test(errno.EBADF)
    error = wait_for_error(rig)
    assert error.errno == errno.EBADF and "poll" in str(error)
    _, udp_reads = rig.fp.drain()
    assert [d for d, _, _ in udp_reads] == queued
    rig.fp.release()
    assert select.select([rig.fp.fileno()], [], [], 0)[0]  # stays readable: it stopped
    later = b"\x00\x01 after the failure"
    rig.from_peer(later)
    rig.kernel.send(packet)
    rig.sock.settimeout(TIMEOUT)
    assert rig.sock.recvfrom(100) == (later, rig.peer_address)  # the thread reads no more
    rig.tun.settimeout(TIMEOUT)
    assert rig.tun.recv(100) == packet
    assert rig.fp.drain() == ([], [])
    rig.fp.close()
    assert thread_error(rig.fp) is not None  # stays for the adapter's log
    with pytest.raises(ValueError, match="closed"):
        rig.fp._fail_for_test(errno.EIO)
    with pytest.raises(ValueError, match="errno"):
        make(rigs).fp._fail_for_test(0)


def test_a_broken_tun_device_stops_the_thread_instead_of_spinning() -> None:
    """mesh0 fails (a deleted TUN device reports POLLERR and its reads EBADFD; here the fake
    device is a SOCK_SEQPACKET pair whose other end goes away: POLLHUP, reads at end of file):
    the thread stops instead of polling a broken fd for ever."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind((LOOPBACK, 0))
        kernel, tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with kernel, tun:
            tun.setblocking(False)
            fp = FastPath(sock.fileno(), tun.fileno(), frames=False, check_source=True,
                          fragment_part=FRAGMENT_PART)
            fp.start()
            try:
                kernel.send(b"\x00" * 20)  # read and handed over before the end
                kernel.close()
                ready, _, _ = select.select([fp.fileno()], [], [], TIMEOUT)
                assert ready
                error = fp.error
                if error is None:  # woken for the hand-off first
                    wait_for(lambda: fp.error is not None)
                    error = fp.error
                assert isinstance(error, OSError) and "mesh0 read" in str(error)
                assert fp.drain()[0] == [b"\x00" * 20]
                assert fp.counters()["tun_reads"] == 1
            finally:
                fp.close()


def test_a_shut_down_socket_stops_the_thread(rigs: list[Rig]) -> None:
    """Reads on a socket shut down for reading return nothing for ever (POLLRDHUP): the thread
    stops with ESHUTDOWN rather than hand Python empty datagrams in a loop."""
    rig = make(rigs)
    with contextlib.suppress(OSError):  # ENOTCONN for an unconnected socket, but it takes
        rig.sock.shutdown(socket.SHUT_RD)
    error = wait_for_error(rig)
    assert error.errno == errno.ESHUTDOWN and "socket" in str(error)
    assert rig.fp.counters()["handed_udp"] == 0


def test_close_without_start_and_start_twice() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        with a, b:
            fp = FastPath(sock.fileno(), a.fileno(), frames=False, check_source=True,
                          fragment_part=FRAGMENT_PART)
            fp.close()
            fp = FastPath(sock.fileno(), a.fileno(), frames=False, check_source=True,
                          fragment_part=FRAGMENT_PART)
            fp.start()
            with pytest.raises(RuntimeError):
                fp.start()
            del fp  # dealloc stops and joins the thread


def test_bad_arguments_name_the_field(rigs: list[Rig]) -> None:
    rig = make(rigs)
    with pytest.raises(ValueError, match="udp_fd"):
        FastPath(rig.kernel.fileno(), rig.tun.fileno(), frames=False, check_source=True,
                 fragment_part=FRAGMENT_PART)
    with pytest.raises(ValueError, match="fragment_part"):
        FastPath(rig.sock.fileno(), rig.tun.fileno(), frames=False, check_source=True,
                 fragment_part=16)
    with pytest.raises(TypeError, match="frames"):
        FastPath(rig.sock.fileno(), rig.tun.fileno())  # type: ignore[call-arg]
    for bad in (-1, 10001):
        with pytest.raises(ValueError, match=f"busy_poll_us {bad} out of range"):
            FastPath(rig.sock.fileno(), rig.tun.fileno(), frames=False, check_source=True,
                     fragment_part=FRAGMENT_PART, busy_poll_us=bad)
    good = dict(overlay=PEER_OVERLAY, remote_index=1, send_key=bytes(32), counter=Counter(),
                send_limit=10, send_fragments=False, local_index=1, receive_key=bytes(32),
                replay=ReplayWindow(), endpoint=(LOOPBACK, 9), send_until=1.0,
                receive_until=1.0)
    for name, value, error in [
        ("overlay", b"\x01\x02\x03", ValueError),
        ("send_key", bytes(31), ValueError),
        ("receive_key", bytes(33), ValueError),
        ("remote_index", 2**32, ValueError),
        ("local_index", -1, ValueError),
        ("counter", 5, TypeError),
        ("replay", py_replay.ReplayWindow(), TypeError),
        ("endpoint", ("not an address", 9), ValueError),
        ("endpoint", ("::1", 9), ValueError),  # an IPv4 socket
        ("endpoint", (LOOPBACK, 70000), ValueError),
        ("channel", 0x3FFF, ValueError),
        ("channel", 0x5000, ValueError),
        ("channel", -1, ValueError),
        ("channel", "16384", TypeError),
    ]:
        with pytest.raises(error, match=name.split("_")[0]):
            rig.fp.set_peer(2, **{**good, name: value})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="channel needs an endpoint"):
        rig.fp.set_peer(2, **{**good, "endpoint": None, "channel": 0x4000})  # type: ignore[arg-type]
    rig.fp.set_peer(2, **good)  # type: ignore[arg-type]
    rig.fp.remove_peer(2)


# -- microbenchmark -----------------------------------------------------------------------------


class PythonRelay:
    """The same hop in Python, for scale: a thread that polls a fake TUN and a UDP socket, and
    seals/opens with `cryptography` (what the asyncio adapter does per wake-up, minus the
    event loop)."""

    def __init__(self, send_key: bytes, receive_key: bytes) -> None:
        self.kernel, self.tun = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.kernel.settimeout(TIMEOUT)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((LOOPBACK, 0))
        self.seal, self.open = ChaCha20Poly1305(send_key), ChaCha20Poly1305(receive_key)
        self.peer: tuple[str, int] = ("", 0)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self) -> None:
        poller = select.poll()
        tun, sock = self.tun.fileno(), self.sock.fileno()
        poller.register(tun, select.POLLIN)
        poller.register(sock, select.POLLIN)
        counter = 0
        while not self.stop.is_set():
            for fd, _ in poller.poll(100):
                if fd == tun:
                    packet = self.tun.recv(70000)
                    self.sock.sendto(DATA_HEADER.pack(TYPE_DATA, 1, counter)
                                     + self.seal.encrypt(NONCE.pack(counter), packet, None),
                                     self.peer)
                    counter += 1
                else:
                    data = self.sock.recv(70000)
                    nonce = NONCE.pack(DATA_HEADER.unpack_from(data)[2])
                    self.tun.send(self.open.decrypt(nonce, data[13:], None))

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        for s in (self.kernel, self.tun, self.sock):
            s.close()


def round_trips(a: socket.socket, b: socket.socket, ping: bytes, pong: bytes,
                rounds: int) -> float:
    """µs per round trip: `ping` into kernel socket `a` comes out of `b`, `pong` back."""
    started = time.perf_counter()
    for _ in range(rounds):
        a.send(ping)
        b.recv(2048)
        b.send(pong)
        a.recv(2048)
    return (time.perf_counter() - started) / rounds * 1e6


def test_microbenchmark_native_round_trip(rigs: list[Rig]) -> None:
    """µs per round trip of a lone 64-byte packet through two fast paths (kernel → A → UDP →
    B → kernel and back: 2 seals, 2 opens, 6 thread wake-ups), printed beside the same hops
    through two Python relay threads, in alternating rounds."""
    a, b = make(rigs, seed=1), make(rigs, seed=2)
    for rig, other, overlay in ((a, b, PEER_OVERLAY), (b, a, OWN_OVERLAY)):
        rig.fp.set_peer(
            KEY, overlay=overlay, remote_index=LOCAL_INDEX, send_key=rig.send_key,
            counter=rig.counter, send_limit=2**60, send_fragments=False,
            local_index=LOCAL_INDEX, receive_key=other.send_key, replay=rig.replay,
            endpoint=other.address, send_until=1e9, receive_until=1e9)
    ping = ipv4(OWN_OVERLAY, PEER_OVERLAY, bytes(36))
    pong = ipv4(PEER_OVERLAY, OWN_OVERLAY, bytes(36))
    pa, pb = PythonRelay(a.send_key, b.send_key), PythonRelay(b.send_key, a.send_key)
    pa.peer, pb.peer = pb.sock.getsockname(), pa.sock.getsockname()
    try:
        pa.thread.start()
        pb.thread.start()
        native: list[float] = []
        python: list[float] = []
        for _ in range(5):
            native.append(round_trips(a.kernel, b.kernel, ping, pong, 1000))
            python.append(round_trips(pa.kernel, pb.kernel, ping, pong, 1000))
    finally:
        pa.close()
        pb.close()
    counts = a.fp.counters()
    assert counts["handed_tun"] == counts["handed_udp"] == 0
    assert counts["fast_tx"] == counts["fast_rx"] == 5000
    native_us, python_us = sorted(native)[2], sorted(python)[2]
    print(f"\nfast path round trip of a lone 64-byte packet: native {native_us:.1f} µs, "
          f"Python relay threads {python_us:.1f} µs (medians of 5 × 1000, alternating; "
          f"ratio {python_us / native_us:.2f}x)")
