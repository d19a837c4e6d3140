"""The server's node list: `ControlServer.node_table` driven with a virtual clock, its JSON
document, the request filter, `meshd nodes`' table, and the HTTP routes on a real listener."""

# The harness comes from test_control_server, which mypy cannot resolve (tests/meshd has no
# package and is not on mypy_path: its conftest would be found twice).
# mypy: disable-error-code="import-not-found,misc,no-any-return,has-type"

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_control_server import T0, Harness, K, welcome_of

from meshd.control.client import ControlClient, ControlClientConfig, ControlEvent, Welcomed
from meshd.control.nodes import (
    NodeListing,
    NodeNotFound,
    NodesRequestError,
    NodeState,
    NodeTable,
    SessionInfo,
    ago,
    nodes_document,
    render_nodes,
    select,
)
from meshd.control.registry import NodeRecord
from meshd.control.service import ControlConnector, agent_tls_context, node_routes
from meshd.control.wire import Hello, NatSummary, Ping
from meshd.turn.endpoint import TurnEndpoint
from meshd.turn.service import start_metrics

NOT_AFTER = T0 + 86400 * 30
REMOTE = {"a": ("198.51.100.7", 40312), "b": ("203.0.113.9", 51000), "c": ("2001:db8::5", 4000)}


class NodesHarness(Harness):
    """`Harness` whose connections carry a certificate serial, expiry and remote address."""

    def __init__(self, *args: Any, **config: Any) -> None:
        super().__init__(*args, **config)
        self.serials: dict[str, int] = {"a": 0xA1, "b": 0xB1, "c": 0xC1}

    def connect(self, node: str | None, not_after: float | None = NOT_AFTER) -> int:
        conn, self._next = self._next, self._next + 1
        key = node or ""
        self.take(self.server.connection_made(
            conn, node, self.now, not_after=not_after, serial=self.serials.get(key),
            remote=REMOTE.get(key)))
        return conn

    def listing(self, relay: dict[str, int] | None = None) -> dict[str, NodeListing]:
        return {n.node: n for n in self.server.node_table(relay).nodes}


def session_of(listing: NodeListing) -> SessionInfo:
    assert listing.session is not None, listing
    return listing.session


# --- the core ------------------------------------------------------------------------------------


def test_an_online_node_shows_its_session_and_goes_offline_with_the_reason() -> None:
    h = NodesHarness()
    a = h.join("a", nat=NatSummary("port-restricted", "endpoint-independent",
                                   "address-and-port-dependent"), software="meshd 9.9")
    overlay = welcome_of(h, a).overlay.ip
    h.now += 3.0
    h.send(a, Ping(1))  # last seen moves with what the node sends
    (got,) = h.server.node_table().nodes
    assert (got.node, got.overlay, got.state, got.static_key) == ("a", overlay,
                                                                  NodeState.ONLINE, K["a"])
    assert got.nat == NatSummary("port-restricted", "endpoint-independent",
                                 "address-and-port-dependent")
    assert got.revoked_by == () and got.relay_allocations is None
    assert session_of(got) == SessionInfo(T0, T0 + 3.0, None, None, REMOTE["a"], 0xA1,
                                          NOT_AFTER, 2, "meshd 9.9")
    h.now += 1.0
    h.lose(a)
    got = h.listing()["a"]
    assert got.state is NodeState.OFFLINE and got.overlay == overlay  # the record stays
    assert session_of(got) == SessionInfo(T0, T0 + 3.0, T0 + 4.0, "connection lost",
                                          REMOTE["a"], 0xA1, NOT_AFTER, 2, "meshd 9.9")


def test_an_idle_node_ends_with_idle_timeout_and_keeps_its_last_seen() -> None:
    h = NodesHarness()
    h.join("a")
    h.advance(30.0)
    got = h.listing()["a"]
    assert got.state is NodeState.OFFLINE
    session = session_of(got)
    assert session.end_reason == "idle-timeout" and session.last_seen == T0
    assert session.ended_at is not None and T0 + 15.0 <= session.ended_at <= T0 + 16.0


