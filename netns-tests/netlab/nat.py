"""NAT router behaviours in RFC 4787 terms, as one nftables ruleset per router.

| kind              | mapping (RFC 4787 §4.1)        | filtering (§5)                  |
|-------------------|--------------------------------|---------------------------------|
| `full-cone`       | endpoint-independent           | endpoint-independent            |
| `restricted`      | endpoint-independent           | address-dependent               |
| `port-restricted` | endpoint-independent           | address-and-port-dependent      |
| `symmetric`       | address-and-port-dependent     | address-and-port-dependent      |
| `none`            | plain routing, no translation  | none                            |

How each is made on Linux (measured in this lab, see docs/lab.md):
- `masquerade` keeps the source port when it is free, which gives EIM with port preservation,
  and conntrack only lets replies of a known 5-tuple back in: APDF.
- `masquerade fully-random` draws a new port per conntrack entry, i.e. per remote endpoint: APDM.
- Full cone and restricted cone add a dynamic map `mapping` (mapped port -> inside address and
  port), filled from translated outbound UDP, and DNAT unsolicited inbound UDP through it:
  for anyone (EIF) or only for remote addresses the mapping has sent to (ADF, set `contacted`).
- Hairpinning (§6) DNATs LAN packets addressed to the WAN address through the same map and
  SNATs them to the WAN address, so the receiver sees the sender's public mapping.
- The firewall drops unsolicited WAN input as real routers do; without it a peer's early punch
  packet creates a conntrack entry that collides with our own outbound one and Linux picks a
  new port, breaking EIM (../shared/design.md §6).
"""

from __future__ import annotations

import ipaddress

from netlab.topology import NatKind


def nat_ruleset(
    kind: NatKind,
    *,
    wan_if: str,
    lan_ifs: list[str],
    wan_ip: ipaddress.IPv4Address,
    lan_subnets: list[ipaddress.IPv4Network],
    hairpin: bool,
    udp_timeout: int,
    firewall: bool,
) -> str:
    """The `nft -f` script for one router (atomic: the table is replaced whole)."""
    lans = "{ " + ", ".join(f'"{name}"' for name in lan_ifs) + " }"
    nets = "{ " + ", ".join(str(n) for n in lan_subnets) + " }"
    lines = [
        "table ip ewlab",
        "delete table ip ewlab",
        "table ip ewlab {",
    ]
    tracked = kind in ("full-cone", "restricted") or (hairpin and kind != "none")
    if tracked:
        lines += [
            "  map mapping {",
            "    type inet_service : ipv4_addr . inet_service",
            f"    flags dynamic,timeout; timeout {udp_timeout}s",
            "  }",
        ]
    if kind == "restricted":
        lines += [
            "  set contacted {",
            "    type ipv4_addr . inet_service",
            f"    flags dynamic,timeout; timeout {udp_timeout}s",
            "  }",
        ]
    # Inbound translation, before routing.
    lines += ["  chain pre {", "    type nat hook prerouting priority dstnat; policy accept;"]
    if hairpin and kind != "none":
        lines.append(
            f"    iifname {lans} ip daddr {wan_ip}"
            " dnat ip to udp dport map @mapping"
        )
    if kind == "full-cone":
        lines.append(f'    iifname "{wan_if}" ip daddr {wan_ip} dnat ip to udp dport map @mapping')
    elif kind == "restricted":
        lines.append(
            f'    iifname "{wan_if}" ip daddr {wan_ip} ip saddr . udp dport @contacted'
            " dnat ip to udp dport map @mapping"
        )
    lines.append("  }")
    # Outbound translation.
    lines += ["  chain post {", "    type nat hook postrouting priority srcnat; policy accept;"]
    if kind != "none":
        random = " fully-random" if kind == "symmetric" else ""
        lines.append(f'    oifname "{wan_if}" ip saddr {nets} masquerade{random}')
    if hairpin and kind != "none":
        lines.append(
            f"    oifname {lans} ip saddr {nets} ct original ip daddr {wan_ip}"
            f" snat ip to {wan_ip}"
        )
    lines.append("  }")
    # Learn mappings once translated (priority after srcnat sees the translated header).
    if tracked:
        lines += [
            "  chain learn {",
            "    type filter hook postrouting priority srcnat + 10; policy accept;",
            f'    oifname "{wan_if}" ct original ip saddr {nets} meta l4proto udp'
            f" update @mapping {{ udp sport timeout {udp_timeout}s"
            " : ct original ip saddr . ct original proto-src }",
        ]
        if kind == "restricted":
            lines.append(
                f'    oifname "{wan_if}" ct original ip saddr {nets} meta l4proto udp'
                f" update @contacted {{ ip daddr . udp sport timeout {udp_timeout}s }}"
            )
        lines.append("  }")
    if firewall and kind != "none":
        lines += [
            "  chain input {",
            "    type filter hook input priority filter; policy accept;",
            f'    iifname "{wan_if}" ct state established,related accept',
            f'    iifname "{wan_if}" drop',
            "  }",
            "  chain forward {",
            "    type filter hook forward priority filter; policy accept;",
            f'    iifname "{wan_if}" ct state established,related accept',
            f'    iifname "{wan_if}" ct status dnat accept',
            f'    iifname "{wan_if}" drop',
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def conntrack_sysctls(udp_timeout: int) -> dict[str, str]:
    """Per-namespace conntrack timeouts: the NAT's UDP mapping lifetime."""
    return {
        "net.netfilter.nf_conntrack_udp_timeout": str(udp_timeout),
        "net.netfilter.nf_conntrack_udp_timeout_stream": str(udp_timeout),
    }


# What RFC 5780 discovery must observe behind each kind: (mapping, filtering, NAT type).
EXPECTED: dict[NatKind, tuple[str, str, str]] = {
    "none": ("endpoint-independent", "endpoint-independent", "public"),
    "full-cone": ("endpoint-independent", "endpoint-independent", "full-cone"),
    "restricted": ("endpoint-independent", "address-dependent", "restricted"),
    "port-restricted": ("endpoint-independent", "address-and-port-dependent", "port-restricted"),
    "symmetric": ("address-and-port-dependent", "address-and-port-dependent", "symmetric"),
}
