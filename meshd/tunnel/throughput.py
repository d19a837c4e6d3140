"""How fast the tunnel's crypto session is on this machine: `python -m meshd.tunnel.throughput`.

Two in-memory sessions (no sockets, no TUN): one encrypts batches of IP packets, the other
decrypts them (replay window and source check included). Also measured: the bare
ChaCha20-Poly1305 seal of the same packets (the ceiling for pure Python around `cryptography`)
and full handshakes per second (two X25519-heavy Noise messages plus two certificate checks).
One core does all the work, as one session does in the agent.
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
from meshd.tunnel.session import DecryptedPackets, TunnelSession

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


def _best(runs: int, fn: Callable[[], None]) -> float:
    best = float("inf")
    for _ in range(runs):
        start = time.process_time()  # CPU time: other load on the machine matters less
        fn()
        best = min(best, time.process_time() - start)
    return best


def measure(*, packets: int, size: int, batch: int, runs: int = 3) -> list[Result]:
    """Best of `runs` for each measurement; `packets` per run, in batches of `batch`."""
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

    def decrypt() -> None:
        delivered = 0
        for chunk in sealed:
            for event in b.receive_batch(chunk, 1.0):
                if isinstance(event, DecryptedPackets):
                    delivered += len(event.packets)
        if delivered != count:
            raise RuntimeError(f"only {delivered} of {count} packets decrypted")

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
    return [
        result("seal only (cryptography, no session)", t_bare),
        result("session encrypt", t_enc),
        result("session decrypt", t_dec),
        result("encrypt + decrypt, one core", t_enc + t_dec),
        Result("handshakes (both sides, with certificate checks)", handshakes / t_hs, 0.0),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m meshd.tunnel.throughput",
                                     description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--packets", type=int, default=200_000, help="packets per run")
    parser.add_argument("--size", type=int, default=1400, help="IP packet size in bytes")
    parser.add_argument("--batch", type=int, default=64, help="packets per encrypt/receive call")
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args(argv)
    if args.size < 20 or args.batch < 1 or args.packets < 1:
        parser.error("need --size >= 20, --batch >= 1, --packets >= 1")
    results = measure(packets=args.packets, size=args.size, batch=args.batch, runs=args.runs)
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
