"""meshd.control.service: the control channel over real TLS on loopback, with certificates from
a CA minted in a temporary directory (edgeweave.pki)."""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from edgeweave.log import KeyValueFormatter
from edgeweave.pki import (
    ADMIN,
    CertificateAuthority,
    IssuedCert,
    PKIFileError,
    client_context,
    kubeconfig_document,
    node_identity,
    write_kubeconfig,
)
from meshd.control.client import (
    ClientState,
    ControlClient,
    ControlClientConfig,
    ControlEvent,
    ControlNotReady,
    Disconnected,
    PeersChanged,
    ServerError,
    SignalReceived,
    Welcomed,
)
from meshd.control.registry import REGISTRY_FILE, JsonRegistryStore
from meshd.control.server import ControlServer, ControlServerConfig
from meshd.control.service import (
    ControlConnector,
    ControlService,
    RefusalLog,
    agent_tls_context,
    server_tls_context,
)
from meshd.control.wire import NatSummary
from meshd.turn.credentials import rest_password

SECRET = b"control-test-secret"
E = TypeVar("E", bound=ControlEvent)


@dataclass(frozen=True)
class Pki:
    dir: Path
    ca: Path
    authority: CertificateAuthority

    def file(self, name: str) -> Path:
        return self.dir / name


def _write(d: Path, name: str, issued: IssuedCert) -> None:
    issued.write(d / f"{name}.crt", d / f"{name}.key")


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("control-pki")
    ca, other = CertificateAuthority.generate(), CertificateAuthority.generate()
    (d / "ca.crt").write_bytes(ca.cert_pem())
    (d / "other-ca.crt").write_bytes(other.cert_pem())
    _write(d, "server", ca.issue_server_cert("meshd-server", ips=["127.0.0.1"]))
    _write(d, "server-other-ip", ca.issue_server_cert("meshd-server", ips=["127.0.0.2"]))
    _write(d, "foreign-server", other.issue_server_cert("meshd-server", ips=["127.0.0.1"]))
    _write(d, "foreign-node", other.issue_client_cert(node_identity("edge-1")))
    _write(d, "expired-node", ca.issue_client_cert(
        node_identity("edge-1"), validity=dt.timedelta(days=1),
        now=dt.datetime.now(dt.UTC) - dt.timedelta(days=30)))
    _write(d, "admin", ca.issue_client_cert(ADMIN))
    for node in ("edge-1", "edge-2", "edge-3"):
        issued = ca.issue_client_cert(node_identity(node))
        _write(d, node, issued)
        # What `cloudcore certs node NAME` writes: the CA and the node's client certificate.
        write_kubeconfig(d / f"{node}.kubeconfig", kubeconfig_document(
            server="https://127.0.0.1:6443", ca_cert_pem=ca.cert_pem(),
            user=f"system:node:{node}", client=issued))
    return Pki(d, d / "ca.crt", ca)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(main(), 60))


def server_core(tmp: Path, **overrides: object) -> ControlServer:
    config = ControlServerConfig(turn_secret=SECRET, **overrides)  # type: ignore[arg-type]
    return ControlServer(config, JsonRegistryStore(tmp / REGISTRY_FILE))


class Agent:
    """A connector plus the queue of its events."""

    def __init__(self, port: int, tls: ssl.SSLContext, key_byte: int, *,
                 host: str = "127.0.0.1") -> None:
        self.events: asyncio.Queue[ControlEvent] = asyncio.Queue()
        config = ControlClientConfig(bytes([key_byte]) * 32, first_retry_s=0.05,
                                     max_retry_s=0.5, connect_timeout_s=2.0)
        self.client = ControlClient(config, random.Random(key_byte))
        self.connector = ControlConnector(self.client, host, port, tls,
                                          on_event=self.events.put_nowait)
        self.connector.start()

    async def next(self, kind: type[E], timeout: float = 5.0) -> E:
        async def wait() -> E:
            while True:
                event = await self.events.get()
                if isinstance(event, kind):
                    return event
        return await asyncio.wait_for(wait(), timeout)


