"""meshd's cluster DNS: answers for Services from the catalog, forwards everything else.

- `meshd.dns.wire`: the DNS wire format (parse/encode, pure functions).
- `meshd.dns.zone`: the names a catalog defines (Kubernetes DNS specification).
- `meshd.dns.cache`: the TTL-respecting cache of upstream answers.
- `meshd.dns.core`: `DnsCore`, the sans-I/O server (queries, upstream answers, timers in).
- `meshd.dns.server`: `DnsServer`, its asyncio UDP/TCP adapter.
- `meshd.dns.config`: `DnsConfig` (`dns:` in meshd.yaml); `meshd.dns.resolvconf`: upstreams from
  /etc/resolv.conf and pods' resolv.conf.

Reference: docs/reference/meshd-dns.md.
"""
