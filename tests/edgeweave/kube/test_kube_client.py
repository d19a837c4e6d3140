"""edgeweave.kube.client, informer and cloudcore's controllers against a Kubernetes REST server.

`FakeApi` below is test scaffolding: the least of the Kubernetes REST protocol (list, get,
create, update, patch, delete, deletecollection, `?watch=1` as chunked JSON lines with
BOOKMARKs and a 410 ERROR event, `pods/binding`, Status errors, client-certificate and token
auth) over the *real* `edgeweave.kube.store.Store`, on 127.0.0.1. It can drop every watch
connection and refuse new watches (503), to test reconnection. The real API server lives in
`edgeweave/apiserver/`.

Timings are shortened through the clients' config objects; waits poll with short sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import socket
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from cloudcore.controllers.deployment import POD_TEMPLATE_HASH
from cloudcore.controllers.endpoints import MANAGED_BY, MANAGED_BY_LABEL, SERVICE_NAME_LABEL
from cloudcore.controllers.manager import ControllerManager, ManagerConfig
from cloudcore.controllers.nodegroup import BELONGING_TO
from cloudcore.controllers.runner import RunnerConfig
from edgeweave.kube import errors
from edgeweave.kube.client import (
    ClientConfig,
    DeletePreconditions,
    KubeClient,
    KubeConnectionError,
    RetryPolicy,
    Unauthorized,
    WatchEvent,
)
from edgeweave.kube.errors import StoreError
from edgeweave.kube.informer import Change, Informer, InformerConfig
from edgeweave.kube.patch import JSON_PATCH, STRATEGIC_MERGE_PATCH
from edgeweave.kube.resources import (
    CONFIGMAPS,
    DEFAULT_REGISTRY,
    DEPLOYMENTS,
    ENDPOINTS,
    ENDPOINTSLICES,
    NODEGROUPS,
    NODES,
    PODS,
    SERVICES,
    ResourceInfo,
)
from edgeweave.kube.store import Commit, Preconditions, Store
from edgeweave.pki import (
    ADMIN,
    CertificateAuthority,
    ClientAuth,
    bearer_token,
    kubeconfig_document,
    peer_identity,
    server_context,
    write_admin_kubeconfig,
    write_kubeconfig,
)

Obj = dict[str, Any]
FAST_RETRY = RetryPolicy(initial_s=0.01, max_s=0.05, jitter=0.0)
FAST_CLIENT = ClientConfig(watch_timeout_s=30, watch_retry=FAST_RETRY, request_timeout_s=5)
FAST_INFORMER = InformerConfig(page_size=2, retry=FAST_RETRY)


# ---- the test server --------------------------------------------------------------------------


class FakeApi:
    """Kubernetes REST over a Store (test scaffolding; see the module docstring)."""

    def __init__(
        self,
        store: Store,
        *,
        tokens: tuple[str, ...] = (),
        require_auth: bool = False,
        serve_binding: bool = True,
        bookmark_interval_s: float = 0.2,
    ) -> None:
        self.store = store
        self.tokens = tokens
        self.require_auth = require_auth
        self.serve_binding = serve_binding
        self.bookmark_interval_s = bookmark_interval_s
        self.reject_watches = False
        self.watch_requests = 0
        self._wakers: set[asyncio.Event] = set()
        self._transports: set[asyncio.Transport] = set()
        self._runner: web.AppRunner | None = None
        self._unsubscribe: Callable[[], None] | None = None

    async def start(self, ssl_context: ssl.SSLContext | None = None) -> str:
        loop = asyncio.get_running_loop()

        def on_commit(commit: Commit) -> None:
            loop.call_soon_threadsafe(self._wake_all)

        self._unsubscribe = self.store.subscribe(on_commit)
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self._runner = web.AppRunner(app, shutdown_timeout=0.1, access_log=None)
        await self._runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        await web.SockSite(self._runner, sock, ssl_context=ssl_context).start()
        return f"{'https' if ssl_context else 'http'}://127.0.0.1:{port}"

    async def close(self) -> None:
        self.drop_watches()
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._runner is not None:
            await self._runner.cleanup()

    def _wake_all(self) -> None:
        for waker in list(self._wakers):
            waker.set()

    def drop_watches(self) -> None:
        """Cut every open watch connection (no clean end of stream)."""
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    # ---- request handling ---------------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse:
        try:
            self._authenticate(request)
            res, ns, name, sub = self._route(request.path)
            query = request.query
            if request.method == "GET":
                if name is None and query.get("watch") in ("1", "true"):
                    return await self._watch(request, res, ns)
                if name is None:
                    listed = self.store.list_objects(
                        res,
                        namespace=ns,
                        label_selector=query.get("labelSelector"),
                        field_selector=query.get("fieldSelector"),
                        limit=int(query["limit"]) if query.get("limit") else None,
                        continue_token=query.get("continue"),
                    )
                    return web.Response(text=listed.to_json(res), content_type="application/json")
                return self._json(self.store.get(res, name, namespace=ns))
            body = await self._body(request)
            if request.method == "POST" and sub == "binding" and name is not None:
                if not self.serve_binding:
                    raise errors.NotFound("the server could not find the requested resource")
                return self._bind(ns or "", name, body)
            if request.method == "POST" and name is None:
                return self._json(self.store.create(res, body, namespace=ns), 201)
            if request.method == "PUT" and name is not None:
                updated = self.store.update(
                    res, body, namespace=ns, name=name, subresource="status" if sub else None
                )
                return self._json(updated)
            if request.method == "PATCH" and name is not None:
                patched = self.store.patch(
                    res,
                    name,
                    request.content_type,
                    body,
                    namespace=ns,
                    subresource="status" if sub else None,
                )
                return self._json(patched)
            if request.method == "DELETE":
                options = body if isinstance(body, dict) else {}
                pre = options.get("preconditions") or {}
                if name is None:
                    gone = self.store.delete_collection(
                        res,
                        namespace=ns,
                        label_selector=query.get("labelSelector"),
                        field_selector=query.get("fieldSelector"),
                    )
                    return self._json({"kind": res.list_kind, "items": [d.object for d in gone]})
                deleted = self.store.delete(
                    res,
                    name,
                    namespace=ns,
                    preconditions=Preconditions(pre.get("uid"), pre.get("resourceVersion")),
                    grace_period_seconds=options.get("gracePeriodSeconds"),
                )
                return self._json(deleted.object)
            raise errors.StoreError(f"{request.method} is not supported here")
        except StoreError as exc:
            return self._json(exc.to_status(), exc.code)

    def _authenticate(self, request: web.Request) -> None:
        if not self.require_auth:
            return
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        if peer_identity(peercert) is not None:
            return
        token = bearer_token(request.headers.get("Authorization", ""))
        if token is not None and token in self.tokens:
            return
        raise _Unauthorized("Unauthorized")

    def _route(self, path: str) -> tuple[ResourceInfo, str | None, str | None, str | None]:
        parts = [p for p in path.split("/") if p]
        if len(parts) >= 2 and parts[0] == "api":
            group, version, rest = "", parts[1], parts[2:]
        elif len(parts) >= 3 and parts[0] == "apis":
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise errors.NotFound("the server could not find the requested resource")
        ns = None
        if len(rest) >= 3 and rest[0] == "namespaces":
            ns, rest = rest[1], rest[2:]
        res = DEFAULT_REGISTRY.get(group, version, rest[0]) if rest else None
        if res is None or len(rest) > 3:
            raise errors.NotFound("the server could not find the requested resource")
        name = rest[1] if len(rest) > 1 else None
        sub = rest[2] if len(rest) > 2 else None
        return res, ns, name, sub

    @staticmethod
    async def _body(request: web.Request) -> Any:
        raw = await request.read()
        return json.loads(raw) if raw else None

    @staticmethod
    def _json(obj: Any, status: int = 200) -> web.Response:
        return web.Response(text=json.dumps(obj), status=status, content_type="application/json")

    def _bind(self, ns: str, name: str, body: Obj) -> web.Response:
        target = body["target"]["name"]
        uid = (body.get("metadata") or {}).get("uid")

        def assign(pod: Obj) -> Obj:
            if uid and pod["metadata"]["uid"] != uid:
                raise errors.conflict("pods", name, "Precondition failed: UID mismatch")
            if pod["spec"].get("nodeName"):
                raise errors.conflict(
                    "pods",
                    name,
                    f"pod {name} is already assigned to node {pod['spec']['nodeName']}",
                )
            pod["spec"]["nodeName"] = target
            return pod

        self.store.guaranteed_update(PODS, name, assign, namespace=ns)
        return self._json(
            {"kind": "Status", "apiVersion": "v1", "status": "Success", "code": 201}, 201
        )

    async def _watch(
        self, request: web.Request, res: ResourceInfo, ns: str | None
    ) -> web.StreamResponse:
        self.watch_requests += 1
        if self.reject_watches:
            raise _Unavailable("watches are paused")
        query = request.query
        rv = query.get("resourceVersion")
        timeout = float(query.get("timeoutSeconds") or 60)
        bookmarks = query.get("allowWatchBookmarks") == "true"
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        waker = asyncio.Event()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        transport = request.transport
        if transport is not None:
            self._transports.add(transport)
        self._wakers.add(waker)
        try:
            try:
                cursor = self.store.watch(
                    res,
                    resource_version=int(rv) if rv and rv != "0" else None,
                    namespace=ns,
                    label_selector=query.get("labelSelector"),
                    field_selector=query.get("fieldSelector"),
                )
            except errors.Gone as exc:  # Kubernetes answers 200 and one ERROR event
                await resp.write(_event_line("ERROR", exc.to_status()))
                return resp
            while True:
                waker.clear()
                try:
                    events = cursor.poll()
                except errors.Gone as exc:
                    await resp.write(_event_line("ERROR", exc.to_status()))
                    return resp
                for ev in events:
                    await resp.write((ev.to_json() + "\n").encode())
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    await asyncio.wait_for(waker.wait(), min(remaining, self.bookmark_interval_s))
                except TimeoutError:
                    if bookmarks:
                        mark = {
                            "kind": res.kind,
                            "apiVersion": res.api_version,
                            "metadata": {"resourceVersion": str(cursor.revision)},
                        }
                        await resp.write(_event_line("BOOKMARK", mark))
            await resp.write_eof()
        except (ConnectionError, RuntimeError):
            pass  # the connection was cut (drop_watches) or the client left
        finally:
            self._wakers.discard(waker)
            if transport is not None:
                self._transports.discard(transport)
        return resp


class _Unauthorized(StoreError):
    code = 401
    reason = "Unauthorized"


class _Unavailable(StoreError):
    code = 503
    reason = "ServiceUnavailable"


def _event_line(type_: str, obj: Obj) -> bytes:
    return (json.dumps({"type": type_, "object": obj}) + "\n").encode()


# ---- fixtures and helpers ---------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    store: Store
    api: FakeApi
    client: KubeClient


@contextlib.asynccontextmanager
async def serving(
    tmp_path: Path, *, config: ClientConfig = FAST_CLIENT, **api_options: Any
) -> AsyncIterator[Env]:
    with Store(tmp_path / "kube.db") as store:
        api = FakeApi(store, **api_options)
        url = await api.start()
        client = KubeClient(url, config=config)
        try:
            yield Env(store, api, client)
        finally:
            await client.close()
            await api.close()


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 10.0) -> None:
    """Poll `check` every 10 ms until it is true; fail after `timeout`."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        outcome = check()
        if isinstance(outcome, Awaitable):
            outcome = await outcome
        if outcome:
            return
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout}s: {check}")
        await asyncio.sleep(0.01)


