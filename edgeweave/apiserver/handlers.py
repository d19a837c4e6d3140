"""Resource requests over HTTP: resolve the resource, check the verb, run `rest.Rest` in a
worker thread, encode the answer (JSON, YAML, Table, PartialObjectMetadata) or stream a watch.

The decisions live in `rest.py`, `params.py`, `codec.py`, `tables.py` and `watch.py`; this
module only moves bytes between them and aiohttp.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Mapping
from typing import Any

import yaml
from aiohttp import web

from edgeweave.apiserver import params, tables
from edgeweave.apiserver.codec import (
    EntityTooLarge,
    MethodNotAllowed,
    Output,
    decode_body,
    decode_json,
    negotiate,
    success_status,
    warning_header,
)
from edgeweave.apiserver.config import ApiServerConfig
from edgeweave.apiserver.requestinfo import RequestInfo
from edgeweave.apiserver.rest import Rest, Written
from edgeweave.apiserver.watch import (
    INITIAL_EVENTS_END,
    Encoder,
    Watcher,
    WatchFilter,
    WatchHub,
    json_line,
    status_line,
)
from edgeweave.kube.errors import Gone, NotFound
from edgeweave.kube.objects import Obj, dumps
from edgeweave.kube.resources import SUBRESOURCE_VERBS, Registry, ResourceInfo
from edgeweave.kube.selectors import FieldSelector, LabelSelector
from edgeweave.kube.store import Deleted, ListResult
from edgeweave.pki import Identity

Run = Callable[[Callable[[], Any]], Any]
_RETURNS_DELETED = frozenset({"pods", "services", "namespaces"})  # ReturnDeletedObject kinds
_WRITE_CHUNK = 256 * 1024


def not_found_path() -> NotFound:
    """kube-apiserver's 404 for a path it does not serve."""
    return NotFound("the server could not find the requested resource")


def json_response(
    body: str | bytes | Obj, status: int = 200, output: Output | None = None
) -> web.Response:
    """A JSON (or YAML) response from text or an object."""
    if output is not None and output.kind == "yaml":
        doc = json.loads(body) if isinstance(body, str | bytes) else body
        text = yaml.safe_dump(doc, sort_keys=False, default_flow_style=False)
        return web.Response(body=text.encode(), status=status, content_type="application/yaml")
    if isinstance(body, dict):
        body = dumps(body)
    data = body.encode() if isinstance(body, str) else body
    return web.Response(body=data, status=status, content_type="application/json")


async def read_body(request: web.Request, limit: int) -> bytes:
    """The request body, or 413 once it passes `limit` bytes (kube-apiserver: 3 MiB)."""
    too_large = EntityTooLarge(f"Request entity too large: limit is {limit}")
    if request.content_length is not None and request.content_length > limit:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


