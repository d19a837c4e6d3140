"""The DNS server core (sans-I/O): queries in, answers and upstream queries out, time as `now`.

    core = DnsCore(config, upstreams=[("10.0.0.2", 53)], catalog=catalog)
    reply = core.handle_query(datagram, now, client=("10.1.0.5", 41000), tcp=False)
    if isinstance(reply, bytes): send(reply)          # answered at once (cluster name, cache)
    for action in core.pop_actions(): ...             # UpstreamQuery / ClientReply
    core.receive_upstream(response, source, now)      # an upstream's answer
    core.handle_timer(now) at core.get_timer()        # upstream timeouts → next upstream

Inputs are datagrams/TCP messages from clients, messages from upstream resolvers, the clock,
and `set_catalog` (the whole catalog, swapped atomically). Nothing the peers send makes it
raise: malformed queries are dropped (`Outcome.DROPPED`, counted, logged at most once per
`malformedLogIntervalS`), bad upstream messages are ignored and counted.

Decisions, in order, for one query:
1. Not parseable, or a response (QR = 1): dropped. Opcode other than QUERY: NOTIMP. EDNS
   version above 0: BADVERS (RFC 6891 §6.1.3).
2. Names in the cluster domain, and reverse names of addresses we know, are answered from the
   `Zone` (authoritative, AA set). The encoded answer is kept (keyed by lower-case name, type,
   class and EDNS flavour) until the next catalog, so a repeated question costs a dict lookup
   and a few byte copies: the client's id, RD/CD bits and question bytes (its letter case) are
   spliced into the stored message. The final reply is kept too, keyed by the query's bytes
   after its id and the transport: the same question again is answered without parsing.
3. Everything else is forwarded: from the answer cache when it holds the question, else one
   upstream query per distinct question (identical questions in flight wait for the same
   answer). Upstreams are tried from the one that last answered, each for
   `upstreamTimeoutS`, at most `forwardAttempts` times in all; SERVFAIL/REFUSED/NOTIMP/FORMERR
   or a failed TCP connection move on at once; a truncated UDP answer is asked again over TCP
   of the same upstream. When every attempt failed the clients get SERVFAIL.
4. A UDP answer larger than the client takes (512 bytes, or its EDNS size capped at
   `ednsUdpSize`) is replaced by an empty one with TC set; the client asks again over TCP.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from heapq import heappop, heappush
from typing import Generic, TypeVar

from edgeweave.log import event
from meshd.catalog import Catalog
from meshd.dns import wire
from meshd.dns.cache import AnswerCache
from meshd.dns.config import DnsConfig
from meshd.dns.wire import DnsWireError, Edns, Query, RawRecord, Record
from meshd.dns.zone import Zone

log = logging.getLogger("meshd.dns")

ClientT = TypeVar("ClientT")
Address = tuple[str, int]

MAX_WAITERS = 256
"""Clients waiting for one forwarded question at most; later ones are dropped (they retry)."""
_FAIL_RCODES = frozenset({wire.SERVFAIL, wire.REFUSED, wire.NOTIMP, wire.FORMERR})


class Outcome(enum.Enum):
    """What `handle_query` did when it has no answer to send right now."""

    PENDING = "pending"
    """Forwarded: the answer comes later as a `ClientReply` from `pop_actions`."""
    DROPPED = "dropped"
    """Malformed or unanswerable: nothing will be sent (over TCP: close the connection)."""


@dataclass(frozen=True, slots=True)
class UpstreamQuery:
    """Send `data` to an upstream resolver."""

    ref: int
    """The query's id; pass it to `upstream_failed` if a TCP exchange fails."""
    upstream: Address
    """Where to."""
    data: bytes
    """The query message (unframed)."""
    tcp: bool
    """Over TCP (one framed query and response on a new connection) instead of UDP."""


@dataclass(frozen=True, slots=True)
class ClientReply(Generic[ClientT]):
    """Send `data` to a client whose query was forwarded."""

    client: ClientT
    """The client token given to `handle_query`."""
    data: bytes
    """The response message (unframed)."""


Action = UpstreamQuery | ClientReply[ClientT]


