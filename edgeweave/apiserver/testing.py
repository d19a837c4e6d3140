"""A live API server in a background thread, for tests of anything that talks to the API.

`ApiHarness(directory)` creates a CA, a serving certificate for 127.0.0.1, a store and a
server on a free port (TLS, client certificates optional, static tokens for `admin` and node
`n1`), writes `admin.kubeconfig`, and runs the server's asyncio loop in its own thread so that
blocking clients (kubectl subprocesses, the `kubernetes` Python client, `Client` below) can use
it while the test reads the store directly. `close()` stops everything.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import ssl
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

from edgeweave.apiserver.auth import CertOrToken, ClusterAuthorizer
from edgeweave.apiserver.config import ApiServerConfig
from edgeweave.apiserver.server import RunningServer, start_api_server
from edgeweave.kube.store import Store, StoreConfig
from edgeweave.pki import (
    ADMIN,
    CertificateAuthority,
    StaticTokens,
    client_context,
    kubeconfig_document,
    node_identity,
    server_context,
    write_admin_kubeconfig,
    write_kubeconfig,
)

T = TypeVar("T")
ADMIN_TOKEN = "admin-token-0123456789"
NODE_TOKEN = "node-n1-token-0123456789"
TEST_CONFIG = ApiServerConfig(host="127.0.0.1", port=0, bookmark_interval_s=1.0)
"""Loopback, a free port, bookmarks after 1 s of idleness."""


class Response:
    """A buffered HTTP response."""

    def __init__(self, status: int, headers: list[tuple[str, str]], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def header_values(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class Client:
    """A keep-alive HTTPS client with one identity (a client certificate or a token)."""

    def __init__(self, port: int, ctx: ssl.SSLContext, token: str | None = None) -> None:
        self.port = port
        self.ctx = ctx
        self.token = token
        self._conn: http.client.HTTPSConnection | None = None

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        *,
        content_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        data: bytes | None
        if isinstance(body, dict | list):
            data = json.dumps(body).encode()
            content_type = content_type or "application/json"
        else:
            data = body.encode() if isinstance(body, str) else body
        all_headers = dict(headers or {})
        if content_type:
            all_headers["Content-Type"] = content_type
        if self.token:
            all_headers["Authorization"] = f"Bearer {self.token}"
        for attempt in range(2):
            if self._conn is None:
                self._conn = http.client.HTTPSConnection(
                    "127.0.0.1", self.port, context=self.ctx, timeout=30
                )
            try:
                self._conn.request(method, path, body=data, headers=all_headers)
                resp = self._conn.getresponse()
                payload = resp.read()
                return Response(resp.status, resp.getheaders(), payload)
            except (ConnectionError, http.client.HTTPException, ssl.SSLError):
                self._conn.close()
                self._conn = None
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class ApiHarness:
    """The server, its store, its CA and credentials for admin, node n1 and tokens."""

    def __init__(
        self,
        directory: Path,
        config: ApiServerConfig = TEST_CONFIG,
        store_config: StoreConfig | None = None,
    ) -> None:
        self.dir = directory
        self.ca = CertificateAuthority.load_or_create(directory / "pki")
        self.ca_file = directory / "pki" / "ca.crt"
        serving = self.ca.issue_server_cert("apiserver", ips=["127.0.0.1"], dns_names=["localhost"])
        serving.write(directory / "apiserver.crt", directory / "apiserver.key")
        self.ssl = server_context(
            directory / "apiserver.crt", directory / "apiserver.key", client_ca_file=self.ca_file
        )
        self.store = Store(directory / "kube.db", config=store_config or StoreConfig())
        self.tokens = StaticTokens([(ADMIN_TOKEN, ADMIN), (NODE_TOKEN, node_identity("n1"))])
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="apiserver-loop")
        self._thread.start()
        self.server: RunningServer = self.call(
            start_api_server(
                self.store,
                config,
                ssl_context=self.ssl,
                authenticator=CertOrToken(self.tokens),
                authorizer=ClusterAuthorizer(),
            )
        )
        self.url = self.server.url
        self.port = self.server.port
        self.admin_kubeconfig = directory / "admin.kubeconfig"
        admin = write_admin_kubeconfig(self.admin_kubeconfig, self.ca, self.url)
        admin.write(directory / "admin.crt", directory / "admin.key")
        self._clients: list[Client] = []

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        """Run a coroutine on the server's loop and wait for it."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def admin_context(self) -> ssl.SSLContext:
        return client_context(
            self.ca_file, cert_file=self.dir / "admin.crt", key_file=self.dir / "admin.key"
        )

    def node_files(self, node: str) -> tuple[Path, Path]:
        cert, key = self.dir / f"{node}.crt", self.dir / f"{node}.key"
        if not cert.exists():
            self.ca.issue_client_cert(node_identity(node)).write(cert, key)
        return cert, key

    def node_kubeconfig(self, node: str) -> Path:
        path = self.dir / f"{node}.kubeconfig"
        if not path.exists():
            issued = self.ca.issue_client_cert(node_identity(node))
            doc = kubeconfig_document(
                server=self.url, ca_cert_pem=self.ca.cert_pem(), user=f"system:node:{node}",
                client=issued,
            )  # fmt: skip
            write_kubeconfig(path, doc)
        return path

    def client(self, who: str = "admin") -> Client:
        """`admin` (certificate), `node:<name>` (certificate), `token:<token>`, `anonymous`."""
        if who == "admin":
            ctx = self.admin_context()
            token = None
        elif who.startswith("node:"):
            cert, key = self.node_files(who[5:])
            ctx = client_context(self.ca_file, cert_file=cert, key_file=key)
            token = None
        else:
            ctx = client_context(self.ca_file)
            token = who[6:] if who.startswith("token:") else None
        made = Client(self.port, ctx, token)
        self._clients.append(made)
        return made

    def close(self) -> None:
        for c in self._clients:
            c.close()
        try:
            self.call(self.server.close())
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()
            self.store.close()
