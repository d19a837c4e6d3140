"""The tunnel lab: a cloud site on a public "internet" segment (cloudcore, `meshd server --relay
--control`, the lab kubelet, an upstream resolver) and edge sites behind NAT routers of given
kinds (firewall on), each with nodes running `meshd agent` with the tunnel enabled.

Test scaffolding for issue 5's acceptance, never product code.

    sites = {"a": {"nat": "port-restricted", "nodes": ["n1"]},
             "cgn": {"nat": "port-restricted", "hairpin": True, "nodes": []},
             "home": {"nat": "port-restricted", "behind": "cgn", "nodes": ["n2"]}, ...}
    with MeshLab.up_sites(tmp_path, sites) as lab:
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
RELAY_METRICS = "127.0.0.1:9101"
"""`relay.metricsAddress` of the lab's `meshd server`: loopback of the `cloud` namespace."""

def mesh_topology(name: str, sites: Mapping[str, Mapping[str, Any]],
                  pods: int) -> dict[str, Any]:
    """`cloud` on the internet segment; one router per site, its LAN holding the site's nodes;
    node k's pods are 10.244.k.0/24 (masqueraded out, like Docker).

    Site options: `nat` (a `netlab.nat` kind; `none` is a plain routed, public site),
    `nodes` (may be empty: a pure outer router), `hairpin`, `behind: SITE`, which puts the
    router's WAN on that site's LAN instead of the internet (double NAT, carrier-grade NAT),
    and `link` (a `netlab` link spec, e.g. {"rateMbit": 100, "delayMs": 5}: the router's WAN
    attachment shaped like an edge uplink)."""
    segments: dict[str, Any] = {"inet": {"subnet": INTERNET}}
    routers: dict[str, Any] = {}
    hosts: dict[str, Any] = {"cloud": {"segment": "inet"}}
    k = 0
    for i, (site, spec) in enumerate(sites.items(), start=1):
        outer = spec.get("behind")
        if outer is not None and (outer not in sites or outer == site):
            raise ValueError(f"sites.{site}.behind: {outer!r} is not another site")
        segments[site] = {"subnet": f"10.10.{i}.0/24"}
        routers[f"r{site}"] = {"wan": outer or "inet", "lan": [site], "nat": spec["nat"],
                               "firewall": True, "hairpin": bool(spec.get("hairpin"))}
        if spec.get("link"):
            routers[f"r{site}"]["link"] = dict(spec["link"])
        for node in spec.get("nodes", []):
            k += 1
            hosts[node] = {"segment": site, "pods": pods, "podSubnet": f"10.244.{k}.0/24"}
    return {"name": name, "segments": segments, "routers": routers, "hosts": hosts}


def site_chain(sites: Mapping[str, Mapping[str, Any]], site: str) -> list[str]:
    """`site` and the sites it sits behind, innermost first."""
    chain = [site]
    while (outer := sites[chain[-1]].get("behind")) is not None:
        if outer in chain:
            raise ValueError(f"sites.{site}.behind: loop through {outer!r}")
        chain.append(outer)
    return chain


