"""Kubernetes protobuf bodies (what kubectl >= 1.32's typed clients send): hand-built vectors,
the refusal of what we do not decode, and garbage that must only ever raise a client error."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edgeweave.apiserver.k8sproto import MAGIC, SCHEMA, decode_object
from edgeweave.apiserver.protobuf import length_delimited as msg
from edgeweave.apiserver.protobuf import string, uint
from edgeweave.kube.errors import StoreError


def envelope(api_version: str, kind: str, raw: bytes) -> bytes:
    return MAGIC + msg(1, string(1, api_version) + string(2, kind)) + msg(2, raw)


def entry(number: int, key: str, value: bytes) -> bytes:
    return msg(number, string(1, key) + msg(2, value))


# An ObjectMeta as Go's generated code writes it: every non-pointer field, zero or not.
META = (
    string(1, "foo") + string(2, "") + string(3, "") + string(4, "") + string(5, "")
    + string(6, "") + uint(7, 0) + msg(8, b"") + entry(11, "app", b"web")
)  # fmt: skip


def test_namespace() -> None:
    raw = msg(1, META) + msg(2, b"") + msg(3, string(1, ""))
    assert decode_object(envelope("v1", "Namespace", raw)) == {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": "foo", "labels": {"app": "web"}},
        "spec": {},
        "status": {},
    }


def test_secret_bytes_and_pointer_zero() -> None:
    raw = msg(1, META) + entry(2, "k", b"\x00\xff") + string(3, "Opaque") + uint(5, 0)
    obj = decode_object(envelope("v1", "Secret", raw))
    assert obj["data"] == {"k": "AP8="}
    assert obj["type"] == "Opaque"
    assert obj["immutable"] is False  # a pointer: an explicit false is kept


def test_deployment_pointers_intstr_and_negative_ints() -> None:
    container = (
        string(1, "c") + string(2, "nginx") + msg(6, string(1, "") + uint(2, 0) + uint(3, 80))
        + msg(8, entry(1, "cpu", string(1, "100m")))
    )  # fmt: skip
    template = msg(1, META) + msg(2, msg(2, container) + string(3, "Always"))
    strategy = string(1, "RollingUpdate") + msg(
        2, msg(2, uint(1, 1) + uint(2, 0) + string(3, "25%"))
    )
    spec = (
        uint(1, 0) + msg(2, entry(1, "app", b"web")) + msg(3, template) + msg(4, strategy)
        + uint(6, (1 << 64) - 1)
    )  # fmt: skip
    obj = decode_object(envelope("apps/v1", "Deployment", msg(1, META) + msg(2, spec)))
    spec_out = obj["spec"]
    assert spec_out["replicas"] == 0  # pointer: kept
    assert spec_out["revisionHistoryLimit"] == -1  # 64-bit two's complement
    assert spec_out["strategy"] == {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%"}}
    assert spec_out["template"]["spec"]["containers"] == [
        {
            "name": "c",
            "image": "nginx",
            "ports": [{"containerPort": 80}],
            "resources": {"limits": {"cpu": "100m"}},
        }
    ]


def test_service_ports() -> None:
    port = (
        string(1, "")
        + string(2, "TCP")
        + uint(3, 80)
        + msg(4, uint(1, 0) + uint(2, 8080))
        + uint(5, 0)
    )
    spec = msg(1, port) + entry(2, "app", b"web") + string(3, "") + string(4, "ClusterIP")
    obj = decode_object(
        envelope("v1", "Service", msg(1, META) + msg(2, spec) + msg(3, msg(1, b"")))
    )
    assert obj["spec"] == {
        "ports": [{"protocol": "TCP", "port": 80, "targetPort": 8080}],
        "selector": {"app": "web"},
        "type": "ClusterIP",
    }


@pytest.mark.parametrize(
    ("body", "code", "text"),
    [
        (envelope("v1", "Pod", msg(2, msg(1, b"volume"))), 415, "a Volume at spec.volumes"),
        (envelope("v1", "Namespace", msg(1, META + string(99, "x"))), 415,
         "field number 99 of ObjectMeta"),
        (envelope("v1", "Node", b""), 415, "kind 'Node' of 'v1'"),
        (envelope("v1", "ConfigMap", b"\x12\x05ab"), 400, "runs past the end"),
        (b"\x0a\x00", 400, "magic"),
        (envelope("v1", "ConfigMap", uint(4, 1) + b"\x08"), 400, "truncated varint"),
        (envelope("v1", "ConfigMap", string(4, "x")), 400, "expected a varint"),
    ],
)  # fmt: skip
def test_refusals(body: bytes, code: int, text: str) -> None:
    with pytest.raises(StoreError) as err:
        decode_object(body)
    assert err.value.code == code
    assert text in err.value.message


def test_schema_is_closed() -> None:
    for fields in SCHEMA.values():
        for field in fields.values():
            assert field.type in SCHEMA or field.type.startswith("!") or field.type in (
                "s", "i", "b", "time", "intstr", "map", "bmap", "qmap", "fields",
            )  # fmt: skip


@settings(max_examples=400, derandomize=True)
@given(st.binary(max_size=200), st.sampled_from(["Namespace", "Pod", "Deployment", "Service"]))
def test_garbage_is_only_a_client_error(data: bytes, kind: str) -> None:
    api_version = "apps/v1" if kind == "Deployment" else "v1"
    for body in (MAGIC + data, envelope(api_version, kind, data)):
        try:
            decode_object(body)
        except StoreError as exc:
            assert exc.code in (400, 415), exc
