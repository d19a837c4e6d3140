"""meshd.rules: the restore document (golden), reconciliation and removal over the fake backend."""

from __future__ import annotations

import json
from typing import Any

import pytest

from meshd.catalog import Catalog
from meshd.proxy.catalog_file import parse_catalog
from meshd.rules import RuleError, RuleManager, RulesConfig, build_ruleset
from meshd.rules.document import TABLES, parse_save, plan_remove, plan_sync
from meshd.rules.fake import FakeRuleBackend


def ready(port: int, name: str = "", protocol: str = "TCP") -> dict[str, Any]:
    return {"ip": "172.17.0.2", "ports": [{"name": name, "port": port, "protocol": protocol}]}


SERVICES: list[dict[str, Any]] = [
    {"namespace": "default", "name": "web", "clusterIPs": ["10.96.0.10"],
     "ports": [{"name": "http", "port": 80}], "endpoints": [ready(8080, "http")]},
    {"namespace": "kube-system", "name": "dns", "clusterIPs": ["10.96.0.53", "fd00::53"],
     "ports": [{"name": "dns", "port": 53, "protocol": "UDP"},
               {"name": "dns-tcp", "port": 53, "protocol": "TCP"}],
     "endpoints": [{"ip": "172.17.0.3",
                    "ports": [{"name": "dns", "port": 5353, "protocol": "UDP"},
                              {"name": "dns-tcp", "port": 5353, "protocol": "TCP"}]}]},
    {"namespace": "default", "name": "empty", "clusterIPs": ["10.96.0.11"],
     "ports": [{"port": 80}], "endpoints": [dict(ready(80), ready=False)]},
    {"namespace": "default", "name": "headless", "ports": [{"port": 80}],
     "endpoints": [ready(80)]},
    {"namespace": "default", "name": "theirs", "clusterIPs": ["10.96.0.12"], "proxied": False,
     "ports": [{"port": 80}], "endpoints": [ready(80)]},
    {"namespace": "default", "name": "sctp", "clusterIPs": ["10.96.0.13"],
     "ports": [{"port": 80, "protocol": "SCTP"}], "endpoints": [ready(80, protocol="SCTP")]},
    {"namespace": "default", "name": "ext", "externalName": "example.org",
     "ports": [{"port": 80}]},
]

GOLDEN = """\
*nat
:EDGEWEAVE-PREROUTING - [0:0]
:EDGEWEAVE-OUTPUT - [0:0]
:EDGEWEAVE-SERVICES - [0:0]
-A EDGEWEAVE-PREROUTING -j EDGEWEAVE-SERVICES
-A EDGEWEAVE-OUTPUT -j EDGEWEAVE-SERVICES
-A EDGEWEAVE-SERVICES -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -m comment --comment \
default/web:http -j REDIRECT --to-ports 40001
-A EDGEWEAVE-SERVICES -d 10.96.0.53/32 -p tcp -m tcp --dport 53 -m comment --comment \
kube-system/dns:dns-tcp -j REDIRECT --to-ports 40001
-I PREROUTING 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-PREROUTING
-I OUTPUT 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-OUTPUT
COMMIT
*mangle
:EDGEWEAVE-PREROUTING - [0:0]
:EDGEWEAVE-OUTPUT - [0:0]
-A EDGEWEAVE-PREROUTING -d 10.96.0.53/32 -p udp -m udp --dport 53 -m comment --comment \
kube-system/dns:dns -j TPROXY --on-port 40001 --on-ip 0.0.0.0 --tproxy-mark 0x1000/0x1000
-A EDGEWEAVE-OUTPUT -d 10.96.0.53/32 -p udp -m udp --dport 53 -m comment --comment \
kube-system/dns:dns -j MARK --set-xmark 0x1000/0x1000
-I PREROUTING 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-PREROUTING
-I OUTPUT 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-OUTPUT
COMMIT
*filter
:EDGEWEAVE-NO-ENDPOINTS - [0:0]
-A EDGEWEAVE-NO-ENDPOINTS -d 10.96.0.11/32 -p tcp -m tcp --dport 80 -m comment --comment \
"default/empty has no endpoints" -j REJECT --reject-with icmp-port-unreachable
-I FORWARD 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-NO-ENDPOINTS
-I OUTPUT 1 -m comment --comment "edgeweave service portals" -j EDGEWEAVE-NO-ENDPOINTS
COMMIT
"""


def catalog(services: list[dict[str, Any]] | None = None) -> Catalog:
    return parse_catalog({"node": "n1", "services": SERVICES if services is None else services})


def saved(fake: FakeRuleBackend) -> dict[str, Any]:
    return {t: parse_save(fake.save(), t) for t in TABLES}


def test_golden_document_for_a_fresh_host() -> None:
    desired = build_ruleset(catalog(), 40001, RulesConfig())
    assert plan_sync(desired, saved(FakeRuleBackend())) == GOLDEN


