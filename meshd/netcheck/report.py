"""`meshd netcheck` output: an aligned text table or one JSON object."""

from __future__ import annotations

import json

from meshd.netcheck.classify import NetcheckReport
from meshd.udp import format_address


def to_json(report: NetcheckReport) -> str:
    """One JSON object; keys are documented in docs/reference/meshd.md."""
    return json.dumps(
        {
            "server": format_address(report.server),
            "local": format_address(report.local),
            "public": format_address(report.public),
            "nat": report.nat,
            "mapping": report.mapping.value if report.mapping else None,
            "filtering": report.filtering.value if report.filtering else None,
            "hairpin": report.hairpin,
            "port_preserved": report.port_preserved,
            "nat_type": report.nat_type.value,
            "can_hole_punch_with": [t.value for t in report.can_hole_punch_with],
            "relay_with": [t.value for t in report.relay_with],
            "notes": list(report.notes),
        }
    )


def _yes_no(value: bool | None) -> str:
    return "unknown" if value is None else "yes" if value else "no"


def render_text(report: NetcheckReport) -> str:
    """The table an operator reads, ending with the hole-punch verdict and any notes."""
    rows = [
        ("server", format_address(report.server)),
        ("local address", format_address(report.local)),
        ("public address", format_address(report.public)),
        ("NAT", _yes_no(report.nat)),
        ("mapping", report.mapping.value if report.mapping else "unknown"),
        ("filtering", report.filtering.value if report.filtering else "unknown"),
        ("hairpin", _yes_no(report.hairpin)),
        ("port preserved", _yes_no(report.port_preserved)),
        ("NAT type", report.nat_type.value),
    ]
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    lines.append("can hole-punch with: " + (", ".join(report.can_hole_punch_with) or "(none)"))
    lines.append("needs relay with: " + (", ".join(report.relay_with) or "(none)"))
    lines += [f"note: {note}" for note in report.notes]
    return "\n".join(lines)
