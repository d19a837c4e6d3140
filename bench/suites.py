"""The registry of benchmark suites (one module each)."""

from __future__ import annotations

from bench import dns, kubeapi, proxy, tunnel
from bench.harness import Suite

SUITES: dict[str, Suite] = {
    "kubeapi": Suite("kubeapi", "embedded Kubernetes API vs etcd: writes, lists, watch fan-out",
                     kubeapi.run),
    "dns": Suite("dns", "meshd cluster DNS vs dnsmasq: dnsperf queries/s and per-query latency",
                 dns.run),
    "proxy": Suite("proxy", "meshd proxy vs haproxy and socat (and no proxy): iperf3 "
                   "throughput, sockperf TCP round trips", proxy.run),
    "tunnel": Suite("tunnel", "meshd tunnel (direct across NATs, relayed, routed) vs the plain "
                    "path and wireguard-go: iperf3, sockperf round trips, 4 MB transfers",
                    tunnel.run, tunnel.add_options),
}
