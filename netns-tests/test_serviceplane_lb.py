"""Issue 4 acceptance, proxying and load balancing: curl and sockets from pods, through the
iptables rules and the proxy on :40001 of each node's agent, to pods on both nodes.

Endpoints on the other node are dialed directly (the lab routes pod subnets between nodes;
tunnels come with issue 5).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.serviceplane import EndpointWatch, ServicePlane, fetch_many, wait_for

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 4
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web, tier: hash}}
    spec:
      containers: [{name: web, image: podserver, ports: [{name: http, containerPort: 8080}]}]
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
metadata: {name: sticky, namespace: default}
spec:
  selector: {app: web}
  sessionAffinity: ClientIP
  sessionAffinityConfig: {clientIP: {timeoutSeconds: 300}}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata:
  name: hashed
  namespace: default
  annotations: {mesh.edgeweave.io/lb-policy: consistent-hash}
spec:
  selector: {tier: hash}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: v1
kind: Service
metadata: {name: echo, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: echo, port: 5300, targetPort: 5300, protocol: UDP}]
"""
CLIENTS = ["node1-p6", "node1-p7", "node2-p6", "node2-p7"]  # pods with no backend in them


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicePlane]:
    tmp = tmp_path_factory.mktemp("svclb")
    with ServicePlane.up(Path(tmp), {"node1": {}, "node2": {}}, pods=8, name="svclb") as plane:
        plane.apply(MANIFEST)
        ips = plane.wait_ready_pods("app=web", 4)
        for node in ("node1", "node2"):
            plane.wait_endpoints(node, "default/web", ips)
            plane.wait_endpoints(node, "default/hashed", ips)
        yield plane


def names_of(plane: ServicePlane) -> dict[str, str]:
    """Pod name -> node, for the pods the lab kubelet runs."""
    return {key.split("/")[1]: pod["node"] for key, pod in plane.running_pods().items()}


def test_curl_by_name_reaches_backends_on_both_nodes(plane: ServicePlane) -> None:
    seen = set()
    for _ in range(8):
        body = plane.curl("node1-p7", "http://web.default/")
        assert body.startswith("pod=web-"), body
        seen.add(body.split()[1])
    assert seen == {"node=node1", "node=node2"}, seen
    assert plane.curl("node2-p7", "http://web.default.svc.cluster.local/").startswith("pod=web-")


def test_round_robin_spreads_within_ten_percent(plane: ServicePlane) -> None:
    counts, failures = fetch_many(plane, "node1-p6", "web.default", 300)
    print(f"\nround robin over 300 calls from node1-p6: {counts}")
    assert not failures, failures
    assert len(counts) == 4 and sum(counts.values()) == 300
    assert all(abs(n - 75) <= 7.5 for n in counts.values()), counts


def test_client_ip_affinity_sticks(plane: ServicePlane) -> None:
    chosen = {}
    for client in CLIENTS:
        counts, failures = fetch_many(plane, client, "sticky.default", 40)
        assert not failures and len(counts) == 1, (client, counts, failures)
        chosen[client] = next(iter(counts))
    print(f"\nClientIP affinity: {chosen}")


