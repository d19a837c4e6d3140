"""Pure rule generation: catalog → our chains, and `iptables-save` text → a restore plan.

Our chains and where they hook in (each jump is rule 1 of its built-in chain):

    table   built-in chain  → our chain               what it holds
    nat     PREROUTING      → EDGEWEAVE-PREROUTING    -j EDGEWEAVE-SERVICES
    nat     OUTPUT          → EDGEWEAVE-OUTPUT        -j EDGEWEAVE-SERVICES
    nat     (from the two)    EDGEWEAVE-SERVICES      TCP ClusterIP:port -j REDIRECT --to-ports P
    mangle  PREROUTING      → EDGEWEAVE-PREROUTING    UDP ClusterIP:port -j TPROXY --on-port P
    mangle  OUTPUT          → EDGEWEAVE-OUTPUT        UDP ClusterIP:port -j MARK (reroute to lo)
    filter  FORWARD, OUTPUT → EDGEWEAVE-NO-ENDPOINTS  ClusterIP:port without endpoints -j REJECT

`plan_sync` compares what `iptables-save -t TABLE` shows with what we want and returns one
`iptables-restore --noflush` document that flushes and refills our chains (a `:CHAIN - [0:0]`
line flushes an existing chain) and moves every jump to one of our chains to position 1 of its
built-in chain, exactly once — or nothing when the tables already match.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import shlex
from collections.abc import Iterable, Mapping, Sequence
from typing import Literal

from meshd.catalog import Catalog, Service, ServicePort

TABLES = ("nat", "mangle", "filter")
PREFIX = "EDGEWEAVE-"
JUMP_COMMENT = "edgeweave service portals"

OUR_CHAINS: dict[str, tuple[str, ...]] = {
    "nat": ("EDGEWEAVE-PREROUTING", "EDGEWEAVE-OUTPUT", "EDGEWEAVE-SERVICES"),
    "mangle": ("EDGEWEAVE-PREROUTING", "EDGEWEAVE-OUTPUT"),
    "filter": ("EDGEWEAVE-NO-ENDPOINTS",),
}
"""Every chain we own, per table (always all of them, empty when unused)."""

JUMPS: dict[str, tuple[tuple[str, str], ...]] = {
    "nat": (("PREROUTING", "EDGEWEAVE-PREROUTING"), ("OUTPUT", "EDGEWEAVE-OUTPUT")),
    "mangle": (("PREROUTING", "EDGEWEAVE-PREROUTING"), ("OUTPUT", "EDGEWEAVE-OUTPUT")),
    "filter": (("FORWARD", "EDGEWEAVE-NO-ENDPOINTS"), ("OUTPUT", "EDGEWEAVE-NO-ENDPOINTS")),
}
"""(built-in chain, our chain): the jumps we keep at position 1."""


@dataclasses.dataclass(frozen=True)
class RulesConfig:
    """`proxy.rules:` — how traffic is steered into the proxy."""

    backend: Literal["auto", "nft", "legacy"] = "auto"
    """`auto` (the variant that already holds rules, else what `iptables` is), `nft` or
    `legacy`."""
    tproxy_mark: int = 0x1000
    """fwmark bit(s) set on UDP packets for the proxy (kube-proxy uses 0x4000 and 0x8000,
    Istio 0x539, Cilium 0x0F00, Weave 0x20000/0x40000: 0x1000 collides with none)."""
    tproxy_mask: int = 0x1000
    """Mask of `tproxyMark` (only these bits are set and matched)."""
    route_table: int = 40001
    """Policy routing table holding `local 0.0.0.0/0 dev lo` for marked packets."""
    rule_priority: int = 9000
    """Priority of the `ip rule fwmark ... lookup routeTable` (before main at 32766)."""
    reject_without_endpoints: bool = True
    """ClusterIP ports with no ready endpoint are rejected in the filter table (the client
    sees connection refused at once) instead of being steered into the proxy."""
    resync_s: float = 30.0
    """Seconds between re-checks of the rules (someone else's -I may have moved ours)."""

    def __post_init__(self) -> None:
        if self.backend not in ("auto", "nft", "legacy"):
            raise ValueError(f"backend: expected auto, nft or legacy, got {self.backend!r}")
        if not 0 < self.tproxy_mark <= 0xFFFFFFFF or self.tproxy_mark & ~self.tproxy_mask:
            raise ValueError("tproxyMark: expected a non-zero mark inside tproxyMask")
        if not 0 < self.tproxy_mask <= 0xFFFFFFFF:
            raise ValueError("tproxyMask: expected a non-zero 32-bit mask")
        if not 0 < self.route_table < 2**32 or self.route_table in (253, 254, 255):
            raise ValueError(f"routeTable: {self.route_table} is reserved or out of range")
        if not 0 < self.rule_priority < 32766:
            raise ValueError(f"rulePriority: expected 1..32765, got {self.rule_priority}")
        if self.resync_s <= 0:
            raise ValueError("resyncS: expected a positive number")

    @property
    def mark(self) -> str:
        """`0x1000/0x1000` as iptables prints it."""
        return f"{self.tproxy_mark:#x}/{self.tproxy_mask:#x}"


Spec = tuple[str, ...]
"""One rule as argument tokens after `-A CHAIN` (shlex-split, quotes removed)."""


@dataclasses.dataclass(frozen=True)
class Ruleset:
    """What our chains should hold."""

    chains: Mapping[str, Mapping[str, tuple[Spec, ...]]]
    """table → our chain → its rules, in order."""
    proxy_port: int
    """The port the rules send traffic to."""


def jump_spec(chain: str) -> Spec:
    """The rule in a built-in chain that jumps to our `chain`."""
    return ("-m", "comment", "--comment", JUMP_COMMENT, "-j", chain)


def _comment(service: Service, port: ServicePort) -> str:
    return f"{service.key}:{port.name}" if port.name else service.key


def has_backends(service: Service, port: ServicePort) -> bool:
    """Whether some ready endpoint serves `port` (else the port is rejected)."""
    return any(e.port_for(port) is not None for e in service.ready_endpoints())


def _ipv4(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).version == 4
    except ValueError:
        return False


def build_ruleset(catalog: Catalog, proxy_port: int, config: RulesConfig) -> Ruleset:
    """Our chains' contents for `catalog` (IPv4 ClusterIPs; TCP and UDP ports)."""
    redirect: list[Spec] = []
    tproxy: list[Spec] = []
    mark: list[Spec] = []
    reject: list[Spec] = []
    seen: set[tuple[str, int, str]] = set()
    for key in sorted(catalog.services):
        service = catalog.services[key]
        if not service.proxied or service.headless or service.external_name is not None:
            continue
        for port in service.ports:
            if port.protocol not in ("TCP", "UDP"):
                continue
            proto = port.protocol.lower()
            comment = _comment(service, port)
            for ip in service.cluster_ips:
                if not _ipv4(ip) or (ip, port.port, proto) in seen:
                    continue
                seen.add((ip, port.port, proto))
                match = ("-d", f"{ip}/32", "-p", proto, "-m", proto, "--dport", str(port.port))
                if not has_backends(service, port):
                    if config.reject_without_endpoints:
                        reject.append((*match, "-m", "comment", "--comment",
                                       f"{comment} has no endpoints", "-j", "REJECT",
                                       "--reject-with", "icmp-port-unreachable"))
                    continue
                tagged = (*match, "-m", "comment", "--comment", comment)
                if proto == "tcp":
                    redirect.append((*tagged, "-j", "REDIRECT", "--to-ports", str(proxy_port)))
                else:
                    tproxy.append((*tagged, "-j", "TPROXY", "--on-port", str(proxy_port),
                                   "--on-ip", "0.0.0.0", "--tproxy-mark", config.mark))
                    mark.append((*tagged, "-j", "MARK", "--set-xmark", config.mark))
    to_services: Spec = ("-j", "EDGEWEAVE-SERVICES")
    chains = {
        "nat": {"EDGEWEAVE-PREROUTING": (to_services,), "EDGEWEAVE-OUTPUT": (to_services,),
                "EDGEWEAVE-SERVICES": tuple(redirect)},
        "mangle": {"EDGEWEAVE-PREROUTING": tuple(tproxy), "EDGEWEAVE-OUTPUT": tuple(mark)},
        "filter": {"EDGEWEAVE-NO-ENDPOINTS": tuple(reject)},
    }
    return Ruleset(chains, proxy_port)


# -- iptables-save parsing ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SavedTable:
    """One table as `iptables-save -t TABLE` prints it."""

    chains: tuple[str, ...]
    """Every chain declared, built-in and user-defined, in order."""
    rules: Mapping[str, tuple[Spec, ...]]
    """chain → its rules, in order (chains without rules are absent)."""
    present: bool = True
    """Whether the table exists at all (iptables-nft prints nothing for a table nft lacks)."""
    policies: Mapping[str, str] = dataclasses.field(default_factory=dict)
    """Built-in chain → policy."""

    def rules_of(self, chain: str) -> tuple[Spec, ...]:
        """The rules of `chain` (empty if none or no such chain)."""
        return self.rules.get(chain, ())


class SaveParseError(ValueError):
    """`iptables-save` output we cannot read (names the line)."""


def parse_save(text: str, table: str) -> SavedTable:
    """Parse the `table` section of `iptables-save` output (other tables are ignored)."""
    chains: list[str] = []
    rules: dict[str, list[Spec]] = {}
    policies: dict[str, str] = {}
    present = False
    current: str | None = None
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            current = line[1:]
            present = present or current == table
            continue
        if current != table:
            continue
        if line.startswith(":"):
            name, policy = [*line[1:].split(), "-"][:2]
            chains.append(name)
            if policy != "-":
                policies[name] = policy
        elif line.startswith("-A "):
            try:
                tokens = shlex.split(line)
            except ValueError as exc:
                raise SaveParseError(f"line {number}: {exc}: {line!r}") from None
            if len(tokens) < 2:
                raise SaveParseError(f"line {number}: rule without chain: {line!r}")
            rules.setdefault(tokens[1], []).append(tuple(tokens[2:]))
        elif line == "COMMIT":
            current = None
        else:
            raise SaveParseError(f"line {number}: unexpected {line!r}")
    return SavedTable(tuple(chains), {c: tuple(r) for c, r in rules.items()}, present, policies)


def is_empty(saved: SavedTable) -> bool:
    """A table with no rule, no user chain, and only ACCEPT policies: it does nothing."""
    return (not any(saved.rules.values())
            and all(c in saved.policies for c in saved.chains)
            and all(p == "ACCEPT" for p in saved.policies.values()))


def _target(spec: Spec) -> str | None:
    for i, token in enumerate(spec[:-1]):
        if token in ("-j", "--jump", "-g", "--goto"):
            return spec[i + 1]
    return None


def foreign_jumps(saved: SavedTable, table: str, chain: str) -> list[Spec]:
    """Rules of the built-in `chain` that lead into one of our chains."""
    ours = set(OUR_CHAINS[table])
    return [spec for spec in saved.rules_of(chain) if _target(spec) in ours]


def quote(token: str) -> str:
    """One token as iptables-restore reads it (double quotes, as iptables-save writes)."""
    if token and all(c.isalnum() or c in "-_./:=,!+%@" for c in token):
        return token
    return '"' + token.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render(spec: Iterable[str]) -> str:
    """Tokens → one restore line's arguments."""
    return " ".join(quote(t) for t in spec)


def table_in_sync(desired: Ruleset, saved: SavedTable, table: str) -> bool:
    """Whether `table` already holds exactly our chains and jumps (a table we never needed
    and never touched, e.g. mangle without UDP Services, is in sync as it is)."""
    untouched = not any(c in saved.chains for c in OUR_CHAINS[table]) and not any(
        foreign_jumps(saved, table, builtin) for builtin, _ in JUMPS[table])
    if untouched and not any(desired.chains[table].values()):
        return True
    for chain, specs in desired.chains[table].items():
        if chain not in saved.chains or saved.rules_of(chain) != specs:
            return False
    for builtin, ours in JUMPS[table]:
        rules = saved.rules_of(builtin)
        if foreign_jumps(saved, table, builtin) != [jump_spec(ours)] or not rules \
                or rules[0] != jump_spec(ours):
            return False
    return True


def plan_sync(desired: Ruleset, saved: Mapping[str, SavedTable]) -> str | None:
    """The restore document that makes `saved` hold `desired`; None when already so."""
    sections: list[str] = []
    for table in TABLES:
        current = saved[table]
        if table_in_sync(desired, current, table):
            continue
        lines = [f"*{table}"]
        lines += [f":{chain} - [0:0]" for chain in OUR_CHAINS[table]]
        for chain, specs in desired.chains[table].items():
            lines += [f"-A {chain} {render(spec)}" for spec in specs]
        for builtin, ours in JUMPS[table]:
            rules = current.rules_of(builtin)
            jumps = foreign_jumps(current, table, builtin)
            if jumps == [jump_spec(ours)] and rules and rules[0] == jump_spec(ours):
                continue
            lines += [f"-D {builtin} {render(spec)}" for spec in jumps]
            lines.append(f"-I {builtin} 1 {render(jump_spec(ours))}")
        lines.append("COMMIT")
        sections.append("\n".join(lines) + "\n")
    return "".join(sections) or None


def plan_remove(saved: Mapping[str, SavedTable]) -> str | None:
    """The restore document that removes our jumps and chains; None when none are there."""
    sections: list[str] = []
    for table in TABLES:
        current = saved[table]
        lines = [f"*{table}"]
        for builtin, _ in JUMPS[table]:
            lines += [f"-D {builtin} {render(spec)}"
                      for spec in foreign_jumps(current, table, builtin)]
        present = [c for c in OUR_CHAINS[table] if c in current.chains]
        present += [c for c in current.chains
                    if c.startswith(PREFIX) and c not in OUR_CHAINS[table]]
        lines += [f"-F {chain}" for chain in present]
        lines += [f"-X {chain}" for chain in present]
        if len(lines) > 1:
            sections.append("\n".join([*lines, "COMMIT"]) + "\n")
    return "".join(sections) or None


# -- policy routing -------------------------------------------------------------------------


def fwmark_rules(rules_json: Sequence[Mapping[str, object]], config: RulesConfig) -> int:
    """How many `ip -j rule show` entries are our fwmark rule."""
    mark = f"{config.tproxy_mark:#x}"
    mask = f"{config.tproxy_mask:#x}"
    count = 0
    for rule in rules_json:
        rule_mask = rule.get("fwmask", "0xffffffff")
        if (rule.get("fwmark") == mark and rule_mask == mask
                and str(rule.get("table")) == str(config.route_table)
                and rule.get("priority") == config.rule_priority):
            count += 1
    return count


def has_local_route(routes_json: Sequence[Mapping[str, object]], config: RulesConfig) -> bool:
    """Whether `ip -j -4 route show table all type local dev lo` holds our default route."""
    return any(r.get("dst") == "default" and str(r.get("table")) == str(config.route_table)
               for r in routes_json)


def fwmark_rule_args(config: RulesConfig) -> tuple[str, ...]:
    """The selector and action of our `ip rule` (after `ip rule add|del`)."""
    return ("fwmark", config.mark, "lookup", str(config.route_table),
            "priority", str(config.rule_priority))


def local_route_args(config: RulesConfig) -> tuple[str, ...]:
    """Our route (after `ip route replace|del`)."""
    return ("local", "0.0.0.0/0", "dev", "lo", "table", str(config.route_table))
