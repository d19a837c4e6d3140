"""Issue 4 acceptance, the agent's life: offline autonomy, kill -9 and restart, clean stop, and
bad input from the API and from the network.

The tests of this module share one lab and run in order: bad input first, then the API goes
away and comes back, then the agent on node1 is killed and restarted, then stopped.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.serviceplane import DNS_IP, ServicePlane, fetch_many, wait_for

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: podserver}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: echo, port: 5300, targetPort: 5300, protocol: UDP}]
"""
BAD = """
apiVersion: v1
kind: Service
metadata: {name: portless, namespace: default}
spec:
  selector: {app: web}
---
apiVersion: v1
kind: Service
metadata: {name: nowhere, namespace: default}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: nowhere-1
  namespace: default
  labels: {kubernetes.io/service-name: nowhere}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [10.244.99.9]
  conditions: {ready: true}
  nodeName: no-such-node
"""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicePlane]:
    tmp = tmp_path_factory.mktemp("svclife")
    with ServicePlane.up(Path(tmp), {"node1": {}, "node2": {}}, pods=3, name="svclife") as plane:
        plane.apply(MANIFEST)
        ips = plane.wait_ready_pods("app=web", 2)
        for node in ("node1", "node2"):
            plane.wait_endpoints(node, "default/web", ips)
        yield plane


def healthy(plane: ServicePlane, node: str) -> None:
    """DNS answers and the Service is reachable by name from a pod of `node`."""
    client = f"{node}-p2"
    cluster_ip = plane.cluster_ip("web")
    assert plane.dig(client, "+short", "web.default.svc.cluster.local").split() == [cluster_ip]
    counts, failures = fetch_many(plane, client, "web.default", 20)
    assert not failures and sum(counts.values()) == 20, failures


def rules_of(plane: ServicePlane, node: str) -> list[str]:
    """Every line of the node's iptables and policy routing that belongs to the agent."""
    rules = []
    for tool in ("iptables-save", "iptables-legacy-save"):
        table = ""
        for line in plane.lab.run(node, [tool], check=False).stdout.splitlines():
            if line.startswith("*"):
                table = line
            elif "EDGEWEAVE" in line or "edgeweave" in line:
                rules.append(f"{tool} {table} {line}")
    rules += [f"rule {line}" for line in plane.lab.run(node, ["ip", "rule"]).stdout.splitlines()
              if "40001" in line or "0x1000" in line]
    rules += [f"route {line}" for line in plane.lab.run(
        node, ["ip", "route", "show", "table", "40001"], check=False).stdout.splitlines()]
    return rules


GARBAGE_TCP = r"""
import os, socket, sys
for target in ((sys.argv[1], 40001), (sys.argv[2], 53)):
    try:  # the server may reset us at any point: a fine answer to garbage
        with socket.create_connection(target, timeout=5) as s:
            s.sendall(os.urandom(65536))
            while s.recv(65536):
                pass
    except OSError as exc:
        print(target[1], type(exc).__name__)
u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for n in range(200):
    u.sendto(os.urandom(n % 600), (sys.argv[2], 53))
loop = b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\xc0\x0c\x00\x01\x00\x01"
u.sendto(loop, (sys.argv[2], 53))  # a name that points at itself
print("sent")
"""