def test_a_node_re_registering_shows_the_new_session_and_key() -> None:
    h = NodesHarness()
    a = h.join("a")
    overlay = welcome_of(h, a).overlay.ip
    h.now += 10.0
    # The agent restarted with a new key and a re-issued certificate; its new connection
    # replaces the old one once its hello is accepted.
    h.serials["a"] = 0xA2
    again = h.connect("a")
    assert session_of(h.listing()["a"]).connected_at == T0  # before the hello: the old one
    new_key = bytes(range(32))
    h.send(again, Hello(new_key))
    assert h.closed[a] == "replaced"
    got = h.listing()["a"]
    assert (got.state, got.overlay, got.static_key) == (NodeState.ONLINE, overlay, new_key)
    session = session_of(got)
    assert (session.connected_at, session.serial) == (T0 + 10.0, 0xA2)
    assert session.ended_at is None and session.end_reason is None
    h.now += 5.0
    h.lose(again)
    session = session_of(h.listing()["a"])
    assert (session.connected_at, session.ended_at, session.end_reason) == (
        T0 + 10.0, T0 + 15.0, "connection lost")


def test_after_a_restart_nodes_are_listed_from_the_registry_without_a_session() -> None:
    h = NodesHarness()
    a, b = h.join("a", nat=NatSummary("symmetric")), h.join("b")
    overlays = {"a": welcome_of(h, a).overlay.ip, "b": welcome_of(h, b).overlay.ip}
    restarted = NodesHarness(h.store)
    got = restarted.listing()
    assert {n: (g.overlay, g.state, g.session) for n, g in got.items()} == {
        "a": (overlays["a"], NodeState.OFFLINE, None),
        "b": (overlays["b"], NodeState.OFFLINE, None)}
    assert got["a"].nat == NatSummary("symmetric") and got["a"].static_key == K["a"]
    restarted.join("b")
    assert restarted.listing()["b"].state is NodeState.ONLINE


def test_a_record_without_a_static_key_is_listed() -> None:
    from meshd.control.registry import MemoryRegistryStore

    store = MemoryRegistryStore({"x-1": NodeRecord(ipaddress.IPv4Address("100.64.0.9"))})
    (got,) = NodesHarness(store).server.node_table().nodes
    assert (got.node, got.static_key, got.state) == ("x-1", None, NodeState.OFFLINE)


def test_revoked_by_name_and_by_serial_and_lifted() -> None:
    h = NodesHarness()
    a, b = h.join("a"), h.join("b")
    h.now += 2.0
    h.take(h.server.set_revoked(("b", "x-never-seen"), (0xA1, 0xFFFF), h.now))
    assert a in h.closed and b in h.closed
    got = h.listing()
    assert got["a"].state is NodeState.REVOKED and got["a"].revoked_by == ("serial:a1",)
    assert got["b"].state is NodeState.REVOKED and got["b"].revoked_by == ("b",)
    assert session_of(got["b"]).end_reason == "revoked"
    assert session_of(got["b"]).ended_at == T0 + 2.0
    never = got["x-never-seen"]  # named by the list only
    assert (never.overlay, never.session, never.static_key, never.revoked_by) == (
        None, None, None, ("x-never-seen",))
    table = h.server.node_table()
    assert table.revoked_nodes == {"b", "x-never-seen"}
    assert table.revoked_serials == {0xA1, 0xFFFF}
    # a comes back with a re-issued certificate: not revoked any more; b's line is lifted.
    h.serials["a"] = 0xA2
    h.join("a")
    h.take(h.server.set_revoked((), (0xA1, 0xFFFF), h.now))
    got = h.listing()
    assert (got["a"].state, got["a"].revoked_by) == (NodeState.ONLINE, ())
    assert (got["b"].state, got["b"].revoked_by) == (NodeState.OFFLINE, ())
    assert "x-never-seen" not in got


def test_relay_allocations_and_pending_connections() -> None:
    h = NodesHarness()
    h.join("a"), h.join("b")
    h.connect("c")  # no hello yet: counted, not listed
    table = h.server.node_table({"a": 2, "someone-else": 1})
    assert table.pending == 1 and table.relay
    assert {n.node: n.relay_allocations for n in table.nodes} == {"a": 2, "b": 0}
    assert not h.server.node_table().relay


def test_a_huge_software_string_is_cut() -> None:
    h = NodesHarness()
    h.join("a", software="x" * 10_000)
    assert session_of(h.listing()["a"]).software == "x" * 200


# --- the document and the request filter ---------------------------------------------------------