class MeshLab(ServicePlane):
    """`ServicePlane` whose nodes sit behind NAT routers and reach each other through
    `meshd server` and the tunnel."""

    def __init__(self, lab: Lab, tmp: Path, node_labels: Mapping[str, Mapping[str, str]],
                 clients: int = 2) -> None:
        super().__init__(lab, tmp, node_labels, clients)
        self.meshd_server: subprocess.Popen[str] | None = None
        self.routers: dict[str, str] = {}
        """Node -> the router of its site (the inner one behind double NAT)."""
        self.sites: dict[str, dict[str, Any]] = {}
        """The site specs `up_sites` built."""
        self.stagger = False
        """Start agents one at a time, each once the previous one serves (nodes joining a
        running mesh), instead of all at once."""
        self.server_overrides: dict[str, dict[str, Any]] = {}
        """Merged into `meshd server`'s config, per section (e.g. {"control": {...}})."""
        self.agent_overrides: dict[str, dict[str, Any]] = {}
        """Per node, merged into that agent's `tunnel:` section."""

    @classmethod
    @contextlib.contextmanager
    def up_sites(cls, tmp: Path, sites: Mapping[str, Mapping[str, Any]], *, pods: int = 3,
                 clients: int = 2, name: str = "mesh",
                 stagger: bool = False) -> Iterator[MeshLab]:
        lab = Lab(Topology.from_dict(mesh_topology(name, sites, pods)))
        lab.build()
        nodes = {n: {"kubernetes.io/hostname": n} for spec in sites.values()
                 for n in spec.get("nodes", [])}
        plane = cls(lab, tmp, nodes, clients)
        plane.sites = {site: dict(spec) for site, spec in sites.items()}
        plane.stagger = stagger
        plane.routers = {n: f"r{site}" for site, spec in sites.items()
                         for n in spec.get("nodes", [])}
        try:
            plane.start()
            yield plane
        finally:
            plane.close()

    def start(self, *, agents: bool = True) -> None:
        # Nodes route through their site routers (netlab sets the default routes).
        self.start_upstream_dns()
        self.start_api()
        minting = {node: subprocess.Popen(  # at once: one interpreter start each
            [sys.executable, "-m", "cloudcore", "--data-dir", str(self.data), "certs",
             "node", node, "--out", str(self.tmp / node), "--server", self.api_url],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in self.nodes}
        failed = {node: proc.communicate(timeout=60)[1] for node, proc in minting.items()}
        failed = {node: err for node, err in failed.items() if minting[node].returncode != 0}
        assert not failed, f"minting node certificates failed: {failed}"
        for node in self.nodes:
            for slot in self.lab.pods(node):
                from meshd.dns.resolvconf import pod_resolv_conf
                self.write_etc(slot, "resolv.conf",
                               pod_resolv_conf("default", "cluster.local", "169.254.96.16"))
        self.start_meshd_server()
        self.start_kubelet()
        if agents and self.stagger:
            for node in self.nodes:  # each joins a mesh whose other agents are up
                self.start_agent(node)
                self.wait_agent(node, timeout=60)
        elif agents:
            for node in self.nodes:
                self.start_agent(node)
            for node in self.nodes:
                self.wait_agent(node, timeout=60)

    def status(self, node: str, check: bool = True) -> dict[str, Any] | None:
        """The agent's /status document (what `meshd status --json` prints), fetched with
        curl: an interpreter start per poll is slow with many agents on a small machine."""
        proc = self.lab.run(node, ["curl", "-sS", "--max-time", "5",
                                   "http://127.0.0.1:40002/status"], check=check)
        if proc.returncode != 0:
            return None
        doc: dict[str, Any] = json.loads(proc.stdout)
        return doc

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
            "relay": {"enabled": True, "authSecretFile": str(secret),
                      "metricsAddress": RELAY_METRICS},
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

    def public_address(self, node: str) -> str:
        """The address the internet sees `node`'s traffic from: the WAN address of the
        outermost NAT router on its way out, else its own address (a public site)."""
        site = next(s for s, spec in self.sites.items() if node in spec.get("nodes", []))
        nats = [s for s in site_chain(self.sites, site) if self.sites[s]["nat"] != "none"]
        if not nats:
            return self.lab.addr(node)
        outermost = nats[-1]
        return self.lab.addr_on(f"r{outermost}",
                                self.sites[outermost].get("behind") or "inet")

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
        return self._metrics(node, "127.0.0.1:40002")

    def relay_metrics(self) -> dict[str, float]:
        """`meshd server`'s relay /metrics (on loopback in `cloud`), as `metrics`."""
        return self._metrics("cloud", RELAY_METRICS)

    def _metrics(self, node: str, address: str) -> dict[str, float]:
        proc = self.lab.run(node, ["curl", "-sS", f"http://{address}/metrics"])
        out: dict[str, float] = {}
        for line in proc.stdout.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out
