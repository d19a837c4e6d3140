"""Issue 4 acceptance, DNS: from a pod, real resolvers (`dig`, `getent`) against the agent.

Two nodes on a LAN with cloudcore's embedded API as the source and `meshd agent` on each; the
lab plays the kubelet (netns-tests/serviceplane.py). Pods' resolv.conf is what kubelet writes
(nameserver 169.254.96.16, search default.svc.cluster.local svc.cluster.local cluster.local,
ndots:5). The only upstream resolver is dnsmasq inside the lab.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from pathlib import Path

import pytest
from netlab.serviceplane import DNS_IP, UPSTREAM_NAMES, ServicePlane, wait_for

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
      containers: [{name: web, image: podserver, ports: [{name: http, containerPort: 8080}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080, protocol: TCP}]
---
apiVersion: v1
kind: Service
metadata: {name: web-headless, namespace: default}
spec:
  clusterIP: None
  selector: {app: web}
  ports: [{name: http, port: 8080, protocol: TCP}]
"""


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServicePlane]:
    tmp = tmp_path_factory.mktemp("svcdns")
    with ServicePlane.up(Path(tmp), {"node1": {}, "node2": {}}, pods=3, name="svcdns") as plane:
        plane.apply(MANIFEST)
        ips = plane.wait_ready_pods("app=web", 2)
        wait_for(lambda: plane.endpoints("node1", "default/web") == ips, "endpoints on node1")
        yield plane


def short(plane: ServicePlane, pod: str, *args: str) -> list[str]:
    return sorted(plane.dig(pod, "+short", *args).split())


def test_fqdn_short_name_and_search_domains(plane: ServicePlane) -> None:
    cluster_ip = plane.cluster_ip("web")
    for pod in ("node1-p2", "node2-p2"):
        assert short(plane, pod, f"@{DNS_IP}", "web.default.svc.cluster.local") == [cluster_ip]
        # Short names through the pod's search list, by dig and by the C library.
        assert short(plane, pod, "+search", "web") == [cluster_ip]
        assert short(plane, pod, "+search", "web.default") == [cluster_ip]
        for name in ("web", "web.default", "web.default.svc", "web.default.svc.cluster.local"):
            hosts = plane.lab.run(pod, ["getent", "hosts", name]).stdout.split()
            assert hosts[0] == cluster_ip, (name, hosts)


def test_srv_headless_and_ptr(plane: ServicePlane) -> None:
    cluster_ip = plane.cluster_ip("web")
    pods = plane.pod_ips("app=web")
    srv = plane.dig("node1-p2", "+short", "SRV", "_http._tcp.web.default.svc.cluster.local")
    assert srv.split() == ["0", "100", "80", "web.default.svc.cluster.local."], srv
    assert short(plane, "node1-p2", "web-headless.default.svc.cluster.local") == pods
    headless_srv = plane.dig("node1-p2", "+short", "SRV",
                             "_http._tcp.web-headless.default.svc.cluster.local").splitlines()
    assert len(headless_srv) == 2 and all(" 8080 " in line for line in headless_srv)
    reverse = ipaddress.ip_address(cluster_ip).reverse_pointer
    assert short(plane, "node1-p2", "PTR", reverse) == ["web.default.svc.cluster.local."]
    assert plane.lab.run("node1-p2", ["getent", "hosts", cluster_ip]).stdout.split()[1] == \
        "web.default.svc.cluster.local"


def test_unknown_cluster_names_are_nxdomain(plane: ServicePlane) -> None:
    for name in ("nope.default.svc.cluster.local", "web.elsewhere.svc.cluster.local"):
        answer = plane.dig("node2-p2", name)
        assert "status: NXDOMAIN" in answer and "cluster.local." in answer, answer
    assert plane.lab.run("node2-p2", ["getent", "hosts", "nope"], check=False).returncode == 2


def test_outside_names_are_forwarded_to_the_upstream(plane: ServicePlane) -> None:
    for name, ip in UPSTREAM_NAMES.items():
        assert short(plane, "node1-p2", name) == [ip]
        assert plane.lab.run("node1-p2", ["getent", "hosts", name]).stdout.split()[0] == ip
    unknown = plane.dig("node1-p2", "not-there.example")
    assert "status: NXDOMAIN" in unknown, unknown  # the upstream's answer, passed on
