"""The real kubectl against the embedded API: every kubectl found (the one on PATH and Debian's
1.20 unpacked by dev/setup), with its default client-side validation (no --validate=false).

Each kubectl works in its own namespace and has its own HOME (so its discovery cache is fresh).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import IO

import pytest
import yaml

from edgeweave.apiserver.testing import ApiHarness
from edgeweave.kube.errors import NotFound
from edgeweave.kube.resources import (
    CONFIGMAPS,
    DEPLOYMENTS,
    NAMESPACES,
    NODEGROUPS,
    PODS,
    SECRETS,
    SERVICES,
)

REPO = Path(__file__).resolve().parents[3]


def kubectl_binaries() -> list[tuple[str, str | None]]:
    """(id, path or None if missing): the kubectl on PATH and Debian's 1.20 unpacked beside
    the project by dev/setup."""
    debian = REPO / ".cache" / "debian-kubectl" / "usr" / "bin" / "kubectl"
    return [
        ("path", shutil.which("kubectl")),
        ("debian", str(debian) if debian.exists() else None),
    ]


def require_binary(kind: str, path: str | None) -> str:
    """The binary, or skip (locally) / fail (with CI set) when it is missing."""
    if path is None:
        message = f"kubectl ({kind}) not found: run dev/setup"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


APP = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: web
  labels: {app: web}
spec:
  replicas: 2
  selector:
    matchLabels: {app: web}
  template:
    metadata:
      labels: {app: web}
    spec:
      containers:
      - name: nginx
        image: nginx:1.25
        ports:
        - containerPort: 80
---
apiVersion: v1
kind: Service
metadata:
  name: web
spec:
  selector: {app: web}
  ports:
  - port: 80
"""

NODEGROUP = """\
apiVersion: apps.kubeedge.io/v1alpha1
kind: NodeGroup
metadata:
  name: {name}
spec:
  nodes: [edge-1, edge-2]
  matchLabels:
    region: beijing
"""


class Kubectl:
    """One kubectl binary with its own HOME, the admin kubeconfig and a namespace."""

    def __init__(self, binary: str, home: Path, api: ApiHarness, namespace: str) -> None:
        self.binary = binary
        self.api = api
        self.namespace = namespace
        self.env = dict(os.environ, HOME=str(home), KUBECONFIG=str(api.admin_kubeconfig))
        self.env.pop("KUBECTL_EXTERNAL_DIFF", None)
        self.files = home

    def run(
        self, *args: str, stdin: str | None = None, check: bool = True, namespaced: bool = True
    ) -> subprocess.CompletedProcess[str]:
        cmd = [self.binary, *args] + (["-n", self.namespace] if namespaced else [])
        proc = subprocess.run(
            cmd, input=stdin, capture_output=True, text=True, env=self.env, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"{cmd} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.binary, *args, "-n", self.namespace],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=self.env,
        )

    def write(self, name: str, text: str) -> str:
        path = self.files / name
        path.write_text(text)
        return str(path)


@pytest.fixture(scope="module", params=kubectl_binaries(), ids=lambda p: p[0])
def kubectl(
    request: pytest.FixtureRequest, api: ApiHarness, tmp_path_factory: pytest.TempPathFactory
) -> Kubectl:
    kind, path = request.param
    binary = require_binary(kind, path)
    namespace = f"kubectl-{kind}"
    api.store.create(NAMESPACES, {"metadata": {"name": namespace}})
    return Kubectl(binary, tmp_path_factory.mktemp(f"home-{kind}"), api, namespace)


@pytest.fixture(scope="module")
def applied(kubectl: Kubectl) -> str:
    """The first `kubectl apply -f` of the Deployment + Service."""
    return kubectl.run("apply", "-f", kubectl.write("app.yaml", APP)).stdout


def _lines(stream: IO[str]) -> queue.Queue[str]:
    out: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in stream:
            out.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return out


def _wait_line(lines: queue.Queue[str], predicate: str, timeout: float = 15.0) -> list[str]:
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=max(0.01, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if predicate in line:
            return seen
    raise AssertionError(f"no line with {predicate!r} in {seen}")


def test_apply_twice_is_idempotent(kubectl: Kubectl, applied: str) -> None:
    assert "deployment.apps/web created" in applied
    assert "service/web created" in applied
    again = kubectl.run("apply", "-f", kubectl.write("app.yaml", APP)).stdout
    assert "deployment.apps/web unchanged" in again
    assert "service/web unchanged" in again


def test_apply_change_is_configured(kubectl: Kubectl, applied: str) -> None:
    changed = APP.replace("nginx:1.25", "nginx:1.26")
    out = kubectl.run("apply", "-f", kubectl.write("app2.yaml", changed)).stdout
    assert "deployment.apps/web configured" in out
    dep = kubectl.api.store.get(DEPLOYMENTS, "web", namespace=kubectl.namespace)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.26"
    kubectl.run("apply", "-f", kubectl.write("app.yaml", APP))


def test_diff_and_server_dry_run(kubectl: Kubectl, applied: str) -> None:
    # kubectl checks the OpenAPI documents for a dryRun parameter first (1.20: /openapi/v2,
    # >= 1.27: /openapi/v3), then sends the patch with dryRun=All
    changed = kubectl.write("app-dry.yaml", APP.replace("nginx:1.25", "nginx:1.99"))
    diff = kubectl.run("diff", "-f", changed, check=False)
    assert diff.returncode == 1, diff.stderr  # 1: differences found
    assert "+      - image: nginx:1.99" in diff.stdout
    dry = kubectl.run("apply", "-f", changed, "--dry-run=server").stdout
    assert "deployment.apps/web configured (server dry run)" in dry
    dep = kubectl.api.store.get(DEPLOYMENTS, "web", namespace=kubectl.namespace)
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] != "nginx:1.99"


