"""All tunnel sessions of one node, behind one demultiplexer. Sans-I/O.

Datagrams from every peer arrive on the same socket (direct paths and the relay alike). Data and
handshake responses carry a receiver index that this node chose, so one table lookup finds the
session. An initiation carries no index of ours: the endpoint decrypts it with the node's static
key, verifies the initiator's certificate, and hands it to the session for that node, creating
the session when the node is new (`accept_unknown_peers`). The responder thereby learns who the
initiator is from the handshake alone.

    datagram --type--> 0xE3 data / 0xE4 fragment / 0xE2 response --receiver index-->
                                                                          session.receive_batch
                       0xE1 initiation --decrypt + verify--> node --> session.accept_initiation
                       anything else --> Rejected(malformed)

Consecutive datagrams for one session are handed over as one batch. A coalesced read (UDP GRO)
that is exactly the fragments of one 0xE4 message goes to its session whole (`receive_read`),
without being split into datagrams first.
"""

from __future__ import annotations

import random
import struct
from collections.abc import Iterable, Sequence

from meshd.tunnel.identity import LocalIdentity, Peer, PeerVerifier
from meshd.tunnel.session import (
    Event,
    HandshakeRefused,
    IndexTable,
    Rejected,
    RejectReason,
    TunnelConfig,
    TunnelSession,
    open_initiation,
)
from meshd.tunnel.wire import TYPE_DATA, TYPE_FRAGMENT, TYPE_INITIATION, TYPE_RESPONSE
from meshd.udp import split_read

_INDEX = struct.Struct("!I")
_RECEIVER_OFFSET = {TYPE_DATA: 1, TYPE_FRAGMENT: 1, TYPE_RESPONSE: 5}