def node_tls(pki: Pki, node: str) -> ssl.SSLContext:
    return agent_tls_context(kubeconfig=pki.file(f"{node}.kubeconfig"))


async def start_service(pki: Pki, core: ControlServer, port: int = 0,
                        cert: str = "server") -> ControlService:
    tls = server_tls_context(pki.file(f"{cert}.crt"), pki.file(f"{cert}.key"), pki.ca)
    return await ControlService.start(core, tls, "127.0.0.1", port)


def test_nodes_with_kubeconfig_certificates_register_and_signal(pki: Pki,
                                                                tmp_path: Path) -> None:
    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        port = service.address[1]
        one = Agent(port, node_tls(pki, "edge-1"), 1)
        two = Agent(port, node_tls(pki, "edge-2"), 2)
        try:
            w1, w2 = await one.next(Welcomed), await two.next(Welcomed)
            assert (w1.node, w2.node) == ("edge-1", "edge-2")
            assert w1.overlay.network == ipaddress.IPv4Network("100.64.0.0/16")
            assert w1.overlay.ip != w2.overlay.ip
            assert w1.turn is not None and w1.turn.username.endswith(":edge-1")
            assert w1.turn.password == rest_password(SECRET, w1.turn.username)
            while "edge-2" not in one.client.peers:
                await one.next(PeersChanged)
            assert one.client.peers["edge-2"].overlay == w2.overlay.ip
            assert one.client.peers["edge-2"].static_key == bytes([2]) * 32
            one.connector.send_signal("edge-2", {"ufrag": "abcd", "gen": 1})
            got = await two.next(SignalReceived)
            assert got == SignalReceived("edge-1", {"ufrag": "abcd", "gen": 1})
            assert core.online() == ["edge-1", "edge-2"]
            assert core.metrics.signals_routed == 1
        finally:
            await one.connector.close()
            await two.connector.close()
            await service.close()

    run(main)


