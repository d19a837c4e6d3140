"""ICE candidates (RFC 8445 §5): kinds, priorities, foundations, the signaling encoding, pair
formation and ordering, and a sans-I/O server-reflexive query.

A node gathers, per tunnel socket, a *host* candidate (the socket's own address), a
*server-reflexive* one (what a STUN server sees, `ReflexiveQuery`) and, when it has a relay
allocation, a *relayed* one; *peer-reflexive* candidates are learnt from connectivity checks.
Both peers exchange a `Description` through `meshd server`; it travels as JSON:

    {"v": 1, "ufrag": "Ab3x9QzW", "pwd": "…24 ice-chars…", "gen": 0,
     "cands": ["host 10.0.1.2 41641 2130706431 1f3a9c07",
               "srflx 203.0.113.1 40000 1694498815 7c0e1d22",
               "relay 198.51.100.7 50000 16777215 0b5e44a1"]}

One candidate is `kind ip port priority foundation` (SDP's a=candidate without the parts a
single-component UDP-only agent never varies). `parse_description` takes the decoded JSON and
raises `DescriptionError` (a remote error) for anything malformed; the dataclasses raise
`ValueError` for local misuse.
"""

from __future__ import annotations

import ipaddress
import re
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from enum import Enum

from meshd.stun.codec import (
    MappedAddress,
    MessageClass,
    Method,
    StunMessage,
    StunParseError,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.stun.transaction import ClientTransaction, RetransmitPolicy
from meshd.udp import Address, Transmit

COMPONENT = 1
"""The only ICE component: one UDP flow per peer carries everything."""
MAX_CANDIDATES = 32
"""Candidates accepted in one description (more is a remote error)."""
DESCRIPTION_VERSION = 1
_ICE_CHARS = re.compile(r"^[A-Za-z0-9+/]+$")  # RFC 8445 §15.1 ice-char


class DescriptionError(Exception):
    """A peer's description (received through the server) is malformed: a remote error."""


class CandidateKind(Enum):
    """Where a candidate comes from (RFC 8445 §5.1.1)."""

    HOST = "host"
    SRFLX = "srflx"
    PRFLX = "prflx"
    RELAY = "relay"


TYPE_PREFERENCE = {
    CandidateKind.HOST: 126,
    CandidateKind.PRFLX: 110,
    CandidateKind.SRFLX: 100,
    CandidateKind.RELAY: 0,
}
"""RFC 8445 §5.1.2.2's recommended type preferences: direct before reflexive before relayed."""


def candidate_priority(kind: CandidateKind, local_preference: int = 65535) -> int:
    """RFC 8445 §5.1.2.1: 2^24·type preference + 2^8·local preference + (256 − component)."""
    if not 0 <= local_preference <= 65535:
        raise ValueError(f"local preference out of range 0..65535: {local_preference}")
    return (TYPE_PREFERENCE[kind] << 24) + (local_preference << 8) + (256 - COMPONENT)


def foundation(kind: CandidateKind, base_ip: str, server_ip: str = "") -> str:
    """RFC 8445 §5.1.1.3: equal for candidates of one kind, base IP and STUN/relay server."""
    return f"{zlib.crc32(f'{kind.value}|{base_ip}|{server_ip}'.encode()):08x}"


def _check_address(address: Address) -> None:
    ipaddress.ip_address(address[0])  # ValueError for anything but an IP literal
    if not 0 < address[1] <= 0xFFFF:
        raise ValueError(f"port out of range 1..65535: {address[1]}")


@dataclass(frozen=True)
class Candidate:
    """One transport address a peer may be reachable at."""

    kind: CandidateKind
    """Host, server-reflexive, peer-reflexive or relayed."""
    address: Address
    """The transport address checks and data are sent to."""
    priority: int
    """RFC 8445 §5.1.2 priority, 1..2^31−1 in practice (`candidate_priority`)."""
    foundation: str
    """RFC 8445 §5.1.1.3 foundation, 1..32 ice-chars."""
    base: Address | None = None
    """Local candidates only: the socket (or relay allocation) they send from; None means
    `address` itself (host, relayed and every remote candidate)."""

    def __post_init__(self) -> None:
        _check_address(self.address)
        if self.base is not None:
            _check_address(self.base)
        if not 1 <= self.priority <= 0xFFFFFFFF:
            raise ValueError(f"priority out of range: {self.priority}")
        if not 1 <= len(self.foundation) <= 32 or not _ICE_CHARS.match(self.foundation):
            raise ValueError(f"bad foundation {self.foundation!r}")

    @property
    def base_address(self) -> Address:
        """Where datagrams for this candidate leave from."""
        return self.base if self.base is not None else self.address

    @property
    def ipv6(self) -> bool:
        """The address is IPv6 (pairs never mix families)."""
        return ":" in self.address[0]


def host_candidate(address: Address, local_preference: int = 65535) -> Candidate:
    """A host candidate for one bound socket."""
    kind = CandidateKind.HOST
    return Candidate(kind, address, candidate_priority(kind, local_preference),
                     foundation(kind, address[0]))


def reflexive_candidate(mapped: Address, base: Address, server: Address,
                        local_preference: int = 65535) -> Candidate:
    """The server-reflexive candidate `server` reported for the socket `base`."""
    kind = CandidateKind.SRFLX
    return Candidate(kind, mapped, candidate_priority(kind, local_preference),
                     foundation(kind, base[0], server[0]), base)


def relay_candidate(relayed: Address, server: Address) -> Candidate:
    """The relayed candidate of an allocation on `server`."""
    kind = CandidateKind.RELAY
    return Candidate(kind, relayed, candidate_priority(kind), foundation(kind, relayed[0],
                                                                         server[0]))


def gather(
    host: Sequence[Address],
    reflexive: Iterable[tuple[Address, Address, Address]] = (),
    relayed: Iterable[tuple[Address, Address]] = (),
) -> tuple[Candidate, ...]:
    """A node's local candidates: `host` sockets (first preferred), `reflexive` as (mapped,
    base socket, STUN server), `relayed` as (relayed address, relay server). A reflexive
    address equal to its base (a public host) is redundant and left out (RFC 8445 §5.1.3)."""
    preference = {address: 65535 - i for i, address in enumerate(host)}
    out = [host_candidate(address, preference[address]) for address in host]
    for mapped, base, server in reflexive:
        if mapped != base and all(c.address != mapped for c in out):
            out.append(reflexive_candidate(mapped, base, server, preference.get(base, 65535)))
    out += [relay_candidate(address, server) for address, server in relayed]
    return tuple(out)


# --- signaling encoding -----------------------------------------------------------------------


@dataclass(frozen=True)
class Description:
    """What one side tells the other through the server: credentials and candidates."""

    ufrag: str
    """ICE username fragment (4..32 ice-chars), fixed for the life of one peer session."""
    pwd: str
    """ICE password (22..64 ice-chars): the short-term MESSAGE-INTEGRITY key of checks sent
    *to* this side."""
    generation: int
    """Bumped by every restart of checks, so the peer recognises one (RFC 8445 §9)."""
    candidates: tuple[Candidate, ...]
    """Host, server-reflexive and relayed candidates (never peer-reflexive)."""

    def __post_init__(self) -> None:
        if not 4 <= len(self.ufrag) <= 32 or not _ICE_CHARS.match(self.ufrag):
            raise ValueError("ufrag must be 4..32 ice-chars")
        if not 22 <= len(self.pwd) <= 64 or not _ICE_CHARS.match(self.pwd):
            raise ValueError("pwd must be 22..64 ice-chars")
        if not 0 <= self.generation < 2**31:
            raise ValueError(f"generation out of range: {self.generation}")
        if len(self.candidates) > MAX_CANDIDATES:
            raise ValueError(f"more than {MAX_CANDIDATES} candidates")


def encode_candidate(candidate: Candidate) -> str:
    """`kind ip port priority foundation`."""
    ip, port = candidate.address
    return f"{candidate.kind.value} {ip} {port} {candidate.priority} {candidate.foundation}"


def parse_candidate(text: object) -> Candidate:
    """The inverse of `encode_candidate`; `DescriptionError` for anything else."""
    if not isinstance(text, str) or len(text) > 128:
        raise DescriptionError("a candidate must be a short string")
    parts = text.split(" ")
    if len(parts) != 5:
        raise DescriptionError(f"candidate {text!r}: expected 5 fields")
    kind_text, ip, port, priority, found = parts
    try:
        kind = CandidateKind(kind_text)
        if kind is CandidateKind.PRFLX:
            raise ValueError("peer-reflexive candidates are learnt, not signaled")
        if not (port.isdigit() and priority.isdigit()):
            raise ValueError("port and priority must be decimal")
        address = (str(ipaddress.ip_address(ip)), int(port))
        return Candidate(kind, address, int(priority), found)
    except ValueError as exc:
        raise DescriptionError(f"candidate {text!r}: {exc}") from None


def encode_description(description: Description) -> dict[str, object]:
    """The JSON-able form sent through the server."""
    return {
        "v": DESCRIPTION_VERSION,
        "ufrag": description.ufrag,
        "pwd": description.pwd,
        "gen": description.generation,
        "cands": [encode_candidate(c) for c in description.candidates],
    }


def parse_description(obj: object) -> Description:
    """A peer's description from its JSON form; `DescriptionError` for anything malformed."""
    if not isinstance(obj, dict):
        raise DescriptionError("a description must be an object")
    if obj.get("v") != DESCRIPTION_VERSION:
        raise DescriptionError(f"unsupported description version {obj.get('v')!r}")
    ufrag, pwd, generation, cands = (obj.get(k) for k in ("ufrag", "pwd", "gen", "cands"))
    if not isinstance(ufrag, str) or not isinstance(pwd, str):
        raise DescriptionError("ufrag and pwd must be strings")
    if not isinstance(generation, int) or isinstance(generation, bool):
        raise DescriptionError("gen must be an integer")
    if not isinstance(cands, list) or len(cands) > MAX_CANDIDATES:
        raise DescriptionError(f"cands must be a list of at most {MAX_CANDIDATES}")
    candidates = tuple(parse_candidate(c) for c in cands)
    try:
        return Description(ufrag, pwd, generation, candidates)
    except ValueError as exc:
        raise DescriptionError(str(exc)) from None


# --- roles and pairs --------------------------------------------------------------------------


class Role(Enum):
    """ICE role (RFC 8445 §6.1.1): the controlling agent nominates the pair."""

    CONTROLLING = "controlling"
    CONTROLLED = "controlled"


def role_for(local_node: str, peer_node: str) -> Role:
    """Deterministic roles without a conflict: the node whose name sorts first controls."""
    if local_node == peer_node:
        raise ValueError(f"a node cannot peer with itself ({local_node!r})")
    return Role.CONTROLLING if local_node < peer_node else Role.CONTROLLED


def pair_priority(controlling: int, controlled: int) -> int:
    """RFC 8445 §6.1.2.3: 2^32·MIN(G,D) + 2·MAX(G,D) + (G>D ? 1 : 0)."""
    g, d = controlling, controlled
    return (min(g, d) << 32) + 2 * max(g, d) + (1 if g > d else 0)


PairKey = tuple[Address, Address]
"""(local base address, remote address): what identifies a pair on the wire."""


@dataclass(frozen=True)
class CandidatePair:
    """A local and a remote candidate checks run between."""

    local: Candidate
    """The local candidate; checks leave from its `base_address`."""
    remote: Candidate
    """The remote candidate checks go to."""
    priority: int
    """RFC 8445 §6.1.2.3 pair priority for our role."""

    @property
    def key(self) -> PairKey:
        """(local base, remote address)."""
        return (self.local.base_address, self.remote.address)

    @property
    def relayed(self) -> bool:
        """A relay-to-relay pair: the fallback, never nominated as direct."""
        return self.local.kind is CandidateKind.RELAY


def form_pairs(local: Iterable[Candidate], remote: Iterable[Candidate], role: Role,
               limit: int = 100) -> list[CandidatePair]:
    """The check list (RFC 8445 §6.1.2): every local × remote candidate of one IP family,
    server-reflexive local candidates replaced by their base, redundant pairs pruned (highest
    priority kept), highest priority first, at most `limit`. Relayed candidates pair only with
    relayed ones: the relay is the fallback path, not a punching aid."""
    locals_, remotes = list(local), list(remote)
    host_by_base = {c.address: c for c in locals_ if c.kind is CandidateKind.HOST}
    best: dict[PairKey, CandidatePair] = {}
    for mine in locals_:
        if mine.kind is CandidateKind.PRFLX:
            continue  # learnt from checks; its base already pairs
        if mine.kind is CandidateKind.SRFLX:
            mine = host_by_base.get(mine.base_address, mine)  # §6.1.2.4: use the base
        for theirs in remotes:
            if mine.ipv6 != theirs.ipv6:
                continue
            if (mine.kind is CandidateKind.RELAY) != (theirs.kind is CandidateKind.RELAY):
                continue
            g, d = ((mine.priority, theirs.priority) if role is Role.CONTROLLING
                    else (theirs.priority, mine.priority))
            pair = CandidatePair(mine, theirs, pair_priority(g, d))
            known = best.get(pair.key)
            if known is None or pair.priority > known.priority:
                best[pair.key] = pair
    ordered = sorted(best.values(), key=lambda p: (-p.priority, p.key))
    return ordered[:limit]


# --- server-reflexive gathering ---------------------------------------------------------------

GATHER_POLICY = RetransmitPolicy(initial_rto_s=0.1, transmissions=5, give_up_s=1.6)
"""A STUN server one RTT away answers in well under a second; aioice waits 5 s."""


class ReflexiveQuery:
    """One STUN Binding request from a tunnel socket: its server-reflexive address. Sans-I/O,
    driven like `NetcheckMachine` (`receive`, `datagrams_to_send`, `get_timer`,
    `handle_timer`)."""

    def __init__(
        self,
        local: Address,
        server: Address,
        now: float,
        *,
        new_transaction_id: Callable[[], bytes],
        policy: RetransmitPolicy = GATHER_POLICY,
    ) -> None:
        self.local = local
        self.server = server
        self.mapped: Address | None = None
        """The answer, once there is one."""
        self.failed = False
        """True when the server never answered."""
        txid = new_transaction_id()
        request = StunMessage(MessageClass.REQUEST, Method.BINDING, txid, fingerprint=True)
        self._transaction = ClientTransaction(txid, encode_message(request), local, server,
                                              policy, now)

    @property
    def done(self) -> bool:
        """Answered or given up."""
        return self.mapped is not None or self.failed

    def candidate(self) -> tuple[Address, Address, Address] | None:
        """(mapped, base, server) for `gather`, once answered."""
        return None if self.mapped is None else (self.mapped, self.local, self.server)

    def receive(self, data: bytes, source: Address, local: Address, now: float) -> bool:
        """Offer one datagram; True when it was the answer to this query."""
        if self.done or source != self.server or local != self.local:
            return False
        try:
            message = parse_message(data)
        except StunParseError:
            return False
        if (message.transaction_id != self._transaction.transaction_id
                or message.message_class is not MessageClass.SUCCESS):
            return False
        xor, plain = message.get(XorMappedAddress), message.get(MappedAddress)
        mapped = xor or plain
        if mapped is None:
            return False
        self.mapped = mapped.address
        return True

    def datagrams_to_send(self, now: float) -> list[Transmit]:
        """The request and its retransmissions."""
        return [] if self.done else self._transaction.datagrams_to_send(now)

    def get_timer(self) -> float | None:
        """The next retransmission or the give-up time."""
        return None if self.done else self._transaction.get_timer()

    def handle_timer(self, now: float) -> None:
        """Give up when the time is over."""
        if not self.done and self._transaction.expired(now):
            self.failed = True
