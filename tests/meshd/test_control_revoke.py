"""Node revocation in `meshd server`: the list's parser and file, the control core (refusal,
cut sessions, the published table), the TURN core (403, allocations deleted), the control
service over real TLS on loopback, and `meshd server` itself (start-up errors, SIGHUP)."""

# The harnesses come from test_control_server, test_control_service and test_turn_server, which
# mypy cannot resolve (tests/meshd has no package and is not on mypy_path: its conftest would
# be found twice).
# mypy: disable-error-code="import-not-found,misc,no-any-return,has-type"

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_control_client import Driver, peer
from test_control_server import Harness, K, welcome_of
from test_control_service import Agent, Pki, _write, run, server_core, start_service
from test_turn_server import CLIENT, allocated, code, make_server
from test_turn_server import Agent as TurnAgent

from edgeweave.log import KeyValueFormatter
from edgeweave.pki import CertificateAuthority, client_context, node_identity
from meshd.control.client import ClientState, PeersChanged, ServerError, Welcomed
from meshd.control.registry import MemoryRegistryStore
from meshd.control.revoked import (
    Revocations,
    RevokedFile,
    RevokedFileError,
    format_serial,
    parse_revoked,
)
from meshd.control.server import ErrorCode, SessionState
from meshd.control.service import RevocationWatcher
from meshd.control.wire import Error, Hello, PeerInfo, PeerJoined, Peers, Signal
from meshd.stun.codec import Lifetime, MessageClass, Method
from meshd.turn.server import StreamClose, Transport

# --- the list ------------------------------------------------------------------------------------


def test_entries_comments_and_blank_lines() -> None:
    text = ("# decommissioned\n"
            "edge-7\n"
            "\n"
            "   edge-8.site-a   # trailing comment\n"
            "serial:4f1a9c03e2\n"
            "SERIAL:0x4F:1A:9C:03:E3\n"
            "serial:1\n"
            "edge-7\n")
    got = parse_revoked(text, "revoked.txt")
    assert got == Revocations(frozenset({"edge-7", "edge-8.site-a"}),
                              frozenset({0x4F1A9C03E2, 0x4F1A9C03E3, 1}))
    assert len(got) == 5
    assert parse_revoked("") == Revocations() and len(Revocations()) == 0
    assert format_serial(0x4F1A9C03E2) == "4f1a9c03e2"


@pytest.mark.parametrize(("text", "line", "reason"), [
    ("edge-1\n\nEdge-2\n", 3, "'Edge-2' is neither a node name"),
    ("edge-1 edge-2\n", 1, "one entry per line"),
    ("# x\nserial:\n", 2, "serial '': expected 1 to 40 hex digits"),
    ("serial:12g4\n", 1, "serial '12g4'"),
    ("serial:" + "f" * 41 + "\n", 1, "expected 1 to 40 hex digits"),
    ("edge_1\n", 1, "neither a node name"),
    ("a\n\n\nb\n-c\n", 5, "'-c'"),
])
def test_errors_name_the_file_and_line(text: str, line: int, reason: str) -> None:
    with pytest.raises(RevokedFileError) as raised:
        parse_revoked(text, "revoked.txt")
    assert raised.value.line == line
    assert str(raised.value).startswith(f"revoked.txt:{line}: ")
    assert reason in str(raised.value)


def test_bytes_that_are_not_utf8_name_their_line() -> None:
    with pytest.raises(RevokedFileError, match=r"^r:2: not UTF-8$"):
        parse_revoked(b"edge-1\n\xff\xfe\n", "r")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_the_list_error(data: bytes) -> None:
    try:
        got = parse_revoked(data, "f")
    except RevokedFileError as exc:
        assert str(exc).startswith("f:")
    else:
        assert all(isinstance(n, str) for n in got.nodes)


_PIECES = st.sampled_from(["edge-1", "serial:", "0x", "ab", ":", "#", " ", "\t", "\n", "\r",
                           ".", "-", "A", "\u00e9", "\ud800", "\x00", "serial:ff", "9" * 41])


@settings(max_examples=400, deadline=None)
@given(st.lists(_PIECES, max_size=30).map("".join))
def test_any_text_parses_or_raises_the_list_error(text: str) -> None:
    try:
        parse_revoked(text, "f")
    except RevokedFileError as exc:
        assert exc.line is not None and str(exc).startswith(f"f:{exc.line}: ")


