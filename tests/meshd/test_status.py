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


def test_tunnel_part_shows_our_nat_and_each_peers() -> None:
    doc = status_document(catalog(), rules_in_place=True)
    peer = {"node": "edge-2", "overlay": "100.64.0.2", "online": True, "state": "direct",
            "path": "direct", "endpoint": "198.51.100.9:4000", "rttMs": 1.25, "bytesIn": 10,
            "bytesOut": 20, "lastHandshake": None, "nat": "symmetric"}
    old = {**peer, "node": "edge-3", "overlay": "100.64.0.3"}
    del old["nat"]  # an agent without the field (older status documents)
    doc["tunnel"] = {"interface": "mesh0", "overlay": "100.64.0.1/16", "local": "10.0.0.1:5000",
                     "relayed": None, "control": "ready", "peers": [peer, old],
                     "nat": {"natType": "port-restricted", "mapping": "endpoint-independent",
                             "filtering": "address-and-port-dependent"}}
    lines = render_status(doc).splitlines()
    head = next(line for line in lines if line.startswith("tunnel "))
    assert head.endswith("NAT port-restricted (endpoint-independent mapping, "
                         "address-and-port-dependent filtering)")
    table = lines[lines.index(head) + 1:]
    assert table[0].split()[:4] == ["PEER", "OVERLAY", "NAT", "PATH"]
    assert table[1].split()[:4] == ["edge-2", "100.64.0.2", "symmetric", "direct"]
    assert table[2].split()[:3] == ["edge-3", "100.64.0.3", "unknown"]
    doc["tunnel"]["nat"] = None
    assert "NAT not classified yet" in render_status(doc)
    doc["tunnel"]["nat"] = {"natType": "unknown"}  # a server without an alternate address
    assert render_status(doc).count("NAT unknown") == 1


def test_the_nat_line_says_a_class_is_the_stored_one_until_probed() -> None:
    doc = status_document(catalog(), rules_in_place=True)
    doc["tunnel"] = {"interface": "mesh0", "overlay": "100.64.0.1/16", "local": "10.0.0.1:5000",
                     "relayed": None, "control": "ready", "peers": [],
                     "nat": {"natType": "port-restricted"}, "natSource": "stored",
                     "natProbe": True}
    assert render_status(doc).splitlines()[-2].endswith("NAT port-restricted (stored)")
    doc["tunnel"]["nat"] = {"natType": "port-restricted", "mapping": "endpoint-independent",
                            "filtering": "address-and-port-dependent"}
    assert "NAT port-restricted (stored; endpoint-independent mapping, address-and-port-" \
        "dependent filtering)" in render_status(doc)
    doc["tunnel"]["natSource"] = "probed"
    assert "NAT port-restricted (endpoint-independent mapping, " in render_status(doc)
    doc["tunnel"].update(nat=None, natSource=None, natProbe=False)
    assert "NAT unknown (natProbe off)" in render_status(doc)
    doc["tunnel"]["natProbe"] = True
    assert "NAT not classified yet" in render_status(doc)


def test_the_tunnel_part_ends_with_the_fast_path_line() -> None:
    doc = status_document(catalog(), rules_in_place=True)
    doc["tunnel"] = {"interface": "mesh0", "overlay": "100.64.0.1/16", "local": "10.0.0.1:5000",
                     "relayed": None, "control": "ready", "peers": [], "nat": None,
                     "natProbe": True, "fastPath": {"peers": ["b", "c"], "sending": ["b"],
                                                    "fast_tx": 10, "fast_rx": 12,
                                                    "handed_tun": 3, "handed_udp": 4}}
    assert render_status(doc).splitlines()[-1] == (
        "fast path: 1 direct peer(s) natively (b), packets 10 out / 12 in, 7 reads to Python")
    doc["tunnel"]["fastPath"] = None  # off, or not built
    assert "fast path" not in render_status(doc)


def test_the_tunnel_part_names_control_and_fast_path_errors() -> None:
    doc = status_document(catalog(), rules_in_place=True)
    doc["tunnel"] = {"interface": "mesh0", "overlay": "100.64.0.1/16", "local": "10.0.0.1:5000",
                     "relayed": None, "control": "backoff", "peers": [], "nat": None,
                     "natProbe": True, "fastPath": None,
                     "controlError": "refused: revoked: node n1 is revoked",
                     "fastPathError": "[Errno 5] Input/output error"}
    lines = render_status(doc).splitlines()
    assert "control channel: refused: revoked: node n1 is revoked" in lines
    assert "fast path stopped: [Errno 5] Input/output error (Python carries the data)" in lines
    doc["tunnel"].update(control="ready", fastPathError=None)  # a stale error is not shown
    assert not any(line.startswith(("control channel:", "fast path")) for line in
                   render_status(doc).splitlines())
