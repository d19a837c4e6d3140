"""NAT behaviour discovery (RFC 5780 §4): a sans-I/O machine, its classification, an adapter."""
