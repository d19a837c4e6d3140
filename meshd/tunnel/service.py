"""The asyncio adapter of `MeshNode`: one UDP socket, the TUN device, the control connection,
one timer. No decisions here (those are `MeshNode`'s): every callback feeds the core, sends what
it returns, writes packets to the TUN device and re-arms the timer.

    service = await TunnelService.start(settings)      # dials meshd server, opens the socket
    await service.wait_ready(timeout)                  # welcomed: mesh0 is up
    service.status(); service.metrics_samples()
    await service.stop()                               # mesh0 and the allocation are gone

Reads are batched: one readiness callback drains the socket (`recvmsg` until EAGAIN, at most
`READ_BATCH`; after a first read a zero-timeout poll says whether more wait, so a lone datagram
costs no failed read) and the TUN device (`read_batch`) and hands the batch to the core at once
(design §3); UDP GRO reads go to the core unsplit (`MeshNode.receive_reads`). Sends of several
datagrams to one destination use UDP GSO, one run per 0xE4 message at most, so that the peer
reads each message whole. `Transmit.ttl` is honoured per datagram (IP_TTL set around the send).

Port guessing (`meshd.tunnel.guess`): the core asks for pool sockets (`GuessSocketsWanted`);
they are opened here on the host address, port 0, each read by its own reader into
`MeshNode.receive_pool_reads`, and closed on `GuessSocketsReleased`. A `Transmit` whose source
is a pool socket leaves from it; with no pool open, sends take the tunnel socket without a
lookup. `fit_nofile` raises RLIMIT_NOFILE for the pool at start (or shrinks the pool).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import errno
import ipaddress
import logging
import os
import resource
import select
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from edgeweave.log import event
from meshd.control.client import ControlClient, ControlClientConfig, ControlEvent
from meshd.control.service import ControlConnector, agent_tls_context
from meshd.control.wire import NatSummary
from meshd.tunnel import fastpath
from meshd.tunnel.fastpath import FastRoute, FastStats
from meshd.tunnel.guess import GuessSocketsReleased, GuessSocketsWanted
from meshd.tunnel.identity import CertificateKey
from meshd.tunnel.mesh import MeshConfig, MeshEvent, MeshNode, ReflexiveChanged
from meshd.tunnel.natprobe import NatProbeConfig, NatProber
from meshd.tunnel.noise import public_bytes
from meshd.tunnel.tun import TunDevice
from meshd.tunnel.wire import OFFLOAD_MIN_MTU, fragment_part_for, whole_message_packet
from meshd.udp import Address, Read, Transmit

log = logging.getLogger("meshd.tunnel")

READ_BATCH = 256
FULL_FLUSH_S = 0.05
"""While only data flows, the core's full round (timers, path machines) runs this often."""
FAST_SYNC_S = 1.0
"""While the fast path runs, its traffic reaches the core at least this often."""
TUN_FRAME_BATCH = 32
"""Offload frames (up to 64 KB each) read from the TUN device per callback at most."""
SOL_UDP = 17
UDP_SEGMENT = 103  # linux/udp.h: the GSO segment size, as a cmsg of sendmsg
UDP_GRO = 104  # linux/udp.h: receive coalesced datagrams, with their size as a cmsg
GRO_CMSG_SPACE = socket.CMSG_SPACE(4)
GSO_MAX_SEGMENTS = 64  # the kernel's UDP_MAX_SEGMENTS
GSO_MAX_BYTES = 65000  # one UDP datagram's payload at most
"""Datagrams (or TUN packets) handed to the core per readiness callback at most."""


def _first_fragment(data: bytes) -> bool:
    """`data` starts a 0xE4 message of several fragments (direct, or in TURN ChannelData)."""
    at = 4 if 0x40 <= data[0] <= 0x7F else 0
    return len(data) > at + 15 and data[at] == 0xE4 and data[at + 13] == 0 and data[at + 14] > 1


def _last_fragment(data: bytes) -> bool:
    """`data` ends a 0xE4 message of several fragments."""
    at = 4 if 0x40 <= data[0] <= 0x7F else 0
    return (len(data) > at + 15 and data[at] == 0xE4 and data[at + 14] > 1
            and data[at + 13] == data[at + 14] - 1)


class TunnelError(Exception):
    """The tunnel cannot start (credentials, socket, TUN device); the message names what."""


