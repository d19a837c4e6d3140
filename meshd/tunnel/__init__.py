"""Mesh tunnels: path selection, crypto sessions, wire format.

Path selection (ICE-style, sans-I/O): `candidates` (gathering, priorities, signaling encoding),
`punch` (`PathMachine`, one per peer).

The packet tunnel's crypto (sans-I/O; docs/reference/meshd-tunnel.md):
`wire` (datagram layouts and the handshake payload, pure codecs), `noise`
(Noise_IK_25519_ChaChaPoly_BLAKE2s), `identity` (static keys bound to node certificates,
`PeerVerifier`, `CAPeerVerifier`), `replay` (the anti-replay window), `session`
(`TunnelSession`, one per peer: handshakes, rekeys, batched encrypt/decrypt), `endpoint`
(`TunnelEndpoint`: a node's sessions behind one demultiplexer), `throughput`
(`python -m meshd.tunnel.throughput`).
"""
