"""The control channel between agents and `meshd server` (TLS, node certificates).

`wire` (framing and messages, pure codecs), `registry` (stable overlay addresses and last static
keys, persisted), `server` (`ControlServer`, sans-I/O), `client` (`ControlClient`, sans-I/O,
reconnecting), `memory` (both joined in memory on a virtual clock), `service` (the asyncio TLS
listener, the agent's connector, the revocation list's watcher), `revoked` (the revocation
list's parser and file). TURN credentials are minted with `meshd.turn.credentials`.
Reference: docs/reference/meshd.md, "Control channel".
"""
