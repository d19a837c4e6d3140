"""The transparent proxy on :40001 (TCP via REDIRECT, UDP via TPROXY); see
docs/reference/meshd-proxy.md.

`Proxy(config, catalog, dialer=...)` → `await proxy.start()`, `proxy.set_catalog(...)`,
`await proxy.stop()`; `Dialer` is the seam for reaching backends on other nodes.
"""

from meshd.proxy.config import ProxyConfig, UdpConfig
from meshd.proxy.dial import Dialer, DirectDialer
from meshd.proxy.metrics import ProxyMetrics, ServiceCounters
from meshd.proxy.server import Proxy

__all__ = ["Dialer", "DirectDialer", "Proxy", "ProxyConfig", "ProxyMetrics", "ServiceCounters",
           "UdpConfig"]
