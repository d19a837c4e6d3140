"""The server's node list (`GET /nodes` on `meshd server`'s metrics listener, `meshd nodes`).

Pure parts only: the typed listing `ControlServer.node_table()` returns (`NodeTable`,
`NodeListing`, `SessionInfo`), its JSON document (`nodes_document`, the reference is
docs/reference/meshd.md, "`meshd nodes`"), a request's filter (`select`, raising
`NodesRequestError` for a bad one) and the `meshd nodes` table (`render_nodes`, from the JSON
document, so it reads what any server version sends).

What the server knows, and nothing more: the registry (overlay address, last static key, last
NAT; persisted), the node's current control session, or the last one that ended since this
process started (in memory: after a restart a node is listed from the registry, without
session, until it reconnects), the revocation list in force, and, with the relay in the same
process, how many allocations each node holds. Candidates are not here: agents exchange them
in signals the server routes without reading.
"""

from __future__ import annotations

import base64
import enum
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgeweave.pki.identity import is_valid_node_name
from meshd.control.revoked import SERIAL_PREFIX, format_serial
from meshd.control.wire import NatSummary
from meshd.udp import Address, format_address


class NodeState(enum.StrEnum):
    """Where a node stands, as the list says it."""

    ONLINE = "online"
    """It has an active control session."""
    OFFLINE = "offline"
    """It has none (and is not revoked)."""
    REVOKED = "revoked"
    """The revocation list refuses it (never online: a revoked session is cut at once)."""


@dataclass(frozen=True)
class SessionInfo:
    """One control session of a node: its current one, or the last one that ended."""

    connected_at: float
    """When its TLS connection was accepted (Unix seconds)."""
    last_seen: float
    """When bytes last came from it (agents ping every keepaliveS)."""
    ended_at: float | None
    """When it ended; None while it is open."""
    end_reason: str | None
    """Why it ended: an error code (`idle-timeout`, `replaced`, `revoked`, ...) or
    `connection lost`; None while it is open."""
    remote: Address | None
    """The address the connection came from, as the server saw it (the node's NAT mapping)."""
    serial: int | None
    """The client certificate's serial number."""
    not_after: float | None
    """The client certificate's expiry (Unix seconds)."""
    version: int
    """The protocol version the session spoke."""
    software: str
    """What the agent's hello said it runs ("" when it said nothing)."""


@dataclass(frozen=True)
class NodeListing:
    """One node as the server knows it."""

    node: str
    """Its name (from its certificate, or from a revocation list entry)."""
    overlay: ipaddress.IPv4Address | None
    """Its overlay address; None for a node only the revocation list names."""
    state: NodeState
    """Online, offline or revoked."""
    static_key: bytes | None
    """The tunnel static key it presented last (None: never said hello to this registry)."""
    nat: NatSummary | None
    """The NAT it reported last (None: never reported one)."""
    session: SessionInfo | None
    """Its current session, else its last one since the server started, else None."""
    revoked_by: tuple[str, ...]
    """The revocation list entries that refuse it, as the list writes them (`edge-7`,
    `serial:4f1a9c03e2`); a `serial:` entry counts when it names the certificate of the
    node's current or last session. Empty: not revoked."""
    relay_allocations: int | None
    """TURN allocations it holds on the relay of this process; None without one."""


@dataclass(frozen=True)
class NodeTable:
    """Every node the server knows, sorted by name, and what the list is about."""

    nodes: tuple[NodeListing, ...]
    """Registry entries, online nodes and nodes the revocation list names."""
    overlay_network: ipaddress.IPv4Network
    """Where overlay addresses come from."""
    revoked_nodes: frozenset[str]
    """Node-name entries of the revocation list in force."""
    revoked_serials: frozenset[int]
    """Serial entries of the revocation list in force."""
    pending: int
    """Connections past TLS still waiting for their hello (not listed as nodes)."""
    relay: bool
    """A TURN relay runs in the same process (`relay_allocations` are known)."""


class NodesRequestError(ValueError):
    """A bad `GET /nodes` request (HTTP 400): `str()` names the parameter at fault."""


class NodeNotFound(LookupError):
    """`GET /nodes/NAME` for a node the server does not know (HTTP 404)."""


QUERY_PARAMETERS = ("state",)
"""What `GET /nodes` accepts: `state=online|offline|revoked` (comma-separated for several)."""


def select(table: NodeTable, query: Mapping[str, str], node: str | None = None
           ) -> tuple[NodeListing, ...]:
    """The listings a request asks for: every node, those in the `state`s of `query`, or the
    one `node`. Raises `NodesRequestError` (unknown parameter, bad state, not a node name) and
    `NodeNotFound`."""
    unknown = sorted(set(query) - set(QUERY_PARAMETERS))
    if unknown:
        raise NodesRequestError(f"unknown query parameter {unknown[0]!r} (known: "
                                + ", ".join(QUERY_PARAMETERS) + ")")
    listed = table.nodes
    if "state" in query:
        wanted: set[NodeState] = set()
        for text in query["state"].split(","):
            try:
                wanted.add(NodeState(text.strip()))
            except ValueError:
                raise NodesRequestError(
                    f"state: {text.strip()!r} is not one of "
                    + ", ".join(s.value for s in NodeState)) from None
        listed = tuple(n for n in listed if n.state in wanted)
    if node is not None:
        if not is_valid_node_name(node):
            raise NodesRequestError(f"{node!r} is not a node name (a lowercase DNS subdomain)")
        listed = tuple(n for n in listed if n.node == node)
        if not listed:
            raise NodeNotFound(f"no node {node} known to this server")
    return listed


