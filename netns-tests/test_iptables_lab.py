"""meshd.rules against the real iptables (nft and legacy) inside a lab namespace.

The manager runs in the test process and drives the tools through `ip netns exec`; nothing
touches the host's own namespace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from netlab import Lab

from meshd.catalog import Catalog
from meshd.proxy.catalog_file import parse_catalog
from meshd.rules import IptablesBackend, RuleManager, detect_variant
from meshd.rules.backend import Variant

TOPOLOGY: dict[str, Any] = {"name": "rules", "segments": {"lan": {"subnet": "10.1.0.0/24"}},
                            "hosts": {"node": {"segment": "lan"}}}


def catalog(*extra: dict[str, Any]) -> Catalog:
    ep = {"ip": "172.17.0.2", "ports": [{"name": "http", "port": 8080},
                                        {"name": "dns", "port": 53, "protocol": "UDP"}]}
    return parse_catalog({"node": "node", "services": [
        {"namespace": "default", "name": "web", "clusterIPs": ["10.96.0.10"],
         "ports": [{"name": "http", "port": 80}, {"name": "dns", "port": 53, "protocol": "UDP"}],
         "endpoints": [ep]},
        {"namespace": "default", "name": "empty", "clusterIPs": ["10.96.0.11"],
         "ports": [{"port": 443}]},
        *extra,
    ]})


def state(lab: Lab, variant: Variant) -> str:
    """Rules, ip rules and routes; tables without a rule are left out (legacy iptables keeps a
    table instance in a namespace once it was used, empty; nft's are deleted with our rules)."""
    text = lab.run("node", [f"iptables-{variant}-save"]).stdout
    tables = text.split("COMMIT")
    lines = [line for t in tables if "\n-A " in t or variant == "nft"
             for line in (t + "COMMIT").splitlines() if line and not line.startswith("#")]
    lines += lab.run("node", ["ip", "rule", "show"]).stdout.splitlines()
    lines += lab.run("node", ["ip", "route", "show", "table", "all"]).stdout.splitlines()
    return "\n".join(lines)


@pytest.mark.parametrize("variant", ["nft", "legacy"])
def test_sync_is_idempotent_ordered_and_removable(make_lab: Callable[[Any], Lab],
                                                  variant: Variant) -> None:
    lab = make_lab(TOPOLOGY)
    tool = f"iptables-{variant}"
    lab.run("node", [tool, "-t", "nat", "-N", "DOCKER"])
    lab.run("node", [tool, "-t", "nat", "-A", "PREROUTING", "-m", "addrtype", "--dst-type",
                     "LOCAL", "-j", "DOCKER"])
    before = state(lab, variant)
    manager = RuleManager(IptablesBackend(variant, prefix=lab.argv("node", [])))
    assert manager.sync(catalog()) is True
    # The real tools print our rules back exactly as we generate them: a second sync is a no-op.
    assert manager.sync(catalog()) is False
    assert manager.resyncs == 1 and manager.installed(catalog())
    nat = lab.run("node", [tool, "-t", "nat", "-S", "PREROUTING"]).stdout.splitlines()
    assert nat[1].endswith("-j EDGEWEAVE-PREROUTING") and nat[2].endswith("-j DOCKER")
    # kube-proxy starts later and inserts its jump at 1: the next sync puts ours first again.
    lab.run("node", [tool, "-t", "nat", "-N", "KUBE-SERVICES"])
    lab.run("node", [tool, "-t", "nat", "-I", "PREROUTING", "1", "-j", "KUBE-SERVICES"])
    assert not manager.installed(catalog())
    assert manager.sync(catalog()) is True
    nat = lab.run("node", [tool, "-t", "nat", "-S", "PREROUTING"]).stdout.splitlines()
    assert [line.rsplit(" ", 1)[-1] for line in nat[1:]] == [
        "EDGEWEAVE-PREROUTING", "KUBE-SERVICES", "DOCKER"]
    lab.run("node", [tool, "-t", "nat", "-D", "PREROUTING", "-j", "KUBE-SERVICES"])
    lab.run("node", [tool, "-t", "nat", "-X", "KUBE-SERVICES"])
    # A catalog change rewrites our chains in one transaction.
    bigger = catalog({"namespace": "default", "name": "db", "clusterIPs": ["10.96.0.20"],
                      "ports": [{"port": 5432}],
                      "endpoints": [{"ip": "172.17.0.3", "ports": [{"port": 5432}]}]})
    assert manager.sync(bigger) is True and manager.sync(bigger) is False
    assert "10.96.0.20/32" in lab.run("node", [tool, "-t", "nat", "-S"]).stdout
    manager.remove()
    assert state(lab, variant) == before


def test_detect_variant_follows_the_rules_already_there(make_lab: Callable[[Any], Lab]) -> None:
    lab = make_lab(TOPOLOGY)
    prefix = lab.argv("node", [])
    assert detect_variant(prefix) == "nft"  # none anywhere: what `iptables` is (Debian: nft)
    lab.run("node", ["iptables-legacy", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"])
    assert detect_variant(prefix) == "legacy"
    lab.run("node", ["iptables-nft", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"])
    lab.run("node", ["iptables-nft", "-A", "INPUT", "-i", "lo", "-j", "ACCEPT"])
    assert detect_variant(prefix) == "nft"
    lab.run("node", ["iptables-legacy", "-F", "INPUT"])