@dataclass(frozen=True)
class TunnelSettings:
    """What the agent's `tunnel:` section resolves to."""

    server_host: str
    """`meshd server`'s address (control, STUN, TURN)."""
    control_port: int
    """Its control channel port (20004)."""
    stun_port: int
    """Its STUN/TURN port (3478)."""
    kubeconfig: Path
    """Node kubeconfig: cluster CA, node certificate and key."""
    interface: str = "mesh0"
    """TUN device name."""
    mtu: int = 1380
    """TUN MTU."""
    listen_port: int = 0
    """UDP port of the tunnel socket; 0 = a random one (design §6)."""
    offload: bool = True
    """Open the TUN device with IFF_VNET_HDR and TSO/checksum offloads (64 KB per read and
    write); falls back to one packet per read when the kernel refuses."""
    mesh: MeshConfig | None = None
    """Core tunables (default: `MeshConfig(stun_server)`)."""
    fast_path: bool = True
    """Carry lone data packets of direct paths in the native thread (`meshd.tunnel.fastpath`)
    once mesh0 is up; without the extension the adapter reads everything itself."""
    busy_poll_us: int = 0
    """The native thread's busy polling budget (`tunnel.busyPollUs`; 0 = off)."""


def node_material(kubeconfig: Path) -> tuple[x509.Certificate, CertificateKey, x509.Certificate]:
    """(node certificate, its key, cluster CA) from a node kubeconfig (inline `*-data` or file
    references, as `cloudcore certs node` writes them). Raises TunnelError."""
    where = str(kubeconfig)
    try:
        doc = yaml.safe_load(kubeconfig.read_text(encoding="utf-8"))
        ctx_name = doc["current-context"]
        ctx = next(c["context"] for c in doc["contexts"] if c["name"] == ctx_name)
        cluster = next(c["cluster"] for c in doc["clusters"] if c["name"] == ctx["cluster"])
        user = next(u["user"] for u in doc["users"] if u["name"] == ctx["user"])
    except (OSError, yaml.YAMLError, KeyError, TypeError, StopIteration) as exc:
        raise TunnelError(f"{where}: not a usable node kubeconfig ({exc!r})") from None

    def pem(section: dict[str, Any], name: str) -> bytes:
        if section.get(f"{name}-data"):
            return base64.b64decode(section[f"{name}-data"])
        if section.get(name):
            path = Path(section[name])
            return (path if path.is_absolute() else kubeconfig.parent / path).read_bytes()
        raise TunnelError(f"{where}: {name}(-data) missing (the tunnel needs a node certificate)")

    try:
        cert = x509.load_pem_x509_certificate(pem(user, "client-certificate"))
        key = load_pem_private_key(pem(user, "client-key"), None)
        ca = x509.load_pem_x509_certificate(pem(cluster, "certificate-authority"))
    except (OSError, ValueError, TypeError) as exc:
        raise TunnelError(f"{where}: {exc}") from None
    if not isinstance(key, CertificateKey):
        raise TunnelError(f"{where}: unsupported client key type")
    return cert, key, ca


NOFILE_RESERVE = 1024
"""File descriptors kept free for everything but the guess pool (proxy connections, TUN,
control channel, DNS)."""


