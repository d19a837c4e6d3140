"""resolv.conf: reading the host's upstream resolvers and writing a pod's file like kubelet.

    upstreams = default_upstreams(config)        # nameservers, minus our own listen address
    text = pod_resolv_conf("shop", "cluster.local", "169.254.96.16", host_search=("lan",))

The file format is resolv.conf(5): `nameserver`, `search` (or the older `domain`), `options`;
`#` and `;` start comments.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from meshd.dns.config import DNS_PORT, DnsConfig

MAX_SEARCH_DOMAINS = 32  # kubelet's limit (glibc ≥ 2.26 takes any number; older took 6)
MAX_SEARCH_CHARS = 2048  # kubelet's limit on the whole search line


@dataclass(frozen=True)
class ResolvConf:
    """What a resolv.conf says."""

    nameservers: tuple[str, ...]
    """Nameserver IPs, in order (invalid entries left out)."""
    search: tuple[str, ...]
    """Search domains (the last `search` or `domain` line wins, as in glibc)."""
    options: tuple[str, ...]
    """Options, e.g. `ndots:5`."""


def parse_resolv_conf(text: str) -> ResolvConf:
    """Parse resolv.conf(5) text; lines that make no sense are skipped, as the resolver does."""
    nameservers: list[str] = []
    search: tuple[str, ...] = ()
    options: list[str] = []
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].split(";", 1)[0].strip()
        words = line.split()
        if len(words) < 2:
            continue
        keyword, args = words[0], words[1:]
        if keyword == "nameserver":
            try:
                nameservers.append(str(ipaddress.ip_address(args[0].split("%", 1)[0])))
            except ValueError:
                continue
        elif keyword in ("search", "domain"):
            search = tuple(args) if keyword == "search" else (args[0],)
        elif keyword == "options":
            options.extend(args)
    return ResolvConf(tuple(nameservers), search, tuple(options))


def upstreams_from(resolv: ResolvConf, listen: tuple[str, int]) -> tuple[tuple[str, int], ...]:
    """The nameservers as (IP, 53), without ourselves: the listen address, and any loopback
    address when we listen on a wildcard address at port 53 (we would forward to ourselves)."""
    host, port = listen
    ours = ipaddress.ip_address(host)
    out = []
    for server in resolv.nameservers:
        ip = ipaddress.ip_address(server)
        if port == DNS_PORT and (ip == ours or (ours.is_unspecified and ip.is_loopback)):
            continue
        out.append((server, DNS_PORT))
    return tuple(out)


def default_upstreams(config: DnsConfig) -> tuple[tuple[str, int], ...]:
    """`config.upstreams`, or else the nameservers of `config.resolv_conf` (read now; a missing
    or unreadable file gives none: cluster names still work, others get SERVFAIL)."""
    if config.upstreams:
        return config.upstream_addresses()
    try:
        text = config.resolv_conf.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ()
    return upstreams_from(parse_resolv_conf(text), (config.address, config.port))


def pod_search_domains(
    namespace: str, domain: str, host_search: Sequence[str] = ()
) -> tuple[str, ...]:
    """The search list kubelet gives a pod with `dnsPolicy: ClusterFirst`:
    `<ns>.svc.<domain> svc.<domain> <domain>`, then the host's search domains, without
    duplicates, cut to kubelet's limits (32 domains, 2048 characters)."""
    domains: list[str] = []
    for entry in (f"{namespace}.svc.{domain}", f"svc.{domain}", domain, *host_search):
        entry = entry.rstrip(".")
        if entry and entry not in domains:
            domains.append(entry)
    out: list[str] = []
    length = 0
    for entry in domains[:MAX_SEARCH_DOMAINS]:
        length += len(entry) + (1 if out else 0)
        if length > MAX_SEARCH_CHARS:
            break
        out.append(entry)
    return tuple(out)


def pod_resolv_conf(
    namespace: str,
    domain: str,
    nameserver: str,
    *,
    host_search: Sequence[str] = (),
    options: Sequence[str] = ("ndots:5",),
) -> str:
    """A pod's /etc/resolv.conf pointing at the agent's DNS, as kubelet writes it."""
    lines = [f"search {' '.join(pod_search_domains(namespace, domain, host_search))}",
             f"nameserver {nameserver}"]
    if options:
        lines.append(f"options {' '.join(options)}")
    return "\n".join(lines) + "\n"
