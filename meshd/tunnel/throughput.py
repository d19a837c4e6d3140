"""How fast the tunnel's crypto session is on this machine: `python -m meshd.tunnel.throughput`.

Two in-memory sessions (no sockets, no TUN): one encrypts batches of IP packets, the other
decrypts them (replay window and source check included). Also measured: the bare
ChaCha20-Poly1305 seal of the same packets (the ceiling for pure Python around `cryptography`)
and full handshakes per second (two X25519-heavy Noise messages plus two certificate checks).
One core does all the work, as one session does in the agent. With TUN offloads the agent
moves 64 KB offload frames instead (`--frame-size`): each one AEAD message sent as 0xE4
fragments and reassembled on the other side, measured the same way, fragment by fragment and as
UDP GRO hands them to the agent (one coalesced read per message, taken whole).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import json
import random
import struct
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

from edgeweave.pki import CertificateAuthority, node_identity
from meshd.tunnel.identity import CAPeerVerifier, LocalIdentity, Peer
from meshd.tunnel.offload import F_NEEDS_CSUM, GSO_TCPV4, VnetHeader, encode_vnet_header
from meshd.tunnel.session import DecryptedPackets, TunnelSession
from meshd.tunnel.wire import whole_message_packet
from meshd.udp import GSO_MAX_BYTES

FRAME_SIZE = whole_message_packet(GSO_MAX_BYTES)
"""The agent caps mesh0's super-packets at this (each message fits one UDP GSO send)."""
A = ipaddress.IPv4Address("100.64.0.1")
B = ipaddress.IPv4Address("100.64.0.2")


@dataclass(frozen=True)
class Result:
    """One measurement."""

    what: str
    packets_per_s: float
    mbit_per_s: float
    """Inner packet bytes (what the TUN sees), times 8, per second."""


def _pair() -> Callable[[], tuple[TunnelSession, TunnelSession]]:
    """A factory of fresh session pairs between two nodes (the CA work is done once)."""
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.generate(now=now)
    overlay = {"bench-a": A, "bench-b": B}
    verifier = CAPeerVerifier(ca.cert, lambda n: [overlay[n]] if n in overlay else [])

    def identity(node: str) -> LocalIdentity:
        issued = ca.issue_client_cert(node_identity(node), now=now)
        return LocalIdentity.create(X25519PrivateKey.generate(), issued.cert, issued.key,
                                    overlay[node])

    ia, ib = identity("bench-a"), identity("bench-b")
    wall = now.timestamp()

    def make() -> tuple[TunnelSession, TunnelSession]:
        a = TunnelSession(ia, Peer("bench-b", ib.static_public), verifier,
                          rng=random.Random(1), wall_offset=wall)
        b = TunnelSession(ib, Peer("bench-a", ia.static_public), verifier,
                          rng=random.Random(2), wall_offset=wall)
        return a, b

    return make


def _handshake(a: TunnelSession, b: TunnelSession, now: float) -> None:
    a.start_handshake(now)
    for d in a.datagrams_to_send(now):
        b.receive(d, now)
    for d in b.datagrams_to_send(now):
        a.receive(d, now)
    for d in a.datagrams_to_send(now):
        b.receive(d, now)


def _packet(size: int) -> bytes:
    return struct.pack("!BBHIBBH4s4s", 0x45, 0, size, 0, 64, 17, 0, A.packed, B.packed) + bytes(
        size - 20
    )


def _frame(size: int) -> bytes:
    """An offload frame: a TCP super-packet of `size` bytes as a TUN device with TSO reads it."""
    header = encode_vnet_header(VnetHeader(F_NEEDS_CSUM, GSO_TCPV4, 40, 1328, 20, 16))
    ip = struct.pack("!BBHIBBH4s4s", 0x45, 0, size, 0, 64, 6, 0, A.packed, B.packed)
    tcp = struct.pack("!HHIIBBHHH", 40000, 5201, 1, 1, 5 << 4, 0x10, 512, 0, 0)
    return header + ip + tcp + bytes(size - 40)


