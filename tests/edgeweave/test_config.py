"""The shared config loader: typed fields, camelCase keys, errors naming file and field."""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path
from typing import Literal

import pytest

from edgeweave.config import ConfigError, HostPort, dump_yaml, from_mapping, load_config


@dataclasses.dataclass(frozen=True)
class Inner:
    port: int = 3478
    mode: Literal["a", "b"] = "a"


@dataclasses.dataclass(frozen=True)
class Outer:
    node_name: str
    inner: Inner = Inner()
    servers: list[HostPort] = dataclasses.field(default_factory=list)
    subnet: ipaddress.IPv4Network = ipaddress.IPv4Network("10.96.0.0/16")
    ratio: float = 0.5
    named: dict[str, Inner] = dataclasses.field(default_factory=dict)
    path: Path | None = None


def test_full_document_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        "nodeName: edge-1\ninner: {port: 1, mode: b}\nservers: ['1.2.3.4:5', '[::1]:6']\n"
        "subnet: 10.0.0.0/8\nratio: 2\nnamed: {x: {port: 9}}\npath: /tmp/x\n"
    )
    cfg = load_config(Outer, path)
    assert cfg.node_name == "edge-1"
    assert cfg.inner == Inner(1, "b")
    assert cfg.servers == [HostPort("1.2.3.4", 5), HostPort("::1", 6)]
    assert cfg.ratio == 2.0
    assert cfg.named == {"x": Inner(9)}
    again = tmp_path / "again.yaml"
    again.write_text(dump_yaml(cfg))
    assert load_config(Outer, again) == cfg


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nodeName: 1\n", "c.yaml: nodeName: expected a string, got 1"),
        ("inner: {}\n", "c.yaml: nodeName: required field is missing"),
        ("nodeName: a\ninner: {port: x}\n", "c.yaml: inner.port: expected an integer, got 'x'"),
        ("nodeName: a\ninner: {port: true}\n", "inner.port: expected an integer, got True"),
        ("nodeName: a\ninner: {mode: c}\n", "inner.mode: expected one of 'a', 'b', got 'c'"),
        ("nodeName: a\nservers: ['1.2.3.4']\n", "servers[0]: expected 'host:port': no port"),
        ("nodeName: a\nsubnet: 10.0.0.0/33\n", "subnet: expected an IPv4 network"),
        ("nodeName: a\nnodeNmae: b\n", "c.yaml: (top level): unknown field 'nodeNmae'"),
        ("nodeName: a\nnamed: {x: {bad: 1}}\n", "named.x: unknown field 'bad'"),
        ("nodeName: [\n", "c.yaml: invalid YAML: line 2"),
        ("- a\n", "c.yaml: (top level): expected a mapping, got a list"),
    ],
)
def test_errors_name_file_and_field(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(Outer, path)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_config(Outer, tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_config(Outer, binary)


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("")
    assert load_config(Inner, path) == Inner()
    assert load_config(Inner, None) == Inner()
    assert from_mapping(Inner, {"port": 7}, source="x") == Inner(7)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1.2.3.4:80", HostPort("1.2.3.4", 80)), ("[fe80::1]:1", HostPort("fe80::1", 1)),
     ("example.org:65535", HostPort("example.org", 65535))],
)
def test_hostport_parse(text: str, expected: HostPort) -> None:
    assert HostPort.parse(text) == expected
    assert HostPort.parse(str(expected)) == expected


@pytest.mark.parametrize("text", ["", ":80", "a:0", "a:65536", "a:b", "[::1", "[::1]x", "a"])
def test_hostport_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        HostPort.parse(text)


def test_hostport_default_port() -> None:
    assert HostPort.parse("a", default_port=3478) == HostPort("a", 3478)