def cm(name: str, value: str = "1") -> Obj:
    return {"metadata": {"name": name, "labels": {"app": "demo"}}, "data": {"v": value}}


async def take(
    events: AsyncIterator[WatchEvent], n: int, *, skip_bookmarks: bool = True
) -> list[WatchEvent]:
    out: list[WatchEvent] = []
    while len(out) < n:
        ev = await asyncio.wait_for(events.__anext__(), 5)
        if ev.type == "BOOKMARK" and skip_bookmarks:
            continue
        out.append(ev)
    return out


def run(coro: Awaitable[None]) -> None:
    asyncio.run(asyncio.wait_for(coro, 30))


# ---- client: verbs and errors -----------------------------------------------------------------


def test_kube_client_crud_and_typed_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            made = await c.create(CONFIGMAPS, cm("a"), namespace="default")
            assert made["metadata"]["uid"] and made["kind"] == "ConfigMap"
            with pytest.raises(errors.AlreadyExists) as exists:
                await c.create(CONFIGMAPS, cm("a"), namespace="default")
            assert exists.value.name == "a" and exists.value.kind == "configmaps"
            got = await c.get(CONFIGMAPS, "a", namespace="default")
            assert got == made
            updated = await c.update(CONFIGMAPS, {**got, "data": {"v": "2"}})
            with pytest.raises(errors.Conflict, match="the object has been modified"):
                await c.update(CONFIGMAPS, {**got, "data": {"v": "3"}})
            merged = await c.patch(CONFIGMAPS, "a", {"data": {"w": "x"}}, namespace="default")
            assert merged["data"] == {"v": "2", "w": "x"}
            jsoned = await c.patch(
                CONFIGMAPS,
                "a",
                [{"op": "remove", "path": "/data/w"}],
                namespace="default",
                content_type=JSON_PATCH,
            )
            assert jsoned["data"] == {"v": "2"}
            assert int(jsoned["metadata"]["resourceVersion"]) > int(
                updated["metadata"]["resourceVersion"]
            )
            await c.create(NODEGROUPS, {"metadata": {"name": "g"}})
            with pytest.raises(errors.UnsupportedMediaType):
                await c.patch(NODEGROUPS, "g", {}, content_type=STRATEGIC_MERGE_PATCH)
            with pytest.raises(errors.Invalid) as bad:
                await c.create(CONFIGMAPS, cm("Not_A_Name"), namespace="default")
            assert bad.value.causes[0].field == "metadata.name"
            with pytest.raises(errors.NotFound, match='configmaps "zz" not found'):
                await c.get(CONFIGMAPS, "zz", namespace="default")
            with pytest.raises(errors.BadRequest):
                await c.list(CONFIGMAPS, label_selector="a in (")
            for name in ("b", "c", "d"):
                await c.create(CONFIGMAPS, cm(name), namespace="default")
            page = await c.list(CONFIGMAPS, namespace="default", limit=2)
            assert [i["metadata"]["name"] for i in page.items] == ["a", "b"] and page.continue_token
            everything = await c.list_all(CONFIGMAPS, namespace="default", page_size=3)
            assert [i["metadata"]["name"] for i in everything.items] == ["a", "b", "c", "d"]
            assert (
                everything.resource_version == page.resource_version or everything.resource_version
            )
            with pytest.raises(errors.Conflict, match="Precondition failed"):
                await c.delete(CONFIGMAPS, "a", namespace="default", preconditions=_uid("wrong"))
            deleted = await c.delete(
                CONFIGMAPS, "a", namespace="default", preconditions=_uid(made["metadata"]["uid"])
            )
            assert deleted["metadata"]["name"] == "a"
            await c.delete_collection(CONFIGMAPS, namespace="default", label_selector="app=demo")
            assert (await c.list(CONFIGMAPS, namespace="default")).items == []
            node = await c.create(NODES, {"metadata": {"name": "n1"}, "status": {"phase": "x"}})
            status = await c.update_status(
                NODES, {**node, "status": {"conditions": [{"type": "Ready", "status": "True"}]}}
            )
            assert status["status"]["conditions"][0]["type"] == "Ready"

    run(main())


