"""Typed errors of the Kubernetes-style object store, each carrying its `Status` reason and code.

Every failure a client can cause is one of these classes; the API server turns any of them into
the HTTP status `code` and the JSON body `to_status()` returns, which is what `kubectl` prints:

    Error from server (NotFound): pods "web-0" not found

| class | code | reason | when |
|---|---|---|---|
| `BadRequest` | 400 | BadRequest | malformed input: selector, continue token, patch document |
| `Forbidden` | 403 | Forbidden | creating in a namespace that is being terminated |
| `NotFound` | 404 | NotFound | no such object (or namespace, or subresource) |
| `AlreadyExists` | 409 | AlreadyExists | create of a name that exists |
| `Conflict` | 409 | Conflict | stale resourceVersion, failed uid/resourceVersion precondition |
| `Gone` | 410 | Expired | watch or continue token older than the compacted revision |
| `UnsupportedMediaType` | 415 | UnsupportedMediaType | unknown patch type, or SMP on a CR |
| `Invalid` | 422 | Invalid | the object fails validation; `causes` name the fields |
| `InternalError` | 500 | InternalError | the database failed |
| `TooLargeResourceVersion` | 504 | Timeout | a resourceVersion newer than the store has |

`ParseError` (a `BadRequest`) is what the selector parsers raise; `PatchError` (an `Invalid`)
is what applying a well-formed patch that does not fit the object raises.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar


@dataclasses.dataclass(frozen=True)
class Cause:
    """One field-level reason inside an `Invalid` (or other) status."""

    field: str
    """Dotted path of the offending field, e.g. `metadata.labels`."""
    message: str
    """What is wrong with it, for a human."""
    reason: str = "FieldValueInvalid"
    """Machine-readable cause type (`FieldValueInvalid`, `FieldValueRequired`, ...)."""


class StoreError(Exception):
    """Base of every error the store, the selectors and the patches raise on bad input."""

    code: ClassVar[int] = 500
    reason: ClassVar[str] = "InternalError"

    def __init__(
        self,
        message: str,
        *,
        name: str | None = None,
        kind: str | None = None,
        group: str | None = None,
        causes: Sequence[Cause] = (),
        retry_after_seconds: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.name = name
        self.kind = kind
        self.group = group
        self.causes = tuple(causes)
        self.retry_after_seconds = retry_after_seconds

    def to_status(self) -> dict[str, Any]:
        """The Kubernetes `Status` object (`kind: Status`, `status: Failure`) for this error."""
        status: dict[str, Any] = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        details: dict[str, Any] = {}
        if self.name:
            details["name"] = self.name
        if self.group:
            details["group"] = self.group
        if self.kind:
            details["kind"] = self.kind
        if self.causes:
            details["causes"] = [
                {"reason": c.reason, "message": c.message, "field": c.field} for c in self.causes
            ]
        if self.retry_after_seconds is not None:
            details["retryAfterSeconds"] = self.retry_after_seconds
        if details:
            status["details"] = details
        return status


class BadRequest(StoreError):
    """The request itself is malformed (400)."""

    code = 400
    reason = "BadRequest"


class ParseError(BadRequest):
    """A label or field selector does not parse; the message names the bad part."""


class Forbidden(StoreError):
    """The operation is not allowed in the current state (403)."""

    code = 403
    reason = "Forbidden"


class NotFound(StoreError):
    """The object does not exist (404)."""

    code = 404
    reason = "NotFound"


class AlreadyExists(StoreError):
    """An object with this name already exists (409)."""

    code = 409
    reason = "AlreadyExists"


class Conflict(StoreError):
    """Optimistic concurrency failed: stale resourceVersion or failed precondition (409)."""

    code = 409
    reason = "Conflict"


class Gone(StoreError):
    """The requested revision was compacted away (410, reason `Expired` as Kubernetes sends)."""

    code = 410
    reason = "Expired"


class UnsupportedMediaType(StoreError):
    """The patch type is not supported for this resource (415)."""

    code = 415
    reason = "UnsupportedMediaType"


class Invalid(StoreError):
    """The object fails validation (422); `causes` name the fields."""

    code = 422
    reason = "Invalid"


class PatchError(Invalid):
    """A well-formed patch cannot be applied to the object (a JSON patch `test` failed, ...)."""


class InternalError(StoreError):
    """The database failed (500)."""

    code = 500
    reason = "InternalError"


class TooLargeResourceVersion(StoreError):
    """A resourceVersion newer than the store's current revision was asked for (504)."""

    code = 504
    reason = "Timeout"


def qualified(resource: str, name: str) -> str:
    """`pods "web-0"`: how Kubernetes messages name an object (resource key and quoted name)."""
    return f'{resource} "{name}"'


def not_found(resource: str, name: str, group: str = "") -> NotFound:
    """`pods "x" not found`."""
    plural = resource.split(".", 1)[0]
    return NotFound(f"{qualified(resource, name)} not found", name=name, kind=plural, group=group)


def already_exists(resource: str, name: str, group: str = "") -> AlreadyExists:
    """`pods "x" already exists`."""
    plural = resource.split(".", 1)[0]
    return AlreadyExists(
        f"{qualified(resource, name)} already exists", name=name, kind=plural, group=group
    )


def conflict(resource: str, name: str, why: str, group: str = "") -> Conflict:
    """`Operation cannot be fulfilled on pods "x": <why>`."""
    plural = resource.split(".", 1)[0]
    return Conflict(
        f"Operation cannot be fulfilled on {qualified(resource, name)}: {why}",
        name=name,
        kind=plural,
        group=group,
    )


OPTIMISTIC_LOCK_MESSAGE = (
    "the object has been modified; please apply your changes to the latest version and try again"
)


def invalid(kind: str, name: str, causes: Sequence[Cause], group: str = "") -> Invalid:
    """`Pod "x" is invalid: metadata.name: Invalid value: ...` (several causes in brackets)."""
    texts = [f"{c.field}: {c.message}" for c in causes]
    body = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
    return Invalid(
        f'{kind} "{name}" is invalid: {body}', name=name, kind=kind, group=group, causes=causes
    )
