"""The service-plane lab: cloudcore's embedded API, nodes running `meshd agent`, pods as namespaces.

Test scaffolding for issue 4's acceptance and the demo, never product code. Until Edged lands
the lab plays the kubelet (netlab/kubelet.py, a process on host `cloud`): it registers each
node Ready, runs every pod scheduled to a node as a real process (netlab/podserver.py) in a
free pod namespace behind that node's bridge, reports the pod's IP and Ready condition, and
stops it when the pod is deleted. Pods get a resolv.conf pointing at the agent's DNS
(169.254.96.16) with kubelet's search list, through `ip netns exec`'s /etc/netns/<namespace>/
bind mounts. Everything that talks to the API runs inside the lab (kubectl on `cloud`), so no
test traffic ever leaves it.

    with ServicePlane.up(tmp_path, nodes={"node1": {}, "node2": {}}) as plane:
        plane.apply(YAML)
        plane.curl("node1-p0", "http://web.default/")
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from meshd.dns.resolvconf import pod_resolv_conf
from netlab import Lab, Topology

KUBELET = Path(__file__).with_name("kubelet.py")
DNS_IP = "169.254.96.16"
LAN = "10.40.0.0/24"
UPSTREAM_NAMES = {"outside.example": "192.0.2.80"}  # what the in-lab upstream resolver knows
T = TypeVar("T")


def kubectl_binary() -> str:
    """The machine's kubectl, else Debian's unpacked by dev/setup."""
    return shutil.which("kubectl") or str(
        Path(__file__).parents[1] / ".cache/debian-kubectl/usr/bin/kubectl")


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0,
             step: float = 0.05) -> T:
    """Poll `check` until it returns something truthy; fail naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s: {what}")
        time.sleep(step)


def topology(name: str, nodes: Mapping[str, int]) -> dict[str, Any]:
    """`cloud` plus the nodes on one LAN; node N's pods are 10.244.N.0/24, routed between nodes."""
    hosts: dict[str, Any] = {"cloud": {"segment": "lan"}}
    for i, (node, pods) in enumerate(nodes.items(), start=1):
        hosts[node] = {"segment": "lan", "pods": pods, "podSubnet": f"10.244.{i}.0/24"}
    return {"name": name, "segments": {"lan": {"subnet": LAN, "podRoutes": True}},
            "hosts": hosts}