def _uid(uid: str) -> DeletePreconditions:
    return DeletePreconditions(uid=uid)


def test_kube_client_unreachable_server_is_a_connection_error() -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()  # nothing listens there now
        async with KubeClient(f"http://127.0.0.1:{port}", config=FAST_CLIENT) as client:
            with pytest.raises(KubeConnectionError, match=f"127.0.0.1:{port}"):
                await client.get(PODS, "x", namespace="default")
            watch = client.watch(PODS, reconnect=False)
            with pytest.raises(KubeConnectionError):
                await watch.__anext__()

    run(main())


# ---- client: TLS and kubeconfig ---------------------------------------------------------------


def test_kube_client_kubeconfig_cert_and_token_users_over_tls(tmp_path: Path) -> None:
    ca = CertificateAuthority.generate()
    serving_cert = ca.issue_server_cert("apiserver", ips=["127.0.0.1"])
    serving_cert.write(tmp_path / "server.crt", tmp_path / "server.key")
    (tmp_path / "ca.crt").write_bytes(ca.cert_pem())
    ctx = server_context(
        tmp_path / "server.crt",
        tmp_path / "server.key",
        client_ca_file=tmp_path / "ca.crt",
        client_auth=ClientAuth.OPTIONAL,
    )

    async def main() -> None:
        with Store(tmp_path / "kube.db") as store:
            api = FakeApi(store, tokens=("good-token",), require_auth=True)
            url = await api.start(ssl_context=ctx)
            try:
                admin = tmp_path / "admin.kubeconfig"
                write_admin_kubeconfig(admin, ca, url)
                async with KubeClient.from_kubeconfig(admin, config=FAST_CLIENT) as client:
                    await client.create(CONFIGMAPS, cm("tls"), namespace="default")
                    listed = await client.list(CONFIGMAPS, namespace="default")
                    assert [i["metadata"]["name"] for i in listed.items] == ["tls"]
                    async with client.watch(
                        CONFIGMAPS, namespace="default", resource_version=listed.resource_version
                    ) as watch:
                        await client.create(CONFIGMAPS, cm("tls2"), namespace="default")
                        (ev,) = await take(watch, 1)
                        assert ev.type == "ADDED" and ev.object["metadata"]["name"] == "tls2"
                # What cloudcore does: a manager with its own client from the kubeconfig.
                manager = await ControllerManager.from_kubeconfig(
                    admin,
                    config=manager_config(controllers=("nodegroup",)),
                    client_config=FAST_CLIENT,
                )
                async with manager:
                    store.create(NODES, node("edge-9"))
                    store.create(
                        NODEGROUPS, {"metadata": {"name": "g"}, "spec": {"nodes": ["edge-9"]}}
                    )
                    await eventually(
                        lambda: (
                            store.get(NODES, "edge-9")["metadata"]["labels"].get(BELONGING_TO)
                            == "g"
                        )
                    )
                for token, ok in (("good-token", True), ("bad-token", False)):
                    path = tmp_path / f"{token}.kubeconfig"
                    write_kubeconfig(
                        path,
                        kubeconfig_document(
                            server=url, ca_cert_pem=ca.cert_pem(), user="bob", token=token
                        ),
                    )
                    async with KubeClient.from_kubeconfig(path, config=FAST_CLIENT) as client:
                        if ok:
                            await client.get(CONFIGMAPS, "tls", namespace="default")
                        else:
                            with pytest.raises(Unauthorized):
                                await client.get(CONFIGMAPS, "tls", namespace="default")
                other_ca = CertificateAuthority.generate()
                stranger = tmp_path / "stranger.kubeconfig"
                write_kubeconfig(
                    stranger,
                    kubeconfig_document(
                        server=url,
                        ca_cert_pem=other_ca.cert_pem(),
                        user="x",
                        client=other_ca.issue_client_cert(ADMIN),
                    ),
                )
                async with KubeClient.from_kubeconfig(stranger, config=FAST_CLIENT) as client:
                    with pytest.raises(
                        KubeConnectionError,
                        match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed",
                    ):
                        await client.get(CONFIGMAPS, "tls", namespace="default")
            finally:
                await api.close()

    run(main())