def revocation_entry(serial: int) -> str:
    """A serial as the revocation list writes it: `serial:4f1a9c03e2`."""
    return SERIAL_PREFIX + format_serial(serial)


def nodes_document(table: NodeTable, now: float,
                   listed: tuple[NodeListing, ...] | None = None) -> dict[str, Any]:
    """The JSON document of `GET /nodes` (`listed`: a selection of `table.nodes`)."""
    nodes = table.nodes if listed is None else listed
    return {
        "serverTime": now,
        "overlayNetwork": str(table.overlay_network),
        "relay": table.relay,
        "pending": table.pending,
        "revocations": {"nodes": sorted(table.revoked_nodes),
                        "serials": [format_serial(s) for s in sorted(table.revoked_serials)]},
        "nodes": [node_document(n) for n in nodes],
    }


def node_document(n: NodeListing) -> dict[str, Any]:
    """One entry of the `nodes` list."""
    return {
        "node": n.node,
        "overlay": str(n.overlay) if n.overlay is not None else None,
        "state": n.state.value,
        "online": n.state is NodeState.ONLINE,
        "staticKey": base64.b64encode(n.static_key).decode("ascii")
        if n.static_key is not None else None,
        "nat": _nat_document(n.nat),
        "session": _session_document(n.session),
        "revokedBy": list(n.revoked_by),
        "relayAllocations": n.relay_allocations,
    }


def _nat_document(nat: NatSummary | None) -> dict[str, str] | None:
    if nat is None:
        return None
    doc = {"natType": nat.nat_type, "mapping": nat.mapping, "filtering": nat.filtering}
    return {k: v for k, v in doc.items() if v is not None}


def _session_document(s: SessionInfo | None) -> dict[str, Any] | None:
    if s is None:
        return None
    return {
        "connectedAt": s.connected_at,
        "lastSeen": s.last_seen,
        "endedAt": s.ended_at,
        "endReason": s.end_reason,
        "remote": format_address(s.remote) if s.remote is not None else None,
        "serial": format_serial(s.serial) if s.serial is not None else None,
        "notAfter": s.not_after,
        "version": s.version,
        "software": s.software or None,
    }


# --- meshd nodes ---------------------------------------------------------------------------------


def render_nodes(doc: Mapping[str, Any]) -> str:
    """`meshd nodes` as text: a summary line, one row per node (like `tailscale status`), then
    revocation entries that match no listed node. Reads the document defensively: a field
    missing or of another type shows as `-`."""
    now = _number(doc.get("serverTime"))
    if now is None:
        now = time.time()
    nodes = [n for n in _list(doc.get("nodes")) if isinstance(n, Mapping)]
    states = [str(n.get("state")) for n in nodes]
    relay = doc.get("relay") is True
    head = (f"{len(nodes)} node(s): {states.count('online')} online, "
            f"{states.count('offline')} offline, {states.count('revoked')} revoked; "
            f"overlay {doc.get('overlayNetwork') or '-'}; relay "
            f"{'in this server' if relay else 'not in this server'}")
    pending = doc.get("pending")
    if isinstance(pending, int) and pending:
        head += f"; {pending} connection(s) waiting for hello"
    rows = [("NAME", "OVERLAY", "STATE", "SINCE", "NAT", "ENDPOINT", "RELAY", "REVOKED")]
    for n in nodes:
        session = n.get("session") if isinstance(n.get("session"), Mapping) else None
        nat = n.get("nat")
        allocations = n.get("relayAllocations")
        rows.append((
            _text(n.get("node")),
            _text(n.get("overlay")),
            _text(n.get("state")),
            _since(session, now),
            _text(nat.get("natType")) if isinstance(nat, Mapping) else "-",
            _text(session.get("remote")) if session is not None else "-",
            str(allocations) if isinstance(allocations, int) else "-",
            ",".join(_text(e) for e in _list(n.get("revokedBy"))) or "-",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head, *("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)]
    names = {_text(n.get("node")) for n in nodes}
    revocations = doc.get("revocations")
    if not isinstance(revocations, Mapping):
        revocations = {}
    used = {_text(e) for n in nodes for e in _list(n.get("revokedBy"))}
    idle = [e for e in map(_text, _list(revocations.get("nodes"))) if e not in names]
    idle += [entry for s in _list(revocations.get("serials"))
             if (entry := SERIAL_PREFIX + _text(s)) not in used]
    if idle:
        lines.append("revocation entries matching no node listed: " + ", ".join(idle))
    return "\n".join(lines)


def _since(session: Mapping[str, Any] | None, now: float) -> str:
    """`12m ago`: connected at (online), else last seen; `-` without a session since the
    server started."""
    if session is None:
        return "-"
    ended = session.get("endedAt") is not None
    at = _number(session.get("lastSeen" if ended else "connectedAt"))
    return "-" if at is None else ago(now - at)


def ago(seconds: float) -> str:
    """A duration the way `tailscale status` puts it: `5s ago`, `12m ago`, `3h4m ago`,
    `2d5h ago`."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s ago"
    if s < 3600:
        return f"{s // 60}m ago"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60}m ago"
    return f"{s // 86400}d{s % 86400 // 3600}h ago"


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) \
        else None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str:
    """A cell: `-` for nothing, control characters replaced (a table stays one line per node)."""
    if value is None or value == "":
        return "-"
    return "".join(c if c.isprintable() else "?" for c in str(value))
