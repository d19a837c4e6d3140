"""The REST verbs over the store: synchronous, no HTTP. The aiohttp layer (`handlers.py`) runs
these in worker threads and turns results and `StoreError`s into responses.

Every write is one store transaction: read the current object, apply the patch, field
validation, admission (defaults, ClusterIP allocation, NodeRestriction), then store. With
`dryRun=All` the same transaction runs to the end and is rolled back (Kubernetes runs the whole
admission chain for dry runs too; nothing is stored, no event is sent).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, TypeVar

from edgeweave.apiserver.admission import Admission, AdmissionRequest, Operation
from edgeweave.apiserver.codec import Decoded, decode_json, media_type
from edgeweave.apiserver.params import DeleteOptions, ListOptions, WriteOptions
from edgeweave.apiserver.validation import check_fields
from edgeweave.kube.errors import (
    BadRequest,
    NotFound,
    TooLargeResourceVersion,
    UnsupportedMediaType,
)
from edgeweave.kube.objects import Obj, Subresource, patch_object
from edgeweave.kube.patch import APPLY_PATCH, PATCH_TYPES
from edgeweave.kube.resources import ResourceInfo
from edgeweave.kube.store import Deleted, ListResult, Store
from edgeweave.pki import Identity

T = TypeVar("T")


class _DryRun(Exception):
    """Carries a dry run's result out of the transaction it rolls back."""

    def __init__(self, value: object) -> None:
        super().__init__("dry run")
        self.value = value


@dataclasses.dataclass(frozen=True)
class Written:
    """The result of a create, update or patch."""

    object: Obj
    """The object as stored (or as it would be, for a dry run)."""
    created: bool = False
    """True if a PUT created it (201)."""
    warnings: tuple[str, ...] = ()
    """Field-validation warnings for `Warning` headers."""


def _with_rv(obj: Obj, rv: str | None) -> Obj:
    meta = dict(obj.get("metadata") or {})
    if rv is None:
        meta.pop("resourceVersion", None)
    else:
        meta["resourceVersion"] = rv
    return {**obj, "metadata": meta}


def _name_of(obj: Any) -> str:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    return name if isinstance(name, str) else ""


