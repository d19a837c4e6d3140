"""The mesh connect header (meshd.tunnel.connect): layout vectors, bounds, fuzzing."""

from __future__ import annotations

import contextlib

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.tunnel.connect import (
    HEAD,
    ConnectProtocolError,
    ConnectRequest,
    Status,
    encode_reply,
    encode_request,
    parse_reply,
    parse_request,
    request_size,
)


def test_request_layout_matches_the_diagram() -> None:
    data = encode_request(ConnectRequest("172.17.0.5", 8080, "default/web"))
    assert data == (b"EW\x01\x04" + b"\x1f\x90" + b"\x00\x0b" + bytes([172, 17, 0, 5])
                    + b"default/web")
    assert request_size(data[:HEAD.size]) == len(data)
    assert parse_request(data) == ConnectRequest("172.17.0.5", 8080, "default/web")


def test_ipv6_request_round_trips() -> None:
    request = ConnectRequest("fd00::5", 443, "ns/svc")
    data = encode_request(request)
    assert data[3] == 6 and len(data) == HEAD.size + 16 + 6
    assert parse_request(data) == request


def test_reply_layout() -> None:
    assert encode_reply(Status.CONNECTED) == b"EW\x01\x00"
    assert parse_reply(b"EW\x01\x04") is Status.NOT_ALLOWED


@pytest.mark.parametrize("data", [
    b"XX\x01\x04\x1f\x90\x00\x01\x01\x02\x03\x04a",  # magic
    b"EW\x02\x04\x1f\x90\x00\x01\x01\x02\x03\x04a",  # version
    b"EW\x01\x05\x1f\x90\x00\x01\x01\x02\x03\x04a",  # family
    b"EW\x01\x04\x1f\x90\x00\x00\x01\x02\x03\x04",  # empty service
    b"EW\x01\x04\x00\x00\x00\x01\x01\x02\x03\x04a",  # port 0
    b"EW\x01\x04\x1f\x90\x00\x01\x01\x02\x03\x04\xff",  # not UTF-8
    b"EW\x01\x04\x1f\x90\x00\x02\x01\x02\x03\x04a",  # short
])
def test_bad_requests_are_remote_errors(data: bytes) -> None:
    with pytest.raises(ConnectProtocolError):
        parse_request(data)


def test_local_misuse_is_a_value_error() -> None:
    with pytest.raises(ValueError):
        ConnectRequest("not-an-ip", 80, "a/b")
    with pytest.raises(ValueError):
        ConnectRequest("1.2.3.4", 0, "a/b")
    with pytest.raises(ValueError):
        ConnectRequest("1.2.3.4", 80, "x" * 254)


@given(st.binary(max_size=300))
def test_any_bytes_parse_or_raise_the_remote_error(data: bytes) -> None:
    for parse in (parse_request, parse_reply):
        with contextlib.suppress(ConnectProtocolError):
            parse(data)


@given(st.ip_addresses().map(str), st.integers(1, 65535),
       st.text(min_size=1, max_size=60).filter(lambda s: 0 < len(s.encode()) <= 253))
def test_every_request_round_trips(ip: str, port: int, service: str) -> None:
    request = ConnectRequest(ip, port, service)
    assert parse_request(encode_request(request)) == request
