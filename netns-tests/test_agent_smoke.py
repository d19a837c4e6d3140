"""`meshd agent` on a lab node against cloudcore's API: DNS answers, the proxy carries a call.

A first, single-node slice of issue 4's service-plane acceptance: cloudcore on host `cloud`,
the agent on host `node` with a node certificate, a Service whose EndpointSlice names a pod on
`node`; from another pod, the name resolves through 169.254.96.16 and the ClusterIP reaches the
backend through the iptables rules and the proxy. Stopping the agent leaves no rule and no
interface behind.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from netlab import Lab

TOPOLOGY = {
    "name": "agent",
    "segments": {"lan": {"subnet": "10.30.0.0/24"}},
    "hosts": {"cloud": {"segment": "lan"}, "node": {"segment": "lan", "pods": 2}},
}
OBJECTS = """
apiVersion: v1
kind: Node
metadata: {name: node}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  ports: [{name: http, port: 80, targetPort: 8080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: default
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080, protocol: TCP}]
endpoints:
- addresses: [POD_IP]
  conditions: {ready: true}
  nodeName: node
"""


def wait(check: Callable[[], bool], what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out: {what}"
        time.sleep(0.1)


def test_agent_serves_dns_and_proxies(make_lab: Callable[[Any], Lab], tmp_path: Path) -> None:
    lab = make_lab(TOPOLOGY)
    cloud_ip, pod_ip = lab.addr("cloud"), lab.addr("node-p0")
    data = tmp_path / "cloudcore"
    lab.popen("cloud", [sys.executable, "-m", "cloudcore", "--data-dir", str(data),
                        "--api-bind", cloud_ip, "--api-port", "6443", "--log-level", "warning"])
    wait(lambda: (data / "admin.kubeconfig").exists(), "cloudcore serving")
    minted = subprocess.run(
        [sys.executable, "-m", "cloudcore", "--data-dir", str(data), "certs", "node", "node",
         "--out", str(tmp_path / "node"), "--server", f"https://{cloud_ip}:6443"],
        capture_output=True, text=True, timeout=30)
    assert minted.returncode == 0, minted.stderr
    kubectl = shutil.which("kubectl") or str(
        Path(__file__).parents[1] / ".cache/debian-kubectl/usr/bin/kubectl")
    lab.run("cloud", [kubectl, "--kubeconfig", str(data / "admin.kubeconfig"), "apply", "-f",
                      "-"], input=OBJECTS.replace("POD_IP", pod_ip))
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("hello from node-p0\n")
    lab.popen("node-p0", [sys.executable, "-m", "http.server", "8080", "--bind", pod_ip,
                          "--directory", str(www)], stdout=subprocess.DEVNULL,
              stderr=subprocess.DEVNULL)
    config = tmp_path / "meshd.yaml"
    config.write_text(json.dumps({"dns": {"upstreams": [cloud_ip]}}))  # never the host's
    agent = lab.popen("node", [sys.executable, "-m", "meshd", "agent", "--config", str(config),
                               "--node", "node", "--kubeconfig",
                               str(tmp_path / "node" / "node.kubeconfig")],
                      stderr=subprocess.PIPE, text=True)

    def resolved() -> str:
        assert agent.poll() is None, agent.communicate()[1][-3000:]
        out = lab.run("node-p1", ["dig", "+short", "+time=1", "+tries=1", "@169.254.96.16",
                                  "web.default.svc.cluster.local"], check=False).stdout
        return out.strip()

    answers: list[str] = []

    def answered() -> bool:
        answers.append(resolved())  # dig prints timeouts on stdout too: wait for an address
        return answers[-1].startswith("10.")

    wait(answered, "the Service's name resolving")
    cluster_ip = answers[-1]
    assert cluster_ip.startswith("10.96."), cluster_ip
    fetch = ("import urllib.request,sys;"
             f"print(urllib.request.urlopen('http://{cluster_ip}/', timeout=5).read().decode())")
    bodies = [lab.run("node-p1", [sys.executable, "-c", fetch]).stdout for _ in range(5)]
    assert all("hello from node-p0" in b for b in bodies), bodies
    unknown = lab.run("node-p1", ["dig", "+time=1", "+tries=1", "@169.254.96.16",
                                  "nope.default.svc.cluster.local"], check=False).stdout
    assert "NXDOMAIN" in unknown
    # What the operator sees.
    status = json.loads(lab.run("node", [sys.executable, "-m", "meshd", "status", "--json"]).stdout)
    web = next(s for s in status["services"] if s["service"] == "default/web")
    assert status["rulesInPlace"] is True and status["node"] == "node"
    assert web["clusterIPs"] == [cluster_ip]
    assert web["endpoints"] == [{"ip": pod_ip, "node": "node", "ready": True}]
    table = lab.run("node", [sys.executable, "-m", "meshd", "status"]).stdout
    assert "iptables rules in place" in table and f"{pod_ip}@node" in table
    metrics = lab.run("node", [sys.executable, "-c", "import urllib.request;print(urllib."
                               "request.urlopen('http://127.0.0.1:40002/metrics').read().decode())"
                               ]).stdout
    assert 'meshd_proxy_connections_total{service="default/web"} 5' in metrics, metrics
    assert "meshd_rules_in_place 1" in metrics
    assert 'meshd_dns_responses_total{rcode="NXDOMAIN"}' in metrics
    agent.terminate()
    assert agent.wait(timeout=20) == 0, agent.communicate()[1][-3000:]
    assert "EDGEWEAVE" not in lab.run("node", ["iptables-save"]).stdout
    assert lab.run("node", ["ip", "link", "show", "dev", "edgeweave0"], check=False).returncode
