"""The server's node registry: stable overlay addresses, last static keys and NATs, persisted.

Every node that ever said hello has a record: its overlay address (assigned once, from the
overlay network, never handed to another node), the tunnel static key it last presented and
the NAT it last reported (hello or `nat` message), so peers listed offline still show it.
Records live in `meshd server`'s data directory and survive restarts, so a node keeps its
address and its peers can be listed (offline) with their keys before they reconnect.

Allocation: a node's preferred address is derived from a hash of its name (so even a lost
registry tends to give the same answers), then the next free one upwards, wrapping around.
The network and broadcast addresses are never used.

Storage is a narrow seam (`RegistryStore`): `JsonRegistryStore` keeps one JSON file, replaced
atomically on every change (`edgeweave.pki.files.write_atomic`):

    {"version": 1, "network": "100.64.0.0/16",
     "nodes": {"edge-1": {"overlay": "100.64.18.7", "staticKey": "<base64, 32 bytes>",
                          "nat": {"natType": "port-restricted",
                                  "mapping": "endpoint-independent",
                                  "filtering": "address-and-port-dependent"}}}}

(`nat` is optional, and so are its `mapping` and `filtering`; files without it still load.)

`MemoryRegistryStore` is the in-memory fake for tests (hand the same instance to a new server
to simulate a restart).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgeweave.pki.files import write_atomic
from edgeweave.pki.identity import is_valid_node_name
from meshd.control.wire import BEHAVIOURS, NAT_TYPES, STATIC_KEY_BYTES, NatSummary

STORE_VERSION = 1
REGISTRY_FILE = "control-registry.json"
"""The file name under `control.dataDir`."""


class RegistryStoreError(Exception):
    """The registry file cannot be read or written, or is inconsistent (a local error)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        """The file at fault."""


class RegistryFull(Exception):
    """Every address of the overlay network is taken."""


@dataclass(frozen=True)
class NodeRecord:
    """What the registry remembers about one node."""

    overlay: ipaddress.IPv4Address
    """Its overlay address."""
    static_key: bytes | None = None
    """The tunnel static key it presented last (None: never said hello with this registry)."""
    nat: NatSummary | None = None
    """The NAT it reported last (None: never reported one)."""


class RegistryStore(Protocol):
    """Where records are kept between runs."""

    def load(self) -> dict[str, NodeRecord]:
        """Every record; raises `RegistryStoreError`."""
        ...

    def save(self, records: Mapping[str, NodeRecord], network: ipaddress.IPv4Network) -> None:
        """Replace what is stored with `records`; raises `RegistryStoreError`."""
        ...


class MemoryRegistryStore:
    """`RegistryStore` in memory (tests)."""

    def __init__(self, records: Mapping[str, NodeRecord] | None = None) -> None:
        self.records: dict[str, NodeRecord] = dict(records or {})
        """What a restarted server would load."""
        self.saves = 0
        """How many times `save` ran."""
        self.fail: str = ""
        """When set, `save` raises `RegistryStoreError` with this text (a full disk)."""

    def load(self) -> dict[str, NodeRecord]:
        return dict(self.records)

    def save(self, records: Mapping[str, NodeRecord], network: ipaddress.IPv4Network) -> None:
        if self.fail:
            raise RegistryStoreError("memory", self.fail)
        self.records = dict(records)
        self.saves += 1


class JsonRegistryStore:
    """`RegistryStore` as one JSON file, atomically replaced."""

    def __init__(self, path: Path) -> None:
        self.path = path
        """The file (`DATA_DIR/control-registry.json`)."""

    def load(self) -> dict[str, NodeRecord]:
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            raise RegistryStoreError(self.path, f"cannot read: {exc}") from None
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise RegistryStoreError(self.path, f"not JSON (corrupt?): {exc}") from None
        return _records(doc, self.path)

    def save(self, records: Mapping[str, NodeRecord], network: ipaddress.IPv4Network) -> None:
        nodes: dict[str, Any] = {}
        for node in sorted(records):
            record = records[node]
            entry: dict[str, Any] = {"overlay": str(record.overlay)}
            if record.static_key is not None:
                entry["staticKey"] = base64.b64encode(record.static_key).decode("ascii")
            if record.nat is not None:
                nat = {"natType": record.nat.nat_type, "mapping": record.nat.mapping,
                       "filtering": record.nat.filtering}
                entry["nat"] = {k: v for k, v in nat.items() if v is not None}
            nodes[node] = entry
        doc = {"version": STORE_VERSION, "network": str(network), "nodes": nodes}
        data = (json.dumps(doc, indent=1) + "\n").encode("utf-8")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, data)
        except OSError as exc:
            raise RegistryStoreError(self.path, f"cannot write: {exc.strerror or exc}") from None


