"""The resources the embedded API serves: names, scope, subresources, verbs, discovery documents.

One `ResourceInfo` per resource holds everything that differs between resources and that
discovery (`/api/v1`, `/apis/{group}/{version}`) and the store need: group/version/kind, plural
and singular names, kubectl's short names, whether it is namespaced, which subresources it has,
which fields are selectable, and the Kubernetes behaviours that vary per resource (create on
PUT, graceful deletion, strategic merge support, name rules).

| resource | group/version | kind | scope | short | status | scale |
|---|---|---|---|---|---|---|
| namespaces | v1 | Namespace | cluster | ns | yes | |
| nodes | v1 | Node | cluster | no | yes | |
| pods | v1 | Pod | namespaced | po | yes | |
| services | v1 | Service | namespaced | svc | yes | |
| endpoints | v1 | Endpoints | namespaced | ep | | |
| configmaps | v1 | ConfigMap | namespaced | cm | | |
| secrets | v1 | Secret | namespaced | | | |
| events | v1 | Event | namespaced | ev | | |
| endpointslices | discovery.k8s.io/v1 | EndpointSlice | namespaced | | | |
| deployments | apps/v1 | Deployment | namespaced | deploy | yes | yes |
| leases | coordination.k8s.io/v1 | Lease | namespaced | | | |
| devices | devices.kubeedge.io/v1beta1 | Device | namespaced | | | |
| devicemodels | devices.kubeedge.io/v1beta1 | DeviceModel | namespaced | | | |
| nodegroups | apps.kubeedge.io/v1alpha1 | NodeGroup | cluster | ng | yes | |
| edgeapplications | apps.kubeedge.io/v1alpha1 | EdgeApplication | namespaced | eapp | yes | |
| objectsyncs | reliablesyncs.kubeedge.io/v1alpha1 | ObjectSync | namespaced | | yes | |
| clusterobjectsyncs | reliablesyncs.kubeedge.io/v1alpha1 | ClusterObjectSync | cluster | | yes | |

The KubeEdge resources follow KubeEdge's CRDs (`build/crds/`), except that ClusterObjectSync is
cluster-scoped here as its name says (upstream's CRD declares it namespaced).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

from edgeweave.kube.errors import StoreError
from edgeweave.kube.selectors import LabelSelector

NameRule = Literal["subdomain", "label", "label1035"]

ALL_VERBS: tuple[str, ...] = (
    "create",
    "delete",
    "deletecollection",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)
NAMESPACE_VERBS: tuple[str, ...] = (
    "create",
    "delete",
    "get",
    "list",
    "patch",
    "update",
    "watch",
)
SUBRESOURCE_VERBS: tuple[str, ...] = ("get", "patch", "update")


@dataclasses.dataclass(frozen=True)
class ResourceInfo:
    """Everything the API and the store need to know about one resource."""

    group: str
    """API group; '' for the core group."""
    version: str
    """Served (and stored) version."""
    kind: str
    """Object kind, e.g. `Pod`."""
    plural: str
    """URL name, e.g. `pods`."""
    singular: str
    """Singular name, e.g. `pod`."""
    namespaced: bool
    """True if objects live in a namespace."""
    short_names: tuple[str, ...] = ()
    """kubectl short names, e.g. `po`."""
    categories: tuple[str, ...] = ()
    """Categories (`all` makes `kubectl get all` include it)."""
    has_status: bool = False
    """True if there is a `/status` subresource: main updates ignore status, status updates
    change only status."""
    has_scale: bool = False
    """True if there is a `/scale` subresource (autoscaling/v1 Scale over `spec.replicas`)."""
    verbs: tuple[str, ...] = ALL_VERBS
    """Verbs discovery advertises."""
    name_rule: NameRule = "subdomain"
    """Which DNS rule names must follow (RFC 1123 subdomain / label, RFC 1035 label)."""
    allow_create_on_update: bool = False
    """True if a PUT of a missing object creates it (as for Services, Endpoints, Leases)."""
    graceful_deletion: bool = False
    """True for Pods: deleting a scheduled pod marks it and waits for the node (or grace 0)."""
    strategic_merge: bool = True
    """False for custom resources: strategic merge patch is refused with 415, as Kubernetes does."""
    keep_status_on_create: bool = False
    """True if a create may set status (Nodes); otherwise status is reset on create."""
    selectable_fields: tuple[str, ...] = ()
    """Field paths kept in a side column so field selectors on them are cheap (any other dotted
    path still works, just by reading the whole object)."""

    @property
    def api_version(self) -> str:
        """`v1` or `group/version`."""
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def key(self) -> str:
        """The group-qualified resource, `pods` or `deployments.apps`: the store's key."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def list_kind(self) -> str:
        """`PodList`."""
        return self.kind + "List"

    @property
    def custom(self) -> bool:
        """True for the KubeEdge (CRD-backed) resources."""
        return not self.strategic_merge

    def api_resources(self) -> list[dict[str, Any]]:
        """The `APIResource` entries discovery lists for this resource and its subresources."""
        main: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            main["shortNames"] = list(self.short_names)
        if self.categories:
            main["categories"] = list(self.categories)
        out = [main]
        if self.has_status:
            out.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        if self.has_scale:
            out.append(
                {
                    "name": f"{self.plural}/scale",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "group": "autoscaling",
                    "version": "v1",
                    "kind": "Scale",
                    "verbs": list(SUBRESOURCE_VERBS),
                }
            )
        return out