def sample_table() -> NodeTable:
    h = NodesHarness()
    h.join("a", nat=NatSummary("full-cone"), software="meshd 1")
    c = h.join("c")
    h.now += 60.0
    h.lose(c)
    h.take(h.server.set_revoked(("b",), (0xABC,), h.now))
    h.now += 3600.0
    return h.server.node_table({"a": 1})


def test_the_document_field_by_field() -> None:
    table = sample_table()
    doc = json.loads(json.dumps(nodes_document(table, T0 + 3661.0)))
    assert doc["serverTime"] == T0 + 3661.0 and doc["overlayNetwork"] == "100.64.0.0/16"
    assert doc["relay"] is True and doc["pending"] == 0
    assert doc["revocations"] == {"nodes": ["b"], "serials": ["abc"]}
    a, b, c = doc["nodes"]
    assert a == {
        "node": "a", "overlay": a["overlay"], "state": "online", "online": True,
        "staticKey": base64.b64encode(K["a"]).decode(), "nat": {"natType": "full-cone"},
        "session": {"connectedAt": T0, "lastSeen": T0, "endedAt": None, "endReason": None,
                    "remote": "198.51.100.7:40312", "serial": "a1", "notAfter": NOT_AFTER,
                    "version": 2, "software": "meshd 1"},
        "revokedBy": [], "relayAllocations": 1}
    assert ipaddress.IPv4Address(a["overlay"]) in ipaddress.IPv4Network("100.64.0.0/16")
    assert b == {"node": "b", "overlay": None, "state": "revoked", "online": False,
                 "staticKey": None, "nat": None, "session": None, "revokedBy": ["b"],
                 "relayAllocations": 0}
    assert c["state"] == "offline" and c["session"]["remote"] == "[2001:db8::5]:4000"
    assert c["session"]["endReason"] == "connection lost"
    assert c["session"]["endedAt"] == T0 + 60.0 and c["session"]["software"] is None


@pytest.mark.parametrize(("query", "node", "names"), [
    ({}, None, ["a", "b", "c"]),
    ({"state": "online"}, None, ["a"]),
    ({"state": "offline, revoked"}, None, ["b", "c"]),
    ({}, "c", ["c"]),
    ({"state": "online"}, "a", ["a"]),
])
def test_select(query: dict[str, str], node: str | None, names: list[str]) -> None:
    assert [n.node for n in select(sample_table(), query, node)] == names


@pytest.mark.parametrize(("query", "node", "error"), [
    ({"nodes": "a"}, None, "unknown query parameter 'nodes' (known: state)"),
    ({"state": "up"}, None, "state: 'up' is not one of online, offline, revoked"),
    ({}, "Bad_Name", "'Bad_Name' is not a node name"),
])
def test_bad_requests_name_the_parameter(query: dict[str, str], node: str | None,
                                         error: str) -> None:
    with pytest.raises(NodesRequestError, match=re.escape(error)):
        select(sample_table(), query, node)


def test_an_unknown_node_is_not_found() -> None:
    with pytest.raises(NodeNotFound, match="no node zz known to this server"):
        select(sample_table(), {}, "zz")
    with pytest.raises(NodeNotFound):  # known, but not in the state asked for
        select(sample_table(), {"state": "offline"}, "a")


# --- meshd nodes' table --------------------------------------------------------------------------


def test_the_table() -> None:
    text = render_nodes(nodes_document(sample_table(), T0 + 3661.0))
    head, columns, a, b, c, tail = text.splitlines()
    assert head == ("3 node(s): 1 online, 1 offline, 1 revoked; overlay 100.64.0.0/16; "
                    "relay in this server")
    assert columns.split() == ["NAME", "OVERLAY", "STATE", "SINCE", "NAT", "ENDPOINT", "RELAY",
                               "REVOKED"]
    assert a.split()[2:] == ["online", "1h1m", "ago", "full-cone", "198.51.100.7:40312", "1",
                             "-"]
    assert b.split() == ["b", "-", "revoked", "-", "-", "-", "0", "b"]
    assert c.split()[2:] == ["offline", "1h1m", "ago", "-", "[2001:db8::5]:4000", "0", "-"]
    assert tail == "revocation entries matching no node listed: serial:abc"
    assert columns.index("OVERLAY") == a.index(a.split()[1])  # aligned


@pytest.mark.parametrize(("seconds", "text"), [
    (-5, "0s ago"), (59.9, "59s ago"), (60, "1m ago"), (3599, "59m ago"), (3600, "1h0m ago"),
    (86399, "23h59m ago"), (86400 * 2 + 3600 * 5 + 7, "2d5h ago")])