def test_consistent_hash_keeps_clients_across_endpoint_changes(plane: ServicePlane) -> None:
    plane.kubectl("scale", "deployment", "web", "--replicas=6")
    six = plane.wait_ready_pods("tier=hash", 6)
    for node in ("node1", "node2"):
        plane.wait_endpoints(node, "default/hashed", six)
    before = {}
    for client in CLIENTS:
        counts, failures = fetch_many(plane, client, "hashed.default", 10)
        assert not failures and len(counts) == 1, (client, counts)
        before[client] = next(iter(counts))
    # Take away a backend no client is on (its pod leaves the Service's selector) ...
    spare = sorted(set(names_of(plane)) - set(before.values()))[0]
    plane.kubectl("label", "pod", spare, "tier-")
    five = plane.wait_ready_pods("tier=hash", 5)
    for node in ("node1", "node2"):
        plane.wait_endpoints(node, "default/hashed", five)
    middle = {c: next(iter(fetch_many(plane, c, "hashed.default", 5)[0])) for c in CLIENTS}
    # ... then add backends.
    plane.kubectl("scale", "deployment", "web", "--replicas=8")
    grown = plane.wait_ready_pods("tier=hash", 7)
    for node in ("node1", "node2"):
        plane.wait_endpoints(node, "default/hashed", grown)
    after = {}
    for client in CLIENTS:
        counts, failures = fetch_many(plane, client, "hashed.default", 10)
        assert not failures and len(counts) == 1, (client, counts)
        after[client] = next(iter(counts))
    print(f"\nconsistent hash: {before} stayed through removing {spare} and adding 3 backends")
    assert middle == before and after == before
    plane.kubectl("scale", "deployment", "web", "--replicas=4")
    plane.kubectl("delete", "pod", spare, "--wait=false", "--ignore-not-found")
    ips = plane.wait_ready_pods("app=web", 4)
    plane.wait_endpoints("node1", "default/web", ips)


def test_scaling_changes_backends_within_a_second(plane: ServicePlane) -> None:
    watch = EndpointWatch(plane, "node1", "default/web")
    try:
        start = time.time()
        plane.kubectl("scale", "deployment", "web", "--replicas=6")
        grown = plane.wait_ready_pods("app=web", 6)
        used = watch.wait(grown)
        ready_at = max(p["readyAt"] for p in plane.running_pods().values()
                       if p["ip"] in grown)
        up_total, up_agent = used - start, used - ready_at
        start = time.time()
        plane.kubectl("scale", "deployment", "web", "--replicas=3")
        shrunk = plane.wait_ready_pods("app=web", 3)
        down_total = watch.wait(shrunk) - start
    finally:
        watch.close()
    print(f"\nscale 4→6: agent on node1 used the new backends {up_total:.3f} s after "
          f"`kubectl scale` ({up_agent:.3f} s after the last pod was reported Ready; the rest "
          f"is the lab kubelet starting processes)\nscale 6→3: agent stopped using the removed "
          f"backends {down_total:.3f} s after `kubectl scale`")
    assert up_agent <= 1.0 and down_total <= 1.0
    plane.kubectl("scale", "deployment", "web", "--replicas=4")
    ips = plane.wait_ready_pods("app=web", 4)
    plane.wait_endpoints("node1", "default/web", ips)


def test_killed_backend_is_ejected_without_failed_calls(plane: ServicePlane) -> None:
    victim = sorted(names_of(plane))[0]
    plane.kill_pod(victim)  # the API still says Ready: only the proxy's passive health knows
    counts, failures = fetch_many(plane, "node2-p6", "web.default", 100)
    print(f"\nafter killing {victim}: {counts}")
    assert not failures, failures
    assert victim not in counts and sum(counts.values()) == 100
    metrics = plane.lab.run("node2", ["curl", "-s", "http://127.0.0.1:40002/metrics"]).stdout
    ejections = [line for line in metrics.splitlines()
                 if line.startswith("meshd_proxy_ejections_total{") and 'default/web"' in line]
    assert ejections and float(ejections[0].split()[-1]) >= 1, metrics
    plane.kubectl("delete", "pod", victim, "--wait=false")
    plane.wait_ready_pods("app=web", 4)


UDP_CALL = r"""
import json, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
answers = []
for i in range(int(sys.argv[3])):
    s.sendto(b"ping%d" % i, (sys.argv[1], int(sys.argv[2])))
    answers.append(s.recv(2048).decode())
print(json.dumps(answers))
"""


def test_udp_service_answers_through_the_mesh(plane: ServicePlane) -> None:
    cluster_ip = plane.cluster_ip("echo")
    answers = json.loads(plane.python("node1-p6", UDP_CALL, cluster_ip, "5300", "5").stdout)
    assert [a.split(":", 1)[1] for a in answers] == [f"ping{i}" for i in range(5)]
    assert all(a.startswith("web-") for a in answers), answers
    wait_for(lambda: plane.python("node2-p6", UDP_CALL, cluster_ip, "5300", "1").stdout,
             "a UDP answer from node2")