class Rest:
    """The verbs for one store and admission chain."""

    def __init__(self, store: Store, admission: Admission, *, max_depth: int = 100) -> None:
        self.store = store
        self.admission = admission
        self.max_depth = max_depth

    def _write(self, dry_run: bool, fn: Callable[[], T]) -> T:
        if not dry_run:
            with self.store.transaction():
                return fn()
        try:
            with self.store.transaction():
                raise _DryRun(fn())
        except _DryRun as done:
            return done.value  # type: ignore[return-value]

    def _admit(
        self,
        op: Operation,
        res: ResourceInfo,
        sub: str,
        namespace: str | None,
        name: str,
        user: Identity | None,
        new: Obj | None,
        old: Obj | None,
    ) -> Obj | None:
        req = AdmissionRequest(op, res, sub, namespace or "", name, user)
        return self.admission.admit(self.store, req, new, old)

    def _current(self, res: ResourceInfo, name: str, namespace: str | None) -> Obj | None:
        try:
            return self.store.get(res, name, namespace=namespace)
        except NotFound:
            return None

    # ---- reads --------------------------------------------------------------------------------

    def get_raw(self, res: ResourceInfo, namespace: str | None, name: str, sub: str) -> str | Obj:
        """The object's JSON text (or its Scale)."""
        if sub == "scale":
            return self.store.get_scale(res, name, namespace=namespace)
        return self.store.get_raw(res, name, namespace=namespace)

    def list_page(self, res: ResourceInfo, namespace: str | None, opts: ListOptions) -> ListResult:
        """A list with Kubernetes' resourceVersion semantics (see `params.py`)."""
        rv, exact = opts.resource_version, opts.resource_version_match == "Exact"
        if rv and not exact and not opts.continue_token:
            current = self.store.revision
            if rv > current:
                raise TooLargeResourceVersion(
                    f"Too large resource version: {rv}, current: {current}",
                    retry_after_seconds=1,
                )
        return self.store.list_objects(
            res,
            namespace=namespace,
            label_selector=opts.label_selector,
            field_selector=opts.field_selector,
            limit=opts.limit,
            continue_token=opts.continue_token,
            resource_version=rv if exact else None,
        )

    # ---- writes -------------------------------------------------------------------------------

    def create(
        self,
        res: ResourceInfo,
        namespace: str | None,
        body: Decoded,
        opts: WriteOptions,
        user: Identity | None,
    ) -> Written:
        """POST to a collection."""
        obj, warnings = check_fields(res, body.value, opts.field_validation, body.duplicates)
        if not isinstance(obj, dict):
            raise BadRequest(f"the body of a {res.kind} must be a JSON object")
        name = _name_of(obj)

        def run() -> Obj:
            admitted = self._admit("CREATE", res, "", namespace, name, user, obj, None)
            return self.store.create(res, admitted, namespace=namespace)

        made = self._write(opts.dry_run, run)
        if opts.dry_run:
            made = _with_rv(made, None)  # a dry-run create is never stored: no resourceVersion
        return Written(made, True, tuple(warnings))

    def update(
        self,
        res: ResourceInfo,
        namespace: str | None,
        name: str,
        sub: str,
        body: Decoded,
        opts: WriteOptions,
        user: Identity | None,
    ) -> Written:
        """PUT of an object or of its status/scale."""
        if sub == "scale":
            if not isinstance(body.value, dict):
                raise BadRequest("the body of a Scale must be a JSON object")
            scale = body.value

            def run_scale() -> Obj:
                return self.store.update(
                    res, scale, namespace=namespace, name=name, subresource="scale"
                )

            return Written(self._write(opts.dry_run, run_scale))
        obj, warnings = check_fields(res, body.value, opts.field_validation, body.duplicates)
        if not isinstance(obj, dict):
            raise BadRequest(f"the body of a {res.kind} must be a JSON object")
        subresource: Subresource = "status" if sub == "status" else None

        def run() -> tuple[Obj, bool, str | None]:
            old = self._current(res, name, namespace)
            op: Operation = "UPDATE" if old is not None else "CREATE"
            admitted = obj
            if old is not None or (res.allow_create_on_update and not sub):
                admitted = self._admit(op, res, sub, namespace, name, user, obj, old) or obj
            stored = self.store.update(
                res, admitted, namespace=namespace, name=name, subresource=subresource
            )
            old_rv = (old or {}).get("metadata", {}).get("resourceVersion")
            return stored, old is None, old_rv

        stored, created, old_rv = self._write(opts.dry_run, run)
        if opts.dry_run:
            stored = _with_rv(stored, old_rv)
        return Written(stored, created, tuple(warnings))

    def patch(
        self,
        res: ResourceInfo,
        namespace: str | None,
        name: str,
        sub: str,
        content_type: str | None,
        raw: bytes,
        opts: WriteOptions,
        user: Identity | None,
    ) -> Written:
        """PATCH with JSON patch, merge patch or strategic merge patch."""
        ctype = media_type(content_type)
        if ctype == APPLY_PATCH:
            raise UnsupportedMediaType(
                "server-side apply (application/apply-patch+yaml) is not supported by this "
                "server; use client-side `kubectl apply` (without --server-side)"
            )
        if ctype not in PATCH_TYPES:
            raise UnsupportedMediaType(
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(PATCH_TYPES)}"
            )
        patch_doc = decode_json(raw, max_depth=self.max_depth).value
        if sub == "scale":

            def run_scale() -> Obj:
                return self.store.patch(
                    res, name, ctype, patch_doc, namespace=namespace, subresource="scale"
                )

            return Written(self._write(opts.dry_run, run_scale))
        warnings: list[str] = []
        old_rv: list[str | None] = [None]

        def mutate(current: Obj) -> Obj:
            old_rv[0] = current.get("metadata", {}).get("resourceVersion")
            patched = patch_object(res, current, ctype, patch_doc, name)
            checked, found = check_fields(res, patched, opts.field_validation)
            warnings.extend(found)
            admitted = self._admit("UPDATE", res, sub, namespace, name, user, checked, current)
            return admitted or checked

        def run() -> Obj:
            return self.store.guaranteed_update(
                res,
                name,
                mutate,
                namespace=namespace,
                subresource="status" if sub == "status" else None,
            )

        stored = self._write(opts.dry_run, run)
        if opts.dry_run:
            stored = _with_rv(stored, old_rv[0])
        return Written(stored, False, tuple(warnings))

    def delete(
        self,
        res: ResourceInfo,
        namespace: str | None,
        name: str,
        opts: DeleteOptions,
        user: Identity | None,
    ) -> Deleted:
        """DELETE of one object."""

        def run() -> Deleted:
            current = self.store.get(res, name, namespace=namespace)
            self._admit("DELETE", res, "", namespace, name, user, None, current)
            return self.store.delete(
                res,
                name,
                namespace=namespace,
                preconditions=opts.preconditions,
                grace_period_seconds=opts.grace_period_seconds,
            )

        return self._write(opts.dry_run, run)

    def delete_collection(
        self,
        res: ResourceInfo,
        namespace: str | None,
        list_opts: ListOptions,
        opts: DeleteOptions,
        user: Identity | None,
    ) -> list[Deleted]:
        """DELETE of a collection (with selectors)."""

        def run() -> list[Deleted]:
            return self.store.delete_collection(
                res,
                namespace=namespace,
                label_selector=list_opts.label_selector,
                field_selector=list_opts.field_selector,
                grace_period_seconds=opts.grace_period_seconds,
            )

        return self._write(opts.dry_run, run)