def test_bad_input_is_logged_and_survived(plane: ServicePlane) -> None:
    plane.apply(BAD)
    wait_for(lambda: "default/portless" in plane.agent_log("node1") and
             "default/nowhere" in plane.agent_log("node1"), "the agent logging the bad objects")
    # Garbage to the proxy port and to the DNS server (TCP and UDP), from a pod.
    node_ip = plane.lab.addr("node1", 1)  # the node's address on its pod bridge
    sent = plane.python("node1-p2", GARBAGE_TCP, node_ip, DNS_IP).stdout
    print(f"\ngarbage client saw: {sent.split()}")
    assert sent.strip().endswith("sent")
    time.sleep(0.5)
    for node in ("node1", "node2"):
        assert plane.agents[node].poll() is None, plane.agent_log(node)
        healthy(plane, node)
    log = plane.agent_log("node1")
    print("\nwhat the agent logged:\n" + "\n".join(
        line for line in log.splitlines() if "problem" in line or "malformed" in line
        or "not_redirected" in line or "garbage" in line)[-2000:])
    # The Service pointing nowhere fails cleanly: refused, not hung.
    counts, failures = fetch_many(plane, "node1-p2", "nowhere.default", 2)
    assert counts == {} and len(failures) == 2, (counts, failures)
    metrics = plane.lab.run("node1", ["curl", "-s", "http://127.0.0.1:40002/metrics"]).stdout
    malformed = re.search(r"^meshd_dns_malformed_total (\d+)", metrics, re.M)
    assert malformed and int(malformed.group(1)) >= 1, metrics
    plane.kubectl("delete", "service", "portless", "nowhere")
    plane.kubectl("delete", "endpointslice", "nowhere-1")


def test_agent_keeps_serving_while_the_api_is_away(plane: ServicePlane) -> None:
    plane.cluster_ip("web"), plane.cluster_ip("echo")  # looked up while the API is there
    plane.stop_api()
    try:
        time.sleep(3)  # long enough for the watches to notice the API is gone
        for node in ("node1", "node2"):
            assert plane.agents[node].poll() is None, plane.agent_log(node)
            healthy(plane, node)
            udp = plane.python(f"{node}-p2", "import socket,sys;s=socket.socket(2,2);"
                               "s.settimeout(3);s.sendto(b'x',(sys.argv[1],5300));"
                               "print(s.recv(99).decode())", plane.cluster_ip("echo"))
            assert udp.stdout.startswith("web-"), udp.stdout
    finally:
        plane.start_api()
    # Back online: the agents relist and pick up what changed.
    plane.apply("""
apiVersion: v1
kind: Service
metadata: {name: later, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
""")
    ips = plane.pod_ips("app=web")
    for node in ("node1", "node2"):
        plane.wait_endpoints(node, "default/later", ips, timeout=60)
    counts, failures = fetch_many(plane, "node2-p2", "later.default", 10)
    assert not failures and sum(counts.values()) == 10


def test_kill_9_and_restart_reconciles_without_duplicates(plane: ServicePlane) -> None:
    before = rules_of(plane, "node1")
    assert any("EDGEWEAVE-SERVICES" in r for r in before)
    plane.kill_agent("node1")
    assert rules_of(plane, "node1") == before  # a killed agent cannot clean up ...
    plane.start_agent("node1")
    plane.wait_agent("node1")
    wait_for(lambda: plane.endpoints("node1", "default/web") == plane.pod_ips("app=web"),
             "the restarted agent's endpoints")
    after = rules_of(plane, "node1")
    print(f"\n{len(after)} agent rules after kill -9 + restart ({len(before)} before)")
    assert sorted(after) == sorted(before)  # ... and a new one reconciles: nothing twice
    assert len(after) == len(set(after)), [r for r in after if after.count(r) > 1]
    healthy(plane, "node1")


def test_agent_stop_leaves_nothing_behind(plane: ServicePlane) -> None:
    pid = plane.agents["node1"].pid
    assert plane.stop_agent("node1") == 0, plane.agent_log("node1")
    assert not os.path.exists(f"/proc/{pid}")
    assert rules_of(plane, "node1") == []
    links = plane.lab.run("node1", ["ip", "-o", "link"]).stdout
    assert "edgeweave0" not in links
    assert DNS_IP not in plane.lab.run("node1", ["ip", "-o", "addr"]).stdout
    # The other node is untouched.
    healthy(plane, "node2")
    status = plane.status("node2")
    assert status is not None and json.dumps(status)
