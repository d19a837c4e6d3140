"""`cloudcore --data-dir DIR` end to end: CA, TLS API, admin.kubeconfig, controllers, restart.

Drives the real process with the real kubectl (every one found: the machine's and Debian's
kubernetes-client unpacked by dev/setup) and the official Python `kubernetes` client.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client as k8s
from kubernetes import config as k8s_config

ROOT = Path(__file__).resolve().parents[2]
APP = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: default}
spec:
  replicas: 3
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec:
      containers: [{name: web, image: nginx, ports: [{containerPort: 80, name: http}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{port: 80, targetPort: http, name: http}]
"""


def kubectls() -> list[str]:
    found = [k for k in (shutil.which("kubectl"),
                         str(ROOT / ".cache/debian-kubectl/usr/bin/kubectl")) if k and
             Path(k).exists()]
    if not found:
        if os.environ.get("CI"):
            pytest.fail("no kubectl found (dev/setup installs Debian's kubernetes-client)")
        pytest.skip("no kubectl")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Cloudcore:
    """A cloudcore process on loopback."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.port = free_port()
        self.proc: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data), "--api-bind",
             "127.0.0.1", "--api-port", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        kubeconfig = self.data / "admin.kubeconfig"
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, self.proc.communicate()[1]
            if kubeconfig.exists() and self.kubectl(shutil.which("kubectl") or "kubectl",
                                                    "get", "ns", check=False).returncode == 0:
                return
            assert time.monotonic() < deadline, "cloudcore did not serve within 30 s"
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kubectl(self, binary: str, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([binary, "--kubeconfig", str(self.data / "admin.kubeconfig"),
                               *args], input=input, capture_output=True, text=True, timeout=60)
        if check:
            assert proc.returncode == 0, f"kubectl {' '.join(args)}: {proc.stderr}"
        return proc

    def api(self) -> Any:
        return k8s_config.new_client_from_config(str(self.data / "admin.kubeconfig"))


@pytest.fixture
def cloudcore(tmp_path: Path) -> Iterator[Cloudcore]:
    cc = Cloudcore(tmp_path / "cloudcore")
    try:
        cc.start()
        yield cc
    finally:
        cc.stop()


def wait_for(predicate: Any, timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def add_ready_node(core: Any, name: str) -> None:
    core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name=name)))
    core.patch_node_status(name, {"status": {"conditions": [
        {"type": "Ready", "status": "True", "reason": "KubeletReady",
         "lastHeartbeatTime": None}]}})


def test_apply_schedules_and_publishes_endpoints(cloudcore: Cloudcore) -> None:
    core = k8s.CoreV1Api(cloudcore.api())
    for node in ("edge-1", "edge-2"):
        add_ready_node(core, node)
    for binary in kubectls():
        first = cloudcore.kubectl(binary, "apply", "-f", "-", input=APP).stdout
        assert "created" in first or "unchanged" in first or "configured" in first
        again = cloudcore.kubectl(binary, "apply", "-f", "-", input=APP).stdout
        assert again.count("unchanged") == 2, again
    def scheduled() -> list[Any] | None:
        pods = [p for p in core.list_namespaced_pod("default").items if p.spec.node_name]
        return pods if len(pods) == 3 else None

    pods = wait_for(scheduled, what="3 scheduled pods")
    spread = sorted(p.spec.node_name for p in pods)
    assert set(spread) == {"edge-1", "edge-2"}, spread
    # Play the kubelet: report the pods running and ready.
    for i, pod in enumerate(pods):
        core.patch_namespaced_pod_status(pod.metadata.name, "default", {"status": {
            "phase": "Running", "podIP": f"172.17.0.{i + 2}",
            "conditions": [{"type": "Ready", "status": "True"}]}})

    def endpoint_ips() -> list[str]:
        ep = core.read_namespaced_endpoints("web", "default")
        return sorted(a.ip for s in ep.subsets or [] for a in s.addresses or [])

    assert wait_for(lambda: endpoint_ips() == ["172.17.0.2", "172.17.0.3", "172.17.0.4"],
                    what="endpoints")
    table = cloudcore.kubectl(kubectls()[0], "get", "deploy", "web").stdout
    assert "3/3" in table, table


def test_restart_keeps_state_and_ca(tmp_path: Path) -> None:
    cc = Cloudcore(tmp_path / "cc")
    try:
        cc.start()
        binary = kubectls()[0]
        cc.kubectl(binary, "create", "configmap", "keep", "--from-literal=a=b")
        ca = (cc.data / "pki" / "ca.crt").read_bytes()
        cc.stop()
        cc.start()
        assert (cc.data / "pki" / "ca.crt").read_bytes() == ca
        out = cc.kubectl(binary, "get", "configmap", "keep", "-o", "jsonpath={.data.a}").stdout
        assert out == "b"
    finally:
        cc.stop()


def test_node_certificate_is_limited_to_its_node(cloudcore: Cloudcore, tmp_path: Path) -> None:
    out = tmp_path / "node"
    minted = subprocess.run(
        [sys.executable, "-m", "cloudcore", "--data-dir", str(cloudcore.data), "certs", "node",
         "edge-9", "--out", str(out), "--server", f"https://127.0.0.1:{cloudcore.port}"],
        capture_output=True, text=True, timeout=30)
    assert minted.returncode == 0, minted.stderr
    api = k8s_config.new_client_from_config(str(out / "edge-9.kubeconfig"))
    core = k8s.CoreV1Api(api)
    core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name="edge-9")))
    with pytest.raises(k8s.ApiException) as denied:
        core.create_node(k8s.V1Node(metadata=k8s.V1ObjectMeta(name="edge-10")))
    assert denied.value.status == 403
    with pytest.raises(k8s.ApiException) as denied:
        core.create_namespaced_config_map("default", k8s.V1ConfigMap(
            metadata=k8s.V1ObjectMeta(name="x")))
    assert denied.value.status == 403


def test_certs_without_ca_is_one_line(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cloudcore", "--data-dir", str(tmp_path / "none"), "certs",
         "node", "n1", "--out", str(tmp_path / "o")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "no CA yet" in proc.stderr


def test_port_in_use_is_one_line(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "-m", "cloudcore", "--data-dir", str(tmp_path / "d"), "--api-bind",
             "127.0.0.1", "--api-port", str(port)], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "address already in use" in proc.stderr
    assert "Traceback" not in proc.stderr
