"""Network namespace primitives and the clean-up of labs whose owner died.

Every namespace a lab makes is named `ewlab-{owner pid}-{lab}-{node}`. Bridges, veths, TAPs and
nftables rules all live inside those namespaces, never in the host's own, so deleting the
namespaces (after stopping the processes inside them) removes everything a lab made. A lab whose
owner process is gone is stale: the next build removes it; live labs of other processes are left
alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

PREFIX = "ewlab-"


class LabError(Exception):
    """The lab could not be built or driven; the message names the node and command."""


def ns_name(owner: int, lab: str, node: str) -> str:
    """The namespace name of `node` in lab `lab` owned by process `owner`."""
    return f"{PREFIX}{owner}-{lab}-{node}"


def owner_of(ns: str) -> int | None:
    """The owner pid encoded in a lab namespace name, or None if it is not ours."""
    if not ns.startswith(PREFIX):
        return None
    pid, _, _ = ns[len(PREFIX):].partition("-")
    return int(pid) if pid.isdigit() else None


def sh(argv: Sequence[str], *, what: str, input: str | None = None,
       timeout: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise LabError naming `what` and the command's stderr."""
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise LabError(f"{what}: command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise LabError(f"{what}: {' '.join(argv)} timed out after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = err[-1] if err else f"exit code {proc.returncode}"
        raise LabError(f"{what}: {' '.join(argv)}: {detail}")
    return proc


def list_netns() -> list[str]:
    """Names of all network namespaces known to iproute2."""
    try:
        return sorted(os.listdir("/run/netns"))
    except FileNotFoundError:
        return []


def pid_alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie counts as dead: it will never clean up)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def ns_pids(ns: str) -> list[int]:
    """Processes whose network namespace is `ns`."""
    proc = sh(["ip", "netns", "pids", ns], what=f"namespace {ns}", check=False)
    return [int(p) for p in proc.stdout.split() if p.isdigit()]


def kill_pids(pids: Sequence[int], grace: float = 2.0) -> None:
    """SIGTERM, then SIGKILL whatever is left after `grace` seconds."""
    for pid in pids:
        _signal(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(pid_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.02)
    for pid in pids:
        if pid_alive(pid):
            _signal(pid, signal.SIGKILL)


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def delete_ns(ns: str) -> None:
    """Stop the processes inside `ns` (all were started by a lab) and delete it."""
    pids = ns_pids(ns)
    if pids:
        kill_pids(pids)
    sh(["ip", "netns", "delete", ns], what=f"namespace {ns}", check=False)


def cleanup_stale(include_owner: int | None = None) -> list[str]:
    """Delete lab namespaces whose owner is dead (and those of `include_owner`)."""
    removed = []
    for ns in list_netns():
        owner = owner_of(ns)
        if owner is None:
            continue
        if owner == include_owner or not pid_alive(owner):
            delete_ns(ns)
            removed.append(ns)
    return removed


def cleanup_all() -> list[str]:
    """Delete every lab namespace, live owner or not (for an operator after a mess)."""
    removed = []
    for ns in list_netns():
        if owner_of(ns) is not None:
            delete_ns(ns)
            removed.append(ns)
    return removed