def fit_nofile(sockets: int, reserve: int = NOFILE_RESERVE) -> int:
    """Make room for a guess pool of `sockets` under RLIMIT_NOFILE: raise the soft limit
    towards the hard one if needed; returns the pool size that fits (maybe smaller, maybe 0)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        in_use = len(os.listdir("/proc/self/fd"))
    except OSError:
        in_use = 64
    need = in_use + reserve + sockets
    raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
    if soft != resource.RLIM_INFINITY and soft < raised:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            event(log, logging.INFO, "tunnel.nofile_raised", old=soft, new=raised, hard=hard)
            soft = raised
        except (ValueError, OSError) as exc:
            event(log, logging.WARNING, "tunnel.nofile_refused", soft=soft, hard=hard,
                  error=exc)
    if soft == resource.RLIM_INFINITY:
        return sockets
    fits = max(0, min(sockets, soft - in_use - reserve))
    if fits < sockets:
        event(log, logging.WARNING, "tunnel.guess_pool_smaller", sockets=fits, wanted=sockets,
              nofile=soft)
    return fits


def _send_with_ttl(sock: socket.socket, t: Transmit) -> None:
    """Send `t` with its own IP TTL (a pre-punch), then the default again."""
    assert t.ttl is not None
    sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, t.ttl)
    try:
        sock.sendto(t.data, t.destination)
    finally:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)


def route_source(destination: str) -> str:
    """The local IP the kernel uses towards `destination` (the host candidate)."""
    family = socket.AF_INET6 if ":" in destination else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as probe:
        probe.connect((destination, 9))
        return str(probe.getsockname()[0])


class TunnelService:
    """A `MeshNode` on real sockets."""

    def __init__(self, node: MeshNode, sock: socket.socket, connector: ControlConnector,
                 settings: TunnelSettings, *,
                 open_tun: Callable[..., TunDevice] = TunDevice.open) -> None:
        self.node = node
        """The core."""
        self.settings = settings
        self.tun: TunDevice | None = None
        """mesh0, once welcomed."""
        self.send_errors = 0
        """Datagrams the kernel refused."""
        self.tun_drops = 0
        """Packets the TUN device refused."""
        self.gso = True
        """Send runs of equal datagrams with UDP GSO (off after the kernel refuses it)."""
        self.gso_sends = 0
        """`sendmsg` calls that carried a run of datagrams."""
        self.gro_reads = 0
        """Reads that brought several coalesced datagrams (UDP GRO)."""
        self._native_whole_reads = 0  # whole 0xE4 messages a stopped fast path took
        self._sock = sock
        self._poll = select.poll()
        self._poll.register(sock.fileno(), select.POLLIN)
        self._connector = connector
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._deadline: float | None = None
        self._ready = asyncio.Event()
        self._on_ready: list[Callable[[], None]] = []
        self._closed = False
        self._signals_flushed = 0
        self._control_due = False
        self._flushed_at = 0.0
        self.nat_probe: NatProber | None = None
        """The background NAT classification (`start_nat_probe`)."""
        self._pool: dict[Address, socket.socket] = {}
        """Open guess-pool sockets by local address (`meshd.tunnel.guess`)."""
        self.pool_open_errors = 0
        """Pool sockets the kernel refused to open."""
        self.fast: Any = None
        """The native fast path (`meshd.tunnel._fastpath.FastPath`) while it runs."""
        self._fast_routes: dict[str, FastRoute] = {}
        """Routes installed in the fast path, by peer."""
        self._fast_keys: dict[str, int] = {}
        self._fast_names: dict[int, str] = {}
        self._fast_tick: asyncio.TimerHandle | None = None
        self.fast_path_error: str | None = None
        """Why the fast path did not start or stopped (Python reads everything then)."""
        self._open_tun_device = open_tun

    @classmethod
    async def start(cls, settings: TunnelSettings, *,
                    open_tun: Callable[..., TunDevice] = TunDevice.open) -> TunnelService:
        """Open the socket and dial the control channel (mesh0 follows the welcome).
        `open_tun`: how mesh0 is opened (`TunDevice.open`'s signature; tests pass a device
        on a socketpair)."""
        cert, key, ca = node_material(settings.kubeconfig)
        try:
            tls = agent_tls_context(kubeconfig=settings.kubeconfig)
        except Exception as exc:
            raise TunnelError(f"tunnel: {exc}") from None
        server_ip = socket.getaddrinfo(settings.server_host, settings.stun_port,
                                       type=socket.SOCK_DGRAM)[0][4][0]
        host_ip = route_source(str(server_ip))
        sock = socket.socket(socket.AF_INET6 if ":" in host_ip else socket.AF_INET,
                             socket.SOCK_DGRAM)
        try:
            sock.bind((host_ip, settings.listen_port))
        except OSError as exc:
            sock.close()
            raise TunnelError(f"tunnel: cannot bind UDP {host_ip}:{settings.listen_port}: "
                              f"{exc.strerror}") from None
        sock.setblocking(False)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, opt, 4 << 20)
        with contextlib.suppress(OSError):  # UDP GRO (Linux 5.0+): coalesced reads
            sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        local: Address = (host_ip, sock.getsockname()[1])
        static = X25519PrivateKey.generate()
        client = ControlClient(ControlClientConfig(public_bytes(static)))
        loop = asyncio.get_running_loop()
        stun_server: Address = (str(server_ip), settings.stun_port)
        mesh_config = (MeshConfig(stun_server=stun_server) if settings.mesh is None
                       else replace(settings.mesh, stun_server=stun_server))
        if settings.offload and settings.mtu < OFFLOAD_MIN_MTU:
            event(log, logging.INFO, "tunnel.offload_off", mtu=settings.mtu,
                  reason=f"mtu below {OFFLOAD_MIN_MTU}")
            settings = replace(settings, offload=False)
        # Fragments follow the MTU: a path narrow enough for a lower mtu gets smaller ones too.
        mesh_config = replace(mesh_config, tunnel=replace(
            mesh_config.tunnel, fragment_part=fragment_part_for(settings.mtu)))
        guess = mesh_config.punch.guess
        if guess.enabled:
            fits = fit_nofile(guess.sockets)
            if fits < guess.sockets:
                guess = (replace(guess, sockets=fits) if fits else
                         replace(guess, enabled=False))
                mesh_config = replace(mesh_config, punch=replace(mesh_config.punch,
                                                                 guess=guess))
        node = MeshNode(client, local, certificate=cert, certificate_key=key,
                        ca_certificate=ca, static_key=static, config=mesh_config,
                        wall_offset=time.time() - loop.time())
        holder: list[TunnelService] = []
        connector = ControlConnector(client, settings.server_host, settings.control_port, tls,
                                     on_event=lambda ev: holder[0]._control(ev))
        service = cls(node, sock, connector, settings, open_tun=open_tun)
        holder.append(service)
        loop.add_reader(sock.fileno(), service._on_socket)
        connector.start()
        event(log, logging.INFO, "tunnel.start", local=f"{host_ip}:{local[1]}",
              server=f"{settings.server_host}:{settings.control_port}")
        return service

    async def wait_ready(self, timeout: float | None = None) -> bool:
        """Wait for the welcome (mesh0 up); False on timeout."""
        try:
            await asyncio.wait_for(self._ready.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def on_ready(self, callback: Callable[[], None]) -> None:
        """Call `callback` once mesh0 is up."""
        if self._ready.is_set():
            callback()
        else:
            self._on_ready.append(callback)

    # --- callbacks: feed, flush -----------------------------------------------------------------

    def _control(self, ev: ControlEvent) -> None:
        self.node.control_event(ev, self._loop.time())
        if self.tun is None and self.node.overlay is not None:
            self._open_tun()
        self._flush()

    def _open_tun(self) -> None:
        overlay = self.node.overlay
        assert overlay is not None
        try:
            part = self.node.config.tunnel.fragment_part
            self.tun = self._open_tun_device(
                self.settings.interface, str(overlay.ip), overlay.network.prefixlen,
                self.settings.mtu, offload=self.settings.offload,
                gso_max_size=whole_message_packet(GSO_MAX_BYTES, part))
        except Exception as exc:
            event(log, logging.ERROR, "tunnel.tun_failed", interface=self.settings.interface,
                  error=exc)
            return
        self.node.tun_frames = self.tun.offload
        if self.settings.fast_path and fastpath.AVAILABLE:
            self._start_fast_path(self.tun)
        else:
            self._loop.add_reader(self.tun.fd, self._on_tun)
        event(log, logging.INFO, "tunnel.tun_up", interface=self.settings.interface,
              address=overlay, offloads=f"{self.tun.offloads:#x}",
              offload_refused=self.tun.offload_error, fast_path=self.fast is not None)
        self._ready.set()
        for callback in self._on_ready:
            callback()
        self._on_ready.clear()

    def _start_fast_path(self, tun: TunDevice) -> None:
        """From here on the native thread reads mesh0 and the tunnel socket; what it does not
        carry itself comes to `_on_handoff`."""
        config = self.node.config.tunnel
        fast = None
        try:
            fast = fastpath.NATIVE.FastPath(
                self._sock.fileno(), tun.fd, frames=tun.offload,
                check_source=config.check_inner_source, fragment_part=config.fragment_part,
                busy_poll_us=self.settings.busy_poll_us)
            fast.start()
        except (OSError, RuntimeError, ValueError) as exc:  # no thread: Python reads as before
            if fast is not None:
                fast.close()
            self.fast_path_error = str(exc)
            event(log, logging.ERROR, "tunnel.fast_path_failed", node=self.node.node, error=exc,
                  fallback="python")
            self._loop.add_reader(tun.fd, self._on_tun)
            return
        # The thread reads the socket from now on (datagrams waiting in it are its too).
        self._loop.remove_reader(self._sock.fileno())
        self._loop.add_reader(fast.fileno(), self._on_handoff)
        self.fast = fast
        self._fast_tick = self._loop.call_later(FAST_SYNC_S, self._on_fast_tick)

    def _on_handoff(self) -> None:
        """What the fast path read and left to Python: the same work as `_on_socket` and
        `_on_tun`, in batches of the same size."""
        fast, tun = self.fast, self.tun
        if fast is None or tun is None:
            return
        # Read before draining: the thread records a failure after its last hand-off.
        failed: OSError | None = fast.error
        try:
            self._handoff(fast, tun)
        finally:
            if failed is not None:
                self._fast_failed(failed)

    def _handoff(self, fast: Any, tun: TunDevice) -> None:
        packets, reads = fast.drain()
        try:
            now = self._loop.time()
            if reads:
                self.gro_reads += sum(1 for _, segment, _ in reads if segment)
                tun_out: list[bytes] = []
                for i in range(0, len(reads), READ_BATCH):
                    tun_out += self.node.receive_reads(reads[i:i + READ_BATCH], now)
                self._to_tun(tun_out)
            if packets:
                batch = TUN_FRAME_BATCH if tun.offload else READ_BATCH
                for i in range(0, len(packets), batch):
                    self._send(self.node.send_packets(packets[i:i + batch], now))
                self._after_data()
        finally:
            fast.release()  # sent and written: later packets may go natively again

    def _fast_failed(self, error: OSError) -> None:
        """The thread stopped on an error it could not get past, after handing over what it
        had read (drained by now): fold in its last stats, and read the socket and mesh0 in
        Python from here on, as without the extension."""
        fast = self.fast
        if fast is None:
            return
        self._loop.remove_reader(fast.fileno())
        if self._fast_tick is not None:
            self._fast_tick.cancel()
            self._fast_tick = None
        counts = fast.counters()  # its batched sends and whole-message reads stay counted
        self.gso_sends += counts["gso_sends"]
        self.gro_reads += counts["gro_reads"]
        self._native_whole_reads += counts["gro_reads"]
        fast.close()  # joins the thread (it has returned)
        self._fast_stats(self._loop.time())
        self.fast = None
        self._fast_routes.clear()
        self.fast_path_error = str(error)
        event(log, logging.ERROR, "tunnel.fast_path_failed", node=self.node.node, error=error,
              fallback="python")
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._on_socket)
            if self.tun is not None:
                self._loop.add_reader(self.tun.fd, self._on_tun)
            self._flush()

    def _on_fast_tick(self) -> None:
        """Fold the fast path's traffic into the core at least every FAST_SYNC_S (consent
        checks, keepalive timers), then the full round if the core has something due."""
        self._fast_tick = None
        if self.fast is None or self._closed:
            return
        now = self._loop.time()
        if self._fast_stats(now):
            self.node.handle_timer(now)
            self._flush()
        self._fast_tick = self._loop.call_later(FAST_SYNC_S, self._on_fast_tick)

    def _fast_stats(self, now: float) -> bool:
        """Apply the fast path's per-peer counters to the core; True if it carried anything."""
        fast = self.fast
        if fast is None:
            return False
        stats = fast.take_stats()
        if not stats:
            return False
        offset = now - time.monotonic()  # the thread's clock is time.monotonic()
        for key, (tx_packets, tx_bytes, last_tx, rx_packets, rx_bytes, last_rx,
                  auth_failed) in stats.items():
            name = self._fast_names.get(key)
            if name is None:
                continue
            self.node.fast_stats(name, FastStats(
                tx_packets, tx_bytes, last_tx + offset if last_tx else None,
                rx_packets, rx_bytes, last_rx + offset if last_rx else None, auth_failed))
        return True

    def _fast_sync(self, now: float) -> None:
        """Install the routes the core wants (after every full round: keys and paths change
        only in rounds)."""
        fast = self.fast
        if fast is None:
            return
        wanted = self.node.fast_routes(now)
        installed = self._fast_routes
        for name in [n for n in installed if n not in wanted]:
            fast.remove_peer(self._fast_keys[name])
            del installed[name]
        offset = time.monotonic() - now
        for name, route in wanted.items():
            old = installed.get(name)
            if old is not None and old.same_keys(route):
                continue
            key = self._fast_keys.get(name)
            if key is None:
                key = self._fast_keys[name] = len(self._fast_keys) + 1
                self._fast_names[key] = name
            try:
                fast.set_peer(
                    key, overlay=route.overlay, remote_index=route.remote_index,
                    send_key=route.send_key, counter=route.counter,
                    send_limit=route.send_limit, send_fragments=route.send_fragments,
                    local_index=route.local_index, receive_key=route.receive_key,
                    replay=route.replay, endpoint=route.endpoint,
                    send_until=route.send_until + offset,
                    receive_until=route.receive_until + offset, channel=route.channel)
            except (ValueError, TypeError, MemoryError, RuntimeError) as exc:  # Python's peer
                event(log, logging.WARNING, "tunnel.fast_route_refused", peer=name, error=exc)
                if old is not None:
                    fast.remove_peer(key)
                    del installed[name]
                continue
            installed[name] = route

    def _on_socket(self) -> None:
        recv = self._sock.recvmsg
        batch: list[Read] = []
        for i in range(READ_BATCH):
            if i == 1 and not self._poll.poll(0):
                break  # a lone datagram: no failed read (its exception costs more than this)
            try:
                data, ancillary, _, source = recv(65535, GRO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP errors surface here (ECONNREFUSED): nothing to read
                continue
            segment = 0
            for level, kind, value in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    segment = int.from_bytes(value[:4], sys.byteorder)
            if 0 < segment < len(data):  # GRO joined datagrams of `segment` bytes (last: less)
                self.gro_reads += 1
                batch.append((data, segment, source))
            else:
                batch.append((data, 0, source))
        if not batch:
            return
        self._to_tun(self.node.receive_reads(batch, self._loop.time()))

    def _on_tun(self) -> None:
        tun = self.tun
        if tun is None:
            return
        packets = tun.read_batch(TUN_FRAME_BATCH if tun.offload else READ_BATCH)
        if not packets:
            return
        self._send(self.node.send_packets(packets, self._loop.time()))
        self._after_data()

    def _after_data(self) -> None:
        """The full round after data only when the core did more than move data, or at least
        every FULL_FLUSH_S (it walks every peer's path machine: ~100 µs with four peers, paid
        per wake-up it was most of a round trip's cost)."""
        now = self._loop.time()
        if self.node.data_only() and now - self._flushed_at < FULL_FLUSH_S:
            return
        self._flush()

    def _send(self, transmits: list[Transmit]) -> None:
        if self._pool:  # only while guessing or on a guessed path
            transmits = self._send_pool(transmits)
        sendto = self._sock.sendto
        if self.gso and len(transmits) > 1:
            transmits = self._send_segmented(transmits)
        for t in transmits:
            try:
                if t.ttl is None:
                    sendto(t.data, t.destination)
                else:
                    _send_with_ttl(self._sock, t)
            except OSError:
                self.send_errors += 1

    def _send_pool(self, transmits: list[Transmit]) -> list[Transmit]:
        """Send the datagrams whose source is a pool socket from it; return the rest."""
        pool = self._pool
        rest: list[Transmit] = []
        for t in transmits:
            sock = pool.get(t.source)
            if sock is None:
                rest.append(t)
                continue
            try:
                if t.ttl is None:
                    sock.sendto(t.data, t.destination)
                else:
                    _send_with_ttl(sock, t)
            except OSError:
                self.send_errors += 1
        return rest

    def _open_pool(self, count: int) -> None:
        """`GuessSocketsWanted`: `count` sockets on the host address, port 0 (the kernel picks
        each port), non-blocking, each with a reader. Opens fewer if the kernel refuses."""
        host = self.node.local[0]
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        opened: list[Address] = []
        error: OSError | None = None
        for _ in range(count):
            try:
                sock = socket.socket(family, socket.SOCK_DGRAM)
            except OSError as exc:
                error = exc
                break
            try:
                sock.bind((host, 0))
                sock.setblocking(False)
            except OSError as exc:
                sock.close()
                error = exc
                break
            local: Address = (host, sock.getsockname()[1])
            self._pool[local] = sock
            self._loop.add_reader(sock.fileno(), self._on_pool_socket, sock, local)
            opened.append(local)
        if error is not None:
            self.pool_open_errors += count - len(opened)
            event(log, logging.WARNING, "tunnel.guess_pool_short", opened=len(opened),
                  wanted=count, error=error.strerror or error)
        self.node.guess_sockets_opened(opened, self._loop.time())
        self._loop.call_soon(self._flush)  # the indications from the new sockets

    def _close_pool(self, addresses: tuple[Address, ...]) -> None:
        for address in addresses:
            sock = self._pool.pop(address, None)
            if sock is not None:
                self._loop.remove_reader(sock.fileno())
                sock.close()

    def _on_pool_socket(self, sock: socket.socket, local: Address) -> None:
        batch: list[Read] = []
        for _ in range(READ_BATCH):
            try:
                data, source = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:  # ICMP errors (ECONNREFUSED): nothing to read
                continue
            batch.append((data, 0, source))
        if not batch:
            return
        self._to_tun(self.node.receive_pool_reads(local, batch, self._loop.time()))

    def _to_tun(self, packets: list[bytes]) -> None:
        """Decrypted packets into mesh0, then the round after data."""
        tun = self.tun
        if tun is not None:
            for packet in packets:
                if not tun.write(packet):
                    self.tun_drops += 1
        self._after_data()

    def _send_segmented(self, transmits: list[Transmit]) -> list[Transmit]:
        """Send runs of datagrams to one destination with one `sendmsg` each (UDP GSO, Linux
        4.18+: the kernel cuts the buffer into datagrams of the first one's size, the last may
        be shorter); returns what is left for single sends. The fragments of one 0xE4 message
        make a run of their own, so the peer reads the message whole (one coalesced read). A
        kernel without GSO for this socket turns it off for good."""
        left: list[Transmit] = []
        sock = self._sock
        i, n = 0, len(transmits)
        while i < n:
            first = transmits[i]
            size = len(first.data)
            j, total = i + 1, size
            if first.ttl is None and not _last_fragment(first.data):
                while j < n and j - i < GSO_MAX_SEGMENTS:
                    t = transmits[j]
                    data = t.data
                    length = len(data)
                    if (t.destination != first.destination or t.ttl is not None
                            or length > size or total + length > GSO_MAX_BYTES
                            or _first_fragment(data)):
                        break
                    total += length
                    j += 1
                    if length < size or _last_fragment(data):
                        break  # only the last segment may be shorter
            if j - i == 1:
                left.append(first)
                i = j
                continue
            try:
                sock.sendmsg([b"".join([t.data for t in transmits[i:j]])],
                             [(SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))], 0,
                             first.destination)
                self.gso_sends += 1
            except OSError as exc:
                if exc.errno in (errno.EIO, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOPROTOOPT):
                    self.gso = False
                    event(log, logging.INFO, "tunnel.gso_off", error=exc.strerror or exc)
                    return left + transmits[i:]
                self.send_errors += j - i
            i = j
        return left

    def _flush(self) -> None:
        now = self._flushed_at = self._loop.time()
        self._send(self.node.datagrams_to_send(now))
        if self.node.metrics.signals_sent != self._signals_flushed and not self._control_due:
            # The core signaled through the control client: have the connector write it now
            # (soon, not from inside its own event callback).
            self._control_due = True
            self._loop.call_soon(self._flush_control)
        while (ev := self.node.next_event()) is not None:
            self._mesh_event(ev)  # the rest is logged by the core; status reads peer_status()
        if self.fast is not None:
            self._fast_sync(now)
        deadline = self.node.get_timer()
        if deadline == self._deadline or self._closed:
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._deadline = deadline
        if deadline is not None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    # --- NAT class (meshd.tunnel.natprobe) -------------------------------------------------------

    def start_nat_probe(self, config: NatProbeConfig | None = None) -> NatProber:
        """Classify this node's NAT in the background against the tunnel's STUN server (from a
        socket of its own: nothing here waits for it), again when the reflexive address
        changes, and publish each result (`report_nat`)."""
        if self.nat_probe is None:
            self.nat_probe = NatProber(self.node.config.stun_server, self.node.local[0],
                                       self.report_nat, config)
            if self.node.reflexive_address is not None:
                self.nat_probe.reflexive_changed(self.node.reflexive_address)
        return self.nat_probe

    def report_nat(self, summary: NatSummary) -> None:
        """Publish this node's NAT class through the control channel (server and peers)."""
        if self._closed:
            return
        now = self._loop.time()
        self.node.control.report_nat(summary, now)
        self.node.nat_changed(now)  # may make a relayed peer start guessing
        self._connector.flush()
        self._flush()

    def _mesh_event(self, ev: MeshEvent) -> None:
        if isinstance(ev, ReflexiveChanged) and self.nat_probe is not None:
            self.nat_probe.reflexive_changed(ev.address)
        elif isinstance(ev, GuessSocketsWanted) and not self._closed:
            self._open_pool(ev.count)
        elif isinstance(ev, GuessSocketsReleased):
            self._close_pool(ev.addresses)

    def _flush_control(self) -> None:
        self._control_due = False
        self._signals_flushed = self.node.metrics.signals_sent
        if not self._closed:
            self._connector.flush()

    def _on_timer(self) -> None:
        self._timer, self._deadline = None, None
        now = self._loop.time()
        self._fast_stats(now)  # timers (keepalives, consent) must see the fast path's traffic
        self.node.handle_timer(now)
        self._flush()

    # --- status ---------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """The `tunnel` part of `/status`."""
        node = self.node
        return {
            "node": node.node, "overlay": str(node.overlay) if node.overlay else None,
            "interface": self.settings.interface if self.tun is not None else None,
            "local": f"{node.local[0]}:{node.local[1]}",
            "relayed": (f"{node.relayed_address[0]}:{node.relayed_address[1]}"
                        if node.relayed_address else None),
            "control": node.control.state.value,
            "controlError": node.control.last_error,
            "nat": _nat_doc(node.control.effective_nat),
            "natSource": node.control.nat_source,
            "natProbe": self.nat_probe is not None,
            "guessPool": len(self._pool),
            "fastPath": self._fast_status(),
            "fastPathError": self.fast_path_error,
            "peers": [p.as_dict() for p in node.peer_status()],
        }

    def _fast_status(self) -> dict[str, Any] | None:
        """The native fast path's counters and the peers it serves (None: not running)."""
        if self.fast is None:
            return None
        return {"peers": sorted(self._fast_routes),
                "sending": sorted(n for n, r in self._fast_routes.items() if r.endpoint),
                **self.fast.counters()}

    def metrics_samples(self) -> list[tuple[str, dict[str, str], float]]:
        """`meshd_tunnel_*` samples for `/metrics`."""
        m = self.node.metrics
        # The fast path's own GSO sends and whole-message reads (bulk frames, natively).
        native = self.fast.counters() if self.fast is not None else {"gso_sends": 0,
                                                                      "gro_reads": 0}
        out: list[tuple[str, dict[str, str], float]] = []
        for (nat, peer_nat), n in sorted(m.punch_attempts.items()):
            out.append(("meshd_tunnel_punch_attempts_total", {"nat": nat, "peerNat": peer_nat},
                        n))
        for (nat, peer_nat), n in sorted(m.punch_successes.items()):
            out.append(("meshd_tunnel_punch_successes_total", {"nat": nat, "peerNat": peer_nat},
                        n))
        for peer, s in sorted(m.time_to_direct_s.items()):
            out.append(("meshd_tunnel_time_to_direct_seconds", {"peer": peer}, s))
        for row in self.node.peer_status():
            if row.time_to_relay_s is not None:
                out.append(("meshd_tunnel_time_to_relay_seconds", {"peer": row.node},
                            row.time_to_relay_s))
        for reason, n in sorted(m.rejected.items()):
            out.append(("meshd_tunnel_rejected_total", {"reason": reason}, n))
        for side in ("hard", "easy"):
            out.append(("meshd_tunnel_guess_phases_total", {"side": side},
                        m.guess_phases.get(side, 0)))
            out.append(("meshd_tunnel_guess_hits_total", {"side": side},
                        m.guess_hits.get(side, 0)))
        out += [
            ("meshd_tunnel_guess_probes_total", {}, m.guess_probes),
            ("meshd_tunnel_guess_pool_sockets", {}, len(self._pool)),
            ("meshd_tunnel_guess_pool_garbage_total", {}, m.guess_pool_garbage),
            ("meshd_tunnel_guess_pool_open_errors_total", {}, self.pool_open_errors),
        ]
        out += [
            ("meshd_tunnel_dropped_replays_total", {}, m.rejected.get("replayed", 0)),
            ("meshd_tunnel_relay_bytes_total", {"direction": "out"}, m.relay_bytes_out),
            ("meshd_tunnel_relay_bytes_total", {"direction": "in"}, m.relay_bytes_in),
            ("meshd_tunnel_direct_bytes_total", {"direction": "out"}, m.direct_bytes_out),
            ("meshd_tunnel_rekeys_total", {}, m.rekeys),
            ("meshd_tunnel_handshakes_total", {}, m.handshakes),
            ("meshd_tunnel_no_path_total", {}, m.no_path),
            ("meshd_tunnel_no_route_total", {}, m.no_route),
            ("meshd_tunnel_garbage_total", {}, m.garbage),
            ("meshd_tunnel_send_errors_total", {}, self.send_errors),
            ("meshd_tunnel_gso_sends_total", {}, self.gso_sends + native["gso_sends"]),
            ("meshd_tunnel_gro_reads_total", {}, self.gro_reads + native["gro_reads"]),
            ("meshd_tunnel_whole_reads_total", {}, self._whole_reads() + native["gro_reads"]),
            ("meshd_tunnel_tun_drops_total", {}, self.tun_drops),
        ]
        if self.fast is not None:
            c = self.fast.counters()
            out += [
                ("meshd_tunnel_fastpath_packets_total", {"direction": "out"}, c["fast_tx"]),
                ("meshd_tunnel_fastpath_packets_total", {"direction": "in"}, c["fast_rx"]),
                ("meshd_tunnel_fastpath_handoffs_total", {"source": "tun"}, c["handed_tun"]),
                ("meshd_tunnel_fastpath_handoffs_total", {"source": "socket"}, c["handed_udp"]),
                ("meshd_tunnel_fastpath_errors_total", {"kind": "tun-write"},
                 c["tun_write_errors"]),
                ("meshd_tunnel_fastpath_errors_total", {"kind": "send"}, c["send_errors"]),
                ("meshd_tunnel_fastpath_replay_races_total", {}, c["replay_races"]),
                ("meshd_tunnel_fastpath_paused_total", {}, c["paused"]),
                ("meshd_tunnel_fastpath_peers", {}, sum(
                    1 for r in self._fast_routes.values() if r.endpoint is not None)),
            ]
        if self.fast is not None or self.fast_path_error is not None:
            # 1: it did not start, or stopped on an error (Python carries everything).
            out.append(("meshd_tunnel_fastpath_failed", {}, int(self.fast is None)))
        for p in self.node.peer_status():
            out.append(("meshd_tunnel_peer_path", {"peer": p.node, "path": p.path}, 1))
            if p.guessed:
                out.append(("meshd_tunnel_peer_guessed", {"peer": p.node}, 1))
            out.append(("meshd_tunnel_peer_bytes_total", {"peer": p.node, "direction": "in"},
                        p.bytes_in))
            out.append(("meshd_tunnel_peer_bytes_total", {"peer": p.node, "direction": "out"},
                        p.bytes_out))
        return out

    def _whole_reads(self) -> int:
        """Coalesced reads that were one whole 0xE4 message (taken without splitting) in
        Python, including those of a fast path that has stopped."""
        endpoint = self.node.endpoint
        if endpoint is None:
            return self._native_whole_reads
        return self._native_whole_reads + sum(
            s.stats().messages_whole for s in endpoint.sessions.values())

    def connect_address(self, node: str, port: int) -> Address | None:
        """`PeerDirectory` helper: the peer's overlay address and `port`, if online."""
        overlay = self.node.peer_overlay(node)
        return None if overlay is None else (str(overlay), port)

    async def stop(self) -> None:
        """Delete the allocation, close the control channel, the socket and mesh0."""
        if self._closed:
            return
        if self.nat_probe is not None:
            await self.nat_probe.close()
        now = self._loop.time()
        self.node.close(now)
        self._send(self.node.datagrams_to_send(now))
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self._fast_tick is not None:
            self._fast_tick.cancel()
        if self.fast is not None:
            self._loop.remove_reader(self.fast.fileno())
            self.fast.close()  # joins the thread: nothing reads the fds after this
            self.fast = None
        await self._connector.close()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._close_pool(tuple(self._pool))
        if self.tun is not None:
            self._loop.remove_reader(self.tun.fd)
            self.tun.close()
            self.tun = None
        event(log, logging.INFO, "tunnel.stop", node=self.node.node)


def overlay_of(status: dict[str, Any], node: str) -> ipaddress.IPv4Address | None:
    """A peer's overlay address from a `/status` document's tunnel part."""
    for peer in status.get("peers", []):
        if peer.get("node") == node:
            return ipaddress.IPv4Address(peer["overlay"])
    return None


def _nat_doc(nat: NatSummary | None) -> dict[str, Any] | None:
    if nat is None:
        return None
    return {"natType": nat.nat_type, "mapping": nat.mapping, "filtering": nat.filtering}
