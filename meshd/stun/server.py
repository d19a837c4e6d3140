"""Sans-I/O STUN Binding server with RFC 5780 NAT behaviour discovery support.

The server answers on up to four sockets: primary IP × {port, alt port} and, when there is an
alternate IP, alternate IP × {port, alt port}. `StunServer.handle_datagram` takes one datagram
(bytes, source, the local address it arrived on) and returns what to send from which socket.
It never raises for peer input: garbage is dropped and counted.
"""

from __future__ import annotations

import ipaddress
import logging
from dataclasses import dataclass

from edgeweave.log import event
from meshd.stun.codec import (
    Attribute,
    AttrType,
    ChangeRequest,
    ErrorCode,
    MappedAddress,
    MessageClass,
    Method,
    OtherAddress,
    Padding,
    ResponseOrigin,
    ResponsePort,
    Software,
    StunMessage,
    StunParseError,
    UnknownAttributes,
    XorMappedAddress,
    encode_message,
    parse_message,
)
from meshd.udp import Address, Transmit, format_address

log = logging.getLogger("meshd.stun")

DEFAULT_SOFTWARE = "meshd (edgeweave)"
REASONS = {400: "Bad Request", 420: "Unknown Attribute"}


@dataclass(frozen=True)
class ServerAddresses:
    """Where an RFC 5780 server listens (RFC 5780 §6: two IPs × two ports)."""

    primary_ip: str
    """The address clients are told about; may be a wildcard only without `alt_ip`."""
    port: int
    """Primary port (3478)."""
    alt_port: int
    """Alternate port (3479), the target of CHANGE-REQUEST's change-port flag."""
    alt_ip: str | None = None
    """Alternate IP of the same family; without it OTHER-ADDRESS and CHANGE-REQUEST are off."""

    def __post_init__(self) -> None:
        primary = ipaddress.ip_address(self.primary_ip)
        if not (0 < self.port < 65536 and 0 < self.alt_port < 65536):
            raise ValueError(f"ports must be in 1..65535: {self.port}, {self.alt_port}")
        if self.port == self.alt_port:
            raise ValueError(f"port and alternate port are both {self.port}")
        if self.alt_ip is not None:
            alt = ipaddress.ip_address(self.alt_ip)
            if alt.version != primary.version:
                raise ValueError(f"{self.primary_ip} and {self.alt_ip} differ in IP version")
            if alt == primary or alt.is_unspecified or primary.is_unspecified:
                raise ValueError("the two STUN addresses must be distinct, non-wildcard IPs")

    @property
    def sockets(self) -> tuple[Address, ...]:
        """Every (IP, port) to listen on, primary first."""
        ips = [self.primary_ip] if self.alt_ip is None else [self.primary_ip, self.alt_ip]
        return tuple((ip, port) for ip in ips for port in (self.port, self.alt_port))

    def changed(self, local: Address, change_ip: bool, change_port: bool) -> Address:
        """The socket that differs from `local` in IP and/or port as asked (RFC 5780 §6.1)."""
        ip, port = local
        if change_ip and self.alt_ip is not None:
            ip = self.alt_ip if ip == self.primary_ip else self.primary_ip
        if change_port:
            port = self.alt_port if port == self.port else self.port
        return (ip, port)


class StunServer:
    """The Binding server core. Counters are plain ints an exporter can read."""

    def __init__(self, addresses: ServerAddresses, *, software: str = DEFAULT_SOFTWARE) -> None:
        self.addresses = addresses
        self.software = software
        self.requests = 0
        """Binding requests accepted for processing."""
        self.responses = 0
        """Success responses sent."""
        self.errors = 0
        """Error responses sent (400, 420)."""
        self.dropped = 0
        """Datagrams dropped: not STUN, malformed, not a request, or on an unknown socket."""
        self._sockets = frozenset(addresses.sockets)
        self._wildcard = ipaddress.ip_address(addresses.primary_ip).is_unspecified

    def handle_datagram(self, data: bytes, source: Address, local: Address) -> list[Transmit]:
        """Answer one datagram that arrived on `local` from `source`."""
        if local not in self._sockets:
            return self._drop(source, local, "not one of our sockets")
        try:
            request = parse_message(data)
        except StunParseError as exc:
            return self._drop(source, local, str(exc))
        if request.message_class is not MessageClass.REQUEST:
            # Indications (keepalives) and stray responses need no answer (RFC 5389 §7.3.2-3).
            return self._drop(source, local, f"not a request: {request.message_class.name}")
        self.requests += 1
        if request.method != Method.BINDING:
            return [self._error(request, source, local, 400, "only Binding is supported")]
        unknown = list(request.unknown_required)
        change = request.get(ChangeRequest)
        if change is not None and self.addresses.alt_ip is None:
            unknown.append(AttrType.CHANGE_REQUEST)  # RFC 5780 §6.1: no alternate address
        if unknown:
            return [self._error(request, source, local, 420, unknown=tuple(unknown))]
        response_port = request.get(ResponsePort)
        padding = request.get(Padding)
        if response_port is not None and padding is not None:
            return [self._error(request, source, local, 400, "PADDING with RESPONSE-PORT")]
        if response_port is not None and response_port.port == 0:
            return [self._error(request, source, local, 400, "RESPONSE-PORT 0")]
        send_from = local
        if change is not None:
            send_from = self.addresses.changed(local, change.change_ip, change.change_port)
        destination = source if response_port is None else (source[0], response_port.port)
        attributes: list[Attribute] = [XorMappedAddress(source), MappedAddress(source)]
        if not self._wildcard:
            attributes.append(ResponseOrigin(send_from))
        if self.addresses.alt_ip is not None:
            other = self.addresses.changed(local, change_ip=True, change_port=True)
            attributes.append(OtherAddress(other))
        if padding is not None:
            # RFC 5780 §6.1 pads to the MTU; we mirror the request's size (no amplification).
            attributes.append(Padding(padding.length))
        attributes.append(Software(self.software))
        response = StunMessage(
            MessageClass.SUCCESS,
            Method.BINDING,
            request.transaction_id,
            tuple(attributes),
            fingerprint=True,
        )
        self.responses += 1
        return [Transmit(send_from, destination, encode_message(response))]

    def _error(
        self,
        request: StunMessage,
        source: Address,
        local: Address,
        code: int,
        reason: str | None = None,
        unknown: tuple[int, ...] = (),
    ) -> Transmit:
        self.errors += 1
        event(log, logging.DEBUG, "stun.error", peer=format_address(source), code=code,
              reason=reason or REASONS[code])
        attributes: list[Attribute] = [ErrorCode(code, reason or REASONS[code])]
        if unknown:
            attributes.append(UnknownAttributes(unknown))  # RFC 5389 §7.3.1
        attributes.append(Software(self.software))
        response = StunMessage(
            MessageClass.ERROR,
            request.method,
            request.transaction_id,
            tuple(attributes),
            fingerprint=True,
        )
        return Transmit(local, source, encode_message(response))

    def _drop(self, source: Address, local: Address, reason: str) -> list[Transmit]:
        self.dropped += 1
        event(log, logging.DEBUG, "stun.drop", peer=format_address(source),
              local=format_address(local), reason=reason)
        return []