def test_the_file_reloads_on_change_and_keeps_the_last_good_list(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.control")
    path = tmp_path / "revoked.txt"
    path.write_text("edge-1\n")
    file = RevokedFile(path)
    assert file.load() == Revocations(frozenset({"edge-1"}))
    assert not file.changed() and file.reload() is None
    path.write_text("edge-1\nserial:ab\n")
    assert file.changed()
    assert file.reload() == Revocations(frozenset({"edge-1"}), frozenset({0xAB}))
    path.write_text("edge-1\nserial:ab\nnot a name\n")  # bad: logged, the list stays
    assert file.reload() is None
    assert file.current == Revocations(frozenset({"edge-1"}), frozenset({0xAB}))
    assert file.reload() is None and file.reload(force=False) is None  # logged once per change
    path.unlink()  # missing: logged, the list stays
    assert file.reload() is None and file.current.serials == {0xAB}
    assert file.reload(force=True) is None
    path.write_text("")
    assert file.reload() == Revocations()
    errors = [KeyValueFormatter().format(r) for r in caplog.records
              if r.levelno == logging.ERROR]
    assert len(errors) == 3, errors
    assert "control.revoked_error" in errors[0] and "line=3" in errors[0]
    assert "one entry per line" in errors[0] and "kept=2" in errors[0]
    assert "cannot read: No such file or directory" in errors[1]


def test_a_missing_file_cannot_be_loaded(tmp_path: Path) -> None:
    with pytest.raises(RevokedFileError, match=r"revoked\.txt: cannot read: No such file"):
        RevokedFile(tmp_path / "revoked.txt").load()


# --- the control core ----------------------------------------------------------------------------


class RevokeHarness(Harness):
    """`Harness` whose connections carry certificate serials (`serials[node]`)."""

    def __init__(self, store: MemoryRegistryStore | None = None, **config: Any) -> None:
        super().__init__(store, **config)
        self.serials: dict[str, int] = {}

    def connect(self, node: str | None, not_after: float | None = None) -> int:
        conn, self._next = self._next, self._next + 1
        serial = self.serials.get(node) if node is not None else None
        self.take(self.server.connection_made(conn, node, self.now, not_after=not_after,
                                              serial=serial))
        return conn

    def revoke(self, nodes: tuple[str, ...] = (), serials: tuple[int, ...] = ()) -> None:
        self.take(self.server.set_revoked(nodes, serials, self.now))


def table(h: Harness, conn: int) -> dict[str, PeerInfo]:
    """The table the last `peers` message to `conn` carried."""
    (last, *_) = reversed(h.of(conn, Peers))
    return {p.node: p for p in last.peers}


def refused_with(h: Harness, conn: int) -> str:
    (error,) = h.of(conn, Error)
    assert h.closed[conn] == "revoked" and error.code == "revoked"
    return error.message


def test_a_revoked_node_is_refused_at_connect_by_name() -> None:
    h = RevokeHarness()
    h.revoke(("b",))
    conn = h.connect("b")
    assert refused_with(h, conn) == "node b is revoked"
    assert h.server.session_state(conn) is SessionState.CLOSED and h.server.sessions == 0
    assert h.server.metrics.refused == {"revoked": 1}
    assert ("meshd_control_revoked_nodes", {}, 1) in h.server.samples()
    assert ("meshd_control_refused_total", {"code": "revoked"}, 1) in h.server.samples()
    a = h.join("a")  # others are not concerned
    assert welcome_of(h, a).node == "a"


def test_a_revoked_certificate_is_refused_by_serial_and_a_reissued_one_gets_in() -> None:
    h = RevokeHarness()
    h.serials["b"] = 0xB0B
    h.revoke(serials=(0xB0B,))
    conn = h.connect("b")
    assert refused_with(h, conn) == "certificate serial b0b is revoked"
    h.serials["b"] = 0xB0C  # re-issued
    b = h.join("b")
    assert welcome_of(h, b).node == "b" and h.server.online() == ["b"]


def test_revoking_a_connected_node_cuts_it_and_drops_it_from_every_table() -> None:
    h = RevokeHarness()
    a, b, c = h.join("a"), h.join("b"), h.join("c")
    overlay_b = welcome_of(h, b).overlay.ip
    for conn in (a, b, c):
        h.msgs(conn)
    h.revoke(("b",))
    assert refused_with(h, b) == "node b is revoked"
    assert h.server.online() == ["a", "c"]
    for conn, other in ((a, "c"), (c, "a")):
        got = table(h, conn)
        assert set(got) == {other}, got  # the whole table, without b
    assert "b" not in h.server.peer_table()
    record = h.server.registry.get("b")  # the registry keeps its record and address
    assert record is not None and record.overlay == overlay_b
    assert h.server.metrics.refused == {"revoked": 1}
    h.revoke(("b",))  # the same list again: nothing to tell anyone
    assert not h.msgs(a) and not h.msgs(c)


def test_lifting_a_revocation_brings_the_node_back_offline_then_online() -> None:
    h = RevokeHarness()
    a, b = h.join("a"), h.join("b")
    key_b = K["b"]
    h.revoke(("b",))
    h.msgs(a)
    h.revoke(())
    got = table(h, a)
    assert set(got) == {"b"} and not got["b"].online and got["b"].static_key == key_b
    assert h.server.peer_table()["b"].online is False
    b = h.join("b")
    assert welcome_of(h, b).node == "b"
    joined = h.of(a, PeerJoined)
    assert [j.peer.node for j in joined] == ["b"] and joined[0].peer.online


def test_welcomes_never_list_a_revoked_node() -> None:
    h = RevokeHarness()
    b = h.join("b")
    h.lose(b)  # offline, known from the registry
    h.revoke(("b",))
    a = h.join("a")
    assert [m for m in h.msgs(a) if isinstance(m, Peers)] == [Peers(())]
    # Also after a restart: the new server gets the list before anyone connects.
    restarted = RevokeHarness(h.store)
    assert "b" in restarted.server.peer_table()
    restarted.revoke(("b",))
    assert "b" not in restarted.server.peer_table()
    c = restarted.join("c")
    assert set(table(restarted, c)) == {"a"}


def test_signals_to_a_revoked_node_are_refused_as_to_an_offline_one() -> None:
    h = RevokeHarness()
    a, _ = h.join("a"), h.join("b")
    h.revoke(("b",))
    h.msgs(a)
    h.send(a, Signal("b", {"x": 1}))
    (error,) = h.of(a, Error)
    assert (error.code, error.peer) == ("peer-offline", "b")
    assert a not in h.closed


def test_a_revoked_node_s_address_is_never_handed_to_another_node() -> None:
    h = RevokeHarness(overlay_network=ipaddress.IPv4Network("100.64.0.0/30"))  # 2 addresses
    b = h.join("b")
    overlay_b = welcome_of(h, b).overlay.ip
    h.revoke(("b",))
    c = h.join("c")
    assert welcome_of(h, c).overlay.ip != overlay_b
    d = h.connect("d")
    h.send(d, Hello(K["a"]))
    (error,) = h.of(d, Error)
    assert error.code == ErrorCode.NO_ADDRESS  # b's address stays b's
    record = h.server.registry.get("b")
    assert record is not None and record.overlay == overlay_b


def test_a_session_waiting_for_its_hello_is_cut_too() -> None:
    h = RevokeHarness()
    a = h.join("a")
    h.msgs(a)
    waiting = h.connect("b")
    h.revoke(("b",))
    assert refused_with(h, waiting) == "node b is revoked"
    assert not h.of(a, Peers)  # b was never in the table: nothing changed for a


def test_a_serial_revocation_hides_the_node_until_it_returns_with_another_certificate() -> None:
    h = RevokeHarness()
    h.serials.update(a=0xA, b=0xB1)
    a, b = h.join("a"), h.join("b")
    h.msgs(a)
    h.revoke(serials=(0xB0,))  # another certificate of b: nothing happens
    assert not h.msgs(a) and b not in h.closed
    h.revoke(serials=(0xB0, 0xB1))
    assert refused_with(h, b) == "certificate serial b1 is revoked"
    assert "b" not in table(h, a)
    h.serials["b"] = 0xB2  # re-issued: back, and announced
    b = h.join("b")
    (joined,) = h.of(a, PeerJoined)
    assert joined.peer.node == "b" and joined.peer.online
    assert set(table(h, b)) == {"a"}


def test_lifting_a_serial_revocation_shows_the_node_again() -> None:
    h = RevokeHarness()
    h.serials.update(a=0xA, b=0xB)
    a, _ = h.join("a"), h.join("b")
    h.revoke(serials=(0xB,))
    h.msgs(a)
    h.revoke()
    got = table(h, a)
    assert set(got) == {"b"} and not got["b"].online


def test_the_refusals_of_a_revoked_node_are_warned_about_once_a_minute(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meshd.control")
    h = RevokeHarness()
    h.revoke(("b",))
    for _ in range(30):  # an agent retrying every 2 s for a minute
        h.connect("b")
        h.now += 2.0
    h.connect("b")
    warned = [KeyValueFormatter().format(r) for r in caplog.records
              if r.levelno == logging.WARNING and r.getMessage() == "control.refused"]
    assert len(warned) == 2, warned
    assert "refusals=1" in warned[0] and "refusals=30" in warned[1]  # 29 counted + this
    assert h.server.metrics.refused == {"revoked": 31}


# --- the agent's control client ------------------------------------------------------------------


def test_a_revoked_agent_drops_its_peers_names_it_and_retries(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meshd.control")
    d = Driver()
    d.ready()
    d.feed(Peers((peer("edge-2"), peer("edge-3", key=3))))
    d.take()
    d.feed(Error("revoked", "node edge-1 is revoked"))
    d.client.connection_lost("closed by the server", d.now)
    d.drain()
    events = d.take()
    # Its peers dropped it (routes, paths, keys): it drops them too, so that a lifted
    # revocation starts from fresh handshakes.
    assert events[:2] == [ServerError("revoked", "node edge-1 is revoked", ""),
                          PeersChanged({}, (), ("edge-2", "edge-3"))]
    assert d.client.peers == {} and d.client.state is ClientState.BACKOFF
    assert d.client.last_error == "closed by the server: revoked: node edge-1 is revoked"
    for attempt in range(1, 5):  # refused on every retry, with the usual backoff
        retry_at = d.client.get_timer()
        assert retry_at is not None and retry_at - d.now <= d.client.config.max_retry_s
        d.advance(retry_at - d.now)
        assert d.actions[-1] == "dial"
        d.connect()
        d.feed(Error("revoked", "node edge-1 is revoked"))
        d.client.connection_lost("closed by the server", d.now)
        d.drain()
        assert d.client.refusals == attempt
        assert d.client.last_error == "refused by the server: revoked: node edge-1 is revoked"
    assert not [e for e in d.take() if isinstance(e, PeersChanged)]
    warned = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warned == ["control.server_error", "control.revoked", "control.lost",
                      "control.refused"], warned  # the retries: debug/info lines only
    d.advance(d.client.config.max_retry_s)
    d.connect()
    d.welcome()  # lifted
    assert d.client.ready and d.client.refusals == 0 and d.client.last_error is None


def test_a_non_fatal_session_error_is_not_the_reason_of_a_later_close() -> None:
    """A `nat` over the rate gets an `error` without `peer` and the session goes on; a close
    much later (idle timeout) must not be blamed on it."""
    d = Driver()
    d.ready()
    d.feed(Error("rate-limited", "nat: over 20 messages/s"))
    d.feed(Peers((peer("edge-2"),)))
    d.client.connection_lost("closed by the server", d.now)
    assert d.client.last_error == "closed by the server"


# --- the TURN core -------------------------------------------------------------------------------


def test_the_relay_refuses_and_deletes_the_allocations_of_a_revoked_node() -> None:
    server, ports = make_server()
    revoked = allocated(server, node="node-a")
    other = allocated(server, node="node-b", client=("203.0.113.8", 40002))
    assert revoked.relayed is not None and other.relayed is not None
    assert server.set_revoked_nodes({"node-a"}, revoked.now) == []
    assert ports.opened == {other.relayed}  # node-a's relayed port is free again
    assert server.allocations == 1 and server.allocation_for(revoked.flow) is None
    assert server.metrics.allocations_deleted == 1
    # Its credentials are still valid, but nothing is served: 403 (RFC 8656 §19).
    response = revoked.request(Method.REFRESH, Lifetime(600))
    assert code(response) == 403 and response.integrity is not None
    assert code(revoked.allocate()) == 403
    fresh = TurnAgent(server, node="node-a", client=("203.0.113.9", 40003))
    assert code(fresh.allocate()) == 403
    assert server.metrics.errors[403] == 3 and server.allocations == 1
    assert other.request(Method.REFRESH, Lifetime(600)).message_class is MessageClass.SUCCESS
    server.set_revoked_nodes((), revoked.now)  # lifted: served again
    assert fresh.allocate().message_class is MessageClass.SUCCESS


def test_the_relay_closes_a_revoked_node_s_tcp_connection() -> None:
    server, _ = make_server()
    agent = allocated(server, node="node-a", transport=Transport.TCP)
    out = server.set_revoked_nodes(["node-a"], agent.now)
    assert out == [StreamClose(agent.flow, "node node-a revoked")]
    assert server.allocations == 0
    server.connection_lost(agent.flow, agent.now)  # what the adapter reports next
    assert server.allocations == 0 and agent.flow.client == CLIENT


# --- over real TLS -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rpki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("revoke-pki")
    ca = CertificateAuthority.generate()
    (d / "ca.crt").write_bytes(ca.cert_pem())
    _write(d, "server", ca.issue_server_cert("meshd-server", ips=["127.0.0.1"]))
    for name, node in (("edge-1", "edge-1"), ("edge-2", "edge-2"), ("edge-2b", "edge-2")):
        _write(d, name, ca.issue_client_cert(node_identity(node)))
    return Pki(d, d / "ca.crt", ca)


def serial_of(pki: Pki, name: str) -> int:
    from cryptography import x509

    return x509.load_pem_x509_certificate(pki.file(f"{name}.crt").read_bytes()).serial_number


def tls_of(pki: Pki, name: str) -> Any:
    return client_context(pki.ca, cert_file=pki.file(f"{name}.crt"),
                          key_file=pki.file(f"{name}.key"))


def test_over_tls_a_revoked_node_is_refused_and_a_rewritten_file_cuts_a_live_session(
        rpki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.control")
    path = tmp_path / "revoked.txt"
    path.write_text("# nothing yet\n")

    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(rpki, core)
        file = RevokedFile(path)
        file.load()
        watcher = RevocationWatcher(file, poll_s=0.05)
        watcher.subscribe(service.set_revoked)
        watcher.start()
        port = service.address[1]
        one, two = Agent(port, tls_of(rpki, "edge-1"), 1), Agent(port, tls_of(rpki, "edge-2"), 2)
        try:
            await one.next(Welcomed)
            await two.next(Welcomed)
            while "edge-2" not in one.client.peers:
                await one.next(PeersChanged)
            time.sleep(0.01)  # a new mtime even on coarse clocks
            path.write_text("edge-2   # leaked\n")
            error = await two.next(ServerError)
            assert (error.code, error.message) == ("revoked", "node edge-2 is revoked")
            while not (changed := await one.next(PeersChanged)).removed:
                pass
            assert changed.removed == ("edge-2",) and "edge-2" not in one.client.peers
            while two.client.refusals < 2:  # its retries are refused, with the usual backoff
                await asyncio.sleep(0.02)
            assert two.client.last_error == ("refused by the server: revoked: node edge-2 is "
                                             "revoked")
            assert two.client.state is not ClientState.READY and core.online() == ["edge-1"]
            path.write_text("")  # lifted: it is back
            await two.next(Welcomed)
            while not (p := one.client.peers.get("edge-2")) or not p.online:
                await one.next(PeersChanged)
        finally:
            watcher.close()
            await one.connector.close()
            await two.connector.close()
            await service.close()

    run(main)
    lines = [KeyValueFormatter().format(r) for r in caplog.records]
    assert sum(" control.revoked nodes=1 serials=0 " in f"{line} " for line in lines) == 1
    assert any(" control.revoked_session " in line and "node=edge-2" in line for line in lines)


def test_over_tls_a_certificate_is_refused_by_its_serial(rpki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(rpki, core)
        service.set_revoked(Revocations(serials=frozenset({serial_of(rpki, "edge-2")})))
        port = service.address[1]
        old = Agent(port, tls_of(rpki, "edge-2"), 2)
        try:
            error = await old.next(ServerError)
            assert error.code == "revoked"
            assert error.message == f"certificate serial {serial_of(rpki, 'edge-2'):x} is revoked"
        finally:
            await old.connector.close()
        new = Agent(port, tls_of(rpki, "edge-2b"), 2)  # re-issued for the same node
        try:
            assert (await new.next(Welcomed)).node == "edge-2"
        finally:
            await new.connector.close()
            await service.close()

    run(main)


def test_over_tls_a_refused_agent_retries_with_backoff_and_logs_once(
        rpki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, "meshd.control")

    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(rpki, core)
        service.set_revoked(Revocations(frozenset({"edge-1"})))
        agent = Agent(service.address[1], tls_of(rpki, "edge-1"), 1)
        try:
            while agent.client.refusals < 4:
                await asyncio.sleep(0.02)
            assert agent.client.sessions == 0 and core.metrics.refused["revoked"] >= 4
        finally:
            await agent.connector.close()
            await service.close()

    run(main)
    warned = [KeyValueFormatter().format(r) for r in caplog.records
              if r.levelno >= logging.WARNING]
    # One warning each side (server: control.refused node=...; agent: control.refused
    # reason=...), however often it retried: never one per attempt.
    assert len(warned) == 2, warned
    assert any("node=edge-1" in w and "refusals=1" in w for w in warned), warned
    assert any("refused by the server: revoked: node edge-1 is revoked" in w
               for w in warned), warned


# --- meshd server --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloudcore.cli import main as cloudcore_main
    from edgeweave.pki import PKI_SUBDIR

    root = tmp_path_factory.mktemp("revoke-cli")
    cloud = root / "cloudcore"
    CertificateAuthority.load_or_create(cloud / PKI_SUBDIR)
    out = root / "certs"
    assert cloudcore_main(["--data-dir", str(cloud), "certs", "meshd-server", "--out", str(out),
                           "--address", "127.0.0.1"]) == 0
    (out / "turn-secret").write_text("s3cret\n")
    return out


def server_config(certs: Path, tmp: Path, revoked: Path) -> Path:
    config = tmp / "meshd.yaml"
    config.write_text(
        "stun: {addresses: [127.0.0.1], port: 0, altPort: 0}\n"
        f"relay: {{enabled: true, authSecretFile: {certs / 'turn-secret'}}}\n"
        f"control: {{enabled: true, address: '127.0.0.1:0', dataDir: {tmp / 'data'},\n"
        f"  caFile: {certs / 'ca.crt'}, certFile: {certs / 'meshd-server.crt'},\n"
        f"  keyFile: {certs / 'meshd-server.key'}, revokedFile: {revoked}}}\n")
    return config


def test_meshd_server_refuses_to_start_with_a_bad_list(certs: Path, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("edge-1\n# fine so far\nserial:xyz\n")
    result = subprocess.run([sys.executable, "-m", "meshd", "server", "--config",
                             str(server_config(certs, tmp_path, revoked))],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert f"control: revokedFile {revoked}:3: serial 'xyz'" in result.stderr
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    revoked.unlink()
    result = subprocess.run([sys.executable, "-m", "meshd", "server", "--config",
                             str(server_config(certs, tmp_path, revoked))],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and "cannot read: No such file" in result.stderr


def test_meshd_server_rereads_the_list_on_sighup_and_change(certs: Path, tmp_path: Path) -> None:
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("edge-9\n")
    log = tmp_path / "server.log"
    with log.open("ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "meshd", "server", "--config",
                                 str(server_config(certs, tmp_path, revoked))],
                                stdout=subprocess.DEVNULL, stderr=stderr)

    def wait_log(text: str, count: int = 1) -> str:
        deadline = time.monotonic() + 20
        while (seen := log.read_text()).count(text) < count:
            assert proc.poll() is None, seen
            assert time.monotonic() < deadline, f"no {text!r} in {seen}"
            time.sleep(0.05)
        return seen

    try:
        wait_log("control.revoked nodes=1 serials=0")
        wait_log("turn.revoked nodes=1 deleted=0")  # the relay in the same process has it
        revoked.write_text("edge-9\nserial:ab\nedge-8\n")  # a change: picked up by the poll
        wait_log("control.revoked nodes=2 serials=1")
        wait_log("turn.revoked nodes=2 deleted=0")
        revoked.write_text("edge-9\nEdge-10\n")  # bad: logged, the list stays
        seen = wait_log("control.revoked_error")
        assert f"file={revoked} line=2" in seen and "kept=3" in seen
        os.kill(proc.pid, signal.SIGHUP)  # re-read although unchanged: the same error again
        wait_log("control.revoked_error", 2)
        revoked.write_text("")
        os.kill(proc.pid, signal.SIGHUP)
        seen = wait_log("control.revoked nodes=0 serials=0")
        assert proc.poll() is None
        assert "Traceback" not in seen
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, log.read_text()
