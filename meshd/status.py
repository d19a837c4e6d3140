"""What `meshd status` shows and what Prometheus scrapes, served by the agent on loopback.

`GET /status` is a JSON document (services, their endpoints and policies, whether the iptables
rules are in place), `GET /metrics` the Prometheus text of every counter (DNS, proxy, catalog
builds, rules in place). `meshd status` fetches `/status` and prints it as a table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from meshd.catalog import Catalog

DEFAULT_STATUS_ADDRESS = "127.0.0.1:40002"


def status_document(catalog: Catalog, rules_in_place: bool) -> dict[str, Any]:
    """The `/status` document for `catalog`."""
    services = []
    for key in sorted(catalog.services):
        svc = catalog.services[key]
        services.append({
            "service": key,
            "clusterIPs": list(svc.cluster_ips),
            "ports": [f"{p.port}/{p.protocol}" + (f" ({p.name})" if p.name else "")
                      for p in svc.ports],
            "policy": ("none (headless)" if svc.headless else
                       "ClientIP affinity" if svc.session_affinity_timeout_s else svc.lb_policy),
            "nodegroupClosed": svc.nodegroup_closed,
            "proxied": svc.proxied,
            "endpoints": [{"ip": e.ip, "node": e.node, "ready": e.ready} for e in svc.endpoints],
        })
    return {"node": catalog.node, "nodegroup": catalog.nodegroup, "revision": catalog.revision,
            "rulesInPlace": rules_in_place, "services": services}


def render_status(doc: dict[str, Any]) -> str:
    """`meshd status` as text: a header line, then one row per Service."""
    head = (f"node {doc['node']} (node group {doc['nodegroup'] or '-'}), catalog revision "
            f"{doc['revision'] or '-'}, iptables rules "
            f"{'in place' if doc['rulesInPlace'] else 'NOT in place'}")
    rows = [("SERVICE", "CLUSTER-IP", "PORTS", "POLICY", "ENDPOINTS (ready/all)")]
    for svc in doc["services"]:
        ready = [e for e in svc["endpoints"] if e["ready"]]
        policy = svc["policy"] + (", node-group closed" if svc["nodegroupClosed"] else "") + (
            "" if svc["proxied"] else ", not proxied")
        rows.append((svc["service"], ",".join(svc["clusterIPs"]) or "None",
                     ",".join(svc["ports"]), policy,
                     f"{len(ready)}/{len(svc['endpoints'])} "
                     + " ".join(f"{e['ip']}@{e['node'] or '?'}" for e in ready)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    tunnel = doc.get("tunnel")
    if isinstance(tunnel, dict):
        lines += ["", *render_peers(tunnel)]
    return "\n".join([head, *lines])


def render_peers(tunnel: dict[str, Any]) -> list[str]:
    """The tunnel part of `meshd status`: a header line and one row per peer."""
    head = (f"tunnel {tunnel.get('interface') or '(down)'} {tunnel.get('overlay') or '-'}, "
            f"socket {tunnel.get('local')}, relay {tunnel.get('relayed') or '-'}, "
            f"control {tunnel.get('control')}, NAT {_nat_text(tunnel)}")
    rows = [("PEER", "OVERLAY", "NAT", "PATH", "ENDPOINT", "RTT", "BYTES IN/OUT",
             "LAST HANDSHAKE")]
    for p in tunnel.get("peers", []):
        rtt = "-" if p.get("rttMs") is None else f"{p['rttMs']:.1f} ms"
        last = p.get("lastHandshake")
        ago = "-" if last is None else f"{max(0.0, time.time() - last):.0f} s ago"
        path = p["path"] + (" (guessed)" if p.get("guessed") else "") + (
            "" if p.get("online", True) else " (offline)")
        rows.append((p["node"], p["overlay"], p.get("nat") or "unknown", path,
                     p.get("endpoint") or "-", rtt,
                     f"{p['bytesIn']}/{p['bytesOut']}", ago))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    if tunnel.get("control") != "ready" and tunnel.get("controlError"):
        table.append(f"control channel: {tunnel['controlError']}")  # e.g. revoked
    if tunnel.get("fastPathError"):
        table.append(f"fast path stopped: {tunnel['fastPathError']} (Python carries the data)")
    fast = tunnel.get("fastPath")
    if isinstance(fast, dict):  # the native thread (docs/reference/meshd-tunnel.md)
        sending = fast.get("sending") or []
        table.append(f"fast path: {len(sending)} direct peer(s) natively"
                     f"{' (' + ', '.join(sending) + ')' if sending else ''}, packets "
                     f"{fast.get('fast_tx', 0)} out / {fast.get('fast_rx', 0)} in, "
                     f"{fast.get('handed_tun', 0) + fast.get('handed_udp', 0)} reads to Python")
    return [head, *table]


def _nat_text(tunnel: dict[str, Any]) -> str:
    """`port-restricted (endpoint-independent mapping, address-and-port-dependent filtering)`;
    `port-restricted (stored; ...)` while the class is the server's record of an earlier run
    (our probe has not reported yet); `not classified yet` before anything is known, `unknown
    (natProbe off)` when the agent does not probe and the server stored nothing."""
    nat = tunnel.get("nat")
    if not isinstance(nat, dict) or not nat.get("natType"):
        return "unknown (natProbe off)" if tunnel.get("natProbe") is False else (
            "not classified yet")
    notes = ["stored"] if tunnel.get("natSource") == "stored" else []
    known = [f"{nat[k]} {k}" for k in ("mapping", "filtering") if nat.get(k)]
    notes += [", ".join(known)] if known else []
    return str(nat["natType"]) + (f" ({'; '.join(notes)})" if notes else "")


def prometheus_samples(samples: Sequence[tuple[str, dict[str, str], float]]) -> str:
    """(name, labels, value) samples in the Prometheus text format."""
    out = []
    for name, labels, value in samples:
        label_text = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        out.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
    return "\n".join(out) + "\n"


def status_app(status: Callable[[], Awaitable[dict[str, Any]]],
               metrics: Callable[[], Awaitable[str]]) -> web.Application:
    """The agent's loopback HTTP endpoints."""
    async def get_status(_: web.Request) -> web.Response:
        return web.Response(text=json.dumps(await status()), content_type="application/json")

    async def get_metrics(_: web.Request) -> web.Response:
        return web.Response(text=await metrics(),
                            headers={"Content-Type": "text/plain; version=0.0.4"})

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/status", get_status)
    app.router.add_get("/metrics", get_metrics)
    app.router.add_get("/healthz", healthz)
    return app