def test_reject_rules_can_be_turned_off_and_port_and_mark_configured() -> None:
    config = RulesConfig(reject_without_endpoints=False, tproxy_mark=0x20, tproxy_mask=0xF0)
    desired = build_ruleset(catalog(), 15001, config)
    assert desired.chains["filter"]["EDGEWEAVE-NO-ENDPOINTS"] == ()
    text = plan_sync(desired, saved(FakeRuleBackend()))
    assert text is not None
    assert "--to-ports 15001" in text and "--on-port 15001" in text
    assert "--tproxy-mark 0x20/0xf0" in text and "--set-xmark 0x20/0xf0" in text


def test_sync_is_idempotent_and_installs_policy_routing_once() -> None:
    fake = FakeRuleBackend()
    manager = RuleManager(fake, proxy_port=40001)
    assert manager.sync(catalog()) is True
    assert manager.sync(catalog()) is False
    assert manager.sync(catalog()) is False
    assert len(fake.restores) == 1 and manager.resyncs == 1 and manager.checks == 3
    rules = json.loads(fake.ip("-j", "rule", "show"))
    assert [r for r in rules if r.get("fwmark")] == [
        {"priority": 9000, "src": "all", "fwmark": "0x1000", "fwmask": "0x1000",
         "table": "40001"}]
    assert manager.installed(catalog())


def test_catalog_change_rewrites_only_our_chains() -> None:
    fake = FakeRuleBackend()
    fake.restore("*nat\n:KUBE-SERVICES - [0:0]\n-A KUBE-SERVICES -d 10.0.0.1/32 -j RETURN\n"
                 "-A PREROUTING -j KUBE-SERVICES\nCOMMIT\n")
    manager = RuleManager(fake, proxy_port=40001)
    manager.sync(catalog())
    smaller = catalog(SERVICES[:1])
    assert manager.sync(smaller) is True
    assert not manager.installed(catalog())
    assert manager.installed(smaller)
    nat = parse_save(fake.save(), "nat")
    assert nat.rules_of("EDGEWEAVE-SERVICES") == (
        ("-d", "10.96.0.10/32", "-p", "tcp", "-m", "tcp", "--dport", "80", "-m", "comment",
         "--comment", "default/web:http", "-j", "REDIRECT", "--to-ports", "40001"),)
    assert nat.rules_of("KUBE-SERVICES") == (("-d", "10.0.0.1/32", "-j", "RETURN"),)
    # The second sync only touched the table whose chains changed.
    assert fake.restores[-1].startswith("*nat\n") and "*filter" in fake.restores[-1]
    assert "*mangle" in fake.restores[-1]  # the UDP service went away too


def test_jump_moved_back_to_first_after_someone_inserts_ahead() -> None:
    """kube-proxy (`-I PREROUTING`) or a stray duplicate: the next sync puts exactly one jump
    at position 1 again and leaves the others' rules alone."""
    fake = FakeRuleBackend()
    manager = RuleManager(fake, proxy_port=40001)
    manager.sync(catalog())
    fake.restore("*nat\n:KUBE-SERVICES - [0:0]\n-I PREROUTING 1 -j KUBE-SERVICES\n"
                 "-A OUTPUT -m comment --comment \"edgeweave service portals\" "
                 "-j EDGEWEAVE-OUTPUT\n-A PREROUTING -j DOCKER-ISH\n:DOCKER-ISH - [0:0]\n"
                 "COMMIT\n")
    assert not manager.installed(catalog())
    assert manager.sync(catalog()) is True
    nat = parse_save(fake.save(), "nat")
    assert nat.rules_of("PREROUTING")[0][-1] == "EDGEWEAVE-PREROUTING"
    assert [s[-1] for s in nat.rules_of("PREROUTING")] == [
        "EDGEWEAVE-PREROUTING", "KUBE-SERVICES", "DOCKER-ISH"]
    assert [s[-1] for s in nat.rules_of("OUTPUT")] == ["EDGEWEAVE-OUTPUT"]
    assert manager.sync(catalog()) is False


def test_old_style_jump_is_replaced() -> None:
    """A jump to our chain without our comment (an older version) is recognised as ours."""
    fake = FakeRuleBackend()
    fake.restore("*mangle\n:EDGEWEAVE-PREROUTING - [0:0]\n-A PREROUTING -j EDGEWEAVE-PREROUTING"
                 "\nCOMMIT\n")
    RuleManager(fake).sync(catalog())
    mangle = parse_save(fake.save(), "mangle")
    assert mangle.rules_of("PREROUTING") == (
        ("-m", "comment", "--comment", "edgeweave service portals", "-j",
         "EDGEWEAVE-PREROUTING"),)