# ---- watch ------------------------------------------------------------------------------------


def test_kube_client_watch_resumes_after_server_timeout(tmp_path: Path) -> None:
    config = dataclasses.replace(FAST_CLIENT, watch_timeout_s=1)

    async def main() -> None:
        async with serving(tmp_path, config=config, bookmark_interval_s=0.1) as env:
            c = env.client
            await c.create(CONFIGMAPS, cm("before"), namespace="default")
            listed = await c.list(CONFIGMAPS, namespace="default")
            async with c.watch(
                CONFIGMAPS, namespace="default", resource_version=listed.resource_version
            ) as watch:
                got: list[WatchEvent] = []

                async def consume() -> None:
                    async for ev in watch:
                        if ev.type != "BOOKMARK":
                            got.append(ev)

                consumer = asyncio.ensure_future(consume())
                await c.create(CONFIGMAPS, cm("one"), namespace="default")
                await eventually(lambda: len(got) == 1)
                # The server ends each stream after timeoutSeconds=1; the watch goes on from
                # the last version it saw, with nothing repeated.
                await eventually(lambda: watch.stats.clean_ends >= 1)
                await c.create(CONFIGMAPS, cm("two"), namespace="default")
                await c.patch(CONFIGMAPS, "one", {"data": {"v": "9"}}, namespace="default")
                await c.delete(CONFIGMAPS, "before", namespace="default")
                await eventually(lambda: len(got) == 4)
                consumer.cancel()
                assert [(e.type, e.object["metadata"]["name"]) for e in got] == [
                    ("ADDED", "one"),
                    ("ADDED", "two"),
                    ("MODIFIED", "one"),
                    ("DELETED", "before"),
                ]
                assert watch.stats.connects >= 2 and watch.stats.bookmarks >= 1
                assert watch.resource_version == str(env.store.revision)

    run(main())


