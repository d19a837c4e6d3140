"""Issue 4 acceptance, node-group traffic closure: a `range-nodegroup` Service with backends in
two node groups; calls from each group never leave it, and a group with no backends is refused
rather than sent to the other group.

Three nodes on one LAN: `east` = node1 + node2 (so closure still spans nodes), `west` = node3.
Groups are KubeEdge NodeGroups; cloudcore's NodeGroup controller labels the members
`apps.kubeedge.io/belonging-to`, which is what the agents read.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.serviceplane import ServicePlane, fetch_many, wait_for

NODES = {n: {"kubernetes.io/hostname": n} for n in ("node1", "node2", "node3")}
MANIFEST = """
apiVersion: apps.kubeedge.io/v1alpha1
kind: NodeGroup
metadata: {name: east}
spec: {nodes: [node1, node2]}
---
apiVersion: apps.kubeedge.io/v1alpha1
kind: NodeGroup
metadata: {name: west}
spec: {nodes: [node3]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 6
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: podserver}]
---
apiVersion: v1
kind: Service
metadata:
  name: local-web
  namespace: default
  annotations: {apps.kubeedge.io/service-topology: range-nodegroup}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: westonly, namespace: default}
spec:
  replicas: 2
  selector: {matchLabels: {app: westonly}}
  template:
    metadata: {labels: {app: westonly}}
    spec:
      nodeSelector: {kubernetes.io/hostname: node3}
      containers: [{name: web, image: podserver}]
---
apiVersion: v1
kind: Service
metadata:
  name: westonly
  namespace: default
  annotations: {apps.kubeedge.io/service-topology: range-nodegroup}
spec:
  selector: {app: westonly}
  ports: [{name: http, port: 80, targetPort: 8080}]
"""
GROUP_OF = {"node1": "east", "node2": "east", "node3": "west"}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicePlane]:
    tmp = tmp_path_factory.mktemp("svcgroup")
    with ServicePlane.up(Path(tmp), NODES, pods=6, name="svcgroup") as plane:
        plane.apply(MANIFEST)
        wait_for(lambda: all(
            plane.get("node", n)["metadata"]["labels"].get("apps.kubeedge.io/belonging-to")
            == g for n, g in GROUP_OF.items()), "node-group labels")
        plane.wait_ready_pods("app=web", 6)
        plane.wait_ready_pods("app=westonly", 2)
        yield plane


def test_calls_never_leave_the_callers_node_group(plane: ServicePlane) -> None:
    pods = plane.running_pods()
    node_of = {key.split("/")[1]: pod["node"] for key, pod in pods.items()}
    for node in ("node1", "node2", "node3"):
        group = GROUP_OF[node]
        members = sorted(p["ip"] for p in pods.values()
                         if GROUP_OF[p["node"]] == group and p["ip"] in plane.pod_ips("app=web"))
        plane.wait_endpoints(node, "default/local-web", members)
    for client in ("node1-p5", "node3-p5"):
        group = GROUP_OF[client.split("-")[0]]
        counts, failures = fetch_many(plane, client, "local-web.default", 200)
        reached = {node_of[name] for name in counts}
        print(f"\n{client} ({group}): 200 calls reached {counts}")
        assert not failures, failures
        assert sum(counts.values()) == 200
        assert {GROUP_OF[n] for n in reached} == {group}, reached
    # Within `east` the closure still spreads across both of its nodes.
    counts, _ = fetch_many(plane, "node2-p5", "local-web.default", 40)
    assert {node_of[name] for name in counts} == {"node1", "node2"}


def test_no_backend_in_the_group_is_refused_not_sent_elsewhere(plane: ServicePlane) -> None:
    plane.wait_endpoints("node3", "default/westonly", plane.pod_ips("app=westonly"))
    counts, failures = fetch_many(plane, "node3-p5", "westonly.default", 5)
    assert sum(counts.values()) == 5 and not failures
    status = plane.status("node1")
    assert status is not None
    entry = next(s for s in status["services"] if s["service"] == "default/westonly")
    assert entry["endpoints"] == [] and entry["nodegroupClosed"] is True
    counts, failures = fetch_many(plane, "node1-p5", "westonly.default", 5)
    print(f"\nfrom east to a west-only Service: {failures[:1]}")
    assert counts == {} and len(failures) == 5
    assert all("refused" in f.lower() or "reset" in f.lower() for f in failures), failures
