"""Typed configuration files.

Every daemon describes its configuration as frozen dataclasses; `load_config` reads a YAML file
(the format KubeEdge's cloudcore.yaml/edgecore.yaml use), maps camelCase keys onto the fields and
checks every value. A bad file raises `ConfigError` naming the file and the dotted field path, so
an operator sees `meshd.yaml: stun.port: expected an integer in 1..65535, got 'x'`.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")


class ConfigError(Exception):
    """A configuration file or value is invalid; the message names the file and field."""


def camel(name: str) -> str:
    """`udp_timeout_s` -> `udpTimeoutS`: the key spelling used in files (as KubeEdge does)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


@dataclasses.dataclass(frozen=True)
class HostPort:
    """An IP address (or host name) and a UDP/TCP port."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, default_port: int | None = None) -> HostPort:
        """Parse `host:port`, `[v6]:port`, or a bare host when `default_port` is given."""
        text = text.strip()
        host, port_text = text, ""
        if text.startswith("["):
            end = text.find("]")
            if end < 0:
                raise ValueError(f"unclosed '[' in {text!r}")
            host, rest = text[1:end], text[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"unexpected {rest!r} after ']' in {text!r}")
            port_text = rest[1:]
        elif text.count(":") == 1:
            host, port_text = text.split(":")
        if not host:
            raise ValueError(f"no host in {text!r}")
        if not port_text:
            if default_port is None:
                raise ValueError(f"no port in {text!r} (expected host:port)")
            return cls(host, default_port)
        if not port_text.isdigit() or not 0 < int(port_text) < 65536:
            raise ValueError(f"bad port {port_text!r} in {text!r}")
        return cls(host, int(port_text))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def read_yaml(path: Path) -> Any:
    """Read one YAML document; errors name the file and, for syntax errors, the line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise ConfigError(f"{path}: invalid YAML: {where}{exc.problem}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None


def load_config(cls: type[T], path: Path | None) -> T:
    """Build `cls` from the YAML file at `path`, or its defaults when `path` is None."""
    if path is None:
        return from_mapping(cls, {}, source="defaults")
    data = read_yaml(path)
    if data is None:
        data = {}
    return from_mapping(cls, data, source=str(path))


def from_mapping(cls: type[T], data: Any, *, source: str, prefix: str = "") -> T:
    """Build dataclass `cls` from plain data, checking every field."""
    where = f"{source}: {prefix or '(top level)'}"
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {camel(f.name): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = [str(k) for k in data if k not in fields]
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (known: {known})")
    kwargs: dict[str, Any] = {}
    for key, field in fields.items():
        path = f"{prefix}.{key}" if prefix else key
        if key in data:
            kwargs[field.name] = _convert(hints[field.name], data[key], source, path)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{source}: {path}: required field is missing")
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ cross-field checks
        raise ConfigError(f"{where}: {exc}") from None


def _describe(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return repr(value)


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    fail = f"{source}: {path}: expected"
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(inner[0], value, source, path)
        raise TypeError(f"unsupported config type {tp}")
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(repr(a) for a in args)
            raise ConfigError(f"{fail} one of {choices}, got {_describe(value)}")
        return value
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{fail} a mapping of names, got {_describe(value)}")
        out_map: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str) or not name:
                raise ConfigError(f"{source}: {path}: names must be non-empty strings, "
                                  f"got {name!r}")
            out_map[name] = _convert(args[1], item, source, f"{path}.{name}")
        return out_map
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise ConfigError(f"{fail} a list, got {_describe(value)}")
        item = args[0]
        out = [_convert(item, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if dataclasses.is_dataclass(tp) and isinstance(tp, type):
        if tp is HostPort:
            if not isinstance(value, str):
                raise ConfigError(f"{fail} 'host:port', got {_describe(value)}")
            try:
                return HostPort.parse(value)
            except ValueError as exc:
                raise ConfigError(f"{fail} 'host:port': {exc}") from None
        return from_mapping(tp, value, source=source, prefix=path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{fail} true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{fail} an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{fail} a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{fail} a string, got {_describe(value)}")
        return value
    if tp is Path:
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{fail} a path, got {_describe(value)}")
        return Path(value)
    if tp in (ipaddress.IPv4Address, ipaddress.IPv4Network):
        try:
            return tp(str(value))
        except ValueError as exc:
            raise ConfigError(f"{fail} an IPv4 {tp.__name__[4:].lower()}: {exc}") from None
    raise TypeError(f"unsupported config type {tp} at {path}")


def to_mapping(obj: Any) -> Any:
    """The inverse of `from_mapping`, for printing the effective configuration."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        if isinstance(obj, HostPort):
            return str(obj)
        return {camel(f.name): to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path | ipaddress.IPv4Address | ipaddress.IPv4Network):
        return str(obj)
    return obj


def dump_yaml(obj: Any) -> str:
    """The effective configuration as YAML, in the same spelling `load_config` reads."""
    return str(yaml.safe_dump(to_mapping(obj), sort_keys=False))