def test_ago(seconds: float, text: str) -> None:
    assert ago(seconds) == text


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["node", "state", "session", "nat", "revokedBy", "remote", "lastSeen",
                         "endedAt", "connectedAt", "natType", "relayAllocations", "nodes",
                         "serials", "overlay"]), inner, max_size=6),
    max_leaves=20)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(["nodes", "serverTime", "revocations", "relay",
                                        "pending", "overlayNetwork"]), _JSON, max_size=6))
def test_any_document_renders_without_raising(doc: dict[str, Any]) -> None:
    text = render_nodes(doc)
    assert text.splitlines()[1].startswith("NAME")


def test_control_characters_stay_out_of_the_table() -> None:
    doc = {"serverTime": T0, "nodes": [{"node": "evil\nname\x1b[2J", "state": "online"}]}
    lines = render_nodes(doc).splitlines()
    assert len(lines) == 3 and lines[2].startswith("evil?name?[2J")


# --- the HTTP routes -----------------------------------------------------------------------------


def fetch(url: str, method: str = "GET") -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        try:
            return exc.code, json.loads(body)
        except ValueError:
            return exc.code, body.decode()


def test_the_routes_on_a_metrics_listener() -> None:
    table = sample_table()

    async def main() -> None:
        with_nodes = await start_metrics("127.0.0.1", 0, list,
                                         routes=node_routes(lambda: table, clock=lambda: T0))
        without = await start_metrics("127.0.0.1", 0, list, routes=node_routes(None))
        try:
            base = f"http://127.0.0.1:{with_nodes.addresses[0][1]}"
            other = f"http://127.0.0.1:{without.addresses[0][1]}"
            got = await asyncio.gather(*(asyncio.to_thread(fetch, url, method) for url, method in (
                (f"{base}/nodes", "GET"),
                (f"{base}/nodes?state=revoked", "GET"),
                (f"{base}/nodes/c", "GET"),
                (f"{base}/nodes?limit=1", "GET"),
                (f"{base}/nodes/Bad_Name", "GET"),
                (f"{base}/nodes/zz", "GET"),
                (f"{base}/nodes", "POST"),
                (f"{other}/nodes", "GET"),
            )))
            # meshd nodes says what the server answered, exit 1.
            refused = await asyncio.to_thread(meshd, "nodes", "--address",
                                              f"127.0.0.1:{without.addresses[0][1]}")
        finally:
            await with_nodes.cleanup()
            await without.cleanup()
        whole, revoked, one, unknown, bad, missing, post, none = got
        assert whole == (200, nodes_document(table, T0))
        assert revoked[0] == 200 and [n["node"] for n in revoked[1]["nodes"]] == ["b"]
        assert one[0] == 200 and [n["node"] for n in one[1]["nodes"]] == ["c"]
        assert unknown == (400, {"error": "unknown query parameter 'limit' (known: state)"})
        assert bad[0] == 400 and "'Bad_Name' is not a node name" in bad[1]["error"]
        assert missing == (404, {"error": "no node zz known to this server"})
        assert post[0] == 405
        assert none[0] == 404 and "runs no control channel" in none[1]["error"]
        assert refused.returncode == 1 and refused.stderr.startswith(
            f"meshd: error: {other}/nodes: 404 this meshd server runs no control channel "
            "(control.enabled is false)")

    asyncio.run(asyncio.wait_for(main(), 30))


# --- meshd server and meshd nodes ----------------------------------------------------------------


@pytest.fixture(scope="module")
def nodes_certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cloudcore.cli import main as cloudcore_main
    from edgeweave.pki import PKI_SUBDIR, CertificateAuthority

    root = tmp_path_factory.mktemp("nodes-cli")
    cloud = root / "cloudcore"
    CertificateAuthority.load_or_create(cloud / PKI_SUBDIR)
    out = root / "certs"
    assert cloudcore_main(["--data-dir", str(cloud), "certs", "meshd-server", "--out", str(out),
                           "--address", "127.0.0.1"]) == 0
    for node in ("edge-1", "edge-2"):
        assert cloudcore_main(["--data-dir", str(cloud), "certs", "node", node,
                               "--out", str(out)]) == 0
    (out / "turn-secret").write_text("s3cret\n")
    return out


