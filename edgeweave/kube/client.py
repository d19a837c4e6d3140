"""A small asyncio Kubernetes REST client: dicts in, dicts out, typed errors, resumable watches.

It speaks the standard Kubernetes REST protocol (`/api/v1`, `/apis/{group}/{version}`) over
aiohttp, so the same code talks to cloudcore's embedded API, to a real cluster (`--kubeconfig`)
and to an edge's MetaServer (plain http on 127.0.0.1). It never imports the `kubernetes` package
and has no generated models: objects are the JSON dicts the server sends.

    client = KubeClient.from_kubeconfig(Path("admin.kubeconfig"))   # or KubeClient(url, ssl=ctx)
    pod = await client.get(PODS, "web-0", namespace="default")
    page = await client.list(PODS, label_selector="app=web")
    async with client.watch(PODS, resource_version=page.resource_version) as watch:
        async for event in watch:                 # ADDED / MODIFIED / DELETED (and BOOKMARK)
            ...

- **Errors.** A failed request raises the `edgeweave.kube.errors` class the server's `Status`
  names (`NotFound`, `Conflict`, `Gone`, `Invalid`, ...; a few more for codes the store never
  sends, defined here), rebuilt with its message, details and causes. A transport failure raises
  `KubeConnectionError`; garbage in a watch stream is a `WatchProtocolError`.
- **Watch.** A chunked stream of JSON lines, `{"type": ..., "object": ...}`, one per line, as
  kube-apiserver writes them. `Watch` keeps the last resourceVersion it saw (events and
  BOOKMARKs) and, when the server ends the stream (its `timeoutSeconds`) or the connection
  drops, reconnects from there: after a clean end at once, after a failure with backoff. An
  `ERROR` event with a 410 Status (or a 410 answer) raises `Gone`: the caller must relist,
  which `edgeweave.kube.informer.Informer` does.
- **kubeconfig.** `load_kubeconfig` reads the current (or a named) context the way kubectl does:
  cluster `server`, `certificate-authority(-data)`, `insecure-skip-tls-verify`,
  `tls-server-name`; user `client-certificate(-data)` + `client-key(-data)`, `token`,
  `tokenFile`. Relative paths are relative to the kubeconfig's directory. Every problem is a
  `KubeconfigError` whose message names the file and the field.

Timings (timeouts, backoff) live in `ClientConfig` / `RetryPolicy`; nothing is a module global.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import contextlib
import dataclasses
import json
import logging
import os
import random
import ssl
import tempfile
import urllib.parse
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

import aiohttp
import yaml

from edgeweave.kube.errors import (
    AlreadyExists,
    BadRequest,
    Cause,
    Conflict,
    Forbidden,
    Gone,
    InternalError,
    Invalid,
    NotFound,
    StoreError,
    TooLargeResourceVersion,
    UnsupportedMediaType,
)
from edgeweave.kube.patch import MERGE_PATCH
from edgeweave.kube.resources import ResourceInfo
from edgeweave.log import event

log = logging.getLogger(__name__)

Obj = dict[str, Any]
EventType = Literal["ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"]
EVENT_TYPES: frozenset[str] = frozenset(("ADDED", "MODIFIED", "DELETED", "BOOKMARK", "ERROR"))

# ---- errors -----------------------------------------------------------------------------------


class Unauthorized(StoreError):
    """The server did not accept our credentials (401)."""

    code = 401
    reason = "Unauthorized"


class MethodNotAllowed(StoreError):
    """The server does not serve this verb on this path (405)."""

    code = 405
    reason = "MethodNotAllowed"


class RequestEntityTooLarge(StoreError):
    """The request body is too large (413)."""

    code = 413
    reason = "RequestEntityTooLarge"


class TooManyRequests(StoreError):
    """The server is rate limiting us (429); `retry_after_seconds` says when to come back."""

    code = 429
    reason = "TooManyRequests"


class ServiceUnavailable(StoreError):
    """The server cannot serve now (503)."""

    code = 503
    reason = "ServiceUnavailable"


class ServerTimeout(StoreError):
    """The server timed the request out (504, reason `Timeout`)."""

    code = 504
    reason = "Timeout"


class UnexpectedStatus(StoreError):
    """Any other HTTP error; `http_status` is the code the server sent."""

    code = 500
    reason = "Unknown"

    def __init__(self, message: str, *, http_status: int, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.http_status = http_status


class KubeConnectionError(ConnectionError):
    """The server could not be reached, or the connection broke before a complete answer."""


class WatchProtocolError(ValueError):
    """The watch stream sent something that is not a watch event (remote misbehaviour).
    `events` holds the complete events that came before it in the same data."""

    def __init__(self, message: str, events: Sequence[WatchEvent] = ()) -> None:
        super().__init__(message)
        self.events = list(events)


class KubeconfigError(ValueError):
    """A kubeconfig file is missing, malformed, or names something unusable; the message
    starts with the file and names the field (`clusters[edgeweave].cluster.server`)."""


_BY_REASON: dict[str, type[StoreError]] = {
    "BadRequest": BadRequest,
    "Unauthorized": Unauthorized,
    "Forbidden": Forbidden,
    "NotFound": NotFound,
    "MethodNotAllowed": MethodNotAllowed,
    "AlreadyExists": AlreadyExists,
    "Conflict": Conflict,
    "Expired": Gone,
    "Gone": Gone,
    "RequestEntityTooLarge": RequestEntityTooLarge,
    "UnsupportedMediaType": UnsupportedMediaType,
    "Invalid": Invalid,
    "TooManyRequests": TooManyRequests,
    "InternalError": InternalError,
    "ServiceUnavailable": ServiceUnavailable,
    "Timeout": ServerTimeout,
}
_BY_CODE: dict[int, type[StoreError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Conflict,
    410: Gone,
    413: RequestEntityTooLarge,
    415: UnsupportedMediaType,
    422: Invalid,
    429: TooManyRequests,
    500: InternalError,
    503: ServiceUnavailable,
    504: ServerTimeout,
}
RETRYABLE_CODES: frozenset[int] = frozenset((429, 500, 502, 503, 504))
"""HTTP codes after which a watch reconnects (with backoff) rather than giving up."""


def error_from_status(http_status: int, body: Any) -> StoreError:
    """The typed error for an error answer: `body` is the decoded `Status` (or anything else
    the server sent). The class follows the Status `reason` (as client-go's `errors.IsNotFound`
    does), else its `code`, else the HTTP status; message, details and causes are kept."""
    status: Mapping[str, Any] = body if isinstance(body, Mapping) else {}
    raw_code = status.get("code")
    code = raw_code if isinstance(raw_code, int) and not isinstance(raw_code, bool) else http_status
    raw_reason = status.get("reason")
    reason = raw_reason if isinstance(raw_reason, str) else ""
    message = status.get("message")
    if not isinstance(message, str) or not message:
        if isinstance(body, str) and body.strip():
            message = f"HTTP {http_status}: {body.strip()[:200]}"
        else:
            message = f"the server answered HTTP {http_status} without a Status"
    raw_details = status.get("details")
    details: Mapping[str, Any] = raw_details if isinstance(raw_details, Mapping) else {}
    causes = [
        Cause(str(c.get("field", "")), str(c.get("message", "")), str(c.get("reason", "")))
        for c in details.get("causes") or []
        if isinstance(c, Mapping)
    ]
    retry = details.get("retryAfterSeconds")
    kwargs: dict[str, Any] = {
        "name": details.get("name") if isinstance(details.get("name"), str) else None,
        "kind": details.get("kind") if isinstance(details.get("kind"), str) else None,
        "group": details.get("group") if isinstance(details.get("group"), str) else None,
        "causes": causes,
        "retry_after_seconds": retry if isinstance(retry, int) else None,
    }
    cls = _BY_REASON.get(reason) or _BY_CODE.get(code)
    if cls is ServerTimeout and any(c.reason == "ResourceVersionTooLarge" for c in causes):
        cls = TooLargeResourceVersion
    if cls is None:
        return UnexpectedStatus(message, http_status=code, **kwargs)
    return cls(message, **kwargs)


# ---- timings ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff between attempts (client-go's reflector: 800 ms doubling to 30 s)."""

    initial_s: float = 0.8
    """First delay."""
    max_s: float = 30.0
    """Largest delay."""
    factor: float = 2.0
    """Each failure multiplies the delay by this."""
    jitter: float = 0.1
    """Each delay is stretched by a random fraction in [0, jitter) so clients spread out."""
    max_attempts: int | None = None
    """Give up after this many consecutive failures (None: never)."""