def _crd(
    group: str,
    version: str,
    kind: str,
    plural: str,
    *,
    namespaced: bool = True,
    short: tuple[str, ...] = (),
    status: bool = False,
    fields: tuple[str, ...] = (),
) -> ResourceInfo:
    return ResourceInfo(
        group,
        version,
        kind,
        plural,
        kind.lower(),
        namespaced,
        short_names=short,
        has_status=status,
        strategic_merge=False,
        selectable_fields=fields,
    )


NAMESPACES = ResourceInfo(
    "",
    "v1",
    "Namespace",
    "namespaces",
    "namespace",
    False,
    ("ns",),
    has_status=True,
    verbs=NAMESPACE_VERBS,
    name_rule="label",
    selectable_fields=("status.phase",),
)
NODES = ResourceInfo(
    "",
    "v1",
    "Node",
    "nodes",
    "node",
    False,
    ("no",),
    has_status=True,
    keep_status_on_create=True,
    selectable_fields=("spec.unschedulable",),
)
PODS = ResourceInfo(
    "",
    "v1",
    "Pod",
    "pods",
    "pod",
    True,
    ("po",),
    ("all",),
    has_status=True,
    graceful_deletion=True,
    selectable_fields=(
        "spec.nodeName",
        "status.phase",
        "spec.restartPolicy",
        "spec.schedulerName",
        "spec.serviceAccountName",
        "spec.hostNetwork",
        "status.podIP",
        "status.nominatedNodeName",
    ),
)
SERVICES = ResourceInfo(
    "",
    "v1",
    "Service",
    "services",
    "service",
    True,
    ("svc",),
    ("all",),
    has_status=True,
    name_rule="label1035",
    allow_create_on_update=True,
    selectable_fields=("spec.clusterIP", "spec.type"),
)
ENDPOINTS = ResourceInfo(
    "", "v1", "Endpoints", "endpoints", "endpoints", True, ("ep",), allow_create_on_update=True
)
CONFIGMAPS = ResourceInfo("", "v1", "ConfigMap", "configmaps", "configmap", True, ("cm",))
SECRETS = ResourceInfo("", "v1", "Secret", "secrets", "secret", True, selectable_fields=("type",))
EVENTS = ResourceInfo(
    "",
    "v1",
    "Event",
    "events",
    "event",
    True,
    ("ev",),
    allow_create_on_update=True,
    selectable_fields=(
        "involvedObject.kind",
        "involvedObject.namespace",
        "involvedObject.name",
        "involvedObject.uid",
        "involvedObject.apiVersion",
        "involvedObject.resourceVersion",
        "involvedObject.fieldPath",
        "reason",
        "reportingComponent",
        "source",
        "type",
    ),
)
ENDPOINTSLICES = ResourceInfo(
    "discovery.k8s.io",
    "v1",
    "EndpointSlice",
    "endpointslices",
    "endpointslice",
    True,
    allow_create_on_update=True,
    selectable_fields=("addressType",),
)
DEPLOYMENTS = ResourceInfo(
    "apps",
    "v1",
    "Deployment",
    "deployments",
    "deployment",
    True,
    ("deploy",),
    ("all",),
    has_status=True,
    has_scale=True,
)
LEASES = ResourceInfo(
    "coordination.k8s.io", "v1", "Lease", "leases", "lease", True, allow_create_on_update=True
)
DEVICES = _crd("devices.kubeedge.io", "v1beta1", "Device", "devices", fields=("spec.nodeName",))
DEVICEMODELS = _crd("devices.kubeedge.io", "v1beta1", "DeviceModel", "devicemodels")
NODEGROUPS = _crd(
    "apps.kubeedge.io",
    "v1alpha1",
    "NodeGroup",
    "nodegroups",
    namespaced=False,
    short=("ng",),
    status=True,
)
EDGEAPPLICATIONS = _crd(
    "apps.kubeedge.io",
    "v1alpha1",
    "EdgeApplication",
    "edgeapplications",
    short=("eapp",),
    status=True,
)
OBJECTSYNCS = _crd(
    "reliablesyncs.kubeedge.io", "v1alpha1", "ObjectSync", "objectsyncs", status=True
)
CLUSTEROBJECTSYNCS = _crd(
    "reliablesyncs.kubeedge.io",
    "v1alpha1",
    "ClusterObjectSync",
    "clusterobjectsyncs",
    namespaced=False,
    status=True,
)

