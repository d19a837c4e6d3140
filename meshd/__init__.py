"""meshd: the EdgeMesh-style traffic plane — STUN service, NAT discovery, and (later) tunnels."""