class Backoff:
    """The delays of a `RetryPolicy`: `next_delay()` after each failure, `reset()` after a
    success. Pure state; the caller sleeps."""

    def __init__(self, policy: RetryPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.failures = 0
        self._rng = rng or random.Random()

    def next_delay(self) -> float:
        """Count one failure and return how long to wait before the next attempt."""
        p = self.policy
        delay = min(p.max_s, p.initial_s * p.factor**self.failures)
        self.failures += 1
        if p.jitter > 0:
            delay *= 1 + self._rng.random() * p.jitter
        return delay

    @property
    def exhausted(self) -> bool:
        """True once `max_attempts` consecutive failures were counted."""
        limit = self.policy.max_attempts
        return limit is not None and self.failures >= limit

    def reset(self) -> None:
        """Forget the failures (after a success)."""
        self.failures = 0


@dataclasses.dataclass(frozen=True)
class ClientConfig:
    """Timeouts and limits of a `KubeClient`."""

    request_timeout_s: float = 30.0
    """Whole-request timeout for everything but watches."""
    connect_timeout_s: float = 10.0
    """Time to open a connection (TCP + TLS)."""
    watch_timeout_s: float = 300.0
    """`timeoutSeconds` asked of the server per watch request (client-go's reflector asks for
    5-10 min); the server then ends the stream cleanly and the watch reconnects."""
    watch_read_grace_s: float = 30.0
    """A watch stream silent for `watch_timeout_s` + this long counts as dead (half-open TCP)."""
    watch_retry: RetryPolicy = RetryPolicy()
    """Backoff between watch reconnects after a failure."""
    max_line_bytes: int = 16 * 1024 * 1024
    """Largest watch event accepted (Kubernetes objects stay below ~1.5 MiB)."""
    max_connections: int = 100
    """Connection pool size (each running watch holds one)."""
    user_agent: str = "edgeweave/0.1"
    """The User-Agent header."""


# ---- kubeconfig -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ClusterAccess:
    """How to reach and authenticate to one cluster, as a kubeconfig context describes it."""

    server: str
    """Base URL, `https://host:port` (optionally with a path prefix)."""
    ssl: ssl.SSLContext | None
    """TLS context for https (None for plain http)."""
    token: str | None = None
    """Bearer token, if the user authenticates with one."""
    tls_server_name: str | None = None
    """Name to verify the server certificate against instead of the URL's host."""
    context: str = ""
    """The context used (for messages)."""


def default_kubeconfig_path() -> Path:
    """`$KUBECONFIG` (its first existing entry) or `~/.kube/config`, as kubectl looks."""
    env = os.environ.get("KUBECONFIG", "")
    entries = [e for e in env.split(os.pathsep) if e]
    for entry in entries:
        if Path(entry).exists():
            return Path(entry)
    if entries:
        return Path(entries[0])
    return Path.home() / ".kube" / "config"


def _named(doc: Mapping[str, Any], section: str, name: str, inner: str, where: str) -> Obj:
    items = doc.get(section)
    if items is None:
        items = []
    if not isinstance(items, list):
        raise KubeconfigError(f"{where}: {section}: must be a list")
    for item in items:
        if isinstance(item, Mapping) and item.get("name") == name:
            body = item.get(inner)
            if not isinstance(body, Mapping):
                raise KubeconfigError(f"{where}: {section}[{name}].{inner}: must be a mapping")
            return dict(body)
    raise KubeconfigError(f'{where}: {section}: no entry named "{name}"')


def _b64_field(value: Any, field: str, where: str) -> bytes:
    if not isinstance(value, str) or not value.strip():
        raise KubeconfigError(f"{where}: {field}: must be a non-empty base64 string")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise KubeconfigError(f"{where}: {field}: not valid base64") from None


def _file_field(value: Any, field: str, where: str, base: Path) -> bytes:
    if not isinstance(value, str) or not value:
        raise KubeconfigError(f"{where}: {field}: must be a file path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = base / path
    try:
        return path.read_bytes()
    except OSError as exc:
        raise KubeconfigError(f"{where}: {field}: cannot read {path}: {exc.strerror}") from None


def _pem_or_file(
    body: Mapping[str, Any], key: str, prefix: str, where: str, base: Path
) -> bytes | None:
    data_key = f"{key}-data"
    if body.get(data_key):
        return _b64_field(body[data_key], f"{prefix}.{data_key}", where)
    if body.get(key):
        return _file_field(body[key], f"{prefix}.{key}", where, base)
    return None


def _load_client_pair(ctx: ssl.SSLContext, cert: bytes, key: bytes, field: str, where: str) -> None:
    if b"-----BEGIN" not in cert:
        raise KubeconfigError(f"{where}: {field}.client-certificate: not a PEM certificate")
    if b"-----BEGIN" not in key or b"PRIVATE KEY" not in key:
        raise KubeconfigError(f"{where}: {field}.client-key: not a PEM private key")
    # ssl can only load a certificate chain from files: write both to a private temporary
    # directory (mode 0700, files 0600), load them and remove them at once.
    with tempfile.TemporaryDirectory(prefix="edgeweave-kubeconfig-") as tmp:
        paths = []
        for name, data in (("client.crt", cert), ("client.key", key)):
            path = os.path.join(tmp, name)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            paths.append(path)
        try:
            ctx.load_cert_chain(paths[0], paths[1])
        except ssl.SSLError as exc:
            raise KubeconfigError(
                f"{where}: {field}: client certificate and key are unusable together: "
                f"{exc.reason or exc}"
            ) from None


def load_kubeconfig(path: Path | None = None, *, context: str | None = None) -> ClusterAccess:
    """Read a kubeconfig (default: `default_kubeconfig_path()`) and build the `ClusterAccess`
    of `context` (default: its `current-context`). Raises `KubeconfigError`."""
    path = path or default_kubeconfig_path()
    where = str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KubeconfigError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KubeconfigError(f"{where}: cannot read: {exc}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise KubeconfigError(f"{where}: not valid YAML: {exc}") from None
    if not isinstance(doc, Mapping):
        raise KubeconfigError(f"{where}: not a kubeconfig (expected a mapping)")
    base = path.parent
    ctx_name = context or doc.get("current-context")
    if not isinstance(ctx_name, str) or not ctx_name:
        raise KubeconfigError(f"{where}: current-context: not set (and no context was given)")
    ctx_body = _named(doc, "contexts", ctx_name, "context", where)
    cluster_name, user_name = ctx_body.get("cluster"), ctx_body.get("user")
    if not isinstance(cluster_name, str) or not cluster_name:
        raise KubeconfigError(f"{where}: contexts[{ctx_name}].context.cluster: not set")
    cluster = _named(doc, "clusters", cluster_name, "cluster", where)
    cprefix = f"clusters[{cluster_name}].cluster"
    server = cluster.get("server")
    if not isinstance(server, str) or not server:
        raise KubeconfigError(f"{where}: {cprefix}.server: not set")
    parsed = urllib.parse.urlsplit(server)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise KubeconfigError(f"{where}: {cprefix}.server: {server!r} is not an http(s) URL")
    user: Obj = {}
    uprefix = ""
    if isinstance(user_name, str) and user_name:
        user = _named(doc, "users", user_name, "user", where)
        uprefix = f"users[{user_name}].user"
    for unsupported in ("exec", "auth-provider"):
        if user.get(unsupported):
            raise KubeconfigError(
                f"{where}: {uprefix}.{unsupported}: credential plugins are not supported; use "
                "a client certificate or a token"
            )
    if user.get("username") or user.get("password"):
        raise KubeconfigError(
            f"{where}: {uprefix}.username: basic authentication is not supported (Kubernetes "
            "removed it in 1.19); use a client certificate or a token"
        )
    token: str | None = None
    if user.get("token"):
        if not isinstance(user["token"], str):
            raise KubeconfigError(f"{where}: {uprefix}.token: must be a string")
        token = user["token"].strip()
    elif user.get("tokenFile"):
        raw = _file_field(user["tokenFile"], f"{uprefix}.tokenFile", where, base)
        token = raw.decode("utf-8", "replace").strip()
        if not token:
            raise KubeconfigError(f"{where}: {uprefix}.tokenFile: the file is empty")
    cert = _pem_or_file(user, "client-certificate", uprefix, where, base)
    key = _pem_or_file(user, "client-key", uprefix, where, base)
    if (cert is None) != (key is None):
        missing = "client-key" if key is None else "client-certificate"
        raise KubeconfigError(
            f"{where}: {uprefix}.{missing}(-data): not set (needed with the other)"
        )
    tls_name = cluster.get("tls-server-name")
    if tls_name is not None and (not isinstance(tls_name, str) or not tls_name):
        raise KubeconfigError(f"{where}: {cprefix}.tls-server-name: must be a host name")
    if parsed.scheme == "http":
        if cert is not None:
            raise KubeconfigError(
                f"{where}: {uprefix}.client-certificate: needs an https server ({cprefix}.server "
                f"is {server})"
            )
        return ClusterAccess(server, None, token, None, ctx_name)
    ca = _pem_or_file(cluster, "certificate-authority", cprefix, where, base)
    insecure = cluster.get("insecure-skip-tls-verify") is True
    if insecure and ca is not None:
        raise KubeconfigError(
            f"{where}: {cprefix}.insecure-skip-tls-verify: cannot be combined with "
            "certificate-authority (as kubectl says: use one or the other)"
        )
    sslctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    sslctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if insecure:
        sslctx.check_hostname = False
        sslctx.verify_mode = ssl.CERT_NONE
    elif ca is not None:
        try:
            sslctx.load_verify_locations(cadata=ca.decode("ascii"))
        except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
            field = (
                "certificate-authority-data"
                if cluster.get("certificate-authority-data")
                else ("certificate-authority")
            )
            raise KubeconfigError(
                f"{where}: {cprefix}.{field}: not a PEM CA certificate: {exc}"
            ) from None
    else:
        sslctx.load_default_certs()
    if cert is not None and key is not None:
        _load_client_pair(sslctx, cert, key, uprefix, where)
    return ClusterAccess(server, sslctx, token, tls_name, ctx_name)


# ---- watch stream codec -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class WatchEvent:
    """One event of a watch stream."""

    type: EventType
    """ADDED, MODIFIED, DELETED, BOOKMARK (only `metadata.resourceVersion` is meaningful) or
    ERROR (`object` is a `Status`)."""
    object: Obj
    """The object (for DELETED its last state; for ERROR the Status)."""

    @property
    def resource_version(self) -> str | None:
        """The object's `metadata.resourceVersion`, if any."""
        meta = self.object.get("metadata")
        rv = meta.get("resourceVersion") if isinstance(meta, Mapping) else None
        return rv if isinstance(rv, str) and rv else None


def parse_watch_event(line: bytes) -> WatchEvent:
    """One line of a watch stream; `WatchProtocolError` unless it is `{"type", "object"}`."""
    try:
        doc = json.loads(line)
    except (ValueError, UnicodeDecodeError) as exc:
        raise WatchProtocolError(f"watch stream: not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise WatchProtocolError("watch stream: an event must be a JSON object")
    type_, obj = doc.get("type"), doc.get("object")
    if type_ not in EVENT_TYPES:
        raise WatchProtocolError(f"watch stream: unknown event type {type_!r}")
    if not isinstance(obj, dict):
        raise WatchProtocolError(f"watch stream: {type_} event without an object")
    return WatchEvent(type_, obj)


class WatchDecoder:
    """Splits a watch stream into events: `feed(bytes)` returns the complete events so far.

    kube-apiserver writes one JSON document per event followed by a newline; chunk boundaries
    fall anywhere. Blank lines are skipped. A line longer than `max_line_bytes` or one that is
    not an event raises `WatchProtocolError` (the stream is then unusable)."""

    def __init__(self, max_line_bytes: int = ClientConfig.max_line_bytes) -> None:
        self.max_line_bytes = max_line_bytes
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        """Bytes of an incomplete line held back."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[WatchEvent]:
        """Take the next bytes of the stream; return the events they complete."""
        self._buf += data
        out: list[WatchEvent] = []
        start = 0
        while True:
            end = self._buf.find(b"\n", start)
            if end < 0:
                break
            line = bytes(self._buf[start:end]).strip()
            start = end + 1
            if line:
                try:
                    out.append(parse_watch_event(line))
                except WatchProtocolError as exc:
                    raise WatchProtocolError(str(exc), out) from None
        del self._buf[:start]
        if len(self._buf) > self.max_line_bytes:
            raise WatchProtocolError(
                f"watch stream: an event is longer than {self.max_line_bytes} bytes", out
            )
        return out

    def finish(self) -> list[WatchEvent]:
        """End of stream: a last event without its newline is accepted if it is complete."""
        line, self._buf = bytes(self._buf).strip(), bytearray()
        return [parse_watch_event(line)] if line else []


# ---- the client -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ObjectList:
    """One page of a list."""

    items: list[Obj]
    """The objects, in the server's order."""
    resource_version: str
    """The list's `metadata.resourceVersion`: watch from here to see every later change."""
    continue_token: str | None = None
    """Pass as `continue_token` for the next page; None on the last page."""


@dataclasses.dataclass(frozen=True)
class DeletePreconditions:
    """`DeleteOptions.preconditions`: the delete fails with Conflict on a mismatch."""

    uid: str | None = None
    """The object must have this uid (not a new object of the same name)."""
    resource_version: str | None = None
    """The object must still be at this resourceVersion."""


_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    aiohttp.ClientError,
    asyncio.TimeoutError,
    OSError,
)


def resource_path(
    res: ResourceInfo,
    *,
    namespace: str | None = None,
    name: str | None = None,
    subresource: str | None = None,
) -> str:
    """`/api/v1/namespaces/ns/pods/name/status` and friends. A namespaced resource without a
    namespace means all namespaces (only for list/watch)."""
    root = f"/apis/{res.group}/{res.version}" if res.group else f"/api/{res.version}"
    parts = [root]
    if res.namespaced and namespace:
        parts.append(f"namespaces/{urllib.parse.quote(namespace, safe='')}")
    parts.append(res.plural)
    if name is not None:
        if not name:
            raise ValueError(f"an empty {res.kind} name")
        parts.append(urllib.parse.quote(name, safe=""))
        if subresource:
            parts.append(subresource)
    return "/".join(parts)


def _object_namespace(res: ResourceInfo, body: Mapping[str, Any], namespace: str | None) -> str:
    if not res.namespaced:
        return ""
    meta = body.get("metadata")
    given = meta.get("namespace") if isinstance(meta, Mapping) else None
    ns = namespace or (given if isinstance(given, str) else "")
    if not ns:
        raise ValueError(f"{res.kind} needs a namespace (argument or metadata.namespace)")
    return ns


def _object_name(res: ResourceInfo, body: Mapping[str, Any]) -> str:
    meta = body.get("metadata")
    name = meta.get("name") if isinstance(meta, Mapping) else None
    if not isinstance(name, str) or not name:
        raise ValueError(f"the {res.kind} has no metadata.name")
    return name


class KubeClient:
    """An asyncio Kubernetes API client over one aiohttp session (created on first use, in
    the running loop). Close it with `await client.close()` or `async with`."""

    def __init__(
        self,
        server: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        token: str | None = None,
        tls_server_name: str | None = None,
        config: ClientConfig = ClientConfig(),
    ) -> None:
        parsed = urllib.parse.urlsplit(server)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError(f"server must be an http(s) URL, got {server!r}")
        self.server = server.rstrip("/")
        self.config = config
        self._https = parsed.scheme == "https"
        self._ssl = ssl_context
        self._token = token
        self._tls_server_name = tls_server_name
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    def from_access(
        cls, access: ClusterAccess, *, config: ClientConfig = ClientConfig()
    ) -> KubeClient:
        """A client for a `ClusterAccess` (see `load_kubeconfig`)."""
        return cls(
            access.server,
            ssl_context=access.ssl,
            token=access.token,
            tls_server_name=access.tls_server_name,
            config=config,
        )

    @classmethod
    def from_kubeconfig(
        cls,
        path: Path | None = None,
        *,
        context: str | None = None,
        config: ClientConfig = ClientConfig(),
    ) -> KubeClient:
        """A client for a kubeconfig's current (or named) context; `KubeconfigError` if the
        file cannot be used."""
        return cls.from_access(load_kubeconfig(path, context=context), config=config)

    # ---- session ------------------------------------------------------------------------------

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            cfg = self.config
            ssl_arg: ssl.SSLContext | bool = self._ssl if self._ssl is not None else True
            connector = aiohttp.TCPConnector(
                ssl=ssl_arg if self._https else False, limit=cfg.max_connections
            )
            headers = {"Accept": "application/json", "User-Agent": cfg.user_agent}
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            self._session = aiohttp.ClientSession(
                connector=connector,
                headers=headers,
                timeout=aiohttp.ClientTimeout(
                    total=cfg.request_timeout_s, connect=cfg.connect_timeout_s
                ),
            )
        return self._session

    async def close(self) -> None:
        """Close the session and its connections (running watches end with an error)."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> KubeClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    # ---- raw requests -------------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: Mapping[str, str] | None = None,
        body: Any = None,
        content_type: str = "application/json",
    ) -> Any:
        """Send one request to `path` (below the server URL) and return the decoded JSON
        answer; a typed `StoreError` for an error answer, `KubeConnectionError` if the server
        cannot be reached or the answer is cut."""
        data: bytes | None = None
        headers: dict[str, str] = {}
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers["Content-Type"] = content_type
        url = self.server + path
        kwargs: dict[str, Any] = {}
        if self._tls_server_name:
            kwargs["server_hostname"] = self._tls_server_name
        try:
            async with self._get_session().request(
                method, url, params=params, data=data, headers=headers, **kwargs
            ) as resp:
                raw = await resp.read()
                status = resp.status
        except _TRANSPORT_ERRORS as exc:
            raise KubeConnectionError(f"{method} {url}: {_describe(exc)}") from exc
        decoded = _decode_body(raw)
        if status >= 400:
            raise error_from_status(status, decoded)
        return decoded

    async def _open_stream(
        self, path: str, params: Mapping[str, str], read_timeout: float
    ) -> aiohttp.ClientResponse:
        kwargs: dict[str, Any] = {}
        if self._tls_server_name:
            kwargs["server_hostname"] = self._tls_server_name
        timeout = aiohttp.ClientTimeout(
            total=None, connect=self.config.connect_timeout_s, sock_read=read_timeout
        )
        return await self._get_session().get(
            self.server + path, params=params, timeout=timeout, **kwargs
        )

    # ---- verbs --------------------------------------------------------------------------------

    async def get(
        self,
        res: ResourceInfo,
        name: str,
        *,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Obj:
        """GET one object (or its `status`/`scale` subresource)."""
        path = resource_path(res, namespace=namespace, name=name, subresource=subresource)
        return _as_obj(await self.request("GET", path))

    async def list(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        limit: int | None = None,
        continue_token: str | None = None,
        resource_version: str | None = None,
    ) -> ObjectList:
        """One page of a list (all of it without `limit`). `namespace=None` lists every
        namespace. Pages after the first show the first page's revision (Gone once that is
        compacted: start again)."""
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        if limit:
            params["limit"] = str(limit)
        if continue_token:
            params["continue"] = continue_token
        if resource_version is not None:
            params["resourceVersion"] = resource_version
        path = resource_path(res, namespace=namespace)
        doc = _as_obj(await self.request("GET", path, params=params))
        items = doc.get("items") or []
        meta = doc.get("metadata") or {}
        if not isinstance(items, list) or not isinstance(meta, Mapping):
            raise InternalError(f"malformed {res.list_kind}: items must be a list")
        return ObjectList(
            [i for i in items if isinstance(i, dict)],
            str(meta.get("resourceVersion") or ""),
            meta.get("continue") or None,
        )

    async def list_all(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        page_size: int = 500,
    ) -> ObjectList:
        """Every matching object, fetched `page_size` at a time (one consistent revision). If
        the continue token expires mid-way (410), falls back to one unpaged list, as client-go's
        pager does."""
        items: list[Obj] = []
        token: str | None = None
        rv = ""
        while True:
            try:
                page = await self.list(
                    res,
                    namespace=namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                    limit=page_size,
                    continue_token=token,
                )
            except Gone:
                if token is None:
                    raise
                return await self.list(
                    res,
                    namespace=namespace,
                    label_selector=label_selector,
                    field_selector=field_selector,
                )
            items.extend(page.items)
            rv = rv or page.resource_version
            if not page.continue_token:
                return ObjectList(items, rv, None)
            token = page.continue_token

    async def create(
        self, res: ResourceInfo, body: Mapping[str, Any], *, namespace: str | None = None
    ) -> Obj:
        """POST a new object (`metadata.generateName` works); returns it as stored."""
        ns = _object_namespace(res, body, namespace)
        path = resource_path(res, namespace=ns)
        return _as_obj(await self.request("POST", path, body=_with_type(res, body)))

    async def update(
        self,
        res: ResourceInfo,
        body: Mapping[str, Any],
        *,
        namespace: str | None = None,
        subresource: str | None = None,
    ) -> Obj:
        """PUT the whole object. With `metadata.resourceVersion` set, a stale object is a
        Conflict (optimistic concurrency); without, last write wins."""
        ns = _object_namespace(res, body, namespace)
        name = _object_name(res, body)
        path = resource_path(res, namespace=ns, name=name, subresource=subresource)
        return _as_obj(await self.request("PUT", path, body=_with_type(res, body)))

    async def update_status(
        self, res: ResourceInfo, body: Mapping[str, Any], *, namespace: str | None = None
    ) -> Obj:
        """PUT to the `status` subresource: only `status` changes."""
        return await self.update(res, body, namespace=namespace, subresource="status")

    async def patch(
        self,
        res: ResourceInfo,
        name: str,
        body: Any,
        *,
        namespace: str | None = None,
        content_type: str = MERGE_PATCH,
        subresource: str | None = None,
    ) -> Obj:
        """PATCH with a JSON merge patch (default), a JSON patch (`JSON_PATCH`, body a list)
        or a strategic merge patch (`STRATEGIC_MERGE_PATCH`; 415 on custom resources)."""
        path = resource_path(res, namespace=namespace, name=name, subresource=subresource)
        return _as_obj(await self.request("PATCH", path, body=body, content_type=content_type))

    async def delete(
        self,
        res: ResourceInfo,
        name: str,
        *,
        namespace: str | None = None,
        grace_period_seconds: int | None = None,
        preconditions: DeletePreconditions | None = None,
        propagation_policy: str | None = None,
    ) -> Obj:
        """DELETE an object; returns what the server answers (the deleted or now-terminating
        object, or a `Status`)."""
        options = _delete_options(grace_period_seconds, preconditions, propagation_policy)
        path = resource_path(res, namespace=namespace, name=name)
        return _as_obj(await self.request("DELETE", path, body=options))

    async def delete_collection(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        grace_period_seconds: int | None = None,
    ) -> Obj:
        """DELETE every matching object (`deletecollection`); returns the server's answer
        (a list of what was deleted, or a `Status`)."""
        params: dict[str, str] = {}
        if label_selector:
            params["labelSelector"] = label_selector
        if field_selector:
            params["fieldSelector"] = field_selector
        options = _delete_options(grace_period_seconds, None, None)
        path = resource_path(res, namespace=namespace)
        return _as_obj(await self.request("DELETE", path, params=params, body=options))

    async def bind(
        self,
        namespace: str,
        pod: str,
        node: str,
        *,
        uid: str | None = None,
        resource_version: str | None = None,
    ) -> Obj:
        """POST a `Binding` to `pods/{pod}/binding`, what kube-scheduler does to assign a pod
        to a node; `uid`/`resource_version` make it conditional (Conflict otherwise)."""
        meta: Obj = {"name": pod, "namespace": namespace}
        if uid:
            meta["uid"] = uid
        if resource_version:
            meta["resourceVersion"] = resource_version
        body = {
            "apiVersion": "v1",
            "kind": "Binding",
            "metadata": meta,
            "target": {"apiVersion": "v1", "kind": "Node", "name": node},
        }
        path = f"/api/v1/namespaces/{urllib.parse.quote(namespace, safe='')}/pods/" + (
            f"{urllib.parse.quote(pod, safe='')}/binding"
        )
        return _as_obj(await self.request("POST", path, body=body))

    def watch(
        self,
        res: ResourceInfo,
        *,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        resource_version: str | None = None,
        reconnect: bool = True,
        bookmarks: bool = True,
    ) -> Watch:
        """A `Watch` on `res` from `resource_version` (None: the server first sends the current
        state as ADDED events). Use as an async iterator, inside `async with` to close it."""
        return Watch(
            self,
            res,
            namespace=namespace,
            label_selector=label_selector,
            field_selector=field_selector,
            resource_version=resource_version,
            reconnect=reconnect,
            bookmarks=bookmarks,
        )


def _describe(exc: BaseException) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return "timed out"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode_body(raw: bytes) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")


def _as_obj(value: Any) -> Obj:
    if not isinstance(value, dict):
        raise InternalError(f"the server answered {type(value).__name__}, not a JSON object")
    return value


def _with_type(res: ResourceInfo, body: Mapping[str, Any]) -> Obj:
    out = dict(body)
    out.setdefault("apiVersion", res.api_version)
    out.setdefault("kind", res.kind)
    return out


def _delete_options(
    grace: int | None, pre: DeletePreconditions | None, propagation: str | None
) -> Obj | None:
    options: Obj = {}
    if grace is not None:
        options["gracePeriodSeconds"] = grace
    if pre is not None:
        pc = {"uid": pre.uid, "resourceVersion": pre.resource_version}
        options["preconditions"] = {k: v for k, v in pc.items() if v}
    if propagation:
        options["propagationPolicy"] = propagation
    if not options:
        return None
    return {"kind": "DeleteOptions", "apiVersion": "v1", **options}


# ---- watch ------------------------------------------------------------------------------------


@dataclasses.dataclass
class WatchStats:
    """Counters of one `Watch` (for logs and metrics)."""

    connects: int = 0
    """Watch requests that got a stream (200)."""
    clean_ends: int = 0
    """Streams the server ended normally (its timeout)."""
    failures: int = 0
    """Connection attempts or streams that failed (transport, 5xx, garbage)."""
    events: int = 0
    """Events delivered (bookmarks excluded)."""
    bookmarks: int = 0
    """BOOKMARK events seen."""


class Watch:
    """An async iterator over watch events that survives server timeouts and dropped
    connections by resuming from the last resourceVersion it saw.

    Raises `Gone` when that version is too old (410: relist, then watch again from the list's
    version), another typed error for an `ERROR` event or a non-retryable answer (401, 403,
    404, ...), `KubeConnectionError` once `ClientConfig.watch_retry.max_attempts` consecutive
    attempts failed. BOOKMARK events are delivered too (only their resourceVersion counts);
    `resource_version` always holds where a new watch would resume."""

    def __init__(
        self,
        client: KubeClient,
        res: ResourceInfo,
        *,
        namespace: str | None,
        label_selector: str | None,
        field_selector: str | None,
        resource_version: str | None,
        reconnect: bool,
        bookmarks: bool,
    ) -> None:
        self.client = client
        self.resource = res
        self.resource_version = resource_version
        self.stats = WatchStats()
        self._path = resource_path(res, namespace=namespace)
        self._params: dict[str, str] = {"watch": "1"}
        if label_selector:
            self._params["labelSelector"] = label_selector
        if field_selector:
            self._params["fieldSelector"] = field_selector
        if bookmarks:
            self._params["allowWatchBookmarks"] = "true"
        self._reconnect = reconnect
        self._backoff = Backoff(client.config.watch_retry)
        self._resp: aiohttp.ClientResponse | None = None
        self._decoder = WatchDecoder(client.config.max_line_bytes)
        self._pending: collections.deque[WatchEvent] = collections.deque()
        self._closed = False
        self._ended = False  # a stream ended and reconnect is off
        self._wait = 0.0  # backoff to sleep before the next connection attempt
        self._error: StoreError | None = None  # an ERROR event, raised once pending is empty

    def __aiter__(self) -> AsyncIterator[WatchEvent]:
        return self

    async def __aenter__(self) -> Watch:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop watching and release the connection."""
        self._closed = True
        self._drop()

    def _drop(self) -> None:
        if self._resp is not None:
            self._resp.close()
            self._resp = None

    async def __anext__(self) -> WatchEvent:
        while True:
            if self._pending:
                ev = self._pending.popleft()
                if ev.resource_version:
                    self.resource_version = ev.resource_version
                return ev
            if self._error is not None:  # after the events that came before it
                err, self._error = self._error, None
                self._ended = True
                raise err
            if self._closed or self._ended:
                raise StopAsyncIteration
            if self._resp is None:
                await self._connect()
                continue
            await self._read()

    async def _connect(self) -> None:
        cfg = self.client.config
        params = dict(self._params)
        params["timeoutSeconds"] = str(max(1, round(cfg.watch_timeout_s)))
        if self.resource_version:
            params["resourceVersion"] = self.resource_version
        if self._wait:
            delay, self._wait = self._wait, 0.0
            await asyncio.sleep(delay)
        try:
            resp = await self.client._open_stream(
                self._path, params, cfg.watch_timeout_s + cfg.watch_read_grace_s
            )
        except _TRANSPORT_ERRORS as exc:
            self._fail(f"connect: {_describe(exc)}")
            return
        if resp.status != 200:
            try:
                raw = await resp.read()
            except _TRANSPORT_ERRORS:
                raw = b""
            finally:
                resp.release()
            err = error_from_status(resp.status, _decode_body(raw))
            if resp.status in RETRYABLE_CODES and not isinstance(err, TooLargeResourceVersion):
                self._fail(f"HTTP {resp.status}: {err.message}")
                return
            raise err
        self._resp = resp
        self._decoder = WatchDecoder(cfg.max_line_bytes)
        self.stats.connects += 1

    def _fail(self, why: str) -> None:
        """A connection attempt or a stream failed: wait, then resume (or give up)."""
        self._drop()
        self.stats.failures += 1
        self._wait = self._backoff.next_delay()
        if not self._reconnect or self._backoff.exhausted:
            raise KubeConnectionError(
                f"watch {self.resource.key}: {why} (after {self._backoff.failures} failed "
                "attempts in a row)"
            )
        event(
            log,
            logging.INFO,
            "kube.watch_failed",
            resource=self.resource.key,
            rv=self.resource_version or "",
            why=why,
        )

    async def _read(self) -> None:
        assert self._resp is not None
        try:
            data = await self._resp.content.readany()
        except _TRANSPORT_ERRORS as exc:
            self._fail(f"read: {_describe(exc)}")
            return
        try:
            events = self._decoder.feed(data) if data else self._decoder.finish()
        except WatchProtocolError as exc:
            for ev in exc.events:  # the complete events before the garbage still count
                if not self._accept(ev):
                    return
            self._fail(str(exc))
            return
        for ev in events:
            if not self._accept(ev):
                return
        if not data:  # the server ended the stream (timeoutSeconds): resume at once
            self._drop()
            self.stats.clean_ends += 1
            self._backoff.reset()
            if not self._reconnect:
                self._ended = True

    def _accept(self, ev: WatchEvent) -> bool:
        """Queue one event; False after an ERROR event (the stream is over)."""
        if ev.type == "ERROR":
            self._drop()
            code = ev.object.get("code")
            self._error = error_from_status(code if isinstance(code, int) else 500, ev.object)
            return False
        self._backoff.reset()
        if ev.type == "BOOKMARK":
            self.stats.bookmarks += 1
        else:
            self.stats.events += 1
        self._pending.append(ev)
        return True


@contextlib.asynccontextmanager
async def open_client(
    server: str | None = None,
    *,
    kubeconfig: Path | None = None,
    ssl_context: ssl.SSLContext | None = None,
    token: str | None = None,
    config: ClientConfig = ClientConfig(),
) -> AsyncIterator[KubeClient]:
    """`async with open_client(kubeconfig=path) as client:` (or `server=URL`); closes it."""
    if server is None:
        client = KubeClient.from_kubeconfig(kubeconfig, config=config)
    else:
        client = KubeClient(server, ssl_context=ssl_context, token=token, config=config)
    try:
        yield client
    finally:
        await client.close()


__all__: Sequence[str] = (
    "Backoff",
    "ClientConfig",
    "ClusterAccess",
    "DeletePreconditions",
    "KubeClient",
    "KubeConnectionError",
    "KubeconfigError",
    "MethodNotAllowed",
    "ObjectList",
    "RequestEntityTooLarge",
    "RetryPolicy",
    "ServerTimeout",
    "ServiceUnavailable",
    "TooManyRequests",
    "Unauthorized",
    "UnexpectedStatus",
    "Watch",
    "WatchDecoder",
    "WatchEvent",
    "WatchProtocolError",
    "WatchStats",
    "default_kubeconfig_path",
    "error_from_status",
    "load_kubeconfig",
    "open_client",
    "parse_watch_event",
    "resource_path",
)
