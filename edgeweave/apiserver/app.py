"""The aiohttp application: one catch-all route that authenticates, authorizes and dispatches.

Order as in kube-apiserver's handler chain: public endpoints (`/healthz`, `/livez`, `/readyz`,
`/version`) need nothing; everything else needs an identity (401 otherwise), then the
authorizer's yes (403 with Kubernetes' message otherwise), then it is served: discovery,
OpenAPI, or a resource. Every error leaves as a `Status` with the matching HTTP code; an
unexpected exception is logged and becomes a 500 Status, never a dropped connection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp import web

from edgeweave.apiserver.auth import (
    Attributes,
    Authenticator,
    Authorizer,
    Credentials,
    forbidden_message,
    is_public,
)
from edgeweave.apiserver.codec import MethodNotAllowed, Unauthorized
from edgeweave.apiserver.discovery import discovery_document, version_info
from edgeweave.apiserver.handlers import ResourceHandler, json_response, not_found_path
from edgeweave.apiserver.metrics import Metrics
from edgeweave.apiserver.openapi import V2_PROTOBUF, OpenAPI
from edgeweave.apiserver.requestinfo import RequestInfo, parse_request_info
from edgeweave.kube.errors import Forbidden, InternalError, StoreError
from edgeweave.kube.resources import Registry
from edgeweave.log import event

log = logging.getLogger(__name__)


def error_response(exc: StoreError) -> web.Response:
    """The Status response of an error."""
    resp = json_response(exc.to_status(), exc.code)
    if exc.retry_after_seconds is not None:
        resp.headers["Retry-After"] = str(exc.retry_after_seconds)
    return resp


class ApiApp:
    """Request dispatch; `app()` returns the aiohttp application."""

    def __init__(
        self,
        registry: Registry,
        resources: ResourceHandler,
        authenticator: Authenticator,
        authorizer: Authorizer,
        *,
        ready: Callable[[], bool] = lambda: True,
    ) -> None:
        self.registry = registry
        self.resources = resources
        self.authenticator = authenticator
        self.authorizer = authorizer
        self.ready = ready
        self.openapi = OpenAPI(registry)
        self.version = version_info()
        self.metrics = Metrics()

    def app(self) -> web.Application:
        application = web.Application(client_max_size=resources_limit(self.resources))
        application.router.add_route("*", "/{tail:.*}", self.handle)
        return application

    async def handle(self, request: web.Request) -> web.StreamResponse:
        start = time.perf_counter()
        info = parse_request_info(request.method, request.path, request.query)
        resp: web.StreamResponse
        try:
            resp = await self._handle(request, info)
        except StoreError as exc:
            resp = error_response(exc)
        except (ConnectionError, web.HTTPException):
            raise
        except Exception as exc:
            log.exception("request failed: %s %s", request.method, request.path)
            resp = error_response(InternalError(f"internal error: {type(exc).__name__}"))
        if info.resource_request:
            label = f"{info.api_group}/{info.resource}" if info.api_group else info.resource
        else:
            label = "/" + (info.path.strip("/").split("/", 1)[0] if info.path.strip("/") else "")
        self.metrics.observe(info.verb, label, resp.status, time.perf_counter() - start)
        return resp

    def _identity_credentials(self, request: web.Request) -> Credentials:
        transport = request.transport
        peercert = transport.get_extra_info("peercert") if transport is not None else None
        return Credentials(peercert, request.headers.get("Authorization"))

    async def _handle(self, request: web.Request, info: RequestInfo) -> web.StreamResponse:
        path = request.path
        if is_public(path) and request.method in ("GET", "HEAD"):
            return self._public(path)
        user = self.authenticator.authenticate(self._identity_credentials(request))
        if user is None:
            raise Unauthorized("Unauthorized")
        decision = self.authorizer.authorize(Attributes(user, info))
        if not decision.allowed:
            event(
                log, logging.INFO, "apiserver.forbidden", user=user.user, verb=info.verb, path=path
            )
            raise Forbidden(
                forbidden_message(Attributes(user, info), decision),
                name=info.name or None,
                kind=info.resource or None,
                group=info.api_group or None,
            )
        if not info.resource_request:
            return self._nonresource(request, info)
        return await self.resources.handle(request, info, user)

    def _public(self, path: str) -> web.Response:
        if path == "/version":
            return json_response(self.version)
        if path.startswith("/readyz") and not self.ready():
            return web.Response(text="[-]ready failed\nreadyz check failed", status=500)
        return web.Response(text="ok", content_type="text/plain")

    def _nonresource(self, request: web.Request, info: RequestInfo) -> web.Response:
        if request.method not in ("GET", "HEAD"):
            raise MethodNotAllowed(
                "the server does not allow this method on the requested resource"
            )
        parts = [p for p in info.path.split("/") if p]
        doc = discovery_document(self.registry, parts)
        if doc is not None:
            # Always plain JSON: clients asking for aggregated discovery fall back to this.
            return json_response(doc)
        if parts[:2] == ["openapi", "v3"]:
            if len(parts) == 2:
                return json_response(self.openapi.index)
            body = self.openapi.documents.get("/".join(parts[2:]))
            if body is None:
                raise not_found_path()
            return json_response(body)
        if parts == ["metrics"]:
            hub = self.resources.hub
            text = self.metrics.render(
                {
                    "apiserver_watchers": hub.watcher_count,
                    "apiserver_watch_events_total": lambda: hub.events_sent,
                    "apiserver_watchers_closed_slow_total": lambda: hub.closed_slow,
                }
            )
            return web.Response(text=text, content_type="text/plain", charset="utf-8")
        if parts == ["openapi", "v2"]:
            if "protobuf" in request.headers.get("Accept", ""):
                return web.Response(body=self.openapi.v2_protobuf, content_type=V2_PROTOBUF)
            return json_response(self.openapi.v2_json)
        raise not_found_path()


def resources_limit(resources: ResourceHandler) -> int:
    """aiohttp's own body limit, above ours so ours (413 Status) answers first."""
    return resources.config.max_body_bytes + 1