def test_get_yaml(kubectl: Kubectl, applied: str) -> None:
    dep = yaml.safe_load(kubectl.run("get", "deployment", "web", "-o", "yaml").stdout)
    assert dep["kind"] == "Deployment" and dep["spec"]["replicas"] >= 1
    assert "kubectl.kubernetes.io/last-applied-configuration" in dep["metadata"]["annotations"]
    svc = yaml.safe_load(kubectl.run("get", "service", "web", "-o", "yaml").stdout)
    assert svc["spec"]["clusterIP"].startswith("10.96.")
    assert svc["spec"]["ports"][0] == {"port": 80, "protocol": "TCP", "targetPort": 80}
    assert svc["spec"]["type"] == "ClusterIP" and svc["spec"]["sessionAffinity"] == "None"


def test_get_table(kubectl: Kubectl, applied: str) -> None:
    out = kubectl.run("get", "deployments,services").stdout
    assert out.split("\n")[0].split() == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert "deployment.apps/web" in out
    svc_header = ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert any(line.split() == svc_header for line in out.splitlines())
    assert "80/TCP" in out
    wide = kubectl.run("get", "service", "web", "-o", "wide").stdout
    assert "SELECTOR" in wide and "app=web" in wide
    ns = kubectl.run("get", "namespaces", namespaced=False).stdout
    assert ns.split("\n")[0].split() == ["NAME", "STATUS", "AGE"]
    empty = kubectl.run("get", "pods")
    assert "No resources found" in empty.stdout + empty.stderr


def test_get_watch_sees_changes(kubectl: Kubectl, applied: str) -> None:
    hub = kubectl.api.server.hub
    before = hub.watcher_count()
    proc = kubectl.popen("get", "deployments", "-w")
    try:
        assert proc.stdout is not None
        lines = _lines(proc.stdout)
        _wait_line(lines, "web")
        deadline = time.monotonic() + 10
        while hub.watcher_count() <= before and time.monotonic() < deadline:
            time.sleep(0.02)  # the first line comes from a GET; the watch starts after it
        kubectl.api.store.guaranteed_update(
            DEPLOYMENTS,
            "web",
            lambda d: {**d, "spec": {**d["spec"], "replicas": 7}},
            namespace=kubectl.namespace,
        )
        _wait_line(lines, "/7")
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_scale(kubectl: Kubectl, applied: str) -> None:
    out = kubectl.run("scale", "deployment/web", "--replicas=3").stdout
    assert "deployment.apps/web scaled" in out
    dep = kubectl.api.store.get(DEPLOYMENTS, "web", namespace=kubectl.namespace)
    assert dep["spec"]["replicas"] == 3


def test_label(kubectl: Kubectl, applied: str) -> None:
    out = kubectl.run("label", "deployment", "web", "tier=front").stdout
    assert "deployment.apps/web labeled" in out
    dep = kubectl.api.store.get(DEPLOYMENTS, "web", namespace=kubectl.namespace)
    assert dep["metadata"]["labels"] == {"app": "web", "tier": "front"}
    kubectl.run("label", "deployment", "web", "tier-")


