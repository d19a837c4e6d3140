"""Strategic-merge-patch schema: which lists merge by which key, per kind.

Kubernetes declares these with `patchStrategy`/`patchMergeKey` struct tags on its Go types;
`kubectl apply/edit/label/annotate/scale` build strategic merge patches from the same tags. This
table holds the tags for the fields of the built-in kinds we serve. A list not named here is
replaced as a whole by a patch (Kubernetes' default, e.g. `command`, `args`, `tolerations`,
Endpoints `subsets`, EndpointSlice `endpoints`); a map not named here merges key by key.

| kind | field | strategy |
|---|---|---|
| every kind | `metadata.finalizers` | merge as a set of strings |
| every kind | `metadata.ownerReferences` | merge by `uid` |
| pod specs (Pod `spec`, Deployment `spec.template.spec`) | `containers` | merge by `name` |
| " | `initContainers`, `ephemeralContainers` | merge by `name` |
| " | `volumes` | merge by `name`, retainKeys |
| " | `imagePullSecrets`, `schedulingGates` | merge by `name` |
| " | `resourceClaims` | merge by `name`, retainKeys |
| " | `hostAliases` | merge by `ip` |
| " | `topologySpreadConstraints` | merge by `topologyKey` |
| containers (all three lists) | `ports` | merge by `containerPort` |
| " | `env` | merge by `name` |
| " | `volumeMounts` | merge by `mountPath` |
| " | `volumeDevices` | merge by `devicePath` |
| Pod | `status.conditions` | merge by `type` |
| Pod | `status.podIPs`, `status.hostIPs` | merge by `ip` |
| Deployment | `spec.strategy` | retainKeys |
| Deployment, Service, Namespace, Node | `status.conditions` | merge by `type` |
| Service | `spec.ports` | merge by `port` |
| Node | `spec.podCIDRs` | merge as a set of strings |
| Node | `status.addresses` | merge by `type` |

"retainKeys" only documents that kubectl sends `$retainKeys` there; the directive is honoured
wherever it appears. Custom resources (the KubeEdge kinds) have no strategic merge: the API
answers 415 and kubectl falls back to a JSON merge patch, as with a real cluster.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping


@dataclasses.dataclass(frozen=True)
class Field:
    """How a strategic merge patch treats one field."""

    merge_key: str | None = None
    """For a list of objects: merge items whose value of this key matches."""
    set_merge: bool = False
    """For a list of scalars: merge as a set (union; `$deleteFromPrimitiveList` removes)."""
    retain_keys: bool = False
    """kubectl sends `$retainKeys` for this map (or for each item of this list)."""
    fields: Mapping[str, Field] = dataclasses.field(default_factory=dict)
    """Schema of the fields below (of the object, or of each list item)."""


Schema = Mapping[str, Field]

_BY_NAME = Field(merge_key="name")
_BY_TYPE = Field(merge_key="type")
_BY_IP = Field(merge_key="ip")
_CONDITIONS: Schema = {"conditions": _BY_TYPE}

META: Schema = {"finalizers": Field(set_merge=True), "ownerReferences": Field(merge_key="uid")}
CONTAINER: Schema = {
    "ports": Field(merge_key="containerPort"),
    "env": _BY_NAME,
    "volumeMounts": Field(merge_key="mountPath"),
    "volumeDevices": Field(merge_key="devicePath"),
}
POD_SPEC: Schema = {
    "containers": Field(merge_key="name", fields=CONTAINER),
    "initContainers": Field(merge_key="name", fields=CONTAINER),
    "ephemeralContainers": Field(merge_key="name", fields=CONTAINER),
    "volumes": Field(merge_key="name", retain_keys=True),
    "imagePullSecrets": _BY_NAME,
    "schedulingGates": _BY_NAME,
    "resourceClaims": Field(merge_key="name", retain_keys=True),
    "hostAliases": _BY_IP,
    "topologySpreadConstraints": Field(merge_key="topologyKey"),
}
POD_STATUS: Schema = {"conditions": _BY_TYPE, "podIPs": _BY_IP, "hostIPs": _BY_IP}
POD_TEMPLATE: Schema = {"metadata": Field(fields=META), "spec": Field(fields=POD_SPEC)}

_KINDS: dict[str, Schema] = {
    "Pod": {"spec": Field(fields=POD_SPEC), "status": Field(fields=POD_STATUS)},
    "Deployment": {
        "spec": Field(
            fields={"template": Field(fields=POD_TEMPLATE), "strategy": Field(retain_keys=True)}
        ),
        "status": Field(fields=_CONDITIONS),
    },
    "Service": {
        "spec": Field(fields={"ports": Field(merge_key="port")}),
        "status": Field(fields=_CONDITIONS),
    },
    "Node": {
        "spec": Field(fields={"podCIDRs": Field(set_merge=True)}),
        "status": Field(fields={"conditions": _BY_TYPE, "addresses": _BY_TYPE}),
    },
    "Namespace": {"status": Field(fields=_CONDITIONS)},
}


def schema_for(kind: str) -> Schema:
    """The top-level strategic merge schema of a built-in kind (metadata rules included)."""
    return {"metadata": Field(fields=META), **_KINDS.get(kind, {})}