def test_kube_client_watch_too_old_version_raises_gone(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            await env.client.create(CONFIGMAPS, cm("a"), namespace="default")
            old = str(env.store.revision - 1)
            await env.client.create(CONFIGMAPS, cm("b"), namespace="default")
            env.store.compact(env.store.revision)
            async with env.client.watch(CONFIGMAPS, resource_version=old) as watch:
                with pytest.raises(errors.Gone, match="too old resource version"):
                    await watch.__anext__()

    run(main())


def test_kube_client_watch_reconnects_without_missing_events(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            listed = await c.list(CONFIGMAPS, namespace="default")
            async with c.watch(
                CONFIGMAPS, namespace="default", resource_version=listed.resource_version
            ) as watch:
                await c.create(CONFIGMAPS, cm("a"), namespace="default")
                assert [e.object["metadata"]["name"] for e in await take(watch, 1)] == ["a"]
                env.api.reject_watches = True  # new watches get 503 for a while ...
                env.api.drop_watches()  # ... and the current connection is cut
                next_event = asyncio.ensure_future(take(watch, 4))
                await eventually(lambda: watch.stats.failures >= 2)
                for name in ("b", "c"):
                    await c.create(CONFIGMAPS, cm(name), namespace="default")
                await c.patch(CONFIGMAPS, "a", {"data": {"v": "2"}}, namespace="default")
                await c.delete(CONFIGMAPS, "b", namespace="default")
                env.api.reject_watches = False
                events = await next_event
                assert [(e.type, e.object["metadata"]["name"]) for e in events] == [
                    ("ADDED", "b"),
                    ("ADDED", "c"),
                    ("MODIFIED", "a"),
                    ("DELETED", "b"),
                ]
                assert watch.stats.connects == 2

    run(main())


def test_kube_client_watch_garbage_reconnects_and_error_comes_after_events() -> None:
    """A scripted server: the first stream sends one event then garbage (the watch resumes
    after that event), the second sends one event then a 410 ERROR (both arrive, then Gone)."""
    seen_versions: list[str] = []

    async def handler(request: web.Request) -> web.StreamResponse:
        seen_versions.append(request.query.get("resourceVersion", ""))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        if len(seen_versions) == 1:
            first = {"metadata": {"name": "a", "resourceVersion": "5"}}
            await resp.write(_event_line("ADDED", first))
            await resp.write(b"this is not json\n")
        else:
            second = _event_line("ADDED", {"metadata": {"name": "b", "resourceVersion": "6"}})
            error = _event_line("ERROR", errors.Gone("too old resource version: 6 (7)").to_status())
            await resp.write(second + error)  # one chunk: the event must still come first
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/api/v1/configmaps", handler)
        runner = web.AppRunner(app, shutdown_timeout=0.1)
        await runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(runner, sock).start()
        try:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}"
            client = KubeClient(url, config=FAST_CLIENT)
            async with client, client.watch(CONFIGMAPS, resource_version="1") as watch:
                names = [(await watch.__anext__()).object["metadata"]["name"] for _ in range(2)]
                with pytest.raises(errors.Gone, match="too old"):
                    await watch.__anext__()
                assert names == ["a", "b"]
                assert seen_versions == ["1", "5"]
                assert watch.stats.failures == 1 and watch.resource_version == "6"
                with pytest.raises(StopAsyncIteration):
                    await watch.__anext__()
        finally:
            await runner.cleanup()

    run(main())


# ---- informer ---------------------------------------------------------------------------------


def test_kube_client_informer_relists_after_gone_with_a_correct_diff(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            for name in ("a", "b", "c"):
                await c.create(CONFIGMAPS, cm(name), namespace="default")
            informer = Informer(c, CONFIGMAPS, namespace="default", config=FAST_INFORMER)
            seen: list[Change] = []
            informer.add_listener(seen.append)
            informer.start()
            try:
                assert await informer.wait_synced(5)
                assert [(ch.type, ch.key[1]) for ch in seen] == [
                    ("ADDED", "a"),
                    ("ADDED", "b"),
                    ("ADDED", "c"),
                ]
                seen.clear()
                env.api.reject_watches = True
                env.api.drop_watches()
                await eventually(lambda: env.api.watch_requests >= 3)
                await c.patch(CONFIGMAPS, "a", {"data": {"v": "2"}}, namespace="default")
                await c.delete(CONFIGMAPS, "b", namespace="default")
                await c.create(CONFIGMAPS, cm("d"), namespace="default")
                env.store.compact(env.store.revision)  # the informer's version is now gone
                env.api.reject_watches = False
                await eventually(lambda: informer.stats.expired == 1 and informer.stats.lists == 2)
                assert sorted((ch.type, ch.key[1], ch.relisted) for ch in seen) == [
                    ("ADDED", "d", True),
                    ("DELETED", "b", True),
                    ("MODIFIED", "a", True),
                ]
                assert [o["metadata"]["name"] for o in informer.items()] == ["a", "c", "d"]
                a = informer.get("a", "default")
                assert a is not None and a["data"] == {"v": "2"}
                # After the relist the informer watches again from the new list's version.
                await c.create(CONFIGMAPS, cm("e"), namespace="default")
                await eventually(lambda: informer.get("e", "default") is not None)
                assert seen[-1].type == "ADDED" and not seen[-1].relisted
            finally:
                await informer.stop()

    run(main())


def test_kube_client_informer_reconnects_without_relist(tmp_path: Path) -> None:
    async def main() -> None:
        async with serving(tmp_path) as env:
            c = env.client
            informer = Informer(c, CONFIGMAPS, config=FAST_INFORMER)
            informer.start()
            try:
                assert await informer.wait_synced(5)
                async with informer.subscribe(replay=False) as changes:
                    env.api.drop_watches()
                    await c.create(CONFIGMAPS, cm("x"), namespace="default")
                    await c.create(CONFIGMAPS, cm("y"), namespace="kube-system")
                    await c.delete(CONFIGMAPS, "x", namespace="default")
                    got = [await asyncio.wait_for(changes.__anext__(), 5) for _ in range(3)]
                assert [(ch.type, ch.key, ch.relisted) for ch in got] == [
                    ("ADDED", ("default", "x"), False),
                    ("ADDED", ("kube-system", "y"), False),
                    ("DELETED", ("default", "x"), False),
                ]
                assert informer.stats.lists == 1 and informer.stats.expired == 0
                assert await informer.wait_until(
                    lambda: informer.has_seen(str(env.store.revision)), 5
                )
            finally:
                await informer.stop()

    run(main())


# ---- controllers end to end -------------------------------------------------------------------


def node(name: str) -> Obj:
    return {
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        "status": {"conditions": [{"type": "Ready", "status": "True"}]},
    }


DEPLOYMENT: Obj = {
    "metadata": {"name": "web"},
    "spec": {
        "replicas": 2,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "metadata": {"labels": {"app": "web"}},
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": "nginx:1",
                        "ports": [{"name": "http", "containerPort": 8080}],
                    }
                ]
            },
        },
    },
}
SERVICE: Obj = {
    "metadata": {"name": "web"},
    "spec": {
        "clusterIP": "10.96.0.20",
        "selector": {"app": "web"},
        "ports": [{"name": "http", "port": 80, "targetPort": "http"}],
    },
}