def test_remove_leaves_the_tables_as_they_were() -> None:
    fake = FakeRuleBackend()
    fake.restore("*nat\n:DOCKER - [0:0]\n-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER\n"
                 "COMMIT\n")
    before = fake.save()
    ip_before = (list(fake.ip_rules), list(fake.local_routes))
    manager = RuleManager(fake)
    manager.sync(catalog())
    fake.ip("rule", "add", "fwmark", "0x1000/0x1000", "lookup", "40001", "priority", "9000")
    manager.remove()
    assert fake.save() == before
    assert (fake.ip_rules, fake.local_routes) == ip_before
    assert plan_remove(saved(fake)) is None
    manager.remove()  # nothing left: a no-op, not an error


def test_duplicate_ip_rules_are_cut_to_one() -> None:
    fake = FakeRuleBackend()
    for _ in range(3):
        fake.ip("rule", "add", "fwmark", "0x1000/0x1000", "lookup", "40001", "priority", "9000")
    RuleManager(fake).sync(catalog())
    assert sum(1 for r in fake.ip_rules if r.get("fwmark")) == 1


def test_a_failed_restore_changes_nothing() -> None:
    fake = FakeRuleBackend()
    before = fake.save()
    with pytest.raises(RuleError, match="Couldn't load target"):
        fake.restore("*nat\n:EDGEWEAVE-X - [0:0]\n-A PREROUTING -j EDGEWEAVE-NOPE\nCOMMIT\n")
    with pytest.raises(RuleError, match="not valid in table"):
        fake.restore("*filter\n-A INPUT -j REDIRECT --to-ports 1\nCOMMIT\n")
    with pytest.raises(RuleError, match="Bad rule"):
        fake.restore("*nat\n-D PREROUTING -j ACCEPT\nCOMMIT\n")
    with pytest.raises(RuleError, match="missing COMMIT"):
        fake.restore("*nat\n-A PREROUTING -j ACCEPT\n")
    assert fake.save() == before


def test_fake_refuses_to_delete_referenced_or_full_chains() -> None:
    fake = FakeRuleBackend()
    fake.restore("*nat\n:A - [0:0]\n-A PREROUTING -j A\n-A A -j RETURN\nCOMMIT\n")
    with pytest.raises(RuleError, match="not empty"):
        fake.restore("*nat\n-X A\nCOMMIT\n")
    with pytest.raises(RuleError, match="referenced"):
        fake.restore("*nat\n-F A\n-X A\nCOMMIT\n")


def test_parse_save_reads_real_iptables_save_output() -> None:
    text = """# Generated by iptables-save v1.8.9 (nf_tables) on Sun Nov 22 16:59:14 2026
*mangle
:PREROUTING ACCEPT [0:0]
:EDGEWEAVE-PREROUTING - [0:0]
-A PREROUTING -m comment --comment "edgeweave service portals" -j EDGEWEAVE-PREROUTING
-A EDGEWEAVE-PREROUTING -d 10.96.0.11/32 -p udp -m udp --dport 53 -m comment --comment "a b" \
-j TPROXY --on-port 40001 --on-ip 0.0.0.0 --tproxy-mark 0x4000/0x4000
COMMIT
# Completed on Sun Nov 22 16:59:14 2026
*nat
:PREROUTING ACCEPT [0:0]
-A PREROUTING -j X
COMMIT
"""
    mangle = parse_save(text, "mangle")
    assert mangle.chains == ("PREROUTING", "EDGEWEAVE-PREROUTING")
    assert mangle.rules_of("EDGEWEAVE-PREROUTING")[0][11] == "a b"
    assert parse_save(text, "nat").rules_of("PREROUTING") == (("-j", "X"),)
    assert parse_save(text, "filter").chains == ()


@pytest.mark.parametrize("change", [
    {"backend": "iptables"}, {"tproxy_mark": 0}, {"tproxy_mark": 0x3, "tproxy_mask": 0x1},
    {"route_table": 254}, {"rule_priority": 32766}, {"resync_s": 0},
])
def test_config_checks(change: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        RulesConfig(**change)


def test_tables_without_our_rules_are_not_touched() -> None:
    fake = FakeRuleBackend()
    RuleManager(fake).sync(catalog(SERVICES[:1]))  # one TCP Service with endpoints
    assert fake.restores[0].startswith("*nat\n") and fake.restores[0].count("*") == 1
    assert set(fake.tables) == {"nat"}


def test_remove_deletes_only_the_empty_tables_it_created() -> None:
    fake = FakeRuleBackend(existing=("filter",))
    manager = RuleManager(fake)
    manager.sync(catalog())
    assert set(fake.tables) == {"nat", "mangle", "filter"}
    fake.restore("*mangle\n-A FORWARD -j ACCEPT\nCOMMIT\n")  # someone else uses mangle now
    manager.remove()
    assert set(fake.tables) == {"mangle", "filter"}  # nat was ours and empty: gone
    assert parse_save(fake.save(), "mangle").rules_of("FORWARD") == (("-j", "ACCEPT"),)