def kubeconfig_serial(path: Path) -> str:
    """The client certificate's serial (hex, as the node list writes it)."""
    from cryptography import x509

    match = re.search(r"client-certificate-data: (\S+)", path.read_text())
    assert match
    return f"{x509.load_pem_x509_certificate(base64.b64decode(match[1])).serial_number:x}"


class NodeAgent:
    """A control client over real TLS with the node kubeconfig, and its events."""

    def __init__(self, certs: Path, node: str, port: int, seed: int) -> None:
        self.events: asyncio.Queue[ControlEvent] = asyncio.Queue()
        config = ControlClientConfig(bytes([seed]) * 32, first_retry_s=0.1, max_retry_s=1.0)
        self.connector = ControlConnector(
            ControlClient(config, random.Random(seed)), "127.0.0.1", port,
            agent_tls_context(kubeconfig=certs / f"{node}.kubeconfig"),
            on_event=self.events.put_nowait)
        self.connector.start()

    async def welcomed(self) -> Welcomed:
        async def wait() -> Welcomed:
            while not isinstance(event := await self.events.get(), Welcomed):
                pass
            return event
        return await asyncio.wait_for(wait(), 15)


def logged_port(log: Path, pattern: str, proc: subprocess.Popen[bytes]) -> int:
    deadline = time.monotonic() + 20
    while not (match := re.search(pattern, log.read_text())):
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline, f"no {pattern!r} in {log.read_text()}"
        time.sleep(0.05)
    return int(match[1])