class ResourceHandler:
    """Serves /api/v1/... and /apis/{g}/{v}/... requests."""

    def __init__(
        self,
        registry: Registry,
        rest: Rest,
        hub: WatchHub,
        run: Run,
        config: ApiServerConfig,
        clock: Callable[[], float],
    ) -> None:
        self.registry = registry
        self.rest = rest
        self.hub = hub
        self.run = run
        self.config = config
        self.clock = clock

    # ---- routing ------------------------------------------------------------------------------

    def resolve(self, info: RequestInfo) -> tuple[ResourceInfo, str | None]:
        """The resource and the namespace to pass the store; 404/405 as kube-apiserver."""
        res = self.registry.get(info.api_group, info.api_version, info.resource)
        if res is None or info.extra_parts:
            raise not_found_path()
        sub = info.subresource
        if (sub == "status" and not res.has_status) or (sub == "scale" and not res.has_scale):
            raise not_found_path()
        if sub not in ("", "status", "scale"):
            raise not_found_path()
        if res.namespaced:
            namespace = info.namespace or None
            if namespace is None and (info.name or info.verb in ("create", "deletecollection")):
                if info.name:
                    raise not_found_path()
                raise MethodNotAllowed(
                    "the server does not allow this method on the requested resource"
                )
        else:
            if info.namespace and res.key != "namespaces":
                raise not_found_path()
            namespace = None
        verbs = SUBRESOURCE_VERBS if sub else res.verbs
        verb = info.verb
        needs_name = verb in ("update", "patch", "delete") or bool(sub)
        if verb not in verbs or (needs_name and not info.name) or (verb == "create" and info.name):
            raise MethodNotAllowed(
                "the server does not allow this method on the requested resource"
            )
        return res, namespace

    async def handle(
        self, request: web.Request, info: RequestInfo, user: Identity
    ) -> web.StreamResponse:
        res, namespace = self.resolve(info)
        query: Mapping[str, str] = request.query
        verb = info.verb
        if verb == "watch":
            return await self.watch(request, res, namespace, info)
        output = negotiate(request.headers.get("Accept"))
        if verb == "get":
            got = await self.run(
                lambda: self.rest.get_raw(res, namespace, info.name, info.subresource)
            )
            return self.render_object(res, got, output, query, scale=info.subresource == "scale")
        if verb == "list":
            opts = params.list_options(query, watch=False)
            page: ListResult = await self.run(lambda: self.rest.list_page(res, namespace, opts))
            if output.kind == "json":
                return self.render_list(res, page, output, query)
            # Tables decode every object: CPU work, kept off the event loop
            rendered: web.Response = await self.run(
                lambda: self.render_list(res, page, output, query)
            )
            return rendered
        if verb in ("delete", "deletecollection"):
            return await self.delete(request, res, namespace, info, user, output)
        write = params.write_options(query, request.query.getall("dryRun", []))
        raw = await read_body(request, self.config.max_body_bytes)
        written: Written
        if verb == "patch":
            written = await self.run(
                lambda: self.rest.patch(
                    res,
                    namespace,
                    info.name,
                    info.subresource,
                    request.content_type,
                    raw,
                    write,
                    user,
                )
            )
        else:
            ctype = request.headers.get("Content-Type")
            limits = {"max_nodes": self.config.max_yaml_nodes, "max_depth": self.config.max_nesting}
            # parsing up to 3 MiB is CPU work: keep it off the event loop
            body = await self.run(lambda: decode_body(raw, ctype, **limits))
            if verb == "create":
                written = await self.run(
                    lambda: self.rest.create(res, namespace, body, write, user)
                )
            else:
                written = await self.run(
                    lambda: self.rest.update(
                        res, namespace, info.name, info.subresource, body, write, user
                    )
                )
        status = 201 if written.created else 200
        resp = json_response(written.object, status, output)
        for text in written.warnings:
            resp.headers.add("Warning", warning_header(text))
        return resp

    # ---- rendering ----------------------------------------------------------------------------

    def render_object(
        self,
        res: ResourceInfo,
        got: str | Obj,
        output: Output,
        query: Mapping[str, str],
        *,
        scale: bool = False,
    ) -> web.Response:
        if scale or output.kind in ("json", "yaml"):
            return json_response(got, 200, output)
        obj: Obj = json.loads(got) if isinstance(got, str) else got
        if output.kind == "partial":
            return json_response(tables.partial_metadata(obj, output.version))
        include = params.include_object(query)
        meta = {"resourceVersion": obj.get("metadata", {}).get("resourceVersion", "")}
        return json_response(
            tables.table(
                res,
                [obj],
                now=self.clock(),
                include=include,
                version=output.version,
                list_meta=meta,
            )
        )

    def render_list(
        self, res: ResourceInfo, page: ListResult, output: Output, query: Mapping[str, str]
    ) -> web.Response:
        if output.kind in ("json", "yaml"):
            return json_response(page.to_json(res), 200, output)
        meta: dict[str, Any] = {"resourceVersion": str(page.resource_version)}
        if page.continue_token:
            meta["continue"] = page.continue_token
        objects = page.objects()
        if output.kind == "partial":
            return json_response(
                {
                    "kind": "PartialObjectMetadataList",
                    "apiVersion": f"meta.k8s.io/{output.version}",
                    "metadata": meta,
                    "items": [tables.partial_metadata(o, output.version) for o in objects],
                }
            )
        include = params.include_object(query)
        return json_response(
            tables.table(
                res,
                objects,
                now=self.clock(),
                include=include,
                version=output.version,
                list_meta=meta,
            )
        )

    # ---- delete -------------------------------------------------------------------------------

    async def delete(
        self,
        request: web.Request,
        res: ResourceInfo,
        namespace: str | None,
        info: RequestInfo,
        user: Identity,
        output: Output,
    ) -> web.Response:
        raw = await read_body(request, self.config.max_body_bytes)
        body = decode_json(raw, max_depth=self.config.max_nesting).value if raw.strip() else None
        dopts = params.delete_options(request.query, request.query.getall("dryRun", []), body)
        if info.verb == "deletecollection":
            lopts = params.list_options(request.query, watch=False)
            done: list[Deleted] = await self.run(
                lambda: self.rest.delete_collection(res, namespace, lopts, dopts, user)
            )
            items = ",".join(dumps(d.object) for d in done)
            head = dumps({"kind": res.list_kind, "apiVersion": res.api_version, "metadata": {}})
            return json_response(head[:-1] + ',"items":[' + items + "]}", 200, output)
        deleted: Deleted = await self.run(
            lambda: self.rest.delete(res, namespace, info.name, dopts, user)
        )
        if not deleted.gone or res.key in _RETURNS_DELETED:
            return json_response(deleted.object, 200, output)
        meta = deleted.object.get("metadata") or {}
        details = {
            "name": info.name,
            "group": res.group,
            "kind": res.plural,
            "uid": meta.get("uid", ""),
        }
        return json_response(success_status(details), 200, output)

    # ---- watch --------------------------------------------------------------------------------

    def _encoder(
        self, res: ResourceInfo, output: Output, query: Mapping[str, str]
    ) -> Encoder | None:
        if output.kind in ("json", "yaml"):
            return None
        include = params.include_object(query)
        first = [True]

        def encode(type_: str, raw: str, obj: Callable[[], Obj]) -> bytes:
            if output.kind == "partial":
                return json_line(type_, dumps(tables.partial_metadata(obj(), output.version)))
            doc = tables.table(
                res,
                [obj()],
                now=self.clock(),
                include=include,
                version=output.version,
                headers=first[0],
            )
            first[0] = False
            return json_line(type_, dumps(doc))

        return encode

    async def watch(
        self, request: web.Request, res: ResourceInfo, namespace: str | None, info: RequestInfo
    ) -> web.StreamResponse:
        query: Mapping[str, str] = request.query
        opts = params.list_options(query, watch=True)
        output = negotiate(request.headers.get("Accept"))
        fields = opts.field_selector
        if info.name:  # GET .../pods/x?watch=1 watches one object
            fields = f"metadata.name={info.name}" + (f",{fields}" if fields else "")
        labels = LabelSelector.parse(opts.label_selector) if opts.label_selector else None
        fsel = FieldSelector.parse(fields) if fields else None
        flt = WatchFilter(
            res,
            namespace,
            labels if labels is not None and not labels.empty else None,
            fsel if fsel is not None and not fsel.empty else None,
        )
        rv = opts.resource_version or None
        if opts.send_initial_events:
            rv = None
        loop = asyncio.get_running_loop()
        timeout = float(opts.timeout_s) if opts.timeout_s else self.config.watch_timeout_s
        deadline = loop.time() + timeout
        resp = web.StreamResponse(status=200)
        resp.content_type = "application/json"
        resp.headers["Cache-Control"] = "no-cache, private"
        resp.enable_chunked_encoding()
        try:
            watcher, first = await self.hub.watch(flt, rv, self._encoder(res, output, query))
        except Gone as exc:
            await resp.prepare(request)
            await resp.write(status_line(exc.to_status()))
            await resp.write_eof()
            return resp
        try:
            await resp.prepare(request)
            await self._write_lines(resp, first)
            if opts.send_initial_events:
                await resp.write(self._bookmark(res, watcher.position, initial_end=True))
            await self._stream(resp, watcher, res, opts.allow_bookmarks, deadline)
            await resp.write_eof()
        except (ConnectionResetError, ConnectionError):
            pass
        finally:
            self.hub.remove(watcher)
        return resp

    @staticmethod
    async def _write_lines(resp: web.StreamResponse, lines: list[bytes]) -> None:
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            chunk.append(line)
            size += len(line)
            if size >= _WRITE_CHUNK:
                await resp.write(b"".join(chunk))
                chunk, size = [], 0
        if chunk:
            await resp.write(b"".join(chunk))

    @staticmethod
    def _bookmark(res: ResourceInfo, position: int, *, initial_end: bool = False) -> bytes:
        meta: dict[str, Any] = {"resourceVersion": str(position)}
        if initial_end:
            meta["annotations"] = {INITIAL_EVENTS_END: "true"}
        return json_line(
            "BOOKMARK", dumps({"kind": res.kind, "apiVersion": res.api_version, "metadata": meta})
        )

    async def _stream(
        self,
        resp: web.StreamResponse,
        watcher: Watcher,
        res: ResourceInfo,
        bookmarks: bool,
        deadline: float,
    ) -> None:
        loop = asyncio.get_running_loop()
        interval = self.config.bookmark_interval_s
        next_bookmark = loop.time() + interval
        while True:
            now = loop.time()
            if now >= deadline:
                return
            wait = deadline - now
            if bookmarks:
                wait = min(wait, max(0.0, next_bookmark - now))
            lines = await watcher.next(wait)
            if lines is None:
                return
            if lines:
                await self._write_lines(resp, lines)
                next_bookmark = loop.time() + interval
            elif bookmarks and loop.time() >= next_bookmark:
                await resp.write(self._bookmark(res, watcher.position))
                next_bookmark = loop.time() + interval
