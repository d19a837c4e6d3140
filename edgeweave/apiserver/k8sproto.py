"""Kubernetes protobuf request bodies -> JSON objects, for the kinds kubectl's generators build.

kubectl >= 1.32 sends `Content-Type: application/vnd.kubernetes.protobuf` from its typed clients
(`kubectl create namespace|configmap|secret|deployment|service`, `run`, `expose`); everything
built from files (`apply -f`, `create -f`) stays JSON. We accept protobuf for the kinds those
commands create and refuse anything else with 415, naming what we do not know; a field we do
not know is never dropped silently.

Envelope (k8s.io/apimachinery runtime/serializer/protobuf):

    "k8s\\x00" Unknown
    Unknown  { TypeMeta typeMeta = 1; bytes raw = 2; string contentEncoding = 3;
               string contentType = 4; }
    TypeMeta { string apiVersion = 1; string kind = 2; }
    raw      = the object's own message (e.g. k8s.io.api.core.v1.Namespace), without TypeMeta

Field numbers are those of k8s.io/api and k8s.io/apimachinery `generated.proto`. Go's generated
marshalling writes every non-pointer scalar, even when zero; JSON would omit those
(`omitempty`), so zero values are dropped unless the Go field is a pointer (marked `*` below,
e.g. `replicas`, where 0 means something). `map<k, v>` fields are repeated `{key = 1, value = 2}`
entries; `Time` is `{seconds = 1, nanos = 2}`, `IntOrString` `{type = 1, intVal = 2, strVal = 3}`,
`Quantity` `{string = 1}`.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import time
from typing import Any

from edgeweave.apiserver.protobuf import LENGTH_DELIMITED, VARINT, WireError, iter_fields, signed
from edgeweave.kube.errors import BadRequest, UnsupportedMediaType

MAGIC = b"k8s\x00"
PROTOBUF = "application/vnd.kubernetes.protobuf"

# Field spec: "<number> <jsonName> <type>[*]" where type is s (string), i (int32/64), b (bool),
# time, intstr, map (string->string), bmap (string->bytes), qmap (string->Quantity), fields
# (FieldsV1 raw JSON), a message name, or !Name (a message we do not decode); a "[]" prefix marks
# a repeated field, a "*" suffix a Go pointer (zero values are kept).
_SCHEMA_TEXT: dict[str, str] = {
    # k8s.io/apimachinery/pkg/apis/meta/v1
    "ObjectMeta": "1 name s; 2 generateName s; 3 namespace s; 4 selfLink s; 5 uid s; "
    "6 resourceVersion s; 7 generation i; 8 creationTimestamp time; 9 deletionTimestamp time*; "
    "10 deletionGracePeriodSeconds i*; 11 labels map; 12 annotations map; "
    "13 ownerReferences []OwnerReference; 14 finalizers []s; 17 managedFields []ManagedFieldsEntry",
    "OwnerReference": "1 kind s; 3 name s; 4 uid s; 5 apiVersion s; 6 controller b*; "
    "7 blockOwnerDeletion b*",
    "ManagedFieldsEntry": "1 manager s; 2 operation s; 3 apiVersion s; 4 time time*; "
    "6 fieldsType s; 7 fieldsV1 fields*; 8 subresource s",
    "LabelSelector": "1 matchLabels map; 2 matchExpressions []LabelSelectorRequirement",
    "LabelSelectorRequirement": "1 key s; 2 operator s; 3 values []s",
    # k8s.io/api/core/v1
    "Namespace": "1 metadata ObjectMeta; 2 spec NamespaceSpec; 3 status NamespaceStatus",
    "NamespaceSpec": "1 finalizers []s",
    "NamespaceStatus": "1 phase s; 2 conditions []!NamespaceCondition",
    "ConfigMap": "1 metadata ObjectMeta; 2 data map; 3 binaryData bmap; 4 immutable b*",
    "Secret": "1 metadata ObjectMeta; 2 data bmap; 3 type s; 4 stringData map; 5 immutable b*",
    "Service": "1 metadata ObjectMeta; 2 spec ServiceSpec; 3 status ServiceStatus",
    "ServiceSpec": "1 ports []ServicePort; 2 selector map; 3 clusterIP s; 4 type s; "
    "5 externalIPs []s; 7 sessionAffinity s; 8 loadBalancerIP s; "
    "9 loadBalancerSourceRanges []s; 10 externalName s; 11 externalTrafficPolicy s; "
    "12 healthCheckNodePort i; 13 publishNotReadyAddresses b; "
    "14 sessionAffinityConfig SessionAffinityConfig*; 17 ipFamilyPolicy s*; 18 clusterIPs []s; "
    "19 ipFamilies []s; 20 allocateLoadBalancerNodePorts b*; 21 loadBalancerClass s*; "
    "22 internalTrafficPolicy s*; 23 trafficDistribution s*",
    "ServicePort": "1 name s; 2 protocol s; 3 port i; 4 targetPort intstr; 5 nodePort i; "
    "6 appProtocol s*",
    "SessionAffinityConfig": "1 clientIP ClientIPConfig*",
    "ClientIPConfig": "1 timeoutSeconds i*",
    "ServiceStatus": "1 loadBalancer LoadBalancerStatus; 2 conditions []!Condition",
    "LoadBalancerStatus": "1 ingress []!LoadBalancerIngress",
    "Pod": "1 metadata ObjectMeta; 2 spec PodSpec; 3 status PodStatus",
    "PodTemplateSpec": "1 metadata ObjectMeta; 2 spec PodSpec",
    "PodSpec": "1 volumes []!Volume; 2 containers []Container; 3 restartPolicy s; "
    "4 terminationGracePeriodSeconds i*; 5 activeDeadlineSeconds i*; 6 dnsPolicy s; "
    "7 nodeSelector map; 8 serviceAccountName s; 9 serviceAccount s; 10 nodeName s; "
    "11 hostNetwork b; 12 hostPID b; 13 hostIPC b; 14 securityContext !PodSecurityContext; "
    "15 imagePullSecrets []LocalObjectReference; 16 hostname s; 17 subdomain s; "
    "18 affinity !Affinity; 19 schedulerName s; 20 initContainers []Container; "
    "21 automountServiceAccountToken b*; 22 tolerations []Toleration; "
    "23 hostAliases []!HostAlias; 24 priorityClassName s; 25 priority i*; "
    "26 dnsConfig !PodDNSConfig; 27 shareProcessNamespace b*; "
    "28 readinessGates []!PodReadinessGate; 29 runtimeClassName s*; 30 enableServiceLinks b*; "
    "31 preemptionPolicy s*; 32 overhead qmap; "
    "33 topologySpreadConstraints []!TopologySpreadConstraint; "
    "34 ephemeralContainers []!EphemeralContainer; 35 setHostnameAsFQDN b*; 36 os !PodOS; "
    "37 hostUsers b*; 38 schedulingGates []!PodSchedulingGate; "
    "39 resourceClaims []!PodResourceClaim; 40 resources ResourceRequirements*; "
    "41 hostnameOverride s*; 43 schedulingGroup !PodSchedulingGroup; "
    "44 evictionResponders []!EvictionResponder",
    "PodStatus": "1 phase s; 2 conditions []!PodCondition; 3 message s; 4 reason s; "
    "5 hostIP s; 6 podIP s; 7 startTime time*; 8 containerStatuses []!ContainerStatus; "
    "9 qosClass s; 10 initContainerStatuses []!ContainerStatus; 11 nominatedNodeName s; "
    "12 podIPs []!PodIP; 13 ephemeralContainerStatuses []!ContainerStatus; 14 resize s; "
    "15 resourceClaimStatuses []!PodResourceClaimStatus; 16 hostIPs []!HostIP; "
    "17 observedGeneration i; 18 extendedResourceClaimStatus !PodExtendedResourceClaimStatus; "
    "19 allocatedResources qmap; 20 resources ResourceRequirements*; "
    "21 nodeAllocatableResourceClaimStatuses []!NodeAllocatableResourceClaimStatus; "
    "22 volumeHealth []!PodVolumeHealth",
    "Container": "1 name s; 2 image s; 3 command []s; 4 args []s; 5 workingDir s; "
    "6 ports []ContainerPort; 7 env []EnvVar; 8 resources ResourceRequirements; "
    "9 volumeMounts []!VolumeMount; 10 livenessProbe !Probe; 11 readinessProbe !Probe; "
    "12 lifecycle !Lifecycle; 13 terminationMessagePath s; 14 imagePullPolicy s; "
    "15 securityContext !SecurityContext; 16 stdin b; 17 stdinOnce b; 18 tty b; "
    "19 envFrom []!EnvFromSource; 20 terminationMessagePolicy s; "
    "21 volumeDevices []!VolumeDevice; 22 startupProbe !Probe; "
    "23 resizePolicy []!ContainerResizePolicy; 24 restartPolicy s*; "
    "25 restartPolicyRules []!ContainerRestartRule",
    "ContainerPort": "1 name s; 2 hostPort i; 3 containerPort i; 4 protocol s; 5 hostIP s",
    "EnvVar": "1 name s; 2 value s; 3 valueFrom !EnvVarSource",
    "ResourceRequirements": "1 limits qmap; 2 requests qmap; 3 claims []!ResourceClaim",
    "LocalObjectReference": "1 name s",
    "Toleration": "1 key s; 2 operator s; 3 value s; 4 effect s; 5 tolerationSeconds i*",
    # k8s.io/api/apps/v1
    "Deployment": "1 metadata ObjectMeta; 2 spec DeploymentSpec; 3 status DeploymentStatus",
    "DeploymentSpec": "1 replicas i*; 2 selector LabelSelector*; 3 template PodTemplateSpec; "
    "4 strategy DeploymentStrategy; 5 minReadySeconds i; 6 revisionHistoryLimit i*; "
    "7 paused b; 9 progressDeadlineSeconds i*",
    "DeploymentStrategy": "1 type s; 2 rollingUpdate RollingUpdateDeployment*",
    "RollingUpdateDeployment": "1 maxUnavailable intstr*; 2 maxSurge intstr*",
    "DeploymentStatus": "1 observedGeneration i; 2 replicas i; 3 updatedReplicas i; "
    "4 availableReplicas i; 5 unavailableReplicas i; 6 conditions []!DeploymentCondition; "
    "7 readyReplicas i; 8 collisionCount i*; 9 terminatingReplicas i*",
}

KINDS: dict[tuple[str, str], str] = {
    ("v1", "Namespace"): "Namespace",
    ("v1", "ConfigMap"): "ConfigMap",
    ("v1", "Secret"): "Secret",
    ("v1", "Service"): "Service",
    ("v1", "Pod"): "Pod",
    ("apps/v1", "Deployment"): "Deployment",
}
"""(apiVersion, kind) -> top-level message, for the objects we accept as protobuf."""

_SCALARS = frozenset({"s", "i", "b", "time", "intstr", "map", "bmap", "qmap", "fields"})


@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    type: str
    repeated: bool
    pointer: bool


def _parse_schema(text: dict[str, str]) -> dict[str, dict[int, _Field]]:
    schema: dict[str, dict[int, _Field]] = {}
    for message, spec in text.items():
        fields: dict[int, _Field] = {}
        for item in spec.split(";"):
            number, name, kind = item.split()
            repeated, kind = kind.startswith("[]"), kind.removeprefix("[]")
            pointer, kind = kind.endswith("*"), kind.removesuffix("*")
            fields[int(number)] = _Field(name, kind, repeated, pointer)
        schema[message] = fields
    for message, fields in schema.items():
        for field in fields.values():
            known = field.type in _SCALARS or field.type.startswith("!") or field.type in schema
            if not known:
                raise ValueError(f"{message}.{field.name}: unknown type {field.type}")
    return schema


SCHEMA = _parse_schema(_SCHEMA_TEXT)


def _unsupported(path: str, what: str) -> UnsupportedMediaType:
    return UnsupportedMediaType(
        f"this server cannot read {what} at {path} from a protobuf body "
        f"({PROTOBUF}); send the object as JSON or YAML (kubectl create -f / apply -f do)"
    )


def _entry(payload: bytes, path: str) -> tuple[str, bytes]:
    key, value = "", b""
    for number, wire, raw in iter_fields(payload):
        if wire != LENGTH_DELIMITED or not isinstance(raw, bytes):
            raise WireError(f"{path}: map entry field {number} is not length-delimited")
        if number == 1:
            key = raw.decode("utf-8")
        elif number == 2:
            value = raw
    return key, value


def _time(payload: bytes) -> str | None:
    seconds = 0
    for number, wire, raw in iter_fields(payload):
        if number == 1 and wire == VARINT and isinstance(raw, int):
            seconds = signed(raw)
    if seconds == 0:
        return None  # the zero Time: JSON null
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _intstr(payload: bytes) -> int | str:
    kind, int_val, str_val = 0, 0, ""
    for number, _, raw in iter_fields(payload):
        if number == 1 and isinstance(raw, int):
            kind = raw
        elif number == 2 and isinstance(raw, int):
            int_val = signed(raw)
        elif number == 3 and isinstance(raw, bytes):
            str_val = raw.decode("utf-8")
    return str_val if kind == 1 else int_val


def _quantity(payload: bytes) -> str:
    for number, _, raw in iter_fields(payload):
        if number == 1 and isinstance(raw, bytes):
            return raw.decode("utf-8")
    return ""


def _value(field: _Field, wire: int, raw: int | bytes, path: str) -> Any:
    kind = field.type
    if kind in ("i", "b"):
        if wire != VARINT or not isinstance(raw, int):
            raise WireError(f"{path}: expected a varint")
        return signed(raw) if kind == "i" else bool(raw)
    if wire != LENGTH_DELIMITED or not isinstance(raw, bytes):
        raise WireError(f"{path}: expected a length-delimited value")
    if kind.startswith("!"):
        raise _unsupported(path, f"a {kind[1:]}")
    if kind == "s":
        return raw.decode("utf-8")
    if kind == "time":
        return _time(raw)
    if kind == "intstr":
        return _intstr(raw)
    if kind == "fields":
        for number, _, inner in iter_fields(raw):
            if number == 1 and isinstance(inner, bytes):
                return json.loads(inner) if inner else {}
        return {}
    return decode_message(kind, raw, path)


def _zero(value: Any) -> bool:
    return value is None or (not isinstance(value, dict | list) and not value)


def decode_message(message: str, data: bytes, path: str = "") -> dict[str, Any]:
    """One message of `SCHEMA` as the JSON object Kubernetes would print for it."""
    fields = SCHEMA[message]
    out: dict[str, Any] = {}
    for number, wire, raw in iter_fields(data):
        field = fields.get(number)
        where = f"{path}.{field.name}" if field else f"{path}.<field {number}>"
        if field is None:
            raise _unsupported(where.lstrip("."), f"field number {number} of {message}")
        where = where.lstrip(".")
        if field.type in ("map", "bmap", "qmap"):
            if not isinstance(raw, bytes):
                raise WireError(f"{where}: expected a map entry")
            key, value = _entry(raw, where)
            if field.type == "map":
                converted: Any = value.decode("utf-8")
            elif field.type == "bmap":
                converted = base64.b64encode(value).decode("ascii")
            else:
                converted = _quantity(value)
            out.setdefault(field.name, {})[key] = converted
        elif field.repeated:
            if field.type == "s" or field.type in SCHEMA or field.type.startswith("!"):
                out.setdefault(field.name, []).append(_value(field, wire, raw, where))
            else:
                raise WireError(f"{where}: unsupported repeated type")
        else:
            out[field.name] = _value(field, wire, raw, where)
    for field in fields.values():
        if field.name in out and not field.pointer and not field.repeated:
            if field.type not in SCHEMA and _zero(out[field.name]):
                del out[field.name]  # JSON's omitempty for a non-pointer zero value
        elif field.name in out and field.pointer and out[field.name] is None:
            del out[field.name]
    return out


def decode_object(data: bytes) -> dict[str, Any]:
    """A whole `k8s\\x00` + Unknown body as a JSON object with apiVersion and kind."""
    if not data.startswith(MAGIC):
        raise BadRequest("the protobuf body does not start with the Kubernetes magic 'k8s\\x00'")
    try:
        api_version = kind = encoding = ""
        raw = b""
        for number, _, value in iter_fields(data[len(MAGIC) :]):
            if number == 1 and isinstance(value, bytes):
                for inner, _, text in iter_fields(value):
                    if isinstance(text, bytes):
                        if inner == 1:
                            api_version = text.decode("utf-8")
                        elif inner == 2:
                            kind = text.decode("utf-8")
            elif number == 2 and isinstance(value, bytes):
                raw = value
            elif number == 3 and isinstance(value, bytes):
                encoding = value.decode("utf-8")
        if encoding:
            raise _unsupported("contentEncoding", f"content encoding {encoding!r}")
        message = KINDS.get((api_version, kind))
        if message is None:
            raise _unsupported("typeMeta", f"kind {kind!r} of {api_version!r}")
        obj = {"apiVersion": api_version, "kind": kind, **decode_message(message, raw)}
    except WireError as exc:
        raise BadRequest(
            f"the request body is not a valid Kubernetes protobuf message: {exc}"
        ) from None
    except (ValueError, RecursionError) as exc:
        raise BadRequest(
            f"the request body is not a valid Kubernetes protobuf message: {exc}"
        ) from None
    return obj
