"""Debian's wireguard-go between two lab hosts: the tunnel an operator would otherwise install.

`WireguardPair.up(lab, a, b, tmp)` starts `wireguard-go` in each host's namespace (userspace,
like our agent) on interfaces `wg<pid>n0` and `wg<pid>n1` (names distinct per host and per
bench process: wireguard-go's control socket, /var/run/wireguard/NAME.sock, is not per
namespace, and two benches at once must not take each other's), configures them with `wg`
(wireguard-tools): fresh keys, each host's lab address as the other's endpoint, a keepalive;
addresses 10.99.0.1/24 and 10.99.0.2/24. `close()` stops both processes (by pid); the
interfaces go with them.
"""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from netlab import Lab

PORT = 51820
ADDRESSES = ("10.99.0.1", "10.99.0.2")


def _wg(lab: Lab, node: str, *args: str, input: str | None = None) -> str:
    return lab.run(node, ["wg", *args], input=input).stdout.strip()


@dataclass
class WireguardPair:
    """wireguard-go on two hosts, addressed 10.99.0.1 and 10.99.0.2."""

    lab: Lab
    hosts: tuple[str, str]
    procs: list[subprocess.Popen[Any]] = field(default_factory=list)

    @classmethod
    def up(cls, lab: Lab, a: str, b: str, tmp: Path) -> WireguardPair:
        pair = cls(lab, (a, b))
        try:
            pair._start(tmp)
        except BaseException:
            pair.close()
            raise
        return pair

    def _start(self, tmp: Path) -> None:
        lab = self.lab
        env = dict(os.environ, WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD="1",
                   LOG_LEVEL="error")
        keys = {}
        for host in self.hosts:
            private = _wg(lab, host, "genkey")
            keys[host] = (private, _wg(lab, host, "pubkey", input=private + "\n"))
            log = open(tmp / f"wireguard-{host}.log", "w")  # noqa: SIM115 - the process owns it
            proc = lab.popen(host, ["wireguard-go", "-f", self.interface(host)], stdout=log,
                             stderr=subprocess.STDOUT, env=env)
            log.close()
            self.procs.append(proc)
        for host in self.hosts:
            deadline = time.monotonic() + 10
            while lab.run(host, ["ip", "link", "show", "dev", self.interface(host)],
                          check=False).returncode != 0:
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"wireguard-go did not create {self.interface(host)} on "
                                       f"{host}: "
                                       + (tmp / f"wireguard-{host}.log").read_text()[-500:])
                time.sleep(0.05)
        for i, host in enumerate(self.hosts):
            other = self.hosts[1 - i]
            key_file = tmp / f"wg-{host}.key"
            key_file.write_text(keys[host][0] + "\n")
            key_file.chmod(0o600)
            _wg(lab, host, "set", self.interface(host), "listen-port", str(PORT), "private-key",
                str(key_file), "peer", keys[other][1], "endpoint", f"{lab.addr(other)}:{PORT}",
                "allowed-ips", f"{ADDRESSES[1 - i]}/32", "persistent-keepalive", "25")
            lab.run(host, ["ip", "addr", "add", f"{ADDRESSES[i]}/24", "dev", self.interface(host)])
            lab.run(host, ["ip", "link", "set", "dev", self.interface(host), "mtu", "1420", "up"])

    def interface(self, host: str) -> str:
        """The WireGuard interface on `host`."""
        return f"wg{os.getpid()}n{self.hosts.index(host)}"  # at most 11 of IFNAMSIZ's 15

    def address(self, host: str) -> str:
        """The tunnel address of `host`."""
        return ADDRESSES[self.hosts.index(host)]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
