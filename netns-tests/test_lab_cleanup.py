"""A lab leaves nothing behind: on success, failure, Ctrl-C, SIGTERM, timeouts and kill -9."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from netlab import Lab, Topology, ns

TOPOLOGIES = Path(__file__).parent / "topologies"


def root_state() -> dict[str, str]:
    """What a lab must never change in the host's own namespace."""
    def out(argv: list[str]) -> str:
        return subprocess.run(argv, capture_output=True, text=True, check=False).stdout

    links = "\n".join(sorted(line.split(":")[1].strip().split("@")[0]
                             for line in out(["ip", "-o", "link"]).splitlines()))
    return {
        "links": links,
        "iptables": "\n".join(line for line in out(["iptables-save"]).splitlines()
                              if not line.startswith("#")),
        "nft": out(["nft", "list", "ruleset"]),
        "routes": out(["ip", "route"]),
    }


def lab_namespaces(owner: int) -> list[str]:
    return [n for n in ns.list_netns() if ns.owner_of(n) == owner]


def forwarders_of(owner: int) -> list[int]:
    """Delay forwarder processes serving namespaces of the lab owned by `owner`."""
    found = []
    prefix = f"{ns.PREFIX}{owner}-".encode()
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
        except OSError:
            continue  # the process ended while we looked
        if b"netlab.delaylink" in argv and any(a.startswith(prefix) for a in argv):
            found.append(int(cmdline.parent.name))
    return found


def big_topology(tmp_path: Path) -> Path:
    """Many namespaces and impaired links, so that a build takes long enough to interrupt."""
    hosts = "\n".join(f"  h{i}: {{segment: lan, pods: 3, link: {{delayMs: 1}}}}"
                      for i in range(12))
    path = tmp_path / "big.yaml"
    path.write_text(textwrap.dedent("""\
        name: big
        segments:
          internet: {subnet: 203.0.113.0/24}
          lan: {subnet: 10.9.0.0/24}
        routers:
          r: {wan: internet, lan: [lan], nat: symmetric, hairpin: true}
        hosts:
        """) + hosts + "\n")
    return path


def test_kill_9_mid_build_then_next_run_cleans(tmp_path: Path) -> None:
    before = root_state()
    child = subprocess.Popen([sys.executable, "-m", "netlab", "up", str(big_topology(tmp_path))],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while len(lab_namespaces(child.pid)) < 10:
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the build never got going"
            time.sleep(0.01)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
    leaked = lab_namespaces(child.pid)
    print(f"kill -9 mid-build left {len(leaked)} namespaces behind")
    assert leaked, "the kill came too late to test anything"
    # The next run of any lab removes them first.
    with Lab(Topology.load(TOPOLOGIES / "nat-kinds.yaml")):
        assert lab_namespaces(child.pid) == []
    assert lab_namespaces(os.getpid()) == []
    deadline = time.monotonic() + 5  # delay forwarders end with their parent (PDEATHSIG)
    while forwarders_of(child.pid):
        assert time.monotonic() < deadline, "a delay forwarder outlived its lab"
        time.sleep(0.05)
    assert root_state() == before


def test_exception_inside_lab_tears_down() -> None:
    before = root_state()
    with pytest.raises(RuntimeError), Lab(Topology.load(TOPOLOGIES / "nat-kinds.yaml")):
        assert len(lab_namespaces(os.getpid())) > 5
        raise RuntimeError("test failure inside the lab")
    assert lab_namespaces(os.getpid()) == []
    assert root_state() == before


def test_failed_build_tears_down() -> None:
    topo = Topology.from_dict({
        "name": "broken",
        "segments": {"lan": {"subnet": "10.8.0.0/24"}},
        # A rate tc refuses: the build fails after namespaces and links exist.
        "hosts": {"a": {"segment": "lan", "link": {"rateMbit": 1e-12}}, "b": {"segment": "lan"}},
    })
    with pytest.raises(ns.LabError, match="node a"):
        Lab(topo).build()
    assert lab_namespaces(os.getpid()) == []


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_lab_torn_down_on_signal(sig: int) -> None:
    child = subprocess.Popen([sys.executable, "-m", "netlab", "up",
                              str(TOPOLOGIES / "nat-kinds.yaml")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        for line in child.stdout:
            if "lab is up" in line:
                break
        assert lab_namespaces(child.pid)
        child.send_signal(sig)
        assert child.wait(timeout=30) == 0
    finally:
        child.kill()
        child.wait()
    assert lab_namespaces(child.pid) == []


def test_pytest_timeout_tears_down(tmp_path: Path) -> None:
    inner = tmp_path / "test_inner.py"
    inner.write_text(textwrap.dedent(f"""\
        import os, time
        from pathlib import Path
        from netlab import Lab, Topology

        def test_hangs():
            with Lab(Topology.load(Path({str(TOPOLOGIES / 'nat-kinds.yaml')!r}))):
                Path({str(tmp_path / 'pid')!r}).write_text(str(os.getpid()))
                time.sleep(60)
        """))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "--timeout", "3", "--timeout-method", "signal", str(inner),
                           "--rootdir", str(tmp_path)],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert "Timeout" in proc.stdout, proc.stdout
    pid = int((tmp_path / "pid").read_text())
    assert lab_namespaces(pid) == []


