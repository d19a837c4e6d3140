"""`meshd status`: the document, its table, and the error when no agent answers."""

from __future__ import annotations

import socket
import subprocess
import sys

from meshd.catalog import Catalog, Endpoint, Service, ServicePort
from meshd.status import prometheus_samples, render_status, status_document


def catalog() -> Catalog:
    web = Service("default", "web", ("10.96.0.5",), (ServicePort("http", 80, "TCP", 8080),),
                  (Endpoint("172.17.0.2", (("http", 8080, "TCP"),), True, "edge-1", None),
                   Endpoint("172.17.0.3", (("http", 8080, "TCP"),), False, "edge-1", None)),
                  None, "round-robin", nodegroup_closed=True)
    db = Service("default", "db", (), (ServicePort("", 5432, "TCP", 5432),), (), None)
    return Catalog({"default/web": web, "default/db": db}, {"10.96.0.5": web}, "edge-1", "g1",
                   "42")


def test_document_and_table() -> None:
    doc = status_document(catalog(), rules_in_place=True)
    assert [s["service"] for s in doc["services"]] == ["default/db", "default/web"]
    web = doc["services"][1]
    assert web["policy"] == "round-robin" and web["nodegroupClosed"] is True
    assert web["endpoints"][1] == {"ip": "172.17.0.3", "node": "edge-1", "ready": False}
    assert doc["services"][0]["policy"] == "none (headless)"
    table = render_status(doc)
    assert table.splitlines()[0] == ("node edge-1 (node group g1), catalog revision 42, "
                                     "iptables rules in place")
    assert "1/2 172.17.0.2@edge-1" in table and "node-group closed" in table
    assert "NOT in place" in render_status(status_document(catalog(), rules_in_place=False))


def test_prometheus_samples() -> None:
    text = prometheus_samples([("a_total", {}, 1), ("b_total", {"x": "y", "a": "b"}, 2)])
    assert text == 'a_total 1\nb_total{a="b",x="y"} 2\n'


def test_no_agent_is_one_line() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-m", "meshd", "status", "--address",
                           f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no agent answers" in proc.stderr
