"""The relay's native data path (meshd/turn/_relaypath.c); see meshd.turn.service.

Routes come from the Python core (`TurnServer.learned`): reads that match one exactly -- the
socket they arrive on, their source and channel, before `expires` -- are relayed in C; the first
read that does not is handed back, and the drain stops there.
"""

_Address = tuple[str, int] | tuple[str, int, int, int]

class RelayPath:
    def __init__(self) -> None: ...
    def learn(self, in_fd: int, source: _Address, channel: int | None, out_fd: int,
              destination: _Address, out_channel: int | None, expires: float) -> None:
        """Add or replace the route of (in_fd, source, channel). channel None: a peer's
        datagrams on a relayed socket, wrapped as ChannelData of `out_channel`; out_channel
        None: ChannelData payloads to `destination` bare; both: the header rewritten to
        `out_channel`. ValueError/TypeError name the argument at fault (not a UDP socket, not
        an address of its family, a channel outside 0x4000..0x7FFF)."""
    def forget(self) -> None:
        """Drop every route."""
    def drain(self, fd: int, listening: bool, now: float, limit: int
              ) -> list[tuple[bytes, int, _Address]]:
        """Read `fd` until it runs dry or `limit` reads; relay the reads routes cover; return
        the first one they do not, as [(data, segment, source)] (segment 0: one datagram), or
        []. `listening`: the reads are a client's (ChannelData), not a peer's."""
    def stats(self) -> dict[str, int]:
        """Counters since creation: reads, datagrams_read, relayed_reads, coalesced_reads,
        handed, expired, datagrams_out, bytes_out, datagrams_in, bytes_in, relayed_locally,
        batches, batched_datagrams, gso_sends, datagrams_sent, gso_refused, send_errors."""
    @property
    def routes(self) -> int: ...
    @property
    def gso(self) -> bool: ...
