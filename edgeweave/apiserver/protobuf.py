"""A tiny protocol buffers codec: a writer, enough for the OpenAPI v2 document old kubectl asks
for, and a reader, enough for the Kubernetes protobuf bodies newer kubectl sends (`k8sproto`).

kubectl up to 1.2x fetches `/openapi/v2` with `Accept:
application/com.github.proto-openapi.spec.v2@v1.0+protobuf` and unmarshals gnostic's
`openapi.v2.Document`. We send a small valid one: no definitions, so kubectl finds no schema for
any kind and skips client-side validation (its documented behaviour for kinds the schema lacks)
and computes apply patches from its compiled-in types; and one path per resource whose PATCH
operation carries `x-kubernetes-group-version-kind` and the `dryRun` query parameter, which is
what kubectl 1.20's dry-run verifier looks for before `kubectl diff` / `--dry-run=server`.

Wire format (https://protobuf.dev/programming-guides/encoding/):

    field    = key value
    key      = varint( field_number << 3 | wire_type )
    varint   = 7 bits per byte, least significant group first, high bit = "more follows"
    wire_type 0: varint value            wire_type 2: varint(length) bytes

gnostic `openapi.v2` messages used (field numbers of OpenAPIv2.proto):

    Document       { string swagger = 1; Info info = 2; Paths paths = 8;
                     Definitions definitions = 9; }
    Info           { string title = 1; string version = 2; }
    Paths          { repeated NamedPathItem path = 2; }
    NamedPathItem  { string name = 1; PathItem value = 2; }
    PathItem       { Operation patch = 8; }
    Operation      { string operation_id = 5; repeated ParametersItem parameters = 8;
                     repeated NamedAny vendor_extension = 13; }
    ParametersItem { Parameter parameter = 1; }
    Parameter      { NonBodyParameter non_body_parameter = 2; }
    NonBodyParameter        { QueryParameterSubSchema query_parameter_sub_schema = 3; }
    QueryParameterSubSchema { string in = 2; string name = 4; string type = 6;
                              bool unique_items = 20; }
    NamedAny       { string name = 1; Any value = 2; }     Any { string yaml = 2; }
"""

from __future__ import annotations

import dataclasses

VARINT = 0
LENGTH_DELIMITED = 2


def varint(value: int) -> bytes:
    """Base-128 varint of a non-negative integer."""
    if value < 0:
        raise ValueError("varint of a negative number")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    """A field key."""
    return varint(field << 3 | wire_type)


def length_delimited(field: int, payload: bytes) -> bytes:
    """A bytes, string or embedded-message field."""
    return key(field, LENGTH_DELIMITED) + varint(len(payload)) + payload


def string(field: int, text: str) -> bytes:
    """A string field (UTF-8)."""
    return length_delimited(field, text.encode("utf-8"))


def uint(field: int, value: int) -> bytes:
    """A varint field."""
    return key(field, VARINT) + varint(value)


@dataclasses.dataclass(frozen=True)
class PatchPath:
    """One path of the v2 document: its PATCH operation's kind and query parameters."""

    path: str
    """URL template, e.g. `/apis/apps/v1/namespaces/{namespace}/deployments/{name}`."""
    operation_id: str
    """operationId."""
    gvk_yaml: str
    """`x-kubernetes-group-version-kind` as YAML (`group: apps\\nkind: ...`)."""
    query_params: tuple[str, ...]
    """Names of the query parameters the operation accepts."""


def _query_param(name: str) -> bytes:
    sub = string(2, "query") + string(4, name) + string(6, "string") + uint(20, 1)
    return length_delimited(1, length_delimited(2, length_delimited(3, sub)))


def _patch_path(item: PatchPath) -> bytes:
    ext = string(1, "x-kubernetes-group-version-kind") + length_delimited(
        2, string(2, item.gvk_yaml)
    )
    op = string(5, item.operation_id)
    op += b"".join(length_delimited(8, _query_param(n)) for n in item.query_params)
    op += length_delimited(13, ext)
    return string(1, item.path) + length_delimited(2, length_delimited(8, op))


def openapi_v2_document(title: str, version: str, paths: tuple[PatchPath, ...] = ()) -> bytes:
    """A gnostic `openapi.v2.Document`: info, the given PATCH paths, no definitions."""
    info = string(1, title) + string(2, version)
    encoded = b"".join(length_delimited(2, _patch_path(p)) for p in paths)
    return (
        string(1, "2.0")
        + length_delimited(2, info)
        + length_delimited(8, encoded)
        + length_delimited(9, b"")
    )


# ---- reading --------------------------------------------------------------------------------

FIXED64 = 1
FIXED32 = 5


class WireError(ValueError):
    """Bytes that are not a well-formed protocol buffers message."""


def read_varint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the varint at `pos`; at most 10 bytes (64 bits)."""
    value = shift = 0
    for i in range(10):
        if pos + i >= len(data):
            raise WireError("truncated varint")
        byte = data[pos + i]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, pos + i + 1
        shift += 7
    raise WireError("varint longer than 10 bytes")


def signed(value: int) -> int:
    """An int32/int64 field's value: varints carry negative numbers as 64-bit two's complement."""
    return value - (1 << 64) if value >= 1 << 63 else value


def iter_fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """(field number, wire type, value) of every field of a message, in order: an int for
    varint and fixed fields, the payload bytes for length-delimited ones."""
    out: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        tag, pos = read_varint(data, pos)
        field, wire = tag >> 3, tag & 7
        if field == 0:
            raise WireError("field number 0")
        if wire == VARINT:
            value, pos = read_varint(data, pos)
            out.append((field, wire, value))
        elif wire == LENGTH_DELIMITED:
            size, pos = read_varint(data, pos)
            if size > len(data) - pos:
                raise WireError(f"field {field}: length {size} runs past the end")
            out.append((field, wire, data[pos : pos + size]))
            pos += size
        elif wire in (FIXED64, FIXED32):
            width = 8 if wire == FIXED64 else 4
            if pos + width > len(data):
                raise WireError(f"field {field}: truncated fixed-width value")
            out.append((field, wire, int.from_bytes(data[pos : pos + width], "little")))
            pos += width
        else:
            raise WireError(f"field {field}: unsupported wire type {wire}")
    return out
