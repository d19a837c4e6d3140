"""From observations to NAT behaviour, NAT type and the hole-punch verdict. Pure functions.

Terms: RFC 4787 mapping/filtering behaviours; classic RFC 3489 names for the combinations.
The verdict matrix is the one in docs/design §6 (D = direct, D* = direct via a peer-reflexive
candidate learnt from the EIM side's actual source, R = relay).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from meshd.netcheck.machine import Observations
from meshd.udp import Address


class Behaviour(StrEnum):
    """RFC 4787 §4.1 (mapping) and §5 (filtering) behaviours."""

    ENDPOINT_INDEPENDENT = "endpoint-independent"
    ADDRESS_DEPENDENT = "address-dependent"
    ADDRESS_AND_PORT_DEPENDENT = "address-and-port-dependent"


class NatType(StrEnum):
    """What a peer needs to know about us to choose a path."""

    PUBLIC = "public"  # no NAT, endpoint-independent filtering
    FULL_CONE = "full-cone"  # EIM + EIF
    RESTRICTED = "restricted"  # EIM + ADF
    PORT_RESTRICTED = "port-restricted"  # EIM + APDF, or no NAT behind an APDF firewall
    SYMMETRIC = "symmetric"  # ADM or APDM
    UNKNOWN = "unknown"


class Verdict(StrEnum):
    """How two peers can connect."""

    DIRECT = "direct"
    DIRECT_PEER_REFLEXIVE = "direct-prflx"
    RELAY = "relay"


KNOWN_TYPES = (
    NatType.PUBLIC,
    NatType.FULL_CONE,
    NatType.RESTRICTED,
    NatType.PORT_RESTRICTED,
    NatType.SYMMETRIC,
)

#                       public  full-cone  restricted  port-restricted  symmetric
_MATRIX = {
    NatType.PUBLIC:          "D       D          D           D                D",
    NatType.FULL_CONE:       "D       D          D           D                D*",
    NatType.RESTRICTED:      "D       D          D           D                D*",
    NatType.PORT_RESTRICTED: "D       D          D           D                R",
    NatType.SYMMETRIC:       "D       D*         D*          R                R",
}  # fmt: skip
_CODES = {"D": Verdict.DIRECT, "D*": Verdict.DIRECT_PEER_REFLEXIVE, "R": Verdict.RELAY}

VERDICTS: dict[tuple[NatType, NatType], Verdict] = {
    (row, column): _CODES[code]
    for row, line in _MATRIX.items()
    for column, code in zip(KNOWN_TYPES, line.split(), strict=True)
}
"""(our type, peer's type) -> verdict, for the five known types."""


def hole_punch(ours: NatType, peer: NatType) -> Verdict | None:
    """The verdict for a pair; None when either type is unknown."""
    return VERDICTS.get((ours, peer))


def classify_mapping(obs: Observations) -> Behaviour | None:
    """RFC 5780 §4.3: compare the mapped addresses of tests I, II and III."""
    if obs.mapped_alt_ip is None:
        return None
    if obs.mapped_alt_ip == obs.mapped:
        return Behaviour.ENDPOINT_INDEPENDENT
    if obs.mapped_alt_address is None:
        return None
    if obs.mapped_alt_address == obs.mapped_alt_ip:
        return Behaviour.ADDRESS_DEPENDENT
    return Behaviour.ADDRESS_AND_PORT_DEPENDENT


def classify_filtering(obs: Observations) -> Behaviour | None:
    """RFC 5780 §4.4: which CHANGE-REQUEST answers got through to the fresh socket."""
    if obs.filtering_change_ip_port is None:
        return None
    if obs.filtering_change_ip_port:
        return Behaviour.ENDPOINT_INDEPENDENT
    if not alternate_answered(obs):
        return None  # silence proves nothing when the alternate address never answers us
    if obs.filtering_change_port is None:
        return None
    if obs.filtering_change_port:
        return Behaviour.ADDRESS_DEPENDENT
    return Behaviour.ADDRESS_AND_PORT_DEPENDENT


def alternate_answered(obs: Observations) -> bool:
    """Mapping test II or III got an answer, so the server's alternate IP can reach us."""
    return obs.mapped_alt_ip is not None or obs.mapped_alt_address is not None


_BY_FILTERING = {
    Behaviour.ENDPOINT_INDEPENDENT: NatType.FULL_CONE,
    Behaviour.ADDRESS_DEPENDENT: NatType.RESTRICTED,
    Behaviour.ADDRESS_AND_PORT_DEPENDENT: NatType.PORT_RESTRICTED,
}


def nat_type(nat: bool, mapping: Behaviour | None, filtering: Behaviour | None) -> NatType:
    """Name the combination. Without a NAT only the filtering (a firewall) matters."""
    if filtering is not None and not nat:
        if filtering is Behaviour.ENDPOINT_INDEPENDENT:
            return NatType.PUBLIC
        return _BY_FILTERING[filtering]
    if nat and mapping in (Behaviour.ADDRESS_DEPENDENT, Behaviour.ADDRESS_AND_PORT_DEPENDENT):
        return NatType.SYMMETRIC
    if nat and mapping is Behaviour.ENDPOINT_INDEPENDENT and filtering is not None:
        return _BY_FILTERING[filtering]
    return NatType.UNKNOWN


@dataclass(frozen=True)
class NetcheckReport:
    """The result of `meshd netcheck`."""

    server: Address
    """The STUN server's primary address."""
    local: Address
    """Our local address (the mapping socket)."""
    public: Address
    """Our address as the server saw it (test I)."""
    nat: bool
    """True when `public` differs from `local`."""
    mapping: Behaviour | None
    """Mapping behaviour; None when it could not be tested."""
    filtering: Behaviour | None
    """Filtering behaviour; None when it could not be tested."""
    hairpin: bool | None
    """Whether the NAT loops our own public address back to us."""
    port_preserved: bool
    """The public port equals the local port."""
    nat_type: NatType
    """The combination's name."""
    can_hole_punch_with: tuple[NatType, ...]
    """Peer types reachable directly (D or D*)."""
    relay_with: tuple[NatType, ...]
    """Peer types that need the relay."""
    notes: tuple[str, ...]
    """Why anything is unknown."""


def build_report(obs: Observations) -> NetcheckReport:
    """Classify `obs` and decide the hole-punch verdict against every known peer type."""
    nat = obs.mapped != obs.local
    mapping = classify_mapping(obs)
    filtering = classify_filtering(obs)
    kind = nat_type(nat, mapping, filtering)
    verdicts = [(peer, hole_punch(kind, peer)) for peer in KNOWN_TYPES]
    notes = list(obs.notes)
    if obs.filtering_change_ip_port is False and not alternate_answered(obs):
        notes.append("the server's alternate address never answered: filtering unknown")
    if kind is NatType.UNKNOWN:
        notes.append("NAT type unknown: no hole-punch verdict")
    return NetcheckReport(
        server=obs.server,
        local=obs.local,
        public=obs.mapped,
        nat=nat,
        mapping=mapping,
        filtering=filtering,
        hairpin=obs.hairpin,
        port_preserved=obs.mapped[1] == obs.local[1],
        nat_type=kind,
        can_hole_punch_with=tuple(p for p, v in verdicts if v and v is not Verdict.RELAY),
        relay_with=tuple(p for p, v in verdicts if v is Verdict.RELAY),
        notes=tuple(notes),
    )
