"""The tunnel lab: a cloud site on a public "internet" segment (cloudcore, `meshd server --relay
--control`, the lab kubelet, an upstream resolver) and edge sites behind NAT routers of given
kinds (firewall on), each with nodes running `meshd agent` with the tunnel enabled.

Test scaffolding for issue 5's acceptance, never product code.

    sites = {"a": {"nat": "port-restricted", "nodes": ["n1"]}, ...}
    with MeshLab.up(tmp_path, sites) as lab:
        lab.peer(node, other)        # the agent's /status row for `other`
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from netlab import Lab, Topology
from netlab.serviceplane import ServicePlane, wait_for

INTERNET = "198.51.100.0/24"
CONNECT_PORT = 40003


def mesh_topology(name: str, sites: Mapping[str, Mapping[str, Any]],
                  pods: int) -> dict[str, Any]:
    """`cloud` on the internet segment; one router per site (WAN on the internet), its LAN
    holding the site's nodes; node k's pods are 10.244.k.0/24 (masqueraded out, like Docker)."""
    segments: dict[str, Any] = {"inet": {"subnet": INTERNET}}
    routers: dict[str, Any] = {}
    hosts: dict[str, Any] = {"cloud": {"segment": "inet"}}
    k = 0
    for i, (site, spec) in enumerate(sites.items(), start=1):
        segments[site] = {"subnet": f"10.10.{i}.0/24"}
        routers[f"r{site}"] = {"wan": "inet", "lan": [site], "nat": spec["nat"],
                               "firewall": True, "hairpin": bool(spec.get("hairpin"))}
        for node in spec["nodes"]:
            k += 1
            hosts[node] = {"segment": site, "pods": pods, "podSubnet": f"10.244.{k}.0/24"}
    return {"name": name, "segments": segments, "routers": routers, "hosts": hosts}


class MeshLab(ServicePlane):
    """`ServicePlane` whose nodes sit behind NAT routers and reach each other through
    `meshd server` and the tunnel."""

    def __init__(self, lab: Lab, tmp: Path, node_labels: Mapping[str, Mapping[str, str]],
                 clients: int = 2) -> None:
        super().__init__(lab, tmp, node_labels, clients)
        self.meshd_server: subprocess.Popen[str] | None = None
        self.routers: dict[str, str] = {}
        self.server_overrides: dict[str, dict[str, Any]] = {}
        """Merged into `meshd server`'s config, per section (e.g. {"control": {...}})."""
        self.agent_overrides: dict[str, dict[str, Any]] = {}
        """Per node, merged into that agent's `tunnel:` section."""

    @classmethod
    @contextlib.contextmanager
    def up_sites(cls, tmp: Path, sites: Mapping[str, Mapping[str, Any]], *, pods: int = 3,
                 clients: int = 2, name: str = "mesh") -> Iterator[MeshLab]:
        lab = Lab(Topology.from_dict(mesh_topology(name, sites, pods)))
        lab.build()
        nodes = {n: {"kubernetes.io/hostname": n} for spec in sites.values()
                 for n in spec["nodes"]}
        plane = cls(lab, tmp, nodes, clients)
        plane.routers = {n: f"r{site}" for site, spec in sites.items() for n in spec["nodes"]}
        try:
            plane.start()
            yield plane
        finally:
            plane.close()

    def start(self, *, agents: bool = True) -> None:
        # Nodes route through their site routers (netlab sets the default routes).
        self.start_upstream_dns()
        self.start_api()
        for node in self.nodes:
            minted = subprocess.run(
                [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data), "certs",
                 "node", node, "--out", str(self.tmp / node), "--server", self.api_url],
                capture_output=True, text=True, timeout=30)
            assert minted.returncode == 0, minted.stderr
            for slot in self.lab.pods(node):
                from meshd.dns.resolvconf import pod_resolv_conf
                self.write_etc(slot, "resolv.conf",
                               pod_resolv_conf("default", "cluster.local", "169.254.96.16"))
        self.start_meshd_server()
        self.start_kubelet()
        if agents:
            for node in self.nodes:
                self.start_agent(node)
            for node in self.nodes:
                self.wait_agent(node, timeout=60)

    def close(self) -> None:
        try:
            super().close()  # agents first, then the lab (which stops meshd server too)
        finally:
            if self.meshd_server is not None and self.meshd_server.poll() is None:
                self.meshd_server.kill()

    def start_meshd_server(self) -> None:
        certs = self.tmp / "meshd-server"
        minted = subprocess.run(
            [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data), "certs",
             "meshd-server", "--out", str(certs), "--address", self.cloud_ip],
            capture_output=True, text=True, timeout=30)
        assert minted.returncode == 0, minted.stderr
        secret = self.tmp / "turn-secret"
        secret.write_text("lab-turn-secret\n")
        config = self.tmp / "meshd-server.json"
        doc: dict[str, dict[str, Any]] = {
            "stun": {"addresses": [self.cloud_ip]},
            "relay": {"enabled": True, "authSecretFile": str(secret)},
            "control": {"enabled": True, "address": f"{self.cloud_ip}:20004",
                        "dataDir": str(self.tmp / "meshd-server-data"),
                        "caFile": str(certs / "ca.crt"),
                        "certFile": str(certs / "meshd-server.crt"),
                        "keyFile": str(certs / "meshd-server.key")}}
        for section, values in self.server_overrides.items():
            doc.setdefault(section, {}).update(values)
        config.write_text(json.dumps(doc))
        log = open(self.tmp / "meshd-server.log", "a")  # noqa: SIM115 - the process owns it
        self.meshd_server = self.lab.popen("cloud", [
            sys.executable, "-m", "meshd", "server", "--config", str(config)],
            stdout=log, stderr=log, text=True)
        log.close()

        def listening() -> bool:
            assert self.meshd_server is not None
            if self.meshd_server.poll() is not None:
                raise AssertionError("meshd server exited: "
                                     + (self.tmp / "meshd-server.log").read_text()[-3000:])
            return "control.listen" in (self.tmp / "meshd-server.log").read_text()

        wait_for(listening, "meshd server listening", timeout=30)

    def restart_meshd_server(self) -> float:
        """Stop `meshd server` (SIGTERM) and start it again on the same registry; the
        monotonic time it listens again."""
        assert self.meshd_server is not None
        self.meshd_server.terminate()
        self.meshd_server.wait(timeout=20)
        log = self.tmp / "meshd-server.log"
        log.write_text("")  # `listening` waits for a fresh control.listen line
        self.start_meshd_server()
        return time.monotonic()

    def agent_config(self, node: str) -> Path:
        path = self.tmp / f"meshd-{node}.json"
        path.write_text(json.dumps({
            "dns": {"upstreams": [self.cloud_ip]},
            "tunnel": {"enabled": True, "server": self.cloud_ip,
                       "connectPort": CONNECT_PORT, **self.agent_overrides.get(node, {})}}))
        return path

    def tunnel(self, node: str) -> dict[str, Any]:
        status = self.status(node, check=False) or {}
        tunnel: dict[str, Any] = status.get("tunnel") or {}
        return tunnel

    def peer(self, node: str, other: str) -> dict[str, Any] | None:
        for row in self.tunnel(node).get("peers", []):
            if row["node"] == other:
                return dict(row)
        return None

    def wait_path(self, node: str, other: str, path: str, timeout: float = 30) -> float:
        """Wait until `node` sends to `other` on `path`; seconds it took."""
        start = time.monotonic()
        wait_for(lambda: (self.peer(node, other) or {}).get("path") == path,
                 f"{node} -> {other} on {path} (now {self.peer(node, other)})",
                 timeout=timeout, step=0.1)
        return time.monotonic() - start

    def metrics(self, node: str) -> dict[str, float]:
        """The agent's /metrics as {"name{labels}": value}."""
        proc = self.lab.run(node, ["curl", "-sS", "http://127.0.0.1:40002/metrics"])
        out: dict[str, float] = {}
        for line in proc.stdout.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out