def _records(doc: Any, path: Path) -> dict[str, NodeRecord]:
    if not isinstance(doc, dict) or doc.get("version") != STORE_VERSION:
        raise RegistryStoreError(path, f"not a version {STORE_VERSION} control registry")
    nodes = doc.get("nodes")
    if not isinstance(nodes, dict):
        raise RegistryStoreError(path, "nodes: expected an object")
    out: dict[str, NodeRecord] = {}
    owners: dict[ipaddress.IPv4Address, str] = {}
    for node, entry in nodes.items():
        where = f"nodes.{node}"
        if not is_valid_node_name(node) or not isinstance(entry, dict):
            raise RegistryStoreError(path, f"{where}: not a node name with an object")
        try:
            overlay = ipaddress.IPv4Address(entry.get("overlay"))
        except ValueError:
            raise RegistryStoreError(path, f"{where}.overlay: not an IPv4 address") from None
        if overlay in owners:
            raise RegistryStoreError(path, f"{where}.overlay: {overlay} is also "
                                           f"{owners[overlay]}'s")
        owners[overlay] = node
        key: bytes | None = None
        if entry.get("staticKey") is not None:
            try:
                key = base64.b64decode(str(entry["staticKey"]), validate=True)
            except (binascii.Error, ValueError):
                key = b""
            if len(key) != STATIC_KEY_BYTES:
                raise RegistryStoreError(path, f"{where}.staticKey: not {STATIC_KEY_BYTES} "
                                               "bytes of base64")
        out[node] = NodeRecord(overlay, key, _nat(entry.get("nat"), f"{where}.nat", path))
    return out


def _nat(doc: Any, where: str, path: Path) -> NatSummary | None:
    if doc is None:
        return None
    if not isinstance(doc, dict) or doc.get("natType") not in NAT_TYPES:
        raise RegistryStoreError(path, f"{where}.natType: expected one of "
                                       + ", ".join(sorted(NAT_TYPES)))
    for key in ("mapping", "filtering"):
        if doc.get(key) is not None and doc[key] not in BEHAVIOURS:
            raise RegistryStoreError(path, f"{where}.{key}: expected one of "
                                           + ", ".join(sorted(BEHAVIOURS)))
    return NatSummary(doc["natType"], doc.get("mapping"), doc.get("filtering"))


class Registry:
    """Records by node name, with allocation; every change is saved before it is used."""

    def __init__(self, network: ipaddress.IPv4Network, store: RegistryStore) -> None:
        if network.prefixlen > 30:
            raise ValueError(f"overlay network {network} is too small (at most /30)")
        self.network = network
        """The overlay network addresses come from."""
        self._store = store
        self._records = store.load()
        self._owners = {r.overlay: n for n, r in self._records.items()}

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self) -> Iterator[str]:
        return iter(self._records)

    def get(self, node: str) -> NodeRecord | None:
        """The node's record, if it has one."""
        return self._records.get(node)

    def owner(self, address: ipaddress.IPv4Address) -> str | None:
        """The node an overlay address belongs to."""
        return self._owners.get(address)

    def usable(self, record: NodeRecord) -> bool:
        """The record's address is a host address of the current network."""
        net = self.network
        return (record.overlay in net and record.overlay != net.network_address
                and record.overlay != net.broadcast_address)

    def register(self, node: str, static_key: bytes) -> NodeRecord:
        """The node's record with `static_key`, allocating its address on first sight (or when
        the network changed under an old one). Raises `RegistryFull`, `RegistryStoreError`;
        on error nothing changed."""
        record = self._records.get(node)
        if record is not None and self.usable(record):
            if record.static_key == static_key:
                return record
            updated = NodeRecord(record.overlay, static_key, record.nat)
        else:
            updated = NodeRecord(self._allocate(node), static_key,
                                 record.nat if record is not None else None)
        records = {**self._records, node: updated}
        self._store.save(records, self.network)
        if record is not None:
            self._owners.pop(record.overlay, None)
        self._records = records
        self._owners[updated.overlay] = node
        return updated

    def set_nat(self, node: str, nat: NatSummary) -> NodeRecord:
        """Record the NAT `node` reported (a registered node). Saves only when it changed;
        raises `RegistryStoreError` (then nothing changed), `KeyError` for an unknown node."""
        record = self._records[node]
        if record.nat == nat:
            return record
        updated = NodeRecord(record.overlay, record.static_key, nat)
        records = {**self._records, node: updated}
        self._store.save(records, self.network)
        self._records = records
        return updated

    def _allocate(self, node: str) -> ipaddress.IPv4Address:
        first = int(self.network.network_address) + 1
        size = self.network.num_addresses - 2
        digest = hashlib.sha256(node.encode("utf-8")).digest()
        start = int.from_bytes(digest[:8], "big") % size
        for step in range(size):
            candidate = ipaddress.IPv4Address(first + (start + step) % size)
            if candidate not in self._owners:
                return candidate
        raise RegistryFull(f"no free address left in {self.network}")