def active_pods(store: Store) -> list[Obj]:
    pods = store.list_objects(PODS, namespace="default").objects()
    return [p for p in pods if not p["metadata"].get("deletionTimestamp")]


class Kubelet:
    """Plays kubelet for the test: scheduled pods get an IP and Ready=True."""

    def __init__(self, client: KubeClient, store: Store) -> None:
        self.client = client
        self.store = store
        self.next_ip = 10

    async def mark_ready(self) -> None:
        for pod in active_pods(self.store):
            if not pod["spec"].get("nodeName") or pod["status"].get("podIP"):
                continue
            ip = f"10.244.0.{self.next_ip}"
            self.next_ip += 1
            while True:
                pod["status"] = {
                    "phase": "Running",
                    "podIP": ip,
                    "podIPs": [{"ip": ip}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
                try:
                    await self.client.update_status(PODS, pod)
                    break
                except errors.Conflict:  # a controller wrote meanwhile: read again, retry
                    pod = await self.client.get(PODS, pod["metadata"]["name"], namespace="default")


def manager_config(**changes: Any) -> ManagerConfig:
    options: dict[str, Any] = {
        "informer": FAST_INFORMER,
        "runner": RunnerConfig(retry=FAST_RETRY, cache_wait_timeout_s=2.0),
        "sync_timeout_s": 10,
    }
    return ManagerConfig(**{**options, **changes})


@pytest.mark.parametrize("serve_binding", [True, False], ids=["binding", "nodename-patch"])
def test_kube_client_controllers_end_to_end(tmp_path: Path, serve_binding: bool) -> None:
    async def main() -> None:
        async with serving(tmp_path, serve_binding=serve_binding) as env:
            c, store = env.client, env.store
            for name in ("edge-1", "edge-2"):
                await c.create(NODES, node(name))
            await c.create(DEPLOYMENTS, DEPLOYMENT, namespace="default")
            await c.create(SERVICES, SERVICE, namespace="default")
            kubelet = Kubelet(c, store)
            async with ControllerManager(c, manager_config()) as manager:
                # Two pods, named {deploy}-{hash}-{suffix}, one on each node.
                await eventually(
                    lambda: (
                        sorted(p["spec"].get("nodeName", "") for p in active_pods(store))
                        == ["edge-1", "edge-2"]
                    )
                )
                pods = active_pods(store)
                hash_ = pods[0]["metadata"]["labels"][POD_TEMPLATE_HASH]
                assert all(p["metadata"]["name"].startswith(f"web-{hash_}-") for p in pods)
                assert all(
                    p["metadata"]["ownerReferences"][0]["kind"] == "Deployment" for p in pods
                )

                def scheduled() -> list[str]:
                    return [
                        c["status"]
                        for p in active_pods(store)
                        for c in p["status"].get("conditions", [])
                        if c["type"] == "PodScheduled"
                    ]

                # Without pods/binding the scheduler patched nodeName and recorded
                # PodScheduled=True itself; with it, that is the binding's job.
                await eventually(lambda: scheduled() == ([] if serve_binding else ["True", "True"]))
                # Ready pods show up in the Endpoints and the EndpointSlice.
                await kubelet.mark_ready()

                def endpoint_ips() -> list[str]:
                    try:
                        ep = store.get(ENDPOINTS, "web", namespace="default")
                    except errors.NotFound:
                        return []
                    return sorted(
                        a["ip"] for s in ep.get("subsets", []) for a in s.get("addresses", [])
                    )

                def slice_ready_ips() -> list[str]:
                    slices = store.list_objects(
                        ENDPOINTSLICES,
                        namespace="default",
                        label_selector=f"{SERVICE_NAME_LABEL}=web",
                    ).objects()
                    return sorted(
                        e["addresses"][0]
                        for s in slices
                        for e in s.get("endpoints") or []
                        if e["conditions"]["ready"]
                    )

                await eventually(lambda: len(endpoint_ips()) == 2 and len(slice_ready_ips()) == 2)
                ep = store.get(ENDPOINTS, "web", namespace="default")
                assert ep["subsets"][0]["ports"] == [
                    {"name": "http", "port": 8080, "protocol": "TCP"}
                ]
                assert {a["nodeName"] for a in ep["subsets"][0]["addresses"]} == {
                    "edge-1",
                    "edge-2",
                }
                (slice_,) = store.list_objects(ENDPOINTSLICES, namespace="default").objects()
                assert slice_["metadata"]["labels"][MANAGED_BY_LABEL] == MANAGED_BY

                def deploy_status() -> Obj:
                    status: Obj = (
                        store.get(DEPLOYMENTS, "web", namespace="default").get("status") or {}
                    )
                    return status

                await eventually(lambda: deploy_status().get("availableReplicas") == 2)
                assert deploy_status()["observedGeneration"] == 1
                # Scale up: a third pod, spread again; then down to one.
                await c.patch(DEPLOYMENTS, "web", {"spec": {"replicas": 3}}, namespace="default")
                await eventually(
                    lambda: len([p for p in active_pods(store) if p["spec"].get("nodeName")]) == 3
                )
                await kubelet.mark_ready()
                await eventually(lambda: len(endpoint_ips()) == 3)
                await c.patch(DEPLOYMENTS, "web", {"spec": {"replicas": 1}}, namespace="default")
                await eventually(lambda: len(active_pods(store)) == 1 and len(endpoint_ips()) == 1)
                # Terminating pods stay in the slice, never ready.
                await eventually(lambda: len(slice_ready_ips()) == 1)
                # Rolling update: the new pod comes first, the old one goes once it is available.
                await c.patch(
                    DEPLOYMENTS,
                    "web",
                    {
                        "spec": {
                            "template": {
                                "spec": {"containers": [{"name": "c", "image": "nginx:2"}]}
                            }
                        }
                    },
                    namespace="default",
                    content_type=STRATEGIC_MERGE_PATCH,
                )
                await eventually(lambda: len(active_pods(store)) == 2)
                hashes = {p["metadata"]["labels"][POD_TEMPLATE_HASH] for p in active_pods(store)}
                assert len(hashes) == 2
                await eventually(lambda: all(p["spec"].get("nodeName") for p in active_pods(store)))
                await kubelet.mark_ready()
                await eventually(
                    lambda: (
                        len(active_pods(store)) == 1
                        and active_pods(store)[0]["metadata"]["labels"][POD_TEMPLATE_HASH] != hash_
                    )
                )
                await eventually(
                    lambda: (
                        deploy_status().get("updatedReplicas") == 1
                        and deploy_status().get("availableReplicas") == 1
                    )
                )
                # NodeGroups label their members.
                await c.create(
                    NODEGROUPS, {"metadata": {"name": "east"}, "spec": {"nodes": ["edge-1"]}}
                )
                await c.create(
                    NODEGROUPS,
                    {
                        "metadata": {"name": "all"},
                        "spec": {"matchLabels": {"kubernetes.io/hostname": "edge-2"}},
                    },
                )

                def belonging() -> dict[str, str | None]:
                    return {
                        n["metadata"]["name"]: n["metadata"].get("labels", {}).get(BELONGING_TO)
                        for n in store.list_objects(NODES).objects()
                    }

                await eventually(lambda: belonging() == {"edge-1": "east", "edge-2": "all"})
                await eventually(
                    lambda: bool(
                        (store.get(NODEGROUPS, "east").get("status") or {}).get("nodeStatuses")
                    )
                )
                assert store.get(NODEGROUPS, "east")["status"]["nodeStatuses"] == [
                    {"nodeName": "edge-1", "readyStatus": "Ready", "selectionStatus": "Succeeded"}
                ]
                await c.delete(NODEGROUPS, "east")
                await eventually(lambda: belonging()["edge-1"] is None)
                # Deleting the Deployment: the garbage collector removes its pods.
                await c.delete(DEPLOYMENTS, "web", namespace="default")
                await eventually(lambda: active_pods(store) == [])
                assert manager.runners["scheduler"].reconciles >= 1
            # Stopped cleanly: no task of ours left running.
            leftovers = [
                t
                for t in asyncio.all_tasks()
                if t.get_name().startswith(("informer-", "controller-"))
            ]
            assert leftovers == []

    run(main())


def test_kube_client_manager_start_times_out_without_server() -> None:
    async def main() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        async with KubeClient(f"http://127.0.0.1:{port}", config=FAST_CLIENT) as client:
            manager = ControllerManager(
                client, manager_config(sync_timeout_s=0.3, controllers=("nodegroup",))
            )
            with pytest.raises(
                TimeoutError, match=r"nodegroups.apps.kubeedge.io \(KubeConnectionError: GET "
            ):
                await manager.start()
            assert [t for t in asyncio.all_tasks() if t.get_name().startswith("informer-")] == []

    run(main())