def _best(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()  # CPU time: other load on the machine matters less
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(*, packets: int, size: int, batch: int, runs: int = 3,
            frame_size: int = FRAME_SIZE) -> list[Result]:
    """Best of `runs` for each measurement; `packets` per run, in batches of `batch`; the
    frame measurement moves as many bytes in `frame_size` frames."""
    make = _pair()
    a, b = make()
    _handshake(a, b, 0.0)
    packet = _packet(size)
    batches = [[packet] * batch for _ in range(max(1, packets // batch))]
    count = len(batches) * batch

    def result(what: str, seconds: float, n: int = count) -> Result:
        return Result(what, n / seconds, n * size * 8 / seconds / 1e6)

    aead = ChaCha20Poly1305(bytes(32))
    nonce = bytes(12)

    def bare() -> None:
        seal = aead.encrypt
        for chunk in batches:
            for p in chunk:
                seal(nonce, p, None)

    sealed: list[list[bytes]] = []

    def encrypt() -> None:
        sealed.clear()
        sealed.extend(a.encrypt(chunk, 1.0) for chunk in batches)

    def deliver(batches_in: list[list[bytes]], expected: int, what: str) -> None:
        delivered = 0
        for chunk in batches_in:
            for event in b.receive_batch(chunk, 1.0):
                if isinstance(event, DecryptedPackets):
                    delivered += len(event.packets)
        if delivered != expected:
            raise RuntimeError(f"only {delivered} of {expected} {what} decrypted")

    def decrypt() -> None:
        deliver(sealed, count, "packets")

    t_bare = _best(runs, bare)
    t_enc = t_dec = float("inf")
    for _ in range(runs):  # decrypt needs fresh counters: pair every decrypt with its encrypt
        t_enc = min(t_enc, _best(1, encrypt))
        t_dec = min(t_dec, _best(1, decrypt))
    handshakes = max(1, runs * 20)

    def handshake_loop() -> None:
        for _ in range(handshakes):
            _handshake(*make(), 0.0)

    t_hs = _best(1, handshake_loop)
    b.frames_out = True
    frame = _frame(frame_size)
    frame_batches = [[frame] * 8 for _ in range(max(1, count * size // frame_size // 8))]
    frame_count = len(frame_batches) * 8
    fragments: list[list[bytes]] = []

    def encrypt_frames() -> None:
        fragments.clear()
        fragments.extend(a.encrypt_frames(chunk, 1.0) for chunk in frame_batches)

    def decrypt_frames() -> None:
        deliver(fragments, frame_count, "frames")

    reads: list[tuple[bytes, int]] = []

    def coalesce() -> None:  # what UDP GRO hands the agent: one read per message
        reads.clear()
        for chunk in fragments:
            message: list[bytes] = []
            for d in chunk:
                if d[13] == 0 and message:
                    reads.append((b"".join(message), len(message[0])))
                    message = []
                message.append(d)
            reads.append((b"".join(message), len(message[0])))

    def decrypt_reads() -> None:
        delivered = 0
        for data, segment in reads:
            events = b.receive_message(data, segment, 1.0) if segment < len(data) else \
                b.receive_batch((data,), 1.0)
            for event in events or ():
                if isinstance(event, DecryptedPackets):
                    delivered += len(event.packets)
        if delivered != frame_count:
            raise RuntimeError(f"only {delivered} of {frame_count} frames decrypted whole")

    t_fenc = t_fdec = t_rdec = float("inf")
    for _ in range(runs):
        t_fenc = min(t_fenc, _best(1, encrypt_frames))
        t_fdec = min(t_fdec, _best(1, decrypt_frames))
        t_fenc = min(t_fenc, _best(1, encrypt_frames))
        coalesce()
        t_rdec = min(t_rdec, _best(1, decrypt_reads))

    def frames(what: str, seconds: float) -> Result:
        return Result(what, frame_count / seconds, frame_count * frame_size * 8 / seconds / 1e6)

    return [
        result("seal only (cryptography, no session)", t_bare),
        result("session encrypt", t_enc),
        result("session decrypt", t_dec),
        result("encrypt + decrypt, one core", t_enc + t_dec),
        frames(f"{frame_size}-byte frames: encrypt (0xE4 fragments)", t_fenc),
        frames(f"{frame_size}-byte frames: reassemble + decrypt", t_fdec),
        frames(f"{frame_size}-byte frames: decrypt whole reads (GRO)", t_rdec),
        frames(f"{frame_size}-byte frames: both, one core", t_fenc + t_fdec),
        frames(f"{frame_size}-byte frames: encrypt + whole reads, one core", t_fenc + t_rdec),
        Result("handshakes (both sides, with certificate checks)", handshakes / t_hs, 0.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshd.tunnel.throughput",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--packets", type=int, default=200_000, help="packets per run")
    parser.add_argument("--size", type=int, default=1400, help="IP packet size in bytes")
    parser.add_argument("--batch", type=int, default=64, help="packets per encrypt/receive call")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs")
    parser.add_argument("--frame-size", type=int, default=FRAME_SIZE,
                        help="IP size of the offload frames (TCP super-packets; default: the "
                             "largest the agent lets mesh0 make)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.size < 20 or args.batch < 1 or args.packets < 1:
        parser.error("need --size >= 20, --batch >= 1, --packets >= 1")
    if not 40 <= args.frame_size <= 65535:
        parser.error("need 40 <= --frame-size <= 65535")
    results = measure(packets=args.packets, size=args.size, batch=args.batch, runs=args.runs,
                      frame_size=args.frame_size)
    if args.json:
        print(json.dumps({"size": args.size, "batch": args.batch,
                          "results": [asdict(r) for r in results]}))
        return 0
    print(f"{args.size}-byte packets, batches of {args.batch}, best of {args.runs}")
    for r in results:
        rate = f"{r.mbit_per_s:8.0f} Mbit/s" if r.mbit_per_s else ""
        print(f"  {r.what:<50} {r.packets_per_s:>10.0f} /s {rate}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