@dataclass
class DnsStats:
    """Counters for metrics (see docs/reference/meshd-dns.md for the exported names)."""

    queries: dict[str, int] = field(default_factory=dict)
    """Queries by type name (`A`, `AAAA`, ..., `other`)."""
    responses: dict[str, int] = field(default_factory=dict)
    """Responses sent by rcode name."""
    forwarded: int = 0
    """Questions sent upstream (not counting retries, nor clients that joined one in flight)."""
    coalesced: int = 0
    """Queries that joined an identical question already in flight."""
    cache_hits: int = 0
    """Forwarded questions answered from the cache."""
    cache_misses: int = 0
    """Forwarded questions not in the cache."""
    upstream_queries: int = 0
    """Messages sent to upstreams (with retries and TCP repeats)."""
    upstream_timeouts: int = 0
    """Upstream attempts that got no answer in time."""
    upstream_errors: int = 0
    """Upstream attempts that failed otherwise (error rcode, TCP failure)."""
    upstream_invalid: int = 0
    """Messages from upstream that were malformed or matched nothing in flight."""
    servfail: int = 0
    """Forwarded questions given up (all attempts failed, too many in flight, no upstream)."""
    truncated: int = 0
    """UDP answers replaced by TC answers."""
    malformed: int = 0
    """Client messages dropped as malformed."""

    def samples(self) -> list[tuple[str, dict[str, str], int]]:
        """(metric name, labels, value) for a Prometheus exporter (all counters)."""
        out: list[tuple[str, dict[str, str], int]] = []
        for qtype, count in sorted(self.queries.items()):
            out.append(("meshd_dns_queries_total", {"qtype": qtype}, count))
        for rcode, count in sorted(self.responses.items()):
            out.append(("meshd_dns_responses_total", {"rcode": rcode}, count))
        for name in ("forwarded", "coalesced", "cache_hits", "cache_misses",
                     "upstream_queries", "upstream_timeouts", "upstream_errors",
                     "upstream_invalid", "servfail", "truncated", "malformed"):
            out.append((f"meshd_dns_{name}_total", {}, getattr(self, name)))
        return out


@dataclass(slots=True)
class _Waiter(Generic[ClientT]):
    client: ClientT
    id: int
    flags: int
    qname: bytes
    qtype: int
    qclass: int
    edns: Edns | None
    limit: int | None  # UDP size limit; None over TCP
    chain: tuple[Record, ...] | None  # ExternalName: the CNAME chain to put first


@dataclass(slots=True)
class _Pending(Generic[ClientT]):
    id: int
    key: tuple[bytes, int, int, int]
    query: bytes
    waiters: list[_Waiter[ClientT]]
    start: int
    attempts: int
    upstream: Address
    tcp: bool
    tried: set[Address]
    deadline: float


