"""The seam to the host's packet-filter tools: `RuleBackend` and the real `IptablesBackend`.

Four operations are all the manager needs: dump the tables (`iptables-save`), apply a document
atomically (`iptables-restore --noflush`), run `ip` for the policy routing TPROXY needs, and
delete a table we created (nft only). `IptablesBackend` runs the tools of one iptables variant
(nft or legacy), optionally behind an argv prefix such as `ip netns exec NS` (how the netns
tests drive a lab namespace).
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence
from typing import Literal, Protocol

Variant = Literal["nft", "legacy"]


class RuleError(Exception):
    """A rule tool failed or is missing; the message names the command and its complaint."""


class RuleBackend(Protocol):
    """What the rule manager needs from the host."""

    @property
    def name(self) -> str:
        """Which tools this is (`nft`, `legacy`, `fake`), for logs and status."""
        ...

    def save(self) -> str:
        """`iptables-save` output: every table that exists (`-t T` would list a table nft does
        not have as if it existed)."""
        ...

    def restore(self, document: str) -> None:
        """Apply `document` with `iptables-restore --noflush`, all or nothing."""
        ...

    def ip(self, *args: str) -> str:
        """Run `ip ARGS` and return its stdout; RuleError on failure."""
        ...

    def delete_table(self, table: str) -> None:
        """Delete an (empty) table where the backend can (nft); a no-op where the kernel
        keeps tables (legacy)."""
        ...


def _run(argv: Sequence[str], what: str, input: str | None = None,
         timeout: float = 30) -> str:
    try:
        proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
    except FileNotFoundError:
        raise RuleError(f"{what}: command not found: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise RuleError(f"{what}: {' '.join(argv)} timed out after {timeout:.0f} s") from None
    if proc.returncode != 0:
        err = (proc.stderr or proc.stdout).strip().splitlines()
        detail = "; ".join(err[-3:]) if err else f"exit code {proc.returncode}"
        raise RuleError(f"{what}: {' '.join(argv)}: {detail}")
    return proc.stdout


class IptablesBackend:
    """The real tools: `iptables-{variant}-save/-restore` and `ip`, run behind `prefix`."""

    def __init__(self, variant: Variant, prefix: Sequence[str] = ()) -> None:
        self.variant: Variant = variant
        self._prefix = list(prefix)

    @property
    def name(self) -> str:
        return self.variant

    def _tool(self, suffix: str) -> str:
        specific = f"iptables-{self.variant}-{suffix}"
        if shutil.which(specific) is not None:
            return specific
        return f"iptables-{suffix}"  # older distributions: one variant, no suffix

    def save(self) -> str:
        return _run([*self._prefix, self._tool("save")], "save")

    def restore(self, document: str) -> None:
        _run([*self._prefix, self._tool("restore"), "--noflush", "-w", "5"], "restore",
             input=document)

    def ip(self, *args: str) -> str:
        return _run([*self._prefix, "ip", *args], "ip")

    def delete_table(self, table: str) -> None:
        if self.variant == "nft":
            _run([*self._prefix, "nft", "delete", "table", "ip", table], f"delete {table}")


def _rule_count(prefix: Sequence[str], variant: Variant) -> int:
    tool = f"iptables-{variant}-save"
    if shutil.which(tool) is None:
        return -1
    try:
        text = _run([*prefix, tool], f"detect {variant}", timeout=10)
    except RuleError:
        return -1
    return sum(1 for line in text.splitlines() if line.startswith("-A "))


def detect_variant(prefix: Sequence[str] = ()) -> Variant:
    """The iptables variant the host uses: the one that already holds more rules (kube-proxy,
    Docker, ...), else what the `iptables` command is (Debian's alternatives: nft)."""
    nft, legacy = _rule_count(prefix, "nft"), _rule_count(prefix, "legacy")
    if nft > legacy:
        return "nft"
    if legacy > nft:
        return "legacy"
    if nft < 0:
        raise RuleError("no iptables found (install iptables: iptables-nft or iptables-legacy)")
    try:
        version = _run([*prefix, "iptables", "--version"], "detect", timeout=10)
    except RuleError:
        return "nft"
    return "legacy" if "legacy" in version else "nft"
