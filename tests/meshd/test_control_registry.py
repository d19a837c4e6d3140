"""meshd.control.registry: stable overlay addresses, never shared, persisted atomically."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path

import pytest

from meshd.control.registry import (
    REGISTRY_FILE,
    JsonRegistryStore,
    MemoryRegistryStore,
    NodeRecord,
    Registry,
    RegistryFull,
    RegistryStoreError,
)
from meshd.control.wire import NatSummary

NET = ipaddress.IPv4Network("100.64.0.0/16")
K1, K2 = b"\x01" * 32, b"\x02" * 32


def test_addresses_are_stable_distinct_and_hosts_of_the_network() -> None:
    registry = Registry(NET, MemoryRegistryStore())
    seen = {registry.register(f"node-{i}", bytes([i]) * 32).overlay for i in range(200)}
    assert len(seen) == 200
    assert all(a in NET and a not in (NET.network_address, NET.broadcast_address) for a in seen)
    # Same name, same address, even from an empty registry (derived from the name).
    again = Registry(NET, MemoryRegistryStore())
    record = registry.get("node-7")
    assert record is not None and again.register("node-7", K1).overlay == record.overlay


def test_a_restart_keeps_addresses_and_keys() -> None:
    store = MemoryRegistryStore()
    first = Registry(NET, store)
    a = first.register("edge-1", K1)
    second = Registry(NET, store)
    assert second.get("edge-1") == a == NodeRecord(a.overlay, K1)
    # A new key keeps the address; the change is saved.
    assert second.register("edge-1", K2) == NodeRecord(a.overlay, K2)
    assert Registry(NET, store).get("edge-1") == NodeRecord(a.overlay, K2)


def test_unchanged_hello_does_not_write() -> None:
    store = MemoryRegistryStore()
    registry = Registry(NET, store)
    registry.register("edge-1", K1)
    registry.register("edge-1", K1)
    assert store.saves == 1


def test_collisions_probe_upwards_and_a_full_network_is_refused() -> None:
    tiny = ipaddress.IPv4Network("10.9.0.0/29")  # 6 host addresses
    registry = Registry(tiny, MemoryRegistryStore())
    got = [registry.register(f"n{i}", bytes([i]) * 32).overlay for i in range(6)]
    assert sorted(got) == list(tiny.hosts())
    with pytest.raises(RegistryFull):
        registry.register("n6", b"\x06" * 32)
    assert registry.owner(got[0]) == "n0"


def test_save_failure_changes_nothing() -> None:
    store = MemoryRegistryStore()
    registry = Registry(NET, store)
    store.fail = "disk full"
    with pytest.raises(RegistryStoreError, match="disk full"):
        registry.register("edge-1", K1)
    assert registry.get("edge-1") is None and len(registry) == 0


def test_a_record_outside_a_new_network_is_reallocated() -> None:
    store = MemoryRegistryStore({"edge-1": NodeRecord(ipaddress.IPv4Address("10.0.0.5"), K1)})
    registry = Registry(NET, store)
    record = registry.register("edge-1", K1)
    assert record.overlay in NET
    assert registry.owner(ipaddress.IPv4Address("10.0.0.5")) is None


def test_too_small_network() -> None:
    with pytest.raises(ValueError):
        Registry(ipaddress.IPv4Network("10.0.0.0/31"), MemoryRegistryStore())


def test_json_store_round_trip_and_file_format(tmp_path: Path) -> None:
    path = tmp_path / "state" / REGISTRY_FILE
    registry = Registry(NET, JsonRegistryStore(path))
    assert len(registry) == 0  # no file yet: empty
    a = registry.register("edge-1", K1)
    doc = json.loads(path.read_text())
    key = "AQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQEBAQE="
    assert doc == {"version": 1, "network": "100.64.0.0/16",
                   "nodes": {"edge-1": {"overlay": str(a.overlay), "staticKey": key}}}
    assert Registry(NET, JsonRegistryStore(path)).get("edge-1") == a
    assert not list(path.parent.glob(".*.tmp"))  # written through a temporary, renamed


@pytest.mark.parametrize(("text", "error"), [
    ("{not json", "not JSON"),
    ('{"version": 2, "nodes": {}}', "version 1"),
    ('{"version": 1, "nodes": []}', "nodes"),
    ('{"version": 1, "nodes": {"Bad_Name": {"overlay": "1.2.3.4"}}}', "node name"),
    ('{"version": 1, "nodes": {"a": {"overlay": "x"}}}', "overlay"),
    ('{"version": 1, "nodes": {"a": {"overlay": "1.2.3.4"}, "b": {"overlay": "1.2.3.4"}}}',
     "also a's"),
    ('{"version": 1, "nodes": {"a": {"overlay": "1.2.3.4", "staticKey": "AAEC"}}}',
     "staticKey"),
    ('{"version": 1, "nodes": {"a": {"overlay": "1.2.3.4", "nat": {"natType": "cone"}}}}',
     "nodes.a.nat.natType"),
    ('{"version": 1, "nodes": {"a": {"overlay": "1.2.3.4", "nat": {"natType": "symmetric", '
     '"mapping": "random"}}}}', "nodes.a.nat.mapping"),
])
def test_json_store_errors_name_the_file(tmp_path: Path, text: str, error: str) -> None:
    path = tmp_path / REGISTRY_FILE
    path.write_text(text)
    with pytest.raises(RegistryStoreError, match=error) as info:
        JsonRegistryStore(path).load()
    assert str(path) in str(info.value)


def test_json_store_write_failure_is_a_store_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    store = JsonRegistryStore(blocker / REGISTRY_FILE)  # parent is a file
    with pytest.raises(RegistryStoreError, match="cannot write"):
        store.save({}, NET)


PR = NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")


def test_nat_is_persisted_saved_only_on_change_and_kept_across_key_changes(
        tmp_path: Path) -> None:
    path = tmp_path / REGISTRY_FILE
    registry = Registry(NET, JsonRegistryStore(path))
    a = registry.register("edge-1", K1)
    assert a.nat is None
    registry.set_nat("edge-1", PR)
    written = path.stat().st_mtime_ns
    registry.set_nat("edge-1", PR)  # unchanged: no write
    assert path.stat().st_mtime_ns == written
    assert json.loads(path.read_text())["nodes"]["edge-1"]["nat"] == {
        "natType": "port-restricted", "mapping": "endpoint-independent",
        "filtering": "address-and-port-dependent"}
    reloaded = Registry(NET, JsonRegistryStore(path))
    assert reloaded.get("edge-1") == NodeRecord(a.overlay, K1, PR)
    assert reloaded.register("edge-1", K2).nat == PR  # a new key keeps the last NAT
    reloaded.set_nat("edge-1", NatSummary("unknown"))
    assert json.loads(path.read_text())["nodes"]["edge-1"]["nat"] == {"natType": "unknown"}


def test_set_nat_failure_changes_nothing() -> None:
    store = MemoryRegistryStore()
    registry = Registry(NET, store)
    registry.register("edge-1", K1)
    store.fail = "disk full"
    with pytest.raises(RegistryStoreError, match="disk full"):
        registry.set_nat("edge-1", PR)
    record = registry.get("edge-1")
    assert record is not None and record.nat is None
