"""TURN (RFC 8656): ChannelData framing, REST credentials, the relay server core and its asyncio
service, and the client core the tunnel uses for relayed candidates."""
