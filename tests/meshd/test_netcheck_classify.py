"""meshd.netcheck.classify: behaviour classification, NAT type and the hole-punch matrix."""

from __future__ import annotations

from dataclasses import replace

import pytest

from meshd.netcheck.classify import (
    KNOWN_TYPES,
    VERDICTS,
    Behaviour,
    NatType,
    Verdict,
    build_report,
    classify_filtering,
    classify_mapping,
    hole_punch,
    nat_type,
)
from meshd.netcheck.machine import Observations

EIM = EIF = Behaviour.ENDPOINT_INDEPENDENT
ADM = ADF = Behaviour.ADDRESS_DEPENDENT
APDM = APDF = Behaviour.ADDRESS_AND_PORT_DEPENDENT
D, DP, R = Verdict.DIRECT, Verdict.DIRECT_PEER_REFLEXIVE, Verdict.RELAY

OBS = Observations(
    server=("198.51.100.1", 3478),
    local=("10.0.0.2", 5000),
    mapped=("203.0.113.1", 5000),
    other_address=("198.51.100.2", 3479),
    mapped_alt_ip=("203.0.113.1", 5000),
    mapped_alt_address=None,
    filtering_change_ip_port=False,
    filtering_change_port=True,
    hairpin=False,
    ignored=0,
    notes=(),
)

# The brief's matrix, row by row (public, full-cone, restricted, port-restricted, symmetric).
MATRIX = {
    NatType.PUBLIC: [D, D, D, D, D],
    NatType.FULL_CONE: [D, D, D, D, DP],
    NatType.RESTRICTED: [D, D, D, D, DP],
    NatType.PORT_RESTRICTED: [D, D, D, D, R],
    NatType.SYMMETRIC: [D, DP, DP, R, R],
}


def test_verdict_matrix() -> None:
    for row, verdicts in MATRIX.items():
        assert [hole_punch(row, column) for column in KNOWN_TYPES] == verdicts
    assert len(VERDICTS) == 25


def test_verdict_matrix_is_symmetric() -> None:
    for a in KNOWN_TYPES:
        for b in KNOWN_TYPES:
            assert hole_punch(a, b) is hole_punch(b, a)


def test_unknown_has_no_verdict() -> None:
    assert hole_punch(NatType.UNKNOWN, NatType.PUBLIC) is None
    assert hole_punch(NatType.PUBLIC, NatType.UNKNOWN) is None


@pytest.mark.parametrize(
    ("nat", "mapping", "filtering", "expected"),
    [
        (False, EIM, EIF, NatType.PUBLIC),
        (False, None, EIF, NatType.PUBLIC),
        (False, EIM, ADF, NatType.RESTRICTED),
        (False, EIM, APDF, NatType.PORT_RESTRICTED),
        (False, EIM, None, NatType.UNKNOWN),
        (True, EIM, EIF, NatType.FULL_CONE),
        (True, EIM, ADF, NatType.RESTRICTED),
        (True, EIM, APDF, NatType.PORT_RESTRICTED),
        (True, ADM, EIF, NatType.SYMMETRIC),
        (True, APDM, APDF, NatType.SYMMETRIC),
        (True, APDM, None, NatType.SYMMETRIC),
        (True, EIM, None, NatType.UNKNOWN),
        (True, None, EIF, NatType.UNKNOWN),
        (True, None, None, NatType.UNKNOWN),
    ],
)
def test_nat_type(
    nat: bool, mapping: Behaviour | None, filtering: Behaviour | None, expected: NatType
) -> None:
    assert nat_type(nat, mapping, filtering) is expected


@pytest.mark.parametrize(
    ("alt_ip", "alt_address", "expected"),
    [
        (("203.0.113.1", 5000), None, EIM),
        (("203.0.113.1", 6000), ("203.0.113.1", 6000), ADM),
        (("203.0.113.1", 6000), ("203.0.113.1", 6001), APDM),
        (("203.0.113.1", 6000), None, None),
        (None, None, None),
    ],
)
def test_classify_mapping(
    alt_ip: tuple[str, int] | None, alt_address: tuple[str, int] | None,
    expected: Behaviour | None,
) -> None:
    obs = replace(OBS, mapped_alt_ip=alt_ip, mapped_alt_address=alt_address)
    assert classify_mapping(obs) is expected


@pytest.mark.parametrize(
    ("change_both", "change_port", "expected"),
    [
        (True, None, EIF),
        (True, False, EIF),
        (False, True, ADF),
        (False, False, APDF),
        (False, None, None),
        (None, True, None),
    ],
)
def test_classify_filtering(
    change_both: bool | None, change_port: bool | None, expected: Behaviour | None
) -> None:
    obs = replace(OBS, filtering_change_ip_port=change_both, filtering_change_port=change_port)
    assert classify_filtering(obs) is expected


def test_filtering_unknown_when_alternate_never_answered() -> None:
    obs = replace(OBS, mapped_alt_ip=None, mapped_alt_address=None,
                  filtering_change_port=False)
    assert classify_filtering(obs) is None
    assert "the server's alternate address never answered: filtering unknown" in (
        build_report(obs).notes
    )


def test_build_report() -> None:
    report = build_report(OBS)
    assert report.nat
    assert (report.mapping, report.filtering) == (EIM, ADF)
    assert report.nat_type is NatType.RESTRICTED
    assert report.port_preserved
    assert report.public == ("203.0.113.1", 5000)
    assert report.can_hole_punch_with == KNOWN_TYPES  # D* counts as hole-punchable
    assert report.relay_with == ()


def test_build_report_symmetric_lists_relays() -> None:
    obs = replace(OBS, mapped_alt_ip=("203.0.113.1", 7000), mapped_alt_address=("1.2.3.4", 1))
    report = build_report(obs)
    assert report.nat_type is NatType.SYMMETRIC
    assert report.can_hole_punch_with == (NatType.PUBLIC, NatType.FULL_CONE, NatType.RESTRICTED)
    assert report.relay_with == (NatType.PORT_RESTRICTED, NatType.SYMMETRIC)
    assert not report.port_preserved or report.public[1] == report.local[1]


def test_unknown_type_is_explained() -> None:
    report = build_report(replace(OBS, filtering_change_ip_port=None))
    assert report.nat_type is NatType.UNKNOWN
    assert report.can_hole_punch_with == report.relay_with == ()
    assert report.notes == ("NAT type unknown: no hole-punch verdict",)