class DnsCore(Generic[ClientT]):
    """Cluster DNS and forwarding cache for one agent. `ClientT` is whatever the adapter uses
    to find a client again (an address, a connection); the core only hands it back."""

    def __init__(
        self,
        config: DnsConfig,
        *,
        upstreams: Sequence[Address] = (),
        catalog: Catalog | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.stats = DnsStats()
        """Counters (read by the metrics exporter)."""
        self.upstreams: tuple[Address, ...] = tuple(upstreams)
        """Upstream resolvers (see `set_upstreams`)."""
        self.cache = AnswerCache(config.cache_size, config.cache_max_ttl_s,
                                 config.cache_max_negative_ttl_s)
        """Forwarded answers."""
        self._rng = rng if rng is not None else random.SystemRandom()
        self._serial = 0
        self._zone = self._build_zone(catalog if catalog is not None else Catalog.empty(""),
                                      None)
        self._answers: dict[tuple[bytes, int, int, int], bytes] = {}
        self._hot: dict[tuple[bytes, bool], tuple[bytes, str, str, int]] = {}
        self._pending: dict[int, _Pending[ClientT]] = {}
        self._by_key: dict[tuple[bytes, int, int, int], _Pending[ClientT]] = {}
        self._timers: list[tuple[float, int]] = []
        self._actions: list[UpstreamQuery | ClientReply[ClientT]] = []
        self._preferred = 0
        self._malformed_logged_at = float("-inf")
        self._malformed_suppressed = 0

    # --- inputs ---------------------------------------------------------------------------

    def set_catalog(self, catalog: Catalog) -> None:
        """Serve `catalog` from now on (the whole zone is rebuilt and swapped at once)."""
        self._zone = self._build_zone(catalog, self._zone)
        self._answers = {}
        self._hot = {}

    def set_upstreams(self, upstreams: Sequence[Address]) -> None:
        """Forward to these resolvers from now on (questions in flight finish as they are)."""
        self.upstreams = tuple(upstreams)
        self._preferred = 0

    @property
    def zone(self) -> Zone:
        """The zone currently served."""
        return self._zone

    def handle_query(
        self, data: bytes, now: float, client: ClientT, *, tcp: bool
    ) -> bytes | Outcome:
        """One query message from `client` (a datagram, or one TCP message without its length
        prefix): the response to send now, or what happened instead."""
        if type(data) is not bytes:  # bytearray/memoryview: keys must be hashable bytes
            data = bytes(data)
        hot = self._hot.get((data[2:], tcp))
        if hot is not None:  # this exact question was answered from the zone: no parsing
            tail, qtype_name, rcode_name, truncated = hot
            stats = self.stats
            stats.queries[qtype_name] = stats.queries.get(qtype_name, 0) + 1
            stats.responses[rcode_name] = stats.responses.get(rcode_name, 0) + 1
            stats.truncated += truncated
            return data[:2] + tail
        if len(data) < wire.HEADER_LEN:
            return self._malformed(client, now, f"{len(data)} bytes: shorter than a header")
        high = data[2]  # QR, opcode, AA, TC, RD
        if high & 0x80:
            return self._malformed(client, now, "a response, not a query")
        if high & 0x78:  # an opcode other than QUERY
            flags = wire.QR | ((high & 0x79) << 8) | wire.NOTIMP
            return self._count(wire.header_only(int.from_bytes(data[:2], "big"), flags))
        try:
            query = wire.parse_query(data)
        except DnsWireError as exc:
            return self._malformed(client, now, str(exc))
        qtype = query.qtype
        name = wire.TYPE_NAMES.get(qtype, "other")
        self.stats.queries[name] = self.stats.queries.get(name, 0) + 1
        edns = query.edns
        limit = None if tcp else query.udp_limit(self.config.edns_udp_size)
        if edns is not None and edns.version > 0:
            reply = self._encode(query, wire.QR | wire.RA, wire.BADVERS)
            return self._count(reply, wire.BADVERS)
        flavour = 0 if edns is None else (2 if edns.do else 1)
        answer_key = (query.key, qtype, query.qclass, flavour)
        stored = self._answers.get(answer_key)
        if stored is None:
            zone = self._zone
            if not zone.is_authoritative(query.key, query.is_under(zone.domain_key)):
                return self._forward(query, query.qname, query.key, client, limit, None, now)
            answer = self._authoritative(query, answer_key, client, limit, now)
            if not isinstance(answer, tuple):
                return answer  # an ExternalName continued upstream: final reply or pending
            stored = answer[0]
        truncated = self.stats.truncated
        reply = self._count(self._fit(self._splice(stored, data, query), query, limit))
        if self.config.answer_cache_size > 0:
            # The reply depends only on the bytes after the id (flags, question, EDNS) and the
            # transport, so the next identical question is answered by prefixing its id.
            replies = self._hot
            if len(replies) >= self.config.answer_cache_size:
                del replies[next(iter(replies))]
            rcode_name = wire.rcode_name(reply[3] & wire.RCODE_MASK)
            replies[(data[2:], tcp)] = (reply[2:], name, rcode_name,
                                        self.stats.truncated - truncated)
        return reply

    def receive_upstream(self, data: bytes, source: Address, now: float, *,
                         tcp: bool = False) -> None:
        """A message from an upstream resolver (over TCP: without the length prefix)."""
        if type(data) is not bytes:
            data = bytes(data)
        try:
            response = wire.scan_response(data)
        except DnsWireError as exc:
            self.stats.upstream_invalid += 1
            event(log, logging.DEBUG, "dns.upstream.invalid", upstream=_fmt(source),
                  reason=str(exc))
            return
        pending = self._pending.get(response.header.id)
        if (pending is None or source not in pending.tried or response.key != pending.key[0]
                or response.qtype != pending.key[1] or response.qclass != pending.key[2]):
            self.stats.upstream_invalid += 1
            return
        if response.truncated and not tcp:
            if not pending.tcp:
                pending.tcp = True
                pending.upstream = source
                self._send(pending, now)
            return
        if response.rcode in _FAIL_RCODES:
            self.stats.upstream_errors += 1
            event(log, logging.DEBUG, "dns.upstream.error", upstream=_fmt(source),
                  rcode=wire.rcode_name(response.rcode))
            if source == pending.upstream:
                self._next_attempt(pending, now)
            return
        if source in self.upstreams:
            self._preferred = self.upstreams.index(source)
        self._finish(pending)
        self.cache.put(pending.key, wire.with_id(data, 0), response, now)
        for waiter in pending.waiters:
            self._reply(waiter, data)

    def upstream_failed(self, ref: int, upstream: Address, now: float) -> None:
        """The TCP exchange of `UpstreamQuery` `ref` with `upstream` failed (connect, reset,
        EOF, garbage)."""
        pending = self._pending.get(ref)
        if pending is not None and pending.upstream == upstream and pending.tcp:
            self.stats.upstream_errors += 1
            self._next_attempt(pending, now)

    def handle_timer(self, now: float) -> None:
        """Act on every deadline up to `now` (upstream attempts that timed out)."""
        timers = self._timers
        while timers and timers[0][0] <= now:
            deadline, ref = heappop(timers)
            pending = self._pending.get(ref)
            if pending is not None and pending.deadline == deadline:
                self.stats.upstream_timeouts += 1
                event(log, logging.DEBUG, "dns.upstream.timeout",
                      upstream=_fmt(pending.upstream), tcp=pending.tcp)
                self._next_attempt(pending, now)

    # --- outputs --------------------------------------------------------------------------

    def get_timer(self) -> float | None:
        """When `handle_timer` must run next (None: nothing in flight)."""
        timers = self._timers
        while timers:
            deadline, ref = timers[0]
            pending = self._pending.get(ref)
            if pending is not None and pending.deadline == deadline:
                return deadline
            heappop(timers)
        return None

    def pop_actions(self) -> list[UpstreamQuery | ClientReply[ClientT]]:
        """Messages to send, oldest first (call after every input)."""
        actions, self._actions = self._actions, []
        return actions

    @property
    def in_flight(self) -> int:
        """Forwarded questions waiting for an upstream."""
        return len(self._pending)

    # --- authoritative answers ------------------------------------------------------------

    def _build_zone(self, catalog: Catalog, previous: Zone | None) -> Zone:
        revision = catalog.revision
        self._serial = int(revision) if revision.isdigit() else self._serial + 1
        ns_address = self.config.address
        return Zone(catalog, self.config.domain, ttl=self.config.ttl_s,
                    negative_ttl=self.config.negative_ttl_s, serial=self._serial,
                    ns_address=ns_address, previous=previous)

    def _authoritative(
        self,
        query: Query,
        answer_key: tuple[bytes, int, int, int],
        client: ClientT,
        limit: int | None,
        now: float,
    ) -> tuple[bytes] | bytes | Outcome:
        """(stored-form answer,) for a zone name; for an ExternalName whose target is outside
        the zone, the continued question's final reply or outcome."""
        if query.qclass not in (wire.CLASS_IN, wire.ANY):
            encoded = self._encode(query, wire.QR | wire.RA, wire.REFUSED, template=True)
        else:
            answer = self._zone.lookup(query.key, query.qtype)
            if answer.chase is not None:
                target = wire.name_to_wire(answer.chase)
                return self._forward(query, target, target, client, limit, answer.answer, now)
            encoded = self._encode(query, wire.QR | wire.AA | wire.RA, answer.rcode,
                                   answer.answer, answer.authority, answer.additional,
                                   template=True)
        if self.config.answer_cache_size > 0:
            answers = self._answers
            if len(answers) >= self.config.answer_cache_size:
                del answers[next(iter(answers))]
            answers[answer_key] = encoded
        return (encoded,)

    def _encode(
        self,
        query: Query,
        flags: int,
        rcode: int,
        answer: Sequence[Record | RawRecord] = (),
        authority: Sequence[Record | RawRecord] = (),
        additional: Sequence[Record | RawRecord] = (),
        *,
        template: bool = False,
    ) -> bytes:
        """A response to `query`. With `template`, in stored form: id 0, no RD/CD, lower-case
        question (see `_splice`); else final."""
        if not template:
            flags |= query.flags & (wire.RD | wire.CD)
        edns = None
        if query.edns is not None:
            edns = Edns(self.config.edns_udp_size, 0, query.edns.do, rcode >> 4)
        try:
            return wire.encode_response(
                id=0 if template else query.id, flags=flags | (rcode & wire.RCODE_MASK),
                qname=query.key if template else query.qname, qtype=query.qtype,
                qclass=query.qclass, answer=answer, authority=authority,
                additional=additional, edns=edns)
        except ValueError:  # more than 64 KiB of records: say so rather than fail
            return wire.encode_response(
                id=0 if template else query.id,
                flags=flags | wire.SERVFAIL, qname=query.key if template else query.qname,
                qtype=query.qtype, qclass=query.qclass, edns=edns)

    @staticmethod
    def _splice(stored: bytes, data: bytes, query: Query) -> bytes:
        """A stored answer made the reply to this query: its id, RD and CD bits, and question
        name bytes (so the asker sees its own letter case, in owner names too, which are
        compression pointers to the question)."""
        end = wire.HEADER_LEN + len(query.qname)
        flags = bytes((stored[2] | (data[2] & 0x01), stored[3] | (data[3] & 0x10)))
        return data[:2] + flags + stored[4:12] + query.qname + stored[end:]

    def _fit(self, reply: bytes, query: Query, limit: int | None) -> bytes:
        """`reply`, or its truncated form (TC, no records) when larger than `limit`."""
        if limit is None or len(reply) <= limit:
            return reply
        self.stats.truncated += 1
        flags = int.from_bytes(reply[2:4], "big") | wire.TC
        edns = None
        if query.edns is not None:
            edns = Edns(self.config.edns_udp_size, 0, query.edns.do)
        return wire.encode_response(id=query.id, flags=flags, qname=query.qname,
                                    qtype=query.qtype, qclass=query.qclass, edns=edns)

    # --- forwarding -----------------------------------------------------------------------

    def _forward(
        self,
        query: Query,
        qname: bytes,
        key: bytes,
        client: ClientT,
        limit: int | None,
        chain: tuple[Record, ...] | None,
        now: float,
    ) -> bytes | Outcome:
        edns = query.edns
        flavour = ((query.flags & (wire.RD | wire.CD)) << 2) | (
            0 if edns is None else (2 if edns.do else 1))
        forward_key = (key, query.qtype, query.qclass, flavour)
        waiter = _Waiter(client, query.id, query.flags, query.qname, query.qtype, query.qclass,
                         edns, limit, chain)
        cached = self.cache.get(forward_key, now)
        if cached is not None:
            self.stats.cache_hits += 1
            return self._count(self._answer_waiter(waiter, cached))
        self.stats.cache_misses += 1
        pending = self._by_key.get(forward_key)
        if pending is not None:
            if len(pending.waiters) >= MAX_WAITERS:
                return Outcome.DROPPED
            self.stats.coalesced += 1
            pending.waiters.append(waiter)
            return Outcome.PENDING
        if not self.upstreams or len(self._pending) >= self.config.max_pending:
            self.stats.servfail += 1
            return self._count(self._servfail(waiter))
        ref = self._rng.randrange(0x10000)
        while ref in self._pending:
            ref = self._rng.randrange(0x10000)
        upstream_edns = None if edns is None else Edns(self.config.edns_udp_size, 0, edns.do)
        message = wire.encode_query(id=ref, flags=query.flags & (wire.RD | wire.CD),
                                    qname=qname, qtype=query.qtype, qclass=query.qclass,
                                    edns=upstream_edns)
        start = self._preferred % len(self.upstreams)
        pending = _Pending(ref, forward_key, message, [waiter], start, 0,
                           self.upstreams[start], False, set(), now)
        self._pending[ref] = pending
        self._by_key[forward_key] = pending
        self.stats.forwarded += 1
        self._send(pending, now)
        return Outcome.PENDING

    def _send(self, pending: _Pending[ClientT], now: float) -> None:
        pending.tried.add(pending.upstream)
        pending.deadline = now + self.config.upstream_timeout_s
        heappush(self._timers, (pending.deadline, pending.id))
        self.stats.upstream_queries += 1
        self._actions.append(UpstreamQuery(pending.id, pending.upstream, pending.query,
                                           pending.tcp))

    def _next_attempt(self, pending: _Pending[ClientT], now: float) -> None:
        upstreams = self.upstreams
        if upstreams and upstreams[self._preferred % len(upstreams)] == pending.upstream:
            self._preferred = (self._preferred + 1) % len(upstreams)  # it failed: prefer next
        pending.attempts += 1
        if pending.attempts >= self.config.forward_attempts or not upstreams:
            self._finish(pending)
            self.stats.servfail += 1
            event(log, logging.INFO, "dns.forward.failed", tried=len(pending.tried),
                  attempts=pending.attempts, clients=len(pending.waiters))
            for waiter in pending.waiters:
                self._actions.append(ClientReply(waiter.client,
                                                 self._count(self._servfail(waiter))))
            return
        pending.upstream = upstreams[(pending.start + pending.attempts) % len(upstreams)]
        pending.tcp = False
        self._send(pending, now)

    def _finish(self, pending: _Pending[ClientT]) -> None:
        del self._pending[pending.id]
        if self._by_key.get(pending.key) is pending:
            del self._by_key[pending.key]

    def _reply(self, waiter: _Waiter[ClientT], data: bytes) -> None:
        self._actions.append(ClientReply(waiter.client,
                                         self._count(self._answer_waiter(waiter, data))))

    def _answer_waiter(self, waiter: _Waiter[ClientT], data: bytes) -> bytes:
        """The reply to `waiter` from an upstream response `data` (any id)."""
        if waiter.chain is None:
            end = wire.HEADER_LEN + len(waiter.qname)
            flag_bytes = bytes((data[2], data[3] | (wire.RA & 0xFF)))
            reply = (waiter.id.to_bytes(2, "big") + flag_bytes + data[4:12] + waiter.qname
                     + data[end:])
        else:
            reply = self._chased(waiter, data)
        if waiter.limit is None or len(reply) <= waiter.limit:
            return reply
        self.stats.truncated += 1
        flags = int.from_bytes(reply[2:4], "big") | wire.TC
        edns = None if waiter.edns is None else Edns(self.config.edns_udp_size, 0,
                                                     waiter.edns.do)
        return wire.encode_response(id=waiter.id, flags=flags, qname=waiter.qname,
                                    qtype=waiter.qtype, qclass=waiter.qclass, edns=edns)

    def _chased(self, waiter: _Waiter[ClientT], data: bytes) -> bytes:
        """An ExternalName answer: our CNAME chain, then the upstream's answer for the target."""
        assert waiter.chain is not None
        flags = wire.QR | wire.RA | (waiter.flags & (wire.RD | wire.CD))
        edns = None if waiter.edns is None else Edns(self.config.edns_udp_size, 0,
                                                     waiter.edns.do)
        try:
            response = wire.scan_response(data)
            answer = [wire.copy_record(data, r) for r in response.answer]
            authority = [wire.copy_record(data, r) for r in response.authority]
            additional = [wire.copy_record(data, r) for r in response.additional
                          if r.rtype != wire.OPT]
            rcode = response.rcode & wire.RCODE_MASK
            return wire.encode_response(
                id=waiter.id, flags=flags | rcode, qname=waiter.qname, qtype=waiter.qtype,
                qclass=waiter.qclass, answer=[*waiter.chain, *answer], authority=authority,
                additional=additional, edns=edns)
        except ValueError:  # DnsWireError included: an upstream answer we cannot rewrite
            self.stats.upstream_invalid += 1
            return self._servfail(waiter)

    def _servfail(self, waiter: _Waiter[ClientT]) -> bytes:
        flags = wire.QR | wire.RA | (waiter.flags & (wire.RD | wire.CD)) | wire.SERVFAIL
        edns = None if waiter.edns is None else Edns(self.config.edns_udp_size, 0,
                                                     waiter.edns.do)
        return wire.encode_response(id=waiter.id, flags=flags, qname=waiter.qname,
                                    qtype=waiter.qtype, qclass=waiter.qclass, edns=edns)

    # --- bookkeeping ----------------------------------------------------------------------

    def _count(self, reply: bytes, rcode: int | None = None) -> bytes:
        """Count `reply` by rcode (its header's, unless given: extended rcodes live in OPT)."""
        name = wire.rcode_name(reply[3] & wire.RCODE_MASK if rcode is None else rcode)
        self.stats.responses[name] = self.stats.responses.get(name, 0) + 1
        return reply

    def _malformed(self, client: ClientT, now: float, reason: str) -> Outcome:
        self.stats.malformed += 1
        if now - self._malformed_logged_at >= self.config.malformed_log_interval_s:
            event(log, logging.WARNING, "dns.malformed", client=_client_text(client),
                  reason=reason, suppressed=self._malformed_suppressed)
            self._malformed_logged_at = now
            self._malformed_suppressed = 0
        else:
            self._malformed_suppressed += 1
        return Outcome.DROPPED


def _client_text(client: object) -> str:
    if isinstance(client, tuple) and len(client) == 2 and isinstance(client[0], str):
        return _fmt((client[0], int(client[1])))
    return str(client)


def _fmt(address: Address) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