RESOURCES: tuple[ResourceInfo, ...] = (
    NAMESPACES,
    NODES,
    PODS,
    SERVICES,
    ENDPOINTS,
    CONFIGMAPS,
    SECRETS,
    EVENTS,
    ENDPOINTSLICES,
    DEPLOYMENTS,
    LEASES,
    DEVICES,
    DEVICEMODELS,
    NODEGROUPS,
    EDGEAPPLICATIONS,
    OBJECTSYNCS,
    CLUSTEROBJECTSYNCS,
)


class Registry:
    """A set of resources, looked up the ways the API and kubectl look them up."""

    def __init__(self, resources: Iterable[ResourceInfo]) -> None:
        self._all = tuple(resources)
        self._by_key: dict[str, ResourceInfo] = {}
        self._by_gvr: dict[tuple[str, str, str], ResourceInfo] = {}
        self._by_gvk: dict[tuple[str, str], ResourceInfo] = {}
        for res in self._all:
            if res.key in self._by_key:
                raise ValueError(f"resource {res.key} registered twice")
            self._by_key[res.key] = res
            self._by_gvr[(res.group, res.version, res.plural)] = res
            self._by_gvk[(res.api_version, res.kind)] = res

    def __iter__(self) -> Iterator[ResourceInfo]:
        return iter(self._all)

    def __len__(self) -> int:
        return len(self._all)

    def by_key(self, key: str) -> ResourceInfo:
        """The resource whose `key` (`pods`, `deployments.apps`) this is; KeyError if none."""
        return self._by_key[key]

    def get(self, group: str, version: str, plural: str) -> ResourceInfo | None:
        """The resource a URL names (`/apis/{group}/{version}/.../{plural}`)."""
        return self._by_gvr.get((group, version, plural))

    def by_kind(self, api_version: str, kind: str) -> ResourceInfo | None:
        """The resource an object's `apiVersion` and `kind` name."""
        return self._by_gvk.get((api_version, kind))

    def lookup(self, name: str) -> ResourceInfo | None:
        """kubectl-style: plural, singular, short name or kind (any case), optionally `.group`."""
        text = name.lower()
        for res in self._all:
            names = {res.plural, res.singular, res.kind.lower(), *res.short_names}
            if text in names or any(text == f"{n}.{res.group}" for n in names if res.group):
                return res
        return None

    def group_versions(self) -> list[tuple[str, str]]:
        """(group, version) pairs served, core first, in registration order."""
        seen: dict[tuple[str, str], None] = {}
        for res in self._all:
            seen.setdefault((res.group, res.version), None)
        return list(seen)

    def api_resource_list(self, group: str, version: str) -> dict[str, Any]:
        """The `APIResourceList` for `/api/v1` or `/apis/{group}/{version}`."""
        gv = f"{group}/{version}" if group else version
        resources: list[dict[str, Any]] = []
        for res in self._all:
            if res.group == group and res.version == version:
                resources.extend(res.api_resources())
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": gv,
            "resources": resources,
        }

    def api_versions(self) -> dict[str, Any]:
        """The `APIVersions` document for `/api`."""
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}

    def api_group_list(self) -> dict[str, Any]:
        """The `APIGroupList` document for `/apis` (named groups only)."""
        groups: dict[str, list[str]] = {}
        for group, version in self.group_versions():
            if group:
                groups.setdefault(group, []).append(version)
        items = []
        for group, versions in groups.items():
            gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
            items.append({"name": group, "versions": gvs, "preferredVersion": gvs[0]})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": items}


DEFAULT_REGISTRY = Registry(RESOURCES)


def scale_of(res: ResourceInfo, obj: Mapping[str, Any]) -> dict[str, Any]:
    """The autoscaling/v1 `Scale` view of an object with a scale subresource."""
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    selector = spec.get("selector")
    try:
        sel_text = str(LabelSelector.from_dict(selector)) if isinstance(selector, Mapping) else ""
    except StoreError:
        sel_text = ""
    scale_meta = {
        k: meta[k]
        for k in ("name", "namespace", "uid", "resourceVersion", "creationTimestamp")
        if k in meta
    }
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": scale_meta,
        "spec": {"replicas": spec.get("replicas", 1)},
        "status": {"replicas": status.get("replicas", 0), "selector": sel_text},
    }