def free_port() -> int:
    """A TCP port nobody listens on now (metricsAddress takes no port 0)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def meshd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "meshd", *args], capture_output=True,
                          text=True, timeout=30, check=False)


def test_meshd_server_lists_its_nodes_over_http_and_meshd_nodes_prints_them(
        nodes_certs: Path, tmp_path: Path) -> None:
    certs = nodes_certs
    revoked = tmp_path / "revoked.txt"
    revoked.write_text("edge-9\n")
    config = tmp_path / "meshd.yaml"
    config.write_text(
        "stun: {addresses: [127.0.0.1], port: 0, altPort: 0}\n"
        f"relay: {{enabled: true, authSecretFile: {certs / 'turn-secret'},\n"
        f"  metricsAddress: '127.0.0.1:{free_port()}'}}\n"
        f"control: {{enabled: true, address: '127.0.0.1:0', dataDir: {tmp_path / 'data'},\n"
        f"  caFile: {certs / 'ca.crt'}, certFile: {certs / 'meshd-server.crt'},\n"
        f"  keyFile: {certs / 'meshd-server.key'}, revokedFile: {revoked},\n"
        f"  metricsAddress: '127.0.0.1:{free_port()}'}}\n")
    log = tmp_path / "server.log"
    with log.open("ab") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "meshd", "server", "--config",
                                 str(config)], stdout=subprocess.DEVNULL, stderr=stderr)
    try:
        control = logged_port(log, r"control\.listen address=127\.0\.0\.1:(\d+)", proc)
        metrics = logged_port(log, r"control\.metrics address=127\.0\.0\.1:(\d+)", proc)
        relay_metrics = logged_port(log, r"turn\.metrics address=127\.0\.0\.1:(\d+)", proc)
        stun = logged_port(log, r"stun\.listen address=127\.0\.0\.1:(\d+) role=primary", proc)
        asyncio.run(asyncio.wait_for(
            _list_nodes(certs, tmp_path, control, metrics, relay_metrics, stun), 90))
    finally:
        proc.terminate()
        assert proc.wait(20) == 0, log.read_text()
    assert "Traceback" not in log.read_text()


async def _list_nodes(certs: Path, tmp_path: Path, control: int, metrics: int,
                      relay_metrics: int, stun: int) -> None:
    one, two = NodeAgent(certs, "edge-1", control, 1), NodeAgent(certs, "edge-2", control, 2)
    endpoint = None
    try:
        w1, w2 = await one.welcomed(), await two.welcomed()
        assert w1.turn is not None
        # edge-1 holds one allocation on the relay of the same process.
        endpoint = await TurnEndpoint.open(("127.0.0.1", stun), w1.turn.credentials(),
                                           local_ip="127.0.0.1")
        await endpoint.allocate(timeout=10)

        status, doc = await asyncio.to_thread(fetch, f"http://127.0.0.1:{metrics}/nodes")
        assert status == 200, doc
        assert doc["relay"] is True and doc["revocations"] == {"nodes": ["edge-9"],
                                                              "serials": []}
        nodes = {n["node"]: n for n in doc["nodes"]}
        assert set(nodes) == {"edge-1", "edge-2", "edge-9"}
        for node, welcome in (("edge-1", w1), ("edge-2", w2)):
            entry = nodes[node]
            assert entry["state"] == "online" and entry["overlay"] == str(welcome.overlay.ip)
            session = entry["session"]
            assert session["remote"].startswith("127.0.0.1:")
            assert session["serial"] == kubeconfig_serial(certs / f"{node}.kubeconfig")
            assert session["notAfter"] > time.time() and session["software"].startswith("meshd")
            assert session["version"] == 2 and session["endedAt"] is None
        assert (nodes["edge-1"]["relayAllocations"], nodes["edge-2"]["relayAllocations"]) == (1, 0)
        assert nodes["edge-9"] == {"node": "edge-9", "overlay": None, "state": "revoked",
                                   "online": False, "staticKey": None, "nat": None,
                                   "session": None, "revokedBy": ["edge-9"],
                                   "relayAllocations": 0}
        # The relay's metrics listener serves the same list.
        status, same = await asyncio.to_thread(fetch, f"http://127.0.0.1:{relay_metrics}/nodes")
        assert status == 200 and [n["node"] for n in same["nodes"]] == sorted(nodes)
        status, error = await asyncio.to_thread(fetch,
                                                f"http://127.0.0.1:{metrics}/nodes?sort=name")
        assert (status, error) == (400, {"error": "unknown query parameter 'sort' (known: "
                                                  "state)"})

        # meshd nodes: the table, the JSON, the address from the configuration.
        result = await asyncio.to_thread(meshd, "nodes", "--address", f"127.0.0.1:{metrics}")
        assert result.returncode == 0, result.stderr
        lines = result.stdout.splitlines()
        assert lines[0].startswith("3 node(s): 2 online, 0 offline, 1 revoked; overlay "
                                   "100.64.0.0/16; relay in this server"), lines
        assert lines[1].split() == ["NAME", "OVERLAY", "STATE", "SINCE", "NAT", "ENDPOINT",
                                    "RELAY", "REVOKED"]
        row = lines[2].split()
        assert row[:3] == ["edge-1", str(w1.overlay.ip), "online"] and row[-2:] == ["1", "-"]
        assert row[6].startswith("127.0.0.1:")
        assert lines[4].split() == ["edge-9", "-", "revoked", "-", "-", "-", "0", "edge-9"]
        client_config = tmp_path / "client.yaml"
        client_config.write_text(f"control: {{metricsAddress: '0.0.0.0:{metrics}'}}\n")
        result = await asyncio.to_thread(meshd, "nodes", "--json", "--config",
                                         str(client_config))
        assert result.returncode == 0, result.stderr
        assert [n["node"] for n in json.loads(result.stdout)["nodes"]] == sorted(nodes)

        # edge-2 goes away: offline, with when and why.
        await two.connector.close()
        deadline = time.monotonic() + 10
        while True:
            status, doc = await asyncio.to_thread(fetch,
                                                  f"http://127.0.0.1:{metrics}/nodes/edge-2")
            (entry,) = doc["nodes"]
            if entry["state"] == "offline":
                break
            assert time.monotonic() < deadline, entry
            await asyncio.sleep(0.05)
        assert entry["session"]["endReason"] == "connection lost"
        assert entry["session"]["endedAt"] >= entry["session"]["lastSeen"]
    finally:
        if endpoint is not None:
            endpoint.abort()
        await one.connector.close()
        await two.connector.close()


def test_meshd_nodes_without_a_server_exits_1_and_without_an_address_2() -> None:
    port = free_port()
    result = meshd("nodes", "--address", f"127.0.0.1:{port}")
    assert result.returncode == 1
    assert result.stderr.startswith(f"meshd: error: no meshd server answers at "
                                    f"http://127.0.0.1:{port}/nodes: ")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    result = meshd("nodes")
    assert result.returncode == 2
    assert "no server metrics address: give --address HOST:PORT" in result.stderr
    result = meshd("nodes", "--address", "nowhere")
    assert result.returncode == 2 and "--address: no port in 'nowhere'" in result.stderr