class ServicePlane:
    """A built lab with cloudcore, an upstream resolver, the lab kubelet and one agent per node."""

    def __init__(self, lab: Lab, tmp: Path, node_labels: Mapping[str, Mapping[str, str]],
                 clients: int = 2) -> None:
        self.lab = lab
        self.clients = clients
        self.tmp = tmp
        self.nodes = list(node_labels)
        self.data = tmp / "cloudcore"
        self.cloud_ip = lab.addr("cloud")
        self.api_url = f"https://{self.cloud_ip}:6443"
        self.cloudcore: subprocess.Popen[str] | None = None
        self.agents: dict[str, subprocess.Popen[str]] = {}
        self.agent_logs: dict[str, Path] = {}
        self._labels = node_labels
        self.kubelet: subprocess.Popen[str] | None = None
        self._etc: list[Path] = []
        self._cluster_ips: dict[str, str] = {}

    @classmethod
    @contextlib.contextmanager
    def up(cls, tmp: Path, nodes: Mapping[str, Mapping[str, str]], *, pods: int = 8,
           clients: int = 2, name: str = "svc",
           agents: bool = True) -> Iterator[ServicePlane]:
        """Build the lab, start everything; tear it all down on exit, whatever happened.

        Each node gets `pods` pod namespaces; the last `clients` of them are never given to
        the kubelet: tests call Services from there."""
        lab = Lab(Topology.from_dict(topology(name, {n: pods for n in nodes})))
        lab.build()
        plane = cls(lab, tmp, nodes, clients)
        try:
            plane.start(agents=agents)
            yield plane
        finally:
            plane.close()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self, *, agents: bool = True) -> None:
        for node in self.nodes:
            # Real nodes have a default route; without one, traffic to a ClusterIP with no
            # endpoints fails routing (ENETUNREACH) before the agent's REJECT rule can refuse
            # it. `cloud` does not forward, so nothing leaves the lab.
            self.lab.run(node, ["ip", "route", "add", "default", "via", self.cloud_ip])
        self.start_upstream_dns()
        self.start_api()
        for node in self.nodes:
            minted = subprocess.run(
                [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data), "certs",
                 "node", node, "--out", str(self.tmp / node), "--server", self.api_url],
                capture_output=True, text=True, timeout=30)
            assert minted.returncode == 0, minted.stderr
            for slot in self.lab.pods(node):
                self.write_etc(slot, "resolv.conf",
                               pod_resolv_conf("default", "cluster.local", DNS_IP))
        self.start_kubelet()
        if agents:
            for node in self.nodes:
                self.start_agent(node)
            for node in self.nodes:
                self.wait_agent(node)

    def close(self) -> None:
        try:
            if self.kubelet is not None and self.kubelet.poll() is None:
                self.kubelet.terminate()
                self.kubelet.wait(timeout=30)
            for node in list(self.agents):
                self.stop_agent(node)
        finally:
            self.lab.teardown()
            for path in self._etc:
                shutil.rmtree(path, ignore_errors=True)

    def start_kubelet(self) -> None:
        spec = {"slots": {n: [[self.lab.netns(s), self.lab.addr(s)]
                              for s in self.lab.pods(n)[:len(self.lab.pods(n)) - self.clients]]
                          for n in self.nodes},
                "labels": {n: dict(v) for n, v in self._labels.items()},
                "nodeIPs": {n: self.lab.addr(n) for n in self.nodes}}
        (self.tmp / "slots.json").write_text(json.dumps(spec))
        log = open(self.tmp / "kubelet.log", "a")  # noqa: SIM115 - the process owns it
        self.kubelet = self.lab.popen("cloud", [
            sys.executable, str(KUBELET), "--kubeconfig", str(self.data / "admin.kubeconfig"),
            "--slots", str(self.tmp / "slots.json"), "--state", str(self.tmp / "pods.json")],
            stdout=subprocess.PIPE, stderr=log, text=True)
        log.close()
        assert self.kubelet.stdout is not None
        ready, _, _ = select.select([self.kubelet.stdout], [], [], 60)
        assert ready and self.kubelet.stdout.readline().strip() == "ready", \
            (self.tmp / "kubelet.log").read_text()[-3000:]

    def running_pods(self) -> dict[str, dict[str, Any]]:
        """What the lab kubelet runs: `{"ns/name": {"node", "slot", "ip", "pid"}}`."""
        path = self.tmp / "pods.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def kill_pod(self, name: str, namespace: str = "default") -> dict[str, Any]:
        """SIGKILL a pod's process without telling the API: it still looks Ready."""
        pod = self.running_pods()[f"{namespace}/{name}"]
        os.kill(pod["pid"], signal.SIGKILL)
        return pod

    def start_api(self) -> None:
        """cloudcore with its embedded API and controllers on host `cloud`."""
        log = open(self.tmp / "cloudcore.log", "a")  # noqa: SIM115 - the process owns it
        self.cloudcore = self.lab.popen(
            "cloud", [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data),
                      "--api-bind", self.cloud_ip, "--api-port", "6443",
                      "--log-level", "warning"], stdout=log, stderr=log, text=True)
        log.close()
        wait_for(lambda: self._api_answers(), "cloudcore serving", timeout=60)

    def _api_answers(self) -> bool:
        assert self.cloudcore is not None
        if self.cloudcore.poll() is not None:
            raise AssertionError("cloudcore exited: "
                                 + (self.tmp / "cloudcore.log").read_text()[-3000:])
        if not (self.data / "admin.kubeconfig").exists():
            return False
        return self.kubectl("get", "--raw", "/readyz", check=False).returncode == 0

    def stop_api(self) -> None:
        assert self.cloudcore is not None
        self.cloudcore.terminate()
        self.cloudcore.wait(timeout=20)

    def start_upstream_dns(self) -> None:
        """dnsmasq on `cloud`: the agents' upstream resolver, the only one tests ever query."""
        argv = ["dnsmasq", "-k", "--no-resolv", "--no-hosts", "--bind-interfaces",
                f"--listen-address={self.cloud_ip}", "--port=53", "--user=root",
                f"--pid-file={self.tmp / 'dnsmasq.pid'}", "--log-facility=-"]
        argv += [f"--address=/{n}/{ip}" for n, ip in UPSTREAM_NAMES.items()]
        argv += ["--local=/example/"]  # other names under example. are NXDOMAIN
        self.lab.popen("cloud", argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def agent_config(self, node: str) -> Path:
        path = self.tmp / f"meshd-{node}.json"
        path.write_text(json.dumps({"dns": {"upstreams": [self.cloud_ip]}}))
        return path

    def start_agent(self, node: str) -> subprocess.Popen[str]:
        log_path = self.tmp / f"agent-{node}.log"
        log = open(log_path, "a")  # noqa: SIM115 - the process owns it
        proc = self.lab.popen(node, [
            sys.executable, "-m", "meshd", "agent", "--config", str(self.agent_config(node)),
            "--node", node, "--kubeconfig", str(self.tmp / node / f"{node}.kubeconfig")],
            stdout=log, stderr=log, text=True)
        log.close()
        self.agents[node] = proc
        self.agent_logs[node] = log_path
        return proc

    def wait_agent(self, node: str, timeout: float = 30) -> None:
        def ready() -> bool:
            proc = self.agents[node]
            if proc.poll() is not None:
                raise AssertionError(f"agent on {node} exited: {self.agent_log(node)}")
            status = self.status(node, check=False)
            return bool(status and status.get("rulesInPlace"))

        wait_for(ready, f"agent on {node} serving", timeout=timeout)

    def agent_log(self, node: str) -> str:
        return self.agent_logs[node].read_text()[-4000:]

    def print_agent_tails(self, chars: int = 1500) -> None:
        """The last `chars` of every started agent's log, for a failed test's output."""
        for node in self.nodes:
            if node in self.agent_logs:
                print(f"--- agent {node} (tail)\n{self.agent_log(node)[-chars:]}")

    def stop_agent(self, node: str) -> int:
        proc = self.agents.pop(node)
        if proc.poll() is None:
            proc.terminate()
        return proc.wait(timeout=20)

    def kill_agent(self, node: str) -> None:
        proc = self.agents.pop(node)
        proc.kill()
        proc.wait(timeout=10)

    # -- driving -----------------------------------------------------------------------

    def write_etc(self, node: str, name: str, text: str) -> None:
        """A file `ip netns exec` shows at /etc/NAME inside `node` (removed at close)."""
        directory = Path("/etc/netns") / self.lab.netns(node)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_text(text)
        self._etc.append(directory)

    def get(self, *args: str) -> Any:
        """`kubectl get ARGS -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def cluster_ip(self, service: str, namespace: str = "default") -> str:
        """The Service's ClusterIP (remembered: it never changes, and the API may be down)."""
        key = f"{namespace}/{service}"
        if key not in self._cluster_ips:
            self._cluster_ips[key] = str(
                self.get("service", service, "-n", namespace)["spec"]["clusterIP"])
        return self._cluster_ips[key]

    def kubectl(self, *args: str, input: str | None = None,
                check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.lab.run("cloud", [kubectl_binary(), "--kubeconfig",
                                      str(self.data / "admin.kubeconfig"), *args],
                            input=input, check=check)

    def apply(self, manifest: str) -> str:
        return self.kubectl("apply", "-f", "-", input=manifest).stdout

    def status(self, node: str, check: bool = True) -> dict[str, Any] | None:
        proc = self.lab.run(node, [sys.executable, "-m", "meshd", "status", "--json"],
                            check=check)
        if proc.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

    def endpoints(self, node: str, service: str) -> list[str]:
        """The endpoint IPs the agent on `node` uses for `service` (ns/name), sorted."""
        status = self.status(node, check=False) or {}
        for entry in status.get("services", []):
            if entry["service"] == service:
                return sorted(e["ip"] for e in entry["endpoints"] if e.get("ready", True))
        return []

    def pod_ips(self, label: str, namespace: str = "default") -> list[str]:
        """IPs of the Ready pods whose labels match `label` (k=v), not being deleted."""
        pods = self.get("pods", "-n", namespace, "-l", label)["items"]
        return sorted(p["status"]["podIP"] for p in pods
                      if p["status"].get("podIP") and "deletionTimestamp" not in p["metadata"]
                      and any(c["type"] == "Ready" and c["status"] == "True"
                              for c in p["status"].get("conditions", [])))

    def wait_ready_pods(self, label: str, count: int, timeout: float = 60) -> list[str]:
        return wait_for(lambda: (lambda ips: ips if len(ips) == count else None)(
            self.pod_ips(label)), f"{count} ready pods with {label}", timeout=timeout)

    def wait_endpoints(self, node: str, service: str, ips: list[str],
                       timeout: float = 30) -> float:
        """Wait until the agent on `node` uses exactly `ips` for `service`; seconds it took."""
        start = time.monotonic()
        wait_for(lambda: self.endpoints(node, service) == sorted(ips),
                 f"agent on {node} using {sorted(ips)} for {service}", timeout=timeout,
                 step=0.02)
        return time.monotonic() - start

    def dig(self, pod: str, *args: str) -> str:
        return self.lab.run(pod, ["dig", "+time=2", "+tries=2", *args], check=False).stdout

    def curl(self, pod: str, url: str, *extra: str, check: bool = True) -> str:
        proc = self.lab.run(pod, ["curl", "-sS", "--max-time", "5", *extra, url], check=check)
        return proc.stdout

    def python(self, pod: str, code: str, *args: str,
               timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """Run a Python snippet inside `pod` (for loads curl would make slow)."""
        return self.lab.run(pod, [sys.executable, "-c", code, *args], timeout=timeout)


WATCH_STATUS = r"""
import json, sys, time, urllib.request
service, last = sys.argv[1], None
print("ready", flush=True)
while True:
    try:
        doc = json.load(urllib.request.urlopen("http://127.0.0.1:40002/status", timeout=2))
    except OSError:
        time.sleep(0.05)
        continue
    ips = sorted(e["ip"] for s in doc["services"] if s["service"] == service
                 for e in s["endpoints"] if e["ready"])
    if ips != last:
        print(json.dumps({"t": time.time(), "ips": ips}), flush=True)
        last = ips
    time.sleep(0.01)
"""


class EndpointWatch:
    """Polls an agent's /status every 10 ms from inside its node: when its endpoints changed.

    Times are wall-clock (`time.time()`), comparable across namespaces."""

    def __init__(self, plane: ServicePlane, node: str, service: str) -> None:
        self.proc = plane.lab.popen(node, [sys.executable, "-u", "-c", WATCH_STATUS, service],
                                    stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready"
        self.changes: list[tuple[float, list[str]]] = []
        self._lines: queue.Queue[str] = queue.Queue()
        # A thread reads: select() on a buffered pipe misses lines already in the buffer.
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def wait(self, ips: list[str], timeout: float = 30) -> float:
        """The wall-clock time the agent started using exactly `ips`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = json.loads(self._lines.get(timeout=0.5))
            except queue.Empty:
                continue
            self.changes.append((line["t"], line["ips"]))
            if line["ips"] == sorted(ips):
                return float(line["t"])
        raise AssertionError(f"agent never used {sorted(ips)}; changes seen: {self.changes}")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


FETCH_MANY = r"""
import collections, json, socket, sys
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
bind = sys.argv[4] if len(sys.argv) > 4 else None
counts, failures = collections.Counter(), []
for i in range(count):
    try:
        s = socket.create_connection((host, port), timeout=5,
                                     source_address=(bind, 0) if bind else None)
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        body = data.split(b"\r\n\r\n", 1)[1].decode()
        counts[body.split()[0].removeprefix("pod=")] += 1
    except OSError as exc:
        failures.append(f"{i}: {exc}")
print(json.dumps({"counts": counts, "failures": failures}))
"""


def fetch_many(plane: ServicePlane, pod: str, host: str, count: int, port: int = 80,
               bind: str | None = None) -> tuple[dict[str, int], list[str]]:
    """`count` HTTP calls from `pod` to host:port, one connection each: backends hit, failures.

    `host` is resolved by the pod's resolver (getaddrinfo through its resolv.conf)."""
    args = [host, str(port), str(count)] + ([bind] if bind else [])
    out = json.loads(plane.python(pod, FETCH_MANY, *args).stdout)
    return dict(out["counts"]), list(out["failures"])