def test_patch_merge_json_strategic(kubectl: Kubectl, applied: str) -> None:
    kubectl.run("patch", "deployment", "web", "--type", "merge", "-p", '{"spec":{"replicas":4}}')
    get = kubectl.api.store.get
    assert get(DEPLOYMENTS, "web", namespace=kubectl.namespace)["spec"]["replicas"] == 4
    ops = '[{"op":"replace","path":"/spec/replicas","value":5}]'
    kubectl.run("patch", "deployment", "web", "--type", "json", "-p", ops)
    assert get(DEPLOYMENTS, "web", namespace=kubectl.namespace)["spec"]["replicas"] == 5
    container_env = {"name": "nginx", "env": [{"name": "A", "value": "1"}]}
    env = json.dumps({"spec": {"template": {"spec": {"containers": [container_env]}}}})
    out = kubectl.run("patch", "deployment", "web", "-p", env).stdout
    assert "patched" in out
    container = get(DEPLOYMENTS, "web", namespace=kubectl.namespace)["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["image"] == "nginx:1.25"  # strategic merge by name kept the image
    assert container["env"] == [{"name": "A", "value": "1"}]


def test_nodegroup_from_yaml(kubectl: Kubectl) -> None:
    name = f"beijing-{kubectl.namespace}"
    path = kubectl.write("ng.yaml", NODEGROUP.format(name=name))
    first = kubectl.run("apply", "-f", path, namespaced=False).stdout
    assert f"nodegroup.apps.kubeedge.io/{name} created" in first
    second = kubectl.run("apply", "-f", path, namespaced=False).stdout
    assert f"nodegroup.apps.kubeedge.io/{name} unchanged" in second
    table = kubectl.run("get", "nodegroups", namespaced=False).stdout
    assert any(line.split()[:2] == [name, "edge-1,edge-2"] for line in table.splitlines())
    short = kubectl.run("get", "ng", name, "-o", "yaml", namespaced=False).stdout
    assert yaml.safe_load(short)["spec"]["matchLabels"] == {"region": "beijing"}
    assert kubectl.api.store.get(NODEGROUPS, name)["spec"]["nodes"] == ["edge-1", "edge-2"]


def test_errors_print_clearly(kubectl: Kubectl) -> None:
    missing = kubectl.run("get", "deployment", "nope", check=False)
    assert missing.returncode != 0
    assert 'Error from server (NotFound): deployments.apps "nope" not found' in missing.stderr
    bogus = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: bogus}\nbogus: 1\ndata: {a: b}\n"
    result = kubectl.run("apply", "-f", kubectl.write("bogus.yaml", bogus), check=False)
    text = result.stdout + result.stderr
    # kubectl >= 1.27 asks fieldValidation=Strict (it found the parameter in /openapi/v3);
    # older ones get the default Warn and print the warning.
    assert 'unknown field "bogus"' in text, text


def test_generators(kubectl: Kubectl) -> None:
    # kubectl >= 1.32 sends these from its typed clients as protobuf, older ones as JSON
    ns = f"{kubectl.namespace}-gen"
    kubectl.run("create", "namespace", ns, namespaced=False)
    run = kubectl.run
    run("create", "configmap", "cfg", "--from-literal=a=b", "-n", ns, namespaced=False)
    run("create", "secret", "generic", "sec", "--from-literal=k=v", "-n", ns, namespaced=False)
    run("create", "deployment", "gen", "--image=nginx:1.25", "-n", ns, namespaced=False)
    run(
        "expose", "deployment", "gen", "--port=80", "--target-port=8080", "-n", ns, namespaced=False
    )
    run("run", "pod1", "--image=busybox", "--env=A=1", "--labels=app=p", "-n", ns, namespaced=False)
    store = kubectl.api.store
    assert store.get(CONFIGMAPS, "cfg", namespace=ns)["data"] == {"a": "b"}
    secret = store.get(SECRETS, "sec", namespace=ns)
    assert secret["data"] == {"k": "dg=="} and secret["type"] == "Opaque"
    dep = store.get(DEPLOYMENTS, "gen", namespace=ns)
    assert dep["spec"]["selector"] == {"matchLabels": {"app": "gen"}}
    assert dep["spec"]["template"]["spec"]["containers"][0]["image"] == "nginx:1.25"
    svc = store.get(SERVICES, "gen", namespace=ns)["spec"]
    assert svc["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 8080}]
    assert svc["clusterIP"].startswith("10.96.") and svc["selector"] == {"app": "gen"}
    pod = store.get(PODS, "pod1", namespace=ns)
    assert pod["metadata"]["labels"] == {"app": "p"}
    assert pod["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]


def test_delete(kubectl: Kubectl, applied: str) -> None:
    out = kubectl.run("delete", "-f", kubectl.write("app.yaml", APP)).stdout
    assert 'deployment.apps "web" deleted' in out
    assert 'service "web" deleted' in out
    for res in (DEPLOYMENTS, SERVICES):
        with pytest.raises(NotFound):
            kubectl.api.store.get(res, "web", namespace=kubectl.namespace)


def test_user_agent(kubectl: Kubectl, capsys: pytest.CaptureFixture[str]) -> None:
    # The kubectl on PATH may be a dispatcher that runs the client matching /version's minor;
    # the User-Agent it sends says which one really talked to us.
    proc = kubectl.run("get", "--raw", "/version", "-v=7", namespaced=False)
    agents = [
        line.split("User-Agent:")[1].strip()
        for line in proc.stderr.splitlines()
        if "User-Agent:" in line
    ]
    assert agents, proc.stderr
    with capsys.disabled():
        print(f"\n{kubectl.binary}: {agents[0]}")