def test_node_cert_from_files_works_too(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        service = await start_service(pki, server_core(tmp_path))
        tls = agent_tls_context(ca_file=pki.ca, cert_file=pki.file("edge-3.crt"),
                                key_file=pki.file("edge-3.key"))
        agent = Agent(service.address[1], tls, 3)
        try:
            assert (await agent.next(Welcomed)).node == "edge-3"
        finally:
            await agent.connector.close()
            await service.close()

    run(main)


@pytest.mark.parametrize("who,why", [
    ("foreign-node", "client certificate refused: unable to get local issuer certificate"),
    ("expired-node", "client certificate refused: certificate has expired"),
    (None, "PEER_DID_NOT_RETURN_A_CERTIFICATE")])
def test_certificate_from_another_ca_expired_or_none_is_refused_at_the_handshake(
        pki: Pki, tmp_path: Path, who: str | None, why: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.control")

    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        if who is None:
            tls = client_context(pki.ca)
        else:
            tls = client_context(pki.ca, cert_file=pki.file(f"{who}.crt"),
                                 key_file=pki.file(f"{who}.key"))
        agent = Agent(service.address[1], tls, 9)
        try:
            while core.metrics.auth_failures < 2:  # refused, and refused again on the retry
                await asyncio.sleep(0.02)
            assert core.metrics.connections_total == 0  # never got past TLS
            assert core.metrics.hellos == 0
            assert agent.client.sessions == 0
            assert agent.client.state in (ClientState.BACKOFF, ClientState.CONNECTING,
                                          ClientState.HELLO_SENT)
            with pytest.raises(ControlNotReady):
                agent.connector.send_signal("edge-2", {})
            while agent.client.refusals < 1:  # TLS 1.3: the agent learns it after its hello
                await asyncio.sleep(0.02)
        finally:
            await agent.connector.close()
            await service.close()

    run(main)
    # The server's log names the peer and says why; the agent's says it was refused and why.
    lines = [(r.levelno, KeyValueFormatter().format(r)) for r in caplog.records]
    refused = [line for _, line in lines if " control.tls_refused peer=" in line]
    assert refused and all("peer=127.0.0.1:" in m and why in m for m in refused), refused
    agent_side = [(level, line) for level, line in lines if " control.refused " in line]
    assert agent_side[0][0] == logging.WARNING
    assert "did not accept this node's certificate" in agent_side[0][1]


def test_a_session_ends_when_the_certificate_expires_and_refusals_are_logged_once(
        pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "meshd.control")
    ca = pki.authority
    now = dt.datetime.now(dt.UTC)
    _write(pki.dir, "short-node", ca.issue_client_cert(  # valid for 2 more seconds
        node_identity("edge-3"), validity=dt.timedelta(hours=1, seconds=2),
        now=now - dt.timedelta(hours=1)))

    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        tls = client_context(pki.ca, cert_file=pki.file("short-node.crt"),
                             key_file=pki.file("short-node.key"))
        agent = Agent(service.address[1], tls, 3)
        try:
            welcomed = await agent.next(Welcomed)
            assert welcomed.turn is not None
            assert welcomed.turn.expires_at <= now.timestamp() + 3  # not beyond the identity
            error = await agent.next(ServerError, timeout=6.0)
            assert error.code == "certificate-expired"
            while core.metrics.auth_failures < 3:  # its retries fail the handshake now
                await asyncio.sleep(0.05)
            assert core.online() == []
        finally:
            await agent.connector.close()
            await service.close()

    run(main)
    lines = [KeyValueFormatter().format(r) for r in caplog.records]
    assert any(" control.certificate_expired " in line and "node=edge-3" in line
               for line in lines), lines
    warned = [line for line in lines if " control.tls_refused " in line]
    assert len(warned) == 1 and "certificate has expired" in warned[0], warned


def test_refusals_are_warned_about_once_per_window_per_host() -> None:
    refusals = RefusalLog(window_s=60.0, hosts=2)
    assert refusals.refused("10.0.0.1", 0.0) == 1
    assert refusals.refused("10.0.0.1", 5.0) is None
    assert refusals.refused("10.0.0.1", 59.0) is None
    assert refusals.refused("10.0.0.2", 59.0) == 1  # another host is its own
    assert refusals.refused("10.0.0.1", 61.0) == 3  # the two counted and this one
    assert refusals.refused("10.0.0.1", 62.0) is None
    assert refusals.refused("10.0.0.3", 63.0) == 1  # full: the oldest (10.0.0.2) goes
    assert refusals.refused("10.0.0.2", 64.0) == 1
    assert refusals.refused("10.0.0.1", 64.0) == 1  # pushed out by 10.0.0.2: forgotten


def test_a_ca_certificate_that_names_no_node_is_refused(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        tls = client_context(pki.ca, cert_file=pki.file("admin.crt"),
                             key_file=pki.file("admin.key"))
        agent = Agent(service.address[1], tls, 9)
        try:
            error = await agent.next(ServerError)
            assert error.code == "unauthorized"
            assert core.metrics.auth_failures >= 1 and core.metrics.hellos == 0
            while agent.client.refusals < 1:
                await asyncio.sleep(0.02)
            assert agent.client.last_error == ("refused by the server: unauthorized: the "
                                               "client certificate names no node")
        finally:
            await agent.connector.close()
            await service.close()

    run(main)


@pytest.mark.parametrize("cert", ["foreign-server", "server-other-ip"])
def test_agent_checks_the_server_certificate(pki: Pki, tmp_path: Path, cert: str) -> None:
    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core, cert=cert)
        agent = Agent(service.address[1], node_tls(pki, "edge-1"), 1)
        try:
            while agent.client.failures < 2:
                await asyncio.sleep(0.02)
            assert agent.client.sessions == 0 and core.metrics.hellos == 0
            assert agent.client.last_error is not None
            assert agent.client.last_error.startswith("server certificate refused: ")
            assert agent.client.refusals == 0  # we refused it, not the other way round
        finally:
            await agent.connector.close()
            await service.close()

    run(main)


def test_server_restart_clients_reregister_fast_with_the_same_addresses(
        pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        service = await start_service(pki, server_core(tmp_path))
        port = service.address[1]
        one = Agent(port, node_tls(pki, "edge-1"), 1)
        two = Agent(port, node_tls(pki, "edge-2"), 2)
        try:
            before = {(await one.next(Welcomed)).overlay, (await two.next(Welcomed)).overlay}
            await service.close()
            await one.next(Disconnected)
            await two.next(Disconnected)
            stopped = loop.time()
            await asyncio.sleep(0.3)  # the server is down for a moment
            service = await start_service(pki, server_core(tmp_path), port)
            again = {(await one.next(Welcomed)).overlay, (await two.next(Welcomed)).overlay}
            assert loop.time() - stopped < 2.0
            assert again == before
            assert one.client.sessions == two.client.sessions == 2
            while not (one.client.peers.get("edge-2") and one.client.peers["edge-2"].online):
                await one.next(PeersChanged)
        finally:
            await one.connector.close()
            await two.connector.close()
            await service.close()

    run(main)


def test_a_restarted_agent_learns_its_stored_nat_from_the_welcome(pki: Pki,
                                                                  tmp_path: Path) -> None:
    """Agent and server both restart; the registry file kept the NAT the agent reported."""
    stored = NatSummary("port-restricted", "endpoint-independent", "address-and-port-dependent")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        port = service.address[1]
        one = Agent(port, node_tls(pki, "edge-1"), 1)
        again: Agent | None = None
        try:
            assert (await one.next(Welcomed)).nat is None  # a new node: nothing stored
            one.client.report_nat(stored, loop.time())
            one.connector.flush()
            deadline = loop.time() + 5.0
            while (record := core.registry.get("edge-1")) is None or record.nat != stored:
                assert loop.time() < deadline, "the nat message never reached the registry"
                await asyncio.sleep(0.02)
            await one.connector.close()
            await service.close()
            service = await start_service(pki, server_core(tmp_path), port)
            again = Agent(port, node_tls(pki, "edge-1"), 1)  # a fresh agent process
            welcomed = await again.next(Welcomed)
            assert welcomed.nat == stored and again.client.nat is None
            assert (again.client.effective_nat, again.client.nat_source) == (stored, "stored")
        finally:
            await one.connector.close()
            if again is not None:
                await again.connector.close()
            await service.close()

    run(main)


def test_a_second_connection_of_a_node_replaces_the_first(pki: Pki, tmp_path: Path) -> None:
    async def main() -> None:
        core = server_core(tmp_path)
        service = await start_service(pki, core)
        port = service.address[1]
        first = Agent(port, node_tls(pki, "edge-1"), 1)
        try:
            await first.next(Welcomed)
            second = Agent(port, node_tls(pki, "edge-1"), 1)
            await second.next(Welcomed)
            assert (await first.next(ServerError)).code == "replaced"
            await first.connector.close()  # the old agent is gone for good
            assert core.metrics.sessions_replaced >= 1
            await asyncio.sleep(0.1)
            assert core.online() == ["edge-1"]
            await second.connector.close()
        finally:
            await first.connector.close()
            await service.close()

    run(main)


def test_agent_tls_context_refuses_what_cannot_authenticate(pki: Pki, tmp_path: Path) -> None:
    insecure = tmp_path / "insecure.kubeconfig"
    insecure.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: c\n"
        "clusters: [{name: k, cluster: {server: 'https://127.0.0.1:1', "
        "insecure-skip-tls-verify: true}}]\n"
        "users: [{name: u, user: {token: t}}]\n"
        "contexts: [{name: c, context: {cluster: k, user: u}}]\n")
    with pytest.raises(ValueError, match="insecure"):
        agent_tls_context(kubeconfig=insecure)
    with pytest.raises(ValueError):
        agent_tls_context(ca_file=pki.ca)
    with pytest.raises(ValueError):
        agent_tls_context(kubeconfig=pki.file("edge-1.kubeconfig"), ca_file=pki.ca)
    with pytest.raises(PKIFileError):
        agent_tls_context(ca_file=pki.ca, cert_file=tmp_path / "nope.crt",
                          key_file=tmp_path / "nope.key")
