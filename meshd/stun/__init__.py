"""STUN (RFC 5389) with RFC 5780 NAT discovery: codec, server core, asyncio service."""