class TunnelEndpoint:
    """This node's sessions, keyed by peer node name."""

    def __init__(
        self,
        local: LocalIdentity,
        verifier: PeerVerifier,
        *,
        config: TunnelConfig | None = None,
        rng: random.Random | None = None,
        wall_offset: float = 0.0,
        accept_unknown_peers: bool = True,
    ) -> None:
        self.local = local
        self.config = config or TunnelConfig()
        self.accept_unknown_peers = accept_unknown_peers
        """Create a session for a verified initiator we had no session for."""
        self._verifier = verifier
        self._rng = rng if rng is not None else random.Random()
        self._wall_offset = wall_offset
        self._indexes = IndexTable(self._rng)
        self._sessions: dict[str, TunnelSession] = {}
        self._frames_out = False
        self.rejected: dict[RejectReason, int] = {}
        """Datagrams dropped before any session could be told, per reason."""
        self.output_pending = False
        """A `receive_*` or `encrypt*` call left some session with datagrams for
        `datagrams_to_send` (a handshake message, a keepalive, packets that waited for keys);
        cleared by `datagrams_to_send`. O(1), unlike `has_output`: the adapter asks after every
        wake-up."""

    # -- peers -----------------------------------------------------------------------------------

    def add_peer(self, peer: Peer) -> TunnelSession:
        """The session for `peer` (created if new; a changed static key is taken over)."""
        session = self._sessions.get(peer.node)
        if session is None:
            session = TunnelSession(
                self.local, peer, self._verifier, config=self.config, rng=self._rng,
                wall_offset=self._wall_offset, indexes=self._indexes,
            )
            session.frames_out = self._frames_out
            self._sessions[peer.node] = session
        else:
            session.update_peer(peer)
        return session

    def remove_peer(self, node: str) -> None:
        """Forget a node's session and keys."""
        session = self._sessions.pop(node, None)
        if session is not None:
            session.close()

    def session(self, node: str) -> TunnelSession | None:
        return self._sessions.get(node)

    @property
    def sessions(self) -> dict[str, TunnelSession]:
        """Sessions by peer node name (read-only use)."""
        return self._sessions

    @property
    def frames_out(self) -> bool:
        """Sessions deliver offload frames (virtio_net_hdr + packet) instead of plain packets:
        set when the TUN device runs with IFF_VNET_HDR."""
        return self._frames_out

    @frames_out.setter
    def frames_out(self, value: bool) -> None:
        self._frames_out = value
        for session in self._sessions.values():
            session.frames_out = value

    # -- the sans-I/O surface --------------------------------------------------------------------

    def encrypt(self, node: str, packets: Sequence[bytes], now: float) -> list[bytes]:
        """Transport datagrams for packets to `node` (which must have been added)."""
        session = self._sessions[node]
        return self._sealed(session, session.encrypt(packets, now))

    def encrypt_frames(self, node: str, frames: Sequence[bytes], now: float) -> list[bytes]:
        """Transport datagrams for offload frames to `node` (`TunnelSession.encrypt_frames`)."""
        session = self._sessions[node]
        return self._sealed(session, session.encrypt_frames(frames, now))

    def _sealed(self, session: TunnelSession, datagrams: list[bytes]) -> list[bytes]:
        if session.has_output:  # a handshake or rekey started: the adapter must flush
            self.output_pending = True
        return datagrams

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        return self.receive_batch((datagram,), now)

    def receive_batch(self, datagrams: Iterable[bytes], now: float) -> list[Event]:
        """Route datagrams to their sessions; events of all sessions, in order."""
        return self._route(datagrams, now, None)

    def receive_into(self, datagrams: Iterable[bytes], now: float,
                     packets: list[bytes]) -> list[Event]:
        """`receive_batch` for the data path: decrypted packets of every session are appended
        to `packets` in arrival order instead of coming as `DecryptedPackets` events, so a
        batch of data costs no event objects; the rest (handshakes, drops) are returned."""
        return self._route(datagrams, now, packets)

    def receive_one_into(self, datagram: bytes, now: float,
                         packets: list[bytes]) -> list[Event]:
        """`receive_into` for one datagram, trying `TunnelSession.receive_one` first (a lone
        data datagram is the common case of interactive traffic)."""
        if len(datagram) > 5 and TYPE_DATA <= datagram[0] <= TYPE_FRAGMENT:
            session = self._indexes.owner(_INDEX.unpack_from(datagram, 1)[0])
            if session is not None and session.receive_one(datagram, now, packets):
                if session.has_output:  # a rekey started on receive
                    self.output_pending = True
                return []
        return self._route((datagram,), now, packets)

    def _route(self, datagrams: Iterable[bytes], now: float,
               packets: list[bytes] | None) -> list[Event]:
        events: list[Event] = []
        run: list[bytes] = []
        run_session: TunnelSession | None = None
        owner = self._indexes.owner
        unpack = _INDEX.unpack_from
        for datagram in datagrams:
            kind = datagram[0] if datagram else -1
            offset = _RECEIVER_OFFSET.get(kind)
            if offset is not None and len(datagram) >= offset + 4:
                session = owner(unpack(datagram, offset)[0])
                if session is None:
                    self._drop(events, RejectReason.UNKNOWN_INDEX, "")
                    continue
                if session is not run_session and run:
                    assert run_session is not None
                    self._run(run_session, run, now, events, packets)
                    run = []
                run_session = session
                run.append(datagram)
                continue
            if run:
                assert run_session is not None
                self._run(run_session, run, now, events, packets)
                run, run_session = [], None
            if kind == TYPE_INITIATION:
                events.extend(self._initiation(datagram, now))
                self.output_pending = True  # its answer waits in a session's outbox
            else:
                self._drop(events, RejectReason.MALFORMED, "not a tunnel message")
        if run:
            assert run_session is not None
            self._run(run_session, run, now, events, packets)
        return _merge_rejections(events)

    def _run(self, session: TunnelSession, run: list[bytes], now: float, events: list[Event],
             packets: list[bytes] | None) -> None:
        events += (session.receive_batch(run, now) if packets is None
                   else session.receive_into(run, now, packets))
        if session.has_output:
            self.output_pending = True

    def receive_read(self, data: bytes, segment: int, now: float) -> list[Event]:
        """One coalesced read (UDP GRO: datagrams of `segment` bytes back to back, the last
        may be shorter; `segment` 0: one datagram). A read that is one whole 0xE4 message goes
        to its session at once (`TunnelSession.receive_message`); anything else is split and
        handled datagram by datagram, with the same outcome."""
        return self._read(data, segment, now, None)

    def receive_read_into(self, data: bytes, segment: int, now: float,
                          packets: list[bytes]) -> list[Event]:
        """`receive_read` with decrypted packets appended to `packets` (`receive_into`)."""
        return self._read(data, segment, now, packets)

    def _read(self, data: bytes, segment: int, now: float,
              packets: list[bytes] | None) -> list[Event]:
        if segment and len(data) > 5 and data[0] == TYPE_FRAGMENT:
            session = self._indexes.owner(_INDEX.unpack_from(data, 1)[0])
            if session is not None:
                events = session.receive_message(data, segment, now, packets)
                if events is not None:
                    if session.has_output:
                        self.output_pending = True
                    return _merge_rejections(events)
        return self._route(split_read(data, segment) if segment else (data,), now, packets)

    def _initiation(self, datagram: bytes, now: float) -> list[Event]:
        try:
            opened = open_initiation(
                self.local, self._verifier, datagram, now + self._wall_offset
            )
        except HandshakeRefused as exc:
            events: list[Event] = []
            self._drop(events, exc.reason, exc.detail)
            return events
        session = self._sessions.get(opened.node)
        if session is None:
            if not self.accept_unknown_peers:
                events = []
                self._drop(events, RejectReason.WRONG_PEER, f"unknown node {opened.node}")
                return events
            session = self.add_peer(Peer(opened.node, opened.static_public))
        return session.accept_initiation(opened, now)

    def _drop(self, events: list[Event], reason: RejectReason, detail: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1
        events.append(Rejected(None, reason, 1, detail))

    def datagrams_to_send(self, now: float) -> list[tuple[str, bytes]]:
        """(peer node, datagram) pairs that every session wants sent; the caller picks the path
        to that node."""
        self.output_pending = False
        out: list[tuple[str, bytes]] = []
        for node, session in self._sessions.items():
            out.extend((node, d) for d in session.datagrams_to_send(now))
        return out

    def has_output(self) -> bool:
        """Some session has datagrams for `datagrams_to_send`."""
        return any(session.has_output for session in self._sessions.values())

    def get_timer(self) -> float | None:
        timers = [t for s in self._sessions.values() if (t := s.get_timer()) is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> list[Event]:
        events: list[Event] = []
        for session in list(self._sessions.values()):
            timer = session.get_timer()
            if timer is not None and now >= timer:
                events.extend(session.handle_timer(now))
        return events


def _merge_rejections(events: list[Event]) -> list[Event]:
    """One Rejected event per (peer, reason) for the whole batch, in first-seen place."""
    if len(events) < 2 or sum(isinstance(e, Rejected) for e in events) < 2:
        return events
    merged: list[Event] = []
    seen: dict[tuple[str | None, RejectReason], int] = {}
    for e in events:
        if not isinstance(e, Rejected):
            merged.append(e)
            continue
        key = (e.peer, e.reason)
        if key not in seen:
            seen[key] = len(merged)
            merged.append(e)
            continue
        first = merged[seen[key]]
        assert isinstance(first, Rejected)
        merged[seen[key]] = Rejected(e.peer, e.reason, first.count + e.count, e.detail)
    return merged
